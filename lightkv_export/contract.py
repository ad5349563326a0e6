"""The graph contract: every input and output name of an engine's ONNX graphs, defined once.

The exporter writes these names, the LightKV pass finds values by them, the runtime feeds and reads them, and
TensorRT profiles are keyed by them. (The LightKV stage inputs, `lightkv.<k>.*`, are the merge plan's:
method/merge_plan.py `stage_input_names`, `stage_kept_name`.)

* vision:  PIXEL_VALUES -> IMAGE_EMBEDS
* embed:   INPUT_IDS -> INPUTS_EMBEDS
* prefill: INPUTS_EMBEDS, POSITION_IDS, LENGTHS -> LOGITS, present(i, "key" | "value") for every layer
* decode:  INPUTS_EMBEDS, POSITION_IDS, past(i, kind) and past_mask(i) for every layer -> LOGITS, present(i, kind)

Role outputs (`ROLE_PREFIX` + role) carry what the pass needs out of the exported prefill (each layer's output
hidden state and post-RoPE query, the rotary tables), described by the JSON under ROLE_META_KEY in the model's
metadata; the pass removes them.
"""

from __future__ import annotations

INPUTS_EMBEDS = "inputs_embeds"
POSITION_IDS = "position_ids"
LENGTHS = "lengths"
LOGITS = "logits"
INPUT_IDS = "input_ids"
PIXEL_VALUES = "pixel_values"
IMAGE_EMBEDS = "image_embeds"
KV = ("key", "value")
PRESENT_PREFIX = "present."
ROLE_PREFIX = "lightkv.role."
ROLE_META_KEY = "lightkv.roles"


def present(layer: int, kind: str) -> str:
    """The cache a graph returns for `layer` (0-based): kind "key" or "value", [B, Hkv, S_layer, d]."""
    return f"{PRESENT_PREFIX}{layer}.{kind}"


def past(layer: int, kind: str) -> str:
    """The cache the decode graph takes for `layer`: [B, Hkv, P_layer, d]."""
    return f"past.{layer}.{kind}"


def past_mask(layer: int) -> str:
    """Which of `layer`'s past entries are real (1) or padding (0): [B, P_layer] int64."""
    return f"past_mask.{layer}"


def presents(num_layers: int) -> list[str]:
    return [present(i, kind) for i in range(num_layers) for kind in KV]


def role(name: str) -> str:
    return f"{ROLE_PREFIX}{name}"


def prefill_io(num_layers: int) -> tuple[list[str], list[str], list[str]]:
    """(inputs, outputs, role outputs) of the exported prefill graph."""
    roles = [role("cos"), role("sin")] + [role(f"{r}.{i}") for i in range(num_layers) for r in ("hidden", "query")]
    return [INPUTS_EMBEDS, POSITION_IDS, LENGTHS], [LOGITS, *presents(num_layers)], roles


def decode_io(num_layers: int) -> tuple[list[str], list[str]]:
    """(inputs, outputs) of the decode graph."""
    pasts = [past(i, kind) for i in range(num_layers) for kind in KV] + [past_mask(i) for i in range(num_layers)]
    return [INPUTS_EMBEDS, POSITION_IDS, *pasts], [LOGITS, *presents(num_layers)]
