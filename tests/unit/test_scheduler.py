"""Continuous batching (lightkv_export/scheduler.py) on the tiny ort-cpu engines: requests of different images,
prompts and lengths joining a running batch mid-flight answer token for token what Engine.generate answers for
each alone; admission follows the KV budget; refusals and cancellation free what they hold."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lightkv_export.accounting.units import parse_budget
from lightkv_export.errors import InputError
from lightkv_export.runtime import Engine
from lightkv_export.scheduler import QueueFull, Scheduler, TextDeltas

PROMPTS = ["Describe the image.", "What is in the top left corner?", "Count the squares, then explain why."]


def picture(seed: int, size=(448, 336)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))  # [H, W, 3]


REQUESTS = [  # (images, prompt, max_new_tokens): one and two images of mixed sizes, each sized by the processor
    ([picture(0)], PROMPTS[0], 6),
    ([picture(1, (300, 200))], PROMPTS[1], 3),
    ([picture(2), picture(3, (196, 588))], PROMPTS[2], 8),
    ([picture(4, (640, 480))], PROMPTS[0], 1),
    ([picture(5)], PROMPTS[1], 5),
]


@pytest.fixture(scope="module")
def engines(builds):
    return {
        "lightkv": Engine.load(builds("tiny-qwen-vl", 0.55).engine_dirs["ort-cpu"]),
        "vanilla": Engine.load(builds("tiny-qwen-vl", None, vanilla=True).engine_dirs["ort-cpu"]),
    }


@pytest.mark.parametrize("kind", ["lightkv", "vanilla"])
def test_requests_joining_mid_flight_answer_as_alone(engines, kind):
    engine = engines[kind]
    alone = [engine.generate(images, prompt, max_new_tokens=n).token_ids for images, prompt, n in REQUESTS]
    scheduler = Scheduler(engine, kv_budget=1 << 30, max_batch=3)
    seqs = [scheduler.submit(*REQUESTS[0][:2], max_new_tokens=REQUESTS[0][2])]
    streamed: dict[int, list[int]] = {}
    batch_sizes, pending = [], list(REQUESTS[1:])
    while not scheduler.idle or pending:
        if pending and len(seqs) <= len(streamed):  # one more joins after each step: the batch is never fresh
            images, prompt, n = pending.pop(0)
            seqs.append(scheduler.submit(images, prompt, max_new_tokens=n))
        events = scheduler.step()
        batch_sizes.append(scheduler.in_flight)
        for e in events:
            streamed.setdefault(e.sequence.id, []).append(e.token)
    assert max(batch_sizes) >= 2  # requests ran side by side, joining a batch already decoding
    for seq, want in zip(seqs, alone, strict=True):
        assert seq.state == "finished" and seq.tokens == want and streamed[seq.id] == want
    # Each reservation comes from the request's own grids: images of other sizes hold other vision tokens.
    assert len({seq.vision_tokens for seq in seqs}) >= 3
    assert scheduler.reserved == 0 and len(scheduler.pool.free) == 3 and not scheduler.pool.lengths.any()


def test_admission_follows_the_kv_budget(engines):
    lightkv, vanilla = engines["lightkv"], engines["vanilla"]
    images, prompt, _ = REQUESTS[0]
    need = {k: Scheduler(e, kv_budget=1 << 30).submit(images, prompt, max_new_tokens=8).reserved_bytes
            for k, e in engines.items()}  # fmt: skip
    assert need["lightkv"] < need["vanilla"]  # merged layers hold fewer entries
    budget = 2 * need["vanilla"]  # exactly two vanilla requests
    counts = {}
    for kind, engine in (("vanilla", vanilla), ("lightkv", lightkv)):
        scheduler = Scheduler(engine, kv_budget=budget, max_batch=16)
        for _ in range(8):
            scheduler.submit(images, prompt, max_new_tokens=8)
        scheduler.step()
        counts[kind] = scheduler.in_flight
        assert scheduler.reserved <= budget
        scheduler.run()
    assert counts["vanilla"] == 2 and counts["lightkv"] == min(8, budget // need["lightkv"]) > 2


def test_a_request_larger_than_the_budget_is_refused_at_once(engines):
    scheduler = Scheduler(engines["vanilla"], kv_budget=64 << 10)
    with pytest.raises(InputError, match=r"more than the whole budget of 64\.0 KiB"):
        scheduler.submit(*REQUESTS[0][:2], max_new_tokens=4)
    assert scheduler.idle


def test_cancel_frees_the_row_and_the_reservation(engines):
    scheduler = Scheduler(engines["lightkv"], kv_budget=1 << 30, max_batch=2)
    first = scheduler.submit(*REQUESTS[0][:2], max_new_tokens=8)
    second = scheduler.submit(*REQUESTS[4][:2], max_new_tokens=5)
    scheduler.step()
    assert scheduler.in_flight == 2 and scheduler.reserved == first.reserved_bytes + second.reserved_bytes
    scheduler.cancel(first)
    assert first.state == "cancelled" and scheduler.reserved == second.reserved_bytes
    third = scheduler.submit(*REQUESTS[1][:2], max_new_tokens=3)  # takes the cancelled request's row
    scheduler.run()
    assert third.slot == first.slot and third.state == second.state == "finished"
    assert third.tokens == engines["lightkv"].generate(*REQUESTS[1][:2], max_new_tokens=3).token_ids


def test_the_queue_limit_refuses_and_old_waiters_expire(engines):
    scheduler = Scheduler(engines["vanilla"], kv_budget=1 << 30, max_batch=1, max_queue=1, max_queue_s=0.0)
    scheduler.submit(*REQUESTS[3][:2], max_new_tokens=1)
    with pytest.raises(QueueFull, match="retry later"):
        scheduler.submit(*REQUESTS[3][:2], max_new_tokens=1)
    events = scheduler.step()  # it waited longer than 0 s: refused before admission
    assert [(e.token, e.final, e.sequence.state) for e in events] == [(None, True, "refused")]
    assert "in the queue" in events[0].sequence.error and scheduler.idle


def test_unpooled_requests_answer_as_alone_and_report_generate_fields(engines):
    """Each running request with its own caches (the path of engines without in-place decode): same tokens, and
    the final result carries Engine.generate's fields."""
    engine = engines["lightkv"]
    scheduler = Scheduler(engine, kv_budget=1 << 30, max_batch=4, pooled=False)
    seqs = [scheduler.submit(images, prompt, max_new_tokens=n) for images, prompt, n in REQUESTS[:3]]
    scheduler.step()
    assert scheduler.in_flight == 3
    scheduler.run()
    for seq, (images, prompt, n) in zip(seqs, REQUESTS, strict=False):
        alone = engine.generate(images, prompt, max_new_tokens=n)
        got = seq.result(engine, scheduler.itemsize)
        assert seq.state == "finished" and got.token_ids == alone.token_ids and got.text == alone.text
        assert (got.kv_bytes, got.kv_lengths) == (alone.kv_bytes, alone.kv_lengths)
        assert got.vision_tokens_per_group == alone.vision_tokens_per_group and got.prefill_ms > 0
        stats = seq.stats()
        assert stats["kv_bytes_reserved"] == seq.reserved_bytes >= stats["kv_bytes_held"] > got.kv_bytes
    assert scheduler.reserved == 0 and len(scheduler.pool.free) == 4


class Chars:
    """A tokenizer whose tokens are UTF-8 bytes: a character can take several tokens."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_deltas_never_split_a_character():
    text = "naïve 日本"
    deltas = TextDeltas(Chars())
    pieces = [deltas.add(b) for b in text.encode()]
    assert "".join(pieces) + deltas.rest() == text
    assert all("\ufffd" not in p for p in pieces) and "" in pieces  # held back inside a character


def test_kv_budget_as_size_or_share():
    assert parse_budget("512MiB") == 512 << 20 and parse_budget("2GB") == 2 * 10**9
    assert parse_budget("50%", available=1000) == 500
    assert 0 < parse_budget("10%") < parse_budget("20%")  # of this machine's MemAvailable
    for bad in ("0%", "150%", "x%", "lots", "0MiB"):
        with pytest.raises(InputError, match=r"KV budget|memory size"):
            parse_budget(bad)
