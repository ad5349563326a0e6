"""`python -m benchmarks`: discovery, --list, a --quick smoke of a cheap benchmark, the README section it generates,
and the recorded paper comparison against the accounting as it computes today."""

from __future__ import annotations

import json
import re
from pathlib import Path

from benchmarks import __main__ as bench
from benchmarks import bench_paper
from lightkv_export.accounting.paper import PAPER_FIGURES, paper_comparison, paper_metric

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
BENCH_FILES = sorted(p.stem for p in (ROOT / "benchmarks").glob("bench_*.py"))


def test_discovery_finds_every_bench_module():
    modules = bench.discover()
    assert sorted(m.__name__.removeprefix("benchmarks.") for m in modules) == BENCH_FILES
    assert {"paper_comparison", "reference_op", "ort_prefill", "serving", "kernels_gpu"} <= {m.NAME for m in modules}


def test_list(capsys):
    assert bench.main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(BENCH_FILES)
    assert any(ln.startswith("paper_comparison") and ln.endswith("runs here") for ln in lines)


def test_unknown_benchmark_is_exit_2(tmp_path, capsys):
    out = tmp_path / "results"
    assert bench.main(["--only", "nope", "paper_comparison", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown benchmark(s) ['nope']; known: "), captured.err
    known = lines[0].split("known: ")[1].split(", ")
    assert sorted(known) == sorted(m.NAME for m in bench.discover())  # every known name, and only those
    assert captured.out == ""  # nothing ran: not even the one valid name
    assert not out.exists()  # and nothing was written


def test_quick_smoke_writes_only_where_told(tmp_path):
    """The paper comparison is cheap (no server, no build): it goes through run_one, the JSON and the README."""
    out = tmp_path / "results"
    assert bench.main(["--quick", "--only", "paper_comparison", "--out", str(out)]) == 0
    record = json.loads((out / "paper_comparison.json").read_text())
    assert record["quick"] is True and record["benchmark"] == "paper_comparison"
    assert len(record["rows"]) == len(PAPER_FIGURES) and len(record["ratios"]) == len(PAPER_FIGURES)
    summary = json.loads((out / "summary.json").read_text())
    assert [e["name"] for e in summary["benchmarks"]] == ["paper_comparison"]
    section = (out / "README_SECTION.md").read_text()
    assert section.startswith("## Performance\n") and "### paper_comparison: " in section
    assert "| paper_comparison | LLaVA-NeXT-13B KV, GiB (paper 1.67x) | 1.66x |" in section


def test_readme_section_marks_carried_over_results():
    env = {
        "date": "2026-12-01T00:00:00+00:00",
        "machine": {"cpu": "cpu", "cores": 2, "torch_threads": 2, "gpu": None},
        "versions": {"python": "3", "torch": "t", "onnxruntime": "o", "transformers": "x"},
    }
    entries = [
        {"name": "a", "status": "ok", "title": "A", "ratios": {"r": 2.0}, "result": {"ratios": {"r": 2.0}}},
        {"name": "b", "status": "ok", "title": "B", "ratios": {"s": 1.5}, "carried_over": True,
         "result": {"ratios": {"s": 1.5}, "date": "2026-11-25T00:00:00+00:00"}},
        {"name": "c", "status": "skipped", "reason": "needs a CUDA GPU"},
    ]  # fmt: skip
    text = bench.readme_section(env, entries, {"a": object(), "b": object()})
    assert "Measured 2026-12-01 on cpu (2 cores, 2 torch threads, no GPU)" in text
    assert "Carried over from earlier runs, not re-measured in this one: b (2026-11-25)." in text
    assert "| a | r | 2.00x |" in text and "| c | skipped: needs a CUDA GPU | |" in text
    assert "### a: A\n\n| ratio | value |" in text


def docs_benchmarks_page() -> str:
    return (ROOT / "docs" / "benchmarks.md").read_text()


def test_the_benchmarks_page_embeds_the_generated_section():
    """The documented numbers are the recorded ones: README_SECTION.md, its own heading aside, verbatim in
    docs/benchmarks.md; the README's headline table quotes no ratio that the records do not hold."""
    generated = (RESULTS / "README_SECTION.md").read_text()
    heading, body = generated.split("\n", 1)
    assert heading == "## Performance"
    assert body.strip() in docs_benchmarks_page()
    readme = (ROOT / "README.md").read_text()
    headline = readme[readme.index("## Headline numbers") : readme.index("## Documentation")]
    recorded = set(re.findall(r"\d+\.\d\dx", body))
    for quoted in ("1.75x", "1.89x", "2.01x", "1.64x", "1.78x", "1.79x", "1.70x", "1.69x", "1.57x", "1.50x", "1.49x"):
        assert quoted in headline and quoted in recorded, quoted


def test_recorded_paper_comparison_is_what_the_accounting_computes():
    record = json.loads((RESULTS / "paper_comparison.json").read_text())
    assert record["schedules_searched"] is True and record["quick"] is False
    today = paper_comparison()  # without the schedule search (tens of seconds); its output is checked below
    key = "evenly_spaced_schedules_reproducing"
    assert [{k: v for k, v in r.items() if k != key} for r in record["rows"]] == [
        {k: v for k, v in r.items() if k != key} for r in today
    ]
    assert record["ratios"] == bench_paper.run(quick=True)["ratios"]
    from lightkv_export.method.schedule import parse_schedule
    from lightkv_export.models.shapes import get_shape

    for row, fig in zip(record["rows"], PAPER_FIGURES, strict=True):
        depth = get_shape(fig.model).num_layers
        for text in row[key]:  # every schedule listed really reproduces the paper's LightKV figure
            light = paper_metric(fig, parse_schedule(text, depth), row["text_tokens"])[1]
            assert round(light, fig.decimals) == fig.lightkv, (fig.model, text)
        assert bool(row[key]) == (not row["reproduced"])  # found for both unreproduced figures, here


def test_serving_ceiling_summary_and_table():
    from benchmarks import bench_serving as serving

    assert serving.ceiling(400, 100) == 4 and serving.ceiling(400, 60) == 6 and serving.ceiling(10**6, 1) == 16

    def cell(rps: float, in_flight: float, ttft: list[float]) -> dict:
        return {"requests": len(ttft), "rps": rps, "tokens_per_s": 32 * rps, "in_flight_mean": in_flight,
                "in_flight_max": 4, "ttft_ms": ttft, "latency_ms": [t + 100 for t in ttft], "tokens": 32,
                "kv_bytes": 10, "kv_bytes_reserved": 12}  # fmt: skip

    light = serving.summarise([cell(2.0, 6.0, [1.0, 3.0]), cell(3.0, 5.5, [2.0, 2.0]), cell(1.0, 6.0, [4.0, 4.0])])
    vanilla = serving.summarise([cell(1.0, 4.0, [2.0, 2.0])] * 3)
    assert light["requests"] == 6 and light["rps"] == {"median": 2.0, "min": 1.0, "max": 3.0}
    assert light["ttft_p50_ms"] == 2.5 and light["latency_p50_ms"] == 102.5  # over all six requests
    assert serving.paired(light, vanilla, "in_flight_mean") == {"median": 1.5, "min": 1.375, "max": 1.5}
    result = {
        "setup": {"budget_bytes": {"tight": 400, "roomy": 1600}, "reservation_bytes": {"vanilla": 100, "lightkv": 60},
                  "rounds": 3, "requests_per_cell": 2},
        "analytic_in_flight": {"tight": {"lightkv": 6, "vanilla": 4}},
        "cells": {"tight": {"lightkv": light, "vanilla": vanilla}},
        "lightkv_over_vanilla": {"tight": {k: serving.paired(light, vanilla, k)
                                           for k in ("rps", "tokens_per_s", "in_flight_mean")}},
    }  # fmt: skip
    text = serving.markdown(result)
    assert "| tight | lightkv | 6 | 6.00 (5.50-6.00) | 4 | 2.000 | 64.0 | 2 / 4 | 102 / 104 |" in text
    assert "| requests in flight | tight | 1.50x | 1.38-1.50x |" in text


def test_model_goes_to_the_benchmarks_that_build_engines(capsys):
    """--model reaches run() of modules that declare MODEL (they build that model's engines), not the others;
    an unknown key is refused before anything runs."""
    from types import SimpleNamespace

    def run(quick, model="x"):
        return {"title": model, "ratios": {}}

    builds = SimpleNamespace(NAME="b", MODEL="tiny-qwen-vl", run=run)
    other = SimpleNamespace(NAME="o", run=lambda quick: {"title": "fixed", "ratios": {}})
    assert bench.run_one(builds, True, "tiny-llava")["title"] == "tiny-llava"
    assert bench.run_one(other, True, "tiny-llava")["title"] == "fixed"
    assert bench.run_one(builds, True)["title"] == "x"  # no --model: the module's own default
    assert bench.main(["--quick", "--only", "paper_comparison", "--model", "gpt-4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model 'gpt-4'") and "tiny-llava" in err


def test_optional_dependency_is_a_skip_with_the_reason():
    import types

    assert bench.skip_reason(types.SimpleNamespace(REQUIRES="module:json")) is None
    reason = bench.skip_reason(types.SimpleNamespace(REQUIRES="module:no_such_package_here"))
    assert reason == "needs the no_such_package_here package (pip install -e '.[peer]')"
    assert bench.skip_reason(types.SimpleNamespace(REQUIRES="quantum")) == "unknown requirement 'quantum'"


def test_peer_benchmark_declares_its_pinned_dependency():
    """bench_peer's peer is the version pinned in pyproject's `peer` extra (what the recorded numbers are of)."""
    import tomllib

    from benchmarks import bench_peer

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["peer"] == [f"onnxruntime-genai=={bench_peer.PEER_VERSION}"]
    assert bench_peer.REQUIRES == "module:onnxruntime_genai"


def test_records_written_by_a_benchmark_run_on_its_own_are_carried_into_the_summary(tmp_path):
    """`python -m benchmarks.bench_peer --context long` writes peer_long.json only; the next `python -m benchmarks
    --only X` keeps it in the summary and the README (bench_peer names it in EXTRA_RECORDS), dated as carried over."""
    from benchmarks import bench_peer
    from benchmarks.__main__ import merge_previous

    assert "peer_long" in bench_peer.EXTRA_RECORDS
    record = {"benchmark": "peer_long", "title": "long", "ratios": {"r": 1.5}, "date": "2026-12-03"}
    (tmp_path / "peer_long.json").write_text(json.dumps(record))
    fresh = [{"name": "ort_prefill", "status": "ok", "ratios": {"x": 2.0}, "title": "t", "result": {}}]
    entries = merge_previous(fresh, tmp_path, {"ort_prefill", "peer", "peer_long"})
    assert [e["name"] for e in entries] == ["ort_prefill", "peer_long"]  # peer has no record here: left out
    assert entries[1]["carried_over"] and entries[1]["ratios"] == {"r": 1.5} and entries[1]["result"] == record
    # A benchmark in the summary re-run on its own (python benchmarks/bench_serving.py): its newer record's title and
    # ratios win over the summary's stale ones.
    stale = {"name": "peer_long", "status": "ok", "title": "old title", "ratios": {"r": 0.5}}
    (tmp_path / "summary.json").write_text(json.dumps({"benchmarks": [stale]}))
    (carried,) = merge_previous([], tmp_path, {"peer_long"})
    assert (carried["title"], carried["ratios"]) == ("long", {"r": 1.5}) and carried["carried_over"]


def test_a_gpu_record_survives_a_run_where_its_benchmark_is_skipped(tmp_path):
    """kernels_gpu measured on a lent GPU (its record copied into results/) is skipped on the CPU machines: the
    summary and the README keep the measured record, dated and with its device, not the skip."""
    from benchmarks import bench_kernels_gpu
    from benchmarks.__main__ import merge_previous, readme_section

    row = {"case": "B1", "dtype": "bfloat16", "triton_ms": 0.34, "reference_ms": 2.36, "speedup": 6.9,
           "memory_floor_ms": 0.0117, "fraction_of_floor": 0.034}  # fmt: skip
    record = {"title": "kernels on NVIDIA H200", "ratios": {"B1 bfloat16 speed-up": 6.9}, "device": "NVIDIA H200",
              "date": "2026-12-04T18:22:29+00:00", "results": [row]}  # fmt: skip
    (tmp_path / "kernels_gpu.json").write_text(json.dumps(record))
    skipped = {"name": "kernels_gpu", "status": "skipped", "reason": "needs a CUDA GPU", "ratios": {}, "seconds": 0}
    (tmp_path / "summary.json").write_text(json.dumps({"benchmarks": [skipped]}))
    for fresh in ([skipped], []):  # a full CPU run (skipped now) and an --only run of another benchmark
        (entry,) = merge_previous(list(fresh), tmp_path, {"kernels_gpu"})
        assert entry["status"] == "ok" and entry["carried_over"] and entry["ratios"] == record["ratios"]
    env = {"date": "2026-12-05", "machine": {"cpu": "EPYC", "cores": 2, "torch_threads": 2, "gpu": None},
           "versions": {"python": "3.11", "torch": "2.13", "onnxruntime": "1.32", "transformers": "5.24"}}  # fmt: skip
    text = readme_section(env, [entry], {"kernels_gpu": bench_kernels_gpu})
    assert "kernels_gpu (2026-12-04, NVIDIA H200)" in text and "| kernels_gpu | B1 bfloat16 speed-up | 6.90x |" in text
    assert "| B1 | bfloat16 | 0.340 | 2.360 | 6.90x | 0.0117 | 3.4% |" in text
    # Without a record the skip stays, with its reason.
    (tmp_path / "kernels_gpu.json").unlink()
    (entry,) = merge_previous([skipped], tmp_path, {"kernels_gpu"})
    assert entry["status"] == "skipped" and entry["reason"] == "needs a CUDA GPU"


def test_image_sizes_quick_sizes_each_image_as_the_processor_does(tmp_path):
    """--quick image_sizes through run_one, the JSON and the README: each image's grid is what the real Qwen2.5-VL
    image processor, capped at the benchmark's max_pixels, makes of the image as sent; the page is an unresized 1:3
    one near the cap; each size's KV cache is that of its own sequence and of the plan's lengths."""
    from PIL import Image

    from benchmarks import bench_image_sizes as sizes
    from lightkv_export.models.registry import get_family

    out = tmp_path / "results"
    assert bench.main(["--quick", "--only", "image_sizes", "--out", str(out)]) == 0
    record = json.loads((out / "image_sizes.json").read_text())
    rows, model = record["rows"], record["model"]
    assert [r["sent"] for r in rows[:-1]] == [list(s) for s in sizes.QUICK_PHOTOS] and len(rows) == 3
    width, height = rows[-1]["sent"]
    assert height == 3 * width and rows[-1]["processed"] == [height, width]  # the page reaches the model unresized
    assert 0.9 * sizes.QUICK_CAP <= width * height <= sizes.QUICK_CAP == record["max_pixels"]
    processor = get_family("qwen2_5_vl").random_processor().image_processor
    cap = {"longest_edge": sizes.QUICK_CAP, "shortest_edge": processor.size["shortest_edge"]}
    kv_token = 2 * model["kv_heads"] * (model["hidden"] // model["heads"]) * 4  # K + V, fp32, per layer
    section = (out / "README_SECTION.md").read_text()
    for r in rows:
        (rows_, cols), merge = r["grid"], processor.merge_size
        thw = processor(images=[Image.new("RGB", tuple(r["sent"]))], size=cap, return_tensors="np")["image_grid_thw"]
        assert thw.tolist() == [[1, rows_ * merge, cols * merge]], r["image"]
        assert r["vision_tokens"] == rows_ * cols
        assert r["seq"] == model["text_before"] + r["vision_tokens"] + model["text_after"]
        assert r["kv_bytes"]["vanilla"] == model["layers"] * r["seq"] * kv_token
        assert r["kv_bytes"]["lightkv"] == sum(r["kv_lengths"]["lightkv"]) * kv_token < r["kv_bytes"]["vanilla"]
        assert abs(r["retention"] - record["retention_nominal"]) < 0.05, r["retention"]
        assert record["ratios"][f"KV bytes @ {r['image']}"] == r["kv_ratio"]
        assert record["ratios"][f"prefill speed-up @ {r['image']}"] == r["speedup"] > 0
        assert f"| {r['image']} | {rows_}x{cols} | {r['vision_tokens']} | {r['seq']} |" in section
    assert len(record["ratios"]) == 2 * len(rows)
    predicted = [r["predicted_flops_ratio"] for r in rows]
    assert predicted == sorted(predicted) and predicted[0] < predicted[-1]  # the saving grows with the image
