"""Serve engines with a real Triton Inference Server behind a validating HTTP front on 127.0.0.1.

    python -m lightkv_export.serve ENGINE_DIR_OR_REPO [--port N] [--repo-dir DIR] [--restarts N] [--no-verify-hash]
        [--max-request-bytes N] [--request-timeout S] [--max-connections N]

Given an engine directory, a model repository is written first (to --repo-dir, or a temporary directory). Every
engine served (the directory given, or each `<repo>/<model>/1/engine` of a repository) is verified against its
manifest first (`runtime.verify_engine`: sizes always, SHA-256 unless --no-verify-hash); a damaged one is refused
with exit 2 and a message naming the file.

Two parts, one process tree (see `Server`):
- the front (front.py: Starlette on uvicorn, in a thread of this process) is the only listener on the public
  127.0.0.1 port. It reads each body with a size limit, parses it with a depth limit (CPython's json guards its
  recursion), checks every field, and forwards over gRPC. tritonserver's own HTTP parser never sees a client's
  bytes: a body nested 60,000 levels deep used to crash it with SIGSEGV.
- tritonserver runs with HTTP and metrics off and its gRPC endpoint on a unix socket, `<workdir>/private/triton:1`
  (Triton writes its gRPC address as address:port, and a unix address keeps the ":1" in the path). The socket's
  directory is 0700, so only this user reaches it, and tritonserver opens no TCP port at all.

Failure behaviour:
- The port is bound before anything starts: a port in use is exit 3 with a message, before any URL is printed.
- Slow clients cannot hold the front: a whole request (headers and body) must arrive within --request-timeout
  (30 s) or its connection is closed, with a 408 when it had begun; idle connections between requests close after
  5 s; at most --max-connections (256) connections are served at once (a request on one more gets 503). Bodies of
  the generate endpoints are limited by --max-request-bytes (default: derived from each model's limits). See front.py.
- tritonserver is started through a small exec wrapper (`child_command`) that gives it a private /dev/shm where
  the kernel allows it, arms PR_SET_PDEATHSIG (SIGKILL) and umask 077 before exec: `kill -9` of serve takes
  tritonserver with it, and the front (a thread) dies with serve. The backend stubs watch their parent
  (stub_bootstrap.py): when tritonserver dies they leave within a second.
- Shared memory: the backend creates each stub's region with mode 0644 whatever the umask (boost.interprocess
  shm_open then fchmod 0644, in tritonserver before the stub starts). Where unprivileged user and mount namespaces
  are allowed, tritonserver runs in its own with a 0700 tmpfs on /dev/shm (CHILD_EXEC): no other user can see the
  regions at all, and they go with the server's last process, even after kill -9; serve sees them through
  /proc/<pid>/root (`Server.shm_dir`). Elsewhere (the log's first line says "shared /dev/shm (<why>)") the regions
  are in the shared /dev/shm and made 0600 by the stub's first line (stub_bootstrap.py; serve checks again once
  ready), and removed when a server stops or dies. The region grows to fit the largest request and the backend
  never shrinks it, so images do not pass through it: the front writes them to files in
  `<workdir>/private/images` (0700) and the model reads and removes them (triton_backend/model.py); the region
  stays at its 1 MB start.
- The backend's empty /tmp/python_env_* directory (its path is fixed in the backend: TMPDIR is ignored and no
  backend-config names it) is removed when a server stops or dies; serve records which one is its server's in its
  working directory, so after a kill -9 of serve the next start removes it too.
- Health means able to answer. tritonserver keeps saying "ready" after a Python backend stub dies (kill -9, an
  out-of-memory kill) although every request to that model then fails, and it never starts the stub again; a
  decoupled request of that model then stays open forever. So `Server.health()` checks the server process, the
  stub processes it recorded once ready (one gone, or a zombie, is a dead model), the front, and (every 2 s)
  tritonserver's gRPC readiness. The front asks the same health while a request waits: an open stream then ends
  with an error event, a /generate with 503, instead of hanging.
- `serve_forever` polls it every 0.5 s and, on a death, prints the cause and the log tail and restarts tritonserver
  (the models load from the repository again) after a backoff of 1, 2, 4 ... at most 30 s. The front keeps the port
  meanwhile (clients keep their URL and get 503). --restarts N (default 5) bounds the restarts *in a row*: a server
  that stays healthy for 60 s resets the count, so deaths spread over time never use up a budget that an attacker
  could exhaust. Past N in a row, or a restart that fails N times, exit 1 (a supervisor such as systemd takes over).
  Restarting the server rather than the one model: with --model-control-mode=none a model cannot be reloaded alone,
  and a fresh process also frees whatever the dead stub left behind; the cost is a few seconds without service.
- Ctrl-C / SIGTERM stop the front (open requests get up to 5 s) and then tritonserver, and remove the working
  directory; exit 0.
- A `serve` killed with SIGKILL cannot clean up (its processes die, see above): the next server start of this
  user removes its working directory, its python_env directory and /dev/shm regions (`remove_stale`: only those
  whose recorded owner, pid and start time, is gone).
- Not covered: without namespaces, the stub's region is 0644 for the moments between its creation by tritonserver
  and the stub's first line (before any model is loaded or request served); a local user who opened it in that
  window keeps the descriptor. A model without the image_file input (not written by this package) gets its images
  through the region, which then grows to fit the largest request for good. A client that reads its answer very
  slowly holds its connection (and its request) until it reads or goes away.

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
5. Flags: --allow-http=false, --allow-metrics=false, --grpc-address=unix:<private socket> (no TCP listener),
   --model-control-mode=none (every model loads at start; strict readiness means "ready" = all
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
import errno
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lightkv_export.errors import InputError, LightKVError
from lightkv_export.front import (
    IMAGE_DIR_ENV,
    MAX_CONNECTIONS,
    REQUEST_TIMEOUT_S,
    FrontLimits,
    FrontServer,
    create_app,
)
from lightkv_export.front import bind as front_bind
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
HTTP_PROBE_EVERY = 4  # polls between readiness probes of tritonserver (2 s)
HTTP_PROBE_FAILURES = 3  # consecutive failed probes (5 s timeout each) that mean "not answering"
DEFAULT_RESTARTS = 5  # restarts in a row, each before the server stayed healthy for HEALTHY_RESET_S
HEALTHY_RESET_S = 60.0  # a server healthy this long has recovered: the count of restarts in a row starts again
BACKOFF_FIRST_S = 1.0  # wait before the first restart in a row; doubled for each next one
BACKOFF_MAX_S = 30.0
GRPC_PORT = 1  # only a suffix of the unix socket's path (see server_command)
SHM_MODE = 0o600
PYTHON_ENV_WAIT_S = 30.0  # at most this long under the start lock, waiting for the backend's python_env directory
PYTHON_ENV_GLOB = "python_env_*"  # the Python backend's mkdtemp("/tmp/python_env_XXXXXX"); TMPDIR is ignored
# Run by child_command: a private /dev/shm where the kernel allows it (below), arm PR_SET_PDEATHSIG (1), check the
# parent is still ours, umask 077, exec the server. The private /dev/shm: a new user namespace (this user mapped to
# itself) and mount namespace with a tmpfs of mode 0700 on /dev/shm, so the backend's regions are visible to this
# server's processes only (never 0644 to other users, not even for a moment) and go with its last process, even on
# kill -9. Where unprivileged namespaces are refused (some containers, AppArmor on Ubuntu 24.04) it says why on its
# first log line and the server runs as before.
CHILD_EXEC = """\
import ctypes, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
def private_shm():
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(0x10000000 | 0x00020000) != 0:
        return "unshare(CLONE_NEWUSER | CLONE_NEWNS): " + os.strerror(ctypes.get_errno())
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open("/proc/self/" + name, "w") as f:
            f.write(text)
    if libc.mount(None, b"/", None, 0x4000 | 0x40000, None) != 0:
        return "mount(/, MS_REC | MS_PRIVATE): " + os.strerror(ctypes.get_errno())
    if libc.mount(b"tmpfs", b"/dev/shm", b"tmpfs", 0x2 | 0x4, b"mode=0700") != 0:
        return "mount(tmpfs, /dev/shm): " + os.strerror(ctypes.get_errno())
    return ""
def attempt():
    try:
        return private_shm()
    except OSError as e:
        return str(e)
if sys.argv[2] == "1":
    probe = os.fork()  # tried in a child first: a half-made namespace cannot be undone
    if probe == 0:
        why = attempt()
        if why:
            print("lightkv_export: shared /dev/shm (" + why + ")", flush=True)
        os._exit(1 if why else 0)
    if os.waitpid(probe, 0)[1] == 0:
        why = attempt()
        if why:
            sys.exit("lightkv_export: a private /dev/shm failed after a successful trial: " + why)
        print("lightkv_export: private /dev/shm", flush=True)
if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:
    sys.exit("lightkv_export: prctl(PR_SET_PDEATHSIG) failed: " + os.strerror(ctypes.get_errno()))
if os.getppid() != int(sys.argv[1]):
    sys.exit("lightkv_export: serve exited before tritonserver started")
os.umask(0o077)
os.execv(sys.argv[3], sys.argv[3:])
"""
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
    grpc_socket: Path,
    shm_prefix: str,
    exit_timeout_s: int = EXIT_TIMEOUT_S,
) -> list[str]:
    """The tritonserver command line: no TCP at all, gRPC on the unix socket `grpc_socket` + ":1" (Triton writes
    its gRPC address as address:port, and a unix address keeps the suffix in the path)."""
    return [
        str(install.binary),
        f"--model-repository={repo_dir}",
        f"--backend-directory={backends}",
        "--model-control-mode=none",
        "--strict-readiness=true",
        "--allow-http=false",
        "--allow-metrics=false",
        f"--grpc-address=unix:{grpc_socket}",
        f"--grpc-port={GRPC_PORT}",
        "--pinned-memory-pool-byte-size=0",
        f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
        f"--exit-timeout-secs={exit_timeout_s}",
        "--log-verbose=0",
    ]


def child_command(cmd: list[str], *, private_shm: bool = False) -> list[str]:
    """`cmd` started through a small exec wrapper that, in the child and before exec, gives it a private /dev/shm
    where the kernel allows it (private_shm; see CHILD_EXEC), arms a parent-death signal (SIGKILL when this process
    dies, even by kill -9), exits if this process is already gone, and sets umask 077.
    A wrapper rather than Popen's preexec_fn: preexec_fn runs Python after fork() in a process with threads (the
    front's event loop, gRPC's own threads), which can deadlock."""
    return [sys.executable, "-I", "-S", "-c", CHILD_EXEC, str(os.getpid()), "1" if private_shm else "0", *cmd]


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


def grpc_ready(target: str, timeout_s: float = 1.0) -> bool:
    """tritonserver's gRPC ServerReady answered true (target: unix:PATH)."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            return bool(stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=timeout_s).ready)
        except grpc.RpcError:
            return False


WORKDIR_PREFIX = "lightkv-triton-"
OWNER_FILE = "owner"  # in a working directory: "<serve pid> <its start time in clock ticks>"
PYTHON_ENVS_FILE = "python_envs"  # in a working directory: the running tritonserver's /tmp/python_env_*, one a line


def process_start(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, /proc/<pid>/stat field 22): with the pid, an identity
    that a reused pid does not share."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def remove_stale(tmp: Path | None = None, shm: Path = SHM_DIR) -> list[Path]:
    """What a `serve` killed with SIGKILL left (it could not clean up): its working directories (the private socket,
    images of requests in flight, the log) and its /dev/shm regions, once that serve is gone. Returns what it
    removed. Only this user's, and only those whose owner is recorded and dead: a running server is never touched."""
    removed = []
    for workdir in Path(tmp or tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*"):
        try:
            if workdir.stat().st_uid != os.getuid():
                continue
            pid, start = (int(x) for x in (workdir / OWNER_FILE).read_text().split())
        except (OSError, ValueError):
            continue  # no owner recorded (being created, or not ours): left alone
        if process_start(pid) == start:
            continue
        removed.extend(_remove_recorded_envs(workdir / PYTHON_ENVS_FILE))
        shutil.rmtree(workdir, ignore_errors=True)
        removed.append(workdir)
        for segment in shm.glob(f"lightkv{pid}_*"):
            with contextlib.suppress(OSError):
                if segment.stat().st_uid == os.getuid():
                    segment.unlink()
                    removed.append(segment)
    return removed


def server_shm_dir(pid: int) -> Path:
    """Where a server's /dev/shm is seen from this process: its private tmpfs through /proc/<pid>/root when it runs
    in a mount namespace of its own (CHILD_EXEC), else the shared /dev/shm."""
    try:
        if os.stat(f"/proc/{pid}/ns/mnt").st_ino != os.stat("/proc/self/ns/mnt").st_ino:
            return Path(f"/proc/{pid}/root") / SHM_DIR.relative_to("/")
    except OSError:
        pass
    return SHM_DIR


def _remove_recorded_envs(record: Path) -> list[Path]:
    """The Python backend directories a dead server recorded (see Server._start_triton), removed: only this user's,
    only /tmp/python_env_* and only when empty (an environment unpacked there is never touched)."""
    removed = []
    with contextlib.suppress(OSError):
        for line in record.read_text().splitlines():
            path = Path(line)
            if path.parent != Path("/tmp") or not path.match(PYTHON_ENV_GLOB):
                continue
            with contextlib.suppress(OSError):
                if path.stat().st_uid == os.getuid():
                    path.rmdir()
                    removed.append(path)
    return removed


@contextlib.contextmanager
def _start_lock(timeout_s: float = PYTHON_ENV_WAIT_S) -> Iterator[None]:
    """This user's lock around starting a tritonserver (see Server._start_triton). Best effort: a lock file that is
    not this user's (another user can create that name in /tmp) or a lock not free within timeout_s is skipped, so
    nobody can stop a server from starting; the python_env directory may then be told apart less surely."""
    import fcntl

    path = Path(tempfile.gettempdir()) / f"lightkv-triton-start-{os.getuid()}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError:
        yield
        return
    try:
        if os.fstat(fd).st_uid == os.getuid():
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def python_envs() -> set[Path]:
    """This user's /tmp/python_env_* directories (the Python backend's; see PYTHON_ENV_GLOB)."""
    found = set()
    for path in Path("/tmp").glob(PYTHON_ENV_GLOB):
        with contextlib.suppress(OSError):
            if path.is_dir() and path.stat().st_uid == os.getuid():
                found.add(path)
    return found


class Server:
    """tritonserver serving one model repository behind the validating HTTP front (front.py) on 127.0.0.1.

        with Server(repo_dir) as server:
            client.ask(server.url, images, prompt)

    start() binds the public port first (a port in use is a ServeError before anything starts), starts tritonserver
    with its gRPC endpoint on a unix socket in the server's private working directory (0700) and no TCP listener,
    waits for readiness (every model loaded) or raises ServeError with the log tail, then starts the front on the
    port. tritonserver gets a parent-death signal (it dies with this process, even on kill -9; start() must be called
    from a thread that lives as long as the server, e.g. the main thread) and umask 077; its backend stubs watch
    their parent (stub_bootstrap.py). restart() replaces tritonserver alone: the front keeps the port, so clients
    keep their URL and get 503 meanwhile. stop() stops the front and tritonserver together.
    """

    def __init__(
        self,
        repo_dir: Path,
        *,
        port: int | None = None,
        startup_timeout_s: float = 180.0,
        front_limits: FrontLimits | None = None,
        private_shm: bool = True,
    ) -> None:
        self.repo_dir = Path(repo_dir).resolve()
        self.private_shm = private_shm  # try a private /dev/shm for tritonserver (see CHILD_EXEC)
        self.shm_dir = SHM_DIR  # where this server's regions are seen from here (set once it is ready)
        self.requested_port = check_port(port)
        self.startup_timeout_s = startup_timeout_s
        self.front_limits = front_limits
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self.front: FrontServer | None = None
        self.shm_prefix: str | None = None
        self.stubs: dict[int, str] = {}  # pid -> model instance, recorded once the server is ready
        self.python_envs: set[Path] = set()  # the Python backend's /tmp/python_env_* of this server
        self._workdir: Path | None = None
        self._install: TritonInstall | None = None
        self._launches = 0

    @property
    def address(self) -> str:
        """host:port of the front, as tritonclient.http wants it."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def grpc_socket(self) -> Path:
        """The unix socket's path given to tritonserver (it listens on this path + ":1")."""
        assert self._workdir is not None
        return self._workdir / "private" / "triton"

    @property
    def image_dir(self) -> Path:
        """Where the front hands images to the models as files (see triton_backend/model.py)."""
        assert self._workdir is not None
        return self._workdir / "private" / "images"

    @property
    def grpc_target(self) -> str:
        return f"unix:{self.grpc_socket}:{GRPC_PORT}"

    @property
    def log_path(self) -> Path:
        assert self._workdir is not None
        return self._workdir / "tritonserver.log"

    def models(self) -> list[str]:
        return repository_models(self.repo_dir)

    def start(self) -> Server:
        if not repository_models(self.repo_dir):
            raise InputError(f"{self.repo_dir} holds no model (no */config.pbtxt)")
        self._install = find_triton()
        stub_site_dir()
        self.close()  # a second start: the previous processes and working directory go first
        sock = bind_port(self.requested_port)  # before anything else: a port in use is the first thing said
        self.port = sock.getsockname()[1]
        remove_stale()
        try:
            self._workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))  # mode 0700
            (self._workdir / OWNER_FILE).write_text(f"{os.getpid()} {process_start(os.getpid())}\n")
            for sub in ("private", "private/images", "tmp"):
                (self._workdir / sub).mkdir(mode=0o700)
            prepare_backends(self._install, self._workdir / "backends")
            self._start_triton()
            app = create_app(
                self.grpc_target, limits=self.front_limits, health=self._stub_health, image_dir=self.image_dir
            )
            self.front = FrontServer(app, sock, limits=self.front_limits).start()
        except BaseException as e:
            sock.close()
            self.close()  # the error carries the log tail; nothing is left behind
            if isinstance(e, RuntimeError) and not isinstance(e, LightKVError):
                raise ServeError(str(e)) from None
            raise
        return self

    def _start_triton(self) -> None:
        assert self._workdir is not None and self._install is not None
        with contextlib.suppress(FileNotFoundError):  # a killed server's socket file
            Path(f"{self.grpc_socket}:{GRPC_PORT}").unlink()
        self._launches += 1
        self.shm_prefix = f"lightkv{os.getpid()}_{self.port}_{next(_SERVER_COUNT)}_"
        backends = self._workdir / "backends"
        cmd = server_command(self._install, self.repo_dir, backends, self.grpc_socket, self.shm_prefix)
        env = server_env(self._install)
        env["TMPDIR"] = str(self._workdir / "tmp")  # for everything that honours it (the backend's python_env not)
        env[IMAGE_DIR_ENV] = str(self.image_dir)
        # Which /tmp/python_env_* is this server's? Nothing in it says so, so servers of this user start one at a
        # time up to the moment the backend made it (a lock held for a few seconds): the one that appears then is
        # ours. (Removing another server's makes that server abort at its exit.)
        with _start_lock():
            before = python_envs()
            with open(self.log_path, "ab") as log:
                log.write(f"--- lightkv_export: tritonserver start {self._launches}\n".encode())
                log.flush()
                # Own session: a terminal's Ctrl-C reaches serve, which shuts the server down in order.
                self.process = subprocess.Popen(
                    child_command(cmd, private_shm=self.private_shm),
                    cwd=stub_site_dir(),
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            deadline = time.monotonic() + PYTHON_ENV_WAIT_S
            socket_path = Path(f"{self.grpc_socket}:{GRPC_PORT}")  # there once the backends are loaded
            while not (python_envs() - before) and self.process.poll() is None and time.monotonic() < deadline:
                if socket_path.exists():
                    break
                time.sleep(0.05)
            self.python_envs = python_envs() - before
            # Recorded for remove_stale: a serve killed with SIGKILL cannot remove it, the next start can.
            (self._workdir / PYTHON_ENVS_FILE).write_text("".join(f"{p}\n" for p in sorted(self.python_envs)))
        try:
            self._wait_ready()
        except ServeError:
            self._stop_triton()
            raise
        self.stubs = child_stubs(self.process.pid)
        self.shm_dir = server_shm_dir(self.process.pid)
        self._private_shm()

    def _private_shm(self) -> None:
        """Every region of this server 0600: the stub does it at its start (stub_bootstrap.py); this catches any
        region created after that, e.g. by a later version of the backend."""
        for segment in self.shm_segments():
            with contextlib.suppress(OSError):
                if segment.stat().st_mode & 0o777 != SHM_MODE:
                    segment.chmod(SHM_MODE)

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise ServeError(
                    f"tritonserver exited with code {code} while starting; log tail:\n{tail(self.log_path)}"
                )
            if Path(f"{self.grpc_socket}:{GRPC_PORT}").exists() and grpc_ready(self.grpc_target):
                return
            time.sleep(0.2)
        waited = f"{self.startup_timeout_s:.0f} s"
        raise ServeError(f"tritonserver not ready after {waited}; log tail:\n{tail(self.log_path)}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _stub_health(self) -> str | None:
        return self.health()

    def health(self, *, probe_http: bool = False, http_timeout_s: float = 5.0) -> str | None:
        """None while the server can answer, else why not: tritonserver exited, a model's backend stub died (the
        server itself keeps saying ready then), the front stopped, or (probe_http) tritonserver's readiness did not
        answer true."""
        process = self.process
        if process is None:
            return "tritonserver is not started"
        code = process.poll()
        if code is not None:
            return f"tritonserver exited with code {code}"
        for pid, instance in dict(self.stubs).items():
            st = proc_state(pid)
            if st is None or st.state in "ZX" or st.ppid != process.pid:
                return f"the Python backend stub of model instance {instance} (pid {pid}) {describe_death(st)}"
        if self.front is not None and not self.front.alive():
            return f"the HTTP front stopped ({self.front.error or 'no error recorded'})"
        if probe_http and not grpc_ready(self.grpc_target, timeout_s=http_timeout_s):
            return f"tritonserver's readiness did not answer true within {http_timeout_s:g} s"
        return None

    def shm_segments(self) -> list[Path]:
        """This server's shared-memory regions in /dev/shm (its prefix is unique per server)."""
        if not self.shm_prefix:
            return []
        return sorted(self.shm_dir.glob(f"{self.shm_prefix}*"))

    def _stop_triton(self, timeout_s: float = EXIT_TIMEOUT_S + 15.0) -> int | None:
        """SIGTERM, wait up to timeout_s, then SIGKILL tritonserver's process group; then remove what it leaves
        when it dies hard: its /dev/shm regions (a dead stub's too), its empty /tmp/python_env_* directory."""
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
        # The stubs are in the server's process group; one that outlived a killed server goes now (it would leave
        # on its own within a second, see stub_bootstrap.py, but nothing may be left behind when stop() returns).
        if any(proc_state(pid) is not None for pid in self.stubs):  # (the group id cannot be reused meanwhile)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        for pid in self.stubs:
            _wait_gone(pid, 5.0)
        for segment in self.shm_segments():  # none in a private /dev/shm: it went with the server's last process
            with contextlib.suppress(FileNotFoundError):
                segment.unlink()
        self.shm_dir = SHM_DIR
        for env_dir in self.python_envs:
            with contextlib.suppress(OSError):
                env_dir.rmdir()  # only when empty: never a directory with an environment in it
        self.python_envs = set()
        self.stubs = {}
        return proc.returncode

    def stop(self, timeout_s: float = EXIT_TIMEOUT_S + 15.0) -> int | None:
        """Stop the front (no new requests; open ones get up to 5 s), then tritonserver; returns its exit code."""
        if self.front is not None:
            self.front.stop()
            self.front = None
        return self._stop_triton(timeout_s)

    def restart(self) -> Server:
        """Replace tritonserver (the front keeps the port and the URL; it answers 503 meanwhile). A front that
        stopped is replaced too, on the same port."""
        if self.front is None or not self.front.alive():
            port, requested = self.port, self.requested_port
            self.requested_port = port or requested
            try:
                return self.start()
            finally:
                self.requested_port = requested
        self._stop_triton()
        self._start_triton()
        return self

    def close(self) -> None:
        """stop() and remove the working directory (assembled backends, socket and log)."""
        self.stop()
        self.process = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wait_gone(pid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = proc_state(pid)
        if st is None or st.state in "ZX":
            return
        time.sleep(0.05)


def bind_port(port: int | None) -> socket.socket:
    """The front's listening socket on 127.0.0.1; a port in use is a ServeError that says so."""
    try:
        return front_bind(port)
    except OSError as e:
        what = f"port {port}" if port else "a free port"
        hint = " (another server, perhaps an earlier serve, runs there)" if e.errno == errno.EADDRINUSE else ""
        raise ServeError(
            f"cannot listen on 127.0.0.1, {what}: {e.strerror}{hint}; stop it, or pick another --port (0 for a "
            "free one)"
        ) from None


MIN_REQUEST_BYTES = 1024  # below this not even a one-image request fits


def request_bytes(text: str) -> int:
    """--max-request-bytes: a number of bytes ('800000000') or a size with a unit ('800MB', '512MiB')."""
    from lightkv_export.accounting.units import parse_memory

    raw = str(text).strip()
    try:
        size = int(raw) if raw.isdigit() else parse_memory(raw) if raw[-1:].isalpha() else None
    except InputError:
        size = None
    if size is None:
        raise InputError(
            f"--max-request-bytes {text!r} is not a size: give bytes ('800000000') or a size with a unit ('800MB', "
            "'512MiB')"
        )
    if size < MIN_REQUEST_BYTES:
        raise InputError(
            f"--max-request-bytes must be at least {MIN_REQUEST_BYTES} bytes (a request with one small image is "
            f"larger), got {size}; leave it out for the limit derived from each model's limits"
        )
    return size


def front_limits(args: argparse.Namespace) -> FrontLimits:
    """The front's limits from serve's flags, each checked (an InputError says which flag and what it takes)."""
    if not 0 < args.request_timeout <= 3600:
        raise InputError(f"--request-timeout must be above 0 and at most 3600 seconds, got {args.request_timeout:g}")
    if args.max_connections < 1:
        raise InputError(f"--max-connections must be at least 1, got {args.max_connections}")
    max_bytes = None if args.max_request_bytes is None else request_bytes(args.max_request_bytes)
    return FrontLimits(
        max_body_bytes=max_bytes, request_timeout_s=args.request_timeout, max_connections=args.max_connections
    )


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
        if reason is not None and probe and "readiness" in reason:
            failures += 1  # a slow answer under load is not a death: only several in a row are
            if failures < HTTP_PROBE_FAILURES:
                reason = None
        elif probe:
            failures = 0
        if reason is not None:
            return reason
        time.sleep(poll_s)


def backoff_s(in_a_row: int) -> float:
    """The wait before the in_a_row-th restart in a row (1-based): 1, 2, 4, ... s, at most BACKOFF_MAX_S."""
    return min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** max(0, in_a_row - 1))


def serve_forever(
    server: Server,
    *,
    restarts: int = DEFAULT_RESTARTS,
    banner: tuple[str, ...] = (),
    healthy_reset_s: float = HEALTHY_RESET_S,
) -> int:
    """Print `banner`, then block until Ctrl-C / SIGTERM (then stop the front and the server: 0). When the server
    cannot answer any more (it exited, or a model's backend stub died), restart tritonserver after a backoff (1 s,
    2 s, 4 s, ... at most 30 s); the front keeps the URL meanwhile. `restarts` bounds the restarts *in a row*: a
    server that then stays healthy for `healthy_reset_s` has recovered and the count starts again, so deaths spread
    over time (an out-of-memory kill a day) never use up a budget. Past `restarts` in a row, or 0, exit 1 (a
    supervisor such as systemd or Kubernetes takes over). The banner is printed inside the interrupt handler: a
    client that reads the URL and at once sends Ctrl-C gets a clean stop, not "interrupted while starting"."""
    in_a_row = 0
    try:
        for line in banner:
            print(line, flush=True)
        up_since = time.monotonic()
        while True:
            reason = wait_unhealthy(server)
            if time.monotonic() - up_since >= healthy_reset_s:
                in_a_row = 0
            print(f"tritonserver cannot answer: {reason}; log tail:\n{tail(server.log_path)}", file=sys.stderr)
            while True:
                if in_a_row >= restarts:
                    print(
                        f"giving up after {in_a_row} restart(s) in a row (--restarts {restarts}); exit code 1",
                        file=sys.stderr,
                    )
                    server.stop()
                    return 1
                in_a_row += 1
                delay = backoff_s(in_a_row)
                print(
                    f"restarting tritonserver in {delay:g} s ({in_a_row} of at most {restarts} in a row) ...",
                    file=sys.stderr,
                    flush=True,
                )
                server._stop_triton()  # free the dead server's memory and /dev/shm before waiting
                time.sleep(delay)
                try:
                    server.restart()
                    break
                except ServeError as e:
                    print(f"error: the restart failed: {e}", file=sys.stderr)
            up_since = time.monotonic()
            print(f"url: {server.url}   (tritonserver pid {server.process.pid}; restarted)", flush=True)
    except KeyboardInterrupt:
        print("stopping tritonserver ...", flush=True)
        code = server.stop()
        print(f"stopped (exit code {code})", flush=True)
        if code not in (0, None):  # stopped all the same; the log says why it did not exit cleanly
            print(f"tritonserver's log tail:\n{tail(server.log_path)}", file=sys.stderr)
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
        help=f"restart tritonserver when it cannot answer (it or a backend stub died), with a backoff of 1, 2, 4 ... "
        f"30 s, at most N times in a row (a server healthy for {HEALTHY_RESET_S:g} s resets the count); then exit 1. "
        f"Default {DEFAULT_RESTARTS}; 0: exit 1 at the first death",
    )
    parser.add_argument(
        "--max-request-bytes",
        default=None,
        metavar="N",
        help="refuse (413) a generate request whose body is larger: bytes, or a size such as 800MB or 512MiB; at "
        f"least {MIN_REQUEST_BYTES}. Default: derived from each model's limits (max_images images of "
        "max_image_pixels pixels as base64 PNG, plus the longest prompt; ~730 MB for the default limits)",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=REQUEST_TIMEOUT_S,
        metavar="S",
        help=f"a whole request (headers and body) must arrive within S seconds, or its connection is closed (408); "
        f"this cuts off slow clients that would hold connections. Default {REQUEST_TIMEOUT_S:g}",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=MAX_CONNECTIONS,
        metavar="N",
        help=f"serve at most N open connections at once; a request on one more gets 503. Default {MAX_CONNECTIONS}",
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
        limits = front_limits(args)
        if port is not None:
            bind_port(port).close()  # a port in use is said at once, not after verifying and loading the engines
        verify_engines(args.target, full_hash=not args.no_verify_hash)
        repo, is_temp = resolve_repository(args.target, args.repo_dir)
        temp_repo = repo.parent if is_temp else None
        server = Server(repo, port=port, startup_timeout_s=args.startup_timeout, front_limits=limits)
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
