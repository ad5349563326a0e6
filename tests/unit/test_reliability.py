"""Failure behaviour (issue 10): an engine is promoted only whole and verified; damaged inputs are one clear error.

Interruptions are real signals to a real build process; a full disk is a small tmpfs where this machine lets us
mount one, and a patched writer otherwise. Every build here reuses the session's cached export (conftest.builds).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightkv_export.artifacts import file_digest, is_locked, locked, write_text_atomic
from lightkv_export.config import BuildConfig
from lightkv_export.errors import InputError
from lightkv_export.integrity import verify_engine
from lightkv_export.pipeline import run
from lightkv_export.runtime import Engine
from tests.helpers import export_entry

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory` by relative path: its SHA-256 (mtime-independent, byte-for-byte)."""
    return {p.relative_to(directory).as_posix(): file_digest(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def leftovers(out: Path) -> list[Path]:
    """Temporary directories anywhere in a build output."""
    return sorted(p for p in out.rglob("*") if p.is_dir() and (".partial-" in p.name or p.name.endswith(".tmp")))


def start_build(*args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "build.py"), *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
        text=True, env=env,
    )  # fmt: skip


def wait_for(proc: subprocess.Popen, text: str, timeout: float = 240) -> list[str]:
    """stderr lines up to and including the first one containing `text`."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if text in line:
            return lines
    proc.kill()
    raise AssertionError(f"never printed {text!r}:\n{''.join(lines)[-3000:]}")


@pytest.fixture(scope="module")
def engine_055(builds) -> Path:
    result = builds("tiny-qwen-vl", 0.55)
    assert result.exit_code == 0
    return result.engine_dirs["ort-cpu"]


# --- 1. stage, verify, then promote ------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_a_build_interrupted_during_parity_leaves_the_previous_engine_intact(engine_055, engines_out, sig):
    before = snapshot(engine_055)
    proc = start_build("--model", "tiny-qwen-vl", "--ratio", "0.55", "--out", str(engines_out))
    wait_for(proc, "parity: model level")
    proc.send_signal(sig)
    rest = proc.communicate(timeout=120)[1]
    assert snapshot(engine_055) == before  # byte for byte, manifest and parity report included
    if sig == signal.SIGKILL:  # no chance to clean up: the next build removes what it left
        (partial,) = leftovers(engines_out)
        assert partial.parent == engine_055.parent and partial.name.startswith(".ort-cpu.partial-")
        logs = []
        run(BuildConfig(model="tiny-qwen-vl", ratio=0.45, out=engines_out, parity=False), console=Recorder(logs))
        assert any(f"removed {partial}" in line for line in logs)
    else:
        assert proc.returncode == 130, rest[-2000:]
        assert "no engine was replaced" in " ".join(rest.split()) and "Traceback" not in rest
    assert leftovers(engines_out) == []
    assert not is_locked(engine_055)


class Recorder:
    """A console for pipeline.run that keeps what it prints."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines

    def print(self, message: str, **_kwargs) -> None:
        self.lines.append(str(message))

    def status(self, message: str):
        import contextlib

        return contextlib.nullcontext()


def test_a_full_disk_during_parity_leaves_the_previous_engine_intact(engine_055, engines_out, monkeypatch):
    import lightkv_export.parity as parity

    before = snapshot(engine_055)

    def disk_full(path: Path, text: str) -> None:
        if path.name == "parity.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        write_text_atomic(path, text)

    monkeypatch.setattr(parity, "write_text_atomic", disk_full)
    with pytest.raises(OSError, match="No space left"):
        run(BuildConfig(model="tiny-qwen-vl", ratio=0.55, out=engines_out))
    assert snapshot(engine_055) == before
    assert leftovers(engines_out) == []


def test_an_atomic_write_that_fails_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "parity.json"
    target.write_text('{"passed": true}\n')

    def fsync_fails(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync_fails)
    with pytest.raises(OSError):
        write_text_atomic(target, '{"passed": false, "checks": [' + "0, " * 10000 + "0]}\n")
    assert target.read_text() == '{"passed": true}\n' and [p.name for p in tmp_path.iterdir()] == ["parity.json"]


def mount_tmpfs(mount: Path, size: int) -> None:
    """A tmpfs of `size` bytes at `mount`: writes past it fail with ENOSPC, as on a full disk."""
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()}); the patched-writer test covers it")


def test_a_full_disk_while_writing_the_engine_is_one_message_and_keeps_the_old_one(engine_055, tmp_path):
    entry = export_entry(engine_055)
    engine_bytes = sum(p.stat().st_size for p in engine_055.rglob("*") if p.is_file())
    cache_bytes = sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())
    disk = tmp_path / "small-disk"
    mount_tmpfs(disk, cache_bytes + engine_bytes + engine_bytes // 3 + (1 << 20))  # a second engine cannot fit
    try:
        out = disk / "engines"
        shutil.copytree(entry, out / ".cache" / "export" / entry.name)
        old = out / "tiny-qwen-vl" / "r0.55" / "ort-cpu"
        shutil.copytree(engine_055, old)
        before = snapshot(old)
        proc = start_build("--model", "tiny-qwen-vl", "--ratio", "0.55", "--out", str(out))
        err = proc.communicate(timeout=240)[1]
        assert proc.returncode == 2, err[-3000:]
        message = " ".join(err.split())
        assert "No space left on device" in message and "has free space" in message and "Traceback" not in err
        assert snapshot(old) == before
        assert leftovers(out) == []
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_failing_parity_does_not_replace_the_engine(engine_055, engines_out, monkeypatch):
    from lightkv_export.models.registry import get_spec

    before = snapshot(engine_055)
    spec = get_spec("tiny-qwen-vl")
    for key in list(spec.tolerances):
        monkeypatch.setitem(spec.tolerances, key, 1e-12)
    logs: list[str] = []
    result = run(BuildConfig(model="tiny-qwen-vl", ratio=0.55, out=engines_out), console=Recorder(logs))
    assert result.exit_code == 1
    rejected = engine_055.with_name("ort-cpu.rejected")
    assert result.engine_dirs["ort-cpu"] == rejected and snapshot(engine_055) == before
    assert not json.loads((rejected / "parity.json").read_text())["passed"]
    assert any("was not replaced" in line and str(rejected) in line for line in logs)
    shutil.rmtree(rejected)


def test_an_engine_that_fails_its_check_request_is_not_promoted(engine_055, engines_out, monkeypatch):
    """Parity passes, but the real request through the staged engine holds other KV lengths than the manifest
    promises (here: a manifest planned for other lengths): exit 1, the old engine untouched, nothing promoted."""
    from lightkv_export import pipeline

    real = pipeline.reference_request

    def planned_wrong(*args, **kwargs):
        ref = real(*args, **kwargs)
        return dataclasses.replace(ref, kv_lengths=[n + 1 for n in ref.kv_lengths])

    monkeypatch.setattr(pipeline, "reference_request", planned_wrong)
    before = snapshot(engine_055)
    result = run(BuildConfig(model="tiny-qwen-vl", ratio=0.55, out=engines_out))
    error = result.failed_targets["ort-cpu"]
    assert result.exit_code == error.exit_code == 1 and "ort-cpu" not in result.engine_dirs
    assert "the engine's KV lengths per layer" in str(error) and "differ from the planned" in str(error)
    assert snapshot(engine_055) == before
    assert leftovers(engines_out) == [] and not engine_055.with_name("ort-cpu.rejected").exists()


def test_what_killed_builds_left_is_removed_by_the_next_one(tmp_path):
    """SIGKILL leaves staging directories behind: an engine's, an export cache entry's, a repository's (and, from
    versions before locking, `<key>.tmp`). The next build removes those whose owner is gone, not a live one's."""
    from lightkv_export.artifacts import remove_stale_partials, remove_stale_under
    from lightkv_export.parity import EXPORT_CACHE

    out = tmp_path / "out"
    dead = [
        out / "m" / "r0.5" / ".ort-cpu.partial-4242",
        out / EXPORT_CACHE / ".m-0123.partial-4242",
        out / EXPORT_CACHE / "m-0123.tmp",
    ]
    live = out / "m" / "r0.5" / ".trt-sm90.partial-4343"
    for d in (*dead, live):
        d.mkdir(parents=True)
        (d / "half.onnx").write_bytes(b"\0" * 10)
    with locked(live.with_name("trt-sm90"), what="an engine"):  # a build that is still running
        assert sorted(remove_stale_under(out, EXPORT_CACHE)) == sorted(dead)
    assert not any(d.exists() for d in dead) and live.is_dir()
    repo = tmp_path / "repo"
    stale_repo = tmp_path / ".repo.partial-4242"
    stale_repo.mkdir()
    assert remove_stale_partials(repo) == [stale_repo] and not stale_repo.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--image-size", "20000x56"],
            "image 20000x56 (width x height) has an aspect ratio of 357.1; the processor accepts at most 200",
        ),
        (["--image-size", "0x56"], "image 0x56 (width x height) is empty"),
        (["--max-image-pixels", "0"], "--max-image-pixels 0 is not a positive number of pixels"),
        (["--max-image-pixels", "1000"], "--max-image-pixels 1000 is below the processor's min_pixels 3136"),
        (
            ["--model", "tiny-llava", "--max-image-pixels", "1000"],
            "below 224x224 = 50176: this model's processor crops",
        ),
    ],
)
def test_images_the_model_cannot_take_are_refused_before_any_work(tmp_path, monkeypatch, capsys, args, message):
    """Any image size the processor takes is served as it sizes it; a reference image it refuses, or a pixel cap
    the processor cannot honour, is exit 2 with the reason, before any export."""
    monkeypatch.syspath_prepend(str(ROOT))
    import build

    out = tmp_path / "engines"
    model = [] if "--model" in args else ["--model", "tiny-qwen-vl"]
    assert build.main([*model, *args, "--out", str(out)]) == 2
    assert message in " ".join(capsys.readouterr().err.split())
    assert not out.exists() or list(out.iterdir()) == []  # no export, no engine


# --- one engine per source; independent files; locks; --out ----------------------------------------------------


def test_two_checkpoints_with_the_same_name_are_two_engines(tiny_qwen2_vl, tmp_path):
    from lightkv_export.models.registry import load_model

    for where in ("a", "b"):
        tiny_qwen2_vl.model.save_pretrained(tmp_path / where / "ckpt")
        tiny_qwen2_vl.processor.save_pretrained(tmp_path / where / "ckpt")
    a, b = (load_model(str(tmp_path / w / "ckpt")) for w in ("a", "b"))
    assert a.spec.dir_name != b.spec.dir_name and a.spec.dir_name.startswith("ckpt-")
    again = load_model(str(tmp_path / "a" / ".." / "a" / "ckpt"))  # the same folder spelled otherwise
    assert again.spec.dir_name == a.spec.dir_name
    assert BuildConfig(model=str(tmp_path / "a" / "ckpt")).engine_tag() == "r0.55"  # OUT/<dir_name>/r0.55/...


def test_engine_files_are_independent_of_the_cache_and_of_each_other(builds, engine_055):
    other = builds("tiny-qwen-vl", 0.3).engine_dirs["ort-cpu"]
    entry = export_entry(engine_055)
    for name in ("vision.onnx", "embed.onnx", "decode.onnx"):
        inodes = {(p / name).stat().st_ino for p in (engine_055, other, entry)}
        assert len(inodes) == 3 and all((p / name).stat().st_nlink == 1 for p in (engine_055, other, entry))
    copy = engine_055.parent / "scratch"
    shutil.copytree(other, copy)
    before = snapshot(other), snapshot(entry)
    with open(copy / "vision.onnx", "r+b") as f:  # a write through one engine's path
        f.seek(100)
        f.write(b"\xff" * 16)
    assert (snapshot(other), snapshot(entry)) == before
    shutil.rmtree(copy)


def test_a_second_build_waits_for_the_lock_and_reuses_the_cache(engine_055, engines_out):
    entry = export_entry(engine_055)
    with locked(entry, what="the export cache entry"):  # as a concurrent build holds it while exporting
        proc = start_build("--model", "tiny-qwen-vl", "--ratio", "0.5", "--no-parity", "--out", str(engines_out))
        lines = wait_for(proc, "waiting for another build")
        assert f"pid {os.getpid()}" in lines[-1]
        time.sleep(1.0)
        assert proc.poll() is None  # still waiting
    err = proc.communicate(timeout=240)[1]
    assert proc.returncode == 0, err[-3000:]
    assert "reusing cached export" in err
    verify_engine(engines_out / "tiny-qwen-vl" / "r0.5" / "ort-cpu")


def test_out_inside_an_engine_directory_is_refused(engine_055, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT))
    import build

    before = snapshot(engine_055)
    for out in (engine_055, engine_055 / "processor" / "more"):
        assert build.main(["--out", str(out)]) == 2
        assert f"inside the engine directory {engine_055}" in " ".join(capsys.readouterr().err.split())
    assert snapshot(engine_055) == before and not (engine_055 / "processor" / "more").exists()


# --- 2. damaged engines and checkpoints ----------------------------------------------------------------------


def damage_bitflip(d: Path) -> str:
    with open(d / "prefill.onnx", "r+b") as f:
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 0x01]))
    return "prefill.onnx does not match its SHA-256"


def damage_delete(d: Path) -> str:
    (d / "decode.onnx").unlink()
    return "decode.onnx is missing"


def damage_truncate(d: Path) -> str:
    with open(d / "prefill.onnx", "r+b") as f:
        f.truncate(1000)
    return "prefill.onnx has 1,000 bytes"


def damage_zero_hashes(d: Path) -> str:
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["files"] = dict.fromkeys(manifest["files"], "0" * 64)
    (d / "manifest.json").write_text(json.dumps(manifest))
    return "decode.onnx does not match its SHA-256"  # the first file, in name order


@pytest.mark.parametrize("damage", [damage_bitflip, damage_delete, damage_truncate, damage_zero_hashes])
def test_a_damaged_engine_is_refused_naming_the_file(engine_055, tmp_path, damage):
    copy = tmp_path / "engine"
    shutil.copytree(engine_055, copy)
    expected = damage(copy)
    with pytest.raises(InputError, match=r"rebuild it with build\.py") as err:
        Engine.load(copy)
    assert expected in str(err.value) and str(copy) in str(err.value)
    if damage is damage_bitflip:  # the size is right: only the full hash sees it, and the flag says so
        Engine.load(copy, full_hash=False)
        proc = subprocess.run(
            [sys.executable, "-m", "lightkv_export.parity", str(copy)], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2 and expected in " ".join(proc.stderr.split()) and "Traceback" not in proc.stderr


def write_checkpoint(loaded, path: Path) -> Path:
    loaded.model.save_pretrained(path)
    loaded.processor.save_pretrained(path)
    return path


def truncate_weights(d: Path) -> str:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return "cannot be read (SafetensorError"


def drop_layers(d: Path) -> str:
    config = json.loads((d / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 6
    config["text_config"]["layer_types"] = config["text_config"]["layer_types"][:6]
    (d / "config.json").write_text(json.dumps(config))
    return "do not match its config.json: 24 unexpected keys"


def contradictory_config(d: Path) -> str:
    config = json.loads((d / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 10
    (d / "config.json").write_text(json.dumps(config))
    return "config.json is inconsistent"


def garbage_tokenizer(d: Path) -> str:
    (d / "tokenizer.json").write_text("{this is not json")
    return "the tokenizer files in"


def pickled_weights(d: Path) -> str:
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    return "holds only pickled weights (pytorch_model.bin)"


@pytest.mark.parametrize("damage", [truncate_weights, drop_layers, contradictory_config, garbage_tokenizer,
                                    pickled_weights])  # fmt: skip
def test_a_damaged_checkpoint_is_one_message(tiny_qwen2_vl, tmp_path, damage):
    from lightkv_export.models.registry import load_model

    path = write_checkpoint(tiny_qwen2_vl, tmp_path / "ckpt")
    expected = damage(path)
    with pytest.raises(InputError) as err:
        load_model(str(path))
    assert expected in " ".join(str(err.value).split())
    assert err.value.exit_code == 2


def test_a_damaged_checkpoint_through_the_cli_is_exit_2_without_a_traceback(tiny_qwen2_vl, tmp_path):
    path = write_checkpoint(tiny_qwen2_vl, tmp_path / "ckpt")
    truncate_weights(path)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "build.py"), "--model", str(path), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "damaged or incomplete" in " ".join(proc.stderr.split())


# --- 4. reproducible builds --------------------------------------------------------------------------------------


def test_the_transform_twice_in_one_process_is_byte_identical(builds):
    from lightkv_export.export import _graphs
    from lightkv_export.method.schedule import parse_schedule
    from lightkv_export.targets.ort import transform_prefill

    entry = export_entry(builds("tiny-qwen-vl", 0.55).engine_dirs["ort-cpu"])
    exported = _graphs(entry, json.loads((entry / "export.json").read_text()))
    schedule = parse_schedule("3:2:0.5,4:2:0.5,7:1:0.5", 8)
    graphs = [transform_prefill(exported, schedule, positions="preserve", grid_mode="true")[0] for _ in range(3)]
    assert len({g.SerializeToString() for g in graphs}) == 1


def test_force_exports_again_instead_of_reusing_the_cache(engine_055, tmp_path, monkeypatch):
    """--force removes the cached export before exporting (that a re-export is byte for byte the first one is
    test_build.test_cli_detects_a_corrupt_cached_export_and_rebuilds_it, which re-exports in another process)."""
    from lightkv_export import pipeline

    entry = export_entry(engine_055)
    out = tmp_path / "out"
    copy = out / ".cache" / "export" / entry.name
    shutil.copytree(entry, copy)
    seen = []

    def export_model(loaded, cache, **kwargs):
        seen.append(sorted(p.name for p in cache.iterdir()))
        raise KeyboardInterrupt  # no export needed: what mattered is what it found

    monkeypatch.setattr(pipeline, "export_model", export_model)
    with pytest.raises(KeyboardInterrupt):
        run(BuildConfig(model="tiny-qwen-vl", ratio=0.55, out=out, force=True, parity=False), Recorder([]))
    assert seen == [[]] and not copy.exists()  # the intact cached export was removed, not reused


def test_an_export_with_external_weights_builds_the_same_engine_without_loading_them(builds, tmp_path):
    """Large models export with their weights as external data: the transform reads structure only (the weights
    stay on disk) and the engine writer streams them into weights.bin. The engine is byte for byte the one built
    from the same export with inline weights."""
    import onnx

    from lightkv_export.artifacts import PROCESSOR_DIR, WEIGHTS_FILE, read_manifest
    from lightkv_export.export import _graphs
    from lightkv_export.method.schedule import parse_schedule
    from lightkv_export.models.registry import load_processor
    from lightkv_export.targets.ort import GRAPHS, transform_prefill, write_ort_engine

    engine = builds("tiny-qwen-vl", 0.55).engine_dirs["ort-cpu"]
    entry = export_entry(engine)
    exported = _graphs(entry, json.loads((entry / "export.json").read_text()))
    moved = tmp_path / "export"
    moved.mkdir()
    for name in GRAPHS:
        graph = onnx.load(str(getattr(exported, name)))
        onnx.save(graph, str(moved / f"{name}.onnx"), save_as_external_data=True, location=f"{name}.onnx.data",
                  size_threshold=1024)  # fmt: skip
    external = dataclasses.replace(exported, directory=moved, **{n: moved / f"{n}.onnx" for n in GRAPHS})
    manifest = read_manifest(engine)
    schedule = parse_schedule(manifest.schedule, manifest.num_layers)
    prefill, _ = transform_prefill(external, schedule, positions=manifest.positions, grid_mode=manifest.grid_mode)
    on_disk = [t for t in prefill.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(on_disk) >= 7 * manifest.num_layers and not any(t.raw_data for t in on_disk)  # never loaded
    out = tmp_path / "engine"
    out.mkdir()
    processor = load_processor(engine / PROCESSOR_DIR, manifest.family)
    written = write_ort_engine(out, exported=external, prefill=prefill, processor=processor, manifest=manifest)
    assert written.weight_bytes == manifest.weight_bytes
    for name in (*GRAPHS, WEIGHTS_FILE):
        suffix = "" if name == WEIGHTS_FILE else ".onnx"
        assert (out / f"{name}{suffix}").read_bytes() == (engine / f"{name}{suffix}").read_bytes(), name
