"""A toy decoder prefill graph written directly with onnx.helper, shaped like export.py's `export_prefill`.

The graph has the prefill contract (inputs_embeds [B, S, D], position_ids [3, B, S], lengths [B] -> logits [B, V]
at each row's last valid token and present.{i}.key / .value), the role outputs and the role metadata, so the
LightKV pass can be tested on a graph small enough to re-implement by hand (`reference_prefill`, in torch with the
reference merge between layers) and with none of torch.onnx's spelling.

Per layer (x [B, S, D]; H query heads, one KV head, head size d):
    q = rope(x Wq) [B, H, S, d], k = rope(x Wk) [B, 1, S, d], v = x Wv [B, 1, S, d]
    rope(t) = t * cos + (t R) * sin with R a fixed rotate-half matrix; cos / sin [B, 1, S, d]
    a = softmax(q k^T / sqrt(d) + causal) v, the causal mask built from x's own S (Shape -> Range -> LessOrEqual)
    x' = x + tanh(a Wo)
Rotary angles: theta [B, S, d] = position_ids^T [B, S, 3] @ F [3, d] (each M-RoPE section has its own
frequencies, so a wrong section shows up), then Cos / Sin.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from lightkv_export.contract import ROLE_META_KEY, ROLE_PREFIX
from lightkv_export.method.guidance import text_guidance
from lightkv_export.method.merge_plan import RequestPlan
from lightkv_export.method.reference import apply_plan
from lightkv_export.method.spans import VisionSpan

OPSET = 21


@dataclass(frozen=True)
class ToyConfig:
    layers: int = 3
    hidden: int = 16
    heads: int = 2  # query heads; one KV head, so every query head shares it (GQA groups = heads)
    head_dim: int = 8
    vocab: int = 11
    seed: int = 0


@dataclass(frozen=True)
class ToyWeights:
    wq: list[np.ndarray]  # per layer [D, H * d]
    wk: list[np.ndarray]  # [D, d]
    wv: list[np.ndarray]  # [D, d]
    wo: list[np.ndarray]  # [H * d, D]
    freqs: np.ndarray  # [3, d]
    rotate: np.ndarray  # [d, d]
    head: np.ndarray  # [D, V]


def toy_weights(cfg: ToyConfig) -> ToyWeights:
    rng = np.random.default_rng(cfg.seed)
    d, hd, h = cfg.hidden, cfg.head_dim, cfg.heads

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32)

    half = hd // 2
    rotate = np.zeros((hd, hd), dtype=np.float32)  # t R = [-t2, t1]
    rotate[half:, :half] = -np.eye(half)
    rotate[:half, half:] = np.eye(half)
    freqs = np.zeros((3, hd), dtype=np.float32)  # section k drives its own band of rotary channels
    bands = np.array_split(np.arange(half), 3)
    for k, band in enumerate(bands):
        f = 1.0 / (3.0 + 2.0 * k) ** (band / half)
        freqs[k, band], freqs[k, band + half] = f, f
    return ToyWeights(
        wq=[mat(d, h * hd) for _ in range(cfg.layers)],
        wk=[mat(d, hd) for _ in range(cfg.layers)],
        wv=[mat(d, hd) for _ in range(cfg.layers)],
        wo=[mat(h * hd, d) for _ in range(cfg.layers)],
        freqs=freqs,
        rotate=rotate,
        head=mat(d, cfg.vocab),
    )


class _Graph:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        self.count += 1
        name = out or f"{op_type.lower()}_{self.count}"
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=f"n{self.count}_{op_type}", **attrs))
        return name

    def const(self, value: np.ndarray, name: str) -> str:
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def ints(self, values: list[int], name: str) -> str:
        return self.const(np.asarray(values, dtype=np.int64), name)


def role_names(n: int) -> dict[str, list[str] | str]:
    return {
        "hidden": [f"{ROLE_PREFIX}hidden.{i}" for i in range(n)],
        "query": [f"{ROLE_PREFIX}query.{i}" for i in range(n)],
        "key": [f"present.{i}.key" for i in range(n)],
        "cos": f"{ROLE_PREFIX}cos",
        "sin": f"{ROLE_PREFIX}sin",
    }


def _layer(g: _Graph, cfg: ToyConfig, w: ToyWeights, i: int, x: str, cos: str, sin: str, roles: dict) -> str:
    h, hd = cfg.heads, cfg.head_dim
    split_q, split_kv = g.ints([0, 0, h, hd], f"l{i}.split_q"), g.ints([0, 0, 1, hd], f"l{i}.split_kv")
    perm = [0, 2, 1, 3]
    rot = g.const(w.rotate, f"l{i}.rotate")

    def rope(t: str, out: str) -> str:
        turned = g.op("MatMul", [t, rot])  # [B, h, S, d]
        return g.op("Add", [g.op("Mul", [t, cos]), g.op("Mul", [turned, sin])], out=out)

    q = g.op("Transpose", [g.op("Reshape", [g.op("MatMul", [x, g.const(w.wq[i], f"l{i}.wq")]), split_q])], perm=perm)
    k = g.op("Transpose", [g.op("Reshape", [g.op("MatMul", [x, g.const(w.wk[i], f"l{i}.wk")]), split_kv])], perm=perm)
    v = g.op("Reshape", [g.op("MatMul", [x, g.const(w.wv[i], f"l{i}.wv")]), split_kv])  # [B, S, 1, d]
    q = rope(q, roles["query"][i])  # [B, H, S, d] post-RoPE
    k = rope(k, roles["key"][i])  # [B, 1, S, d] = present.{i}.key
    v = g.op("Transpose", [v], out=f"present.{i}.value", perm=perm)  # [B, 1, S, d]

    # Causal mask from this layer's own input length: after a merge it is S', with no help from the pass.
    seq = g.op("Squeeze", [g.op("Shape", [x], start=1, end=2)])  # scalar S
    pos = g.op(
        "Range", [g.const(np.array(0, np.int64), f"l{i}.zero"), seq, g.const(np.array(1, np.int64), f"l{i}.one")]
    )
    col = g.op("Unsqueeze", [pos, g.ints([0], f"l{i}.ax0")])  # [1, S] key index
    row = g.op("Unsqueeze", [pos, g.ints([1], f"l{i}.ax1")])  # [S, 1] query index
    visible = g.op("LessOrEqual", [col, row])  # [S, S]
    scores = g.op(
        "Mul",
        [
            g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])]),
            g.const(np.array(hd**-0.5, np.float32), f"l{i}.scale"),
        ],
    )
    scores = g.op("Where", [visible, scores, g.const(np.array(-np.inf, np.float32), f"l{i}.ninf")])  # [B, H, S, S]
    att = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])  # [B, H, S, d]
    merged = g.op("Reshape", [g.op("Transpose", [att], perm=perm), g.ints([0, 0, h * hd], f"l{i}.merge_heads")])
    update = g.op("Tanh", [g.op("MatMul", [merged, g.const(w.wo[i], f"l{i}.wo")])])  # [B, S, D]
    return g.op("Add", [x, update], out=roles["hidden"][i])  # [B, S, D]


def toy_prefill(cfg: ToyConfig = ToyConfig(), *, with_roles: bool = True) -> onnx.ModelProto:
    """The toy decoder's prefill graph, with role outputs and metadata as export.export_prefill records them."""
    w = toy_weights(cfg)
    g = _Graph()
    n, roles = cfg.layers, role_names(cfg.layers)
    # Rotary tables [B, 1, S, d] from position_ids [3, B, S].
    pos_f = g.op("Transpose", [g.op("Cast", ["position_ids"], to=TensorProto.FLOAT)], perm=[1, 2, 0])  # [B, S, 3]
    theta = g.op("MatMul", [pos_f, g.const(w.freqs, "rope.freqs")])  # [B, S, d]
    cos = g.op("Cos", [theta], out=roles["cos"])
    sin = g.op("Sin", [theta], out=roles["sin"])
    cos4 = g.op("Unsqueeze", [cos, g.ints([1], "rope.ax")])  # [B, 1, S, d]
    sin4 = g.op("Unsqueeze", [sin, "rope.ax"])

    x = "inputs_embeds"
    for i in range(n):
        x = _layer(g, cfg, w, i, x, cos4, sin4, roles)

    # Last valid token of each row: GatherElements at lengths - 1.
    last = g.op("Max", [g.op("Sub", ["lengths", g.ints([1], "one")]), g.ints([0], "zero")])  # [B]
    idx = g.op("Unsqueeze", [last, g.ints([1, 2], "ax12")])  # [B, 1, 1]
    shape = g.op(
        "Concat",
        [g.op("Shape", [x], start=0, end=1), g.ints([1], "one_dim"), g.op("Shape", [x], start=2, end=3)],
        axis=0,
    )
    final = g.op("GatherElements", [x, g.op("Expand", [idx, shape])], axis=1)  # [B, 1, D]
    final = g.op("Squeeze", [final, g.ints([1], "ax1")])  # [B, D]
    g.op("MatMul", [final, g.const(w.head, "lm_head")], out="logits")  # [B, V]

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [
        helper.make_tensor_value_info("inputs_embeds", f32, ["batch", "seq", cfg.hidden]),
        helper.make_tensor_value_info("position_ids", i64, [3, "batch", "seq"]),
        helper.make_tensor_value_info("lengths", i64, ["batch"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch", cfg.vocab])]
    for i in range(n):
        for kv in ("key", "value"):
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kv}", f32, ["batch", 1, "seq", cfg.head_dim]))
    if with_roles:
        outputs += [
            helper.make_tensor_value_info(roles[r], f32, ["batch", "seq", cfg.head_dim]) for r in ("cos", "sin")
        ]
        for i in range(n):
            outputs.append(helper.make_tensor_value_info(roles["hidden"][i], f32, ["batch", "seq", cfg.hidden]))
            outputs.append(
                helper.make_tensor_value_info(roles["query"][i], f32, ["batch", cfg.heads, "seq", cfg.head_dim])
            )
    graph = helper.make_graph(g.nodes, "toy_prefill", inputs, outputs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="micrograph")
    if with_roles:
        meta = {
            "num_layers": n,
            **role_names(n),
            "position_ids": "position_ids",
            "position_scheme": "mrope",  # the micro-graph's position_ids are [3, B, S]
            "lengths": "lengths",
            "num_heads": cfg.heads,
            "num_kv_heads": 1,
            "head_dim": cfg.head_dim,
            "scaling": cfg.head_dim**-0.5,
        }
        helper.set_model_props(model, {ROLE_META_KEY: json.dumps(meta)})
    onnx.checker.check_model(model, full_check=True)
    return model


# --- the same decoder by hand, with the reference merge between layers -------------------------------------------


@dataclass
class ToyOutputs:
    logits: torch.Tensor  # [B, V]
    keys: list[torch.Tensor]  # per layer [B, 1, S_l, d]
    values: list[torch.Tensor]
    kept: list[torch.Tensor]  # per stage [B, S'_k]
    positions: list[torch.Tensor]  # per layer, the [3, B, S_l] position ids it saw
    lengths: list[tuple[int, ...]]  # per layer, valid tokens per row


def _rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotate: torch.Tensor) -> torch.Tensor:
    return t * cos + (t @ rotate) * sin


def reference_prefill(
    cfg: ToyConfig,
    embeds: torch.Tensor,
    position_ids: torch.Tensor,
    lengths: list[int],
    spans: list[list[VisionSpan]],
    stage_layers: list[int],
    plan: RequestPlan | None,
    *,
    positions: str = "preserve",
) -> ToyOutputs:
    """The toy decoder in torch; after layer stage_layers[k] (1-based) the reference stage plan.stages[k] runs."""
    w = toy_weights(cfg)
    wt = {name: [torch.from_numpy(m) for m in getattr(w, name)] for name in ("wq", "wk", "wv", "wo")}
    freqs, rotate, head = (torch.from_numpy(a) for a in (w.freqs, w.rotate, w.head))
    x, pos, cur_len, cur_spans = embeds.float(), position_ids, tuple(lengths), spans
    out = ToyOutputs(torch.empty(0), [], [], [], [], [])
    bsz = x.shape[0]
    for i in range(cfg.layers):
        theta = pos.permute(1, 2, 0).float() @ freqs  # [B, S, d]
        cos, sin = theta.cos()[:, None], theta.sin()[:, None]  # [B, 1, S, d]
        seq = x.shape[1]
        q = _rope((x @ wt["wq"][i]).view(bsz, seq, cfg.heads, cfg.head_dim).transpose(1, 2), cos, sin, rotate)
        k = _rope((x @ wt["wk"][i]).view(bsz, seq, 1, cfg.head_dim).transpose(1, 2), cos, sin, rotate)
        v = (x @ wt["wv"][i]).view(bsz, seq, 1, cfg.head_dim).transpose(1, 2)  # [B, 1, S, d]
        scores = q @ k.transpose(-1, -2) * cfg.head_dim**-0.5  # [B, H, S, S]
        causal = torch.ones(seq, seq, dtype=torch.bool).tril()
        att = scores.masked_fill(~causal, -torch.inf).softmax(-1) @ v  # [B, H, S, d]
        x = x + torch.tanh(att.transpose(1, 2).reshape(bsz, seq, -1) @ wt["wo"][i])  # [B, S, D]
        out.keys.append(k)
        out.values.append(v)
        out.positions.append(pos)
        out.lengths.append(cur_len)
        if plan is not None and (i + 1) in stage_layers:
            stage = plan.stages[stage_layers.index(i + 1)]
            vision = torch.zeros(bsz, seq, dtype=torch.bool)
            for b, row in enumerate(cur_spans):
                for span in row:
                    vision[b, span.start : span.end] = True
            valid = torch.arange(seq)[None] < torch.tensor(cur_len)[:, None]  # [B, S]
            xi = text_guidance(q, k, vision, valid_mask=valid)  # [B, S]
            res = apply_plan(x, xi, stage)
            x, cur_len, cur_spans = res.hidden, stage.out_lengths, stage.spans
            out.kept.append(res.kept)
            if positions == "preserve":
                pos = pos.gather(2, res.kept.clamp(min=0)[None].expand(3, -1, -1))  # [3, B, S']
            else:
                pos = torch.arange(x.shape[1]).view(1, 1, -1).expand(3, bsz, -1)  # [3, B, S']
    last = torch.tensor(cur_len) - 1  # [B]
    out.logits = x[torch.arange(bsz), last] @ head  # [B, V]
    return out
