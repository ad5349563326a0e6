"""The share_weights pass on hand-built graphs: each distinct tensor stored once, the graphs unchanged in function,
and ort-cpu's sessions over one mapping of the file."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lightkv_export.artifacts import WEIGHTS_FILE
from lightkv_export.passes.share_weights import ALIGN, MIN_BYTES, NAME_PREFIX, share_weights
from lightkv_export.targets.ort import shared_sessions

RNG = np.random.default_rng(0)
W1 = RNG.standard_normal((64, 64)).astype(np.float32)
W2 = RNG.standard_normal((64, 32)).astype(np.float32)
BIAS = RNG.standard_normal(64).astype(np.float32)  # 256 bytes: stays inline


def two_layer(w1_name: str, w2_name: str, *, branch: bool = False) -> onnx.ModelProto:
    """x [B, 64] -> (x @ W1 + bias) @ W2 -> y [B, 32]; with `branch`, the second MatMul sits in an If body
    that reads W2 from the outer scope."""
    inits = [numpy_helper.from_array(W1, w1_name), numpy_helper.from_array(BIAS, "bias"),
             numpy_helper.from_array(W2, w2_name)]  # fmt: skip
    nodes = [helper.make_node("MatMul", ["x", w1_name], ["h0"]), helper.make_node("Add", ["h0", "bias"], ["h"])]
    if branch:
        body = helper.make_graph(
            [helper.make_node("MatMul", ["h", w2_name], ["y_then"])], "then", [],
            [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, None)],
        )  # fmt: skip
        other = helper.make_graph(
            [helper.make_node("MatMul", ["h", w2_name], ["y_else"])], "else", [],
            [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, None)],
        )  # fmt: skip
        inits.append(numpy_helper.from_array(np.array(True), "flag"))
        nodes.append(helper.make_node("If", ["flag"], ["y"], then_branch=body, else_branch=other))
    else:
        nodes.append(helper.make_node("MatMul", ["h", w2_name], ["y"]))
    graph = helper.make_graph(
        nodes, "toy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 32])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def run(model_or_path, x: np.ndarray) -> np.ndarray:
    source = model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.fixture()
def shared(tmp_path):
    """Three graphs over the same weights under different names, one of them with its own external data file."""
    x = RNG.standard_normal((3, 64)).astype(np.float32)
    plain, branched, external = two_layer("W1", "W2"), two_layer("val_7", "val_9", branch=True), two_layer("a", "b")
    want = run(plain, x)
    source = tmp_path / "source"
    source.mkdir()
    onnx.save(external, str(source / "c.onnx"), save_as_external_data=True, location="c.onnx.data", size_threshold=0)
    external = onnx.load(str(source / "c.onnx"), load_external_data=False)
    engine = tmp_path / "engine"
    engine.mkdir()
    report = share_weights({"a": (plain, None), "b": (branched, None), "c": (external, source)}, engine / WEIGHTS_FILE)
    for name, model in zip("abc", (plain, branched, external), strict=True):
        onnx.save(model, str(engine / f"{name}.onnx"))
    return engine, report, x, want, (plain, branched, external)


def test_each_distinct_tensor_is_stored_once(shared):
    engine, report, _, _, models = shared
    assert report.tensors == 2
    assert report.unique_bytes == W1.nbytes + W2.nbytes
    assert report.referenced_bytes == 3 * (W1.nbytes + W2.nbytes)
    assert W1.nbytes + W2.nbytes <= (engine / WEIGHTS_FILE).stat().st_size < W1.nbytes + W2.nbytes + 2 * ALIGN
    names = [{t.name for t in m.graph.initializer if t.data_location == TensorProto.EXTERNAL} for m in models]
    assert names[0] == names[1] == names[2] and all(n.startswith(NAME_PREFIX) for n in names[0])
    for model in models:  # small tensors stay in the graph, also the one that had been stored outside
        small = [t for t in model.graph.initializer if t.data_location != TensorProto.EXTERNAL]
        assert {t.name for t in small} >= {"bias"} and all(len(t.raw_data) < MIN_BYTES for t in small)
        offsets = [int({e.key: e.value for e in t.external_data}["offset"]) for t in model.graph.initializer
                   if t.data_location == TensorProto.EXTERNAL]  # fmt: skip
        assert all(o % ALIGN == 0 for o in offsets)


def test_graphs_compute_the_same_from_the_file(shared):
    engine, _, x, want, _ = shared
    for name in "abc":  # plain ONNX: ONNX Runtime reads the external data itself ...
        np.testing.assert_array_equal(run(str(engine / f"{name}.onnx"), x), want)
    sessions = shared_sessions(engine, "abc")  # ... or over the one mapping that ort-cpu engines use
    for session in sessions.values():
        np.testing.assert_array_equal(session.run(None, {"x": x})[0], want)


def test_external_data_needs_its_directory(tmp_path):
    model = two_layer("W1", "W2")
    onnx.save(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    lean = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    with pytest.raises(ValueError, match="external data but no base directory"):
        share_weights({"m": (lean, None)}, tmp_path / WEIGHTS_FILE)


def test_weights_equal_in_their_first_bytes_stay_two_tensors(tmp_path):
    """The key is the digest of every byte (issue 28: a key of the first 64 bytes made two same-shape weights that
    differ later one tensor, silently changing the graph's output)."""
    a = RNG.standard_normal((64, 64)).astype(np.float32)
    b = a.copy()
    b[8:] = RNG.standard_normal((56, 64))  # the first 8 rows (2 KiB) equal, the rest different
    assert a.tobytes()[:2048] == b.tobytes()[:2048] and a.tobytes() != b.tobytes()
    nodes = [helper.make_node("MatMul", ["x", "A"], ["ya"]), helper.make_node("MatMul", ["x", "B"], ["yb"]),
             helper.make_node("Sub", ["ya", "yb"], ["y"])]  # fmt: skip
    graph = helper.make_graph(
        nodes, "prefix", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])],
        [numpy_helper.from_array(a, "A"), numpy_helper.from_array(b, "B")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    x = RNG.standard_normal((3, 64)).astype(np.float32)
    want = run(model, x)
    assert np.abs(want).max() > 1  # A and B differ where it shows
    report = share_weights({"m": (model, None)}, tmp_path / WEIGHTS_FILE)
    assert report.tensors == 2 and report.unique_bytes == a.nbytes + b.nbytes
    names = [t.name for t in model.graph.initializer]
    assert len(set(names)) == 2 and all(n.startswith(NAME_PREFIX) for n in names)
    onnx.save(model, str(tmp_path / "m.onnx"))
    np.testing.assert_array_equal(run(str(tmp_path / "m.onnx"), x), want)
