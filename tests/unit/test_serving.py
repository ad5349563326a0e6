"""A real tritonserver (nvidia-pytriton's binary and Python backend) on a loopback port.

Part 1 needs only the server: lifecycle, readiness, errors with the log tail, Ctrl-C of the CLI, the client's
messages; it serves a small Python-backend model written here. Part 2 serves the tiny engines (LightKV and
vanilla) built by the pipeline and checks every answer against the in-process runtime.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightkv_export import client, serve, triton_repo
from lightkv_export.errors import InputError
from lightkv_export.triton_backend.codec import encode_images

try:
    serve.find_triton()
    serve.stub_site_dir()
    serve.python_libdir()
except serve.ServeError as e:  # the Makefile installs both; without them there is no server to test
    pytest.skip(f"tritonserver not installed: {e}", allow_module_level=True)

pytestmark = pytest.mark.slow

ECHO_CONFIG = """\
backend: "python"
max_batch_size: 0
input [
  { name: "prompt", data_type: TYPE_STRING, dims: [ 1 ] },
  { name: "image", data_type: TYPE_STRING, dims: [ -1 ] }
]
output [
  { name: "text", data_type: TYPE_STRING, dims: [ 1 ] },
  { name: "sizes", data_type: TYPE_INT64, dims: [ -1, 2 ] }
]
instance_group [ { kind: KIND_CPU, count: 1 } ]
"""

# Decodes the request with the served engines' codec, in the backend stub (numpy<2 there, see serve.py).
ECHO_MODEL = """\
import numpy as np
import triton_python_backend_utils as pb_utils

from lightkv_export.errors import InputError
from lightkv_export.triton_backend import codec


class TritonPythonModel:
    def initialize(self, args):
        {init}

    def execute(self, requests):
        out = []
        for r in requests:
            try:
                prompt = codec.decode_prompt(pb_utils.get_input_tensor_by_name(r, "prompt").as_numpy())
                images = codec.decode_images(pb_utils.get_input_tensor_by_name(r, "image").as_numpy())
            except InputError as e:
                out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
                continue
            text = np.array([(prompt[::-1] + " " + np.__version__).encode()], dtype=np.object_)
            sizes = np.array([im.size for im in images], dtype=np.int64).reshape(-1, 2)
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("text", text), pb_utils.Tensor("sizes", sizes)]))
        return out
"""


def write_echo_repo(root: Path, name: str = "echo", init: str = "pass") -> Path:
    version = root / name / "1"
    version.mkdir(parents=True)
    (root / name / "config.pbtxt").write_text(ECHO_CONFIG)
    (version / "model.py").write_text(ECHO_MODEL.format(init=init))
    return root


def image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))  # [H, W, 3]


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def infer_echo(address: str, prompt: str, images: list[bytes]):
    import tritonclient.http as httpclient

    c = httpclient.InferenceServerClient(address)
    try:
        inputs = []
        for name, array in (
            ("prompt", np.array([prompt.encode()], dtype=np.object_)),
            ("image", encode_images(images)),
        ):
            t = httpclient.InferInput(name, list(array.shape), "BYTES")
            t.set_data_from_numpy(array)
            inputs.append(t)
        return c.infer("echo", inputs)
    finally:
        c.close()


# ---------------------------------------------------------------- part 1: the server itself


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory):
    repo = write_echo_repo(tmp_path_factory.mktemp("echo"))
    with serve.Server(repo) as server:
        yield server


def test_echo_round_trip_through_the_stub(echo_server):
    """Strings, images and int64 outputs survive the stub (this is what numpy 2 in the stub broke)."""
    result = infer_echo(echo_server.address, "héllo", [png(image((40, 30))), png(image((8, 16), 1))])
    assert result.as_numpy("text")[0].decode() == "olléh 1.26.4"
    assert result.as_numpy("sizes").tolist() == [[40, 30], [8, 16]]


def test_bad_request_keeps_server_healthy(echo_server):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="image 0: not a readable PNG or JPEG"):
        infer_echo(echo_server.address, "x", [b"garbage"])
    assert serve.http_ready(echo_server.url)
    assert infer_echo(echo_server.address, "ab", [png(image((4, 4)))]).as_numpy("text")[0].startswith(b"ba ")


def test_server_on_a_given_port_and_stop(tmp_path):
    port = serve.free_port()
    server = serve.Server(write_echo_repo(tmp_path), port=port).start()
    try:
        assert server.url == f"http://127.0.0.1:{port}" and serve.http_ready(server.url)
    finally:
        code = server.stop()
    assert code == 0 and not server.alive() and not serve.http_ready(server.url)
    server.close()


def test_model_that_fails_to_load_raises_with_log_tail(tmp_path):
    repo = write_echo_repo(tmp_path, init="raise RuntimeError('marker-7f3 engine missing')")
    with pytest.raises(serve.ServeError, match=r"(?s)exited with code \d+ while starting.*marker-7f3 engine missing"):
        serve.Server(repo, startup_timeout_s=60).start()


def test_serve_cli_stops_on_ctrl_c(tmp_path):
    repo = write_echo_repo(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lightkv_export.serve", str(repo)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("url: "):
                break
        url, pid = lines[-1].split()[1], int(lines[-1].split("pid ")[1].split(";")[0])
        assert serve.http_ready(url), "".join(lines)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, "".join(lines) + out
    assert "stopped (exit code 0)" in out
    assert not serve.http_ready(url)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the server process is gone, not orphaned


def test_client_messages(echo_server, tmp_path, capsys):
    img = tmp_path / "a.png"
    img.write_bytes(png(image((8, 8))))
    args = ["--url", echo_server.url, "--image", str(img), "--prompt", "hi"]
    assert client.main([*args, "--model", "nope"]) == 1
    err = capsys.readouterr().err
    assert "unknown model 'nope'" in err and "served: echo" in err
    port = serve.free_port()  # nothing listens there
    assert client.main(["--url", f"http://127.0.0.1:{port}", "--image", str(img), "--prompt", "hi"]) == 1
    assert f"cannot reach a Triton server at http://127.0.0.1:{port}" in capsys.readouterr().err


@pytest.mark.parametrize("port", ["-1", "65536", "99999"])
def test_serve_refuses_a_bad_port_before_writing_anything(port, tmp_path, capsys):
    repo = write_echo_repo(tmp_path)
    assert serve.main([str(repo), "--port", port]) == 2
    assert f"--port must be from 1 to 65535 (or 0 for a free port), got {port}" in capsys.readouterr().err
    assert serve.check_port(0) is None and serve.check_port(None) is None and serve.check_port(8000) == 8000


# ---------------------------------------------------------------- part 2: the engines


def build_engines(out: Path) -> dict[str, Path]:
    """The tiny engines, LightKV at ratio 0.55 and vanilla, for ort-cpu."""
    config = pytest.importorskip("lightkv_export.config", reason="lightkv_export.config not built yet")
    pipeline = pytest.importorskip("lightkv_export.pipeline", reason="lightkv_export.pipeline not built yet")
    # One out directory: the vanilla export is cached there and shared by both builds. parity=False: the parity
    # harness has its own tests, and here the in-process runtime is the reference.
    configs = {
        "lightkv": config.BuildConfig(model="tiny-qwen-vl", ratio=0.55, out=out, parity=False),
        "vanilla": config.BuildConfig(model="tiny-qwen-vl", vanilla=True, out=out, parity=False),
    }
    return {kind: pipeline.run(cfg).engine_dirs["ort-cpu"] for kind, cfg in configs.items()}


@pytest.fixture(scope="session")
def engine_server(tmp_path_factory):
    runtime = pytest.importorskip("lightkv_export.runtime", reason="lightkv_export.runtime not built yet")
    root = tmp_path_factory.mktemp("engines")
    engine_dirs = build_engines(root)
    repo = triton_repo.write_repository(list(engine_dirs.values()), root / "repo")
    engines = {kind: runtime.Engine.load(d) for kind, d in engine_dirs.items()}
    names = {kind: triton_repo.model_name(e.manifest) for kind, e in engines.items()}
    server = serve.Server(repo).start()
    try:
        yield server, engines, names
    finally:
        server.close()


REQUESTS = [  # (image sizes, prompt, max_new_tokens)
    ([(56, 56)], "Describe the image.", 6),
    ([(84, 56)], "What color is it?", 4),
    ([(56, 56), (56, 84)], "Compare the two pictures.", 5),
    ([(112, 84)], "Count the objects", 3),
]


def request_images(sizes, seed: int) -> list[bytes]:
    return [png(image(s, seed + i)) for i, s in enumerate(sizes)]


def expected(engine, blobs: list[bytes], prompt: str, max_new: int):
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]
    return engine.generate(images, prompt, max_new_tokens=max_new)


def same_answer(answer: client.Answer, gen) -> None:
    assert answer.text == gen.text
    assert answer.token_ids == list(gen.token_ids)
    assert answer.vision_tokens_in == gen.vision_tokens_in
    assert answer.vision_tokens_per_group == list(gen.vision_tokens_per_group)
    assert answer.kv_bytes == gen.kv_bytes
    assert answer.prefill_ms > 0 and answer.decode_ms >= 0


@pytest.mark.parametrize("kind", ["lightkv", "vanilla"])
def test_answers_equal_in_process_runtime(engine_server, kind):
    server, engines, names = engine_server
    for seed, (sizes, prompt, max_new) in enumerate(REQUESTS[:3]):
        blobs = request_images(sizes, seed)
        _, answer = client.ask(server.url, blobs, prompt, model=names[kind], max_new_tokens=max_new)
        same_answer(answer, expected(engines[kind], blobs, prompt, max_new))
    lightkv = engines["lightkv"].manifest
    if kind == "lightkv" and not lightkv.get("vanilla"):
        assert min(answer.vision_tokens_per_group) < answer.vision_tokens_in  # the cache was compressed


def test_default_max_new_tokens_and_client_cli(engine_server, tmp_path, capsys):
    server, engines, names = engine_server
    img = tmp_path / "a.png"
    img.write_bytes(request_images([(56, 56)], 0)[0])
    default = triton_repo.default_max_new_tokens(engines["lightkv"].manifest)
    gen = expected(engines["lightkv"], [img.read_bytes()], "Describe the image.", default)
    args = ["--url", server.url, "--model", names["lightkv"], "--image", str(img), "--prompt", "Describe the image."]
    assert client.main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith(gen.text + "\n") and f"vision tokens in         {gen.vision_tokens_in}" in out
    assert client.main(args[:2] + args[4:]) == 1  # two models served: --model is required
    assert "pick one with --model" in capsys.readouterr().err


def test_sixteen_concurrent_requests(engine_server):
    server, engines, names = engine_server
    jobs = [(REQUESTS[i % 4], i % 4, names["lightkv" if i % 2 else "vanilla"], i % 2) for i in range(16)]
    wanted = {}
    for (sizes, prompt, max_new), seed, _, odd in jobs:
        key = (seed, odd)
        if key not in wanted:
            engine = engines["lightkv" if odd else "vanilla"]
            wanted[key] = expected(engine, request_images(sizes, seed), prompt, max_new)

    def one(job):
        (sizes, prompt, max_new), seed, name, _ = job
        return client.ask(server.url, request_images(sizes, seed), prompt, model=name, max_new_tokens=max_new)[1]

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, jobs))
    for job, answer in zip(jobs, answers, strict=True):
        same_answer(answer, wanted[(job[1], job[3])])


def runtime_message(engine, images: list[Image.Image], prompt: str, max_new: int) -> str:
    """The InputError message the in-process runtime gives for the same bad request."""
    with pytest.raises(InputError) as e:
        engine.generate(images, prompt, max_new_tokens=max_new)
    return str(e.value)


def test_bad_requests_get_clear_errors_and_server_stays_healthy(engine_server):
    import tritonclient.http as httpclient

    server, engines, names = engine_server
    engine, name = engines["lightkv"], names["lightkv"]
    good = request_images([(56, 56)], 0)
    limit = int(engine.manifest["max_new_tokens_limit"])
    tiny = png(image((2, 2)))
    cases = [
        (good, "", 4, runtime_message(engine, [image((56, 56))], "", 4)),
        (good, "hi", limit + 1, runtime_message(engine, [image((56, 56))], "hi", limit + 1)),
        ([tiny], "hi", 4, runtime_message(engine, [image((2, 2))], "hi", 4)),
        ([b"\x89PNG\r\n\x1a\n corrupt"], "hi", 4, "image 0: not a readable PNG or JPEG"),
    ]
    for blobs, prompt, max_new, message in cases:
        with pytest.raises(client.ClientError) as e:
            client.ask(server.url, blobs, prompt, model=name, max_new_tokens=max_new)
        assert message in str(e.value)
        assert serve.http_ready(server.url)

    # No image input at all: Triton itself refuses the request before the model sees it.
    c = httpclient.InferenceServerClient(server.address)
    try:
        prompt = httpclient.InferInput("prompt", [1], "BYTES")
        prompt.set_data_from_numpy(np.array([b"hi"], dtype=np.object_))
        from tritonclient.utils import InferenceServerException

        with pytest.raises(InferenceServerException, match="image"):
            c.infer(name, [prompt])
    finally:
        c.close()
    _, answer = client.ask(server.url, good, "Describe the image.", model=name, max_new_tokens=3)
    same_answer(answer, expected(engine, good, "Describe the image.", 3))


def test_restart_on_the_same_repository(engine_server):
    server, engines, names = engine_server
    port = server.port
    code = server.stop()
    assert code == 0, serve.tail(server.log_path)
    server.requested_port = port  # same repository, same port
    server.start()
    assert server.port == port
    blobs = request_images([(84, 56)], 1)
    _, answer = client.ask(server.url, blobs, "What color is it?", model=names["vanilla"], max_new_tokens=4)
    same_answer(answer, expected(engines["vanilla"], blobs, "What color is it?", 4))
