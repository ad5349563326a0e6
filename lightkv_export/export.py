"""Vanilla ONNX export: the language-model prefill, the decode step and the vision encoder, once per model.

The exporter drives the decoder layers itself (as torch_runtime.py does) instead of tracing the Hugging Face
`forward`, so the graphs have exactly the inputs and outputs an engine needs and nothing that depends on the
HF cache classes. Attention goes through `export_attention`, registered with transformers' AttentionInterface,
which concatenates the past (decode) and hands each layer's post-RoPE query, key and value back to the wrapper.

Prefill is causal with no padding mask: rows are right-padded, so no real token ever attends to padding, and
padded positions' outputs are ignored (the runtime masks them in the decode step). This keeps the attention
fused and leaves nothing S x S in the graph for the LightKV pass to rewire.

What the LightKV pass needs survives in the ONNX file as *role outputs*: extra graph outputs named
`lightkv.role.<role>.<layer>` (each layer's output hidden state and post-RoPE query, and the rotary cos / sin),
plus `metadata_props` describing them. The pass finds the values by these names and removes the outputs;
`strip_roles` removes them for the vanilla engine.

Graphs (B batch, S prompt tokens, D hidden, L layers, Hkv KV heads, d head size, V vocabulary):
* prefill: inputs_embeds [B, S, D], position_ids [*lead, B, S] int64 (the family's scheme: [3, B, S] for M-RoPE,
           [B, S] for 1-D RoPE), lengths [B] int64
           -> logits [B, V] (at each row's last valid token), present.{i}.key / .value [B, Hkv, S, d]
* embed:   input_ids [B, S] int64 -> inputs_embeds [B, S, D] (the token embedding table, shared by both below)
* decode:  inputs_embeds [B, 1, D], position_ids [*lead, B, 1], past.{i}.key / .value [B, Hkv, P_i, d] (each layer
           its own P_i), past_mask.{i} [B, P_i] int64 (1 = real entry) -> logits [B, V], present.{i}.key / .value;
           role outputs per layer (the attention's boundary, for passes/fuse_attention.py): the post-RoPE
           query [B, Hq, 1, d], the new token's key and value [B, Hkv, 1, d], the attention output [B, 1, Hq, d]
* vision:  one image as the family's host prepares it (pixel_values first, then the family's grid-only inputs:
           Qwen-VL's rotary positions, window order, segment lengths) -> image_embeds [N_vis, D]; dynamic in
           the number of patches where the processor lets the size vary
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from transformers import AttentionInterface

from lightkv_export import contract
from lightkv_export.artifacts import (
    graph_digest,
    locked,
    promote,
    remove_stale_partials,
    staging,
    write_text_atomic,
)
from lightkv_export.models.base import LoadedModel, attention_implementation, head_dim
from lightkv_export.models.positions import Positions

EXPORT_ATTENTION = "lightkv_export_attention"
OPSET = 21
EXPORT_VERSION = 4  # bump when the graph contract changes: part of the export cache key


def export_attention(module, query, key, value, attention_mask, *, scaling=None, lightkv=None, **_kwargs):
    """SDPA over [past; new] keys, recording the layer's post-RoPE query, key and value in `lightkv`.

    query [B, Hq, s, d], key / value [B, Hkv, s, d] (new tokens, post-RoPE). attention_mask: None (prefill,
    causal: prefill always has S >= 2) or an additive
    [B, 1, s, P + s] mask (decode).
    """
    state = lightkv if lightkv is not None else {}
    past = state.get("past")
    state["new_key"], state["new_value"] = key, value
    if past is not None:
        key = torch.cat([past[0], key], dim=2)  # [B, Hkv, P + s, d]
        value = torch.cat([past[1], value], dim=2)
    state["query"], state["key"], state["value"] = query, key, value
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1)  # [B, Hq, P + s, d]
    v = value.repeat_interleave(groups, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, k, v, attn_mask=attention_mask, is_causal=attention_mask is None, scale=scaling
    )  # [B, Hq, s, d]
    state["attention"] = out.transpose(1, 2).contiguous()  # [B, s, Hq, d]
    return state["attention"], None


AttentionInterface.register(EXPORT_ATTENTION, export_attention)


class PrefillGraph(torch.nn.Module):
    """Prefill over the decoder stack: every layer's K / V, last-token logits, and the role outputs."""

    def __init__(self, text_model: torch.nn.Module, lm_head: torch.nn.Module) -> None:
        super().__init__()
        self.text, self.lm_head = text_model, lm_head

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, lengths: torch.Tensor):
        hidden = inputs_embeds  # [B, S, D]
        cos, sin = self.text.rotary_emb(hidden, position_ids)  # [B, S, d] each
        presents, roles = [], [cos, sin]
        for layer in self.text.layers:
            state: dict[str, torch.Tensor] = {}
            hidden = layer(hidden, attention_mask=None, position_embeddings=(cos, sin), lightkv=state)  # [B, S, D]
            presents += [state["key"], state["value"]]
            roles += [hidden, state["query"], state["attention"]]
        last = (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])  # [B, 1, D]
        final = self.text.norm(hidden.gather(1, last))  # [B, 1, D]
        logits = self.lm_head(final)[:, 0].float()  # [B, V]
        return (logits, *presents, *roles)


class DecodeGraph(torch.nn.Module):
    """One decode step over per-layer caches of independent lengths."""

    def __init__(self, text_model: torch.nn.Module, lm_head: torch.nn.Module) -> None:
        super().__init__()
        self.text, self.lm_head = text_model, lm_head

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor):
        n = len(self.text.layers)
        keys, values, masks = past[0 : 2 * n : 2], past[1 : 2 * n : 2], past[2 * n :]
        hidden = inputs_embeds  # [B, 1, D]
        cos, sin = self.text.rotary_emb(hidden, position_ids)
        presents, roles = [], []
        for i, layer in enumerate(self.text.layers):
            ones = torch.ones_like(masks[i][:, :1])  # [B, 1]: the new token
            keep = torch.cat([masks[i], ones], dim=1)  # [B, P_i + 1]
            neg = torch.finfo(hidden.dtype).min
            additive = torch.zeros_like(keep, dtype=hidden.dtype).masked_fill(keep == 0, neg)[:, None, None, :]
            state = {"past": (keys[i], values[i])}
            hidden = layer(hidden, attention_mask=additive, position_embeddings=(cos, sin), lightkv=state)
            presents += [state["key"], state["value"]]
            roles += [state["query"], state["new_key"], state["new_value"], state["attention"]]
        logits = self.lm_head(self.text.norm(hidden))[:, -1].float()  # [B, V]
        return (logits, *presents, *roles)


@dataclass(frozen=True)
class ExportedGraphs:
    """Paths of one model's vanilla export (a cache directory) and its layer metadata."""

    directory: Path
    prefill: Path
    decode: Path
    vision: Path
    embed: Path
    meta: dict[str, Any]


def _export(module: torch.nn.Module, args: tuple, path: Path, *, input_names, output_names, dynamic_shapes) -> None:
    """torch.onnx.export (dynamo) with external data for large models; quiet unless it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # The exporter warns about every torchvision op it cannot register (torchvision is not used here), and its
    # optimizer about ops it leaves unfolded: neither needs the user's attention.
    for name in ("torch.onnx._internal.exporter._registration", "onnxscript.optimizer._constant_folding"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(None):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=OPSET,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    strip_stack_traces(program.model)
    program.save(str(path), external_data=program.model.graph.num_nodes() > 0 and _is_large(module))
    release_initializers(program.model)
    release_exporter_state()


# The exporter's optimizer runs onnxscript's rewrite rules, module-level objects whose pattern matchers keep the
# graph, node and match they last saw. Through them the last graph exported stays alive, and its initializers wrap
# the module's parameter tensors: the weights would outlive the model's release (`release_weights`). The two
# functions below cut both paths (the graph's own initializers, the matchers' state).


def release_initializers(model) -> None:
    """The saved IR graph lets go of the module's weights."""
    for value in model.graph.initializers.values():
        value.const_value = None


def release_exporter_state() -> None:
    """Reset every onnxscript pattern matcher's last graph, node and match (onnxscript 0.7; a no-op without it)."""
    try:
        from onnxscript.rewriter._matcher import PatternMatcher
    except ImportError:
        return
    for obj in gc.get_objects():
        if PatternMatcher in type(obj).__mro__:  # not isinstance: its ABC hooks would touch every object's type
            if callable(getattr(obj, "_init_match", None)):
                obj._init_match(0)  # a fresh, empty match; no current node
            if hasattr(obj, "_graph"):
                obj._graph = None


STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


def strip_stack_traces(model) -> None:
    """Drop the exporter's per-node Python stack traces (source paths and line numbers of this checkout and its
    virtualenv): they would make the same graph differ byte for byte between checkouts and code edits. The
    node names, namespaces and FX node records stay."""
    for node in model.graph.all_nodes():
        node.metadata_props.pop(STACK_TRACE_KEY, None)
    for function in model.functions.values():
        for node in function.all_nodes():
            node.metadata_props.pop(STACK_TRACE_KEY, None)


def _is_large(module: torch.nn.Module) -> bool:
    """Past 1 GiB of weights the 2 GiB protobuf limit comes into view: use external data."""
    return weight_bytes(module) > 2**30


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def attention_meta(text_model) -> dict[str, Any]:
    """The decoder's attention sizes, recorded in every graph's role metadata for the passes: layers, heads,
    KV heads, head size and the softmax scale (the HF module's own `scaling`, else SDPA's 1 / sqrt(d))."""
    cfg = text_model.config
    scaling = getattr(text_model.layers[0].self_attn, "scaling", None)
    return {
        "num_layers": len(text_model.layers),
        "num_heads": cfg.num_attention_heads,
        "num_kv_heads": cfg.num_key_value_heads,
        "head_dim": head_dim(cfg),
        "scaling": float(scaling) if scaling else head_dim(cfg) ** -0.5,
    }


def export_prefill(
    text_model, lm_head, path: Path, *, dtype: torch.dtype, positions: Positions, example_len: int = 24
) -> None:
    cfg = text_model.config
    n = len(text_model.layers)
    embeds = torch.randn(2, example_len, cfg.hidden_size, dtype=dtype)
    pos = positions.example(2, example_len)  # [*lead, 2, S]
    lengths = torch.tensor([example_len, example_len - 3])
    inputs, outputs, roles = contract.prefill_io(n)
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=32768)
    with attention_implementation(cfg, EXPORT_ATTENTION):
        _export(
            PrefillGraph(text_model, lm_head),
            (embeds, pos, lengths),
            path,
            input_names=inputs,
            output_names=outputs + roles,
            dynamic_shapes=({0: batch, 1: seq}, {positions.seq_axis - 1: batch, positions.seq_axis: seq}, {0: batch}),
        )
    model = onnx.load(str(path), load_external_data=False)
    meta = {
        **attention_meta(text_model),
        "hidden": [contract.role(f"hidden.{i}") for i in range(n)],
        "query": [contract.role(f"query.{i}") for i in range(n)],
        "key": [contract.present(i, "key") for i in range(n)],
        "cos": contract.role("cos"),
        "sin": contract.role("sin"),
        "position_ids": contract.POSITION_IDS,
        "position_scheme": positions.name,
        "lengths": contract.LENGTHS,
    }
    onnx.helper.set_model_props(model, {contract.ROLE_META_KEY: json.dumps(meta)})
    onnx.save(model, str(path))


def export_decode(
    text_model, lm_head, path: Path, *, dtype: torch.dtype, positions: Positions, example_past: int = 10
) -> None:
    cfg = text_model.config
    n = len(text_model.layers)
    hkv, hd = cfg.num_key_value_heads, head_dim(cfg)
    batch = torch.export.Dim("batch", min=1, max=64)
    past_dims = [torch.export.Dim(f"past_{i}", min=1, max=32768) for i in range(n)]
    kv = []
    for i in range(n):
        shape = (2, hkv, example_past + i, hd)  # different lengths so the exporter cannot tie the dims together
        kv += [torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)]
    masks = [torch.ones(2, example_past + i, dtype=torch.long) for i in range(n)]
    pos = positions.example(2, 1) + example_past + 3  # [*lead, 2, 1]
    args = (torch.randn(2, 1, cfg.hidden_size, dtype=dtype), pos, *kv, *masks)
    past_dyn = [{0: batch, 2: past_dims[i]} for i in range(n) for _ in range(2)]
    past_dyn += [{0: batch, 1: past_dims[i]} for i in range(n)]
    dyn = ({0: batch}, {positions.seq_axis - 1: batch}, tuple(past_dyn))  # *past is one tuple argument to torch.export
    inputs, outputs, roles = contract.decode_io(n)
    with attention_implementation(cfg, EXPORT_ATTENTION):
        _export(
            DecodeGraph(text_model, lm_head),
            args,
            path,
            input_names=inputs,
            output_names=outputs + roles,
            dynamic_shapes=dyn,
        )
    model = onnx.load(str(path), load_external_data=False)
    onnx.helper.set_model_props(model, {contract.ROLE_META_KEY: json.dumps(attention_meta(text_model))})
    onnx.save(model, str(path))


def strip_roles(model: onnx.ModelProto, keep_role=lambda name: False) -> onnx.ModelProto:
    """A graph with its role outputs removed (their producers stay; they feed the real outputs), but those that
    `keep_role(name)`: the vanilla prefill, and the graphs of targets that keep the standard attention."""
    keep = [o for o in model.graph.output if not o.name.startswith(contract.ROLE_PREFIX) or keep_role(o.name)]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    return model


class EmbedGraph(torch.nn.Module):
    def __init__(self, text_model: torch.nn.Module) -> None:
        super().__init__()
        self.embed = text_model.embed_tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids)  # [B, S, D]


def export_embed(text_model, path: Path) -> None:
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=1, max=32768)
    _export(
        EmbedGraph(text_model),
        (torch.tensor([[1, 2, 3], [4, 5, 6]]),),
        path,
        input_names=[contract.INPUT_IDS],
        output_names=[contract.INPUTS_EMBEDS],
        dynamic_shapes=({0: batch, 1: seq},),
    )


def export_vision(loaded: LoadedModel, path: Path, *, dtype: torch.dtype) -> dict:
    """The family's vision graph, dynamic where the model's processor lets the image vary (traced on an image of the
    model's reference size: the graph is byte for byte the same for any example); returns the graph's inputs and
    shapes as the manifest records them (-1: any size)."""
    vision = loaded.family.vision_export(loaded, tuple(loaded.spec.default_image_size), dtype)
    _export(
        vision.module,
        tuple(vision.example.values()),
        path,
        input_names=list(vision.example),
        output_names=[contract.IMAGE_EMBEDS],
        dynamic_shapes=vision.dynamic_shapes,
    )
    import onnx

    return {"vision_inputs": contract.graph_input_shapes(onnx.load(str(path), load_external_data=False))}


GRAPHS = ("vision", "embed", "prefill", "decode")


# Config fields that name or describe a checkpoint but do not change a graph; `save_pretrained` sets
# `architectures` on the config in place, which must not make a model that was saved export again.
NON_GRAPH_CONFIG_KEYS = frozenset({"architectures", "_name_or_path", "transformers_version"})


def graph_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config as the graphs see it: NON_GRAPH_CONFIG_KEYS dropped at every level."""
    return {
        k: graph_config(v) if isinstance(v, dict) else v for k, v in config.items() if k not in NON_GRAPH_CONFIG_KEYS
    }


def export_key(loaded: LoadedModel, *, dtype: torch.dtype) -> str:
    """Cache key: the weights, the architecture, the export settings and the toolchain."""
    import transformers

    h = hashlib.sha256()
    for name, tensor in sorted(loaded.model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().flatten()[:: max(1, tensor.numel() // 4096)].numpy().tobytes())
        h.update(str(tuple(tensor.shape)).encode())
    h.update(json.dumps(graph_config(loaded.model.config.to_dict()), sort_keys=True, default=str).encode())
    settings = (str(dtype), EXPORT_VERSION, OPSET, torch.__version__, transformers.__version__)
    h.update(repr(settings).encode())
    return h.hexdigest()[:16]


PARALLEL_EXPORT_MAX_BYTES = 2**30  # past this, writing the weights dominates and two copies in flight cost memory
WORKER_TIMEOUT_S = 600.0  # LIGHTKV_EXPORT_TIMEOUT_S: past this the worker is stopped and the graph exported here


@dataclass(frozen=True)
class ModelSource:
    """How to load the same model again in another process (what build.py was given)."""

    model: str
    random_weights: bool = False


def parallel_export_ok(model: torch.nn.Module, source: ModelSource | None) -> bool:
    """Export the decode graph in a second, freshly started process while this one exports the rest: the graphs
    are independent and torch.export is single-threaded Python, so a second core halves a small model's cold
    export. The worker loads the model itself from `source` (nothing is forked: a fork of a process that holds
    ONNX Runtime or torch threads can deadlock). LIGHTKV_EXPORT_PARALLEL=0 turns it off."""
    if source is None or os.environ.get("LIGHTKV_EXPORT_PARALLEL", "1") == "0" or (os.cpu_count() or 1) < 2:
        return False
    return weight_bytes(model) <= PARALLEL_EXPORT_MAX_BYTES


def worker_timeout_s() -> float:
    try:
        return float(os.environ.get("LIGHTKV_EXPORT_TIMEOUT_S", WORKER_TIMEOUT_S))
    except ValueError:
        return WORKER_TIMEOUT_S


def start_worker(spec: dict[str, Any], log_path: Path) -> subprocess.Popen:
    """`python -m lightkv_export.export_worker SPEC` with its output in `log_path`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # this process keeps the other core busy
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "lightkv_export.export_worker", json.dumps(spec)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )  # fmt: skip


def wait_worker(worker: subprocess.Popen, log_path: Path, deadline: float) -> str | None:
    """None when the worker exported its graph; else why not (it is stopped and reaped either way)."""
    try:
        code = worker.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        stop_worker(worker)
        return f"it gave no answer within {worker_timeout_s():g} s (LIGHTKV_EXPORT_TIMEOUT_S) and was stopped"
    if code == 0:
        return None
    try:
        lines = log_path.read_text(errors="replace").strip().splitlines()
    except OSError:
        lines = []
    return f"it exited with code {code}" + (f": {lines[-1]}" if lines else "")


def stop_worker(worker: subprocess.Popen) -> None:
    if worker.poll() is None:
        worker.kill()
    worker.wait()


def export_model(
    loaded: LoadedModel,
    cache_root: Path,
    *,
    dtype: torch.dtype,
    source: ModelSource | None = None,
    log=lambda msg: None,
) -> ExportedGraphs:
    """The vanilla graphs of `loaded`, exported once into cache_root/<model>-<key>/ and verified on reuse.

    A cached export whose files no longer match their recorded hashes (a crash, a truncated copy) is rebuilt.
    Builds of the same export wait for each other (a lock per key); the export is written under a temporary
    name and renamed into place complete. With `source`, small models export the decode graph in a worker.
    """
    key = export_key(loaded, dtype=dtype)
    directory = cache_root / f"{loaded.spec.dir_name}-{key}"
    cache_root.mkdir(parents=True, exist_ok=True)
    with locked(directory, what="the export cache entry", log=log):
        cached = _cached(directory, log)
        if cached is not None:
            return cached
        for stale in remove_stale_partials(directory):
            log(f"removed {stale}, left by an interrupted export")
        with staging(directory) as tmp:
            meta = _export_all(loaded, tmp, key=key, dtype=dtype, source=source, log=log)
            write_text_atomic(tmp / "export.json", json.dumps(meta, indent=2))
            promote(tmp, directory)
    return _graphs(directory, meta)


def _cached(directory: Path, log) -> ExportedGraphs | None:
    record = directory / "export.json"
    if not record.exists():
        return None
    try:
        meta = json.loads(record.read_text())
        if all(graph_digest(directory / f"{g}.onnx") == meta["sha256"][g] for g in GRAPHS):
            log(f"reusing cached export {directory}")
            return _graphs(directory, meta)
        log(f"cached export {directory} is corrupt (hash mismatch): exporting again")
    except (OSError, ValueError, KeyError, TypeError):
        log(f"cached export {directory} is unreadable: exporting again")
    return None


def _export_all(loaded, tmp: Path, *, key: str, dtype, source: ModelSource | None, log) -> dict:
    text, head = loaded.family.text_model(loaded.model), loaded.family.lm_head(loaded.model)
    decode = tmp / "decode.onnx"
    worker = None
    if parallel_export_ok(loaded.model, source):
        spec = {
            "model": source.model,
            "random_weights": source.random_weights,
            "dtype": str(dtype).removeprefix("torch."),
            "key": key,
            "path": str(decode),
            "parent": os.getpid(),
        }
        worker_log = tmp / "decode-worker.log"
        worker, deadline = start_worker(spec, worker_log), time.monotonic() + worker_timeout_s()
    try:
        profile = export_vision(loaded, tmp / "vision.onnx", dtype=dtype)
        export_embed(text, tmp / "embed.onnx")
        export_prefill(text, head, tmp / "prefill.onnx", dtype=dtype, positions=loaded.family.positions)
        why = "" if worker is None else wait_worker(worker, worker_log, deadline)
    except BaseException:  # failed or interrupted here: the worker's graph is of no use
        if worker is not None:
            stop_worker(worker)
        raise
    finally:
        if worker is not None:
            worker_log.unlink(missing_ok=True)
    if worker is None or why:
        if why:
            log(f"the decode-graph export in a second process failed ({why}); exporting it in this process")
            decode.unlink(missing_ok=True)
        export_decode(text, head, decode, dtype=dtype, positions=loaded.family.positions)
    return {
        "model": loaded.spec.key,
        "key": key,
        "dtype": str(dtype).removeprefix("torch."),
        **profile,
        "num_layers": len(text.layers),
        "sha256": {g: graph_digest(tmp / f"{g}.onnx") for g in GRAPHS},
    }


def _graphs(directory: Path, meta: dict[str, Any]) -> ExportedGraphs:
    return ExportedGraphs(
        directory=directory,
        prefill=directory / "prefill.onnx",
        decode=directory / "decode.onnx",
        vision=directory / "vision.onnx",
        embed=directory / "embed.onnx",
        meta=meta,
    )
