"""LightKVMerge in the Triton language: three kernels that consume the host plan exactly as the ONNX function does.

The op is split where a grid-wide dependency forces it, so that every kernel is one launch with a fixed argument
order (inputs, then int32 scalars, then outputs). That is the calling convention of TensorRT's AOT plugins, so the
same three kernels back both the PyTorch launcher (launch.py) and the TensorRT plugins (trt_plugin.py).

1. `match_kernel`   grid (W, cdiv(na, BLOCK_A)): cosine similarity of every A slot (even) against every B slot (odd)
   of its window, tiled over B slots and over D; writes each A slot's best similarity and partner B slot.
2. `plan_kernel`    grid (B,): one program per batch row. Top-r ranking per window (stable: rank = #greater +
   #equal at a lower slot), the merge assignment, and the order-preserving compaction (a chunked prefix sum).
   Writes `kept` and a per-token destination code. One program owns a row, so its scratch writes need only
   block barriers, no atomics. S' = max(out_lengths) comes from the host plan as a launch scalar (in TensorRT, the
   dimension of the out_slots input), so every output is sized before any kernel runs.
3. `emit_kernel`    grid (B * cdiv(S', BLOCK_S) + W * cdiv(nb, BLOCK_B), cdiv(D, BLOCK_D)): the first programs copy
   untouched survivors (and zero the padding), the rest compute each touched B token's guidance-weighted merge as
   two small matrix products over its window's A slots and write it at its output position. Each output row is
   written by exactly one program, so the result is deterministic (no float atomics).

Shapes (N = B * S flat tokens, W windows, n_max slots per window, na = ceil(n_max / 2), nb = floor(n_max / 2)):
hidden [N, D], guidance [N] fp32, win_index [W, n_max] int64 (flat b * S + s, -1 padded), win_r [W] int64,
lengths [B] int64. Similarity, norms and merge weights are fp32 whatever the hidden dtype: fp16 and
bf16 operands go to `tl.dot` natively (their products are exact in fp32, the accumulation is fp32), fp32 operands
use IEEE fp32 dots (no TF32), so ties and rankings match the reference.

`dest` code per token (int32, internal): -1 gone or padding, else 2 * output position + touched (a B token that
received at least one merge).

Safe on any input: TensorRT runs plugins on made-up inputs while it times tactics, so no kernel trusts what it
loads. Every loaded index is checked before it addresses memory (a token index in [0, N) and, in Plan, in the
program's own row; a slot in its window's range; an output position in [0, S')), S' is the output buffer's own
dimension, and every loop's bounds are launch scalars, never loaded data. Nothing outside the buffers is read or
written whatever the plan (tests/unit/test_triton_kernels.py feeds made-up ones). Match and Plan write every element
of their outputs, deterministically; Emit, on a made-up plan that no host would make (a touched B token whose output
position is not its own, two B tokens at one position), may leave a row unwritten or write it twice.
"""

from __future__ import annotations

import triton
import triton.language as tl

COS_EPS = 1e-8  # reference.COS_EPS
WEIGHT_FLOOR = 1e-30  # reference: wsum.clamp_min(1e-30), only reached where the plain mean is taken instead


@triton.jit
def match_kernel(
    hidden_ptr,  # [N, D] hidden dtype
    win_index_ptr,  # [W, n_max] int64
    n_max,
    dim,
    n_tokens,  # N = B * S: a token index outside [0, N) is padding, whatever the plan says
    best_ptr,  # [W, na] fp32 out: best similarity of each A slot (-inf for padding)
    partner_ptr,  # [W, na] int32 out: B slot of that best match (lowest slot on ties)
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 operands and exact fp32 dots (fp32 hidden; bf16 under the interpreter)
):
    w = tl.program_id(0)
    na = (n_max + 1) // 2
    nb = n_max // 2
    a_slot = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)  # [BA]
    a_idx = tl.load(win_index_ptr + w * n_max + 2 * a_slot, mask=a_slot < na, other=-1)  # [BA]
    a_ok = a_idx.to(tl.uint64) < n_tokens  # one unsigned compare: a negative index wraps past N
    a_row = tl.where(a_ok, a_idx, 0).to(tl.int64) * dim  # [BA]
    d_off = tl.arange(0, BLOCK_D)  # [BD]

    # |a|^2 once per tile: the A rows stay the same for every B chunk.
    sq_a = tl.zeros([BLOCK_A], dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + d_off
        xa = tl.load(hidden_ptr + a_row[:, None] + d[None, :], mask=a_ok[:, None] & (d < dim)[None, :], other=0.0)
        xa = xa.to(tl.float32)  # [BA, BD]
        sq_a += tl.sum(xa * xa, axis=1)
    norm_a = tl.sqrt(sq_a)  # [BA]

    best = tl.full([BLOCK_A], float("-inf"), dtype=tl.float32)  # [BA]
    partner = tl.zeros([BLOCK_A], dtype=tl.int32)  # [BA]
    for b0 in range(0, nb, BLOCK_B):
        b_slot = b0 + tl.arange(0, BLOCK_B)  # [BB]
        b_idx = tl.load(win_index_ptr + w * n_max + 2 * b_slot + 1, mask=b_slot < nb, other=-1)  # [BB]
        b_ok = b_idx.to(tl.uint64) < n_tokens
        b_row = tl.where(b_ok, b_idx, 0).to(tl.int64) * dim  # [BB]
        dots = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
        sq_b = tl.zeros([BLOCK_B], dtype=tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            d = d0 + d_off
            d_ok = (d < dim)[None, :]
            xa = tl.load(hidden_ptr + a_row[:, None] + d[None, :], mask=a_ok[:, None] & d_ok, other=0.0)  # [BA, BD]
            xb = tl.load(hidden_ptr + b_row[:, None] + d[None, :], mask=b_ok[:, None] & d_ok, other=0.0)  # [BB, BD]
            if IEEE:
                xa32, xb32 = xa.to(tl.float32), xb.to(tl.float32)
                dots = tl.dot(xa32, tl.trans(xb32), dots, input_precision="ieee")
            else:
                dots = tl.dot(xa, tl.trans(xb), dots)  # fp16/bf16 products are exact in the fp32 accumulator
            xbf = xb.to(tl.float32)
            sq_b += tl.sum(xbf * xbf, axis=1)
        sim = dots / (norm_a[:, None] * tl.sqrt(sq_b)[None, :] + 1e-8)  # [BA, BB]
        sim = tl.where(a_ok[:, None] & b_ok[None, :], sim, float("-inf"))
        chunk_best = tl.max(sim, axis=1)  # [BA]
        # Lowest B slot among the chunk's maxima; chunks ascend, so only a strictly better chunk replaces it.
        cand = tl.where(sim == chunk_best[:, None], b_slot[None, :], 2147483647)
        chunk_partner = tl.min(cand, axis=1).to(tl.int32)  # [BA]
        better = chunk_best > best
        partner = tl.where(better, chunk_partner, partner)
        best = tl.where(better, chunk_best, best)

    out = w * na + a_slot
    tl.store(best_ptr + out, best, mask=a_slot < na)
    tl.store(partner_ptr + out, partner, mask=a_slot < na)


@triton.jit
def plan_kernel(
    guidance_ptr,  # [B, S] fp32, unread: it gives the TensorRT plugin B and S for its output shapes
    win_index_ptr,  # [W, n_max] int64
    win_r_ptr,  # [W] int64
    lengths_ptr,  # [B] int64
    out_slots_ptr,  # [S'] int64, unread: S' reaches TensorRT as this host input's dimension
    best_ptr,  # [W, na] fp32
    partner_ptr,  # [W, na] int32
    n_win,
    n_max,
    seq,
    batch,
    out_seq,  # S', the row stride of `kept` (from the host plan: max(out_lengths))
    kept_ptr,  # [B, S'] int64 out: source index of each survivor, -1 padding
    dest_ptr,  # [B * S] int32 out: -1 gone/padding, else 2 * output position + touched
    assign_ptr,  # [W, na] int32 out: partner B slot of each merged A slot, -1 if it stays
    BLOCK_S: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    row = tl.program_id(0)
    na = (n_max + 1) // 2
    s_off = tl.arange(0, BLOCK_S)
    row_base = tl.cast(row, tl.int64) * seq
    nb = n_max // 2
    row_end = row_base + seq

    # 1. Every token of the row starts as an untouched survivor (code 0).
    for s0 in range(0, seq, BLOCK_S):
        s = s0 + s_off
        tl.store(dest_ptr + row_base + s, tl.zeros([BLOCK_S], dtype=tl.int32), mask=s < seq)
    tl.debug_barrier()

    # 2. Top-r per window of this row: merged A slots leave (-1), their partners are marked touched (1).
    r_off = tl.arange(0, BLOCK_R)
    j_off = tl.arange(0, BLOCK_J)
    n_total = tl.cast(batch, tl.int64) * seq
    for w in range(0, n_win):
        first = tl.load(win_index_ptr + tl.cast(w, tl.int64) * n_max)  # slot 0 is never padding
        # A window whose slot 0 is in no row exists only in a made-up plan: program 0 marks its A slots as
        # staying, so that every assign slot is written whatever the plan.
        if (row == 0) & ((first < 0) | (first >= n_total)):
            for k0 in range(0, na, BLOCK_R):
                k_slot = k0 + r_off
                tl.store(assign_ptr + w * na + k_slot, tl.full([BLOCK_R], -1, tl.int32), mask=k_slot < na)
        if (first >= row_base) & (first < row_end):  # this row's window: only its program writes the row
            r = tl.load(win_r_ptr + w)
            for i0 in range(0, na, BLOCK_R):
                i = i0 + r_off  # [BR]
                i_ok = i < na
                best_i = tl.load(best_ptr + w * na + i, mask=i_ok, other=float("-inf"))  # [BR]
                rank = tl.zeros([BLOCK_R], dtype=tl.int32)
                for j0 in range(0, na, BLOCK_J):
                    j = j0 + j_off  # [BJ]
                    best_j = tl.load(best_ptr + w * na + j, mask=j < na, other=float("-inf"))  # [BJ]
                    # Stable descending order: j ranks before i if larger, or equal at a lower slot.
                    ahead = (best_j[None, :] > best_i[:, None]) | (
                        (best_j[None, :] == best_i[:, None]) & (j[None, :] < i[:, None])
                    )
                    ahead = ahead & (j < na)[None, :]
                    rank += tl.sum(ahead.to(tl.int32), axis=1)
                a_idx = tl.load(win_index_ptr + w * n_max + 2 * i, mask=i_ok, other=-1)  # [BR]
                slot = tl.load(partner_ptr + w * na + i, mask=i_ok, other=0)  # [BR]
                merged = (rank < r) & (a_idx >= row_base) & (a_idx < row_end) & i_ok & (slot >= 0) & (slot < nb)
                b_idx = tl.load(win_index_ptr + w * n_max + 2 * slot + 1, mask=merged, other=-1)  # [BR]
                merged = merged & (b_idx >= row_base) & (b_idx < row_end)
                tl.store(assign_ptr + w * na + i, tl.where(merged, slot, -1), mask=i_ok)
                tl.store(dest_ptr + a_idx, tl.full([BLOCK_R], -1, tl.int32), mask=merged)
                tl.store(dest_ptr + b_idx, tl.full([BLOCK_R], 1, tl.int32), mask=merged)  # same value if shared
    tl.debug_barrier()

    # 3. Order-preserving compaction: a running prefix sum over the row.
    length = tl.load(lengths_ptr + row)
    count = 0
    for s0 in range(0, seq, BLOCK_S):
        s = s0 + s_off
        code = tl.load(dest_ptr + row_base + s, mask=s < seq, other=-1)  # [BS]
        keep = (code >= 0) & (s < length)
        pos = count + tl.cumsum(keep.to(tl.int32), axis=0) - 1  # [BS]
        tl.store(dest_ptr + row_base + s, tl.where(keep, 2 * pos + code, -1), mask=s < seq)
        tl.store(kept_ptr + tl.cast(row, tl.int64) * out_seq + pos, s.to(tl.int64), mask=keep & (pos < out_seq))
        count += tl.sum(keep.to(tl.int32), axis=0)
    for p0 in range(0, out_seq, BLOCK_S):  # bounds from S' (a launch scalar), not from the data-dependent count
        p = p0 + s_off
        pad = (p >= count) & (p < out_seq)
        tl.store(kept_ptr + tl.cast(row, tl.int64) * out_seq + p, tl.full([BLOCK_S], -1, tl.int64), mask=pad)


@triton.jit
def emit_kernel(
    hidden_ptr,  # [N, D] hidden dtype
    guidance_ptr,  # [N] fp32
    win_index_ptr,  # [W, n_max] int64
    kept_ptr,  # [B, S'] int64
    dest_ptr,  # [B * S] int32
    assign_ptr,  # [W, na] int32
    n_max,
    seq,
    batch,
    out_seq,
    dim,
    out_ptr,  # [B, S', D] hidden dtype out
    BLOCK_S: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_A: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    d_ok = d < dim
    copy_tiles = batch * tl.cdiv(out_seq, BLOCK_S)
    if pid < copy_tiles:  # the two branches use distinct names: Triton merges same-named values across them
        # Survivors that nobody merged into: a bit-exact copy. Padding rows: zeros.
        row = pid // tl.cdiv(out_seq, BLOCK_S)
        p = (pid % tl.cdiv(out_seq, BLOCK_S)) * BLOCK_S + tl.arange(0, BLOCK_S)  # [BS]
        p_ok = p < out_seq
        src = tl.load(kept_ptr + tl.cast(row, tl.int64) * out_seq + p, mask=p_ok, other=-1)  # [BS]
        src = tl.where((src >= 0) & (src < seq), src, -1)  # a source outside the row is padding
        flat = tl.cast(row, tl.int64) * seq + tl.where(src >= 0, src, 0)  # [BS]
        code = tl.load(dest_ptr + flat, mask=src >= 0, other=0)
        plain = (src >= 0) & ((code & 1) == 0)
        x = tl.load(hidden_ptr + flat[:, None] * dim + d[None, :], mask=plain[:, None] & d_ok[None, :], other=0.0)
        write = (plain | (src < 0)) & p_ok
        out_row = tl.cast(row, tl.int64) * out_seq + p
        tl.store(out_ptr + out_row[:, None] * dim + d[None, :], x, mask=write[:, None] & d_ok[None, :])
    else:
        # Merge: B' = (xi_b x_b + sum_a xi_a x_a) / (xi_b + sum_a xi_a), or the plain mean if that weight <= 0.
        nb = n_max // 2
        na = (n_max + 1) // 2
        tile = pid - copy_tiles
        b_tiles = tl.cdiv(nb, BLOCK_B)
        w = tile // b_tiles
        j = (tile % b_tiles) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BB] B slots
        n_tokens = tl.cast(batch, tl.int64) * seq
        b_idx = tl.load(win_index_ptr + w * n_max + 2 * j + 1, mask=j < nb, other=-1)  # [BB]
        b_idx = tl.where((b_idx >= 0) & (b_idx < n_tokens), b_idx, -1)
        b_code = tl.load(dest_ptr + tl.where(b_idx >= 0, b_idx, 0), mask=b_idx >= 0, other=0)
        b_pos = b_code >> 1  # output position: written only inside [0, S')
        touched = (b_idx >= 0) & ((b_code & 1) == 1) & (b_pos >= 0) & (b_pos < out_seq)
        if tl.max(touched.to(tl.int32), axis=0) > 0:
            b_flat = tl.where(b_idx >= 0, b_idx, 0)
            xb = tl.load(hidden_ptr + b_flat[:, None] * dim + d[None, :], mask=touched[:, None] & d_ok[None, :])
            xb = xb.to(tl.float32)  # [BB, BD]
            xi_b = tl.load(guidance_ptr + b_flat, mask=touched, other=0.0)  # [BB]
            num = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
            sum_x = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
            den = tl.zeros([BLOCK_B], dtype=tl.float32)
            cnt = tl.zeros([BLOCK_B], dtype=tl.float32)
            for i0 in range(0, na, BLOCK_A):
                i = i0 + tl.arange(0, BLOCK_A)  # [BA] A slots
                slot = tl.load(assign_ptr + w * na + i, mask=i < na, other=-1)  # [BA]
                a_idx = tl.load(win_index_ptr + w * n_max + 2 * i, mask=(slot >= 0) & (i < na), other=-1)  # [BA]
                slot = tl.where((a_idx >= 0) & (a_idx < n_tokens) & (i < na), slot, -1)
                a_idx = tl.where(slot >= 0, a_idx, 0)
                xa = tl.load(hidden_ptr + a_idx[:, None] * dim + d[None, :], mask=(slot >= 0)[:, None] & d_ok[None, :])
                xa = tl.where((slot >= 0)[:, None] & d_ok[None, :], xa.to(tl.float32), 0.0)  # [BA, BD]
                xi_a = tl.load(guidance_ptr + a_idx, mask=slot >= 0, other=0.0)  # [BA]
                hit = slot[None, :] == j[:, None]  # [BB, BA] A slot i merges into B slot j
                weight = tl.where(hit, xi_a[None, :], 0.0)
                ones = tl.where(hit, 1.0, 0.0)
                num = tl.dot(weight, xa, num, input_precision="ieee")  # [BB, BD]
                sum_x = tl.dot(ones, xa, sum_x, input_precision="ieee")
                den += tl.sum(weight, axis=1)
                cnt += tl.sum(ones, axis=1)
            wsum = xi_b + den  # [BB]
            weighted = (xi_b[:, None] * xb + num) / tl.maximum(wsum, 1e-30)[:, None]
            plain_mean = (xb + sum_x) / (1.0 + cnt)[:, None]
            value = tl.where((wsum > 0)[:, None], weighted, plain_mean)  # [BB, BD]
            b_out = (b_flat // seq) * out_seq + b_pos  # [BB] output row of each B token
            out_ptrs = out_ptr + b_out[:, None] * dim + d[None, :]
            tl.store(out_ptrs, value.to(out_ptr.dtype.element_ty), mask=touched[:, None] & d_ok[None, :])
