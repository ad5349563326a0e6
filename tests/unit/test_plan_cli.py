"""`python -m lightkv_export.plan` through a subprocess: output, --json and every bad-input path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lightkv_export.plan", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={"COLUMNS": "160", "PATH": "/usr/bin:/bin"},
    )


def test_json_qwen():
    out = plan("--model", "qwen-vl", "--ratio", "0.55", "--image-size", "1024x768", "--prompt-tokens", "64", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["vision_tokens"] == 999 and data["vision_grids"] == [[27, 37]]
    assert data["text_tokens"] == 64
    assert abs(data["lightkv"]["retention"] - 0.55) < 0.02
    assert data["vanilla"]["kv_prefill_bytes"] == (999 + 64) * 28 * 2 * 512 * 2  # 4 KV heads x 128, bf16
    assert 0.3 < data["prefill_flops_reduction"] < 0.5
    assert data["lightkv"]["max_concurrent_requests"] > data["vanilla"]["max_concurrent_requests"]


def test_table_llava_schedule():
    out = plan("--model", "llava-1.5", "--schedule", "12:4:0.5,18:2:0.5,24:1:0.5", "--gpu-memory", "80GiB")
    assert out.returncode == 0, out.stderr
    assert "vanilla vs LightKV" in out.stdout and "max concurrent requests" in out.stdout
    assert "12:4:0.5,18:2:0.5,24:1:0.5" in out.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "gpt-4", "--ratio", "0.5"], "known models: qwen-vl, qwen2-vl, llava, llava-13b, llava-next"),
        (["--ratio", "0.5", "--image-size", "1024by768"], "not WIDTHxHEIGHT"),
        (["--ratio", "0.5", "--gpu-memory", "lots"], "is not NUMBER[UNIT]"),
        (["--ratio", "0.05"], "cannot be reached"),
        (["--model", "llava-next-13b", "--ratio", "0.5", "--gpu-memory", "20GB"], "weights take"),
        (["--ratio", "0.5", "--schedule", "12:4:0.5"], "exactly one of --ratio"),
        (["--ratio", "0.5", "--dtype", "int3"], "unknown dtype"),
    ],
)
def test_bad_input_exits_2_without_traceback(args, message):
    out = plan(*args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


@pytest.mark.slow
def test_paper_json_is_the_recorded_comparison():
    """--paper searches schedules for the figures it does not reproduce (tens of seconds), as the benchmark did."""
    out = plan("--paper", "--json")
    assert out.returncode == 0, out.stderr
    recorded = json.loads((ROOT / "benchmarks" / "results" / "paper_comparison.json").read_text())
    assert json.loads(out.stdout) == recorded["rows"]


@pytest.mark.parametrize("images", ["0", "-1", "65"])
def test_images_must_be_between_1_and_64(images):
    out = plan("--ratio", "0.55", "--images", images)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"--images must be from 1 to 64, got {images}" in out.stderr
