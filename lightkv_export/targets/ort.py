"""The ort-cpu target: an engine directory of ONNX graphs that ONNX Runtime (CPU) runs with no native extension.

Layout (everything needed to run it; nothing refers back to the export cache):

    manifest.json            what was built from what: model, schedule, settings, versions, file hashes, the
                             expected KV bytes per layer for the reference request
    vision.onnx embed.onnx   vanilla graphs (copied from the export cache)
    decode.onnx
    prefill.onnx             the LightKV-transformed prefill (or the vanilla one for a vanilla engine)
    processor/               tokenizer, image processor and chat template

The directory is written under a temporary name next to its destination and renamed into place only when
complete, so an interrupted or failed build leaves nothing half written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import onnx

from lightkv_export.errors import InputError
from lightkv_export.export import ExportedGraphs, file_digest, strip_roles
from lightkv_export.passes.insert_lightkv import PassReport, insert_lightkv
from lightkv_export.runtime import MANIFEST, PROCESSOR_DIR

LARGE_MODEL_BYTES = 1 << 30  # past this, graphs are written with external data (protobuf's 2 GiB limit)


@contextlib.contextmanager
def staging(destination: Path) -> Iterator[Path]:
    """A temporary sibling of `destination` that replaces it on success and vanishes on failure.

    An existing engine at `destination` stays intact until the new one is complete.
    """
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the output directory {destination.parent}: {exc.strerror}.") from None
    if not os.access(destination.parent, os.W_OK):
        raise InputError(f"the output directory {destination.parent} is not writable; choose another with --out.")
    tmp = destination.with_name(f".{destination.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if destination.exists():
            shutil.rmtree(destination)
        tmp.rename(destination)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_graph(model: onnx.ModelProto, path: Path) -> None:
    large = model.ByteSize() > LARGE_MODEL_BYTES
    onnx.save(model, str(path), save_as_external_data=large, location=f"{path.name}.data" if large else None)


def copy_graph(src: Path, dst: Path) -> None:
    """Hard-link when possible (same file system, no extra disk), else copy; external data travels along."""
    for a, b in ((src, dst), (src.with_name(src.name + ".data"), dst.with_name(dst.name + ".data"))):
        if not a.exists():
            continue
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)


def file_hashes(directory: Path) -> dict[str, str]:
    """SHA-256 of every file under `directory` by relative path: graphs, their external data, processor files."""
    return {p.relative_to(directory).as_posix(): file_digest(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def transform_prefill(
    exported: ExportedGraphs, schedule, *, positions: str, grid_mode: str
) -> tuple[onnx.ModelProto, PassReport | None]:
    """The prefill graph of the engine: LightKV inserted for `schedule`, or the vanilla graph when it is None."""
    vanilla = onnx.load(str(exported.prefill))
    if schedule is None:
        return strip_roles(vanilla), None
    return insert_lightkv(vanilla, schedule, positions=positions, grid_mode=grid_mode)


def build_ort_engine(
    destination: Path,
    *,
    exported: ExportedGraphs,
    prefill: onnx.ModelProto,
    processor,
    manifest: dict,
) -> Path:
    """Write the engine directory for ort-cpu and return its path."""
    with staging(destination) as tmp:
        for name in ("vision", "embed", "decode"):
            copy_graph(getattr(exported, name), tmp / f"{name}.onnx")
        save_graph(prefill, tmp / "prefill.onnx")
        processor.save_pretrained(str(tmp / PROCESSOR_DIR))
        files = file_hashes(tmp)
        (tmp / MANIFEST).write_text(json.dumps({**manifest, "target": "ort-cpu", "files": files}, indent=2) + "\n")
    return destination
