"""Ahead-of-time compilation of the LightKVMerge kernels for every supported GPU target, with no GPU present.

    python -m plugins.lightkv.aot --out DIR --target sm90 [--target sm80 ...] [--dtype fp16 ...]

For each (kernel, hidden dtype, target) it writes DIR/<target>/<kernel>_<dtype>.ptx and .cubin, and DIR/summary.json
with the PTX entry name, launch block size, shared memory and the registers / stack per thread that the bundled
cuobjdump reports for the cubin (stack > 0 means spills), and per target the PTX ISA version and the oldest driver
that JIT-compiles it (PTX_VERSIONS, MIN_DRIVERS). triton.compile with an explicit GPUTarget needs no driver;
Triton ships ptxas and cuobjdump in its nvidia backend.

The PTX is what the TensorRT AOT plugin embeds. Triton 3.9 appends two pointer parameters to every entry (global and
profile scratch); TensorRT passes only (inputs, extra scalars, outputs), so `plugin_ptx` drops them when the kernel
uses no scratch (checked), and refuses otherwise.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

from lightkv_export.errors import InputError
from plugins.lightkv import kernels
from plugins.lightkv.launch import DEFAULT_CONFIG, KernelConfig

TARGETS: dict[str, int] = {"sm80": 80, "sm86": 86, "sm89": 89, "sm90": 90, "sm100": 100, "sm120": 120}
# The PTX ISA each target is compiled to, the lowest that works: the TensorRT plugin embeds PTX that the driver
# JIT-compiles when the engine loads, and a driver rejects a newer ISA than its own. Left alone, Triton 3.9 writes
# the newest ISA its bundled ptxas knows (9.x from CUDA 13 for sm >= 90). Floors: Triton's code generation needs 7.8
# (cta-scoped memory ops); sm_90a needs 8.0, sm_100a 8.6, sm_120a 8.7.
PTX_VERSIONS: dict[str, int] = {"sm80": 78, "sm86": 78, "sm89": 78, "sm90": 80, "sm100": 86, "sm120": 87}
# The oldest Linux driver that JIT-compiles that ISA: CUDA 11.8 GA, 12.0 GA, 12.8 GA (12.7, whose ISA is 8.6, was
# never released; sm100 and sm120 GPUs need r570 anyway).
MIN_DRIVERS: dict[str, str] = {
    "sm80": "520.61.05",
    "sm86": "520.61.05",
    "sm89": "520.61.05",
    "sm90": "525.60.13",
    "sm100": "570.26",
    "sm120": "570.26",
}
DTYPES: dict[str, str] = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}  # our name -> Triton signature type
KERNELS = ("match", "plan", "emit")


@dataclass(frozen=True)
class KernelSpec:
    """One kernel instance: the Triton function, its argument signature, constexprs and compile options."""

    kernel: str
    dtype: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class KernelArtifact:
    """What one compilation produced and what a launcher needs to run it."""

    kernel: str
    dtype: str
    target: str
    entry: str  # PTX / cubin entry name
    block_x: int  # threads per block
    shared_bytes: int
    registers: int
    stack_bytes: int
    params: int  # PTX entry parameters after dropping Triton's scratch pointers
    ptx_version: str  # PTX ISA, e.g. "8.0"; the driver must be at least MIN_DRIVERS[target]
    ptx: str
    cubin: bytes

    def summary(self) -> dict[str, Any]:
        info = asdict(self)
        del info["ptx"], info["cubin"]
        return info


def _jit(fn: Any) -> JITFunction:
    """A compilable JITFunction even when TRITON_INTERPRET=1 decorated the kernel as an interpreted function."""
    return fn if isinstance(fn, JITFunction) else JITFunction(fn.fn)


def kernel_specs(dtype: str, config: KernelConfig = DEFAULT_CONFIG) -> dict[str, KernelSpec]:
    """The three kernels for hidden dtype `dtype` (fp32 / fp16 / bf16), argument order as kernels.py declares it."""
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r} is unknown; expected one of {', '.join(DTYPES)}.")
    h, c = f"*{DTYPES[dtype]}", config
    match = {"hidden_ptr": h, "win_index_ptr": "*i64", "n_max": "i32", "dim": "i32", "n_tokens": "i32"}
    match |= {"best_ptr": "*fp32", "partner_ptr": "*i32"}
    plan = {
        "guidance_ptr": "*fp32",
        "win_index_ptr": "*i64",
        "win_r_ptr": "*i64",
        "lengths_ptr": "*i64",
        "out_slots_ptr": "*i64",
    }
    plan |= {"best_ptr": "*fp32", "partner_ptr": "*i32"}
    plan |= {name: "i32" for name in ("n_win", "n_max", "seq", "batch", "out_seq")}  # S': out_slots' dimension
    plan |= {"kept_ptr": "*i64", "dest_ptr": "*i32", "assign_ptr": "*i32"}
    emit = {"hidden_ptr": h, "guidance_ptr": "*fp32", "win_index_ptr": "*i64", "kept_ptr": "*i64"}
    emit |= {"dest_ptr": "*i32", "assign_ptr": "*i32"}
    emit |= {name: "i32" for name in ("n_max", "seq", "batch", "out_seq", "dim")}
    emit |= {"out_ptr": h}
    match_c = {"BLOCK_A": c.match_a, "BLOCK_B": c.match_b, "BLOCK_D": c.match_d, "IEEE": dtype == "fp32"}
    plan_c = {"BLOCK_S": c.plan_s, "BLOCK_R": c.plan_r, "BLOCK_J": c.plan_j}
    emit_c = {"BLOCK_S": c.emit_s, "BLOCK_B": c.emit_b, "BLOCK_A": c.emit_a, "BLOCK_D": c.emit_d}
    specs = [
        KernelSpec("match", dtype, kernels.match_kernel, match, match_c, c.match_warps, c.num_stages),
        KernelSpec("plan", dtype, kernels.plan_kernel, plan, plan_c, c.num_warps, c.num_stages),
        KernelSpec("emit", dtype, kernels.emit_kernel, emit, emit_c, c.num_warps, c.num_stages),
    ]
    return {s.kernel: s for s in specs}


def parse_target(name: str) -> int:
    """'sm90' -> 90 (compute capability as Triton's GPUTarget wants it)."""
    if name not in TARGETS:
        raise InputError(f"GPU target {name!r} is unknown; expected one of {', '.join(TARGETS)}.")
    return TARGETS[name]


def _nvidia_tool(name: str) -> Path:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not tool.exists():
        raise FileNotFoundError(f"{tool} is missing: this Triton wheel does not bundle the CUDA tools.")
    return tool


def resource_usage(cubin: bytes, entry: str, workdir: Path) -> tuple[int, int]:
    """(registers, stack bytes) per thread of `entry`, from the bundled cuobjdump."""
    path = workdir / f"{entry}.cubin"
    path.write_bytes(cubin)
    text = subprocess.run(
        [str(_nvidia_tool("cuobjdump")), "--dump-resource-usage", str(path)], check=True, capture_output=True, text=True
    ).stdout
    found = re.search(rf"Function {re.escape(entry)}:\s*REG:(\d+)\s+STACK:(\d+)", text)
    if not found:
        raise RuntimeError(f"cuobjdump reported no resource usage for {entry}:\n{text}")
    return int(found.group(1)), int(found.group(2))


def plugin_ptx(ptx: str, entry: str, metadata: Any) -> tuple[str, int]:
    """Drop Triton's trailing scratch parameters from the entry; returns (ptx, parameter count)."""
    head = re.search(rf"\.entry {re.escape(entry)}\((.*?)\)", ptx, re.S)
    if head is None:
        raise RuntimeError(f"no .entry {entry} in the PTX")
    params = [p.strip() for p in head.group(1).split(",") if p.strip()]
    names = [p.split()[-1] for p in params]
    uses_scratch = metadata.global_scratch_size or metadata.profile_scratch_size
    body = ptx[head.end() :]
    # Triton's own parameters come first; the scratch pointers are the last two and must be unused.
    if uses_scratch or len(params) < 2 or any(re.search(rf"\b{n}\b", body) for n in names[-2:]):
        raise RuntimeError(f"{entry} uses Triton's scratch memory; the TensorRT AOT ABI cannot pass it")
    kept = ",\n\t".join(params[:-2])
    return ptx[: head.start(1)] + "\n\t" + kept + "\n" + ptx[head.end(1) :], len(params) - 2


def ptx_isa(ptx: str) -> str:
    """The `.version` of a PTX module, e.g. "7.8"."""
    found = re.search(r"^\.version (\d+\.\d+)", ptx, re.M)
    if found is None:
        raise RuntimeError("the PTX has no .version line")
    return found.group(1)


def compile_kernel(spec: KernelSpec, target: str, workdir: Path) -> KernelArtifact:
    """Compile one kernel for one target (no GPU needed)."""
    source = triton.compiler.ASTSource(fn=_jit(spec.fn), signature=spec.signature | dict.fromkeys(spec.constexprs,
                                       "constexpr"), constexprs=spec.constexprs)  # fmt: skip
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages, "enable_fp_fusion": True}
    options["ptx_version"] = PTX_VERSIONS[target]
    compiled = triton.compile(source, target=GPUTarget("cuda", parse_target(target), 32), options=options)
    meta = compiled.metadata
    ptx, n_params = plugin_ptx(compiled.asm["ptx"], meta.name, meta)
    registers, stack = resource_usage(compiled.asm["cubin"], meta.name, workdir)
    return KernelArtifact(
        kernel=spec.kernel,
        dtype=spec.dtype,
        target=target,
        entry=meta.name,
        block_x=meta.num_warps * 32,
        shared_bytes=meta.shared,
        registers=registers,
        stack_bytes=stack,
        params=n_params,
        ptx_version=ptx_isa(ptx),
        ptx=ptx,
        cubin=compiled.asm["cubin"],
    )


def build(
    out_dir: Path, targets: list[str], dtypes: list[str], config: KernelConfig = DEFAULT_CONFIG
) -> list[KernelArtifact]:
    """Compile every kernel for every (target, dtype); write PTX, cubin and summary.json under out_dir."""
    for t in targets:
        parse_target(t)
    out_dir.mkdir(parents=True, exist_ok=True)
    artifacts = []
    for target in targets:
        (out_dir / target).mkdir(exist_ok=True)
        for dtype in dtypes:
            for spec in kernel_specs(dtype, config).values():
                art = compile_kernel(spec, target, out_dir / target)
                stem = out_dir / target / f"{spec.kernel}_{dtype}"
                stem.with_suffix(".ptx").write_text(art.ptx)
                stem.with_suffix(".cubin").write_bytes(art.cubin)
                (out_dir / target / f"{art.entry}.cubin").unlink(missing_ok=True)  # cuobjdump's scratch copy
                artifacts.append(art)
    summary = {
        "triton_version": triton.__version__,
        "config": asdict(config),
        "targets": {
            t: {"ptx_version": f"{PTX_VERSIONS[t] // 10}.{PTX_VERSIONS[t] % 10}", "min_driver": MIN_DRIVERS[t]}
            for t in targets
        },
        "kernels": [a.summary() for a in artifacts],
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return artifacts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m plugins.lightkv.aot", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--target", action="append", choices=list(TARGETS), help="GPU target (repeatable; default all)")
    parser.add_argument("--dtype", action="append", choices=list(DTYPES), help="hidden dtype (repeatable; default all)")
    args = parser.parse_args(argv)
    artifacts = build(args.out, args.target or list(TARGETS), args.dtype or list(DTYPES))
    for a in artifacts:
        print(
            f"{a.target:6} {a.kernel:6} {a.dtype:5} regs {a.registers:3} stack {a.stack_bytes:4} smem {a.shared_bytes}"
        )
    print(f"wrote {len(artifacts)} kernels and {args.out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
