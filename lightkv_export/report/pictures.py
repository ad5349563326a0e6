"""Pictures (matplotlib, Agg canvas, no pyplot state) of what a build keeps and what one request's merges did.

Pictures 1 and 2, from an engine's manifest: vision tokens and KV bytes per layer, vanilla vs LightKV
(`write_build_pictures`, at build time). Pictures 3 and 4, from a PyTorch reference run (report.request): the merge
map and the text-guidance heatmap over the image. Each picture's plotted arrays are a dataclass, so tests check the
data, not pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lightkv_export.accounting.units import byte_unit
from lightkv_export.artifacts import Manifest, write_text_atomic
from lightkv_export.errors import InputError
from lightkv_export.method.schedule import parse_schedule
from lightkv_export.report.markdown import PICTURES_HEADING, REPORT_FILE

PICTURES_DIR = "pictures"
DEFAULT_PROMPT = "Describe this image."
VISION_PNG, KV_PNG, MERGE_PNG, GUIDANCE_PNG = "vision_tokens.png", "kv_bytes.png", "merge_map.png", "guidance.png"
VANILLA_COLOR, LIGHTKV_COLOR, MEASURED_COLOR = "#b8b8b8", "#1f77b4", "#d62728"


@dataclass(frozen=True)
class LayerPicture:
    """Pictures 1 and 2: one value per decoder layer (1-based), vanilla vs LightKV, as plotted."""

    path: Path
    quantity: str  # "vision tokens" | "KV bytes"
    layers: tuple[int, ...]
    vanilla: tuple[int, ...]
    lightkv: tuple[int, ...]
    stage_layers: tuple[int, ...]  # merges happen right after these layers
    measured: tuple[int, ...] | None = None  # from a run (picture 2, when given)


@dataclass(frozen=True)
class MergeStage:
    """Where every vision token of one image is after a stage.

    groups [h, w] int64 on the image's original token grid: the survivor (0..n_out-1, in sequence order) whose
    hidden state now carries that token; -1 on grid cells past the image's tokens.
    survivors [n_out] int64: the original grid offset (row * w + col) of each survivor's own token.
    """

    layer: int
    windows: int
    ratio: float
    skipped: bool
    tokens_in: int
    groups: np.ndarray
    survivors: np.ndarray

    @property
    def tokens_out(self) -> int:
        return len(self.survivors)


@dataclass(frozen=True)
class MergeMapPicture:
    path: Path
    grid: tuple[int, int]  # (h, w) LLM-token grid of the image
    cell: tuple[float, float]  # pixels per token (height, width) of the image as the processor sized it
    stages: tuple[MergeStage, ...]


@dataclass(frozen=True)
class GuidancePicture:
    path: Path
    layer: int  # the first stage's layer: xi comes from its attention logits
    grid: tuple[int, int]
    values: np.ndarray  # [h, w] fp32 xi of the image's vision tokens, NaN past the image's tokens
    prompt: str


def stage_layers(manifest: Manifest) -> tuple[int, ...]:
    """Layers after which a stage merges, from the manifest's schedule."""
    if manifest.vanilla or not manifest.schedule:
        return ()
    return tuple(stage.layer for stage in parse_schedule(manifest.schedule, manifest.num_layers).stages)


def _subtitle(manifest: Manifest) -> str:
    h, w = manifest.image_size
    variant = "vanilla" if manifest.vanilla else f"schedule {manifest.schedule}"
    prompt = manifest.reference_request.prompt
    return f"{manifest.model} ({manifest.target}), {variant}\nreference request: {h}x{w} image, {prompt!r}"


def vision_picture_data(manifest: Manifest, path: Path) -> LayerPicture:
    ref = manifest.reference_request
    light = tuple(ref.vision_tokens_per_layer)
    return LayerPicture(
        path=path,
        quantity="vision tokens",
        layers=tuple(range(1, len(light) + 1)),
        vanilla=(ref.vision_tokens,) * len(light),
        lightkv=light,
        stage_layers=stage_layers(manifest),
    )


def kv_picture_data(manifest: Manifest, path: Path, measured: Sequence[int] | None = None) -> LayerPicture:
    ref = manifest.reference_request
    light = tuple(ref.kv_bytes_per_layer)
    if measured is not None and len(measured) != len(light):
        raise InputError(f"measured KV bytes cover {len(measured)} layers, the engine has {len(light)}.")
    return LayerPicture(
        path=path,
        quantity="KV bytes",
        layers=tuple(range(1, len(light) + 1)),
        vanilla=tuple(ref.kv_bytes_vanilla_per_layer),
        lightkv=light,
        stage_layers=stage_layers(manifest),
        measured=tuple(int(n) for n in measured) if measured is not None else None,
    )


def _new_figure(width: float, height: float):
    """A figure not registered with pyplot: no global state, no GUI backend (Agg canvas on save)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def draw_layer_picture(
    data: LayerPicture, subtitle: str, nominal_retention: float | None = None, engine_label: str = "LightKV (manifest)"
) -> Path:
    """Bars per layer, vanilla behind LightKV, the stages as dotted lines between layers."""
    kv = data.quantity == "KV bytes"
    unit, scale = byte_unit(max(data.vanilla + data.lightkv)) if kv else ("tokens", 1)
    fig = _new_figure(max(6.5, 0.3 * len(data.layers) + 3.5), 4.6)
    ax = fig.add_subplot()
    x = np.asarray(data.layers)
    ax.bar(x, np.asarray(data.vanilla) / scale, width=0.8, color=VANILLA_COLOR, label="vanilla")
    ax.bar(x, np.asarray(data.lightkv) / scale, width=0.55, color=LIGHTKV_COLOR, label=engine_label)
    if data.measured is not None:
        ax.plot(
            x,
            np.asarray(data.measured) / scale,
            "_",
            color=MEASURED_COLOR,
            ms=18,
            mew=2.5,
            label="LightKV, measured (PyTorch run)",
        )
    for k, layer in enumerate(data.stage_layers):
        ax.axvline(layer + 0.5, color="black", ls=":", lw=1, label="merge (after layer)" if k == 0 else None)
    if len(data.layers) <= 16:  # values inside the bars while they stay legible
        for xi, v in zip(x, data.lightkv, strict=True):
            ax.annotate(f"{v / scale:.3g}", (xi, 0), xytext=(0, 3), textcoords="offset points", ha="center",
                        va="bottom", fontsize=7, color="white")  # fmt: skip
    total_v, total_l = sum(data.vanilla), sum(data.lightkv)
    share = total_l / total_v if total_v else 1.0
    if kv:
        head = f"KV cache per layer (K + V): {total_l:,} of {total_v:,} bytes ({share:.1%})"
    else:
        head = f"Vision tokens each layer sees and caches: {share:.1%} kept, averaged over layers"
        if nominal_retention is not None:
            head += f" (schedule's nominal {nominal_retention:.1%})"
    ax.set_title(f"{head}\n{subtitle}", fontsize=9)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(f"KV {unit}" if kv else "vision tokens")
    ax.set_xticks(x if len(x) <= 32 else x[::4])
    ax.set_xlim(0.4, len(x) + 0.6)
    fig.legend(loc="outside lower center", ncols=4, fontsize=8, frameon=False)
    return _save(fig, data.path)


def write_layer_pictures(
    manifest: Manifest, out: Path, measured_kv: Sequence[int] | None = None
) -> tuple[LayerPicture, LayerPicture]:
    """Pictures 1 and 2 into `out`, from the manifest's reference request (plus measured KV bytes, if given)."""
    vision = vision_picture_data(manifest, Path(out) / VISION_PNG)
    kv = kv_picture_data(manifest, Path(out) / KV_PNG, measured_kv)
    subtitle = _subtitle(manifest)
    vanilla = manifest.vanilla
    label = "this engine: vanilla (manifest)" if vanilla else "LightKV (manifest)"
    draw_layer_picture(vision, subtitle, None if vanilla else manifest.retention, label)
    draw_layer_picture(kv, subtitle, engine_label=label)
    return vision, kv


def write_build_pictures(engine_dir: Path) -> list[Path]:
    """Pictures 1 and 2 into ENGINE_DIR/pictures (manifest.json only) and a "## Pictures" section in report.md."""
    from lightkv_export.artifacts import read_manifest

    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    pictures = write_layer_pictures(manifest, engine_dir / PICTURES_DIR)
    report = engine_dir / REPORT_FILE
    text = report.read_text() if report.is_file() else f"# Report: {engine_dir}\n"
    if PICTURES_HEADING not in text.splitlines():
        links = [f"![{p.quantity} per layer, vanilla vs LightKV]({PICTURES_DIR}/{p.path.name})" for p in pictures]
        text = text.rstrip("\n") + "\n\n" + "\n\n".join([PICTURES_HEADING, *links]) + "\n"
        write_text_atomic(report, text)
    return [p.path for p in pictures]


def colour_groups(groups: np.ndarray, palette: int) -> np.ndarray:
    """Greedy colouring so that groups touching on the grid (4-neighbours) get different colours: [n] indices."""
    n = int(groups.max()) + 1 if groups.size else 0
    touching: list[set[int]] = [set() for _ in range(n)]
    for a, b in ((groups[:, :-1], groups[:, 1:]), (groups[:-1, :], groups[1:, :])):
        diff = (a != b) & (a >= 0) & (b >= 0)
        for u, v in zip(a[diff].tolist(), b[diff].tolist(), strict=True):
            touching[u].add(v)
            touching[v].add(u)
    colour = np.full(n, -1, dtype=np.int64)
    for g in range(n):
        used = {int(colour[o]) for o in touching[g] if colour[o] >= 0}
        colour[g] = next(c for c in range(n + 1) if c not in used) % palette
    return colour


def _boundaries(groups: np.ndarray, cell: tuple[float, float]) -> list[list[tuple[float, float]]]:
    """Line segments (pixel coordinates) between grid cells that belong to different groups."""
    ch, cw = cell
    segs = []
    rows, cols = np.nonzero(groups[:, :-1] != groups[:, 1:])
    segs += [[((c + 1) * cw, r * ch), ((c + 1) * cw, (r + 1) * ch)] for r, c in zip(rows, cols, strict=True)]
    rows, cols = np.nonzero(groups[:-1, :] != groups[1:, :])
    segs += [[(c * cw, (r + 1) * ch), ((c + 1) * cw, (r + 1) * ch)] for r, c in zip(rows, cols, strict=True)]
    return segs


def _show_image(ax, pixels: np.ndarray, grid: tuple[int, int], *, grey: bool) -> None:
    """The engine's input image in pixel coordinates; grey under colour overlays so only the overlay has hue."""
    height, width = pixels.shape[:2]
    if grey:
        ax.imshow(pixels.astype(np.float32).mean(-1), cmap="gray", vmin=0, vmax=255, extent=(0, width, height, 0))
    else:
        ax.imshow(pixels, extent=(0, width, height, 0))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks(np.linspace(0, width, grid[1] + 1), labels=[])
    ax.set_yticks(np.linspace(0, height, grid[0] + 1), labels=[])
    ax.tick_params(length=0)


def _input_panel(ax, pixels: np.ndarray, grid: tuple[int, int]) -> None:
    _show_image(ax, pixels, grid, grey=False)
    ax.grid(color="white", lw=0.4, alpha=0.6)
    height, width = pixels.shape[:2]
    ax.set_title(f"input, as the processor sizes it: {width}x{height}\n{grid[0]}x{grid[1]} LLM tokens", fontsize=8)


def draw_merge_map(data: MergeMapPicture, image, title: str) -> Path:
    """The input, then one panel per stage: each token cell coloured by its survivor, group borders, survivors."""
    from matplotlib import colormaps
    from matplotlib.collections import LineCollection

    h, w = data.grid
    ch, cw = data.cell
    pixels = np.asarray(image.convert("RGB"))
    panels = 1 + len(data.stages)
    cols = min(4, panels)
    rows = math.ceil(panels / cols)
    fig = _new_figure(3.6 * cols, 3.6 * rows * pixels.shape[0] / pixels.shape[1] + 1.1)
    palette = np.asarray(colormaps["tab20"].colors)  # [20, 3]
    _input_panel(fig.add_subplot(rows, cols, 1), pixels, data.grid)
    for k, stage in enumerate(data.stages):
        ax = fig.add_subplot(rows, cols, k + 2)
        _show_image(ax, pixels, data.grid, grey=True)
        colour = colour_groups(stage.groups, len(palette))
        rgba = np.zeros((h, w, 4))  # [h, w, RGBA]
        valid = stage.groups >= 0
        rgba[valid, :3] = palette[colour[stage.groups[valid]]]
        rgba[valid, 3] = 0.6
        ax.imshow(rgba, extent=(0, w * cw, h * ch, 0), interpolation="nearest")
        ax.add_collection(LineCollection(_boundaries(stage.groups, data.cell), colors="black", linewidths=1.0))
        sr, sc = np.divmod(stage.survivors, w)
        ax.plot((sc + 0.5) * cw, (sr + 0.5) * ch, "o", ms=2.5, mfc="white", mec="black", mew=0.5)
        note = " (image too small: skipped)" if stage.skipped else ""
        ax.set_title(
            f"after layer {stage.layer}: {stage.tokens_in} -> {stage.tokens_out} tokens\n"
            f"{stage.windows}x{stage.windows} windows, ratio {stage.ratio:g}{note}",
            fontsize=8,
        )
    fig.suptitle(
        f"{title}\ncolour and borders: the survivor each {ch:g}x{cw:g}-pixel token was merged into "
        "(merges compound over stages); dot: the survivor's own token",
        fontsize=9,
    )
    return _save(fig, data.path)


def draw_guidance(data: GuidancePicture, image, title: str) -> Path:
    """The input next to the xi heatmap over it (grey underneath, so the colour is xi alone)."""
    pixels = np.asarray(image.convert("RGB"))
    height, width = pixels.shape[:2]
    fig = _new_figure(9.0, 4.0 * height / width + 1.3)
    _input_panel(fig.add_subplot(1, 2, 1), pixels, data.grid)
    ax = fig.add_subplot(1, 2, 2)
    _show_image(ax, pixels, data.grid, grey=True)
    heat = ax.imshow(data.values, extent=(0, width, height, 0), cmap="inferno", alpha=0.75, interpolation="nearest")
    fig.colorbar(heat, ax=ax, shrink=0.85, label="xi (merge weight)")
    ax.set_title(f"text guidance xi after layer {data.layer}\n(the first stage's merge weights)", fontsize=8)
    prompt = data.prompt if len(data.prompt) <= 70 else data.prompt[:67] + "..."
    fig.suptitle(f"{title}\nprompt: {prompt!r}", fontsize=9)
    return _save(fig, data.path)
