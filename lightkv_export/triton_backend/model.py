"""Triton Python-backend model serving one lightkv_export engine (copied into <repo>/<model>/1/model.py).

The engine directory sits next to this file (`<repo>/<model>/1/engine`); `runtime.Engine` dispatches on its
manifest target (ONNX Runtime on CPU, or the TensorRT engines on a GPU). One request is one `Engine.generate`
call: requests are not batched (max_batch_size 0), so `execute` answers the requests it is given one by one.

Every request is checked against the server limits (codec.Limits, from config.pbtxt `parameters`) before any work:
the image count and prompt characters first, then the prompt's tokens and the total sequence length, then each
image's header size, and only then are the pixels decoded and the engine run. Bad requests (a missing input, a
limit exceeded, a corrupt image, an empty prompt, max_new_tokens out of range, ...) come back as INVALID_ARG with a
message that says what to change; the model instance stays loaded and the server stays healthy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import triton_python_backend_utils as pb_utils

from lightkv_export.errors import InputError
from lightkv_export.triton_backend import codec

ENGINE_SUBDIR = "engine"
FULL_HASH_ENV = "LIGHTKV_ENGINE_FULL_HASH"  # serve.FULL_HASH_ENV


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        from lightkv_export.runtime import Engine  # heavy import: only once the stub is up

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        engine_dir = Path(args["model_repository"]) / args["model_version"] / params.get("engine_dir", ENGINE_SUBDIR)
        # Sizes always, SHA-256 too unless the launcher verified the engine already (serve.py sets this to 0).
        self.engine = Engine.load(engine_dir, full_hash=os.environ.get(FULL_HASH_ENV, "1") != "0")
        self.default_max_new_tokens = int(params.get("default_max_new_tokens", "16"))
        self.limits = codec.Limits.from_parameters(params)
        codec.allow_pil_pixels(self.limits)
        manifest = self.engine.manifest
        h, w = (int(x) for x in manifest.vision_token_grid)  # every image is resized to the profile
        vision_per_image = h * w
        host = self.engine.processor  # host.HostProcessor: no torch, no transformers in this process
        self.template_tokens = host.template_tokens(0)
        # Each image adds its wrapper tokens, and its one placeholder becomes vision_per_image tokens.
        self.per_image_tokens = host.template_tokens(1) - self.template_tokens - 1 + vision_per_image
        self.logger = pb_utils.Logger
        self.logger.log_info(f"lightkv_export: loaded {engine_dir} ({manifest.target}), {self.limits}")

    def execute(self, requests: list) -> list:
        return [self._answer(request) for request in requests]

    def _prompt_tokens(self, prompt: str) -> int:
        # As plain text, the way the runtime tokenizes the user's content (control-token text is not a token).
        return self.engine.processor.prompt_tokens(prompt)

    def _answer(self, request) -> pb_utils.InferenceResponse:
        limits = self.limits
        try:
            prompt_values = codec.require(_input(request, "prompt"), "prompt")
            image_values = codec.require(_input(request, "image"), "image")
            n_images = codec.check_image_count(image_values, limits)
            prompt = codec.decode_prompt(prompt_values, limits)
            max_new = codec.decode_max_new_tokens(_input(request, "max_new_tokens"), self.default_max_new_tokens)
            prompt_tokens = self._prompt_tokens(prompt)
            limits.check("max_prompt_tokens", prompt_tokens, f"the prompt has {prompt_tokens} tokens, which")
            # A max_new_tokens over the engine's own limit is refused by the runtime, with that limit in the message.
            new = min(max(0, max_new), self.engine.manifest.max_new_tokens_limit)
            codec.check_sequence(limits, self.template_tokens, self.per_image_tokens, n_images, prompt_tokens, new)
            images = codec.decode_images(image_values, limits)
            gen = self.engine.generate(images, prompt, max_new_tokens=max_new)
        except InputError as e:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG))
        except Exception as e:  # a bug, not the client's fault: report it, keep serving
            self.logger.log_error(f"lightkv_export: generate failed: {type(e).__name__}: {e}")
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"internal error: {type(e).__name__}: {e}"))
        outputs = [pb_utils.Tensor(name, array) for name, array in codec.encode_generation(gen).items()]
        return pb_utils.InferenceResponse(output_tensors=outputs)


def _input(request, name: str):
    """The named input as a numpy array, or None when an optional input was not sent."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()
