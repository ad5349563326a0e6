"""Model repository writer: golden config.pbtxt files, names, atomic writes; the request codec; client arguments.

Regenerate the goldens after an intended change: UPDATE_GOLDEN=1 pytest tests/unit/test_triton_repo.py
"""

from __future__ import annotations

import contextlib
import http.server
import importlib.util
import io
import json
import os
import socket
import struct
import threading
import time
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tritonclient
from google.protobuf import text_format
from PIL import Image

from lightkv_export import client, triton_repo
from lightkv_export.artifacts import Manifest
from lightkv_export.errors import InputError
from lightkv_export.triton_backend import codec
from tests.helpers import make_manifest

GOLDEN = Path(__file__).parent / "golden"
MANIFESTS = {
    "ort_cpu_lightkv": make_manifest(
        model="tiny-qwen-vl",
        target="ort-cpu",
        ratio=0.55,
        schedule="layers 1,3; windows 2; ratios 0.5,0.3",
        vanilla=False,
        max_new_tokens_limit=64,
    ),
    "ort_cpu_vanilla": make_manifest(
        model="tiny-qwen-vl",
        target="ort-cpu",
        ratio=1.0,
        schedule="",
        vanilla=True,
        max_new_tokens_limit=8,
    ),
    "trt_sm90_lightkv": make_manifest(
        model="Qwen/Qwen2.5-VL-7B-Instruct",
        target="trt-sm90",
        ratio=0.5,
        schedule='layers 2; "quoted"',
        vanilla=False,
        max_new_tokens_limit=512,
    ),
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
        ("stream", pb.TYPE_BOOL, [1], True),
    ]
    assert config.model_transaction_policy.decoupled  # tokens stream back as they come
    assert {o.name: o.data_type for o in config.output}["prefill_ms"] == pb.TYPE_FP32
    assert {o.name: list(o.dims) for o in config.output} == {
        "text": [1],
        "token_ids": [-1],
        "vision_tokens_in": [1],
        "vision_tokens_per_group": [-1],
        "kv_bytes": [1],
        "prefill_ms": [1],
        "decode_ms": [1],
        "kv_bytes_reserved": [1],
        "queue_ms": [1],
        "time_to_first_token_ms": [1],
        "decode_batch_mean": [1],
        "decode_batch_max": [1],
    }
    kind = "KIND_CPU" if manifest.target == "ort-cpu" else "KIND_GPU"
    assert [(pb.ModelInstanceGroup.Kind.Name(g.kind), g.count) for g in config.instance_group] == [(kind, 2)]
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["engine_dir"] == "engine"
    assert int(params["default_max_new_tokens"]) == min(16, manifest.max_new_tokens_limit)
    # The server limits, with their defaults, as model.py reads them back.
    assert codec.Limits.from_parameters(params) == codec.Limits()
    assert {k: int(params[k]) for k in codec.Limits().parameters()} == {
        "max_prompt_chars": 8192,
        "max_prompt_tokens": 2048,
        "max_images": 8,
        "max_image_pixels": 4096 * 4096,
        "max_image_tokens": 4096,
        "max_sequence_length": 4096,
    }
    assert codec.Batching.from_parameters(params) == codec.Batching()  # and the scheduler's settings
    assert {k: params[k] for k in codec.Batching().parameters()} == {
        "kv_budget": "1GiB",
        "max_batch": "16",
        "max_queue": "64",
        "max_queue_s": "60",
    }


def test_model_names():
    assert triton_repo.model_name(MANIFESTS["ort_cpu_lightkv"]) == "lightkv_tiny-qwen-vl_r0.55_ort-cpu"
    assert triton_repo.model_name(MANIFESTS["ort_cpu_vanilla"]) == "vanilla_tiny-qwen-vl_ort-cpu"
    assert triton_repo.model_name(MANIFESTS["trt_sm90_lightkv"]) == "lightkv_Qwen-Qwen2.5-VL-7B-Instruct_r0.5_trt-sm90"
    by_schedule = replace(MANIFESTS["ort_cpu_lightkv"], ratio=None, schedule="2:2:0.5,4:2:0.3")
    assert triton_repo.model_name(by_schedule) == "lightkv_tiny-qwen-vl_s2-2-0.5-4-2-0.3_ort-cpu"


def test_unknown_target_is_an_input_error():
    with pytest.raises(InputError, match="unknown engine target 'tpu'"):
        triton_repo.render_config(replace(MANIFESTS["ort_cpu_lightkv"], target="tpu"))


def fake_engine(root: Path, manifest: Manifest) -> Path:
    """A directory shaped like an engine: a manifest and a payload file (the writer never opens the payload)."""
    d = root / triton_repo.model_name(manifest)
    (d / "onnx").mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps(manifest.to_json()))
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
    assert json.loads((version / "engine" / "manifest.json").read_text()) == MANIFESTS["ort_cpu_lightkv"].to_json()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".repo")] == []  # no temp dir or lock left


def test_writing_into_a_repository_merges_and_refuses_foreign(tmp_path, monkeypatch):
    def no_hard_links(*args, **kwargs):
        raise AssertionError("a repository file was hard-linked")

    monkeypatch.setattr(os, "link", no_hard_links)  # models carried over in a merge are copies too
    a = fake_engine(tmp_path / "e", MANIFESTS["ort_cpu_lightkv"])
    b = fake_engine(tmp_path / "e", MANIFESTS["ort_cpu_vanilla"])
    name_a, name_b = (triton_repo.model_name(MANIFESTS[k]) for k in ("ort_cpu_lightkv", "ort_cpu_vanilla"))
    repo = triton_repo.write_repository([a], tmp_path / "repo")
    triton_repo.write_repository([b], repo)  # a second engine joins the first
    assert triton_repo.repository_models(repo) == [name_a, name_b]
    assert triton_repo.read_marker(repo) == {name_a: str(a), name_b: str(b)}
    assert (repo / name_a / "1" / "engine" / "onnx" / "prefill.onnx").read_bytes() == b"\x00" * 64
    # Writing A again replaces only A, with A's new content; B stays as it was.
    (a / "onnx" / "prefill.onnx").write_bytes(b"\x01" * 32)
    b_config = (repo / name_b / "config.pbtxt").read_text()
    triton_repo.write_repository([a], repo)
    assert triton_repo.repository_models(repo) == [name_a, name_b]
    assert (repo / name_a / "1" / "engine" / "onnx" / "prefill.onnx").read_bytes() == b"\x01" * 32
    assert (repo / name_b / "config.pbtxt").read_text() == b_config
    assert all(p.stat().st_nlink == 1 for p in repo.rglob("*") if p.is_file())  # B was carried over as copies
    assert (repo / name_b / "1" / "engine" / "onnx" / "prefill.onnx").read_bytes() == b"\x00" * 64
    assert triton_repo.read_marker(repo) == {name_a: str(a), name_b: str(b)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e", "repo"]  # no stage or old copy left
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not a lightkv_export repository"):
        triton_repo.write_repository([a], foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["keep.txt"] and (foreign / "keep.txt").read_text() == "mine"


def test_repository_engines_are_independent_copies(tmp_path):
    """A write through the repository's engine never reaches the source engine (no hard links), and the reverse."""
    a = fake_engine(tmp_path / "e", MANIFESTS["ort_cpu_lightkv"])
    b = fake_engine(tmp_path / "e", MANIFESTS["ort_cpu_vanilla"])
    repo = triton_repo.write_repository([a], tmp_path / "repo")
    triton_repo.write_repository([b], repo)  # A is carried over into the merged repository
    for engine, manifest in ((a, MANIFESTS["ort_cpu_lightkv"]), (b, MANIFESTS["ort_cpu_vanilla"])):
        source = engine / "onnx" / "prefill.onnx"
        copy = repo / triton_repo.model_name(manifest) / "1" / "engine" / "onnx" / "prefill.onnx"
        assert os.stat(copy).st_ino != os.stat(source).st_ino and os.stat(source).st_nlink == 1
        with open(copy, "r+b") as f:  # overwrite in place, as a careless tool would
            f.write(b"\xff" * 64)
        assert source.read_bytes() == b"\x00" * 64
        source.write_bytes(b"\x02" * 64)
        assert copy.read_bytes() == b"\xff" * 64


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


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (1-bit grey) and whose pixel data is cut off after a few rows."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * ((width + 7) // 8 + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def png_bomb(side: int) -> bytes:
    """A complete side x side 1-bit PNG of zeros: tens of kB on the wire, side**2 pixels once decoded."""
    row = b"\x00" * ((side + 7) // 8 + 1)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row * 1000) for _ in range(side // 1000)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def test_limits_refuse_before_any_work():
    limits = codec.Limits()
    # More images than allowed: refused from the tensor's size, before any blob is opened (these are garbage).
    with pytest.raises(InputError, match=r"60 images, which is over the server's limit of 8 .*parameter max_images"):
        codec.decode_images(np.array([b"garbage"] * 60, dtype=np.object_), limits)
    # Pixels: from the header alone (the pixel data here is cut off, so decoding would fail with another message).
    with pytest.raises(InputError, match=r"image 0 is 12000x12000 = 144000000 pixels, which is over .* 16777216"):
        codec.decode_images(np.array([png_header_only(12000, 12000)], dtype=np.object_), limits)
    # A real bomb, past PIL's own guard (2 x 89 M pixels): our limit's message, not a DecompressionBombError.
    bomb = png_bomb(20000)
    assert len(bomb) < 200_000
    with pytest.raises(InputError, match=r"image 1 has 400000000 pixels, .*parameter max_image_pixels"):
        codec.decode_images(np.array([png_bytes(), bomb], dtype=np.object_), limits)
    # Prompt characters, counted as characters (2 bytes each here), before anything else.
    with pytest.raises(InputError, match=r"the prompt has 10000 characters, .*limit of 8192 .*max_prompt_chars"):
        codec.decode_prompt(np.array([("é" * 10_000).encode()], dtype=np.object_), limits)
    assert codec.decode_prompt(np.array([("é" * 8192).encode()], dtype=np.object_), limits) == "é" * 8192
    with pytest.raises(InputError, match=r"sequence of 4101 tokens \(20 template \+ images 500 \+ 500 "):
        codec.check_sequence(limits, 4085, 16, parts="20 template + images 500 + 500 + ... + 65 prompt")
    assert codec.check_sequence(limits, 4080, 16) == 4096
    # Within the limits, the images decode as before; the limit is inclusive and its value is the config's.
    assert [im.size for im in codec.decode_images(np.array([png_bytes()], dtype=np.object_), limits)] == [(32, 24)]
    assert codec.decode_images(np.array([png_bytes()], dtype=np.object_), codec.Limits(max_image_pixels=32 * 24))
    with pytest.raises(InputError, match=r"image 0 is 32x24 = 768 pixels, which is over the server's limit of 767 "):
        codec.decode_images(np.array([png_bytes()], dtype=np.object_), codec.Limits(max_image_pixels=767))


def test_images_open_by_their_headers_and_load_only_after_the_checks():
    """The served model checks every limit (the sequence from each image's size included) between `open_images`
    (headers: a truncated image opens) and `load_images` (pixels: it fails there, as an InputError); transparency
    is composited on white, as the processors and the in-process runtime do."""
    from lightkv_export.images import to_rgb

    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(noise, format="PNG")
    cut = noise.getvalue()[: len(noise.getvalue()) // 2]  # a whole header, half the pixel data
    opened = codec.open_images(np.array([png_bytes(), cut], dtype=np.object_), codec.Limits())
    assert [img.size for img, _ in opened] == [(32, 24), (64, 48)]
    with pytest.raises(InputError, match=r"image 1: not a readable PNG or JPEG image"):
        codec.load_images(opened)
    buf = io.BytesIO()
    Image.new("RGBA", (4, 2), (255, 0, 0, 0)).save(buf, format="PNG")  # fully transparent red
    (loaded,) = codec.decode_images(np.array([buf.getvalue()], dtype=np.object_))
    assert loaded.getpixel((0, 0)) == (255, 255, 255) == to_rgb(Image.open(io.BytesIO(buf.getvalue()))).getpixel((0, 0))


def test_limits_from_config_parameters():
    limits = codec.Limits.from_parameters({"max_images": "60", "engine_dir": "engine", "max_prompt_chars": " 100 "})
    assert (limits.max_images, limits.max_prompt_chars, limits.max_sequence_length) == (60, 100, 4096)
    for bad in ("0", "-3", "many", ""):
        with pytest.raises(
            InputError, match=f"config.pbtxt parameter max_images: expected a positive integer, got '{bad.strip()}'"
        ):
            codec.Limits.from_parameters({"max_images": bad})


def test_images_as_base64_and_the_stream_flag():
    """JSON carries images as base64 text (a data: URL too); raw bytes pass as they are."""
    import base64

    raw = [png_bytes(), png_bytes((16, 16), "JPEG")]
    text = [base64.b64encode(raw[0]), f"data:image/jpeg;base64,{base64.b64encode(raw[1]).decode()}".encode()]
    images = codec.decode_images(np.array(text, dtype=np.object_))
    assert [im.size for im in images] == [(32, 24), (16, 16)]
    assert codec.image_bytes(raw[0], 0) == raw[0]
    with pytest.raises(InputError, match="image 0: not a readable PNG or JPEG"):  # base64 of something else
        codec.decode_images(np.array([base64.b64encode(b"GIF89a not a png")], dtype=np.object_))
    assert codec.decode_stream(None) is False and codec.decode_stream(np.array([True])) is True
    with pytest.raises(InputError, match="stream: expected one value"):
        codec.decode_stream(np.array([True, False]))
    piece = codec.encode_piece("é", 7)
    assert piece["text"].tolist() == ["é".encode()] and piece["token_ids"].tolist() == [7]


def test_batching_settings_and_flags(tmp_path, capsys):
    b = codec.Batching.from_parameters({"kv_budget": "40%", "max_batch": "8", "max_queue_s": "2.5"})
    assert (b.kv_budget, b.max_batch, b.max_queue, b.max_queue_s) == ("40%", 8, 64, 2.5)
    for params, message in (
        ({"kv_budget": "lots"}, "memory size 'lots' is not NUMBER"),
        ({"kv_budget": "150%"}, "at most 100%"),
        ({"max_batch": "0"}, "max_batch: expected a positive number, got '0'"),
        ({"max_queue_s": "soon"}, "max_queue_s: expected a positive number, got 'soon'"),
    ):
        with pytest.raises(InputError, match=message):
            codec.Batching.from_parameters(params)
    a = fake_engine(tmp_path / "e", MANIFESTS["ort_cpu_lightkv"])
    args = [str(a), "--out", str(tmp_path / "repo"), "--kv-budget", "256MiB", "--max-batch", "4"]
    assert triton_repo.main(args) == 0
    (config,) = (tmp_path / "repo").glob("*/config.pbtxt")
    text = config.read_text()
    assert '{ key: "kv_budget", value: { string_value: "256MiB" } }' in text
    assert '{ key: "max_batch", value: { string_value: "4" } }' in text
    capsys.readouterr()
    assert triton_repo.main([str(a), "--out", str(tmp_path / "r2"), "--max-queue", "0"]) == 2
    assert "--max-queue 0: expected a positive number, got '0'" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()


def test_missing_input_is_named():
    with pytest.raises(InputError, match="missing input 'prompt'"):
        codec.require(None, "prompt")
    values = np.array([b"x"], dtype=np.object_)
    assert codec.require(values, "image") is values


def test_encode_generation_names_every_field():
    """Distinct values per field: a swap of any two outputs (prefill_ms and decode_ms, say) fails here."""
    from lightkv_export.runtime import Generation

    gen = Generation(
        text="héllo",
        token_ids=[11, 12, 13],
        vision_tokens_in=192,
        vision_tokens_per_group=[192, 96, 48],
        kv_bytes=314368,
        prefill_ms=12.5,
        decode_ms=3.25,
        kv_lengths=[1, 2],
    )
    assert list(codec.encode_generation(gen)) == [k for k in codec.OUTPUT_DTYPES if k not in codec.STATS]
    stats = {"kv_bytes_reserved": 400000, "queue_ms": 1.5, "time_to_first_token_ms": 20.25, "new_tokens": 3,
             "decode_batch_mean": 2.5, "decode_batch_max": 4}  # fmt: skip
    out = codec.encode_generation(gen, stats)
    assert list(out) == list(codec.OUTPUT_DTYPES)
    assert [out[k].tolist() for k in codec.STATS] == [[400000], [1.5], [20.25], [2.5], [4]]
    assert {k: v.dtype for k, v in out.items()} == {k: np.dtype(t) for k, t in codec.OUTPUT_DTYPES.items()}
    assert out["text"].tolist() == ["héllo".encode()]
    assert out["token_ids"].tolist() == [11, 12, 13]
    assert out["vision_tokens_in"].tolist() == [192]
    assert out["vision_tokens_per_group"].tolist() == [192, 96, 48]
    assert out["kv_bytes"].tolist() == [314368]
    assert out["prefill_ms"].tolist() == [12.5]
    assert out["decode_ms"].tolist() == [3.25]


@contextlib.contextmanager
def silent_listener():
    """A TCP port that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                accepted.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for c in accepted:
            c.close()
        server.close()


@contextlib.contextmanager
def server_that_never_answers_infer():
    """An HTTP server that says it is live and serves model "m", then never answers a generate request."""
    release = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, body: bytes):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self.reply(b"")

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if "/generate" in self.path:
                release.wait(30)
                return
            self.reply(json.dumps([{"name": "m", "version": "1", "state": "READY"}]).encode())

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        release.set()
        httpd.shutdown()
        httpd.server_close()


def test_client_times_out_with_a_clear_message(tmp_path, capsys):
    img = tmp_path / "a.png"
    img.write_bytes(png_bytes())
    with silent_listener() as url:
        t0 = time.monotonic()
        assert client.main(["--url", url, "--image", str(img), "--prompt", "hi", "--connect-timeout", "1"]) == 1
        assert time.monotonic() - t0 < 5
        err = capsys.readouterr().err
        assert f"no answer from {url} within 1 s (--connect-timeout)" in err and "Traceback" not in err
    with server_that_never_answers_infer() as url:
        t0 = time.monotonic()
        assert client.main(["--url", url, "--image", str(img), "--prompt", "hi", "--timeout", "1.5"]) == 1
        assert time.monotonic() - t0 < 6
        err = capsys.readouterr().err
        assert f"m at {url} gave no answer within 1.5 s (--timeout)" in err and "Traceback" not in err
    for flag in ("--timeout", "--connect-timeout"):
        assert client.main(["--url", "http://127.0.0.1:9", "--image", str(img), "--prompt", "hi", flag, "0"]) == 2
        assert f"{flag} must be a positive number of seconds, got 0.0" in capsys.readouterr().err


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
