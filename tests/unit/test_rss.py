"""Resident-memory helpers (lightkv_export/rss.py): what the serving runtime relies on to return to its baseline."""

from __future__ import annotations

import subprocess
import sys

import pytest

# A fresh process: glibc's mmap threshold is process state, and this one's heap has the whole suite's history.
CHILD = """
import numpy as np
from lightkv_export import rss
fixed = {fixed}
if fixed:
    assert rss.release_large_blocks()
np.ones(5 << 20, dtype=np.float32)  # a freed 20 MiB block raises glibc's own threshold past 16 MiB
base = rss.rss_bytes()
blocks, kept = [], []
for _ in range(8):  # a request: large tensors, and small objects that outlive it between them on the heap
    blocks.append(np.ones(4 << 20, dtype=np.float32))  # [4 Mi] 16 MiB, touched
    kept.append(np.ones(64, dtype=np.float32))
del blocks
print((rss.rss_bytes() - base) >> 20)
"""


def _retained_mib(fixed: bool) -> int:
    done = subprocess.run(
        [sys.executable, "-c", CHILD.format(fixed=fixed)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.strip().splitlines()[-1])


def test_large_blocks_go_back_to_the_os_once_freed():
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt and /proc are Linux's")
    assert _retained_mib(fixed=False) >= 16  # glibc's default: the freed blocks stay resident between the kept ones
    assert _retained_mib(fixed=True) < 8  # each block was its own mapping: the process is back at its baseline
