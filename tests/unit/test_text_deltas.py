"""scheduler.TextDeltas with the tiny presets' real byte-level BPE tokenizer (issue 28: `rest()` returning "" survived
the whole suite): the streamed pieces plus the rest are the decode of all tokens, also when the stream stops inside
a multi-byte character, as a max_new_tokens limit can cut it."""

from __future__ import annotations

import pytest

from lightkv_export.scheduler import TextDeltas


@pytest.fixture(scope="module")
def tokenizer():
    from lightkv_export.models.tiny import build_tokenizer

    return build_tokenizer()


@pytest.mark.parametrize("text", ["naïve 日本", "a😀b", "日本語のテキスト"])
def test_pieces_and_rest_are_the_decode_of_every_prefix(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    cut_inside = 0
    for n in range(1, len(ids) + 1):  # the stream stopped after n tokens
        deltas = TextDeltas(tokenizer)
        pieces = [deltas.add(token) for token in ids[:n]]
        whole = tokenizer.decode(ids[:n], skip_special_tokens=True)
        assert "".join(pieces) + deltas.rest() == whole, n
        assert all("\ufffd" not in p for p in pieces)  # an incomplete character is never streamed
        cut_inside += whole.endswith("\ufffd")
    assert cut_inside > 0  # the text does cut characters with this tokenizer: the held-back piece is tested


def test_rest_is_the_held_back_piece_and_then_nothing(tokenizer):
    ids = tokenizer.encode("naïve 日本", add_special_tokens=False)
    cut = next(n for n in range(1, len(ids)) if tokenizer.decode(ids[:n]).endswith("\ufffd") and n > 6)
    deltas = TextDeltas(tokenizer)
    streamed = "".join(deltas.add(token) for token in ids[:cut])
    assert streamed == "naïve " and deltas.rest() == "\ufffd" and deltas.rest() == ""
