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

import onnx
import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from lightkv_export import contract
from lightkv_export.errors import InputError
from lightkv_export.passes.graph_edit import Builder, role_meta

GQA_DOMAIN = "com.microsoft"
INT32 = ir.DataType.INT32


def _open(model: onnx.ModelProto, roles: list[str], what: str) -> tuple[ir.Model, dict[str, ir.Value]]:
    """The model in onnx-ir and its graph outputs by name; the role outputs leave the graph's outputs (their
    values stay, as the boundary of what is replaced)."""
    irm = ir.serde.deserialize_model(model)
    outputs = {v.name: v for v in irm.graph.outputs}
    missing = [name for name in roles if name not in outputs]
    if missing:
        raise InputError(f"the {what} graph lacks the role outputs {missing[:2]}...; build again with --force.")
    for out in [o for o in irm.graph.outputs if o.name.startswith(contract.ROLE_PREFIX)]:
        irm.graph.outputs.remove(out)
    return irm, outputs


def _finish(irm: ir.Model) -> onnx.ModelProto:
    common_passes.RemoveUnusedNodesPass()(irm)
    common_passes.TopologicalSortPass()(irm)
    irm.opset_imports[GQA_DOMAIN] = 1
    return ir.serde.serialize_model(irm)


def _gqa(b: Builder, meta: dict, inputs: list, **extra) -> list[ir.Value]:
    attrs = {"num_heads": meta["num_heads"], "kv_num_heads": meta["num_kv_heads"], "scale": float(meta["scaling"])}
    return b.multi("GroupQueryAttention", inputs, {**attrs, **extra}, num_outputs=3, domain=GQA_DOMAIN)


def fuse_prefill_attention(model: onnx.ModelProto) -> onnx.ModelProto:
    """The prefill graph (vanilla, or after the LightKV pass) with GroupQueryAttention in every layer; the attention
    roles it reads are removed, the rest of the graph and its inputs and outputs stay."""
    meta = role_meta(model, "prefill")
    n, hq, hd = meta["num_layers"], meta["num_heads"], meta["head_dim"]
    irm, outputs = _open(
        model, [contract.role(f"{r}.{i}") for i in range(n) for r in contract.ATTENTION_ROLES], "prefill"
    )
    for i in range(n):
        b = Builder(irm.graph, f"lightkv.attention.{i}")
        query = outputs[contract.role(f"query.{i}")]  # [B, Hq, S_i, d]
        bsh = b.ints([0, 0, -1])
        q, k, v = (
            b.op("Reshape", [b.op("Transpose", [x], {"perm": [0, 2, 1, 3]}), bsh])
            for x in (query, outputs[contract.present(i, "key")], outputs[contract.present(i, "value")])
        )  # [B, S_i, H * d]
        seq = b.op("Shape", [query], {"start": 2, "end": 3})  # [1] int64: S_i
        last = b.op("Cast", [b.op("Sub", [seq, b.ints([1])])], {"to": INT32})
        seqlens = b.op("Expand", [last, b.op("Shape", [query], {"start": 0, "end": 1})])  # [B]: all S_i, causally
        total = b.op("Squeeze", [b.op("Cast", [seq], {"to": INT32})])
        attended = _gqa(b, meta, [q, k, v, None, None, seqlens, total])[0]  # [B, S_i, Hq * d]
        heads = b.op("Reshape", [attended, b.ints([0, 0, hq, hd])])  # [B, S_i, Hq, d]
        outputs[contract.role(f"attention.{i}")].replace_all_uses_with(heads)
    return _finish(irm)


def fuse_decode_attention(model: onnx.ModelProto) -> onnx.ModelProto:
    """The exported decode graph (with its role outputs) rewritten to in-place GroupQueryAttention per layer."""
    meta = role_meta(model, "decode")
    n, hq, hd = meta["num_layers"], meta["num_heads"], meta["head_dim"]
    irm, outputs = _open(model, [contract.role(f"{r}.{i}") for i in range(n) for r in contract.DECODE_ROLES], "decode")
    graph = irm.graph
    inputs = {v.name: v for v in graph.inputs}
    for i in range(n):
        b = Builder(graph, f"lightkv.decode_attention.{i}")
        flat = b.ints([0, 1, -1])  # [B, H, 1, d] -> [B, 1, H * d]
        q, k, v = (b.op("Reshape", [outputs[contract.role(f"{r}.{i}")], flat]) for r in contract.DECODE_ROLES[:3])
        past_key, past_value = inputs[contract.past(i, "key")], inputs[contract.past(i, "value")]
        length = ir.Value(name=contract.past_length(i), type=ir.TensorType(INT32), shape=ir.Shape(["batch"]))
        graph.inputs.append(length)
        # total_sequence_length: the buffer's capacity (the op's static-cache form), from the buffer itself.
        total = b.op("Squeeze", [b.op("Cast", [b.op("Shape", [past_key], {"start": 2, "end": 3})], {"to": INT32})])
        attended, key_out, value_out = _gqa(b, meta, [q, k, v, past_key, past_value, length, total], do_rotary=0)
        # [B, 1, Hq * d], then [B, Hkv, M_i, d] x 2: the past buffers, written in place
        heads = b.op("Reshape", [attended, b.ints([0, 1, hq, hd])])  # [B, 1, Hq, d]
        outputs[contract.role(f"dattention.{i}")].replace_all_uses_with(heads)
        for kind, new in (("key", key_out), ("value", value_out)):
            previous = outputs[contract.present(i, kind)]
            previous.name = None  # the Concat's output: dead once the graph output is the op's
            new.name, new.type, new.shape = contract.present(i, kind), previous.type, past_key.shape
            graph.outputs[graph.outputs.index(previous)] = new
    common_passes.RemoveUnusedNodesPass()(irm)
    for i in range(n):
        mask = inputs[contract.past_mask(i)]
        if mask.uses():
            raise AssertionError(f"{contract.past_mask(i)} is still read after the fusion: the pattern changed")
        graph.inputs.remove(mask)
    return _finish(irm)
