"""ort-cpu's prefill and decode as the two branches of one ONNX Runtime session (passes/join_branches.py), on
hand-built graphs that read the same weights under the same input and output names: each branch computes what
its own graph does, and the weights are held once, pre-packed, without their mapped originals resident."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lightkv_export.artifacts import WEIGHTS_FILE
from lightkv_export.passes.join_branches import BRANCH, JOINED, join_branches
from lightkv_export.passes.share_weights import share_weights
from lightkv_export.targets.ort import MappedWeights, joined_sessions

D, LAYERS = 2048, 8  # eight 16 MiB weights: well above the session's own memory (tens of MiB, varying)
RNG = np.random.default_rng(0)
WEIGHTS = [(RNG.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32) for _ in range(LAYERS)]
SCALE = np.full(1, 0.5, np.float32)  # small: stays inline in each graph


def stack(name: str, activation: str) -> onnx.ModelProto:
    """x [B, S, D] -> LAYERS x (MatMul W_i, then `activation`) -> y [B, S, D] and its row sums `total` [B, S];
    both graphs use the names x, y and total, as prefill and decode both read inputs_embeds and write logits."""
    inits = [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(WEIGHTS)]
    inits.append(numpy_helper.from_array(SCALE, "scale"))
    nodes, h = [], "x"
    for i in range(LAYERS):
        nodes.append(helper.make_node("MatMul", [h, f"w{i}"], [f"m{i}"]))
        nodes.append(helper.make_node(activation, [f"m{i}"], [f"a{i}"]))
        h = f"a{i}"
    nodes.append(helper.make_node("Mul", [h, "scale"], ["y"]))
    nodes.append(helper.make_node("ReduceSum", ["y", "axes"], ["total"], keepdims=0))
    inits.append(numpy_helper.from_array(np.array([-1], np.int64), "axes"))
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", D]),
         helper.make_tensor_value_info("total", TensorProto.FLOAT, ["B", "S"])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """An engine-like directory: prefill.onnx (Tanh) and decode.onnx (Relu) over one weights.bin."""
    directory = tmp_path_factory.mktemp("joined")
    models = {"prefill": stack("prefill", "Tanh"), "decode": stack("decode", "Relu")}
    want = {name: model.SerializeToString() for name, model in models.items()}  # before the pass moves weights
    share_weights({name: (model, None) for name, model in models.items()}, directory / WEIGHTS_FILE)
    for name, model in models.items():
        onnx.save(model, str(directory / f"{name}.onnx"))
    return directory, want


def test_each_branch_computes_its_own_graph(engine):
    directory, want = engine
    sessions = joined_sessions(directory, MappedWeights(directory / WEIGHTS_FILE))
    assert sessions["prefill"].session is sessions["decode"].session  # one session, so one set of packed weights
    for name, shape in (("prefill", (1, 7, D)), ("decode", (2, 1, D))):
        x = RNG.standard_normal(shape).astype(np.float32)
        reference = ort.InferenceSession(want[name], providers=["CPUExecutionProvider"])
        expected = reference.run(["y", "total"], {"x": x})
        branch = sessions[name]
        assert [a.name for a in branch.get_inputs()] == ["x"]
        assert [a.name for a in branch.get_outputs()] == ["y", "total"]
        for got, ref in zip(branch.run(["total", "y"], {"x": x}), expected[::-1], strict=True):
            assert got.shape == ref.shape
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_the_joined_graph_shares_the_stored_weights(engine):
    directory, _ = engine
    branches = {name: onnx.load(str(directory / f"{name}.onnx"), load_external_data=False) for name in JOINED}
    joined = join_branches(branches)
    outer = [t for t in joined.graph.initializer]
    assert len(outer) == LAYERS and all(t.data_location == TensorProto.EXTERNAL for t in outer)
    assert [i.name for i in joined.graph.input] == [BRANCH, "prefill/x", "decode/x"]
    assert [o.name for o in joined.graph.output] == ["prefill/y", "prefill/total", "decode/y", "decode/total"]
    (node,) = joined.graph.node
    defined = []  # every name either body defines: one namespace holds both (TensorRT's parser keeps one)
    for attr in node.attribute:  # the small tensors stay in their branch, scoped
        body, branch = attr.g, attr.g.name
        assert [t.name for t in body.initializer] == [f"{branch}:scale", f"{branch}:axes"] and len(body.output) == 4
        defined += [t.name for t in body.initializer] + [o for n in body.node for o in n.output]
        # The empty outputs are sized from an input dimension, never from the flag: no shape depends on its value.
        assert all(BRANCH not in n.input for n in body.node)
    assert len(defined) == len(set(defined))
    then_out, else_out = ([o.name for o in a.g.output] for a in node.attribute)
    assert all(a != b for a, b in zip(then_out, else_out, strict=True))  # each If output's two tensors named apart


# A fresh process: the peak resident size is the whole process's, and this one's has the suite's history.
CHILD = """
import contextlib, sys
from pathlib import Path
import onnxruntime  # its libraries are not the weights
from lightkv_export import rss
import lightkv_export.targets.ort as target
if not {drop}:
    target.DroppedPages = lambda mapping: contextlib.nullcontext()
rss.release_large_blocks()  # as Engine.load does: packing's transient buffers go back to the OS
directory = Path(sys.argv[1])
weights = target.MappedWeights(directory / target.WEIGHTS_FILE)
base = rss.rss_bytes()
assert rss.reset_peak_rss()
sessions = target.joined_sessions(directory, weights)
sessions["prefill"].load()  # opened on first use otherwise
print((rss.peak_rss_bytes() - base) >> 20, (rss.rss_bytes() - base) >> 20)
"""


def _load_mib(directory, drop: bool) -> tuple[int, int]:
    cmd = [sys.executable, "-c", CHILD.format(drop=drop), str(directory)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    peak, held = done.stdout.strip().splitlines()[-1].split()
    return int(peak), int(held)


def test_weights_are_held_once_packed_and_peak_so(engine):
    if not sys.platform.startswith("linux"):
        pytest.skip("/proc and MADV_DONTNEED are Linux's")
    directory, _ = engine
    weight_mib = LAYERS * D * D * 4 >> 20  # 32
    peak, held = _load_mib(directory, drop=True)
    assert held < 1.3 * weight_mib and peak < 1.5 * weight_mib  # one packed copy, the mapped originals dropped
    peak, held = _load_mib(directory, drop=False)
    assert peak >= 1.8 * weight_mib  # the originals read while packing: resident besides the packed copy


def test_graphs_with_only_static_shapes_size_the_empty_outputs_from_the_flag() -> None:
    """With no symbolic input dimension to size the other branch's empty outputs from, the run-time zero comes from
    the flag; each branch still gives its own graph's outputs and empty ones for the other's."""
    x = np.arange(6, dtype=np.float32).reshape(2, 3)

    def graph(op: str) -> onnx.ModelProto:
        g = helper.make_graph(
            [helper.make_node(op, ["x"], ["y"])], op,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        )  # fmt: skip
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])

    joined = join_branches({"prefill": graph("Neg"), "decode": graph("Abs")})
    (node,) = joined.graph.node
    assert all(any(BRANCH in n.input for n in a.g.node) for a in node.attribute)
    session = ort.InferenceSession(joined.SerializeToString(), providers=["CPUExecutionProvider"])
    for flag, own, other, expected in ((True, "prefill", "decode", -x), (False, "decode", "prefill", np.abs(x))):
        got, empty = session.run([f"{own}/y", f"{other}/y"], {BRANCH: np.array(flag), "prefill/x": x, "decode/x": x})
        np.testing.assert_array_equal(got, expected)
        assert empty.size == 0 and empty.ndim == 2


def test_prefill_runs_shrink_the_sessions_arena_and_decode_steps_do_not(engine):
    """The joined session allocates from the process's shrinkable CPU arena; a prefill run returns its regions when
    it ends (its large intermediates are per request), a decode step keeps them (the same small ones every step)."""
    directory, _ = engine
    sessions = joined_sessions(directory, MappedWeights(directory / WEIGHTS_FILE))
    prefill, decode = sessions["prefill"], sessions["decode"]
    assert prefill.run_options.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"
    assert decode.run_options is None
    x = RNG.standard_normal((1, 64, D)).astype(np.float32)
    for _ in range(2):  # runs with the options, from the registered arena (a second session reuses it)
        (y,) = prefill.run(["y"], {"x": x})
        assert y.shape == (1, 64, D) and np.isfinite(y).all()
    options = prefill.session.get_session_options()
    assert options.get_session_config_entry("session.use_env_allocators") == "1" and options.enable_cpu_mem_arena
