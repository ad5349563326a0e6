"""report.md's text: the "## Accounting" section of a built engine, and replacing a section in place."""

from __future__ import annotations

from lightkv_export.accounting.engine import EngineAccount

REPORT_FILE = "report.md"
ACCOUNTING_HEADING = "## Accounting"
PICTURES_HEADING = "## Pictures"


def _pct(a: float, b: float) -> str:
    return f"{(b / a - 1) * 100:+.1f}%" if a else "-"


def accounting_markdown(acc: EngineAccount, engine_label: str = "LightKV") -> str:
    """The "## Accounting" section: totals, then per layer, then FLOPs by component."""
    overhead = acc.flops.get("guidance", 0) + acc.flops.get("merge", 0)
    lines = [
        ACCOUNTING_HEADING,
        "",
        f"Reference request: {acc.seq_len} tokens ({acc.vision_tokens} vision, {acc.text_tokens} text), "
        f"KV cache in {acc.dtype}, measured after prefill. FLOPs: language-model prefill, {acc.convention.describe()}.",
        "",
        f"| | vanilla | {engine_label} | change |",
        "|---|---:|---:|---:|",
        f"| KV cache after prefill, bytes | {acc.kv_total_vanilla:,} | {acc.kv_total:,} | "
        f"{_pct(acc.kv_total_vanilla, acc.kv_total)} |",
        f"| vision-token KV kept (Eq. 9, achieved) | 100.0% | {acc.retention:.2%} | "
        f"schedule's nominal {acc.nominal_retention:.2%} |",
        f"| prefill GFLOPs | {acc.flops_total_vanilla / 1e9:.4g} | {acc.flops_total / 1e9:.4g} | "
        f"{_pct(acc.flops_total_vanilla, acc.flops_total)} |",
        f"| of which guidance + merge, GFLOPs | 0 | {overhead / 1e9:.4g} | |",
        *(
            [f"| weights held at run time, bytes | | {acc.weight_bytes:,} | every graph, one process |"]
            * bool(acc.weight_bytes)
        ),
        "",
        f"| layer | tokens cached, vanilla | {engine_label} | vision tokens | KV bytes, vanilla | {engine_label} |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for i, (n, v, kv_v, kv_l) in enumerate(
        zip(acc.kv_lengths, acc.vision_per_layer, acc.kv_bytes_vanilla, acc.kv_bytes, strict=True), 1
    ):
        lines.append(f"| {i} | {acc.seq_len} | {n} | {v} / {acc.vision_tokens} | {kv_v:,} | {kv_l:,} |")
    lines += ["", f"| prefill FLOPs | vanilla | {engine_label} |", "|---|---:|---:|"]
    for part in acc.flops:
        lines.append(f"| {part} | {acc.flops_vanilla.get(part, 0):,} | {acc.flops[part]:,} |")
    if not acc.plan_matches:
        lines += ["", "Note: the schedule's host-side plan traced here does not give the manifest's kv_lengths."]
    return "\n".join(lines) + "\n"


def upsert_section(text: str, heading: str, body: str, before: str | None = None) -> str:
    """`text` with the section `heading` (up to the next "## " heading) replaced by `body`, else inserted
    before the `before` heading when present, else appended: writing twice gives the same report."""
    lines = text.rstrip("\n").split("\n")
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    elif before is not None and before in lines:
        start = end = lines.index(before)
    else:
        start = end = len(lines)
    head = "\n".join(lines[:start]).rstrip("\n")
    rest = "\n".join(lines[end:]).strip("\n")
    parts = [head, body.strip("\n"), rest]
    return "\n\n".join(p for p in parts if p) + "\n"
