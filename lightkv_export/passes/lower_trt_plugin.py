"""Lower every LightKVMerge node to the three TensorRT plugin nodes that the TensorRT ONNX parser maps to plugins.

The parser's convention for Python (QDP) plugins: the node's op type is the plugin name, a string attribute
`plugin_namespace` names its namespace, and an attribute `aot` = 1 selects the ahead-of-time implementation (the
compiled kernel embedded in the engine, no Python at run time). See plugins/lightkv/trt_plugin.py for the plugins;
one LightKVMerge (hidden, guidance, win_index, win_r, lengths, out_lengths) -> (hidden_out, kept) becomes

    LightKVMatch(hidden, win_index) -> best, partner
    LightKVPlan(guidance, win_index, win_r, lengths, out_lengths, best, partner) -> kept, out_len, dest, assign
    LightKVEmit(hidden, guidance, win_index, kept, dest, assign) -> hidden_out

The LightKVMerge local function is dropped once no node uses it (TensorRT would otherwise inline its body).
"""

from __future__ import annotations

import onnx
from onnx import helper

from lightkv_export.method.layout import OP_DOMAIN, OP_NAME

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


def lower_node(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """The plugin chain for one LightKVMerge node (same input and output names)."""
    hidden, guidance, win_index, win_r, lengths, out_lengths = node.input
    hidden_out, kept = node.output
    tag = node.name or hidden_out
    best, partner, out_len, dest, assign = (f"{tag}/{n}" for n in ("best", "partner", "out_len", "dest", "assign"))
    return [
        _plugin_node("LightKVMatch", [hidden, win_index], [best, partner], f"{tag}/match"),
        _plugin_node(
            "LightKVPlan",
            [guidance, win_index, win_r, lengths, out_lengths, best, partner],
            [kept, out_len, dest, assign],
            f"{tag}/plan",
        ),
        _plugin_node("LightKVEmit", [hidden, guidance, win_index, kept, dest, assign], [hidden_out], f"{tag}/emit"),
    ]


def _is_merge(node: onnx.NodeProto) -> bool:
    return node.domain == OP_DOMAIN and node.op_type == OP_NAME


def lower_graph(graph: onnx.GraphProto) -> int:
    """Rewrite the graph in place (subgraphs too); returns how many LightKVMerge nodes were lowered."""
    count, nodes = 0, []
    for node in graph.node:
        for attr in node.attribute:  # If / Loop bodies
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                count += lower_graph(sub)
        if _is_merge(node):
            nodes.extend(lower_node(node))
            count += 1
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return count


def lower_trt_plugin(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with every LightKVMerge node lowered to the TensorRT plugins and its function dropped."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    lower_graph(out.graph)
    used = {(n.domain, n.op_type) for f in out.functions for n in f.node}
    if (OP_DOMAIN, OP_NAME) not in used:
        kept = [f for f in out.functions if (f.domain, f.name) != (OP_DOMAIN, OP_NAME)]
        del out.functions[:]
        out.functions.extend(kept)
    return out
