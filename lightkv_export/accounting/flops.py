"""FLOPs of the language model, vanilla vs LightKV, counted once here (conventions: lightkv_export.accounting).

One multiply-add = 2 FLOPs, matmuls only, each layer at the sequence length it sees (a SequenceTrace); LightKV's
guidance and merge overheads per stage; the LM head per `FlopConvention.lm_head`; decode in closed form.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lightkv_export.accounting.trace import SequenceTrace
from lightkv_export.models.family import ArchShape

LmHead = Literal["none", "last", "all"]


def attention_pairs(seq_q: int, seq_k: int, causal: bool) -> int:
    """Query-key pairs: all of them, or (causal, queries being the last seq_q of seq_k keys) the visible ones."""
    if not causal:
        return seq_q * seq_k
    past = seq_k - seq_q
    return seq_q * past + seq_q * (seq_q + 1) // 2


def layer_flops(shape: ArchShape, seq_q: int, seq_k: int | None = None, *, causal: bool = False) -> dict[str, int]:
    """One decoder layer: seq_q new tokens attending to seq_k keys (prefill: seq_k = seq_q)."""
    seq_k = seq_q if seq_k is None else seq_k
    d, q, kv, inter = shape.hidden, shape.heads * shape.head_dim, shape.kv_dim, shape.intermediate
    return {
        "qkvo": 2 * seq_q * d * (2 * q + 2 * kv),  # Q and O are D x (heads * head_dim): D x D only when they agree
        "attention": 2 * 2 * attention_pairs(seq_q, seq_k, causal) * shape.heads * shape.head_dim,
        "mlp": 2 * seq_q * 3 * d * inter,
    }


def guidance_flops(shape: ArchShape, seq_len: int, text_tokens: int) -> int:
    """S x T logits per query head (post-RoPE q.k of every token against the non-vision keys)."""
    return 2 * seq_len * text_tokens * shape.heads * shape.head_dim


def merge_flops(shape: ArchShape, similarity_pairs: int) -> int:
    """Cosine similarity of every A token with every B token of its window, n_a x n_b x D per window."""
    return 2 * similarity_pairs * shape.hidden


def lm_head_flops(shape: ArchShape, rows: int) -> int:
    return 2 * rows * shape.hidden * shape.vocab


@dataclass(frozen=True)
class FlopConvention:
    causal: bool = False
    lm_head: LmHead = "last"
    decode_tokens: int = 0

    def describe(self) -> str:
        attn = "causal (S(S+1)/2 pairs)" if self.causal else "full S x S"
        return f"multiply-add = 2 FLOPs, attention {attn}, LM head {self.lm_head}, {self.decode_tokens} decode tokens"


DEFAULT_CONVENTION = FlopConvention()  # full attention, the last position's LM head, no decode


def prefill_flops(shape: ArchShape, trace: SequenceTrace, convention: FlopConvention = DEFAULT_CONVENTION) -> dict:
    """FLOPs by component for the prefill of one traced request (LightKV overheads included when it has stages)."""
    total = {"qkvo": 0, "attention": 0, "mlp": 0}
    for seq in trace.seq_per_layer:
        for k, v in layer_flops(shape, seq, causal=convention.causal).items():
            total[k] += v
    rows = {"none": 0, "last": 1, "all": trace.seq_per_layer[-1]}[convention.lm_head]
    total["lm_head"] = lm_head_flops(shape, rows)
    total["guidance"] = sum(guidance_flops(shape, st.seq_in, trace.text) for st in trace.stages if st.ratio > 0)
    total["merge"] = sum(merge_flops(shape, st.similarity_pairs) for st in trace.stages)
    return total


def decode_flops(shape: ArchShape, trace: SequenceTrace, tokens: int, *, causal: bool = False) -> int:
    """`tokens` one-token steps; step t (0-based) attends to each layer's prefill cache plus t + 1 tokens.

    Closed form of summing `layer_flops(shape, 1, S_l + t + 1)` over steps and layers, plus one LM-head row per
    step (a single query sees every cached key, so causal or not makes no difference here).
    """
    del causal  # one query row: causal and full attention count the same pairs
    linear = sum(v for k, v in layer_flops(shape, 1, 1).items() if k != "attention")
    per_key = 2 * 2 * shape.heads * shape.head_dim  # QK^T and PV for one query-key pair
    keys = sum(tokens * seq + tokens * (tokens + 1) // 2 for seq in trace.seq_per_layer)
    return tokens * (len(trace.seq_per_layer) * linear + lm_head_flops(shape, 1)) + per_key * keys


def total_flops(shape: ArchShape, trace: SequenceTrace, convention: FlopConvention = DEFAULT_CONVENTION) -> int:
    pre = sum(prefill_flops(shape, trace, convention).values())
    return pre + decode_flops(shape, trace, convention.decode_tokens, causal=convention.causal)
