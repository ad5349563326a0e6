"""Graph transform (ort-cpu only): RMSNorm, and the residual add before it, as ONNX Runtime's fused kernels.

The exporter spells each RMSNorm as Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul (seven passes over the
activations) and the residual add before it as one more. The rules are onnxscript's ORT fusions (the ones
onnxruntime's transformer optimizer applies to dynamo exports), not hand-written patterns:
RMSNorm -> SimplifiedLayerNormalization, Add + SimplifiedLayerNormalization -> SkipSimplifiedLayerNormalization
(com.microsoft), which also returns the sum the next residual needs (where shape inference can prove the shapes
match: after a LightKV merge the sequence length is a run-time value, and fewer adds fold). The graph's
structure changes only there:
external weights stay references, LightKV's nodes and every graph input and output stay as they are.
TensorRT keeps the standard graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import onnx_ir as ir
from onnx_ir.passes import common as common_passes
from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization


@dataclass(frozen=True)
class NormFusions:
    rms_norms: int  # RMSNorm chains replaced (each then SimplifiedLayerNormalization or its Skip form)
    skip_norms: int  # of those, fused with the residual add before them


def fuse_norms(model: onnx.ModelProto) -> tuple[onnx.ModelProto, NormFusions]:
    """`model` with its RMSNorms fused for ONNX Runtime; counts of what was fused."""
    irm = ir.serde.deserialize_model(model)
    # The rules check dtypes, which values after a LightKV merge no longer declare: infer them (weights stay
    # references; if inference fails the graph is left as it is and fewer norms are fused).
    common_passes.ShapeInferencePass()(irm)
    rms = fuse_rms_normalization(irm)
    skip = fuse_skip_rms_normalization(irm)
    common_passes.RemoveUnusedNodesPass()(irm)
    irm.opset_imports.setdefault("com.microsoft", 1)
    return ir.serde.serialize_model(irm), NormFusions(rms_norms=rms, skip_norms=skip)
