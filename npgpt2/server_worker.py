"""The server's one model thread: generation requests decoded together, other jobs in turn.

The model is not thread-safe and its work is CPU-bound, so one thread owns it. Generation
requests go through a `batch_decode.BatchDecoder`: up to --max_batch rows decode together,
the requests waiting are prefilled together and join at the next step, and a finished or
cancelled one leaves at once (the
batching itself is in batch_decode.py). Other jobs (explain) run between two steps. A
job's results go on the job's own queue, and the connection thread that made the job
writes them out (see server_http.py); the one exception is a stream's events while its
socket takes them at once (Job.emit, server_http.Lane): the worker writes those itself,
never waiting, which spares the connection thread a wake-up per token.
"""
import collections
import logging
import queue
import threading
import time
from http import HTTPStatus

from . import explain
from .batch_decode import BatchDecoder
from .chat import ReplyText
from .compact_vocab import shown_ids
from .errors import Npgpt2Error
from .memory import NotEnoughMemory
from .sampling import TextStream
from .server_fields import BadRequest

log = logging.getLogger("npgpt2.server")

SHUTTING_DOWN = (HTTPStatus.SERVICE_UNAVAILABLE, "the server is shutting down")


class Job:
    """One request for the worker: a Generation (rows for the batch) or a task(worker, job)
    run on the worker thread. Results go on .out as ("start",), ("text", piece) (or what a
    Generation subclass sends), ("done", answer dict) or ("error", status, message)."""

    def __init__(self, task, deadline, stream=False, stops_at_deadline=True, gen=None, respond=None, **fields):
        self.task, self.deadline, self.stream, self.gen = task, deadline, stream, gen
        # generation stops itself at the deadline; a task that cannot is given up on there
        self.stops_at_deadline = stops_at_deadline
        self.respond = respond  # how the connection thread writes the results (None: server_http's)
        self.fields = fields
        self.out = queue.Queue()
        self.cancelled = threading.Event()
        self.closed = False     # answered (or given up): the worker counts it no more
        self.lane = None        # while set, emit() may write to the client itself (server_http.Lane)
        self.lock = threading.Lock()  # orders emit() against the connection thread's lane changes

    def emit(self, item):
        """A result that is not the last ("text", "chunk"): written to the client by the worker
        itself when the connection thread has opened a lane for it and the socket takes it at
        once, else put on .out for that thread. Results stay in order either way."""
        with self.lock:
            if self.lane is not None:
                self.lane.offer(item)
            else:
                self.out.put(item)

    def error(self, status, message):
        self.out.put(("error", status, message))


class Generation:
    """A generation request's rows (batch_decode.Row, one per answer) and how their tokens
    become what the request's thread sends: ("text", piece) as text is known, then ("done",
    {"text", "tokens", "finish_reason", ...}). Subclasses (openai_api.py) shape it otherwise."""

    def __init__(self, rows, stops=(), chat=False, extra=None):
        self.rows, self.stops, self.chat, self.extra = rows, list(stops), chat, extra or {}
        self.texts, self.reasons, self.left = [], [None] * len(rows), len(rows)

    def start(self, job, tokenizer):
        self.tokenizer = tokenizer
        self.texts = [ReplyText(tokenizer, self.stops) if self.chat else TextStream(tokenizer, self.stops)
                      for _ in self.rows]
        job.out.put(("start",))

    def push(self, job, i, token):
        """Row i's next token -> True when a stop string (or a chat's end) ended it."""
        piece, stopped = self.texts[i].push(token)
        self.send(job, i, piece)
        return stopped

    def send(self, job, i, piece):
        if piece:
            job.emit(("text", piece))

    def finish(self, job, i, reason):
        """Row i is done; True when it was the job's last."""
        self.reasons[i] = reason
        self.send(job, i, self.texts[i].finish())
        self.left -= 1
        return self.left == 0

    def answer(self):
        full = self.texts[0].text if self.chat else self.texts[0].shown_text
        gid, _ = shown_ids(self.tokenizer)  # GPT-2's ids, as explain shows them (a compact model's are its own)
        answer = {"text": full, "tokens": [gid(t) for t in self.rows[0].tokens], "finish_reason": self.reasons[0],
                  **self.extra}
        if self.chat:
            answer["message"] = {"role": "assistant", "content": full}
        return answer


class Worker:
    """Runs the model on one thread: generation jobs batched (up to max_batch rows), others in turn."""

    def __init__(self, model, tokenizer, max_queue, max_batch=8):
        self.model, self.tokenizer = model, tokenizer
        self.decoder = BatchDecoder(model, max_batch)
        self.max_queue = max_queue
        self.jobs = queue.Queue()
        self.waiting = collections.deque()  # generation jobs taken from .jobs, not yet in the batch
        self.pending = 0          # queued or running
        self.lock = threading.Lock()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="npgpt2-model", daemon=True)
        self.thread.start()

    def submit(self, job):
        with self.lock:
            if self.stopping:
                raise BadRequest(SHUTTING_DOWN[1], SHUTTING_DOWN[0])
            if self.pending >= self.max_queue:
                raise BadRequest(f"busy: {self.pending} requests are queued; try again later",
                                 HTTPStatus.SERVICE_UNAVAILABLE)
            self.pending += 1
        self.jobs.put(job)

    def stop(self, timeout=30):
        """Refuse new jobs; running ones end at their next token and every queued one is
        answered 503, each through its own connection thread."""
        with self.lock:
            self.stopping = True
        self.jobs.put(None)
        self.thread.join(timeout=timeout)

    @property
    def active_rows(self):
        return len(self.decoder.rows)

    def _close(self, job, *result):
        """The job's last result (if any); it no longer counts as pending."""
        if result:
            job.out.put(result)
        if not job.closed:
            job.closed = True
            for row in job.gen.rows if job.gen else ():
                if row in self.decoder.rows:
                    self.decoder.leave(row)
            with self.lock:
                self.pending -= 1

    def _run(self):
        while not self.stopping:
            try:
                self._take_jobs(block=not self.decoder.rows and not self.waiting)
                if self.stopping:
                    break
                self._admit()
                if self.decoder.rows:
                    self._step()
            except Exception as e:  # a bug must cost the requests in hand, not the server
                log.exception("a request failed")
                for job in {r.tag[0] for r in self.decoder.rows}:
                    self._close(job, "error", HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(e).__name__}")
        # submit() refuses jobs now; answer the ones in hand and the ones that came before the stop
        for job in {r.tag[0] for r in self.decoder.rows} | set(self.waiting):
            self._close(job, "error", *SHUTTING_DOWN)
        self.waiting.clear()
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._close(job, "error", *SHUTTING_DOWN)

    def _take_jobs(self, block):
        """Move jobs from the queue: generation jobs wait for slots, others run now."""
        while True:
            try:
                job = self.jobs.get(timeout=None) if block else self.jobs.get_nowait()
            except queue.Empty:
                return
            block = False
            if job is None:  # stop() was called
                return
            if job.gen is not None:
                self.waiting.append(job)
            elif self._ready(job):
                try:
                    job.task(self, job)
                except Exception as e:
                    log.exception("a request failed")
                    job.error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(e).__name__}")
                self._close(job)

    def _ready(self, job):
        """False (and the job closed) when it is cancelled or waited past its deadline."""
        if job.cancelled.is_set():
            self._close(job)
        elif time.monotonic() > job.deadline:
            self._close(job, "error", HTTPStatus.SERVICE_UNAVAILABLE, "timed out waiting in the queue")
        else:
            return True
        return False

    def _admit(self):
        """Prefill waiting jobs' rows while they fit, in arrival order (none jumps the queue)."""
        now = time.monotonic()  # first drop the ones that gave up or waited too long
        for job in [j for j in self.waiting if j.cancelled.is_set() or now > j.deadline]:
            self.waiting.remove(job)
            self._ready(job)
        admitted, free = [], self.decoder.max_batch - len(self.decoder.rows)
        while self.waiting and len(self.waiting[0].gen.rows) <= free:
            job = self.waiting.popleft()
            if not self._ready(job):
                continue
            job.gen.start(job, self.tokenizer)
            for i, row in enumerate(job.gen.rows):
                row.tag = (job, i)
                admitted.append(row)
            free -= len(job.gen.rows)
        if admitted:
            # the jobs waiting now are prefilled together (one product per weight for prompts
            # of one length), and each gets its first token before the next decode step
            try:
                self.decoder.add_many(admitted)
            except Exception as e:  # the rows not prefilled left the decoder: close their jobs here
                log.exception("a prefill failed")
                for job in {r.tag[0] for r in admitted}:
                    self._close(job, "error", HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(e).__name__}")
                return
            self._deliver(self.decoder.sample(admitted))

    def _step(self):
        """One token for every row: sampled, sent, the finished rows out; then one forward."""
        for job in {r.tag[0] for r in self.decoder.rows if r.tag[0].cancelled.is_set()}:
            self._close(job)  # a client that went away frees its rows before any more work
        self._deliver(self.decoder.sample())
        self.decoder.feed()

    def _deliver(self, sampled):
        """Send each (row, token); a row that is done (stop, length, deadline) leaves at once."""
        now = time.monotonic()
        for row, token in sampled:
            job, i = row.tag
            if job.closed:
                continue
            stopped = job.gen.push(job, i, token)
            reason = ("stop" if stopped else "length" if row.finished
                      else "timeout" if now > job.deadline else None)
            if reason is not None:
                self.decoder.leave(row)
                if job.gen.finish(job, i, reason):
                    self._close(job, "done", job.gen.answer())


def explain_task(worker, job):
    """One `explain.build_report`. The client is answered 504 at the deadline, and the work
    stops there too, within one layer (so queued requests and a SIGTERM do not wait for it);
    the text's size is bounded up front (at most --max_prompt_tokens)."""
    def check():
        if worker.stopping or job.cancelled.is_set() or time.monotonic() > job.deadline:
            raise explain.Stopped

    try:
        report = explain.build_report(worker.model, worker.tokenizer, **job.fields, check=check)
    except explain.Stopped:
        job.error(*(SHUTTING_DOWN if worker.stopping else (HTTPStatus.GATEWAY_TIMEOUT, "timed out (--timeout)")))
        return
    except NotEnoughMemory as e:  # e.g. an int8 model's float32 copy for the gradients
        job.error(HTTPStatus.SERVICE_UNAVAILABLE, str(e))
        return
    except Npgpt2Error as e:
        job.error(HTTPStatus.BAD_REQUEST, str(e))
        return
    job.out.put(("done", report))
