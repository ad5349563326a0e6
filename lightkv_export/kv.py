"""The KV cache's size, defined once: bytes of K plus V from the per-layer cache shapes [B, Hkv, S_l, d].

The build's reference request (pipeline), the runtime's per-request statistics, the report's accounting and the
planner all count through here; the PyTorch runtime measures its real tensors instead (torch_runtime.kv_bytes),
and parity checks the two agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from lightkv_export.errors import InputError


def kv_shapes(lengths: Sequence[int], kv_heads: int, head_dim: int, batch: int = 1) -> list[tuple[int, ...]]:
    """[B, Hkv, S_l, d] per layer for caches of `lengths` tokens."""
    return [(batch, kv_heads, int(n), head_dim) for n in lengths]


def kv_bytes_per_layer(shapes: Sequence[tuple[int, ...]], dtype_bytes: int) -> list[int]:
    """Bytes of K plus V per layer, from one [B, Hkv, S_l, d] shape per layer (K and V share it)."""
    out = []
    for i, shape in enumerate(shapes):
        if len(shape) != 4 or any(int(n) < 0 for n in shape):
            raise InputError(f"layer {i}: KV shape {tuple(shape)} is not [B, Hkv, S, d] with sizes >= 0.")
        out.append(2 * math.prod(int(n) for n in shape) * dtype_bytes)
    return out


def kv_bytes(lengths: Sequence[int], kv_heads: int, head_dim: int, dtype_bytes: int) -> list[int]:
    """Bytes of K plus V per layer for one request whose layers cache `lengths` tokens."""
    return kv_bytes_per_layer(kv_shapes(lengths, kv_heads, head_dim), dtype_bytes)
