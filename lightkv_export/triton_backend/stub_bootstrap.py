"""Installed by serve.py as `<backends>/python/triton_python_backend_utils.py` (never imported from the package).

The Python backend's stub embeds CPython in isolated mode: PYTHONPATH and the virtualenv are ignored, so its
sys.path is only the base interpreter's plus the model and backend directories. The stub imports this module
before any model, which makes it the place to extend sys.path: the launching virtualenv's site directories go
first (their .pth files included, for the editable install), then the backend's own utilities run in this
module's namespace, unchanged, so the stub and model.py see exactly the attributes they expect.

numpy is the exception: the stub links a pybind11 without numpy-2 support (it reads numpy 1's struct layout and
gets zero strides under numpy 2), so serve.py starts the server with its working directory set to a folder that
holds numpy<2; that folder is sys.path[0] ('') and wins over every site directory.

Being the stub's first Python code, this is also where the stub protects itself (argv, from /proc/self/cmdline:
stub, model.py, shm region, 2 shm sizes, parent pid, ...):
- its shared-memory region (/dev/shm/<region>, created by tritonserver with mode 0644 whatever the umask: the
  backend's boost.interprocess sets the mode explicitly) becomes 0600, so no other local user can read the prompts
  and images that pass through it. This matters where serve could not give tritonserver a private /dev/shm (see
  serve.CHILD_EXEC: no unprivileged namespaces there); in a private one nobody else sees the region anyway;
- it leaves when tritonserver dies: the stub itself only notices after minutes, holding hundreds of MB. A thread
  checks every 0.5 s that its parent is still the tritonserver that started it and otherwise kills the stub.
  Not PR_SET_PDEATHSIG: that fires when the *thread* that forked the stub exits (a model-loading thread of
  tritonserver), which kills healthy stubs.
"""

import contextlib
import json
import os
import signal
import site
import sys
import threading
import time

_WATCH_S = 0.5


def _argv():
    try:
        with open("/proc/self/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0")]
    except OSError:
        return []


def _protect():
    argv = _argv()
    if len(argv) < 6 or not os.path.basename(argv[0]).startswith("triton_python_backend_stub"):
        return  # imported some other way (e.g. a test): nothing to protect
    region = argv[2].lstrip("/")
    if region and "/" not in region:
        with contextlib.suppress(OSError):  # serve.py checks the mode again once the server is ready
            os.chmod(os.path.join("/dev/shm", region), 0o600)
    try:
        parent = int(argv[5])
    except ValueError:
        parent = os.getppid()
    if os.getppid() != parent:  # tritonserver died before this line: leave at once
        os._exit(1)

    def watch():
        while True:
            time.sleep(_WATCH_S)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGKILL)  # nothing to save: the server that owned the requests is gone

    threading.Thread(target=watch, name="lightkv-parent-watch", daemon=True).start()


_protect()

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "lightkv_paths.json")) as _f:
    _paths = json.load(_f)

_before = list(sys.path)
for _dir in _paths["site_dirs"]:
    site.addsitedir(_dir)
_added = [p for p in sys.path if p not in _before]
sys.path[:] = [p for p in _before if p == ""] + _added + [p for p in _before if p != ""]  # cwd, venv, then base

with open(_paths["backend_utils"]) as _f:
    exec(compile(_f.read(), _paths["backend_utils"], "exec"), globals())
