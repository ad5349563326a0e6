"""Graph transform (ort-cpu only): each layer's attention as ONNX Runtime's com.microsoft GroupQueryAttention.

The exported graphs (export.py) are standard ONNX, which TensorRT keeps: K and V repeated to every query head,
an additive mask, a separate Softmax. This pass replaces, between the export's role outputs, each layer's
attention with one GroupQueryAttention (grouped heads read in place, the causal softmax fused, nothing S x S
materialised but the scores of one head at a time). The op's own rotary stays off (do_rotary=0: M-RoPE is not its
1-D rotary, and decode positions continue from the uncompressed prompt length); instead the rotary becomes
com.microsoft RotaryEmbedding on the projections as they come out of their MatMuls ([B, s, H * d], the layout
GroupQueryAttention reads), so the per-head reshapes, transposes and rotate-half chains of every layer go (about
20 nodes a layer: on a CPU decode step, node overhead is what is left once the weights stream). The op looks
cos / sin up by position id; it is given the exported per-token cos / sin (M-RoPE's sections already mixed, and
after a merge the kept tokens' own) as a table of B x s rows and each token's row as its id, so it rotates by
exactly the exported angles, whatever the position scheme. A layer whose rotary is not the exporter's
rotate-half pattern keeps its exported form.

Prefill (`fuse_prefill_attention`, after the LightKV pass): causal over each layer's own sequence, S before the
first merge and S' after it, read from the layer's query at run time, so the pass needs no schedule; the layer's
present K / V are the op's own outputs. Every row attends over the full padded length, as the exported causal
attention does (rows are right-padded: no real token sees padding).

Decode (`fuse_decode_attention`): an in-place KV cache.
* `past.{i}.key / .value` become buffers [B, Hkv, M_i, d] of a fixed capacity M_i per layer (the runtime sizes
  them from the request's per-layer lengths after the merges plus the generation budget), and
  `present.{i}.key / .value` are the same buffers: the runtime binds both to one array, and the op writes the new
  token's entries at each row's `past_length.{i}`;
* `past_mask.{i}` [B, P_i] gives way to `past_length.{i}` [B] int32, the row's valid entries before this step
  (the op's `seqlens_k`): a row's valid entries are contiguous from 0, so LightKV's per-layer lengths and a
  padded batch's per-row lengths are both just lengths.
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
    n, hq, hkv, hd = meta["num_layers"], meta["num_heads"], meta["num_kv_heads"], meta["head_dim"]
    irm, outputs = _open(
        model, [contract.role(f"{r}.{i}") for i in range(n) for r in contract.ATTENTION_ROLES], "prefill"
    )
    tables: dict = {}  # the rotary tables, once per distinct cos / sin (one per layer group)
    graph = irm.graph
    for i in range(n):
        b = Builder(graph, f"lightkv.attention.{i}")
        query = outputs[contract.role(f"query.{i}")]  # [B, Hq, S_i, d]
        present = {kind: outputs[contract.present(i, kind)] for kind in contract.KV}  # each [B, Hkv, S_i, d]
        q, k, v = (
            _bsh(b, x, tables, hd, heads, _from_heads)
            for x, heads in ((query, hq), (present["key"], hkv), (present["value"], hkv))
        )  # each [B, S_i, H * d]
        seq = b.op("Shape", [q], {"start": 1, "end": 2})  # [1] int64: S_i
        last = b.op("Cast", [b.op("Sub", [seq, b.ints([1])])], {"to": INT32})
        seqlens = b.op("Expand", [last, b.op("Shape", [q], {"start": 0, "end": 1})])  # [B]: all S_i, causally
        total = b.op("Squeeze", [b.op("Cast", [seq], {"to": INT32})])
        attended, key_out, value_out = _gqa(b, meta, [q, k, v, None, None, seqlens, total])
        # [B, S_i, Hq * d]; [B, Hkv, S_i, d] x 2: the rotated key and the value, as the exported present
        heads = b.op("Reshape", [attended, b.ints([0, 0, hq, hd])])  # [B, S_i, Hq, d]
        outputs[contract.role(f"attention.{i}")].replace_all_uses_with(heads)
        for kind, new in (("key", key_out), ("value", value_out)):
            previous = present[kind]  # stays only where the graph still reads it (the LightKV guidance)
            name = previous.name
            previous.name = f"{name}.unfused"
            new.name, new.type, new.shape = name, previous.type, previous.shape
            graph.outputs[graph.outputs.index(previous)] = new
    return _finish(irm)


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain == "" else None


def _head_split(value: ir.Value) -> ir.Value | None:
    """x [B, s, H * d] when `value` is Transpose(Reshape(x), perm 0 2 1 3) [B, H, s, d]."""
    transpose = _producer(value, "Transpose")
    if transpose is None or list(transpose.attributes.get_ints("perm", [])) != [0, 2, 1, 3]:
        return None
    reshape = _producer(transpose.inputs[0], "Reshape")
    return reshape.inputs[0] if reshape is not None else None


def _half(value: ir.Value) -> ir.Node | None:
    """The Slice behind `value`, through a Neg (rotate_half's -x2 and x1)."""
    neg = _producer(value, "Neg")
    return _producer(neg.inputs[0] if neg is not None else value, "Slice")


def _rotate_half(value: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value] | None:
    """(x [B, s, H * d], cos [B, s, d], sin [B, s, d]) when `value` is x_heads * cos + rotate_half(x_heads) * sin,
    x_heads the head split of x and cos / sin unsqueezed over the heads (the exporter's rotary)."""
    add = _producer(value, "Add")
    muls = [_producer(v, "Mul") for v in add.inputs] if add is not None else [None]
    if None in muls:
        return None
    concats = [(m, c) for m in muls for v in m.inputs if (c := _producer(v, "Concat")) is not None]
    if len(concats) != 1:
        return None
    (rot, concat), plain = concats[0], next(m for m in muls if m is not concats[0][0])
    heads = next((v for v in plain.inputs if _head_split(v) is not None), None)
    halves = [_half(v) for v in concat.inputs]
    if heads is None or None in halves or any(h.inputs[0] is not heads for h in halves):
        return None
    cos_u = next(v for v in plain.inputs if v is not heads)
    sin_u = next(v for v in rot.inputs if v is not concat.outputs[0])
    tables = [_producer(v, "Unsqueeze") for v in (cos_u, sin_u)]
    if None in tables:
        return None
    return _head_split(heads), tables[0].inputs[0], tables[1].inputs[0]


def _rotary(b: Builder, x: ir.Value, cos: ir.Value, sin: ir.Value, heads: int, head_dim: int, tables: dict):
    """RotaryEmbedding of x [B, s, H * d] at the exported per-token angles: row b * s + t of the cos / sin
    tables [B * s, d / 2] is token t of row b (rotate-half tables repeat their first half)."""
    key = (id(cos), id(sin))
    if key not in tables:
        half = b.ints([head_dim // 2])
        cache = [
            b.op("Reshape", [b.op("Slice", [t, b.ints([0]), half, b.ints([2])]), b.ints([-1, head_dim // 2])])
            for t in (cos, sin)
        ]  # each [B * s, d / 2]
        lead = b.op("Shape", [cos], {"start": 0, "end": 2})  # [2]: B, s
        count = b.op("ReduceProd", [lead], {"keepdims": 0})
        ids = b.op("Reshape", [b.op("Range", [b.i64(0), count, b.i64(1)]), lead])  # [B, s]
        tables[key] = (ids, *cache)
    ids, cos_cache, sin_cache = tables[key]
    return b.op(
        "RotaryEmbedding", [x, ids, cos_cache, sin_cache], {"num_heads": heads, "interleaved": 0}, domain=GQA_DOMAIN
    )  # [B, s, H * d]


def _from_heads(b: Builder, value: ir.Value) -> ir.Value:
    """[B, H, s, d] -> [B, s, H * d], any s."""
    return b.op("Reshape", [b.op("Transpose", [value], {"perm": [0, 2, 1, 3]}), b.ints([0, 0, -1])])


def _from_step_heads(b: Builder, value: ir.Value) -> ir.Value:
    """[B, H, 1, d] -> [B, 1, H * d]: for one token the memory order is the same."""
    return b.op("Reshape", [value, b.ints([0, 1, -1])])


def _bsh(b: Builder, role: ir.Value, tables: dict, head_dim: int, heads: int, fallback) -> ir.Value:
    """A query, key or value [B, H, s, d] (query and key after the rotary) as [B, s, H * d]: the projection
    itself (rotated by RotaryEmbedding) where the pattern is the exporter's, else `fallback`'s relayout."""
    rotary = _rotate_half(role)
    if rotary is not None:
        return _rotary(b, *rotary, heads, head_dim, tables)
    split = _head_split(role)
    return split if split is not None else fallback(b, role)


def fuse_decode_attention(model: onnx.ModelProto) -> onnx.ModelProto:
    """The exported decode graph (with its role outputs) rewritten to in-place GroupQueryAttention per layer."""
    meta = role_meta(model, "decode")
    n, hq, hd = meta["num_layers"], meta["num_heads"], meta["head_dim"]
    irm, outputs = _open(model, [contract.role(f"{r}.{i}") for i in range(n) for r in contract.DECODE_ROLES], "decode")
    graph = irm.graph
    inputs = {v.name: v for v in graph.inputs}
    tables: dict = {}  # the rotary tables, once per distinct cos / sin
    for i in range(n):
        b = Builder(graph, f"lightkv.decode_attention.{i}")
        q, k, v = (
            _bsh(b, outputs[contract.role(f"{r}.{i}")], tables, hd, h, _from_step_heads)
            for r, h in zip(contract.DECODE_ROLES[:3], (hq, meta["num_kv_heads"], meta["num_kv_heads"]), strict=True)
        )  # each [B, 1, H * d]
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
