"""Continuous batching under a KV-cache budget: the KV saving of LightKV turned into requests in flight.

    scheduler = Scheduler(Engine.load(path), kv_budget=parse_budget("512MiB"))  # or "40%" of available memory
    seq = scheduler.submit([image], "Describe the image.", max_new_tokens=32)
    while not scheduler.idle:
        for event in scheduler.step():  # tokens as they are produced, of every running request
            ...

A request reserves, when it is submitted and before any compute, its exact KV cache: per layer the length its
prefill leaves there (the host merge plan says it: LightKV's later layers hold fewer entries) plus one entry per
new token, K and V, in the cache dtype. Requests are admitted first come, first served while their reservations
fit the budget together; one that could never fit alone is refused at once. Each step prefills the requests just
admitted (one at a time, as Engine.generate does) and runs one batched decode step over every running sequence;
sequences join and leave the batch as they arrive and finish, each row with its own per-layer lengths and
position, and a finished or cancelled request frees its reservation and its row at once.

The caches are a pool (`KVPool`): per layer one buffer [slots, Hkv, C_l, d] that the fused decode graph writes in
place (runtime.BufferCache over the pool's first rows). A request's prefill is copied into its own row; admitting or
finishing one never moves the others'. That needs a decode that writes its caches in place (ort-cpu); with any other
engine (the TensorRT targets) each running request keeps its own caches and steps alone, under the same admission.
`Engine` stays the single-request API.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lightkv_export.accounting.units import byte_unit, dtype_bytes
from lightkv_export.errors import InputError
from lightkv_export.kv import kv_bytes
from lightkv_export.method.merge_plan import layer_lengths, plan_request
from lightkv_export.runtime import BufferCache, Engine, Generation, PrefillOutputs

DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_CONTEXT = 8192  # prompt tokens a pool row holds (before merges), beside the engine's generation limit


def _size(n: int) -> str:
    unit, scale = byte_unit(n)
    return f"{n / scale:.1f} {unit}" if scale > 1 else f"{n} bytes"


class QueueFull(InputError):
    """The scheduler's queue is at its limit: the caller should retry later (HTTP 503 / 429 in a server)."""


@dataclass
class SequenceState:
    """One request in the scheduler: queued, running (holding a pool row), then finished or cancelled."""

    id: int
    host: Any  # host.HostInputs
    max_new_tokens: int
    kv_lengths: list[int]  # per layer after prefill (the merge plan's)
    reserved_bytes: int  # K and V of kv_lengths + max_new_tokens entries per layer
    vision_tokens: int
    submitted: float = field(default_factory=time.perf_counter)
    admitted: float | None = None
    first_token: float | None = None
    finished: float | None = None
    state: str = "queued"  # queued | running | finished | cancelled | refused | failed
    error: str = ""
    slot: int = -1
    position: int = 0  # the next decode step's position
    tokens: list[int] = field(default_factory=list)
    held_bytes: int = 0  # K and V actually held when it left the pool
    request: Any = None  # runtime.Request, once admitted
    batch_sum: int = 0  # requests in the decode steps it took part in, summed (its running batch)
    batch_max: int = 0
    decode_steps: int = 0
    cache: Any = None  # its own decode caches when the scheduler does not pool them
    prefill_s: float = 0.0

    @property
    def done(self) -> bool:
        return self.state in ("finished", "cancelled", "refused", "failed")

    def stats(self) -> dict[str, float | int]:
        """What the last response of a request reports."""
        end = self.finished or time.perf_counter()
        first = self.first_token or end
        return {
            "vision_tokens": self.vision_tokens,
            "kv_bytes_reserved": self.reserved_bytes,
            "kv_bytes_held": self.held_bytes,
            "queue_ms": ((self.admitted or end) - self.submitted) * 1e3,
            "time_to_first_token_ms": (first - self.submitted) * 1e3,
            "decode_ms": (end - first) * 1e3,
            "new_tokens": len(self.tokens),
            "decode_batch_mean": self.batch_sum / self.decode_steps if self.decode_steps else 0.0,
            "decode_batch_max": self.batch_max,
        }

    def result(self, engine: Engine, itemsize: int) -> Generation:
        """The request's answer in Engine.generate's form (its prefill and decode times as measured here)."""
        end = self.finished or time.perf_counter()
        decode_s = end - (self.first_token or end)
        return engine.generation(self.request, self.kv_lengths, self.tokens, itemsize, self.prefill_s, decode_s)


class TextDeltas:
    """A growing token sequence as text pieces whose concatenation is the decoded whole: a piece is held back
    while the text ends in an incomplete character (a byte-level token can split one)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.tokens, self.sent = tokenizer, [], ""

    def add(self, token: int) -> str:
        self.tokens.append(int(token))
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece

    def rest(self) -> str:
        """What is left to send once the sequence is complete."""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        piece = text[len(self.sent) :] if text.startswith(self.sent) else ""
        self.sent = text
        return piece


@dataclass(frozen=True)
class TokenEvent:
    """A token of a running request; `final` on its last one (or, with no token and the sequence's `error`, when
    it was refused in the queue or its prefill failed)."""

    sequence: SequenceState
    token: int | None
    final: bool


class KVPool:
    """Per-layer cache buffers [slots, Hkv, C_l, d] shared by the running requests, one row each."""

    def __init__(self, capacity: Sequence[int], kv_heads: int, head_dim: int, dtype, slots: int) -> None:
        # np.zeros: pages are committed only where a row writes, so a row's memory follows its request's length.
        self.keys = [np.zeros((slots, kv_heads, int(c), head_dim), dtype=dtype) for c in capacity]
        self.values = [np.zeros_like(k) for k in self.keys]
        self.capacity = [int(c) for c in capacity]
        self.lengths = np.zeros((len(self.keys), slots), dtype=np.int64)  # [L, slots] valid entries
        self.free = list(range(slots))

    def acquire(self) -> int:
        slot = min(self.free)  # the lowest row: the batch stays a short prefix of the pool
        self.free.remove(slot)
        return slot

    def release(self, slot: int) -> None:
        self.lengths[:, slot] = 0
        self.free.append(slot)

    def write(self, slot: int, pre: PrefillOutputs) -> None:
        """Copy one request's prefill caches (batch of 1) into its row."""
        for i, (k, v) in enumerate(zip(pre.keys, pre.values, strict=True)):
            n = int(pre.valid[i, 0])  # [B=1, Hkv, S_l, d]: entries past the valid ones are padding
            self.keys[i][slot, :, :n] = k[0, :, :n]
            self.values[i][slot, :, :n] = v[0, :, :n]
            self.lengths[i, slot] = n

    def rows(self, n: int) -> BufferCache:
        """The first `n` rows as the decode graph's in-place caches (views: the step writes into the pool)."""
        return BufferCache([k[:n] for k in self.keys], [v[:n] for v in self.values], self.lengths[:, :n].copy())


class Scheduler:
    """Requests in, tokens out, as many in flight as the KV budget holds (see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        *,
        kv_budget: int,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_queue: int | None = None,
        max_queue_s: float | None = None,
        max_context: int = DEFAULT_MAX_CONTEXT,
        pooled: bool | None = None,
    ) -> None:
        """`pooled`: decode every running request in one batched step over the KVPool; needs a decode that writes
        its caches in place (ort-cpu), the default where the engine has one. Otherwise each running request keeps
        the caches Engine.start_decode gives it and steps alone: admission and streaming stay the same."""
        if kv_budget <= 0 or max_batch < 1:
            raise InputError(f"the KV budget and the batch size must be positive (got {kv_budget}, {max_batch}).")
        self.engine, self.budget, self.max_queue, self.max_queue_s = engine, int(kv_budget), max_queue, max_queue_s
        m = engine.manifest
        self.itemsize = dtype_bytes(m.dtype)
        self.kv_heads, self.head_dim = m.num_kv_heads, m.head_dim
        entry = 2 * m.num_kv_heads * m.head_dim * self.itemsize  # K and V of one entry of one layer
        # A request's layers hold non-increasing lengths (merges only remove), so layer l of one that fits the
        # budget alone holds at most budget / (entry * (l + 1)) entries: no row needs more room than that.
        room = int(max_context) + m.max_new_tokens_limit
        capacity = [max(1, min(room, self.budget // (entry * (i + 1)))) for i in range(m.num_layers)]
        in_place = hasattr(engine.sessions["decode"], "run_in_place")
        self.pooled = in_place if pooled is None else bool(pooled)
        if self.pooled and not in_place:
            raise InputError(f"{engine.directory}: a pooled batch needs a decode that writes its caches in place.")
        dtype = {4: np.float32, 2: np.float16}[self.itemsize]
        # Unpooled, the pool only hands out row numbers: one entry per layer is all it allocates.
        self.pool = KVPool(
            capacity if self.pooled else [1] * m.num_layers, m.num_kv_heads, m.head_dim, dtype, max_batch
        )
        self.capacity = capacity
        self.queue: deque[SequenceState] = deque()
        self.running: dict[int, SequenceState] = {}  # slot -> sequence
        self.reserved = 0
        self.lock = threading.Lock()
        self.ids = itertools.count()
        self.stops = set(m.eos_token_ids)

    # --- requests -----------------------------------------------------------------------------------------------

    def reservation(self, kv_lengths: Sequence[int], max_new_tokens: int) -> int:
        """K and V bytes of a request that caches `kv_lengths` per layer after prefill and decodes max_new_tokens."""
        return sum(kv_bytes([n + max_new_tokens for n in kv_lengths], self.kv_heads, self.head_dim, self.itemsize))

    def submit(self, images: Sequence[Any], prompt: str, *, max_new_tokens: int = 16) -> SequenceState:
        """Queue a request; its reservation is known here, before any compute. InputError if it can never fit."""
        return self.enqueue(self.prepare(images, prompt, max_new_tokens=max_new_tokens))

    def prepare(self, images: Sequence[Any], prompt: str, *, max_new_tokens: int = 16) -> SequenceState:
        """A request's host inputs and KV reservation, not queued yet (a server registers where its tokens go
        first, then enqueues). InputError if it is malformed, over the engine's limits (Engine.check_request: the
        same as Engine.generate's, before any work), or could never fit the budget."""
        engine = self.engine
        max_new_tokens = engine.check_request(images, prompt, max_new_tokens)
        host = engine.host_inputs(images, prompt)
        seq_len = int(host.input_ids.shape[1])
        plan = None
        if not engine.manifest.vanilla:
            plan = plan_request(host.spans, [seq_len], engine.schedule, grid_mode=engine.manifest.grid_mode)
        lengths = [int(n) for n in layer_lengths(engine.schedule, plan, [seq_len])[:, 0]]
        need = self.reservation(lengths, int(max_new_tokens))
        if need > self.budget:
            raise InputError(
                f"this request needs {_size(need)} of KV cache ({seq_len} prompt tokens, {max_new_tokens} new), more "
                f"than the whole budget of {_size(self.budget)}: raise the KV budget or ask for fewer new tokens."
            )
        if any(n + int(max_new_tokens) > c for n, c in zip(lengths, self.capacity, strict=True)):
            raise InputError(
                f"this request's {seq_len} prompt tokens and {max_new_tokens} new ones do not fit a cache row "
                f"({self.capacity[0]} entries in the first layer); a longer max_context holds it."
            )
        seq = SequenceState(
            id=next(self.ids), host=host, max_new_tokens=int(max_new_tokens), kv_lengths=lengths,
            reserved_bytes=need, vision_tokens=sum(s.length for s in host.spans[0]),
        )  # fmt: skip
        return seq

    def enqueue(self, seq: SequenceState) -> SequenceState:
        """Put a prepared request in the queue; QueueFull when the queue is at its limit."""
        with self.lock:
            if self.max_queue is not None and len(self.queue) >= self.max_queue:
                raise QueueFull(f"{len(self.queue)} requests are already waiting (the queue's limit); retry later.")
            seq.submitted = time.perf_counter()
            self.queue.append(seq)
        return seq

    def cancel(self, seq: SequenceState) -> None:
        """Stop a request (a client that went away): its reservation and row are free for the next step."""
        with self.lock:
            if seq in self.queue:
                self.queue.remove(seq)
                self._end(seq, "cancelled")
            elif seq.state == "running":
                self._end(seq, "cancelled")

    @property
    def idle(self) -> bool:
        with self.lock:
            return not self.queue and not self.running

    @property
    def in_flight(self) -> int:
        return len(self.running)

    # --- the loop -----------------------------------------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        """Admit and prefill what fits, then one decode step over every running request; the tokens produced."""
        with self.lock:
            events = self._expire() + self._admit()
            events += self._decode()
        return events

    def run(self) -> None:
        """Step until nothing is queued or running."""
        while not self.idle:
            self.step()

    def abort(self, error: str) -> list[TokenEvent]:
        """End every queued and running request (the step itself failed): their final events, with the error."""
        with self.lock:
            seqs = [*self.queue, *self.running.values()]
            self.queue.clear()
            for seq in seqs:
                self._end(seq, "failed", error)
        return [TokenEvent(seq, None, True) for seq in seqs]

    def _end(self, seq: SequenceState, state: str, error: str = "") -> None:
        if seq.state == "running":
            steps = max(len(seq.tokens) - 1, 0)  # every decode step added one entry to every layer
            held = [n + steps for n in seq.kv_lengths]
            seq.held_bytes = sum(kv_bytes(held, self.kv_heads, self.head_dim, self.itemsize))
            seq.cache = None
            self.running.pop(seq.slot)
            self.pool.release(seq.slot)
            self.reserved -= seq.reserved_bytes
        seq.state, seq.error, seq.finished = state, error, time.perf_counter()

    def _expire(self) -> list[TokenEvent]:
        if self.max_queue_s is None:
            return []
        now, events = time.perf_counter(), []
        for seq in [s for s in self.queue if now - s.submitted > self.max_queue_s]:
            self.queue.remove(seq)
            self._end(seq, "refused", f"waited {self.max_queue_s:g} s in the queue without room in the KV budget")
            events.append(TokenEvent(seq, None, True))
        return events

    def _admit(self) -> list[TokenEvent]:
        events = []
        while self.queue and self.pool.free and self.reserved + self.queue[0].reserved_bytes <= self.budget:
            seq = self.queue.popleft()
            seq.slot, seq.state, seq.admitted = self.pool.acquire(), "running", time.perf_counter()
            self.running[seq.slot] = seq
            self.reserved += seq.reserved_bytes
            t0 = time.perf_counter()
            try:
                request = self.engine.request_from_host(seq.host)
                pre = self.engine.prefill(request)
            except Exception as e:  # this request's fault or a bug: it ends, the others go on
                self._end(seq, "failed", f"{type(e).__name__}: {e}")
                events.append(TokenEvent(seq, None, True))
                continue
            if self.pooled:
                self.pool.write(seq.slot, pre)
            else:
                seq.cache = self.engine.start_decode(pre, seq.max_new_tokens - 1)
            seq.request, seq.host = request, None  # the pixels are not needed any more
            seq.position = request.seq_len + request.decode_offset
            seq.first_token = time.perf_counter()
            seq.prefill_s = seq.first_token - t0
            events.append(self._emit(seq, int(pre.logits[0].argmax())))
        return events

    def _count_batch(self) -> None:
        n = len(self.running)
        for seq in self.running.values():
            seq.batch_sum, seq.batch_max, seq.decode_steps = (
                seq.batch_sum + n,
                max(seq.batch_max, n),
                seq.decode_steps + 1,
            )

    def _emit(self, seq: SequenceState, token: int) -> TokenEvent:
        seq.tokens.append(token)
        final = token in self.stops or len(seq.tokens) >= seq.max_new_tokens
        if final:
            self._end(seq, "finished")
        return TokenEvent(seq, token, final)

    def _decode(self) -> list[TokenEvent]:
        if not self.running:
            return []
        self._count_batch()
        if not self.pooled:
            return self._decode_each()
        n = max(self.running) + 1  # rows 0..n-1; free rows among them step on a dummy token and are reset
        tokens, positions = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        for slot, seq in self.running.items():
            tokens[slot], positions[slot] = seq.tokens[-1], seq.position
        cache = self.pool.rows(n)
        logits = self.engine.decode_step(tokens, positions, cache)  # [n, V]
        self.pool.lengths[:, :n] = cache.lengths
        for slot in range(n):
            if slot not in self.running:
                self.pool.lengths[:, slot] = 0
        events = []
        for slot, seq in list(self.running.items()):
            seq.position += 1
            events.append(self._emit(seq, int(logits[slot].argmax())))
        return events

    def _decode_each(self) -> list[TokenEvent]:
        events = []
        for seq in list(self.running.values()):
            step = np.array([seq.tokens[-1]], dtype=np.int64), np.array([seq.position], dtype=np.int64)
            logits = self.engine.decode_step(*step, seq.cache)  # [1, V]
            seq.position += 1
            events.append(self._emit(seq, int(logits[0].argmax())))
        return events
