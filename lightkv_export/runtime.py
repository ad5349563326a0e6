"""Run an engine directory: image(s) and a prompt in, text and KV statistics out, with no PyTorch model.

The generation loop is the same for every target: host preprocessing (the checkpoint's own tokenizer and image
processor, resized to the engine's image profile), the vision graph per image, the token embedding graph, the
per-request merge plan (method/merge_plan.py), the LightKV prefill, then greedy decode steps over per-layer
caches whose lengths differ by layer group. Decode positions continue from the uncompressed prompt length.

    engine = Engine.load("engines/tiny-qwen-vl/r0.55/ort-cpu")
    gen = engine.generate([Image.open("photo.png")], "Describe this image.", max_new_tokens=32)
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from lightkv_export.errors import InputError
from lightkv_export.method.merge_plan import RequestPlan, plan_request, stage_kept_name
from lightkv_export.method.schedule import Schedule, parse_schedule
from lightkv_export.models.base import LoadedModel, VisionSpan
from lightkv_export.models.mrope import mrope_positions

MANIFEST = "manifest.json"
PROCESSOR_DIR = "processor"


class Session(Protocol):
    """What the loop needs of a backend: ONNX Runtime's InferenceSession has exactly this shape."""

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...

    def get_outputs(self) -> Sequence[Any]: ...


@dataclass
class Request:
    """One prepared request (B = 1): everything prefill needs, computed on the host."""

    input_ids: np.ndarray  # [1, S] int64
    inputs_embeds: np.ndarray  # [1, S, D]
    position_ids: np.ndarray  # [3, 1, S] int64
    rope_delta: int
    spans: list[list[VisionSpan]]

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])


@dataclass
class PrefillOutputs:
    logits: np.ndarray  # [1, V] fp32
    keys: list[np.ndarray]  # per layer [1, Hkv, S_l, d]
    values: list[np.ndarray]
    kept: list[np.ndarray]  # per stage [1, S'_k]
    plan: RequestPlan | None


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    vision_tokens_in: int
    vision_tokens_per_group: list[int]  # per layer group of the schedule, in layer order
    kv_bytes: int
    prefill_ms: float
    decode_ms: float
    kv_lengths: list[int] = field(default_factory=list)  # per layer, after prefill


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise InputError(
            f"{directory} is not an engine directory (no {MANIFEST}); build one with "
            "`python build.py --model tiny-qwen-vl --ratio 0.55`."
        )
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); rebuild the engine with --force.") from None


def open_sessions(directory: Path, manifest: dict[str, Any]) -> dict[str, Session]:
    """One session per graph, for the engine's target."""
    target = manifest["target"]
    if target == "ort-cpu":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        # Idle ORT workers otherwise spin for a while after each run and starve the host work between graphs
        # (plan, embedding scatter) and the next graph's own threads.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return {
            name: ort.InferenceSession(str(directory / f"{name}.onnx"), options, providers=["CPUExecutionProvider"])
            for name in ("vision", "embed", "prefill", "decode")
        }
    if target.startswith("trt"):
        from lightkv_export.targets import trt

        return trt.open_sessions(directory, manifest)
    raise InputError(f"engine target {target!r} is unknown to this runtime.")


class Engine:
    """A loaded engine directory."""

    def __init__(self, directory: Path, manifest: dict[str, Any], sessions: dict[str, Session], processor) -> None:
        from lightkv_export.models.registry import family_module

        self.directory, self.manifest, self.sessions = directory, manifest, sessions
        self.family = family_module(manifest["family"])
        # The family's host helpers take a LoadedModel; at run time it holds the processor and no model.
        self.host = LoadedModel(spec=None, model=None, processor=processor, family=self.family)
        self.processor = processor
        self.num_layers = int(manifest["num_layers"])
        self.schedule: Schedule = (
            parse_schedule(manifest["schedule"], self.num_layers)
            if manifest["schedule"]
            else Schedule(self.num_layers, ())
        )
        self.image_size = tuple(manifest["image_size"])
        self.outputs = {name: [o.name for o in s.get_outputs()] for name, s in sessions.items()}

    @classmethod
    def load(cls, directory: str | Path) -> Engine:
        from lightkv_export.models.registry import load_processor

        directory = Path(directory)
        manifest = read_manifest(directory)
        processor = load_processor(directory / PROCESSOR_DIR, manifest["family"])
        return cls(directory, manifest, open_sessions(directory, manifest), processor)

    # --- host side --------------------------------------------------------------------------------------------

    def prepare(self, images: Sequence[Any], prompt: str) -> Request:
        """Tokenize, encode each image with the vision graph, embed, scatter, and compute M-RoPE positions."""
        self.family.check_inputs(self.processor, list(images), prompt)
        h, w = self.image_size
        # Every image is resized to the engine's profile: the vision graph is built for exactly that grid.
        resized = [im.convert("RGB").resize((w, h)) for im in images]
        processed = self.family.process(self.host, resized, prompt)
        input_ids = processed["input_ids"].numpy().astype(np.int64)  # [1, S]
        pixels = processed["pixel_values"].numpy()  # [N_images * patches, F]
        per_image = pixels.shape[0] // len(resized)
        vision = [
            self.sessions["vision"].run(None, {"pixel_values": pixels[i * per_image : (i + 1) * per_image]})[0]
            for i in range(len(resized))
        ]  # each [N_vis, D]
        embeds = self.sessions["embed"].run(None, {"input_ids": input_ids})[0]  # [1, S, D]
        placeholder = input_ids[0] == int(self.manifest["image_token_id"])
        embeds[0, placeholder] = np.concatenate(vision).astype(embeds.dtype)
        spans = self.family.vision_spans(
            processed["input_ids"], int(self.manifest["image_token_id"]), processed["image_grid_thw"],
            int(self.manifest["spatial_merge"]),
        )  # fmt: skip
        positions, delta = mrope_positions(input_ids.shape[1], spans[0])
        return Request(input_ids, embeds, positions[:, None, :], delta, spans)

    def plan(self, request: Request) -> RequestPlan | None:
        if self.manifest.get("vanilla"):
            return None
        return plan_request(request.spans, [request.seq_len], self.schedule, grid_mode=self.manifest["grid_mode"])

    # --- graphs -----------------------------------------------------------------------------------------------

    def prefill(self, request: Request, plan: RequestPlan | None = None) -> PrefillOutputs:
        """Prefill with the engine's schedule, or with `plan` (e.g. a merge-nothing plan for identity checks)."""
        plan = plan if plan is not None else self.plan(request)
        feeds = {
            "inputs_embeds": request.inputs_embeds,
            "position_ids": request.position_ids,
            "lengths": np.asarray([request.seq_len], dtype=np.int64),
        }
        if plan is not None:
            feeds.update(plan.feeds)
        names = self.outputs["prefill"]
        out = dict(zip(names, self.sessions["prefill"].run(names, feeds), strict=True))
        n = self.num_layers
        return PrefillOutputs(
            logits=out["logits"],
            keys=[out[f"present.{i}.key"] for i in range(n)],
            values=[out[f"present.{i}.value"] for i in range(n)],
            kept=[out[stage_kept_name(k)] for k in range(len(self.schedule.stages)) if plan is not None],
            plan=plan,
        )

    def decode_step(
        self, token: int, position: int, keys: list[np.ndarray], values: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        """One greedy step at M-RoPE position `position` (all three sections): logits [1, V] and the grown caches."""
        embeds = self.sessions["embed"].run(None, {"input_ids": np.asarray([[token]], dtype=np.int64)})[0]
        feeds: dict[str, np.ndarray] = {
            "inputs_embeds": embeds,
            "position_ids": np.full((3, 1, 1), position, dtype=np.int64),
        }
        for i in range(self.num_layers):
            feeds[f"past.{i}.key"], feeds[f"past.{i}.value"] = keys[i], values[i]
            feeds[f"past_mask.{i}"] = np.ones((1, keys[i].shape[2]), dtype=np.int64)
        names = self.outputs["decode"]
        out = dict(zip(names, self.sessions["decode"].run(names, feeds), strict=True))
        n = self.num_layers
        return out["logits"], [out[f"present.{i}.key"] for i in range(n)], [out[f"present.{i}.value"] for i in range(n)]

    def generate(self, images: Sequence[Any], prompt: str, *, max_new_tokens: int = 16) -> Generation:
        limit = int(self.manifest["max_new_tokens_limit"])
        if not 1 <= int(max_new_tokens) <= limit:
            raise InputError(f"max_new_tokens must be between 1 and {limit} for this engine, got {max_new_tokens}.")
        t0 = time.perf_counter()
        request = self.prepare(images, prompt)
        pre = self.prefill(request)
        t1 = time.perf_counter()
        tokens = self.greedy(pre, request, int(max_new_tokens))
        t2 = time.perf_counter()
        kv_lengths = [int(k.shape[2]) for k in pre.keys]
        vision_in = sum(s.length for s in request.spans[0])
        groups = self.schedule.layer_groups() if self.schedule.stages else [(1, self.num_layers)]
        per_group = [vision_in - (kv_lengths[0] - kv_lengths[first - 1]) for first, _ in groups]
        return Generation(
            text=self.processor.tokenizer.decode(tokens, skip_special_tokens=True),
            token_ids=tokens,
            vision_tokens_in=vision_in,
            vision_tokens_per_group=per_group,
            kv_bytes=int(sum(k.nbytes + v.nbytes for k, v in zip(pre.keys, pre.values, strict=True))),
            prefill_ms=(t1 - t0) * 1e3,
            decode_ms=(t2 - t1) * 1e3,
            kv_lengths=kv_lengths,
        )

    def greedy(self, pre: PrefillOutputs, request: Request, max_new_tokens: int, *, stop_at_eos: bool = True):
        stops = set(self.manifest.get("eos_token_ids", [])) if stop_at_eos else set()
        keys, values, logits = pre.keys, pre.values, pre.logits
        position = request.seq_len + request.rope_delta  # the uncompressed length, whatever LightKV removed
        tokens: list[int] = []
        while True:
            token = int(np.argmax(logits[0]))
            tokens.append(token)
            if token in stops or len(tokens) >= max_new_tokens:
                return tokens
            logits, keys, values = self.decode_step(token, position, keys, values)
            position += 1


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()
