"""The validating HTTP front (lightkv_export/front.py) in front of a real tritonserver, over real HTTP.

One server for the module serves the echo model of test_serving.py and a decoupled model that streams slowly. Every
JSON endpoint gets a deeply nested body and an oversized one; the server process must survive them all (a nested
body used to crash tritonserver with SIGSEGV). Also: tritonserver has no TCP listener (only the front has), its
shared memory is 0600, fields are checked by type and range, and a stream whose backend stub dies ends with an
error event. Slow clients (slowloris): a second front on the same tritonserver with deadlines of a second, over real
sockets.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from lightkv_export import front, serve

# test_serving skips itself, and so this module, where tritonserver is not installed.
from tests.unit.test_serving import gone, image, infer_echo, png, write_echo_repo

pytestmark = pytest.mark.slow

NESTED = b'{"prompt":"x","image":' + b"[" * 100000 + b"]" * 100000 + b"}"  # issue 28: SIGSEGV in tritonserver

STREAM_CONFIG = """\
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [
  { name: "prompt", data_type: TYPE_STRING, dims: [ 1 ] },
  { name: "max_new_tokens", data_type: TYPE_INT32, dims: [ 1 ], optional: true }
]
output [ { name: "text", data_type: TYPE_STRING, dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""

# One response per character of the prompt, 0.2 s apart, then the final flag: slow enough to kill its stub mid-way.
STREAM_MODEL = """\
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        pass

    def execute(self, requests):
        for r in requests:
            threading.Thread(target=self.answer, args=(r,), daemon=True).start()

    def answer(self, r):
        sender = r.get_response_sender()
        prompt = pb_utils.get_input_tensor_by_name(r, "prompt").as_numpy()[0].decode()
        for ch in prompt:
            text = np.array([ch.encode()], dtype=np.object_)
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("text", text)]))
            time.sleep(0.2)
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = write_echo_repo(tmp_path_factory.mktemp("front"))
    (repo / "slow" / "1").mkdir(parents=True)
    (repo / "slow" / "config.pbtxt").write_text(STREAM_CONFIG)
    (repo / "slow" / "1" / "model.py").write_text(STREAM_MODEL)
    with serve.Server(repo) as running:
        yield running


def post(server: serve.Server, path: str, body: bytes, headers: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def error_of(status: int, raw: bytes) -> str:
    """The message of a JSON error, or of a stream's one error event."""
    obj = json.loads(raw.strip().removeprefix(b"data:"))
    assert set(obj) == {"error"}, (status, raw[:300])
    return obj["error"]


JSON_ENDPOINTS = ["/v2/models/echo/generate", "/v2/models/echo/generate_stream", "/v2/repository/index"]


@pytest.mark.parametrize("path", JSON_ENDPOINTS)
def test_deeply_nested_bodies_are_refused_and_the_server_lives(server, path):
    pid = server.process.pid
    for body in (NESTED, b"[" * 17 + b"]" * 17, b'{"a":' * 5000 + b"1" + b"}" * 5000):
        status, raw = post(server, path, body)
        if len(body) > front.SMALL_BODY_BYTES and "repository" in path:  # over that endpoint's size limit first
            assert status == 413 and "limit of 65536 bytes for this endpoint" in error_of(status, raw), raw[:300]
            continue
        assert status == 400 and "nests deeper than 16 levels" in error_of(status, raw), raw[:300]
    # Brackets inside strings are text, not nesting.
    status, raw = post(server, "/v2/models/echo/generate", json.dumps({"prompt": "[[[[" * 100, "image": []}).encode())
    assert status in (400, 500) and "nests" not in error_of(status, raw)
    assert server.process.pid == pid and server.health(probe_http=True) is None
    assert infer_echo(server.address, "ok", [png(image((4, 4)))])["text"].startswith("ko ")


@pytest.mark.parametrize("path", JSON_ENDPOINTS)
def test_oversized_bodies_are_refused_with_413(server, path):
    # A body declared too large is refused before it is read.
    limit = front.SMALL_BODY_BYTES if "repository" in path else front.generate_body_limit(front.Limits())
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.putrequest("POST", path)
        conn.putheader("Content-Length", str(limit + 1))
        conn.endheaders()
        response = conn.getresponse()
        status, raw = response.status, response.read()
    finally:
        conn.close()
    assert status == 413 and f"over this server's limit of {limit} bytes" in error_of(status, raw)
    # A body sent in chunks (no Content-Length) is refused once it passes the limit.
    chunks = (b"x" * 65536 for _ in range(limit // 65536 + 2)) if limit < 2**20 else None
    if chunks is not None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        try:
            conn.request("POST", path, chunks, {"Transfer-Encoding": "chunked"}, encode_chunked=True)
            response = conn.getresponse()
            status, raw = response.status, response.read()
        except (BrokenPipeError, ConnectionResetError):
            status, raw = 413, b'{"error": "over this server\'s limit (connection closed while sending)"}'
        finally:
            conn.close()
        assert status == 413 and "limit" in error_of(status, raw)
    assert server.health(probe_http=True) is None


def test_a_small_limit_refuses_a_streamed_body_of_a_generate_endpoint(server):
    """A second front on the same tritonserver with max_body_bytes=4096: a chunked body past it is a 413."""
    app = front.create_app(server.grpc_target, limits=front.FrontLimits(max_body_bytes=4096))
    sock = front.bind(None)
    runner = front.FrontServer(app, sock).start()
    try:
        port = sock.getsockname()[1]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        body = (b'{"prompt": "' + b"y" * 1000 for _ in range(8))
        conn.request("POST", "/v2/models/echo/generate", body, {"Transfer-Encoding": "chunked"}, encode_chunked=True)
        response = conn.getresponse()
        status, raw = response.status, response.read()
        conn.close()
        assert status == 413 and "at least" in error_of(status, raw) and "limit of 4096 bytes" in error_of(status, raw)
        ok = json.dumps({"prompt": "hi", "image": [base64.b64encode(png(image((4, 4)))).decode()]}).encode()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v2/models/echo/generate", ok)
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read())["text"].startswith("ih ")
        conn.close()
    finally:
        runner.stop()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"prompt": "abc", "max_new_tokens": 2**32 + 5}, "max_new_tokens: 4294967301 is out of range for INT32"),
        ({"prompt": "abc", "max_new_tokens": 2.7}, "max_new_tokens: expected an integer, got a number"),
        ({"prompt": "abc", "max_new_tokens": True}, "max_new_tokens: expected an integer, got a boolean"),
        ({"prompt": "abc", "max_new_tokens": "3"}, "max_new_tokens: expected an integer, got a string"),
        ({"prompt": ["a", "b"]}, "prompt: expected 1 value(s), got 2"),
        ({"prompt": {"text": "a"}}, "prompt: expected a string, got an object"),
        ({"prompt": "abc", "temperature": 0.5}, "unknown field 'temperature': model slow takes prompt, max_new_tokens"),
        ({"max_new_tokens": 3}, "missing input 'prompt': model slow needs prompt"),
        ([1, 2], "the body must be a JSON object"),
    ],
)
def test_fields_are_checked_before_tritonserver(server, body, message):
    status, raw = post(server, "/v2/models/slow/generate", json.dumps(body).encode())
    assert status == 400 and message in error_of(status, raw), raw


def test_bodies_that_are_not_json_or_not_text(server):
    for raw_body, message in (
        (b'{"prompt": "\\ud800"}', "prompt: not valid text (surrogates not allowed"),
        (b'{"prompt": NaN}', "not valid JSON"),
        (b'{"prompt": "a"', "not valid JSON"),
        (b'{"prompt": "\xff"}', "the body is not UTF-8 text (invalid start byte at byte 12)"),
        ('{"prompt": "a"}'.encode("utf-16"), "the body is not UTF-8 text"),
        (b'{"prompt": "a", "max_new_tokens": ' + b"9" * 5000 + b"}", "not valid JSON"),
    ):
        status, raw = post(server, "/v2/models/slow/generate", raw_body)
        assert status == 400 and message in error_of(status, raw), raw
    status, raw = post(server, "/v2/models/nope/generate", b"{}")
    assert status == 404 and "unknown model 'nope'; served: echo, slow" in error_of(status, raw)


def test_the_generate_endpoints_of_a_decoupled_model(server):
    status, raw = post(server, "/v2/models/slow/generate_stream", json.dumps({"prompt": "abc"}).encode())
    events = [json.loads(line[5:]) for line in raw.decode().splitlines() if line.startswith("data:")]
    assert status == 200 and [e["text"] for e in events] == ["a", "b", "c"], raw
    assert all(e["model_name"] == "slow" for e in events)
    status, raw = post(server, "/v2/models/slow/generate", json.dumps({"prompt": "a"}).encode())
    assert status == 200 and json.loads(raw)["text"] == "a"
    # /generate answers with exactly one response, as Triton's own endpoint does.
    status, raw = post(server, "/v2/models/slow/generate", json.dumps({"prompt": "abc"}).encode())
    assert status == 400 and "sent more than one response" in error_of(status, raw)


def listening_tcp_inodes() -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                inodes.add(fields[9])
    return inodes


def socket_inodes(pid: int) -> set[str]:
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[8:-1])
    return found


def test_only_the_front_listens_on_tcp_and_shared_memory_is_private(server):
    listening = listening_tcp_inodes()
    assert not socket_inodes(server.process.pid) & listening  # tritonserver: no TCP listener at all
    assert socket_inodes(os.getpid()) & listening  # the front, in this process
    sock = Path(f"{server.grpc_socket}:{serve.GRPC_PORT}")
    assert sock.is_socket() and sock.parent.stat().st_mode & 0o777 == 0o700
    segments = server.shm_segments()
    assert segments, "no /dev/shm region found for the server"
    for segment in segments:  # the stub's region carries every prompt and image: 0600, not 0644
        assert segment.stat().st_mode & 0o777 == 0o600, (segment, oct(segment.stat().st_mode))
    log = server.log_path.read_text()
    if server.shm_dir == serve.SHM_DIR:  # unprivileged namespaces refused here: the log says why
        assert "lightkv_export: shared /dev/shm (" in log
    else:  # a private tmpfs: no other user sees the regions, not even while the backend creates them 0644
        assert "lightkv_export: private /dev/shm" in log
        assert not list(serve.SHM_DIR.glob(f"{server.shm_prefix}*"))
        assert all(s.parent == Path(f"/proc/{server.process.pid}/root/dev/shm") for s in segments)


def test_a_stream_whose_stub_dies_ends_with_an_error_event(server):
    """kill -9 of the decoupled model's stub mid-stream: the client gets an error event, not a silent end."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.request("POST", "/v2/models/slow/generate_stream", json.dumps({"prompt": "x" * 50}).encode())
        response = conn.getresponse()
        assert response.status == 200
        first = response.readline()
        assert first.startswith(b"data:") and json.loads(first[5:])["text"] == "x"
        stub = next(pid for pid, name in server.stubs.items() if name.startswith("slow"))
        os.kill(stub, signal.SIGKILL)
        rest = response.read().decode()
    finally:
        conn.close()
    events = [json.loads(line[5:]) for line in rest.splitlines() if line.startswith("data:")]
    assert events and "error" in events[-1] and len(events) < 50, rest
    assert "did not finish" in events[-1]["error"] or "not healthy" in events[-1]["error"], events[-1]
    assert gone(stub) and server.health() is not None  # the supervisor sees the dead stub
    time.sleep(0.5)
    server.restart()
    assert server.health(probe_http=True) is None
    status, raw = post(server, "/v2/models/slow/generate_stream", json.dumps({"prompt": "ok"}).encode())
    assert status == 200 and raw.count(b"data:") == 2


def test_the_other_endpoints(server):
    import urllib.error
    import urllib.request

    def get(path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"{server.url}{path}", timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    assert get("/v2/health/live")[0] == 200 and get("/v2/health/ready")[0] == 200
    assert get("/v2/models/echo/ready")[0] == 200 and get("/v2/models/nope/ready")[0] == 503
    status, raw = get("/v2/models/echo")
    meta = json.loads(raw)
    assert status == 200 and meta["name"] == "echo"
    assert meta["inputs"] == [
        {"name": "prompt", "datatype": "BYTES", "shape": [1]},
        {"name": "image", "datatype": "BYTES", "shape": [-1]},
    ]
    status, raw = get("/v2/models/echo/infer")
    assert status == 404 and "error" in json.loads(raw)  # Triton's other endpoints are not exposed
    status, raw = post(server, "/v2/repository/index", b'{"ready": true}')
    assert status == 200 and sorted(m["name"] for m in json.loads(raw)) == ["echo", "slow"]


# ------------------------------------------------------------------------------------------------- slow clients

DEADLINE_S = 1.0


@contextlib.contextmanager
def deadline_front(server: serve.Server, **limits):
    """A second front on the module's tritonserver with a 1 s request deadline (and `limits`): its port."""
    config = front.FrontLimits(request_timeout_s=DEADLINE_S, **limits)
    sock = front.bind(None)
    runner = front.FrontServer(front.create_app(server.grpc_target, limits=config), sock, limits=config).start()
    try:
        yield sock.getsockname()[1]
    finally:
        runner.stop()


def read_until_closed(sock: socket.socket, timeout_s: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    sock.settimeout(timeout_s)
    out = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            out += chunk
    return out


def echo_body(prompt: str = "hi") -> bytes:
    return json.dumps({"prompt": prompt, "image": [base64.b64encode(png(image((4, 4)))).decode()]}).encode()


def test_slow_headers_are_cut_off_while_a_normal_client_is_served(server):
    """A client that sends its headers a byte every 0.1 s (they would take ~10 s) is cut off with a 408 at the 1 s
    deadline; a normal client on the same front, at the same time, is answered. Without the deadline the slow
    client keeps its connection for as long as it trickles."""
    request = b"POST /v2/models/echo/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\r\n"
    with deadline_front(server) as port:
        slow = socket.create_connection(("127.0.0.1", port), timeout=10)
        outcome: dict = {}

        def trickle() -> None:
            t0 = time.monotonic()
            try:
                for byte in request:
                    slow.send(bytes([byte]))
                    time.sleep(0.1)
                    slow.setblocking(False)
                    try:
                        answer = slow.recv(65536)
                    except BlockingIOError:
                        continue
                    finally:
                        slow.setblocking(True)
                    outcome["answer"] = answer + read_until_closed(slow)
                    break
            except OSError as e:  # the server closed and reset: cut off all the same
                outcome["error"] = e
            outcome["after_s"] = time.monotonic() - t0

        thread = threading.Thread(target=trickle)
        thread.start()
        time.sleep(0.2)
        t0 = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v2/models/echo/generate", echo_body("ab"))
        response = conn.getresponse()
        normal = response.status, json.loads(response.read()), time.monotonic() - t0
        conn.close()
        assert "after_s" not in outcome  # the normal client was answered while the slow one still trickled
        thread.join(15)
        slow.close()
    assert normal[0] == 200 and normal[1]["text"].startswith("ba "), normal
    assert DEADLINE_S * 0.9 <= outcome["after_s"] < DEADLINE_S + 2, outcome
    answer = outcome.get("answer", b"")
    assert answer.startswith(b"HTTP/1.1 408 ") and b"did not arrive whole within 1 s" in answer, outcome


def test_a_slow_body_gets_408_and_a_silent_connection_is_closed(server):
    """Headers in time, then 10 of 1000 declared body bytes and nothing more: a 408 (JSON) at the deadline and the
    connection closed. A connection that sends nothing at all is closed at the deadline without an answer."""
    with deadline_front(server) as port:
        body_slow = socket.create_connection(("127.0.0.1", port), timeout=10)
        silent = socket.create_connection(("127.0.0.1", port), timeout=10)
        t0 = time.monotonic()
        body_slow.sendall(
            b"POST /v2/models/echo/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b'{"prompt":'
        )
        raw = read_until_closed(body_slow)
        took = time.monotonic() - t0
        assert read_until_closed(silent) == b"" and time.monotonic() - t0 < DEADLINE_S + 2
        body_slow.close()
        silent.close()
        assert server.health(probe_http=True) is None
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower(), raw
    assert "did not arrive whole within 1 s" in json.loads(payload)["error"]
    assert DEADLINE_S * 0.9 <= took < DEADLINE_S + 2, took


def test_idle_connections_close_and_the_connection_cap_answers_503(server):
    """An idle kept-alive connection closes after keep_alive_s. With max_connections=2, two open connections are
    served and a request on a third gets 503 (closed); once one goes, requests are served again."""
    with deadline_front(server, keep_alive_s=0.3, max_connections=2) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/v2/health/ready")
        assert conn.getresponse().read() == b""  # 200, kept alive
        time.sleep(0.6)
        assert read_until_closed(conn.sock, 5) == b""  # closed by the server, not by us
        conn.close()

        held = [http.client.HTTPConnection("127.0.0.1", port, timeout=30) for _ in range(2)]
        for c in held:
            c.connect()
        time.sleep(0.1)  # accepted on the server's side
        third = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        third.request("POST", "/v2/models/echo/generate", echo_body())
        response = third.getresponse()
        assert response.status == 503 and response.read() == b"Service Unavailable"  # 2 held + this one
        assert response.getheader("connection") == "close" and third.sock is None  # http.client saw it close
        third.close()
        held[0].request("POST", "/v2/models/echo/generate", echo_body("ab"))  # a held one is served
        response = held[0].getresponse()
        assert response.status == 200 and json.loads(response.read())["text"].startswith("ba ")
        held[1].close()
        time.sleep(0.1)
        fresh = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        fresh.request("POST", "/v2/models/echo/generate", echo_body("cd"))
        response = fresh.getresponse()
        assert response.status == 200 and json.loads(response.read())["text"].startswith("dc ")
        fresh.close()
        held[0].close()
