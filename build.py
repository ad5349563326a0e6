#!/usr/bin/env python3
"""Build LightKV engines for a vision-language model: export, transform, one engine per target, parity.

    python build.py --model tiny-qwen-vl --ratio 0.55
    python build.py --model qwen-vl --ratio 0.55 --target ort-cpu --target trt-sm90

Exit codes: 0 built and parity passed, 1 parity failed, 2 bad input or an unavailable target, 130 interrupted
(SIGINT / SIGTERM; engines already put in place are complete, the others untouched, and the message names them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python build.py",
        description="Compile an LVLM with LightKV vision-token KV-cache compression into ONNX Runtime and TensorRT "
        "engines, check each against the PyTorch reference, and optionally write a Triton model repository.",
        epilog="Engines go to OUT/<model>/<ratio>/<target>/ with manifest.json, parity.json and report.md. "
        "The vanilla export is cached in OUT/.cache/export, so building another ratio does not export again.",
    )
    p.add_argument(
        "--model",
        default="tiny-qwen-vl",
        help="model key (qwen-vl, qwen2-vl, tiny-qwen-vl, "
        "tiny-qwen2-vl), a hub id in the local HF cache, or a local checkpoint directory "
        "(default: tiny-qwen-vl)",
    )
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--ratio",
        type=float,
        help="fraction of vision-token KV kept, averaged over layers "
        "(the paper's 55%%: 0.55, the default); 0 or 1 keep the LightKV path but merge nothing",
    )
    how.add_argument("--schedule", help="explicit stages LAYER:WINDOWS:RATIO,... e.g. 12:6:0.5,17:4:0.5,22:2:0.5")
    how.add_argument("--vanilla", action="store_true", help="build the engines without LightKV (the baseline)")
    p.add_argument(
        "--target",
        action="append",
        dest="targets",
        metavar="TARGET",
        help="ort-cpu (default), trt (the local GPU) or trt-smXY (sm80, sm86, sm89, sm90, sm100, sm120); repeatable",
    )
    p.add_argument("--out", type=Path, default=Path("engines"), help="output directory (default: engines/)")
    p.add_argument("--dtype", default="float32", help="float32 (ort-cpu), float16 or bfloat16 (TensorRT)")
    p.add_argument(
        "--image-size",
        help="WIDTHxHEIGHT pixels of the reference request's image: the build's report, parity's first case and "
        "TensorRT's opt point (default: the model's, 448x336 for the tiny presets). Optional: engines take every "
        "image as the checkpoint's processor sizes it, whatever this is",
    )
    p.add_argument(
        "--max-image-pixels",
        type=int,
        metavar="N",
        help="cap each image at N pixels as the processor sizes it, below the checkpoint's own max_pixels (Qwen-VL: "
        "12,845,056, 16,384 tokens); bounds every request's vision tokens and TensorRT's largest profile",
    )
    p.add_argument(
        "--positions",
        choices=("preserve", "official"),
        default="preserve",
        help="after a merge, survivors keep their position ids (preserve) or are renumbered 0..S'-1 "
        "(official, the released code)",
    )
    p.add_argument(
        "--compat",
        choices=("none", "official"),
        default="none",
        help="official: the released code's pseudo-square grid and position reset",
    )
    p.add_argument("--random-weights", action="store_true", help="real architecture with random weights")
    p.add_argument("--force", action="store_true", help="export again even if the cached export is intact")
    p.add_argument("--no-parity", action="store_true", help="skip the parity stage (not recommended)")
    p.add_argument("--no-parity-gate", action="store_true", help="report a parity failure but exit 0")
    p.add_argument("--triton-repo", type=Path, help="also write a Triton Inference Server model repository here")
    from lightkv_export.triton_repo import add_batching_arguments

    add_batching_arguments(p)  # the served models' scheduler settings (with --triton-repo)
    return p


def main(argv: list[str] | None = None) -> int:
    from lightkv_export import interrupts

    args = parser().parse_args(argv)
    # SIGTERM (a scheduler, `kill`) unwinds like Ctrl-C: temporary directories go, the previous engine stays. Both
    # are also recorded, so one whose KeyboardInterrupt a finalizer swallowed still stops the build (interrupts.py).
    with interrupts.handling():
        code = build(args)
        return 130 if interrupts.received() else code  # one that came after the last check: still not exit 0


def build(args: argparse.Namespace) -> int:
    from rich.console import Console

    from lightkv_export import interrupts
    from lightkv_export.errors import LightKVError

    console = Console(stderr=True)
    result = None
    try:
        from lightkv_export.config import BuildConfig, parse_image_size
        from lightkv_export.pipeline import run
        from lightkv_export.summary import print_summary
        from lightkv_export.triton_repo import batching_from

        config = BuildConfig(
            model=args.model,
            ratio=args.ratio,
            schedule=args.schedule,
            vanilla=args.vanilla,
            targets=tuple(args.targets or ["ort-cpu"]),
            out=args.out,
            dtype=args.dtype,
            image_size=parse_image_size(args.image_size) if args.image_size else None,
            max_image_pixels=args.max_image_pixels,
            positions=args.positions,
            compat=args.compat,
            random_weights=args.random_weights,
            force=args.force,
            parity=not args.no_parity,
            parity_gate=not args.no_parity_gate,
            triton_repo=args.triton_repo,
            batching=batching_from(args),
        )
        result = run(config, console=console)
        interrupts.check()  # a signal swallowed after the last promotion (in a finalizer) still ends in 130
        print_summary(result, console)
        interrupts.check()
    except LightKVError as exc:
        console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        return 130 if interrupts.received() else exc.exit_code
    except OSError as exc:  # last resort: the file system refused something no earlier check foresaw
        where = f" ({exc.filename})" if exc.filename else ""
        message = f"{exc.strerror or exc}{where}. Check that --out is writable and has free space."
        console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
        return 130 if interrupts.received() else 2
    except KeyboardInterrupt as exc:
        replaced = list(getattr(exc, "replaced", []))  # run() names what it had put in place
        if result is not None:  # interrupted after run() returned: all its engines are in place
            replaced = [*result.engine_dirs.values(), *([result.triton_repo] if result.triton_repo else [])]
        console.print(f"[yellow]{interrupted_message(str(exc) or 'SIGINT', replaced)}[/]", soft_wrap=True)
        return 130
    return result.exit_code


def interrupted_message(signal_name: str, replaced: list[Path]) -> str:
    """What an interrupted build did: which directories it had put in place (each complete), or none."""
    if not replaced:
        return f"interrupted ({signal_name}): no engine was replaced and nothing half-written was left behind"
    where = ", ".join(map(str, replaced))
    return (
        f"interrupted ({signal_name}) after {where} had been put in place, complete (a promotion is never "
        "cut in half); nothing else was replaced and nothing half-written was left behind"
    )


if __name__ == "__main__":
    sys.exit(main())
