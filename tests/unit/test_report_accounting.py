"""A built engine's accounting (accounting.engine) and its report.md section (lightkv_export/report)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lightkv_export.artifacts import Manifest, ReferenceRequest
from lightkv_export.errors import InputError
from tests.helpers import make_manifest

# ---------------------------------------------------------------- a built engine's accounting (report.md)

# test_accounting.TOY's decoder (hidden 8, 2 heads of 4, 1 KV head, MLP 16, vocab 10), one 4x4-token image
# + 4 text tokens, one stage after layer 2 merging half of its single window: 16 -> 8 vision tokens. As
# pipeline.reference_request writes it for that schedule.
TOY_MANIFEST = make_manifest(
    model="toy",
    vanilla=False,
    schedule="2:1:0.5",
    retention=0.75,
    grid_mode="true",
    dtype="float32",
    num_layers=4,
    hidden_size=8,
    num_attention_heads=2,
    num_kv_heads=1,
    head_dim=4,
    intermediate_size=16,
    vocab_size=10,
    reference_request=ReferenceRequest(
        prompt="x",
        seq_len=20,
        vision_tokens=16,
        image_layouts=[[[4, 4]]],
        kv_lengths=[20, 20, 12, 12],
        vision_tokens_per_layer=[16, 16, 8, 8],
        kv_bytes_per_layer=[640, 640, 384, 384],
        kv_bytes_vanilla_per_layer=[640] * 4,
    ),
)


def test_engine_account_by_hand():
    from lightkv_export.accounting.engine import engine_account

    acc = engine_account(TOY_MANIFEST)
    # K + V, 1 KV head x 4, fp32: 32 bytes per token per layer
    assert acc.kv_bytes_vanilla == (640,) * 4 and acc.kv_bytes == (640, 640, 384, 384)
    assert acc.kv_bytes == tuple(TOY_MANIFEST.reference_request.kv_bytes_per_layer)
    assert acc.retention == (16 + 16 + 8 + 8) / (4 * 16)
    # per layer at S tokens: qkvo 2*S*8*(16 + 8) = 384 S, attention 2*2*S*S*8 = 32 S^2, MLP 2*S*3*8*16 = 768 S
    at_20, at_12 = 384 * 20 + 32 * 400 + 768 * 20, 384 * 12 + 32 * 144 + 768 * 12  # 35840, 18432
    lm_head = 2 * 8 * 10  # the last position only
    guidance = 2 * 20 * 4 * 2 * 4  # S_in x T logits, 2 heads of 4
    merge = 2 * (8 * 8) * 8  # one window: 8 A tokens x 8 B tokens, D = 8
    assert acc.flops_total_vanilla == 4 * at_20 + lm_head == 143_520
    assert acc.flops_total == 2 * at_20 + 2 * at_12 + lm_head + guidance + merge == 111_008
    assert (acc.flops["guidance"], acc.flops["merge"]) == (guidance, merge)
    assert acc.plan_matches


def test_engine_account_retention_is_achieved_not_nominal():
    """The tiny build's numbers: nominal 0.546875 (per-stage ratios), achieved 844 / 1536 (per-window floors)."""
    from lightkv_export.accounting.engine import engine_account

    lengths = [240, 240, 240, 144, 97, 97, 97, 73]
    reference = ReferenceRequest(
        prompt="x",
        seq_len=240,
        vision_tokens=192,
        image_layouts=[[[12, 16]]],
        kv_lengths=lengths,
        vision_tokens_per_layer=[n - 48 for n in lengths],
        kv_bytes_per_layer=[n * 256 for n in lengths],
        kv_bytes_vanilla_per_layer=[240 * 256] * 8,
    )
    tiny = replace(
        TOY_MANIFEST, num_layers=8, retention=0.546875, schedule="3:2:0.5,4:2:0.5,7:1:0.5", hidden_size=64,
        num_attention_heads=4, num_kv_heads=2, head_dim=16, reference_request=reference,
    )  # fmt: skip
    acc = engine_account(tiny)
    assert acc.nominal_retention == 0.546875 and acc.retention == 844 / 1536
    assert acc.kv_bytes == tuple(reference.kv_bytes_per_layer) and acc.plan_matches


def test_a_manifest_without_the_decoder_sizes_is_refused_when_read():
    old = {k: v for k, v in TOY_MANIFEST.to_json().items() if k not in ("intermediate_size", "vocab_size")}
    with pytest.raises(InputError, match=r"lacks intermediate_size, vocab_size\. .* rebuild"):
        Manifest.from_json(old)
    with pytest.raises(InputError, match=r"num_layers is '4', expected int"):
        Manifest.from_json({**TOY_MANIFEST.to_json(), "num_layers": "4"})
    assert Manifest.from_json(TOY_MANIFEST.to_json()) == TOY_MANIFEST  # the JSON round trip is exact


def test_flops_count_q_and_o_at_heads_times_head_dim():
    """A config whose head_dim is not hidden / heads (2 heads of 5 on hidden 8): Q and O are 8 x 10 matrices."""
    from lightkv_export.accounting.engine import engine_account

    wide = replace(TOY_MANIFEST, head_dim=5)
    # per layer at S tokens: qkvo 2*S*8*(2*10 + 2*5) = 480 S, attention 2*2*S*S*10 = 40 S^2, MLP 768 S
    at_20 = 480 * 20 + 40 * 400 + 768 * 20
    assert engine_account(wide).flops_total_vanilla == 4 * at_20 + 2 * 8 * 10


def test_accounting_section_written_once_before_the_pictures(tmp_path):
    import json

    from lightkv_export import report
    from lightkv_export.report.markdown import ACCOUNTING_HEADING

    (tmp_path / "manifest.json").write_text(json.dumps(TOY_MANIFEST.to_json()))
    (tmp_path / "report.md").write_text("# Parity report\n\n## model\n\n| a |\n\n## Pictures\n\n![x](p.png)\n")
    report.write_accounting(tmp_path)
    first = (tmp_path / "report.md").read_text()
    report.write_accounting(tmp_path)  # again: the same report
    text = (tmp_path / "report.md").read_text()
    assert text == first and text.count(ACCOUNTING_HEADING) == 1
    assert text.index("## model") < text.index(ACCOUNTING_HEADING) < text.index("## Pictures")
    assert "| KV cache after prefill, bytes | 2,560 | 2,048 | -20.0% |" in text
    assert "| vision-token KV kept (Eq. 9, achieved) | 100.0% | 75.00% |" in text
    assert "| 3 | 20 | 12 | 8 / 16 | 640 | 384 |" in text
    assert text.endswith("![x](p.png)\n")


def test_accounting_states_the_weight_bytes_held():
    from lightkv_export.accounting.engine import engine_account
    from lightkv_export.report.markdown import accounting_markdown

    assert "weights held" not in accounting_markdown(engine_account(TOY_MANIFEST))  # not recorded: no row
    text = accounting_markdown(engine_account(replace(TOY_MANIFEST, weight_bytes=123_456)))
    assert "| weights held at run time, bytes | | 123,456 | every graph, one process |" in text


def test_upsert_section_replaces_appends_and_inserts():
    from lightkv_export.report.markdown import upsert_section

    assert upsert_section("# T\n", "## A", "## A\n\n1") == "# T\n\n## A\n\n1\n"
    two = "# T\n\n## A\n\nold\n\n## B\n\nb\n"
    assert upsert_section(two, "## A", "## A\n\nnew") == "# T\n\n## A\n\nnew\n\n## B\n\nb\n"
    assert upsert_section("# T\n\n## B\n\nb\n", "## A", "## A\n\n1", before="## B") == "# T\n\n## A\n\n1\n\n## B\n\nb\n"
