"""The runtime's generation loop (runtime.Engine) over recording stub sessions: no engine build, no ONNX Runtime.

The stubs implement the Session protocol the way the real graphs do (prefill returns per-layer caches whose lengths
follow the merge plan it is fed; decode grows every cache by one), and record every feed. That lets these tests
check what the loop hands the graphs, fast: decode positions continue from each row's *uncompressed* length plus its
M-RoPE offset, whatever LightKV removed, and every layer's decode mask covers exactly that row's valid entries.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lightkv_export.method.merge_plan import layer_lengths, plan_request, stage_input_names, stage_kept_name
from lightkv_export.method.schedule import parse_schedule
from lightkv_export.method.spans import VisionSpan
from lightkv_export.models.positions import MROPE
from lightkv_export.runtime import Engine, Request
from tests.helpers import make_manifest

LAYERS, HKV, HEAD_DIM, DIM, VOCAB = 6, 2, 4, 8, 32
SCHEDULE = "2:2:0.5,4:1:0.5"  # two stages that each really remove tokens from the images below


class Recording:
    """A Session: returns what `respond(feeds)` computes for the declared outputs, and records every feed."""

    def __init__(self, outputs: list[str], respond):
        self.names, self.respond, self.feeds = outputs, respond, []

    def get_outputs(self):
        return [SimpleNamespace(name=n) for n in self.names]

    def run(self, output_names, feeds):
        self.feeds.append({k: np.array(v, copy=True) for k, v in feeds.items()})
        out = self.respond(feeds)
        return [out[n] for n in (output_names or self.names)]


def stub_sessions(schedule) -> dict[str, Recording]:
    n_stages = len(schedule.stages)
    kv = [f"present.{i}.{kind}" for i in range(LAYERS) for kind in ("key", "value")]

    def embed(feeds):
        ids = feeds["input_ids"]
        return {"embeds": np.zeros((*ids.shape, DIM), dtype=np.float32)}

    def prefill(feeds):
        lengths = feeds["lengths"]
        batch = len(lengths)
        outs = [feeds[stage_input_names(k)["out_lengths"]] for k in range(n_stages)]
        plan = SimpleNamespace(stages=[SimpleNamespace(out_lengths=o) for o in outs])
        valid = layer_lengths(schedule, plan, lengths)  # [L, B]: what the transformed graph caches per layer
        out = {"logits": np.zeros((batch, VOCAB), dtype=np.float32)}
        out["logits"][:, 5] = 1.0
        for i in range(LAYERS):
            shape = (batch, HKV, int(valid[i].max()), HEAD_DIM)
            out[f"present.{i}.key"] = out[f"present.{i}.value"] = np.zeros(shape, dtype=np.float32)
        for k in range(n_stages):
            out[stage_kept_name(k)] = np.zeros((batch, int(outs[k].max())), dtype=np.int64)
        return out

    def decode(feeds):
        batch = feeds["inputs_embeds"].shape[0]
        out = {"logits": np.zeros((batch, VOCAB), dtype=np.float32)}
        out["logits"][:, 7] = 1.0
        for i in range(LAYERS):
            for kind in ("key", "value"):
                past = feeds[f"past.{i}.{kind}"]
                out[f"present.{i}.{kind}"] = np.concatenate([past, past[:, :, :1]], axis=2)
        return out

    return {
        "embed": Recording(["embeds"], embed),
        "prefill": Recording(["logits", *kv, *(stage_kept_name(k) for k in range(n_stages))], prefill),
        "decode": Recording(["logits", *kv], decode),
        "vision": Recording(["vision"], lambda feeds: {}),
    }


def make_request(seq_len: int, spans: list[VisionSpan]) -> Request:
    positions, delta = MROPE.host(seq_len, spans)
    ids = np.arange(seq_len, dtype=np.int64)[None] % VOCAB
    return Request(ids, np.zeros((1, seq_len, DIM), dtype=np.float32), positions[:, None, :], delta, [spans])


# Rows of different lengths, image layouts and M-RoPE offsets (decode_offset), each compressed by the schedule.
REQUESTS = {
    "one-image": make_request(60, [VisionSpan(5, 48, (6, 8))]),
    "two-images": make_request(120, [VisionSpan(3, 64, (8, 8)), VisionSpan(70, 40, (5, 8))]),
    "small": make_request(45, [VisionSpan(2, 36, (6, 6))]),
}


@pytest.fixture
def engine():
    schedule = parse_schedule(SCHEDULE, LAYERS)
    manifest = make_manifest(
        family="qwen2_5_vl", num_layers=LAYERS, schedule=SCHEDULE, image_size=[56, 56], grid_mode="true",
        positions="preserve", max_new_tokens_limit=64, eos_token_ids=[],
    )  # fmt: skip
    processor = SimpleNamespace(tokenizer=SimpleNamespace(decode=lambda ids, **kwargs: " ".join(map(str, ids))))
    eng = Engine(Path("stub-engine"), manifest, stub_sessions(schedule), processor)
    eng.prepare = lambda images, prompt: REQUESTS[prompt]  # host preprocessing is not what is under test
    eng.check_request = lambda images, prompt, max_new_tokens: max_new_tokens  # nor the request checks
    return eng


def expected_valid(engine: Engine, names: list[str]) -> np.ndarray:
    rows = [REQUESTS[n] for n in names]
    plan = plan_request([r.spans[0] for r in rows], [r.seq_len for r in rows], engine.schedule)
    return layer_lengths(engine.schedule, plan, [r.seq_len for r in rows])  # [L, B]


@pytest.mark.parametrize("names", [["one-image"], ["one-image", "two-images", "small"]], ids=["single", "batch"])
def test_decode_positions_continue_from_the_uncompressed_length(engine, names):
    steps = 6
    gens = engine.generate_batch([([None], n) for n in names], max_new_tokens=steps)
    rows = [REQUESTS[n] for n in names]
    valid = expected_valid(engine, names)
    # The premise: LightKV really shrank every row's later layers, by different amounts per row.
    assert all(valid[-1, b] < r.seq_len for b, r in enumerate(rows))
    assert all(g.kv_lengths == valid[:, b].tolist() for b, g in enumerate(gens))
    if len(rows) > 1:
        assert len({r.seq_len for r in rows}) == len(rows) and len({r.decode_offset for r in rows}) == len(rows)
    assert all(r.decode_offset != 0 for r in rows)

    decode_feeds = engine.sessions["decode"].feeds
    assert len(decode_feeds) == steps - 1  # the first token comes from prefill's logits
    want_start = np.asarray([r.seq_len + r.decode_offset for r in rows])
    for step, feeds in enumerate(decode_feeds):
        pos = feeds["position_ids"]
        assert pos.shape == (3, len(rows), 1) and pos.dtype == np.int64
        for section in range(3):  # text tokens: all three M-RoPE sections equal
            np.testing.assert_array_equal(pos[section, :, 0], want_start + step, err_msg=f"step {step}")
        # Each layer's cache and mask: the row's valid KV entries after prefill, plus one per decoded token.
        for i in range(LAYERS):
            mask = feeds[f"past_mask.{i}"]
            assert feeds[f"past.{i}.key"].shape == (len(rows), HKV, valid[i].max() + step, HEAD_DIM)
            for b in range(len(rows)):
                np.testing.assert_array_equal(mask[b, : valid[i, b]], 1)
                assert mask[b].sum() == valid[i, b] + step, (step, i, b)
    assert [g.token_ids for g in gens] == [[5] + [7] * (steps - 1)] * len(rows)


def test_decode_positions_match_the_vanilla_continuation():
    """What the offset means: the first decode position is one past the largest prompt position (M-RoPE), so the
    generated text continues where the uncompressed prompt ended."""
    for r in REQUESTS.values():
        assert r.seq_len + r.decode_offset == int(r.position_ids.max()) + 1


def test_the_runtime_and_the_merge_plan_import_no_torch():
    """The generation loop and the host merge plan (method/layout.py) are numpy: a process that only runs engines
    does not pay for PyTorch on their account (an engine's whole request path: tests/families/test_conformance.py)."""
    import subprocess
    import sys

    code = (
        "import sys, lightkv_export.runtime, lightkv_export.method.merge_plan, lightkv_export.targets.ort, "
        "lightkv_export.host; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
