"""The server's public face: an HTTP front that validates every request before tritonserver sees it.

tritonserver's own HTTP endpoint parses request JSON recursively (a body nested 60,000 levels deep crashes it with
SIGSEGV) and listens on TCP. So `serve` starts tritonserver with HTTP off and its gRPC endpoint on a unix socket in
a private (0700) directory, and this front (Starlette on uvicorn) is the only thing on the public 127.0.0.1 port.
Every request body is read with a size limit (413 past it, before it is all read when Content-Length says so),
parsed by CPython's json (which guards its recursion: a RecursionError, never a crash) and refused past
MAX_JSON_DEPTH levels (400); then each field is checked against the model's inputs (name, type, range: a
max_new_tokens of 2**32 + 5 is refused, not wrapped to 5) and only then sent to tritonserver as a gRPC request built
here.

Endpoints, as Triton's HTTP/REST protocol and generate extension have them (what client.py and tritonclient.http use):
  GET  /v2/health/live, /v2/health/ready, /v2, /v2/models/M, /v2/models/M/ready
  POST /v2/repository/index
  POST /v2/models/M/generate          {"prompt": ..., "image": [...], "max_new_tokens": N} -> one JSON object
  POST /v2/models/M/generate_stream   the same body -> server-sent events, `data: {...}` per response
Errors are JSON objects {"error": "..."}: 400 (a bad request), 404 (an unknown model or path), 413 (a body over the
limit), 503 (tritonserver not ready, e.g. while `serve` restarts it). A stream refused before its first response
answers with that status and one `data: {"error": ...}` event; a stream whose model dies mid-way (its backend stub
killed, tritonserver gone) ends with a `data: {"error": ...}` event instead of stopping silently.

The body limit of a model's endpoints is derived from its config.pbtxt limits (codec.Limits): max_images images of
max_image_pixels pixels each, as PNG of 8-bit RGBA (4 bytes a pixel, the largest an in-limit image usually is) in
base64, plus max_prompt_chars characters escaped as JSON (\\uXXXX\\uXXXX: 12 bytes each), plus 64 KiB; a fixed
64 KiB elsewhere. `create_app(..., limits=FrontLimits(max_body_bytes=N))` (`serve --max-request-bytes N`)
overrides it.

Slow clients: a whole request (headers and body) must arrive within FrontLimits.request_timeout_s (30 s; `serve
--request-timeout`), else the connection is closed, with a 408 when a request had begun (`deadline_protocol`); an
idle connection between requests closes after keep_alive_s (5 s); at most max_connections (256; `serve
--max-connections`) connections are served at once, and a request on one more gets uvicorn's 503 (plain text
"Service Unavailable", connection closed). Headers are limited to 16 KiB by h11 (400 past it).

Routes live in `create_app`; an OpenAI-compatible /v1/chat/completions (issue 34) is meant to be one more route there,
reusing `Upstream`, `read_json` and the request builder.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import socket
import struct
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from lightkv_export.errors import InputError
from lightkv_export.triton_backend.codec import Limits, check_generate_body

IMAGE_FILE_INPUT = "image_file"  # a model with this input takes its images as files (triton_backend/model.py)
IMAGE_DIR_ENV = "LIGHTKV_IMAGE_DIR"
MAX_JSON_DEPTH = 16  # a generate body needs 2; room for an OpenAI-style messages list later
SMALL_BODY_BYTES = 64 * 1024  # every endpoint that is not a model's generate
BODY_SLACK_BYTES = 64 * 1024
BYTES_PER_PIXEL = 4  # 8-bit RGBA PNG
HEALTH_POLL_S = 0.5  # how often a waiting request asks the supervisor whether its model's stub is alive
STREAM_END_S = 5.0  # how long a finished request's stream may take to close
UPSTREAM_TIMEOUT_S = 10.0  # short calls to tritonserver (readiness, metadata)
# Slow clients (slowloris): uvicorn has no deadline for a request to arrive, so one that sends a byte now and then
# holds its connection for ever; RequestDeadline adds one. 30 s carries the largest default body (~730 MB) at
# ~25 MB/s, far below loopback speed.
REQUEST_TIMEOUT_S = 30.0
KEEP_ALIVE_S = 5.0
# Each connection costs a file descriptor (1024 per process is a common soft limit) and its buffers; 256 is well
# above what one machine's clients open (the model's scheduler queues far fewer requests).
MAX_CONNECTIONS = 256
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    # tritonserver is restarted on the same socket path: reconnect within a second, not after gRPC's usual 1-120 s.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
_INT_RANGES = {"INT8": 8, "INT16": 16, "INT32": 32, "INT64": 64}
_UINT_RANGES = {"UINT8": 8, "UINT16": 16, "UINT32": 32, "UINT64": 64}
_NUMPY = {
    "BOOL": np.bool_,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
# gRPC status -> HTTP status, as Triton's HTTP endpoint maps its error codes.
_HTTP_STATUS = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "UNAVAILABLE": 503, "UNIMPLEMENTED": 501}


class RequestError(Exception):
    """A request the front refuses: HTTP status and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.lost = False  # tritonserver went away (see _upstream_error)


@dataclass(frozen=True)
class FrontLimits:
    """The front's limits. max_body_bytes: the generate endpoints' body limit (None: derived from each model's
    config.pbtxt limits). request_timeout_s: a whole request (headers and body) must arrive within it, counted from
    its first byte (from the connection's opening for its first request); keep_alive_s: an idle connection between
    requests closes after it; max_connections: open connections served at once (a request on one more gets 503)."""

    max_body_bytes: int | None = None
    max_json_depth: int = MAX_JSON_DEPTH
    request_timeout_s: float = REQUEST_TIMEOUT_S
    keep_alive_s: float = KEEP_ALIVE_S
    max_connections: int = MAX_CONNECTIONS


def generate_body_limit(limits: Limits) -> int:
    """The largest generate body a model's limits admit (see the module docstring)."""
    image = limits.max_image_pixels * BYTES_PER_PIXEL + 1024 * 1024  # the PNG's own headers, chunks and filter bytes
    base64_image = (image + 2) // 3 * 4 + 8  # + quotes and a comma
    return BODY_SLACK_BYTES + limits.max_prompt_chars * 12 + limits.max_images * base64_image


def json_depth(value: Any, limit: int) -> int:
    """The nesting depth of a parsed JSON value (arrays and objects), walked without recursion; stops counting past
    `limit` (returns limit + 1)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            stack.extend((v, depth) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


async def read_body(request: Request, max_bytes: int, why: str = "") -> bytes:
    """The request body, refused with 413 as soon as it is known to be over max_bytes (`why`: where the limit comes
    from, for the message)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, f"Content-Length {declared[:40]!r} is not a number of bytes")
        if int(declared) > max_bytes:
            raise RequestError(413, _too_large(int(declared), max_bytes, why))
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise RequestError(413, _too_large(size, max_bytes, why, at_least=True))
            chunks.append(chunk)
    except ClientDisconnect:
        raise RequestError(400, "the client closed the connection before sending the whole body") from None
    return b"".join(chunks)


MODEL_LIMIT_WHY = (
    " (derived from the model's config.pbtxt limits max_images, max_image_pixels and max_prompt_chars); send fewer "
    "or smaller images"
)

SET_LIMIT_WHY = " (set by serve --max-request-bytes); send fewer or smaller images"


def _too_large(size: int, limit: int, why: str, at_least: bool = False) -> str:
    what = f"at least {size}" if at_least else str(size)
    return f"the request body has {what} bytes, over this server's limit of {limit} bytes{why or ' for this endpoint'}"


def parse_json(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """JSON text (UTF-8) -> Python value, at most max_depth arrays/objects deep (else a 400 RequestError).

    CPython's json parser guards its recursion (Py_EnterRecursiveCall: a RecursionError at about 1000 levels, never a
    crash), so parsing first is safe, and it is fast (C) for the long base64 strings of images, where a pure-Python
    or regex pre-scan of hundreds of MB would take seconds; the depth limit is then checked on the parsed value."""
    too_deep = f"the JSON body nests deeper than {max_depth} levels; a request needs at most 2"
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(400, f"the body is not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise RequestError(400, too_deep) from None
    except ValueError as e:  # JSONDecodeError, an integer of more than 4300 digits, NaN
        raise RequestError(400, f"the body is not valid JSON: {str(e)[:200]}") from None
    if json_depth(value, max_depth) > max_depth:
        raise RequestError(400, too_deep)
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


async def read_json(
    request: Request, max_bytes: int, max_depth: int = MAX_JSON_DEPTH, empty: Any = None, why: str = ""
) -> Any:
    body = await read_body(request, max_bytes, why)
    if not body.strip() and empty is not None:
        return empty
    return parse_json(body, max_depth)


# --------------------------------------------------------------------------------------------- tritonserver (gRPC)


@dataclass(frozen=True)
class InputSpec:
    name: str
    datatype: str  # BYTES, INT32, BOOL, ... (Triton's wire names)
    dims: tuple[int, ...]
    optional: bool


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    inputs: tuple[InputSpec, ...]
    decoupled: bool
    limits: Limits
    body_limit: int
    metadata: dict = field(default_factory=dict, compare=False)


def _datatype(data_type: int) -> str:
    from tritonclient.grpc import model_config_pb2

    name = model_config_pb2.DataType.Name(data_type).removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


class Upstream:
    """tritonserver's gRPC endpoint (a unix socket), used from the front's event loop."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.channel: Any = None
        self.stub: Any = None
        self._models: dict[str, ModelInfo] = {}

    async def open(self) -> None:
        import grpc
        from tritonclient.grpc import service_pb2_grpc

        self.channel = grpc.aio.insecure_channel(self.target, options=GRPC_OPTIONS)
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close(grace=None)

    async def _call(self, method: str, request: Any) -> Any:
        import grpc

        try:
            return await getattr(self.stub, method)(request, timeout=UPSTREAM_TIMEOUT_S)
        except grpc.aio.AioRpcError as e:
            raise _upstream_error(e) from None

    async def live(self) -> bool:
        from tritonclient.grpc import service_pb2

        try:
            return bool((await self._call("ServerLive", service_pb2.ServerLiveRequest())).live)
        except RequestError:
            return False

    async def ready(self) -> bool:
        from tritonclient.grpc import service_pb2

        try:
            return bool((await self._call("ServerReady", service_pb2.ServerReadyRequest())).ready)
        except RequestError:
            return False

    async def index(self, ready_only: bool = False) -> list[dict]:
        from tritonclient.grpc import service_pb2

        response = await self._call("RepositoryIndex", service_pb2.RepositoryIndexRequest(ready=ready_only))
        out = []
        for m in response.models:
            entry = {"name": m.name, "version": m.version, "state": m.state}
            if m.reason:
                entry["reason"] = m.reason
            out.append(entry)
        return out

    async def model(self, name: str, limits: FrontLimits) -> ModelInfo:
        """The model's inputs and limits (cached: with --model-control-mode=none they never change)."""
        from google.protobuf.json_format import MessageToDict
        from tritonclient.grpc import service_pb2

        if name in self._models:
            return self._models[name]
        if not _MODEL_NAME.fullmatch(name):
            raise RequestError(404, f"unknown model {name[:80]!r}")
        try:
            config = (await self._call("ModelConfig", service_pb2.ModelConfigRequest(name=name))).config
            metadata = await self._call("ModelMetadata", service_pb2.ModelMetadataRequest(name=name))
        except RequestError as e:
            if e.status in (400, 404):
                served = ", ".join(m["name"] for m in await self.index()) or "none"
                raise RequestError(404, f"unknown model {name!r}; served: {served}") from None
            raise
        params = {k: v.string_value for k, v in config.parameters.items()}
        model_limits = Limits.from_parameters(params)
        inputs = tuple(
            InputSpec(i.name, _datatype(i.data_type), tuple(int(d) for d in i.dims), bool(i.optional))
            for i in config.input
        )
        info = ModelInfo(
            name=name,
            version=metadata.versions[-1] if metadata.versions else "1",
            inputs=inputs,
            decoupled=bool(config.model_transaction_policy.decoupled),
            limits=model_limits,
            body_limit=limits.max_body_bytes or generate_body_limit(model_limits),
            metadata=_metadata_json(MessageToDict(metadata, preserving_proto_field_name=True)),
        )
        self._models[name] = info
        return info

    def stream(self, request: Any) -> Any:
        """One gRPC stream for one request. A model's error arrives as a message (error_message, without its code:
        Triton's own generate endpoints answer every model error with 400 too)."""
        return self.stub.ModelStreamInfer(iter([request]))


def _metadata_json(metadata: dict) -> dict:
    """gRPC's model metadata as Triton's HTTP endpoint writes it (protobuf's JSON has int64 shapes as strings)."""
    for key in ("inputs", "outputs"):
        for tensor in metadata.get(key, []):
            tensor["shape"] = [int(d) for d in tensor.get("shape", [])]
    # image_file is between the front and the model only (see build_request): not something a client sends.
    metadata["inputs"] = [t for t in metadata.get("inputs", []) if t.get("name") != IMAGE_FILE_INPUT]
    return metadata


_MODEL_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,200}")


def _upstream_error(e: Any) -> RequestError:
    """A gRPC error from tritonserver as the client's error: 503 when tritonserver is not there (not started yet,
    restarting, died: the error's `lost` is then true), else the status its code maps to, with its message."""
    code = e.code().name if e.code() is not None else "UNKNOWN"
    details = e.details() or code
    lost = code == "UNAVAILABLE" and any(w in details.lower() for w in ("connect", "socket", "unix:"))
    if lost or code == "DEADLINE_EXCEEDED":
        error = RequestError(503, f"tritonserver is not answering ({details}); it may be restarting: retry shortly")
        error.lost = True
        return error
    return RequestError(_HTTP_STATUS.get(code, 500 if code == "INTERNAL" else 400), details)


# ------------------------------------------------------------------------------------------- request and response


def _encode_bytes(values: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def _check_scalar(spec: InputSpec, value: Any) -> Any:
    dt = spec.datatype
    if dt == "BYTES":
        if not isinstance(value, str):
            raise RequestError(400, f"{spec.name}: expected a string, got {_kind(value)}")
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate (\\ud800) is valid JSON but not text
            raise RequestError(400, f"{spec.name}: not valid text ({e.reason} at character {e.start})") from None
    if dt == "BOOL":
        if not isinstance(value, bool):
            raise RequestError(400, f"{spec.name}: expected true or false, got {_kind(value)}")
        return value
    if dt in _INT_RANGES or dt in _UINT_RANGES:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError(400, f"{spec.name}: expected an integer, got {_kind(value)}")
        bits = _INT_RANGES.get(dt) or _UINT_RANGES[dt]
        low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if dt in _INT_RANGES else (0, 2**bits - 1)
        if not low <= value <= high:
            raise RequestError(400, f"{spec.name}: {value} is out of range for {dt} ({low} to {high})")
        return value
    if dt in _NUMPY:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RequestError(400, f"{spec.name}: expected a number, got {_kind(value)}")
        return value
    raise RequestError(400, f"{spec.name}: inputs of type {dt} cannot be sent as JSON")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def build_request(info: ModelInfo, body: Any, *, request_id: str = "", files: ImageFiles | None = None) -> Any:
    """The gRPC ModelInferRequest for a generate body, every field checked against the model's inputs. With `files`
    and a model that takes images as files, the images go to files and the request carries their names."""
    from tritonclient.grpc import service_pb2

    if not isinstance(body, dict):
        raise RequestError(400, f"the body must be a JSON object with the model's inputs, got {_kind(body)}")
    specs = {s.name: s for s in info.inputs if s.name != IMAGE_FILE_INPUT}  # set by the front only
    unknown = [k for k in body if k not in specs]
    if unknown:
        raise RequestError(
            400, f"unknown field {unknown[0][:80]!r}: model {info.name} takes {', '.join(specs)} (see its metadata)"
        )
    missing = [s.name for s in specs.values() if not s.optional and s.name not in body]
    if missing:
        needed = ", ".join(s.name for s in specs.values() if not s.optional)
        raise RequestError(400, f"missing input {missing[0]!r}: model {info.name} needs {needed}")
    ours = any(s.name == IMAGE_FILE_INPUT for s in info.inputs)  # this package's model (triton_backend/model.py)
    if ours:  # its own limits on the body as sent (prompt characters, image count...), before any file is written
        try:
            check_generate_body(body, info.limits)
        except InputError as e:
            raise RequestError(400, str(e)) from None
    request = service_pb2.ModelInferRequest(model_name=info.name, id=request_id)
    as_files = files is not None and ours
    for name, raw in body.items():
        spec = specs[name]
        listed = isinstance(raw, list)
        values = raw if listed else [raw]
        fixed = [d for d in spec.dims if d > 0]
        if -1 not in spec.dims and len(values) != int(np.prod(fixed or [1])):
            raise RequestError(400, f"{name}: expected {int(np.prod(fixed or [1]))} value(s), got {len(values)}")
        if not values and -1 in spec.dims and not spec.optional:
            raise RequestError(400, f"{name}: expected at least one value, got an empty list")
        checked = [_check_scalar(spec, v) for v in values]
        if name == "image" and as_files:  # the bytes go to files, their names to the model
            checked = [files.write(v).encode() for v in checked]
        shape = [len(checked)] if len(spec.dims) <= 1 else [*(d if d > 0 else 1 for d in spec.dims[:-1]), -1]
        if len(spec.dims) > 1:  # multi-dimensional inputs: only the last dimension may vary
            shape[-1] = len(checked) // int(np.prod(shape[:-1]))
        tensor = request.inputs.add()
        tensor.name, tensor.datatype = name, spec.datatype
        tensor.shape.extend(shape)
        if spec.datatype == "BYTES":
            request.raw_input_contents.append(_encode_bytes(checked))
        else:
            request.raw_input_contents.append(np.asarray(checked, dtype=_NUMPY[spec.datatype]).tobytes())
    if as_files and "image" in body:
        flag = request.inputs.add()
        flag.name, flag.datatype = IMAGE_FILE_INPUT, "BOOL"
        flag.shape.append(1)
        request.raw_input_contents.append(b"\x01")
    # Decoupled models: an empty final response marks the end, so a stream cut short is told apart from a done one.
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    return request


def image_file_name() -> str:
    return secrets.token_hex(16) + ".img"  # model.IMAGE_FILE_NAME


class ImageFiles:
    """One request's image files in the server's private directory; removed when the request ends (the model
    removes each one it read already)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.paths: list[Path] = []

    def write(self, data: bytes) -> str:
        name = image_file_name()
        path = self.directory / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self.paths.append(path)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return name

    def remove(self) -> None:
        for path in self.paths:
            with contextlib.suppress(OSError):
                path.unlink()
        self.paths = []


def _decode_output(datatype: str, shape: list[int], raw: bytes) -> Any:
    if datatype == "BYTES":
        values, offset = [], 0
        while offset + 4 <= len(raw):
            (n,) = struct.unpack_from("<I", raw, offset)
            values.append(raw[offset + 4 : offset + 4 + n].decode("utf-8", errors="replace"))
            offset += 4 + n
    else:
        values = np.frombuffer(raw, dtype=_NUMPY[datatype]).tolist()
    return values[0] if len(values) == 1 else values  # one element: a bare value, as Triton's generate writes it


def response_json(info: ModelInfo, response: Any) -> dict:
    out: dict[str, Any] = {"model_name": info.name, "model_version": response.model_version or info.version}
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=False):
        out[tensor.name] = _decode_output(tensor.datatype, list(tensor.shape), raw)
    return out


def _is_final(response: Any) -> bool:
    param = response.parameters.get("triton_final_response")
    return bool(param.bool_param) if param is not None else False


async def _responses(
    upstream: Upstream, info: ModelInfo, request: Any, health: Callable[[], str | None] | None = None
) -> AsyncIterator[dict]:
    """The model's responses as JSON objects, until its final one; a RequestError when tritonserver refuses the
    request, and one too when the stream ends without a final response (tritonserver died) or when `health` reports
    a dead backend stub while we wait (tritonserver then keeps the request open forever)."""
    import grpc

    call = upstream.stream(request)
    final = complete = False
    messages = aiter(call)
    pending: asyncio.Future | None = None
    try:
        while True:
            # Wait for the next message without cancelling the read (that would cancel the call): poll health
            # every HEALTH_POLL_S meanwhile.
            pending = pending or asyncio.ensure_future(anext(messages))
            done, _ = await asyncio.wait({pending}, timeout=HEALTH_POLL_S)
            if not done:
                dead = health() if health is not None else None
                if dead is not None:
                    raise RequestError(503, _cut_short(dead))
                continue
            try:
                message = pending.result()
            except StopAsyncIteration:
                break
            finally:
                pending = None
            if message.error_message:
                complete = True  # an error response is the request's last
                raise RequestError(400, message.error_message)
            response = message.infer_response
            final = complete = _is_final(response) or not info.decoupled
            if response.outputs:
                yield response_json(info, response)
            if final:
                return
    except grpc.aio.AioRpcError as e:
        error = _upstream_error(e)
        if error.lost or e.code() == grpc.StatusCode.CANCELLED:
            error = RequestError(503, _cut_short(f"tritonserver went away ({e.details() or e.code().name})"))
        raise error from None
    finally:
        if pending is not None:
            pending.cancel()
        # A complete request: let the stream end on its own (tritonserver 2.51 leaks a request cancelled after its
        # final response, and then cannot unload the model at exit). Otherwise the client went away or the model
        # died: cancel, so the model frees the request (request.is_cancelled()).
        if complete and not call.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(call.code(), STREAM_END_S)
        if not call.done():
            call.cancel()
    if not final:
        raise RequestError(503, _cut_short("the stream from tritonserver ended without the final response"))


def _cut_short(why: str) -> str:
    return f"the request did not finish: {why}; the model's backend may have died; retry"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"


async def _until_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(
    upstream_target: str,
    *,
    limits: FrontLimits | None = None,
    health: Callable[[], str | None] | None = None,
    image_dir: Path | None = None,
) -> Starlette:
    """The front as an ASGI app forwarding to tritonserver's gRPC endpoint `upstream_target` (e.g.
    unix:/private/dir/triton.sock:1). `health` (e.g. serve.Server.health) adds the supervisor's view to readiness:
    a dead backend stub makes /v2/health/ready answer 503 although tritonserver itself still says ready.
    `image_dir` (private to this user, shared with tritonserver as IMAGE_DIR_ENV): where images go as files for the
    models that take them so (keeping them out of the backend's shared memory)."""
    limits = limits or FrontLimits()
    upstream = Upstream(upstream_target)

    async def model_info(request: Request) -> ModelInfo:
        return await upstream.model(request.path_params["model"], limits)

    async def live(request: Request) -> Response:
        return Response(status_code=200 if await upstream.live() else 503)

    async def ready(request: Request) -> Response:
        ok = await upstream.ready() and (health is None or health() is None)
        return Response(status_code=200 if ok else 503)

    async def server_metadata(request: Request) -> Response:
        return JSONResponse({"name": "lightkv_export", "version": "1", "extensions": ["generate"]})

    async def repository_index(request: Request) -> Response:
        body = await read_json(request, SMALL_BODY_BYTES, limits.max_json_depth, empty={})
        if not isinstance(body, dict) or not isinstance(body.get("ready", False), bool):
            raise RequestError(400, 'the body must be a JSON object, e.g. {} or {"ready": true}')
        return JSONResponse(await upstream.index(ready_only=body.get("ready", False)))

    async def model_metadata(request: Request) -> Response:
        return JSONResponse((await model_info(request)).metadata)

    async def model_ready(request: Request) -> Response:
        index = await upstream.index(ready_only=True)
        name = request.path_params["model"]
        return Response(status_code=200 if any(m["name"] == name for m in index) else 503)

    async def prepared(request: Request) -> tuple[ModelInfo, Any, ImageFiles | None]:
        info = await model_info(request)
        why = MODEL_LIMIT_WHY if limits.max_body_bytes is None else SET_LIMIT_WHY
        body = await read_json(request, info.body_limit, limits.max_json_depth, why=why)
        files = ImageFiles(image_dir) if image_dir is not None else None
        try:  # in a thread: writing hundreds of MB of images must not stall the other requests
            return info, await asyncio.to_thread(build_request, info, body, files=files), files
        except BaseException:
            if files is not None:
                files.remove()
            raise

    async def generate(request: Request) -> Response:
        info, infer, files = await prepared(request)
        # The client may go away while the model works: then cancel the request upstream (its KV is freed).
        answer = asyncio.ensure_future(_collect(upstream, info, infer, health))
        gone = asyncio.ensure_future(_until_disconnect(request))
        try:
            await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not answer.done():
                answer.cancel()
                with contextlib.suppress(asyncio.CancelledError, RequestError):
                    await answer
            if files is not None:
                files.remove()
        if answer.cancelled():
            return Response(status_code=499)  # nobody is listening any more
        return JSONResponse(answer.result())

    async def generate_stream(request: Request) -> Response:
        info, infer, files = await prepared(request)
        events = _responses(upstream, info, infer, health)

        async def done() -> None:
            await events.aclose()
            if files is not None:
                files.remove()

        try:
            first = await anext(events)
        except StopAsyncIteration:
            first = None
        except BaseException as e:
            await done()
            if not isinstance(e, RequestError):
                raise
            # Refused before its first response: a status and one event, as Triton does.
            return Response(_event({"error": e.message}), status_code=e.status, media_type="text/event-stream")

        async def stream() -> AsyncIterator[bytes]:
            try:
                if first is not None:
                    yield _event(first)
                async for obj in events:
                    yield _event(obj)
            except RequestError as e:  # the model failed or died mid-stream: the client is told
                yield _event({"error": e.message})
            finally:
                await done()

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def on_request_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestError)
        return _error(exc.status, exc.message)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, str(exc.detail))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await upstream.open()
        try:
            yield
        finally:
            await upstream.close()

    routes = [
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        Route("/v2/models/{model}", model_metadata, methods=["GET"]),
        Route("/v2/models/{model}/ready", model_ready, methods=["GET"]),
        Route("/v2/models/{model}/generate", generate, methods=["POST"]),
        Route("/v2/models/{model}/generate_stream", generate_stream, methods=["POST"]),
    ]

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        # A bug here, not the client's fault: a JSON answer like every other error (uvicorn logs the traceback).
        return _error(500, f"internal error in the HTTP front: {type(exc).__name__}: {str(exc)[:300]}")

    handlers: Mapping[Any, Callable] = {
        RequestError: on_request_error,
        HTTPException: on_http_error,
        Exception: on_unexpected,
    }
    app = Starlette(routes=routes, exception_handlers=dict(handlers), lifespan=lifespan)
    app.state.upstream = upstream
    return app


async def _collect(
    upstream: Upstream, info: ModelInfo, request: Any, health: Callable[[], str | None] | None = None
) -> dict:
    """A /generate answer: the last response with outputs (a decoupled model answers it with one)."""
    last: dict | None = None
    async for obj in _responses(upstream, info, request, health):  # leaving the loop early cancels the request
        if last is not None:
            raise RequestError(
                400,
                f"model {info.name} sent more than one response, and /generate answers with exactly one: use "
                '/generate_stream for a streamed answer ("stream": true)',
            )
        last = obj
    if last is None:
        raise RequestError(500, f"model {info.name} sent no output")
    return last


# ------------------------------------------------------------------------------------------------ running it


def bind(port: int | None) -> socket.socket:
    """A listening TCP socket on 127.0.0.1:port (None: a free port). A port in use is an OSError (EADDRINUSE)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # SO_REUSEADDR: a restart may bind the port again while connections of the last run are in TIME_WAIT (on Linux
    # it never lets two sockets listen on one port, so a port in use is still refused).
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port or 0))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(False)
    return sock


def timeout_response(timeout_s: float) -> bytes:
    """The 408 answer, as raw HTTP: it is written where no ASGI response exists (the headers are not complete)."""
    body = json.dumps(
        {"error": f"the request did not arrive whole within {timeout_s:g} s (this server's request timeout)"}
    ).encode()
    head = (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


def deadline_protocol(timeout_s: float) -> type:
    """uvicorn's h11 protocol with a deadline for each request to arrive whole (headers and body).

    uvicorn limits the headers' size (h11: 16 KiB) and idle time between requests (keep-alive) but not the time a
    request takes to arrive: a client that sends a byte every few seconds keeps its connection, and a few hundred
    such clients use up the connection cap. Here the clock starts at the connection's opening (for its first
    request) or at the first byte of a next one, and stops when h11 has the whole request (the client's state
    DONE). At the deadline the connection is closed: with a 408 when a request had begun and no response was
    started (written raw: with the headers incomplete there is no ASGI request to answer), silently when nothing
    was sent, and without a word when a response was already under way (e.g. a 413 sent before the body was read:
    the rest of that body is not waited for). The ASGI app then sees a disconnect, as if the client had left."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    arriving = (h11.IDLE, h11.SEND_BODY)  # the client's states while a request is (or may be) on its way

    class RequestDeadline(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _began = False  # a byte of the current request has arrived

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm(began=False)

        def data_received(self, data: bytes) -> None:
            if self._deadline is None and self.conn.their_state in arriving:
                self._arm(began=True)  # the next request on a kept-alive connection
            self._began = True
            super().data_received(data)

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state not in arriving:
                self._disarm()  # the request arrived whole (or the connection is done)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # A pipelined request already buffered does not pass through data_received again.
            if self._deadline is None and self.conn.their_state in arriving and self.conn.trailing_data[0]:
                self._arm(began=True)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self, *, began: bool) -> None:
            self._disarm()
            self._began = began
            self._deadline = self.loop.call_later(timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if self.transport.is_closing() or self.conn.their_state not in arriving:
                return
            in_cycle = self.conn.their_state is h11.SEND_BODY and self.cycle is not None
            if self._began and not (in_cycle and self.cycle.response_started):
                self.transport.write(timeout_response(timeout_s))
            self.transport.close()  # connection_lost tells the app (a disconnect)

    return RequestDeadline


class FrontServer:
    """The front on uvicorn, in a thread of this process, serving on an already bound socket.

    In a thread rather than a process: a `serve` killed with SIGKILL takes the front with it (and tritonserver, by
    its parent-death signal), and Ctrl-C / SIGTERM stop both in one place. `limits` gives the connection limits
    (request deadline, keep-alive, connection cap); the body limits are the app's (create_app)."""

    def __init__(
        self, app: Starlette, sock: socket.socket, *, graceful_s: int = 5, limits: FrontLimits | None = None
    ) -> None:
        import uvicorn

        limits = limits or FrontLimits()
        self.sock = sock
        config = uvicorn.Config(
            app,
            http=deadline_protocol(limits.request_timeout_s),
            lifespan="on",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=graceful_s,
            timeout_keep_alive=limits.keep_alive_s,  # type: ignore[arg-type]  (call_later takes a float)
            # uvicorn answers 503 when the open connections, this one included, reach the limit: + 1 makes
            # max_connections the number served at once.
            limit_concurrency=limits.max_connections + 1,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="lightkv-front", daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            asyncio.run(self.server.serve(sockets=[self.sock]))
        except BaseException as e:  # reported by alive() / the supervisor, not lost in a thread
            self.error = e

    def start(self, timeout_s: float = 30.0) -> FrontServer:
        self.thread.start()
        deadline = threading.Event()
        waited = 0.0
        while not self.server.started and self.thread.is_alive() and waited < timeout_s:
            deadline.wait(0.02)
            waited += 0.02
        if not self.server.started:
            self.stop()
            raise RuntimeError(f"the HTTP front did not start ({self.error or 'timed out'})")
        return self

    def alive(self) -> bool:
        return self.thread.is_alive() and not self.server.should_exit

    def stop(self, timeout_s: float = 15.0) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout_s)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(5)
        with contextlib.suppress(OSError):
            self.sock.close()
