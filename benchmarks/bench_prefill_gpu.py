"""Time to first token, decode and GPU memory at Qwen2.5-VL-7B size: vanilla vs LightKV, PyTorch with our kernels.

The language model of Qwen2.5-VL-7B (28 layers, D 3584, 28/4 heads, MLP 18944, vocabulary 152064), built from these
known hyper-parameters with seeded random weights in bf16 on the GPU (no download), run by this project's PyTorch
runtime (torch_runtime.prefill / decode_step): every layer's attention is the same fused SDPA, causal
(FlashAttention on an H100/H200); LightKV's guidance is the S x T product of the scheduled layers' queries and keys,
and its merge runs through the LightKVMerge Triton kernels (plugins/lightkv). Schedules: the paper's for this depth
(layers 12-17-22, windows 6-4-2, 0.5 per stage) and --ratio 0.55 from the solver.

Requests (random embeddings in place of the vision encoder, Qwen's M-RoPE positions): one 1024 x 768 image (999
vision tokens, a 27 x 37 grid) with a 64-token prompt; four such images in one request; a batch of 8 of the first.
For each: prefill (time to first token, CUDA events, after warm-up, median of N with min-max), decode ms per token
at that context (each step timed on its own after DECODE_WARMUP steps, the median), peak GPU memory, KV bytes held,
and where LightKV's time goes (guidance and merge, from one extra synchronized prefill); vanilla vs each LightKV
schedule, side by side in one run. Printed beside the measured ratios: the FLOPs ratio the accounting predicts
(accounting/flops.py) and the KV ratio of the planner (accounting/trace.py).

    python -m benchmarks.bench_prefill_gpu [--out DIR]            # on a CUDA GPU (about 70 s on an H200)
    python -m benchmarks.bench_prefill_gpu --tiny --device cpu    # the same code at toy size (CI, seconds)

Writes prefill_gpu.json under --out (default $OUT when set, else benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

if not __package__:  # run as `python benchmarks/bench_prefill_gpu.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

NAME = "prefill_gpu"
REQUIRES = "cuda"
RESULTS = Path(__file__).parent / "results"
RATIO = 0.55
PAPER_SCHEDULE_7B = "12:6:0.5,17:4:0.5,22:2:0.5"  # the paper's Qwen2.5-VL-7B schedule (28 layers)


@dataclass(frozen=True)
class Size:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    mrope: tuple[int, int, int]  # sums to head_dim / 2
    grid: tuple[int, int]  # one image's vision-token grid
    prompt: int  # text tokens after the images
    paper_schedule: str
    windows: tuple[int, ...]
    repeats: int
    decode_steps: int


QWEN_7B = Size(3584, 18944, 28, 28, 4, 152064, (16, 24, 24), (27, 37), 64, PAPER_SCHEDULE_7B, (6, 4, 2), 10, 64)
TINY = Size(64, 128, 6, 4, 2, 512, (2, 3, 3), (6, 8), 8, "2:2:0.5,4:1:0.5", (2, 1), 1, 2)  # the kernels interpreted
DECODE_WARMUP = 4  # decode steps before the timed ones
TEMPLATE = 15  # chat-template tokens before the first image
BETWEEN = 2  # tokens between two images (their wrappers)


def build(size: Size, device: str, dtype):
    """LoadedModel of Qwen2.5-VL's language model at `size`, random weights drawn on the device (the tiny vision
    tower: the benchmark feeds embeddings in its place)."""
    import torch

    from benchmarks.bench_ort_prefill import qwen_config
    from lightkv_export.models.base import LoadedModel
    from lightkv_export.models.registry import get_spec

    family, config = qwen_config(
        size.hidden, size.intermediate, size.layers, size.heads, size.kv_heads, size.mrope, 32768, vocab_size=size.vocab
    )
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = family.model_class()._from_config(config, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():  # variance 1 / fan_in, as the seeded CPU init (registry.seeded_init_) but on the device
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif p.dim() > 1:
                p.uniform_(-((3.0 / p[0].numel()) ** 0.5), (3.0 / p[0].numel()) ** 0.5, generator=gen)
            else:
                p.uniform_(-0.02, 0.02, generator=gen)
    model.eval()
    return LoadedModel(spec=get_spec("tiny-qwen-vl"), model=model, processor=None, family=family)


def request(size: Size, images: int, batch: int, device: str, dtype, seed: int = 0):
    """PrefillInputs: `images` images of the size's grid with their wrappers, the prompt, `batch` equal rows."""
    import torch

    from lightkv_export.method.spans import VisionSpan
    from lightkv_export.models.base import PrefillInputs
    from lightkv_export.models.positions import MROPE

    h, w = size.grid
    spans, at = [], TEMPLATE
    for _ in range(images):
        spans.append(VisionSpan(at, h * w, (h, w)))
        at += h * w + BETWEEN
    seq = at + size.prompt
    pos, offset = MROPE.host(seq, spans)  # [3, S]
    gen = torch.Generator(device=device).manual_seed(seed)
    embeds = (torch.randn(batch, seq, size.hidden, generator=gen, device=device) * 0.02).to(dtype)  # [B, S, D]
    positions = torch.as_tensor(pos, device=device)[:, None, :].expand(3, batch, seq).contiguous()  # [3, B, S]
    return PrefillInputs(
        inputs_embeds=embeds,
        position_ids=positions,
        attention_mask=torch.ones(batch, seq, dtype=torch.long, device=device),
        input_ids=torch.zeros(batch, seq, dtype=torch.long, device=device),
        spans=[list(spans) for _ in range(batch)],
        decode_offset=torch.full((batch, 1), int(offset), dtype=torch.long, device=device),
    )


class Clock:
    """Elapsed milliseconds of a call: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: str) -> None:
        import torch

        self.cuda = device.startswith("cuda")
        self.torch = torch

    def time(self, fn) -> tuple[float, object]:
        if not self.cuda:
            t0 = time.perf_counter()
            out = fn()
            return (time.perf_counter() - t0) * 1e3, out
        start, end = (self.torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end), out


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def measure(loaded, inputs, schedule, clock: Clock, size: Size, device: str) -> dict:
    """Prefill (warm-up, then the median of size.repeats), decode over size.decode_steps, memory and KV bytes."""
    import torch

    from lightkv_export import torch_runtime

    def prefill():
        return torch_runtime.prefill(loaded, inputs, schedule, merge="triton")

    prefill()  # warm-up: kernels compiled, the allocator's pools grown
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(size.repeats):
        ms, pre = clock.time(prefill)
        times.append(ms)
    peak_prefill = torch.cuda.max_memory_allocated() if cuda else 0
    kv = torch_runtime.kv_bytes(pre.cache)
    kv_lengths, logits = pre.kv_lengths(), pre.logits.clone()  # before decode grows the cache
    token = pre.logits.argmax(-1).view(-1, 1)  # [B, 1]
    position, cache = pre.next_position, pre.cache

    def decode_one():
        nonlocal token, position
        step = torch_runtime.decode_step(loaded, token, cache, position)  # [B, V]
        token, position = step.argmax(-1).view(-1, 1), position + 1
        return step

    for _ in range(DECODE_WARMUP):  # the allocator's pools for a growing cache, the decode kernels chosen
        decode_one()
    steps_ms = [clock.time(decode_one)[0] for _ in range(size.decode_steps)]
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    agreement = None
    if schedule.stages:  # the kernels against the reference op (the truth), after the measurements
        ref = torch_runtime.prefill(loaded, inputs, schedule, merge="reference")
        if ref.kv_lengths() != kv_lengths:
            raise AssertionError(f"kernel merge lengths {kv_lengths} != reference {ref.kv_lengths()}")
        agreement = float((logits - ref.logits).abs().max())
        del ref
    pre = cache = None  # the caches go before the next variant runs
    return {
        "max_logit_diff_kernels_vs_reference": agreement,
        "prefill_ms": spread(times),
        "prefill_ms_all": [round(t, 3) for t in times],
        "decode_ms_per_token": round(statistics.median(steps_ms), 4),
        "decode_ms_spread": spread(steps_ms),
        "lightkv_overhead_ms": overhead(loaded, inputs, schedule) if schedule.stages else None,
        "peak_memory_prefill_bytes": peak_prefill,
        "peak_memory_bytes": peak,
        "kv_bytes": kv,
        "kv_lengths": kv_lengths,
    }


def overhead(loaded, inputs, schedule) -> dict:
    """Where LightKV's prefill time goes, from one extra prefill with a synchronize around the planning (host, once
    before the first layer), every guidance and every merge call (wall ms). Its total is a little slower than the
    timed runs (the synchronizations); the parts say what the overhead is made of."""
    import torch

    from lightkv_export import torch_runtime

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    parts = {"plan_ms": "stage_plans", "guidance_ms": "text_guidance", "merge_ms": "merge_with_kernels"}
    spent = dict.fromkeys(parts, 0.0)
    originals = {key: getattr(torch_runtime, name) for key, name in parts.items()}

    def timed(key, fn):
        def wrapper(*args, **kwargs):
            sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            spent[key] += (time.perf_counter() - t0) * 1e3
            return out

        return wrapper

    for key, name in parts.items():
        setattr(torch_runtime, name, timed(key, originals[key]))
    try:
        sync()
        t0 = time.perf_counter()
        torch_runtime.prefill(loaded, inputs, schedule, merge="triton")
        sync()
        total = (time.perf_counter() - t0) * 1e3
    finally:
        for key, name in parts.items():
            setattr(torch_runtime, name, originals[key])
    return {"total_ms": round(total, 3), **{k: round(v, 3) for k, v in spent.items()}}


def predicted(loaded, size: Size, images: int, schedule, itemsize: int) -> dict:
    """Prefill FLOPs (causal attention, as measured) and KV bytes of one row, from the accounting."""
    from lightkv_export.accounting.flops import FlopConvention, prefill_flops
    from lightkv_export.accounting.trace import TokenLayout, analytic_kv_bytes_per_layer, trace_schedule

    shape = loaded.family.arch(loaded.model.config)
    after = size.prompt + BETWEEN * images  # the wrappers after each image count with the text after them
    layout = TokenLayout(TEMPLATE, (size.grid,) * images, after)
    trace = trace_schedule(schedule if schedule.stages else None, layout, size.layers)
    flops = sum(prefill_flops(shape, trace, FlopConvention(causal=True)).values())
    return {"flops": int(flops), "kv_bytes": int(sum(analytic_kv_bytes_per_layer(shape, trace, itemsize)))}


def versions() -> dict:
    """The benchmarks' own environment record (machine, versions), plus the GPU's capability and CUDA."""
    import torch

    from benchmarks.__main__ import environment

    env = environment()
    out = {**env["versions"], "machine": env["machine"]}
    if torch.cuda.is_available():
        out["device"] = torch.cuda.get_device_name(0)
        out["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        out["cuda"] = torch.version.cuda
    return out


def run(quick: bool = False, tiny: bool | None = None, device: str = "cuda") -> dict:
    import torch

    from lightkv_export.method.schedule import Schedule, parse_schedule, solve

    tiny = quick if tiny is None else tiny
    env = versions()
    size = TINY if tiny else QWEN_7B
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA GPU here; use --tiny --device cpu for the CPU check of this script")
    if not device.startswith("cuda"):
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels run under Triton's interpreter on the CPU
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    t0 = time.perf_counter()
    loaded = build(size, device, dtype)
    build_s = time.perf_counter() - t0
    schedules = {
        "vanilla": Schedule(size.layers, ()),
        "paper": parse_schedule(size.paper_schedule, size.layers),
        f"r{RATIO}": solve(size.layers, RATIO, size.windows),
    }
    clock = Clock(device)
    cases = {"1 image": (1, 1), "4 images": (4, 1), "batch 8": (1, 8)}
    rows = {}
    for case, (images, batch) in cases.items():
        inputs = request(size, images, batch, device, dtype)
        row = {"images": images, "batch": batch, "seq_len": int(inputs.inputs_embeds.shape[1])}
        for name, schedule in schedules.items():
            got = measure(loaded, inputs, schedule, clock, size, device)
            got["predicted"] = predicted(loaded, size, images, schedule, inputs.inputs_embeds.element_size())
            row[name] = got
            print(f"{case:9} {name:8} prefill {got['prefill_ms']['median']:9.2f} ms  decode "
                  f"{got['decode_ms_per_token']:8.3f} ms/token  peak {got['peak_memory_bytes'] / 2**30:6.2f} GiB  "
                  f"KV {got['kv_bytes'] / 2**20:8.1f} MiB  LightKV parts {got['lightkv_overhead_ms']}",
                  file=sys.stderr, flush=True)  # fmt: skip
        for name in list(schedules)[1:]:
            v, light = row["vanilla"], row[name]
            row[f"{name}_vs_vanilla"] = {
                "prefill_speedup": round(v["prefill_ms"]["median"] / light["prefill_ms"]["median"], 3),
                "predicted_flops_ratio": round(v["predicted"]["flops"] / light["predicted"]["flops"], 3),
                "decode_speedup": round(v["decode_ms_per_token"] / light["decode_ms_per_token"], 3),
                "kv_ratio": round(v["kv_bytes"] / light["kv_bytes"], 3),
                "planned_kv_ratio": round(v["predicted"]["kv_bytes"] / light["predicted"]["kv_bytes"], 3),
                "peak_memory_ratio": round(v["peak_memory_bytes"] / light["peak_memory_bytes"], 3)
                if light["peak_memory_bytes"]
                else None,
            }
        rows[case] = row
        del inputs
    head = rows["1 image"]["paper_vs_vanilla"]
    return {
        "name": NAME,
        "title": (
            f"PyTorch on {env.get('device', device)}: Qwen2.5-VL-7B language model "
            f"({size.layers} layers, D={size.hidden}), random bf16 weights, vanilla vs LightKV (paper schedule "
            f"{size.paper_schedule}; r{RATIO} {schedules[f'r{RATIO}']})" + (" [tiny CPU check]" if tiny else "")
        ),
        "ratios": {
            "time to first token, 1 image (vanilla / LightKV paper)": head["prefill_speedup"],
            "predicted prefill FLOPs (vanilla / LightKV paper)": head["predicted_flops_ratio"],
            "decode ms/token, 1 image (vanilla / LightKV paper)": head["decode_speedup"],
            "KV bytes (vanilla / LightKV paper)": head["kv_ratio"],
        },
        "tiny": tiny,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": env,
        "size": size.__dict__,
        "schedules": {k: str(s) for k, s in schedules.items()},
        "build_s": round(build_s, 1),
        "cases": rows,
    }


def markdown(result: dict) -> str:
    lines = [
        "| request | S | variant | TTFT ms (min-max) | predicted FLOPs ratio | decode ms/token | peak GiB | KV MiB |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for case, row in result["cases"].items():
        for name in result["schedules"]:
            m = row[name]
            p = m["prefill_ms"]
            ratio = row.get(f"{name}_vs_vanilla", {}).get("predicted_flops_ratio")
            lines.append(
                f"| {case} | {row['seq_len']} | {name} | {p['median']:.1f} ({p['min']:.1f}-{p['max']:.1f}) | "
                f"{f'{ratio:.2f}x' if ratio else ''} | {m['decode_ms_per_token']:.2f} | "
                f"{m['peak_memory_bytes'] / 2**30:.2f} | {m['kv_bytes'] / 2**20:.1f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_prefill_gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy size: the same code path in seconds")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny; kernels interpreted)")
    parser.add_argument("--out", type=Path, default=None, help="directory for prefill_gpu.json (default $OUT, else "
                        "benchmarks/results)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.tiny:
        parser.error("--device cpu runs only --tiny (the 7B model needs a GPU)")
    result = run(tiny=args.tiny, device=args.device)
    print(markdown(result))
    out = args.out or Path(os.environ.get("OUT") or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{NAME}{'_tiny' if args.tiny else ''}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
