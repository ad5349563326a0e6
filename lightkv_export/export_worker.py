"""The decode-graph export in a freshly started process (export.py starts it; not a user command).

    python -m lightkv_export.export_worker '{"model": ..., "key": ..., "path": ..., "parent": PID, ...}'

The worker loads the model itself from its source and checks that the export key (weights, config, settings,
toolchain) equals the parent's before it writes anything, so its graph is the one the parent would have written.
Exit codes: 0 written, 3 the model it loaded is not the parent's, 4 the parent is gone, 1 any other failure.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> bool:
    """Ask the kernel for SIGKILL when the parent dies (Linux), so an orphan never writes into a later build's
    files; False if the parent is already gone."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, 9)
    return os.getppid() == parent


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    if not die_with_parent(int(spec["parent"])):
        print("the exporting process is gone", file=sys.stderr)
        return 4
    import torch

    from lightkv_export.export import export_decode, export_key
    from lightkv_export.models.registry import load_model

    torch.set_num_threads(1)
    dtype = getattr(torch, spec["dtype"])
    loaded = load_model(spec["model"], random_weights=bool(spec["random_weights"]), dtype=dtype)
    key = export_key(loaded, dtype=dtype)
    if key != spec["key"]:
        print(f"loaded {spec['model']!r} with export key {key}, the parent has {spec['key']}", file=sys.stderr)
        return 3
    text, head = loaded.family.text_model(loaded.model), loaded.family.lm_head(loaded.model)
    export_decode(text, head, Path(spec["path"]), dtype=dtype, positions=loaded.family.positions)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
