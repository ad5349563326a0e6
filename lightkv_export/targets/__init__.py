"""Engine targets behind one interface: what the pipeline builds, the runtime opens and a repository serves.

    target("ort-cpu"), target("trt-sm90"), target("trt") -> Target

Each target module (targets/ort.py, targets/trt.py) provides

    build_engine(name, directory, *, destination, exported, prefill, processor, manifest, config) -> dict
        the engine's files written into `directory` (a staging directory for `destination`); returns the
        manifest record, which the pipeline completes with the file records
    open_sessions(directory, manifest) -> {graph name: Session}

and is imported only when a target of it is used (TensorRT itself only inside targets/trt.py's functions).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from lightkv_export.errors import InputError
from lightkv_export.targets.trt import LOCAL_TARGET, TRT_TARGETS

NAMES = ("ort-cpu", LOCAL_TARGET, *TRT_TARGETS)  # TensorRT: the compute capabilities the kernels compile for


@dataclass(frozen=True)
class Target:
    """One engine target: its name, the module that builds and opens it, and how it runs."""

    name: str
    module: str
    instance_kind: str  # the Triton instance group: KIND_CPU or KIND_GPU
    float32_only: bool  # ONNX Runtime's CPU kernels: float32 engines; TensorRT: float16 unless bfloat16 is asked

    def engine_dtype(self, requested: str) -> str:
        """The engine's dtype for a build asked for `requested` (a torch dtype name)."""
        if self.float32_only:
            return "float32"
        return "bfloat16" if requested == "bfloat16" else "float16"

    def implementation(self) -> ModuleType:
        return importlib.import_module(self.module)

    def build(self, directory, **kwargs) -> dict:
        return self.implementation().build_engine(self.name, directory, **kwargs)

    def open_sessions(self, directory, manifest) -> dict:
        return self.implementation().open_sessions(directory, manifest)


def target(name: str) -> Target:
    """The target called `name`; an unknown name is an InputError listing the known ones."""
    if name == "ort-cpu":
        return Target(name, "lightkv_export.targets.ort", "KIND_CPU", float32_only=True)
    if name in NAMES:
        return Target(name, "lightkv_export.targets.trt", "KIND_GPU", float32_only=False)
    raise InputError(f"unknown engine target {name!r}; expected one of {', '.join(NAMES)}")
