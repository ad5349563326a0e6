"""TensorRT targets without TensorRT: target names, clear errors, kernels still compiled, and the plugin lowering."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import onnx
import pytest
import torch

from lightkv_export.errors import InputError
from lightkv_export.method import onnx_function
from lightkv_export.passes.lower_trt_plugin import lower_trt_plugin
from lightkv_export.targets import trt

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
HAS_GPU = torch.cuda.is_available()


@pytest.mark.parametrize(
    ("name", "expected"),
    [("trt-sm80", (8, 0)), ("trt-sm86", (8, 6)), ("trt-sm89", (8, 9)), ("trt-sm90", (9, 0)), ("trt-sm100", (10, 0)),
     ("trt-sm120", (12, 0)), ("trt", None)],
)  # fmt: skip
def test_parse_trt_target(name: str, expected: tuple[int, int] | None) -> None:
    assert trt.parse_trt_target(name) == expected


@pytest.mark.parametrize("name", ["trt-sm75", "sm90", "trt-90", "ort-cpu", ""])
def test_unknown_targets_are_input_errors(name: str) -> None:
    with pytest.raises(InputError, match="trt-sm90"):
        trt.parse_trt_target(name)


@pytest.mark.skipif(HAS_TRT and HAS_GPU, reason="TensorRT and a GPU are present: nothing is missing")
def test_missing_tensorrt_or_gpu_is_a_clear_error() -> None:
    with pytest.raises(trt.TargetUnavailableError) as err:
        trt.check_trt_available("trt-sm90")
    assert err.value.exit_code == 2
    message = str(err.value)
    assert "trt-sm90" in message
    if not HAS_TRT:
        assert "TensorRT" in message
    if not HAS_GPU:
        assert "CUDA GPU" in message


@pytest.mark.skipif(HAS_TRT and HAS_GPU, reason="TensorRT and a GPU are present: the build would run")
def test_build_without_tensorrt_keeps_the_target_kernels(tmp_path: Path) -> None:
    model_path = tmp_path / "merge.onnx"
    onnx.save(onnx_function.standalone_model(onnx.TensorProto.FLOAT16), str(model_path))
    profile = trt.Profile({"hidden": ((1, 8, 16), (2, 64, 16), (4, 128, 16))})
    with pytest.raises(trt.TargetUnavailableError):
        trt.build_trt_engine(model_path, tmp_path / "engine", target="trt-sm89", precision="fp16", profiles=[profile])
    summary = json.loads((tmp_path / "engine" / "kernels" / "summary.json").read_text())
    assert {(k["kernel"], k["target"], k["dtype"]) for k in summary["kernels"]} == {
        (k, "sm89", "fp16") for k in ("match", "plan", "emit")
    }
    assert (tmp_path / "engine" / "kernels" / "sm89" / "emit_fp16.ptx").read_text().count(".target sm_89") == 1
    assert not (tmp_path / "engine" / "model.plan").exists()


def test_build_rejects_bad_precision_and_missing_profiles(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="precision"):
        trt.build_trt_engine(tmp_path / "m.onnx", tmp_path, target="trt-sm90", precision="fp32", profiles=[])  # type: ignore[arg-type]
    with pytest.raises(InputError, match="profile"):
        trt.build_trt_engine(tmp_path / "m.onnx", tmp_path, target="trt-sm90", precision="fp16", profiles=[])


def test_lowering_maps_the_node_to_the_aot_plugin_chain() -> None:
    model = onnx_function.standalone_model(onnx.TensorProto.BFLOAT16)
    lowered = lower_trt_plugin(model)
    ops = [n.op_type for n in lowered.graph.node]
    assert ops == ["LightKVMatch", "LightKVPlan", "LightKVEmit"]
    for node in lowered.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs == {"plugin_namespace": b"lightkv", "plugin_version": b"1", "aot": 1}
    match, plan, emit = lowered.graph.node
    assert list(match.input) == ["hidden", "win_index"]
    assert list(plan.input)[:5] == ["guidance", "win_index", "win_r", "lengths", "out_lengths"]
    assert list(plan.input)[5:] == list(match.output) and plan.output[0] == "kept"
    assert list(emit.input) == ["hidden", "guidance", "win_index", "kept", plan.output[2], plan.output[3]]
    assert list(emit.output) == ["hidden_out"]
    assert not lowered.functions  # TensorRT must see the plugins, not the function body
    assert len(model.functions) == 1 and model.graph.node[0].op_type == "LightKVMerge"  # the input is untouched
    onnx.checker.check_model(lowered, full_check=False)


def test_trt_plugin_module_imports_without_tensorrt() -> None:
    from plugins.lightkv import trt_plugin

    assert trt_plugin.PLUGINS == ("LightKVMatch", "LightKVPlan", "LightKVEmit") and 1 in trt_plugin.TACTICS
    if not HAS_TRT:
        with pytest.raises(ImportError):
            trt_plugin.register_plugins("sm90")


@pytest.mark.skipif(not (HAS_TRT and HAS_GPU), reason="needs TensorRT and a CUDA GPU")
def test_plugins_register_with_tensorrt() -> None:
    from plugins.lightkv import trt_plugin

    major, minor = torch.cuda.get_device_capability(0)
    trt_plugin.register_plugins(f"sm{major}{minor}")
    import tensorrt

    names = {c.name for c in tensorrt.get_plugin_registry().all_creators}
    assert set(trt_plugin.PLUGINS) <= names
