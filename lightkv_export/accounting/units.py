"""Units: bytes per element of the cache dtypes, and memory sizes as the command line writes them."""

from __future__ import annotations

import re

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
