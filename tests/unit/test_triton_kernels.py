"""The LightKVMerge Triton kernels under TRITON_INTERPRET=1 (CPU tensors) against the PyTorch reference.

Identical `kept` and hidden within the dtype's tolerance, over seeded random layouts: uneven windows, several images
per row, B > 1 with different lengths, skipped images, ratio 0, exact ties and zero guidance. Small D and few windows
keep the interpreter fast; the small interpreter block sizes still run every tiling loop more than once.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

# The interpreter must be on before triton is imported: triton.language's own helpers (tl.sum, tl.cdiv) are jitted
# at import. If another test module imported triton first (test_kernel_aot does), this module re-runs itself in a
# fresh interpreter-mode process instead (test_in_fresh_process), and the tests below skip in this one.
NEEDS_FRESH_PROCESS = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402  (after TRITON_INTERPRET, on purpose)
import torch  # noqa: E402

from lightkv_export.errors import InputError  # noqa: E402
from lightkv_export.method.layout import StagePlan, plan_stage  # noqa: E402
from lightkv_export.method.reference import apply_plan  # noqa: E402
from lightkv_export.models.base import VisionSpan  # noqa: E402
from plugins.lightkv.launch import INTERPRET_CONFIG, lightkv_merge_triton  # noqa: E402

interpreted = pytest.mark.skipif(NEEDS_FRESH_PROCESS, reason="triton was imported in compiled mode; see below")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 3e-2}  # one ulp of |x| < 4 at most


def random_layout(rng: random.Random) -> tuple[list[list[VisionSpan]], list[int], int, int, float]:
    """Rows with 0..2 images of random (uneven) grids, right padding; returns (spans, lengths, seq, windows, ratio)."""
    windows = rng.choice([1, 2, 3])
    rows, lengths = [], []
    for _ in range(rng.randint(1, 3)):
        pos, row = rng.randint(0, 4), []
        for _ in range(rng.randint(0, 2)):
            h, w = rng.randint(2, 9), rng.randint(3, 11)
            n = h * w - (rng.randint(0, w - 1) if rng.random() < 0.3 else 0)  # sometimes a partial last row
            row.append(VisionSpan(pos, n, (h, w)))
            pos += n + rng.randint(0, 5)
        rows.append(row)
        lengths.append(pos + rng.randint(0, 4))
    seq = max(lengths) + rng.randint(0, 3)
    return rows, lengths, seq, windows, rng.choice([0.1, 0.25, 0.4, 0.5])


def check(hidden: torch.Tensor, guidance: torch.Tensor, plan: StagePlan) -> None:
    out, kept = lightkv_merge_triton(hidden, guidance, plan, INTERPRET_CONFIG)
    ref = apply_plan(hidden, guidance, plan)
    assert torch.equal(kept, ref.kept)
    assert out.dtype == hidden.dtype and out.shape == ref.hidden.shape
    torch.testing.assert_close(out.float(), ref.hidden.float(), atol=ATOL[hidden.dtype], rtol=0)
    padding = kept < 0
    assert torch.count_nonzero(out[padding]) == 0  # zeros at padding, not left-over memory


@pytest.mark.skipif(not NEEDS_FRESH_PROCESS, reason="triton runs in interpreter mode in this process already")
def test_in_fresh_process() -> None:
    root = Path(__file__).resolve().parents[2]
    env = os.environ | {"TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve())]
    run = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    last = run.stdout.strip().splitlines()[-1]
    assert " passed" in last and ("skipped" not in last or "1 skipped" in last), last  # only the wrapper skips


@interpreted
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_layouts_match_reference(seed: int, dtype: torch.dtype) -> None:
    rng = random.Random(1000 * seed + DTYPES.index(dtype))
    spans, lengths, seq, windows, ratio = random_layout(rng)
    plan = plan_stage(spans, seq, windows=windows, ratio=ratio, lengths=lengths)
    gen = torch.Generator().manual_seed(seed)
    dim = rng.choice([8, 20, 40])
    hidden = torch.randn(len(spans), seq, dim, generator=gen).to(dtype)  # [B, S, D]
    guidance = torch.rand(len(spans), seq, generator=gen)  # [B, S]
    check(hidden, guidance, plan)


def qwen_like_plan(ratio: float = 0.5) -> StagePlan:
    """Two rows of different lengths; uneven 2x2 windows on 7x9 grids; the 30-token image (< 8 * 2^2) is skipped."""
    spans = [[VisionSpan(2, 63, (7, 9)), VisionSpan(70, 30, (6, 5))], [VisionSpan(4, 63, (7, 9))]]
    return plan_stage(spans, 104, windows=2, ratio=ratio, lengths=[104, 80])


@interpreted
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merges_across_windows_rows_and_dtypes(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(7)
    plan = qwen_like_plan()
    assert plan.win_index.shape[0] == 8 and plan.skipped == ((False, True), (False,))  # 2 merged images x 4 windows
    assert len(set(plan.out_lengths)) == 2
    check(torch.randn(2, 104, 24, generator=gen).to(dtype), torch.rand(2, 104, generator=gen), plan)


@interpreted
def test_ties_pick_lowest_slots() -> None:
    """Identical tokens: every similarity ties, so both tie rules (lowest B slot, lower A slot first) decide."""
    plan = qwen_like_plan(0.3)
    hidden = torch.ones(2, 104, 16)  # [B, S, D]
    hidden[:, ::3] = 2.0  # parallel vectors: cosine 1 everywhere, magnitudes differ so the merge is visible
    check(hidden, torch.rand(2, 104, generator=torch.Generator().manual_seed(1)), plan)


@interpreted
def test_zero_guidance_takes_plain_mean() -> None:
    plan = qwen_like_plan()
    gen = torch.Generator().manual_seed(3)
    check(torch.randn(2, 104, 16, generator=gen), torch.zeros(2, 104), plan)


@interpreted
def test_skipped_and_ratio_zero_stages_only_compact() -> None:
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 50, 16, generator=gen)  # [B, S, D]
    guidance = torch.rand(2, 50, generator=gen)
    small = [[VisionSpan(3, 20, (4, 5))], [VisionSpan(1, 12, (3, 4))]]  # < 8 * 2^2 tokens: skipped
    skipped = plan_stage(small, 50, windows=2, ratio=0.5, lengths=[50, 33])
    assert skipped.win_index.size == 0 and all(all(s) for s in skipped.skipped)
    check(hidden, guidance, skipped)
    ratio0 = plan_stage([[VisionSpan(3, 40, (5, 8))], []], 50, windows=1, ratio=0.0, lengths=[45, 50])
    check(hidden, guidance, ratio0)


@interpreted
def test_mismatched_inputs_are_input_errors() -> None:
    plan = qwen_like_plan()
    with pytest.raises(InputError, match="does not match the plan"):
        lightkv_merge_triton(torch.zeros(1, 104, 8), torch.zeros(1, 104), plan)
    with pytest.raises(InputError, match="dtype"):
        lightkv_merge_triton(torch.zeros(2, 104, 8, dtype=torch.float64), torch.zeros(2, 104), plan)
