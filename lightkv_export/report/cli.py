"""`python -m lightkv_export.report ENGINE_DIR [--image photo.png] [--prompt "..."] [--out DIR]`: the pictures of
an engine for one request. Argument parsing and error reporting only; the work is report.request."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from lightkv_export.errors import LightKVError
from lightkv_export.report.pictures import DEFAULT_PROMPT, PICTURES_DIR
from lightkv_export.report.request import load_image, request_pictures


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m lightkv_export.report ENGINE_DIR`: draw what an engine keeps and what it merged for one request."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m lightkv_export.report",
        description="Pictures of an engine: vision tokens and KV bytes per layer (vanilla vs LightKV), and, from "
        "the PyTorch reference run on the engine's exact inputs, the merge map and the text-guidance heatmap "
        "over the image.",
    )
    parser.add_argument("engine_dir", type=Path, help="an engine directory written by build.py")
    parser.add_argument("--image", type=Path, help="RGB image file (default: the engine's reference image)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"the question (default: {DEFAULT_PROMPT!r})")
    parser.add_argument("--out", type=Path, help=f"output directory (default: ENGINE_DIR/{PICTURES_DIR})")
    args = parser.parse_args(argv)
    try:
        from lightkv_export.artifacts import read_manifest

        read_manifest(args.engine_dir)  # first: "not an engine directory" before any other complaint
        image = load_image(args.image) if args.image is not None else None
        out = args.out if args.out is not None else args.engine_dir / PICTURES_DIR
        pictures = request_pictures(args.engine_dir, out, image, args.prompt)
    except LightKVError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    for note in pictures.notes:
        print(note, file=sys.stderr)
    for path in pictures.paths():
        print(path)
    return 0
