"""Files that run inside Triton Inference Server's Python backend.

* `model.py`: the model template `triton_repo.write_repository` copies into every model version directory.
* `codec.py`: request decoding and response encoding, pure Python (unit-tested without a server).
* `stub_bootstrap.py`: installed by `serve.py` as the backend's `triton_python_backend_utils.py`; it makes the
  launching virtualenv importable inside the backend's stub process, then runs the backend's own utilities.
"""
