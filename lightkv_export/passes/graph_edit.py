"""What every graph pass builds with: a node builder over an onnx-ir graph, and the exporter's role metadata."""

from __future__ import annotations

import json
from collections.abc import Sequence

import onnx
import onnx_ir as ir

from lightkv_export.contract import ROLE_META_KEY
from lightkv_export.errors import InputError


def role_meta(model: onnx.ModelProto, graph: str) -> dict:
    """The sizes and role names the exporter recorded in a graph's metadata (export.py)."""
    props = {p.key: p.value for p in model.metadata_props}
    if ROLE_META_KEY not in props:
        raise InputError(
            f"this ONNX model has no LightKV role metadata: it must be a {graph} graph from export.py (an export "
            "from an older version: build again with --force so that the model is exported afresh)."
        )
    return json.loads(props[ROLE_META_KEY])


class Builder:
    """Appends nodes to the graph; constants are small initializers."""

    def __init__(self, graph: ir.Graph, prefix: str) -> None:
        self.graph, self.prefix, self.count = graph, prefix, 0

    def op(self, op_type: str, inputs: Sequence[ir.Value | None], attrs: dict | None = None, **kw) -> ir.Value:
        return self.multi(op_type, inputs, attrs, num_outputs=1, **kw)[0]

    def multi(self, op_type, inputs, attrs=None, *, num_outputs: int, domain: str = "", names=None) -> list[ir.Value]:
        self.count += 1
        outputs = [ir.Value(name=n) for n in names] if names else None
        node = ir.Node(
            domain,
            op_type,
            inputs,
            attributes=ir.convenience.convert_attributes(attrs or {}),
            num_outputs=None if outputs else num_outputs,
            outputs=outputs,
            name=f"{self.prefix}/{op_type}_{self.count}",
        )
        self.graph.append(node)
        return list(node.outputs)

    def ints(self, values: Sequence[int]) -> ir.Value:
        return self.op("Constant", [], {"value_ints": list(values)})

    def i64(self, value: int) -> ir.Value:
        """A scalar int64."""
        return self.op("Constant", [], {"value_int": int(value)})

    def f32(self, value: float) -> ir.Value:
        return self.op("Constant", [], {"value_float": float(value)})
