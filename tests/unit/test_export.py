"""The vanilla export: the decode graph in a freshly started worker process (never a fork), locking, staging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from lightkv_export import export
from lightkv_export.artifacts import file_digest, is_locked
from lightkv_export.export import PARALLEL_EXPORT_MAX_BYTES, ModelSource, parallel_export_ok, wait_worker

ROOT = Path(__file__).resolve().parents[2]

# A process that holds live ONNX Runtime sessions (intra-op thread pools) and torch threads, then exports: a
# forked child of such a process could deadlock freeing the sessions' thread pools (issue 16).
LIVE_SESSIONS_EXPORT = """
import sys, numpy as np, onnx, onnxruntime as ort, torch
from onnx import TensorProto, helper
from pathlib import Path
from lightkv_export.export import ModelSource, export_model
from lightkv_export.models.registry import load_model

x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [256, 256])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [256, 256])
graph = helper.make_graph([helper.make_node("MatMul", ["x", "x"], ["y"])], "g", [x], [y])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
options = ort.SessionOptions()
options.intra_op_num_threads = 2
sessions = [ort.InferenceSession(model.SerializeToString(), options) for _ in range(3)]
for s in sessions:
    s.run(None, {"x": np.ones((256, 256), np.float32)})
torch.ones(512, 512) @ torch.ones(512, 512)  # torch's thread pool is up too
loaded = load_model("tiny-qwen-vl")
logs = []
exported = export_model(loaded, Path(sys.argv[1]), dtype=torch.float32,
                        source=ModelSource("tiny-qwen-vl"), log=logs.append)
print("\\n".join(logs))
print("DIR", exported.directory)
"""


def test_an_export_from_a_process_with_live_sessions_finishes_with_the_same_graphs(tmp_path, tiny_qwen_vl):
    proc = subprocess.run(
        [sys.executable, "-c", LIVE_SESSIONS_EXPORT, str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exporting it in this process" not in proc.stdout  # the worker did the decode graph
    directory = Path(proc.stdout.split("DIR ")[-1].strip())
    meta = json.loads((directory / "export.json").read_text())
    assert sorted(p.name for p in directory.iterdir()) == ["decode.onnx", "embed.onnx", "export.json",
                                                           "prefill.onnx", "vision.onnx"]  # fmt: skip
    assert not list(directory.parent.glob(".*partial*"))
    # The worker's graph is byte for byte the one this process exports itself.
    text, head = tiny_qwen_vl.family.text_model(tiny_qwen_vl.model), tiny_qwen_vl.family.lm_head(tiny_qwen_vl.model)
    export.export_decode(
        text, head, tmp_path / "decode.onnx", dtype=torch.float32, positions=tiny_qwen_vl.family.positions
    )
    assert file_digest(tmp_path / "decode.onnx") == file_digest(directory / "decode.onnx") == meta["sha256"]["decode"]


def test_a_silent_worker_is_stopped_at_the_deadline(tmp_path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    start = time.monotonic()
    why = wait_worker(sleeper, tmp_path / "log", deadline=time.monotonic() + 0.5)
    assert time.monotonic() - start < 10
    assert "gave no answer" in why and "LIGHTKV_EXPORT_TIMEOUT_S" in why
    assert sleeper.returncode is not None  # stopped and reaped, not left running


def test_a_failed_worker_says_why(tmp_path) -> None:
    log = tmp_path / "log"
    log.write_text("Traceback ...\nValueError: the decode graph did not export\n")
    worker = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
    assert wait_worker(worker, log, time.monotonic() + 60) == (
        "it exited with code 1: ValueError: the decode graph did not export"
    )


def worker(spec: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lightkv_export.export_worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def test_the_worker_refuses_a_model_that_is_not_the_parents(tmp_path) -> None:
    spec = {"model": "tiny-qwen-vl", "random_weights": False, "dtype": "float32",
            "key": "0123456789abcdef", "path": str(tmp_path / "decode.onnx"), "parent": os.getpid()}  # fmt: skip
    proc = worker(spec)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "the parent has 0123456789abcdef" in proc.stderr
    assert not (tmp_path / "decode.onnx").exists()
    gone = worker({**spec, "parent": 1})  # its parent is not this process: it exits before loading anything
    assert gone.returncode == 4 and "gone" in gone.stderr


def test_an_interrupted_export_stops_its_worker_and_leaves_nothing(tmp_path, tiny_qwen_vl, monkeypatch) -> None:
    started = []
    real_start = export.start_worker
    monkeypatch.setattr(export, "start_worker", lambda *a: started.append(real_start(*a)) or started[-1])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "export_vision", interrupted)
    monkeypatch.setattr(export, "parallel_export_ok", lambda model, source: True)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        export.export_model(tiny_qwen_vl, cache, dtype=torch.float32, source=ModelSource("tiny-qwen-vl"))
    (proc,) = started
    assert proc.returncode is not None  # killed and reaped at once, not waited for
    key = export.export_key(tiny_qwen_vl, dtype=torch.float32)
    entry = cache / f"{tiny_qwen_vl.spec.dir_name}-{key}"
    assert list(cache.iterdir()) == []  # no partial export, no worker log, no lock file
    assert not is_locked(entry)


def test_parallel_only_for_small_models_with_a_source(monkeypatch: pytest.MonkeyPatch) -> None:
    small, source = torch.nn.Linear(4, 4), ModelSource("tiny-qwen-vl")
    assert parallel_export_ok(small, source) == ((os.cpu_count() or 1) >= 2)
    assert not parallel_export_ok(small, None)  # nothing to load the model from in another process
    big = torch.nn.Linear(1, 1)
    big.weight = torch.nn.Parameter(torch.empty(PARALLEL_EXPORT_MAX_BYTES // 4 + 1, device="meta"))
    assert not parallel_export_ok(big, source)
    monkeypatch.setenv("LIGHTKV_EXPORT_PARALLEL", "0")
    assert not parallel_export_ok(small, source)


def test_the_export_key_ignores_what_saving_a_checkpoint_writes(tmp_path, tiny_qwen2_vl) -> None:
    """save_pretrained sets `architectures` on the config in place: that must not change the key (a suite that
    saved a checkpoint once made every later build in the process export again), and the checkpoint, loaded back,
    is the same model with the same key. What changes a graph still changes it."""
    from lightkv_export.models.registry import load_model

    def key(loaded, dtype=torch.float32):
        return export.export_key(loaded, dtype=dtype)

    before, config = key(tiny_qwen2_vl), tiny_qwen2_vl.model.config
    architectures = getattr(config, "architectures", None)
    try:
        tiny_qwen2_vl.model.save_pretrained(tmp_path / "ckpt")
        tiny_qwen2_vl.processor.save_pretrained(tmp_path / "ckpt")
        assert config.architectures == ["Qwen2VLForConditionalGeneration"]  # changed in place
        assert key(tiny_qwen2_vl) == before
    finally:
        config.architectures = architectures
    assert key(load_model(str(tmp_path / "ckpt"))) == before
    assert key(tiny_qwen2_vl, torch.float16) != before


def test_an_exported_modules_weights_are_freed_once_it_is_released(tmp_path: Path) -> None:
    """onnxscript's rewrite rules keep the last graph, node and match they saw (and so the exported graph, whose
    initializers wrap the module's parameters): the export drops those references, so releasing the model frees
    its weights (the build's check request held 6 GiB of Qwen2-VL-2B's text weights without this)."""
    import gc
    import weakref

    from lightkv_export.models.registry import build_seeded, get_family, get_spec
    from lightkv_export.parity import release_weights

    family = get_family(get_spec("tiny-qwen-vl").family)
    config, _ = family.tiny_preset()
    model = build_seeded(family, config, torch.float32)  # not the cached preset: this one is released
    text, head = family.text_model(model), family.lm_head(model)
    weight = weakref.ref(text.layers[0].mlp.up_proj.weight)  # .to("meta") replaces it: only others could hold it
    export.export_prefill(text, head, tmp_path / "prefill.onnx", dtype=torch.float32, positions=family.positions)
    assert (tmp_path / "prefill.onnx").stat().st_size > text.layers[0].mlp.up_proj.weight.numel() * 4
    release_weights(types.SimpleNamespace(model=model))
    gc.collect()
    assert weight() is None, "something still holds the exported module's weights"
