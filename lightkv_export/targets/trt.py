"""TensorRT engine targets: trt-sm80 | trt-sm86 | trt-sm89 | trt-sm90 | trt-sm100 | trt-sm120, and trt (the local GPU).

`build_trt_engine` lowers LightKVMerge to the AOT plugins (passes/lower_trt_plugin.py), parses the ONNX model, builds
with fp16 or bf16, optimization profiles, a timing cache, and returns the metadata manifest.json records. A TensorRT
target needs TensorRT and a GPU of the target's compute capability; without them `check_trt_available` raises
TargetUnavailableError naming what is missing. The plugin kernels are compiled for the target either way
(`compile_target_kernels`), so a build can keep those artifacts. `tensorrt` is imported lazily, here and in plugins/.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import onnx

from lightkv_export.errors import InputError, LightKVError
from lightkv_export.passes.lower_trt_plugin import lower_trt_plugin

TRT_TARGETS: dict[str, tuple[int, int]] = {
    "trt-sm80": (8, 0),
    "trt-sm86": (8, 6),
    "trt-sm89": (8, 9),
    "trt-sm90": (9, 0),
    "trt-sm100": (10, 0),
    "trt-sm120": (12, 0),
}
LOCAL_TARGET = "trt"
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


def check_trt_available(target: str) -> tuple[int, int]:
    """The compute capability to build for; TargetUnavailableError if TensorRT or a matching GPU is missing."""
    wanted = parse_trt_target(target)
    missing = []
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        missing.append("the TensorRT Python package (pip install tensorrt, on a machine with an NVIDIA driver)")
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
    """One optimization profile: input name -> (min, opt, max) shapes."""

    shapes: Mapping[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


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
    model = lower_trt_plugin(onnx.load(str(onnx_path)))
    lowered = model.SerializeToString()
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
        config.add_optimization_profile(p)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
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
        onnx_sha256=_sha256(Path(onnx_path).read_bytes()),
        engine_sha256=_sha256(engine),
        plugin_kernels=str(kernels.relative_to(out_dir)),
    )
    (out_dir / "engine.json").write_text(json.dumps(info.__dict__, indent=2, default=str) + "\n")
    return info
