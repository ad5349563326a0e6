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
initializers). Prefill and decode run as the two branches of one session over both graphs
(passes/join_branches.py, built in memory at load), so ONNX Runtime pre-packs each MatMul weight once for both and
the engine holds the weights once, pre-packed; the mapped originals it packs from are dropped from the process as
it goes (rss.DroppedPages).

The builder writes into the directory it is given; the pipeline stages, verifies and promotes it (artifacts.py).
"""

from __future__ import annotations

import mmap
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx.external_data_helper import ExternalDataInfo

from lightkv_export import contract
from lightkv_export.artifacts import PROCESSOR_DIR, WEIGHTS_FILE, Manifest
from lightkv_export.passes.join_branches import BRANCH, JOINED, join_branches
from lightkv_export.rss import DroppedPages

if TYPE_CHECKING:  # the build side (export, passes) stays out of a process that only runs engines
    from lightkv_export.export import ExportedGraphs
    from lightkv_export.passes.insert_lightkv import PassReport

GRAPHS = ("vision", "embed", "prefill", "decode")


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


# Graphs opened as sessions of their own whose intermediates are per-request and large (S x S attention scores, the
# vision tower's activations): without ONNX Runtime's CPU arena they go back to the allocator after each run
# instead of staying held at their peak for the life of the process. Embed allocates little, the same every step:
# it keeps the arena. (The joined prefill/decode session has a shrinkable arena instead: `_register_arena`.)
NO_ARENA = frozenset({"vision", "prefill"})


def session_options(shared: dict[str, object], *, arena: bool = True, prepack: bool = False, spin: bool = False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = arena
    # Idle workers would spin after a run and starve the host work between graphs (plan, embedding scatter) and the
    # next graph's own threads (each session has its own pool). `spin`: the prefill/decode session's workers spin
    # while its run lasts (waking sleeping ones costs about 10% of a decode step's many small MatMuls) and stop when
    # it ends.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if spin:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    if not prepack:
        # Pre-packing copies each weight into a per-session layout, and a shared original stays too: sessions
        # that share buffers use them as they are, so the weights are held once whatever their number.
        options.add_session_config_entry("session.disable_prepacking", "1")
    for name, value in shared.items():
        options.add_initializer(name, value)
    return options


def open_sessions(directory: Path, manifest: Manifest) -> dict:
    """ONNX Runtime CPU sessions for the engine, all over one read-only mapping of weights.bin: vision and embed
    use the mapped tensors as they are; prefill and decode are the branches of one session (passes/join_branches.py)
    whose MatMul weights are pre-packed once."""
    weights = MappedWeights(directory / WEIGHTS_FILE)
    sessions = shared_sessions(directory, [name for name in GRAPHS if name not in JOINED], weights)
    sessions.update(joined_sessions(directory, weights))
    return sessions


class MappedWeights:
    """weights.bin mapped read-only once, each tensor one OrtValue over it for every session that uses it."""

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            self.mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        self.array = np.frombuffer(self.mapping, dtype=np.uint8) if size else np.empty(0, np.uint8)
        self.values: dict[str, object] = {}

    def values_for(self, graph: onnx.ModelProto) -> dict[str, object]:
        import onnxruntime as ort

        views = mapped_initializers(graph, self.array)
        for key, view in views.items():
            if key not in self.values:
                self.values[key] = ort.OrtValue.ortvalue_from_numpy(view)
        return {key: self.values[key] for key in views}


def joined_sessions(directory: Path, weights: MappedWeights) -> dict:
    """{"prefill": ..., "decode": ...}: views of one session over `join_branches` of the engine's two graphs, opened
    when either is first run (or `load`ed): a process that only prepares requests never packs the weights."""
    branches = {name: onnx.load(str(directory / f"{name}.onnx"), load_external_data=False) for name in JOINED}
    opened = OnFirstUse(lambda: _open_joined(directory, weights, join_branches(branches)))
    in_place = {name: any(v.name == contract.past_length(0) for v in g.graph.input) for name, g in branches.items()}
    return {name: (InPlaceBranch if in_place[name] else Branch).of(opened, name, branches) for name in JOINED}


def _open_joined(directory: Path, weights: MappedWeights, joined: onnx.ModelProto):
    import onnxruntime as ort

    used = weights.values_for(joined)
    options = session_options(used, arena=True, prepack=True, spin=True)
    options.add_session_config_entry("session.use_env_allocators", "1")  # the shrinkable arena (`_register_arena`)
    _register_arena()
    # The joined graph exists in memory only; its external-data references are checked against the directory.
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(directory))
    with DroppedPages(weights.mapping):  # the originals ONNX Runtime packs do not stay resident besides
        session = ort.InferenceSession(joined.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.shared_initializers = (weights, used)  # borrowed by ONNX Runtime: they must outlive the session
    return session


# The prefill/decode session allocates from one CPU arena, registered once per process, whose regions are each as
# large as the request that made them (kSameAsRequested) and which prefill runs shrink when they end
# (`shrink_at_end`): a prefill's large intermediates (each layer's attention scores, B x H x S x S) reuse one region
# from layer to layer instead of a fresh mapping and its page faults per layer, about 5% of a prefill at S = 1063,
# and the regions go back after the request. Decode steps allocate little, the same every step, and keep theirs.
_ARENA = {"registered": False, "lock": threading.Lock()}


def _register_arena() -> None:
    import onnxruntime as ort

    with _ARENA["lock"]:
        if not _ARENA["registered"]:
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))  # no cap, kSameAsRequested
            _ARENA["registered"] = True


def shrink_at_end():
    """RunOptions that return the arena's free regions when the run ends."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


class OnFirstUse:
    """A session opened by `open()` the first time it is asked for (once, whichever thread asks)."""

    def __init__(self, open_session) -> None:
        self.open_session, self.session, self.lock = open_session, None, threading.Lock()

    def get(self):
        with self.lock:
            if self.session is None:
                self.session = self.open_session()
            return self.session


def shared_sessions(directory: Path, names, weights: MappedWeights | None = None) -> dict:
    """Sessions for `directory`/<name>.onnx that use the mapped weights.bin tensors as they are (not pre-packed)."""
    import onnxruntime as ort

    weights = weights or MappedWeights(directory / WEIGHTS_FILE)
    sessions = {}
    for name in names:
        path = directory / f"{name}.onnx"
        used = weights.values_for(onnx.load(str(path), load_external_data=False))
        options = session_options(used, arena=name not in NO_ARENA)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        session.shared_initializers = (weights, used)  # borrowed by ONNX Runtime: they must outlive the session
        sessions[name] = session
    return sessions


@dataclass(frozen=True)
class Arg:
    """A graph input or output as a branch of the joined session shows it (ONNX Runtime's NodeArg, renamed)."""

    name: str
    shape: list
    type: str


def _arg(value: onnx.ValueInfoProto) -> Arg:
    tensor = value.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim]
    return Arg(value.name, shape, f"tensor({onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)})")


def _idle_feed(value: onnx.ValueInfoProto) -> np.ndarray:
    """An empty tensor for an input of the branch not taken (its fixed dims kept, the symbolic ones 0)."""
    tensor = value.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else 0 for d in tensor.shape.dim]
    return np.zeros(shape, dtype=onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))


class Branch:
    """A session under a graph's own input and output names (runtime.Session): one branch of the joined session
    (`prefix` "<branch>/", the other branch's inputs fed `idle`, opened on first use), or a plain session."""

    def __init__(
        self, session, prefix: str = "", idle: dict[str, np.ndarray] | None = None,
        args: tuple[list[Arg], list[Arg]] | None = None, run_options=None,
    ) -> None:  # fmt: skip
        self._session, self.prefix, self.idle, self.run_options = session, prefix, idle or {}, run_options
        if args is None:
            args = self._args(session.get_inputs()), self._args(session.get_outputs())
        self.inputs, self.outputs = args

    @classmethod
    def of(cls, session: OnFirstUse, name: str, branches: dict[str, onnx.ModelProto]) -> Branch:
        # ONNX Runtime wants every graph input fed: the other branch's get empty tensors, which it never reads.
        idle = {BRANCH: np.array(name == JOINED[0])}
        for other in JOINED:
            if other != name:
                idle.update({f"{other}/{v.name}": _idle_feed(v) for v in branches[other].graph.input})
        graph = branches[name].graph
        args = [_arg(v) for v in graph.input], [_arg(v) for v in graph.output]
        # A prefill's large intermediates are per request: its runs return the arena's regions when they end.
        return cls(session, f"{name}/", idle, args, run_options=shrink_at_end() if name == JOINED[0] else None)

    @property
    def session(self):
        return self._session.get() if isinstance(self._session, OnFirstUse) else self._session

    def load(self) -> None:
        """Open the session now rather than on the first request."""
        _ = self.session

    def _args(self, node_args) -> list[Arg]:
        n = len(self.prefix)
        return [Arg(a.name[n:], a.shape, a.type) for a in node_args if a.name.startswith(self.prefix)]

    def get_inputs(self) -> list[Arg]:
        return self.inputs

    def get_outputs(self) -> list[Arg]:
        return self.outputs

    def run(self, output_names, feeds):
        names = [self.prefix + n for n in output_names or [o.name for o in self.outputs]]
        feeds = {**self.idle, **{self.prefix + k: v for k, v in feeds.items()}}
        return self.session.run(names, feeds, self.run_options)


class InPlaceBranch(Branch):
    """The fused decode graph's session or branch (runtime.InPlaceSession): its cache inputs and outputs are
    bound to the same numpy buffers through ONNX Runtime's IOBinding, so GroupQueryAttention writes each step's
    entries into them and nothing is copied back."""

    def run_in_place(self, output_names, feeds, buffers, aliases) -> list[np.ndarray]:
        import onnxruntime as ort

        binding = self.session.io_binding()
        values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in buffers.items()}  # no copies
        for name, array in self.idle.items():
            binding.bind_cpu_input(name, array)
        for name, array in feeds.items():
            binding.bind_cpu_input(self.prefix + name, np.ascontiguousarray(array))
        for name, value in values.items():
            binding.bind_ortvalue_input(self.prefix + name, value)
        for name in output_names:
            if name in aliases:
                binding.bind_ortvalue_output(self.prefix + name, values[aliases[name]])
            else:
                binding.bind_output(self.prefix + name)
        self.session.run_with_iobinding(binding)
        produced = binding.get_outputs()  # in the order bound
        return [buffers[aliases[n]] if n in aliases else v.numpy() for n, v in zip(output_names, produced, strict=True)]
