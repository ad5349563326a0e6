"""What LightKV saves on a real model, from its shapes alone: nothing is built, downloaded or run.

    python -m lightkv_export.plan --model qwen-vl --ratio 0.55 --image-size 1024x768 --prompt-tokens 64
    python -m lightkv_export.plan --model llava --schedule 12:4:0.5,18:2:0.5,24:1:0.5 --json
    python -m lightkv_export.plan --paper        # the paper's KV and FLOPs figures next to ours

For one request (images + prompt, then --gen-tokens generated) it prints the Eq. 9 vision-token KV retention
the schedule achieves on that exact token layout (per-window floors and skipped stages included), KV bytes per
request, prefill and decode FLOPs (conventions: lightkv_export/accounting/__init__.py) and how many requests fit in
--gpu-memory once the weights are loaded, vanilla vs LightKV. Bad input exits with status 2 and one message.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from lightkv_export.accounting.flops import FlopConvention
from lightkv_export.accounting.paper import paper_comparison
from lightkv_export.accounting.planner import PlanResult, plan_budget
from lightkv_export.accounting.trace import request_layout
from lightkv_export.accounting.units import GB, GIB, dtype_bytes, parse_memory
from lightkv_export.errors import InputError, LightKVError
from lightkv_export.method.schedule import resolve
from lightkv_export.models.shapes import get_shape, planner_keys

MAX_IMAGES = 64  # far beyond any served request; more only makes the host-side plan slow
_SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_image_size(text: str) -> tuple[int, int]:
    """'1024x768' (width x height) -> (height, width)."""
    m = _SIZE.match(text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise InputError(f"image size {text!r} is not WIDTHxHEIGHT with positive integers, e.g. '1024x768'.")
    return int(m.group(2)), int(m.group(1))


def parse_windows(text: str) -> tuple[int, ...]:
    try:
        windows = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise InputError(f"windows {text!r} is not a comma-separated list of integers, e.g. '6,4,2'.") from None
    if not windows or any(w < 1 for w in windows):
        raise InputError(f"windows {text!r}: every entry must be >= 1.")
    return windows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lightkv_export.plan",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="qwen-vl", help=f"one of {', '.join(planner_keys())} (default qwen-vl)")
    p.add_argument("--ratio", type=float, help="fraction of vision-token KV kept, averaged over layers (Eq. 9)")
    p.add_argument("--schedule", help="explicit stages LAYER:WINDOWS:RATIO,... instead of --ratio")
    p.add_argument("--windows", help="windows per side of each stage for --ratio (default: the paper's)")
    p.add_argument("--image-size", help="WIDTHxHEIGHT in pixels (default: the model's typical image)")
    p.add_argument("--images", type=int, default=1, help=f"images per request, 1 to {MAX_IMAGES} (default 1)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="text tokens in the prompt (default 64)")
    p.add_argument("--gen-tokens", type=int, default=100, help="generated tokens per request (default 100)")
    p.add_argument("--gpu-memory", default="80GB", help="memory budget: weights + KV, e.g. 80GB, 79.6GiB")
    p.add_argument("--dtype", default="bf16", help="weights and KV-cache precision (fp32, fp16, bf16, fp8)")
    p.add_argument("--causal", action="store_true", help="count causal attention pairs only (default: full S x S)")
    p.add_argument("--grid-mode", choices=("true", "official"), default="true")
    p.add_argument("--paper", action="store_true", help="compare with the paper's reported KV and FLOPs figures")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def make_plan(args: argparse.Namespace) -> PlanResult:
    shape = get_shape(args.model)
    if args.prompt_tokens < 0 or args.gen_tokens < 0:
        raise InputError("--prompt-tokens and --gen-tokens must be >= 0.")
    if not 1 <= args.images <= MAX_IMAGES:
        raise InputError(f"--images must be from 1 to {MAX_IMAGES}, got {args.images}: vision tokens come from images.")
    height, width = parse_image_size(args.image_size) if args.image_size else shape.default_image_size
    windows = parse_windows(args.windows) if args.windows else shape.default_windows
    first_layer, why = shape.first_merge_layer
    schedule = resolve(
        shape.num_layers, ratio=args.ratio, schedule=args.schedule, windows=windows, first_layer=first_layer, why=why
    )
    layout = request_layout(shape, height, width, args.prompt_tokens, args.images)
    convention = FlopConvention(causal=args.causal, lm_head="last", decode_tokens=args.gen_tokens)
    return plan_budget(
        shape,
        schedule,
        layout,
        dtype_bytes=dtype_bytes(args.dtype),
        gpu_memory=parse_memory(args.gpu_memory),
        gen_tokens=args.gen_tokens,
        convention=convention,
        grid_mode=args.grid_mode,
    )


def plan_to_dict(plan: PlanResult) -> dict:
    def variant(v) -> dict:
        return {
            "retention": v.retention,
            "seq_per_layer": list(v.trace.seq_per_layer),
            "vision_per_layer": list(v.trace.vision_per_layer),
            "kv_prefill_bytes": v.kv_prefill_bytes,
            "kv_request_bytes": v.kv_request_bytes,
            "prefill_flops": v.prefill_flops,
            "prefill_flops_total": v.prefill_total,
            "decode_flops_total": v.decode_total,
            "max_concurrent_requests": v.max_concurrent,
        }

    van, light = plan.vanilla, plan.lightkv
    return {
        "model": plan.shape.key,
        "hf_id": plan.shape.hf_id,
        "schedule": str(plan.schedule),
        "schedule_nominal_retention": plan.schedule.retention,
        "stages": [st.__dict__ for st in light.trace.stages],
        "vision_grids": [list(g) for g in plan.layout.grids],
        "vision_tokens": plan.layout.vision,
        "text_tokens": plan.layout.text,
        "gen_tokens": plan.gen_tokens,
        "dtype_bytes": plan.dtype_bytes,
        "weight_bytes": plan.weight_bytes,
        "gpu_memory_bytes": plan.gpu_memory,
        "flop_convention": plan.convention.describe(),
        "vanilla": variant(van),
        "lightkv": variant(light),
        "kv_reduction": 1 - light.kv_request_bytes / van.kv_request_bytes,
        "prefill_flops_reduction": 1 - light.prefill_total / van.prefill_total,
        "concurrency_gain": light.max_concurrent / van.max_concurrent if van.max_concurrent else None,
        "notes": plan.notes,
    }


def _change(a: float, b: float) -> str:
    return f"{(b / a - 1) * 100:+.1f}%" if a else "-"


def render_plan(plan: PlanResult, console: Console) -> None:
    van, light = plan.vanilla, plan.lightkv
    shape, layout = plan.shape, plan.layout
    grids = " + ".join(f"{h}x{w}" for h, w in layout.grids)
    console.print(
        f"[bold]{shape.key}[/] ({shape.hf_id}): {shape.num_layers} layers, hidden {shape.hidden}, "
        f"{shape.heads} heads / {shape.kv_heads} KV heads, MLP {shape.intermediate}"
    )
    console.print(
        f"request: {layout.vision} vision tokens ({grids}) + {layout.text} text, "
        f"then {plan.gen_tokens} generated; schedule {plan.schedule.describe()}"
    )
    table = Table(title="vanilla vs LightKV, one request")
    for col, just in (("", "left"), ("vanilla", "right"), ("LightKV", "right"), ("change", "right")):
        table.add_column(col, justify=just)
    groups = [f"{light.trace.seq_per_layer[a - 1]}" for a, _ in plan.schedule.layer_groups()]
    table.add_row("sequence per layer group", str(van.trace.seq_per_layer[0]), " / ".join(groups), "")
    table.add_row(
        "vision-token KV kept (Eq. 9)", "100.0%", f"{light.retention * 100:.1f}%", _change(1.0, light.retention)
    )
    for label, attr in (("KV after prefill", "kv_prefill_bytes"), ("KV per request (end)", "kv_request_bytes")):
        a, b = getattr(van, attr), getattr(light, attr)
        table.add_row(f"{label}, GiB", f"{a / GIB:.3f}", f"{b / GIB:.3f}", _change(a, b))
    table.add_row(
        "prefill TFLOPs",
        f"{van.prefill_total / 1e12:.2f}",
        f"{light.prefill_total / 1e12:.2f}",
        _change(van.prefill_total, light.prefill_total),
    )
    overhead = light.prefill_flops["guidance"] + light.prefill_flops["merge"]
    table.add_row("  of which guidance + merge, GFLOPs", "0", f"{overhead / 1e9:.2f}", "")
    a, b = van.prefill_total + van.decode_total, light.prefill_total + light.decode_total
    table.add_row(f"prefill + {plan.gen_tokens} decode TFLOPs", f"{a / 1e12:.2f}", f"{b / 1e12:.2f}", _change(a, b))
    table.add_row(
        f"max concurrent requests ({plan.gpu_memory / GB:.0f} GB - {plan.weight_bytes / GB:.1f} GB weights)",
        str(van.max_concurrent),
        str(light.max_concurrent),
        _change(van.max_concurrent, light.max_concurrent),
    )
    console.print(table)
    console.print(f"FLOPs: {plan.convention.describe()}; language model only. Budget: weights + KV only.")
    for note in plan.notes:
        console.print(f"note: {note}")


def render_paper(rows: list[dict], console: Console) -> None:
    table = Table(title="The paper's figures vs this accounting")
    for col in ("model", "metric", "paper", "ours", "schedule", "text tokens", "reproduced"):
        table.add_column(col)
    for r in rows:
        unit = "GiB" if r["metric"] == "kv_gib" else "TFLOPs"
        table.add_row(
            r["model"],
            unit,
            f"{r['paper'][0]:g} -> {r['paper'][1]:g} ({r['paper_change'] * 100:+.0f}%)",
            f"{r['ours'][0]:g} -> {r['ours'][1]:g} ({r['ours_change'] * 100:+.0f}%)",
            r["schedule"],
            str(r["text_tokens"]),
            "yes" if r["reproduced"] else "no",
        )
    console.print(table)
    for r in rows:
        if r["evenly_spaced_schedules_reproducing"]:
            console.print(
                f"{r['model']} {r['metric']}: reproduced instead by {r['evenly_spaced_schedules_reproducing']}"
            )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    try:
        if args.paper:
            rows = paper_comparison(search_schedules=True)
            print(json.dumps(rows, indent=2)) if args.json else render_paper(rows, console)
            return 0
        plan = make_plan(args)
    except LightKVError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    if args.json:
        print(json.dumps(plan_to_dict(plan), indent=2))
    else:
        render_plan(plan, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
