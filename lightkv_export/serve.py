"""Serve engines with a real Triton Inference Server on 127.0.0.1.

    python -m lightkv_export.serve ENGINE_DIR_OR_REPO [--port N] [--repo-dir DIR] [--restarts N] [--no-verify-hash]

Given an engine directory, a model repository is written first (to --repo-dir, or a temporary directory). Every
engine served (the directory given, or each `<repo>/<model>/1/engine` of a repository) is verified against its
manifest first (`runtime.verify_engine`: sizes always, SHA-256 unless --no-verify-hash); a damaged one is refused
with exit 2 and a message naming the file.

Health means able to answer. tritonserver keeps saying "ready" after a Python backend stub dies (kill -9, an
out-of-memory kill) although every request to that model then fails with "Stub process is not healthy", and it
never starts the stub again. So `Server.health()` checks, besides the server process itself and its
/v2/health/ready endpoint, the stub processes it recorded once the server was ready (the server's children running
`triton_python_backend_stub`, found in /proc): one gone, or a zombie, is a dead model. `serve_forever` polls it
every 0.5 s and, on a death, prints the cause and the log tail and restarts the whole server on the same port
(the models load from the repository again), at most --restarts times (default 3) over the life of the command;
after that, or if a restart fails, it exits 1 (so a supervisor such as systemd or Kubernetes takes over) with the
log tail. Restarting the server rather than the one model: with --model-control-mode=none a model cannot be
reloaded alone, and a fresh process also frees whatever the dead stub left behind; the cost is a few seconds
without service for every model. The server's /dev/shm regions (prefix unique per server, see below) are removed
whenever it stops, including after a stub was killed (the server does not remove a dead stub's region).

The server is the `tritonserver` binary (2.51) and its Python backend shipped in the `nvidia-pytriton==0.7.0`
wheel (installed with --no-deps: the pytriton library itself wants numpy<2 and is not used). Running it from a
virtualenv needs these fixes, all made here (`server_env`, `prepare_backends`, `server_command`):

1. Libraries: the binary and backend find their bundled libraries through their RPATH, but the copies of the
   backend and stub made below do not, so LD_LIBRARY_PATH gets `site-packages/nvidia_pytriton.libs`.
2. Stub: the wheel ships one `triton_python_backend_stub` per Python version (python_backend_stubs/3.X); the
   backend runs `<backend dir>/python/triton_python_backend_stub`, so a backend directory is assembled per
   server (libtriton_python.so + the stub for this interpreter's version). The stub links libpython3.X.so.1.0:
   LD_LIBRARY_PATH gets this interpreter's LIBDIR first, so the stub embeds the same CPython as the virtualenv
   (no Debian libpython3.X package needed; an interpreter built without --enable-shared is a clear error).
3. sys.path: the stub embeds CPython in isolated mode (PYTHONPATH and the virtualenv are ignored). The backend
   directory's `triton_python_backend_utils.py` is imported by the stub before any model, so it is replaced by
   `triton_backend/stub_bootstrap.py`, which adds this virtualenv's site directories and then runs the original
   utilities unchanged (paths in `lightkv_paths.json` beside it).
4. numpy: the stub's pybind11 predates numpy 2 and reads numpy 1's descriptor layout: under numpy 2 every input
   tensor arrives with zero strides (all elements equal to the first) and outputs come back empty. The stub gets
   numpy<2 from a folder of its own (`pip install --no-deps --target .venv/triton-stub-site numpy==1.26.4`, in
   the Makefile), made sys.path[0] by starting the server with that folder as its working directory (the
   embedded interpreter's sys.path[0] is '', the working directory). The rest of the virtualenv keeps numpy 2.
5. Flags: --http-address=127.0.0.1 with a free port, --allow-grpc=false, --allow-metrics=false (nothing else
   listens), --model-control-mode=none (every model loads at start; strict readiness means "ready" = all
   loaded), --backend-directory=<assembled dir>, --pinned-memory-pool-byte-size=0 (no CUDA on CPU hosts),
   --backend-config=python,shm-region-prefix-name=<unique> so servers started side by side do not share
   /dev/shm regions, --exit-timeout-secs=15: an upper bound on waiting for in-flight requests, open HTTP
   connections and model unloads (the server exits as soon as they are done; a Python-backend model with torch
   loaded takes a few seconds to unload on a busy 2-core machine, and a timeout expiring means exit code 1).
The log line "CudaDriverHelper has not been initialized" is harmless on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lightkv_export.errors import InputError, LightKVError
from lightkv_export.triton_repo import ENGINE_SUBDIR, is_repository, repository_models, write_repository

PYTRITON_PIN = "nvidia-pytriton==0.7.0"
STUB_NUMPY_PIN = "numpy==1.26.4"
STUB_SITE_ENV = "LIGHTKV_TRITON_STUB_SITE"
BOOTSTRAP = Path(__file__).parent / "triton_backend" / "stub_bootstrap.py"
LOG_TAIL_LINES = 40
EXIT_TIMEOUT_S = 15
STUB_NAME = "triton_python_backend_stub"
FULL_HASH_ENV = "LIGHTKV_ENGINE_FULL_HASH"  # read by triton_backend/model.py
SHM_DIR = Path("/dev/shm")
HEALTH_POLL_S = 0.5
HTTP_PROBE_EVERY = 4  # polls between /v2/health/ready probes (2 s)
HTTP_PROBE_FAILURES = 3  # consecutive failed probes (5 s timeout each) that mean "not answering"
DEFAULT_RESTARTS = 3
_SERVER_COUNT = iter(range(1 << 62))  # makes each server's /dev/shm prefix unique within this process


class ServeError(LightKVError):
    """The server could not be installed, started or reached."""

    exit_code = 3


@dataclass(frozen=True)
class TritonInstall:
    """Where the wheel put the server: binary, Python backend, stubs and bundled libraries."""

    root: Path  # site-packages/pytriton/tritonserver
    libs: Path  # site-packages/nvidia_pytriton.libs

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def python_backend(self) -> Path:
        return self.root / "backends" / "python"

    def stub(self, version: str) -> Path:
        return self.root / "python_backend_stubs" / version / "triton_python_backend_stub"


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def find_triton() -> TritonInstall:
    """The tritonserver shipped in nvidia-pytriton, found without importing pytriton (it wants numpy<2)."""
    for site_dir in map(Path, sysconfig.get_paths()["purelib"].split(os.pathsep)):
        install = TritonInstall(site_dir / "pytriton" / "tritonserver", site_dir / "nvidia_pytriton.libs")
        if install.binary.is_file():
            if not install.stub(python_version()).is_file():
                raise ServeError(f"{PYTRITON_PIN} has no Python backend stub for Python {python_version()}")
            return install
    raise ServeError(
        f"tritonserver is not installed: run `{sys.executable} -m pip install --no-deps {PYTRITON_PIN}` "
        "(or `make` , which does it)"
    )


def stub_site_dir() -> Path:
    """The folder holding numpy<2 for the Python backend stub (see the module docstring, fix 4)."""
    path = Path(os.environ.get(STUB_SITE_ENV, Path(sys.prefix) / "triton-stub-site"))
    if not (path / "numpy").is_dir():
        raise ServeError(
            f"{path} has no numpy for the Triton Python backend stub: run "
            f"`{sys.executable} -m pip install --no-deps --target {path} {STUB_NUMPY_PIN}` (or `make`)"
        )
    return path


def python_libdir() -> Path:
    """The directory with this interpreter's libpython3.X.so (the stub links it)."""
    libdir = Path(sysconfig.get_config_var("LIBDIR") or "")
    soname = f"libpython{python_version()}.so.1.0"
    if not (libdir / soname).is_file():
        raise ServeError(
            f"{soname} not found in {libdir}: the Triton Python backend stub needs a Python built with "
            f"--enable-shared (on Debian: apt-get install libpython{python_version()})"
        )
    return libdir


def site_dirs() -> list[str]:
    """This virtualenv's site-packages directories, for the stub's sys.path."""
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([paths["purelib"], paths["platlib"]]))


def prepare_backends(install: TritonInstall, dest: Path) -> Path:
    """Assemble a backend directory (dest/python/...) for this interpreter; returns dest."""
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(install.python_backend / "libtriton_python.so", python_dir / "libtriton_python.so")
    shutil.copy2(install.stub(python_version()), python_dir / "triton_python_backend_stub")
    shutil.copy2(BOOTSTRAP, python_dir / "triton_python_backend_utils.py")
    paths = {
        "site_dirs": site_dirs(),
        "backend_utils": str(install.python_backend / "triton_python_backend_utils.py"),
    }
    (python_dir / "lightkv_paths.json").write_text(json.dumps(paths, indent=1) + "\n")
    return dest


def server_command(
    install: TritonInstall,
    repo_dir: Path,
    backends: Path,
    port: int,
    shm_prefix: str,
    exit_timeout_s: int = EXIT_TIMEOUT_S,
) -> list[str]:
    """The tritonserver command line: HTTP on 127.0.0.1:port only."""
    return [
        str(install.binary),
        f"--model-repository={repo_dir}",
        f"--backend-directory={backends}",
        "--model-control-mode=none",
        "--strict-readiness=true",
        "--http-address=127.0.0.1",
        f"--http-port={port}",
        "--allow-grpc=false",
        "--allow-metrics=false",
        "--pinned-memory-pool-byte-size=0",
        f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
        f"--exit-timeout-secs={exit_timeout_s}",
        "--log-verbose=0",
    ]


def server_env(install: TritonInstall, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver: this interpreter's libpython first, then the wheel's bundled libraries.

    FULL_HASH_ENV=0: the engines were verified here before the start (main), so model.py's Engine.load checks the
    files' sizes only instead of hashing every engine again in each stub."""
    env = dict(os.environ if base is None else base)
    env[FULL_HASH_ENV] = "0"
    extra = [str(python_libdir()), str(install.libs)]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(extra + [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p])
    return env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port(port: int | None) -> int | None:
    """A port to bind: 1-65535, or None / 0 for a free one (returned as None)."""
    if port is None or port == 0:
        return None
    if not 1 <= port <= 65535:
        raise InputError(f"--port must be from 1 to 65535 (or 0 for a free port), got {port}")
    return port


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    # The server prints wide ASCII tables; keep the lines that say something.
    kept = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("+", "|"))]
    return "\n".join(kept[-lines:])


@dataclass(frozen=True)
class ProcState:
    """What /proc/<pid>/stat says about a process (Linux)."""

    pid: int
    state: str  # R, S, D, Z (zombie: dead, not yet reaped), ...
    ppid: int
    exit_code: int  # waitpid status of a zombie (0 while alive)


def proc_state(pid: int) -> ProcState | None:
    """The process's state, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = stat.rsplit(")", 1)[1].split()  # the command name (field 2) may hold spaces and parentheses
    exit_code = int(rest[49]) if len(rest) > 49 else 0
    return ProcState(pid, rest[0], int(rest[1]), exit_code)


def child_stubs(server_pid: int) -> dict[int, str]:
    """The Python backend stubs the server runs: pid -> model instance name (e.g. echo_0_0)."""
    stubs = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        st = proc_state(int(entry.name))
        if st is None or st.ppid != server_pid or st.state in "ZX":
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and Path(argv[0].decode(errors="replace")).name == STUB_NAME:
            # argv: stub, model.py, shm region, shm sizes (2), parent pid, backend dir, ipc handle, instance name
            stubs[st.pid] = argv[8].decode(errors="replace") if len(argv) > 8 else f"stub {st.pid}"
    return stubs


def describe_death(st: ProcState | None) -> str:
    if st is None:
        return "is gone"
    status = st.exit_code
    if status & 0x7F:
        sig = status & 0x7F
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        oom = " (an out-of-memory kill looks like this)" if sig == signal.SIGKILL else ""
        return f"was killed by {name}{oom}"
    return f"exited with code {status >> 8}"


def http_ready(url: str, timeout_s: float = 1.0) -> bool:
    """GET /v2/health/ready answered 200."""
    try:
        with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=timeout_s) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


class Server:
    """A tritonserver process on 127.0.0.1 serving one model repository.

        with Server(repo_dir) as server:
            client = tritonclient.http.InferenceServerClient(server.address)

    start() waits for readiness (every model loaded) or raises ServeError with the log tail; stop() sends
    SIGTERM, waits, then kills the process group.
    """

    def __init__(self, repo_dir: Path, *, port: int | None = None, startup_timeout_s: float = 180.0) -> None:
        self.repo_dir = Path(repo_dir).resolve()
        self.requested_port = check_port(port)
        self.startup_timeout_s = startup_timeout_s
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self.shm_prefix: str | None = None
        self.stubs: dict[int, str] = {}  # pid -> model instance, recorded once the server is ready
        self._workdir: Path | None = None

    @property
    def address(self) -> str:
        """host:port, as tritonclient wants it."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def log_path(self) -> Path:
        assert self._workdir is not None
        return self._workdir / "tritonserver.log"

    def models(self) -> list[str]:
        return repository_models(self.repo_dir)

    def start(self) -> Server:
        if not repository_models(self.repo_dir):
            raise InputError(f"{self.repo_dir} holds no model (no */config.pbtxt)")
        install = find_triton()
        cwd = stub_site_dir()
        self.close()  # a restart: the previous process and working directory go first
        self._workdir = Path(tempfile.mkdtemp(prefix="lightkv-triton-"))
        backends = prepare_backends(install, self._workdir / "backends")
        env = server_env(install)
        # A port picked here can be taken before the server binds it: retry with another one, not a given one.
        attempts = 1 if self.requested_port else 3
        for attempt in range(attempts):
            self.port = self.requested_port or free_port()
            self.shm_prefix = f"lightkv{os.getpid()}_{self.port}_{next(_SERVER_COUNT)}_"
            cmd = server_command(install, self.repo_dir, backends, self.port, self.shm_prefix)
            with open(self.log_path, "wb") as log:
                # Own session: a terminal's Ctrl-C reaches us, and we shut the server down in order.
                self.process = subprocess.Popen(
                    cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            try:
                self._wait_ready()
                self.stubs = child_stubs(self.process.pid)
                return self
            except ServeError:
                log_text = tail(self.log_path)
                self.stop()
                if attempt + 1 < attempts and "address already in use" in log_text.lower():
                    continue
                self.close()  # the error carries the log tail; nothing is left behind
                raise
        raise AssertionError("unreachable")

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise ServeError(
                    f"tritonserver exited with code {code} while starting; log tail:\n{tail(self.log_path)}"
                )
            if http_ready(self.url):
                return
            time.sleep(0.2)
        waited = f"{self.startup_timeout_s:.0f} s"
        raise ServeError(f"tritonserver not ready after {waited} on {self.url}; log tail:\n{tail(self.log_path)}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def health(self, *, probe_http: bool = False, http_timeout_s: float = 5.0) -> str | None:
        """None while the server can answer, else why not: the server exited, a model's backend stub died (the
        server itself keeps saying ready then), or (probe_http) /v2/health/ready did not answer 200."""
        if self.process is None:
            return "tritonserver is not started"
        code = self.process.poll()
        if code is not None:
            return f"tritonserver exited with code {code}"
        for pid, instance in self.stubs.items():
            st = proc_state(pid)
            if st is None or st.state in "ZX" or st.ppid != self.process.pid:
                return f"the Python backend stub of model instance {instance} (pid {pid}) {describe_death(st)}"
        if probe_http and not http_ready(self.url, timeout_s=http_timeout_s):
            return f"{self.url}/v2/health/ready did not answer 200 within {http_timeout_s:g} s"
        return None

    def shm_segments(self) -> list[Path]:
        """This server's shared-memory regions in /dev/shm (its prefix is unique per server)."""
        if not self.shm_prefix:
            return []
        return sorted(SHM_DIR.glob(f"{self.shm_prefix}*"))

    def stop(self, timeout_s: float = EXIT_TIMEOUT_S + 15.0) -> int | None:
        """SIGTERM, wait up to timeout_s, then SIGKILL the server's process group; then remove the server's /dev/shm
        regions (a dead stub's region is left behind by the server otherwise). Returns the exit code."""
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the group: the server and its backend stubs
                proc.wait()
        for segment in self.shm_segments():
            with contextlib.suppress(FileNotFoundError):
                segment.unlink()
        self.stubs = {}
        return proc.returncode

    def restart(self) -> Server:
        """Stop, then start again on the same port (clients keep their URL)."""
        port, requested = self.port, self.requested_port
        self.close()
        self.requested_port = port
        try:
            return self.start()
        finally:
            self.requested_port = requested

    def close(self) -> None:
        """stop() and remove the working directory (assembled backends and log)."""
        self.stop()
        self.process = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve_repository(target: Path, repo_dir: Path | None) -> tuple[Path, bool]:
    """(repository to serve, whether it is a temporary one) for an engine directory or a repository."""
    target = Path(target)
    if (target / "manifest.json").is_file():
        if repo_dir is None:
            return write_repository([target], Path(tempfile.mkdtemp(prefix="lightkv-repo-")) / "repo"), True
        return write_repository([target], repo_dir), False
    if is_repository(target) or repository_models(target):
        if repo_dir is not None:
            raise InputError("--repo-dir applies to an engine directory, not to a repository")
        return target, False
    raise InputError(f"{target} is neither an engine directory (manifest.json) nor a model repository")


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def wait_unhealthy(server: Server, poll_s: float = HEALTH_POLL_S) -> str:
    """Block until the server cannot answer; returns why (see Server.health)."""
    polls = failures = 0
    while True:
        polls += 1
        probe = polls % HTTP_PROBE_EVERY == 0
        reason = server.health(probe_http=probe)
        if reason is not None and probe and "health/ready" in reason:
            failures += 1  # a slow answer under load is not a death: only several in a row are
            if failures < HTTP_PROBE_FAILURES:
                reason = None
        elif probe:
            failures = 0
        if reason is not None:
            return reason
        time.sleep(poll_s)


def serve_forever(server: Server, *, restarts: int = DEFAULT_RESTARTS, banner: tuple[str, ...] = ()) -> int:
    """Print `banner`, then block until Ctrl-C / SIGTERM (then stop the server: 0). When the server cannot answer
    any more (it exited, or a model's backend stub died), restart it on the same port, at most `restarts` times;
    then exit 1. The banner is printed inside the interrupt handler: a client that reads the URL and at once sends
    Ctrl-C gets a clean stop, not "interrupted while starting"."""
    done = 0
    try:
        for line in banner:
            print(line, flush=True)
        while True:
            reason = wait_unhealthy(server)
            print(f"tritonserver cannot answer: {reason}; log tail:\n{tail(server.log_path)}", file=sys.stderr)
            if done >= restarts:
                print(f"giving up after {done} restart(s) (--restarts {restarts}); exit code 1", file=sys.stderr)
                server.stop()
                return 1
            done += 1
            print(f"restarting tritonserver ({done} of at most {restarts}) ...", file=sys.stderr, flush=True)
            try:
                server.restart()
            except ServeError as e:
                print(f"error: the restart failed: {e}", file=sys.stderr)
                return 1
            print(f"url: {server.url}   (tritonserver pid {server.process.pid}; restarted)", flush=True)
    except KeyboardInterrupt:
        print("stopping tritonserver ...", flush=True)
        code = server.stop()
        print(f"stopped (exit code {code})", flush=True)
        return 0


def served_engines(target: Path) -> list[Path]:
    """The engine directories `serve target` would serve: target itself, or each model's engine in a repository."""
    target = Path(target)
    if (target / "manifest.json").is_file():
        return [target]
    return sorted(p.parent for p in target.glob(f"*/*/{ENGINE_SUBDIR}/manifest.json"))


def verify_engines(target: Path, *, full_hash: bool = True) -> list[Path]:
    """runtime.verify_engine for every engine served; a damaged one is an InputError naming the file."""
    from lightkv_export.runtime import verify_engine

    engines = served_engines(target)
    for engine in engines:
        verify_engine(engine, full_hash=full_hash)
    return engines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightkv_export.serve", description=__doc__.splitlines()[0])
    parser.add_argument("target", type=Path, metavar="ENGINE_DIR_OR_REPO")
    parser.add_argument("--port", type=int, default=None, help="HTTP port on 127.0.0.1 (default or 0: a free one)")
    parser.add_argument("--repo-dir", type=Path, default=None, help="where to write the repository for an engine")
    parser.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for readiness")
    parser.add_argument(
        "--restarts",
        type=int,
        default=DEFAULT_RESTARTS,
        help=f"restart the server at most N times when it cannot answer (a backend stub died); default "
        f"{DEFAULT_RESTARTS}; 0: exit 1 at the first death",
    )
    parser.add_argument(
        "--no-verify-hash",
        action="store_true",
        help="check each engine file's size against its manifest but skip the SHA-256 of its contents (faster for "
        "very large engines; a damaged file of the right size then goes unnoticed)",
    )
    args = parser.parse_args(argv)
    # SIGTERM behaves like Ctrl-C, from the first moment: a signal during startup still stops the server.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    temp_repo = None
    try:
        port = check_port(args.port)  # before writing a repository for a server that cannot start
        if args.restarts < 0:
            raise InputError(f"--restarts must be >= 0, got {args.restarts}")
        verify_engines(args.target, full_hash=not args.no_verify_hash)
        repo, is_temp = resolve_repository(args.target, args.repo_dir)
        temp_repo = repo.parent if is_temp else None
        server = Server(repo, port=port, startup_timeout_s=args.startup_timeout)
        try:
            server.start()
            banner = (
                f"serving {', '.join(server.models())} from {repo}",
                f"url: {server.url}   (tritonserver pid {server.process.pid}; Ctrl-C to stop)",
            )
            return serve_forever(server, restarts=args.restarts, banner=banner)
        finally:
            server.close()
    except LightKVError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C before the server was up: close() above already stopped it
        print("interrupted while starting", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if temp_repo is not None:
            shutil.rmtree(temp_repo, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
