"""Continuous batching through a real Triton Inference Server: how many requests a KV budget holds, vanilla vs LightKV.

The model is the `ort_prefill` configuration (Qwen2.5-VL's language model, 12 layers, D 1024, 16/4 heads, MLP 2816,
seeded random weights, saved with save_pretrained), built by the pipeline twice: vanilla and LightKV at ratio 0.55,
ort-cpu, with an image profile of 896 x 896 (a 32 x 32 grid: 1,024 vision tokens). Both are served by one
tritonserver on 127.0.0.1, each model with the same KV budget: exactly BUDGET_REQUESTS vanilla reservations (a
reservation is the request's per-layer cache lengths after prefill plus MAX_NEW_TOKENS entries, K and V; the
scheduler computes it before any compute, and so does this script, in-process, for the same request).

Load: CLIENTS client threads in a closed loop (each sends a streaming request, /generate_stream, reads it to the end,
sends the next) until a cell's REQUESTS requests are issued. Per cell (engine, round): requests/s and generated
tokens/s over the cell's wall time, p50 / p99 time to first token (client side: the first server-sent event) and
end-to-end latency, and the requests in flight as the server counts them: each request reports the running batch
of the decode steps it took part in (decode_batch_mean, decode_batch_max); the mean is taken over the steady state
(requests issued after the first one finished and finished before the last one was issued). Beside it the
analytic ceiling: min(clients, max_batch, floor(budget / reservation)). Rounds interleave the engines (the order
alternates); then one round at a budget of CLIENTS vanilla reservations (the server restarted with it) separates
the gain of admission from that of LightKV's cheaper prefill and decode. Results go to benchmarks/results/serving.json.

    python benchmarks/bench_serving.py [--quick]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

if not __package__:  # run as `python benchmarks/bench_serving.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_ort_prefill import FULL, QUICK, BenchSize

NAME = "serving"
RESULTS = Path(__file__).parent / "results" / f"{NAME}.json"
# Built here (git-ignored): the checkpoint and the pipeline's export cache, so later runs skip both.
ENGINES = Path(__file__).resolve().parent.parent / "engines" / "bench_serving"
RATIO = 0.55
CLIENTS = 16
BUDGET_REQUESTS = 4  # the KV budget holds exactly this many vanilla requests
PROMPT = "Describe the image."
SEND_SIZE = (224, 224)  # (width, height) of the PNG sent; the engine resizes it to its profile
SETTINGS = {  # quick: a smoke run at a toy size (writes nothing)
    False: {"size": FULL, "image": (896, 896), "new": 32, "requests": 48, "rounds": 3},
    True: {"size": replace(QUICK, layers=4), "image": (448, 448), "new": 8, "requests": 40, "rounds": 1},
}


def request_png(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (SEND_SIZE[1], SEND_SIZE[0], 3), dtype=np.uint8))  # [H, W, 3]
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def build_engines(size: BenchSize, image: tuple[int, int], out: Path) -> dict[str, Path]:
    """The random-weight checkpoint (written once) and its vanilla and LightKV ort-cpu engines."""
    from benchmarks.bench_peer import write_checkpoint
    from lightkv_export.config import BuildConfig
    from lightkv_export.pipeline import run as build

    checkpoint = out / f"checkpoint-{size.layers}x{size.hidden}"
    if not (checkpoint / "config.json").is_file():
        write_checkpoint(size, checkpoint)
    # The tiny processor caps images at 448 x 448; this profile is larger (about a thousand vision tokens).
    processor = checkpoint / "processor_config.json"
    config = json.loads(processor.read_text())
    edges = config["image_processor"]["size"]
    edges["longest_edge"] = max(int(edges["longest_edge"]), image[0] * image[1])
    processor.write_text(json.dumps(config, indent=2) + "\n")
    engines = {}
    for kind in ("vanilla", "lightkv"):
        kw = {"vanilla": True} if kind == "vanilla" else {"ratio": RATIO}
        # Parity is the build's own gate, tested elsewhere: it is not what is measured here.
        result = build(BuildConfig(model=str(checkpoint), out=out, image_size=image, parity=False, **kw))
        if "ort-cpu" not in result.engine_dirs or result.failed_targets:
            raise RuntimeError(f"the {kind} build failed: {result.failed_targets}")
        engines[kind] = result.engine_dirs["ort-cpu"]
    return engines


def reservations(engines: dict[str, Path], png: bytes, new: int) -> dict[str, int]:
    """Each engine's KV reservation for the benchmark's request, as its scheduler computes it (no graph runs)."""
    from lightkv_export.runtime import Engine
    from lightkv_export.scheduler import Scheduler

    image = Image.open(io.BytesIO(png)).convert("RGB")
    out = {}
    for kind, directory in engines.items():
        engine = Engine.load(directory, lazy=True)  # host preprocessing only: the text weights stay unpacked
        out[kind] = Scheduler(engine, kv_budget=1 << 40).prepare([image], PROMPT, max_new_tokens=new).reserved_bytes
    return out


def ceiling(budget: int, reservation: int, clients: int = CLIENTS, max_batch: int = CLIENTS) -> int:
    """Requests the budget can hold at once, as the scheduler admits them."""
    return min(clients, max_batch, budget // reservation)


def load_cell(url: str, model: str, png: bytes, new: int, n_requests: int) -> dict:
    """CLIENTS closed-loop streaming clients until n_requests are issued; every request's times and answer."""
    from lightkv_export.client import Piece, stream

    issued = iter(range(n_requests))
    lock = threading.Lock()
    last_issue = [0.0]

    def worker(_: int) -> list[dict]:
        done = []
        for _i in issued:  # shared iterator: each request index is taken once (next() holds the GIL)
            t0 = time.perf_counter()
            with lock:
                last_issue[0] = max(last_issue[0], t0)
            first, answer = None, None
            for item in stream(url, [png], PROMPT, model=model, max_new_tokens=new, timeout_s=600):
                if isinstance(item, Piece):
                    first = first or time.perf_counter()
                else:
                    answer = item[1]
            t1 = time.perf_counter()
            done.append({"sent": t0, "first": first, "end": t1, "answer": answer})
        return done

    t_start = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = [r for chunk in pool.map(worker, range(CLIENTS)) for r in chunk]
    wall = time.perf_counter() - t_start
    answers = [r["answer"] for r in results]
    if len({tuple(a.token_ids) for a in answers}) != 1:
        raise RuntimeError(f"{model}: the same request got different answers under load")
    # The server's own count: each request reports the running batch of the decode steps it took part in; in the
    # steady state (every request issued while others wait) its mean over requests is the mean running batch.
    # steady state: requests issued after the first one finished (the ramp-up is over) that finished before the
    # last one was issued (the queue has not drained yet); the whole cell when there are none (a smoke run).
    first_end = min(r["end"] for r in results)
    steady = [r["answer"] for r in results if r["sent"] >= first_end and r["end"] <= last_issue[0]]
    steady = [a for a in steady or answers if a.decode_batch_max]
    mean = float(np.mean([a.decode_batch_mean for a in steady]))
    peak = max(a.decode_batch_max for a in answers)
    tokens = sum(len(a.token_ids) for a in answers)
    return {
        "requests": len(results),
        "wall_s": round(wall, 3),
        "rps": round(len(results) / wall, 4),
        "tokens_per_s": round(tokens / wall, 2),
        "in_flight_mean": round(mean, 3),
        "in_flight_max": peak,
        "steady_requests": len(steady),
        "ttft_ms": [round((r["first"] - r["sent"]) * 1e3, 2) for r in results],
        "latency_ms": [round((r["end"] - r["sent"]) * 1e3, 2) for r in results],
        "queue_ms": [round(a.queue_ms, 2) for a in answers],
        "tokens": len(answers[0].token_ids),
        "kv_bytes": answers[0].kv_bytes,
        "kv_bytes_reserved": answers[0].kv_bytes_reserved,
    }


def spread(values: list[float]) -> dict:
    return {"median": round(float(np.median(values)), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def percentile(values: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(values, dtype=np.float64), q)), 2)


def summarise(rounds: list[dict]) -> dict:
    """One engine's cells over rounds: per-round rates with spread, percentiles over every request of every round."""
    every = {k: [t for r in rounds for t in r[k]] for k in ("ttft_ms", "latency_ms")}
    return {
        "rounds": len(rounds),
        "requests": sum(r["requests"] for r in rounds),
        **{k: spread([r[k] for r in rounds]) for k in ("rps", "tokens_per_s", "in_flight_mean")},
        "in_flight_max": max(r["in_flight_max"] for r in rounds),
        "ttft_p50_ms": percentile(every["ttft_ms"], 50),
        "ttft_p99_ms": percentile(every["ttft_ms"], 99),
        "latency_p50_ms": percentile(every["latency_ms"], 50),
        "latency_p99_ms": percentile(every["latency_ms"], 99),
        "per_round": {k: [r[k] for r in rounds] for k in ("rps", "tokens_per_s", "in_flight_mean")},
        **{k: rounds[0][k] for k in ("tokens", "kv_bytes", "kv_bytes_reserved")},
    }


def paired(lightkv: dict, vanilla: dict, key: str) -> dict:
    """Per-round LightKV / vanilla ratios of one rate, with their spread."""
    a, b = lightkv["per_round"][key], vanilla["per_round"][key]
    return spread([x / y for x, y in zip(a, b, strict=True)])


def serve_rounds(repo: Path, names: dict[str, str], png: bytes, new: int, n: int, rounds: int) -> dict:
    from lightkv_export.client import ask
    from lightkv_export.serve import Server

    cells: dict[str, list[dict]] = {k: [] for k in names}
    with Server(repo) as server:
        for name in names.values():
            ask(server.url, [png], PROMPT, model=name, max_new_tokens=new)  # warm-up: sessions open, arenas grow
        for r in range(rounds):
            for kind in list(names)[:: 1 if r % 2 == 0 else -1]:
                cells[kind].append(load_cell(server.url, names[kind], png, new, n))
                print(f"  round {r + 1}/{rounds} {kind}: {cells[kind][-1]['rps']:.3f} req/s, in flight "
                      f"{cells[kind][-1]['in_flight_mean']:.2f}", file=sys.stderr)  # fmt: skip
    return cells


def set_budget(repo: Path, budget: int) -> None:
    """Rewrite every model's kv_budget parameter in place (the server reads it at start)."""
    for config in repo.glob("*/config.pbtxt"):
        text = config.read_text()
        config.write_text(re.sub(r'(key: "kv_budget", value: \{ string_value: ")[^"]*(")', rf"\g<1>{budget}b\2", text))


def run(quick: bool = False) -> dict:
    """Build both engines, serve them under a KV budget of BUDGET_REQUESTS vanilla requests, then of CLIENTS."""
    import tempfile

    from lightkv_export import triton_repo
    from lightkv_export.artifacts import read_manifest
    from lightkv_export.triton_backend.codec import Batching

    s = SETTINGS[quick]
    png = request_png()
    t0 = time.perf_counter()
    engines = build_engines(s["size"], s["image"], ENGINES / ("quick" if quick else "full"))
    build_s = time.perf_counter() - t0
    need = reservations(engines, png, s["new"])
    budget = BUDGET_REQUESTS * need["vanilla"]
    names = {kind: triton_repo.model_name(read_manifest(d)) for kind, d in engines.items()}
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        batching = Batching(kv_budget=f"{budget}b", max_batch=CLIENTS, max_queue=4 * CLIENTS, max_queue_s=3600)
        repo = triton_repo.write_repository(list(engines.values()), Path(tmp) / "repo", batching=batching)
        print(f"budget {budget} bytes = {BUDGET_REQUESTS} vanilla reservations of {need['vanilla']}", file=sys.stderr)
        tight = serve_rounds(repo, names, png, s["new"], s["requests"], s["rounds"])
        set_budget(repo, CLIENTS * need["vanilla"])
        print(f"budget for all {CLIENTS}", file=sys.stderr)
        roomy = serve_rounds(repo, names, png, s["new"], s["requests"], 1)
    budgets = {"tight": budget, "roomy": CLIENTS * need["vanilla"]}
    cells = {phase: {k: summarise(v) for k, v in raw.items()} for phase, raw in (("tight", tight), ("roomy", roomy))}
    analytic = {phase: {k: ceiling(b, need[k]) for k in need} for phase, b in budgets.items()}
    t, r = cells["tight"], cells["roomy"]
    ratios = {
        "KV reservation per request (vanilla / LightKV)": need["vanilla"] / need["lightkv"],
        "requests in flight, analytic (LightKV / vanilla)": analytic["tight"]["lightkv"] / analytic["tight"]["vanilla"],
        "requests in flight, measured (LightKV / vanilla)": paired(t["lightkv"], t["vanilla"], "in_flight_mean")[
            "median"
        ],
        f"throughput at a budget of {BUDGET_REQUESTS} vanilla requests (LightKV / vanilla req/s)": paired(
            t["lightkv"], t["vanilla"], "rps"
        )["median"],
        f"throughput at a budget of {CLIENTS} (LightKV / vanilla req/s)": paired(r["lightkv"], r["vanilla"], "rps")[
            "median"
        ],
    }
    return {
        "name": NAME,
        "title": (
            f"Triton Inference Server, continuous batching under a KV budget (ort-cpu, random-weight Qwen2.5-VL "
            f"{s['size'].layers} layers D={s['size'].hidden}, one {s['image'][0]}x{s['image'][1]} image, "
            f"{s['new']} new tokens, {CLIENTS} closed-loop clients): LightKV r{RATIO} vs vanilla"
        ),
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "quick": quick,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "setup": {
            "size": s["size"].__dict__,
            "image_profile": list(s["image"]),
            "prompt": PROMPT,
            "max_new_tokens": s["new"],
            "clients": CLIENTS,
            "requests_per_cell": s["requests"],
            "rounds": s["rounds"],
            "models": names,
            "reservation_bytes": need,
            "budget_bytes": budgets,
            "engine_build_s": round(build_s, 1),
        },
        "analytic_in_flight": analytic,
        "cells": cells,
        "lightkv_over_vanilla": {
            phase: {k: paired(c["lightkv"], c["vanilla"], k) for k in ("rps", "tokens_per_s", "in_flight_mean")}
            for phase, c in cells.items()
        },
    }


def markdown(result: dict) -> str:
    """The docs/benchmarks.md subsection: one row per (budget, engine), then the paired ratios with their spread."""
    setup = result["setup"]
    lines = [
        f"KV budget: {BUDGET_REQUESTS} vanilla reservations ({setup['budget_bytes']['tight']} bytes; a reservation is "
        f"{setup['reservation_bytes']['vanilla']} bytes vanilla, {setup['reservation_bytes']['lightkv']} LightKV), "
        f"then one round at {CLIENTS}. {setup['rounds']} interleaved rounds of {setup['requests_per_cell']} requests "
        "per engine; rates: median over rounds (min-max); percentiles over every request.",
        "",
        "| budget | engine | in flight: analytic | mean (min-max) | max | req/s | tokens/s | TTFT p50 / p99 ms "
        "| latency p50 / p99 ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for phase, cells in result["cells"].items():
        for kind, c in cells.items():
            f = c["in_flight_mean"]
            lines.append(
                f"| {phase} | {kind} | {result['analytic_in_flight'][phase][kind]} | {f['median']:.2f} "
                f"({f['min']:.2f}-{f['max']:.2f}) | {c['in_flight_max']} | {c['rps']['median']:.3f} | "
                f"{c['tokens_per_s']['median']:.1f} | {c['ttft_p50_ms']:.0f} / {c['ttft_p99_ms']:.0f} | "
                f"{c['latency_p50_ms']:.0f} / {c['latency_p99_ms']:.0f} |"
            )
    lines += ["", "| LightKV / vanilla | budget | median | min-max |", "|---|---|---:|---:|"]
    for phase, pairs in result["lightkv_over_vanilla"].items():
        for key, label in (
            ("in_flight_mean", "requests in flight"),
            ("rps", "requests/s"),
            ("tokens_per_s", "tokens/s"),
        ):
            r = pairs[key]
            lines.append(f"| {label} | {phase} | {r['median']:.2f}x | {r['min']:.2f}-{r['max']:.2f}x |")
    return "\n".join(lines)


def table(result: dict) -> str:
    return markdown(result)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a toy-size smoke run (writes nothing)")
    args = parser.parse_args()
    result = run(quick=args.quick)
    print(table(result))
    if not args.quick:  # a smoke run is never recorded as the result
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {RESULTS}", file=sys.stderr)
