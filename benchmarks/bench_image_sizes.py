"""ONNX Runtime CPU prefill by image size: LightKV vs vanilla on the mid-size random-weight Qwen2.5-VL of
bench_ort_prefill, for one image at three sizes as users send them, each sized by the family's own host image side.

LightKV merges vision tokens, so its saving grows with the image's share of the sequence and, attention being
quadratic, with the sequence itself. This benchmark measures that: one export (bench_ort_prefill.export_graphs:
the vanilla graph and LightKV's for the solver's schedule at RATIO), then, for each image, one request of its
token grid between the same text through both graphs (bench_ort_prefill.measure: interleaved runs, the headline
speed-up the median of per-repeat ratios), next to the prefill FLOPs ratio the accounting predicts for that
layout. The graphs are dynamic in sequence length, so one pair of sessions serves every size.

Images (width x height as sent): 448x448, a 1344x1008 photo, and a 1:3 document page: the largest exactly-1:3 page
the processor takes without resizing it (`page_size`), about 95% of max_pixels. An image's LLM-token grid is
what Qwen2.5-VL's processor makes of it (`Family.image_host(...).layout`: smart_resize within min / max pixels,
patch 14 x merge 2), not arithmetic written here.

max_pixels is capped at CAP = 28 x 28 x 4096 = 3,211,264 pixels (4,096 vision tokens), a common deployment cap
for Qwen2.5-VL (what a user's --max-image-pixels sets), not the processor's own 12,845,056 (16,384 tokens): a
vanilla prefill at S ~ 16k holds heads x S x S float32 attention scores, 16 x 16k^2 x 4 B = 17 GiB per tensor
here, beyond the 24 GiB, 2-core machine the benchmarks run on (and minutes per run). At the cap the page is
1008x3024 (36 x 108 = 3,888 vision tokens, S = 3,927): 0.9 GiB per score tensor. Estimated from a probe of the
QUICK model (4 heads) at these images, where the page added 1.8 GiB at its peak (both sessions' arenas keep
their largest buffers, about four score tensors each): about 7 GiB added for FULL's 16 heads, 9 to 10 GiB peak
resident in all. Time, from bench_ort_prefill's recorded 1.78 s for 343 GFLOPs: the page's vanilla prefill
(1.8 TFLOPs) 10 to 15 s, LightKV's (0.94) about half; with the export, the whole run about 4 to 5 minutes.

The vision encoder is measured too (`vision`): the family's vision graph (models/qwen2_5_vl.py) of a random-weight
tower with Qwen2.5-VL-7B's width, heads and window at a quarter of its depth (VISION_FULL: 8 blocks, full attention
in two), exported as an engine exports it, each image's feeds from the host, run in a fresh process per image
(ONNX Runtime CPU, the engine's vision session settings) for its time and peak resident memory. The dense
baseline is the same tower with the attention the graph had before (one masked SDPA over all patches: heads x N x N
mask and scores per layer), run only where one heads x N x N float32 tensor stays under DENSE_LIMIT.

Run: `python -m benchmarks --only image_sizes [--quick]` (--quick: bench_ort_prefill's QUICK model, small images
under a 256-token cap).
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.bench_ort_prefill import FULL, QUICK, THREADS, export_graphs, measure, session

if TYPE_CHECKING:
    from lightkv_export.images import ImageHost

NAME = "image_sizes"
FAMILY = "qwen2_5_vl"
TOKEN_PIXELS = 28 * 28  # pixels per LLM token of Qwen2.5-VL (patch 14 x merge 2, squared): names the caps only
CAP = TOKEN_PIXELS * 4096  # max_pixels: 4,096 vision tokens (see the docstring)
QUICK_CAP = TOKEN_PIXELS * 256
PAGE_ASPECT = 3  # height / width of the document page
# (width, height) as sent; the page's is computed from the cap (page_size).
PHOTOS = ((448, 448), (1344, 1008))
QUICK_PHOTOS = ((224, 224), (448, 336))
REPEATS = 7  # timed pairs per size (after a warm-up): the page's pair takes 15 to 25 s here (see the docstring)


@dataclass(frozen=True)
class VisionSize:
    """The vision tower measured: Qwen2.5-VL-7B's vision config (REAL_VISION) with these changes."""

    depth: int
    hidden: int
    heads: int
    intermediate: int
    full_attention: tuple[int, ...]  # fullatt_block_indexes: the blocks attending over the whole image
    repeats: int  # timed runs per image (the first included: the page's takes minutes on 2 cores)


# A quarter of the real tower's 32 blocks, every fourth one full attention as in the real one; real width and heads
# (the attention's memory grows with heads x N^2 dense, HEAD_GROUP x N^2 segmented).
VISION_FULL = VisionSize(8, 1280, 16, 3420, (3, 7), 1)
VISION_QUICK = VisionSize(2, 64, 4, 128, (1,), 1)
# Bytes of one heads x N x N float32 tensor under which the dense baseline runs: a probe of this tower at 4
# blocks added 8.5 GiB running a 896 x 896 image dense (1 GiB per tensor), so 1344 x 1008 (3 GiB) would not fit.
DENSE_LIMIT = 2**30

# Run in a fresh process per (graph, image): its peak resident memory (VmHWM) is that image's alone. The engine's
# vision session settings (targets/ort.py session_options: no CPU arena), 2 intra-op threads, sequential.
CHILD = """
import json, sys, time
import numpy as np, onnxruntime as ort

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

path, feeds_path, repeats, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
from lightkv_export.targets.ort import session_options
options = session_options({}, arena=False)
options.intra_op_num_threads = threads
options.inter_op_num_threads = 1
options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
feeds = dict(np.load(feeds_path))
loaded = status("VmRSS")
times = []
for _ in range(repeats):
    start = time.perf_counter()
    session.run(None, feeds)
    times.append(time.perf_counter() - start)
print(json.dumps({"loaded_rss": loaded, "peak_rss": status("VmHWM"), "times_s": times}))
"""


def image_host(cap: int) -> ImageHost:
    """Qwen2.5-VL's host image side as its (random-weight preset's) processor configures it, max_pixels capped."""
    from lightkv_export.models.registry import get_family

    family = get_family(FAMILY)
    return family.image_host(family.random_processor().to_dict(), max_pixels=cap)


def page_size(host: ImageHost, cap: int, aspect: int = PAGE_ASPECT) -> tuple[int, int]:
    """(width, height) of the largest 1:aspect page within `cap` pixels that the processor takes as it is (no
    resize): it reaches the model undistorted, with as many tokens as an exactly 1:aspect grid gets under the cap."""
    width = math.isqrt(cap // aspect)
    while width > 0 and host.processed_size(aspect * width, width) != (aspect * width, width):
        width -= 1
    if width == 0:
        raise ValueError(f"no 1:{aspect} page under {cap} pixels passes the processor unresized")
    return width, aspect * width


def images(quick: bool) -> tuple[int, list[tuple[int, int]]]:
    """(cap, [(width, height) as sent])."""
    cap = QUICK_CAP if quick else CAP
    photos = QUICK_PHOTOS if quick else PHOTOS
    return cap, [*photos, page_size(image_host(cap), cap)]


def label(width: int, height: int) -> str:
    return f"{width}x{height}"


def achieved_retention(kv_lengths: list[int], seq: int, vision: int) -> float:
    """Vision tokens kept, averaged over layers, over the image's vision tokens: Eq. 9's retention as the plan's
    per-window floors realise it on this grid (every layer keeps all seq - vision text tokens)."""
    text = seq - vision
    return sum(n - text for n in kv_lengths) / (len(kv_lengths) * vision)


def row(width: int, height: int, host: ImageHost, grid: tuple[int, int], m: dict) -> dict:
    """One size's record from bench_ort_prefill.measure's output for the image's `grid`."""
    vision = grid[0] * grid[1]
    kv, times = m["kv_bytes"], m["times"]
    return {
        "image": label(width, height),
        "sent": [width, height],
        "processed": list(host.processed_size(height, width)),  # (height, width) after smart_resize
        "grid": list(grid),
        "vision_tokens": vision,
        "seq": m["seq"],
        "median_ms": m["median_ms"],
        "speedup": m["speedup"],
        "speedup_of_medians": m["median_ms"]["vanilla"] / m["median_ms"]["lightkv"],
        "paired_speedups": m["paired"],
        "times_ms": {v: [t * 1e3 for t in ts] for v, ts in times.items()},
        "kv_bytes": kv,
        "kv_ratio": kv["vanilla"] / kv["lightkv"],
        "kv_lengths": m["kv_lengths"],
        "retention": achieved_retention(m["kv_lengths"]["lightkv"], m["seq"], vision),
        "predicted_flops_ratio": m["flops_ratio"],
        "prefill_flops": {v: sum(p["flops"].values()) for v, p in m["predicted"].items()},
    }


def dense_attention(module, query, key, value, attention_mask, *, scaling=None, cu_seq_lens_q=None, **_kwargs):
    """The vision graph's attention before segments (the baseline): one SDPA over all N patches under an N x N
    block-diagonal mask. query / key / value [1, H, N, d] -> [1, N, H, d]."""
    import torch

    n = query.shape[2]
    bounds = cu_seq_lens_q[None, 1:]  # [1, S] each segment's end
    segment = (torch.arange(n, device=query.device)[:, None] >= bounds).sum(-1)  # [N] segment of each token
    mask = segment[:, None] == segment[None, :]  # [N, N]
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2), None


@contextlib.contextmanager
def vision_attention(function: Any):
    """The vision graph traced with `function` as its attention (transformers' registry), restored after."""
    from transformers import AttentionInterface

    from lightkv_export.models import qwen2_vl

    qwen2_vl.register_vision_attention()
    AttentionInterface.register(qwen2_vl.VISION_ATTENTION, function)
    try:
        yield
    finally:
        AttentionInterface.register(qwen2_vl.VISION_ATTENTION, qwen2_vl.varlen_attention)


def vision_tower(size: VisionSize) -> Any:
    """A LoadedModel of Qwen2.5-VL with the vision tower at `size` (seeded random weights, the real window and
    processor settings; the tiny language model: only the vision graph is exported)."""
    import torch

    from lightkv_export.models import tiny
    from lightkv_export.models.base import LoadedModel
    from lightkv_export.models.registry import build_seeded, get_family, get_spec

    family = get_family(FAMILY)
    config = family.tiny_config_dict(tiny.build_tokenizer())
    config["vision_config"] = {
        **family.real_vision,
        "depth": size.depth,
        "hidden_size": size.hidden,
        "num_heads": size.heads,
        "intermediate_size": size.intermediate,
        "fullatt_block_indexes": list(size.full_attention),
        "out_hidden_size": config["text_config"]["hidden_size"],
    }
    model = build_seeded(family, family.config_class()(**config), torch.float32)
    return LoadedModel(get_spec("qwen-vl"), model, family.random_processor(), family)


def run_child(graph: Path, feeds: dict, repeats: int, workdir: Path) -> dict:
    """CHILD's measurement of `graph` on `feeds` in a fresh Python process."""
    import numpy as np

    feeds_path = workdir / "feeds.npz"
    np.savez(feeds_path, **feeds)
    args = [sys.executable, "-c", CHILD, str(graph), str(feeds_path), str(repeats), str(THREADS)]
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"failed": f"exit {done.returncode}: {done.stderr.strip()[-300:]}"}
    out = json.loads(done.stdout.strip().splitlines()[-1])
    times = sorted(out["times_s"])
    return {**out, "median_ms": times[len(times) // 2] * 1e3, "run_added_bytes": out["peak_rss"] - out["loaded_rss"]}


def measure_vision(quick: bool, sizes: list[tuple[int, int]], host: ImageHost) -> dict:
    """Time and peak memory of the vision graph per image, segmented (the graph as exported) and dense (the
    baseline, under DENSE_LIMIT and not in --quick)."""
    import torch

    from lightkv_export.export import export_vision
    from lightkv_export.images import example_image

    size = VISION_QUICK if quick else VISION_FULL
    loaded = vision_tower(size)
    variants = ("segmented",) if quick else ("segmented", "dense")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_vision_") as tmp:
        work = Path(tmp)
        graphs = {}
        for variant in variants:
            graphs[variant] = work / f"{variant}.onnx"
            with vision_attention(dense_attention) if variant == "dense" else contextlib.nullcontext():
                export_vision(loaded, graphs[variant], dtype=torch.float32)
        del loaded
        for width, height in sizes[:1] if quick else sizes:  # --quick: one child process is the smoke test
            feeds = host.prepare(example_image(height, width)).feeds
            patches = int(next(iter(feeds.values())).shape[0])
            dense_bytes = size.heads * patches * patches * 4
            row = {"image": label(width, height), "patches": patches, "dense_scores_bytes": dense_bytes}
            for variant in variants:
                if variant == "dense" and dense_bytes > DENSE_LIMIT:
                    row[variant] = {"skipped": f"heads x N x N scores {dense_bytes / 2**30:.1f} GiB per tensor"}
                    continue
                row[variant] = run_child(graphs[variant], feeds, size.repeats, work)
            rows.append(row)
    return {"model": size.__dict__, "threads": THREADS, "rows": rows}


def run(quick: bool = False) -> dict:
    cap, sizes = images(quick)
    host = image_host(cap)
    grids = [host.layout(h, w).grids[0] for w, h in sizes]  # (rows, cols): Qwen-VL lays an image out as one grid
    vision = measure_vision(quick, sizes, host)  # first: no prefill session holds memory while it runs
    base = QUICK if quick else replace(FULL, repeats=REPEATS)
    longest = base.text_before + max(r * c for r, c in grids) + base.text_after
    # The config's context covers the longest request.
    base = replace(base, max_positions=max(base.max_positions, longest))
    with tempfile.TemporaryDirectory(prefix="bench_image_sizes_") as tmp:
        vanilla_model, lightkv_model, schedule, shape, build_s = export_graphs(base, Path(tmp))
    sessions = {"vanilla": session(vanilla_model), "lightkv": session(lightkv_model)}
    del vanilla_model, lightkv_model
    rows = [
        row(w, h, host, grid, measure(replace(base, grid=grid), sessions, schedule, shape))
        for (w, h), grid in zip(sizes, grids, strict=True)
    ]
    ratios = {}
    for r in rows:
        ratios[f"prefill speed-up @ {r['image']}"] = r["speedup"]
        ratios[f"KV bytes @ {r['image']}"] = r["kv_ratio"]
    return {
        "title": f"ONNX Runtime CPU prefill by image size, random-weight Qwen2.5-VL ({base.layers} layers, "
        f"D={base.hidden}, {base.heads}/{base.kv_heads} heads, MLP {base.intermediate}), one image of "
        f"{', '.join(r['image'] for r in rows)} (w x h as sent; max_pixels capped at {cap:,} = {cap // TOKEN_PIXELS:,} "
        f"tokens) between {base.text_before} + {base.text_after} text tokens, {THREADS} threads: LightKV (schedule "
        f"{schedule}) vs vanilla",
        "ratios": ratios,
        "rows": rows,
        "max_pixels": cap,
        "schedule": str(schedule),
        "retention_nominal": schedule.retention,
        "model": {k: v for k, v in base.__dict__.items() if k != "grid"} | {"vocab": shape.vocab},
        "threads": THREADS,
        "repeats": base.repeats,
        "build_s": build_s,
        "vision": vision,
    }


def markdown(result: dict) -> str:
    out = [
        "| image (w x h) | grid | vision tokens | S | vanilla ms | LightKV ms | speed-up | FLOPs ratio (predicted) "
        "| KV MiB vanilla / LightKV | KV ratio | retention |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        ms, kv = r["median_ms"], r["kv_bytes"]
        out.append(
            f"| {r['image']} | {r['grid'][0]}x{r['grid'][1]} | {r['vision_tokens']} | {r['seq']} "
            f"| {ms['vanilla']:.0f} | {ms['lightkv']:.0f} | {r['speedup']:.2f}x | {r['predicted_flops_ratio']:.2f}x "
            f"| {kv['vanilla'] / 2**20:.1f} / {kv['lightkv'] / 2**20:.1f} | {r['kv_ratio']:.2f}x "
            f"| {r['retention']:.3f} |"
        )
    first, last = result["rows"][0], result["rows"][-1]
    out += [
        "",
        f"Schedule {result['schedule']} (nominal retention {result['retention_nominal']:.3f}; the retention column "
        f"is what the plan keeps on each grid). From {first['image']} to {last['image']} the measured prefill "
        f"speed-up goes from {first['speedup']:.2f}x to {last['speedup']:.2f}x, against "
        f"{first['predicted_flops_ratio']:.2f}x to {last['predicted_flops_ratio']:.2f}x predicted by the FLOPs "
        f"accounting (full S x S attention, as the graph computes it). Images sized by Qwen2.5-VL's processor "
        f"with max_pixels capped at {result['max_pixels']:,}; speed-up = median of per-repeat vanilla / LightKV "
        f"ratios over {result['repeats']} interleaved repeats.",
    ]
    if "vision" in result:
        out += ["", *vision_markdown(result["vision"])]
    return "\n".join(out)


def vision_markdown(vision: dict) -> list[str]:
    m = vision["model"]
    out = [
        f"Vision encoder: random-weight Qwen2.5-VL tower ({m['depth']} blocks, full attention in "
        f"{list(m['full_attention'])}, width {m['hidden']}, {m['heads']} heads, real window), ONNX Runtime CPU, "
        f"{vision['threads']} threads, one fresh process per image; peak = the process's peak resident memory, "
        "added = what running the image added to it. Segmented: the graph as exported (windows padded to a window, "
        "one head's N x N at a time in full-attention blocks); dense: the same tower with one masked heads x N x N "
        "attention per block (the graph before).",
        "",
        "| image (w x h) | patches N | segmented ms | segmented peak / added MiB | dense ms | dense peak / added MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]

    def cells(m: dict | None) -> str:
        if m is None:
            return "- | -"
        if "median_ms" not in m:
            return f"{m.get('skipped') or m.get('failed')} | -"
        return f"{m['median_ms']:.0f} | {m['peak_rss'] / 2**20:.0f} / {m['run_added_bytes'] / 2**20:.0f}"

    for r in vision["rows"]:
        out.append(f"| {r['image']} | {r['patches']} | {cells(r.get('segmented'))} | {cells(r.get('dense'))} |")
    return out
