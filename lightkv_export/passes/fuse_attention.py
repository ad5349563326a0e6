"""Graph transform (ort-cpu only): each layer's attention as ONNX Runtime's com.microsoft GroupQueryAttention.

The exported graphs (export.py) are standard ONNX, which TensorRT keeps: K and V repeated to every query head,
an additive mask, a separate Softmax. This pass replaces, between the export's role outputs, each layer's
attention with one GroupQueryAttention (grouped heads read in place, the causal softmax fused, nothing S x S
materialised but the scores of one head at a time). The rotary embedding stays the exported one (do_rotary=0):
M-RoPE is not the op's 1-D rotary, and decode positions continue from the uncompressed prompt length.

Prefill (`fuse_prefill_attention`, after the LightKV pass): causal over each layer's own sequence, S before the
first merge and S' after it, read from the layer's query at run time, so the pass needs no schedule. Every row
attends over the full padded length, as the exported causal attention does (rows are right-padded: no real
token sees padding).

Decode (`fuse_decode_attention`): an in-place KV cache.
* `past.{i}.key / .value` become buffers [B, Hkv, M_i, d] of a fixed capacity M_i per layer (the runtime sizes
  them from the request's per-layer lengths after the merges plus the generation budget), and
  `present.{i}.key / .value` are the same buffers: the runtime binds both to one array, and the op writes the new
  token's entries at each row's `past_length.{i}`;
* `past_mask.{i}` [B, P_i] gives way to `past_length.{i}` [B] int32, the row's valid entries before this step
  (the op's `seqlens_k`): a row's valid entries are contiguous from 0, so LightKV's per-layer lengths and a
  padded batch's per-row lengths are both just lengths;
* the decode step is one token per row (s = 1), so [B, H, 1, d] and [B, 1, H * d] have the same memory order
  and every layout change is a Reshape.
"""

from __future__ import annotations

import json

import onnx
import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from lightkv_export import contract
from lightkv_export.errors import InputError

GQA_DOMAIN = "com.microsoft"
INT32 = ir.DataType.INT32


def graph_meta(model: onnx.ModelProto, graph: str) -> dict:
    """The attention sizes the exporter recorded in the graph's metadata."""
    props = {p.key: p.value for p in model.metadata_props}
    if contract.ROLE_META_KEY not in props:
        raise InputError(
            f"the {graph} graph has no role metadata: it comes from an older export; build again with --force "
            "so that the model is exported afresh."
        )
    return json.loads(props[contract.ROLE_META_KEY])


class _Graph:
    """Appends nodes to an onnx-ir graph; finds its inputs, outputs and role values by name."""

    def __init__(self, model: onnx.ModelProto, roles: list[str], what: str) -> None:
        self.model = ir.serde.deserialize_model(model)
        self.graph = self.model.graph
        self.outputs = {v.name: v for v in self.graph.outputs}
        self.inputs = {v.name: v for v in self.graph.inputs}
        missing = [name for name in roles if name not in self.outputs]
        if missing:
            raise InputError(f"the {what} graph lacks the role outputs {missing[:2]}...; build again with --force.")
        for out in [o for o in self.graph.outputs if o.name.startswith(contract.ROLE_PREFIX)]:
            self.graph.outputs.remove(out)  # the values stay, as the boundary of what is replaced

    def op(self, op_type, inputs, attrs=None, *, label: str, num_outputs=1, domain="") -> list[ir.Value]:
        node = ir.Node(
            domain,
            op_type,
            inputs,
            attributes=ir.convenience.convert_attributes(attrs or {}),
            num_outputs=num_outputs,
            name=f"{label}/{op_type}_{len(self.graph)}",
        )
        self.graph.append(node)
        return list(node.outputs)

    def ints(self, values, label: str) -> ir.Value:
        return self.op("Constant", [], {"value_ints": list(values)}, label=label)[0]

    def finish(self) -> onnx.ModelProto:
        common_passes.RemoveUnusedNodesPass()(self.model)
        common_passes.TopologicalSortPass()(self.model)
        self.model.opset_imports[GQA_DOMAIN] = 1
        return ir.serde.serialize_model(self.model)


def _gqa_attrs(meta: dict) -> dict:
    return {"num_heads": meta["num_heads"], "kv_num_heads": meta["num_kv_heads"], "scale": float(meta["scaling"])}


def fuse_prefill_attention(model: onnx.ModelProto) -> onnx.ModelProto:
    """The prefill graph (vanilla, or after the LightKV pass) with GroupQueryAttention in every layer; the attention
    roles it reads are removed, the rest of the graph and its inputs and outputs stay."""
    meta = graph_meta(model, "prefill")
    n, hq, hd = meta["num_layers"], meta["num_heads"], meta["head_dim"]
    roles = [contract.role(f"{r}.{i}") for i in range(n) for r in contract.ATTENTION_ROLES]
    g = _Graph(model, roles, "prefill")
    for i in range(n):
        label = f"lightkv.attention.{i}"
        query = g.outputs[contract.role(f"query.{i}")]  # [B, Hq, S_i, d]
        bsh = g.ints([0, 0, -1], label)
        q, k, v = (
            g.op("Reshape", [g.op("Transpose", [x], {"perm": [0, 2, 1, 3]}, label=label)[0], bsh], label=label)[0]
            for x in (query, g.outputs[contract.present(i, "key")], g.outputs[contract.present(i, "value")])
        )  # [B, S_i, H * d]
        seq = g.op("Shape", [query], {"start": 2, "end": 3}, label=label)[0]  # [1] int64: S_i
        batch = g.op("Shape", [query], {"start": 0, "end": 1}, label=label)[0]
        last = g.op("Cast", [g.op("Sub", [seq, g.ints([1], label)], label=label)[0]], {"to": INT32}, label=label)[0]
        seqlens = g.op("Expand", [last, batch], label=label)[0]  # [B]: every row attends over all S_i, causally
        total = g.op("Squeeze", [g.op("Cast", [seq], {"to": INT32}, label=label)[0]], label=label)[0]
        attended = g.op(
            "GroupQueryAttention",
            [q, k, v, None, None, seqlens, total],
            _gqa_attrs(meta),
            label=label,
            num_outputs=3,
            domain=GQA_DOMAIN,
        )[0]  # [B, S_i, Hq * d]
        heads = g.op("Reshape", [attended, g.ints([0, 0, hq, hd], label)], label=label)[0]
        g.outputs[contract.role(f"attention.{i}")].replace_all_uses_with(heads)  # [B, S_i, Hq, d]
    return g.finish()


def fuse_decode_attention(model: onnx.ModelProto) -> onnx.ModelProto:
    """The exported decode graph (with its role outputs) rewritten to in-place GroupQueryAttention per layer."""
    meta = graph_meta(model, "decode")
    n, hq, hd = meta["num_layers"], meta["num_heads"], meta["head_dim"]
    g = _Graph(model, [contract.role(f"{r}.{i}") for i in range(n) for r in contract.DECODE_ROLES], "decode")
    for i in range(n):
        label = f"lightkv.decode_attention.{i}"
        flat = g.ints([0, 1, -1], label)  # [B, H, 1, d] -> [B, 1, H * d]
        q, k, v = (
            g.op("Reshape", [g.outputs[contract.role(f"{r}.{i}")], flat], label=label)[0]
            for r in contract.DECODE_ROLES[:3]
        )
        past_key, past_value = g.inputs[contract.past(i, "key")], g.inputs[contract.past(i, "value")]
        length = ir.Value(name=contract.past_length(i), type=ir.TensorType(INT32), shape=ir.Shape(["batch"]))
        g.graph.inputs.append(length)
        # total_sequence_length: the buffer's capacity (the op's static-cache form), from the buffer itself.
        capacity = g.op("Shape", [past_key], {"start": 2, "end": 3}, label=label)[0]
        total = g.op("Squeeze", [g.op("Cast", [capacity], {"to": INT32}, label=label)[0]], label=label)[0]
        attended, key_out, value_out = g.op(
            "GroupQueryAttention",
            [q, k, v, past_key, past_value, length, total],
            {**_gqa_attrs(meta), "do_rotary": 0},
            label=label,
            num_outputs=3,
            domain=GQA_DOMAIN,
        )  # [B, 1, Hq * d], [B, Hkv, M_i, d] x 2 (the past buffers, written in place)
        heads = g.op("Reshape", [attended, g.ints([0, 1, hq, hd], label)], label=label)[0]
        g.outputs[contract.role(f"dattention.{i}")].replace_all_uses_with(heads)  # [B, 1, Hq, d]
        for kind, new in (("key", key_out), ("value", value_out)):
            previous = g.outputs[contract.present(i, kind)]
            previous.name = None  # the Concat's output: dead once the graph output is the op's
            new.name, new.type, new.shape = contract.present(i, kind), previous.type, past_key.shape
            g.graph.outputs[g.graph.outputs.index(previous)] = new
    common_passes.RemoveUnusedNodesPass()(g.model)
    for i in range(n):
        mask = g.inputs[contract.past_mask(i)]
        if mask.uses():
            raise AssertionError(f"{contract.past_mask(i)} is still read after the fusion: the pattern changed")
        g.graph.inputs.remove(mask)
    return g.finish()
