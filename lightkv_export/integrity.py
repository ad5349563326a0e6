"""Manifest integrity: an engine's manifest.json is checked before anything runs from it, so that an edited manifest
is refused with the field's name instead of steering the engine (its merge plan, positions, caches) wrongly.

`verify_engine` (below; run by `Engine.load`, `python -m lightkv_export.parity` and `serve`) checks, in order:
1. every field's form (`check_fields`): types, ranges, known names (an unknown position_scheme lists the known ones),
   the schedule's syntax; never a raw KeyError or ValueError later;
2. the files the manifest lists: present, of their recorded size and (unless --no-verify-hash) SHA-256;
3. the fields the graphs decide (`check_graphs`) against what the graphs record: the layer count (the prefill's
   present.<i>.key outputs), the position scheme (the exporter's role metadata and the position_ids rank),
   vanilla-ness and the schedule, stage by stage (layer, windows, ratio: the LightKV pass's record,
   contract.ENGINE_META_KEY, held against the graph's lightkv.<k>.kept outputs and LightKVMerge nodes), the
   position and grid modes, the vision graph's inputs and their shapes;
4. every field against the digest the build wrote with the manifest (artifacts.MANIFEST_DIGEST: a SHA-256 per
   field, and one of those);
5. what fields say of each other (`check_consistency`): the schedule within the layer count, one entry per layer
   in the reference request, vanilla iff no schedule.

What an accident or an attacker can and cannot change consistently:
* Any edit that does not also rewrite the digest (a hand edit, a field added or removed, a bad merge, a truncated
  copy) is refused, naming the field. The digest has no key, so it tells an edited manifest from the build's, not
  from a forged one: someone who rewrites the digest too passes step 4.
* Such a forger still cannot change what the graphs decide. The graphs are covered by their SHA-256 in the same
  manifest and record their own schedule, layer count and position scheme; to change those consistently one must
  rewrite the graphs themselves, i.e. build another engine, which parity then checks against PyTorch with the
  graphs' own schedule (its reference is made from the manifest only once step 3 holds).
* Fields that no graph records (eos_token_ids, max_new_tokens_limit, the reference request, notes) can be changed
  consistently by a writer who rewrites the digest. Nothing inside an engine directory can stop a writer who may
  rewrite all of it; that takes a signature whose key is kept elsewhere (not done here).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, get_args

from lightkv_export.artifacts import (
    MANIFEST,
    MANIFEST_FORMAT,
    MANIFEST_REBUILD,
    Manifest,
    ReferenceRequest,
    check_manifest_digest,
    file_digest,
    read_manifest_json,
    shown,
)
from lightkv_export.contract import ENGINE_META_KEY, POSITION_IDS, PRESENT_PREFIX, ROLE_META_KEY, graph_input_shapes
from lightkv_export.errors import InputError
from lightkv_export.method.layout import OP_DOMAIN, OP_NAME, GridMode
from lightkv_export.method.schedule import Schedule, Stage, parse_schedule
from lightkv_export.models.positions import SCHEMES

REBUILD = MANIFEST_REBUILD
DAMAGED = "The engine is damaged; rebuild it with build.py."
POSITION_MODES = ("preserve", "official")  # config.POSITIONS (that module imports torch)
ENGINE_DTYPES = ("float32", "float16", "bfloat16")
# Where an engine keeps its prefill graph, and the prefix of its outputs there: ort-cpu keeps it as it is; TensorRT
# keeps the graph it built from, prefill and decode joined (passes/join_branches.py, outputs "prefill/<name>").
PREFILL_GRAPHS = {"prefill.onnx": "", "onnx/step.onnx": "prefill/"}
VISION_GRAPHS = ("vision.onnx", "onnx/vision.onnx")
SIZES = (
    "num_layers",
    "hidden_size",
    "num_kv_heads",
    "head_dim",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
)


# --- 1. forms ---------------------------------------------------------------------------------------------------


def _is_int(value: Any, minimum: int | None = None) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)


def _is_number(value: Any, low: float, high: float) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high


def _ints(value: Any, length: int | None = None, minimum: int = 0) -> bool:
    return (
        isinstance(value, list) and (length is None or len(value) == length) and all(_is_int(v, minimum) for v in value)
    )


def _str_dict(value: Any, check: Callable[[Any], bool]) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and check(v) for k, v in value.items())


def _sha256(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


def _forms() -> dict[str, tuple[Callable[[Any], bool], str]]:
    """field -> (does the value have its form, the form in words). Fields not here: the type check of
    Manifest.from_json is all their form, and the digest covers their value."""
    from lightkv_export.targets import NAMES  # imports TensorRT's module (not TensorRT): only when checking

    positive = (lambda v: _is_int(v, 1), "a positive integer")
    forms = {
        "format": (
            lambda v: v == MANIFEST_FORMAT,
            f"{MANIFEST_FORMAT}, the manifest format this lightkv_export reads (the engine was built by another "
            "version)",
        ),
        "vanilla": (lambda v: isinstance(v, bool), "true or false"),
        "random_weights": (lambda v: isinstance(v, bool), "true or false"),
        "ratio": (lambda v: v is None or _is_number(v, 0.0, 1.0), "null or a number in [0, 1]"),
        "retention": (lambda v: _is_number(v, 0.0, 1.0), "a number in [0, 1]"),
        "positions": (lambda v: v in POSITION_MODES, f"one of {', '.join(POSITION_MODES)}"),
        "grid_mode": (lambda v: v in get_args(GridMode), f"one of {', '.join(get_args(GridMode))}"),
        "position_scheme": (lambda v: v in SCHEMES, f"one of the known position schemes: {', '.join(SCHEMES)}"),
        "image_size": (lambda v: _ints(v, 2, 1), "[height, width]: two positive integers"),
        "vision_inputs": (
            lambda v: (
                bool(v) and _str_dict(v, lambda s: isinstance(s, list) and all(_is_int(d, -1) and d != 0 for d in s))
            ),
            "{vision graph input: shape}, each dimension a positive integer or -1 (any size)",
        ),
        "max_image_pixels": (lambda v: v is None or _is_int(v, 1), "null or a positive number of pixels"),
        "eos_token_ids": (lambda v: _ints(v), "a list of token ids (integers >= 0)"),
        "image_token_id": (lambda v: _is_int(v, 0), "a token id (an integer >= 0)"),
        "max_new_tokens_limit": positive,
        "weight_bytes": (lambda v: _is_int(v, 0), "a number of bytes (an integer >= 0)"),
        "dtype": (lambda v: v in ENGINE_DTYPES, f"one of {', '.join(ENGINE_DTYPES)}"),
        "target": (lambda v: v in NAMES, f"one of the engine targets {', '.join(NAMES)}"),
        "notes": (lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v), "a list of strings"),
        "versions": (lambda v: _str_dict(v, lambda x: isinstance(x, str)), "{package: version string}"),
        "files": (lambda v: _str_dict(v, _sha256), "{relative path: SHA-256 as 64 lowercase hex digits}"),
        "file_sizes": (lambda v: _str_dict(v, lambda x: _is_int(x, 0)), "{relative path: bytes (an integer >= 0)}"),
    }
    return forms | dict.fromkeys(SIZES, positive)


REFERENCE_FORMS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "prompt": (lambda v: isinstance(v, str), "a string"),
    "seq_len": (lambda v: _is_int(v, 1), "a positive integer"),
    "vision_tokens": (lambda v: _is_int(v, 0), "an integer >= 0"),
    "image_layouts": (
        lambda v: _layouts(v),
        "a list of image layouts (each a list of [rows, cols] grids and token counts)",
    ),
    **{
        f.name: (lambda v: _ints(v), "a list of integers >= 0, one per layer")
        for f in fields(ReferenceRequest)
        if f.name.endswith(("_per_layer", "_lengths"))
    },
}


def refused(source: str, name: str, value: Any, expected: str) -> InputError:
    return InputError(f"{source}: field {name} is {shown(value)}; expected {expected}. {REBUILD}")


def check_fields(manifest: Manifest, source: str = MANIFEST) -> None:
    """An InputError naming the first field whose value does not have its form (what it is, what was expected).
    The schedule is parsed for its syntax here; whether it fits the layer count is `check_consistency`'s."""
    for name, (ok, expected) in _forms().items():
        if not ok(getattr(manifest, name)):
            raise refused(source, name, getattr(manifest, name), expected)
    for name, (ok, expected) in REFERENCE_FORMS.items():
        if not ok(getattr(manifest.reference_request, name)):
            raise refused(source, f"reference_request.{name}", getattr(manifest.reference_request, name), expected)
    schedule_stages(manifest.schedule, source)


def schedule_stages(text: str, source: str = MANIFEST, num_layers: int | None = None) -> tuple[Stage, ...]:
    """The stages of a manifest's schedule ('' for a vanilla engine: none); an InputError naming the field.
    Without `num_layers` only the syntax and each stage's own ranges are checked."""
    if text == "":
        return ()
    try:
        return parse_schedule(text, num_layers if num_layers is not None else 2**62).stages
    except InputError as exc:
        expected = (
            "LAYER:WINDOWS:RATIO stages with increasing layers, separated by commas (e.g. '3:2:0.5,7:1:0.5'), or "
            f"'' for a vanilla engine ({str(exc).rstrip('.')})"
        )
        raise refused(source, "schedule", text, expected) from None


# --- 3. the graphs ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphFacts:
    """What an engine's graphs record of how they were built."""

    path: Path  # the prefill graph they were read from
    num_layers: int
    position_scheme: str
    stages: tuple[Stage, ...]  # () for a vanilla prefill
    positions: str | None  # the LightKV pass's position and grid modes (None: a vanilla prefill records none)
    grid_mode: str | None
    vision_inputs: dict[str, list[int]] | None  # None where the engine has no vision ONNX graph (TensorRT plans)

    @property
    def vanilla(self) -> bool:
        return not self.stages

    def schedule(self) -> str:
        return str(Schedule(self.num_layers, self.stages))


def _load_graph(path: Path):
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: the file is not a graph
        raise InputError(f"{path} is not a readable ONNX graph ({type(exc).__name__}: {exc}). {DAMAGED}") from None


def _metadata(model, key: str, path: Path) -> dict[str, Any] | None:
    props = {p.key: p.value for p in model.metadata_props}
    if key not in props:
        return None
    try:
        value = json.loads(props[key])
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise InputError(f"{path}: its metadata {key!r} is not a JSON object. {DAMAGED}")
    return value


def _numbered(names: list[str], pattern: str) -> list[int]:
    """The numbers of the names that match `pattern` (one group), sorted."""
    return sorted(int(m.group(1)) for name in names if (m := re.fullmatch(pattern, name)))


def _merge_nodes(graph) -> list:
    """The LightKVMerge nodes of a graph and its subgraphs (If bodies)."""
    nodes = []
    for node in graph.node:
        if node.domain == OP_DOMAIN and node.op_type == OP_NAME:
            nodes.append(node)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                nodes += _merge_nodes(sub)
    return nodes


def graph_facts(directory: Path, manifest: Manifest) -> GraphFacts:
    """Read the schedule, layer count, position scheme and modes from the engine's prefill graph (and one image's
    input shape from its vision graph). A graph whose own records disagree with its structure is an InputError:
    the graph is damaged."""
    import onnx

    directory = Path(directory)
    name = next((n for n in PREFILL_GRAPHS if n in manifest.files), None)
    if name is None:
        raise InputError(
            f"{directory / MANIFEST} lists no prefill graph ({' or '.join(PREFILL_GRAPHS)}), so nothing can confirm "
            f"its schedule. {REBUILD}"
        )
    path, prefix = directory / name, re.escape(PREFILL_GRAPHS[name])
    model = _load_graph(path)

    def damaged(what: str) -> InputError:
        return InputError(f"{path} is inconsistent: {what}. {DAMAGED}")

    roles = _metadata(model, ROLE_META_KEY, path)
    if roles is None:
        raise InputError(f"{path} has no {ROLE_META_KEY!r} metadata (exported by an older lightkv_export). {REBUILD}")
    outputs = [o.name for o in model.graph.output]
    layers = _numbered(outputs, prefix + re.escape(PRESENT_PREFIX) + r"(\d+)\.key")
    if layers != list(range(len(layers))) or len(layers) != roles.get("num_layers"):
        raise damaged(f"present keys of layers {layers}, its metadata records {roles.get('num_layers')!r} layers")
    scheme = roles.get("position_scheme")
    if scheme not in SCHEMES:
        raise damaged(f"its metadata records the position scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    position_ids = next((i for i in model.graph.input if re.fullmatch(prefix + POSITION_IDS, i.name)), None)
    rank = len(position_ids.type.tensor_type.shape.dim) if position_ids is not None else None
    if rank is not None and rank != len(SCHEMES[scheme].lead) + 2:
        raise damaged(f"position_ids of rank {rank}, which the position scheme {scheme!r} does not have")

    kept = _numbered(outputs, prefix + r"lightkv\.(\d+)\.kept")
    if kept != list(range(len(kept))):
        raise damaged(f"LightKV stage outputs {kept} (not 0..k-1)")
    record = _metadata(model, ENGINE_META_KEY, path)
    stages: tuple[Stage, ...] = ()
    if kept and record is None:
        raise InputError(
            f"{path} has {len(kept)} LightKV stages but does not record its schedule ({ENGINE_META_KEY!r}: built by "
            f"an older lightkv_export). {REBUILD}"
        )
    if record is not None:
        try:
            stages = tuple(Stage(int(layer), int(windows), float(ratio)) for layer, windows, ratio in record["stages"])
        except (KeyError, TypeError, ValueError):
            raise damaged(f"its {ENGINE_META_KEY!r} metadata has no stages [[layer, windows, ratio], ...]") from None
    if len(stages) != len(kept):
        raise damaged(f"{len(kept)} LightKV stage outputs, its metadata records {len(stages)} stages")
    for node in _merge_nodes(model.graph):  # ort-cpu keeps them (TensorRT's plugins drop windows and ratio)
        # (kept_reordered: the op's own kept where the stage reorders its input, insert_lightkv's reorder)
        k = _numbered([node.output[1].removeprefix(PREFILL_GRAPHS[name])], r"lightkv\.(\d+)\.kept(?:_reordered)?")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if k and k[0] < len(stages):
            s = stages[k[0]]
            # The attribute is a float32: the ratio agrees to its precision.
            if attrs.get("windows") != s.windows or abs(float(attrs.get("ratio", -1.0)) - s.ratio) > 1e-6:
                raise damaged(
                    f"stage {k[0]}'s LightKVMerge node has windows {attrs.get('windows')} and ratio "
                    f"{attrs.get('ratio')}, its metadata records {s}"
                )
    return GraphFacts(
        path=path,
        num_layers=len(layers),
        position_scheme=scheme,
        stages=stages,
        positions=record.get("positions") if record else None,
        grid_mode=record.get("grid_mode") if record else None,
        vision_inputs=_vision_inputs(directory, manifest),
    )


def _vision_inputs(directory: Path, manifest: Manifest) -> dict[str, list[int]] | None:
    name = next((n for n in VISION_GRAPHS if n in manifest.files), None)
    if name is None:
        return None
    return graph_input_shapes(_load_graph(directory / name))


def _shape(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(d, -1) and d != 0 for d in value)


def _layouts(value: Any) -> bool:
    from lightkv_export.method.spans import ImageLayout

    try:
        return isinstance(value, list) and all(isinstance(v, list) and ImageLayout.from_json(v) for v in value)
    except (TypeError, ValueError):
        return False


def check_graphs(directory: Path, manifest: Manifest) -> GraphFacts:
    """An InputError naming the first field whose value is not what the engine's graphs record (what the manifest
    says, what the graphs say, what to do); else the graphs' facts."""
    facts = graph_facts(directory, manifest)
    source = Path(directory) / MANIFEST

    def differ(name: str, says: str, graphs_say: str) -> InputError:
        return InputError(
            f"{source}: field {name} is {says}, but the engine's graphs say {graphs_say} ({facts.path}). The manifest "
            f"was edited after the build, or the graphs are another build's. {REBUILD}"
        )

    if manifest.num_layers != facts.num_layers:
        raise differ("num_layers", shown(manifest.num_layers), str(facts.num_layers))
    if manifest.position_scheme != facts.position_scheme:
        raise differ("position_scheme", shown(manifest.position_scheme), shown(facts.position_scheme))
    if manifest.vanilla != facts.vanilla:
        what = "vanilla (no LightKV stages)" if facts.vanilla else f"LightKV with the schedule {facts.schedule()!r}"
        raise differ("vanilla", shown(manifest.vanilla), what)
    # In the schedule's own string form (ratios as `Stage` prints them), as the build wrote it into the manifest.
    says = str(Schedule(manifest.num_layers, schedule_stages(manifest.schedule, str(source))))
    if says != facts.schedule():
        raise differ("schedule", repr(manifest.schedule), repr(facts.schedule()) + (" (none)" if facts.vanilla else ""))
    for name in ("positions", "grid_mode"):
        recorded = getattr(facts, name)
        if recorded is not None and getattr(manifest, name) != recorded:
            raise differ(name, shown(getattr(manifest, name)), shown(recorded))
    if facts.vision_inputs is not None and manifest.vision_inputs != facts.vision_inputs:
        raise differ("vision_inputs", shown(manifest.vision_inputs), shown(facts.vision_inputs))
    return facts


# --- 5. fields against each other ---------------------------------------------------------------------------------


def check_consistency(manifest: Manifest, source: str = MANIFEST) -> None:
    """An InputError naming the fields that contradict each other (a manifest that passed its digest can only
    fail here if the build wrote it so, or a forger rewrote the digest)."""

    def contradict(names: str, what: str) -> InputError:
        return InputError(f"{source}: fields {names} contradict each other: {what}. {REBUILD}")

    if manifest.vanilla != (manifest.schedule == ""):
        raise contradict(
            "vanilla, schedule", f"vanilla is {shown(manifest.vanilla)} with schedule {manifest.schedule!r}"
        )
    if manifest.schedule:
        try:
            parse_schedule(manifest.schedule, manifest.num_layers)
        except InputError as exc:
            raise contradict("schedule, num_layers", str(exc).rstrip(".")) from None
    ref = manifest.reference_request
    for name, (_, expected) in REFERENCE_FORMS.items():
        value = getattr(ref, name)
        if expected.endswith("one per layer") and len(value) != manifest.num_layers:
            raise contradict(
                f"reference_request.{name}, num_layers", f"{len(value)} entries for {manifest.num_layers} layers"
            )
    if manifest.image_token_id >= manifest.vocab_size:
        raise contradict(
            "image_token_id, vocab_size", f"token {manifest.image_token_id} in a vocabulary of {manifest.vocab_size}"
        )


def verify_engine(directory: str | Path, *, full_hash: bool = True) -> Manifest:
    """The engine's manifest, once every file it lists is present with its recorded size and (with `full_hash`)
    SHA-256, and the manifest itself holds: every field in its form, the fields the graphs decide
    (schedule, layers, position scheme, vanilla) equal to what the graphs record, and the rest equal to what the
    build wrote (its digest). Anything else is an InputError naming the file or the field: a damaged or edited
    engine is refused, never run."""
    directory = Path(directory)
    record = read_manifest_json(directory)
    manifest = Manifest.from_json(record, str(directory / MANIFEST))
    check_fields(manifest, str(directory / MANIFEST))  # before any field is used, even to find a file
    files, sizes = manifest.files, manifest.file_sizes
    if not files or set(files) != set(sizes):
        raise InputError(
            f"{directory / MANIFEST} does not list the engine's files with their sizes and hashes (built by an "
            "older lightkv_export, or edited); rebuild the engine with build.py."
        )
    rebuild = "The engine is damaged; rebuild it with build.py (add --force if the export cache is damaged too)."
    for name in sorted(files):
        path = directory / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise InputError(f"{directory / MANIFEST} lists {name!r}, which is outside the engine directory.")
        if not path.is_file():
            raise InputError(f"{path} is missing: the manifest lists it. {rebuild}")
        size = path.stat().st_size
        if size != sizes[name]:
            raise InputError(f"{path} has {size:,} bytes, the manifest records {sizes[name]:,}. {rebuild}")
    if full_hash:
        for name in sorted(files):
            if file_digest(directory / name) != files[name]:
                raise InputError(f"{directory / name} does not match its SHA-256 in the manifest. {rebuild}")
    # Fields against the graphs first (their message says what each side says), then the digest for the rest.
    check_graphs(directory, manifest)
    check_manifest_digest(record, str(directory / MANIFEST))
    check_consistency(manifest, str(directory / MANIFEST))
    return manifest
