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
InlineGrid = tuple[int, int, int]  # (rows, columns, n): a grid whose every row ends in n tokens that never merge
GridPart = Grid | InlineGrid
Part = GridPart | int  # a grid, or n tokens that never merge


def grid_of(part: GridPart) -> Grid:
    """The mergeable (rows, columns) of a grid part."""
    return (part[0], part[1])


def trailing_of(part: GridPart) -> int:
    """Never-merge tokens at the end of each row of a grid part (0 for a plain grid)."""
    return part[2] if len(part) == 3 else 0


@dataclass(frozen=True)
class VisionSpan:
    """One grid's vision tokens inside a language-model sequence.

    start:    index of the first vision token in the sequence
    length:   number of vision tokens, the ones that may merge
    grid:     (h, w) token grid as the LLM sees it (after the vision encoder's spatial merge),
              raster order, h * w >= length (a partial last row only for grids derived after a merge).
    trailing: tokens that never merge after each of the h rows, inside the span (LLaVA-NeXT's newline): the span
              then covers h * (w + trailing) positions, a full grid. 0 (every family today): contiguous vision
              tokens, start..end.
    """

    start: int
    length: int
    grid: Grid
    trailing: int = 0

    @property
    def extent(self) -> int:
        """Sequence positions the span covers: its vision tokens and its inline fixed tokens."""
        return self.length + self.grid[0] * self.trailing

    @property
    def end(self) -> int:
        return self.start + self.extent

    def vision_positions(self):
        """[length] int64 sequence positions of the vision tokens, raster order (numpy)."""
        import numpy as np

        if not self.trailing:
            return np.arange(self.start, self.end, dtype=np.int64)
        h, w = self.grid
        rows = self.start + np.arange(h, dtype=np.int64)[:, None] * (w + self.trailing)  # [h, 1]
        return (rows + np.arange(w, dtype=np.int64)).reshape(-1)  # [h * w]

    def inline_positions(self):
        """[h * trailing] int64 sequence positions of the inline fixed tokens, in order (numpy)."""
        import numpy as np

        h, w = self.grid
        rows = self.start + np.arange(h, dtype=np.int64)[:, None] * (w + self.trailing) + w  # [h, 1]
        return (rows + np.arange(self.trailing, dtype=np.int64)).reshape(-1)  # [h * trailing]


@dataclass(frozen=True)
class ImageLayout:
    """One image's place in the token stream, in order: grids (h, w) of mergeable tokens, grids (h, w, n) whose
    rows each end in n tokens that never merge, and ints n, runs of n tokens that never merge. Qwen-VL: one grid;
    LLaVA-1.5: one 24 x 24 grid; InternVL: a grid per tile plus the thumbnail's, fenced by fixed tokens;
    LLaVA-NeXT: the base view's grid, then the high-resolution map (h, w, 1) with its newline after every row."""

    parts: tuple[Part, ...]

    def __post_init__(self) -> None:
        for part in self.parts:
            ok = (
                isinstance(part, int) and part >= 1
                if not isinstance(part, tuple)
                else len(part) in (2, 3) and all(isinstance(x, int) and x >= 1 for x in part)
            )
            if not ok:
                raise ValueError(
                    f"image layout part {part!r}: expected (rows, cols) >= 1, (rows, cols, per-row fixed tokens) "
                    ">= 1 or a token count >= 1"
                )
        if not self.grids:
            raise ValueError("an image layout needs at least one grid")

    @classmethod
    def single(cls, rows: int, cols: int) -> ImageLayout:
        return cls(((int(rows), int(cols)),))

    @property
    def grid_parts(self) -> tuple[GridPart, ...]:
        """The grids as the placeholders hold them, inline fixed tokens included (for spans_on_grids)."""
        return tuple(p for p in self.parts if isinstance(p, tuple))

    @property
    def grids(self) -> tuple[Grid, ...]:
        """The mergeable (h, w) of every grid."""
        return tuple(grid_of(p) for p in self.grid_parts)

    @property
    def vision_tokens(self) -> int:
        """Tokens that may merge: every grid's h * w."""
        return sum(h * w for h, w in self.grids)

    @property
    def fixed_tokens(self) -> int:
        """Tokens that never merge: the runs between grids and every grid's inline h * n."""
        runs = sum(p for p in self.parts if not isinstance(p, tuple))
        return runs + sum(p[0] * trailing_of(p) for p in self.grid_parts)

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


def spans_on_grids(input_ids, token_id: int, grids: Sequence[GridPart], hint: str) -> list[list[VisionSpan]]:
    """The placeholder runs of `input_ids` [B, S] cut into one VisionSpan per grid, grids taken in order across
    rows (a run may hold several adjacent grids: tiles with no separator between them). A grid (h, w, n) takes
    h * (w + n) placeholders (its inline fixed tokens are placeholders too, as LLaVA-NeXT's newlines are). A run
    that the grids do not tile exactly, or more or fewer placeholders than the grids hold, is an InputError; `hint`
    names the family's likely cause."""
    spans: list[list[VisionSpan]] = []
    g = 0
    for row in placeholder_runs(input_ids, token_id):
        row_spans = []
        for start, end in row:
            at = start
            while at < end:
                if g >= len(grids):
                    raise InputError(f"more image placeholder tokens than the images' grids hold; {hint}")
                (h, w), n = grid_of(grids[g]), trailing_of(grids[g])
                span = VisionSpan(start=at, length=h * w, grid=(h, w), trailing=n)
                if span.end > end:
                    raise InputError(
                        f"grid {g} ({h}x{w}{f' + {n} per row' if n else ''} = {span.extent} tokens) does not fit "
                        f"its placeholder run of {end - start} tokens at {start}; {hint}"
                    )
                row_spans.append(span)
                at = span.end
                g += 1
        spans.append(row_spans)
    if g != len(grids):
        raise InputError(f"the images have {len(grids)} grids but the prompt holds placeholders for {g}; {hint}")
    return spans
