"""The insert_lightkv graph pass: on hand-built toy decoders (tests/unit/micrograph.py) and on the real tiny export.

The toy decoder is re-implemented in torch with the reference merge between layers, so the transformed graph can be
checked value by value: K / V of every layer (shorter after each stage), the survivors' positions (through RoPE'd
keys), the last-token logits at the new lengths and every stage's `kept`.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from lightkv_export.contract import ROLE_META_KEY, ROLE_PREFIX, is_attention_role
from lightkv_export.errors import InputError
from lightkv_export.export import strip_roles
from lightkv_export.method.layout import OP_DOMAIN, OP_NAME
from lightkv_export.method.merge_plan import (
    RequestPlan,
    plan_request,
    stage_assign_name,
    stage_input_names,
    stage_kept_name,
)
from lightkv_export.method.schedule import Schedule, Stage, solve
from lightkv_export.method.spans import VisionSpan
from lightkv_export.models.positions import MROPE
from lightkv_export.passes.insert_lightkv import insert_lightkv
from tests.helpers import export_entry
from tests.unit.micrograph import ToyConfig, ToyOutputs, reference_prefill, toy_prefill

CFG = ToyConfig()
TWO_STAGES = Schedule(3, (Stage(1, 2, 0.5), Stage(2, 1, 0.5)))
ONE_STAGE = Schedule(3, (Stage(2, 2, 0.3),))
TOL = 1e-5

# Row 0: text, a 6 x 8 image, text, right padding. Row 1: a 6 x 6 image and a 4 x 4 one (too small for 2 x 2
# windows, so it skips stage 1 and merges at stage 2), text around them.
LAYOUT = ([[VisionSpan(3, 48, (6, 8))], [VisionSpan(2, 36, (6, 6)), VisionSpan(40, 16, (4, 4))]], [56, 60])
# Every image too small for stage 1 (W = 0 there); B = 1.
SMALL = ([[VisionSpan(4, 20, (4, 5))]], [30])
# One row, two images, no text after them.
NO_SUFFIX = ([[VisionSpan(1, 40, (5, 8)), VisionSpan(41, 35, (5, 7))]], [76])


@pytest.fixture(scope="module")
def toy() -> onnx.ModelProto:
    return toy_prefill(CFG)


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def request(spans: list[list[VisionSpan]], lengths: list[int], seed: int = 0) -> dict[str, np.ndarray]:
    """Random embeddings and the rows' M-RoPE positions, right-padded to max(lengths)."""
    seq = max(lengths)
    embeds = np.random.default_rng(seed).standard_normal((len(lengths), seq, CFG.hidden)).astype(np.float32)
    pos = np.zeros((3, len(lengths), seq), dtype=np.int64)
    for b, (row, n) in enumerate(zip(spans, lengths, strict=True)):
        pos[:, b, :n] = MROPE.host(n, row)[0]
    return {"inputs_embeds": embeds, "position_ids": pos, "lengths": np.asarray(lengths, dtype=np.int64)}


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))


def reference(feeds, spans, lengths, schedule: Schedule | None, plan: RequestPlan | None, positions="preserve"):
    layers = [s.layer for s in schedule.stages] if schedule else []
    embeds, pos = torch.from_numpy(feeds["inputs_embeds"]), torch.from_numpy(feeds["position_ids"])
    return reference_prefill(CFG, embeds, pos, lengths, spans, layers, plan, positions=positions)


def assert_matches(out: dict[str, np.ndarray], ref: ToyOutputs) -> None:
    """Logits, every layer's valid K / V (per row, the layer's own valid length) and every stage's kept."""
    np.testing.assert_allclose(out["logits"], ref.logits.numpy(), rtol=TOL, atol=TOL)
    for i in range(CFG.layers):
        for kv, expected in (("key", ref.keys[i]), ("value", ref.values[i])):
            got = out[f"present.{i}.{kv}"]
            assert got.shape == tuple(expected.shape), f"layer {i} {kv}: {got.shape} vs {tuple(expected.shape)}"
            for b, n in enumerate(ref.lengths[i]):
                np.testing.assert_allclose(got[b, :, :n], expected[b, :, :n].numpy(), rtol=TOL, atol=TOL)
    for k, kept in enumerate(ref.kept):
        assert np.array_equal(out[stage_kept_name(k)], kept.numpy()), f"stage {k}: kept differs"


# --- structure ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", [ONE_STAGE, TWO_STAGES], ids=["one-stage", "two-stages"])
def test_one_node_per_stage_and_a_valid_model(toy, schedule):
    out, report = insert_lightkv(toy, schedule)
    merges = [n for n in out.graph.node if (n.domain, n.op_type) == (OP_DOMAIN, OP_NAME)]
    assert len(merges) == report.stages == len(schedule.stages)
    assert report.guidance_nodes > 0 and report.cloned_nodes > 0  # rotary tables and the last-token index
    for node, stage in zip(merges, schedule.stages, strict=True):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["windows"] == stage.windows and attrs["ratio"] == pytest.approx(stage.ratio)
        assert attrs["plugin_name"] == OP_NAME.encode() and attrs["plugin_namespace"] == OP_DOMAIN.encode()
    assert [(f.domain, f.name) for f in out.functions] == [(OP_DOMAIN, OP_NAME)]
    onnx.checker.check_model(out, full_check=True)
    session(out)  # ONNX Runtime accepts it (inlines the function)


def test_roles_out_plan_in(toy):
    out, _ = insert_lightkv(toy, TWO_STAGES)
    outputs = [o.name for o in out.graph.output]
    # Only the attention roles stay (the ort-cpu attention fusion reads them; target writers strip them).
    assert [n for n in outputs if n.startswith(ROLE_PREFIX)] == [
        o.name for o in toy.graph.output if is_attention_role(o.name)
    ]
    plain = [n for n in outputs if n.startswith("lightkv.") and not n.startswith(ROLE_PREFIX)]
    assert plain == [name for k in range(2) for name in (stage_kept_name(k), stage_assign_name(k))]
    inputs = {i.name: i.type.tensor_type.elem_type for i in out.graph.input}
    for k in range(2):
        names = stage_input_names(k)
        assert names["text_valid"] in inputs and inputs[names["text_valid"]] == onnx.TensorProto.BOOL
        for role in ("win_index", "win_r", "out_lengths", "text_index"):
            assert inputs[names[role]] == onnx.TensorProto.INT64
    # The plan's feeds are exactly the new inputs.
    plan = plan_request(*LAYOUT, TWO_STAGES)
    assert set(plan.feeds) == set(inputs) - {"inputs_embeds", "position_ids", "lengths"}
    # The input model is left as it was.
    assert any(o.name.startswith(ROLE_PREFIX) for o in toy.graph.output)
    assert not any(n.domain == OP_DOMAIN for n in toy.graph.node)


def test_kv_lengths_follow_the_plan(toy):
    out, _ = insert_lightkv(toy, TWO_STAGES)
    spans, lengths = LAYOUT
    plan = plan_request(spans, lengths, TWO_STAGES)
    result = run(out, {**request(spans, lengths), **plan.feeds})
    seq = max(lengths)
    expected = [seq, plan.stages[0].out_seq_len, plan.stages[1].out_seq_len]  # layer 1 = lambda_1 keeps S
    assert expected[0] > expected[1] > expected[2]
    for i, n in enumerate(expected):
        assert result[f"present.{i}.key"].shape[2] == n and result[f"present.{i}.value"].shape[2] == n
    for k, stage in enumerate(plan.stages):
        kept = result[stage_kept_name(k)]
        assert kept.shape == (2, stage.out_seq_len)
        assert [int((row >= 0).sum()) for row in kept] == list(stage.out_lengths)
    # Declared shapes: later layers' K / V carry the stage's symbolic length.
    dims = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in out.graph.output}
    seq_dims = [dims[f"present.{i}.{kind}"][2] for i in range(3) for kind in ("key", "value")]
    assert seq_dims[0::2] == seq_dims[1::2]  # K and V of a layer share their length
    assert len(set(seq_dims[0::2])) == 3, seq_dims  # three layer groups, three distinct lengths (0 vs 2 included)
    assert all(isinstance(d, str) for d in seq_dims[2:]), seq_dims  # merged lengths are symbolic, not baked in


# --- numerics against the hand-written decoder --------------------------------------------------------------


@pytest.mark.parametrize("positions", ["preserve", "official"])
@pytest.mark.parametrize("layout", [LAYOUT, SMALL, NO_SUFFIX], ids=["batch", "all-skipped", "no-suffix"])
def test_matches_the_reference_decoder(toy, positions, layout):
    spans, lengths = layout
    out, _ = insert_lightkv(toy, TWO_STAGES, positions=positions)
    plan = plan_request(spans, lengths, TWO_STAGES)
    feeds = request(spans, lengths, seed=1)
    result = run(out, {**feeds, **plan.feeds})
    # Logits are read at each row's last valid token after the last stage: the new lengths, not the prompt's.
    assert_matches(result, reference(feeds, spans, lengths, TWO_STAGES, plan, positions))


@pytest.mark.parametrize("positions", ["preserve", "official"])
def test_later_layers_see_the_mode_positions(toy, positions):
    """Keys after a merge are RoPE'd with the mode's positions: preserve = the survivors' original ids,
    official = 0..S'-1. The other mode's reference must not match (the check can tell them apart)."""
    spans, lengths = LAYOUT
    out, _ = insert_lightkv(toy, TWO_STAGES, positions=positions)
    plan = plan_request(spans, lengths, TWO_STAGES)
    feeds = request(spans, lengths, seed=2)
    result = run(out, {**feeds, **plan.feeds})
    ref = reference(feeds, spans, lengths, TWO_STAGES, plan, positions)
    other = reference(feeds, spans, lengths, TWO_STAGES, plan, "official" if positions == "preserve" else "preserve")
    # What the reference fed later layers, spelled out for each mode.
    kept0 = ref.kept[0].clamp(min=0)
    if positions == "preserve":
        original = torch.from_numpy(feeds["position_ids"])
        assert torch.equal(ref.positions[1], original.gather(2, kept0[None].expand(3, -1, -1)))
    else:
        assert torch.equal(ref.positions[1][0, 0], torch.arange(kept0.shape[1]))
    for i in (1, 2):
        n = ref.lengths[i][0]
        np.testing.assert_allclose(result[f"present.{i}.key"][0, :, :n], ref.keys[i][0, :, :n], rtol=TOL, atol=TOL)
        assert np.abs(result[f"present.{i}.key"][0, :, :n] - other.keys[i][0, :, :n].numpy()).max() > 1e-2


def test_identity_schedule_equals_the_vanilla_graph(toy):
    """Ratio-0 stages run the whole LightKV path and merge nothing: every valid output equals the vanilla graph."""
    identity = Schedule(3, (Stage(1, 2, 0.0), Stage(2, 1, 0.0)))
    spans, lengths = LAYOUT
    out, _ = insert_lightkv(toy, identity)
    plan = plan_request(spans, lengths, identity)
    feeds = request(spans, lengths, seed=3)
    lightkv = run(out, {**feeds, **plan.feeds})
    vanilla = run(strip_roles(toy_prefill(CFG)), feeds)
    np.testing.assert_allclose(lightkv["logits"], vanilla["logits"], rtol=TOL, atol=TOL)
    for i in range(CFG.layers):
        for b, n in enumerate(lengths):
            for kv in ("key", "value"):
                got, want = lightkv[f"present.{i}.{kv}"][b, :, :n], vanilla[f"present.{i}.{kv}"][b, :, :n]
                np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)
    for k in range(2):
        kept = lightkv[stage_kept_name(k)]
        assert [list(row[row >= 0]) for row in kept] == [list(range(n)) for n in lengths]


# --- user errors ----------------------------------------------------------------------------------------------


def test_schedule_for_another_depth_is_refused(toy):
    with pytest.raises(InputError, match="schedule is for 4 layers, the graph has 3"):
        insert_lightkv(toy, Schedule(4, (Stage(2, 2, 0.5),)))


def test_graph_without_role_metadata_is_refused():
    with pytest.raises(InputError, match="no LightKV role metadata"):
        insert_lightkv(toy_prefill(CFG, with_roles=False), TWO_STAGES)


def test_unknown_position_mode_is_refused(toy):
    with pytest.raises(InputError, match="positions must be"):
        insert_lightkv(toy, TWO_STAGES, positions="reset")


def test_metadata_is_what_the_exporter_records(toy, tiny_export):
    def meta(model):
        return json.loads({p.key: p.value for p in model.metadata_props}[ROLE_META_KEY])

    assert set(meta(toy)) == set(meta(tiny_export))  # the micro-graph stands in for a real export
    assert meta(tiny_export)["position_scheme"] == "mrope"


# --- the real tiny export ----------------------------------------------------------------------------------------

PROMPT = "Describe this image."


@pytest.fixture(scope="module")
def tiny_export(builds):
    """tiny-qwen-vl's prefill, from the export the session's builds share (not exported again here)."""
    return onnx.load(str(export_entry(builds("tiny-qwen-vl", 0.55).engine_dirs["ort-cpu"]) / "prefill.onnx"))


@pytest.mark.parametrize("ratio", [0.55, 0.3])
def test_tiny_export_matches_the_torch_runtime(tiny_qwen_vl, tiny_export, test_image, ratio):
    from lightkv_export.torch_runtime import prefill

    loaded = tiny_qwen_vl
    n_layers = len(loaded.family.text_model(loaded.model).layers)
    schedule = solve(n_layers, ratio, loaded.spec.default_windows)
    inputs = loaded.family.prepare(loaded, [test_image], PROMPT)
    seq = inputs.input_ids.shape[1]
    plan = plan_request(inputs.spans, [seq], schedule)
    out, report = insert_lightkv(tiny_export, schedule)
    assert report.stages == len(schedule.stages)
    feeds = {
        "inputs_embeds": inputs.inputs_embeds.numpy(),
        "position_ids": inputs.position_ids.numpy(),
        "lengths": np.asarray([seq], dtype=np.int64),
        **plan.feeds,
    }
    result = run(out, feeds)
    ref = prefill(loaded, inputs, schedule)
    tol = loaded.spec.tolerances
    np.testing.assert_allclose(result["logits"], ref.logits.numpy(), atol=tol["logits"], rtol=0)
    shapes = [result[f"present.{i}.key"].shape for i in range(n_layers)]
    assert [s[2] for s in shapes] == ref.kv_lengths()
    assert ref.kv_lengths()[0] > ref.kv_lengths()[-1]
    for i, layer in enumerate(ref.cache.layers):
        np.testing.assert_allclose(result[f"present.{i}.key"], layer.keys.numpy(), atol=tol["kv"], rtol=0)
        np.testing.assert_allclose(result[f"present.{i}.value"], layer.values.numpy(), atol=tol["kv"], rtol=0)
    for k, record in enumerate(ref.stages):
        assert np.array_equal(result[stage_kept_name(k)], record.kept.numpy())
