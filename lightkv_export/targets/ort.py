"""The ort-cpu target: an engine directory of ONNX graphs that ONNX Runtime (CPU) runs with no native extension.

Layout (everything needed to run it; nothing refers back to the export cache):

    manifest.json            what was built from what: model, schedule, settings, versions, the SHA-256 and size
                             of every file, the expected KV bytes per layer for the reference request, the
                             weight bytes the engine holds at run time
    vision.onnx embed.onnx   the vanilla graphs, their large initializers as external data in weights.bin
    decode.onnx              the decode step with GroupQueryAttention over in-place per-layer caches
    prefill.onnx             the LightKV-transformed prefill (or the vanilla one for a vanilla engine), its
                             attention GroupQueryAttention too (both: passes/fuse_attention.py, after
                             passes/fuse_norms.py)
    weights.bin              every distinct large initializer of the four graphs, once (passes/share_weights.py)
    processor/               tokenizer, image processor and chat template

`open_sessions` memory-maps weights.bin once and gives every session the same buffers (ONNX Runtime's shared
initializers), so prefill and decode hold one copy of the weights between them, paged in from the file.

The builder writes into the directory it is given; the pipeline stages, verifies and promotes it (artifacts.py).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx.external_data_helper import ExternalDataInfo, load_external_data_for_model

from lightkv_export import contract
from lightkv_export.artifacts import PROCESSOR_DIR, WEIGHTS_FILE, Manifest

if TYPE_CHECKING:  # the build side (export, passes) stays out of a process that only runs engines
    from lightkv_export.export import ExportedGraphs
    from lightkv_export.passes.insert_lightkv import PassReport

GRAPHS = ("vision", "embed", "prefill", "decode")

LARGE_MODEL_BYTES = 1 << 30  # past this, graphs are written with external data (protobuf's 2 GiB limit)


def save_graph(model: onnx.ModelProto, path: Path, base_dir: Path | None = None) -> None:
    """Write `model` as a self-contained file at `path`; external data it refers to (relative to `base_dir`, e.g.
    the export cache for a prefill transformed on its structure only) is read in first."""
    if base_dir is not None and any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        load_external_data_for_model(model, str(base_dir))
    large = model.ByteSize() > LARGE_MODEL_BYTES
    onnx.save(model, str(path), save_as_external_data=large, location=f"{path.name}.data" if large else None)


def transform_prefill(
    exported: ExportedGraphs, schedule, *, positions: str, grid_mode: str
) -> tuple[onnx.ModelProto, PassReport | None]:
    """The prefill graph of the engine: LightKV inserted for `schedule`, or the vanilla graph when it is None.

    Read without its weights: a large model's stay in the export's external data (relative to
    exported.prefill.parent) and the pass rewires structure only; the engine writers stream them from there."""
    from lightkv_export.export import strip_roles
    from lightkv_export.passes.insert_lightkv import insert_lightkv

    vanilla = onnx.load(str(exported.prefill), load_external_data=False)
    if schedule is None:
        return strip_roles(vanilla, keep_role=contract.is_attention_role), None
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
    records and writes it). The graphs are read without their weights; the pass streams them into weights.bin."""
    from lightkv_export.passes.fuse_attention import fuse_decode_attention, fuse_prefill_attention
    from lightkv_export.passes.fuse_norms import fuse_norms
    from lightkv_export.passes.share_weights import share_weights

    models = {}
    for name in GRAPHS:
        source = exported.prefill if name == "prefill" else getattr(exported, name)
        graph = prefill if name == "prefill" else onnx.load(str(source), load_external_data=False)
        if name == "decode":
            graph = fuse_decode_attention(fuse_norms(graph)[0])
        elif name == "prefill":
            graph = fuse_prefill_attention(fuse_norms(graph)[0])
        models[name] = (graph, source.parent)
    shared = share_weights(models, directory / WEIGHTS_FILE)
    for name, (graph, _) in models.items():
        onnx.save(graph, str(directory / f"{name}.onnx"))
    processor.save_pretrained(str(directory / PROCESSOR_DIR))
    return replace(manifest, target="ort-cpu", weight_bytes=shared.unique_bytes)


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


def mapped_initializers(graph: onnx.ModelProto, weights: np.ndarray) -> dict[str, np.ndarray]:
    """The graph's initializers that live in weights.bin, as read-only views of the mapped file (no copies)."""
    views = {}
    for tensor in graph.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = ExternalDataInfo(tensor)
        if info.location != WEIGHTS_FILE:
            continue
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        view = weights[info.offset : info.offset + info.length].view(dtype)
        views[tensor.name] = view.reshape(tuple(tensor.dims))
    return views


# Graphs whose intermediates are per-request and large (S x S attention scores, the vision tower's activations):
# without ONNX Runtime's CPU arena they go back to the allocator after each run instead of staying held at their
# peak for the life of the process. Decode and embed allocate little, the same every step: they keep the arena.
NO_ARENA = frozenset({"vision", "prefill"})


def session_options(shared: dict[str, object], *, arena: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = arena
    # Idle ORT workers otherwise spin for a while after each run and starve the host work between graphs
    # (plan, embedding scatter) and the next graph's own threads.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Pre-packing copies each weight into a per-session layout (the original then stays too, being shared):
    # the shared buffers are used as they are, so the weights are held once whatever the number of sessions.
    options.add_session_config_entry("session.disable_prepacking", "1")
    for name, value in shared.items():
        options.add_initializer(name, value)
    return options


def open_sessions(directory: Path, manifest: Manifest) -> dict:
    """One ONNX Runtime CPU session per graph, all over one read-only mapping of weights.bin."""
    return shared_sessions(directory, GRAPHS)


def shared_sessions(directory: Path, names) -> dict:
    """Sessions for `directory`/<name>.onnx, each weights.bin tensor one OrtValue over the mapped file for all."""
    import onnxruntime as ort

    weights = np.memmap(directory / WEIGHTS_FILE, dtype=np.uint8, mode="r")
    values: dict[str, object] = {}  # one OrtValue per distinct tensor, handed to every session that uses it
    sessions = {}
    for name in names:
        path = directory / f"{name}.onnx"
        views = mapped_initializers(onnx.load(str(path), load_external_data=False), weights)
        for key, view in views.items():
            if key not in values:
                values[key] = ort.OrtValue.ortvalue_from_numpy(view)
        used = {key: values[key] for key in views}
        options = session_options(used, arena=name not in NO_ARENA)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        # ONNX Runtime borrows shared initializers: they (and the mapping under them) must outlive the session.
        session.shared_initializers = (weights, used)
        in_place = any(i.name == contract.past_length(0) for i in session.get_inputs())
        sessions[name] = InPlaceDecode(session) if in_place else session
    return sessions


class InPlaceDecode:
    """The fused decode graph's session (runtime.InPlaceSession): its cache inputs and outputs are bound to the
    same numpy buffers through ONNX Runtime's IOBinding, so GroupQueryAttention writes each step's entries into
    them and nothing is copied back."""

    def __init__(self, session) -> None:
        self.session = session

    def get_inputs(self):
        return self.session.get_inputs()

    def get_outputs(self):
        return self.session.get_outputs()

    def run(self, output_names, feeds):
        return self.session.run(output_names, feeds)

    def run_in_place(self, output_names, feeds, buffers, aliases) -> list[np.ndarray]:
        import onnxruntime as ort

        binding = self.session.io_binding()
        values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in buffers.items()}  # no copies
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name, value in values.items():
            binding.bind_ortvalue_input(name, value)
        for name in output_names:
            if name in aliases:
                binding.bind_ortvalue_output(name, values[aliases[name]])
            else:
                binding.bind_output(name)
        self.session.run_with_iobinding(binding)
        produced = binding.get_outputs()  # in the order bound
        return [buffers[aliases[n]] if n in aliases else v.numpy() for n, v in zip(output_names, produced, strict=True)]
