"""Run every benchmark in the repository: `python -m benchmarks [--quick] [--only NAME ...] [--list]`.

Convention for a benchmark module (add `benchmarks/bench_<something>.py`; it is discovered automatically):

* `NAME: str`: short identifier; results go to `benchmarks/results/<NAME>.json`.
* `run(quick: bool = False) -> dict`: runs the benchmark in this process and returns JSON-serialisable results
  with at least
    - `"title"`: one line saying what is compared (sizes included),
    - `"ratios"`: `{label: float}`, the headline ratios measured in this run, e.g. `{"speed-up": 7.8}`,
      ratio = baseline / ours, so higher is better for ours;
  and anything else worth keeping (raw timings, shapes, settings). `quick=True` must finish in seconds: a
  smoke test of the same code path at a reduced size, never recorded as the real result.
* Optional `MODEL = "<registry key>"`: the module builds engines of that model and its `run` takes `model=`;
  `--model KEY` (any tiny preset or model the registry loads here) runs those modules on another model.
* Optional `REQUIRES = "cuda"`: skipped, with the reason, when `torch.cuda.is_available()` is False;
  `REQUIRES = "module:<name>"`: skipped when that package is not installed (an optional benchmark dependency).
* Optional `markdown(result: dict) -> str`: the module's subsection of the performance section (docs/benchmarks.md)
  (default: a table of its ratios).

Helpers for modules: `median_ms(fn, repeats)` and `peak_rss_mib(module, factory, *args)`. The latter measures
peak resident memory in a fresh process: `module.factory(*args)` prepares the inputs and returns a zero-argument
callable; it is called once to warm up, then the kernel's high-water mark is reset (Linux: "5" to
/proc/self/clear_refs, then VmHWM from /proc/self/status) and the reported number is the peak added during a
second call over the resident size just before it. glibc is told to serve every allocation over 128 KiB with
mmap (MALLOC_MMAP_THRESHOLD_), so memory freed after the warm-up goes back to the kernel and the second call
has to fault it in again instead of silently reusing a retained heap.

Outputs: `benchmarks/results/<NAME>.json` per benchmark, `benchmarks/results/summary.json` (machine, versions,
date, every benchmark's status and ratios) and `benchmarks/results/README_SECTION.md`, the Markdown performance
section docs/benchmarks.md embeds, so the documented numbers come from this code. `--quick` writes nothing
unless `--out` is given. The exit status is 1 when any benchmark failed.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from lightkv_export import rss

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
MIB = 2**20


# ---------------------------------------------------------------------------------------------------------
# Helpers for benchmark modules
# ---------------------------------------------------------------------------------------------------------


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _peak_during(call: Callable[[], object]) -> tuple[int, str]:
    """Bytes of resident memory added at the peak of one call, and the method used."""
    gc.collect()
    if rss.reset_peak_rss():
        base = rss.rss_bytes()
        call()
        return rss.peak_rss_bytes() - base, "VmHWM after clear_refs"
    # No clear_refs (not Linux, or restricted): sample RSS from a thread every millisecond.
    base, peak, done = rss.rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss.rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        call()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], rss.rss_bytes()) - base, "RSS sampled every 1 ms"


def _child_peak(module: str, factory: str, args: list) -> None:
    call = getattr(importlib.import_module(module), factory)(*args)
    call()  # warm-up: lazy initialisation is not the op's memory
    added, method = _peak_during(call)
    print(json.dumps({"peak_mib": added / MIB, "method": method}))


def peak_rss_mib(module: str, factory: str, *args: object) -> dict:
    """{"peak_mib", "method"} for one call of `module.factory(*args)()` in a fresh process (see the docstring)."""
    code = f"from benchmarks.__main__ import _child_peak; _child_peak({module!r}, {factory!r}, {list(args)!r})"
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"peak-memory child for {module}.{factory}{args} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------
# Discovery, environment, outputs
# ---------------------------------------------------------------------------------------------------------


def discover() -> list:
    modules = []
    for path in sorted(HERE.glob("bench_*.py")):
        mod = importlib.import_module(f"benchmarks.{path.stem}")
        if not isinstance(getattr(mod, "NAME", None), str) or not callable(getattr(mod, "run", None)):
            raise SystemExit(f"{path.name}: a benchmark module needs NAME: str and run(quick=False) -> dict")
        modules.append(mod)
    return modules


def skip_reason(mod) -> str | None:
    requires = getattr(mod, "REQUIRES", None)
    if requires == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    elif isinstance(requires, str) and requires.startswith("module:"):
        module = requires.removeprefix("module:")
        if importlib.util.find_spec(module) is None:
            return f"needs the {module} package (pip install -e '.[peer]')"
    elif requires is not None:
        return f"unknown requirement {requires!r}"
    return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def write_record(out_dir: Path, name: str, result: dict, env: dict | None = None, quick: bool = False) -> Path:
    """One benchmark's result as `<out_dir>/<name>.json`, stamped with the machine it ran on."""
    record = {"benchmark": name, "quick": quick, **(env if env is not None else environment()), **result}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def environment() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpu": cpu,
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": gpu,
        },
        "versions": {
            "python": platform.python_version(),
            **{d: _version(d) for d in ("torch", "onnxruntime", "transformers", "onnx", "triton")},
        },
    }


def default_markdown(result: dict) -> str:
    lines = ["| ratio | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f}x |" for k, v in result.get("ratios", {}).items()]
    return "\n".join(lines)


def where(record: dict) -> str:
    """'date' or 'date, device' of a record measured on another machine (a GPU)."""
    device = (record.get("versions") or {}).get("device") or record.get("device")
    date = record.get("date", "?")[:10]
    return f"{date}, {device}" if device and device.startswith(("NVIDIA", "AMD Instinct")) else date


def readme_section(env: dict, entries: list[dict], modules: dict) -> str:
    m, v = env["machine"], env["versions"]
    out = [
        "## Performance",
        "",
        "<!-- generated by `python -m benchmarks`; do not edit by hand -->",
        f"Measured {env['date'][:10]} on {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads"
        + (f", {m['gpu']}" if m["gpu"] else ", no GPU")
        + f"), Python {v['python']}, torch {v['torch']}, onnxruntime {v['onnxruntime']}, "
        f"transformers {v['transformers']}. Ratios are baseline / ours, measured side by side in one run.",
    ]
    carried = [f"{e['name']} ({where(e['result'])})" for e in entries if e.get("carried_over")]
    if carried:  # --only: the others' last recorded results, so the section stays whole; say they are older
        out += ["", f"Carried over from earlier runs, not re-measured in this one: {', '.join(carried)}."]
    out += ["", "| benchmark | ratio | value |", "|---|---|---:|"]
    for e in entries:
        if e["status"] == "ok":
            out += [f"| {e['name']} | {k} | {val:.2f}x |" for k, val in e["ratios"].items()]
        else:
            out.append(f"| {e['name']} | {e['status']}: {e['reason']} | |")
    for e in entries:
        if e["status"] == "ok":
            render = getattr(modules[e["name"]], "markdown", default_markdown)
            out += ["", f"### {e['name']}: {e['title']}", "", render(e["result"])]
    return "\n".join(out) + "\n"


def print_table(entries: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="benchmarks (ratio = baseline / ours)")
    for col in ("benchmark", "status", "ratio", "value", "seconds"):
        table.add_column(col, justify="right" if col in ("value", "seconds") else "left")
    for e in entries:
        ratios = e.get("ratios") or {"-": None}
        for i, (k, val) in enumerate(ratios.items()):
            first = i == 0
            table.add_row(
                e["name"] if first else "",
                (e["status"] if e["status"] == "ok" else f"{e['status']}: {e['reason']}") if first else "",
                k,
                f"{val:.2f}x" if val is not None else "",
                f"{e['seconds']:.1f}" if first else "",
            )
    Console().print(table)


def run_one(mod, quick: bool, model: str | None = None) -> dict:
    entry = {"name": mod.NAME, "status": "ok", "reason": None, "ratios": {}, "seconds": 0.0}
    reason = skip_reason(mod)
    if reason:
        return {**entry, "status": "skipped", "reason": reason}
    t0 = time.perf_counter()
    try:
        result = mod.run(quick=quick, **({"model": model} if model and hasattr(mod, "MODEL") else {}))
        if not isinstance(result.get("ratios"), dict) or "title" not in result:
            raise TypeError(f"{mod.NAME}.run() must return a dict with 'title' and 'ratios'")
    except Exception as err:
        traceback.print_exc()
        return {**entry, "status": "failed", "reason": f"{type(err).__name__}: {err}"[:300]}
    entry["seconds"] = time.perf_counter() - t0
    return {**entry, "title": result["title"], "ratios": result["ratios"], "result": result}


def merge_previous(entries: list[dict], out_dir: Path, known: set[str]) -> list[dict]:
    """With --only, keep the other benchmarks' last recorded entries: the summary and docs/benchmarks.md stay whole."""
    # A benchmark skipped here (it needs a GPU) keeps its last record from where it could run, dated.
    entries = [e for e in entries if not (e["status"] == "skipped" and (out_dir / f"{e['name']}.json").exists())]
    ran = {e["name"] for e in entries}
    try:
        previous = json.loads((out_dir / "summary.json").read_text())["benchmarks"]
    except (OSError, ValueError, KeyError):
        previous = []
    kept = []
    for e in previous:
        if e.get("name") in ran or e.get("name") not in known:
            continue
        path = out_dir / f"{e['name']}.json"
        if path.exists():  # an ok entry, or a skipped one measured elsewhere (a GPU record)
            record = json.loads(path.read_text())  # the record is the truth: a run on its own may be newer
            e = {**e, "status": "ok", "reason": None, "title": record.get("title", e.get("title")),
                 "ratios": record.get("ratios", e.get("ratios")), "result": record, "carried_over": True}  # fmt: skip
        elif e.get("status") == "ok":  # its record is gone: nothing to show
            continue
        kept.append(e)
    # Records a benchmark wrote when run on its own (python -m benchmarks.bench_peer): not in the summary yet.
    listed = ran | {e["name"] for e in kept}
    for name in sorted(known - listed):
        path = out_dir / f"{name}.json"
        if path.exists():
            result = json.loads(path.read_text())
            entry = {"name": name, "status": "ok", "reason": None, "ratios": result["ratios"], "seconds": 0.0}
            kept.append({**entry, "title": result["title"], "result": result, "carried_over": True})
    order = sorted(known)
    return sorted(entries + kept, key=lambda e: order.index(e["name"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fast smoke run at reduced sizes (writes nothing)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--out", type=Path, help=f"results directory (default {RESULTS.relative_to(ROOT)})")
    parser.add_argument(
        "--model",
        help="for the benchmarks that build engines (their MODEL): another model key, e.g. tiny-llava",
    )
    args = parser.parse_args(argv)
    modules = {m.NAME: m for m in discover()}
    # A module that records other modes too (bench_peer --context long -> peer_long) names them in
    # EXTRA_RECORDS, so that runs of other benchmarks carry those records over into the summary and docs/benchmarks.md.
    records = {name: m for m in modules.values() for name in (m.NAME, *getattr(m, "EXTRA_RECORDS", ()))}
    if args.list:
        for name, mod in modules.items():
            print(f"{name:<24}{skip_reason(mod) or 'runs here'}")
        return 0
    unknown = set(args.only or ()) - set(modules)
    if unknown:
        print(f"error: unknown benchmark(s) {sorted(unknown)}; known: {', '.join(modules)}", file=sys.stderr)
        return 2
    selected = [m for n, m in modules.items() if not args.only or n in args.only]
    if args.model:
        from lightkv_export.errors import InputError
        from lightkv_export.models.registry import get_spec

        try:
            get_spec(args.model)
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    entries = [run_one(m, args.quick, args.model) for m in selected]
    print_table(entries)
    out_dir = args.out or (None if args.quick else RESULTS)
    if out_dir is not None:
        env = environment()
        out_dir.mkdir(parents=True, exist_ok=True)
        for e in entries:
            if e["status"] == "ok":
                write_record(out_dir, e["name"], e["result"], env, args.quick)
        entries = merge_previous(entries, out_dir, set(records))
        summary = {**env, "quick": args.quick, "benchmarks": [{k: v for k, v in e.items() if k != "result"}
                                                               for e in entries]}  # fmt: skip
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (out_dir / "README_SECTION.md").write_text(readme_section(env, entries, records))
        print(f"results -> {out_dir}")
    return 1 if any(e["status"] == "failed" for e in entries) else 0


if __name__ == "__main__":
    sys.exit(main())
