"""Installed by serve.py as `<backends>/python/triton_python_backend_utils.py` (never imported from the package).

The Python backend's stub embeds CPython in isolated mode: PYTHONPATH and the virtualenv are ignored, so its
sys.path is only the base interpreter's plus the model and backend directories. The stub imports this module
before any model, which makes it the place to extend sys.path: the launching virtualenv's site directories go
first (their .pth files included, for the editable install), then the backend's own utilities run in this
module's namespace, unchanged, so the stub and model.py see exactly the attributes they expect.

numpy is the exception: the stub links a pybind11 without numpy-2 support (it reads numpy 1's struct layout and
gets zero strides under numpy 2), so serve.py starts the server with its working directory set to a folder that
holds numpy<2; that folder is sys.path[0] ('') and wins over every site directory.
"""

import json
import os
import site
import sys

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "lightkv_paths.json")) as _f:
    _paths = json.load(_f)

_before = list(sys.path)
for _dir in _paths["site_dirs"]:
    site.addsitedir(_dir)
_added = [p for p in sys.path if p not in _before]
sys.path[:] = [p for p in _before if p == ""] + _added + [p for p in _before if p != ""]  # cwd, venv, then base

with open(_paths["backend_utils"]) as _f:
    exec(compile(_f.read(), _paths["backend_utils"], "exec"), globals())
