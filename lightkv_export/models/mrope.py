"""Qwen-VL M-RoPE position ids on the host (numpy), for runtimes that have no PyTorch model.

The same rule as transformers' `get_rope_index` for images (tested against it): text tokens advance all three
sections together; an image of (h, w) LLM tokens at running position p gets (p, p + row, p + col), and the text
after it continues at p + max(h, w).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lightkv_export.models.base import VisionSpan


def mrope_positions(seq_len: int, spans: Sequence[VisionSpan]) -> tuple[np.ndarray, int]:
    """(position_ids [3, S] int64, rope_delta) for one unpadded row; decode step t sits at S + delta + t."""
    pos = np.zeros((3, seq_len), dtype=np.int64)
    cur, s = 0, 0
    for span in (*spans, VisionSpan(seq_len, 0, (1, 1))):  # a zero-length sentinel closes the trailing text
        n_text = span.start - s
        pos[:, s : span.start] = cur + np.arange(n_text)  # [3, n_text]
        cur += n_text
        if span.length:
            h, w = span.grid
            offsets = np.arange(span.length)
            pos[0, span.start : span.end] = cur
            pos[1, span.start : span.end] = cur + offsets // w
            pos[2, span.start : span.end] = cur + offsets % w
            cur += max(h, w)
        s = span.end
    return pos, int(pos.max()) + 1 - seq_len
