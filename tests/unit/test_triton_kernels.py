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
from lightkv_export.method.spans import VisionSpan  # noqa: E402
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


GUARD = 256  # elements of guard on each side of every buffer: more than any near miss below can reach


def guarded(shape: tuple[int, ...], dtype: torch.dtype, fill, guard_fill) -> tuple[torch.Tensor, torch.Tensor]:
    """(whole buffer, the view a kernel gets): GUARD elements of `guard_fill` on each side of the view."""
    n = 1
    for s in shape:
        n *= s
    buf = torch.full((GUARD + n + GUARD,), guard_fill, dtype=dtype)
    buf[GUARD : GUARD + n] = fill.reshape(-1) if isinstance(fill, torch.Tensor) else fill
    return buf, buf[GUARD : GUARD + n].view(shape)


def guards_intact(buf: torch.Tensor, guard_fill) -> bool:
    edges = torch.cat([buf[:GUARD], buf[-GUARD:]])
    return bool(torch.isnan(edges).all()) if guard_fill != guard_fill else bool((edges == guard_fill).all())


def garbage_launch(seed: int, float_guard: float, int_guard: int, inside: int = 0) -> dict[str, torch.Tensor]:
    """The three kernels on made-up inputs, as TensorRT times tactics: indices, slots, codes, lengths and S' just
    outside every range as well as inside (near misses, so that an unchecked one lands in a guard). Floats read
    from a guard would change the outputs when the guards' contents change (the test runs it with two fillings);
    anything written to a guard changes that guard. `inside`: what the output buffers hold before the launch (in
    TensorRT they are uninitialised). Returns the outputs (the buffers' insides)."""
    from plugins.lightkv import kernels

    c = INTERPRET_CONFIG
    g = torch.Generator().manual_seed(seed)
    bsz, seq, dim, n_win, n_max = 2, 24, 16, 5, 9
    n, na, nb = bsz * seq, (n_max + 1) // 2, n_max // 2
    nan = float_guard

    def ints(shape, low, high, dtype=torch.int64):
        return torch.randint(low, high, shape, generator=g, dtype=torch.int64).to(dtype)

    def near(shape, valid, dtype=torch.int64, miss=3):  # values in [-miss, valid + miss)
        return ints(shape, -miss, valid + miss, dtype)

    hidden_buf, hidden = guarded((n, dim), torch.float32, torch.randn(n, dim, generator=g), nan)
    xi_buf, xi = guarded((n,), torch.float32, torch.rand(n, generator=g), nan)
    inputs = {
        "win_index": guarded((n_win, n_max), torch.int64, near((n_win, n_max), n), int_guard),
        "win_r": guarded((n_win,), torch.int64, near((n_win,), na), int_guard),
        "lengths": guarded((bsz,), torch.int64, near((bsz,), seq), int_guard),
        "partner": guarded((n_win, na), torch.int32, near((n_win, na), nb, torch.int32), int_guard),
    }
    (win_index_buf, win_index), (_, win_r), (_, lengths), (partner_in_buf, partner_in) = inputs.values()
    best_buf, best = guarded((n_win, na), torch.float32, float(inside), nan)
    partner_buf, partner = guarded((n_win, na), torch.int32, inside, -7)
    kernels.match_kernel[(n_win, triton_cdiv(na, c.match_a))](
        hidden, win_index, n_max, dim, n, best, partner,
        BLOCK_A=c.match_a, BLOCK_B=c.match_b, BLOCK_D=c.match_d, IEEE=True,
    )  # fmt: skip
    # Plan runs on garbage best/partner too (TensorRT times it alone, on inputs of its own making), with a host
    # S' (out_slots' dimension) that need not match the lengths: anything in [1, 3 S].
    out_seq = int(ints((1,), 1, 3 * seq + 1))
    slots_buf, slots = guarded((out_seq,), torch.int64, near((out_seq,), seq), int_guard)  # unread
    kept_buf, kept = guarded((bsz * out_seq,), torch.int64, inside, -7)
    dest_buf, dest = guarded((n,), torch.int32, inside, -7)
    assign_buf, assign = guarded((n_win, na), torch.int32, inside, -7)
    garbage_best = torch.randn(n_win, na, generator=g)
    kernels.plan_kernel[(bsz,)](
        xi, win_index, win_r, lengths, slots, garbage_best, partner_in, n_win, n_max, seq, bsz, out_seq,
        kept, dest, assign, BLOCK_S=c.plan_s, BLOCK_R=c.plan_r, BLOCK_J=c.plan_j,
    )  # fmt: skip
    # Emit on garbage kept / dest / assign and the same host S'.
    kept_g_buf, kept_g = guarded((bsz, out_seq), torch.int64, near((bsz, out_seq), seq), int_guard)
    dest_g_buf, dest_g = guarded(
        (n,), torch.int32, near((n,), 2 * out_seq, torch.int32, miss=6), int_guard
    )  # 2p + touched
    assign_g_buf, assign_g = guarded((n_win, na), torch.int32, near((n_win, na), nb, torch.int32), int_guard)
    out_buf, out = guarded((bsz, out_seq, dim), torch.float32, 0.0, nan)
    tiles = bsz * triton_cdiv(out_seq, c.emit_s) + n_win * triton_cdiv(nb, c.emit_b)
    kernels.emit_kernel[(tiles, triton_cdiv(dim, c.emit_d))](
        hidden, xi, win_index, kept_g, dest_g, assign_g, n_max, seq, bsz, out_seq, dim, out,
        BLOCK_S=c.emit_s, BLOCK_B=c.emit_b, BLOCK_A=c.emit_a, BLOCK_D=c.emit_d,
    )  # fmt: skip
    float_bufs = {"hidden": hidden_buf, "guidance": xi_buf, "best": best_buf, "out": out_buf}
    int_bufs = {"win_index": win_index_buf, "partner_in": partner_in_buf, "partner": partner_buf, "kept": kept_buf,
                "out_slots": slots_buf, "dest": dest_buf, "assign": assign_buf, "kept_g": kept_g_buf,
                "dest_g": dest_g_buf, "assign_g": assign_g_buf}  # fmt: skip
    for name, buf in float_bufs.items():
        assert guards_intact(buf, nan), f"{name}: a guard was written"
    for name, buf in int_bufs.items():
        outputs = ("partner", "kept", "dest", "assign")
        assert guards_intact(buf, -7 if name in outputs else int_guard), f"{name}: a guard was written"
    return {name: buf[GUARD:-GUARD].clone() for name, buf in {**float_bufs, **int_bufs}.items()}


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@interpreted
@pytest.mark.parametrize("seed", range(4))
def test_garbage_plans_stay_inside_the_buffers_and_are_deterministic(seed: int) -> None:
    """Nothing outside the buffers is written (guards intact) or read (other guard contents, same outputs), and the
    same garbage gives the same bytes. Match and Plan write every element of their outputs (buffers that start with
    other contents give the same bytes); Emit on such a plan need not (kernels.py says when)."""
    first = garbage_launch(seed, float("nan"), 6)
    other_guards = garbage_launch(seed, 1e3, -5)
    again = garbage_launch(seed, float("nan"), 6)
    other_insides = garbage_launch(seed, float("nan"), 6, inside=77)
    for name in first:
        assert torch.equal(first[name], again[name]), f"{name}: not deterministic"
        assert torch.equal(first[name], other_guards[name]), f"{name}: depends on memory outside the buffers"
    for name in ("best", "partner", "kept", "dest", "assign"):
        assert torch.equal(first[name], other_insides[name]), f"{name}: not every element is written"
