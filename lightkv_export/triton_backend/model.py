"""Triton Python-backend model serving one lightkv_export engine (copied into <repo>/<model>/1/model.py).

The engine directory sits next to this file (`<repo>/<model>/1/engine`); `runtime.Engine` dispatches on its
manifest target (ONNX Runtime on CPU, or the TensorRT engines on a GPU). One request is one `Engine.generate`
call: requests are not batched (max_batch_size 0), so `execute` answers the requests it is given one by one.

Bad requests (corrupt image, empty prompt, max_new_tokens out of range, ...) come back as a Triton error
carrying the runtime's InputError message; the model instance stays loaded and the server stays healthy.
"""

from __future__ import annotations

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from lightkv_export.errors import InputError
from lightkv_export.triton_backend import codec

ENGINE_SUBDIR = "engine"


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        from lightkv_export.runtime import Engine  # heavy import: only once the stub is up

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        engine_dir = Path(args["model_repository"]) / args["model_version"] / params.get("engine_dir", ENGINE_SUBDIR)
        self.engine = Engine.load(engine_dir)
        self.default_max_new_tokens = int(params.get("default_max_new_tokens", "16"))
        self.logger = pb_utils.Logger
        self.logger.log_info(f"lightkv_export: loaded {engine_dir} ({self.engine.manifest.get('target')})")

    def execute(self, requests: list) -> list:
        return [self._answer(request) for request in requests]

    def _answer(self, request) -> pb_utils.InferenceResponse:
        try:
            prompt = codec.decode_prompt(_input(request, "prompt"))
            images = codec.decode_images(_input(request, "image"))
            max_new = codec.decode_max_new_tokens(_input(request, "max_new_tokens"), self.default_max_new_tokens)
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
