"""runtime.BufferCache and MaskedCache driven directly (issue 28: their off-by-one mutants survived every unit test
and were caught only through whole builds): small arrays with per-layer and per-row lengths, fake decode sessions
that do what the graphs do, and every entry checked after the prefill and after each step."""

from __future__ import annotations

import numpy as np
import pytest

from lightkv_export import contract
from lightkv_export.runtime import BufferCache, MaskedCache, PrefillOutputs

B, H, D = 2, 2, 3
SIZES = [5, 3, 2]  # per layer: LightKV's later layers hold fewer entries
VALID = np.array([[5, 4], [3, 3], [2, 1]])  # [L, B]: row 1 is shorter (padding) in layers 0 and 2
STEPS = 3


def prefill(valid: np.ndarray = VALID, dtype=np.float16) -> PrefillOutputs:
    """Keys numbered by (layer, row, head, entry, dim) so that any misplaced copy shows; values their negatives."""
    keys = [(1000 * i + np.arange(B * H * s * D).reshape(B, H, s, D) + 1).astype(dtype) for i, s in enumerate(SIZES)]
    values = [-k for k in keys]
    return PrefillOutputs(
        logits=np.zeros((B, 7), np.float32), keys=keys, values=values, kept=[], plan=None, valid=valid
    )


def token_entry(step: int, layer: int, row: int, kind: str) -> float:
    return (1 if kind == "key" else -1) * (0.5 + 100 * step + 10 * layer + row)


class InPlaceDecode:
    """What the fused decode graph does: write the new token's K and V at each row's past length, in the buffers
    it was given (the aliased outputs), and return logits."""

    def __init__(self, cache: BufferCache) -> None:
        self.cache, self.step = cache, 0

    def run_in_place(self, output_names, feeds, buffers, aliases):
        for i, key in enumerate(self.cache.keys):
            lengths = feeds[contract.past_length(i)]
            assert lengths.dtype == np.int32 and lengths.tolist() == self.cache.lengths[i].tolist()
            for kind, own in (("key", key), ("value", self.cache.values[i])):
                buffer = buffers[contract.past(i, kind)]
                assert buffer is own and aliases[contract.present(i, kind)] == contract.past(i, kind)
                for row, n in enumerate(lengths):
                    buffer[row, :, n] = token_entry(self.step, i, row, kind)  # IndexError past the capacity
        self.step += 1
        return [np.full((B, 7), self.step, np.float32) if n == contract.LOGITS else None for n in output_names]


def test_buffer_cache_from_prefill_copies_each_layer_into_its_own_capacity():
    pre = prefill()
    cache = BufferCache.from_prefill(pre, STEPS)
    assert cache.lengths.tolist() == VALID.tolist() and cache.lengths.dtype == np.int64
    for i, s in enumerate(SIZES):
        for got, want in ((cache.keys[i], pre.keys[i]), (cache.values[i], pre.values[i])):
            assert got.shape == (B, H, s + STEPS, D) and got.dtype == np.float16
            np.testing.assert_array_equal(got[:, :, :s], want)  # every prefill entry, padding included
            assert not got[:, :, s:].any()  # room for the steps, zero
            assert got is not want and not np.shares_memory(got, want)


def test_buffer_cache_lengths_never_exceed_the_prefill_entries():
    valid = VALID.copy()
    valid[1, 0] = SIZES[1] + 2  # a prefill that claims more valid entries than it returned
    assert BufferCache.from_prefill(prefill(valid), STEPS).lengths[:, 0].tolist() == [5, 3, 2]


def test_buffer_cache_steps_write_each_token_at_each_rows_length():
    pre = prefill()
    cache = BufferCache.from_prefill(pre, STEPS)
    session = InPlaceDecode(cache)
    names = [contract.LOGITS]
    for step in range(STEPS):
        logits = cache.step(session, names, {})
        assert logits.tolist() == np.full((B, 7), step + 1).tolist()
        assert cache.lengths.tolist() == (VALID + step + 1).tolist()
    for i in range(len(SIZES)):
        for kind, buffers, source in (("key", cache.keys, pre.keys), ("value", cache.values, pre.values)):
            for row in range(B):
                n = VALID[i, row]
                got = buffers[i][row].astype(np.float32)  # [H, capacity, D]
                np.testing.assert_array_equal(got[:, :n], source[i][row, :, :n])  # the prefill's entries stay
                for t in range(STEPS):
                    assert (got[:, n + t] == np.float16(token_entry(t, i, row, kind))).all(), (kind, i, row, t)
                assert not got[:, n + STEPS :].any()  # nothing written past the last token


def test_buffer_cache_refuses_a_step_past_its_capacity_and_not_before():
    cache = BufferCache.from_prefill(prefill(), STEPS)
    session = InPlaceDecode(cache)
    for _ in range(STEPS):  # exactly the budget fits: layer 0 row 0 fills its last entry on the last step
        cache.step(session, [contract.LOGITS], {})
    assert cache.lengths[0, 0] == cache.keys[0].shape[2]
    with pytest.raises(AssertionError, match="past the cache buffers' capacity"):
        cache.step(session, [contract.LOGITS], {})


class GrowingDecode:
    """What the standard decode graph does: each layer's cache comes back grown by the new token's entry."""

    def __init__(self) -> None:
        self.step, self.masks = 0, []

    def run(self, output_names, feeds):
        layers = len(SIZES)
        self.masks.append([feeds[contract.past_mask(i)].copy() for i in range(layers)])
        out = {contract.LOGITS: np.full((B, 7), self.step, np.float32)}
        for i in range(layers):
            for kind in contract.KV:
                past = feeds[contract.past(i, kind)]
                new = np.full((B, H, 1, D), token_entry(self.step, i, 0, kind), past.dtype)
                out[contract.present(i, kind)] = np.concatenate([past, new], axis=2)
        self.step += 1
        return [out[n] for n in output_names]


def test_masked_cache_masks_padding_per_layer_and_grows_by_one_entry_per_step():
    pre = prefill(dtype=np.float32)
    cache = MaskedCache.from_prefill(pre)
    for i, s in enumerate(SIZES):
        assert cache.masks[i].shape == (B, s) and cache.masks[i].dtype == np.int64
        assert cache.masks[i].tolist() == [[int(j < VALID[i, b]) for j in range(s)] for b in range(B)]
    assert cache.lengths.tolist() == VALID.tolist()
    session = GrowingDecode()
    names = [contract.LOGITS, *contract.presents(len(SIZES))]
    for step in range(STEPS):
        assert cache.step(session, names, {}).tolist() == np.full((B, 7), step).tolist()
        assert cache.lengths.tolist() == (VALID + step + 1).tolist()
    for i, s in enumerate(SIZES):
        assert cache.keys[i].shape == (B, H, s + STEPS, D) and cache.masks[i].shape == (B, s + STEPS)
        np.testing.assert_array_equal(cache.keys[i][:, :, :s], pre.keys[i])
        np.testing.assert_array_equal(cache.values[i][:, :, :s], pre.values[i])
        assert (cache.masks[i][:, s:] == 1).all()  # each new token's entry is real, in every row
        for t in range(STEPS):
            assert (cache.keys[i][:, :, s + t] == token_entry(t, i, 0, "key")).all()
        # The mask fed at step t: the prefill's padding plus t real entries.
        assert session.masks[STEPS - 1][i].tolist() == cache.masks[i][:, :-1].tolist()
