"""Pictures of a build (lightkv_export/report): the files are made and what they plot is the run's data.

No pixel goldens: each picture's plotted arrays come back as a dataclass and are checked against the manifest,
the analytic accounting, the ONNX engine's own outputs and an independent PyTorch reference run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightkv_export import torch_runtime
from lightkv_export.accounting.trace import TokenLayout, trace_schedule
from lightkv_export.accounting.units import dtype_bytes
from lightkv_export.artifacts import Manifest, read_manifest
from lightkv_export.errors import InputError
from lightkv_export.inputs import parity_images, torch_inputs
from lightkv_export.kv import kv_bytes_per_layer
from lightkv_export.method.layout import plan_stage, window_layout
from lightkv_export.method.reference import lightkv_merge
from lightkv_export.method.schedule import parse_schedule
from lightkv_export.method.spans import VisionSpan
from lightkv_export.report import cli
from lightkv_export.report.markdown import PICTURES_HEADING
from lightkv_export.report.pictures import (
    DEFAULT_PROMPT,
    GUIDANCE_PNG,
    KV_PNG,
    MERGE_PNG,
    PICTURES_DIR,
    VISION_PNG,
    colour_groups,
    kv_picture_data,
    vision_picture_data,
    write_build_pictures,
    write_layer_pictures,
)
from lightkv_export.report.request import guidance_values, merge_stages, request_pictures
from lightkv_export.runtime import Engine


@pytest.fixture(scope="module")
def engines(builds, tmp_path_factory) -> dict[str, Path]:
    """Copies of the session's tiny LightKV engine (ratio 0.55) and vanilla one: these tests rewrite report.md."""
    import shutil

    out = tmp_path_factory.mktemp("engines")
    built = {"lightkv": builds("tiny-qwen-vl", 0.55), "vanilla": builds("tiny-qwen-vl", None, vanilla=True)}
    return {k: Path(shutil.copytree(r.engine_dirs["ort-cpu"], out / k)) for k, r in built.items()}


def manifest_of(engine_dir: Path) -> Manifest:
    return read_manifest(engine_dir)


# Pictures 1 and 2 of an 8-layer engine: 6.5 x 4.6 inches at 110 dpi.
LAYER_PICTURE_SIZE = (715, 506)


def png_pixels(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """The picture's RGB pixels [H, W, 3], after checking it is a real, drawn PNG (of `size` = (W, H), if given)."""
    assert path.is_file(), path
    with Image.open(path) as im:
        assert im.format == "PNG", (path, im.format)
        assert im.width > 300 and im.height > 200, (path, im.size)
        if size is not None:
            assert im.size == size, (path, im.size, size)
        pixels = np.asarray(im.convert("RGB"))
    colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    assert len(colours) > 16, f"{path}: {len(colours)} colours, nothing drawn"  # bars, text, antialiasing
    assert counts.max() < 0.97 * counts.sum(), f"{path}: almost one colour"
    return pixels


def assert_png(path: Path, size: tuple[int, int] | None = None) -> None:
    png_pixels(path, size)


def assert_differ(a: Path, b: Path) -> None:
    """Two pictures of different data: same size, different pixels."""
    pa, pb = png_pixels(a), png_pixels(b)
    assert pa.shape == pb.shape, (a, b, pa.shape, pb.shape)
    assert (pa != pb).any(axis=-1).mean() > 0.001, f"{a} and {b} show the same picture"


# --- the reference op's bookkeeping -------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_merged_into_points_at_a_survivor_of_the_same_window(ratio):
    spans = [[VisionSpan(2, 48, (6, 8)), VisionSpan(60, 35, (5, 7))], [VisionSpan(0, 100, (10, 10))]]
    lengths = [120, 110]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 120, 16, generator=g)  # [B, S, D]
    guidance = torch.rand(2, 120, generator=g)  # [B, S]
    res = lightkv_merge(hidden, guidance, spans, windows=2, ratio=ratio, lengths=lengths)
    plan = plan_stage(spans, 120, windows=2, ratio=ratio, lengths=lengths)
    window_of = {}  # flat index -> window id, from the plan
    for wdx, row in enumerate(plan.win_index.tolist()):
        window_of.update({i: wdx for i in row if i >= 0})
    for b in range(2):
        into = res.merged_into[b]  # [S]
        kept = res.kept[b][res.kept[b] >= 0]
        assert (into[lengths[b] :] == -1).all()
        assert torch.equal(into[kept], kept)  # survivors point at themselves
        assert torch.equal(torch.unique(into[: lengths[b]]), kept)  # every target survived; one group per survivor
        merged = (into[: lengths[b]] != torch.arange(lengths[b])).nonzero().flatten()
        assert len(merged) == lengths[b] - int(res.lengths[b])
        for i in merged.tolist():
            assert window_of[b * 120 + i] == window_of[b * 120 + int(into[i])]


# --- pictures 1 and 2: from the manifest ---------------------------------------------------------------------


def test_build_pictures_are_written_linked_once_and_plot_the_manifest(engines, tmp_path):
    engine_dir = engines["lightkv"]
    manifest = manifest_of(engine_dir)
    (engine_dir / "report.md").write_text("# Parity report: x\n\n**parity PASS**\n")
    paths = write_build_pictures(engine_dir)
    assert [p.name for p in paths] == [VISION_PNG, KV_PNG]
    for p in paths:
        assert p.parent == engine_dir / PICTURES_DIR
        assert_png(p, LAYER_PICTURE_SIZE)
    # The vanilla engine's pictures of the same model differ: they plot other per-layer series.
    vanilla = write_layer_pictures(manifest_of(engines["vanilla"]), tmp_path / "vanilla")
    assert_differ(paths[0], vanilla[0].path)
    assert_differ(paths[1], vanilla[1].path)
    write_build_pictures(engine_dir)  # again: no second section
    text = (engine_dir / "report.md").read_text()
    assert text.startswith("# Parity report: x\n\n**parity PASS**")
    assert text.count(PICTURES_HEADING) == 1
    assert f"({PICTURES_DIR}/{VISION_PNG})" in text and f"({PICTURES_DIR}/{KV_PNG})" in text

    # The plotted series against the analytic accounting, traced from the schedule on the reference layout.
    ref = manifest.reference_request
    layers = manifest.num_layers
    grids = tuple(tuple(g) for layout in ref.image_layouts for g in layout if isinstance(g, list))
    layout = TokenLayout(0, grids, ref.seq_len - ref.vision_tokens)
    trace = trace_schedule(parse_schedule(manifest.schedule, layers), layout, layers)
    vision = vision_picture_data(manifest, tmp_path / "v.png")
    assert vision.lightkv == trace.vision_per_layer
    assert vision.vanilla == (layout.vision,) * layers
    assert vision.stage_layers == tuple(s.layer for s in parse_schedule(manifest.schedule, layers).stages)
    hkv, d, nbytes = manifest.num_kv_heads, manifest.head_dim, dtype_bytes(manifest.dtype)
    kv = kv_picture_data(manifest, tmp_path / "k.png")
    assert list(kv.lightkv) == kv_bytes_per_layer([(1, hkv, s, d) for s in trace.seq_per_layer], nbytes)
    assert kv.vanilla == (kv_bytes_per_layer([(1, hkv, layout.seq_len, d)], nbytes)[0],) * layers
    assert sum(kv.lightkv) < sum(kv.vanilla)


def test_build_pictures_create_a_report_when_there_is_none(tmp_path, engines):
    engine_dir = tmp_path / "engine"
    engine_dir.mkdir()
    (engine_dir / "manifest.json").write_text((engines["vanilla"] / "manifest.json").read_text())
    write_build_pictures(engine_dir)
    text = (engine_dir / "report.md").read_text()
    assert text.startswith("# Report:") and PICTURES_HEADING in text
    vision = vision_picture_data(manifest_of(engine_dir), tmp_path / "v.png")
    assert vision.lightkv == vision.vanilla and vision.stage_layers == ()


def test_manifest_without_accounting_is_a_clear_error(tmp_path, engines):
    manifest = json.loads((engines["lightkv"] / "manifest.json").read_text())
    del manifest["reference_request"]["kv_bytes_per_layer"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="rebuild the engine"):
        write_build_pictures(tmp_path)


# --- pictures 3 and 4: from a PyTorch reference run ----------------------------------------------------------


def test_merge_map_and_guidance_match_the_run(engines, tmp_path, tiny_qwen_vl):
    engine_dir = engines["lightkv"]
    manifest = manifest_of(engine_dir)
    pics = request_pictures(engine_dir, tmp_path, loaded=tiny_qwen_vl)
    assert len(pics.paths()) == 4
    for p in pics.paths()[:2]:
        assert_png(p, LAYER_PICTURE_SIZE)
    # Another image, same prompt: the layer pictures are the same, the merge map and guidance are not.
    other = request_pictures(
        engine_dir, tmp_path / "other", parity_images(tuple(manifest.image_size), 9), loaded=tiny_qwen_vl
    )
    assert [p.name for p in other.paths()] == [p.name for p in pics.paths()]
    for mine, theirs in zip(pics.paths()[:2], other.paths()[:2], strict=True):
        np.testing.assert_array_equal(png_pixels(mine), png_pixels(theirs))
    for mine, theirs in zip(pics.paths()[2:], other.paths()[2:], strict=True):
        assert_differ(mine, theirs)

    # An independent run on the same inputs: the engine's prepare, the ONNX prefill and the PyTorch reference.
    engine = Engine.load(engine_dir)
    request = engine.prepare([parity_images(tuple(manifest.image_size), 0)], DEFAULT_PROMPT)
    run = torch_runtime.prefill(tiny_qwen_vl, torch_inputs(request), engine.schedule)
    onnx = engine.prefill(request)  # kept: per stage [1, S'_k]
    onnx_kept = onnx.kept
    span = request.spans[0][0]
    h, w = span.grid
    assert pics.merge_map.grid == (h, w) and pics.merge_map.cell == (28.0, 28.0)  # Qwen: patch 14 x merge 2

    origin = np.arange(request.seq_len)  # original sequence index of each token of the current sequence
    previous = None
    for k, stage in enumerate(pics.merge_map.stages):
        n_out = run.stages[k].spans[0][0].length
        assert (stage.layer, stage.windows, stage.ratio) == tuple(
            getattr(engine.schedule.stages[k], a) for a in ("layer", "windows", "ratio")
        )
        assert stage.groups.shape == (h, w) and (stage.groups >= 0).all()  # every token is in exactly one group
        assert sorted(np.unique(stage.groups).tolist()) == list(range(n_out))  # one group per survivor
        assert stage.tokens_out == n_out and stage.tokens_in == (span.length if k == 0 else previous.tokens_out)
        # Survivors, from the engine's own `kept` outputs, composed over the stages.
        origin = origin[onnx_kept[k][0]]
        start = run.stages[k].spans[0][0].start
        np.testing.assert_array_equal(stage.survivors, origin[start : start + n_out] - span.start)
        np.testing.assert_array_equal(stage.groups.reshape(-1)[stage.survivors], np.arange(n_out))
        if previous is not None:  # merges compound: each earlier group lies inside one later group
            for g in range(previous.tokens_out):
                assert len(np.unique(stage.groups[previous.groups == g])) == 1
        previous = stage

    # Stage 1 merges only inside its windows, on the image's true grid.
    first = pics.merge_map.stages[0]
    members, _ = window_layout(span.length, (h, w), first.windows)
    window = np.full(span.length, -1)
    for wdx, row in enumerate(members.tolist()):
        window[[i for i in row if i >= 0]] = wdx
    for g in range(first.tokens_out):
        assert len(np.unique(window[first.groups.reshape(-1) == g])) == 1

    guidance = run.stages[0].guidance[0, span.start : span.end].reshape(h, w).numpy()
    assert pics.guidance.layer == engine.schedule.stages[0].layer
    np.testing.assert_array_equal(pics.guidance.values, guidance)

    # The default request is the manifest's reference request: the measured KV bytes are the promised ones,
    # and also what the ONNX engine held.
    assert list(pics.kv.measured) == manifest.reference_request.kv_bytes_per_layer
    onnx_bytes = [k.nbytes + v.nbytes for k, v in zip(onnx.keys, onnx.values, strict=True)]
    assert list(pics.kv.measured) == onnx_bytes


def test_colour_groups_gives_touching_groups_different_colours():
    groups = np.array([[0, 0, 1, 2], [3, 4, 4, 2], [3, 5, 6, 6]])
    colour = colour_groups(groups, palette=20)
    for a, b in ((groups[:, :-1], groups[:, 1:]), (groups[:-1, :], groups[1:, :])):
        touching = a != b
        assert (colour[a[touching]] != colour[b[touching]]).all()


# --- the CLI ---------------------------------------------------------------------------------------------------


def test_cli_any_image_and_prompt(engines, tmp_path, capsys, tiny_qwen_vl):
    photo = tmp_path / "photo.png"
    parity_images((200, 150), 7).save(photo)  # another size and aspect: drawn as the processor sizes it
    out = tmp_path / "pics"
    rc = cli.main([str(engines["lightkv"]), "--image", str(photo), "--prompt", "What is red?", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    printed = [Path(line) for line in captured.out.splitlines()]
    assert [p.name for p in printed] == [VISION_PNG, KV_PNG, MERGE_PNG, GUIDANCE_PNG]
    for p in printed:
        assert p.parent == out
        assert_png(p)
    # Against the engine's default request (another image and prompt): every picture shows other data, except
    # the vision-token one, which plots only the manifest.
    default = request_pictures(engines["lightkv"], tmp_path / "default", loaded=tiny_qwen_vl)
    for mine, theirs in zip(printed, default.paths(), strict=True):
        assert mine.name == theirs.name
        if mine.name == VISION_PNG:
            np.testing.assert_array_equal(png_pixels(mine), png_pixels(theirs))
        else:  # a portrait image's panels have another shape than the landscape default's, or other pixels
            a, b = png_pixels(mine), png_pixels(theirs)
            assert a.shape != b.shape or not np.array_equal(a, b), mine.name


def test_cli_vanilla_engine_says_there_is_no_merge_map(engines, tmp_path, capsys):
    out = tmp_path / "pics"
    rc = cli.main([str(engines["vanilla"]), "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0
    assert "no merge map" in captured.err
    assert sorted(p.name for p in out.iterdir()) == sorted([VISION_PNG, KV_PNG])


@pytest.mark.parametrize("case", ["not-an-engine", "unreadable-image", "missing-image"])
def test_cli_bad_input_is_one_message_and_exit_2(engines, tmp_path, capsys, case):
    args = {
        "not-an-engine": [str(tmp_path)],
        "unreadable-image": [str(engines["lightkv"]), "--image", str(tmp_path / "x.png")],
        "missing-image": [str(engines["lightkv"]), "--image", str(tmp_path / "missing.png")],
    }[case]
    (tmp_path / "x.png").write_text("not an image")
    rc = cli.main([*args, "--out", str(tmp_path / "pics")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert ("not an engine directory" if case == "not-an-engine" else "cannot read image") in err
    assert not (tmp_path / "pics").exists()


def test_merge_stages_follow_tokens_through_skipped_and_empty_stages():
    """Synthetic records from the reference op: a merge, a stage the image is too small for, a no-op, a merge."""
    from lightkv_export.method.schedule import Schedule, Stage

    span = VisionSpan(3, 48, (6, 8))
    schedule = Schedule(8, (Stage(1, 2, 0.5), Stage(2, 3, 0.5), Stage(3, 1, 0.0), Stage(4, 1, 0.5)))
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, 60, 8, generator=g)  # [1, S, D]
    spans, records = [[span]], []
    for st in schedule.stages:
        xi = torch.rand(1, hidden.shape[1], generator=g)  # [1, S]
        res = lightkv_merge(hidden, xi, spans, windows=st.windows, ratio=st.ratio)
        records.append(torch_runtime.StageRecord(st.layer, res.kept, res.spans, res.skipped, xi, res.merged_into))
        hidden, spans = res.hidden, res.spans
    stages = merge_stages(records, span, schedule)
    assert [s.skipped for s in stages] == [False, True, False, False]  # 24 tokens < 8 * 3^2
    assert [(s.tokens_in, s.tokens_out) for s in stages] == [(48, 24), (24, 24), (24, 24), (24, 12)]
    np.testing.assert_array_equal(stages[1].groups, stages[0].groups)  # nothing moved
    np.testing.assert_array_equal(stages[2].groups, stages[0].groups)
    for s in stages:
        assert sorted(np.unique(s.groups).tolist()) == list(range(s.tokens_out))
    np.testing.assert_array_equal(guidance_values(records[0], span).reshape(-1), records[0].guidance[0, 3:51])
