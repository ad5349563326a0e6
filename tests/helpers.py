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
    schedule = Schedule(engine.num_layers, ()) if manifest.get("vanilla") else engine.schedule
    return torch_runtime.generate(
        loaded, torch_inputs(engine.prepare(images, prompt)), schedule, max_new_tokens=max_new_tokens,
        positions=manifest["positions"], grid_mode=manifest["grid_mode"],
    )  # fmt: skip
