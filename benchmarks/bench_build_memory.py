"""Build memory: peak resident memory and time of every build stage for a real-size model with random weights.

`pipeline.run` on `qwen2-vl` (Qwen2-VL-2B's architecture, seeded random weights, fp32: about 8.8 GB of weights),
ratio 0.55, the ort-cpu target with parity, in this process: each stage's peak is the process's high-water mark
over that stage (pipeline.Progress resets it at the start of every stage, lightkv_export/rss.py). The goal (issue
12) is a peak of at most 1.3x the weight bytes plus 2 GiB at every stage, so a model builds where its weights fit.

It takes minutes (tens of them on 2 cores) and needs about 15 GB of free disk; it runs outside the test suite.

Run: `python -m benchmarks --only build_memory` or `python benchmarks/bench_build_memory.py [--quick]`
(--quick: the tiny-qwen2-vl preset, seconds, writes nothing).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as `python benchmarks/bench_build_memory.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

NAME = "build_memory"
MODEL = "qwen2-vl"
RATIO = 0.55
GOAL_FACTOR, GOAL_EXTRA = 1.3, 2 * 2**30


def run(quick: bool = False, model: str | None = None) -> dict:
    from rich.console import Console

    from lightkv_export.config import BuildConfig
    from lightkv_export.pipeline import run as build

    key = model or ("tiny-qwen2-vl" if quick else MODEL)
    with tempfile.TemporaryDirectory(prefix="bench_build_memory_") as tmp:
        config = BuildConfig(model=key, random_weights=not key.startswith("tiny-"), ratio=RATIO, out=Path(tmp))
        t0 = time.perf_counter()
        result = build(config, Console(stderr=True))
        total_s = time.perf_counter() - t0
        if result.failed_targets:
            raise RuntimeError(f"the build failed: {result.failed_targets}")
        engine = result.engine_dirs["ort-cpu"]
        manifest = json.loads((engine / "manifest.json").read_text())
        passed = all(r.passed for r in result.parity.values())
    weights = int(manifest["weight_bytes"])
    goal = GOAL_FACTOR * weights + GOAL_EXTRA
    peaks = dict(result.peak_rss)
    if not peaks or any(v is None for v in peaks.values()):
        raise RuntimeError("peak RSS per stage is not available here (needs Linux /proc/self/clear_refs)")
    worst = max(peaks, key=peaks.get)
    return {
        "title": f"build memory: {key} with random weights ({weights / 2**30:.2f} GiB of weights held), ratio "
        f"{RATIO}, ort-cpu with parity; goal: peak RSS <= {GOAL_FACTOR} x weights + 2 GiB at every stage",
        "ratios": {"goal / worst stage's peak RSS": goal / peaks[worst]},
        "model": key,
        "weight_bytes": weights,
        "goal_bytes": goal,
        "peak_rss_bytes": peaks,
        "peak_over_weights": {k: v / weights for k, v in peaks.items()},
        "worst_stage": worst,
        "within_goal": peaks[worst] <= goal,
        "stage_s": result.timings,
        "total_s": total_s,
        "parity_passed": passed,
    }


def markdown(result: dict) -> str:
    gib = 2**30
    rows = ["| stage | seconds | peak RSS GiB | peak / weights |", "|---|---:|---:|---:|"]
    for stage, peak in result["peak_rss_bytes"].items():
        rows.append(f"| {stage} | {result['stage_s'].get(stage, 0):.0f} | {peak / gib:.2f} | "
                    f"{result['peak_over_weights'][stage]:.2f}x |")  # fmt: skip
    verdict = "within" if result["within_goal"] else "over"
    parity = "passed" if result["parity_passed"] else "FAILED"
    weights, goal = result["weight_bytes"] / gib, result["goal_bytes"] / gib
    rows += [
        "",
        f"Weights {weights:.2f} GiB; goal {goal:.2f} GiB; the worst stage ({result['worst_stage']}) is {verdict} it. "
        f"Parity {parity}.",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.__main__ import RESULTS, write_record

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny preset, writes nothing")
    parser.add_argument("--model", help=f"another model key (default {MODEL})")
    args = parser.parse_args(argv)
    result = run(quick=args.quick, model=args.model)
    print(result["title"])
    print(markdown(result))
    if not args.quick:
        print(f"results -> {write_record(RESULTS, NAME, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
