"""Positional schemes: how a family's decoder numbers its tokens, and what a merge does to the numbers.

Every scheme has position ids of shape [*lead, B, S]: `lead` is () for 1-D RoPE ([B, S], Llama / LLaVA) and (3,)
for Qwen-VL's M-RoPE ([3, B, S]: temporal, height, width). The rest of the package never names a scheme; it asks
the family's `positions` object for

* host ids and the decode offset of one prompt (`host`), a padded batch of them (`batch`), and the decode feed;
* the export's example and dynamic axis (`example`, `seq_axis`) and the TensorRT profile shape (`shape`);
* what a merge does to them, in PyTorch (`after_merge`) and in the ONNX graph (`after_merge_onnx`):
  `preserve` gathers each survivor's original ids with `kept`; `official` renumbers 0..S'-1 (the released code).

Decode step t of a row sits at S_row + delta + t on every lead row (text tokens advance all sections together).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from lightkv_export.method.spans import VisionSpan

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Positions:
    """A positional scheme: position ids [*lead, B, S] int64."""

    name: str
    lead: tuple[int, ...]

    @property
    def seq_axis(self) -> int:
        """The sequence axis of the [*lead, B, S] ids (the batch axis is the one before)."""
        return len(self.lead) + 1

    def shape(self, batch: int, seq: int) -> tuple[int, ...]:
        return (*self.lead, batch, seq)

    def host(self, seq_len: int, spans: Sequence[VisionSpan]) -> tuple[np.ndarray, int]:
        """(position ids [*lead, S] int64, decode offset delta) for one unpadded row."""
        raise NotImplementedError

    def batch(self, rows: Sequence[np.ndarray], seq: int) -> np.ndarray:
        """Right-pad rows of ids [*lead, S_b] into [*lead, B, seq] (padding at 0: causal prefill never reads it)."""
        out = np.zeros(self.shape(len(rows), seq), dtype=np.int64)
        for b, row in enumerate(rows):
            out[..., b, : row.shape[-1]] = row
        return out

    def decode(self, start: np.ndarray) -> np.ndarray:
        """The decode graph's position_ids [*lead, B, 1] for rows at positions start [B]."""
        pos = np.asarray(start, dtype=np.int64).reshape(-1, 1)  # [B, 1]
        return np.ascontiguousarray(np.broadcast_to(pos, self.shape(len(pos), 1)))

    def decode_torch(self, start: torch.Tensor) -> torch.Tensor:
        """decode() for the PyTorch runtime: start [B] -> [*lead, B, 1]."""
        return start.long().view(-1, 1).expand(*self.shape(start.numel(), 1))

    def example(self, batch: int, seq: int) -> torch.Tensor:
        """Ids for an export example: 0..seq-1 on every row, [*lead, batch, seq]."""
        import torch  # here, not at import: the runtime uses the host side without PyTorch

        return torch.arange(seq).expand(*self.shape(batch, seq)).contiguous()

    def after_merge(self, pos: torch.Tensor, kept: torch.Tensor, mode: str) -> torch.Tensor:
        """pos [*lead, B, S] -> [*lead, B, S'] for the survivors kept [B, S'] (-1 = padding, reads position 0)."""
        if mode == "preserve":
            index = kept.clamp(min=0).expand(*self.shape(*kept.shape))  # [*lead, B, S']
            return pos.gather(self.seq_axis, index.to(pos.device))
        width = kept.shape[1]
        import torch

        return torch.arange(width, device=pos.device).expand(*self.shape(kept.shape[0], width))

    def after_merge_onnx(self, b: Any, pos: Any, kept: Any, mode: str) -> Any:
        """after_merge in the graph, with the pass's node builder `b` (ops: b.op, b.ints)."""
        target = b.op("Shape", [kept])  # [B, S']
        if self.lead:
            target = b.op("Concat", [b.ints(list(self.lead)), target], {"axis": 0})  # [*lead, B, S']
        if mode == "preserve":
            source = b.op("Max", [kept, b.op("Constant", [], {"value_int": 0})])  # padding (-1) reads position 0
            index = source
            if self.lead:
                index = b.op("Unsqueeze", [source, b.ints(list(range(len(self.lead))))])
            index = b.op("Expand", [index, target])  # [*lead, B, S']
            return b.op("GatherElements", [pos, index], {"axis": self.seq_axis})
        width = b.op("Shape", [kept], {"start": 1, "end": 2})
        zero, one = b.op("Constant", [], {"value_int": 0}), b.op("Constant", [], {"value_int": 1})
        reset = b.op("Range", [zero, b.op("Squeeze", [width]), one])  # [S']
        return b.op("Expand", [reset, target])  # [*lead, B, S']


@dataclass(frozen=True)
class Rope1D(Positions):
    """1-D RoPE (Llama, LLaVA): token s at position s; images take one position per token."""

    name: str = "rope1d"
    lead: tuple[int, ...] = ()

    def host(self, seq_len: int, spans: Sequence[VisionSpan]) -> tuple[np.ndarray, int]:
        return np.arange(seq_len, dtype=np.int64), 0


@dataclass(frozen=True)
class MRope(Positions):
    """Qwen-VL M-RoPE: text advances (t, h, w) together; an image of (h, w) LLM tokens at running position p gets
    (p, p + row, p + col), and the text after it continues at p + max(h, w) (transformers' `get_rope_index` for
    images; tested against it)."""

    name: str = "mrope"
    lead: tuple[int, ...] = (3,)

    def host(self, seq_len: int, spans: Sequence[VisionSpan]) -> tuple[np.ndarray, int]:
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


ROPE_1D = Rope1D()
MROPE = MRope()
SCHEMES: dict[str, Positions] = {p.name: p for p in (ROPE_1D, MROPE)}  # by the name graphs and manifests record
