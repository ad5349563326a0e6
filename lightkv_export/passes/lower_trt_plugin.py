"""Lower every LightKVMerge node to the three TensorRT plugin nodes that the TensorRT ONNX parser maps to plugins.

The parser's convention for Python (QDP) plugins: the node's op type is the plugin name, a string attribute
`plugin_namespace` names its namespace, and an attribute `aot` = 1 selects the ahead-of-time implementation (the
compiled kernel embedded in the engine, no Python at run time). See plugins/lightkv/trt_plugin.py for the plugins;
one LightKVMerge (hidden, guidance, win_index, win_r, lengths, out_lengths) -> (hidden_out, kept[, assign]) becomes

    LightKVMatch(hidden, win_index) -> best, partner
    LightKVPlan(guidance, win_index, win_r, lengths, out_slots, best, partner) -> kept, dest, assign
    LightKVEmit(hidden, guidance, win_index, kept, dest, assign) -> hidden_out
    Cast(assign, int64) -> the node's assign output (when it has one: the plan kernel's assign is the function's)

where out_slots [S'] is a new graph input per stage (method/merge_plan.py, OUT_SLOTS): the host knows S' from the
merge plan, and as an input dimension it sizes kept and hidden_out with plain shape arithmetic. (A size tensor
computed inside the plan kernel would forbid the arithmetic that Emit's launch grid needs, and would make TensorRT
synchronise mid-graph.) The LightKVMerge local function is dropped once no node uses it (TensorRT would otherwise
inline its body).
"""

from __future__ import annotations

import onnx
from onnx import helper

from lightkv_export.errors import InputError
from lightkv_export.method.layout import OP_DOMAIN, OP_NAME
from lightkv_export.method.merge_plan import OUT_SLOTS, stage_input_names, stage_of, takes_order

PLUGIN_NAMESPACE = "lightkv"
PLUGIN_VERSION = "1"


def _plugin_node(op: str, inputs: list[str], outputs: list[str], name: str) -> onnx.NodeProto:
    return helper.make_node(
        op,
        inputs,
        outputs,
        name=name,
        domain=OP_DOMAIN,
        plugin_namespace=PLUGIN_NAMESPACE,
        plugin_version=PLUGIN_VERSION,
        aot=1,
    )


def out_slots_input(node: onnx.NodeProto) -> str:
    """The out_slots graph input of a LightKVMerge node's stage (named after its out_lengths input)."""
    stage = stage_of(node.input[5])
    return stage_input_names(stage)[OUT_SLOTS] if stage is not None else OUT_SLOTS


def lower_node(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """The plugin chain for one LightKVMerge node (same input and output names, plus its stage's out_slots)."""
    hidden, guidance, win_index, win_r, lengths, _out_lengths = node.input
    hidden_out, kept, *assign_out = node.output
    tag = node.name or hidden_out
    best, partner, dest, assign = (f"{tag}/{n}" for n in ("best", "partner", "dest", "assign"))
    exposed = [
        helper.make_node("Cast", [assign], assign_out[:1], name=f"{tag}/assign_int64", to=onnx.TensorProto.INT64)
    ]
    return [
        _plugin_node("LightKVMatch", [hidden, win_index], [best, partner], f"{tag}/match"),
        _plugin_node(
            "LightKVPlan",
            [guidance, win_index, win_r, lengths, out_slots_input(node), best, partner],
            [kept, dest, assign],
            f"{tag}/plan",
        ),
        _plugin_node("LightKVEmit", [hidden, guidance, win_index, kept, dest, assign], [hidden_out], f"{tag}/emit"),
        *(exposed if assign_out and assign_out[0] else []),
    ]


def _is_merge(node: onnx.NodeProto) -> bool:
    return node.domain == OP_DOMAIN and node.op_type == OP_NAME


def lower_graph(graph: onnx.GraphProto) -> list[str]:
    """Rewrite the graph in place (subgraphs too); returns the out_slots inputs the lowered nodes read."""
    slots, nodes = [], []
    for node in graph.node:
        for attr in node.attribute:  # If / Loop bodies
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                slots += lower_graph(sub)
        if _is_merge(node):
            nodes.extend(lower_node(node))
            slots.append(out_slots_input(node))
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return slots


def lower_trt_plugin(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with every LightKVMerge node lowered to the TensorRT plugins, each stage's out_slots
    [S'] int64 added as a graph input, and the LightKVMerge function dropped."""
    if takes_order([i.name for i in model.graph.input]):
        raise InputError(
            "a TensorRT engine for grids with tokens that never merge inside them (LLaVA-NeXT's newlines: each "
            "stage's order input) is not supported yet: its optimization profiles do not cover the order input. "
            "Build the ort-cpu target for this family."
        )
    out = onnx.ModelProto()
    out.CopyFrom(model)
    present = {i.name for i in out.graph.input}
    for name in dict.fromkeys(lower_graph(out.graph)):  # once per stage, in stage order
        if name not in present:
            dim = f"S_out_{stage_of(name)}" if stage_of(name) is not None else "S_out"
            out.graph.input.append(helper.make_tensor_value_info(name, onnx.TensorProto.INT64, [dim]))
    used = {(n.domain, n.op_type) for f in out.functions for n in f.node}
    if (OP_DOMAIN, OP_NAME) not in used:
        kept = [f for f in out.functions if (f.domain, f.name) != (OP_DOMAIN, OP_NAME)]
        del out.functions[:]
        out.functions.extend(kept)
    return out
