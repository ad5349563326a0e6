"""Ahead-of-time compilation of the LightKVMerge kernels for every GPU target, on a machine with no GPU."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lightkv_export.errors import InputError
from plugins.lightkv import aot


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[aot.KernelArtifact]]:
    """fp16 for all six targets (every kernel), plus fp32 and bf16 for sm90: the dtype paths differ in the dot."""
    out = tmp_path_factory.mktemp("aot")
    arts = aot.build(out, list(aot.TARGETS), ["fp16"])
    arts += aot.build(out / "dtypes", ["sm90"], ["fp32", "bf16"])
    return out, arts


def test_every_target_gets_ptx_and_cubin_for_every_kernel(built: tuple[Path, list[aot.KernelArtifact]]) -> None:
    out, arts = built
    for target, cc in aot.TARGETS.items():
        for kernel in aot.KERNELS:
            ptx = (out / target / f"{kernel}_fp16.ptx").read_text()
            assert re.search(rf"\.target sm_{cc}a?\b", ptx), f"{target} {kernel}: wrong PTX target"
            assert f".entry {kernel}_kernel(" in ptx
            cubin = (out / target / f"{kernel}_fp16.cubin").read_bytes()
            assert cubin[:4] == b"\x7fELF"
    assert {(a.kernel, a.dtype) for a in arts if a.target == "sm90"} >= {
        (k, d) for k in aot.KERNELS for d in aot.DTYPES
    }


def test_summary_reports_resources_and_the_plugin_abi(built: tuple[Path, list[aot.KernelArtifact]]) -> None:
    out, _ = built
    summary = json.loads((out / "summary.json").read_text())
    assert summary["triton_version"] and len(summary["kernels"]) == 3 * len(aot.TARGETS)
    n_params = {"match": 7, "plan": 15, "emit": 12}  # inputs + int32 scalars + outputs: nothing else
    for k in summary["kernels"]:
        assert 0 < k["registers"] <= 255 and k["stack_bytes"] >= 0
        assert 0 <= k["shared_bytes"] <= 100 * 1024  # fits sm86 / sm89 / sm120, the smallest shared memory here
        assert k["block_x"] in (128, 256) and k["params"] == n_params[k["kernel"]]
    ptx = (out / "sm90" / "plan_fp16.ptx").read_text()
    assert "plan_kernel_param_15" not in ptx.split("{")[0]  # Triton's scratch pointers are gone from the entry


def test_ptx_uses_the_lowest_isa_each_target_allows(built: tuple[Path, list[aot.KernelArtifact]]) -> None:
    """The driver JIT-compiles the engine's PTX: Triton's default (the newest ISA its ptxas knows) would need a
    newer driver than the target requires."""
    out, arts = built
    summary = json.loads((out / "summary.json").read_text())
    for target, isa in aot.PTX_VERSIONS.items():
        version = f"{isa // 10}.{isa % 10}"
        assert summary["targets"][target] == {"ptx_version": version, "min_driver": aot.MIN_DRIVERS[target]}
        ptx = (out / target / "match_fp16.ptx").read_text()
        assert re.search(rf"^\.version {re.escape(version)}$", ptx, re.M), f"{target}: {aot.ptx_isa(ptx)}"
    assert {a.ptx_version for a in arts if a.target == "sm90"} == {"8.0"}
    assert max(aot.PTX_VERSIONS.values()) < 90  # no target needs the CUDA 13 ISA


def test_defaults_do_not_spill_the_matching_kernel(built: tuple[Path, list[aot.KernelArtifact]]) -> None:
    _, arts = built
    assert all(a.stack_bytes == 0 for a in arts if a.kernel in ("match", "plan")), [a.summary() for a in arts]


def test_plugin_ptx_refuses_kernels_that_use_scratch() -> None:
    class Meta:
        global_scratch_size = 64
        profile_scratch_size = 0

    ptx = ".entry k(\n\t.param .u64 k_param_0,\n\t.param .u64 k_param_1,\n\t.param .u64 k_param_2\n)\n{ ret; }"
    with pytest.raises(RuntimeError, match="scratch"):
        aot.plugin_ptx(ptx, "k", Meta())
    Meta.global_scratch_size = 0
    stripped, n = aot.plugin_ptx(ptx, "k", Meta())
    assert n == 1 and "k_param_1" not in stripped and "k_param_0" in stripped


def test_cli_and_unknown_names(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert aot.main(["--out", str(tmp_path), "--target", "sm86", "--dtype", "bf16"]) == 0
    # Exactly what was asked for: one target, one dtype, every kernel (PTX and cubin), and the summary.
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert written == sorted(
        ["summary.json", *(f"sm86/{k}_bf16.{ext}" for k in aot.KERNELS for ext in ("ptx", "cubin"))]
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(k["kernel"], k["target"], k["dtype"]) for k in summary["kernels"]] == [
        (k, "sm86", "bf16") for k in aot.KERNELS
    ]
    assert summary["targets"] == {"sm86": {"ptx_version": "7.8", "min_driver": aot.MIN_DRIVERS["sm86"]}}
    for kernel in aot.KERNELS:
        assert re.search(r"\.target sm_86\b", (tmp_path / "sm86" / f"{kernel}_bf16.ptx").read_text()), kernel
        assert (tmp_path / "sm86" / f"{kernel}_bf16.cubin").read_bytes()[:4] == b"\x7fELF"
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in printed[:-1]] == [["sm86", k, "bf16"] for k in aot.KERNELS]
    assert printed[-1] == f"wrote 3 kernels and {tmp_path / 'summary.json'}"
    with pytest.raises(InputError, match="sm75"):
        aot.parse_target("sm75")
    with pytest.raises(InputError, match="fp64"):
        aot.kernel_specs("fp64")
