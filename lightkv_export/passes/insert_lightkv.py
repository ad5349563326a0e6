"""Graph transform: insert LightKV into a vanilla prefill graph for one schedule.

At each scheduled layer lambda (1-based) the pass adds, on the export's role values (export.py):
* the guidance subgraph: xi [B, S] from that layer's post-RoPE query and key against the non-vision keys only
  (standard ops, an [S, T] product per head, never [S, S]; softmax over queries, as the released code);
* the LightKVMerge node (the ONNX local function of method/onnx_function.py) on the layer's output;
* the rewiring of everything after it that depends on the sequence: every node downstream of the merged hidden
  state that reads a value derived from `position_ids` or `lengths` gets a clone of that value's subgraph computed
  from the new positions (survivors' own ids gathered with `kept` in `preserve` mode, 0..S'-1 in `official`
  mode) and the new lengths. The rotary tables and the last-token index are found this way rather than by name,
  so the pass does not depend on how the exporter spelled them.
Later layers then compute, and output, shorter K and V. Each stage's `kept` and `assign` (the partner each merged
token went to, for parity's tie-aware check) become graph outputs.

With `reorder` (a family whose grids hold tokens that never merge inside them, LLaVA-NeXT's newlines) each stage
also takes order [B, S] (merge_plan.plan_request(..., reorder=True)): the layer's output and xi are gathered by it
before the op, and the op's kept is mapped back through it (kept = order[kept], -1 stays -1), so the `kept` output
and everything gathered with it (the survivors' positions) are in the stage's input order, as without a reordering.
Without it the graph is exactly what it was before (no order input).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import onnx
import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from lightkv_export.contract import ENGINE_META_KEY, INPUTS_EMBEDS, PRESENT_PREFIX, ROLE_PREFIX, is_attention_role
from lightkv_export.errors import InputError
from lightkv_export.method.layout import OP_DOMAIN, OP_NAME, OP_VERSION
from lightkv_export.method.merge_plan import ORDER, stage_assign_name, stage_input_names, stage_kept_name
from lightkv_export.method.onnx_function import lightkv_function, node_attributes
from lightkv_export.method.schedule import Schedule
from lightkv_export.models.positions import SCHEMES
from lightkv_export.passes.graph_edit import Builder, role_meta

PositionMode = Literal["preserve", "official"]
INT64, FLOAT, BOOL = ir.DataType.INT64, ir.DataType.FLOAT, ir.DataType.BOOL


@dataclass(frozen=True)
class PassReport:
    stages: int
    cloned_nodes: int
    guidance_nodes: int


def _forward_nodes(start: ir.Value) -> set[ir.Node]:
    """Every node that (transitively) consumes `start`."""
    seen: set[ir.Node] = set()
    frontier = list(start.consumers())
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        for out in node.outputs:
            frontier.extend(out.consumers())
    return seen


def _forward_values(starts: Iterable[ir.Value]) -> set[ir.Value]:
    values = set(starts)
    for s in list(values):
        for node in _forward_nodes(s):
            values.update(node.outputs)
    return values


class _Cloner:
    """Recomputes values from replaced sources: clone(v) is v's subgraph with the sources substituted."""

    def __init__(self, builder: Builder, substitute: dict[ir.Value, ir.Value]) -> None:
        self.b, self.memo, self.cloned = builder, dict(substitute), 0

    def __call__(self, value: ir.Value) -> ir.Value:
        if value in self.memo:
            return self.memo[value]
        node = value.producer()
        if node is None:  # graph input or initializer that does not depend on the sources
            return value
        if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()):
            raise InputError(f"cannot rewire node {node.name} ({node.op_type}): it has subgraphs.")
        inputs = [self(v) if v is not None else None for v in node.inputs]
        clone = ir.Node(
            node.domain,
            node.op_type,
            inputs,
            attributes=list(node.attributes.values()),
            num_outputs=len(node.outputs),
            name=f"{self.b.prefix}/clone/{node.name}",
        )
        self.b.graph.append(clone)
        self.cloned += 1
        for old, new in zip(node.outputs, clone.outputs, strict=True):
            self.memo[old] = new
        return self.memo[value]


def _new_input(graph: ir.Graph, name: str, dtype: ir.DataType, dims: Sequence[int | str]) -> ir.Value:
    value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(list(dims)))
    graph.inputs.append(value)
    return value


def _guidance(b: Builder, query, key, lengths, text_index, text_valid, *, groups: int, head_dim: int) -> ir.Value:
    """xi [B, S] fp32 as method/guidance.text_guidance (softmax over queries).

    query [B, Hq, S, d] and key [B, Hkv, S, d]: the layer's post-RoPE projections.
    """
    q = b.op("Cast", [query], {"to": FLOAT})
    k = b.op("Cast", [key], {"to": FLOAT})
    shape_q = b.op("Shape", [q])  # [4]: B, Hq, S, d
    split = b.op(
        "Concat",
        [
            b.op("Slice", [shape_q, b.ints([0]), b.ints([1])]),
            b.ints([-1, groups]),
            b.op("Slice", [shape_q, b.ints([2]), b.ints([4])]),
        ],
        {"axis": 0},
    )
    q = b.op("Reshape", [q, split])  # [B, Hkv, G, S, d]
    # Gather the text keys: index [B, T] -> [B, Hkv, T, d].
    idx = b.op("Unsqueeze", [text_index, b.ints([1, 3])])  # [B, 1, T, 1]
    shape_k = b.op("Shape", [k])  # [4]
    shape_t = b.op("Shape", [text_index])  # [2]
    target = b.op(
        "Concat",
        [
            b.op("Slice", [shape_k, b.ints([0]), b.ints([2])]),
            b.op("Slice", [shape_t, b.ints([1]), b.ints([2])]),
            b.op("Slice", [shape_k, b.ints([3]), b.ints([4])]),
        ],
        {"axis": 0},
    )  # [B, Hkv, T, d]
    k_text = b.op("GatherElements", [k, b.op("Expand", [idx, target])], {"axis": 2})  # [B, Hkv, T, d]
    k_text = b.op("Unsqueeze", [b.op("Transpose", [k_text], {"perm": [0, 1, 3, 2]}), b.ints([2])])  # [B, Hkv, 1, d, T]
    logits = b.op("Mul", [b.op("MatMul", [q, k_text]), b.f32(head_dim**-0.5)])  # [B, Hkv, G, S, T]

    seq = b.op("Shape", [q], {"start": 3, "end": 4})  # [1]
    pos = b.op("Range", [b.op("Squeeze", [b.ints([0])]), b.op("Squeeze", [seq]), b.op("Squeeze", [b.ints([1])])])
    query_ok = b.op("Less", [b.op("Unsqueeze", [pos, b.ints([0])]), b.op("Unsqueeze", [lengths, b.ints([1])])])
    query_ok = b.op("Unsqueeze", [query_ok, b.ints([1, 2, 4])])  # [B, 1, 1, S, 1]
    key_ok = b.op("Unsqueeze", [text_valid, b.ints([1, 2, 3])])  # [B, 1, 1, 1, T]
    masked = b.op("Where", [query_ok, logits, b.f32(float("-inf"))])
    probs = b.op("Softmax", [masked], {"axis": 3})  # over queries
    probs = b.op("Where", [b.op("And", [query_ok, key_ok]), probs, b.f32(0.0)])
    return b.op("ReduceSum", [probs, b.ints([1, 2, 4])], {"keepdims": 0})  # [B, S]


def _reordered(b: Builder, order: ir.Value, hidden: ir.Value, xi: ir.Value) -> tuple[ir.Value, ir.Value]:
    """hidden [B, S, D] and xi [B, S] gathered by order [B, S] along the sequence."""
    index = b.op("Expand", [b.op("Unsqueeze", [order, b.ints([2])]), b.op("Shape", [hidden])])  # [B, S, D]
    return b.op("GatherElements", [hidden, index], {"axis": 1}), b.op("GatherElements", [xi, order], {"axis": 1})


def _kept_in_input_order(b: Builder, order: ir.Value, kept: ir.Value, name: str) -> ir.Value:
    """kept [B, S'] of the reordered input as indices into the input before the reordering (-1 stays -1)."""
    zero = b.i64(0)
    source = b.op("GatherElements", [order, b.op("Max", [kept, zero])], {"axis": 1})  # [B, S']
    return b.multi("Where", [b.op("Less", [kept, zero]), kept, source], num_outputs=1, names=[name])[0]


def insert_lightkv(
    model: onnx.ModelProto,
    schedule: Schedule,
    *,
    positions: PositionMode = "preserve",
    grid_mode: str = "true",
    reorder: bool = False,
) -> tuple[onnx.ModelProto, PassReport]:
    """The vanilla prefill with one LightKV stage per scheduled layer (a new model; the input is not modified).
    reorder: take each stage's order input (grids with inline fixed tokens, module docstring); recorded in the
    engine metadata."""
    if positions not in ("preserve", "official"):
        raise InputError(f"positions must be 'preserve' or 'official', got {positions!r}.")
    meta = role_meta(model, "prefill")
    if schedule.num_layers != meta["num_layers"]:
        raise InputError(f"schedule is for {schedule.num_layers} layers, the graph has {meta['num_layers']}.")

    irm = ir.serde.deserialize_model(model)
    graph = irm.graph
    values = {v.name: v for v in graph.inputs}
    values.update({v.name: v for node in graph for v in node.outputs})
    # The values that carry the sequence: positions, lengths, and the hidden states whose Shape gives S.
    state = {"pos": values[meta["position_ids"]], "len": values[meta["lengths"]], "seq": values[INPUTS_EMBEDS]}
    scheme = SCHEMES[meta["position_scheme"]]
    cloned = guidance_nodes = 0
    seq_dims: list[str] = []

    for k, stage in enumerate(schedule.stages):
        b = Builder(graph, f"lightkv_{k}")
        names = stage_input_names(k)
        win_index = _new_input(graph, names["win_index"], INT64, [f"W_{k}", f"n_max_{k}"])
        win_r = _new_input(graph, names["win_r"], INT64, [f"W_{k}"])
        out_lengths = _new_input(graph, names["out_lengths"], INT64, ["batch"])
        text_index = _new_input(graph, names["text_index"], INT64, ["batch", f"T_{k}"])
        text_valid = _new_input(graph, names["text_valid"], BOOL, ["batch", f"T_{k}"])
        order = _new_input(graph, names[ORDER], INT64, ["batch", f"S_in_{k}"]) if reorder else None

        i = stage.layer - 1
        hidden, query, key = (values[meta[role][i]] for role in ("hidden", "query", "key"))
        before = b.count
        xi = _guidance(
            b, query, key, state["len"], text_index, text_valid,
            groups=meta["num_heads"] // meta["num_kv_heads"], head_dim=meta["head_dim"],
        )  # fmt: skip
        guidance_nodes += b.count - before
        uses = list(hidden.uses())  # before the reordering adds its own
        op_hidden, op_xi = _reordered(b, order, hidden, xi) if order is not None else (hidden, xi)
        kept_name = f"lightkv.{k}.kept_reordered" if order is not None else stage_kept_name(k)
        merged, kept, assign = b.multi(
            OP_NAME,
            [op_hidden, op_xi, win_index, win_r, state["len"], out_lengths],
            node_attributes(windows=stage.windows, ratio=stage.ratio, grid_mode=grid_mode),
            num_outputs=3,
            domain=OP_DOMAIN,
            names=[f"lightkv.{k}.hidden", kept_name, stage_assign_name(k)],
        )
        if order is not None:
            kept = _kept_in_input_order(b, order, kept, stage_kept_name(k))
        for node, idx in uses:
            node.replace_input_with(idx, merged)

        new_pos = scheme.after_merge_onnx(b, state["pos"], kept, positions)  # [*lead, B, S']

        # Rewire: downstream nodes that read values derived from the positions, the lengths or the sequence's
        # shape (an exporter may take S for a later reshape from the input's Shape, as Llama's attention does)
        # get them recomputed from the survivors.
        downstream = _forward_nodes(merged)
        shapes = {n.outputs[0]: n for n in state["seq"].consumers() if n.op_type == "Shape"}
        derived = _forward_values([state["pos"], state["len"], *shapes])
        fresh = _forward_values([merged])
        substitute = {state["pos"]: new_pos, state["len"]: out_lengths}
        for value, node in shapes.items():
            attrs = {name: attr.value for name, attr in node.attributes.items()}  # start / end
            substitute[value] = b.op("Shape", [merged], attrs)
        cloner = _Cloner(b, substitute)
        for node in [n for n in graph if n in downstream]:  # graph order, not set order: reproducible graphs
            for idx, v in enumerate(node.inputs):
                if v is not None and v in derived and v not in fresh:
                    node.replace_input_with(idx, cloner(v))
        cloned += cloner.cloned
        graph.outputs.append(kept)
        kept.type, kept.shape = ir.TensorType(INT64), ir.Shape(["batch", f"S_{k}"])
        graph.outputs.append(assign)
        assign.type, assign.shape = ir.TensorType(INT64), ir.Shape([f"W_{k}", f"A_{k}"])
        seq_dims.append(f"S_{k}")
        state = {"pos": new_pos, "len": out_lengths, "seq": merged}

    _finish(irm, schedule, seq_dims)
    report = PassReport(stages=len(schedule.stages), cloned_nodes=cloned, guidance_nodes=guidance_nodes)
    out = ir.serde.serialize_model(irm)
    inserted = sum(1 for n in out.graph.node if n.domain == OP_DOMAIN and n.op_type == OP_NAME)
    if inserted != len(schedule.stages):
        raise AssertionError(f"inserted {inserted} LightKV stages, the schedule has {len(schedule.stages)}")
    set_engine_meta(out, schedule, positions=positions, grid_mode=grid_mode, reorder=reorder)
    return out, report


def set_engine_meta(
    model: onnx.ModelProto, schedule: Schedule, *, positions: str, grid_mode: str, reorder: bool = False
) -> None:
    """Record in the graph's metadata (ENGINE_META_KEY) what it was built for: each stage's layer, windows and ratio,
    the position and grid modes. The host's merge plan is made from the manifest's schedule, which the graph itself
    cannot see (the TensorRT plugins drop the windows and ratio): this record is what the manifest is checked
    against when an engine is loaded (integrity.py). `reorder` is recorded only where set (graphs taking each
    stage's order input), so every other engine's record is what it was."""
    record = {
        "schedule": str(schedule),
        "stages": [[s.layer, s.windows, s.ratio] for s in schedule.stages],
        "positions": positions,
        "grid_mode": grid_mode,
    }
    if reorder:
        record["reorder"] = True
    kept = [p for p in model.metadata_props if p.key != ENGINE_META_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=ENGINE_META_KEY, value=json.dumps(record))


def _finish(irm: ir.Model, schedule: Schedule, seq_dims: list[str]) -> None:
    """Drop the role outputs only this pass reads, clean up, declare the shorter present K / V and attach the
    LightKVMerge function. (The attention roles stay for the ort-cpu fusion; target writers strip the rest.)"""
    graph = irm.graph
    for out in [o for o in graph.outputs if o.name and o.name.startswith(ROLE_PREFIX)]:
        if is_attention_role(out.name):
            out.shape = ir.Shape([None] * len(out.shape)) if out.shape else None  # S' after a merge, not S
        else:
            graph.outputs.remove(out)
    # Values after a merge no longer have the prompt's length: let ONNX Runtime infer them afresh.
    for node in graph:
        if node.domain == OP_DOMAIN:
            for v in _forward_values(node.outputs):
                if not v.is_graph_output():
                    v.shape = None
    for out in graph.outputs:
        if out.name.startswith(PRESENT_PREFIX):
            layer = int(out.name.split(".")[1]) + 1
            group = sum(1 for s in schedule.stages if s.layer < layer)
            if group and out.shape is not None:
                dims = list(out.shape)
                dims[2] = seq_dims[group - 1]
                out.shape = ir.Shape(dims)
    common_passes.RemoveUnusedNodesPass()(irm)
    common_passes.TopologicalSortPass()(irm)
    common_passes.NameFixPass()(irm)
    opset = irm.opset_imports.get("", 18)
    function = ir.serde.deserialize_function(lightkv_function(opset))
    irm.functions[function.identifier()] = function
    irm.opset_imports[OP_DOMAIN] = OP_VERSION
