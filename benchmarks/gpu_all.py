"""The whole GPU evidence in one device call: the GPU tests, the kernel benchmark, then the prefill benchmark.

    python -m benchmarks.gpu_all                       # on the lent GPU: everything under $OUT (84 s on an H200)
    python -m benchmarks.gpu_all --tiny --device cpu   # the same steps at toy size, on the CPU (CI, seconds)

In order, each a subprocess with its own time limit (the whole run stays within BUDGET_S on an H200):
  1. pytest tests/gpu            the kernels against the reference, fp32 / fp16 / bf16, the compiled bf16 tl.dot path
  2. benchmarks.bench_kernels_gpu distance of the kernels to the memory-bound floor
  3. benchmarks.bench_prefill_gpu time to first token, decode, memory at Qwen2.5-VL-7B size
Everything goes under --out (default $OUT, else benchmarks/results/gpu-<date>/): each step's log and JSON, and
gpu_all.json with the device name, driver, versions, and every step's exit code and seconds. A step that fails does
not stop the next one. It needs only what the device has (torch, triton, transformers; no network, no install):
run it from the repository root. The CPU mode runs step 1 (the GPU tests skip with their reason), skips step 2
(it times CUDA kernels) and runs step 3 with --tiny --device cpu.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 480  # 8 minutes for the three steps on an H200
LIMITS_S = {"tests_gpu": 150, "kernels_gpu": 90, "prefill_gpu": 300}


def steps(out: Path, tiny: bool, device: str) -> list[tuple[str, list[str] | None, str]]:
    """(name, command or None when skipped, why skipped)."""
    py = sys.executable
    tests = [py, "-m", "pytest", "tests/gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={out / 'tests_gpu.xml'}"]
    kernels = [py, "-m", "benchmarks.bench_kernels_gpu", "--out", str(out / "kernels_gpu.json")]
    prefill = [py, "-m", "benchmarks.bench_prefill_gpu", "--out", str(out)]
    if tiny:
        prefill += ["--tiny", "--device", device]
    gpu = device.startswith("cuda")
    return [
        ("tests_gpu", tests, ""),
        ("kernels_gpu", kernels if gpu else None, "times CUDA kernels: no GPU in this mode"),
        ("prefill_gpu", prefill, ""),
    ]


def device_info() -> dict:
    """The GPU (nvidia-smi) and the versions this run used."""
    info: dict = {"python": platform.python_version(), "platform": platform.platform()}
    smi = shutil.which("nvidia-smi")
    if smi:
        query = "--query-gpu=name,driver_version,memory.total,compute_cap"
        done = subprocess.run([smi, query, "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = done.stdout.strip() or done.stderr.strip()
    try:  # the benchmarks' environment record: machine and package versions
        from benchmarks.__main__ import environment

        env = environment()
        info |= {**env["versions"], "machine": env["machine"], "device": env["machine"]["gpu"]}
    except Exception as e:  # torch missing or broken on that machine: recorded, not fatal
        info["environment"] = f"not readable ({type(e).__name__}: {e})"
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_all", description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy sizes (the CPU check of this script)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny)")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default $OUT)")
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.tiny:
        parser.error("--device cpu runs only with --tiny")
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    out = (args.out or Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results" / f"gpu-{day}")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(":"))
    if not args.device.startswith("cuda"):
        env["TRITON_INTERPRET"] = "1"
    record = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "tiny": args.tiny, "info": device_info()}
    print(f"gpu_all: {record['info'].get('device') or args.device} -> {out}", flush=True)
    t_all, results = time.perf_counter(), []
    for name, cmd, why in steps(out, args.tiny, args.device):
        if cmd is None:
            results.append({"step": name, "status": "skipped", "reason": why})
            print(f"  {name:12} skipped: {why}", flush=True)
            continue
        t0 = time.perf_counter()
        with open(out / f"{name}.log", "w") as log:
            try:
                rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=LIMITS_S[name]).returncode  # fmt: skip
            except subprocess.TimeoutExpired:
                rc = 124
        seconds = round(time.perf_counter() - t0, 1)
        status = "ok" if rc == 0 else ("timed out" if rc == 124 else "failed")
        results.append({"step": name, "status": status, "rc": rc, "seconds": seconds})
        print(f"  {name:12} {status} ({seconds} s)", flush=True)
    record["steps"] = results
    record["seconds"] = round(time.perf_counter() - t_all, 1)
    (out / "gpu_all.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"gpu_all: {record['seconds']} s in all; {out / 'gpu_all.json'}", flush=True)
    return 0 if all(r["status"] in ("ok", "skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
