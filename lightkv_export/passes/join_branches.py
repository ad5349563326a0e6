"""Join the prefill and decode graphs into one graph whose If node runs one of them: one set of weights for both.

Both targets use it. ONNX Runtime pre-packs each MatMul weight once per session, so the joined graph in one session
holds the weights once, pre-packed (two sessions would each hold a packed copy: its Python API has no shared
pre-packed-weights container). TensorRT builds the joined graph into one engine with an optimization profile per
branch (targets/trt.py), where two engines would each embed the weights.

The joined graph: inputs BRANCH (bool scalar) and each branch's inputs as "<branch>/<name>", outputs each branch's
outputs as "<branch>/<name>" (the branch not taken yields empty tensors for them), named dimensions scoped the same
way. Initializers stored as external data (weights.bin, named by content: passes/share_weights.py) move to the outer
graph, where both branches read the same tensor. Everything a branch computes is scoped "<branch>:" so one tensor
namespace holds both bodies (TensorRT's parser keeps one; it also wants the two tensors of each If output named
apart).
"""

from __future__ import annotations

import onnx

JOINED = ("prefill", "decode")
BRANCH = "run_prefill"  # bool scalar input of the joined graph: True runs the prefill branch, False the decode step


def join_branches(branches: dict[str, onnx.ModelProto]) -> onnx.ModelProto:
    """One graph whose If node runs `branches[JOINED[0]]` when BRANCH is true, else `branches[JOINED[1]]`."""
    if set(branches) != set(JOINED):
        raise ValueError(f"join_branches takes the graphs {JOINED}, got {sorted(branches)}")
    outer_inputs = [onnx.helper.make_tensor_value_info(BRANCH, onnx.TensorProto.BOOL, [])]
    outer_outputs, shared = [], {}
    for name in JOINED:
        graph = branches[name].graph
        outer_inputs += [_scoped_dims(renamed(v, f"{name}/{v.name}"), name) for v in graph.input]
        outer_outputs += [_scoped_dims(renamed(v, f"{name}/{v.name}"), name) for v in graph.output]
        for tensor in graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                shared.setdefault(tensor.name, tensor)  # names are content hashes (passes/share_weights.py)
    bodies = {name: _branch_body(branches, name) for name in JOINED}
    node = onnx.helper.make_node(
        "If", [BRANCH], [v.name for v in outer_outputs], then_branch=bodies[JOINED[0]], else_branch=bodies[JOINED[1]]
    )
    graph = onnx.helper.make_graph([node], "prefill_decode", outer_inputs, outer_outputs, list(shared.values()))
    opsets: dict[str, int] = {}
    for model in branches.values():
        for opset in model.opset_import:
            opsets[opset.domain] = max(opsets.get(opset.domain, 0), opset.version)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets.items()])
    model.ir_version = max(m.ir_version for m in branches.values())
    # The prefill's metadata (its roles and what the LightKV pass built it for) goes with it: a TensorRT engine
    # keeps only the joined graph, and its manifest is checked against this record (integrity.py).
    model.metadata_props.extend(branches[JOINED[0]].metadata_props)
    seen = set()
    for m in branches.values():
        for function in m.functions:
            if (function.domain, function.name) not in seen:
                seen.add((function.domain, function.name))
                model.functions.append(function)
    return model


def renamed(value: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(value)
    copy.name = name
    return copy


def _scoped_dims(value: onnx.ValueInfoProto, branch: str) -> onnx.ValueInfoProto:
    """`value` with its named dimensions scoped to `branch`: TensorRT holds inputs' dimensions of one name equal at
    run time, and prefill's "batch" is not decode's (the branch not taken is fed at one fixed shape)."""
    for dim in value.type.tensor_type.shape.dim:
        if dim.HasField("dim_param"):
            dim.dim_param = f"{branch}/{dim.dim_param}"
    return value


def _branch_body(branches: dict[str, onnx.ModelProto], name: str) -> onnx.GraphProto:
    """Branch `name` as an If body: it reads the outer "<name>/<input>" values and the outer weights; its outputs
    are, in JOINED order, its own graph's outputs and an empty tensor of the right type and rank for each output
    of the other branch. What it computes (node outputs, its small initializers, node names) is scoped."""
    graph = branches[name].graph
    local = [t for t in graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    scope = {v.name: f"{name}/{v.name}" for v in graph.input}
    scope |= {t.name: f"{name}:{t.name}" for t in local}
    scope |= {out: f"{name}:{out}" for node in graph.node for out in node.output if out}
    nodes = [_scoped_node(node, scope, name) for node in graph.node]
    zero = _zero(graph, scope, name, nodes)
    inputs = {v.name for v in graph.input}
    outputs = []
    for slot in JOINED:
        for v in branches[slot].graph.output:
            if slot != name:
                outputs.append(_empty_output(v, f"{name}:none/{v.name}", zero, nodes))
            elif v.name in inputs:  # a graph input passed straight through
                nodes.append(onnx.helper.make_node("Identity", [scope[v.name]], [f"{name}:out/{v.name}"]))
                outputs.append(renamed(v, f"{name}:out/{v.name}"))
            else:
                outputs.append(renamed(v, scope.get(v.name, v.name)))
    initializers = []
    for tensor in local:
        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        copy.name = scope[tensor.name]
        initializers.append(copy)
    value_info = [renamed(v, scope.get(v.name, v.name)) for v in graph.value_info]
    return onnx.helper.make_graph(nodes, name, [], outputs, initializers, value_info=value_info)


def _scoped_node(node: onnx.NodeProto, scope: dict[str, str], branch: str) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.input[:] = [scope.get(i, i) for i in node.input]
    copy.output[:] = [scope.get(o, o) for o in node.output]
    if node.name:
        copy.name = f"{branch}:{node.name}"
    for attr in copy.attribute:  # a nested body reads this branch's values under their scoped names
        for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
            _rename_reads(sub, scope)
    return copy


def _rename_reads(graph: onnx.GraphProto, scope: dict[str, str]) -> None:
    own = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    own |= {o for node in graph.node for o in node.output}
    outer = {k: v for k, v in scope.items() if k not in own}  # a name the body defines shadows the outer one
    for node in graph.node:
        node.input[:] = [outer.get(i, i) for i in node.input]
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                _rename_reads(sub, outer)
    for v in graph.output:
        v.name = outer.get(v.name, v.name)


def _zero(graph: onnx.GraphProto, scope: dict[str, str], branch: str, nodes: list) -> str:
    """An int64 [1] zero known only at run time: ONNX Runtime types an If node's outputs by its then-branch, so a
    constant's fixed zero sizes would become the other branch's output shapes. Taken from a symbolic input
    dimension where there is one, so that no shape in the graph depends on BRANCH's value (TensorRT would then need
    the flag as a host shape tensor)."""
    zero = f"{branch}:none/zero"
    for v in graph.input:
        dims = v.type.tensor_type.shape.dim
        axis = next((i for i, d in enumerate(dims) if not d.HasField("dim_value")), None)
        if axis is not None:
            nodes += [
                onnx.helper.make_node("Shape", [scope[v.name]], [f"{zero}.dim"], start=axis, end=axis + 1),
                onnx.helper.make_node("Sub", [f"{zero}.dim", f"{zero}.dim"], [zero]),
            ]
            return zero
    nodes += [
        onnx.helper.make_node("Cast", [BRANCH], [f"{zero}.flag"], to=onnx.TensorProto.INT64),
        onnx.helper.make_node("Sub", [f"{zero}.flag", f"{zero}.flag"], [zero]),
    ]
    return zero


def _empty_output(like: onnx.ValueInfoProto, name: str, zero: str, nodes: list) -> onnx.ValueInfoProto:
    """Append the nodes of an empty tensor of `like`'s type and rank, its sizes `zero` (a run-time 0) each (of a
    scalar, a 0)."""
    tensor = like.type.tensor_type
    rank = len(tensor.shape.dim)
    ones = onnx.helper.make_tensor(f"{name}.ones", onnx.TensorProto.INT64, [rank], [1] * rank)
    value = onnx.helper.make_tensor(f"{name}.value", tensor.elem_type, [1], [0])
    nodes += [
        onnx.helper.make_node("Constant", [], [ones.name], value=ones),
        onnx.helper.make_node("Mul", [ones.name, zero], [f"{name}.sizes"]),
        onnx.helper.make_node("ConstantOfShape", [f"{name}.sizes"], [name], value=value),
    ]
    return onnx.helper.make_tensor_value_info(name, tensor.elem_type, [None] * rank)
