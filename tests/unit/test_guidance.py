"""Guidance against a brute-force computation that materialises the full S x S attention logits."""

from __future__ import annotations

import pytest
import torch

from lightkv_export.errors import InputError
from lightkv_export.method import guidance as guidance_mod
from lightkv_export.method.guidance import text_guidance


def brute_force(query, key, vision, valid, softmax_over):
    """Full [B, Hq, S, S] logits, softmax over the requested axis, vision rows x text columns, summed."""
    hq, hkv = query.shape[1], key.shape[1]
    k = key.repeat_interleave(hq // hkv, dim=1)  # [B, Hq, S, d]
    logits = query @ k.transpose(-1, -2) * query.shape[-1] ** -0.5  # [B, Hq, S, S]
    if softmax_over == "query":
        probs = logits.masked_fill(~valid[:, None, :, None], -torch.inf).softmax(dim=2)
    else:
        probs = logits.masked_fill(~valid[:, None, None, :], -torch.inf).softmax(dim=3)
    text_keys = (valid & ~vision)[:, None, None, :]  # [B, 1, 1, S]
    xi = (probs * text_keys).sum(dim=(1, 3))  # [B, S]
    return xi


def make(seed, bsz=2, hq=8, hkv=2, seq=40, dim=16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, hq, seq, dim, generator=g)
    k = torch.randn(bsz, hkv, seq, dim, generator=g)
    vision = torch.zeros(bsz, seq, dtype=torch.bool)
    vision[0, 5:25] = True
    vision[1, 2:12] = True
    vision[1, 20:33] = True
    return q, k, vision


@pytest.mark.parametrize("softmax_over", ["query", "key"])
def test_matches_full_matrix(softmax_over):
    q, k, vision = make(0)
    valid = torch.ones_like(vision)
    got = text_guidance(q, k, vision, softmax_over=softmax_over)
    want = brute_force(q, k, vision, valid, softmax_over)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("softmax_over", ["query", "key"])
def test_padding_is_excluded(softmax_over):
    q, k, vision = make(1)
    valid = torch.ones_like(vision)
    valid[1, 35:] = False
    got = text_guidance(q, k, vision, valid_mask=valid, softmax_over=softmax_over)
    want = brute_force(q, k, vision, valid, softmax_over)
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-6)


def test_key_softmax_streams_over_key_chunks(monkeypatch):
    q, k, vision = make(2, seq=50)
    monkeypatch.setattr(guidance_mod, "KEY_CHUNK", 7)  # several chunks, the last one partial
    got = text_guidance(q, k, vision, softmax_over="key")
    want = brute_force(q, k, vision, torch.ones_like(vision), "key")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def only_head(q: torch.Tensor, h: int) -> torch.Tensor:
    """q with every query head but `h` zeroed. A zero query's softmax is uniform whatever the keys (over the
    valid queries, or over all keys), so the other heads add a constant and xi isolates head h's own term."""
    out = torch.zeros_like(q)
    out[:, h] = q[:, h]
    return out


@pytest.mark.parametrize("softmax_over", ["query", "key"])
@pytest.mark.parametrize(("hq", "hkv"), [(6, 3), (8, 2), (6, 2)])
def test_gqa_query_heads_read_exactly_their_kv_head(softmax_over, hq, hkv):
    """Changing KV head j changes exactly the terms of query heads j*G .. (j+1)*G-1 (G = Hq / Hkv), and each query
    head's term is the single-head guidance of (that query head, KV head h // G)."""
    q, k, vision = make(3, hq=hq, hkv=hkv)
    group = hq // hkv
    seq = q.shape[2]
    n_text = (~vision).sum(dim=1, keepdim=True).float()  # [B, 1]
    others = (hq - 1) * n_text / seq  # the zeroed heads' uniform contribution at every position
    g = torch.Generator().manual_seed(30)
    changed = torch.zeros(hkv, hq, dtype=torch.bool)  # [KV head j, query head h]
    for h in range(hq):
        base = text_guidance(only_head(q, h), k, vision, softmax_over=softmax_over)
        single = text_guidance(q[:, h : h + 1], k[:, h // group : h // group + 1], vision, softmax_over=softmax_over)
        torch.testing.assert_close(base, single + others, rtol=1e-5, atol=1e-5)
        for j in range(hkv):
            k2 = k.clone()
            k2[:, j] = torch.randn(k2[:, j].shape, generator=g)
            moved = text_guidance(only_head(q, h), k2, vision, softmax_over=softmax_over)
            changed[j, h] = not torch.allclose(moved, base, rtol=0, atol=1e-5)
    want = torch.zeros(hkv, hq, dtype=torch.bool)
    for j in range(hkv):
        want[j, j * group : (j + 1) * group] = True
    assert torch.equal(changed, want), f"KV head -> query heads it changed:\n{changed.int()}"


def test_query_softmax_columns_sum_to_heads_times_text_keys():
    q, k, vision = make(4)
    xi = text_guidance(q, k, vision)
    n_text = (~vision).sum(dim=1).float()
    torch.testing.assert_close(xi.sum(dim=1), q.shape[1] * n_text)


def test_no_text_tokens_gives_zero_guidance():
    q, k, _ = make(5)
    xi = text_guidance(q, k, torch.ones(2, 40, dtype=torch.bool))
    assert torch.equal(xi, torch.zeros(2, 40))


def test_rejects_mismatched_heads():
    q, k, vision = make(6, hq=8, hkv=3)
    with pytest.raises(InputError, match="GQA"):
        text_guidance(q, k, vision)
