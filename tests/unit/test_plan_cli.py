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


def plan_in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """`python -m lightkv_export.plan ARGS` as lightkv_export.plan.main in this process (no 5 s interpreter start;
    test_json_qwen and test_table_llava_schedule run the real command)."""
    from lightkv_export.plan import main

    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, captured.out, captured.err)


def assert_one_error_line(out: subprocess.CompletedProcess, *parts: str) -> None:
    """Exit 2, nothing on stdout (no table, no JSON), and stderr exactly one `error: ...` line naming `parts`."""
    assert out.returncode == 2, out.stderr
    assert out.stdout == "", out.stdout
    assert "Traceback" not in out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    for part in parts:
        assert part in lines[0], (part, lines[0])


@pytest.mark.parametrize(
    ("args", "parts"),
    [
        (["--model", "gpt-4", "--ratio", "0.5"],
         ["unknown model 'gpt-4'", "known models: llava, llava-13b, llava-next, llava-next-13b, qwen2-vl", "aliases:"]),
        (["--ratio", "0.5", "--image-size", "1024by768"], ["image size '1024by768' is not WIDTHxHEIGHT", "'1024x768'"]),
        (["--ratio", "0.5", "--gpu-memory", "lots"], ["memory size 'lots' is not NUMBER[UNIT]", "'80GB'"]),
        (["--ratio", "0.05"],
         ["ratio 0.05 cannot be reached with 28 decoder layers", "reachable range is 0.174 to 0.998", "--schedule"]),
        (["--model", "llava-next-13b", "--ratio", "0.5", "--gpu-memory", "20GB"],
         ["llava-next-13b weights take 26.7 GB", "more than the 20.0 GB GPU memory given", "--gpu-memory"]),
        (["--ratio", "0.5", "--schedule", "12:4:0.5"], ["exactly one of --ratio", "--schedule"]),
        (["--ratio", "0.5", "--dtype", "int3"], ["unknown dtype 'int3'", "fp16", "bf16"]),
    ],
)  # fmt: skip
def test_bad_input_exits_2_without_traceback(args, parts, capsys):
    assert_one_error_line(plan_in_process(capsys, *args), *parts)


@pytest.mark.slow
def test_paper_json_is_the_recorded_comparison():
    """--paper searches schedules for the figures it does not reproduce (tens of seconds), as the benchmark did."""
    out = plan("--paper", "--json")
    assert out.returncode == 0, out.stderr
    recorded = json.loads((ROOT / "benchmarks" / "results" / "paper_comparison.json").read_text())
    assert json.loads(out.stdout) == recorded["rows"]


@pytest.mark.parametrize("images", ["0", "-1", "65"])
def test_images_must_be_between_1_and_64(images, capsys):
    out = plan_in_process(capsys, "--ratio", "0.55", "--images", images)
    assert_one_error_line(out, f"--images must be from 1 to 64, got {images}")


def test_the_planner_keeps_stages_after_the_familys_first_merge_layer(monkeypatch, request):
    """A family whose decoder adds vision features after early layers (Family.first_merge_layer): the planner's
    solver places every stage after that layer; an explicit schedule before it is refused with the reason."""
    import argparse

    from lightkv_export.errors import InputError
    from lightkv_export.models import shapes
    from lightkv_export.models.registry import get_family
    from lightkv_export.plan import make_plan

    family = type(get_family("qwen2_5_vl"))
    monkeypatch.setattr(family, "first_merge_layer", lambda self, config: (9, "features added after layer 9"))
    shapes.get_shape.cache_clear()  # shapes are cached per key: read them again under the patched family,
    request.addfinalizer(shapes.get_shape.cache_clear)  # and again without it after this test
    base = dict(model="qwen-vl", windows=None, image_size=None, images=1, prompt_tokens=64, gen_tokens=10)
    base |= dict(gpu_memory="80GB", dtype="bf16", causal=False, grid_mode="true")
    result = make_plan(argparse.Namespace(**base, ratio=0.7, schedule=None))
    assert min(int(stage.split(":")[0]) for stage in str(result.schedule).split(",")) >= 9
    with pytest.raises(InputError, match="features added after layer 9"):
        make_plan(argparse.Namespace(**base, ratio=None, schedule="5:4:0.5"))
