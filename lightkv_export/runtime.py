"""Run an engine directory: image(s) and a prompt in, text and KV statistics out, with neither PyTorch nor
transformers in the process.

The generation loop is the same for every target: host preprocessing (host.py: the engine's tokenizer, chat
template, and the family's image side, which sizes each image as the checkpoint's processor does), the vision
graph per image, the token embedding graph, the per-request merge plan (method/merge_plan.py), the LightKV prefill, then
greedy decode steps over per-layer caches whose lengths differ by layer group. Decode positions continue from
the uncompressed prompt length.
The caches take the decode graph's form: grown by concatenation with a padding mask (the standard graph), or
buffers sized once for the generation budget and written in place (the ort-cpu fused decode).

    engine = Engine.load("engines/tiny-qwen-vl/r0.55/ort-cpu")
    gen = engine.generate([Image.open("photo.png")], "Describe this image.", max_new_tokens=32)

Every request is checked before any graph runs, against the served engines' own limits (triton_backend/codec.py
`Limits`: prompt characters and tokens, images, pixels per image, sequence length; `Engine.load(path,
limits=Limits(max_images=16))` changes them) and the engine's context (the model's max_position_embeddings, from the
manifest); max_new_tokens must be an int from 1 to the engine's max_new_tokens_limit. A refusal is an InputError.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from lightkv_export import contract
from lightkv_export.artifacts import PROCESSOR_DIR, Manifest
from lightkv_export.errors import InputError
from lightkv_export.integrity import verify_engine
from lightkv_export.kv import kv_bytes
from lightkv_export.method.merge_plan import (
    RequestPlan,
    layer_lengths,
    plan_request,
    stage_assign_name,
    stage_kept_name,
    takes_order,
)
from lightkv_export.method.schedule import Schedule, parse_schedule
from lightkv_export.method.spans import VisionSpan
from lightkv_export.models.positions import SCHEMES
from lightkv_export.triton_backend import codec
from lightkv_export.triton_backend.codec import Limits


class Session(Protocol):
    """What the loop needs of a backend: ONNX Runtime's InferenceSession has exactly this shape."""

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...

    def get_outputs(self) -> Sequence[Any]: ...


class InPlaceSession(Session, Protocol):
    """A decode session whose caches are buffers it writes into (the ort-cpu fused decode): `buffers` are fed
    under their input names, and each output named in `aliases` (output -> input) is that input's buffer."""

    def run_in_place(
        self, output_names: Sequence[str], feeds: dict[str, np.ndarray], buffers: dict[str, np.ndarray],
        aliases: dict[str, str],
    ) -> list[np.ndarray]: ...  # fmt: skip


@dataclass
class Request:
    """One prepared request (B = 1): everything prefill needs, computed on the host."""

    input_ids: np.ndarray  # [1, S] int64
    inputs_embeds: np.ndarray  # [1, S, D]
    position_ids: np.ndarray  # [*lead, 1, S] int64 (the family's scheme, models/positions.py)
    decode_offset: int  # decode step t sits at S + decode_offset + t
    spans: list[list[VisionSpan]]

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])


@dataclass
class PrefillOutputs:
    logits: np.ndarray  # [B, V] fp32
    keys: list[np.ndarray]  # per layer [B, Hkv, S_l, d]
    values: list[np.ndarray]
    kept: list[np.ndarray]  # per stage [B, S'_k]
    plan: RequestPlan | None
    valid: np.ndarray  # [L, B] valid KV entries per layer and row (the rest of a row is padding)
    # per stage [W, na]: the partner slot of each merged A slot (merge_plan.stage_assign_name); empty for engines
    # built before the graphs had it. Parity's tie-aware check reads it.
    assign: list[np.ndarray] = field(default_factory=list)


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


@dataclass
class MaskedCache:
    """The standard decode graph's caches: each step returns every layer's cache grown by one entry (past and the
    new token concatenated), and a mask per layer marks the padding of shorter rows."""

    keys: list[np.ndarray]  # per layer [B, Hkv, P_l, d]
    values: list[np.ndarray]
    masks: list[np.ndarray]  # per layer [B, P_l] int64, 0 at padding

    @classmethod
    def from_prefill(cls, pre: PrefillOutputs) -> MaskedCache:
        masks = [
            (np.arange(k.shape[2])[None, :] < pre.valid[i][:, None]).astype(np.int64) for i, k in enumerate(pre.keys)
        ]
        return cls(list(pre.keys), list(pre.values), masks)

    @property
    def lengths(self) -> np.ndarray:
        """[L, B] valid entries per layer and row."""
        return np.stack([m.sum(axis=1) for m in self.masks])

    def step(self, session: Session, names: Sequence[str], feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Run one decode step on `feeds` (token embeddings and positions) plus the caches; returns logits [B, V]."""
        for i, (k, v, m) in enumerate(zip(self.keys, self.values, self.masks, strict=True)):
            feeds[contract.past(i, "key")], feeds[contract.past(i, "value")], feeds[contract.past_mask(i)] = k, v, m
        out = dict(zip(names, session.run(names, feeds), strict=True))
        n, ones = len(self.keys), np.ones((len(self.masks[0]), 1), dtype=np.int64)
        self.keys = [out[contract.present(i, "key")] for i in range(n)]
        self.values = [out[contract.present(i, "value")] for i in range(n)]
        self.masks = [np.concatenate([m, ones], axis=1) for m in self.masks]
        return out[contract.LOGITS]


@dataclass
class BufferCache:
    """The fused decode graph's caches (passes/fuse_attention.py): one buffer per layer, allocated once
    with room for the generation budget, into which each step writes the new token at each row's length. Nothing
    is copied or grown between steps; a row's valid entries are contiguous from 0."""

    keys: list[np.ndarray]  # per layer [B, Hkv, M_l, d], M_l = prefill length + budget
    values: list[np.ndarray]
    lengths: np.ndarray  # [L, B] valid entries per layer and row

    @classmethod
    def from_prefill(cls, pre: PrefillOutputs, steps: int) -> BufferCache:
        """Buffers for `steps` decode steps after `pre` (each layer its own capacity: LightKV's are shorter)."""
        keys, values = [], []
        for k, v in zip(pre.keys, pre.values, strict=True):
            b, h, s, d = k.shape  # [B, Hkv, S_l, d]
            for src, dst in ((k, keys), (v, values)):
                buffer = np.zeros((b, h, s + steps, d), dtype=src.dtype)  # [B, Hkv, S_l + steps, d]
                buffer[:, :, :s] = src
                dst.append(buffer)
        # A row never has more valid entries than its cache holds (an engine whose prefill disagrees with its
        # schedule is caught by parity, not by writing past the entries).
        sizes = np.asarray([k.shape[2] for k in pre.keys])[:, None]  # [L, 1]
        return cls(keys, values, np.minimum(pre.valid, sizes).astype(np.int64))

    def step(self, session: InPlaceSession, names: Sequence[str], feeds: dict[str, np.ndarray]) -> np.ndarray:
        if any(int(self.lengths[i].max()) >= k.shape[2] for i, k in enumerate(self.keys)):
            raise AssertionError("a decode step past the cache buffers' capacity (the generation budget)")
        buffers, aliases = {}, {}
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            feeds[contract.past_length(i)] = self.lengths[i].astype(np.int32)
            for kind, buffer in (("key", k), ("value", v)):
                buffers[contract.past(i, kind)] = buffer
                aliases[contract.present(i, kind)] = contract.past(i, kind)
        out = dict(zip(names, session.run_in_place(names, feeds, buffers, aliases), strict=True))
        self.lengths = self.lengths + 1
        return out[contract.LOGITS]


def engine_schedule(manifest: Manifest) -> Schedule:
    """The schedule an engine was built for (no stages for a vanilla engine)."""
    if not manifest.schedule:
        return Schedule(manifest.num_layers, ())
    return parse_schedule(manifest.schedule, manifest.num_layers)


def open_sessions(directory: Path, manifest: Manifest) -> dict[str, Session]:
    """One session per graph, for the engine's target."""
    from lightkv_export.targets import target

    return target(manifest.target).open_sessions(directory, manifest)


class Engine:
    """A loaded engine directory."""

    def __init__(
        self, directory: Path, manifest: Manifest, sessions: dict[str, Session], processor, *,
        limits: Limits | None = None,
    ) -> None:  # fmt: skip
        """`processor`: the host preprocessing (host.HostProcessor, or any object with its `process` and
        `tokenizer.decode`). `limits`: what one request may ask (default: the served engines' defaults)."""
        self.directory, self.manifest, self.sessions = directory, manifest, sessions
        self.limits = limits if limits is not None else Limits()
        self.positions = SCHEMES[manifest.position_scheme]
        self.processor = processor
        self.num_layers = manifest.num_layers
        self.schedule = engine_schedule(manifest)
        self.outputs = {name: [o.name for o in s.get_outputs()] for name, s in sessions.items()}
        prefill = sessions.get("prefill")
        # Built for grids with inline fixed tokens (insert_lightkv's reorder): each stage takes its order.
        self.reorders = hasattr(prefill, "get_inputs") and takes_order([i.name for i in prefill.get_inputs()])

    @classmethod
    def load(
        cls, directory: str | Path, *, full_hash: bool = True, lazy: bool = False, limits: Limits | None = None
    ) -> Engine:
        """Open an engine directory once its files match the manifest (sizes always; SHA-256 unless `full_hash`
        is False, for very large engines whose files were just verified) and the manifest matches the graphs and
        its digest (integrity.py): a damaged engine or an edited manifest is an InputError naming the file or the
        field, never a session that answers with other tokens. `lazy`: sessions that open on first
        use (ort-cpu's prefill/decode, which pre-packs the weights) open then, not here. `limits`: what one
        request may ask (codec.Limits; default: the served engines' defaults, as config.pbtxt has them)."""
        from lightkv_export.host import HostProcessor
        from lightkv_export.rss import release_large_blocks

        # A request's large tensors go back to the OS when it ends: the process returns to its baseline.
        release_large_blocks()
        directory = Path(directory)
        manifest = verify_engine(directory, full_hash=full_hash)
        from lightkv_export.host import read_processor_config
        from lightkv_export.models.registry import get_family

        images = get_family(manifest.family).image_host(
            read_processor_config(directory / PROCESSOR_DIR), max_pixels=manifest.max_image_pixels
        )
        processor = HostProcessor(directory / PROCESSOR_DIR, images)
        engine = cls(directory, manifest, open_sessions(directory, manifest), processor, limits=limits)
        if not lazy:
            for session in engine.sessions.values():
                getattr(session, "load", lambda: None)()
        return engine

    # --- request checks ---------------------------------------------------------------------------------------

    @property
    def context_length(self) -> int | None:
        """The model's context (max_position_embeddings, as the build recorded it in the manifest); None for an
        engine built before it was recorded, where max_sequence_length alone caps a request."""
        value = self.manifest.extra.get("max_position_embeddings")
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    def check_request(self, images: Sequence[Any], prompt: str, max_new_tokens: int = 16) -> int:
        """Refuse, with an InputError that says what to change, a request this engine should not run: over the
        limits (self.limits, the served engines' own), the engine's context or max_new_tokens_limit, or malformed.
        Cheapest first, and nothing here runs a graph or touches a pixel: a 100,000-character prompt or a huge
        image costs a length or a size. Returns max_new_tokens as an int."""
        limits = self.limits
        new = codec.check_max_new_tokens(max_new_tokens, self.manifest.max_new_tokens_limit)
        if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
            raise InputError(
                f"images must be a list of PIL images, got {type(images).__name__}; e.g. [Image.open('photo.png')]."
            )
        codec.check_image_count(images, limits)
        codec.check_prompt_text(prompt, limits)
        self.processor.check(list(images), prompt)  # image types, empty prompt, sizes the processor refuses
        for i, image in enumerate(images):
            codec.check_image_size(i, *image.size, limits)
        tokens = self.processor.prompt_tokens(prompt)
        limits.check("max_prompt_tokens", tokens, f"the prompt has {tokens} tokens, which")
        layouts = self.processor.layouts([im.size for im in images])
        for i, (image, layout) in enumerate(zip(images, layouts, strict=True)):
            w, h = image.size
            what = f"image {i} ({w}x{h} as sent) becomes {layout.vision_tokens} vision tokens, which"
            limits.check("max_image_tokens", layout.vision_tokens, what)
        sequence, parts = self.processor.sequence_tokens(layouts, tokens)
        codec.check_sequence(limits, sequence, new, context=self.context_length, parts=parts)
        return new

    # --- host side --------------------------------------------------------------------------------------------

    def prepare(self, images: Sequence[Any], prompt: str) -> Request:
        """Tokenize, encode each image with the vision graph, embed, scatter, and compute the position ids."""
        return self.request_from_host(self.host_inputs(images, prompt))

    def host_inputs(self, images: Sequence[Any], prompt: str):
        """The request's token ids, pixels and vision spans (host.HostInputs): no graph runs yet, so its KV
        lengths per layer are known (the merge plan) before any compute."""
        self.processor.check(list(images), prompt)  # as given: before .convert touches them
        # Each image as the checkpoint's processor sizes it (the family's image side): no profile, no squashing.
        return self.processor.process(list(images), prompt)

    def request_from_host(self, host) -> Request:
        """Encode each image with the vision graph, embed, scatter, and compute the position ids."""
        input_ids = host.input_ids  # [1, S]
        vision = [self.sessions["vision"].run(None, image.feeds)[0] for image in host.images]  # each [N_vis, D]
        embeds = self.sessions["embed"].run(None, {contract.INPUT_IDS: input_ids})[0]  # [1, S, D]
        placeholder = input_ids[0] == self.manifest.image_token_id
        vision_tokens = sum(v.shape[0] for v in vision)
        if int(placeholder.sum()) != vision_tokens:
            raise InputError(f"{int(placeholder.sum())} image placeholder tokens but {vision_tokens} vision tokens.")
        embeds[0, placeholder] = np.concatenate(vision).astype(embeds.dtype)
        positions, offset = self.positions.host(input_ids.shape[1], host.spans[0])  # [*lead, S]
        return Request(input_ids, embeds, positions[..., None, :], offset, host.spans)

    # --- graphs -----------------------------------------------------------------------------------------------

    def batch(self, requests: Sequence[Request]) -> Request:
        """Right-pad prepared requests into one batch (padding is masked: causal prefill, decode masks)."""
        if len(requests) == 1:
            return requests[0]
        seq = max(r.seq_len for r in requests)
        dim = requests[0].inputs_embeds.shape[2]
        ids = np.zeros((len(requests), seq), dtype=np.int64)
        embeds = np.zeros((len(requests), seq, dim), dtype=requests[0].inputs_embeds.dtype)
        for b, r in enumerate(requests):
            ids[b, : r.seq_len], embeds[b, : r.seq_len] = r.input_ids[0], r.inputs_embeds[0]
        positions = self.positions.batch([r.position_ids[..., 0, :] for r in requests], seq)  # [*lead, B, S]
        return Request(ids, embeds, positions, 0, [r.spans[0] for r in requests])

    def prefill(
        self, request: Request, plan: RequestPlan | None = None, lengths: Sequence[int] | None = None
    ) -> PrefillOutputs:
        """Prefill with the engine's schedule, or with `plan` (e.g. a merge-nothing plan for identity checks).

        `lengths` [B]: valid tokens per row of a padded batch (default: every row is full)."""
        lengths = [request.seq_len] * request.input_ids.shape[0] if lengths is None else list(lengths)
        if plan is None and not self.manifest.vanilla:
            plan = plan_request(
                request.spans, lengths, self.schedule, grid_mode=self.manifest.grid_mode, reorder=self.reorders
            )
        feeds = {
            contract.INPUTS_EMBEDS: request.inputs_embeds,
            contract.POSITION_IDS: request.position_ids,
            contract.LENGTHS: np.asarray(lengths, dtype=np.int64),
        }
        if plan is not None:
            feeds.update(plan.feeds)
        names = self.outputs["prefill"]
        out = dict(zip(names, self.sessions["prefill"].run(names, feeds), strict=True))
        n = self.num_layers
        stages = self.schedule.stages if plan is not None else ()
        return PrefillOutputs(
            logits=out[contract.LOGITS],
            keys=[out[contract.present(i, "key")] for i in range(n)],
            values=[out[contract.present(i, "value")] for i in range(n)],
            kept=[out[stage_kept_name(k)] for k in range(len(stages))],
            plan=plan,
            valid=layer_lengths(self.schedule, plan, lengths),
            assign=[out[stage_assign_name(k)] for k in range(len(stages)) if stage_assign_name(k) in out],
        )

    def start_decode(self, pre: PrefillOutputs, steps: int) -> MaskedCache | BufferCache:
        """The decode caches after `pre`, for up to `steps` decode steps, in the form the decode graph takes."""
        if hasattr(self.sessions["decode"], "run_in_place"):
            return BufferCache.from_prefill(pre, steps)
        return MaskedCache.from_prefill(pre)

    def decode_step(self, tokens: np.ndarray, positions: np.ndarray, cache: MaskedCache | BufferCache) -> np.ndarray:
        """One greedy step for every row: tokens [B], positions [B] (on every row of the scheme); the caches
        advance by one entry per layer and row. Returns logits [B, V]."""
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)  # [B, 1]
        embeds = self.sessions["embed"].run(None, {contract.INPUT_IDS: ids})[0]  # [B, 1, D]
        feeds = {contract.INPUTS_EMBEDS: embeds, contract.POSITION_IDS: self.positions.decode(positions)}
        return cache.step(self.sessions["decode"], self.outputs["decode"], feeds)

    def generate(self, images: Sequence[Any], prompt: str, *, max_new_tokens: int = 16) -> Generation:
        return self.generate_batch([(images, prompt)], max_new_tokens=max_new_tokens)[0]

    def generate_batch(
        self, items: Sequence[tuple[Sequence[Any], str]], *, max_new_tokens: int = 16
    ) -> list[Generation]:
        """Several requests (images, prompt) in one padded batch: one prefill, one decode step per token. Every
        request is checked (check_request) before the first one is prepared."""
        if not items:
            raise InputError("no requests given.")
        if not all(isinstance(item, (tuple, list)) and len(item) == 2 for item in items):
            raise InputError("generate_batch takes (images, prompt) pairs, e.g. [([image], 'Describe it.')].")
        for b, (images, prompt) in enumerate(items):
            try:
                max_new_tokens = self.check_request(images, prompt, max_new_tokens)
            except InputError as e:
                if len(items) == 1:
                    raise
                raise InputError(f"request {b} of the batch: {e}") from None
        t0 = time.perf_counter()
        requests = [self.prepare(images, prompt) for images, prompt in items]
        pre = self.prefill(self.batch(requests), lengths=[r.seq_len for r in requests])
        t1 = time.perf_counter()
        tokens = self.greedy(pre, requests, max_new_tokens)
        t2 = time.perf_counter()
        itemsize = pre.keys[0].itemsize
        return [
            self.generation(request, [int(n) for n in pre.valid[:, b]], tokens[b], itemsize, t1 - t0, t2 - t1)
            for b, request in enumerate(requests)
        ]

    def generation(
        self, request: Request, kv_lengths: Sequence[int], tokens: list[int], itemsize: int, prefill_s: float,
        decode_s: float,
    ) -> Generation:  # fmt: skip
        """A request's result from its per-layer cache lengths after prefill and its tokens."""
        groups = self.schedule.layer_groups() if self.schedule.stages else [(1, self.num_layers)]
        m = self.manifest
        vision_in = sum(s.length for s in request.spans[0])
        kv_lengths = [int(n) for n in kv_lengths]
        return Generation(
            text=self.processor.tokenizer.decode(tokens, skip_special_tokens=True),
            token_ids=list(tokens),
            vision_tokens_in=vision_in,
            vision_tokens_per_group=[vision_in - (kv_lengths[0] - kv_lengths[f - 1]) for f, _ in groups],
            kv_bytes=sum(kv_bytes(kv_lengths, m.num_kv_heads, m.head_dim, itemsize)),
            prefill_ms=prefill_s * 1e3,
            decode_ms=decode_s * 1e3,
            kv_lengths=kv_lengths,
        )

    def greedy(
        self,
        pre: PrefillOutputs,
        requests: Request | Sequence[Request],
        max_new_tokens: int,
        *,
        stop_at_eos: bool = True,
    ) -> list[int] | list[list[int]]:
        """Greedy tokens per row (a list per request; a single list for a single Request). Rows that finish keep
        stepping with the batch until every row is done, but their later tokens are dropped."""
        single = isinstance(requests, Request)
        rows = [requests] if single else list(requests)
        stops = set(self.manifest.eos_token_ids) if stop_at_eos else set()
        cache = self.start_decode(pre, max(int(max_new_tokens) - 1, 0))  # the first token comes from prefill
        logits = pre.logits
        # Decode continues from each row's uncompressed length, whatever LightKV removed.
        positions = np.asarray([r.seq_len + r.decode_offset for r in rows], dtype=np.int64)
        tokens: list[list[int]] = [[] for _ in rows]
        done = [False] * len(rows)
        while True:
            step = logits.argmax(axis=-1)  # [B]
            for b, token in enumerate(step.tolist()):
                if not done[b]:
                    tokens[b].append(int(token))
                    done[b] = token in stops or len(tokens[b]) >= max_new_tokens
            if all(done):
                return tokens[0] if single else tokens
            logits = self.decode_step(step, positions, cache)
            positions = positions + 1
