"""LightKVMerge Triton kernels vs the PyTorch reference op on a CUDA GPU, at Qwen2.5-VL-7B size.

    python -m benchmarks.bench_kernels_gpu [--out benchmarks/results/kernels_gpu.json] [--runs 200]

Median of many runs timed with CUDA events (after warm-up). The kernel time covers the three kernel launches only:
the plan's index tensors are copied to the GPU beforehand (once per request in a real run) and nothing in the timed
region syncs with the host. The memory-bound floor is the bytes the op must move
(read every vision token once for matching, read and write every surviving token once, int64 `kept`) divided by
the copy bandwidth measured on this GPU with a device-to-device copy of a similar size. Without a GPU it exits with
a message (exit code 2) and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

from lightkv_export.method.layout import StagePlan, plan_stage
from lightkv_export.method.reference import apply_plan
from lightkv_export.method.spans import VisionSpan

HIDDEN = 3584


def _plans() -> dict[str, StagePlan]:
    one = [[VisionSpan(20, 1296, (36, 36))]]
    return {
        "B1_36x36_w2": plan_stage(one, 1356, windows=2, ratio=0.45),
        "B4_36x36_w2": plan_stage(one * 4, 1356, windows=2, ratio=0.45),
        "B4_36x36_w4": plan_stage(one * 4, 1356, windows=4, ratio=0.45),
    }


def time_cuda(fn, runs: int) -> float:
    """Median milliseconds of fn() over `runs` calls, each bracketed by CUDA events."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(nbytes: int, runs: int) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_cuda(lambda: dst.copy_(src), runs)
    return 2 * nbytes / (ms * 1e-3)


def bytes_moved(plan: StagePlan, elem: int) -> int:
    """Vision tokens read once for matching; survivors read and written once; guidance and kept."""
    vision = int((plan.win_index >= 0).sum()) if plan.win_index.size else 0
    out = sum(plan.out_lengths)
    return (vision + 2 * out) * HIDDEN * elem + plan.batch * plan.seq_len * 4 + out * 8


NAME = "kernels_gpu"
REQUIRES = "cuda"


def run(quick: bool = False, runs: int = 200) -> dict:
    """Triton kernels vs the PyTorch reference op per (case, dtype), and the distance to the memory-bound floor."""
    from plugins.lightkv.launch import launch_kernels, lightkv_merge_triton, plan_tensors

    runs = 10 if quick else runs
    results = []
    for dtype in (torch.float16, torch.bfloat16):
        elem = torch.finfo(dtype).bits // 8
        for name, plan in _plans().items():
            hidden = torch.randn(plan.batch, plan.seq_len, HIDDEN, device="cuda").to(dtype)  # [B, S, D]
            guidance = torch.rand(plan.batch, plan.seq_len, device="cuda")  # [B, S]
            _, kept = lightkv_merge_triton(hidden, guidance, plan)  # checked once against the reference op
            if not torch.equal(kept, apply_plan(hidden, guidance, plan).kept):
                raise AssertionError(f"{name} {dtype}: the kernels keep other tokens than the reference op")
            # Plan tensors go to the GPU once per request, before the stage runs: only the three launches are timed.
            on_gpu = plan_tensors(plan, "cuda")
            kernel_ms = time_cuda(lambda: launch_kernels(hidden, guidance, on_gpu), runs)  # noqa: B023
            ref_ms = time_cuda(lambda: apply_plan(hidden, guidance, plan), max(5, runs // 10))  # noqa: B023
            moved = bytes_moved(plan, elem)
            floor_ms = moved / copy_bandwidth(moved, runs) * 1e3
            results.append({
                "case": name, "dtype": str(dtype).removeprefix("torch."), "batch": plan.batch,
                "seq_len": plan.seq_len, "windows": int(plan.win_index.shape[0]), "triton_ms": kernel_ms,
                "reference_ms": ref_ms, "speedup": ref_ms / kernel_ms, "bytes_moved": moved,
                "memory_floor_ms": floor_ms, "fraction_of_floor": floor_ms / kernel_ms,
            })  # fmt: skip
    return {
        "title": f"LightKVMerge Triton kernels vs the PyTorch reference op on {torch.cuda.get_device_name(0)}",
        "ratios": {f"{r['case']} {r['dtype']} speed-up": r["speedup"] for r in results},
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "results": results,
    }


def markdown(record: dict) -> str:
    lines = [
        "| case | dtype | kernels ms | reference op ms | speed-up | memory floor ms | share of the floor |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in record["results"]:
        lines.append(
            f"| {r['case']} | {r['dtype']} | {r['triton_ms']:.3f} | {r['reference_ms']:.3f} | {r['speedup']:.2f}x | "
            f"{r['memory_floor_ms']:.4f} | {r['fraction_of_floor']:.1%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kernels_gpu.json"))
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels_gpu: no CUDA GPU here; nothing measured.", file=sys.stderr)
        return 2
    record = run(runs=args.runs)
    for row in record["results"]:
        print(json.dumps(row))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
