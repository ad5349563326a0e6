"""Model keys, aliases and the loader: a key, a hub id or a local directory -> LoadedModel.

Nothing here touches the network. Real checkpoints come from a local directory or the local Hugging Face cache
(HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub); tiny presets are built in-process.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightkv_export.errors import InputError, LightKVError, ModelNotFoundError
from lightkv_export.method.layout import MIN_TOKENS_PER_WINDOW
from lightkv_export.models import llava, qwen2_5_vl, qwen2_vl, tiny  # noqa: F401  (importing a family registers it)
from lightkv_export.models.base import LoadedModel, ModelSpec
from lightkv_export.models.family import FAMILIES, Family

if TYPE_CHECKING:
    import torch

    from lightkv_export.images import ImageHost

MODEL_TYPES = {model_type: family.name for family in FAMILIES.values() for model_type in family.model_types}

# Every model key, buildable or planned, as its family declares it (`Family.presets`), families in registration
# (import) order: the one table of keys and aliases; sizes come through each family's `arch`.
SPECS: dict[str, ModelSpec] = {spec.key: spec for family in FAMILIES.values() for spec in family.presets}
ALIASES: dict[str, str] = {alias: spec.key for spec in SPECS.values() for alias in spec.aliases}


def known_keys() -> str:
    aliases = ", ".join(f"{a} -> {k}" for a, k in ALIASES.items())
    return f"known keys: {', '.join(SPECS)}; aliases: {aliases}"


def get_spec(key: str) -> ModelSpec:
    """The registry entry for a model key or alias (case-insensitive)."""
    name = key.strip().lower()
    name = ALIASES.get(name, name)
    if name not in SPECS:
        raise InputError(f"unknown model {key!r}; {known_keys()}. A local checkpoint directory is also accepted.")
    return SPECS[name]


def get_family(name: str) -> Family:
    """The registered family `name` (an engine's manifest records it)."""
    if name not in FAMILIES:
        raise InputError(f"unknown model family {name!r}; registered families: {', '.join(sorted(FAMILIES))}.")
    return FAMILIES[name]


def load_model(key_or_local_dir: str, *, random_weights: bool = False, dtype: torch.dtype | None = None) -> LoadedModel:
    """A model key, alias, hub id or local checkpoint directory -> LoadedModel (eval mode, `dtype`).

    Tiny presets are always random (seeded) and cached in-process. Real checkpoints load from a local directory
    or the local Hugging Face cache; `random_weights` builds the real architecture with seeded random weights
    instead (from the local config when there is one, else from the known hyper-parameters).
    """
    path = Path(key_or_local_dir).expanduser()
    if path.is_dir():  # keyed by its resolved path: the same folder is one model however it is spelled
        return load_local(path.resolve(), random_weights=random_weights, dtype=dtype)
    name = key_or_local_dir.strip().lower()
    if ALIASES.get(name, name) not in SPECS and ("/" in name or name.startswith((".", "~"))):
        if is_hub_id(key_or_local_dir.strip()):
            return load_hub_id(key_or_local_dir.strip(), random_weights=random_weights, dtype=dtype)
        raise ModelNotFoundError(
            f"{key_or_local_dir!r} is neither a model key nor a checkpoint directory on this machine "
            f"({known_keys()}). {how_to_get(None)}"
        )
    spec = get_spec(key_or_local_dir)
    if spec.plan_only:
        raise InputError(f"model {spec.key!r}: {spec.plan_only}.")
    if spec.tiny:
        return load_tiny(spec.key, dtype)
    snapshot = cached_snapshot(spec.hf_id)
    if snapshot is not None:
        return load_local(snapshot, random_weights=random_weights, dtype=dtype, spec=spec)
    if random_weights:
        return build_random(spec, dtype)
    raise ModelNotFoundError(
        f"{spec.hf_id} (model {spec.key!r}) is not in the local Hugging Face cache ({hub_cache_dir()}) and this "
        f"machine has no network. {how_to_get(spec.hf_id)}"
    )


def is_hub_id(text: str) -> bool:
    """'Org/Name' as the Hugging Face hub spells repository ids (not a path: no leading '/', '.' or '~')."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", text) is not None


def load_hub_id(hf_id: str, *, random_weights: bool, dtype: torch.dtype) -> LoadedModel:
    """An unregistered hub id from the local cache; its config.json's model_type picks the family (or is refused)."""
    snapshot = cached_snapshot(hf_id)
    if snapshot is None:
        raise ModelNotFoundError(
            f"{hf_id!r} is neither a model key, a checkpoint directory on this machine, nor a hub id in the local "
            f"Hugging Face cache ({hub_cache_dir()}), and this machine has no network ({known_keys()}). "
            f"{how_to_get(hf_id)}"
        )
    return load_local(snapshot, random_weights=random_weights, dtype=dtype, key=hf_id)


def how_to_get(hf_id: str | None) -> str:
    command = f"`huggingface-cli download {hf_id}`" if hf_id else "`huggingface-cli download ORG/NAME`"
    return (
        f"Download it on a machine with network ({command}, then copy the cache or set "
        f"HF_HUB_CACHE), or pass a local directory holding config.json, *.safetensors and the processor files. "
        f"Without a checkpoint: use a tiny preset ({', '.join(k for k, s in SPECS.items() if s.tiny)}), "
        "or --random-weights for the real architecture with random weights."
    )


# --- tiny presets -----------------------------------------------------------------------------------------------


def resolve_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """float32 unless told otherwise (never transformers' "auto", the checkpoint's own dtype). torch is imported
    here, not at module level: the runtime reads families' host sides through this registry without PyTorch."""
    import torch

    return torch.float32 if dtype is None else dtype


def load_tiny(key: str, dtype: torch.dtype | None = None) -> LoadedModel:
    """The tiny preset: real architecture at toy size, seeded weights, locally built tokenizer and processor."""
    return _load_tiny(key, resolve_dtype(dtype))


@functools.cache
def _load_tiny(key: str, dtype: torch.dtype) -> LoadedModel:
    spec = SPECS[key]
    family = FAMILIES[spec.family]
    config, processor = family.tiny_preset()
    return LoadedModel(spec=spec, model=build_seeded(family, config, dtype), processor=processor, family=family)


def build_seeded(family: Family, config: Any, dtype: torch.dtype) -> Any:
    """The family's model from `config` with weights drawn from a fixed seed, eval mode."""
    import torch

    dtype = resolve_dtype(dtype)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        model = family.model_class()._from_config(config, dtype=dtype)
    seeded_init_(model, tiny.SEED)
    model.eval()
    set_generation_ids(model, config)
    return model


def seeded_init_(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every weight with uniform noise from one seeded generator, in parameter order.

    torch's uniform sampler is serial on CPU (no SIMD-dependent maths, unlike its normal sampler), so the
    weights are bit-identical on every machine. Matrices get variance 1 / fan_in, biases +-0.02, norm gains stay 1.
    """
    import torch

    with torch.no_grad():
        _seeded_init(model, seed)


def _seeded_init(model: torch.nn.Module, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    norm_params = {id(p) for m in model.modules() if "Norm" in type(m).__name__ for p in m.parameters(recurse=False)}
    for param in model.parameters():
        if id(param) in norm_params:
            continue
        fan_in = param[0].numel() if param.dim() > 1 else 0
        bound = (3.0 / fan_in) ** 0.5 if fan_in else 0.02
        noise = torch.rand(param.shape, generator=gen, dtype=torch.float32)  # U[0, 1)
        param.copy_((noise * 2 - 1) * bound)


def set_generation_ids(model: Any, config: Any) -> None:
    """Greedy by default; stop at the text config's end-of-turn token."""
    text = config.get_text_config()
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id, gen.bos_token_id = text.eos_token_id, text.pad_token_id, text.bos_token_id
    gen.do_sample = False


# --- real checkpoints -------------------------------------------------------------------------------------------


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (tests point it elsewhere)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def cached_snapshot(hf_id: str, revision: str = "main") -> Path | None:
    """The snapshot directory of `hf_id` in the local hub cache (models--Org--Name/snapshots/<sha>), or None."""
    repo = hub_cache_dir() / f"models--{hf_id.replace('/', '--')}"
    ref = repo / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = repo / "snapshots" / commit
    if (snapshot / "config.json").is_file():
        return snapshot
    snapshots = sorted(p for p in (repo / "snapshots").glob("*") if (p / "config.json").is_file())
    return snapshots[-1] if len(snapshots) == 1 else None


def read_model_type(path: Path) -> str:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelNotFoundError(f"{path} has no config.json, so it is not a checkpoint directory. {how_to_get(None)}")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise InputError(f"{config_file} is not a JSON object: {exc}") from None
    if model_type not in MODEL_TYPES:
        raise InputError(
            f"{path}: model_type {model_type!r} is not supported; supported model types: {', '.join(MODEL_TYPES)} "
            f"({known_keys()})."
        )
    return MODEL_TYPES[model_type]


def base_preset(family: Family, config: Any) -> ModelSpec:
    """The family's buildable preset with `config`'s shape (`Family.tiny_shaped`): what a local checkpoint starts
    from (windows, reference image) and takes its hub id and tolerances from."""
    buildable, tiny_shaped = [s for s in family.presets if not s.plan_only], family.tiny_shaped(config)
    return next((s for s in buildable if s.tiny == tiny_shaped), buildable[0])  # else: the one it has


def spec_for_local(key: str, family_name: str, config: Any) -> ModelSpec:
    """A local checkpoint's (or unregistered hub id's) spec before its processor is read: the hub id, tolerances,
    windows and reference image of the preset with its shape (`base_preset`); `fit_local_defaults` then fits the
    windows and the image to its processor."""
    base = base_preset(FAMILIES[family_name], config)
    return ModelSpec(
        key=key,
        family=family_name,
        hf_id=base.hf_id,
        tiny=False,
        default_windows=base.default_windows,
        default_image_size=base.default_image_size,
        tolerances=dict(base.tolerances),
    )


# The images `largest_image_tokens` lays out: photo and page shapes, either way up, at and a little below the
# processor's largest pixel count (a processor that rounds sides down gives fewer tokens right at its limit).
LARGEST_ASPECTS = (1.0, 3 / 4, 4 / 3, 1 / 2, 2.0)
LARGEST_SCALES = tuple(1.0 - 0.03 * k for k in range(11))  # 1.0 down to 0.7 of the pixels


def largest_image_tokens(host: ImageHost) -> int:
    """The most tokens one grid holds (a stage's windows tile each grid on its own) among images near the
    processor's largest pixel count, in photo and page shapes (long strips, which rounding can give a few more,
    aside)."""
    high = host.pixel_range()[1]
    most = 0
    for aspect in LARGEST_ASPECTS:
        for scale in LARGEST_SCALES:
            height = max(host.min_side, round(math.sqrt(high * scale * aspect)))
            width = max(host.min_side, round(high * scale / height))
            most = max(most, *(rows * cols for rows, cols in host.layout(height, width).grids))
    return most


def fitting_windows(windows: tuple[int, ...], tokens: int) -> tuple[int, ...]:
    """Each stage's windows per side cut to what an image of `tokens` tokens can fill: a stage with p windows per
    side merges only images of at least MIN_TOKENS_PER_WINDOW * p^2 tokens (method/layout.py), and each stage
    may merge away up to half of an image's tokens, so stage k counts on ceil(tokens / 2^k). Never below 1."""
    fitted = []
    for p in windows:
        fitted.append(max(1, min(p, math.isqrt(tokens // MIN_TOKENS_PER_WINDOW))))
        tokens = -(-tokens // 2)
    return tuple(fitted)


@dataclass(frozen=True)
class LocalDefaults:
    """A local checkpoint's default windows and reference image, fitted to its processor from `base`'s."""

    base: ModelSpec  # the preset with the checkpoint's shape
    windows: tuple[int, ...]
    image_size: tuple[int, int]  # (height, width): the base's reference image as the processor sizes it
    largest_tokens: int  # the most tokens one image of the processor's gets (largest_image_tokens)

    @property
    def note(self) -> str | None:
        """One line for the build when the windows were cut (None when they are the preset's)."""
        if self.windows == self.base.default_windows:
            return None
        given, fitted = ", ".join(map(str, self.base.default_windows)), ", ".join(map(str, self.windows))
        return (
            f"windows per stage reduced from {self.base.key}'s ({given}) to ({fitted}): this checkpoint's processor "
            f"gives an image at most {self.largest_tokens} vision tokens, and a stage with p windows per side needs "
            f"at least {MIN_TOKENS_PER_WINDOW} p^2 of them (each stage may merge away half). --schedule sets "
            "windows explicitly."
        )


def local_defaults(base: ModelSpec, host: ImageHost) -> LocalDefaults:
    """`base`'s windows fitted to the largest image `host` (the checkpoint's processor) lays out, and its reference
    image resized as that processor resizes it: a size the processor keeps, so the manifest's reference image is
    the one the vision graph sees (Qwen-VL: within min / max pixels; LLaVA: the crop)."""
    tokens = largest_image_tokens(host)
    image_size = tuple(int(x) for x in host.processed_size(*base.default_image_size))
    return LocalDefaults(base, fitting_windows(base.default_windows, tokens), image_size, tokens)


def fit_local_defaults(loaded: LoadedModel) -> tuple[LoadedModel, str | None]:
    """A local checkpoint (a key no preset has) with its windows and reference image fitted to its processor as
    it is now (--max-image-pixels included), and the line that says so when the windows were cut; a preset as it
    is (its windows are chosen with its processor)."""
    if loaded.spec.key in SPECS:
        return loaded, None
    fitted = local_defaults(base_preset(loaded.family, loaded.model.config), loaded.image_host())
    spec = dataclasses.replace(loaded.spec, default_windows=fitted.windows, default_image_size=fitted.image_size)
    return dataclasses.replace(loaded, spec=spec), fitted.note


def has_processor_files(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (path / "vocab.json").is_file()


def load_local(
    path: Path,
    *,
    random_weights: bool = False,
    dtype: torch.dtype | None = None,
    spec: ModelSpec | None = None,
    key: str | None = None,
) -> LoadedModel:
    """A checkpoint directory (config.json, *.safetensors, tokenizer and processor files) -> LoadedModel.

    Without `spec`, the spec is derived from the checkpoint's family and shape, keyed `key` (default: the path),
    its windows and reference image fitted to its processor (`fit_local_defaults`).
    """
    family_name = read_model_type(path)
    family = FAMILIES[family_name]
    config = damaged_as_input_error(
        lambda: family.config_class().from_pretrained(str(path), local_files_only=True),
        f"{path / 'config.json'} is inconsistent",
        "Fix it, or copy the checkpoint's config.json again.",
    )
    try:  # parts the family cannot export: one message, before any weights are read
        family.check_config(config)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    spec = spec or spec_for_local(key or str(path), family_name, config)
    if random_weights:
        processor = load_processor(path, family_name) if has_processor_files(path) else None
        if processor is None:
            return fit_local_defaults(build_random(spec, dtype, config=config))[0]
        family.align_token_ids(config, processor.tokenizer)
        return fit_local_defaults(LoadedModel(spec, build_seeded(family, config, dtype), processor, family))[0]
    source = key or spec.hf_id  # the hub id to download: the one asked for, else the registry's
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for pattern in PICKLE_PATTERNS for p in path.glob(pattern))
        if pickled:
            raise InputError(
                f"{path} holds only pickled weights ({', '.join(pickled[:3])}): they can run arbitrary code when "
                "loaded, so only *.safetensors are read. Convert them on a trusted machine (load the model with "
                "transformers and call save_pretrained(..., safe_serialization=True)), or download the "
                "checkpoint's safetensors files."
            )
        raise ModelNotFoundError(f"{path} has a config.json but no weights (*.safetensors). {how_to_get(source)}")
    if not has_processor_files(path):
        raise ModelNotFoundError(f"{path} has weights but no tokenizer files (tokenizer.json). {how_to_get(source)}")
    model, info = damaged_as_input_error(
        lambda: family.model_class().from_pretrained(
            str(path),
            dtype=resolve_dtype(dtype),
            attn_implementation="sdpa",
            local_files_only=True,
            use_safetensors=True,
            output_loading_info=True,
        ),
        f"the weights in {path} cannot be read",
        f"A *.safetensors file is damaged or incomplete, or config.json is from another checkpoint: copy or "
        f"download them again ({how_to_get(source)}).",
    )
    check_loading_info(path, info)
    model.eval()
    processor = load_processor(path, family_name)
    return fit_local_defaults(LoadedModel(spec, model, processor, family))[0]


PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def damaged_as_input_error(load, what: str, advice: str):
    """`load()`, with any failure of the third-party loader (a truncated file, invalid JSON, a config that
    contradicts itself) turned into one InputError: these are damaged inputs, not bugs of this tool."""
    try:
        return load()
    except LightKVError:
        raise
    except Exception as exc:
        detail = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise InputError(f"{what} ({type(exc).__name__}: {detail}). {advice}") from None


def check_loading_info(path: Path, info: dict[str, Any]) -> None:
    """Weights and config.json must describe the same model: transformers would otherwise initialise missing
    weights at random (or drop unexpected ones) with only a log line."""
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(kind) or [])
        if keys:
            problems.append(f"{len(keys)} {kind.replace('_', ' ')} (e.g. {', '.join(keys[:3])})")
    if problems:
        raise InputError(
            f"the weights in {path} do not match its config.json: {'; '.join(problems)}. Is config.json from "
            "another checkpoint (num_hidden_layers, hidden_size ...)? Copy the matching config.json."
        )


def load_processor(path: Path, family_name: str) -> Any:
    """Tokenizer + PIL image processor + chat template from a checkpoint directory (no video processor: that
    needs torchvision, and only images are fed)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    advice = "Copy the checkpoint's tokenizer.json, tokenizer_config.json and preprocessor_config.json again."
    tokenizer = damaged_as_input_error(
        lambda: AutoTokenizer.from_pretrained(str(path), local_files_only=True),
        f"the tokenizer files in {path} cannot be read",
        advice,
    )
    image_processor = damaged_as_input_error(
        lambda: AutoImageProcessor.from_pretrained(str(path), local_files_only=True, backend="pil"),
        f"the image processor files in {path} cannot be read",
        advice,
    )
    template, where = read_chat_template(path)
    if template is None:
        template, where = tokenizer.chat_template, str(path / "tokenizer_config.json")
    if template is None:
        raise ModelNotFoundError(f"{path} has no chat template (chat_template.jinja). {how_to_get(None)}")
    # Checked here, where the checkpoint is loaded: a broken template stops the build before the export, with exit
    # 2 and the file's name, instead of a traceback from the first rendering after it.
    from lightkv_export.host import check_chat_template

    special = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    check_chat_template(template, where, special)
    return FAMILIES[family_name].processor_from(path, tokenizer, image_processor, template)


def read_chat_template(path: Path) -> tuple[Any, str]:
    """A checkpoint directory's own chat template and the file it came from: chat_template.jinja, else
    chat_template.json's "chat_template"; (None, "") when it has neither. Unreadable files are an InputError."""
    advice = "Fix it, or copy the checkpoint's chat template files again."
    for name in ("chat_template.jinja", "chat_template.json"):
        file = path / name
        if not file.is_file():
            continue
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{file} is not UTF-8 text ({e.reason} at byte {e.start}). {advice}") from None
        if name.endswith(".jinja"):
            return text, str(file)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            where = f"line {e.lineno}, column {e.colno}"
            raise InputError(f"{file} is not valid JSON ({where}: {e.msg}). {advice}") from None
        if not isinstance(data, dict) or not isinstance(data.get("chat_template"), str):
            raise InputError(f'{file} must be a JSON object with a "chat_template" string (the Jinja source). {advice}')
        return data["chat_template"], str(file)
    return None, ""


def build_random(spec: ModelSpec, dtype: torch.dtype, *, config: Any | None = None) -> LoadedModel:
    """The real architecture with seeded random weights and the locally built tokenizer (no files on disk)."""
    family = FAMILIES[spec.family]
    config = config if config is not None else family.config_class()(**family.real_config_dict(spec.hf_id))
    processor = family.random_processor()
    family.align_token_ids(config, processor.tokenizer)
    return LoadedModel(spec, build_seeded(family, config, dtype), processor, family)
