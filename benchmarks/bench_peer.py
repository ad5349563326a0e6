"""This project's ort-cpu engines against onnxruntime-genai's on the same random-weight Qwen2.5-VL checkpoint.

The peer is the model builder of onnxruntime-genai (pinned in the `peer` extra: `pip install -e '.[peer]'`),
`python -m onnxruntime_genai.models.builder -m CKPT -o DIR -p fp32 -e cpu --extra_options exclude_embeds=true`:
the text decoder with ONNX Runtime's fused CPU ops (GroupQueryAttention, MRotaryEmbedding,
SkipSimplifiedLayerNormalization), fed inputs_embeds as its multimodal pipeline feeds it. It is run here through
ONNX Runtime directly, as onnxruntime-genai's CPU generator runs it (present K/V fed back as past, no shared
buffer on CPU), so both sides get the same request: the same inputs_embeds for one image's grid of vision tokens
between text, the same M-RoPE positions, greedy decoding.

Ours: `pipeline.run` on the same checkpoint directory, vanilla and LightKV at ratio 0.55 (engines with parity
checked), run through `runtime.Engine` (prefill = the plan and the prefill graph; decode = embedding graph and
decode graph per token).

Each engine runs in a fresh worker process per round (the rounds interleaved, the order rotating): a warm-up
request, then the measured one; the worker reports prefill ms, decode ms per token over STEPS steps, and the
process's peak resident memory (VmHWM: weights, sessions, caches, arenas, the Python runtime itself).
Before timing, the peer and the vanilla engine are checked to compute the same function (last-token logits of the
prefill, greedy tokens of every worker).

Run: `python benchmarks/bench_peer.py [--quick] [--context long]` (writes benchmarks/results/peer[_long].json
unless --quick), or `python -m benchmarks --only peer`.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

if not __package__:  # run as `python benchmarks/bench_peer.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_ort_prefill import FULL, QUICK, BenchSize, build_model, make_request

NAME = "peer"
REQUIRES = "module:onnxruntime_genai"
PEER_VERSION = "0.18.0"
THREADS = 2
RATIO = 0.55
STEPS = 32
ROUNDS = 11
ENGINES = ("peer", "vanilla", "lightkv")
# About 4,000 vision tokens (a 64 x 64 grid): decode attention weighs more there.
EXTRA_RECORDS = ("peer_long",)  # --context long writes its own record
LONG = replace(FULL, grid=(64, 64), repeats=5, max_positions=16384)  # about 4,100 tokens need the room


def write_checkpoint(size: BenchSize, path: Path) -> np.ndarray:
    """The random-weight checkpoint both builders read (save_pretrained + the tiny processor); returns the token
    embedding table, which the peer's decoder (built without embeddings) is fed from."""
    from lightkv_export.models import tiny
    from lightkv_export.models.registry import get_family

    _, model = build_model(size)
    model.save_pretrained(path)
    get_family("qwen2_5_vl").tiny_processor(tiny.build_tokenizer()).save_pretrained(path)
    return model.get_input_embeddings().weight.detach().numpy().copy()  # [V, D]


def build_peer(checkpoint: Path, out: Path) -> float:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(checkpoint), "-o", str(out)]
    cmd += ["-p", "fp32", "-e", "cpu", "--extra_options", "exclude_embeds=true"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"onnxruntime-genai's builder failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0


def build_ours(checkpoint: Path, out: Path, *, vanilla: bool) -> tuple[Path, float]:
    from lightkv_export.config import BuildConfig
    from lightkv_export.pipeline import run

    t0 = time.perf_counter()
    # The engines' image profile is the tiny vision tower's default: the benchmark feeds its own embeddings.
    kw = {"vanilla": vanilla, "ratio": None if vanilla else RATIO, "image_size": (336, 448)}
    config = BuildConfig(model=str(checkpoint), out=out, **kw)
    result = run(config)
    if result.failed_targets or "ort-cpu" not in result.engine_dirs:
        raise RuntimeError(f"build failed: {result.failed_targets}")
    return result.engine_dirs["ort-cpu"], time.perf_counter() - t0


def make_engine_request(size: BenchSize):
    """The request every engine gets: random embeddings for text and one image grid, M-RoPE positions."""
    from lightkv_export import contract
    from lightkv_export.models.positions import MROPE
    from lightkv_export.runtime import Request

    feeds, spans = make_request(size)
    seq = int(feeds[contract.LENGTHS][0])
    _, offset = MROPE.host(seq, spans[0])
    ids = np.zeros((1, seq), dtype=np.int64)
    return Request(ids, feeds[contract.INPUTS_EMBEDS], feeds[contract.POSITION_IDS], int(offset), spans)


# ---------------------------------------------------------------------------------------------------------
# Workers: one engine, one fresh process
# ---------------------------------------------------------------------------------------------------------


def _kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


class PeerRequest:
    def __init__(self, path: Path) -> None:
        with np.load(path) as data:
            self.inputs_embeds, self.position_ids = data["inputs_embeds"], data["position_ids"]  # [1, S, D], [3, 1, S]
            self.decode_offset = int(data["decode_offset"])
        self.seq_len = self.inputs_embeds.shape[1]


class PeerEngine:
    """onnxruntime-genai's decoder, driven as its CPU generator drives it (past = previous present)."""

    def __init__(self, directory: Path, embeddings: Path) -> None:
        import onnxruntime as ort

        config = json.loads((directory / "genai_config.json").read_text())["model"]["decoder"]
        self.layers, self.kv_heads, self.head_dim = (
            config["num_hidden_layers"],
            config["num_key_value_heads"],
            config["head_size"],
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(directory / config["filename"]), options)
        self.table = np.load(embeddings, mmap_mode="r")  # [V, D]
        self.names = [o.name for o in self.session.get_outputs()]

    def step(self, embeds: np.ndarray, positions: np.ndarray, past: list[np.ndarray], total: int):
        feeds = {"inputs_embeds": embeds, "position_ids": positions, "attention_mask": np.ones((1, total), np.int64)}
        for i in range(self.layers):
            feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
        out = dict(zip(self.names, self.session.run(self.names, feeds), strict=True))
        presents = [out[f"present.{i}.{kv}"] for i in range(self.layers) for kv in ("key", "value")]
        return out["logits"][:, -1], presents  # logits [1, V]

    def generate(self, request, steps: int) -> tuple[list[int], float, float, np.ndarray]:
        seq = request.seq_len
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)
        t0 = time.perf_counter()
        logits, past = self.step(request.inputs_embeds, request.position_ids, [empty] * (2 * self.layers), seq)
        t1 = time.perf_counter()
        first = logits.copy()
        tokens = [int(logits.argmax())]
        for t in range(steps):
            pos = np.full((3, 1, 1), seq + request.decode_offset + t, np.int64)
            embeds = np.asarray(self.table[tokens[-1]])[None, None, :]  # [1, 1, D]
            logits, past = self.step(embeds, pos, past, seq + t + 1)
            tokens.append(int(logits.argmax()))
        t2 = time.perf_counter()
        return tokens, (t1 - t0) * 1e3, (t2 - t1) * 1e3 / steps, first


class OurEngine:
    def __init__(self, directory: Path) -> None:
        from lightkv_export.runtime import Engine

        self.engine = Engine.load(directory, full_hash=False)

    def generate(self, request, steps: int) -> tuple[list[int], float, float, np.ndarray]:
        t0 = time.perf_counter()
        pre = self.engine.prefill(request)
        t1 = time.perf_counter()
        tokens = self.engine.greedy(pre, request, steps + 1, stop_at_eos=False)  # 1 from prefill + `steps` decoded
        t2 = time.perf_counter()
        return tokens, (t1 - t0) * 1e3, (t2 - t1) * 1e3 / steps, pre.logits.copy()  # [1, V]: the last token only


def worker(kind: str, directory: Path, request_file: Path, embeddings: Path, steps: int) -> dict:
    """Load one engine, one warm-up request, then the measured one (prints its numbers as JSON)."""
    t0 = time.perf_counter()
    engine = PeerEngine(directory, embeddings) if kind == "peer" else OurEngine(directory)
    load_s = time.perf_counter() - t0
    loaded_mib = _kib("VmRSS") / 1024
    # The peer reads plain arrays: unpickling a runtime.Request would import this project into its process.
    request = (
        PeerRequest(request_file.with_suffix(".npz")) if kind == "peer" else pickle.loads(request_file.read_bytes())
    )
    engine.generate(request, steps)
    tokens, prefill_ms, decode_ms, logits = engine.generate(request, steps)
    np.save(request_file.with_name(f"logits_{kind}.npy"), logits)
    return {
        "prefill_ms": prefill_ms,
        "decode_ms_per_token": decode_ms,
        "peak_rss_mib": _kib("VmHWM") / 1024,
        "loaded_rss_mib": loaded_mib,
        "load_s": load_s,
        "tokens": tokens,
        "torch_imported": "torch" in sys.modules,
    }


def spawn(kind: str, directory: Path, work: Path, steps: int) -> dict:
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "benchmarks.bench_peer", "--worker", kind, str(directory), str(work), str(steps)]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": str(THREADS)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------------


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run(quick: bool = False, context: str = "default") -> dict:
    import onnxruntime_genai

    size = QUICK if quick else LONG if context == "long" else FULL
    rounds, steps = (2, 4) if quick else (ROUNDS if context != "long" else 5, STEPS)
    with tempfile.TemporaryDirectory(prefix="bench_peer_") as tmp:
        work = Path(tmp)
        table = write_checkpoint(size, work / "checkpoint")
        np.save(work / "embeddings.npy", table)
        build_s = {"peer": build_peer(work / "checkpoint", work / "peer")}
        dirs = {"peer": work / "peer"}
        dirs["vanilla"], build_s["vanilla"] = build_ours(work / "checkpoint", work / "engines", vanilla=True)
        dirs["lightkv"], build_s["lightkv"] = build_ours(work / "checkpoint", work / "engines", vanilla=False)
        request = make_engine_request(size)
        (work / "request.pkl").write_bytes(pickle.dumps(request))
        arrays = {"inputs_embeds": request.inputs_embeds, "position_ids": request.position_ids}
        np.savez(work / "request.npz", **arrays, decode_offset=request.decode_offset)
        results: dict[str, list[dict]] = {k: [] for k in ENGINES}
        for r in range(rounds):
            order = ENGINES[r % 3 :] + ENGINES[: r % 3]
            for kind in order:
                results[kind].append(spawn(kind, dirs[kind], work / "request.pkl", steps))
                print(f"round {r + 1}/{rounds} {kind}: {results[kind][-1]['prefill_ms']:.0f} ms prefill", flush=True)
        logits = {k: np.load(work / f"logits_{k}.npy") for k in ("peer", "vanilla")}
        manifest = json.loads((dirs["lightkv"] / "manifest.json").read_text())
        weights = {k: json.loads((dirs[k] / "manifest.json").read_text())["weight_bytes"] for k in ENGINES[1:]}
        weights["peer"] = (dirs["peer"] / "model.onnx.data").stat().st_size
    tokens = {k: results[k][0]["tokens"] for k in ENGINES}
    same = {k: all(res["tokens"] == tokens[k] for res in results[k]) for k in ENGINES}
    if not all(same.values()):
        raise AssertionError(f"an engine's greedy tokens changed between rounds: {same}")
    logit_diff = float(np.abs(logits["peer"] - logits["vanilla"]).max())
    if tokens["peer"] != tokens["vanilla"] or logit_diff > 1e-3:
        raise AssertionError(
            f"the peer and the vanilla engine compute different functions: last-token logits differ by up to "
            f"{logit_diff:.2e}; greedy tokens {tokens['peer']} (peer) vs {tokens['vanilla']} (vanilla)"
        )
    metrics = ("prefill_ms", "decode_ms_per_token", "peak_rss_mib", "loaded_rss_mib")
    table_ = {k: {m: spread([res[m] for res in results[k]]) for m in metrics} for k in ENGINES}
    med = {k: {m: table_[k][m]["median"] for m in metrics} for k in ENGINES}

    def ratio(kind: str, metric: str) -> float:  # peer / ours: above 1, ours is faster or leaner
        return med["peer"][metric] / med[kind][metric]

    seq = request.seq_len
    return {
        "title": f"ONNX Runtime CPU, random-weight Qwen2.5-VL ({size.layers} layers, D={size.hidden}, "
        f"{size.heads}/{size.kv_heads} heads, MLP {size.intermediate}), one {size.grid[0]}x{size.grid[1]} image, "
        f"S={seq}, {steps} decode steps, {THREADS} threads: onnxruntime-genai {onnxruntime_genai.__version__} vs "
        f"this project vanilla and LightKV r{RATIO}",
        "ratios": {
            f"{m} peer/{k}": ratio(k, m)
            for k in ("vanilla", "lightkv")
            for m in ("prefill_ms", "decode_ms_per_token", "peak_rss_mib")
        },
        "context": context,
        "seq": seq,
        "steps": steps,
        "rounds": rounds,
        "median": med,
        "spread": table_,
        "same_function": {"max_abs_logit_diff": logit_diff, "same_greedy_tokens": True},
        "lightkv_same_tokens_as_vanilla": tokens["lightkv"] == tokens["vanilla"],
        "schedule": manifest["schedule"],
        "weight_bytes": weights,
        "torch_imported": {k: results[k][0]["torch_imported"] for k in ENGINES},
        "build_s": build_s,
        "raw": {k: [{m: res[m] for m in metrics} for res in results[k]] for k in ENGINES},
    }


def markdown(result: dict) -> str:
    rows = [
        "| engine | prefill ms | decode ms / token | peak RSS MiB | weights held MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for k in ENGINES:
        s = result["spread"][k]
        rows.append(
            f"| {k} | {s['prefill_ms']['median']:.0f} ({s['prefill_ms']['min']:.0f}-{s['prefill_ms']['max']:.0f}) "
            f"| {s['decode_ms_per_token']['median']:.1f} ({s['decode_ms_per_token']['min']:.1f}-"
            f"{s['decode_ms_per_token']['max']:.1f}) | {s['peak_rss_mib']['median']:.0f} "
            f"| {result['weight_bytes'][k] / 2**20:.0f} |"
        )
    diff = result["same_function"]["max_abs_logit_diff"]
    rows += ["", f"Medians (min-max) over {result['rounds']} rounds; peer and vanilla: same greedy tokens, "
             f"last-token logits within {diff:.1e}. Ratios peer / ours (above 1: ours better): "
             + ", ".join(f"{k} {v:.2f}x" for k, v in result["ratios"].items())]  # fmt: skip
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.__main__ import RESULTS, write_record

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, writes nothing")
    contexts = "default: one 32x32 image (S about 1,060); long: a 64x64 grid (S about 4,140)"
    parser.add_argument("--context", choices=("default", "long"), default="default", help=contexts)
    parser.add_argument("--worker", nargs=4, metavar=("KIND", "DIR", "REQUEST", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, directory, request_file, steps = args.worker
        embeddings = Path(request_file).with_name("embeddings.npy")
        print(json.dumps(worker(kind, Path(directory), Path(request_file), embeddings, int(steps))))
        return 0
    result = run(quick=args.quick, context=args.context)
    print(result["title"])
    print(markdown(result))
    if not args.quick:
        name = NAME if args.context == "default" else f"{NAME}_{args.context}"
        print(f"results -> {write_record(RESULTS, name, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
