"""ONNX Runtime CPU prefill: the LightKV engine's graph vs the vanilla one, on a mid-size random-weight Qwen2.5-VL.

Both graphs come from one export (`export.export_prefill`) of the same model: the vanilla engine's is that export
with its role outputs stripped (`export.strip_roles`), LightKV's is the `insert_lightkv` pass for the schedule the
solver picks. Same session options (2 intra-op threads, sequential, full graph optimisation), same inputs:
random `inputs_embeds` for one image's grid of vision tokens between text, its M-RoPE positions
(`MROPE`) and, for LightKV, the per-request plan feeds (`merge_plan.plan_request`). Runs are interleaved,
the order alternating each repeat; the headline speed-up is the median of the per-repeat ratios (robust to
load from other processes that comes and goes during a run), with the ratio of medians and of minima alongside.

The measured speed-up is set against the prefill FLOPs ratio the schedule predicts
(`accounting.flops.prefill_flops` on the same shape and layout: projections + MLP + attention per layer at its
layer group's sequence length, plus the guidance and merge overheads; full S x S attention, since the exported graph
computes the causal product densely).

Run: `python -m benchmarks --only ort_prefill [--quick]` or `python benchmarks/bench_ort_prefill.py [--quick]`
(the latter writes benchmarks/results/ort_prefill.json unless --quick).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lightkv_export import contract

NAME = "ort_prefill"
THREADS = 2
RATIO = 0.55


@dataclass(frozen=True)
class BenchSize:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    mrope_section: tuple[int, int, int]  # sums to head_dim / 2
    grid: tuple[int, int]  # the image's LLM-token grid
    text_before: int
    text_after: int
    windows: tuple[int, ...]
    repeats: int
    max_positions: int = 4096  # the config's context (the peer's builder sizes its rotary tables from it)


# About a third of Qwen2.5-VL-7B's width and depth; 32 x 32 = 1024 vision tokens (an 896 x 896 image).
FULL = BenchSize(12, 1024, 16, 4, 2816, (8, 12, 12), (32, 32), 15, 24, (4, 2, 1), 11)
QUICK = BenchSize(6, 256, 4, 2, 704, (8, 12, 12), (16, 16), 15, 24, (2, 1), 2)


def qwen_config(
    hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, mrope: Sequence[int], max_positions: int,
    **text: Any,
):  # fmt: skip
    """(family, config) of a Qwen2.5-VL language model of these sizes with the tiny vision tower (a benchmark feeds
    embeddings in its place); `text`: more text-config fields (vocab_size, ...)."""
    from lightkv_export.models import tiny
    from lightkv_export.models.registry import get_family

    family = get_family("qwen2_5_vl")
    config_kw = family.tiny_config_dict(tiny.build_tokenizer())
    config_kw["text_config"] = {
        **config_kw["text_config"],
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": max_positions,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": list(mrope)},
        **text,
    }
    config_kw["vision_config"] = {**config_kw["vision_config"], "out_hidden_size": hidden}
    return family, family.config_class()(**config_kw)


def build_model(size: BenchSize):
    """Qwen2.5-VL's language model at `size` with seeded random weights (the tiny vision tower: it is not run)."""
    import torch

    from lightkv_export.models.registry import build_seeded

    family, config = qwen_config(
        size.hidden, size.intermediate, size.layers, size.heads, size.kv_heads, size.mrope_section, size.max_positions
    )
    return family, build_seeded(family, config, torch.float32)


def export_graphs(size: BenchSize, workdir: Path):
    """(vanilla prefill, LightKV prefill, schedule, the model's ArchShape, seconds spent exporting and
    transforming)."""
    import onnx
    import torch

    from lightkv_export.export import export_prefill, strip_roles
    from lightkv_export.method.schedule import solve
    from lightkv_export.passes.insert_lightkv import insert_lightkv

    t0 = time.perf_counter()
    family, model = build_model(size)
    text, head = family.text_model(model), family.lm_head(model)
    path = workdir / "prefill.onnx"
    with torch.no_grad():
        export_prefill(text, head, path, dtype=torch.float32, positions=family.positions)
    t1 = time.perf_counter()
    exported = onnx.load(str(path))
    schedule = solve(size.layers, RATIO, size.windows)
    lightkv = strip_roles(insert_lightkv(exported, schedule)[0])  # both graphs without any role output
    vanilla = strip_roles(exported)
    t2 = time.perf_counter()
    timing = {"export_s": t1 - t0, "transform_s": t2 - t1}
    return vanilla, lightkv, schedule, family.arch(model.config), timing


def make_request(size: BenchSize, seed: int = 0) -> tuple[dict[str, np.ndarray], list]:
    """Feeds shared by both graphs (B = 1) and the row's vision spans."""
    from lightkv_export.method.spans import VisionSpan
    from lightkv_export.models.positions import MROPE

    h, w = size.grid
    spans = [VisionSpan(size.text_before, h * w, (h, w))]
    seq = size.text_before + h * w + size.text_after
    positions, _ = MROPE.host(seq, spans)  # [3, S]: the benchmark's model is a Qwen2.5-VL
    embeds = np.random.default_rng(seed).standard_normal((1, seq, size.hidden)).astype(np.float32)  # [1, S, D]
    feeds = {
        contract.INPUTS_EMBEDS: embeds,
        contract.POSITION_IDS: positions[:, None, :],  # [3, 1, S]
        contract.LENGTHS: np.asarray([seq], dtype=np.int64),
    }
    return feeds, [spans]


def session(model, threads: int = THREADS):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def kv_bytes(outputs: dict[str, np.ndarray]) -> int:
    return sum(v.nbytes for k, v in outputs.items() if k.startswith(contract.PRESENT_PREFIX))


def predicted(size: BenchSize, shape, schedule) -> dict:
    """Prefill FLOPs of both variants from the accounting (lightkv_export/accounting), and the KV bytes it predicts."""
    from lightkv_export.accounting.flops import FlopConvention, prefill_flops
    from lightkv_export.accounting.trace import TokenLayout, analytic_kv_bytes_per_layer, trace_schedule

    layout = TokenLayout(size.text_before, (size.grid,), size.text_after)
    out = {}
    for name, sched in (("vanilla", None), ("lightkv", schedule)):
        trace = trace_schedule(sched, layout, size.layers)
        out[name] = {
            "flops": {c: int(v) for c, v in prefill_flops(shape, trace, FlopConvention(causal=False)).items()},
            "flops_causal": int(sum(prefill_flops(shape, trace, FlopConvention(causal=True)).values())),
            "kv_bytes": sum(analytic_kv_bytes_per_layer(shape, trace, 4)),
            "seq_per_layer": list(trace.seq_per_layer),
        }
    return out


def time_interleaved(runs: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each zero-argument callable; the order alternates every repeat."""
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            runs[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def measure(size: BenchSize, sessions: dict, schedule, shape) -> dict:
    """One request of `size` (its image grid between text) through both sessions ({"vanilla", "lightkv"}): the
    warm-up's outputs checked against the plan's KV lengths, then `size.repeats` interleaved timed runs. The graphs
    are dynamic in sequence length, so one pair of sessions serves every grid."""
    from lightkv_export.method.merge_plan import plan_request

    feeds, spans = make_request(size)
    seq = int(feeds[contract.LENGTHS][0])
    plan = plan_request(spans, [seq], schedule)
    inputs = {"vanilla": feeds, "lightkv": {**feeds, **plan.feeds}}
    names = {v: [o.name for o in s.get_outputs()] for v, s in sessions.items()}

    # Warm-up (ORT allocates its arena on the first run) and the outputs both variants produced.
    outputs = {v: dict(zip(names[v], s.run(names[v], inputs[v]), strict=True)) for v, s in sessions.items()}
    kv_len = {v: [outputs[v][contract.present(i, "key")].shape[2] for i in range(size.layers)] for v in sessions}
    pred = predicted(size, shape, schedule)
    if kv_len["lightkv"] != pred["lightkv"]["seq_per_layer"] or kv_len["vanilla"] != [seq] * size.layers:
        raise AssertionError(f"KV lengths {kv_len} differ from the plan's {pred['lightkv']['seq_per_layer']}")
    kv = {v: kv_bytes(outputs[v]) for v in sessions}
    del outputs

    runs = {v: (lambda v=v: sessions[v].run(names[v], inputs[v])) for v in sessions}
    times = time_interleaved(runs, size.repeats)
    flops = {v: sum(pred[v]["flops"].values()) for v in sessions}
    # Headline: the median over repeats of each repeat's own vanilla / LightKV ratio. The two runs of a repeat are
    # back to back, so load from other processes on the shared cores (it comes and goes over a run) cancels out
    # far better than in a ratio of the two medians, which is reported alongside.
    paired = [a / b for a, b in zip(times["vanilla"], times["lightkv"], strict=True)]
    return {
        "seq": seq,
        "times": times,
        "median_ms": {v: statistics.median(ts) * 1e3 for v, ts in times.items()},
        "paired": paired,
        "speedup": statistics.median(paired),
        "kv_bytes": kv,
        "kv_lengths": kv_len,
        "predicted": pred,
        "flops_ratio": flops["vanilla"] / flops["lightkv"],
    }


def run(quick: bool = False) -> dict:
    size = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="bench_ort_prefill_") as tmp:
        vanilla_model, lightkv_model, schedule, shape, build_s = export_graphs(size, Path(tmp))
    sessions = {"vanilla": session(vanilla_model), "lightkv": session(lightkv_model)}
    del vanilla_model, lightkv_model
    m = measure(size, sessions, schedule, shape)
    seq, times, med_ms, kv, pred = m["seq"], m["times"], m["median_ms"], m["kv_bytes"], m["predicted"]
    speedup, flops_ratio = m["speedup"], m["flops_ratio"]
    return {
        "title": f"ONNX Runtime CPU prefill, random-weight Qwen2.5-VL ({size.layers} layers, D={size.hidden}, "
        f"{size.heads}/{size.kv_heads} heads, MLP {size.intermediate}), one {size.grid[0]}x{size.grid[1]} image, "
        f"S={seq}, {THREADS} threads: LightKV (schedule {schedule}) vs vanilla",
        "ratios": {"prefill speed-up": speedup, "KV bytes": kv["vanilla"] / kv["lightkv"]},
        "predicted_flops_ratio": flops_ratio,
        "predicted_flops_ratio_causal": pred["vanilla"]["flops_causal"] / pred["lightkv"]["flops_causal"],
        "speedup_over_flops_ratio": speedup / flops_ratio,
        "schedule": str(schedule),
        "retention": schedule.retention,
        "size": {**size.__dict__, "seq": seq, "vision_tokens": size.grid[0] * size.grid[1], "vocab": shape.vocab},
        "threads": THREADS,
        "repeats": size.repeats,
        "median_ms": med_ms,
        "speedup_of_medians": med_ms["vanilla"] / med_ms["lightkv"],
        "speedup_of_minima": min(times["vanilla"]) / min(times["lightkv"]),
        "paired_speedups": m["paired"],
        "min_ms": {v: min(ts) * 1e3 for v, ts in times.items()},  # least disturbed by other load on shared cores
        "times_ms": {v: [t * 1e3 for t in ts] for v, ts in times.items()},
        "kv_bytes": kv,
        "kv_bytes_predicted": {v: pred[v]["kv_bytes"] for v in sessions},
        "kv_lengths": m["kv_lengths"],
        "prefill_flops": {v: pred[v]["flops"] for v in sessions},
        "build_s": build_s,
    }


def markdown(result: dict) -> str:
    rows = ["| engine | median prefill ms | KV bytes (fp32) | prefill GFLOPs (predicted) |", "|---|---:|---:|---:|"]
    for v in ("vanilla", "lightkv"):
        gflops = sum(result["prefill_flops"][v].values()) / 1e9
        rows.append(f"| {v} | {result['median_ms'][v]:.0f} | {result['kv_bytes'][v] / 2**20:.1f} MiB | {gflops:.1f} |")
    r = result["ratios"]
    rows += [
        "",
        f"Schedule {result['schedule']} (retention {result['retention']:.3f}). Measured prefill speed-up "
        f"{r['prefill speed-up']:.2f}x against {result['predicted_flops_ratio']:.2f}x predicted by the FLOPs "
        f"accounting (measured / predicted = {result['speedup_over_flops_ratio']:.2f}); KV cache "
        f"{r['KV bytes']:.2f}x smaller.",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    from benchmarks.__main__ import RESULTS, write_record

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, writes nothing")
    args = parser.parse_args(argv)
    result = run(quick=args.quick)
    table = Table(title=result["title"])
    for col in ("engine", "median ms", "KV MiB", "predicted GFLOPs", "KV lengths per layer"):
        table.add_column(col)
    for v in ("vanilla", "lightkv"):
        table.add_row(
            v,
            f"{result['median_ms'][v]:.1f}",
            f"{result['kv_bytes'][v] / 2**20:.1f}",
            f"{sum(result['prefill_flops'][v].values()) / 1e9:.1f}",
            " ".join(map(str, result["kv_lengths"][v])),
        )
    console = Console()
    console.print(table)
    console.print(
        f"speed-up {result['ratios']['prefill speed-up']:.2f}x (FLOPs predict {result['predicted_flops_ratio']:.2f}x), "
        f"KV bytes {result['ratios']['KV bytes']:.2f}x smaller; schedule {result['schedule']}"
    )
    if not args.quick:
        console.print(f"results -> {write_record(RESULTS, NAME, result)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python benchmarks/bench_ort_prefill.py`
    sys.exit(main())
