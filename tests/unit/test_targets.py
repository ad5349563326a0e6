"""The target registry (targets/__init__.py): every known name resolves to a module with the target interface."""

from __future__ import annotations

import inspect

import pytest

from lightkv_export.errors import InputError
from lightkv_export.targets import NAMES, target


@pytest.mark.parametrize("name", NAMES)
def test_every_target_has_the_interface(name):
    t = target(name)
    impl = t.implementation()
    build = inspect.signature(impl.build_engine).parameters
    assert list(build)[1] == "directory"  # (the target's name, the staging directory, then keywords)
    assert {"destination", "exported", "prefill", "processor", "manifest", "config"} <= set(build)
    assert list(inspect.signature(impl.open_sessions).parameters) == ["directory", "manifest"]


def test_where_each_target_runs_and_in_which_dtype():
    cpu, gpu = target("ort-cpu"), target("trt-sm90")
    assert (cpu.instance_kind, gpu.instance_kind, target("trt").instance_kind) == ("KIND_CPU", "KIND_GPU", "KIND_GPU")
    assert [cpu.engine_dtype(d) for d in ("float32", "float16", "bfloat16")] == ["float32"] * 3
    assert [gpu.engine_dtype(d) for d in ("float32", "float16", "bfloat16")] == ["float16", "float16", "bfloat16"]


@pytest.mark.parametrize("name", ["cuda", "trt-sm75", "ORT-CPU", ""])
def test_an_unknown_target_names_the_known_ones(name):
    with pytest.raises(InputError, match=r"unknown engine target .*expected one of ort-cpu, trt, trt-sm80"):
        target(name)
