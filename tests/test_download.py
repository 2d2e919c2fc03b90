"""`npgpt2 download` against a local HTTP server that misbehaves on purpose.

The server (ThreadingHTTPServer on 127.0.0.1, port 0) serves the fixture folder
tests/fixtures/full/ (written by TensorFlow) as model `124M`. Per file it follows a plan of
behaviours, one per request: drop the connection half-way, answer 500, ignore Range, send a
short body under a longer Content-Length, hang past the read timeout, 404. Nothing here
touches the internet.
"""
import errno
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from npgpt2 import download
from npgpt2.download import FILES, download_model
from npgpt2.errors import Npgpt2Error

FIXTURE = Path(__file__).parent / "fixtures" / "full"
DATA = "model.ckpt.data-00000-of-00001"
FAST = dict(retries=3, backoff=0.001, timeout=(2, 0.5), progress=False)


class Storage:
    """What the fake server holds, how it should misbehave, and what it was asked."""

    def __init__(self):
        self.files = {p.name: p.read_bytes() for p in FIXTURE.iterdir()}
        self.plans = {}      # file name -> list of modes, one used per request ("ok" after)
        self.log = []        # (file name, Range header or None, mode)
        self.lock = threading.Lock()

    def next_mode(self, name, rng):
        with self.lock:
            plan = self.plans.get(name, [])
            mode = plan.pop(0) if plan else "ok"
            self.log.append((name, rng, mode))
            return mode

    def requests_for(self, name):
        return [entry for entry in self.log if entry[0] == name]


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        st = self.server.storage
        parts = self.path.lstrip("/").split("/")
        rng = self.headers.get("Range")
        if len(parts) != 2 or parts[0] != "124M" or parts[1] not in st.files:
            return self._empty(404)
        name = parts[1]
        mode = st.next_mode(name, rng)
        data = st.files[name]
        if mode in ("404", "500"):
            return self._empty(int(mode))
        if mode == "hang":
            time.sleep(1.5)  # longer than the client's read timeout
            return self._empty(500)
        start = 0
        if rng and mode != "ignore_range":
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                return self.end_headers()
        body = data[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "drop_half":
            body = body[:len(body) // 2]
        elif mode == "short":  # Content-Length promises 1000 bytes more than are sent
            body = body[:-1000]
        self.wfile.write(body)  # HTTP/1.0: the connection closes when the handler returns

    def _empty(self, status):
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that timed out leaves a broken pipe behind; that is the point


@pytest.fixture
def server():
    srv = Server(("127.0.0.1", 0), Handler)
    srv.storage = Storage()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def session():
    # No proxies from the environment: the server is on this machine.
    s = requests.Session()
    s.trust_env = False
    yield s
    s.close()


def get(srv, tmp_path, session, name="124M", **kw):
    return download_model(name, models_dir=tmp_path, base_url=srv.url, session=session,
                          **{**FAST, **kw})


def assert_identical(folder):
    assert sorted(os.listdir(folder)) == sorted(FILES)
    for name in FILES:
        assert (folder / name).read_bytes() == (FIXTURE / name).read_bytes(), name


def one_line(excinfo):
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


def test_clean_download_is_byte_identical(server, tmp_path, session, capsys):
    folder = get(server, tmp_path, session)
    assert folder == tmp_path / "124M"
    assert_identical(folder)
    assert sorted(e[0] for e in server.storage.log) == sorted(FILES)
    assert server.storage.log[-1][0] == "checkpoint"  # the file that marks a finished folder
    assert all(rng is None for _, rng, _ in server.storage.log)
    out, err = capsys.readouterr()
    assert out == "" and err == ""  # the library prints nothing; no bar without a terminal


def test_old_name_downloads_new_name(server, tmp_path, session):
    folder = get(server, tmp_path, session, name="117M")
    assert folder == tmp_path / "124M"
    assert_identical(folder)


def test_unknown_model_name_is_one_line_and_asks_nothing(server, tmp_path, session):
    with pytest.raises(Npgpt2Error) as e:
        get(server, tmp_path, session, name="125M")
    assert "125M" in one_line(e) and "124M" in one_line(e)
    assert server.storage.log == [] and not (tmp_path / "125M").exists()


def test_finished_folder_is_not_downloaded_again_unless_force(server, tmp_path, session):
    get(server, tmp_path, session)
    n = len(server.storage.log)
    get(server, tmp_path, session)
    assert len(server.storage.log) == n
    get(server, tmp_path, session, force=True)
    assert len(server.storage.log) == 2 * n
    assert_identical(tmp_path / "124M")


def test_dropped_connection_resumes_with_range(server, tmp_path, session):
    server.storage.plans[DATA] = ["drop_half"]
    size = len(server.storage.files[DATA])
    assert_identical(get(server, tmp_path, session))
    reqs = server.storage.requests_for(DATA)
    assert [r[2] for r in reqs] == ["drop_half", "ok"]
    # Continued near where the cut left off (the client may discard a partly read chunk).
    start = int(re.fullmatch(r"bytes=(\d+)-", reqs[1][1]).group(1))
    assert size // 2 - download.CHUNK_BYTES <= start <= size // 2


def test_500_twice_then_200(server, tmp_path, session):
    server.storage.plans["hparams.json"] = ["500", "500"]
    assert_identical(get(server, tmp_path, session))
    assert [r[2] for r in server.storage.requests_for("hparams.json")] == ["500", "500", "ok"]


def test_timeout_is_retried(server, tmp_path, session):
    server.storage.plans["vocab.bpe"] = ["hang"]
    assert_identical(get(server, tmp_path, session))
    assert [r[2] for r in server.storage.requests_for("vocab.bpe")] == ["hang", "ok"]


def test_persistent_500_gives_up_with_one_line(server, tmp_path, session):
    server.storage.plans["encoder.json"] = ["500"] * 10
    with pytest.raises(Npgpt2Error) as e:
        get(server, tmp_path, session)
    msg = one_line(e)
    assert "encoder.json" in msg and "500" in msg and "3 retries" in msg
    assert len(server.storage.requests_for("encoder.json")) == 4  # 1 + retries
    folder = tmp_path / "124M"
    assert not (folder / "encoder.json").exists() and not (folder / "checkpoint").exists()


def test_server_ignoring_range_restarts_from_zero(server, tmp_path, session):
    folder = tmp_path / "124M"
    folder.mkdir()
    # A stale .part of junk: appending to it would corrupt the file.
    (folder / (DATA + ".part")).write_bytes(b"\xff" * 5000)
    server.storage.plans[DATA] = ["ignore_range"]
    assert_identical(get(server, tmp_path, session))
    assert server.storage.requests_for(DATA) == [(DATA, "bytes=5000-", "ignore_range")]


def test_short_body_is_retried_and_never_looks_complete(server, tmp_path, session):
    server.storage.plans[DATA] = ["short"]
    size = len(server.storage.files[DATA])
    assert_identical(get(server, tmp_path, session))
    reqs = server.storage.requests_for(DATA)
    assert reqs[0][1] is None and len(reqs) >= 2
    start = int(re.fullmatch(r"bytes=(\d+)-", reqs[1][1]).group(1))
    assert size - 1000 - download.CHUNK_BYTES <= start <= size - 1000


def test_always_short_keeps_part_and_no_final_file(server, tmp_path, session):
    server.storage.plans[DATA] = ["short"] * 10
    size = len(server.storage.files[DATA])
    with pytest.raises(Npgpt2Error) as e:
        get(server, tmp_path, session)
    assert DATA in one_line(e)
    folder = tmp_path / "124M"
    assert not (folder / DATA).exists() and not (folder / "checkpoint").exists()
    part = (folder / (DATA + ".part")).read_bytes()
    assert 0 < len(part) <= size - 1000 and part == server.storage.files[DATA][:len(part)]
    # A later run (server healthy again) resumes from the .part and finishes.
    server.storage.plans.clear()
    assert_identical(get(server, tmp_path, session))
    assert server.storage.log[-2] == (DATA, f"bytes={len(part)}-", "ok")


def test_complete_part_file_is_finished_by_416(server, tmp_path, session):
    folder = tmp_path / "124M"
    folder.mkdir()
    (folder / (DATA + ".part")).write_bytes(server.storage.files[DATA])
    assert_identical(get(server, tmp_path, session))
    reqs = server.storage.requests_for(DATA)
    assert len(reqs) == 1 and reqs[0][1] == f"bytes={len(server.storage.files[DATA])}-"


def test_404_is_one_line(server, tmp_path, session):
    server.storage.plans["model.ckpt.meta"] = ["404"]
    with pytest.raises(Npgpt2Error) as e:
        get(server, tmp_path, session)
    msg = one_line(e)
    assert "model.ckpt.meta" in msg and "404" in msg
    assert len(server.storage.requests_for("model.ckpt.meta")) == 1  # not retried
    assert not (tmp_path / "124M" / "checkpoint").exists()


def test_damaged_checkpoint_fails_crc_and_folder_never_completes(server, tmp_path, session):
    data = bytearray(server.storage.files[DATA])
    data[len(data) // 3] ^= 0x01
    server.storage.files[DATA] = bytes(data)
    with pytest.raises(Npgpt2Error) as e:
        get(server, tmp_path, session)
    msg = one_line(e)
    assert "crc" in msg.lower() and "--force" in msg
    assert not (tmp_path / "124M" / "checkpoint").exists()
    assert "checkpoint" not in [r[0] for r in server.storage.log]


def test_truncated_file_with_honest_length_fails_the_check(server, tmp_path, session):
    server.storage.files[DATA] = server.storage.files[DATA][:-4096]
    with pytest.raises(Npgpt2Error) as e:
        get(server, tmp_path, session)
    assert DATA in one_line(e)
    assert not (tmp_path / "124M" / "checkpoint").exists()


def test_disk_full_keeps_part_for_resume(server, tmp_path, session, monkeypatch):
    limit = 300_000

    class FullDisk:
        """A file that takes `limit` bytes in all, then fails as a full disk does."""

        def __init__(self, path, mode):
            self.f = open(path, mode)

        def write(self, b):
            room = limit - self.f.tell()
            if len(b) > room:
                self.f.write(b[:room])
                self.f.flush()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    real_open = download._open_part
    monkeypatch.setattr(download, "_open_part",
                        lambda p, m: FullDisk(p, m) if p.name == DATA + ".part" else real_open(p, m))
    with pytest.raises(Npgpt2Error) as e:
        get(server, tmp_path, session)
    msg = one_line(e)
    assert "disk full" in msg and DATA + ".part" in msg
    folder = tmp_path / "124M"
    assert (folder / (DATA + ".part")).read_bytes() == server.storage.files[DATA][:limit]
    assert not (folder / DATA).exists() and not (folder / "checkpoint").exists()
    assert len(server.storage.requests_for(DATA)) == 1  # a full disk is not retried

    monkeypatch.setattr(download, "_open_part", real_open)
    assert_identical(get(server, tmp_path, session))
    assert server.storage.requests_for(DATA)[-1][1] == f"bytes={limit}-"


def test_base_url_from_environment(server, tmp_path, session, monkeypatch):
    monkeypatch.setenv("NPGPT2_BASE_URL", server.url + "/")
    folder = download_model("124M", models_dir=tmp_path, session=session, **FAST)
    assert_identical(folder)


def test_bad_base_url_is_one_line(tmp_path):
    with pytest.raises(Npgpt2Error) as e:
        download_model("124M", models_dir=tmp_path, base_url="ftp://example.invalid")
    assert "--base_url" in one_line(e)


@pytest.mark.parametrize("retries", [-1, 1.5])
def test_bad_retries_is_one_line_and_nothing_is_made(tmp_path, retries):
    with pytest.raises(Npgpt2Error) as e:
        download_model("124M", models_dir=tmp_path / "w", base_url="http://127.0.0.1:9", retries=retries)
    assert "--retries" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "w").exists()


def test_default_base_url_is_openais():
    assert download.OPENAI_BASE_URL == "https://openaipublic.blob.core.windows.net/gpt-2/models"


class FakeResponse:
    def __init__(self, status, body, headers):
        self.status_code, self.reason, self.body, self.headers = status, "", body, headers

    def iter_content(self, n):
        for i in range(0, len(self.body), n):
            yield self.body[i:i + n]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


class FakeSession:
    """Answers from a script, quietly: a body shorter than its Content-Length raises nothing
    here (unlike urllib3), so only npgpt2's own byte count can notice it."""

    def __init__(self, answers):
        self.answers, self.ranges = list(answers), []

    def get(self, url, headers, stream, timeout):
        self.ranges.append(headers.get("Range"))
        return self.answers.pop(0)


def test_short_body_is_noticed_by_byte_count_alone(tmp_path):
    data = bytes(range(200))
    s = FakeSession([FakeResponse(200, data[:150], {"Content-Length": "200"}),
                     FakeResponse(206, data[150:], {"Content-Range": "bytes 150-199/200"})])
    download.fetch_file("http://x/124M/f", tmp_path / "f", session=s, backoff=0, progress=False)
    assert (tmp_path / "f").read_bytes() == data
    assert s.ranges == [None, "bytes=150-"]


def test_resume_at_the_wrong_offset_starts_over(tmp_path):
    data = bytes(range(100))
    (tmp_path / "f.part").write_bytes(data[:40])
    s = FakeSession([FakeResponse(206, data[30:], {"Content-Range": "bytes 30-99/100"}),
                     FakeResponse(200, data, {"Content-Length": "100"})])
    download.fetch_file("http://x/124M/f", tmp_path / "f", session=s, backoff=0, progress=False)
    assert (tmp_path / "f").read_bytes() == data
    assert s.ranges == ["bytes=40-", None]


def test_file_larger_than_announced_or_its_maximum_is_refused(tmp_path):
    """A server may not fill the disk: hparams.json is never 129 MB, and no body may run past
    its Content-Length."""
    big = 129 << 20
    s = FakeSession([FakeResponse(200, b"", {"Content-Length": str(big)})])
    with pytest.raises(Npgpt2Error) as e:
        download.fetch_file("http://x/124M/hparams.json", tmp_path / "hparams.json", session=s,
                            backoff=0, progress=False, max_bytes=download.max_file_bytes("124M", "hparams.json"))
    assert str(big) in one_line(e) and "hparams.json" in str(e.value)
    # no Content-Length: the per-file maximum stops the body as it arrives
    limit = download.max_file_bytes("124M", "hparams.json")
    s = FakeSession([FakeResponse(200, b"{" * (limit + 1), {})])
    with pytest.raises(Npgpt2Error) as e:
        download.fetch_file("http://x/124M/hparams.json", tmp_path / "hparams.json", session=s,
                            backoff=0, progress=False, max_bytes=limit)
    assert str(limit) in one_line(e)
    # a body longer than its announced length is cut off at that length
    s = FakeSession([FakeResponse(200, b"x" * 5000, {"Content-Length": "100"})])
    with pytest.raises(Npgpt2Error) as e:
        download.fetch_file("http://x/124M/vocab.bpe", tmp_path / "vocab.bpe", session=s, backoff=0,
                            progress=False, max_bytes=1 << 20)
    assert "announced 100" in one_line(e)
    assert os.listdir(tmp_path) == []  # neither the file nor its .part


def test_data_file_maximum_follows_the_model_size():
    # 124M has 124,439,808 float32 parameters (OpenAI's data file is 497,759,232 bytes)
    assert 497_759_232 <= download.max_file_bytes("124M", DATA) < 498_000_000 + (1 << 20)
    assert download.max_file_bytes("1558M", DATA) > download.max_file_bytes("774M", DATA)


def test_failed_download_leaves_no_empty_folder(server, tmp_path, session):
    server.storage.plans["hparams.json"] = ["404"]
    with pytest.raises(Npgpt2Error):
        get(server, tmp_path / "weights", session)
    assert not (tmp_path / "weights").exists()


def test_partial_folder_gives_the_download_hint(server, tmp_path, session):
    import npgpt2
    (tmp_path / "124M").mkdir()
    with pytest.raises(Npgpt2Error) as e:
        npgpt2.load_model(tmp_path / "124M")
    assert "npgpt2 download 124M" in one_line(e)
    server.storage.plans[DATA] = ["500"] * 10
    with pytest.raises(Npgpt2Error):
        get(server, tmp_path, session)
    assert (tmp_path / "124M" / "hparams.json").is_file()  # a partial folder stays for resuming
    with pytest.raises(Npgpt2Error) as e:
        npgpt2.load_model(tmp_path / "124M")
    assert "npgpt2 download 124M" in one_line(e) and "unfinished" in str(e.value)
    from npgpt2.convert import convert
    with pytest.raises(Npgpt2Error) as e:
        convert(tmp_path / "124M", tmp_path / "hf", src_fmt="tf")
    assert "npgpt2 download 124M" in one_line(e)
