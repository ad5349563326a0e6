"""One LightKV stage (guidance + merge) at Qwen2.5-VL-7B size on CPU, against the released code's way.

Both variants run the same reference merge; they differ in how guidance is computed:
* lightkv_export: the S x T product of vision-and-text queries with text keys, softmax over queries
  (`method/guidance.py`), never an S x S matrix;
* baseline (released code): the full [B, H, S, S] attention logits, softmax over the query axis, then
  the vision rows and text columns are picked out.

Timings are medians over interleaved runs in one process. Peak memory is measured per variant in a fresh
process (benchmarks/__main__.py: `peak_rss_mib`): the resident memory one call adds at its peak, after a
warm-up call and a reset of the high-water mark. For scale: the baseline's [1, 28, S, S] fp32 logits alone are
28 * 1356^2 * 4 B = 196 MiB at full size, and the softmax makes a second tensor of that size.

Run through the entry point: `python -m benchmarks --only reference_op [--quick]`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lightkv_export.method.guidance import text_guidance
from lightkv_export.method.reference import lightkv_merge
from lightkv_export.method.spans import VisionSpan

NAME = "reference_op"
VARIANTS = ("lightkv_export", "baseline_full_matrix")
# Qwen2.5-VL-7B: hidden 3584, 28 query heads, 4 KV heads, head_dim 128; a 1008 x 1008 image is 36 x 36 tokens.
SIZE = {"hidden": 3584, "heads": 28, "kv_heads": 4, "head_dim": 128, "grid": (36, 36), "prefix": 20, "suffix": 40}
QUICK_GRID = (12, 12)  # --quick: same dimensions, 144 vision tokens
STAGE = {"windows": 6, "ratio": 0.5}
THREADS = 2


def make_inputs(grid: tuple[int, int] = SIZE["grid"], seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    n_vis = h * w
    seq = SIZE["prefix"] + n_vis + SIZE["suffix"]
    vision = torch.zeros(1, seq, dtype=torch.bool)  # [1, S]
    vision[0, SIZE["prefix"] : SIZE["prefix"] + n_vis] = True
    return {
        "hidden": torch.randn(1, seq, SIZE["hidden"], generator=g),  # [1, S, D]
        "query": torch.randn(1, SIZE["heads"], seq, SIZE["head_dim"], generator=g),  # [1, Hq, S, d]
        "key": torch.randn(1, SIZE["kv_heads"], seq, SIZE["head_dim"], generator=g),  # [1, Hkv, S, d]
        "vision": vision,
        "spans": [[VisionSpan(SIZE["prefix"], n_vis, (h, w))]],
    }


def full_matrix_guidance(query: torch.Tensor, key: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
    """The released code's guidance: full S x S logits, softmax over queries, vision rows x text columns."""
    k = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # [1, Hq, S, d]
    logits = query @ k.transpose(-1, -2) * query.shape[-1] ** -0.5  # [1, Hq, S, S]
    probs = logits.softmax(dim=2)  # [1, Hq, S, S]
    text_cols = (~vision).nonzero()[:, 1]
    return probs[..., text_cols].sum(dim=(1, 3))  # [1, S]


def stage(variant: str, x: dict) -> torch.Tensor:
    if variant == "lightkv_export":
        xi = text_guidance(x["query"], x["key"], x["vision"])  # [1, S]
    elif variant == "baseline_full_matrix":
        xi = full_matrix_guidance(x["query"], x["key"], x["vision"])  # [1, S]
    else:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    return lightkv_merge(x["hidden"], xi, x["spans"], **STAGE).hidden  # [1, S', D]


def prepared(variant: str, quick: bool = False) -> Callable[[], torch.Tensor]:
    """Factory for `peak_rss_mib`: inputs allocated now, the returned call runs one stage."""
    torch.set_num_threads(THREADS)
    x = make_inputs(QUICK_GRID if quick else SIZE["grid"])
    return lambda: stage(variant, x)


def run(quick: bool = False) -> dict:
    from benchmarks.__main__ import median_ms, peak_rss_mib

    torch.set_num_threads(THREADS)
    grid = QUICK_GRID if quick else SIZE["grid"]
    repeats = 1 if quick else 7
    x = make_inputs(grid)
    out = {v: stage(v, x) for v in VARIANTS}  # warm-up, and the two must agree
    torch.testing.assert_close(out[VARIANTS[0]], out[VARIANTS[1]], rtol=1e-4, atol=1e-4)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(repeats):  # interleaved, so drift hits both variants alike
        for v in VARIANTS:
            times[v].append(median_ms(lambda v=v: stage(v, x), 1))
    med = {v: sorted(ts)[len(ts) // 2] for v, ts in times.items()}
    mem = {v: peak_rss_mib(__name__, "prepared", v, quick) for v in VARIANTS}
    peak = {v: m["peak_mib"] for v, m in mem.items()}
    seq = x["hidden"].shape[1]
    s_by_s_mib = SIZE["heads"] * seq * seq * 4 / 2**20
    if not quick and peak["baseline_full_matrix"] < s_by_s_mib:  # the logits alone are this big: a broken probe
        raise AssertionError(
            f"baseline peak {peak['baseline_full_matrix']:.1f} MiB < its S x S logits {s_by_s_mib:.1f}"
        )
    return {
        "title": f"one LightKV stage at Qwen2.5-VL-7B size (S={seq}, {grid[0]}x{grid[1]} vision tokens, "
        f"D={SIZE['hidden']}, {THREADS} threads): S x T guidance vs the released full S x S matrix",
        "ratios": {
            "speed-up": med["baseline_full_matrix"] / med["lightkv_export"],
            "peak memory": peak["baseline_full_matrix"] / max(peak["lightkv_export"], 1e-9),
        },
        "shape": {**SIZE, "grid": list(grid), "seq": seq, **STAGE},
        "repeats": repeats,
        "median_ms": med,
        "peak_mib": peak,
        "peak_method": mem[VARIANTS[0]]["method"],
        "baseline_s_by_s_logits_mib": s_by_s_mib,
    }


def markdown(result: dict) -> str:
    rows = ["| variant | median ms | peak MiB |", "|---|---:|---:|"]
    rows += [f"| {v} | {result['median_ms'][v]:.1f} | {result['peak_mib'][v]:.1f} |" for v in VARIANTS]
    r = result["ratios"]
    rows.append("")
    rows.append(
        f"Guidance from the S x T product is {r['speed-up']:.1f}x faster and needs {r['peak memory']:.1f}x less peak "
        f"memory than the released code's full S x S softmax (its logits alone: "
        f"{result['baseline_s_by_s_logits_mib']:.0f} MiB). Peak memory: {result['peak_method']}, "
        "one call in a fresh process after a warm-up."
    )
    return "\n".join(rows)
