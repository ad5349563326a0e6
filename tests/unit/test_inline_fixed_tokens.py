"""Tokens that never merge inside a grid (LLaVA-NeXT's newline after every row): the layout part (h, w, n), the
plan's reordering at the grid's first merge, the PyTorch runtime and the transformed ONNX prefill against it.

The end-to-end check runs tiny-qwen-vl with a synthetic layout over its own prompt: its 12 x 16 placeholder run is
read as a plain 4 x 16 grid and an 8 x 15 map whose last column plays the newlines (any embeddings will do), so
the real exported decoder merges a grid with inline tokens.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from lightkv_export.errors import InputError
from lightkv_export.method.layout import inline_order, plan_stage
from lightkv_export.method.merge_plan import (
    ORDER,
    plan_request,
    stage_input_names,
    stage_kept_name,
    takes_order,
    text_positions,
)
from lightkv_export.method.reference import apply_plan, lightkv_merge
from lightkv_export.method.schedule import Schedule, Stage, solve
from lightkv_export.method.spans import ImageLayout, VisionSpan, spans_on_grids
from lightkv_export.passes.insert_lightkv import insert_lightkv
from tests.helpers import export_entry

PLACEHOLDER = 5
# text, a plain 4 x 4 grid (too small for 2 x 2 windows: it merges first at stage 2), a separator, a 6 x 8 map with
# a newline after each row, text.
LAYOUT = ImageLayout(((4, 4), 1, (6, 8, 1)))
IDS = np.array([[1, 2] + [PLACEHOLDER] * 16 + [3] + [PLACEHOLDER] * 54 + [4, 4]])
SEQ = IDS.shape[1]
SCHEDULE = Schedule(3, (Stage(1, 2, 0.5), Stage(2, 1, 0.5)))


def spans_of(layout: ImageLayout = LAYOUT, ids: np.ndarray = IDS) -> list[list[VisionSpan]]:
    return spans_on_grids(ids, PLACEHOLDER, layout.grid_parts, "test")


def newline_positions(spans) -> np.ndarray:
    return np.concatenate([s.inline_positions() for row in spans for s in row if s.trailing])


# --- representation ----------------------------------------------------------------------------------------------


def test_layout_part_counts_and_json():
    assert LAYOUT.grids == ((4, 4), (6, 8))  # what accounting and profiles read: the mergeable grids
    assert (LAYOUT.vision_tokens, LAYOUT.fixed_tokens, LAYOUT.tokens) == (64, 1 + 6, 71)
    assert LAYOUT.to_json() == [[4, 4], 1, [6, 8, 1]]
    assert ImageLayout.from_json(LAYOUT.to_json()) == LAYOUT
    # Layouts of today's families read and write as before.
    for value in ([[24, 24]], [[2, 2], 1, [3, 4], 2]):
        assert ImageLayout.from_json(value).to_json() == value
    with pytest.raises(ValueError, match="per-row fixed tokens"):
        ImageLayout(((6, 8, 0),))


def test_spans_cut_placeholders_with_their_newlines():
    (row,) = spans_of()
    assert row == [VisionSpan(2, 16, (4, 4)), VisionSpan(19, 48, (6, 8), trailing=1)]
    assert row[1].end == 19 + 6 * 9  # the span covers its newlines
    assert row[1].inline_positions().tolist() == [19 + 9 * r + 8 for r in range(6)]
    vision = row[1].vision_positions()
    assert len(vision) == 48 and not set(vision) & set(row[1].inline_positions())
    # Without the per-row tokens the map's 54 placeholders are not 48: refused.
    with pytest.raises(InputError, match="more image placeholder tokens"):
        spans_on_grids(IDS, PLACEHOLDER, LAYOUT.grids, "test")
    # Guidance reads the newlines as non-vision keys, as it reads the separator.
    index, valid = text_positions([row], [SEQ])
    assert set(row[1].inline_positions()) <= set(index[valid].tolist())
    from lightkv_export.torch_runtime import vision_mask

    vision = vision_mask([row], SEQ)[0].numpy()  # [S]
    assert np.array_equal(np.flatnonzero(~vision), index[valid])  # the PyTorch runtime's split is the same


# --- the plan ----------------------------------------------------------------------------------------------------


def simulate(spans, schedule: Schedule, seed: int = 0) -> list[np.ndarray]:
    """Each stage's output as original positions [S'], running the reference op on random data as torch_runtime
    does (gathered by the plan's order)."""
    plan = plan_request(spans, [SEQ], schedule, reorder=True)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.arange(SEQ)
    outs = []
    for stage in plan.stages:
        seq = stage.seq_len
        hidden, xi = torch.randn(1, seq, 8, generator=gen), torch.rand(1, seq, generator=gen)
        order = torch.from_numpy(stage.order) if stage.order is not None else torch.arange(seq)[None]
        res = apply_plan(hidden.gather(1, order[..., None].expand(-1, -1, 8)), xi.gather(1, order), stage)
        ids = ids[order[0][res.kept[0]]]
        outs.append(ids.numpy())
    return outs


def test_newlines_never_in_a_window_and_survive_every_stage():
    spans = spans_of()
    newlines = newline_positions(spans)
    plan = plan_request(spans, [SEQ], SCHEDULE, reorder=True)
    first = plan.stages[0]
    assert first.order is not None and sorted(first.order[0].tolist()) == list(range(SEQ))
    members = first.win_index[first.win_index >= 0]
    assert not set(first.order.reshape(-1)[members].tolist()) & set(newlines.tolist())
    for out in simulate(spans, SCHEDULE):
        assert set(newlines.tolist()) <= set(out.tolist())
    # After the first merge the map is a plain grid: no later stage reorders.
    assert all(s.trailing == 0 for row in first.spans for s in row)
    assert plan.stages[1].order is None


def test_newlines_land_after_the_grids_survivors():
    spans = spans_of()
    plan = plan_request(spans, [SEQ], SCHEDULE, reorder=True)
    out = simulate(spans, SCHEDULE)[0]
    grid = plan.stages[0].spans[0][1]  # the map after stage 1
    assert out[grid.start : grid.end].tolist() == sorted(out[grid.start : grid.end].tolist())  # raster order
    assert set(out[grid.start : grid.end].tolist()) <= set(spans[0][1].vision_positions().tolist())
    assert out[grid.end : grid.end + 6].tolist() == newline_positions(spans).tolist()
    assert out[grid.end + 6 :].tolist() == [SEQ - 2, SEQ - 1]  # the text after the image, in place
    assert out[: spans[0][0].end].tolist() == list(range(spans[0][0].end))  # before the map: untouched


def test_a_grid_reorders_at_its_own_first_merge():
    # A 3 x 3 map with newlines is too small for stage 1's 2 x 2 windows: no order at stage 1, one at stage 2.
    ids = np.array([[1] + [PLACEHOLDER] * 12 + [2]])
    spans = spans_on_grids(ids, PLACEHOLDER, [(3, 3, 1)], "test")
    plan = plan_request(spans, [14], SCHEDULE, reorder=True)
    assert plan.stages[0].order is None and plan.stages[0].spans[0][0].trailing == 1
    assert plan.stages[1].order is not None
    assert np.array_equal(plan.feeds[stage_input_names(0)[ORDER]], np.arange(14)[None])  # identity, still fed


def test_ratio_zero_keeps_the_models_own_order():
    spans = spans_of()
    order, same = inline_order(spans, SEQ, windows=2, ratio=0.0)
    assert order is None and same == tuple(tuple(row) for row in spans)
    plan = plan_stage(spans, SEQ, windows=2, ratio=0.0)  # no reorder needed where nothing merges
    assert plan.out_lengths == (SEQ,) and plan.spans[0][1].trailing == 1


def test_layouts_without_inline_tokens_plan_as_before():
    ids = np.array([[1, 2] + [PLACEHOLDER] * 16 + [3] + [PLACEHOLDER] * 48 + [4, 4]])
    spans = spans_on_grids(ids, PLACEHOLDER, [(4, 4), (6, 8)], "test")
    plain = plan_request(spans, [ids.shape[1]], SCHEDULE)
    assert not any(ORDER in name for name in plain.feeds)  # today's engines: no new input
    assert all(s.order is None for s in plain.stages)
    reordering = plan_request(spans, [ids.shape[1]], SCHEDULE, reorder=True)
    for name, value in plain.feeds.items():
        assert np.array_equal(reordering.feeds[name], value), name
    for k in range(len(SCHEDULE.stages)):  # an engine built with the input gets the identity
        order = reordering.feeds[stage_input_names(k)[ORDER]]
        assert np.array_equal(order, np.arange(order.shape[1])[None])


def test_callers_that_cannot_reorder_are_refused():
    spans = spans_of()
    with pytest.raises(InputError, match="order input"):
        plan_request(spans, [SEQ], SCHEDULE)  # an engine built without the order input
    with pytest.raises(InputError, match="reorder=True"):
        plan_stage(spans, SEQ, windows=2, ratio=0.5)
    with pytest.raises(InputError, match="reorder=True"):  # the reference op on the input as it is
        lightkv_merge(torch.zeros(1, SEQ, 8), torch.zeros(1, SEQ), spans, windows=2, ratio=0.5)


# --- the PyTorch runtime and the transformed graph on the real tiny export ---------------------------------------

PROMPT = "Describe this image."


@pytest.fixture(scope="module")
def tiny_export(builds):
    """tiny-qwen-vl's prefill, from the export the session's builds share (not exported again here)."""
    return onnx.load(str(export_entry(builds("tiny-qwen-vl", 0.55).engine_dirs["ort-cpu"]) / "prefill.onnx"))


@pytest.fixture(scope="module")
def inline_inputs(tiny_qwen_vl, test_image):
    """The tiny model's own prompt with its 12 x 16 placeholders read as a 4 x 16 grid and an 8 x 15 map with a
    newline after each row (the model's embeddings and positions as they are)."""
    inputs = tiny_qwen_vl.family.prepare(tiny_qwen_vl, [test_image], PROMPT)
    (span,) = inputs.spans[0]
    assert span.grid == (12, 16)
    spans = spans_on_grids(inputs.input_ids.numpy(), int(inputs.input_ids[0, span.start]), [(4, 16), (8, 15, 1)], "")
    return dataclasses.replace(inputs, spans=spans)


def test_tiny_export_with_inline_tokens_matches_the_torch_runtime(tiny_qwen_vl, tiny_export, inline_inputs):
    from lightkv_export.torch_runtime import prefill

    loaded, inputs = tiny_qwen_vl, inline_inputs
    n_layers = len(loaded.family.text_model(loaded.model).layers)
    schedule = solve(n_layers, 0.55, loaded.spec.default_windows)
    seq = inputs.input_ids.shape[1]
    plan = plan_request(inputs.spans, [seq], schedule, reorder=True)
    assert plan.stages[0].order is not None  # the map merges at stage 1: the stage reorders

    out, _ = insert_lightkv(tiny_export, schedule, reorder=True)
    assert takes_order([i.name for i in out.graph.input])
    sess = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {
        "inputs_embeds": inputs.inputs_embeds.numpy(),
        "position_ids": inputs.position_ids.numpy(),
        "lengths": np.asarray([seq], dtype=np.int64),
        **plan.feeds,
    }
    names = [o.name for o in sess.get_outputs()]
    result = dict(zip(names, sess.run(names, feeds), strict=True))

    ref = prefill(loaded, inputs, schedule)
    tol = loaded.spec.tolerances
    for k, record in enumerate(ref.stages):
        assert np.array_equal(result[stage_kept_name(k)], record.kept.numpy())
    # kept is in the stage's input order: after the first stage the newlines sit behind the map's survivors.
    newlines = newline_positions(inputs.spans)
    kept0 = ref.stages[0].kept[0].numpy()
    grid = ref.stages[0].spans[0][1]
    assert kept0[grid.end : grid.end + len(newlines)].tolist() == newlines.tolist()
    assert [s[2] for s in (result[f"present.{i}.key"].shape for i in range(n_layers))] == ref.kv_lengths()
    for i, layer in enumerate(ref.cache.layers):
        np.testing.assert_allclose(result[f"present.{i}.key"], layer.keys.numpy(), atol=tol["kv"], rtol=0)
        np.testing.assert_allclose(result[f"present.{i}.value"], layer.values.numpy(), atol=tol["kv"], rtol=0)
    np.testing.assert_allclose(result["logits"], ref.logits.numpy(), atol=tol["logits"], rtol=0)


def test_graphs_without_the_flag_are_unchanged(tiny_export):
    schedule = Schedule(8, (Stage(3, 2, 0.5), Stage(4, 2, 0.5), Stage(7, 1, 0.5)))
    plain, _ = insert_lightkv(tiny_export, schedule)
    assert not takes_order([i.name for i in plain.graph.input])
    meta = {p.key: p.value for p in plain.metadata_props}
    assert all('"reorder"' not in v for v in meta.values())
    reordering, _ = insert_lightkv(tiny_export, schedule, reorder=True)
    extra = {i.name for i in reordering.graph.input} - {i.name for i in plain.graph.input}
    assert extra == {stage_input_names(k)[ORDER] for k in range(len(schedule.stages))}


# --- engines: the toy decoder (tests/unit/micrograph.py) ---------------------------------------------------------


@pytest.fixture(scope="module")
def toy_reordering():
    from tests.unit.micrograph import ToyConfig, toy_prefill

    cfg = ToyConfig()
    return cfg, insert_lightkv(toy_prefill(cfg), SCHEDULE, reorder=True)[0]


def test_the_engine_feeds_the_order_when_its_graph_takes_it(toy_reordering):
    from lightkv_export.runtime import Engine, Request
    from tests.helpers import make_manifest

    cfg, model = toy_reordering
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    manifest = make_manifest(num_layers=cfg.layers, schedule=str(SCHEDULE), hidden_size=cfg.hidden)
    engine = Engine(None, manifest, {"prefill": sess}, None)
    assert engine.reorders
    embeds = np.random.default_rng(0).standard_normal((1, SEQ, cfg.hidden)).astype(np.float32)
    positions = np.tile(np.arange(SEQ, dtype=np.int64), (3, 1, 1))  # [3, 1, S]
    out = engine.prefill(Request(IDS, embeds, positions, 0, spans_of()))
    grid = out.plan.stages[0].spans[0][1]
    newlines = newline_positions(spans_of())
    assert out.kept[0][0, grid.end : grid.end + len(newlines)].tolist() == newlines.tolist()
    assert out.keys[-1].shape[2] == out.plan.lengths[0]


def test_tensorrt_lowering_refuses_the_order_input(toy_reordering):
    from lightkv_export.passes.lower_trt_plugin import lower_trt_plugin

    with pytest.raises(InputError, match="order input"):
        lower_trt_plugin(toy_reordering[1])
