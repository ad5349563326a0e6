"""This process's resident memory from /proc (Linux): now, and the peak since the last reset.

The build reports each stage's peak (pipeline.Progress) and the benchmarks measure with the same functions; where
/proc is missing or read-only (not Linux, a restricted container) they answer None and callers say so.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import threading


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int | None:
    """The high-water mark of resident memory since the process started or reset_peak_rss() last succeeded."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Set the high-water mark to the current resident size ("5" to clear_refs); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def return_free_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc `malloc_trim`; a no-op elsewhere). Tensors below glibc's
    mmap threshold (which grows to 32 MiB as large blocks are freed) live on the heap, and freeing them does not
    shrink the process: without this, a stage that follows one that freed gigabytes starts from that high mark."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
LARGE_BLOCK_BYTES = 1 << 20


def release_large_blocks(threshold: int = LARGE_BLOCK_BYTES) -> bool:
    """Make every block of `threshold` bytes or more its own mapping, returned to the OS when freed (glibc
    `mallopt(M_MMAP_THRESHOLD)`, which also stops the threshold from growing; False where there is no glibc).

    For a process serving requests: a request's large tensors (activations, attention scores, logits) would
    otherwise, once glibc has raised its threshold, come from the heap and stay resident after the request, so
    the process grows to its largest request's working set plus fragmentation. Small allocations are unaffected."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


class DroppedPages:
    """While open, keep dropping this process's resident pages of a read-only file mapping (MADV_DONTNEED, every
    `interval` s, from a thread; once more on exit). A clean page of a file mapping leaves only the page table:
    the next read faults it back from the page cache, so what the mapping holds is unchanged.

    For ONNX Runtime pre-packing weights it reads from the mapping: each weight is packed into memory of its own
    and its mapped original is not read again, but every page read while packing would stay resident until
    the mapping goes, and the process would peak at the weights twice over."""

    def __init__(self, mapping: mmap.mmap | None, interval: float = 0.005) -> None:
        self.mapping, self.interval = mapping, interval
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._drop_until_done, daemon=True)

    def _drop(self) -> None:
        if self.mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
            with contextlib.suppress(OSError, ValueError):
                self.mapping.madvise(mmap.MADV_DONTNEED)

    def _drop_until_done(self) -> None:
        while not self.done.wait(self.interval):
            self._drop()

    def __enter__(self) -> DroppedPages:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self._drop()
