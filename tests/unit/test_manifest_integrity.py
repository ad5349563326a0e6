"""A manifest cannot lie (issue 28, section 4): an edited manifest.json is refused, naming the field, by
`Engine.load`, `serve`'s check and parity (its Python API and `python -m lightkv_export.parity`), before anything
runs from it. The fields the graphs decide (schedule, layer count, position scheme, vanilla) are read from the graphs;
every other field is held to the digest the build wrote (integrity.py).

Every case edits a copy of the session's one tiny engine (conftest.builds): no second build.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import onnx
import pytest

from lightkv_export.errors import InputError
from lightkv_export.runtime import Engine
from tests.helpers import make_manifest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(builds) -> Path:
    result = builds("tiny-qwen-vl", 0.55)
    assert result.exit_code == 0
    return result.engine_dirs["ort-cpu"]


def edited(engine: Path, where: Path, edit: Callable[[dict], object], *, reseal: bool = False) -> Path:
    """A copy of `engine` whose manifest.json went through `edit` (a function of its JSON object). `reseal`: the
    digest is recomputed after the edit, as someone who knows how would (a consistent forgery)."""
    copy = where / "engine"
    shutil.copytree(engine, copy)
    path = copy / "manifest.json"
    record = json.loads(path.read_text())
    edit(record)
    if reseal:
        from lightkv_export.artifacts import manifest_digest

        record["manifest_digest"] = manifest_digest(record)
    path.write_text(json.dumps(record, indent=2))
    return copy


def set_field(name: str, value) -> Callable[[dict], None]:
    return lambda record: record.__setitem__(name, value)


def one_window_digit(record: dict) -> None:
    """The fault of the issue: one digit of the first stage's windows ('3:2:0.5' -> '3:9:0.5')."""
    assert record["schedule"].startswith("3:2:0.5,"), record["schedule"]
    record["schedule"] = record["schedule"].replace("3:2:0.5", "3:9:0.5", 1)


def tamper_digest(record: dict) -> None:
    record["manifest_digest"]["fields"]["dtype"] = "0" * 64


# (edit, what the refusal must say). Each of these loads on main without a word, or fails with a raw KeyError.
EDITS = {
    "schedule-digit": (
        one_window_digit,
        r"field schedule is '3:9:0\.5,4:2:0\.5,7:1:0\.5', but the engine's graphs say '3:2:0\.5,4:2:0\.5,7:1:0\.5'",
    ),
    "num_layers": (set_field("num_layers", 9), r"field num_layers is 9, but the engine's graphs say 8"),
    "num_layers-below-the-schedule": (set_field("num_layers", 5), r"field num_layers is 5, but the engine's graphs"),
    "image_size": (set_field("image_size", [224, 448]), r"field image_size was changed \(to \[224, 448\]\)"),
    "image_size-malformed": (set_field("image_size", [336]), r"field image_size is \[336\]; expected \[height, "),
    "vanilla": (set_field("vanilla", True), r"field vanilla is true, but the engine's graphs say LightKV"),
    "position_scheme-unknown": (
        set_field("position_scheme", "bogus"),
        r'field position_scheme is "bogus"; expected one of the known position schemes: rope1d, mrope',
    ),
    "position_scheme-other": (
        set_field("position_scheme", "rope1d"),
        r'field position_scheme is "rope1d", but the engine\'s graphs say "mrope"',
    ),
    "positions": (set_field("positions", "official"), r'field positions is "official", but the engine\'s graphs'),
    "field-deleted": (lambda record: record.pop("weight_bytes"), r"field weight_bytes was removed after the build"),
    "field-added": (set_field("context_override", 10**6), r"field context_override was added \(1000000\)"),
    "eos_token_ids": (set_field("eos_token_ids", [0]), r"field eos_token_ids was changed"),
    "digest-tampered": (tamper_digest, r"manifest_digest was edited"),
    "digest-removed": (lambda record: record.pop("manifest_digest"), r"has no manifest_digest"),
}


@pytest.mark.parametrize("case", EDITS)
def test_an_edited_manifest_is_refused_naming_the_field(engine, tmp_path, case):
    """Engine.load and serve's check (`serve.verify_engines`, before any server starts) refuse the copy with one
    InputError that names the field and says to rebuild; no traceback-worthy KeyError or ValueError."""
    from lightkv_export.serve import verify_engines

    edit, expected = EDITS[case]
    copy = edited(engine, tmp_path, edit)
    with pytest.raises(InputError, match=expected) as err:
        Engine.load(copy, lazy=True)
    message = str(err.value)
    assert str(copy / "manifest.json") in message and "Rebuild the engine with build.py" in message
    with pytest.raises(InputError, match=expected):
        verify_engines(copy)


@pytest.mark.parametrize("case", ["schedule-digit", "num_layers", "vanilla", "position_scheme-other"])
def test_a_forged_manifest_with_a_fresh_digest_is_still_refused_by_the_graphs(engine, tmp_path, case):
    """Whoever recomputes the digest after the edit passes it, but the graphs still say what they were built for."""
    edit, expected = EDITS[case]
    copy = edited(engine, tmp_path, edit, reseal=True)
    with pytest.raises(InputError, match=expected):
        Engine.load(copy, lazy=True)


def test_the_build_seals_its_manifest_and_its_graphs_record_what_they_were_built_for(engine, tmp_path, tiny_qwen_vl):
    """The untouched copy: its digest holds, the graphs' facts are the manifest's, it loads and parity passes."""
    from lightkv_export.artifacts import check_manifest_digest, read_manifest, read_manifest_json
    from lightkv_export.integrity import graph_facts
    from lightkv_export.parity import run_parity

    copy = edited(engine, tmp_path, lambda record: None)
    check_manifest_digest(read_manifest_json(copy))
    manifest = read_manifest(copy)
    facts = graph_facts(copy, manifest)
    assert (facts.schedule(), facts.num_layers, facts.position_scheme, facts.vanilla) == (
        manifest.schedule, manifest.num_layers, manifest.position_scheme, manifest.vanilla,
    )  # fmt: skip
    assert (facts.positions, facts.grid_mode, facts.vision_inputs) == (
        manifest.positions, manifest.grid_mode, manifest.vision_inputs,
    )  # fmt: skip
    assert Engine.load(copy).schedule.stages == facts.stages
    report = run_parity(copy, loaded=tiny_qwen_vl)
    assert report.passed, report.failure_lines()


def test_parity_refuses_an_edited_manifest_through_its_python_api(engine, tmp_path, tiny_qwen_vl):
    """On main this ran every check with the manifest's schedule on both sides, and passed."""
    from lightkv_export.parity import run_parity

    copy = edited(engine, tmp_path, one_window_digit)
    before = (copy / "parity.json").read_bytes()
    with pytest.raises(InputError, match=EDITS["schedule-digit"][1]):
        run_parity(copy, loaded=tiny_qwen_vl)
    assert (copy / "parity.json").read_bytes() == before  # refused before any check ran


@pytest.mark.parametrize("case", ["schedule-digit", "position_scheme-unknown"])
def test_the_parity_cli_fails_an_edited_manifest_naming_the_field(engine, tmp_path, case):
    """`python -m lightkv_export.parity E` on real files: exit 2 (its code for an engine it refuses, as for a damaged
    file), one message naming the field, never PASS or a traceback."""
    edit, expected = EDITS[case]
    copy = edited(engine, tmp_path, edit)
    proc = subprocess.run(
        [sys.executable, "-m", "lightkv_export.parity", str(copy)], capture_output=True, text=True, timeout=300,
        cwd=ROOT,
    )  # fmt: skip
    err = " ".join(proc.stderr.split())
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert re.search(expected, err), err
    assert "PASS" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr


def forge(copy: Path, **fields) -> None:
    """Set manifest fields of an engine copy and make the rest agree, as a careful forger would: the files' hashes
    and sizes as the files now are, and a fresh digest."""
    from lightkv_export.artifacts import file_records, manifest_digest

    path = copy / "manifest.json"
    record = json.loads(path.read_text())
    records = file_records(copy)
    for key in ("files", "file_sizes"):
        record[key] = {name: records[key][name] for name in record[key]}
    record.update(fields)
    record["manifest_digest"] = manifest_digest(record)
    path.write_text(json.dumps(record, indent=2))


def test_a_graph_whose_record_disagrees_with_its_merge_nodes_is_refused(engine, tmp_path):
    """A forgery of the prefill graph's schedule record and of the manifest alike (hashes and digest recomputed):
    ONNX Runtime's graph still carries each stage's windows and ratio on its LightKVMerge node."""
    from lightkv_export.contract import ENGINE_META_KEY

    copy = edited(engine, tmp_path, lambda record: None)
    graph = onnx.load(str(copy / "prefill.onnx"), load_external_data=False)
    entry = next(p for p in graph.metadata_props if p.key == ENGINE_META_KEY)
    record = json.loads(entry.value)
    record["stages"][0][1], record["schedule"] = 9, record["schedule"].replace("3:2:0.5", "3:9:0.5", 1)
    entry.value = json.dumps(record)
    onnx.save(graph, str(copy / "prefill.onnx"))
    forge(copy, schedule=record["schedule"])
    with pytest.raises(InputError, match=r"prefill\.onnx is inconsistent: stage 0's LightKVMerge node has windows 2"):
        Engine.load(copy, lazy=True)


def test_the_tensorrt_engines_joined_graph_records_the_same_facts(engine, tmp_path):
    """A TensorRT engine keeps the graph it was built from with prefill and decode joined (onnx/step.onnx): its
    facts are read from there, as ort-cpu's are from prefill.onnx. (The joining and lowering need no TensorRT.)"""
    from lightkv_export.artifacts import read_manifest
    from lightkv_export.integrity import graph_facts
    from lightkv_export.targets.trt import step_graph

    manifest = read_manifest(engine)
    onnx_dir = tmp_path / "trt" / "onnx"
    onnx_dir.mkdir(parents=True)
    graphs = {n: onnx.load(str(engine / f"{n}.onnx"), load_external_data=False) for n in ("prefill", "decode")}
    onnx.save(step_graph(graphs["prefill"], graphs["decode"]), str(onnx_dir / "step.onnx"))
    shutil.copyfile(engine / "vision.onnx", onnx_dir / "vision.onnx")
    trt_like = replace(manifest, files={"onnx/step.onnx": "0" * 64, "onnx/vision.onnx": "0" * 64})
    ours, theirs = graph_facts(engine, manifest), graph_facts(tmp_path / "trt", trt_like)
    assert replace(theirs, path=ours.path) == ours and ours.stages


# --- field forms, without an engine -----------------------------------------------------------------------------

FORMS = {
    "image_size": ([336], r"field image_size is \[336\]; expected \[height, width\]: two positive integers"),
    "vision_inputs": ({"pixel_values": [0, 4]}, r"field vision_inputs is .*; expected \{vision graph input: shape\}"),
    "max_image_pixels": (0, r"field max_image_pixels is 0; expected null or a positive number of pixels"),
    "position_scheme": ("bogus", r"field position_scheme is \"bogus\"; expected one of .*rope1d, mrope"),
    "positions": ("fancy", r"field positions is \"fancy\"; expected one of preserve, official"),
    "grid_mode": ("square", r"field grid_mode is \"square\"; expected one of true, official"),
    "dtype": ("int8", r"field dtype is \"int8\"; expected one of float32, float16, bfloat16"),
    "target": ("tpu", r"field target is \"tpu\"; expected one of the engine targets ort-cpu"),
    "ratio": (1.5, r"field ratio is 1\.5; expected null or a number in \[0, 1\]"),
    "eos_token_ids": ([-1], r"field eos_token_ids is \[-1\]; expected a list of token ids"),
    "num_layers": (0, r"field num_layers is 0; expected a positive integer"),
    "files": ({"prefill.onnx": "abc"}, r"field files is .*; expected \{relative path: SHA-256"),
    "schedule": ("3:2", r"field schedule is \"3:2\"; expected LAYER:WINDOWS:RATIO stages"),
    "format": (2, r"field format is 2; expected 4, the manifest format this lightkv_export reads"),
}


@pytest.mark.parametrize("name", FORMS)
def test_each_field_in_the_wrong_form_is_named_with_the_form_expected(name):
    from lightkv_export.integrity import check_fields

    value, expected = FORMS[name]
    with pytest.raises(InputError, match=expected):
        check_fields(replace(make_manifest(schedule="1:2:0.5"), **{name: value}), "manifest.json")


def test_a_reference_request_in_the_wrong_form_is_named_by_its_field():
    from lightkv_export.integrity import check_fields

    manifest = make_manifest(schedule="1:2:0.5")
    check_fields(manifest, "manifest.json")  # the helper's manifest has every field in its form
    bad = replace(manifest, reference_request=replace(manifest.reference_request, kv_lengths=["40"]))
    with pytest.raises(InputError, match=r"field reference_request\.kv_lengths is \[\"40\"\]"):
        check_fields(bad, "manifest.json")
