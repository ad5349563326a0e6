"""The TensorRT targets' step engine without TensorRT: prefill and decode as one graph over one copy of the weights
(targets/trt.py step_graph), one optimization profile per branch, on the tiny Qwen2.5-VL LightKV build's export.

What TensorRT would build from is checked as far as a CPU can: the graph's structure and profiles exactly, and its
function under ONNX Runtime (with the prefill unlowered, since ONNX Runtime has no TensorRT plugins)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx.external_data_helper import ExternalDataInfo

from lightkv_export import contract
from lightkv_export.artifacts import WEIGHTS_FILE
from lightkv_export.export import strip_roles
from lightkv_export.inputs import parity_images
from lightkv_export.method.merge_plan import OUT_SLOTS, plan_request
from lightkv_export.parity import cached_export
from lightkv_export.passes.join_branches import BRANCH, JOINED, join_branches
from lightkv_export.passes.share_weights import MIN_BYTES
from lightkv_export.runtime import Engine
from lightkv_export.targets import trt
from lightkv_export.targets.ort import transform_prefill

PLUGINS = {"LightKVMatch", "LightKVPlan", "LightKVEmit"}


@pytest.fixture(scope="module")
def step(builds, tmp_path_factory):
    engine = Engine.load(builds("tiny-qwen-vl", 0.55).engine_dirs["ort-cpu"])
    m = engine.manifest
    exported, why = cached_export(engine.directory, m)
    assert exported is not None, why
    prefill, _ = transform_prefill(exported, engine.schedule, positions=m.positions, grid_mode=m.grid_mode)
    onnx_dir = tmp_path_factory.mktemp("trt-onnx")
    paths = trt._write_graphs(onnx_dir, exported, prefill)  # what build_engine hands to TensorRT
    return engine, exported, prefill, paths


def test_one_graph_holds_the_llm_weights_once_for_prefill_and_decode(step) -> None:
    _, exported, _, paths = step
    assert sorted(paths) == sorted(trt.ENGINES)
    graph = onnx.load(str(paths[trt.STEP]), load_external_data=False).graph
    (node,) = graph.node
    assert node.op_type == "If" and node.input == [BRANCH]
    bodies = {a.g.name: a.g for a in node.attribute}
    assert set(bodies) == set(JOINED)
    weights = {t.name for t in graph.initializer}
    assert weights and all(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer)
    for body in bodies.values():  # no large tensor inside a branch: both read the outer ones
        assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in body.initializer)
    reads = {name: {i for n in body.node for i in n.input} & weights for name, body in bodies.items()}
    assert reads["prefill"] == reads["decode"] == weights  # every decoder weight, once, read by both
    ops = {name: {n.op_type for n in body.node} for name, body in bodies.items()}
    assert ops["prefill"] >= PLUGINS and not PLUGINS & ops["decode"]

    # The export holds prefill's and decode's weights as two copies (under names of their own); the step graph
    # reads one: fewer tensors and bytes than the two exported graphs hold, all in the one weights file.
    def large(model: onnx.ModelProto) -> list[int]:
        sizes = [t.ByteSize() for t in model.graph.initializer]
        return [n for n in sizes if n >= MIN_BYTES]

    exported_large = large(onnx.load(str(exported.prefill))) + large(onnx.load(str(exported.decode)))
    infos = [ExternalDataInfo(t) for t in graph.initializer]
    assert {i.location for i in infos} == {WEIGHTS_FILE}
    assert len(infos) < len(exported_large) and sum(i.length for i in infos) < sum(exported_large)


def test_each_profile_ranges_its_branch_and_fixes_the_other(step) -> None:
    engine, _, _, paths = step
    graph = onnx.load(str(paths[trt.STEP]), load_external_data=False).graph
    per_graph = trt.engine_profiles(engine.manifest, engine.processor.images)
    profiles = trt.step_profiles(per_graph)
    assert len(profiles) == len(JOINED)
    inputs = {i.name for i in graph.input} - {BRANCH}  # BRANCH: a static scalar, no profile entry
    for index, branch in enumerate(JOINED):  # profile i runs branch i (open_sessions relies on it)
        assert set(profiles[index].shapes) == inputs
        for name, (low, opt, high) in profiles[index].shapes.items():
            graph_name, key = name.split("/", 1)
            if graph_name == branch:
                assert (low, opt, high) == per_graph[graph_name].shapes[key]
            else:
                assert low == opt == high == per_graph[graph_name].shapes[key][1], name
    # The decode profile may add no weight memory of its own: TensorRT's default would allow a copy per profile.
    assert [p.extra_memory_target for p in profiles] == [None, 0.0]
    # Named dimensions are the branch's own: TensorRT holds same-named input dimensions equal, and prefill's batch
    # runs against decode's inputs fixed at batch 1 (and the other way round).
    names = {b: set() for b in JOINED}
    for value in graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param"):
                names[value.name.split("/", 1)[0]].add(dim.dim_param)
    assert names["prefill"] and names["decode"] and not names["prefill"] & names["decode"]
    assert all(n.startswith(f"{b}/") for b in JOINED for n in names[b])


def test_each_branch_computes_its_own_graph(step) -> None:
    """The step graph's function under ONNX Runtime: the standard prefill and decode joined as the TensorRT
    target joins them, the idle branch fed zeros at its profile's fixed shapes as TrtSession feeds it; each branch
    gives what its own graph gives."""
    engine, exported, prefill, _ = step
    m = engine.manifest
    graphs = {"prefill": strip_roles(prefill), "decode": strip_roles(onnx.load(str(exported.decode)))}
    onnx.load_external_data_for_model(graphs["prefill"], str(exported.directory))
    joined = ort.InferenceSession(join_branches(graphs).SerializeToString(), providers=["CPUExecutionProvider"])
    fixed = {
        JOINED[i]: p.shapes for i, p in enumerate(trt.step_profiles(trt.engine_profiles(m, engine.processor.images)))
    }

    request = engine.prepare([parity_images(tuple(m.image_size), 0)], "Describe the image.")
    plan = plan_request(request.spans, [request.seq_len], engine.schedule, grid_mode=m.grid_mode)
    rng = np.random.default_rng(0)
    feeds = {
        "prefill": {contract.INPUTS_EMBEDS: request.inputs_embeds, contract.POSITION_IDS: request.position_ids,
                    contract.LENGTHS: np.asarray([request.seq_len], dtype=np.int64), **plan.feeds},
        "decode": {},
    }  # fmt: skip
    for value in graphs["decode"].graph.input:  # one decode step over a random cache of the opt lengths
        shape = per_graph_opt(m, engine.processor.images, "decode", value.name)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        draw = rng.standard_normal(shape) if dtype.kind == "f" else np.ones(shape)
        feeds["decode"][value.name] = draw.astype(dtype)
    for branch in JOINED:
        single = ort.InferenceSession(graphs[branch].SerializeToString(), providers=["CPUExecutionProvider"])
        names = [o.name for o in graphs[branch].graph.output]
        expected = single.run(names, feeds[branch])
        idle = {}
        for other in JOINED:
            if other != branch:
                for value in graphs[other].graph.input:
                    shape = fixed[branch][f"{other}/{value.name}"][0]
                    dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
                    idle[f"{other}/{value.name}"] = np.zeros(shape, dtype)
        ours = {f"{branch}/{k}": v for k, v in feeds[branch].items()}
        got = joined.run([f"{branch}/{n}" for n in names], {BRANCH: np.array(branch == JOINED[0]), **idle, **ours})
        for name, a, b in zip(names, got, expected, strict=True):
            assert a.shape == b.shape, name
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


def per_graph_opt(manifest, images, graph: str, name: str) -> tuple[int, ...]:
    return trt.engine_profiles(manifest, images)[graph].shapes[name][1]


def test_the_prefill_profile_includes_every_out_slots_input(step) -> None:
    """The lowered prefill's out_slots inputs exist only in the step graph (the unlowered one has none): they are
    the branch's, ranged in its profile."""
    engine, _, prefill, paths = step
    graph = onnx.load(str(paths[trt.STEP]), load_external_data=False).graph
    slots = [i.name for i in graph.input if i.name.endswith(OUT_SLOTS)]
    assert len(slots) == len(engine.schedule.stages) > 0
    assert all(s.startswith(f"{JOINED[0]}/") for s in slots)
    assert not any(i.name.endswith(OUT_SLOTS) for i in prefill.graph.input)
