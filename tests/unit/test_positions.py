"""The positional schemes (models/positions.py): host ids, batching, decode feeds, and what a merge does to the ids,
in PyTorch and in an ONNX graph built with the pass's node builder and run by ONNX Runtime (they must agree)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from lightkv_export.method.spans import VisionSpan
from lightkv_export.models.positions import MROPE, ROPE_1D, SCHEMES, Positions
from lightkv_export.passes.graph_edit import Builder

SPANS = [VisionSpan(3, 12, (3, 4)), VisionSpan(20, 4, (2, 2))]
SEQ = 30


def test_registry_names_every_scheme_once():
    assert SCHEMES == {"rope1d": ROPE_1D, "mrope": MROPE}
    assert (ROPE_1D.lead, ROPE_1D.seq_axis, MROPE.lead, MROPE.seq_axis) == ((), 1, (3,), 2)


def test_rope1d_numbers_every_token_in_order():
    pos, offset = ROPE_1D.host(SEQ, SPANS)
    np.testing.assert_array_equal(pos, np.arange(SEQ))
    assert offset == 0 and pos.dtype == np.int64


def test_mrope_images_take_a_grid_and_text_resumes_after_the_longer_side():
    pos, offset = MROPE.host(SEQ, SPANS)  # [3, S]
    assert pos.shape == (3, SEQ)
    np.testing.assert_array_equal(pos[:, :3], np.tile(np.arange(3), (3, 1)))  # text: all sections together
    first = pos[:, 3:15]  # the 3 x 4 image at running position 3
    np.testing.assert_array_equal(first[0], 3)
    np.testing.assert_array_equal(first[1], 3 + np.arange(12) // 4)
    np.testing.assert_array_equal(first[2], 3 + np.arange(12) % 4)
    np.testing.assert_array_equal(pos[:, 15], 3 + max(3, 4))  # the text after it
    assert offset == int(pos.max()) + 1 - SEQ < 0  # the images used fewer positions than tokens


@pytest.mark.parametrize("scheme", [ROPE_1D, MROPE], ids=lambda s: s.name)
def test_batch_and_decode_feeds_have_the_scheme_shape(scheme: Positions):
    rows = [scheme.host(n, SPANS if n == SEQ else [])[0] for n in (SEQ, 7)]
    batch = scheme.batch(rows, SEQ)
    assert batch.shape == scheme.shape(2, SEQ)
    np.testing.assert_array_equal(batch[..., 0, :], rows[0])
    np.testing.assert_array_equal(batch[..., 1, :7], rows[1])
    assert not batch[..., 1, 7:].any()  # right padding
    feed = scheme.decode(np.array([31, 8]))
    assert feed.shape == scheme.shape(2, 1) and feed.flags.c_contiguous
    np.testing.assert_array_equal(feed[..., 0, 0], 31)
    np.testing.assert_array_equal(feed[..., 1, 0], 8)
    np.testing.assert_array_equal(scheme.decode_torch(torch.tensor([31, 8])).numpy(), feed)
    example = scheme.example(2, 5)
    assert tuple(example.shape) == scheme.shape(2, 5) and example[..., 1, 4].eq(4).all()


def onnx_after_merge(scheme: Positions, pos: np.ndarray, kept: np.ndarray, mode: str) -> np.ndarray:
    """scheme.after_merge_onnx in a one-purpose graph, run by ONNX Runtime."""
    int64 = ir.TensorType(ir.DataType.INT64)
    pos_in = ir.Value(name="pos", type=int64, shape=ir.Shape([*scheme.lead, "B", "S"]))
    kept_in = ir.Value(name="kept", type=int64, shape=ir.Shape(["B", "S2"]))
    graph = ir.Graph([pos_in, kept_in], [], nodes=[], opset_imports={"": 21}, name="after_merge")
    out = scheme.after_merge_onnx(Builder(graph, "t"), pos_in, kept_in, mode)
    out.name, out.type = "new_pos", int64
    graph.outputs.append(out)
    proto = ir.serde.serialize_model(ir.Model(graph, ir_version=10))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"pos": pos, "kept": kept})[0]


@pytest.mark.parametrize("mode", ["preserve", "official"])
@pytest.mark.parametrize("scheme", [ROPE_1D, MROPE], ids=lambda s: s.name)
def test_after_merge_is_the_same_in_pytorch_and_in_the_graph(scheme: Positions, mode: str):
    rows = [scheme.host(SEQ, SPANS)[0], scheme.host(SEQ, [])[0]]
    pos = scheme.batch(rows, SEQ)  # [*lead, 2, S]
    kept = np.array([[0, 1, 2, 3, 5, 8, 15, 29], [0, 2, 4, 6, 7, 9, -1, -1]], dtype=np.int64)  # [B, S'], -1: padding
    want = scheme.after_merge(torch.from_numpy(pos), torch.from_numpy(kept), mode).numpy()
    assert want.shape == scheme.shape(2, 8)
    if mode == "preserve":  # survivors keep their own ids; padding reads position 0
        np.testing.assert_array_equal(want[..., 0, :], rows[0][..., kept[0]])
        np.testing.assert_array_equal(want[..., 1, :6], rows[1][..., kept[1, :6]])
        np.testing.assert_array_equal(want[..., 1, 6:], rows[1][..., :1].repeat(2, axis=-1))
    else:  # renumbered 0..S'-1 on every row
        np.testing.assert_array_equal(want, np.broadcast_to(np.arange(8), want.shape))
    np.testing.assert_array_equal(onnx_after_merge(scheme, pos, kept, mode), want)
