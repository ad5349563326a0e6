"""The merge schedule: after which decoder layers to merge, with how many windows, and how much.

A stage `layer:windows:ratio` merges after the first `layer` decoder layers (1-based: layers 1..layer see the
full sequence, layer+1.. the shorter one), with `windows` x `windows` windows per image, merging away
`ratio` of each window (each stage removes at most half).

`--ratio R` is the fraction of vision-token KV entries kept, averaged over all L decoder layers (the paper's
Eq. 9):  R = (1 / L) * sum_l prod_{k : layer_k < l} (1 - ratio_k).
With this reading the paper's schedules give LLaVA-1.5-7B (32 layers, 12-18-24, 0.5 each) 0.547, the
paper's "55% of vision tokens".

R = 0 and R = 1 both mean "no compression": the identity schedule keeps the stages (so the whole LightKV path
still runs and can be checked) with ratio 0.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from lightkv_export.errors import InputError

TOLERANCE = 0.01  # the solver's retention must land within this of the requested ratio
PAPER_RATIO = 0.5
PAPER_GAP = 0.18  # the paper's stage spacing as a fraction of depth: 5 of 28 (Qwen2.5-VL), 6 of 32 (LLaVA)
RATIO_GRID = tuple(round(0.5 - 0.05 * i, 2) for i in range(10))  # 0.5, 0.45, ..., 0.05
NOMINAL_RATIO = 0.55  # where the identity schedule puts its (ratio-0) stages
MAX_STAGE_RATIO = 0.5  # r = min(floor(ratio * n), n // 2): a stage merges at most half of each window


@dataclass(frozen=True)
class Stage:
    layer: int
    windows: int
    ratio: float

    def __str__(self) -> str:
        return f"{self.layer}:{self.windows}:{self.ratio:g}"


@dataclass(frozen=True)
class Schedule:
    num_layers: int
    stages: tuple[Stage, ...]
    requested: float | None = None  # the --ratio this was solved for, if any

    def __str__(self) -> str:
        return ",".join(str(s) for s in self.stages)

    @property
    def is_identity(self) -> bool:
        return all(s.ratio == 0 for s in self.stages)

    def kept_per_layer(self) -> list[float]:
        """Nominal fraction of vision tokens each decoder layer sees (and caches), layers 1..L."""
        return [self.kept_before(layer) for layer in range(1, self.num_layers + 1)]

    def kept_before(self, layer: int) -> float:
        frac = 1.0
        for s in self.stages:
            if s.layer < layer:
                frac *= 1.0 - min(s.ratio, MAX_STAGE_RATIO)
        return frac

    def capped_stages(self) -> tuple[Stage, ...]:
        """Stages that ask for more than a stage can merge: they merge MAX_STAGE_RATIO, not their ratio."""
        return tuple(s for s in self.stages if s.ratio > MAX_STAGE_RATIO)

    @property
    def retention(self) -> float:
        """Eq. 9: vision-token KV kept, averaged over layers."""
        return sum(self.kept_per_layer()) / self.num_layers

    def describe(self) -> str:
        groups = ", ".join(f"layers {a}-{b}: {self.kept_before(a):.3g}" for a, b in self.layer_groups())
        return f"{self} (retention {self.retention:.3f}; vision tokens kept per layer group: {groups})"

    def layer_groups(self) -> list[tuple[int, int]]:
        """1-based inclusive layer ranges that share one sequence length."""
        bounds = [0, *[s.layer for s in self.stages], self.num_layers]
        return [(a + 1, b) for a, b in itertools.pairwise(bounds) if b > a]


def validate(schedule: Schedule, first_layer: int = 1, why: str = "") -> Schedule:
    """Layers strictly increasing inside [first_layer, L-1], windows >= 1, ratios in [0, 1). `first_layer` > 1 where
    the model adds to the vision positions after early layers (Qwen3-VL's DeepStack), which a merge before the last
    addition would have to compact too; `why` says so in the error."""
    last = 0
    for s in schedule.stages:
        if s.layer < first_layer:
            raise InputError(
                f"stage {s}: this model's merges can start after decoder layer {first_layer} at the earliest"
                f"{f' ({why})' if why else ''}; move the stage to layer {first_layer} or later."
            )
        if not (last < s.layer < schedule.num_layers):
            raise InputError(
                f"stage {s}: merge layers must increase and lie in 1..{schedule.num_layers - 1} "
                f"(the model has {schedule.num_layers} decoder layers; a stage after the last one would save nothing)."
            )
        if s.windows < 1:
            raise InputError(f"stage {s}: windows per side must be >= 1.")
        if not 0.0 <= s.ratio < 1.0:
            raise InputError(f"stage {s}: ratio must be in [0, 1) (the fraction of each window merged away).")
        last = s.layer
    return schedule


def parse_schedule(text: str, num_layers: int, first_layer: int = 1, why: str = "") -> Schedule:
    """'12:4:0.5,18:2:0.5,24:1:0.5' -> Schedule."""
    stages = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        fields = part.split(":")
        try:
            if len(fields) != 3:
                raise ValueError
            stages.append(Stage(int(fields[0]), int(fields[1]), float(fields[2])))
        except ValueError:
            raise InputError(
                f"schedule stage {part!r} is not LAYER:WINDOWS:RATIO (for example '12:4:0.5,18:2:0.5,24:1:0.5')."
            ) from None
    if not stages:
        raise InputError(f"schedule {text!r} has no stages; expected e.g. '12:4:0.5,18:2:0.5,24:1:0.5'.")
    return validate(Schedule(num_layers, tuple(stages)), first_layer, why)


def retention_of(num_layers: int, layers: Sequence[int], ratio: float) -> float:
    """Eq. 9 in closed form for stages that share one ratio."""
    keep, frac, prev = 0.0, 1.0, 0
    for layer in (*layers, num_layers):
        keep += frac * (layer - prev)
        frac *= 1.0 - min(ratio, MAX_STAGE_RATIO)
        prev = layer
    return keep / num_layers


def candidates(
    num_layers: int, windows: Sequence[int], first_layer: int = 1
) -> Iterator[tuple[tuple[int, ...], float, float]]:
    """(merge layers, ratio, retention) for the first k window sizes, every layer placement from `first_layer` on
    and every grid ratio."""
    for k in range(len(windows), 0, -1):
        for layers in itertools.combinations(range(first_layer, num_layers), k):
            for ratio in RATIO_GRID:
                yield layers, ratio, retention_of(num_layers, layers, ratio)


def reachable_range(num_layers: int, windows: Sequence[int], first_layer: int = 1) -> tuple[float, float]:
    """Lowest: every stage as early as possible at 0.5; highest: one late stage at the smallest ratio."""
    k = min(len(windows), num_layers - first_layer)
    lowest = retention_of(num_layers, range(first_layer, first_layer + k), PAPER_RATIO)
    return lowest, retention_of(num_layers, [num_layers - 1], min(RATIO_GRID))


def solve(num_layers: int, ratio: float, windows: Sequence[int], first_layer: int = 1, why: str = "") -> Schedule:
    """Turn (depth, R) into a schedule whose Eq. 9 retention is within 0.01 of R, every stage at `first_layer` or
    later (`validate`).

    Preference among the schedules that reach R: all stages used, the paper's 0.5 per stage, stage spacing
    closest to the paper's (about 0.18 of the depth), then the smallest error.
    """
    if num_layers < 2:
        raise InputError(f"a model with {num_layers} decoder layer(s) has no room for a merge stage.")
    if not 1 <= first_layer < num_layers:
        raise InputError(
            f"no merge stage fits: merges may start after decoder layer {first_layer}"
            f"{f' ({why})' if why else ''} and the model has {num_layers} layers."
        )
    if not windows or any(w < 1 for w in windows):
        raise InputError(f"windows per stage must be positive integers, got {tuple(windows)}.")
    if ratio in (0.0, 1.0):
        nominal = clamp_to_reachable(num_layers, NOMINAL_RATIO, windows, first_layer)
        base = solve(num_layers, nominal, windows, first_layer, why)
        return Schedule(num_layers, tuple(Stage(s.layer, s.windows, 0.0) for s in base.stages), ratio)
    lo, hi = reachable_range(num_layers, windows, first_layer)
    if not 0.0 < ratio < 1.0 or ratio < lo - TOLERANCE or ratio > hi + TOLERANCE:
        later = f" with merges from layer {first_layer} on ({why})" if first_layer > 1 else ""
        raise InputError(
            f"ratio {ratio} cannot be reached with {num_layers} decoder layers{later}: each stage removes at most "
            f"half of the vision tokens, so the reachable range is {lo:.3f} to {hi:.3f} (0 or 1 for no "
            "compression). Pick a ratio in that range, or give an explicit --schedule."
        )
    gap_target = max(1, round(PAPER_GAP * num_layers))

    def preference(cand: tuple[tuple[int, ...], float, float]) -> tuple:
        layers, rho, ret = cand
        spread = max((abs(b - a - gap_target) for a, b in itertools.pairwise(layers)), default=0)
        return (-len(layers), abs(rho - PAPER_RATIO), spread, abs(ret - ratio))

    feasible = [c for c in candidates(num_layers, windows, first_layer) if abs(c[2] - ratio) <= TOLERANCE]
    if not feasible:
        raise InputError(
            f"no schedule with one ratio per stage reaches {ratio} within {TOLERANCE} on {num_layers} layers; "
            "give an explicit --schedule LAYER:WINDOWS:RATIO,..."
        )
    layers, rho, _ = min(feasible, key=preference)
    return Schedule(num_layers, tuple(Stage(n, w, rho) for n, w in zip(layers, windows, strict=False)), ratio)


def clamp_to_reachable(num_layers: int, ratio: float, windows: Sequence[int], first_layer: int = 1) -> float:
    lo, hi = reachable_range(num_layers, windows, first_layer)
    return min(max(ratio, lo), hi)


def resolve(
    num_layers: int,
    *,
    ratio: float | None,
    schedule: str | None,
    windows: Sequence[int],
    first_layer: int = 1,
    why: str = "",
) -> Schedule:
    """The CLI's entry: exactly one of --ratio and --schedule. `first_layer` / `why`: the family's earliest merge
    (Family.first_merge_layer)."""
    if (ratio is None) == (schedule is None):
        raise InputError("give exactly one of --ratio R (fraction of vision-token KV kept) or --schedule L:W:R,...")
    if schedule is not None:
        return parse_schedule(schedule, num_layers, first_layer, why)
    return solve(num_layers, float(ratio), windows, first_layer, why)
