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

Run: `python -m benchmarks --only image_sizes [--quick]` (--quick: bench_ort_prefill's QUICK model, small images
under a 256-token cap).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

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


def run(quick: bool = False) -> dict:
    cap, sizes = images(quick)
    host = image_host(cap)
    grids = [host.layout(h, w).grids[0] for w, h in sizes]  # (rows, cols): Qwen-VL lays an image out as one grid
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
    return "\n".join(out)
