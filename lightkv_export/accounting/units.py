"""Units: bytes per element of the cache dtypes, and memory sizes as the command line writes them."""

from __future__ import annotations

import re
from pathlib import Path

from lightkv_export.errors import InputError

DTYPE_BYTES: dict[str, int] = {
    "fp32": 4,
    "float32": 4,
    "fp16": 2,
    "float16": 2,
    "bf16": 2,
    "bfloat16": 2,
    "fp8": 1,
    "int8": 1,
}
GB = 10**9
GIB = 2**30


def dtype_bytes(name: str) -> int:
    try:
        return DTYPE_BYTES[name.strip().lower()]
    except KeyError:
        raise InputError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPE_BYTES)}.") from None


_MEMORY = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(b|kb|kib|mb|mib|gb|gib|g|tb|tib)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "kib": 2**10, "mb": 10**6, "mib": 2**20, "gb": GB, "g": GB, "gib": GIB}
_UNITS |= {"tb": 10**12, "tib": 2**40}


def parse_memory(text: str) -> int:
    """'80GB' -> 80e9 bytes, '80GiB' -> 80 * 2^30; a bare number is GB."""
    m = _MEMORY.match(text)
    if not m:
        raise InputError(f"memory size {text!r} is not NUMBER[UNIT], e.g. '80GB', '79.6GiB' or '24000MiB'.")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "gb").lower()])


def byte_unit(largest: float) -> tuple[str, int]:
    """The binary unit (name, bytes) to show sizes up to `largest` bytes in: GiB, MiB, KiB or bytes."""
    for name, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if largest >= size:
            return name, size
    return "bytes", 1


def parse_budget(text: str, available: int | None = None) -> int:
    """A KV budget: a size ('512MiB', '2GB') or a percentage of the memory available to the engine ('40%': of
    MemAvailable for a CPU target, or of `available` when the caller knows better, e.g. a GPU's free memory)."""
    raw = str(text).strip()
    if raw.endswith("%"):
        try:
            share = float(raw[:-1]) / 100
        except ValueError:
            share = -1.0
        if not 0 < share <= 1:
            raise InputError(f"KV budget {text!r}: a percentage must be above 0% and at most 100%, e.g. '40%'.")
        if available is None:
            available = available_memory()
        return int(share * available)
    budget = parse_memory(raw)
    if budget <= 0:
        raise InputError(f"KV budget {text!r}: expected a positive size such as '512MiB' or a share such as '40%'.")
    return budget


def available_memory() -> int:
    """MemAvailable of /proc/meminfo, in bytes (what a CPU engine can still take without swapping)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise InputError("cannot read MemAvailable from /proc/meminfo: give the KV budget as a size, e.g. '512MiB'.")
