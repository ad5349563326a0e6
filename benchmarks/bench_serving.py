"""Load on a real Triton Inference Server: the tiny model, LightKV engine vs vanilla engine, ort-cpu.

Both engines are built by the pipeline into a temporary directory and served side by side by one tritonserver
on 127.0.0.1 (one CPU instance each, no batching: see triton_repo.py). For each engine and each concurrency
(1, 4, 16 client threads, each with its own HTTP connection) the same request (one image, a fixed prompt,
max_new_tokens fixed) is sent a bounded number of times, with a bounded wall time per cell, after warm-up. The
whole grid is repeated ROUNDS times, interleaved, so one burst of load elsewhere on a shared machine lands in
one round of both engines, not in one engine. Reported per cell: the median requests per second over rounds
with their min-max, p50 and p99 latency over every request of every round (client side, full round trip);
headline ratios are the median over rounds of the paired LightKV / vanilla ratios, with their min-max.
Results go to benchmarks/results/serving.json.

    python benchmarks/bench_serving.py [--quick]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

NAME = "serving"
RESULTS = Path(__file__).parent / "results" / f"{NAME}.json"
# Built here (git-ignored): the pipeline caches the vanilla export in it, so later runs skip the export.
ENGINES = Path(__file__).resolve().parent.parent / "engines" / "bench_serving"
CONCURRENCY = (1, 4, 16)
PROMPT = "Describe the image in one sentence."
MAX_NEW_TOKENS = 8
IMAGE_SIZE = (224, 224)  # (width, height) sent; the engine resizes to its own profile
# Per cell and round: (requests, wall-time budget in seconds); the cell stops at whichever comes first. Full run:
# 5 rounds x 6 cells x ~4 s of requests, about 2 minutes of load plus the build and the server's start.
BUDGET = {False: (96, 20.0), True: (8, 8.0)}
ROUNDS = {False: 5, True: 1}
WARMUP = 2


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def request_png(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE[1], IMAGE_SIZE[0], 3), dtype=np.uint8))  # [H, W, 3]
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


MODEL = "tiny-qwen-vl"  # what `python -m benchmarks --model KEY` replaces


def build_engines(out: Path, model: str = MODEL) -> dict[str, Path]:
    from lightkv_export.config import BuildConfig
    from lightkv_export.pipeline import run as build

    # Parity is the build's own gate, tested elsewhere: it is not what is measured here.
    configs = {
        "lightkv": BuildConfig(model=model, ratio=0.55, out=out, parity=False),
        "vanilla": BuildConfig(model=model, vanilla=True, out=out, parity=False),
    }
    return {kind: build(cfg).engine_dirs["ort-cpu"] for kind, cfg in configs.items()}


def load_cell(url: str, model: str, concurrency: int, n_requests: int, budget_s: float, png: bytes) -> dict:
    """Send up to n_requests with `concurrency` threads (stop issuing after budget_s); latency stats and answers."""
    import tritonclient.http as httpclient

    from lightkv_export.client import address, build_inputs, parse_answer

    deadline = time.perf_counter() + budget_s
    issued = iter(range(n_requests))

    def worker(_: int) -> list[tuple[float, object]]:
        # One connection per thread, kept open: the latency is the inference round trip, not the handshake.
        client = httpclient.InferenceServerClient(address(url), network_timeout=300.0)
        inputs = build_inputs([png], PROMPT, MAX_NEW_TOKENS)
        done = []
        try:
            for _i in issued:  # shared iterator: each request index is taken once (next() holds the GIL)
                if time.perf_counter() > deadline:
                    break
                t0 = time.perf_counter()
                answer = parse_answer(client.infer(model, inputs))
                done.append((time.perf_counter() - t0, answer))
        finally:
            client.close()
        return done

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = [r for chunk in pool.map(worker, range(concurrency)) for r in chunk]
    wall = time.perf_counter() - t0
    answers = [r[1] for r in results]
    if len({(a.text, tuple(a.token_ids)) for a in answers}) != 1:
        raise RuntimeError(f"{model}: the same request got different answers under load")
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "wall_s": round(wall, 3),
        "rps": round(len(results) / wall, 3),
        "latencies_ms": [r[0] * 1e3 for r in results],
        "server_prefill_ms": [a.prefill_ms for a in answers],
        "server_decode_ms": [a.decode_ms for a in answers],
        "tokens": len(answers[0].token_ids),
        "kv_bytes": answers[0].kv_bytes,
        "vision_tokens_in": answers[0].vision_tokens_in,
        "vision_tokens_per_group": answers[0].vision_tokens_per_group,
    }


def spread(values: list[float]) -> dict:
    return {"median": round(float(np.median(values)), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def summarise(rounds: list[dict]) -> dict:
    """One (engine, concurrency) cell over its rounds: rps per round and latency percentiles over all requests."""
    latencies = [t for r in rounds for t in r["latencies_ms"]]
    first = rounds[0]
    return {
        "concurrency": first["concurrency"],
        "rounds": len(rounds),
        "requests": sum(r["requests"] for r in rounds),
        "rps_per_round": [r["rps"] for r in rounds],
        "rps": spread([r["rps"] for r in rounds]),
        "p50_ms": round(percentile(latencies, 50), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "p50_ms_per_round": [round(percentile(r["latencies_ms"], 50), 2) for r in rounds],
        "server_prefill_ms_p50": round(percentile([t for r in rounds for t in r["server_prefill_ms"]], 50), 2),
        "server_decode_ms_p50": round(percentile([t for r in rounds for t in r["server_decode_ms"]], 50), 2),
        **{k: first[k] for k in ("tokens", "kv_bytes", "vision_tokens_in", "vision_tokens_per_group")},
    }


def paired(lightkv: dict, vanilla: dict) -> dict:
    """Per-round ratios of one concurrency, in the benchmarks' convention (higher is better for LightKV)."""
    rps = [a / b for a, b in zip(lightkv["rps_per_round"], vanilla["rps_per_round"], strict=True)]
    p50 = [b / a for a, b in zip(lightkv["p50_ms_per_round"], vanilla["p50_ms_per_round"], strict=True)]
    return {"rps": spread(rps), "p50": spread(p50), "p99": round(vanilla["p99_ms"] / lightkv["p99_ms"], 3)}


def run(quick: bool = False, model: str = MODEL) -> dict:
    """Build both engines, serve them, measure every (engine, concurrency) cell; returns numbers and ratios."""
    from lightkv_export import triton_repo
    from lightkv_export.client import ask
    from lightkv_export.serve import Server

    n_requests, budget_s = BUDGET[quick]
    png = request_png()
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        t0 = time.perf_counter()
        engines = build_engines(ENGINES, model)
        build_s = time.perf_counter() - t0
        repo = triton_repo.write_repository(list(engines.values()), Path(tmp) / "repo")
        names = {
            kind: triton_repo.model_name(json.loads((d / "manifest.json").read_text())) for kind, d in engines.items()
        }
        raw: dict[tuple[str, int], list[dict]] = {(k, c): [] for k in names for c in CONCURRENCY}
        loadavg = []
        with Server(repo) as server:
            for name in names.values():
                for _ in range(WARMUP):
                    ask(server.url, [png], PROMPT, model=name, max_new_tokens=MAX_NEW_TOKENS)
            for r in range(ROUNDS[quick]):
                for i, c in enumerate(CONCURRENCY):  # engine order alternates per cell and round
                    for kind in list(names)[:: 1 if (i + r) % 2 == 0 else -1]:
                        raw[kind, c].append(load_cell(server.url, names[kind], c, n_requests, budget_s, png))
                loadavg.append(round(os.getloadavg()[0], 2))
    cells = {k: [summarise(raw[k, c]) for c in CONCURRENCY] for k in names}
    by_concurrency = {
        str(lk["concurrency"]): paired(lk, va) for lk, va in zip(cells["lightkv"], cells["vanilla"], strict=True)
    }
    # Headline ratios in the benchmarks' convention: baseline (vanilla) / ours, higher is better for LightKV.
    ratios = {"KV cache bytes (vanilla / LightKV)": cells["vanilla"][0]["kv_bytes"] / cells["lightkv"][0]["kv_bytes"]}
    for c, pair in by_concurrency.items():
        ratios[f"throughput at concurrency {c} (LightKV / vanilla req/s)"] = pair["rps"]["median"]
        ratios[f"p50 latency at concurrency {c} (vanilla / LightKV)"] = pair["p50"]["median"]
    return {
        "name": NAME,
        "title": (
            f"Triton Inference Server (Python backend, ort-cpu), {model}, LightKV r0.55 vs vanilla: "
            f"1 image {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}, {MAX_NEW_TOKENS} new tokens, concurrency "
            f"{', '.join(map(str, CONCURRENCY))}"
        ),
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "quick": quick,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "setup": {
            "model": model,
            "target": "ort-cpu",
            "ratio": 0.55,
            "models": names,
            "prompt": PROMPT,
            "image_size": list(IMAGE_SIZE),
            "max_new_tokens": MAX_NEW_TOKENS,
            "rounds": ROUNDS[quick],
            "max_requests_per_cell_and_round": n_requests,
            "budget_s_per_cell_and_round": budget_s,
            "warmup": WARMUP,
            "engine_build_s": round(build_s, 1),
        },
        "cells": cells,
        "lightkv_over_vanilla_by_concurrency": by_concurrency,
        "loadavg_1min_after_each_round": loadavg,
    }


def markdown(result: dict) -> str:
    """The README subsection: one row per (engine, concurrency), then the ratios with their spread over rounds."""
    rounds = result["setup"]["rounds"]
    lines = [
        f"{rounds} interleaved rounds per cell; req/s: median over rounds (min-max); p50 and p99: over every "
        "request of every round.",
        "",
        "| engine | concurrency | requests | req/s | p50 ms | p99 ms | KV bytes |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, cells in result["cells"].items():
        lines += [
            f"| {kind} | {c['concurrency']} | {c['requests']} | {c['rps']['median']:.2f} "
            f"({c['rps']['min']:.2f}-{c['rps']['max']:.2f}) | {c['p50_ms']:.1f} | {c['p99_ms']:.1f} | {c['kv_bytes']} |"
            for c in cells
        ]
    lines += ["", "| LightKV vs vanilla | median over rounds | min-max |", "|---|---:|---:|"]
    for c, pair in result["lightkv_over_vanilla_by_concurrency"].items():
        for label, key in (("throughput, LightKV / vanilla", "rps"), ("p50 latency, vanilla / LightKV", "p50")):
            r = pair[key]
            lines.append(f"| {label}, concurrency {c} | {r['median']:.2f}x | {r['min']:.2f}-{r['max']:.2f}x |")
    return "\n".join(lines)


def table(result: dict) -> str:
    rows = [f"{'engine':8} {'conc':>4} {'reqs':>5} {'req/s':>8} {'min-max':>13} {'p50 ms':>9} {'p99 ms':>9}"]
    for kind, cells in result["cells"].items():
        for c in cells:
            rps = c["rps"]
            rows.append(
                f"{kind:8} {c['concurrency']:>4} {c['requests']:>5} {rps['median']:>8.2f} "
                f"{rps['min']:>6.2f}-{rps['max']:<6.2f} {c['p50_ms']:>9.1f} {c['p99_ms']:>9.1f}"
            )
    for label, v in result["ratios"].items():
        rows.append(f"{label}: {v:.3f}x")
    return "\n".join(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few requests per cell (a smoke run)")
    parser.add_argument("--model", default=MODEL, help=f"the model to build and serve (default {MODEL})")
    args = parser.parse_args()
    result = run(quick=args.quick, model=args.model)
    print(table(result))
    if not args.quick:  # a smoke run is never recorded as the result
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {RESULTS}", file=sys.stderr)
