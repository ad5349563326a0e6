"""The build pipeline: model -> vanilla export (cached) -> LightKV transform -> one engine per target -> parity.

    from lightkv_export.config import DTYPES, BuildConfig
    from lightkv_export.pipeline import run
    result = run(BuildConfig(model="tiny-qwen-vl", ratio=0.55))
    result.engine_dirs["ort-cpu"]

Each stage is a function from its input artifact to its output artifact; `run` strings them together, prints
progress with timings, and collects per-target failures so that one unavailable target does not stop the others.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lightkv_export import __version__, interrupts, rss
from lightkv_export.artifacts import (
    MANIFEST,
    MANIFEST_FORMAT,
    Manifest,
    ReferenceRequest,
    enclosing_engine,
    follow_link,
    locked,
    promote,
    remove_stale_partials,
    remove_stale_under,
    staging,
    write_manifest,
    write_text_atomic,
)
from lightkv_export.config import DTYPES, BuildConfig
from lightkv_export.errors import InputError, LightKVError, VerificationError
from lightkv_export.export import ExportedGraphs, ModelSource, export_model
from lightkv_export.inputs import parity_images
from lightkv_export.kv import kv_bytes
from lightkv_export.method.merge_plan import layer_lengths, plan_request
from lightkv_export.method.schedule import MAX_STAGE_RATIO, Schedule, resolve
from lightkv_export.models.base import LoadedModel
from lightkv_export.parity import EXPORT_CACHE, ParityReport, release_weights, run_parity

REFERENCE_PROMPT = "Describe this image."


class TargetFailed(KeyError):
    """A BuildResult lookup of a target that was not built: its message is the target's own failure (a bare
    KeyError: 'ort-cpu' would hide why)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class PerTarget(dict):
    """{target: value} of a build that names, for a missing target, why it is missing."""

    def __init__(self, items=(), *, failures: dict[str, LightKVError] | None = None, what: str = "result") -> None:
        super().__init__(items)  # (items first: dataclasses.asdict and copy rebuild it from its items)
        self.failures, self.what = failures if failures is not None else {}, what

    def __missing__(self, target: str):
        failure = self.failures.get(target)
        if failure is not None:
            raise TargetFailed(f"no {self.what} for {target}: the target failed: {failure}")
        raise TargetFailed(f"no {self.what} for {target} (there is one for: {', '.join(self) or 'no target'})")


@dataclass
class BuildResult:
    config: BuildConfig
    schedule: Schedule | None
    engine_dirs: dict[str, Path] = field(default_factory=dict)
    parity: dict[str, ParityReport] = field(default_factory=dict)
    failed_targets: dict[str, LightKVError] = field(default_factory=dict)
    reference: ReferenceRequest | None = None
    timings: dict[str, float] = field(default_factory=dict)
    peak_rss: dict[str, int | None] = field(default_factory=dict)  # bytes per stage (None: not measurable here)
    triton_repo: Path | None = None
    rejected: dict[str, Path] = field(default_factory=dict)  # parity failed: kept as <target>.rejected, not promoted

    def __post_init__(self) -> None:
        # A lookup of a target that failed raises with the target's own message (tests index engine_dirs directly).
        for name, what in (("engine_dirs", "engine directory"), ("parity", "parity report")):
            setattr(self, name, PerTarget(getattr(self, name), failures=self.failed_targets, what=what))

    @property
    def exit_code(self) -> int:
        if self.failed_targets:
            return max(e.exit_code for e in self.failed_targets.values())
        if self.config.parity_gate and any(not r.passed for r in self.parity.values()):
            return 1
        return 0


class Progress:
    """Stage-by-stage progress with timings; silent when no console is given (library use, tests)."""

    def __init__(self, console=None) -> None:
        self.console, self.timings = console, {}
        self.peak_rss: dict[str, int | None] = {}  # bytes: the process's high-water mark during each stage

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        gc.collect()
        rss.return_free_heap()  # each stage's peak from what is live, not what the previous stage freed
        # gc.collect() runs finalizers, where a Ctrl-C's KeyboardInterrupt is swallowed: build.py's handler also
        # records the signal, and the build stops here, between stages, with nothing replaced.
        interrupts.check()
        measured = rss.reset_peak_rss()
        t0 = time.perf_counter()
        if self.console is None:
            yield
        else:
            with self.console.status(f"{name} ..."):
                yield
        self.timings[name] = time.perf_counter() - t0
        peak = rss.peak_rss_bytes() if measured else None
        self.peak_rss[name] = peak
        memory = f", peak RSS {peak / 2**30:.2f} GiB" if peak is not None else ""
        self.log(f"[green]done[/] {name} [dim]({self.timings[name]:.1f} s{memory})[/]")

    def log(self, message: str) -> None:
        if self.console is not None:
            self.console.print(message)


def check_writable(directory: Path, option: str = "--out") -> None:
    """Fail before any work if `directory` cannot be created or written.

    os.access is not enough (it passes for root on read-only or virtual file systems such as /proc), so this
    creates the directory and writes and removes a probe file in it.
    """
    probe = directory / f".lightkv-write-probe-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise InputError(
            f"cannot write under {directory} ({reason}): it is not a writable directory. Choose another {option}."
        ) from None


def check_triton_repo(repo: Path) -> None:
    """Before any work: the repository replaces `repo` (where it points, if it is a symbolic link) from a sibling
    temporary directory, so its parent must be writable and `repo` itself, if it exists, a repository this tool
    wrote (triton_repo.is_repository: it has the marker file) or an empty directory."""
    from lightkv_export.triton_repo import MARKER, is_repository

    real = follow_link(repo)
    where = f"{repo} (a link to {real})" if real != repo else f"{repo}"
    if real.exists() and not real.is_dir():
        raise InputError(f"--triton-repo {where} is a file, not a directory. Choose another --triton-repo.")
    if real.is_dir() and not is_repository(real) and any(real.iterdir()):
        raise InputError(
            f"--triton-repo {where} is a directory with other files in it, not a model repository written by "
            f"lightkv_export (no {MARKER} file): it is never written into. Choose a new or empty directory, or an "
            "existing lightkv_export repository, for --triton-repo."
        )
    check_writable(real.parent, "--triton-repo")


def check_out(out: Path) -> None:
    """--out must not be (inside) an engine directory: a build there would write engines into an engine."""
    engine = enclosing_engine(out)
    if engine is not None:
        raise InputError(
            f"--out {out} is inside the engine directory {engine} (it has a {MANIFEST}); builds write engines "
            "under OUT/<model>/<ratio>/<target>. Choose another --out, e.g. engines/."
        )


def remove_cached_export(cache: Path, model_dir: str, *, log) -> None:
    """--force: drop this model's cached exports (each under its lock: a concurrent build keeps a whole one)."""
    import shutil

    for entry in sorted(cache.glob(f"{model_dir}-*")):
        if entry.is_dir():
            with locked(entry, what="the export cache entry", log=log):
                shutil.rmtree(entry)


def source_path(model: str) -> str:
    """--model as the manifest records it: a checkpoint directory by its absolute path (parity and tools reload
    it from anywhere), a key or hub id as given."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def load(config: BuildConfig, dtype: torch.dtype) -> LoadedModel:
    from lightkv_export.models.registry import load_model

    return load_model(config.model, random_weights=config.random_weights, dtype=dtype).capped(config.max_image_pixels)


def num_layers(loaded: LoadedModel) -> int:
    return len(loaded.family.text_model(loaded.model).layers)


def schedule_for(config: BuildConfig, loaded: LoadedModel) -> Schedule | None:
    if config.vanilla:
        return None
    first_layer, why = loaded.family.first_merge_layer(loaded.model.config)
    return resolve(
        num_layers(loaded),
        ratio=config.effective_ratio,
        schedule=config.schedule,
        windows=loaded.spec.default_windows,
        first_layer=first_layer,
        why=why,
    )


def reference_request(
    loaded: LoadedModel, schedule: Schedule | None, image_size, dtype_bytes: int, grid_mode: str = "true"
) -> ReferenceRequest:
    """Token layout, vision tokens per layer group and KV bytes per layer for one image of `image_size` (as sent)
    and the reference prompt: what the manifest promises and parity checks the engine against."""
    family = loaded.family
    processed = family.process(loaded.processor, [parity_images(image_size, 0)], REFERENCE_PROMPT)
    spans = family.spans(loaded.processor, processed, int(loaded.model.config.image_token_id))
    layouts = [loaded.image_host().layout(*image_size)]
    grids = [s.grid for s in spans[0]]
    if grids != [g for layout in layouts for g in layout.grids]:  # the host side must size images as HF does
        raise VerificationError(
            f"the host image side lays a {image_size[1]}x{image_size[0]} image out as {layouts[0].to_json()}, the "
            f"Hugging Face processor as grids {grids}: the family's image_host disagrees with its processor."
        )
    seq = int(processed["input_ids"].shape[1])
    arch = loaded.family.arch(loaded.model.config)
    n_layers, hkv, hd = arch.num_layers, arch.kv_heads, arch.head_dim
    schedule = schedule if schedule is not None else Schedule(n_layers, ())
    plan = plan_request(spans, [seq], schedule, grid_mode=grid_mode) if schedule.stages else None
    lengths = [int(n) for n in layer_lengths(schedule, plan, [seq])[:, 0]]
    # Vision tokens per layer: what the tokens lost from the prompt were (only vision tokens merge).
    vision = [sum(s.length for s in spans[0]) - (seq - n) for n in lengths]
    return ReferenceRequest(
        prompt=REFERENCE_PROMPT,
        seq_len=seq,
        vision_tokens=vision[0],
        image_layouts=[layout.to_json() for layout in layouts],
        kv_lengths=lengths,
        vision_tokens_per_layer=vision,
        kv_bytes_per_layer=kv_bytes(lengths, hkv, hd, dtype_bytes),
        kv_bytes_vanilla_per_layer=kv_bytes([seq] * n_layers, hkv, hd, dtype_bytes),
    )


def silent_noops(schedule: Schedule | None, reference: ReferenceRequest) -> list[str]:
    """Warnings for what a schedule asks and the engine will not do: ratios above the per-stage cap, and
    stages that remove nothing from the reference request (its image is too small for their windows)."""
    if schedule is None:
        return []
    notes = []
    capped = schedule.capped_stages()
    if capped:
        notes.append(
            f"stage(s) {', '.join(map(str, capped))} ask to merge more than {MAX_STAGE_RATIO:g} of each window; a "
            f"stage removes at most half (r = min(floor(ratio * n), n // 2)), so they merge {MAX_STAGE_RATIO:g}."
        )
    lengths = reference.kv_lengths  # per layer, 0-based; stage `layer` shortens layer + 1 onwards
    idle = [s for s in schedule.stages if s.ratio > 0 and lengths[s.layer] == lengths[s.layer - 1]]
    active = [s for s in schedule.stages if s.ratio > 0]
    if idle:
        which = "no stage merges" if idle == active else f"stage(s) {', '.join(map(str, idle))} merge"
        notes.append(
            f"{which} anything for the reference request ({reference.vision_tokens} vision tokens): an "
            "image needs at least 8 w^2 vision tokens for w x w windows, else the stage skips it. Use a larger "
            "--image-size (the reference request's image), or fewer windows with --schedule."
        )
    return notes


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {
        "lightkv_export": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def base_manifest(
    config: BuildConfig,
    loaded: LoadedModel,
    schedule: Schedule | None,
    exported: ExportedGraphs,
    reference: ReferenceRequest,
    *,
    dtype: str,
    notes: list[str],
) -> Manifest:
    """Everything the manifest records but the target and the files (the target and write_manifest add them)."""
    arch = loaded.family.arch(loaded.model.config)
    eos = loaded.model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
    return Manifest(
        format=MANIFEST_FORMAT,
        model=loaded.spec.key,
        model_dir=loaded.spec.dir_name,
        model_source=source_path(config.model),
        family=loaded.spec.family,
        random_weights=config.random_weights,
        vanilla=config.vanilla,
        ratio=config.effective_ratio,
        schedule=str(schedule) if schedule is not None else "",
        retention=schedule.retention if schedule is not None else 1.0,
        positions=config.position_mode,
        grid_mode=config.grid_mode,
        image_size=list(loaded_image_size(config, loaded)),
        vision_inputs={k: list(v) for k, v in exported.meta["vision_inputs"].items()},
        num_layers=arch.num_layers,
        hidden_size=arch.hidden,
        num_kv_heads=arch.kv_heads,
        head_dim=arch.head_dim,
        num_attention_heads=arch.heads,
        intermediate_size=arch.intermediate,
        vocab_size=arch.vocab,
        image_token_id=int(loaded.model.config.image_token_id),
        position_scheme=loaded.family.positions.name,
        eos_token_ids=[int(e) for e in eos],
        max_new_tokens_limit=config.max_new_tokens_limit,
        export_key=exported.meta["key"],
        reference_request=reference,
        versions=versions(),
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        dtype=dtype,
        notes=notes,
        max_image_pixels=config.max_image_pixels,
        # The model's context: Engine.check_request refuses a request whose sequence would pass it.
        extra={"max_position_embeddings": int(getattr(loaded.text_config, "max_position_embeddings", 0) or 0)},
    )


def build_target(
    target: str, directory: Path, *, destination: Path, exported, prefill, processor, manifest: Manifest, config
) -> Manifest:
    """Write `target`'s engine files into `directory` (staging for `destination`); returns its manifest."""
    from lightkv_export.targets import target as target_named

    return target_named(target).build(
        directory, destination=destination, exported=exported, prefill=prefill, processor=processor,
        manifest=manifest, config=config,
    )  # fmt: skip


def smoke_request(directory: Path, reference: ReferenceRequest, image_size: tuple[int, int]) -> None:
    """One real request through the staged engine, as a user would send it: it must answer, and hold the KV
    lengths per layer that its manifest promises for the reference request."""
    from lightkv_export.runtime import Engine

    engine = Engine.load(directory, full_hash=False)  # just written and hashed: sizes are enough
    gen = engine.generate([parity_images(image_size, 0)], reference.prompt, max_new_tokens=2)
    if gen.kv_lengths != reference.kv_lengths:
        raise VerificationError(
            f"the engine's KV lengths per layer {gen.kv_lengths} differ from the planned {reference.kv_lengths}"
        )


def check_and_promote(
    target: str, staged: Path, destination: Path, *, config: BuildConfig, loaded, exported, reference, result,
    progress: Progress, release_model=None,
) -> None:  # fmt: skip
    """Verify the staged engine (parity unless --no-parity, and a real request), then put it in place.

    A parity failure with the gate on keeps the new engine beside the old one as `<target>.rejected` for
    inspection. Any other failure while checking leaves nothing but the previous engine."""
    try:
        if config.parity:
            with progress.stage(f"parity {target}"):
                report = run_parity(
                    staged, loaded=loaded, exported=exported, name=destination, full_hash=False, log=progress.log,
                    release_model=release_model,
                )  # fmt: skip
            result.parity[target] = report
        else:
            from lightkv_export.report import write_build_report

            write_text_atomic(staged / "report.md", f"# Report: {destination}\n\nParity was skipped (--no-parity).\n")
            write_build_report(staged)
        if release_model is not None:  # parity released it already; without parity the check must not hold it
            release_model()
        with progress.stage(f"check request {target}"):
            smoke_request(staged, reference, loaded_image_size(config, loaded))
    except (LightKVError, OSError, KeyboardInterrupt):
        raise
    except Exception as exc:  # the engine does not run: a failed check, not a crash of the build
        detail = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:400] if str(exc).strip() else ''}"
        raise VerificationError(
            f"the {target} engine failed its check run ({detail}); nothing was replaced at {destination}."
        ) from exc
    if config.parity and config.parity_gate and not result.parity[target].passed:
        rejected = destination.with_name(f"{destination.name}.rejected")
        promote(staged, rejected)
        result.engine_dirs[target] = result.rejected[target] = rejected
        kept = "the previous engine there is untouched" if destination.exists() else "no engine was written there"
        progress.log(
            f"[red]parity failed:[/] {destination} was not replaced ({kept}); the failing engine is kept at "
            f"{rejected} for inspection. --no-parity-gate accepts it."
        )
        return
    promote(staged, destination)
    result.engine_dirs[target] = destination


def loaded_image_size(config: BuildConfig, loaded: LoadedModel) -> tuple[int, int]:
    return tuple(config.image_size or loaded.spec.default_image_size)


def target_dtype(config: BuildConfig, target: str) -> str:
    """ort-cpu engines are float32 (ONNX Runtime's CPU kernels); TensorRT engines float16 unless --dtype bfloat16."""
    from lightkv_export.targets import target as target_named

    return target_named(target).engine_dtype(str(config.torch_dtype).removeprefix("torch."))


def run(config: BuildConfig, console=None) -> BuildResult:
    """The whole build. Raises LightKVError for bad input that stops everything (unknown model, bad ratio, ...);
    per-target failures are collected in the result instead. A signal (KeyboardInterrupt) ends it as
    interrupts.Interrupted, naming the directories already put in place (each complete: a promotion is never cut
    in half)."""
    result = BuildResult(config=config, schedule=None)
    try:
        return _run(config, result, Progress(console))
    except KeyboardInterrupt as exc:
        done = [*result.engine_dirs.values(), *([result.triton_repo] if result.triton_repo else [])]
        done += [p for p in getattr(exc, "replaced", []) if p not in done]
        name = getattr(exc, "signal_name", None) or str(exc) or "SIGINT"
        raise interrupts.Interrupted(name, done) from exc


def _run(config: BuildConfig, result: BuildResult, progress: Progress) -> BuildResult:
    check_out(config.out)
    check_writable(config.out)
    if config.triton_repo is not None:
        check_triton_repo(config.triton_repo)
    for stale in remove_stale_under(config.out, EXPORT_CACHE):
        progress.log(f"removed {stale}, left by an interrupted build")
    groups: dict[str, list[str]] = {}
    for target in config.targets:
        groups.setdefault(target_dtype(config, target), []).append(target)
    if groups.get("float32") and config.dtype not in ("float32", "fp32"):
        names = ", ".join(groups["float32"])
        progress.log(f"note: {names} engines are float32; --dtype {config.dtype} applies to TensorRT targets only")
    for dtype, targets in groups.items():
        build_group(config, dtype, targets, result, progress)
    accepted = [d for t, d in result.engine_dirs.items() if t not in result.rejected]
    if config.triton_repo is not None and accepted:
        from lightkv_export.triton_repo import write_repository

        with progress.stage("Triton model repository"):
            result.triton_repo = write_repository(accepted, config.triton_repo, batching=config.batching)
    result.timings, result.peak_rss = progress.timings, progress.peak_rss
    return result


def build_group(config: BuildConfig, dtype: str, targets: list[str], result: BuildResult, progress: Progress) -> None:
    """Load, export and transform once for the targets that share a dtype; then build and check each target."""
    from lightkv_export.models.registry import fit_local_defaults
    from lightkv_export.targets.ort import transform_prefill

    torch_dtype = DTYPES[dtype]
    with progress.stage(f"load {config.model} ({dtype})"):
        # A local checkpoint's windows and reference image fit its processor as capped (registry.fit_local_defaults).
        loaded, fitted_note = fit_local_defaults(load(config, torch_dtype))
    image_size = loaded_image_size(config, loaded)
    loaded.image_host().layout(*image_size)  # a size the processor refuses is an InputError before any work
    schedule = schedule_for(config, loaded)
    if result.schedule is None and schedule is not None:
        result.schedule = schedule
        progress.log(f"schedule {schedule.describe()}")
        first_layer, why = loaded.family.first_merge_layer(loaded.model.config)
        if first_layer > 1:
            progress.log(f"merges start after decoder layer {first_layer} at the earliest: {why}")
    with progress.stage(f"export ({dtype} vanilla graphs, cached per model)"):
        cache = config.out / EXPORT_CACHE
        if config.force:
            remove_cached_export(cache, loaded.spec.dir_name, log=progress.log)
        exported = export_model(
            loaded, cache, dtype=torch_dtype, log=progress.log,
            source=ModelSource(config.model, config.random_weights),
        )  # fmt: skip
    with progress.stage("LightKV transform" if schedule is not None else "vanilla prefill"):
        prefill, report = transform_prefill(
            exported, schedule, positions=config.position_mode, grid_mode=config.grid_mode
        )
        if report is not None:
            progress.log(f"inserted {report.stages} LightKV stages ({report.cloned_nodes} rewired nodes)")
    dtype_bytes = torch.empty(0, dtype=torch_dtype).element_size()
    reference = reference_request(loaded, schedule, image_size, dtype_bytes, grid_mode=config.grid_mode)
    result.reference = result.reference or reference
    fitted = [fitted_note] if fitted_note and schedule is not None and config.schedule is None else []
    notes = fitted + silent_noops(schedule, reference)
    for note in notes:
        progress.log(f"[yellow]warning:[/] {note}")
    manifest = base_manifest(config, loaded, schedule, exported, reference, dtype=dtype, notes=notes)
    for target in targets:
        # A symbolic link there stays a link: the engine is written where it points (artifacts.follow_link).
        destination = follow_link(config.out / loaded.spec.dir_name / config.engine_tag() / target)
        try:
            with locked(destination, what=f"the engine directory {destination}", log=progress.log):
                for stale in remove_stale_partials(destination):
                    progress.log(f"removed {stale}, left by an interrupted build")
                with staging(destination) as staged:
                    with progress.stage(f"engine {target}"):
                        built = build_target(
                            target, staged, destination=destination, exported=exported, prefill=prefill,
                            processor=loaded.processor, manifest=manifest, config=config,
                        )  # fmt: skip
                        write_manifest(staged, built)
                    # The last target's parity frees the PyTorch weights once its reference outputs are computed
                    # (nothing later needs them), so the check never holds the model and the engine at once.
                    # Tiny presets are cached in-process and shared: they stay.
                    last = target == targets[-1] and not loaded.spec.tiny
                    check_and_promote(
                        target, staged, destination, config=config, loaded=loaded, exported=exported,
                        reference=reference, result=result, progress=progress,
                        release_model=functools.partial(release_weights, loaded) if last else None,
                    )  # fmt: skip
        except LightKVError as exc:
            result.failed_targets[target] = exc
            progress.log(f"[red]target {target} not built:[/] {exc}")
