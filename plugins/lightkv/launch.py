"""PyTorch launcher for the LightKVMerge Triton kernels: `lightkv_merge_triton(hidden, guidance, plan)`.

Runs on CUDA tensors natively, or on CPU tensors under TRITON_INTERPRET=1 (how CI checks the kernels).
The block sizes live in `KernelConfig`; the same values are what aot.py compiles and trt_plugin.py autotunes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

from lightkv_export.errors import InputError
from lightkv_export.method.layout import StagePlan
from lightkv_export.method.merge_plan import out_slots
from plugins.lightkv import kernels

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class KernelConfig:
    """Block sizes and warps of the three kernels (powers of two, >= 16 where they feed tl.dot).

    The match defaults fit sm80..sm120 without spills (aot.py reports registers and shared memory per target).
    """

    match_a: int = 64
    match_b: int = 64
    match_d: int = 32
    match_warps: int = 8
    plan_s: int = 256
    plan_r: int = 64
    plan_j: int = 64
    emit_s: int = 32
    emit_b: int = 16
    emit_a: int = 32
    emit_d: int = 64
    num_warps: int = 4
    num_stages: int = 2


DEFAULT_CONFIG = KernelConfig()
# Small blocks so that the CPU interpreter exercises the tiling loops (several chunks of A, B, D and S).
INTERPRET_CONFIG = KernelConfig(
    match_a=16,
    match_b=16,
    match_d=16,
    match_warps=4,
    plan_s=16,
    plan_r=16,
    plan_j=16,
    emit_s=16,
    emit_b=16,
    emit_a=16,
    emit_d=16,
)


def _ieee_dot(dtype: torch.dtype) -> bool:
    """fp32 operands and IEEE dots: for fp32 hidden (no TF32), and for bf16 under the interpreter, whose bf16
    tl.dot is wrong in Triton 3.9 (fp16 and fp32 dots are exact there)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")


@dataclass(frozen=True)
class PlanTensors:
    """A StagePlan's index inputs on the device, as the ONNX function and the TensorRT plugins receive them."""

    win_index: torch.Tensor  # [W, n_max] int64
    win_r: torch.Tensor  # [W] int64
    lengths: torch.Tensor  # [B] int64
    out_slots: torch.Tensor  # [S'] int64: S' = max(out_lengths) as a tensor dimension, as the TensorRT plugin has it


def plan_tensors(plan: StagePlan, device: torch.device | str) -> PlanTensors:
    """Copy the plan's index inputs to `device` (once per request, outside any timed kernel region)."""
    win_index = torch.as_tensor(plan.win_index, dtype=torch.int64, device=device).contiguous()  # [W, n_max]
    if win_index.dim() != 2:
        win_index = win_index.reshape(-1, 0)
    return PlanTensors(
        win_index=win_index,
        win_r=torch.as_tensor(plan.win_r, dtype=torch.int64, device=device).contiguous(),  # [W]
        lengths=torch.tensor(plan.lengths, dtype=torch.int64, device=device),  # [B]
        out_slots=torch.as_tensor(out_slots(plan.out_lengths), device=device),  # [S']
    )


def lightkv_merge_triton(
    hidden: torch.Tensor, guidance: torch.Tensor, plan: StagePlan, config: KernelConfig = DEFAULT_CONFIG
) -> tuple[torch.Tensor, torch.Tensor]:
    """One planned stage on the Triton kernels: returns (hidden_out [B, S', D], kept [B, S'] int64)."""
    if hidden.dim() != 3 or guidance.shape != hidden.shape[:2]:
        raise InputError(
            f"expected hidden [B, S, D] and guidance [B, S], got {tuple(hidden.shape)}, {tuple(guidance.shape)}"
        )
    if hidden.dtype not in SUPPORTED_DTYPES:
        raise InputError(f"hidden dtype {hidden.dtype} is not one of {', '.join(map(str, SUPPORTED_DTYPES))}.")
    if tuple(hidden.shape[:2]) != (plan.batch, plan.seq_len):
        raise InputError(
            f"hidden {tuple(hidden.shape)} does not match the plan (batch {plan.batch}, seq {plan.seq_len})."
        )
    return launch_kernels(hidden, guidance, plan_tensors(plan, hidden.device), config)


def launch_kernels(
    hidden: torch.Tensor, guidance: torch.Tensor, plan: PlanTensors, config: KernelConfig = DEFAULT_CONFIG
) -> tuple[torch.Tensor, torch.Tensor]:
    """The three kernel launches alone (no validation, no host sync): (hidden_out [B, S', D], kept [B, S']).
    Inputs as lightkv_merge_triton checks them."""
    bsz, seq, dim = hidden.shape
    device = hidden.device
    flat = hidden.contiguous().reshape(bsz * seq, dim)  # [N, D]
    xi = guidance.to(torch.float32).contiguous().reshape(bsz * seq)  # [N]
    win_index, win_r, lengths = plan.win_index, plan.win_r, plan.lengths
    out_seq = plan.out_slots.shape[0]  # S', known on the host from the plan
    n_win, n_max = win_index.shape
    na, nb = (n_max + 1) // 2, n_max // 2
    c = config

    best = torch.empty(n_win, na, dtype=torch.float32, device=device)  # [W, na]
    partner = torch.empty(n_win, na, dtype=torch.int32, device=device)  # [W, na]
    if n_win and na:
        kernels.match_kernel[(n_win, triton.cdiv(na, c.match_a))](
            flat, win_index, n_max, dim, bsz * seq, best, partner,
            BLOCK_A=c.match_a, BLOCK_B=c.match_b, BLOCK_D=c.match_d, IEEE=_ieee_dot(hidden.dtype),
            num_warps=c.match_warps, num_stages=c.num_stages,
        )  # fmt: skip

    kept = torch.empty(bsz, out_seq, dtype=torch.int64, device=device)  # [B, S']
    dest = torch.empty(bsz * seq, dtype=torch.int32, device=device)  # [N]
    assign = torch.empty(n_win, na, dtype=torch.int32, device=device)  # [W, na]
    kernels.plan_kernel[(bsz,)](
        xi, win_index, win_r, lengths, plan.out_slots, best, partner, n_win, n_max, seq, bsz, out_seq,
        kept, dest, assign,
        BLOCK_S=c.plan_s, BLOCK_R=c.plan_r, BLOCK_J=c.plan_j, num_warps=c.num_warps, num_stages=c.num_stages,
    )  # fmt: skip

    out = torch.empty(bsz, out_seq, dim, dtype=hidden.dtype, device=device)  # [B, S', D]
    tiles = bsz * triton.cdiv(out_seq, c.emit_s) + n_win * triton.cdiv(nb, c.emit_b)
    if tiles and dim:
        kernels.emit_kernel[(tiles, triton.cdiv(dim, c.emit_d))](
            flat, xi, win_index, kept, dest, assign, n_max, seq, bsz, out_seq, dim, out,
            BLOCK_S=c.emit_s, BLOCK_B=c.emit_b, BLOCK_A=c.emit_a, BLOCK_D=c.emit_d, num_warps=c.num_warps,
            num_stages=c.num_stages,
        )  # fmt: skip
    return out, kept
