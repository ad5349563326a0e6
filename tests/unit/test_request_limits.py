"""The Python API enforces the served engines' limits before any work, and a checkpoint's chat template is checked
where it is loaded (issue 28, sections 6 and 7).

Every refused request here runs with the engine's sessions and pixel processing replaced by tripwires (`no_work`):
a refusal must come before the vision, embedding, prefill or decode graph is touched, not from one of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightkv_export import triton_repo
from lightkv_export.errors import InputError
from lightkv_export.runtime import Engine
from lightkv_export.scheduler import Scheduler
from lightkv_export.triton_backend import codec
from lightkv_export.triton_backend.codec import Limits

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "Describe this image."


@pytest.fixture(scope="module")
def engine_dir(builds) -> Path:
    return builds("tiny-qwen-vl", 0.55).engine_dirs["ort-cpu"]


@pytest.fixture(scope="module")
def engine(engine_dir) -> Engine:
    return Engine.load(engine_dir)


@pytest.fixture(scope="module")
def image(test_image) -> Image.Image:
    return test_image  # 336 x 448, the engine's profile


class Tripwire:
    """A session that fails the test if it runs: the request should have been refused before it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, *args, **kwargs):
        raise AssertionError(f"the {self.name} session ran: the request was not refused before any work")

    run_in_place = run

    def get_outputs(self) -> list:
        return []


@contextlib.contextmanager
def no_work(engine: Engine) -> Iterator[None]:
    """No graph runs and no image is turned into pixels inside this block."""
    sessions = engine.sessions
    engine.sessions = {name: Tripwire(name) for name in sessions}

    def process(*args, **kwargs):
        raise AssertionError("the images were processed: the request was not refused before any work")

    engine.processor.process = process
    try:
        yield
    finally:
        engine.sessions = sessions
        del engine.processor.process


def refused(engine: Engine, call, match: str) -> InputError:
    """`call()` is refused with an InputError matching `match`, fast and before any work."""
    t0 = time.perf_counter()
    with no_work(engine), pytest.raises(InputError, match=match) as e:
        call()
    # Not a timing test: on main the long prompt ran 91 s. Refusing costs a length, a size or a tokenization.
    assert time.perf_counter() - t0 < 5
    return e.value


def entry_points(engine: Engine):
    """Every way a request enters the Python API: (name, submit(images, prompt, **kwargs))."""
    scheduler = Scheduler(engine, kv_budget=1 << 28)
    return [
        ("generate", lambda images, prompt, **kw: engine.generate(images, prompt, **kw)),
        ("generate_batch", lambda images, prompt, **kw: engine.generate_batch([(images, prompt)], **kw)),
        ("scheduler", lambda images, prompt, **kw: scheduler.submit(images, prompt, **kw)),
    ]


# --- the prompt ---------------------------------------------------------------------------------------------------


def test_a_100000_character_prompt_is_refused_before_any_work(engine, image):
    """On main: 91 s, 10.5 GB and a raw onnxruntime error."""
    for name, submit in entry_points(engine):
        error = refused(engine, lambda s=submit: s([image], "x" * 100_000), "100000 characters")
        assert "limit of 8192" in str(error) and "max_prompt_chars" in str(error), name
        assert "Limits(max_prompt_chars=" in str(error)  # how to raise it in Python, not only in config.pbtxt


def test_prompt_tokens_are_limited_too(engine, image):
    error = refused(engine, lambda: engine.generate([image], "a " * 3000), r"the prompt has \d+ tokens")
    assert "limit of 2048" in str(error) and "max_prompt_tokens" in str(error)


@pytest.mark.parametrize("prompt", ["\ud800", "a lone \udfff surrogate", "x" * 10 + "\ud83d"])
def test_a_prompt_with_a_lone_surrogate_is_an_input_error(engine, image, prompt):
    """On main: a TypeError from the tokenizer."""
    for _, submit in entry_points(engine):
        refused(engine, lambda s=submit: s([image], prompt), "lone UTF-16 surrogate")


def test_a_prompt_that_is_not_a_string_is_an_input_error(engine, image):
    for bad in (b"bytes", 42, None, ["a list"]):
        refused(engine, lambda b=bad: engine.generate([image], b), "must be a string")


# --- max_new_tokens -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("abc", r"positive integer, got 'abc' \(str\)"),  # on main: a ValueError from int()
        ("3", r"positive integer, got '3' \(str\)"),
        (2.7, r"positive integer, got 2.7 \(float\)"),  # on main: silently 2
        (2.0, r"positive integer, got 2.0 \(float\)"),  # integral floats too: an int only, never rounded
        (True, r"positive integer, got True \(bool\)"),
        (None, r"positive integer, got None"),
        (0, r"from 1 to 512 .*, got 0"),
        (-3, r"from 1 to 512 .*, got -3"),
        (513, r"from 1 to 512 \(this engine's max_new_tokens_limit.*got 513"),
        (2**32 + 5, r"from 1 to 512 .*got 4294967301"),
    ],
)
def test_max_new_tokens_must_be_a_positive_int_in_range(engine, image, value, match):
    for _, submit in entry_points(engine):
        refused(engine, lambda s=submit: s([image], PROMPT, max_new_tokens=value), match)


def test_numpy_integers_are_integers(engine, image):
    gen = engine.generate([image], PROMPT, max_new_tokens=np.int64(2))
    assert len(gen.token_ids) <= 2 and gen.token_ids


# --- images -------------------------------------------------------------------------------------------------------


def test_too_many_images_are_refused_before_any_is_touched(engine, image):
    for _, submit in entry_points(engine):
        error = refused(engine, lambda s=submit: s([image] * 9, PROMPT), "the request has 9 images")
        assert "limit of 8" in str(error) and "max_images" in str(error)


def test_an_oversize_image_is_refused_by_its_size(engine, image):
    big = Image.new("RGB", (5000, 5000))
    for _, submit in entry_points(engine):
        refused(engine, lambda s=submit: s([image, big], PROMPT), r"image 1 is 5000x5000 = 25000000 pixels.*16777216")


@pytest.mark.parametrize("images", ["photo.png", None, 3], ids=["str", "none", "int"])
def test_images_must_be_a_list(engine, images):
    refused(engine, lambda: engine.generate(images, PROMPT), "images must be a list of PIL images")


def test_a_single_image_instead_of_a_list_says_so(engine, image):
    refused(engine, lambda: engine.generate(image, PROMPT), r"must be a list of PIL images.*\[Image.open")


# --- sequence length and the engine's context ---------------------------------------------------------------------


def test_an_image_over_max_image_tokens_is_refused_from_its_size(engine):
    """Each image's vision tokens, from its size as the processor lays it out, against max_image_tokens: the
    vision graph's attention grows with their square."""
    from PIL import Image

    small = Engine.load(engine.directory, limits=Limits(max_image_tokens=100))
    big, fine = Image.new("RGB", (448, 336)), Image.new("RGB", (224, 168))  # 12 x 16 = 192 and 6 x 8 = 48 tokens
    refused(small, lambda: small.generate([fine, big], PROMPT), r"image 1 \(448x336 as sent\) becomes 192 vision "
            r"tokens, which is over the server's limit of 100 \(config.pbtxt parameter max_image_tokens")  # fmt: skip
    assert small.generate([fine], PROMPT, max_new_tokens=1).vision_tokens_in == 48


def test_the_sequence_length_counts_template_images_prompt_and_new_tokens(engine, image):
    tokens = engine.processor.prompt_tokens(PROMPT)
    one, _ = engine.processor.sequence_tokens(engine.processor.layouts([image.size]), tokens)
    two, parts = engine.processor.sequence_tokens(engine.processor.layouts([image.size] * 2), tokens)
    assert two - one > 192 and parts.count("+") == 3  # the 12 x 16 vision tokens and their wrapper
    small = Engine.load(engine.directory, limits=Limits(max_sequence_length=two + 10))
    refused(small, lambda: small.generate([image, image], PROMPT, max_new_tokens=16), "max_sequence_length")
    # The same request fits one image fewer: the estimate is what the limit is held to, not a guess.
    assert small.generate([image], PROMPT, max_new_tokens=2).token_ids


def test_the_engine_context_caps_the_sequence_whatever_the_limits(engine, image):
    assert engine.context_length == 4096  # the tiny preset's max_position_embeddings, recorded by the build
    assert json.loads((engine.directory / "manifest.json").read_text())["max_position_embeddings"] == 4096
    huge = Limits(max_prompt_chars=10**6, max_prompt_tokens=10**6, max_sequence_length=10**6)
    loose = Engine.load(engine.directory, limits=huge)
    error = refused(loose, lambda: loose.generate([image], "a " * 5000), "over the engine's context of 4096 tokens")
    assert "max_position_embeddings" in str(error)


def test_limits_are_overridable_both_ways(engine, image):
    # Raised: a 10,000-character prompt passes the characters limit and meets the next one, the tokens.
    wide = Engine.load(engine.directory, limits=Limits(max_prompt_chars=20_000))
    refused(wide, lambda: wide.generate([image], "x " * 5000), r"prompt has \d+ tokens")
    # Lowered: two images are one too many.
    one = Engine.load(engine.directory, limits=Limits(max_images=1))
    refused(one, lambda: one.generate([image, image], PROMPT), "the request has 2 images.*limit of 1")


def test_the_python_api_and_config_pbtxt_share_one_definition(engine):
    """The defaults written to config.pbtxt are the limits Engine.load applies when none are given."""
    text = triton_repo.render_config(engine.manifest)
    params = dict(re.findall(r'key: "(\w+)", value: \{ string_value: "([^"]*)" \}', text))
    assert codec.Limits.from_parameters(params) == engine.limits == Limits()
    assert all(name in params for name in Limits().parameters())


# --- batches and the scheduler ------------------------------------------------------------------------------------


def test_a_batch_is_checked_whole_before_its_first_request_runs(engine, image):
    items = [([image], PROMPT), ([image], "x" * 100_000)]
    refused(engine, lambda: engine.generate_batch(items), r"request 1 of the batch: the prompt has 100000 characters")
    refused(engine, lambda: engine.generate_batch([([image], PROMPT, 3)]), r"\(images, prompt\) pairs")


def test_the_scheduler_queues_nothing_it_refuses(engine, image):
    scheduler = Scheduler(engine, kv_budget=1 << 28)
    for prompt, new in (("x" * 100_000, 4), ("\ud800", 4), (PROMPT, 2.7), (PROMPT, "abc")):
        refused(engine, lambda p=prompt, n=new: scheduler.submit([image], p, max_new_tokens=n), ".")
    assert scheduler.idle and not scheduler.queue and scheduler.reserved == 0


# --- served requests (the codec) ----------------------------------------------------------------------------------


def test_max_new_tokens_past_int32_is_refused_before_triton_casts_it():
    """Triton's HTTP front casts a JSON number to the INT32 input with a plain C cast (2**32 + 5 -> 5), before the
    model sees it: the check must run on the parsed JSON value, in a front, with this pure function."""
    for value in (2**32 + 5, 2**31, 2**63 + 1):
        with pytest.raises(InputError, match=r"from 1 to 2147483647 .*INT32"):
            codec.check_max_new_tokens(value)
    assert codec.check_max_new_tokens(2**31 - 1) == 2**31 - 1
    assert codec.check_max_new_tokens(np.int32(7), 512) == 7
    body = json.loads('{"prompt": "hi", "image": ["aGk="], "max_new_tokens": 4294967301}')
    with pytest.raises(InputError, match="got 4294967301"):
        codec.check_generate_body(body, Limits())
    with pytest.raises(InputError, match="from 1 to 512"):
        codec.check_generate_body({**body, "max_new_tokens": 513}, Limits(), max_new_tokens_limit=512)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ('{"prompt": "\\ud800", "image": ["aGk="]}', "lone UTF-16 surrogate"),  # JSON's \u escapes can carry one
        ('{"prompt": "hi", "image": ["aGk="], "max_new_tokens": 2.0}', r"positive integer, got 2.0 \(float\)"),
        ('{"prompt": "hi", "image": ["aGk="], "max_new_tokens": "5"}', r"positive integer, got '5' \(str\)"),
        ('{"prompt": "hi", "image": ["aGk="], "max_new_tokens": true}', r"got True \(bool\)"),
        ('{"prompt": "hi", "image": ["aGk="], "max_new_tokens": -1}', "got -1"),
        ('{"prompt": 5, "image": ["aGk="]}', "prompt must be a string"),
        ('{"prompt": "hi", "image": [["aGk="]]}', "'image' must be a base64 string or a list"),
        ('{"prompt": "hi", "image": ' + json.dumps(["aGk="] * 9) + "}", "the request has 9 images"),
        ('{"prompt": "' + "x" * 9000 + '", "image": ["aGk="]}', "9000 characters"),
        ('{"prompt": "hi", "image": ["aGk="], "stream": "yes"}', "'stream' must be true or false"),
        ('{"image": ["aGk="]}', "needs 'prompt'"),
        ("[1, 2]", "must be a JSON object"),
    ],
)
def test_generate_body_checks(body, match):
    with pytest.raises(InputError, match=match):
        codec.check_generate_body(json.loads(body), Limits())


def test_the_generate_body_check_passes_a_good_body():
    body = {"prompt": "Describe it.", "image": "aGk=", "max_new_tokens": 8, "stream": True}
    codec.check_generate_body(body, Limits(), max_new_tokens_limit=512)


def test_the_max_new_tokens_tensor_is_checked_as_an_integer():
    assert codec.decode_max_new_tokens(np.array([7], dtype=np.int32), 16) == 7
    assert codec.decode_max_new_tokens(None, 16) == 16
    with pytest.raises(InputError, match="integer"):
        codec.decode_max_new_tokens(np.array([2.7], dtype=np.float32), 16)
    for wrapped in (0, -5):  # what a wrapped INT32 can become: refused, not run as a huge or empty generation
        with pytest.raises(InputError, match=f"got {wrapped}"):
            codec.decode_max_new_tokens(np.array([wrapped], dtype=np.int32), 16)


# --- the chat template of a checkpoint ----------------------------------------------------------------------------


def build_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": "/nonexistent-hf-cache"}
    return subprocess.run(
        [sys.executable, str(ROOT / "build.py"), *args], capture_output=True, text=True, timeout=300, env=env
    )


BAD_TEMPLATES = {
    "jinja-syntax": (
        {"chat_template.jinja": "{% for m in messages %}{{ m.role }{% endfor %}"},
        "not valid Jinja (line 1",
    ),
    "json-jinja-syntax": ({"chat_template.json": '{"chat_template": "{{ messages"}'}, "not valid Jinja"),
    "json-syntax": ({"chat_template.json": "{not json"}, "chat_template.json is not valid JSON (line 1, column 2"),
    "json-shape": (
        {"chat_template.json": '{"chat_template": 3}'},
        'must be a JSON object with a "chat_template" string',
    ),
    "render": ({"chat_template.jinja": "{{ messages[0]['content'] + 1 }}"}, "fails on a sample request"),
}


def checkpoint_with(loaded, directory: Path, files: dict[str, str]) -> Path:
    """The tiny model as a checkpoint directory whose only chat template is `files`."""
    loaded.model.save_pretrained(directory)
    loaded.processor.save_pretrained(directory)
    (directory / "chat_template.jinja").unlink()
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


@pytest.mark.parametrize("kind", list(BAD_TEMPLATES))
def test_a_bad_chat_template_is_refused_when_the_checkpoint_loads(tiny_qwen2_vl, tmp_path, kind):
    """On main: a traceback at the first rendering, after the export."""
    from lightkv_export.models.registry import load_processor, read_model_type

    files, message = BAD_TEMPLATES[kind]
    ckpt = checkpoint_with(tiny_qwen2_vl, tmp_path / "ckpt", files)
    with pytest.raises(InputError) as refused:
        load_processor(ckpt, read_model_type(ckpt))
    said = " ".join(str(refused.value).split())
    assert message in said and str(ckpt) in said  # what is wrong, and in which file


@pytest.mark.parametrize("kind", ["jinja-syntax", "json-syntax"])
def test_a_bad_chat_template_stops_the_build_before_the_export(tiny_qwen2_vl, tmp_path, kind):
    """On main: a traceback, after the export had run. Through the real CLI: exit 2, one message, no export."""
    files, message = BAD_TEMPLATES[kind]
    ckpt = checkpoint_with(tiny_qwen2_vl, tmp_path / "ckpt", files)
    out = tmp_path / "out"
    proc = build_cli("--model", str(ckpt), "--ratio", "0.55", "--out", str(out))
    assert proc.returncode == 2, proc.stderr[-3000:]
    stderr = " ".join(proc.stderr.split())
    assert message in stderr and str(ckpt) in stderr, stderr[-3000:]  # what is wrong, and in which file
    assert "Traceback" not in proc.stderr
    export = out / ".cache" / "export"
    assert not export.exists() or not any(export.iterdir()), "the export ran before the template was checked"
