"""LightKVMerge as an ONNX local function: one stage of `reference.apply_plan` in standard ONNX ops only.

ONNX Runtime inlines the function, so a graph holding a LightKVMerge node runs on any ORT build with no native
extension; TensorRT later swaps the node for the plugin named by its attributes. The body follows
`reference.py` step for step (read it first); the comments here say how each rule maps onto ONNX ops.

Signature (inputs in order; B batch rows, S tokens, D hidden size, W windows, n_max tokens per window):

* hidden      [B, S, D]   float / float16 / bfloat16 (similarity and merge run in fp32, results cast back)
* guidance    [B, S]      float32, the xi weights
* win_index   [W, n_max]  int64, flat b * S + s of each window's tokens in raster order, -1 padded (W may be 0)
* win_r       [W]         int64, tokens merged away per window
* lengths     [B]         int64, valid input tokens per row
* out_lengths [B]         int64, valid output tokens per row (from the host plan); S' = max(out_lengths)

Outputs: hidden_out [B, S', D] (hidden's dtype, zero at padding), kept [B, S'] int64 (-1 at padding) and
assign [W, na] int64, na = ceil(n_max / 2): the B slot each merged A slot went to, -1 where it stays (reference.py's
`assign`; the TensorRT plan kernel's `assign` output, so a lowered graph exposes the same). Parity reads it to tell
a partner chosen at a near-tie from a wrong one.

Tensors of the hidden dtype only ever go through Gather, Concat and Cast, which ONNX Runtime's CPU provider
implements for every dtype (bfloat16 included), and untouched tokens are copied bit for bit: the output is one
Gather from the table [original tokens; merged tokens; a zero row]. The node's attributes (windows, ratio,
grid_mode and the plugin identity) are declared by the function but unused by its body: the plan inputs
already encode them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from lightkv_export.method.layout import OP_DOMAIN, OP_NAME, OP_VERSION, StagePlan
from lightkv_export.method.reference import COS_EPS

# Standard opset of the function body. Every op it uses has had the same semantics since opset 18 (ScatterND
# with reduction, ReduceMax/ReduceL2 with axes as an input), so `lightkv_function(opset=...)` may match the
# host model's opset anywhere in 18..ONNX Runtime's maximum.
OPSET = 21
MIN_OPSET = 18

INPUTS = ("hidden", "guidance", "win_index", "win_r", "lengths", "out_lengths")
OUTPUTS = ("hidden_out", "kept", "assign")
ATTRIBUTES = ("windows", "ratio", "grid_mode", "plugin_name", "plugin_namespace", "plugin_version")

_INT64_MAX = 2**63 - 1
_WEIGHT_FLOOR = 1e-30  # reference: wsum.clamp_min(1e-30), only reached where the plain mean is taken instead


class _Body:
    """Collects the function's nodes; every value gets a readable, unique name."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._names: set[str] = set(INPUTS)  # the outputs are claimed by the nodes that name them first

    def _fresh(self, hint: str) -> str:
        name, k = hint, 1
        while name in self._names:
            k += 1
            name = f"{hint}_{k}"
        self._names.add(name)
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs: object) -> str:
        """One node with a single output (named `out`, or after the op) and returns that output's name."""
        return self.multi(op_type, *inputs, outs=[out or op_type.lower()], **attrs)[0]

    def multi(self, op_type: str, *inputs: str, outs: Sequence[str], **attrs: object) -> list[str]:
        """One node with several outputs; an empty name in `outs` leaves that optional output unused."""
        names = [self._fresh(o) if o else "" for o in outs]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=f"{op_type}_{len(self.nodes)}", **attrs))
        return names

    def ints(self, values: Sequence[int], out: str = "const") -> str:
        return self.op("Constant", out=out, value_ints=list(values))  # 1-D int64

    def i64(self, value: int, out: str = "const") -> str:
        return self.op("Constant", out=out, value_int=value)  # int64 scalar

    def f32(self, value: float, out: str = "const") -> str:
        return self.op("Constant", out=out, value_float=value)  # float32 scalar

    def zeros(self, shape: str, dtype: int, out: str) -> str:
        return self.op("ConstantOfShape", shape, out=out, value=helper.make_tensor("zero", dtype, [1], [0]))

    def arange(self, stop: str, out: str) -> str:
        """[0, stop) as int64 from a [1]-shaped or scalar int64 `stop`."""
        scalar = self.op("Squeeze", stop, out=f"{out}_stop")  # Range wants scalars
        return self.op("Range", self.i64(0), scalar, self.i64(1), out=out)

    def unsqueeze(self, x: str, axis: int, out: str) -> str:
        return self.op("Unsqueeze", x, self.ints([axis]), out=out)

    def to_float(self, x: str, out: str) -> str:
        return self.op("Cast", x, out=out, to=TensorProto.FLOAT)


def _pad_plan(g: _Body) -> tuple[str, str]:
    """Append a dummy window (r = 0) and two padding columns, so no dimension below is ever empty.

    W = 0 (every image skipped, or ratio 0) then needs no special case: the dummy window merges nothing and
    the stage reduces to compaction. Two columns keep the A/B parity of the real ones and give each set one more.
    """
    win = g.op("Pad", "win_index", g.ints([0, 0, 1, 2]), g.i64(-1), out="win")  # [W+1, n_max+2]
    win_r = g.op("Pad", "win_r", g.ints([0, 1]), g.i64(0), out="r")  # [W+1]
    return win, win_r


def _match(g: _Body, flat: str, win: str, win_r: str) -> tuple[str, str]:
    """Bipartite matching in every window at once (reference.match_windows). Returns (src [M], dst [M])."""
    a_idx = g.op("Slice", win, g.ints([0]), g.ints([_INT64_MAX]), g.ints([1]), g.ints([2]), out="a_idx")  # [W, na]
    b_idx = g.op("Slice", win, g.ints([1]), g.ints([_INT64_MAX]), g.ints([1]), g.ints([2]), out="b_idx")  # [W, nb]
    zero = g.i64(0, out="zero")
    a_ok = g.op("GreaterOrEqual", a_idx, zero, out="a_ok")  # [W, na]
    b_ok = g.op("GreaterOrEqual", b_idx, zero, out="b_ok")  # [W, nb]

    # Gather in the hidden dtype first, then cast: only window tokens are ever converted to fp32.
    xa = g.to_float(g.op("Gather", flat, g.op("Max", a_idx, zero), out="xa_raw"), out="xa")  # [W, na, D]
    xb = g.to_float(g.op("Gather", flat, g.op("Max", b_idx, zero), out="xb_raw"), out="xb")  # [W, nb, D]

    # sim = a.b / (|a| |b| + eps), -inf wherever either side is padding.
    dots = g.op("MatMul", xa, g.op("Transpose", xb, perm=[0, 2, 1], out="xb_t"), out="dots")  # [W, na, nb]
    norm_a = g.op("ReduceL2", xa, g.ints([2]), keepdims=1, out="norm_a")  # [W, na, 1]
    norm_b = g.unsqueeze(g.op("ReduceL2", xb, g.ints([2]), keepdims=0), 1, out="norm_b")  # [W, 1, nb]
    denom = g.op("Add", g.op("Mul", norm_a, norm_b), g.f32(COS_EPS), out="sim_denom")  # [W, na, nb]
    valid = g.op("And", g.unsqueeze(a_ok, 2, "a_ok3"), g.unsqueeze(b_ok, 1, "b_ok3"), out="pair_ok")  # [W, na, nb]
    neg_inf = g.f32(-math.inf, out="neg_inf")
    sim = g.op("Where", valid, g.op("Div", dots, denom), neg_inf, out="sim")  # [W, na, nb]

    # Best partner: ArgMax keeps the first maximum, i.e. the lowest B position on ties.
    partner = g.op("ArgMax", sim, axis=2, keepdims=0, select_last_index=0, out="partner")  # [W, na]
    best = g.op("ReduceMax", sim, g.ints([2]), keepdims=0, out="best_raw")  # [W, na]
    best = g.op("Where", a_ok, best, neg_inf, out="best")  # [W, na]

    # Stable descending ranking: TopK breaks ties by the lower index, as torch.sort(stable=True) does.
    na = g.op("Shape", a_idx, start=1, end=2, out="na")  # [1]
    _, order = g.multi("TopK", best, na, outs=["order_value", "order"], axis=1, largest=1, sorted=1)  # [W, na]
    # The first r entries of `order` merge: scatter "slot < r" back to the A positions (rank < r).
    slot = g.unsqueeze(g.arange(na, out="slot"), 0, out="slot_row")  # [1, na]
    top = g.op("Cast", g.op("Less", slot, g.unsqueeze(win_r, 1, "r_col")), to=TensorProto.INT64, out="top")
    rank_hit = g.op("ScatterElements", g.zeros(g.op("Shape", order), TensorProto.INT64, "no_hit"), order, top, axis=1)
    merged = g.op("And", g.op("Cast", rank_hit, to=TensorProto.BOOL), a_ok, out="merged")  # [W, na]
    # The assignment output: partner slot or -1, without _pad_plan's extra window and column.
    assign = g.op("Where", merged, partner, g.i64(-1), out="assign_padded")  # [W + 1, na + 1]
    n_win = g.op("Shape", "win_index", start=0, end=1, out="n_win")  # [1]
    n_max = g.op("Shape", "win_index", start=1, end=2, out="n_max")  # [1]
    na_real = g.op("Div", g.op("Add", n_max, g.ints([1])), g.ints([2]), out="na_real")  # [1] ceil(n_max / 2)
    ends = g.op("Concat", n_win, na_real, axis=0, out="assign_ends")
    g.op("Slice", assign, g.ints([0, 0]), ends, g.ints([0, 1]), out="assign")  # [W, na]

    flat_shape = g.ints([-1])
    merged = g.op("Reshape", merged, flat_shape, out="merged_flat")  # [W * na]
    dst_all = g.op("GatherElements", b_idx, partner, axis=1, out="dst_all")  # [W, na]
    src = g.op("Compress", g.op("Reshape", a_idx, flat_shape), merged, axis=0, out="src")  # [M]
    dst = g.op("Compress", g.op("Reshape", dst_all, flat_shape), merged, axis=0, out="dst")  # [M]
    return src, dst


def _weighted_merge(g: _Body, flat: str, xi: str, src: str, dst: str) -> tuple[str, str]:
    """Guidance-weighted mean of every touched B token (reference.weighted_merge). Returns (touched [K], value [K, D]).

    Unique gives the touched B tokens (sorted), each merge's slot among them and the merge count per slot, so
    the sums run over [K, D] rather than the whole [N, D]. ScatterND adds in index order, like index_add_.
    """
    touched, _, slot, count = g.multi("Unique", dst, outs=["touched", "", "touched_slot", "touched_count"], sorted=1)
    slot = g.unsqueeze(slot, 1, "touched_slot_col")  # [M, 1]
    xs = g.to_float(g.op("Gather", flat, src, out="xs_raw"), out="xs")  # [M, D]
    xi_s = g.op("Gather", xi, src, out="xi_s")  # [M]
    xt = g.to_float(g.op("Gather", flat, touched, out="xt_raw"), out="xt")  # [K, D]
    xi_t = g.op("Gather", xi, touched, out="xi_t")  # [K]
    zeros_kd = g.zeros(g.op("Shape", xt), TensorProto.FLOAT, "zeros_kd")  # [K, D]
    zeros_k = g.zeros(g.op("Shape", xi_t), TensorProto.FLOAT, "zeros_k")  # [K]

    contrib = g.op("Mul", g.unsqueeze(xi_s, 1, "xi_s_col"), xs, out="contrib")  # [M, D]
    num = g.op("ScatterND", zeros_kd, slot, contrib, reduction="add", out="num")  # [K, D]
    den = g.op("ScatterND", zeros_k, slot, xi_s, reduction="add", out="den")  # [K]
    sum_x = g.op("ScatterND", zeros_kd, slot, xs, reduction="add", out="sum_x")  # [K, D]

    wsum = g.op("Add", xi_t, den, out="wsum")  # [K]
    own = g.op("Mul", g.unsqueeze(xi_t, 1, "xi_t_col"), xt, out="own")  # [K, D]
    floor = g.unsqueeze(g.op("Max", wsum, g.f32(_WEIGHT_FLOOR)), 1, "wsum_col")  # [K, 1]
    weighted = g.op("Div", g.op("Add", own, num), floor, out="weighted")  # [K, D]
    # No positive weight at all (e.g. zero guidance): the plain mean of b and its A tokens.
    n_merged = g.op("Add", g.to_float(count, out="count_f"), g.f32(1.0), out="n_merged")  # [K]
    plain = g.op("Div", g.op("Add", xt, sum_x), g.unsqueeze(n_merged, 1, "n_merged_col"), out="plain")  # [K, D]
    positive = g.unsqueeze(g.op("Greater", wsum, g.f32(0.0)), 1, "wsum_positive")  # [K, 1]
    return touched, g.op("Where", positive, weighted, plain, out="merged_value")  # [K, D]


def _compact(g: _Body, seq: str, n_tok: str, src: str) -> tuple[str, str]:
    """Order-preserving compaction (reference.compact). Returns (kept [B, S'], flat source b*S+s [B, S'])."""
    bsz = g.op("Shape", "lengths", out="bsz")  # [1]
    pos = g.arange(seq, out="pos")  # [S]
    keep = g.op("Less", g.unsqueeze(pos, 0, "pos_row"), g.unsqueeze("lengths", 1, "lengths_col"), out="in_row")
    keep = g.op("Cast", g.op("Reshape", keep, n_tok), to=TensorProto.INT64, out="keep_in")  # [N]
    gone = g.zeros(g.op("Shape", src), TensorProto.INT64, "gone")  # [M]
    keep = g.op("ScatterND", keep, g.unsqueeze(src, 1, "src_col"), gone, out="keep_flat")  # [N] merged A leave
    keep = g.op("Reshape", keep, g.op("Concat", bsz, seq, axis=0), out="keep")  # [B, S]

    # Distinct keys, so the order cannot depend on TopK's tie rule: survivors score S + (S-1-s) >= S, the rest
    # S-1-s < S; the top S' keys are the survivors in ascending s.
    last = g.op("Sub", seq, g.ints([1]), out="last")  # [1]
    key = g.op("Add", g.op("Mul", keep, seq), g.op("Sub", last, pos), out="key")  # [B, S]
    out_len = g.op("ReduceMax", "out_lengths", g.ints([0]), keepdims=1, out="out_len")  # [1]
    _, order = g.multi("TopK", key, out_len, outs=["survivor_key", "survivor"], axis=1, largest=1, sorted=1)  # [B, S']
    count = g.op("ReduceSum", keep, g.ints([1]), keepdims=1, out="count")  # [B, 1]
    valid = g.op("Less", g.unsqueeze(g.arange(out_len, out="out_pos"), 0, "out_pos_row"), count, out="valid")
    kept = g.op("Where", valid, order, g.i64(-1), out="kept")  # [B, S']
    row_base = g.op("Mul", g.unsqueeze(g.arange(bsz, out="rows"), 1, "rows_col"), seq, out="row_base")  # [B, 1]
    source = g.op("Where", valid, g.op("Add", row_base, order), g.i64(-1), out="source")  # [B, S'], -1 padding
    return kept, source


def _build_body(g: _Body) -> None:
    seq = g.op("Shape", "hidden", start=1, end=2, out="seq")  # [1]
    dim = g.op("Shape", "hidden", start=2, end=3, out="dim")  # [1]
    n_tok = g.op("Mul", g.op("Shape", "hidden", start=0, end=1, out="batch"), seq, out="n_tok")  # [1]
    flat = g.op("Reshape", "hidden", g.op("Concat", n_tok, dim, axis=0), out="flat")  # [N, D] hidden dtype
    xi = g.op("Reshape", "guidance", n_tok, out="xi")  # [N] fp32

    win, win_r = _pad_plan(g)
    src, dst = _match(g, flat, win, win_r)
    touched, value = _weighted_merge(g, flat, xi, src, dst)
    _, source = _compact(g, seq, n_tok, src)

    # One table of rows in the hidden dtype: [original tokens N; merged B tokens K; one zero row for padding].
    k_tok = g.op("Shape", touched, out="k_tok")  # [1]
    zero_row = g.zeros(g.op("Concat", g.ints([1]), dim, axis=0), TensorProto.FLOAT, "zero_row")  # [1, D]
    table = g.op(
        "Concat", flat, g.op("CastLike", value, "hidden"), g.op("CastLike", zero_row, "hidden"), axis=0, out="table"
    )  # [N + K + 1, D]
    # row_of[t] = where token t's final value lives in `table`: itself, or N + k for the k-th touched B token.
    merged_rows = g.op("Add", g.arange(k_tok, out="k_range"), n_tok, out="merged_rows")  # [K]
    row_of = g.op("ScatterND", g.arange(n_tok, out="tok_range"), g.unsqueeze(touched, 1, "touched_col"), merged_rows)
    pad_row = g.op("Add", n_tok, k_tok, out="pad_row")  # [1]
    rows = g.op("Gather", row_of, g.op("Max", source, g.i64(0)), out="rows_raw")  # [B, S']
    rows = g.op("Where", g.op("GreaterOrEqual", source, g.i64(0)), rows, pad_row, out="out_rows")  # [B, S']
    g.op("Gather", table, rows, out="hidden_out")  # [B, S', D]


def lightkv_function(opset: int = OPSET) -> onnx.FunctionProto:
    """The LightKVMerge FunctionProto (domain OP_DOMAIN, name OP_NAME), body in standard opset `opset`."""
    if opset < MIN_OPSET:
        raise ValueError(f"LightKVMerge needs standard opset >= {MIN_OPSET} (ScatterND reduction), got {opset}.")
    g = _Body()
    _build_body(g)
    return helper.make_function(
        OP_DOMAIN,
        OP_NAME,
        list(INPUTS),
        list(OUTPUTS),
        g.nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=list(ATTRIBUTES),
        doc_string="One LightKV merge stage; see lightkv_export/method/reference.py for the rules.",
    )


def node_attributes(*, windows: int, ratio: float, grid_mode: str) -> dict[str, int | float | str]:
    """A LightKVMerge node's attributes: informational for ONNX runtimes, the TensorRT plugin's identity."""
    return {
        "windows": int(windows),
        "ratio": float(ratio),
        "grid_mode": str(grid_mode),
        "plugin_name": OP_NAME,
        "plugin_namespace": OP_DOMAIN,
        "plugin_version": str(OP_VERSION),
    }


def make_node(
    inputs: Sequence[str], outputs: Sequence[str], *, windows: int, ratio: float, grid_mode: str, name: str
) -> onnx.NodeProto:
    """A LightKVMerge node (NodeProto form, for hand-built graphs)."""
    attrs = node_attributes(windows=windows, ratio=ratio, grid_mode=grid_mode)
    return helper.make_node(OP_NAME, list(inputs), list(outputs), name=name, domain=OP_DOMAIN, **attrs)


def standalone_model(
    dtype: int = TensorProto.FLOAT,
    *,
    windows: int = 2,
    ratio: float = 0.5,
    grid_mode: str = "true",
    opset: int = OPSET,
) -> onnx.ModelProto:
    """A model that is a single LightKVMerge node (symbolic dims), the function attached in `model.functions`.

    dtype: ONNX element type of hidden / hidden_out (TensorProto.FLOAT, FLOAT16 or BFLOAT16).
    """
    i64 = TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("hidden", dtype, ["B", "S", "D"]),
        helper.make_tensor_value_info("guidance", TensorProto.FLOAT, ["B", "S"]),
        helper.make_tensor_value_info("win_index", i64, ["W", "n_max"]),
        helper.make_tensor_value_info("win_r", i64, ["W"]),
        helper.make_tensor_value_info("lengths", i64, ["B"]),
        helper.make_tensor_value_info("out_lengths", i64, ["B"]),
    ]
    outputs = [
        helper.make_tensor_value_info("hidden_out", dtype, ["B", "S_out", "D"]),
        helper.make_tensor_value_info("kept", i64, ["B", "S_out"]),
        helper.make_tensor_value_info("assign", i64, ["W", "n_a"]),
    ]
    node = make_node(INPUTS, OUTPUTS, windows=windows, ratio=ratio, grid_mode=grid_mode, name="lightkv_merge")
    graph = helper.make_graph([node], "lightkv_merge", inputs, outputs)
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(OP_DOMAIN, OP_VERSION)],
        functions=[lightkv_function(opset)],
        producer_name="lightkv_export",
    )


def plan_feeds(plan: StagePlan) -> dict[str, np.ndarray]:
    """The plan's index inputs (win_index, win_r, lengths, out_lengths) as int64 arrays."""
    return {
        "win_index": np.asarray(plan.win_index, dtype=np.int64),  # [W, n_max], W may be 0
        "win_r": np.asarray(plan.win_r, dtype=np.int64).reshape(-1),
        "lengths": np.asarray(plan.lengths, dtype=np.int64).reshape(plan.batch),
        "out_lengths": np.asarray(plan.out_lengths, dtype=np.int64).reshape(plan.batch),
    }


# torch dtype -> (ONNX element type, numpy dtype ORT reads and writes it as). bfloat16 travels as raw uint16 bits.
_ORT_DTYPES: dict[torch.dtype, tuple[int, type[np.generic]]] = {
    torch.float32: (TensorProto.FLOAT, np.float32),
    torch.float16: (TensorProto.FLOAT16, np.float16),
    torch.bfloat16: (TensorProto.BFLOAT16, np.uint16),
}


@cache
def _session(dtype: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    model = standalone_model(dtype).SerializeToString()
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run_ort(hidden: torch.Tensor, guidance: torch.Tensor, plan: StagePlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one planned stage through ONNX Runtime (CPU): returns (hidden_out [B, S', D], kept [B, S'] int64)."""
    out, kept, _ = run_ort_assign(hidden, guidance, plan)
    return out, kept


def run_ort_assign(
    hidden: torch.Tensor, guidance: torch.Tensor, plan: StagePlan
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """run_ort, plus the assign output [W, na] int64.

    The hidden output is bound to a preallocated buffer (S' is known from the plan): ORT cannot hand bfloat16 back
    as numpy, so the buffer holds raw bits in the dtype numpy can carry.
    """
    if hidden.dtype not in _ORT_DTYPES:
        raise TypeError(f"hidden dtype {hidden.dtype} is not one of {', '.join(map(str, _ORT_DTYPES))}.")
    onnx_type, np_type = _ORT_DTYPES[hidden.dtype]
    bits = hidden.detach().cpu().contiguous()
    if hidden.dtype == torch.bfloat16:
        bits = bits.view(torch.int16)
    session = _session(onnx_type)
    binding = session.io_binding()
    binding.bind_ortvalue_input(
        "hidden", ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits.numpy().view(np_type), onnx_type)
    )
    binding.bind_cpu_input("guidance", guidance.detach().cpu().to(torch.float32).contiguous().numpy())
    for name, value in plan_feeds(plan).items():
        binding.bind_cpu_input(name, value)
    out = np.zeros((plan.batch, plan.out_seq_len, hidden.shape[2]), dtype=np_type)  # [B, S', D]
    binding.bind_ortvalue_output("hidden_out", ort.OrtValue.ortvalue_from_numpy_with_onnx_type(out, onnx_type))
    binding.bind_output("kept")
    binding.bind_output("assign")
    session.run_with_iobinding(binding)
    produced = binding.get_outputs()
    kept = np.array(produced[1].numpy())  # [B, S'] int64
    assign = np.array(produced[2].numpy())  # [W, na] int64
    result = torch.from_numpy(out)
    if hidden.dtype == torch.bfloat16:
        result = result.view(torch.int16).view(torch.bfloat16)
    return result, torch.from_numpy(kept), torch.from_numpy(assign)
