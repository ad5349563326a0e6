"""LightKVMerge as an ONNX local function, run in ONNX Runtime (CPU), against the PyTorch reference.

`kept` must be identical and hidden equal within fp32 rounding (the dtype's rounding for fp16 / bf16). The cases
cover the layout corners of reference.py: several images per row with different grids, uneven windows, skipped
images, W = 0, ratio 0, right padding, the official grid, ties, zero guidance, and seeded random layouts.
"""

from __future__ import annotations

import random

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from lightkv_export.method.layout import OP_DOMAIN, OP_NAME, OP_VERSION, plan_stage
from lightkv_export.method.onnx_function import (
    ATTRIBUTES,
    INPUTS,
    MIN_OPSET,
    OUTPUTS,
    lightkv_function,
    plan_feeds,
    run_ort,
    standalone_model,
)
from lightkv_export.method.reference import apply_plan
from lightkv_export.method.spans import VisionSpan

DIM = 8  # small D keeps ORT fast; the op is per-token, so D does not change any code path
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}  # relative, on the merged values


def layout_inputs(b: int, seq: int, seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, seq, DIM, generator=g).to(dtype)  # [B, S, D]
    guidance = torch.rand(b, seq, generator=g)  # [B, S] fp32, positive
    return hidden, guidance


def check_stage(hidden, guidance, spans, *, windows, ratio, grid_mode="true", lengths=None):
    """Plan once, run both implementations, compare; returns the plan for further checks."""
    plan = plan_stage(spans, hidden.shape[1], windows=windows, ratio=ratio, grid_mode=grid_mode, lengths=lengths)
    ref = apply_plan(hidden, guidance, plan)
    out, kept = run_ort(hidden, guidance, plan)
    assert kept.dtype == torch.int64 and out.dtype == hidden.dtype
    assert torch.equal(kept, ref.kept), f"kept differs:\nort {kept}\nref {ref.kept}"
    assert out.shape == ref.hidden.shape == (hidden.shape[0], plan.out_seq_len, hidden.shape[2])
    tol = TOL[hidden.dtype]
    torch.testing.assert_close(out.float(), ref.hidden.float(), rtol=tol, atol=tol)
    # Untouched survivors are copied bit for bit, padding rows are exact zeros.
    touched = torch.zeros(hidden.shape[:2], dtype=torch.bool)
    if plan.win_index.size:
        flat = torch.from_numpy(plan.win_index[plan.win_index >= 0])
        touched.view(-1)[flat] = True
    for b in range(hidden.shape[0]):
        for j, s in enumerate(kept[b].tolist()):
            if s < 0:
                assert torch.all(out[b, j] == 0)
            elif not touched[b, s]:
                assert torch.equal(out[b, j], hidden[b, s])
    return plan


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_batch_of_rows_with_several_images(dtype):
    spans = [
        [VisionSpan(3, 120, (10, 12)), VisionSpan(130, 48, (6, 8))],
        [VisionSpan(0, 96, (12, 8))],
        [VisionSpan(5, 64, (8, 8)), VisionSpan(72, 35, (5, 7)), VisionSpan(110, 70, (7, 10))],
    ]
    hidden, guidance = layout_inputs(3, 185, seed=1, dtype=dtype)
    plan = check_stage(hidden, guidance, spans, windows=2, ratio=0.5)
    assert plan.skipped == ((False, False), (False,), (False, False, False))
    assert len(set(plan.out_lengths)) > 1  # rows end up with different lengths: right padding in the output


def test_uneven_windows():
    # 13 x 11 with 3 windows per side: bands of 5/4/4 rows and 4/4/3 columns, so window sizes differ.
    spans = [[VisionSpan(4, 143, (13, 11))]]
    hidden, guidance = layout_inputs(1, 160, seed=2)
    plan = check_stage(hidden, guidance, spans, windows=3, ratio=0.45)
    sizes = (plan.win_index >= 0).sum(1)
    assert len(set(sizes.tolist())) > 1


def test_partial_last_row_grid():
    # After a merge the grid may have a partial last row (h * w > n): derived grids feed the next stage.
    spans = [[VisionSpan(2, 77, (8, 10))]]
    hidden, guidance = layout_inputs(1, 90, seed=3)
    check_stage(hidden, guidance, spans, windows=2, ratio=0.5)


def test_skipped_images_next_to_merged_ones():
    # 31 < 8 * 2^2 = 32 tokens: that image skips the stage, its neighbour merges.
    spans = [[VisionSpan(1, 31, (4, 8)), VisionSpan(40, 64, (8, 8))], [VisionSpan(0, 20, (4, 5))]]
    hidden, guidance = layout_inputs(2, 110, seed=4)
    plan = check_stage(hidden, guidance, spans, windows=2, ratio=0.5, lengths=[110, 60])
    assert plan.skipped == ((True, False), (True,))
    assert plan.out_lengths[1] == 60


def test_every_image_skipped_has_no_windows():
    spans = [[VisionSpan(2, 30, (5, 6))], [VisionSpan(0, 16, (4, 4))]]
    hidden, guidance = layout_inputs(2, 40, seed=5)
    plan = check_stage(hidden, guidance, spans, windows=2, ratio=0.5, lengths=[40, 33])
    assert plan.win_index.size == 0 and plan.win_r.size == 0  # W = 0
    assert plan.out_lengths == (40, 33)


def test_no_images_at_all():
    hidden, guidance = layout_inputs(2, 12, seed=6)
    check_stage(hidden, guidance, [[], []], windows=2, ratio=0.5, lengths=[12, 7])


def test_ratio_zero_is_compaction_only():
    spans = [[VisionSpan(3, 64, (8, 8))], [VisionSpan(0, 64, (8, 8))]]
    hidden, guidance = layout_inputs(2, 80, seed=7)
    plan = check_stage(hidden, guidance, spans, windows=2, ratio=0.0, lengths=[80, 70])
    assert plan.out_lengths == (80, 70)
    out, kept = run_ort(hidden, guidance, plan)
    assert torch.equal(out[0], hidden[0]) and torch.equal(out[1, :70], hidden[1, :70])
    assert torch.all(kept[1, 70:] == -1) and torch.all(out[1, 70:] == 0)


def test_right_padded_rows_of_different_lengths():
    spans = [[VisionSpan(4, 80, (8, 10))], [VisionSpan(2, 40, (5, 8))], [VisionSpan(1, 64, (8, 8))]]
    hidden, guidance = layout_inputs(3, 100, seed=8)
    # Garbage in the padding must not leak into anything.
    hidden[1, 50:] = 1e6
    plan = check_stage(hidden, guidance, spans, windows=2, ratio=0.3, lengths=[100, 50, 70])
    assert plan.out_lengths[1] < 50


@pytest.mark.parametrize("grid_mode", ["true", "official"])
def test_official_grid_mode(grid_mode):
    spans = [[VisionSpan(3, 72, (6, 12))], [VisionSpan(0, 50, (5, 10))]]
    hidden, guidance = layout_inputs(2, 90, seed=9)
    check_stage(hidden, guidance, spans, windows=2, ratio=0.5, grid_mode=grid_mode)


def test_official_grid_changes_the_windows():
    spans = [[VisionSpan(0, 72, (6, 12))]]
    true_plan = plan_stage(spans, 72, windows=2, ratio=0.5, grid_mode="true")
    official = plan_stage(spans, 72, windows=2, ratio=0.5, grid_mode="official")
    assert not np.array_equal(true_plan.win_index, official.win_index)  # so the test above compares different plans


def test_ties_pick_lowest_b_and_lowest_a():
    # Every token identical: all similarities tie, so partner and ranking rest on the tie rules alone.
    spans = [[VisionSpan(0, 64, (8, 8))]]
    hidden = torch.ones(1, 70, DIM)
    guidance = torch.rand(1, 70, generator=torch.Generator().manual_seed(10))
    check_stage(hidden, guidance, spans, windows=2, ratio=0.5)
    # Signed one-hot tokens: similarities are exactly -1, 0 or 1 in any summation order, so many A tokens tie
    # for the best score and many B tokens tie as partners (near-ties that differ by rounding would not be a
    # fair comparison between two implementations; exact ones must follow the rules).
    g = torch.Generator().manual_seed(11)
    basis = torch.eye(DIM)[torch.randint(0, 3, (70,), generator=g)]  # [S, D], only 3 directions
    hidden2 = (basis * torch.where(torch.rand(70, 1, generator=g) < 0.8, 1.0, -1.0)).unsqueeze(0)  # [1, S, D]
    for ratio in (0.25, 0.5):
        check_stage(hidden2, torch.rand(1, 70, generator=g), spans, windows=2, ratio=ratio)


def test_zero_guidance_takes_the_plain_mean():
    spans = [[VisionSpan(0, 64, (8, 8))]]
    hidden, _ = layout_inputs(1, 70, seed=12)
    check_stage(hidden, torch.zeros(1, 70), spans, windows=2, ratio=0.5)
    guidance = torch.rand(1, 70)
    guidance[0, :32] = 0  # some merge groups with weight, some without
    check_stage(hidden, guidance, spans, windows=2, ratio=0.5)


def random_layout(rng: random.Random) -> tuple[list[list[VisionSpan]], list[int], int]:
    """Rows of 0-3 images with random grids (some too small for the stage), text between, right padding."""
    rows, lengths = [], []
    for _ in range(rng.randint(1, 3)):
        pos, row = rng.randint(0, 4), []
        for _ in range(rng.randint(0, 3)):
            h, w = rng.randint(2, 11), rng.randint(2, 11)
            n = h * w - rng.randint(0, w - 1) if rng.random() < 0.3 else h * w  # sometimes a partial last row
            row.append(VisionSpan(pos, n, (h, w)))
            pos += n + rng.randint(0, 5)
        rows.append(row)
        lengths.append(max(pos, 2))
    return rows, lengths, max(lengths) + rng.randint(0, 3)


@pytest.mark.parametrize("seed", range(24))
def test_random_layouts(seed):
    rng = random.Random(seed)
    spans, lengths, seq = random_layout(rng)
    windows = rng.choice([1, 1, 2, 2, 3])
    ratio = rng.choice([0.0, 0.1, 0.25, 0.3, 0.5, 0.7])
    grid_mode = rng.choice(["true", "true", "official"])
    dtype = rng.choice([torch.float32, torch.float32, torch.float16, torch.bfloat16])
    hidden, guidance = layout_inputs(len(spans), seq, seed=100 + seed, dtype=dtype)
    check_stage(hidden, guidance, spans, windows=windows, ratio=ratio, grid_mode=grid_mode, lengths=lengths)


def test_two_stages_chained():
    # Stage 2 runs on stage 1's output with the derived spans and grids (partial last rows included).
    spans = [[VisionSpan(3, 120, (10, 12))], [VisionSpan(1, 99, (9, 11))]]
    hidden, guidance = layout_inputs(2, 130, seed=13)
    p1 = plan_stage(spans, 130, windows=2, ratio=0.5, lengths=[130, 110])
    out1, _ = run_ort(hidden, guidance, p1)
    ref1 = apply_plan(hidden, guidance, p1)
    g2 = torch.rand(2, p1.out_seq_len, generator=torch.Generator().manual_seed(14))
    check_stage(ref1.hidden, g2, p1.spans, windows=1, ratio=0.5, lengths=p1.out_lengths)
    torch.testing.assert_close(out1, ref1.hidden, rtol=1e-6, atol=1e-6)


# --- the ONNX artefacts --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16])
def test_standalone_model_passes_the_checker(dtype):
    model = standalone_model(dtype, windows=3, ratio=0.25, grid_mode="official")
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == list(INPUTS)
    assert [o.name for o in model.graph.output] == list(OUTPUTS)
    assert model.graph.input[0].type.tensor_type.elem_type == dtype
    assert model.graph.output[0].type.tensor_type.elem_type == dtype


def test_node_carries_the_plugin_identity():
    model = standalone_model(windows=3, ratio=0.25, grid_mode="official")
    (node,) = model.graph.node
    assert (node.domain, node.op_type) == (OP_DOMAIN, OP_NAME)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["plugin_name"] == OP_NAME.encode()
    assert attrs["plugin_namespace"] == OP_DOMAIN.encode()
    assert attrs["plugin_version"] == str(OP_VERSION).encode()
    assert attrs["windows"] == 3 and attrs["grid_mode"] == b"official"
    assert attrs["ratio"] == pytest.approx(0.25)
    (function,) = model.functions
    assert (function.domain, function.name) == (OP_DOMAIN, OP_NAME)
    assert list(function.attribute) == list(ATTRIBUTES)
    assert {op.domain: op.version for op in model.opset_import}[OP_DOMAIN] == OP_VERSION
    # Standard ops only inside: any ONNX runtime can inline it.
    assert {n.domain for n in function.node} == {""}


@pytest.mark.parametrize("opset", [MIN_OPSET, 20])
def test_function_at_older_opsets_runs(opset):

    spans = [[VisionSpan(2, 64, (8, 8))]]
    hidden, guidance = layout_inputs(1, 70, seed=15)
    plan = plan_stage(spans, 70, windows=2, ratio=0.5)
    model = standalone_model(opset=opset)
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"hidden": hidden.numpy(), "guidance": guidance.numpy(), **plan_feeds(plan)}
    out, kept, assign = sess.run(None, feeds)
    ref = apply_plan(hidden, guidance, plan)
    assert np.array_equal(kept, ref.kept.numpy())
    assert np.array_equal(assign, ref.assign.numpy())
    np.testing.assert_allclose(out, ref.hidden.numpy(), rtol=1e-6, atol=1e-6)


def test_opset_below_minimum_is_refused():
    with pytest.raises(ValueError, match="opset"):
        lightkv_function(MIN_OPSET - 1)


def test_unsupported_dtype_is_refused():
    plan = plan_stage([[]], 4, windows=1, ratio=0.5)
    with pytest.raises(TypeError, match="dtype"):
        run_ort(torch.zeros(1, 4, DIM, dtype=torch.float64), torch.zeros(1, 4), plan)


def test_run_ort_bf16_returns_bfloat16():
    plan = plan_stage([[VisionSpan(0, 32, (4, 8))]], 36, windows=1, ratio=0.5)
    hidden, guidance = layout_inputs(1, 36, seed=16, dtype=torch.bfloat16)
    out, kept = run_ort(hidden, guidance, plan)
    ref = apply_plan(hidden, guidance, plan)
    assert out.dtype == torch.bfloat16 and torch.equal(kept, ref.kept)
    torch.testing.assert_close(out.float(), ref.hidden.float(), rtol=0, atol=1e-2)
