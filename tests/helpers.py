"""Helpers shared by the test modules (not fixtures: plain functions)."""

from __future__ import annotations

import hashlib

import torch


def state_checksum(model: torch.nn.Module) -> str:
    """SHA-256 over a model's state dict, names and bytes in order."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.contiguous().numpy().tobytes())
    return h.hexdigest()


def reference_run(loaded, engine, images, prompt: str, max_new_tokens: int):
    """The PyTorch LightKV runtime on the engine's own prepared inputs, with the engine's schedule and modes (as
    parity.check_model runs it): the truth an engine's or a server's answer is compared with."""
    from lightkv_export import torch_runtime
    from lightkv_export.inputs import torch_inputs
    from lightkv_export.method.schedule import Schedule

    manifest = engine.manifest
    schedule = Schedule(engine.num_layers, ()) if manifest.vanilla else engine.schedule
    return torch_runtime.generate(
        loaded, torch_inputs(engine.prepare(images, prompt)), schedule, max_new_tokens=max_new_tokens,
        positions=manifest.positions, grid_mode=manifest.grid_mode,
    )  # fmt: skip


def make_manifest(**fields):
    """A complete typed Manifest of a plausible tiny engine, with `fields` replacing the defaults (for tests that
    need a manifest without building an engine)."""
    from lightkv_export.artifacts import MANIFEST_FORMAT, Manifest, ReferenceRequest

    layers = int(fields.get("num_layers", 4))
    reference = ReferenceRequest(
        prompt="Describe this image.",
        seq_len=40,
        vision_tokens=16,
        image_layouts=[[[4, 4]]],
        kv_lengths=[40] * layers,
        vision_tokens_per_layer=[16] * layers,
        kv_bytes_per_layer=[40 * 2 * 2 * 16 * 4] * layers,
        kv_bytes_vanilla_per_layer=[40 * 2 * 2 * 16 * 4] * layers,
    )
    defaults = dict(
        format=MANIFEST_FORMAT, model="tiny-qwen-vl", model_dir="tiny-qwen-vl", model_source="tiny-qwen-vl",
        family="qwen2_5_vl", random_weights=False, vanilla=False, ratio=0.55, schedule="", retention=1.0,
        positions="preserve", grid_mode="true", image_size=[112, 112],
        vision_inputs={"pixel_values": [-1, 1176]}, num_layers=layers, hidden_size=64, num_kv_heads=2, head_dim=16,
        num_attention_heads=4, intermediate_size=128, vocab_size=600, image_token_id=5, position_scheme="mrope",
        eos_token_ids=[2], max_new_tokens_limit=64, export_key="0" * 16, reference_request=reference,
        versions={}, created="2026-12-02T00:00:00+00:00", dtype="float32", target="ort-cpu",
    )  # fmt: skip
    return Manifest(**(defaults | fields))


def export_entry(engine_dir):
    """The export cache entry an engine was built from, OUT/.cache/export/<model_dir>-<export_key> (a session's
    builds share it: tests that need the vanilla graphs read them here instead of exporting again)."""
    import json

    manifest = json.loads((engine_dir / "manifest.json").read_text())
    entry = engine_dir.parents[2] / ".cache" / "export" / f"{manifest['model_dir']}-{manifest['export_key']}"
    assert entry.is_dir(), entry
    return entry
