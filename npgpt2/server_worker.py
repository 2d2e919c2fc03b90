"""The server's one model thread: jobs run one at a time, in arrival order.

The model is not thread-safe and its work is CPU-bound, so one thread owns it. The worker
never touches a socket: a job's results go on the job's own queue, and the connection
thread that made the job writes them out (see server_http.py).
"""
import logging
import queue
import threading
import time
from http import HTTPStatus

import numpy as np

from . import explain
from .chat import CachedContext, ReplyText
from .compact_vocab import shown_ids
from .errors import Npgpt2Error
from .memory import NotEnoughMemory
from .sampling import TextStream, generate_stream
from .server_fields import BadRequest

log = logging.getLogger("npgpt2.server")

SHUTTING_DOWN = (HTTPStatus.SERVICE_UNAVAILABLE, "the server is shutting down")


class Job:
    """One request for the worker. `task(worker, job)` runs on the worker thread and puts its
    results on .out as ("start",), ("text", piece), ("done", answer dict) or
    ("error", status, message)."""

    def __init__(self, task, deadline, stream=False, stops_at_deadline=True, **fields):
        self.task, self.deadline, self.stream = task, deadline, stream
        # generation stops itself at the deadline; a task that cannot is given up on there
        self.stops_at_deadline = stops_at_deadline
        self.fields = fields
        self.out = queue.Queue()
        self.cancelled = threading.Event()

    def error(self, status, message):
        self.out.put(("error", status, message))


class Worker:
    """Runs jobs one at a time on one thread, in arrival order."""

    def __init__(self, model, tokenizer, max_queue):
        self.model, self.tokenizer = model, tokenizer
        self.context = CachedContext(model)  # for unseeded requests
        self.max_queue = max_queue
        self.jobs = queue.Queue()
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
        """Refuse new jobs; the running one ends at its next token and every queued one is
        answered 503, each through its own connection thread."""
        with self.lock:
            self.stopping = True
        self.jobs.put(None)
        self.thread.join(timeout=timeout)

    def _run(self):
        while True:
            job = self.jobs.get()
            if job is None:
                break
            try:
                self._run_one(job)
            except Exception as e:  # a bug must cost one request, not the server
                log.exception("a request failed")
                job.error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(e).__name__}")
            finally:
                with self.lock:
                    self.pending -= 1
        while True:  # submit() refuses jobs now; answer the ones that came before the stop
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.error(*SHUTTING_DOWN)

    def _run_one(self, job):
        if self.stopping:
            job.error(*SHUTTING_DOWN)
        elif job.cancelled.is_set():
            pass
        elif time.monotonic() > job.deadline:
            job.error(HTTPStatus.SERVICE_UNAVAILABLE, "timed out waiting in the queue")
        else:
            job.task(self, job)


def generate_task(worker, job):
    """Sample a reply token by token, sending each piece of text as it is known."""
    f = job.fields
    o = f["options"]
    job.out.put(("start",))
    text = ReplyText(worker.tokenizer, f["stops"]) if f["chat"] else TextStream(worker.tokenizer, f["stops"])
    tokens, reason = [], "length"
    if o["seed"] is None:
        # nothing to reproduce: continue from the previous request's cache, so a chat page
        # that sends its history again only feeds the new turn
        steps = worker.context.generate(f["prompt"], o["length"], np.random.default_rng(),
                                        o["temperature"], o["top_k"], o["top_p"])
    else:
        # a fresh cache, so the same seed gives the same text whatever ran before
        steps = (int(t[0]) for t in generate_stream(
            worker.model, f["prompt"], o["length"], o["temperature"], o["top_k"], o["top_p"],
            rng=np.random.default_rng(o["seed"])))
    try:
        for step in steps:
            if worker.stopping:
                job.error(*SHUTTING_DOWN)
                return
            if job.cancelled.is_set():
                return
            tokens.append(step)
            piece, stopped = text.push(step)
            if piece:
                job.out.put(("text", piece))
            if stopped:
                reason = "stop"
                break
            if time.monotonic() > job.deadline:
                reason = "timeout"
                break
    finally:
        steps.close()
    tail = text.finish()
    if tail:
        job.out.put(("text", tail))
    full = text.text if f["chat"] else text.shown_text
    gid, _ = shown_ids(worker.tokenizer)  # GPT-2's ids, as explain shows them
    answer = {"text": full, "tokens": [gid(t) for t in tokens], "finish_reason": reason, **f.get("extra", {})}
    if f["chat"]:
        answer["message"] = {"role": "assistant", "content": full}
    job.out.put(("done", answer))


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
