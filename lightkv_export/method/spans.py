"""Where images sit in a language-model sequence: the one description that host preprocessing, the merge plan, the
manifest, the accounting, the Triton backend and the TensorRT profiles share (DESIGN.md section 7).

An image is an `ImageLayout`: its parts in token order, each a grid of vision tokens (a whole image, a tile, a
base view, a high-resolution map; each windowed on its own) or a run of tokens that never merge (separators,
newlines, a thumbnail's fence). In a request's token ids a grid is a run of the family's image placeholder token
and a fixed run is ordinary text, so the merge plan sees one `VisionSpan` per grid and nothing else. Pure Python:
the engine runtime and the Triton backend use this without PyTorch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lightkv_export.errors import InputError

Grid = tuple[int, int]  # (rows, columns) of LLM tokens, raster order
Part = Grid | int  # a grid, or n tokens that never merge


@dataclass(frozen=True)
class VisionSpan:
    """One grid's vision tokens inside a language-model sequence.

    start:  index of the first vision token in the sequence
    length: number of vision tokens (contiguous)
    grid:   (h, w) token grid as the LLM sees it (after the vision encoder's spatial merge),
            raster order, h * w >= length (a partial last row only for grids derived after a merge).
    """

    start: int
    length: int
    grid: Grid

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class ImageLayout:
    """One image's place in the token stream, in order: grids (h, w) of mergeable tokens and ints n, runs of n
    tokens that never merge. Qwen-VL: one grid; LLaVA-1.5: one 24 x 24 grid; InternVL: a grid per tile plus the
    thumbnail's, fenced by fixed tokens."""

    parts: tuple[Part, ...]

    def __post_init__(self) -> None:
        for part in self.parts:
            ok = (
                isinstance(part, int) and part >= 1
                if not isinstance(part, tuple)
                else len(part) == 2 and all(isinstance(x, int) and x >= 1 for x in part)
            )
            if not ok:
                raise ValueError(f"image layout part {part!r}: expected (rows, cols) >= 1 or a token count >= 1")
        if not self.grids:
            raise ValueError("an image layout needs at least one grid")

    @classmethod
    def single(cls, rows: int, cols: int) -> ImageLayout:
        return cls(((int(rows), int(cols)),))

    @property
    def grids(self) -> tuple[Grid, ...]:
        return tuple(p for p in self.parts if isinstance(p, tuple))

    @property
    def vision_tokens(self) -> int:
        """Tokens that may merge: every grid's h * w."""
        return sum(h * w for h, w in self.grids)

    @property
    def fixed_tokens(self) -> int:
        return sum(p for p in self.parts if not isinstance(p, tuple))

    @property
    def tokens(self) -> int:
        """Every token the image puts in the sequence."""
        return self.vision_tokens + self.fixed_tokens

    def to_json(self) -> list:
        return [list(p) if isinstance(p, tuple) else p for p in self.parts]

    @classmethod
    def from_json(cls, value: list) -> ImageLayout:
        return cls(tuple(tuple(int(x) for x in p) if isinstance(p, list) else int(p) for p in value))


def placeholder_runs(input_ids, token_id: int) -> list[list[tuple[int, int]]]:
    """Per row of input_ids [B, S] (numpy or torch), the (start, end) of each contiguous run of `token_id`."""
    import numpy as np

    runs = []
    for row in np.asarray(input_ids):  # [S]
        flags = np.concatenate([[0], (row == token_id).astype(np.int8), [0]])  # [S + 2]
        edges = np.diff(flags)  # +1 where a run starts, -1 one past where it ends
        runs.append(list(zip(np.flatnonzero(edges > 0).tolist(), np.flatnonzero(edges < 0).tolist(), strict=True)))
    return runs


def spans_on_grids(input_ids, token_id: int, grids: Sequence[Grid], hint: str) -> list[list[VisionSpan]]:
    """The placeholder runs of `input_ids` [B, S] cut into one VisionSpan per grid, grids taken in order across
    rows (a run may hold several adjacent grids: tiles with no separator between them). A run that the grids do
    not tile exactly, or more or fewer placeholders than the grids hold, is an InputError; `hint` names the
    family's likely cause."""
    spans: list[list[VisionSpan]] = []
    g = 0
    for row in placeholder_runs(input_ids, token_id):
        row_spans = []
        for start, end in row:
            at = start
            while at < end:
                if g >= len(grids):
                    raise InputError(f"more image placeholder tokens than the images' grids hold; {hint}")
                h, w = grids[g]
                if at + h * w > end:
                    raise InputError(
                        f"grid {g} ({h}x{w} = {h * w} tokens) does not fit its placeholder run of {end - start} "
                        f"tokens at {start}; {hint}"
                    )
                row_spans.append(VisionSpan(start=at, length=h * w, grid=(h, w)))
                at += h * w
                g += 1
        spans.append(row_spans)
    if g != len(grids):
        raise InputError(f"the images have {len(grids)} grids but the prompt holds placeholders for {g}; {hint}")
    return spans
