"""The conformance suite: what every registered model family must do, on its tiny preset.

Each family with a tiny preset in the registry is built through the whole pipeline (export, LightKV transform,
ort-cpu engine, parity at all three levels), and its engine is checked against Hugging Face and the PyTorch
reference runtime. A new family is its module in lightkv_export/models/ plus its tiny preset in the registry;
this suite then runs on it with nothing else to add.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightkv_export.inputs import parity_images
from lightkv_export.models.registry import SPECS, load_model
from lightkv_export.runtime import Engine
from tests.helpers import reference_run

pytestmark = pytest.mark.slow
FAMILIES = sorted((spec.family, key) for key, spec in SPECS.items() if spec.tiny)
assert {f for f, _ in FAMILIES} == {spec.family for spec in SPECS.values()}, "every family needs a tiny preset"


@pytest.fixture(scope="module", params=[key for _, key in FAMILIES], ids=[f for f, _ in FAMILIES])
def family(request, builds):
    """(tiny preset key, its loaded model, its LightKV build at 0.55)."""
    key = request.param
    return key, load_model(key), builds(key, 0.55)


def test_builds_and_passes_parity_at_every_level(family):
    _, _, result = family
    report = result.parity["ort-cpu"]
    assert result.exit_code == 0 and report.passed, "\n".join(report.failure_lines())
    assert {c.level for c in report.checks} == {"op", "model", "identity"}
    assert any(c.output == "vanilla-export-logits" for c in report.checks)  # against the vanilla export too
    engine_dir = result.engine_dirs["ort-cpu"]
    for name in ("manifest.json", "parity.json", "report.md", "prefill.onnx", "decode.onnx", "vision.onnx"):
        assert (engine_dir / name).is_file(), name


def test_merged_cache_follows_the_reference_runtime(family):
    """The engine's real K/V arrays per layer have the PyTorch reference's lengths, shorter after every stage,
    and the tokens agree."""
    _, loaded, result = family
    engine = Engine.load(result.engine_dirs["ort-cpu"])
    h, w = engine.manifest.image_size
    images, prompt = [parity_images((h, w), 4)], "What is in this picture?"
    pre = engine.prefill(engine.prepare(images, prompt))
    want = reference_run(loaded, engine, images, prompt, max_new_tokens=6)
    assert [k.shape[2] for k in pre.keys] == want.kv_lengths
    groups = [want.kv_lengths[first - 1] for first, _ in result.schedule.layer_groups()]
    assert groups == sorted(groups, reverse=True) and len(set(groups)) == len(groups)  # every stage removes tokens
    gen = engine.generate(images, prompt, max_new_tokens=6)
    assert gen.token_ids == want.tokens and gen.kv_lengths == want.kv_lengths


def test_ratio_zero_generates_like_hugging_face(family, builds):
    """At ratio 0 the engine generates the Hugging Face model's tokens for every parity case: the reference image,
    two images of different sizes, a tall page, the processor's smallest image and one near its largest; alone, and
    all of them as one padded batch of mixed image sizes, where each row gets exactly the tokens that Hugging Face
    `generate` gives its request alone (greedy, the checkpoint's processor)."""
    from lightkv_export.inputs import parity_cases

    key, loaded, _ = family
    engine = Engine.load(builds(key, 0.0).engine_dirs["ort-cpu"])
    h, w = engine.manifest.image_size
    cases = parity_cases((h, w), engine.processor.images.pixel_range())
    batched = engine.generate_batch([(images, prompt) for _, images, prompt in cases], max_new_tokens=6)
    for (name, images, prompt), row in zip(cases, batched, strict=True):
        gen = engine.generate(images, prompt, max_new_tokens=6)
        assert len(set(gen.kv_lengths)) == 1  # nothing merged anywhere
        processed = loaded.family.process(loaded.processor, images, prompt)
        with torch.no_grad():
            out = loaded.model.generate(**processed, max_new_tokens=6, do_sample=False)
        hf = out[0, processed["input_ids"].shape[1] :].tolist()
        assert hf and gen.token_ids == hf, name
        assert row.token_ids == hf and row.kv_lengths == gen.kv_lengths, name  # batched: the row's own request
    assert len({row.kv_lengths[0] for row in batched}) > len(cases) // 2  # rows of many lengths: real padding


def test_batched_generation_equals_one_request_at_a_time(family):
    _, loaded, result = family
    engine = Engine.load(result.engine_dirs["ort-cpu"])
    h, w = engine.manifest.image_size
    # Mixed sizes: each row's images are sized by the processor, so rows differ in vision tokens and grids.
    items = [
        ([parity_images((h, w), 0)], "Describe this image."),
        ([parity_images((h, w), 1), parity_images((3 * h // 2, w // 2), 2)], "Compare the two pictures, please."),
        ([parity_images((h // 2, w), 3)], "Colours?"),
    ]
    batched = engine.generate_batch(items, max_new_tokens=5)
    for (images, prompt), got in zip(items, batched, strict=True):
        alone = engine.generate(images, prompt, max_new_tokens=5)
        assert (got.token_ids, got.kv_lengths) == (alone.token_ids, alone.kv_lengths), prompt
        want = reference_run(loaded, engine, images, prompt, max_new_tokens=5)  # PyTorch, one row at a time
        assert (got.token_ids, got.kv_lengths) == (want.tokens, want.kv_lengths), prompt
    assert len({tuple(g.kv_lengths) for g in batched}) == 3  # the rows really differ in length


def test_the_accounting_is_what_the_engine_holds(family):
    """The build's accounting (report.md: KV bytes per layer) is the engine's measured cache for the reference
    request, and the planner's vision grid is the engine's."""
    from lightkv_export.accounting.engine import engine_account

    _, _, result = family
    engine = Engine.load(result.engine_dirs["ort-cpu"])
    manifest = engine.manifest
    account = engine_account(manifest)
    ref = manifest.reference_request
    h, w = engine.manifest.image_size
    gen = engine.generate([parity_images((h, w), 0)], ref.prompt, max_new_tokens=2)
    assert list(account.kv_lengths) == gen.kv_lengths == ref.kv_lengths
    assert sum(account.kv_bytes) == gen.kv_bytes < sum(account.kv_bytes_vanilla)
    layout = engine.processor.layouts([(w, h)])[0]
    assert [layout.to_json()] == ref.image_layouts
    assert layout.vision_tokens == ref.vision_tokens == gen.vision_tokens_in
    assert np.isclose(account.retention, manifest.retention, atol=0.02)


# User text with every kind of control-token text a prompt can carry, non-ASCII and odd spacing.
HOST_PROMPTS = (
    "Describe this image.",
    "What is <|im_end|><|im_start|>assistant\nhi <|image_pad|> x?",
    "<image> USER: hi </s><s> ok",
    "  spaces  and\nnewlines ",
    "数字 123 émoji 🙂",
)


def test_host_preprocessing_is_the_hugging_face_processor(family):
    """The engine's own host preprocessing (host.py and the family's image side: tokenizers, jinja2, numpy) makes
    the token ids, pixels and spans that the checkpoint's Hugging Face processor makes, for prompts with
    control-token text and for images as users send them: one, two of different sizes and aspect ratios, a tall
    page, and images at the processor's minimum and near its maximum (each layout known from the size alone)."""
    from lightkv_export import contract
    from lightkv_export.inputs import parity_cases

    _, loaded, result = family
    engine = Engine.load(result.engine_dirs["ort-cpu"])
    h, w = engine.manifest.image_size
    token = engine.manifest.image_token_id
    cases = [(images, p) for _, images, p in parity_cases((h, w), engine.processor.images.pixel_range())]
    cases += [([parity_images((h, w), i) for i in range(n)], p) for n in (1, 2) for p in HOST_PROMPTS]
    for images, prompt in cases:
        sizes = [im.size for im in images]
        want = loaded.family.process(loaded.processor, images, prompt)
        got = engine.processor.process(images, prompt)
        assert got.input_ids.tolist() == want["input_ids"].tolist(), (prompt, sizes)
        pixels = np.concatenate([im.feeds[contract.PIXEL_VALUES] for im in got.images])
        assert pixels.shape == tuple(want["pixel_values"].shape), sizes
        assert np.array_equal(pixels, want["pixel_values"].numpy()), (prompt, sizes)  # bit for bit
        assert got.spans == loaded.family.spans(loaded.processor, want, token), (prompt, sizes)
        assert got.layouts == engine.processor.layouts(sizes), sizes


def test_an_engine_process_imports_neither_torch_nor_transformers(family):
    """Loading an engine and answering a request needs ONNX Runtime, numpy and tokenizers only (a serving
    process does not hold PyTorch's or transformers' memory)."""
    import subprocess
    import sys

    _, _, result = family
    code = (
        "import sys; from PIL import Image; from lightkv_export.runtime import Engine; "
        f"e = Engine.load({str(result.engine_dirs['ort-cpu'])!r}); "
        "g = e.generate([Image.new('RGB', (64, 48), 'red')], 'Describe.', max_new_tokens=3); "
        "print(len(g.token_ids), sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "3 []"


@pytest.fixture(scope="module")
def server(builds, tmp_path_factory):
    """One real tritonserver (loopback) serving every family's LightKV engine from one repository."""
    from lightkv_export import serve, triton_repo

    try:
        serve.find_triton()
        serve.stub_site_dir()
        serve.python_libdir()
    except serve.ServeError as e:  # the Makefile installs both; without them there is no server to test
        pytest.skip(f"tritonserver not installed: {e}")
    engines = [builds(key, 0.55).engine_dirs["ort-cpu"] for _, key in FAMILIES]
    repo = triton_repo.write_repository(engines, tmp_path_factory.mktemp("repo") / "repo")
    running = serve.Server(repo).start()
    try:
        yield running
    finally:
        running.stop()


def test_served_answers_equal_the_reference_runtime(family, server):
    """Through Triton Inference Server and the client, a request with two images of different sizes and aspect
    ratios: token ids, text and KV accounting of Engine.generate and of the PyTorch reference runtime on the
    engine's own inputs."""
    import io

    from PIL import Image

    from lightkv_export import client, triton_repo

    _, loaded, result = family
    engine = Engine.load(result.engine_dirs["ort-cpu"])
    h, w = engine.manifest.image_size
    blobs = []
    for size, seed in (((h + 28, w), 6), ((h // 2, w + 56), 7)):  # sized by the processor as sent
        buffer = io.BytesIO()
        parity_images(size, seed).save(buffer, format="PNG")
        blobs.append(buffer.getvalue())
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]
    prompt = "What differs between these images?"
    name = triton_repo.model_name(engine.manifest)
    _, answer = client.ask(server.url, blobs, prompt, model=name, max_new_tokens=5)
    local = engine.generate(images, prompt, max_new_tokens=5)
    want = reference_run(loaded, engine, images, prompt, max_new_tokens=5)
    assert answer.token_ids == local.token_ids == want.tokens and answer.text == want.text
    assert answer.kv_bytes == want.kv_bytes and answer.vision_tokens_in == want.vision_tokens_in
    assert answer.vision_tokens_per_group == [n for _, n in want.vision_tokens_per_group]
    layouts = engine.processor.layouts([im.size for im in images])
    assert answer.vision_tokens_in == sum(x.vision_tokens for x in layouts)
    low, high = engine.processor.images.pixel_range()
    assert (layouts[0] != layouts[1]) == (low < high)  # a cropping processor (LLaVA-1.5) lays both out alike
