"""Text guidance xi: how much each vision token matters to the prompt, from one layer's attention logits.

xi_s = sum over heads h and non-vision keys t of P_h[s, t], where the logits are the unmasked, scaled
q_s . k_t of that layer's post-RoPE queries and keys (GQA: each KV head serves its group of query heads).

Normalisation (`softmax_over`):
* "query" (default, the released code, which produced the published numbers): for each head and key t,
  a softmax over every valid query s. Its normaliser is a column reduction of the S x T product itself,
  so the cost is one [S, T] matrix per head, never [S, S].
* "key" (the paper's equation): for each query s, a softmax over all S valid keys, of which only the
  non-vision ones are summed. The row normaliser needs every key, so it is accumulated over key chunks
  (a streaming logsumexp): memory stays O(S x chunk) per head.

The layer's own attention is unaffected: it stays causal and fused; this is a separate, small product.
"""

from __future__ import annotations

from typing import Literal

import torch

from lightkv_export.errors import InputError

SoftmaxAxis = Literal["query", "key"]
KEY_CHUNK = 1024


def gather_positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx [B, T], valid [B, T]): positions where mask [B, S] is True, ascending, padded with 0 / False."""
    count = mask.sum(dim=1)  # [B]
    t_max = int(count.max()) if mask.numel() else 0
    idx = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :t_max]  # [B, T]
    valid = torch.arange(t_max, device=mask.device).unsqueeze(0) < count.unsqueeze(1)  # [B, T]
    return idx, valid


def text_guidance(
    query: torch.Tensor,
    key: torch.Tensor,
    vision_mask: torch.Tensor,
    *,
    valid_mask: torch.Tensor | None = None,
    scale: float | None = None,
    softmax_over: SoftmaxAxis = "query",
    text_positions: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """xi [B, S] fp32 from post-RoPE query [B, Hq, S, d] and key [B, Hkv, S, d].

    vision_mask [B, S]: True at vision tokens. valid_mask [B, S]: False at padding (default: all valid).
    text_positions: (idx [B, T], valid [B, T]) of the valid non-vision tokens when the caller has them from the
    layout (merge_plan.text_positions); else they are gathered here, which waits for the device (T = a max).
    Values at non-vision and padded positions are computed but carry no meaning.
    """
    bsz, hq, seq, dim = query.shape
    hkv = key.shape[1]
    if key.shape != (bsz, hkv, seq, dim) or hq % hkv:
        raise InputError(f"query {tuple(query.shape)} and key {tuple(key.shape)} are not a GQA pair.")
    if softmax_over not in ("query", "key"):
        raise InputError(f"softmax_over must be 'query' or 'key', got {softmax_over!r}.")
    scale = dim**-0.5 if scale is None else scale
    valid = torch.ones_like(vision_mask) if valid_mask is None else valid_mask
    q = query.float().reshape(bsz, hkv, hq // hkv, seq, dim)  # [B, Hkv, G, S, d]
    k = key.float()  # [B, Hkv, S, d]

    text_idx, text_valid = text_positions or gather_positions(valid & ~vision_mask)  # [B, T]
    k_text = k.gather(2, text_idx[:, None, :, None].expand(-1, hkv, -1, dim))  # [B, Hkv, T, d]
    logits = torch.einsum("bhgsd,bhtd->bhgst", q, k_text) * scale  # [B, Hkv, G, S, T]
    query_ok = valid[:, None, None, :, None]  # [B, 1, 1, S, 1]
    key_ok = text_valid[:, None, None, None, :]  # [B, 1, 1, 1, T]

    if softmax_over == "query":
        probs = torch.softmax(logits.masked_fill(~query_ok, -torch.inf), dim=3)  # [B, Hkv, G, S, T]
    else:
        lse = row_logsumexp(q, k, valid, scale)  # [B, Hkv, G, S]
        probs = torch.exp(logits - lse.unsqueeze(-1))  # [B, Hkv, G, S, T]
    probs = probs.masked_fill(~(query_ok & key_ok), 0.0)
    return probs.sum(dim=(1, 2, 4))  # [B, S]


def row_logsumexp(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, scale: float) -> torch.Tensor:
    """logsumexp over all valid keys for every query, streamed over key chunks: [B, Hkv, G, S]."""
    out = torch.full(q.shape[:-1], -torch.inf, device=q.device)  # [B, Hkv, G, S]
    for start in range(0, k.shape[2], KEY_CHUNK):
        k_blk = k[:, :, start : start + KEY_CHUNK]  # [B, Hkv, C, d]
        blk = torch.einsum("bhgsd,bhcd->bhgsc", q, k_blk) * scale  # [B, Hkv, G, S, C]
        ok = valid[:, None, None, None, start : start + KEY_CHUNK]  # [B, 1, 1, 1, C]
        out = torch.logaddexp(out, torch.logsumexp(blk.masked_fill(~ok, -torch.inf), dim=-1))
    return out
