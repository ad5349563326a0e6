"""The ort-cpu target: an engine directory of ONNX graphs that ONNX Runtime (CPU) runs with no native extension.

Layout (everything needed to run it; nothing refers back to the export cache):

    manifest.json            what was built from what: model, schedule, settings, versions, the SHA-256 and size
                             of every file, the expected KV bytes per layer for the reference request
    vision.onnx embed.onnx   vanilla graphs (independent copies of the export cache's: reflinks where the file
    decode.onnx              system can, never hard links)
    prefill.onnx             the LightKV-transformed prefill (or the vanilla one for a vanilla engine)
    processor/               tokenizer, image processor and chat template

The builder writes into the directory it is given; the pipeline stages, verifies and promotes it (artifacts.py).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import onnx

from lightkv_export.artifacts import PROCESSOR_DIR, Manifest, clone_file
from lightkv_export.export import ExportedGraphs, strip_roles
from lightkv_export.passes.insert_lightkv import PassReport, insert_lightkv

LARGE_MODEL_BYTES = 1 << 30  # past this, graphs are written with external data (protobuf's 2 GiB limit)


def save_graph(model: onnx.ModelProto, path: Path) -> None:
    large = model.ByteSize() > LARGE_MODEL_BYTES
    onnx.save(model, str(path), save_as_external_data=large, location=f"{path.name}.data" if large else None)


def copy_graph(src: Path, dst: Path) -> None:
    """An independent copy of a graph and, for large models, its external data."""
    for a, b in ((src, dst), (src.with_name(src.name + ".data"), dst.with_name(dst.name + ".data"))):
        if a.exists():
            clone_file(a, b)


def transform_prefill(
    exported: ExportedGraphs, schedule, *, positions: str, grid_mode: str
) -> tuple[onnx.ModelProto, PassReport | None]:
    """The prefill graph of the engine: LightKV inserted for `schedule`, or the vanilla graph when it is None."""
    vanilla = onnx.load(str(exported.prefill))
    if schedule is None:
        return strip_roles(vanilla), None
    return insert_lightkv(vanilla, schedule, positions=positions, grid_mode=grid_mode)


def write_ort_engine(
    directory: Path,
    *,
    exported: ExportedGraphs,
    prefill: onnx.ModelProto,
    processor,
    manifest: Manifest,
) -> Manifest:
    """Write the ort-cpu engine's files into `directory`; returns its manifest (the pipeline adds the file
    records and writes it)."""
    for name in ("vision", "embed", "decode"):
        copy_graph(getattr(exported, name), directory / f"{name}.onnx")
    save_graph(prefill, directory / "prefill.onnx")
    processor.save_pretrained(str(directory / PROCESSOR_DIR))
    return replace(manifest, target="ort-cpu")


def build_engine(
    name: str,
    directory: Path,
    *,
    destination: Path,
    exported: ExportedGraphs,
    prefill,
    processor,
    manifest: Manifest,
    config=None,
) -> Manifest:
    """The target interface (targets/__init__.py): the ort-cpu engine's files into `directory`."""
    return write_ort_engine(directory, exported=exported, prefill=prefill, processor=processor, manifest=manifest)


def open_sessions(directory: Path, manifest: Manifest) -> dict:
    """One ONNX Runtime CPU session per graph."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Idle ORT workers otherwise spin for a while after each run and starve the host work between graphs
    # (plan, embedding scatter) and the next graph's own threads.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return {
        name: ort.InferenceSession(str(directory / f"{name}.onnx"), options, providers=["CPUExecutionProvider"])
        for name in ("vision", "embed", "prefill", "decode")
    }
