"""TensorRT plugins for LightKVMerge, registered with TensorRT's Python plugin API (`tensorrt.plugin`).

A TensorRT AOT plugin returns exactly one compiled kernel, launched with (inputs, extra int32 scalars, outputs).
LightKVMerge needs two grid-wide synchronisations (all similarities before the ranking, the whole row's merges before
the compaction), so the op is three plugins in the "lightkv" namespace, one per kernel of kernels.py, chained by
passes/lower_trt_plugin.py:

    LightKVMatch (hidden, win_index)                                          -> best [W, na] f32, partner [W, na] i32
    LightKVPlan  (guidance, win_index, win_r, lengths, out_slots, best, partner)
                                                        -> kept [B, S'] i64, dest [B*S] i32, assign [W, na] i32
    LightKVEmit  (hidden, guidance, win_index, kept, dest, assign)            -> hidden_out [B, S', D]

S' = max(out_lengths) is known on the host from the merge plan, so it arrives as the dimension of the input
out_slots [S'] (method/merge_plan.py): every output shape and every launch expression is arithmetic on plain input
dimensions. (`tensorrt.plugin` forbids arithmetic on size-tensor expressions, and a data-dependent size would make
TensorRT synchronise with the host in the middle of the graph.)
Needs TensorRT >= 10.9 (`tensorrt.plugin.aot_impl`; the targets need 10.11, targets/trt.MIN_TENSORRT), and
targets/trt.check_trt_available says so when it is older.
Each plugin has an `aot_impl` returning the Triton kernel as PTX (so the engine runs without Python: trtexec, Triton
Inference Server) and an `autotune` offering the kernel configurations of TACTICS for TensorRT to time (one, for
now: see TACTICS).
W must be >= 1: a stage with no windows is fed one dummy window of -1 with r = 0, which merges nothing.

`tensorrt` is imported only inside `register_plugins`, so this module imports without TensorRT.
"""

from dataclasses import replace
from typing import Any

from plugins.lightkv.aot import KernelArtifact, compile_kernel, kernel_specs
from plugins.lightkv.launch import DEFAULT_CONFIG, KernelConfig

NAMESPACE = "lightkv"
PLUGINS = ("LightKVMatch", "LightKVPlan", "LightKVEmit")
# Tactic id -> kernel configuration; TensorRT times each and keeps the fastest in the engine.
# One tactic per AOT plugin until several are verified on a GPU with TensorRT: multi-tactic AOT plugins first appear
# in TensorRT 11.1's sample, and its runner refuses --aot --multi_tactic up to 11.0. The second configuration stays
# compiled and tested here (CANDIDATE_TACTICS), ready to be offered once a real build has timed it.
TACTICS: dict[int, KernelConfig] = {1: DEFAULT_CONFIG}
CANDIDATE_TACTICS: dict[int, KernelConfig] = {
    **TACTICS,
    2: replace(DEFAULT_CONFIG, match_a=32, match_b=32, match_warps=4, emit_s=64),
}
_registered: set[str] = set()


def _artifact(kernel: str, dtype: str, tactic: int, target: str, cache: dict[tuple[str, str, int], KernelArtifact]):
    """Compile (once per kernel, dtype and tactic) for `target`; PTX with the TensorRT parameter list."""
    import atexit
    import shutil
    import tempfile
    from pathlib import Path

    key = (kernel, dtype, tactic)
    if key not in cache:
        spec = kernel_specs(dtype, CANDIDATE_TACTICS[tactic])[kernel]
        workdir = Path(tempfile.mkdtemp(prefix="lightkv-aot-"))
        atexit.register(shutil.rmtree, workdir, ignore_errors=True)  # the compiler's files, not left in /tmp
        cache[key] = compile_kernel(spec, target, workdir)
    return cache[key]


def register_plugins(target: str) -> None:
    """Register the three plugins for GPU target `target` (e.g. "sm90"); safe to call more than once."""
    if target in _registered:
        return
    if _registered:
        raise RuntimeError(f"LightKV plugins are already registered for {sorted(_registered)}, not {target}")
    import tensorrt as trt
    import tensorrt.plugin as trtp

    dtype_names = {trt.float32: "fp32", trt.float16: "fp16", trt.bfloat16: "bf16"}
    cache: dict[tuple[str, str, int], KernelArtifact] = {}

    def launch(art: KernelArtifact, grid: tuple[Any, ...], scalars: list[Any]) -> tuple[Any, ...]:
        params = trtp.KernelLaunchParams()
        params.grid_x = grid[0]
        if len(grid) > 1:
            params.grid_y = grid[1]
        params.block_x = art.block_x
        params.shared_mem = art.shared_bytes
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(v) for v in scalars])
        return art.entry.encode(), art.ptx.encode(), params, extra

    # --- LightKVMatch -----------------------------------------------------------------------------------------
    @trtp.register(f"{NAMESPACE}::LightKVMatch")
    def match_desc(hidden: trtp.TensorDesc, win_index: trtp.TensorDesc) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
        na = trtp.cdiv(win_index.shape_expr[1], 2)
        best = trtp.from_shape_expr((win_index.shape_expr[0], na), dtype=trt.float32)
        partner = trtp.from_shape_expr((win_index.shape_expr[0], na), dtype=trt.int32)
        return best, partner

    @trtp.autotune(f"{NAMESPACE}::LightKVMatch")
    def match_tune(
        hidden: trtp.TensorDesc, win_index: trtp.TensorDesc, outputs: tuple[trtp.TensorDesc]
    ) -> list[trtp.AutoTuneCombination]:
        combo = trtp.AutoTuneCombination("FP32|FP16|BF16, INT64, FP32, INT32")
        combo.tactics(list(TACTICS))
        return [combo]

    @trtp.aot_impl(f"{NAMESPACE}::LightKVMatch")
    def match_aot(
        hidden: trtp.TensorDesc, win_index: trtp.TensorDesc, outputs: tuple[trtp.TensorDesc], tactic: int
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
        art = _artifact("match", dtype_names[hidden.dtype], tactic, target, cache)
        n_win, n_max, dim = win_index.shape_expr[0], win_index.shape_expr[1], hidden.shape_expr[2]
        n_tokens = hidden.shape_expr[0] * hidden.shape_expr[1]  # B * S: plain input dimensions, no size tensor
        grid = (n_win, trtp.cdiv(trtp.cdiv(n_max, 2), CANDIDATE_TACTICS[tactic].match_a))
        return launch(art, grid, [n_max, dim, n_tokens])

    # --- LightKVPlan ------------------------------------------------------------------------------------------
    @trtp.register(f"{NAMESPACE}::LightKVPlan")
    def plan_desc(
        guidance: trtp.TensorDesc,
        win_index: trtp.TensorDesc,
        win_r: trtp.TensorDesc,
        lengths: trtp.TensorDesc,
        out_slots: trtp.TensorDesc,
        best: trtp.TensorDesc,
        partner: trtp.TensorDesc,
    ) -> tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        bsz, seq = guidance.shape_expr[0], guidance.shape_expr[1]
        kept = trtp.from_shape_expr((bsz, out_slots.shape_expr[0]), dtype=trt.int64)  # [B, S']
        dest = trtp.from_shape_expr((bsz * seq,), dtype=trt.int32)
        assign = trtp.from_shape_expr((best.shape_expr[0], best.shape_expr[1]), dtype=trt.int32)
        return kept, dest, assign

    @trtp.autotune(f"{NAMESPACE}::LightKVPlan")
    def plan_tune(
        guidance: trtp.TensorDesc,
        win_index: trtp.TensorDesc,
        win_r: trtp.TensorDesc,
        lengths: trtp.TensorDesc,
        out_slots: trtp.TensorDesc,
        best: trtp.TensorDesc,
        partner: trtp.TensorDesc,
        outputs: tuple[trtp.TensorDesc],
    ) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP32, INT64, INT64, INT64, INT64, FP32, INT32, INT64, INT32, INT32")]

    @trtp.aot_impl(f"{NAMESPACE}::LightKVPlan")
    def plan_aot(
        guidance: trtp.TensorDesc,
        win_index: trtp.TensorDesc,
        win_r: trtp.TensorDesc,
        lengths: trtp.TensorDesc,
        out_slots: trtp.TensorDesc,
        best: trtp.TensorDesc,
        partner: trtp.TensorDesc,
        outputs: tuple[trtp.TensorDesc],
        tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
        art = _artifact("plan", "fp32", 1, target, cache)  # no dtype dependence, one configuration
        bsz, seq = guidance.shape_expr[0], guidance.shape_expr[1]
        scalars = [win_index.shape_expr[0], win_index.shape_expr[1], seq, bsz, out_slots.shape_expr[0]]
        return launch(art, (bsz,), scalars)

    # --- LightKVEmit ------------------------------------------------------------------------------------------
    @trtp.register(f"{NAMESPACE}::LightKVEmit")
    def emit_desc(
        hidden: trtp.TensorDesc,
        guidance: trtp.TensorDesc,
        win_index: trtp.TensorDesc,
        kept: trtp.TensorDesc,
        dest: trtp.TensorDesc,
        assign: trtp.TensorDesc,
    ) -> trtp.TensorDesc:
        return trtp.from_shape_expr(
            (hidden.shape_expr[0], kept.shape_expr[1], hidden.shape_expr[2]), dtype=hidden.dtype
        )

    @trtp.autotune(f"{NAMESPACE}::LightKVEmit")
    def emit_tune(
        hidden: trtp.TensorDesc,
        guidance: trtp.TensorDesc,
        win_index: trtp.TensorDesc,
        kept: trtp.TensorDesc,
        dest: trtp.TensorDesc,
        assign: trtp.TensorDesc,
        outputs: tuple[trtp.TensorDesc],
    ) -> list[trtp.AutoTuneCombination]:
        combos = []
        for t in ("FP32", "FP16", "BF16"):  # the output has the hidden dtype
            combo = trtp.AutoTuneCombination(f"{t}, FP32, INT64, INT64, INT32, INT32, {t}")
            combo.tactics(list(TACTICS))
            combos.append(combo)
        return combos

    @trtp.aot_impl(f"{NAMESPACE}::LightKVEmit")
    def emit_aot(
        hidden: trtp.TensorDesc,
        guidance: trtp.TensorDesc,
        win_index: trtp.TensorDesc,
        kept: trtp.TensorDesc,
        dest: trtp.TensorDesc,
        assign: trtp.TensorDesc,
        outputs: tuple[trtp.TensorDesc],
        tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
        cfg = CANDIDATE_TACTICS[tactic]
        art = _artifact("emit", dtype_names[hidden.dtype], tactic, target, cache)
        bsz, seq, dim = hidden.shape_expr[0], hidden.shape_expr[1], hidden.shape_expr[2]
        n_win, n_max, out_seq = win_index.shape_expr[0], win_index.shape_expr[1], kept.shape_expr[1]
        tiles = bsz * trtp.cdiv(out_seq, cfg.emit_s) + n_win * trtp.cdiv(n_max // 2, cfg.emit_b)
        return launch(art, (tiles, trtp.cdiv(dim, cfg.emit_d)), [n_max, seq, bsz, out_seq, dim])

    _registered.add(target)
