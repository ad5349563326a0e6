"""Supervision of a real `serve` (subprocess) with real signals: what is left after kill -9, a port in use, restarts
with backoff, and no leftovers in /tmp or /dev/shm; serve's front flags (body size, request deadline, connection
cap) on a real server."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightkv_export import serve

# test_serving skips itself, and so this module, where tritonserver is not installed.
from tests.unit.test_serving import ROOT, gone, image, infer_echo, png, serve_cli, shm_prefix, url_and_pid
from tests.unit.test_serving import write_echo_repo as echo_repo

pytestmark = pytest.mark.slow


def wait_gone(pids, timeout_s: float) -> float:
    """Seconds until every pid is gone (or a zombie); fails after timeout_s."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if all(gone(p) for p in pids):
            return time.monotonic() - t0
        time.sleep(0.05)
    alive = {p: serve.proc_state(p) for p in pids if not gone(p)}
    raise AssertionError(f"still alive after {timeout_s} s: {alive}")


def stub_of(server_pid: int) -> int:
    (stub,) = serve.child_stubs(server_pid)
    return stub


def test_kill_9_of_tritonserver_then_of_serve(tmp_path):
    """kill -9 of tritonserver: its stub leaves within seconds (it used to stay for minutes with parent pid 1), serve
    restarts it after a backoff on the same URL, and nothing of the dead server is left in /tmp or /dev/shm. Then
    kill -9 of serve itself: tritonserver and its stub die with it (parent-death signal) and the port is free."""
    envs_before = serve.python_envs()
    proc, lines = serve_cli(str(echo_repo(tmp_path)), "--restarts", "3")
    try:
        url, pid = url_and_pid(lines.wait_for("url: ", 120))
        address = url.removeprefix("http://")
        stub, prefix = stub_of(pid), shm_prefix(pid)
        assert infer_echo(address, "ab", [png(image((4, 4)))])["text"].startswith("ba ")
        envs = serve.python_envs() - envs_before
        assert envs, "the Python backend made no /tmp/python_env_* directory: the cleanup check below means nothing"

        os.kill(pid, signal.SIGKILL)
        stub_gone_s = wait_gone([stub], 10)
        assert stub_gone_s < 3, stub_gone_s
        notice = lines.wait_for("tritonserver cannot answer", 30)
        assert "tritonserver exited with code -9" in notice
        assert "restarting tritonserver in 1 s (1 of at most 3 in a row)" in lines.wait_for("restarting", 10)
        url2, pid2 = url_and_pid(lines.wait_for("url: ", 120))
        assert url2 == url and pid2 != pid
        assert not list(serve.SHM_DIR.glob(f"{prefix}*"))
        # The dead server's python_env directory is removed (`envs` may also hold another user's, still there).
        assert any(not e.exists() for e in envs), envs
        assert infer_echo(address, "cd", [png(image((4, 4)))])["text"].startswith("dc ")

        stub2, prefix2 = stub_of(pid2), shm_prefix(pid2)
        workdirs = [
            d
            for d in Path(serve.tempfile.gettempdir()).glob(f"{serve.WORKDIR_PREFIX}*")
            if (d / serve.OWNER_FILE).is_file() and (d / serve.OWNER_FILE).read_text().split()[0] == str(proc.pid)
        ]
        assert len(workdirs) == 1 and list(serve.server_shm_dir(pid2).glob(f"{prefix2}*"))
        # The restarted server's python_env, as serve recorded it (other servers may run beside this test).
        envs2 = {Path(p) for p in (workdirs[0] / serve.PYTHON_ENVS_FILE).read_text().split()}
        assert len(envs2) == 1 and envs2 <= serve.python_envs() - envs_before - envs, envs2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert wait_gone([pid2, stub2], 10) < 5
        # A killed serve cannot clean up; the next server start removes what it left (here called directly).
        assert envs2 and all(e.is_dir() for e in envs2)  # the killed server's python_env is still there ...
        removed = serve.remove_stale()
        assert workdirs[0] in removed and not workdirs[0].exists()
        assert envs2 <= set(removed) and not any(e.exists() for e in envs2)  # ... and goes with its working dir
        assert not list(serve.SHM_DIR.glob(f"{prefix2}*"))
        port = int(url.rsplit(":", 1)[1])
        with pytest.raises(ConnectionRefusedError):  # the front went with serve: nothing listens there
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        serve.bind_port(port).close()  # and the port can be served again
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for env_dir in locals().get("envs2", ()):  # only if the test failed before remove_stale
            with contextlib.suppress(OSError):
                env_dir.rmdir()
    assert "Traceback" not in lines.text()


def test_stub_leaves_when_tritonserver_is_killed(tmp_path):
    """No supervisor at all (a bare Server): kill -9 of tritonserver, and its stub still goes within seconds (it
    used to stay for minutes with parent pid 1, holding its memory)."""
    server = serve.Server(echo_repo(tmp_path), private_shm=False).start()  # also: the shared /dev/shm's fallback
    try:
        pid = server.process.pid
        stub = stub_of(pid)
        (region,) = server.shm_segments()
        assert server.shm_dir == serve.SHM_DIR and region.parent == serve.SHM_DIR
        assert region.stat().st_mode & 0o777 == 0o600  # the stub's own chmod
        os.kill(pid, signal.SIGKILL)
        assert wait_gone([stub], 10) < 3
    finally:
        server.close()
    assert not region.exists()


def test_a_port_in_use_is_a_clear_error_before_any_url(tmp_path):
    """A second serve on the port of a running one (whose server answers there) is exit 3 with a message; it used
    to print its URL although its own server had not bound the port."""
    with serve.Server(echo_repo(tmp_path / "a")) as running:
        port = running.port
        t0 = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "lightkv_export.serve", str(echo_repo(tmp_path / "b")), "--port", str(port)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        took = time.monotonic() - t0
        assert running.health(probe_http=True) is None  # the first one is untouched
    assert done.returncode == 3, done.stdout + done.stderr
    assert f"cannot listen on 127.0.0.1, port {port}: Address already in use" in done.stderr
    assert "url:" not in done.stdout and "Traceback" not in done.stderr
    assert took < 30, took  # said at once, before any server is started


def test_in_process_server_refuses_a_port_in_use(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        server = serve.Server(echo_repo(tmp_path), port=port)
        with pytest.raises(serve.ServeError, match=f"port {port}: Address already in use"):
            server.start()
    assert server.process is None and server._workdir is None  # nothing was started or left


class FakeServer:
    """A Server stand-in for serve_forever's restart policy: `deaths` says when health() fails."""

    url = "http://127.0.0.1:1"

    def __init__(self, deaths: list[float], log: Path) -> None:
        self.t0, self.deaths, self.log_path = time.monotonic(), deaths, log
        self.process = type("P", (), {"pid": 1})()
        self.restarts: list[float] = []

    def health(self, *, probe_http: bool = False) -> str | None:
        now = time.monotonic() - self.t0
        if self.deaths and now >= self.deaths[0]:
            self.deaths.pop(0)
            return "planted death"
        return None

    def _stop_triton(self) -> None:
        pass

    def restart(self) -> FakeServer:
        self.restarts.append(time.monotonic() - self.t0)
        return self

    def stop(self) -> int:
        return 0


def test_restarts_back_off_and_a_healthy_period_resets_the_count(tmp_path, monkeypatch, capsys):
    """Deaths in a row wait 1, 2, 4 s (scaled down here) and stop at --restarts; a server that stayed healthy for
    the reset period starts the count again, so spread-out deaths never use up a budget."""
    monkeypatch.setattr(serve, "BACKOFF_FIRST_S", 0.05)
    log = tmp_path / "log"
    log.write_text("")
    # Two deaths in a row, a long healthy period, then three in a row: with restarts=2, the third in a row ends it.
    fake = FakeServer([0.0, 0.01, 1.5, 1.51, 1.52], log)
    code = serve.serve_forever(fake, restarts=2, healthy_reset_s=1.0)
    out = capsys.readouterr()
    assert code == 1, out
    assert len(fake.restarts) == 4, fake.restarts
    gaps = [b - a for a, b in zip(fake.restarts, fake.restarts[1:], strict=False)]
    assert gaps[0] >= 0.1  # the second restart in a row waited twice as long as the first
    assert "restarting tritonserver in 0.05 s (1 of at most 2 in a row)" in out.err
    assert "restarting tritonserver in 0.1 s (2 of at most 2 in a row)" in out.err
    assert out.err.count("(1 of at most 2 in a row)") == 2  # the healthy period reset the count
    assert "giving up after 2 restart(s) in a row (--restarts 2)" in out.err
    assert [serve.backoff_s(n) for n in (1, 2, 3, 6, 7, 20)] == [0.05, 0.1, 0.2, 1.6, 3.2, 30.0]


def test_two_servers_started_together_stop_cleanly(tmp_path):
    """Two serves started at the same moment each remove only their own /tmp/python_env_* directory: removing the
    other's made that tritonserver abort at its exit (SIGABRT, "fts_read error")."""
    envs_before = serve.python_envs()
    procs = [serve_cli(str(echo_repo(tmp_path / name))) for name in ("a", "b")]
    try:
        for _, lines in procs:
            lines.wait_for("url: ", 120)
        during = serve.python_envs() - envs_before
        assert len(during) >= 2
        for proc, _ in procs:
            proc.send_signal(signal.SIGTERM)
        outs = [lines.rest(60) for _, lines in procs]
        codes = [proc.wait(timeout=30) for proc, _ in procs]
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert codes == [0, 0] and all("stopped (exit code 0)" in out for out in outs), outs
    assert len(during - serve.python_envs()) >= 2  # both servers' directories are gone (other users' may come)


def raw_exchange(port: int, data: bytes, timeout_s: float = 10.0) -> tuple[bytes, float]:
    """Send `data` on a fresh connection and read until the server closes it: (what came back, seconds taken)."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(data)
        out = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                out += chunk
    return out, time.monotonic() - t0


def test_serve_flags_for_slow_clients_body_size_and_connections(tmp_path):
    """`serve --max-request-bytes 2000 --request-timeout 1 --max-connections 2` for real: a 2001-byte body is 413
    naming the flag and a smaller one is answered; a body that stops coming gets 408 within about a second; a third
    connection's request gets 503."""
    proc, lines = serve_cli(
        str(echo_repo(tmp_path)), "--max-request-bytes", "2000", "--request-timeout", "1", "--max-connections", "2"
    )
    try:
        url, _ = url_and_pid(lines.wait_for("url: ", 120))
        port = int(url.rsplit(":", 1)[1])
        ok = json.dumps({"prompt": "ab", "image": [base64.b64encode(png(image((4, 4)))).decode()]}).encode()
        assert len(ok) < 2000
        big = json.dumps({"prompt": "x" * (2001 - len(b'{"prompt": ""}'))}).encode()
        assert len(big) == 2001
        post = b"POST /v2/models/echo/generate HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
        raw, _ = raw_exchange(port, post % len(big) + big)
        assert raw.startswith(b"HTTP/1.1 413 ") and b"limit of 2000 bytes (set by serve --max-request-bytes)" in raw
        raw, _ = raw_exchange(port, post % len(ok) + ok)
        assert raw.startswith(b"HTTP/1.1 200 ") and json.loads(raw.partition(b"\r\n\r\n")[2])["text"].startswith("ba ")
        raw, took = raw_exchange(port, post % len(ok) + ok[:10])  # the rest of the body never comes
        assert raw.startswith(b"HTTP/1.1 408 ") and 0.9 <= took < 3, (raw, took)
        with socket.create_connection(("127.0.0.1", port)), socket.create_connection(("127.0.0.1", port)):
            time.sleep(0.2)
            raw, _ = raw_exchange(port, post % len(ok) + ok)
        assert raw.startswith(b"HTTP/1.1 503 "), raw
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in lines.text()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-request-bytes", "100"], "--max-request-bytes must be at least 1024 bytes"),
        (["--max-request-bytes", "lots"], "--max-request-bytes 'lots' is not a size"),
        (["--max-request-bytes", "-5"], "--max-request-bytes '-5' is not a size"),
        (["--request-timeout", "0"], "--request-timeout must be above 0"),
        (["--max-connections", "0"], "--max-connections must be at least 1"),
    ],
)
def test_serve_refuses_bad_front_limits_before_starting(flags, message, tmp_path, capsys):
    assert serve.main([str(tmp_path / "nothing-here"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_max_request_bytes_takes_units():
    assert serve.request_bytes("1500") == 1500
    assert serve.request_bytes("2KiB") == 2048 and serve.request_bytes("800MB") == 800_000_000
