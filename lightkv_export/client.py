"""Ask a served engine a question about one or more images, over Triton's generate endpoints (HTTP, JSON).

    python -m lightkv_export.client --url http://127.0.0.1:8000 --image photo.png --prompt "What is this?"

--model may be left out when the server serves exactly one model. Prints the answer as its tokens come
(/generate_stream, server-sent events), then the stats; --json waits for the whole answer (/generate) and prints
one JSON object with every output, token ids included. Any client of Triton's generate extension works the same
way: POST {"prompt": ..., "image": [base64 PNG/JPEG, ...], "max_new_tokens": N, "stream": true}.

Timeouts: --connect-timeout (default 10 s) bounds connecting and every short call (liveness, the model list);
--timeout (default 300 s) bounds waiting for the answer to the request itself (a generation). A server that accepts
the connection and never answers is reported within those bounds, with a message saying which one ran out.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import http.client
import json
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightkv_export.contract import INT32_MAX
from lightkv_export.errors import InputError, LightKVError

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
    kv_bytes_reserved: int = 0  # what the scheduler reserved: prefill lengths + max_new_tokens, every layer
    queue_ms: float = 0.0  # waiting for room in the server's KV budget
    time_to_first_token_ms: float = 0.0  # from arrival at the server
    decode_batch_mean: float = 0.0  # requests in the decode steps it took part in (itself included), mean
    decode_batch_max: int = 0


@dataclass(frozen=True)
class Piece:
    """One streamed token and the text it adds (empty while it is part of a character still incomplete)."""

    text: str
    token: int


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


def request_body(images: Sequence[bytes], prompt: str, max_new_tokens: int | None, stream: bool = False) -> dict:
    """The generate request: the served model's inputs by name, the images as base64 text (see codec.py)."""
    body: dict[str, Any] = {"prompt": prompt, "image": [base64.b64encode(b).decode("ascii") for b in images]}
    if max_new_tokens is not None:
        body["max_new_tokens"] = max_new_tokens
    if stream:
        body["stream"] = True
    return body


def _ints(value) -> list[int]:
    """A JSON output of dims [-1]: Triton writes one element as a bare number."""
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _one(value):
    return value[0] if isinstance(value, list) else value


def parse_answer(obj: dict, text: str | None = None, token_ids: list[int] | None = None) -> Answer:
    """The generate response (or a stream's last event, with the text and tokens streamed before it)."""
    try:
        return Answer(
            text=obj["text"] if text is None else text,
            token_ids=_ints(obj["token_ids"]) if token_ids is None else token_ids,
            vision_tokens_in=int(_one(obj["vision_tokens_in"])),
            vision_tokens_per_group=_ints(obj["vision_tokens_per_group"]),
            kv_bytes=int(_one(obj["kv_bytes"])),
            prefill_ms=float(_one(obj["prefill_ms"])),
            decode_ms=float(_one(obj["decode_ms"])),
            kv_bytes_reserved=int(_one(obj.get("kv_bytes_reserved", 0))),
            queue_ms=float(_one(obj.get("queue_ms", 0.0))),
            time_to_first_token_ms=float(_one(obj.get("time_to_first_token_ms", 0.0))),
            decode_batch_mean=float(_one(obj.get("decode_batch_mean", 0.0))),
            decode_batch_max=int(_one(obj.get("decode_batch_max", 0))),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ClientError(f"the answer lacks {e} or has it in another form: is this a lightkv_export model?") from None


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


def _served(url: str, model: str | None, connect_timeout_s: float) -> str:
    client = connect(url, connect_timeout_s)
    try:
        try:
            return choose_model(client, model, url)
        except TimeoutError:
            raise ClientError(
                f"{url} did not list its models within {connect_timeout_s:g} s (--connect-timeout)"
            ) from None
    finally:
        client.close()


def _post(url: str, name: str, endpoint: str, body: dict, timeout_s: float):
    """POST the generate request; the open response (status 200), or the server's refusal as a ClientError."""
    host, port = address(url).rsplit(":", 1)
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout_s)
    conn.request("POST", f"/v2/models/{name}/{endpoint}", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raw = response.read()
        conn.close()
        try:  # a stream refused before its first token says so as one server-sent event
            message = json.loads(raw.strip().removeprefix(b"data:"))["error"]
        except (ValueError, KeyError, TypeError):
            message = raw.decode("utf-8", errors="replace") or f"HTTP {response.status}"
        raise ClientError(f"{name} refused the request: {message}")
    return conn, response


def _checked(obj: Any, name: str) -> dict:
    if not isinstance(obj, dict):
        raise ClientError(f"{name} answered {obj!r}, not a JSON object")
    if "error" in obj:
        raise ClientError(f"{name} refused the request: {obj['error']}")
    return obj


def _request(url, images, prompt, model, max_new_tokens, connect_timeout_s, timeout_s) -> str:
    check_max_new_tokens(max_new_tokens)  # before connecting: a bad argument is not a server problem
    check_timeout(connect_timeout_s, "--connect-timeout")
    check_timeout(timeout_s, "--timeout")
    return _served(url, model, connect_timeout_s)


def _transport_error(e: Exception, name: str, url: str, timeout_s: float) -> ClientError:
    if isinstance(e, TimeoutError):
        return ClientError(
            f"{name} at {url} gave no answer within {timeout_s:g} s (--timeout); the request may still be running "
            "on the server"
        )
    # The connection was reset or refused, or the reply cut short: the server went away mid-request.
    return ClientError(f"the connection to {url} failed during the request ({type(e).__name__}: {e})")


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
    """(model name, Answer) for one request (POST /generate); refusals and timeouts become a ClientError."""
    name = _request(url, images, prompt, model, max_new_tokens, connect_timeout_s, timeout_s)
    body = request_body(images, prompt, max_new_tokens)
    try:
        conn, response = _post(url, name, "generate", body, timeout_s)
        try:
            obj = json.loads(response.read())
        finally:
            conn.close()
    except ClientError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise _transport_error(e, name, url, timeout_s) from None
    return name, parse_answer(_checked(obj, name))


def stream(
    url: str,
    images: Sequence[bytes],
    prompt: str,
    *,
    model: str | None = None,
    max_new_tokens: int | None = None,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    timeout_s: float = TIMEOUT_S,
) -> Iterator[Piece | tuple[str, Answer]]:
    """The answer as it is generated (POST /generate_stream, server-sent events): a Piece per token, then
    (model name, Answer). Closing the generator early closes the connection, which cancels the request on the
    server. --timeout bounds the wait for each token."""
    name = _request(url, images, prompt, model, max_new_tokens, connect_timeout_s, timeout_s)
    body = request_body(images, prompt, max_new_tokens, stream=True)
    try:
        conn, response = _post(url, name, "generate_stream", body, timeout_s)
    except ClientError:
        raise
    except (OSError, http.client.HTTPException) as e:
        raise _transport_error(e, name, url, timeout_s) from None
    text, tokens = [], []
    try:
        for line in response:
            if not line.startswith(b"data:"):
                continue  # the blank line between events
            try:
                obj = _checked(json.loads(line[5:]), name)
            except ValueError:
                raise ClientError(f"{name} sent an event that is not JSON: {line[:200]!r}") from None
            piece = Piece(str(obj.get("text", "")), _ints(obj["token_ids"])[0])
            text.append(piece.text)
            tokens.append(piece.token)
            yield piece
            if "kv_bytes" in obj:  # the last event carries the statistics
                yield name, parse_answer(obj, "".join(text), tokens)
                return
        raise ClientError(f"{name} at {url} ended the stream before the last token")
    except (OSError, http.client.HTTPException) as e:
        raise _transport_error(e, name, url, timeout_s) from None
    finally:
        conn.close()


def format_answer(model: str, a: Answer) -> str:
    return "\n".join([a.text, "", format_stats(model, a)])


def format_stats(model: str, a: Answer) -> str:
    groups = ", ".join(map(str, a.vision_tokens_per_group))
    return "\n".join(
        [
            f"model                    {model}",
            f"tokens generated         {len(a.token_ids)}",
            f"vision tokens in         {a.vision_tokens_in}",
            f"vision tokens per group  [{groups}]",
            f"KV cache                 {a.kv_bytes / 2**20:.2f} MiB ({a.kv_bytes} bytes)",
            f"KV reserved              {a.kv_bytes_reserved / 2**20:.2f} MiB (prefill + max_new_tokens)",
            f"prefill / decode         {a.prefill_ms:.1f} ms / {a.decode_ms:.1f} ms",
            f"queue / first token      {a.queue_ms:.1f} ms / {a.time_to_first_token_ms:.1f} ms",
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
    parser.add_argument(
        "--json", action="store_true", help="wait for the whole answer and print it as one JSON object (token ids too)"
    )
    args = parser.parse_args(argv)
    try:
        address(args.url)
        check_timeout(args.connect_timeout, "--connect-timeout")
        check_timeout(args.timeout, "--timeout")
        images = read_images(args.image)
        options = dict(
            model=args.model,
            max_new_tokens=args.max_new_tokens,
            connect_timeout_s=args.connect_timeout,
            timeout_s=args.timeout,
        )
        if args.json:
            model, answer = ask(args.url, images, args.prompt, **options)
            print(json.dumps({"model": model, **dataclasses.asdict(answer)}))
            return 0
        for item in stream(args.url, images, args.prompt, **options):
            if isinstance(item, Piece):
                print(item.text, end="", flush=True)
            else:
                model, answer = item
                print("\n\n" + format_stats(model, answer))
    except LightKVError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
