"""The paper's KV and FLOPs figures next to this project's accounting (lightkv_export/accounting), nothing measured.

Each figure is recomputed at the model's published configuration: the prompt length is fitted to the paper's
vanilla figure, then the LightKV figure follows from the schedule (accounting.paper.paper_comparison). A figure not
reproduced with the paper's schedule also lists the evenly spaced schedules that would reproduce it (a search of
some tens of seconds; --quick skips it). Ratios are vanilla / LightKV as we compute them; the paper's own ratio is
in each label.

Run through the entry point: `python -m benchmarks --only paper_comparison [--quick]`.
"""

from __future__ import annotations

from lightkv_export.accounting.paper import PAPER_CONVENTION, paper_comparison

NAME = "paper_comparison"
MODEL_NAMES = {
    "llava-next-13b": "LLaVA-NeXT-13B",
    "llava-next": "LLaVA-NeXT-7B",
    "llava-13b": "LLaVA-1.5-13B",
    "llava": "LLaVA-1.5-7B",
}
METRICS = {"kv_gib": "KV, GiB", "tflops": "TFLOPs"}


def ratio_label(row: dict) -> str:
    paper = row["paper"][0] / row["paper"][1]
    return f"{MODEL_NAMES.get(row['model'], row['model'])} {METRICS[row['metric']]} (paper {paper:.2f}x)"


def run(quick: bool = False) -> dict:
    rows = paper_comparison(search_schedules=not quick)
    return {
        "title": "the paper's KV and FLOPs figures recomputed by this project's accounting (vanilla / LightKV)",
        "ratios": {ratio_label(r): r["ours"][0] / r["ours"][1] for r in rows},
        "flop_convention": PAPER_CONVENTION.describe(),
        "schedules_searched": not quick,
        "rows": rows,
    }


def _schedule(text: str) -> str:
    """12:4:0.5,18:2:0.5,24:1:0.5 -> 12-18-24 (the windows and ratios are the paper's 4-2-1 and 0.5)."""
    return "-".join(stage.split(":")[0] for stage in text.split(","))


def markdown(result: dict) -> str:
    out = ["| model | metric | paper | ours | schedule | text tokens | reproduced |", "|---|---|---|---|---|---:|---|"]
    for r in result["rows"]:
        (pv, pl), (ov, ol) = r["paper"], r["ours"]
        reproduced = "yes" if r["reproduced"] else "no"
        if r["evenly_spaced_schedules_reproducing"]:
            reproduced += " (fits " + ", ".join(map(_schedule, r["evenly_spaced_schedules_reproducing"])) + ")"
        out.append(
            f"| {MODEL_NAMES.get(r['model'], r['model'])} | {METRICS[r['metric']]} | {pv:g} -> {pl:g} "
            f"({r['paper_change']:+.0%}) | {ov:g} -> {ol:g} ({r['ours_change']:+.0%}) | {_schedule(r['schedule'])} "
            f"| {r['text_tokens']} | {reproduced} |"
        )
    out += [
        "",
        "Windows 4-2-1, ratio 0.5 per stage. KV: fp16 K + V in GiB, every text token (prompt and generated) "
        f"cached. FLOPs: {result['flop_convention']}, language model only. Text tokens: fitted so that the "
        "vanilla figure rounds to the paper's; the LightKV figure then follows.",
    ]
    return "\n".join(out)
