"""Triton Python-backend model serving one lightkv_export engine (copied into <repo>/<model>/1/model.py).

The engine directory sits next to this file (`<repo>/<model>/1/engine`); `runtime.Engine` dispatches on its
manifest target (ONNX Runtime on CPU, or the TensorRT engines on a GPU). The model is decoupled: `execute` checks
each request and hands it to the scheduler (lightkv_export/scheduler.py: continuous batching under the KV budget
of config.pbtxt), and one loop thread steps the scheduler and sends each request's responses as its tokens come:
with `stream` true one response per token (its text piece and id), the last with the statistics; otherwise one
response with the whole answer, which is what Triton's /generate endpoint needs.

Every request is checked against the server limits (codec.Limits, from config.pbtxt `parameters`) before any work:
the image count and prompt characters first, then the prompt's tokens and the total sequence length, then each
image's header size, and only then are the pixels decoded and the KV reservation computed. Bad requests (a missing
input, a limit exceeded, a corrupt image, an empty prompt, max_new_tokens out of range, a request larger than the
whole KV budget, ...) come back as INVALID_ARG with a message that says what to change; a full queue, or a wait
longer than max_queue_s, as UNAVAILABLE (retry later). A client that goes away cancels its request: its
reservation and cache row are freed at the next step. The model instance stays loaded and the server healthy.

Images as files: the Python backend carries every input through the stub's shared-memory region, which grows to
fit the largest request and never shrinks (eight 4096x4096 images: ~540 MB for the stub's whole life). So the model
declares an optional BOOL input `image_file` (auto_complete_config: config.pbtxt need not list it) and the front
(front.py) then writes each image to a file in the server's private directory (IMAGE_DIR_ENV, 0700) and sends only
the file names as `image`, with image_file true. The file is read here and removed; the bytes live in this
process's heap for the request only. Names are checked against a strict pattern, so no other file can be read.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import triton_python_backend_utils as pb_utils

from lightkv_export.errors import InputError
from lightkv_export.triton_backend import codec

ENGINE_SUBDIR = "engine"
FULL_HASH_ENV = "LIGHTKV_ENGINE_FULL_HASH"  # serve.FULL_HASH_ENV
IDLE_WAIT_S = 0.05  # how often an idle loop looks at the queue (a new request wakes it at once)
CANCEL_POLL_S = 0.05  # how often the loop asks whether clients went away (each ask is a call to the server)
IMAGE_FILE_INPUT = "image_file"  # front.IMAGE_FILE_INPUT
IMAGE_DIR_ENV = "LIGHTKV_IMAGE_DIR"  # front.IMAGE_DIR_ENV: set by serve.py for tritonserver and its stubs
IMAGE_FILE_NAME = re.compile(rb"[0-9a-f]{32}\.img")  # front.image_file_name()


@dataclass
class Sink:
    """Where one request's responses go."""

    request: Any
    sender: Any
    stream: bool
    text: Any  # scheduler.TextDeltas
    seq: Any = None  # scheduler.SequenceState


def _error(message: str, code: str = "INVALID_ARG"):
    kind = getattr(pb_utils.TritonError, code, pb_utils.TritonError.INTERNAL)
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, kind))


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        """Declares the image_file input (see the module docstring): the front sends images as files when a model
        has it."""
        spec = {"name": IMAGE_FILE_INPUT, "data_type": "TYPE_BOOL", "dims": [1], "optional": True}
        auto_complete_model_config.add_input(spec)
        return auto_complete_model_config

    def initialize(self, args: dict) -> None:
        from lightkv_export.accounting.units import parse_budget
        from lightkv_export.runtime import Engine  # heavy import: only once the stub is up
        from lightkv_export.scheduler import Scheduler

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        engine_dir = Path(args["model_repository"]) / args["model_version"] / params.get("engine_dir", ENGINE_SUBDIR)
        # The engine enforces the served limits itself too (Engine.check_request): one definition, both places.
        self.limits = codec.Limits.from_parameters(params)
        # Sizes always, SHA-256 too unless the launcher verified the engine already (serve.py sets this to 0).
        self.engine = Engine.load(engine_dir, full_hash=os.environ.get(FULL_HASH_ENV, "1") != "0", limits=self.limits)
        self.default_max_new_tokens = int(params.get("default_max_new_tokens", "16"))
        batching = codec.Batching.from_parameters(params)
        codec.allow_pil_pixels(self.limits)
        manifest = self.engine.manifest
        self.scheduler = Scheduler(
            self.engine,
            kv_budget=parse_budget(batching.kv_budget, available=_free_memory(manifest.target)),
            max_batch=batching.max_batch,
            max_queue=batching.max_queue,
            max_queue_s=batching.max_queue_s,
        )
        self.sinks: dict[int, Sink] = {}
        self.sinks_lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = False
        self.polled = 0.0
        self.logger = pb_utils.Logger
        self.loop = threading.Thread(target=self._loop, name="lightkv-scheduler", daemon=True)
        self.loop.start()
        pooled = "one batched decode" if self.scheduler.pooled else "each request decoded alone"
        self.logger.log_info(
            f"lightkv_export: loaded {engine_dir} ({manifest.target}), {self.limits}, {batching} "
            f"({self.scheduler.budget} bytes of KV, {pooled})"
        )

    # --- requests in --------------------------------------------------------------------------------------------

    def execute(self, requests: list) -> None:
        for request in requests:
            self._enqueue(request)
        return None

    def _enqueue(self, request) -> None:
        from lightkv_export.scheduler import QueueFull, TextDeltas

        sender = request.get_response_sender()
        limits = self.limits
        try:
            prompt_values = codec.require(_input(request, "prompt"), "prompt")
            image_values = codec.require(_input(request, "image"), "image")
            codec.check_image_count(image_values, limits)
            image_file = _input(request, IMAGE_FILE_INPUT)
            if image_file is not None and image_file.size == 1 and bool(image_file.reshape(-1)[0]):
                image_values = _read_image_files(image_values)
            prompt = codec.decode_prompt(prompt_values, limits)
            max_new = codec.decode_max_new_tokens(_input(request, "max_new_tokens"), self.default_max_new_tokens)
            stream = codec.decode_stream(_input(request, "stream"))
            # Headers only: each image's size gives its tokens (its layout), so every limit (the prompt's tokens and
            # the sequence length included: Engine.check_request) is checked before any pixel is decoded.
            opened = codec.open_images(image_values, limits)
            try:
                self.engine.check_request([img for img, _ in opened], prompt, max_new)
                images = codec.load_images(opened)
            finally:
                for img, _ in opened:
                    img.close()
            seq = self.scheduler.prepare(images, prompt, max_new_tokens=max_new)
            sink = Sink(request, sender, stream, TextDeltas(self.engine.processor.tokenizer), seq)
            with self.sinks_lock:  # registered before it can be admitted: no token of it is ever lost
                self.sinks[seq.id] = sink
            try:
                self.scheduler.enqueue(seq)
            except QueueFull:
                with self.sinks_lock:
                    self.sinks.pop(seq.id, None)
                raise
        except QueueFull as e:
            sender.send(_error(str(e), "UNAVAILABLE"), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        except InputError as e:
            sender.send(_error(str(e)), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        except Exception as e:  # a bug, not the client's fault: report it, keep serving
            self.logger.log_error(f"lightkv_export: request failed: {type(e).__name__}: {e}")
            message = f"internal error: {type(e).__name__}: {e}"
            sender.send(_error(message, "INTERNAL"), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        self.wake.set()

    # --- the loop -----------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self.stopping:
            if self.scheduler.idle:
                self.wake.wait(IDLE_WAIT_S)
                self.wake.clear()
                continue
            self._cancel_gone()
            try:
                events = self.scheduler.step()
            except Exception as e:  # a failed step ends the requests in it; the server goes on
                self.logger.log_error(f"lightkv_export: decode step failed: {type(e).__name__}: {e}")
                events = self.scheduler.abort(f"internal error: {type(e).__name__}: {e}")
            for event in events:
                self._send(event)

    def _cancel_gone(self) -> None:
        """Requests whose client went away: cancelled, their reservation and row freed for this step."""
        now = time.monotonic()
        if now - self.polled < CANCEL_POLL_S:
            return
        self.polled = now
        with self.sinks_lock:
            gone = [s for s in self.sinks.values() if s.request.is_cancelled()]
            for sink in gone:
                self.sinks.pop(sink.seq.id, None)
        for sink in gone:
            self.scheduler.cancel(sink.seq)
            seq = sink.seq
            self.logger.log_info(
                f"lightkv_export: request {seq.id} cancelled by its client after {len(seq.tokens)} of "
                f"{seq.max_new_tokens} tokens; {seq.reserved_bytes} bytes of KV reservation freed"
            )
            sink.sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _send(self, event) -> None:
        seq = event.sequence
        with self.sinks_lock:
            sink = self.sinks.get(seq.id) if not event.final else self.sinks.pop(seq.id, None)
        if sink is None:
            return
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if event.final else 0
        if event.token is None:  # refused in the queue, or its prefill failed
            code = "UNAVAILABLE" if seq.state == "refused" else "INTERNAL"
            message = f"{seq.error}; retry later" if seq.state == "refused" else f"internal error: {seq.error}"
            sink.sender.send(_error(message, code), flags=final)
            return
        piece = sink.text.add(event.token) + (sink.text.rest() if event.final else "")
        if sink.stream:
            arrays = codec.encode_piece(piece, event.token)
            if event.final:
                arrays = {**codec.encode_generation(seq.result(self.engine, self.scheduler.itemsize), seq.stats()),
                          **arrays}  # fmt: skip
        elif event.final:
            arrays = codec.encode_generation(seq.result(self.engine, self.scheduler.itemsize), seq.stats())
        else:
            return  # one response at the end
        outputs = [pb_utils.Tensor(name, array) for name, array in arrays.items()]
        sink.sender.send(pb_utils.InferenceResponse(output_tensors=outputs), flags=final)

    def finalize(self) -> None:
        self.stopping = True
        self.wake.set()
        self.loop.join(timeout=10)
        with self.sinks_lock:
            left, self.sinks = list(self.sinks.values()), {}
        for sink in left:
            message = "the model is unloading (server shutting down); retry on another replica"
            sink.sender.send(_error(message, "UNAVAILABLE"), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def _free_memory(target_name: str) -> int | None:
    """What a share ("40%") of kv_budget is taken of: the GPU's free memory once a TensorRT engine has loaded, or
    None for a CPU target (scheduler.parse_budget then reads MemAvailable)."""
    from lightkv_export.targets import target

    if target(target_name).instance_kind != "KIND_GPU":
        return None
    import torch  # the TensorRT runtime runs through torch already

    return int(torch.cuda.mem_get_info()[0])


def _read_image_files(names) -> Any:
    """The image tensor whose elements are names of files the front wrote (see the module docstring): their bytes.
    Each file is removed once read."""
    import numpy as np

    directory = os.environ.get(IMAGE_DIR_ENV)
    if not directory:
        raise InputError(f"{IMAGE_FILE_INPUT} is set but the server has no {IMAGE_DIR_ENV}: send the images inline")
    blobs = []
    for i, name in enumerate(names.reshape(-1)):
        raw = bytes(name) if not isinstance(name, str) else name.encode()
        if not IMAGE_FILE_NAME.fullmatch(raw):
            raise InputError(f"image {i}: {raw[:80]!r} is not an image file name of this server")
        path = Path(directory) / raw.decode()
        try:
            blobs.append(path.read_bytes())
        except OSError as e:
            raise InputError(f"image {i}: its file is gone ({e.strerror})") from None
        path.unlink(missing_ok=True)
    return np.array(blobs, dtype=np.object_)


def _input(request, name: str):
    """The named input as a numpy array, or None when an optional input was not sent."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()
