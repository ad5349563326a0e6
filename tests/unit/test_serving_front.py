"""The validating HTTP front (lightkv_export/front.py) in front of a real tritonserver, over real HTTP.

One server for the module serves the echo model of test_serving.py and a decoupled model that streams slowly. Every
JSON endpoint gets a deeply nested body and an oversized one; the server process must survive them all (a nested
body used to crash tritonserver with SIGSEGV). Also: tritonserver has no TCP listener (only the front has), its
shared memory is 0600, fields are checked by type and range, and a stream whose backend stub dies ends with an
error event.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
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
