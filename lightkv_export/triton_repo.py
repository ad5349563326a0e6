"""Triton Inference Server model repository for lightkv_export engines: one model per engine directory.

    python -m lightkv_export.triton_repo engines/tiny-qwen-vl/r0.55/ort-cpu [ENGINE_DIR ...] --out repo

Layout written (atomically: a temporary sibling directory, then an atomic exchange; `.<repo>.lock` beside it, there
while a writer holds it, serialises writers):

    repo/
      .lightkv_repository                        marker: this tool wrote it and may update it (JSON: its models)
      lightkv_tiny-qwen-vl_r0.55_ort-cpu/
        config.pbtxt
        1/model.py                               lightkv_export/triton_backend/model.py
        1/engine/                                a copy of the engine directory (independent files)

Every model runs on the Python backend over `runtime.Engine`, which dispatches on the manifest target: ONNX
Runtime for `ort-cpu` (instance group KIND_CPU), the TensorRT engines for `trt-smXY` (KIND_GPU). TensorRT serving
is written but was not verified here (no GPU, no TensorRT on the build machine).

Decision: the engine is copied into the version directory rather than referenced by path, so the repository
carries its engines (it can be moved, mounted into a container, or served while engines/ is rebuilt). The copy is
a real one (`artifacts.clone_file`: a reflink where the filesystem offers one, else a full copy), never a hard
link, so a write through the repository can not change the engine it came from, nor the reverse.

Repositories are merged, not replaced: writing engines into an existing repository of ours keeps its other models
and replaces only the models of the same names. The new repository is still staged in a temporary sibling and put
in place in one step (`artifacts.promote`), under a lock, so concurrent writers cannot drop each other's models.
The models kept from the old repository are copied into the stage (reflinks where the file system can, so large
engines cost no space there; never hard links) and the old directory is removed right after the exchange, so no
two directories ever share a file. A directory without the marker file is never written into.

model.py imports lightkv_export: the server's Python must have the package installed, or be started by serve.py,
whose stub bootstrap puts this virtualenv's site directories on the stub's sys.path.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from lightkv_export.artifacts import (
    Manifest,
    clone_file,
    follow_link,
    locked,
    promote,
    read_manifest,
    remove_stale_partials,
    staging,
)
from lightkv_export.errors import InputError, LightKVError
from lightkv_export.triton_backend.codec import Batching, Limits

MARKER = ".lightkv_repository"
MODEL_TEMPLATE = Path(__file__).parent / "triton_backend" / "model.py"
ENGINE_SUBDIR = "engine"
VERSION = "1"
DEFAULT_MAX_NEW_TOKENS = 16
LIMIT_NOTES = {
    "max_prompt_chars": "prompt characters",
    "max_prompt_tokens": "prompt tokens (as plain text)",
    "max_images": "images per request",
    "max_image_pixels": "width x height of each image as sent",
    "max_image_tokens": "vision tokens of each image as the checkpoint's processor sizes it",
    "max_sequence_length": "template + prompt + each image's tokens + max_new_tokens",
    "kv_budget": "KV the running requests reserve together: a size, or a share of free memory (40%)",
    "max_batch": "requests decoded together in one step",
    "max_queue": "requests waiting for KV room; one more is refused (UNAVAILABLE)",
    "max_queue_s": "seconds a request may wait for KV room, then refused (UNAVAILABLE)",
}


def model_name(manifest: Manifest) -> str:
    """Triton model name: lightkv_<model>_r<ratio>_<target> (or _s<schedule>_), vanilla_<model>_<target>.

    Characters outside [A-Za-z0-9_.-] become "-" (Triton names are directory names and URL path segments).
    """
    model, target = manifest.model, manifest.target
    if manifest.vanilla:
        name = f"vanilla_{model}_{target}"
    elif manifest.ratio is not None:
        name = f"lightkv_{model}_r{manifest.ratio:g}_{target}"
    else:  # built from an explicit --schedule
        name = f"lightkv_{model}_s{manifest.schedule}_{target}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


def instance_kind(target: str) -> str:
    """KIND_CPU for ONNX Runtime on CPU, KIND_GPU for a TensorRT target; anything else is an InputError."""
    from lightkv_export.targets import target as target_named

    return target_named(target).instance_kind


def default_max_new_tokens(manifest: Manifest) -> int:
    """The max_new_tokens a request gets when it sends none: 16, capped at the engine's limit."""
    limit = manifest.max_new_tokens_limit
    return max(1, min(DEFAULT_MAX_NEW_TOKENS, limit))


def render_config(manifest: Manifest, instances: int = 1, batching: Batching | None = None) -> str:
    """config.pbtxt for one engine (pure: golden-file tested)."""
    batching = batching or Batching()
    target = manifest.target
    kind = instance_kind(target)
    # The schedule is a comment, not a parameter: model.py reads it from the engine's manifest.
    schedule = manifest.schedule.replace("\n", " ")
    variant = "vanilla (no LightKV)" if manifest.vanilla else f"LightKV, schedule {schedule}"
    where = "ONNX Runtime on CPU" if kind == "KIND_CPU" else f"TensorRT engines ({target}), not verified here"
    instance_note = (
        "# One instance: an ONNX Runtime session already uses every core (intra-op threads); more instances\n"
        "# would only contend for them and each would hold its own copy of the weights and its own KV budget."
        if kind == "KIND_CPU"
        else "# One instance per GPU: its scheduler owns the KV budget of that GPU."
    )
    limits = [*Limits().parameters().items(), *batching.parameters().items()]
    limit_lines = "\n".join(
        f'  {{ key: "{name}", value: {{ string_value: "{value}" }} }}{"," if i + 1 < len(limits) else ""}'
        f"  # {LIMIT_NOTES[name]}"
        for i, (name, value) in enumerate(limits)
    )
    return f"""\
# Generated by lightkv_export.triton_repo: {where}.
# Engine: {manifest.model}, target {target}, {variant}.
name: "{model_name(manifest)}"
backend: "python"

# Decoupled: the model streams each request's tokens as they come (Triton's /generate_stream with "stream": true,
# or gRPC streaming) and answers /generate with one response. Triton's own batcher stays off (max_batch_size 0):
# the model batches inside (lightkv_export/scheduler.py), admitting requests while their KV reservations (per-layer
# cache lengths after LightKV's merges, plus max_new_tokens) fit kv_budget, and decoding them in one step.
model_transaction_policy {{ decoupled: true }}
max_batch_size: 0

input [
  {{ name: "prompt", data_type: TYPE_STRING, dims: [ 1 ] }},  # UTF-8 text
  {{ name: "image", data_type: TYPE_STRING, dims: [ -1 ] }},  # PNG or JPEG, bytes or base64 text, one per image
  {{ name: "max_new_tokens", data_type: TYPE_INT32, dims: [ 1 ], optional: true }},  # default below
  {{ name: "stream", data_type: TYPE_BOOL, dims: [ 1 ], optional: true }}  # one response per token
]
output [
  {{ name: "text", data_type: TYPE_STRING, dims: [ 1 ] }},  # streamed: the new piece of text
  {{ name: "token_ids", data_type: TYPE_INT64, dims: [ -1 ] }},  # streamed: the new token
  {{ name: "vision_tokens_in", data_type: TYPE_INT64, dims: [ 1 ] }},
  {{ name: "vision_tokens_per_group", data_type: TYPE_INT64, dims: [ -1 ] }},  # per layer group, layer order
  {{ name: "kv_bytes", data_type: TYPE_INT64, dims: [ 1 ] }},  # K + V held after prefill, every layer
  {{ name: "prefill_ms", data_type: TYPE_FP32, dims: [ 1 ] }},
  {{ name: "decode_ms", data_type: TYPE_FP32, dims: [ 1 ] }},
  {{ name: "kv_bytes_reserved", data_type: TYPE_INT64, dims: [ 1 ] }},  # prefill lengths + max_new_tokens
  {{ name: "queue_ms", data_type: TYPE_FP32, dims: [ 1 ] }},  # waiting for room in the KV budget
  {{ name: "time_to_first_token_ms", data_type: TYPE_FP32, dims: [ 1 ] }},  # from arrival
  {{ name: "decode_batch_mean", data_type: TYPE_FP32, dims: [ 1 ] }},  # requests decoded beside it, mean
  {{ name: "decode_batch_max", data_type: TYPE_INT64, dims: [ 1 ] }}
]

{instance_note}
instance_group [ {{ kind: {kind}, count: {instances} }} ]

# Server limits (lightkv_export/triton_backend/codec.py Limits), checked before any work: a request over one is
# refused with INVALID_ARG naming the parameter; then the scheduler's settings (codec.Batching). Change a value
# here and restart the server.
parameters [
  {{ key: "engine_dir", value: {{ string_value: "{ENGINE_SUBDIR}" }} }},  # relative to the version directory
  {{ key: "default_max_new_tokens", value: {{ string_value: "{default_max_new_tokens(manifest)}" }} }},
{limit_lines}
]
"""


def copy_file(src: str, dst: str) -> str:
    """An independent copy (a reflink where the filesystem offers one, else bytes), never a hard link: a write
    through the repository must not change the engine it came from, nor the reverse."""
    clone_file(Path(src), Path(dst))
    return dst


def _write_model(engine_dir: Path, manifest: Manifest, root: Path, instances: int, batching: Batching) -> None:
    model_dir = root / model_name(manifest)
    version_dir = model_dir / VERSION
    version_dir.mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(render_config(manifest, instances, batching))
    shutil.copy2(MODEL_TEMPLATE, version_dir / "model.py")
    shutil.copytree(engine_dir, version_dir / ENGINE_SUBDIR, copy_function=copy_file)


def is_repository(path: Path) -> bool:
    """A directory this module wrote (it carries the marker file)."""
    return (Path(path) / MARKER).is_file()


def write_repository(
    engine_dirs: Sequence[Path], repo_dir: Path, *, instances: int = 1, batching: Batching | None = None
) -> Path:
    """Write one model per engine directory into repo_dir, keeping its other models; returns repo_dir.

    An existing repo_dir is updated only if this module wrote it (marker file); anything else is an InputError.
    Models of the same name are replaced; every other model of the old repository is kept. The whole new repository
    is staged next to repo_dir and exchanged with it in one step: a failure leaves the old one as it was.
    `batching`: the scheduler settings written into each new model's config.pbtxt (default codec.Batching()).
    A repo_dir that is a symbolic link is followed: the repository where it points is updated (its lock and
    temporary sibling beside it, on its file system) and the link stays a link. The new root keeps the old one's
    permission bits (artifacts.promote).
    """
    batching = batching or Batching()
    engine_dirs = [Path(d) for d in engine_dirs]
    given, repo_dir = Path(repo_dir), follow_link(Path(repo_dir))
    if not engine_dirs:
        raise InputError("no engine directory given")
    if instances < 1:
        raise InputError(f"instances must be >= 1, got {instances}")
    manifests = [read_manifest(d) for d in engine_dirs]
    names = [model_name(m) for m in manifests]
    for m in manifests:
        instance_kind(m.target)  # unknown targets fail before anything is written
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"two engine directories give the same model name: {', '.join(duplicates)}")
    if repo_dir.exists() and not repo_dir.is_dir():
        raise InputError(f"{repo_dir} is a file, not a directory: choose another --out")
    if repo_dir.exists() and not is_repository(repo_dir) and any(repo_dir.iterdir()):
        raise InputError(f"{repo_dir} exists and is not a lightkv_export repository: choose another --out")

    _check_writable(repo_dir)
    with locked(repo_dir, what="the repository"):  # one writer at a time: a merge must not drop another's model
        remove_stale_partials(repo_dir)
        for stale in repo_dir.parent.glob(f".{repo_dir.name}.tmp-*"):  # left by versions before the lock
            shutil.rmtree(stale, ignore_errors=True)
        ours = is_repository(repo_dir)
        previous = read_marker(repo_dir) if ours else {}
        with staging(repo_dir) as tmp:
            kept = {}
            for entry in sorted(repo_dir.iterdir()) if ours else []:
                if entry.name == MARKER or entry.name in names:
                    continue
                if entry.is_dir():
                    shutil.copytree(entry, tmp / entry.name, symlinks=True, copy_function=copy_file)
                else:
                    copy_file(str(entry), str(tmp / entry.name))
                if entry.name in previous:
                    kept[entry.name] = previous[entry.name]
            for engine_dir, manifest in zip(engine_dirs, manifests, strict=True):
                _write_model(engine_dir, manifest, tmp, instances, batching)
            models = dict(sorted({**kept, **dict(zip(names, map(str, engine_dirs), strict=True))}.items()))
            (tmp / MARKER).write_text(json.dumps({"models": models}) + "\n")
            promote(tmp, repo_dir)  # an atomic exchange with the old repository, which is then removed
    return given


def read_marker(repo_dir: Path) -> dict[str, str]:
    """The marker file's models (name -> the engine directory it was written from); {} when unreadable."""
    try:
        models = json.loads((Path(repo_dir) / MARKER).read_text()).get("models", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {str(k): str(v) for k, v in models.items()} if isinstance(models, dict) else {}


def _check_writable(repo_dir: Path) -> None:
    """Create repo_dir's parent and a probe file in it (removed at once), before anything else is written.

    os.access is no probe: it says yes to root on /proc. Actually creating a file is.
    """
    try:
        repo_dir.parent.mkdir(parents=True, exist_ok=True)
        probe = repo_dir.with_name(f".{repo_dir.name}.probe-{os.getpid()}")
        os.close(os.open(probe, os.O_RDWR | os.O_CREAT, 0o644))
        probe.unlink()
    except OSError as e:
        blocker = next((a for a in repo_dir.parents if a.exists()), None)
        why = f"{blocker} is a file" if blocker is not None and not blocker.is_dir() else (e.strerror or str(e))
        raise InputError(f"cannot write a repository at {repo_dir}: {why}; choose another --out") from None


def repository_models(repo_dir: Path) -> list[str]:
    """Names of the models (subdirectories with a config.pbtxt) in a repository."""
    return sorted(p.parent.name for p in Path(repo_dir).glob("*/config.pbtxt"))


def add_batching_arguments(parser: argparse.ArgumentParser) -> None:
    """The scheduler settings of the served models (config.pbtxt parameters; see codec.Batching)."""
    d = Batching()
    group = parser.add_argument_group("serving: continuous batching under a KV budget")
    group.add_argument(
        "--kv-budget",
        default=d.kv_budget,
        help=f"KV cache the running requests of a model may reserve together: a size (512MiB, 2GB) or a share of "
        f"the memory free where it runs (40%%) (default {d.kv_budget})",
    )
    group.add_argument(
        "--max-batch", type=int, default=d.max_batch, help=f"requests decoded together (default {d.max_batch})"
    )
    group.add_argument(
        "--max-queue", type=int, default=d.max_queue,
        help=f"requests waiting for KV room before more are refused (default {d.max_queue})",
    )  # fmt: skip
    group.add_argument(
        "--max-queue-s", type=float, default=d.max_queue_s,
        help=f"seconds a request may wait for KV room before it is refused (default {d.max_queue_s:g})",
    )  # fmt: skip


def batching_from(args: argparse.Namespace) -> Batching:
    """The Batching of parsed arguments (add_batching_arguments), checked: an InputError names the flag."""
    params = {f: str(getattr(args, f)) for f in Batching().parameters()}
    for name, value in params.items():
        try:
            Batching.from_parameters({name: value})
        except InputError as e:
            message = str(e).replace(f"config.pbtxt parameter {name}: ", "")
            raise InputError(f"--{name.replace('_', '-')} {value}: {message}") from None
    return Batching.from_parameters(params)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightkv_export.triton_repo", description=__doc__.splitlines()[0])
    parser.add_argument("engine_dirs", nargs="+", type=Path, metavar="ENGINE_DIR")
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="repository directory to write, or to add the models to (same names are replaced)",
    )
    parser.add_argument("--instances", type=int, default=1, help="model instances per engine (default 1)")
    add_batching_arguments(parser)
    args = parser.parse_args(argv)
    try:
        repo = write_repository(args.engine_dirs, args.out, instances=args.instances, batching=batching_from(args))
    except LightKVError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # last resort: a write failing midway (disk full, permissions changed under us)
        print(f"error: writing {args.out} failed: {e}", file=sys.stderr)
        return 2
    for name in repository_models(repo):
        print(f"{repo / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
