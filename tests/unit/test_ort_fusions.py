"""The ort-cpu fusions (passes/fuse_attention.py, passes/fuse_norms.py) on real exported graphs. Prefill: the fused
graph, vanilla or after the LightKV pass, computes what the standard graph computes on a padded batch. Decode: the
fused step computes what the standard step computes over caches whose lengths differ per layer (LightKV) and per row
(a padded batch), writes each step's entries in place, and reads no mask. Norms: every RMSNorm fused, same outputs."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from lightkv_export import contract
from lightkv_export.errors import InputError
from lightkv_export.export import strip_roles
from lightkv_export.method.merge_plan import plan_request
from lightkv_export.method.schedule import parse_schedule
from lightkv_export.method.spans import VisionSpan
from lightkv_export.models.base import head_dim
from lightkv_export.models.positions import MROPE
from lightkv_export.passes.fuse_attention import fuse_decode_attention, fuse_prefill_attention
from lightkv_export.passes.fuse_norms import fuse_norms
from lightkv_export.passes.insert_lightkv import insert_lightkv
from lightkv_export.targets.ort import InPlaceBranch
from tests.helpers import export_entry


@pytest.fixture(scope="module")
def export_dir(builds):
    """tiny-qwen-vl's vanilla export, shared with the session's builds (not exported again here)."""
    return export_entry(builds("tiny-qwen-vl", 0.55).engine_dirs["ort-cpu"])


@pytest.fixture(scope="module")
def exported(export_dir) -> onnx.ModelProto:
    return onnx.load(str(export_dir / "decode.onnx"))


@pytest.fixture(scope="module")
def exported_prefill(export_dir) -> onnx.ModelProto:
    return onnx.load(str(export_dir / "prefill.onnx"))


def copy(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.ModelProto.FromString(model.SerializeToString())


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("schedule", [None, "2:2:0.5,5:1:0.5"], ids=["vanilla", "lightkv"])
def test_the_fused_prefill_equals_the_standard_prefill_on_a_padded_batch(exported_prefill, tiny_qwen_vl, schedule):
    cfg = tiny_qwen_vl.text_config
    spans = [[VisionSpan(3, 48, (6, 8))], [VisionSpan(2, 36, (6, 6))]]
    lengths = [60, 45]  # row 1 right-padded
    embeds = np.random.default_rng(1).standard_normal((2, 60, cfg.hidden_size)).astype(np.float32)
    positions = np.zeros((3, 2, 60), dtype=np.int64)
    for b, (row, n) in enumerate(zip(spans, lengths, strict=True)):
        positions[:, b, :n] = MROPE.host(n, row)[0]
    feeds = {contract.INPUTS_EMBEDS: embeds, contract.POSITION_IDS: positions, contract.LENGTHS: np.array(lengths)}
    graph = copy(exported_prefill)
    if schedule is not None:
        parsed = parse_schedule(schedule, cfg.num_hidden_layers)
        graph, _ = insert_lightkv(graph, parsed)
        feeds.update(plan_request(spans, lengths, parsed).feeds)
    standard, fused = session(strip_roles(copy(graph))), session(fuse_prefill_attention(copy(graph)))
    normed, counts = fuse_norms(copy(graph))
    # Two norms per layer and the final one. In the vanilla graph the residual add folds into every norm but the
    # first (no add before it); after LightKV merges, where the sequence length is only known at run time, the
    # Skip form needs shapes the inference cannot give, so fewer fold (the norms themselves all fuse).
    assert counts.rms_norms == 2 * cfg.num_hidden_layers + 1
    if schedule is None:
        assert counts.skip_norms == 2 * cfg.num_hidden_layers - 1
    else:
        assert counts.skip_norms >= 2 * 2 - 1  # at least the layers before the first merge
    normed = session(fuse_prefill_attention(normed))
    names = [o.name for o in standard.get_outputs()]
    assert [o.name for o in fused.get_outputs()] == names
    want = dict(zip(names, standard.run(names, feeds), strict=True))
    got = dict(zip(names, fused.run(names, feeds), strict=True))
    also = dict(zip(names, normed.run(names, feeds), strict=True))
    for name in names:
        np.testing.assert_allclose(got[name], want[name], atol=2e-5, err_msg=name)
        np.testing.assert_allclose(also[name], want[name], atol=2e-5, err_msg=name)
    nodes = fuse_prefill_attention(copy(graph)).graph.node
    assert sum(n.op_type == "GroupQueryAttention" for n in nodes) == cfg.num_hidden_layers
    # Every layer's query and key rotated on the projection (LightKV's merged layers too, at the kept tokens' angles).
    assert sum(n.op_type == "RotaryEmbedding" for n in nodes) == 2 * cfg.num_hidden_layers
    guidance = 0 if schedule is None else 2  # the LightKV guidance's own softmax over queries, one per stage
    assert sum(n.op_type == "Softmax" for n in nodes) == guidance


def test_the_fused_steps_equal_the_standard_steps_over_per_layer_and_per_row_lengths(exported, tiny_qwen_vl):
    cfg = tiny_qwen_vl.text_config
    n, hkv, hd, dim = cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim(cfg), cfg.hidden_size
    rng = np.random.default_rng(0)
    lengths = np.stack([[30 - 3 * i, 21 - 2 * i] for i in range(n)])  # [L, B]: shorter later layers, row 1 padded
    steps = 3
    standard = session(strip_roles(copy(exported)))
    fused = InPlaceBranch(session(fuse_decode_attention(copy(exported))))
    keys, values, masks, buffers = [], [], [], {}
    for i in range(n):
        width = int(lengths[i].max())
        k, v = (rng.standard_normal((2, hkv, width, hd), dtype=np.float32) for _ in range(2))  # [B, Hkv, P_i, d]
        keys.append(k), values.append(v)
        masks.append((np.arange(width)[None] < lengths[i][:, None]).astype(np.int64))  # [B, P_i]
        for kind, src in (("key", k), ("value", v)):
            buffer = np.full((2, hkv, width + steps, hd), np.nan, dtype=np.float32)  # unused room stays NaN
            buffer[:, :, :width] = src
            buffers[contract.past(i, kind)] = buffer
    names = [o.name for o in standard.get_outputs()]
    aliases = {contract.present(i, kind): contract.past(i, kind) for i in range(n) for kind in contract.KV}
    for step in range(steps):
        embeds = rng.standard_normal((2, 1, dim), dtype=np.float32)
        positions = np.broadcast_to(np.array([[40 + step], [33 + step]]), (3, 2, 1)).copy()  # [3, B, 1]
        common = {contract.INPUTS_EMBEDS: embeds, contract.POSITION_IDS: positions}
        feeds = dict(common)
        for i in range(n):
            feeds[contract.past(i, "key")], feeds[contract.past(i, "value")] = keys[i], values[i]
            feeds[contract.past_mask(i)] = masks[i]
        out = dict(zip(names, standard.run(names, feeds), strict=True))
        lengths_now = {contract.past_length(i): (lengths[i] + step).astype(np.int32) for i in range(n)}
        got = dict(zip(names, fused.run_in_place(names, {**common, **lengths_now}, buffers, aliases), strict=True))
        np.testing.assert_allclose(got[contract.LOGITS], out[contract.LOGITS], atol=2e-5, err_msg=f"step {step}")
        for i in range(n):
            keys[i], values[i] = out[contract.present(i, "key")], out[contract.present(i, "value")]
            masks[i] = np.concatenate([masks[i], np.ones((2, 1), dtype=np.int64)], axis=1)
            assert got[contract.present(i, "key")] is buffers[contract.past(i, "key")]  # the buffer itself
    for i in range(n):
        for kind, standard_cache in (("key", keys[i]), ("value", values[i])):
            buffer = buffers[contract.past(i, kind)]
            for b in range(2):
                valid = standard_cache[b][:, masks[i][b] == 1]  # [Hkv, len + steps, d]: real entries, in order
                np.testing.assert_allclose(buffer[b, :, : lengths[i, b] + steps], valid, atol=2e-5)
                # Past each row's entries nothing was written (the room after the longest row stays NaN).
                assert np.isnan(buffer[b, :, int(lengths[i].max()) + steps :]).all()


def test_the_fused_graph_reads_lengths_not_masks_and_copies_no_cache(exported, tiny_qwen_vl):
    n = tiny_qwen_vl.text_config.num_hidden_layers
    fused = fuse_decode_attention(copy(exported))
    inputs = {i.name: i for i in fused.graph.input}
    assert all(contract.past_length(i) in inputs and contract.past_mask(i) not in inputs for i in range(n))
    assert inputs[contract.past_length(0)].type.tensor_type.elem_type == onnx.TensorProto.INT32
    assert sum(node.op_type == "GroupQueryAttention" for node in fused.graph.node) == n
    pasts = {contract.past(i, kind) for i in range(n) for kind in contract.KV}
    readers = {node.op_type for node in fused.graph.node for x in node.input if x in pasts}
    assert readers == {"GroupQueryAttention", "Shape"}  # no Concat of the cache, no Expand to all heads
    ops = Counter(node.op_type for node in fused.graph.node)
    # The rotary on the projections as they come (query and key of every layer); no per-head layout is left.
    assert ops["RotaryEmbedding"] == 2 * n and ops["Transpose"] == ops["Neg"] == 0
    assert not any(o.name.startswith(contract.ROLE_PREFIX) for o in fused.graph.output)
    assert [o.name for o in fused.graph.output] == [o.name for o in strip_roles(copy(exported)).graph.output]


def test_a_decode_graph_from_an_older_export_is_refused_with_what_to_do(exported):
    old = strip_roles(copy(exported))
    del old.metadata_props[:]
    with pytest.raises(InputError, match="--force"):
        fuse_decode_attention(old)
    roles_only_missing = strip_roles(copy(exported))
    with pytest.raises(InputError, match="role outputs"):
        fuse_decode_attention(roles_only_missing)
