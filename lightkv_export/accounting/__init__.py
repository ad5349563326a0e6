"""Accounting: KV-cache bytes, Eq. 9 retention and FLOPs, vanilla vs LightKV, from shapes alone (no weights).

Conventions (every number this package produces follows them):
* FLOPs: one multiply-add = 2 FLOPs. Matmuls only (norms, RoPE, softmax, activations and residual adds are
  O(S * D) and left out). Language model only: the vision encoder is the same for both variants.
* Attention: QK^T and PV each cost 2 * S_q * S_k * head_dim per query head. `causal=False` (default) counts
  the full S x S product, as dense kernels compute it; `causal=True` counts only the S (S + 1) / 2 pairs a
  causal kernel needs.
* Per layer: Q/K/V/O projections 2 * S * D * (2 D + 2 Hkv d), gated MLP 3 matmuls 2 * S * 3 * D * I, at the
  sequence length that layer sees (after the stages merged before it).
* LightKV overheads per stage: guidance, the S x T logits of every query head against the T non-vision keys
  (2 * S * T * d per head), and the merge similarity, n_a x n_b x D per window (2 FLOPs each).
* LM head: `lm_head="last"` (default) counts only the last prefill position (what generation needs); "all"
  counts every position (HF without logits_to_keep), "none" leaves it out.
* Decode: N generated tokens, each a one-token pass over every layer attending to that layer's cache plus the
  tokens generated so far, and one LM-head row.
* KV bytes: K and V, [B, Hkv, S_l, d] each per layer, in the cache dtype (counted by lightkv_export.kv). GB = 1e9
  bytes, GiB = 2^30.

Modules, bottom up: units (dtypes, memory sizes), trace (a request's token layout and the sequence length each
layer sees under a schedule), flops, planner (one request, vanilla vs LightKV, against a memory budget), engine (a
built engine's reference request, from its manifest) and paper (the paper's reported figures, recomputed).
"""
