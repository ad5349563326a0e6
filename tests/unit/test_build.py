"""End to end: build.py / pipeline.run on the tiny presets, the engine directories, the runtime, bad input.

One export cache per test session (the vanilla graphs of each tiny family are exported once); every build after
the first of a family only transforms, writes the engine and runs parity.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightkv_export.config import BuildConfig
from lightkv_export.errors import InputError
from lightkv_export.inputs import parity_images
from lightkv_export.models.positions import MROPE
from lightkv_export.pipeline import run
from lightkv_export.runtime import Engine
from tests.helpers import reference_run

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("model", "ratio"),
    [(model, ratio) for model in ("tiny-qwen-vl", "tiny-qwen2-vl") for ratio in (0.55, 0.3, 0.0)],
)
def test_build_passes_parity_and_writes_a_complete_engine(builds, model, ratio):
    result = builds(model, ratio)
    report = result.parity["ort-cpu"]
    assert report.passed, "\n".join(report.failure_lines())
    assert result.exit_code == 0
    levels = {c.level for c in report.checks}
    assert levels == {"op", "model", "identity"}
    engine_dir = result.engine_dirs["ort-cpu"]
    assert engine_dir == result.config.out / model / f"r{ratio:g}" / "ort-cpu"
    for name in ("manifest.json", "parity.json", "report.md", "prefill.onnx", "decode.onnx", "vision.onnx"):
        assert (engine_dir / name).is_file(), name
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    assert manifest["schedule"] == str(result.schedule)
    assert abs(manifest["retention"] - (ratio if ratio else 1.0)) <= 0.01
    assert not list(engine_dir.parent.glob(".*partial*"))  # nothing half-written next to it


def test_engine_kv_lengths_follow_the_schedule(builds, tiny_qwen_vl):
    """The KV arrays the engine's prefill really returns have the per-layer lengths of the PyTorch reference's
    cache, and the lengths the engine reports (and the manifest promises) are those."""
    result = builds("tiny-qwen-vl", 0.55)
    engine = Engine.load(result.engine_dirs["ort-cpu"])
    images, prompt = [parity_images((336, 448), 0)], result.reference.prompt
    request = engine.prepare(images, prompt)
    pre = engine.prefill(request)
    shapes = [k.shape for k in pre.keys]
    assert shapes == [v.shape for v in pre.values]
    ref = reference_run(tiny_qwen_vl, engine, images, prompt, max_new_tokens=4)
    text = tiny_qwen_vl.text_config
    hkv, head_dim = text.num_key_value_heads, text.hidden_size // text.num_attention_heads
    assert shapes == [(1, hkv, n, head_dim) for n in ref.kv_lengths]  # the arrays, not a bookkeeping list
    gen = engine.generate(images, prompt, max_new_tokens=4)
    assert gen.kv_lengths == ref.kv_lengths == result.reference.kv_lengths
    assert gen.token_ids == ref.tokens
    # Layers up to the first stage hold the whole prompt; every stage removes tokens, and only vision tokens.
    first = result.schedule.stages[0].layer
    assert ref.kv_lengths[:first] == [request.seq_len] * first
    vision_in = sum(s.length for s in request.spans[0])
    assert request.seq_len - vision_in < ref.kv_lengths[-1] < ref.kv_lengths[first]
    assert gen.vision_tokens_per_group == [v for _, v in ref.vision_tokens_per_group]
    assert gen.vision_tokens_per_group[-1] < vision_in // 4  # three halvings of 192
    per_token = 2 * hkv * head_dim * 4  # K and V, float32
    assert gen.kv_bytes == sum(ref.kv_lengths) * per_token == ref.kv_bytes < request.seq_len * per_token * len(shapes)


def test_ratio_zero_engine_generates_like_hugging_face(builds, tiny_qwen_vl):
    result = builds("tiny-qwen-vl", 0.0)
    engine = Engine.load(result.engine_dirs["ort-cpu"])
    image = parity_images((336, 448), 5)
    prompt = "What is in the picture?"
    gen = engine.generate([image], prompt, max_new_tokens=8)
    assert set(gen.kv_lengths) == {gen.kv_lengths[0]}  # nothing merged anywhere
    processed = tiny_qwen_vl.family.process(tiny_qwen_vl.processor, [image], prompt)
    with torch.no_grad():
        out = tiny_qwen_vl.model.generate(**processed, max_new_tokens=8, do_sample=False)
    hf_tokens = out[0, processed["input_ids"].shape[1] :].tolist()
    assert hf_tokens and gen.token_ids == hf_tokens  # the whole generation, up to the same EOS or 8 tokens


def test_vanilla_engine_and_official_compat(builds):
    vanilla = builds("tiny-qwen-vl", None, vanilla=True)
    assert vanilla.parity["ort-cpu"].passed, "\n".join(vanilla.parity["ort-cpu"].failure_lines())
    assert vanilla.engine_dirs["ort-cpu"].parent.name == "vanilla"
    official = builds("tiny-qwen2-vl", 0.55, compat="official")
    assert official.parity["ort-cpu"].passed, "\n".join(official.parity["ort-cpu"].failure_lines())
    manifest = json.loads((official.engine_dirs["ort-cpu"] / "manifest.json").read_text())
    assert (manifest["positions"], manifest["grid_mode"]) == ("official", "official")


def test_runtime_rejects_bad_requests(builds):
    engine = Engine.load(builds("tiny-qwen-vl", 0.55).engine_dirs["ort-cpu"])
    image = parity_images((336, 448), 0)
    with pytest.raises(InputError, match="prompt is empty"):
        engine.generate([image], "  ")
    with pytest.raises(InputError, match="no image"):
        engine.generate([], "Describe.")
    with pytest.raises(InputError, match="max_new_tokens"):
        engine.generate([image], "Describe.", max_new_tokens=10_000)
    with pytest.raises(InputError, match="accepts aspect ratios up to 200"):
        engine.generate([parity_images((3, 900), 0)], "Describe.")
    with pytest.raises(InputError, match="not an engine directory"):
        Engine.load(engine.directory.parent)


def test_export_cache_is_reused_for_another_ratio(builds, engines_out):
    """Another ratio is only a transform: the cached export is reused, not written again (a corrupt one is rebuilt:
    test_cli_detects_a_corrupt_cached_export_and_rebuilds_it)."""
    builds("tiny-qwen-vl", 0.55)
    (cache,) = (engines_out / ".cache" / "export").glob("tiny-qwen-vl-*")
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    logs: list[str] = []

    class Console:  # Progress prints through console.print / console.status
        def print(self, message: str) -> None:
            logs.append(message)

        def status(self, message: str):
            return contextlib.nullcontext()

    run(BuildConfig(model="tiny-qwen-vl", ratio=0.5, out=engines_out, parity=False), console=Console())
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == stamps  # not exported again
    assert any("reusing cached export" in line for line in logs)


def test_cli_detects_a_corrupt_cached_export_and_rebuilds_it(builds, engines_out, tmp_path):
    """A cached graph damaged in place (bit rot, a half-finished copy): the CLI notices by hash and exports again,
    in another process, byte for byte the graphs and engine of the first export (no paths, stack traces or dict
    orders leak into them)."""
    import shutil

    from lightkv_export.artifacts import file_digest
    from lightkv_export.export import graph_digest

    builds("tiny-qwen-vl", 0.55)
    (cache,) = (engines_out / ".cache" / "export").glob("tiny-qwen-vl-*")
    out = tmp_path / "out"
    copy = out / ".cache" / "export" / cache.name
    shutil.copytree(cache, copy)  # a separate cache, damaged below
    with open(copy / "decode.onnx", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00" * 64)
    proc = cli("--model", "tiny-qwen-vl", "--ratio", "0.55", "--no-parity", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "is corrupt (hash mismatch): exporting again" in " ".join(proc.stderr.split())
    meta = json.loads((copy / "export.json").read_text())
    assert all(graph_digest(copy / f"{g}.onnx") == meta["sha256"][g] for g in ("vision", "embed", "prefill", "decode"))
    assert sorted(copy.iterdir()) and all(  # the re-export is the first export, file for file
        file_digest(f) == file_digest(cache / f.name) for f in copy.iterdir() if f.is_file()
    ), "a re-export differs from the first one"
    engine = out / "tiny-qwen-vl" / "r0.55" / "ort-cpu"
    first = builds("tiny-qwen-vl", 0.55).engine_dirs["ort-cpu"]
    graphs = [p.name for p in first.glob("*.onnx")]
    assert len(graphs) == 4 and all(file_digest(engine / g) == file_digest(first / g) for g in graphs)


def test_interrupted_build_leaves_no_engine_directory(builds, engines_out, monkeypatch):
    builds("tiny-qwen-vl", 0.55)  # export cached
    from lightkv_export.passes import share_weights as share_pass

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(share_pass, "share_weights", interrupted)  # the ort-cpu writer, mid-engine
    with pytest.raises(KeyboardInterrupt):
        run(BuildConfig(model="tiny-qwen-vl", ratio=0.45, out=engines_out, parity=False))
    parent = engines_out / "tiny-qwen-vl" / "r0.45"
    assert not (parent / "ort-cpu").exists()
    assert not list(parent.glob(".*"))


def test_mrope_positions_match_transformers(tiny_qwen_vl):
    from lightkv_export.method.spans import VisionSpan

    images = [parity_images((336, 448), 0), parity_images((224, 168), 1)]
    processed = tiny_qwen_vl.family.process(tiny_qwen_vl.processor, images, "Compare them.")
    want, delta = tiny_qwen_vl.model.model.get_rope_index(
        processed["input_ids"], mm_token_type_ids=processed["mm_token_type_ids"],
        image_grid_thw=processed["image_grid_thw"], attention_mask=processed["attention_mask"],
    )  # fmt: skip
    spans = tiny_qwen_vl.family.spans(tiny_qwen_vl.processor, processed, int(tiny_qwen_vl.model.config.image_token_id))
    assert all(isinstance(s, VisionSpan) for s in spans[0]) and len(spans[0]) == 2
    got, got_delta = MROPE.host(processed["input_ids"].shape[1], spans[0])
    np.testing.assert_array_equal(got, want[:, 0].numpy())
    assert got_delta == int(delta)


def cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": "/nonexistent-hf-cache"}
    return subprocess.run(
        [sys.executable, str(ROOT / "build.py"), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def main_in_process(capsys, *args: str) -> tuple[int, str]:
    """(exit code, stderr) of build.main(args) in this process: what `python build.py ARGS` prints and returns."""
    import build

    capsys.readouterr()
    code = build.main(list(args))
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "no-such-model"], "unknown model"),
        (["--model", "qwen-vl"], "not in the local Hugging Face cache"),
        (["--model", "llava"], "llava-hf/llava-1.5-7b-hf (model 'llava') is not in the local Hugging Face cache"),
        (["--model", "/nonexistent/checkpoint"], "neither a model key nor a checkpoint directory"),
        (["--ratio", "0.05"], "cannot be reached"),
        (["--target", "cuda"], "unknown target"),
        (["--target", "trt-sm75"], "unknown target 'trt-sm75'; expected one of"),  # no kernels for sm75
        (["--ratio", "1.5"], "--ratio 1.5 is not a fraction in [0, 1]"),
        (["--ratio", "-0.2"], "--ratio -0.2 is not a fraction in [0, 1]"),
        (["--ratio", "nan"], "--ratio nan is not a fraction in [0, 1]"),
        (["--image-size", "0x0"], "image 0x0 (width x height) is empty"),
        (["--image-size", "big"], "WIDTHxHEIGHT"),
        (["--schedule", "3:2"], "LAYER:WINDOWS:RATIO"),
        (["--dtype", "int8"], "unknown dtype"),
    ],
)
def test_cli_bad_input_is_one_clear_message(tmp_path, args, message, capsys):
    """Through build.main in this process (each would cost a 5 s interpreter start as a subprocess); the hub-cache
    cases run build.py as a process, where HF_HUB_CACHE can point nowhere, and show the whole CLI exits 2 with no
    traceback."""
    if args[-1] in ("qwen-vl", "llava"):
        proc = cli(*args, "--out", str(tmp_path / "engines"))
        code, stderr = proc.returncode, proc.stderr
    else:
        code, stderr = main_in_process(capsys, *args, "--out", str(tmp_path / "engines"))
    assert code == 2, stderr
    assert message in " ".join(stderr.split()), stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "engines" / "tiny-qwen-vl").exists()
    assert not (tmp_path / "engines" / ".cache").exists()  # refused before the (expensive) export


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--out", "{blocker}/engines"], "--out"),  # under a file
        (["--out", "/proc/lightkv-engines"], "--out"),  # os.access says yes to root here; mkdir says no
        (["--triton-repo", "{blocker}"], "--triton-repo"),  # a file where the repository should go
        (["--triton-repo", "/proc/lightkv-repo"], "--triton-repo"),
    ],
)
def test_cli_unwritable_output(tmp_path, args, option, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    args = [a.format(blocker=blocker) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "engines")]
    code, stderr = main_in_process(capsys, *args, *out)
    message = " ".join(stderr.split())
    assert code == 2, stderr
    assert f"Choose another {option}" in message and "Traceback" not in stderr
    assert "load" not in message  # refused before the model was loaded
    assert blocker.read_text() == "not a directory"


def test_cli_turns_an_unforeseen_os_error_into_one_message(tmp_path, monkeypatch, capsys):
    """A file-system failure no check foresaw (the disk fills mid-build): one line, exit 2, no traceback."""
    import errno

    from lightkv_export import pipeline

    def disk_full(config, console=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "prefill.onnx"))

    monkeypatch.setattr(pipeline, "run", disk_full)
    monkeypatch.syspath_prepend(str(ROOT))
    import build

    assert build.main(["--out", str(tmp_path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"error: No space left on device ({tmp_path / 'prefill.onnx'})" in err and "Traceback" not in err


def test_cli_builds_and_the_parity_command_rechecks(builds, engines_out):
    builds("tiny-qwen-vl", 0.55)  # the export is cached: the CLI only transforms, builds and checks
    proc = cli("--model", "tiny-qwen-vl", "--ratio", "0.55", "--out", str(engines_out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reusing cached export" in proc.stderr and "pass" in proc.stderr
    engine_dir = engines_out / "tiny-qwen-vl" / "r0.55" / "ort-cpu"
    check = subprocess.run(
        [sys.executable, "-m", "lightkv_export.parity", str(engine_dir)], capture_output=True, text=True, timeout=240
    )
    assert check.returncode == 0, check.stderr[-3000:]
    assert "parity PASS" in check.stderr and "skipped" not in check.stderr
    checks = json.loads((engine_dir / "parity.json").read_text())["checks"]
    assert any(c["output"] == "vanilla-export-logits" for c in checks)  # found the cached export by export_key


def test_parity_command_says_when_the_vanilla_export_is_gone(builds, tmp_path):
    """An engine moved away from its build output: the identity check against the vanilla export cannot run,
    and the report says so instead of passing silently."""
    import shutil

    engine_dir = tmp_path / "elsewhere" / "tiny-qwen-vl" / "r0.55" / "ort-cpu"
    shutil.copytree(builds("tiny-qwen-vl", 0.55).engine_dirs["ort-cpu"], engine_dir)
    check = subprocess.run(
        [sys.executable, "-m", "lightkv_export.parity", str(engine_dir)], capture_output=True, text=True, timeout=240
    )
    assert check.returncode == 0, check.stderr[-3000:]
    assert "vanilla-export check was skipped" in " ".join(check.stderr.split())
    report = json.loads((engine_dir / "parity.json").read_text())
    assert any("vanilla-export check was skipped" in note for note in report["notes"])
    assert not any(c["output"] == "vanilla-export-logits" for c in report["checks"])
    assert "vanilla-export check was skipped" in (engine_dir / "report.md").read_text()


def test_parity_failure_lists_every_failing_output_and_fails_the_build(builds, engines_out, monkeypatch, capsys):
    """Impossible tolerances: build.py exits 1 and names every failing output with its errors and the tolerance
    that would have passed; --no-parity-gate reports the same failure and exits 0."""
    from lightkv_export.models.registry import get_spec
    from lightkv_export.parity import would_pass

    builds("tiny-qwen-vl", 0.55)  # export cached
    spec = get_spec("tiny-qwen-vl")
    for key in list(spec.tolerances):
        monkeypatch.setitem(spec.tolerances, key, 1e-12)
    monkeypatch.syspath_prepend(str(ROOT))
    import build

    args = ["--model", "tiny-qwen-vl", "--ratio", "0.35", "--out", str(engines_out)]
    assert build.main(args) == 1
    console = " ".join(capsys.readouterr().err.split())
    rejected = engines_out / "tiny-qwen-vl" / "r0.35" / "ort-cpu.rejected"  # kept for inspection, not promoted
    assert not (rejected.parent / "ort-cpu").exists()
    report = json.loads((rejected / "parity.json").read_text())
    assert not report["passed"]
    failing = [c for c in report["checks"] if not c["passed"]]
    assert {"model", "identity"} <= {c["level"] for c in failing}  # (the op level is exact on these inputs)
    # Failing is exactly "over the tolerance" (exact checks such as kept and greedy tokens still pass).
    assert failing == [c for c in report["checks"] if c["tolerance"] and c["max_abs"] > c["tolerance"]]
    for c in failing:
        assert c["tolerance"] == 1e-12 and c["max_abs"] <= would_pass(c["max_abs"])
        line = (
            f"{c['level']}/{c['case']}/{c['output']}: max abs {c['max_abs']:.3g}, max rel {c['max_rel']:.3g} > "
            f"tolerance 1e-12 (would pass at {would_pass(c['max_abs']):.3g})"
        )
        assert line in console, line
    assert build.main([*args, "--no-parity-gate"]) == 0
    assert "FAIL" in capsys.readouterr().err


def test_silent_noops_are_named():
    from lightkv_export.artifacts import ReferenceRequest
    from lightkv_export.method.schedule import parse_schedule
    from lightkv_export.pipeline import silent_noops

    schedule = parse_schedule("2:2:0.5,4:2:0.7,6:1:0.5", 8)

    def ref(vision_tokens: int, kv_lengths: list[int]) -> ReferenceRequest:
        return ReferenceRequest("x", kv_lengths[0], vision_tokens, [], kv_lengths, [], [], [])

    merging = ref(192, [240, 240, 144, 144, 96, 96, 72, 72])
    (capped,) = silent_noops(schedule, merging)
    assert "4:2:0.7" in capped and "2:2:0.5" not in capped and "merge 0.5" in capped
    # Stage 4:2 removes nothing (too few tokens for 2 x 2 windows); the others do.
    partly = ref(192, [240, 240, 144, 144, 144, 144, 120, 120])
    assert "stage(s) 4:2:0.7 merge anything" in silent_noops(schedule, partly)[1]
    tiny_image = ref(1, [49] * 8)
    assert "no stage merges anything" in silent_noops(schedule, tiny_image)[1]
    assert silent_noops(parse_schedule("2:2:0,4:2:0", 8), tiny_image) == []  # ratio 0 asks for nothing
    assert silent_noops(None, tiny_image) == []


def test_capped_schedule_is_a_warning_and_a_manifest_note(builds, engines_out, capsys):
    from rich.console import Console

    builds("tiny-qwen-vl", 0.55)  # export cached
    config = BuildConfig(model="tiny-qwen-vl", schedule="3:2:0.8,5:1:0.5", out=engines_out, parity=False)
    result = run(config, console=Console(stderr=True, width=200))
    notes = json.loads((result.engine_dirs["ort-cpu"] / "manifest.json").read_text())["notes"]
    assert len(notes) == 1 and "3:2:0.8" in notes[0]
    assert "warning: stage(s) 3:2:0.8" in capsys.readouterr().err


def test_tensorrt_target_without_tensorrt_fails_alone_and_keeps_its_kernels(builds, engines_out):
    builds("tiny-qwen-vl", 0.55)  # export cached
    result = run(BuildConfig(model="tiny-qwen-vl", ratio=0.5, targets=("ort-cpu", "trt-sm90"), out=engines_out,
                             parity=False))  # fmt: skip
    assert "ort-cpu" in result.engine_dirs  # the other target of the same run still builds
    error = result.failed_targets["trt-sm90"]
    assert error.exit_code == 2 and result.exit_code == 2
    assert "TensorRT" in str(error) or "CUDA GPU" in str(error)
    engine = engines_out / "tiny-qwen-vl" / "r0.5" / "trt-sm90"
    assert not engine.exists()  # nothing half-written
    from plugins.lightkv import aot

    kernels = engine.with_name("trt-sm90-kernels")
    summary = json.loads((kernels / "summary.json").read_text())
    # Every plugin kernel, compiled for sm90 in the engine's precision (float32 models run the fp16 plugin).
    assert [(k["kernel"], k["target"], k["dtype"]) for k in summary["kernels"]] == [
        (k, "sm90", "fp16") for k in aot.KERNELS
    ]
    for kernel in aot.KERNELS:
        assert (kernels / "sm90" / f"{kernel}_fp16.cubin").read_bytes()[:4] == b"\x7fELF"


def test_engine_holds_each_weight_once(builds):
    import onnx

    from lightkv_export.artifacts import file_digest
    from lightkv_export.passes.share_weights import NAME_PREFIX

    result = builds("tiny-qwen-vl", 0.55)
    engine_dir = result.engine_dirs["ort-cpu"]
    graphs = {g: onnx.load(str(engine_dir / f"{g}.onnx"), load_external_data=False) for g in ("prefill", "decode")}
    external = {
        g: {t.name for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
        for g, m in graphs.items()
    }
    # Prefill and decode refer to the same tensors in weights.bin (the q/k/v/o, MLP and LM-head weights) ...
    shared = external["prefill"] & external["decode"]
    assert len(shared) >= 7 * 2 and all(n.startswith(NAME_PREFIX) for n in shared)
    # ... which holds each once: the engine's weight bytes are the file's content, far less than two copies.
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    weights = engine_dir / "weights.bin"
    assert manifest["files"]["weights.bin"] == file_digest(weights)
    sizes = {t.name: int(dict((e.key, e.value) for e in t.external_data)["length"]) for m in graphs.values()
             for t in m.graph.initializer if t.name in shared}  # fmt: skip
    assert manifest["weight_bytes"] <= weights.stat().st_size
    assert sum(sizes.values()) <= manifest["weight_bytes"]
    for g in graphs:
        assert (engine_dir / f"{g}.onnx").stat().st_size < weights.stat().st_size / 4
    assert (
        f"| weights held at run time, bytes | | {manifest['weight_bytes']:,} |"
        in (engine_dir / "report.md").read_text()
    )


@pytest.mark.parametrize("ratio", [0.55, None])
def test_batched_generation_equals_one_request_at_a_time(builds, ratio, tiny_qwen_vl):
    result = builds("tiny-qwen-vl", ratio) if ratio is not None else builds("tiny-qwen-vl", None, vanilla=True)
    engine = Engine.load(result.engine_dirs["ort-cpu"])
    items = [
        ([parity_images((336, 448), 0)], "Describe this image."),
        ([parity_images((336, 448), 1), parity_images((200, 300), 2)], "Compare the two pictures in detail, please."),
        ([parity_images((336, 448), 3)], "Colours?"),
    ]
    batched = engine.generate_batch(items, max_new_tokens=6)
    for (images, prompt), got in zip(items, batched, strict=True):
        alone = engine.generate(images, prompt, max_new_tokens=6)
        assert got.token_ids == alone.token_ids
        assert got.kv_lengths == alone.kv_lengths  # each row's valid KV, whatever the batch padded
        assert got.kv_bytes == alone.kv_bytes and got.vision_tokens_per_group == alone.vision_tokens_per_group
        want = reference_run(tiny_qwen_vl, engine, images, prompt, max_new_tokens=6)  # PyTorch, one row at a time
        assert got.token_ids == want.tokens, prompt
        assert got.kv_lengths == want.kv_lengths, prompt
    assert len({tuple(g.kv_lengths) for g in batched}) == 3  # the rows really differ in length


def broken_copy(engine_dir: Path, where: Path, *, prefill_from: Path | None = None) -> Path:
    """A copy of an engine, optionally with another engine's prefill graph, and a manifest that lists the files
    as they now are, sealed with a fresh digest: internally consistent, but wrong."""
    import shutil

    from lightkv_export.artifacts import file_records, manifest_digest

    shutil.copytree(engine_dir, where)
    if prefill_from is not None:
        for f in prefill_from.glob("prefill.onnx*"):
            shutil.copyfile(f, where / f.name)
    manifest = json.loads((where / "manifest.json").read_text())
    records = file_records(where)
    for key in ("files", "file_sizes"):
        manifest[key] = {k: v for k, v in records[key].items() if k in manifest[key]}
    manifest["manifest_digest"] = manifest_digest(manifest)
    (where / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return where


def failing_outputs(report) -> set[tuple[str, str]]:
    return {(c.level, c.output) for c in report.checks if not c.passed}


def test_parity_fails_an_engine_whose_prefill_is_from_another_schedule(builds, tmp_path, tiny_qwen_vl, monkeypatch):
    from lightkv_export import integrity
    from lightkv_export.parity import run_parity

    good, other = builds("tiny-qwen-vl", 0.55), builds("tiny-qwen-vl", 0.3)
    broken = broken_copy(good.engine_dirs["ort-cpu"], tmp_path / "broken", prefill_from=other.engine_dirs["ort-cpu"])
    # The graph records its schedule: the engine is refused before any check (tests/unit/test_manifest_integrity.py).
    with pytest.raises(InputError, match=f"field schedule is '{good.schedule}', but the engine's graphs say"):
        run_parity(broken, loaded=tiny_qwen_vl)
    # Without that record, parity's own checks still fail it.
    monkeypatch.setattr(integrity, "check_graphs", lambda directory, manifest: None)
    report = run_parity(broken, loaded=tiny_qwen_vl)
    assert not report.passed
    failing = failing_outputs(report)
    # Every layer whose length the two schedules disagree on fails (on its shape); the layers before either
    # schedule's first stage, and the vision encoder, are untouched, and the op level does not depend on the engine.
    lengths = zip(good.reference.kv_lengths, other.reference.kv_lengths, strict=True)
    differ = [i for i, (a, b) in enumerate(lengths) if a != b]
    first = min(good.schedule.stages[0].layer, other.schedule.stages[0].layer)
    assert differ and differ[0] == first
    assert {("model", f"kv.{i}.key") for i in differ} <= failing
    assert all(("model", f"kv.{i}.key") not in failing for i in range(first))
    assert ("model", "vision") not in failing and not any(level == "op" for level, _ in failing)
    shape_check = next(c for c in report.checks if c.output == f"kv.{differ[-1]}.key" and not c.passed)
    assert shape_check.detail.startswith("shape ")


def test_parity_fails_an_engine_that_decodes_from_the_compressed_length(builds, monkeypatch, tiny_qwen_vl, tmp_path):
    """Decode positions that continue from the compressed cache length (the classic bug) change the greedy tokens:
    parity fails on exactly the greedy checks; prefill (logits, K, V, kept) still passes."""
    import shutil

    from lightkv_export.parity import DECODE_STEPS, run_parity

    engine_dir = tmp_path / "engine"
    shutil.copytree(builds("tiny-qwen-vl", 0.55).engine_dirs["ort-cpu"], engine_dir)
    real_step = Engine.decode_step

    def compressed_positions(self, tokens, positions, cache):
        removed = cache.lengths[0] - cache.lengths[-1]  # [B] tokens LightKV took from the last layer
        return real_step(self, tokens, positions - removed, cache)

    monkeypatch.setattr(Engine, "decode_step", compressed_positions)
    report = run_parity(engine_dir, loaded=tiny_qwen_vl)
    assert not report.passed
    cases = {c.case for c in report.checks if c.level == "model"}
    assert failing_outputs(report) == {("model", f"greedy-{DECODE_STEPS}")}
    # Every request LightKV shortened continues differently; the processor's smallest image (2 x 2 tokens, fewer
    # than a stage's windows need) merges nothing, so its compressed length is its length and it still passes.
    assert {c.case for c in report.checks if not c.passed} == cases - {"min-image"}


def test_build_reports_time_and_peak_memory_per_stage(builds):
    """Every stage has its seconds and its peak resident memory (the process's high-water mark over the stage,
    reset at the stage's start: later stages can show less than earlier ones)."""
    from lightkv_export import rss

    result = builds("tiny-qwen-vl", 0.55)
    assert set(result.peak_rss) == set(result.timings) and any(s.startswith("parity") for s in result.timings)
    if not rss.reset_peak_rss():
        pytest.skip("this kernel refuses /proc/self/clear_refs: peak RSS per stage is not measurable here")
    peaks = list(result.peak_rss.values())
    assert all(isinstance(p, int) and 50 * 2**20 < p < 20 * 2**30 for p in peaks), result.peak_rss


def test_parity_holds_the_pytorch_model_or_the_engine_never_both(builds, monkeypatch, tiny_qwen_vl, tmp_path):
    """Parity computes every PyTorch reference output first, then frees the model (`release_model`), and only then
    runs the engine's language graphs: a build needs memory for one copy of the weights at a time. The released
    model's weights are on the meta device, so any later use of it would fail the run."""
    import copy
    import shutil

    from lightkv_export.parity import release_weights, run_parity

    engine_dir = tmp_path / "engine"
    shutil.copytree(builds("tiny-qwen-vl", 0.55).engine_dirs["ort-cpu"], engine_dir)
    loaded = copy.deepcopy(tiny_qwen_vl)  # the fixture's model is shared: release a copy
    events: list[str] = []
    real_prefill = Engine.prefill

    def prefill(self, *args, **kwargs):
        events.append("engine prefill")
        return real_prefill(self, *args, **kwargs)

    def release():
        events.append("release")
        release_weights(loaded)

    monkeypatch.setattr(Engine, "prefill", prefill)
    report = run_parity(engine_dir, loaded=loaded, release_model=release)
    assert report.passed, report.failure_lines()
    assert events[0] == "release" and events.count("release") == 1 and "engine prefill" in events
    assert all(p.device.type == "meta" for p in loaded.model.parameters())
