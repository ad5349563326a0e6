"""The graph contract: every input and output name of an engine's ONNX graphs, defined once.

The exporter writes these names, the LightKV pass finds values by them, the runtime feeds and reads them, and
TensorRT profiles are keyed by them. (The LightKV stage inputs, `lightkv.<k>.*`, are the merge plan's:
method/merge_plan.py `stage_input_names`, `stage_kept_name`.)

* vision:  PIXEL_VALUES -> IMAGE_EMBEDS
* embed:   INPUT_IDS -> INPUTS_EMBEDS
* prefill: INPUTS_EMBEDS, POSITION_IDS, LENGTHS -> LOGITS, present(i, "key" | "value") for every layer
* decode:  INPUTS_EMBEDS, POSITION_IDS, past(i, kind) and past_mask(i) for every layer -> LOGITS, present(i, kind)
  (the ort-cpu engine's fused decode takes past_length(i) instead of past_mask(i), and its past(i, kind) are
  buffers of fixed capacity that present(i, kind) alias: the new entries are written in place)

Role outputs (`ROLE_PREFIX` + role) carry what the passes need out of the exported graphs (each layer's output
hidden state, post-RoPE query and attention output, the rotary tables; in decode the attention's boundary),
described by the JSON under ROLE_META_KEY in the model's metadata; the passes remove them.
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
# What the LightKV pass built a prefill graph for (its stages, position mode, grid mode), as JSON in the graph's
# metadata: the engine's manifest must agree with it (integrity.py).
ENGINE_META_KEY = "lightkv.engine"


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
    per_layer = ("hidden", *ATTENTION_ROLES)
    roles = [role("cos"), role("sin")] + [role(f"{r}.{i}") for i in range(num_layers) for r in per_layer]
    return [INPUTS_EMBEDS, POSITION_IDS, LENGTHS], [LOGITS, *presents(num_layers)], roles


# The prefill roles the ort-cpu attention fusion (passes/fuse_attention.py) reads after the LightKV pass: that pass
# removes only the roles it alone uses, and every target's writer strips what is left (export.strip_roles).
ATTENTION_ROLES = ("query", "attention")  # post-RoPE query [B, Hq, S, d], attention output [B, S, Hq, d]


def is_attention_role(name: str) -> bool:
    return name.startswith(ROLE_PREFIX) and name[len(ROLE_PREFIX) :].split(".")[0] in ATTENTION_ROLES


DECODE_ROLES = ("dquery", "dkey", "dvalue", "dattention")  # per layer, in this order (export.py DecodeGraph)


def decode_io(num_layers: int) -> tuple[list[str], list[str], list[str]]:
    """(inputs, outputs, role outputs) of the exported decode graph."""
    pasts = [past(i, kind) for i in range(num_layers) for kind in KV] + [past_mask(i) for i in range(num_layers)]
    roles = [role(f"{r}.{i}") for i in range(num_layers) for r in DECODE_ROLES]
    return [INPUTS_EMBEDS, POSITION_IDS, *pasts], [LOGITS, *presents(num_layers)], roles


def past_length(layer: int) -> str:
    """The in-place decode graph's (passes/fuse_attention.py) count of valid entries in `layer`'s cache
    buffer per row before this step, where the new token's key and value are written: [B] int32."""
    return f"past_length.{layer}"


INT32_MAX = 2**31 - 1  # the served max_new_tokens is an INT32 input: nothing larger reaches the model unchanged


def graph_input_shapes(model) -> dict[str, list[int]]:
    """An ONNX model's inputs: name -> shape, -1 for a dimension the graph leaves free (what the manifest's
    vision_inputs records)."""
    return {
        value.name: [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
        for value in model.graph.input
    }
