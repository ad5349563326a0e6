"""The build's report.md, after parity: the "## Accounting" section and the layer pictures.

Modules: markdown (report.md's text), pictures (matplotlib, from the manifest or a run's data), request (pictures
from a PyTorch reference run on the engine's own inputs, for any image and prompt), cli:

    python -m lightkv_export.report ENGINE_DIR [--image photo.png] [--prompt "..."] [--out DIR]

The numbers come from lightkv_export.accounting (conventions there); this package only writes them.
"""

from __future__ import annotations

from pathlib import Path

from lightkv_export.accounting.engine import EngineAccount, engine_account
from lightkv_export.artifacts import write_text_atomic
from lightkv_export.report.markdown import (
    ACCOUNTING_HEADING,
    PICTURES_HEADING,
    REPORT_FILE,
    accounting_markdown,
    upsert_section,
)
from lightkv_export.report.pictures import write_build_pictures


def write_accounting(engine_dir: Path) -> EngineAccount:
    """The "## Accounting" section of ENGINE_DIR/report.md (replaced if present, kept before the pictures)."""
    from lightkv_export.artifacts import read_manifest

    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    acc = engine_account(manifest)
    report = engine_dir / REPORT_FILE
    text = report.read_text() if report.is_file() else f"# Report: {engine_dir}\n"
    label = "this engine (vanilla)" if manifest.vanilla else "LightKV"
    write_text_atomic(
        report, upsert_section(text, ACCOUNTING_HEADING, accounting_markdown(acc, label), PICTURES_HEADING)
    )
    return acc


def write_build_report(engine_dir: Path) -> list[Path]:
    """What a build adds to report.md after parity: the accounting section, then the layer pictures."""
    write_accounting(engine_dir)
    return write_build_pictures(engine_dir)
