"""Model repository writer: golden config.pbtxt files, names, atomic writes; the request codec; client arguments.

Regenerate the goldens after an intended change: UPDATE_GOLDEN=1 pytest tests/unit/test_triton_repo.py
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import tritonclient
from google.protobuf import text_format
from PIL import Image

from lightkv_export import client, triton_repo
from lightkv_export.errors import InputError
from lightkv_export.triton_backend import codec

GOLDEN = Path(__file__).parent / "golden"
MANIFESTS = {
    "ort_cpu_lightkv": {
        "model": "tiny-qwen-vl",
        "target": "ort-cpu",
        "ratio": 0.55,
        "schedule": "layers 1,3; windows 2; ratios 0.5,0.3",
        "vanilla": False,
        "max_new_tokens_limit": 64,
    },
    "ort_cpu_vanilla": {
        "model": "tiny-qwen-vl",
        "target": "ort-cpu",
        "ratio": 1.0,
        "schedule": "",
        "vanilla": True,
        "max_new_tokens_limit": 8,
    },
    "trt_sm90_lightkv": {
        "model": "Qwen/Qwen2.5-VL-7B-Instruct",
        "target": "trt-sm90",
        "ratio": 0.5,
        "schedule": 'layers 2; "quoted"',
        "vanilla": False,
        "max_new_tokens_limit": 512,
    },
}


def model_config_pb2():
    """Triton's model_config protobuf module, from tritonclient's file (its grpc package would need grpcio)."""
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("_tc_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("key", sorted(MANIFESTS))
def test_config_matches_golden(key):
    text = triton_repo.render_config(MANIFESTS[key])
    golden = GOLDEN / f"{key}.config.pbtxt"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    assert golden.is_file(), f"missing {golden}: run with UPDATE_GOLDEN=1"
    assert text == golden.read_text()


@pytest.mark.parametrize("key", sorted(MANIFESTS))
def test_config_parses_as_triton_model_config(key):
    manifest = MANIFESTS[key]
    pb = model_config_pb2()
    config = text_format.Parse(triton_repo.render_config(manifest, instances=2), pb.ModelConfig())
    assert config.name == triton_repo.model_name(manifest)
    assert config.backend == "python" and config.max_batch_size == 0
    assert [(i.name, i.data_type, list(i.dims), i.optional) for i in config.input] == [
        ("prompt", pb.TYPE_STRING, [1], False),
        ("image", pb.TYPE_STRING, [-1], False),
        ("max_new_tokens", pb.TYPE_INT32, [1], True),
    ]
    assert {o.name: o.data_type for o in config.output}["prefill_ms"] == pb.TYPE_FP32
    assert {o.name: list(o.dims) for o in config.output} == {
        "text": [1],
        "token_ids": [-1],
        "vision_tokens_in": [1],
        "vision_tokens_per_group": [-1],
        "kv_bytes": [1],
        "prefill_ms": [1],
        "decode_ms": [1],
    }
    kind = "KIND_CPU" if manifest["target"] == "ort-cpu" else "KIND_GPU"
    assert [(pb.ModelInstanceGroup.Kind.Name(g.kind), g.count) for g in config.instance_group] == [(kind, 2)]
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["engine_dir"] == "engine"
    assert int(params["default_max_new_tokens"]) == min(16, manifest["max_new_tokens_limit"])


def test_model_names():
    assert triton_repo.model_name(MANIFESTS["ort_cpu_lightkv"]) == "lightkv_tiny-qwen-vl_r0.55_ort-cpu"
    assert triton_repo.model_name(MANIFESTS["ort_cpu_vanilla"]) == "vanilla_tiny-qwen-vl_ort-cpu"
    assert triton_repo.model_name(MANIFESTS["trt_sm90_lightkv"]) == "lightkv_Qwen-Qwen2.5-VL-7B-Instruct_r0.5_trt-sm90"
    by_schedule = {**MANIFESTS["ort_cpu_lightkv"], "ratio": None, "schedule": "2:2:0.5,4:2:0.3"}
    assert triton_repo.model_name(by_schedule) == "lightkv_tiny-qwen-vl_s2-2-0.5-4-2-0.3_ort-cpu"


def test_unknown_target_is_an_input_error():
    with pytest.raises(InputError, match="unknown engine target 'tpu'"):
        triton_repo.render_config({**MANIFESTS["ort_cpu_lightkv"], "target": "tpu"})


def fake_engine(root: Path, manifest: dict) -> Path:
    """A directory shaped like an engine: a manifest and a payload file (the writer never opens the payload)."""
    d = root / triton_repo.model_name(manifest)
    (d / "onnx").mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps(manifest))
    (d / "onnx" / "prefill.onnx").write_bytes(b"\x00" * 64)
    return d


def test_write_repository_layout(tmp_path):
    engines = [fake_engine(tmp_path / "e", MANIFESTS[k]) for k in ("ort_cpu_lightkv", "ort_cpu_vanilla")]
    repo = triton_repo.write_repository(engines, tmp_path / "repo")
    assert triton_repo.is_repository(repo)
    assert triton_repo.repository_models(repo) == ["lightkv_tiny-qwen-vl_r0.55_ort-cpu", "vanilla_tiny-qwen-vl_ort-cpu"]
    version = repo / "lightkv_tiny-qwen-vl_r0.55_ort-cpu" / "1"
    assert (version / "model.py").read_text() == triton_repo.MODEL_TEMPLATE.read_text()
    assert (version / "engine" / "onnx" / "prefill.onnx").read_bytes() == b"\x00" * 64
    assert json.loads((version / "engine" / "manifest.json").read_text()) == MANIFESTS["ort_cpu_lightkv"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".repo.")]  # no temp dir left behind


def test_rewrite_replaces_own_repository_and_refuses_foreign(tmp_path):
    a = fake_engine(tmp_path / "e", MANIFESTS["ort_cpu_lightkv"])
    b = fake_engine(tmp_path / "e", MANIFESTS["ort_cpu_vanilla"])
    repo = triton_repo.write_repository([a, b], tmp_path / "repo")
    triton_repo.write_repository([b], repo)
    assert triton_repo.repository_models(repo) == ["vanilla_tiny-qwen-vl_ort-cpu"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not a lightkv_export repository"):
        triton_repo.write_repository([a], foreign)
    assert (foreign / "keep.txt").read_text() == "mine"


def test_failed_write_leaves_previous_repository(tmp_path, monkeypatch):
    a = fake_engine(tmp_path / "e", MANIFESTS["ort_cpu_lightkv"])
    repo = triton_repo.write_repository([a], tmp_path / "repo")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(triton_repo, "render_config", boom)
    with pytest.raises(OSError, match="disk full"):
        triton_repo.write_repository([a], repo)
    assert triton_repo.repository_models(repo) == ["lightkv_tiny-qwen-vl_r0.55_ort-cpu"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e", "repo"]


def test_bad_engine_dirs(tmp_path):
    with pytest.raises(InputError, match="not an engine directory"):
        triton_repo.write_repository([tmp_path], tmp_path / "repo")
    a = fake_engine(tmp_path / "e1", MANIFESTS["ort_cpu_lightkv"])
    b = fake_engine(tmp_path / "e2", MANIFESTS["ort_cpu_lightkv"])
    with pytest.raises(InputError, match="same model name"):
        triton_repo.write_repository([a, b], tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_cli(tmp_path, capsys):
    a = fake_engine(tmp_path / "e", MANIFESTS["ort_cpu_lightkv"])
    assert triton_repo.main([str(a), "--out", str(tmp_path / "repo")]) == 0
    assert "lightkv_tiny-qwen-vl_r0.55_ort-cpu" in capsys.readouterr().out
    assert triton_repo.main([str(tmp_path), "--out", str(tmp_path / "repo2")]) == 2
    assert "not an engine directory" in capsys.readouterr().err


def png_bytes(size=(32, 24), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 90)).save(buf, format=fmt)
    return buf.getvalue()


def test_codec_decodes_png_and_jpeg():
    images = codec.decode_images(np.array([png_bytes(), png_bytes((16, 16), "JPEG")], dtype=np.object_))
    assert [(im.mode, im.size) for im in images] == [("RGB", (32, 24)), ("RGB", (16, 16))]
    assert images[0].getpixel((3, 3)) == (200, 30, 90)


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"not an image at all", "image 0: not a readable PNG or JPEG"),
        (png_bytes()[:40], "image 0: not a readable PNG or JPEG"),  # truncated
        (png_bytes(fmt="GIF"), "GIF is not supported"),
    ],
)
def test_codec_refuses_bad_images(blob, message):
    with pytest.raises(InputError, match=message):
        codec.decode_images(np.array([blob], dtype=np.object_))


def test_codec_prompt_and_max_new_tokens():
    assert codec.decode_prompt(np.array(["héllo".encode()], dtype=np.object_)) == "héllo"
    with pytest.raises(InputError, match="UTF-8"):
        codec.decode_prompt(np.array([b"\xff\xfe"], dtype=np.object_))
    with pytest.raises(InputError, match="exactly one"):
        codec.decode_prompt(np.array([b"a", b"b"], dtype=np.object_))
    assert codec.decode_max_new_tokens(None, 7) == 7
    assert codec.decode_max_new_tokens(np.array([3], dtype=np.int32), 7) == 3


def test_client_arguments(tmp_path, capsys):
    assert client.address("http://127.0.0.1:8000/") == "127.0.0.1:8000"
    with pytest.raises(InputError, match="plain HTTP"):
        client.address("https://127.0.0.1:8000")
    with pytest.raises(InputError, match="image file not found"):
        client.read_images([tmp_path / "missing.png"])
    img = tmp_path / "a.png"
    img.write_bytes(png_bytes())
    assert client.main(["--url", "http://127.0.0.1:9", "--image", str(tmp_path / "nope.png"), "--prompt", "hi"]) == 2
    assert "image file not found" in capsys.readouterr().err
    assert client.main(["--url", "http://127.0.0.1:9", "--image", str(img), "--prompt", "hi"]) == 1  # nothing there
    assert "cannot reach a Triton server at http://127.0.0.1:9" in capsys.readouterr().err


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:abc", "http://127.0.0.1:99999", "http://127.0.0.1:0", "http://127.0.0.1", "http://h:80/v2"],
)
def test_client_refuses_malformed_urls(url, tmp_path, capsys):
    with pytest.raises(InputError, match="expected http://HOST:PORT with a port from 1 to 65535"):
        client.address(url)
    img = tmp_path / "a.png"
    img.write_bytes(png_bytes())
    assert client.main(["--url", url, "--image", str(img), "--prompt", "hi"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err


def test_client_bounds_max_new_tokens(tmp_path, capsys):
    assert client.address("http://[::1]:8000") == "[::1]:8000"
    img = tmp_path / "a.png"
    img.write_bytes(png_bytes())
    for n in ("0", str(2**31)):  # 2**31 does not fit the INT32 input
        args = ["--url", "http://127.0.0.1:9", "--image", str(img), "--prompt", "hi", "--max-new-tokens", n]
        assert client.main(args) == 2  # refused before connecting (nothing listens on port 9)
        assert f"--max-new-tokens must be from 1 to {2**31 - 1}, got {n}" in capsys.readouterr().err


def test_cli_out_that_cannot_be_written(tmp_path, capsys):
    a = fake_engine(tmp_path / "e", MANIFESTS["ort_cpu_lightkv"])
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = {a_file: "is a file, not a directory", a_file / "sub": f"{a_file} is a file", Path("/proc/r"): "/proc/r"}
    for out, message in cases.items():
        assert triton_repo.main([str(a), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and "choose another --out" in err and "Traceback" not in err
    assert a_file.read_text() == "x"
