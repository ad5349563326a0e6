"""Ask a served engine a question about one or more images (tritonclient over HTTP).

    python -m lightkv_export.client --url http://127.0.0.1:8000 --image photo.png --prompt "What is this?"

--model may be left out when the server serves exactly one model. Prints the answer, then the stats (--json: one
JSON object with every output, token ids included).

Timeouts: --connect-timeout (default 10 s) bounds connecting and every short call (liveness, the model list);
--timeout (default 300 s) bounds waiting for the answer to the request itself (a generation). A server that accepts
the connection and never answers is reported within those bounds, with a message saying which one ran out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lightkv_export.errors import InputError, LightKVError
from lightkv_export.triton_backend.codec import encode_images

INT32_MAX = 2**31 - 1  # max_new_tokens travels as INT32
CONNECT_TIMEOUT_S = 10.0
TIMEOUT_S = 300.0
_HOST_PORT = re.compile(r"(?P<host>[^/:\s]+|\[[0-9A-Fa-f:.]+\]):(?P<port>[0-9]{1,5})")


class ClientError(LightKVError):
    """The server is down, does not know the model, or refused the request."""

    exit_code = 1


@dataclass(frozen=True)
class Answer:
    text: str
    token_ids: list[int]
    vision_tokens_in: int
    vision_tokens_per_group: list[int]
    kv_bytes: int
    prefill_ms: float
    decode_ms: float


def address(url: str) -> str:
    """host:port from http://HOST:PORT (tritonclient.http wants no scheme); https is refused (plain HTTP server)."""
    url = url.strip().rstrip("/")
    if url.startswith("https://"):
        raise InputError(f"{url}: the server speaks plain HTTP on loopback; use http://")
    host_port = url.removeprefix("http://")
    m = _HOST_PORT.fullmatch(host_port)
    if m is None or not 1 <= int(m["port"]) <= 65535:
        raise InputError(f"{url}: expected http://HOST:PORT with a port from 1 to 65535, e.g. http://127.0.0.1:8000")
    return host_port


def check_max_new_tokens(n: int | None) -> int | None:
    """None (the model's default) or 1 <= n <= 2**31 - 1; the server then applies the engine's own limit."""
    if n is not None and not 1 <= n <= INT32_MAX:
        raise InputError(f"--max-new-tokens must be from 1 to {INT32_MAX}, got {n}")
    return n


def read_images(paths: Sequence[Path]) -> list[bytes]:
    """The image files' bytes, sent as they are (the server decodes PNG or JPEG)."""
    if not paths:
        raise InputError("give at least one --image")
    blobs = []
    for p in paths:
        if not Path(p).is_file():
            raise InputError(f"image file not found: {p}")
        blobs.append(Path(p).read_bytes())
    return blobs


def build_inputs(images: Sequence[bytes], prompt: str, max_new_tokens: int | None) -> list:
    """tritonclient InferInputs for the served signature (see triton_backend/codec.py)."""
    import tritonclient.http as httpclient

    arrays: list[tuple[str, np.ndarray, str]] = [
        ("prompt", np.array([prompt.encode("utf-8")], dtype=np.object_), "BYTES"),  # [1]
        ("image", encode_images(list(images)), "BYTES"),  # [N]
    ]
    if max_new_tokens is not None:
        arrays.append(("max_new_tokens", np.array([max_new_tokens], dtype=np.int32), "INT32"))  # [1]
    inputs = []
    for name, array, dtype in arrays:
        tensor = httpclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def parse_answer(result) -> Answer:
    """An InferResult as an Answer."""

    def one(name: str):
        return result.as_numpy(name).reshape(-1)[0]

    return Answer(
        text=one("text").decode("utf-8"),
        token_ids=[int(t) for t in result.as_numpy("token_ids").reshape(-1)],
        vision_tokens_in=int(one("vision_tokens_in")),
        vision_tokens_per_group=[int(t) for t in result.as_numpy("vision_tokens_per_group").reshape(-1)],
        kv_bytes=int(one("kv_bytes")),
        prefill_ms=float(one("prefill_ms")),
        decode_ms=float(one("decode_ms")),
    )


def check_timeout(seconds: float, flag: str) -> float:
    if not seconds > 0:
        raise InputError(f"{flag} must be a positive number of seconds, got {seconds}")
    return float(seconds)


def _client(url: str, connect_timeout_s: float, read_timeout_s: float):
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(
        address(url), connection_timeout=connect_timeout_s, network_timeout=read_timeout_s
    )


def connect(url: str, timeout_s: float = CONNECT_TIMEOUT_S):
    """A tritonclient.http client for a live server (connect and read timeouts of timeout_s), or a ClientError that
    says the server is down or does not answer."""
    client = _client(url, timeout_s, timeout_s)
    try:
        live = client.is_server_live()
    except TimeoutError:
        client.close()
        raise ClientError(
            f"no answer from {url} within {timeout_s:g} s (--connect-timeout): something listens there but does not "
            "answer like a Triton server; is it the URL lightkv_export.serve printed?"
        ) from None
    except Exception as e:  # connection refused, DNS: all mean "not reachable"
        client.close()
        raise ClientError(f"cannot reach a Triton server at {url} ({type(e).__name__}: {e}); is it running?") from None
    if not live:
        client.close()
        raise ClientError(f"the Triton server at {url} is not live")
    return client


def choose_model(client, model: str | None, url: str) -> str:
    """The model to ask: the one given (it must be served and ready), or the only one served."""
    ready = sorted(m["name"] for m in client.get_model_repository_index() if m.get("state") == "READY")
    if model is None:
        if len(ready) != 1:
            raise ClientError(f"{url} serves {len(ready)} models ({', '.join(ready) or 'none'}): pick one with --model")
        return ready[0]
    if model not in ready:
        raise ClientError(f"unknown model {model!r} at {url}; served: {', '.join(ready) or 'none'}")
    return model


def ask(
    url: str,
    images: Sequence[bytes],
    prompt: str,
    *,
    model: str | None = None,
    max_new_tokens: int | None = None,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    timeout_s: float = TIMEOUT_S,
) -> tuple[str, Answer]:
    """(model name, Answer) for one request; server-side refusals and timeouts become a ClientError."""
    from tritonclient.utils import InferenceServerException

    check_max_new_tokens(max_new_tokens)  # before connecting: a bad argument is not a server problem
    check_timeout(connect_timeout_s, "--connect-timeout")
    check_timeout(timeout_s, "--timeout")
    client = connect(url, connect_timeout_s)
    try:
        try:
            name = choose_model(client, model, url)
        except TimeoutError:
            raise ClientError(
                f"{url} did not list its models within {connect_timeout_s:g} s (--connect-timeout)"
            ) from None
    finally:
        client.close()
    client = _client(url, connect_timeout_s, timeout_s)
    try:
        try:
            result = client.infer(name, build_inputs(images, prompt, max_new_tokens))
        except InferenceServerException as e:
            raise ClientError(f"{name} refused the request: {e.message()}") from None
        except TimeoutError:
            raise ClientError(
                f"{name} at {url} gave no answer within {timeout_s:g} s (--timeout); the request may still be running "
                "on the server"
            ) from None
        except OSError as e:  # the connection was reset or refused: the server went away mid-request
            raise ClientError(f"the connection to {url} failed during the request ({type(e).__name__}: {e})") from None
        return name, parse_answer(result)
    finally:
        client.close()


def format_answer(model: str, a: Answer) -> str:
    groups = ", ".join(map(str, a.vision_tokens_per_group))
    return "\n".join(
        [
            a.text,
            "",
            f"model                    {model}",
            f"tokens generated         {len(a.token_ids)}",
            f"vision tokens in         {a.vision_tokens_in}",
            f"vision tokens per group  [{groups}]",
            f"KV cache                 {a.kv_bytes / 2**20:.2f} MiB ({a.kv_bytes} bytes)",
            f"prefill / decode         {a.prefill_ms:.1f} ms / {a.decode_ms:.1f} ms",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightkv_export.client", description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="http://127.0.0.1:PORT (printed by lightkv_export.serve)")
    parser.add_argument("--model", default=None, help="served model name (default: the only one)")
    parser.add_argument("--image", type=Path, action="append", default=[], help="PNG or JPEG file (repeatable)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the model's default")
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=CONNECT_TIMEOUT_S,
        help=f"seconds to connect and for each short call (default {CONNECT_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--timeout", type=float, default=TIMEOUT_S, help=f"seconds to wait for the answer (default {TIMEOUT_S:g})"
    )
    parser.add_argument("--json", action="store_true", help="print the answer as one JSON object (token ids too)")
    args = parser.parse_args(argv)
    try:
        address(args.url)
        check_timeout(args.connect_timeout, "--connect-timeout")
        check_timeout(args.timeout, "--timeout")
        images = read_images(args.image)
        model, answer = ask(
            args.url,
            images,
            args.prompt,
            model=args.model,
            max_new_tokens=args.max_new_tokens,
            connect_timeout_s=args.connect_timeout,
            timeout_s=args.timeout,
        )
    except LightKVError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    if args.json:
        print(json.dumps({"model": model, **dataclasses.asdict(answer)}))
    else:
        print(format_answer(model, answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
