"""The device call's script (benchmarks/gpu_all.py and bench_prefill_gpu.py) in its CPU mode, end to end at toy
size with the LightKVMerge kernels interpreted: the steps run, the records are written, and what they measure is
checked against the planner and the reference op, so the script cannot rot between device loans."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu_all")
    cmd = [sys.executable, "-m", "benchmarks.gpu_all", "--tiny", "--device", "cpu", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    logs = "".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(out.glob("*.log")))
    assert done.returncode == 0, done.stdout + done.stderr + logs
    return out


def test_every_step_runs_or_says_why_not(cpu_run):
    record = json.loads((cpu_run / "gpu_all.json").read_text())
    steps = {s["step"]: s for s in record["steps"]}
    assert [(n, s["status"]) for n, s in steps.items()] == [
        ("tests_gpu", "ok"),
        ("kernels_gpu", "skipped"),
        ("prefill_gpu", "ok"),
    ]
    assert "no GPU" in steps["kernels_gpu"]["reason"] and record["tiny"] is True
    assert record["info"]["torch"] and record["info"]["triton"] and record["info"]["transformers"]
    # The GPU tests were collected and each skipped with its reason (none silently missing).
    suite = ET.parse(cpu_run / "tests_gpu.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) >= 4 and int(suite.get("skipped")) == int(suite.get("tests"))
    assert "needs a CUDA GPU" in (cpu_run / "tests_gpu.xml").read_text()


def test_prefill_record_agrees_with_the_planner_and_the_reference(cpu_run):
    result = json.loads((cpu_run / "prefill_gpu_tiny.json").read_text())
    assert result["tiny"] and result["device"] == "cpu" and set(result["schedules"]) == {"vanilla", "paper", "r0.55"}
    assert set(result["cases"]) == {"1 image", "4 images", "batch 8"}
    for case, row in result["cases"].items():
        layers = result["size"]["layers"]
        assert row["vanilla"]["kv_lengths"] == [row["seq_len"]] * layers, case
        for name in ("paper", "r0.55"):
            light, versus = row[name], row[f"{name}_vs_vanilla"]
            # The cache the run holds is the one the planner predicts, and LightKV's prefill FLOPs are fewer.
            assert versus["kv_ratio"] == versus["planned_kv_ratio"] > 1, (case, name, versus)
            assert versus["predicted_flops_ratio"] > 1
            # The kernels (interpreted) merge exactly as the reference op: same lengths, same logits to fp32 noise.
            assert light["max_logit_diff_kernels_vs_reference"] < 1e-4, (case, name)
            assert light["prefill_ms"]["min"] > 0 and light["decode_ms_per_token"] > 0
        assert (row["images"], row["batch"]) == {"1 image": (1, 1), "4 images": (4, 1), "batch 8": (1, 8)}[case]
    assert "| 1 image |" in (cpu_run / "prefill_gpu.log").read_text()  # the table was printed
