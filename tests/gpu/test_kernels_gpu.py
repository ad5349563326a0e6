"""The LightKVMerge Triton kernels compiled natively on a CUDA GPU, at Qwen2.5-VL-7B size, against the reference."""

from __future__ import annotations

import pytest
import torch

from lightkv_export.method.layout import StagePlan, plan_stage
from lightkv_export.method.reference import apply_plan
from lightkv_export.method.spans import VisionSpan

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU interpreter tests cover CI)"),
]

HIDDEN = 3584  # Qwen2.5-VL-7B
ATOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # one ulp near |x| = 2..4 after a weighted mean


def qwen_plan(windows: int) -> StagePlan:
    """B = 2: a 36x36 image (1,296 tokens) in a 1,356-token row, and two 28x20 images in a shorter row."""
    spans = [[VisionSpan(20, 1296, (36, 36))], [VisionSpan(15, 560, (28, 20)), VisionSpan(600, 560, (28, 20))]]
    return plan_stage(spans, 1356, windows=windows, ratio=0.45, lengths=[1356, 1200])


@pytest.mark.parametrize("windows", [2, 4])  # windows of ~324 and ~81 tokens
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_native_kernels_match_reference(dtype: torch.dtype, windows: int) -> None:
    from plugins.lightkv.launch import lightkv_merge_triton

    gen = torch.Generator(device="cuda").manual_seed(windows)
    plan = qwen_plan(windows)
    hidden = torch.randn(2, 1356, HIDDEN, device="cuda", generator=gen).to(dtype)  # [B, S, D]
    guidance = torch.rand(2, 1356, device="cuda", generator=gen)  # [B, S]
    out, kept = lightkv_merge_triton(hidden, guidance, plan)
    ref = apply_plan(hidden, guidance, plan)
    assert torch.equal(kept, ref.kept)
    torch.testing.assert_close(out.float(), ref.hidden.float(), atol=ATOL[dtype], rtol=0)
    assert torch.count_nonzero(out[kept < 0]) == 0


def test_native_fp32_matches_reference_exactly_in_kept() -> None:
    from plugins.lightkv.launch import lightkv_merge_triton

    plan = qwen_plan(2)
    hidden = torch.randn(2, 1356, 256, device="cuda")
    guidance = torch.rand(2, 1356, device="cuda")
    out, kept = lightkv_merge_triton(hidden, guidance, plan)
    ref = apply_plan(hidden, guidance, plan)
    assert torch.equal(kept, ref.kept)
    torch.testing.assert_close(out, ref.hidden, atol=1e-5, rtol=1e-5)
