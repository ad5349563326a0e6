"""TensorRT engine targets: trt-sm80 | trt-sm86 | trt-sm89 | trt-sm90 | trt-sm100 | trt-sm120, and trt (the local GPU).

`build_trt_engine` lowers LightKVMerge to the AOT plugins (passes/lower_trt_plugin.py), parses the ONNX model, builds
with fp16 or bf16, optimization profiles, a timing cache, and returns the metadata manifest.json records. An engine
is three plans (ENGINES): vision, embed, and step, which is prefill and decode as one engine over one copy of the
weights (`step_graph`, an If on BRANCH; `step_profiles`, a profile per branch), opened as two sessions. A TensorRT
target needs TensorRT and a GPU of the target's compute capability; without them `check_trt_available` raises
TargetUnavailableError naming what is missing. The plugin kernels are compiled for the target either way
(`compile_target_kernels`), so a build can keep those artifacts. `tensorrt` is imported lazily, here and in plugins/.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnx

from lightkv_export import contract
from lightkv_export.artifacts import Manifest
from lightkv_export.errors import InputError, LightKVError
from lightkv_export.method.merge_plan import OUT_SLOTS, lowered_feeds, stage_input_names
from lightkv_export.method.schedule import parse_schedule
from lightkv_export.models.positions import SCHEMES
from lightkv_export.passes.join_branches import BRANCH, JOINED, join_branches
from lightkv_export.passes.lower_trt_plugin import lower_trt_plugin
from lightkv_export.triton_backend.codec import Limits

if TYPE_CHECKING:
    from lightkv_export.images import ImageHost

TRT_TARGETS: dict[str, tuple[int, int]] = {
    "trt-sm80": (8, 0),
    "trt-sm86": (8, 6),
    "trt-sm89": (8, 9),
    "trt-sm90": (9, 0),
    "trt-sm100": (10, 0),
    "trt-sm120": (12, 0),
}
LOCAL_TARGET = "trt"
# AOT Python plugins (tensorrt.plugin.aot_impl) arrived in TensorRT 10.9; an If whose two branches give outputs of
# different shapes (the step engine: prefill's outputs against decode's) in 10.11 (release notes, condition-dependent
# shapes: same rank, any shapes).
MIN_TENSORRT = (10, 11)
Precision = Literal["fp16", "bf16"]


class TargetUnavailableError(LightKVError):
    """An engine target this machine cannot build: TensorRT or a GPU of the right compute capability is missing."""


def parse_trt_target(name: str) -> tuple[int, int] | None:
    """'trt-sm90' -> (9, 0); 'trt' -> None (whatever GPU is local). Unknown names are InputErrors."""
    if name == LOCAL_TARGET:
        return None
    if name not in TRT_TARGETS:
        raise InputError(
            f"TensorRT target {name!r} is unknown; expected {LOCAL_TARGET!r} (the local GPU) or one of "
            f"{', '.join(TRT_TARGETS)}."
        )
    return TRT_TARGETS[name]


def sm_name(capability: tuple[int, int]) -> str:
    """(9, 0) -> 'sm90', the GPU target name of the kernel compiler."""
    return f"sm{capability[0]}{capability[1]}"


def _local_capability() -> tuple[int, int] | None:
    import torch

    return tuple(torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else None  # type: ignore[return-value]


def version_tuple(version: str) -> tuple[int, ...]:
    """'10.9.0.34' -> (10, 9, 0, 34); stops at the first part that is not a number ('10.13.0rc1' -> (10, 13))."""
    parts = []
    for part in version.split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


def missing_tensorrt() -> str | None:
    """What is missing for the TensorRT targets, or None: TensorRT >= MIN_TENSORRT with tensorrt.plugin.aot_impl."""
    needed = (
        f"TensorRT >= {'.'.join(map(str, MIN_TENSORRT))} (ahead-of-time Python plugins, tensorrt.plugin.aot_impl; "
        "conditionals whose branches give outputs of different shapes)"
    )
    try:
        import tensorrt
    except ImportError:
        return f"the TensorRT Python package, {needed} (pip install tensorrt, on a machine with an NVIDIA driver)"
    try:
        import tensorrt.plugin as trtp
    except ImportError:
        trtp = None
    version = getattr(tensorrt, "__version__", "unknown")
    if version_tuple(version) < MIN_TENSORRT or not hasattr(trtp, "aot_impl"):
        return f"{needed}; this is TensorRT {version}"
    return None


def check_trt_available(target: str) -> tuple[int, int]:
    """The compute capability to build for; TargetUnavailableError if TensorRT or a matching GPU is missing."""
    wanted = parse_trt_target(target)
    missing = [problem] if (problem := missing_tensorrt()) else []
    local = _local_capability()
    if local is None:
        missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
    elif wanted is not None and local != wanted:
        missing.append(f"a GPU of compute capability {wanted[0]}.{wanted[1]} (this one is {local[0]}.{local[1]})")
    if missing:
        raise TargetUnavailableError(
            f"cannot build target {target}: missing {' and '.join(missing)}. TensorRT engines are built on the GPU "
            "they run on; the plugin kernels were still compiled for the target (see the kernels/ directory)."
        )
    assert local is not None
    return local


def compile_target_kernels(target: str, out_dir: Path, dtypes: Sequence[str] = ("fp16", "bf16")) -> Path:
    """Compile the plugin kernels for `target` into out_dir (PTX, cubin, summary.json); needs no GPU or TensorRT."""
    from plugins.lightkv.aot import build

    capability = parse_trt_target(target) or check_trt_available(target)
    build(out_dir, [sm_name(capability)], list(dtypes))
    return out_dir / "summary.json"


@dataclass(frozen=True)
class Profile:
    """One optimization profile: input name -> (min, opt, max) shapes; `extra_memory_target` (TensorRT's, a fraction
    of the weight memory the profile would add unconstrained), None for TensorRT's default."""

    shapes: Mapping[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
    extra_memory_target: float | None = None


@dataclass
class EngineInfo:
    """What manifest.json records about a TensorRT engine."""

    target: str
    tensorrt_version: str
    compute_capability: str
    precision: str
    profiles: list[dict[str, Any]]
    schedule: Any
    onnx_sha256: str
    engine_sha256: str
    plugin_kernels: str
    extra: dict[str, Any] = field(default_factory=dict)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a graph holds: initializers and tensor attributes, subgraphs (If / Loop bodies) included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _tensors(sub)


def external_data_files(onnx_path: Path) -> list[Path]:
    """The external data files `onnx_path` refers to (e.g. model.onnx.data), sorted, each once."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    locations = {
        entry.value
        for tensor in _tensors(model.graph)
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return [onnx_path.parent / loc for loc in sorted(locations)]


def onnx_sha256(onnx_path: Path) -> str:
    """SHA-256 of the model file followed by its external data files: a change to the weights changes the hash."""
    digest = hashlib.sha256()
    for path in [onnx_path, *external_data_files(onnx_path)]:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):  # streamed: weight files run to many GB
                digest.update(chunk)
    return digest.hexdigest()


def _attach_timing_cache(config: Any, timing_cache: Path | None) -> None:
    """Reuse `timing_cache` when it came from this TensorRT version and GPU; otherwise start an empty one."""
    cached = timing_cache.read_bytes() if timing_cache and timing_cache.exists() else b""
    if config.set_timing_cache(config.create_timing_cache(cached), ignore_mismatch=False):
        return
    # A cache from another TensorRT version or device: its timings would mislead the tactic choice.
    print(
        f"lightkv: timing cache {timing_cache} does not match this TensorRT and GPU; starting a fresh one.",
        file=sys.stderr,
    )
    if not config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
        raise RuntimeError("TensorRT refused an empty timing cache")


def build_trt_engine(
    onnx_path: Path,
    out_dir: Path,
    *,
    target: str,
    precision: Precision,
    profiles: Sequence[Profile],
    schedule: Any = None,
    timing_cache: Path | None = None,
    workspace_bytes: int = 8 << 30,
) -> EngineInfo:
    """Build out_dir/model.plan from an ONNX model holding LightKVMerge nodes; returns the engine's metadata."""
    if precision not in ("fp16", "bf16"):
        raise InputError(f"precision {precision!r} is not supported for TensorRT; expected fp16 or bf16.")
    if not profiles:
        raise InputError("at least one optimization profile (min/opt/max shapes per dynamic input) is needed.")
    out_dir.mkdir(parents=True, exist_ok=True)
    kernels = compile_target_kernels(target, out_dir / "kernels", [precision])  # kept even if the build fails
    capability = check_trt_available(target)

    import tensorrt as trt

    from plugins.lightkv.trt_plugin import register_plugins

    register_plugins(sm_name(capability))
    # The graph alone, weights left on disk: a 7B model's weights are far past protobuf's 2 GiB message limit.
    # The parser resolves external data relative to `path`, i.e. next to the source model.
    lowered = lower_trt_plugin(onnx.load(str(onnx_path), load_external_data=False)).SerializeToString()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(lowered, path=str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    for prof in profiles:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in prof.shapes.items():
            p.set_shape(name, lo, opt, hi)
        if prof.extra_memory_target is not None:
            p.extra_memory_target = prof.extra_memory_target
        config.add_optimization_profile(p)
    _attach_timing_cache(config, timing_cache)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build {onnx_path} for {target}; rerun with a verbose logger.")
    engine = bytes(plan)
    (out_dir / "model.plan").write_bytes(engine)
    if timing_cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    info = EngineInfo(
        target=target,
        tensorrt_version=trt.__version__,
        compute_capability=f"{capability[0]}.{capability[1]}",
        precision=precision,
        profiles=[{k: [list(s) for s in v] for k, v in p.shapes.items()} for p in profiles],
        schedule=schedule,
        onnx_sha256=onnx_sha256(Path(onnx_path)),
        engine_sha256=_sha256(engine),
        plugin_kernels=str(kernels.relative_to(out_dir)),
    )
    (out_dir / "engine.json").write_text(json.dumps(info.__dict__, indent=2, default=str) + "\n")
    return info


# --- the pipeline's entry points -------------------------------------------------------------------------------

GRAPHS = ("vision", "embed", "prefill", "decode")  # the graphs an engine runs (runtime.open_sessions' keys)
STEP = "step"  # prefill and decode: one engine over passes/join_branches.py's graph, a profile per branch
ENGINES = ("vision", "embed", STEP)  # the plan directories: vision/model.plan, embed/model.plan, step/model.plan
MAX_BATCH = 8
# The served limits' defaults (triton_backend/codec.py Limits) bound the profiles: a request the server accepts fits
# them, and a config.pbtxt that raises a limit past them needs the engine rebuilt with a larger profile.
MAX_IMAGES = Limits().max_images  # images per request the prefill profile admits
MAX_SEQUENCE = Limits().max_sequence_length  # template + images + prompt + new tokens of one row
MAX_TEXT_TOKENS = 2048
MAX_DECODE_CONTEXT = 8192


# Aspect ratios (height / width) the vision profile's max covers: the same pixels in a long strip hold more
# windows (Qwen2.5-VL's window order, segment lengths) than in a square.
PROFILE_ASPECTS = (1.0, 0.5, 2.0, 1 / 3, 3.0, 0.1, 10.0, 0.02, 50.0, 1 / 200, 200.0)  # 200: the processors' limit


def image_extremes(images: ImageHost) -> list[tuple[int, int]]:
    """(height, width) images at the processor's smallest and largest pixel counts, in several aspect ratios."""
    low, high = images.pixel_range()
    sizes = []
    for pixels in (low, high):
        for aspect in PROFILE_ASPECTS:
            h = max(1, round(math.sqrt(pixels * aspect)))
            w = max(1, pixels // h)
            if max(h, w) > 200 * min(h, w):  # rounding took the strip past the processors' limit of 200
                h, w = (h, -(-h // 200)) if h > w else (-(-w // 200), w)
            if min(h, w) >= images.min_side:
                sizes.append((h, w))
    return sizes


def vision_profile(images: ImageHost, image_size: tuple[int, int]) -> dict[str, tuple]:
    """(min, opt, max) of every vision-graph input: elementwise over images the processor can produce, opt at the
    reference image. A processor that crops to one size gives min = opt = max."""
    opt = images.feed_shapes(*image_size)
    shapes = [images.feed_shapes(h, w) for h, w in image_extremes(images)] + [opt]
    return {
        name: (
            tuple(min(s[name][i] for s in shapes) for i in range(len(opt[name]))),
            tuple(opt[name]),
            tuple(max(s[name][i] for s in shapes) for i in range(len(opt[name]))),
        )
        for name in opt
    }


def max_image_tokens(images: ImageHost) -> int:
    """The most tokens one image can put in the sequence (its layout at the processor's largest size)."""
    return max(images.layout(h, w).tokens for h, w in image_extremes(images))


def engine_profiles(manifest: Manifest, images: ImageHost) -> dict[str, Profile]:
    """(min, opt, max) shapes per dynamic input of each graph: ranges from the family's image side (`images`:
    the processor's smallest and largest images) and the reference request.

    opt is the reference request (one image of `Manifest.image_size`, the reference prompt, batch 1); max admits
    MAX_BATCH rows of MAX_IMAGES images of the largest size and MAX_TEXT_TOKENS text tokens.
    """
    ref = manifest.reference_request
    d, hkv, hd = manifest.hidden_size, manifest.num_kv_heads, manifest.head_dim
    seq, vision = ref.seq_len, ref.vision_tokens
    max_seq = min(MAX_IMAGES * max(max_image_tokens(images), vision) + MAX_TEXT_TOKENS, MAX_SEQUENCE)
    b = (1, 1, MAX_BATCH)

    def dims(*per_axis: tuple[int, int, int]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        return tuple(tuple(axis[k] for axis in per_axis) for k in range(3))  # type: ignore[return-value]

    s, one = (2, seq, max_seq), (1, 1, 1)
    lead = [(n, n, n) for n in SCHEMES[manifest.position_scheme].lead]
    prefill = {
        contract.INPUTS_EMBEDS: dims(b, s, (d, d, d)), contract.POSITION_IDS: dims(*lead, b, s),
        contract.LENGTHS: dims(b),
    }  # fmt: skip
    stages = parse_schedule(manifest.schedule, manifest.num_layers).stages if manifest.schedule else ()
    for k, stage in enumerate(stages):
        windows = stage.windows**2
        w = (1, windows, windows * MAX_IMAGES * MAX_BATCH)  # >= 1: a stage that merges nothing gets a dummy window
        n = (2, -(-vision // windows), max_seq)
        text = (1, seq - vision, MAX_TEXT_TOKENS)
        names = stage_input_names(k)
        prefill |= {
            names["win_index"]: dims(w, n), names["win_r"]: dims(w), names["out_lengths"]: dims(b),
            names["text_index"]: dims(b, text), names["text_valid"]: dims(b, text),
            names[OUT_SLOTS]: dims((1, ref.kv_lengths[stage.layer], max_seq)),  # S' after this stage
        }  # fmt: skip
    decode: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {
        contract.INPUTS_EMBEDS: dims(b, one, (d, d, d)),
        contract.POSITION_IDS: dims(*lead, b, one),
    }
    for i, length in enumerate(ref.kv_lengths):
        past = (1, length, MAX_DECODE_CONTEXT)
        for kv in ("key", "value"):
            decode[contract.past(i, kv)] = dims(b, (hkv, hkv, hkv), past, (hd, hd, hd))
        decode[contract.past_mask(i)] = dims(b, past)
    return {
        "vision": Profile(vision_profile(images, tuple(manifest.image_size))),
        "embed": Profile({contract.INPUT_IDS: dims(b, (1, seq, max_seq))}),
        "prefill": Profile(prefill),
        "decode": Profile(decode),
    }


def step_graph(prefill: onnx.ModelProto, decode: onnx.ModelProto) -> onnx.ModelProto:
    """The step engine's graph: the prefill lowered to the plugins (its out_slots inputs added) and the decode
    step, joined under one If (passes/join_branches.py) over one set of weights."""
    return join_branches({"prefill": lower_trt_plugin(prefill), "decode": decode})


def step_profiles(profiles: Mapping[str, Profile]) -> list[Profile]:
    """The step engine's optimization profiles, one per branch in JOINED order (so profile i runs branch i): the
    branch's own inputs over their ranges, the other branch's fixed at its opt shapes (the reference request, a
    consistent set of shapes), which the runtime feeds as resident zeros that the branch not taken never reads.
    Profiles after the first may add no weight memory (extra_memory_target 0): by default TensorRT may keep a profile's
    own copies of weights in the layouts its tactics prefer, which would undo the sharing."""
    out = []
    for index, branch in enumerate(JOINED):
        shapes = {}
        for name in JOINED:
            for key, (low, opt, high) in profiles[name].shapes.items():
                shapes[f"{name}/{key}"] = (low, opt, high) if name == branch else (opt, opt, opt)
        out.append(Profile(shapes, extra_memory_target=None if index == 0 else 0.0))
    return out


def _write_graphs(onnx_dir: Path, exported, prefill: onnx.ModelProto) -> dict[str, Path]:
    """The graphs TensorRT builds from, written to `onnx_dir` over one weights file (passes/share_weights.py,
    streamed one tensor at a time from the export): vision.onnx, embed.onnx and step.onnx (`step_graph`)."""
    from lightkv_export.artifacts import WEIGHTS_FILE
    from lightkv_export.export import strip_roles
    from lightkv_export.passes.share_weights import share_weights

    onnx_dir.mkdir(parents=True, exist_ok=True)
    models = {}
    for name in GRAPHS:
        source = getattr(exported, name)
        if name == "prefill":  # a copy: the passes below work in place, and the caller's prefill stays as it was
            graph = onnx.ModelProto()
            graph.CopyFrom(prefill)
        else:
            graph = onnx.load(str(source), load_external_data=False)
        models[name] = (strip_roles(graph), source.parent)
    share_weights(models, onnx_dir / WEIGHTS_FILE)
    graphs = {"vision": models["vision"][0], "embed": models["embed"][0]}
    graphs[STEP] = step_graph(models["prefill"][0], models["decode"][0])
    paths = {}
    for name, graph in graphs.items():
        paths[name] = onnx_dir / f"{name}.onnx"
        onnx.save(graph, str(paths[name]))
    return paths


def build_engine(
    target: str,
    directory: Path,
    *,
    destination: Path,
    exported,
    prefill: onnx.ModelProto,
    processor,
    manifest: Manifest,
    config,
) -> Manifest:
    """pipeline.build_target for trt-*: kernels first (kept whatever happens), then the TensorRT plans (ENGINES)
    written into `directory` (the pipeline's staging directory for `destination`). Returns the engine's manifest.

    The kernels land in `<destination>-kernels/` (complete or absent), so a missing TensorRT or GPU still leaves
    the compiled plugin kernels for the target.
    """
    from lightkv_export.artifacts import PROCESSOR_DIR, promote, staging

    precision: Precision = "bf16" if manifest.dtype == "bfloat16" else "fp16"
    kernels_dir = destination.with_name(f"{destination.name}-kernels")
    if parse_trt_target(target) is not None:
        with staging(kernels_dir) as tmp:
            compile_target_kernels(target, tmp, [precision])
            promote(tmp, kernels_dir)
    try:
        capability = check_trt_available(target)
    except TargetUnavailableError as exc:
        where = f" Kernels for {target}: {kernels_dir}." if kernels_dir.exists() else ""
        raise TargetUnavailableError(f"{exc}{where}") from None
    graphs = _write_graphs(directory / "onnx", exported, prefill)
    from lightkv_export.models.registry import get_family

    images = get_family(manifest.family).image_host(processor.to_dict(), max_pixels=manifest.max_image_pixels)
    per_graph = engine_profiles(manifest, images)
    profiles = {"vision": [per_graph["vision"]], "embed": [per_graph["embed"]], STEP: step_profiles(per_graph)}
    infos = {}
    for name in ENGINES:
        infos[name] = build_trt_engine(
            graphs[name],
            directory / name,
            target=target,
            precision=precision,
            profiles=profiles[name],
            schedule=manifest.schedule,
            timing_cache=destination.parent / f".{target}.timing-cache",
        ).__dict__
    processor.save_pretrained(str(directory / PROCESSOR_DIR))
    extra = {"compute_capability": f"{capability[0]}.{capability[1]}", "tensorrt": infos}
    # Every plan embeds the weights of its graph: prefill and decode are one plan, so the LLM's weights are held
    # once; the vision tower's and the embedding table's are in their own plans.
    held = sum((directory / name / "model.plan").stat().st_size for name in ENGINES)
    extra = json.loads(json.dumps(extra, default=str))
    return replace(manifest, target=target, weight_bytes=held, extra={**manifest.extra, **extra})  # keeps the context


# TensorRT DataType name -> torch dtype. Through torch, not trt.nptype: numpy has no bfloat16, and bf16 engines are
# the point of --dtype bfloat16.
TORCH_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT8": "int8",
    "UINT8": "uint8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
}


def torch_dtype(trt_dtype: Any) -> Any:
    """The torch dtype of a TensorRT tensor dtype (trt.DataType); InputError for one this runtime does not carry."""
    import torch

    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    if name not in TORCH_DTYPES:
        raise InputError(f"TensorRT tensor dtype {name} is not supported by this runtime ({', '.join(TORCH_DTYPES)}).")
    return getattr(torch, TORCH_DTYPES[name])


def to_device(array: np.ndarray, dtype: Any, name: str, device: str = "cuda") -> Any:
    """A feed as a contiguous CUDA tensor of the engine's dtype. Floats are cast (fp32 host data into an fp16 or
    bf16 engine); any other mismatch would be reinterpreted bytes, so it is an error."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor.dtype != dtype and not (tensor.dtype.is_floating_point and dtype.is_floating_point):
        raise InputError(f"input {name!r} is {tensor.dtype}, the engine expects {dtype}.")
    return tensor.to(device=device, dtype=dtype)


def to_host(tensor: Any) -> np.ndarray:
    """An output as numpy; bf16 widens to fp32 (exact), since numpy has no bfloat16."""
    import torch

    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.cpu().numpy()


def load_plan(plan_path: Path) -> Any:
    """The engine in `plan_path`, deserialized on the local GPU once the LightKV plugins are registered for it."""
    import tensorrt as trt
    import torch

    from plugins.lightkv.trt_plugin import register_plugins

    register_plugins(sm_name(torch.cuda.get_device_capability(0)))
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
    if engine is None:
        raise InputError(f"TensorRT could not load {plan_path}; rebuild the engine for this GPU and TensorRT.")
    return engine


class TrtSession:
    """One optimization profile of a TensorRT engine behind the runtime's Session interface (numpy in, numpy out,
    on the local GPU), with an execution context of its own.

    `prefix` names one branch of the step engine ("prefill/" or "decode/", run by profile `profile`): the session
    shows that branch's inputs and outputs under their own graph's names, and feeds every other input (BRANCH, and
    the other branch's at the fixed shapes its profile admits) from device tensors bound once, at open.

    Output shapes follow from the input shapes (after a LightKV stage, from that stage's out_slots dimension, which
    `run` adds from the plan); TensorRT allocates the outputs through the session's one output allocator, so no
    buffer size has to be guessed. Tensors cross the host boundary as torch tensors of the
    engine's dtypes, so bf16 engines run: bf16 outputs come back as fp32 numpy, which casts back to bf16 exactly
    when the runtime feeds them to the next graph.
    """

    def __init__(self, engine: Any, *, profile: int = 0, prefix: str = "", device: str = "cuda") -> None:
        import tensorrt as trt
        import torch

        self.trt, self.torch, self.engine, self.prefix, self.device = trt, torch, engine, prefix, device
        self.profile = profile
        # Sized for this context's profile, not the largest one: the step engine's two contexts hold the
        # activation memory of a prefill and of a decode step, not two of a prefill.
        self.context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.ON_PROFILE_CHANGE)
        stream = self._stream()
        if not self.context.set_optimization_profile_async(profile, stream.cuda_stream):
            raise RuntimeError(f"TensorRT refused optimization profile {profile}")
        stream.synchronize()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.all_outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.inputs = [n[len(prefix) :] for n in inputs if n.startswith(prefix)]
        self.output_names = [n[len(prefix) :] for n in self.all_outputs if n.startswith(prefix)]
        self.resident = {}  # kept alive: the context holds their addresses
        for name in inputs:
            if not name.startswith(prefix):
                self.resident[name] = self._resident(name, profile)
                self._set_input(name, self.resident[name])
        # One allocator for the session's life: the context keeps every allocator it is given alive, so a new one
        # per run would hold a new set of buffers per decode step. Its buffers grow, never shrink, and outputs
        # are copied to the host before the next run writes them again.
        self.allocator = _output_allocator(trt, torch, device)
        self._attach_allocator()

    def _stream(self) -> Any:
        if self.device == "cuda":
            return self.torch.cuda.current_stream()
        from types import SimpleNamespace  # a host "device" (the unit tests' stand-in engines): nothing to wait on

        return SimpleNamespace(cuda_stream=0, synchronize=lambda: None)

    def _resident(self, name: str, profile: int) -> Any:
        """BRANCH set to this session's branch, or zeros of the one shape `profile` admits for `name`."""
        torch = self.torch
        if name == BRANCH:  # where the engine reads it: on the host if the builder made it a shape input
            host = self.engine.get_tensor_location(name) == self.trt.TensorLocation.HOST
            return torch.tensor(self.prefix == f"{JOINED[0]}/", dtype=torch.bool, device="cpu" if host else self.device)
        low, _, high = (tuple(d) for d in self.engine.get_tensor_profile_shape(name, profile))
        if low != high:
            raise InputError(f"engine input {name!r} is not fixed in profile {profile} ({low}..{high}); rebuild.")
        return torch.zeros(low, dtype=torch_dtype(self.engine.get_tensor_dtype(name)), device=self.device)

    def _set_input(self, name: str, tensor: Any) -> None:
        if not self.context.set_input_shape(name, tuple(tensor.shape)):
            low, _, high = self.engine.get_tensor_profile_shape(name, self.profile)
            raise InputError(
                f"input {name!r} of shape {tuple(tensor.shape)} is outside the engine's profile "
                f"({tuple(low)} .. {tuple(high)}); rebuild with a profile that admits it."
            )
        self.context.set_tensor_address(name, tensor.data_ptr())

    def _attach_allocator(self) -> None:
        for name in self.all_outputs:  # the other branch's too: the If yields empty tensors for them
            self.context.set_output_allocator(name, self.allocator)

    def get_outputs(self) -> list[Any]:
        from types import SimpleNamespace

        return [SimpleNamespace(name=n) for n in self.output_names]

    def run(self, output_names, feeds):
        allocator = self.allocator
        keep_alive = []
        feeds = {**lowered_feeds(feeds), **feeds}  # each stage's out_slots [S'] from its plan's out_lengths
        if missing := [n for n in self.inputs if n not in feeds]:
            raise InputError(f"the engine's inputs {missing} were not fed; it takes {self.inputs}.")
        for name in self.inputs:
            dtype = torch_dtype(self.engine.get_tensor_dtype(self.prefix + name))
            tensor = to_device(feeds[name], dtype, name, self.device)
            keep_alive.append(tensor)
            self._set_input(self.prefix + name, tensor)
        stream = self._stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        out = []
        for name in output_names or self.output_names:
            name = self.prefix + name
            dtype = torch_dtype(self.engine.get_tensor_dtype(name))
            shape = allocator.shapes[name]
            nbytes = int(np.prod(shape)) * dtype.itemsize  # the buffer may be larger (and is >= 1 byte)
            out.append(to_host(allocator.buffers[name][:nbytes].view(dtype).reshape(shape)))
        return out


def _output_allocator(trt, torch, device: str = "cuda"):
    """TensorRT's output allocator over torch buffers, one per output name, reused across runs and grown when a
    run needs more (Polygraphy's runner does the same)."""

    class Allocator(trt.IOutputAllocator):
        def __init__(self) -> None:
            super().__init__()
            self.buffers: dict[str, Any] = {}
            self.shapes: dict[str, tuple[int, ...]] = {}

        def reallocate_output_async(self, tensor_name, memory, size, alignment, stream):
            buffer = self.buffers.get(tensor_name)
            if buffer is None or buffer.numel() < int(size):
                buffer = torch.empty(max(int(size), 1), dtype=torch.uint8, device=device)
                self.buffers[tensor_name] = buffer
            return buffer.data_ptr()

        def notify_shape(self, tensor_name, shape):
            self.shapes[tensor_name] = tuple(shape)

    return Allocator()


def open_sessions(directory: Path, manifest: Manifest) -> dict[str, TrtSession]:
    """runtime.open_sessions for TensorRT engine directories: prefill and decode are two sessions (contexts) over
    the one step engine, profile i running branch JOINED[i] (`step_profiles`)."""
    check_trt_available(manifest.target)
    plans = {name: load_plan(directory / name / "model.plan") for name in ENGINES}
    sessions = {name: TrtSession(plans[name]) for name in ENGINES if name != STEP}
    for profile, branch in enumerate(JOINED):
        sessions[branch] = TrtSession(plans[STEP], profile=profile, prefix=f"{branch}/")
    return sessions
