"""Supervision of a real `serve` (subprocess) with real signals: what is left after kill -9, a port in use, restarts
with backoff, and no leftovers in /tmp or /dev/shm."""

from __future__ import annotations

import contextlib
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
        envs2 = serve.python_envs() - envs_before - envs  # the restarted server's
        workdirs = [
            d
            for d in Path(serve.tempfile.gettempdir()).glob(f"{serve.WORKDIR_PREFIX}*")
            if (d / serve.OWNER_FILE).is_file() and (d / serve.OWNER_FILE).read_text().split()[0] == str(proc.pid)
        ]
        assert len(workdirs) == 1 and list(serve.SHM_DIR.glob(f"{prefix2}*"))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert wait_gone([pid2, stub2], 10) < 5
        # A killed serve cannot clean up; the next server start removes what it left (here called directly).
        removed = serve.remove_stale()
        assert workdirs[0] in removed and not workdirs[0].exists()
        assert not list(serve.SHM_DIR.glob(f"{prefix2}*"))
        port = int(url.rsplit(":", 1)[1])
        with pytest.raises(ConnectionRefusedError):  # the front went with serve: nothing listens there
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        serve.bind_port(port).close()  # and the port can be served again
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for env_dir in locals().get("envs2", ()):  # what a killed serve leaves and nothing can attribute (docs)
            with contextlib.suppress(OSError):
                env_dir.rmdir()
    assert "Traceback" not in lines.text()


def test_stub_leaves_when_tritonserver_is_killed(tmp_path):
    """No supervisor at all (a bare Server): kill -9 of tritonserver, and its stub still goes within seconds (it
    used to stay for minutes with parent pid 1, holding its memory)."""
    server = serve.Server(echo_repo(tmp_path)).start()
    try:
        pid = server.process.pid
        stub = stub_of(pid)
        os.kill(pid, signal.SIGKILL)
        assert wait_gone([stub], 10) < 3
    finally:
        server.close()


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
