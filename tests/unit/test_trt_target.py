"""TensorRT targets without TensorRT: target names, clear errors, kernels still compiled, and the plugin lowering."""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import sys
import types
import typing
from pathlib import Path

import numpy as np
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
    assert ops == ["LightKVMatch", "LightKVPlan", "LightKVEmit", "Cast"]
    for node in lowered.graph.node[:3]:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs == {"plugin_namespace": b"lightkv", "plugin_version": b"1", "aot": 1}
    match, plan, emit, cast = lowered.graph.node
    # The function's assign output is the plan kernel's (int32 there): parity's tie-aware check reads it.
    assert list(cast.input) == [plan.output[2]] and list(cast.output) == ["assign"]
    assert onnx.helper.get_attribute_value(cast.attribute[0]) == onnx.TensorProto.INT64
    assert list(match.input) == ["hidden", "win_index"]
    assert list(plan.input)[:5] == ["guidance", "win_index", "win_r", "lengths", "out_slots"]
    assert list(plan.input)[5:] == list(match.output) and len(plan.output) == 3 and plan.output[0] == "kept"
    assert list(emit.input) == ["hidden", "guidance", "win_index", "kept", plan.output[1], plan.output[2]]
    (slots,) = [i for i in lowered.graph.input if i.name == "out_slots"]  # S' as a graph input's dimension
    assert slots.type.tensor_type.elem_type == onnx.TensorProto.INT64 and len(slots.type.tensor_type.shape.dim) == 1
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


# --- the plugin registration against a stub tensorrt.plugin (the real one needs TensorRT and a driver) ------------
# The stub checks what TensorRT 10.9+'s tensorrt.plugin checks (its _validate.py, _tensor.py and _lib.py): the
# signature rules of register / autotune / aot_impl (type hints that are classes, argument names and order, return
# annotations), no arithmetic on size-tensor expressions, ceil-division of two plain ints refused, and a size
# tensor needs an upper bound. Shape expressions carry concrete values, so shapes and launch scalars can be compared.


class _Expr:
    """trtp.ShapeExpr with a concrete value; a size-tensor expression refuses every binary operation, as the real
    one does ("It is not permitted to perform binary operations on size tensor expressions")."""

    def __init__(self, value: int, size_tensor: bool = False) -> None:
        self.value, self.size_tensor = int(value), size_tensor

    def _op(self, other, fn):
        if self.size_tensor or (isinstance(other, _Expr) and other.size_tensor):
            raise ValueError("It is not permitted to perform binary operations on size tensor expressions")
        return _Expr(fn(self.value, other.value if isinstance(other, _Expr) else int(other)))

    def __add__(self, other):
        return self._op(other, lambda a, b: a + b)

    def __sub__(self, other):
        return self._op(other, lambda a, b: a - b)

    def __mul__(self, other):
        return self._op(other, lambda a, b: a * b)

    def __floordiv__(self, other):
        return self._op(other, lambda a, b: a // b)

    __radd__, __rmul__ = __add__, __mul__

    def __int__(self) -> int:
        return self.value

    __index__ = __int__

    def __eq__(self, other) -> bool:
        return self.value == (other.value if isinstance(other, _Expr) else other)

    def __hash__(self) -> int:
        return hash(self.value)

    def __gt__(self, other) -> bool:  # for the test's own checks (the real one builds a comparison expression)
        return self.value > int(other)

    def __repr__(self) -> str:
        return f"{'Size' if self.size_tensor else ''}Expr({self.value})"


def _exprs(shape) -> tuple[_Expr, ...]:
    return tuple(d if isinstance(d, _Expr) else _Expr(d) for d in shape)


class _Desc:
    """trtp.TensorDesc: shape expressions and a dtype."""

    def __init__(self, shape, dtype: str) -> None:
        self.shape_expr, self.dtype = _exprs(shape), dtype


class _SizeTensor(_Desc):
    def __init__(self, opt, upper_bound) -> None:
        if upper_bound is None:
            raise ValueError("a size tensor needs an upper bound")
        super().__init__((), "int32")
        self.opt, self.upper_bound = _Expr(int(opt)), _Expr(int(upper_bound))

    def expr(self) -> _Expr:
        return _Expr(int(self.upper_bound), size_tensor=True)


class _Combination:
    def __init__(self, spec: str) -> None:
        self.spec, self.tactic_ids = spec, None

    def tactics(self, ids: list[int]) -> None:
        self.tactic_ids = ids


class _LaunchParams:
    grid_x = grid_y = block_x = shared_mem = None


class _SymExprs(tuple):
    """trtp.SymExprs; SymIntExprs.from_tuple builds one."""


class _SymIntExprs(_SymExprs):
    @classmethod
    def from_tuple(cls, exprs) -> _SymIntExprs:
        return cls(int(e) for e in exprs)


def _cdiv(a, b) -> _Expr:
    if isinstance(a, int) and isinstance(b, int):
        raise ValueError("Both arguments cannot be 'int's")
    return _exprs([a])[0]._op(b, lambda x, y: -(-x // y))


def _params(fn) -> list[inspect.Parameter]:
    return list(inspect.signature(fn).parameters.values())


def _validate_register(fn) -> tuple[list[str], int]:
    """tensorrt.plugin's register rules (no attributes here): every argument a positional-or-keyword TensorDesc with
    a class type hint and no default; the return hint TensorDesc or tuple[TensorDesc, ...]. -> (names, outputs)."""
    names = []
    for p in _params(fn):
        assert p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, f"{p.name}: not positional-or-keyword"
        assert p.annotation is not inspect.Parameter.empty, f"{p.name}: no type annotation"
        assert p.default is inspect.Parameter.empty, f"{p.name}: default values are not supported"
        assert inspect.isclass(p.annotation) and issubclass(p.annotation, _Desc), f"{p.name}: not a TensorDesc"
        names.append(p.name)
    ret = inspect.signature(fn).return_annotation
    if typing.get_origin(ret) is tuple:
        assert all(issubclass(a, _Desc) for a in typing.get_args(ret)), ret
        return names, len(typing.get_args(ret))
    assert inspect.isclass(ret) and issubclass(ret, _Desc), f"register return annotation {ret}"
    return names, 1


def _validate_outputs_hint(p: inspect.Parameter) -> None:
    assert typing.get_origin(p.annotation) is tuple, f"'outputs' should be tuple[TensorDesc], got {p.annotation}"
    assert all(issubclass(a, _Desc) for a in typing.get_args(p.annotation))


def _validate_tensor_hints(params: list[inspect.Parameter]) -> None:
    """Hints are optional after register, but a given one must be a TensorDesc class (issubclass in _validate.py)."""
    for p in params:
        if p.annotation is not inspect.Parameter.empty:
            assert inspect.isclass(p.annotation) and issubclass(p.annotation, _Desc), f"{p.name}: not a TensorDesc"


def _validate_autotune(fn, tensors: list[str]) -> None:
    params = _params(fn)
    assert [p.name for p in params] == [*tensors, "outputs"], "autotune arguments: the tensors, then outputs"
    _validate_tensor_hints(params[:-1])
    _validate_outputs_hint(params[-1])
    ret = inspect.signature(fn).return_annotation
    if typing.get_origin(ret) is list:
        assert all(issubclass(a, _Combination) for a in typing.get_args(ret)), ret
    else:
        assert inspect.isclass(ret) and issubclass(ret, _Combination), f"autotune return annotation {ret}"


def _validate_aot_impl(fn, tensors: list[str]) -> None:
    params = _params(fn)
    assert [p.name for p in params] == [*tensors, "outputs", "tactic"], "aot_impl: the tensors, outputs, tactic"
    _validate_tensor_hints(params[:-2])
    _validate_outputs_hint(params[-2])
    assert params[-1].annotation is int, "'tactic' input argument should be an int"
    ret = inspect.signature(fn).return_annotation
    args = typing.get_args(ret)
    assert typing.get_origin(ret) is tuple and len(args) == 4, f"aot_impl return annotation {ret}"
    for text in args[:2]:  # kernel name and PTX: str, bytes or str | bytes
        members = typing.get_args(text) if isinstance(text, types.UnionType) else (text,)
        assert all(m in (str, bytes) for m in members), text
    assert issubclass(args[2], _LaunchParams) and issubclass(args[3], _SymExprs), ret


def _stub_tensorrt() -> tuple[types.ModuleType, types.ModuleType, dict[str, dict[str, object]]]:
    """`tensorrt` and `tensorrt.plugin` modules that validate and record what the decorators receive, per plugin
    and role."""
    registered: dict[str, dict[str, object]] = {}

    def decorator(role: str):
        def wrap(plugin_id: str):
            namespace, _, name = plugin_id.partition("::")
            assert name and "." not in namespace and "." not in name, plugin_id
            assert namespace not in ("", "trt", "tensorrt", "std"), f"{namespace} is a reserved namespace"

            def record(fn):
                roles = registered.setdefault(plugin_id, {})
                if role == "register":
                    roles["tensors"], roles["outputs"] = _validate_register(fn)
                else:  # autotune and aot_impl come after register and must follow its tensors
                    assert "register" in roles, f"{role} of {plugin_id} before its register"
                    check = _validate_autotune if role == "autotune" else _validate_aot_impl
                    check(fn, roles["tensors"])
                roles[role] = fn
                return fn

            return record

        return wrap

    trt_mod = types.ModuleType("tensorrt")
    trt_mod.__version__ = "10.11.0.33"
    trt_mod.float32, trt_mod.float16, trt_mod.bfloat16 = "float32", "float16", "bfloat16"
    trt_mod.int32, trt_mod.int64 = "int32", "int64"
    trtp = types.ModuleType("tensorrt.plugin")
    trtp.register, trtp.autotune, trtp.aot_impl = decorator("register"), decorator("autotune"), decorator("aot_impl")
    trtp.TensorDesc, trtp.AutoTuneCombination, trtp.KernelLaunchParams = _Desc, _Combination, _LaunchParams
    trtp.SymExprs, trtp.SymIntExprs, trtp.SymInt32 = _SymExprs, _SymIntExprs, int
    trtp.cdiv = _cdiv
    trtp.from_shape_expr = lambda shape, dtype: _Desc(shape, dtype)
    trtp.size_tensor = _SizeTensor
    trt_mod.plugin = trtp
    return trt_mod, trtp, registered


@pytest.fixture(scope="module")
def stub_plugins() -> dict[str, dict[str, object]]:
    """register_plugins("sm80") run against the stub modules, which live in sys.modules for this fixture only."""
    from plugins.lightkv import trt_plugin

    trt_mod, trtp, registered = _stub_tensorrt()
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "tensorrt", trt_mod)
        mp.setitem(sys.modules, "tensorrt.plugin", trtp)
        mp.setattr(trt_plugin, "_registered", set())
        trt_plugin.register_plugins("sm80")
    return registered


# B = 2, S = 300, D = 160, W = 3 windows of n_max = 131 slots (na = 66), S' = 200: big enough that every grid
# dimension has several tiles, so a grid computed from the wrong size shows.
B, S, D, W, N_MAX, NA, S_OUT = 2, 300, 160, 3, 131, 66, 200
PLUGIN_IO = {  # plugin -> (inputs, outputs) as TensorDescs
    "LightKVMatch": (
        [_Desc((B, S, D), "float16"), _Desc((W, N_MAX), "int64")],
        [_Desc((W, NA), "float32"), _Desc((W, NA), "int32")],
    ),
    "LightKVPlan": (
        [_Desc((B, S), "float32"), _Desc((W, N_MAX), "int64"), _Desc((W,), "int64"), _Desc((B,), "int64"),
         _Desc((S_OUT,), "int64"), _Desc((W, NA), "float32"), _Desc((W, NA), "int32")],
        [_Desc((B, S_OUT), "int64"), _Desc((B * S,), "int32"), _Desc((W, NA), "int32")],
    ),
    "LightKVEmit": (
        [_Desc((B, S, D), "float16"), _Desc((B, S), "float32"), _Desc((W, N_MAX), "int64"),
         _Desc((B, S_OUT), "int64"), _Desc((B * S,), "int32"), _Desc((W, NA), "int32")],
        [_Desc((B, S_OUT, D), "float16")],
    ),
}  # fmt: skip


def test_stub_registration_covers_every_plugin_and_role(stub_plugins: dict[str, dict[str, object]]) -> None:
    from plugins.lightkv import trt_plugin

    assert set(stub_plugins) == {f"lightkv::{name}" for name in trt_plugin.PLUGINS}
    # every role registered, each through the stub's signature checks (it recorded register's tensors and outputs)
    assert all(set(roles) >= {"register", "autotune", "aot_impl", "tensors"} for roles in stub_plugins.values())
    assert [stub_plugins[f"lightkv::{p}"]["outputs"] for p in trt_plugin.PLUGINS] == [2, 3, 1]


@pytest.mark.parametrize("plugin", list(PLUGIN_IO))
def test_descriptors_and_autotune_match_the_io_count(stub_plugins: dict[str, dict[str, object]], plugin: str) -> None:
    inputs, outputs = PLUGIN_IO[plugin]
    fns = stub_plugins[f"lightkv::{plugin}"]
    declared = fns["register"](*inputs)
    declared = declared if isinstance(declared, tuple) else (declared,)
    assert len(declared) == len(outputs)
    assert [d.dtype for d in declared] == [o.dtype for o in outputs]
    for combo in fns["autotune"](*inputs, tuple(outputs)):
        assert len(combo.spec.split(",")) == len(inputs) + len(outputs), combo.spec
        # One tactic per AOT plugin until several are verified (multi-tactic AOT needs TensorRT >= 11.1's runner).
        assert combo.tactic_ids in (None, [1]), combo.tactic_ids


def test_plan_sizes_kept_from_the_out_slots_dimension(stub_plugins: dict[str, dict[str, object]]) -> None:
    """S' reaches TensorRT as out_slots' dimension: every declared shape is plain arithmetic, no size tensor."""
    kept, dest, assign = stub_plugins["lightkv::LightKVPlan"]["register"](*PLUGIN_IO["LightKVPlan"][0])
    assert kept.shape_expr == (B, S_OUT) and dest.shape_expr == (B * S,) and assign.shape_expr == (W, NA)
    for plugin, (inputs, _) in PLUGIN_IO.items():
        declared = stub_plugins[f"lightkv::{plugin}"]["register"](*inputs)
        for desc in declared if isinstance(declared, tuple) else (declared,):
            assert not isinstance(desc, _SizeTensor) and not any(d.size_tensor for d in desc.shape_expr), plugin


def test_the_stub_refuses_what_tensorrt_refuses(stub_plugins: dict[str, dict[str, object]]) -> None:
    """The checks the stub makes would have caught the earlier design: S' as a size tensor of Plan made Emit's
    launch grid arithmetic on a size-tensor expression, which tensorrt.plugin refuses."""
    _, trtp, _ = _stub_tensorrt()
    s_prime = trtp.size_tensor(opt=S, upper_bound=S)
    inputs, outputs = PLUGIN_IO["LightKVEmit"]
    kept_sized = _Desc((B, s_prime.expr()), "int64")
    with pytest.raises(ValueError, match="size tensor expressions"):
        stub_plugins["lightkv::LightKVEmit"]["aot_impl"](*inputs[:3], kept_sized, *inputs[4:], tuple(outputs), 1)
    with pytest.raises(ValueError, match="upper bound"):
        trtp.size_tensor(opt=S, upper_bound=None)
    with pytest.raises(ValueError, match="cannot be 'int's"):
        trtp.cdiv(4, 2)

    def untyped(hidden, win_index):
        return hidden

    def typed(hidden):
        return hidden

    def wrong_order(hidden, tactic, outputs):
        raise AssertionError("never called")

    # Real classes as hints (this test module's own hints are strings: `from __future__ import annotations`).
    untyped.__annotations__ = {"return": _Desc}
    typed.__annotations__ = {"hidden": _Desc, "return": _Desc}
    wrong_order.__annotations__ = {"hidden": _Desc, "tactic": int, "outputs": tuple[_Desc],
                                   "return": tuple[str, str, _LaunchParams, _SymExprs]}  # fmt: skip
    with pytest.raises(AssertionError, match="no type annotation"):
        trtp.register("lightkv::Untyped")(untyped)
    with pytest.raises(AssertionError, match="reserved namespace"):
        trtp.register("trt::Typed")(typed)
    trtp.register("lightkv::Typed")(typed)
    with pytest.raises(AssertionError, match="the tensors, outputs, tactic"):
        trtp.aot_impl("lightkv::Typed")(wrong_order)
    # A string hint is not a class: plugins/lightkv/trt_plugin.py must not use `from __future__ import annotations`.
    stringly = types.FunctionType(typed.__code__, {}, "stringly")
    stringly.__annotations__ = {"hidden": "trtp.TensorDesc", "return": _Desc}
    with pytest.raises(AssertionError, match="not a TensorDesc"):
        trtp.register("lightkv::Stringly")(stringly)
    with pytest.raises(AssertionError, match="before its register"):
        trtp.autotune("lightkv::Unregistered")(typed)


@pytest.mark.parametrize("plugin", list(PLUGIN_IO))
def test_aot_scalars_fill_the_compiled_kernels_parameter_list(
    stub_plugins: dict[str, dict[str, object]], plugin: str
) -> None:
    """TensorRT launches with (input pointers, extra scalars, output pointers): that must be the PTX entry's list."""
    inputs, outputs = PLUGIN_IO[plugin]
    name, ptx, params, scalars = stub_plugins[f"lightkv::{plugin}"]["aot_impl"](*inputs, tuple(outputs), 1)
    head = re.search(rf"\.entry {re.escape(name.decode())}\((.*?)\)", ptx.decode(), re.S)
    assert head is not None, "the kernel name is not the PTX entry"
    ptx_params = [p for p in head.group(1).split(",") if p.strip()]
    assert len(inputs) + len(scalars) + len(outputs) == len(ptx_params)
    assert all(isinstance(v, int) and v > 0 for v in scalars)
    assert params.grid_x > 0 and params.block_x in (128, 256)


KERNEL_OF = {"LightKVMatch": "match_kernel", "LightKVPlan": "plan_kernel", "LightKVEmit": "emit_kernel"}
# Every scalar parameter name of the kernels (plugins/lightkv/kernels.py), with its value for PLUGIN_IO's shapes.
# The values are pairwise distinct, so a scalar in the wrong slot always shows.
SCALARS = {"n_max": N_MAX, "dim": D, "n_win": W, "seq": S, "batch": B, "out_seq": S_OUT, "n_tokens": B * S}
assert len(set(SCALARS.values())) == len(SCALARS)


def _kernel_params(plugin: str) -> tuple[list[str], list[str], list[str]]:
    """(input pointers, scalars, output pointers) of the plugin's kernel, from its declared signature."""
    import inspect

    from plugins.lightkv import kernels

    names = [
        p.name
        for p in inspect.signature(getattr(kernels, KERNEL_OF[plugin]).fn).parameters.values()
        if "constexpr" not in str(p.annotation)
    ]
    scalars = [n for n in names if not n.endswith("_ptr")]
    first, last = names.index(scalars[0]), names.index(scalars[-1])
    assert names[first : last + 1] == scalars, f"{plugin}: scalars are not one run between the pointers: {names}"
    return names[:first], scalars, names[last + 1 :]


class _RecordedLaunch:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **meta)` records the grid and the bound arguments."""

    def __init__(self, real) -> None:
        self.real, self.calls = real, []

    def __getitem__(self, grid):
        import inspect

        def launch(*args, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
            bound = inspect.signature(self.real.fn).bind(*args, **kwargs).arguments
            self.calls.append((tuple(grid), dict(bound)))

        return launch


def _launch_py_grids_and_scalars(monkeypatch: pytest.MonkeyPatch, tactic: int) -> dict[str, tuple]:
    """What plugins/lightkv/launch.py (checked for correctness under the interpreter) launches for PLUGIN_IO's
    shapes and the tactic's configuration: kernel -> (grid, arguments by parameter name)."""
    from plugins.lightkv import kernels, launch, trt_plugin

    recorders = {}
    for name in KERNEL_OF.values():
        recorders[name] = _RecordedLaunch(getattr(kernels, name))
        monkeypatch.setattr(kernels, name, recorders[name])
    plan = launch.PlanTensors(
        win_index=torch.zeros(W, N_MAX, dtype=torch.int64), win_r=torch.ones(W, dtype=torch.int64),
        lengths=torch.full((B,), S, dtype=torch.int64), out_slots=torch.arange(S_OUT),
    )  # fmt: skip
    hidden = torch.zeros(B, S, D, dtype=torch.float16)
    launch.launch_kernels(hidden, torch.ones(B, S), plan, trt_plugin.CANDIDATE_TACTICS[tactic])
    assert all(len(r.calls) == 1 for r in recorders.values())
    return {name: r.calls[0] for name, r in recorders.items()}


@pytest.mark.parametrize("tactic", [1, 2])
@pytest.mark.parametrize("plugin", list(PLUGIN_IO))
def test_aot_scalars_and_grid_are_the_kernels_declared_parameters(
    stub_plugins: dict[str, dict[str, object]], monkeypatch: pytest.MonkeyPatch, plugin: str, tactic: int
) -> None:
    """The launch scalars are the kernel's scalar parameters, in its declared order, with the values of the
    shapes (n_max and dim swapped must fail), and the grid is the one launch.py uses for the same configuration."""
    from plugins.lightkv import trt_plugin

    in_ptrs, scalar_names, out_ptrs = _kernel_params(plugin)
    inputs, outputs = PLUGIN_IO[plugin]
    assert (len(in_ptrs), len(out_ptrs)) == (len(inputs), len(outputs))
    _, _, params, scalars = stub_plugins[f"lightkv::{plugin}"]["aot_impl"](*inputs, tuple(outputs), tactic)
    assert list(scalars) == [SCALARS[n] for n in scalar_names], dict(zip(scalar_names, scalars, strict=False))

    grid, args = _launch_py_grids_and_scalars(monkeypatch, tactic)[KERNEL_OF[plugin]]
    assert [int(args[n]) for n in scalar_names] == list(scalars)  # launch.py passes the same values
    got_grid = (params.grid_x,) if params.grid_y is None else (params.grid_x, params.grid_y)
    assert got_grid == grid, f"TensorRT grid {got_grid} != launch.py grid {grid}"
    cfg = trt_plugin.CANDIDATE_TACTICS[tactic]
    want = {  # the grids written out from the kernels' program ids (a window and an A tile; a row; tiles and D)
        "LightKVMatch": (W, -(-NA // cfg.match_a)),
        "LightKVPlan": (B,),
        "LightKVEmit": (B * -(-S_OUT // cfg.emit_s) + W * -(-(N_MAX // 2) // cfg.emit_b), -(-D // cfg.emit_d)),
    }[plugin]
    assert got_grid == want


# --- TensorRT version, timing cache, hashes and dtypes (no TensorRT needed) --------------------------------------


@pytest.mark.parametrize(
    ("version", "has_aot", "ok"),
    [("10.11.0.33", True, True), ("10.13.2", True, True), ("10.9.0.34", True, False), ("10.8.0.43", True, False),
     ("10.11.0", False, False), ("8.6.1", False, False)],
)  # fmt: skip
def test_tensorrt_older_than_10_11_is_missing(
    monkeypatch: pytest.MonkeyPatch, version: str, has_aot: bool, ok: bool
) -> None:
    trt_mod, trtp, _ = _stub_tensorrt()
    trt_mod.__version__ = version
    if not has_aot:
        del trtp.aot_impl
    monkeypatch.setitem(sys.modules, "tensorrt", trt_mod)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    problem = trt.missing_tensorrt()
    assert (problem is None) == ok
    if not ok:
        assert "TensorRT >= 10.11" in problem and version in problem
        with pytest.raises(trt.TargetUnavailableError, match=r"TensorRT >= 10\.11") as err:
            trt.check_trt_available("trt-sm90")
        assert err.value.exit_code == 2


def test_version_tuple() -> None:
    assert trt.version_tuple("10.9.0.34") == (10, 9, 0, 34)
    assert trt.version_tuple("10.13.0rc1") == (10, 13)
    assert trt.version_tuple("10.10") > trt.version_tuple("10.9.1")


class _Config:
    """IBuilderConfig's timing-cache calls; a cache built from `stale` bytes does not match this TensorRT / GPU."""

    def __init__(self, stale: bytes) -> None:
        self.stale, self.attached = stale, []

    def create_timing_cache(self, data: bytes) -> bytes:
        return data

    def set_timing_cache(self, cache: bytes, ignore_mismatch: bool) -> bool:
        assert ignore_mismatch is False
        self.attached.append(cache)
        return cache != self.stale


def test_mismatched_timing_cache_is_replaced_by_a_fresh_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cache = tmp_path / "timing-cache"
    cache.write_bytes(b"from another GPU")
    config = _Config(stale=b"from another GPU")
    trt._attach_timing_cache(config, cache)
    assert config.attached == [b"from another GPU", b""]
    assert "does not match" in capsys.readouterr().err
    matching = _Config(stale=b"other")
    trt._attach_timing_cache(matching, cache)
    assert matching.attached == [b"from another GPU"]


def test_onnx_hash_covers_external_data(tmp_path: Path) -> None:
    model = onnx_function.standalone_model(onnx.TensorProto.FLOAT16)
    weight = onnx.numpy_helper.from_array(np.arange(4096, dtype=np.float32), "w")
    model.graph.initializer.append(weight)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    assert trt.external_data_files(path) == [tmp_path / "m.onnx.data"]
    before = trt.onnx_sha256(path)
    data = bytearray((tmp_path / "m.onnx.data").read_bytes())
    data[-1] ^= 1  # one weight bit: the graph file is unchanged
    (tmp_path / "m.onnx.data").write_bytes(bytes(data))
    assert trt.onnx_sha256(path) != before


def test_trt_dtypes_map_to_torch_with_bf16() -> None:
    assert trt.torch_dtype(types.SimpleNamespace(name="BF16")) is torch.bfloat16
    assert trt.torch_dtype("DataType.HALF") is torch.float16
    with pytest.raises(InputError, match="FP8"):
        trt.torch_dtype(types.SimpleNamespace(name="FP8"))
    x = torch.tensor([1.0, -2.5, 3.140625], dtype=torch.bfloat16)
    host = trt.to_host(x)
    assert host.dtype == np.float32 and torch.equal(torch.from_numpy(host).to(torch.bfloat16), x)  # exact round trip


class _FakeContext:
    """An execution context that does what TensorRT does with output allocators: it keeps each one it is given,
    and on every run asks it for memory for each output (reallocate) and tells it the shape."""

    def __init__(self, shapes: list[tuple[int, ...]]) -> None:
        self.allocators: list[object] = []
        self.shapes = iter(shapes)

    def set_output_allocator(self, name: str, allocator: object) -> None:
        self.allocators.append(allocator)

    def set_input_shape(self, name, shape) -> None:
        pass

    def set_tensor_address(self, name, ptr) -> None:
        pass

    def run(self, allocator) -> None:
        shape = next(self.shapes)
        allocator.reallocate_output_async("out", 0, 4 * int(np.prod(shape)), 256, 0)
        allocator.notify_shape("out", shape)


def test_one_output_allocator_per_session_whose_buffers_grow_and_are_reused() -> None:
    """TrtSession gives the context one allocator when it opens, never one per run (the context would keep each
    alive: GPU memory growing with every decode step); the allocator reuses a buffer until a run needs more."""
    fake_trt = types.SimpleNamespace(IOutputAllocator=object)
    context = _FakeContext([(2, 8), (2, 4), (2, 16), (2, 3)])
    session = object.__new__(trt.TrtSession)
    session.context, session.all_outputs = context, ["out"]
    session.allocator = trt._output_allocator(fake_trt, torch, device="cpu")
    session._attach_allocator()  # what __init__ does, once
    pointers = []
    for _ in range(4):
        context.run(session.allocator)
        pointers.append(session.allocator.buffers["out"].data_ptr())
    assert len(context.allocators) == 1  # set once, at open
    assert pointers[0] == pointers[1] != pointers[2] == pointers[3]  # grown once, for the larger output only
    assert session.allocator.buffers["out"].numel() == 4 * 2 * 16 and session.allocator.shapes["out"] == (2, 3)
    source = Path(trt.__file__).read_text()
    run_body = source[source.index("    def run(self, output_names, feeds):") : source.index("def _output_allocator")]
    assert "set_output_allocator" not in run_body and "_output_allocator(" not in run_body


TRT_TYPE = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16", "int64": "INT64", "int32": "INT32"}
ONNX_DTYPE = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT64: "int64"}


def test_the_lowered_tiny_prefill_gives_every_plugin_the_shapes_of_a_real_request(builds, stub_plugins) -> None:
    """The prefill graph a trt-* target lowers (the tiny Qwen2.5-VL engine's, r0.55): its inputs are exactly what the
    runtime feeds a TensorRT session; each stage's plugins, given the shapes of a real request (as TensorRT's ONNX
    importer would see them), declare the outputs the unlowered graph computes under ONNX Runtime (kept [B, S'],
    hidden [B, S', D]); every autotune combination admits those dtypes, and every launch is plain shape arithmetic."""
    import onnxruntime as ort

    from lightkv_export import contract
    from lightkv_export.export import strip_roles
    from lightkv_export.inputs import parity_images
    from lightkv_export.method.merge_plan import lowered_feeds, plan_request, stage_kept_name, stage_of
    from lightkv_export.parity import cached_export
    from lightkv_export.runtime import Engine
    from lightkv_export.targets.ort import transform_prefill

    engine_dir = builds("tiny-qwen-vl", 0.55).engine_dirs["ort-cpu"]
    engine = Engine.load(engine_dir)
    exported, why = cached_export(engine_dir, engine.manifest)
    assert exported is not None, why
    m = engine.manifest
    graph, _ = transform_prefill(exported, engine.schedule, positions=m.positions, grid_mode=m.grid_mode)
    graph = strip_roles(graph)  # what targets/trt.py hands to the lowering and the parser
    lowered = lower_trt_plugin(graph)

    request = engine.prepare([parity_images(tuple(m.image_size), 0)], "Describe the image.")
    plan = plan_request(request.spans, [request.seq_len], engine.schedule, grid_mode=m.grid_mode)
    feeds = {contract.INPUTS_EMBEDS: request.inputs_embeds, contract.POSITION_IDS: request.position_ids,
             contract.LENGTHS: np.asarray([request.seq_len], dtype=np.int64), **plan.feeds}  # fmt: skip
    extra = lowered_feeds(feeds)
    assert {i.name for i in lowered.graph.input} == set(feeds) | set(extra)  # what TrtSession.run feeds
    # The prefill engine's optimization profile covers every input of the lowered graph, and this request.
    profile = trt.engine_profiles(m, engine.processor.images)["prefill"].shapes
    assert set(profile) == {i.name for i in lowered.graph.input}
    for name, array in {**feeds, **extra}.items():
        low, opt, high = profile[name]
        assert len(low) == len(opt) == len(high) == array.ndim, name
        assert all(lo <= o <= hi for lo, o, hi in zip(low, opt, high, strict=True)), (name, profile[name])
        assert all(lo <= d <= hi for lo, d, hi in zip(low, array.shape, high, strict=True)), (name, array.shape)

    # The unlowered graph under ONNX Runtime: the real S' of every stage.
    onnx.load_external_data_for_model(graph, str(exported.prefill.parent))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    stages = len(engine.schedule.stages)
    kept_real = session.run([stage_kept_name(k) for k in range(stages)], feeds)
    hidden_type = next(i for i in graph.graph.input if i.name == contract.INPUTS_EMBEDS).type.tensor_type.elem_type
    hdtype, dim = ONNX_DTYPE[hidden_type], m.hidden_size

    inputs = {name: _Desc(a.shape, str(a.dtype)) for name, a in {**feeds, **extra}.items()}
    plugin_nodes = [n for n in lowered.graph.node if n.op_type in ("LightKVMatch", "LightKVPlan", "LightKVEmit")]
    assert [n.op_type for n in plugin_nodes] == ["LightKVMatch", "LightKVPlan", "LightKVEmit"] * stages
    seq = request.seq_len
    for k in range(stages):
        match, plan_node, emit = plan_node_group = plugin_nodes[3 * k : 3 * k + 3]
        assert stage_of(plan_node.input[4]) == k
        s_out = kept_real[k].shape[1]
        assert s_out == plan.stages[k].out_seq_len and inputs[plan_node.input[4]].shape_expr == (s_out,)
        inputs[match.input[0]] = _Desc((1, seq, dim), hdtype)  # the decoder layer's output, [B, S, D]
        inputs[plan_node.input[0]] = _Desc((1, seq), "float32")  # the guidance, [B, S]
        for node in plan_node_group:
            fns = stub_plugins[f"lightkv::{node.op_type}"]
            args = [inputs[name] for name in node.input]
            declared = fns["register"](*args)
            declared = declared if isinstance(declared, tuple) else (declared,)
            assert len(declared) == len(node.output)
            for name, desc in zip(node.output, declared, strict=True):
                inputs[name] = desc
            types_seen = [TRT_TYPE[d.dtype] for d in (*args, *declared)]
            assert any(
                all(t in spec.strip().split("|") for t, spec in zip(types_seen, combo.spec.split(","), strict=True))
                for combo in fns["autotune"](*args, declared)
            ), (node.op_type, types_seen)
            _, _, params, scalars = fns["aot_impl"](*args, declared, 1)  # no size-tensor arithmetic anywhere
            assert int(params.grid_x) > 0 and all(v > 0 for v in scalars)
        kept, out = inputs[plan_node.output[0]], inputs[emit.output[0]]
        assert kept.shape_expr == kept_real[k].shape and kept.dtype == "int64"
        assert out.shape_expr == (1, s_out, dim) and out.dtype == hdtype
        seq = s_out


class _FakeEngine:
    """The step engine's I/O as TensorRT's ICudaEngine shows it (two branches, BRANCH, two profiles), whose
    contexts 'run' the branch BRANCH selects: y = 2 x, and an empty y for the other branch."""

    def __init__(self, fixed_idle: bool = True) -> None:
        self.io = {"run_prefill": "INPUT", "prefill/x": "INPUT", "decode/x": "INPUT",
                   "prefill/y": "OUTPUT", "decode/y": "OUTPUT"}  # fmt: skip
        own, idle = ((1, 2), (1, 5), (4, 9)), ((1, 3),) * 3 if fixed_idle else ((1, 1), (1, 3), (1, 8))
        self.profiles = [{"prefill/x": own, "decode/x": idle}, {"decode/x": own, "prefill/x": idle}]
        self.contexts: list[_FakeStepContext] = []
        self.num_io_tensors = len(self.io)

    def get_tensor_name(self, i: int) -> str:
        return list(self.io)[i]

    def get_tensor_mode(self, name: str) -> str:
        return self.io[name]

    def get_tensor_dtype(self, name: str):
        return types.SimpleNamespace(name="BOOL" if name == "run_prefill" else "FLOAT")

    def get_tensor_profile_shape(self, name: str, profile: int):
        return [list(s) for s in self.profiles[profile][name]]

    def get_tensor_location(self, name: str) -> str:
        return "DEVICE"

    def create_execution_context(self, strategy):
        assert strategy == "ON_PROFILE_CHANGE"
        self.contexts.append(_FakeStepContext(self))
        return self.contexts[-1]


class _FakeStepContext:
    def __init__(self, engine: _FakeEngine) -> None:
        self.engine, self.profile, self.shapes, self.addresses, self.allocators = engine, None, {}, {}, {}

    def set_optimization_profile_async(self, profile, stream) -> bool:
        self.profile = profile
        return True

    def set_input_shape(self, name, shape) -> bool:  # False outside the profile, as TensorRT answers
        if name != "run_prefill":
            low, _, high = self.engine.profiles[self.profile][name]
            if not all(lo <= d <= hi for lo, d, hi in zip(low, shape, high, strict=True)):
                return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr) -> None:
        self.addresses[name] = ptr

    def set_output_allocator(self, name, allocator) -> None:
        self.allocators[name] = allocator

    def execute_async_v3(self, stream) -> bool:
        import ctypes

        def read(name: str, dtype) -> torch.Tensor:
            n = int(np.prod(self.shapes[name]))
            buf = (ctypes.c_byte * (n * dtype.itemsize)).from_address(self.addresses[name])
            return torch.frombuffer(bytearray(buf), dtype=dtype).reshape(self.shapes[name])

        taken = "prefill" if bool(read("run_prefill", torch.bool)) else "decode"
        assert set(self.allocators) == {"prefill/y", "decode/y"}  # both If outputs, the empty one too
        for branch in ("prefill", "decode"):
            y = 2 * read(f"{branch}/x", torch.float32) if branch == taken else torch.zeros(0, 1)
            allocator = self.allocators[f"{branch}/y"]
            ptr = allocator.reallocate_output_async(f"{branch}/y", 0, y.numel() * 4, 256, 0)
            ctypes.memmove(ptr, y.contiguous().numpy().ctypes.data, y.numel() * 4)
            allocator.notify_shape(f"{branch}/y", tuple(y.shape))
        return True


@pytest.fixture
def fake_tensorrt(monkeypatch):
    fake = types.SimpleNamespace(
        IOutputAllocator=object, TensorIOMode=types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT"),
        TensorLocation=types.SimpleNamespace(DEVICE="DEVICE", HOST="HOST"),
        ExecutionContextAllocationStrategy=types.SimpleNamespace(ON_PROFILE_CHANGE="ON_PROFILE_CHANGE"),
    )  # fmt: skip
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    return fake


def test_the_step_engine_opens_as_one_session_per_branch(fake_tensorrt) -> None:
    """prefill and decode over one engine (open_sessions): each a context on its own profile, showing its branch
    under its graph's names; BRANCH and the other branch's inputs are bound once, at the one shape the profile
    fixes for them, and stay bound across runs."""
    engine = _FakeEngine()
    sessions = {
        branch: trt.TrtSession(engine, profile=i, prefix=f"{branch}/", device="cpu")
        for i, branch in enumerate(("prefill", "decode"))
    }
    for i, (branch, other) in enumerate((("prefill", "decode"), ("decode", "prefill"))):
        session, context = sessions[branch], engine.contexts[i]
        assert context.profile == i and session.inputs == ["x"]
        assert [o.name for o in session.get_outputs()] == ["y"]
        assert context.shapes[f"{other}/x"] == (1, 3) and set(session.resident) == {"run_prefill", f"{other}/x"}
        assert bool(session.resident["run_prefill"]) == (branch == "prefill")
        x = np.arange(10, dtype=np.float32).reshape(2, 5) + i
        for _ in range(2):  # the resident inputs stay bound: a second run needs nothing re-set
            (y,) = session.run(None, {"x": x})
            np.testing.assert_array_equal(y, 2 * x)
        with pytest.raises(InputError, match="not fed"):
            session.run(None, {"z": x})
        with pytest.raises(InputError, match=r"outside the engine's profile \(\(1, 2\) \.\. \(4, 9\)\)"):
            session.run(None, {"x": np.zeros((5, 5), np.float32)})


def test_an_idle_input_the_profile_does_not_fix_is_refused(fake_tensorrt) -> None:
    with pytest.raises(InputError, match="not fixed in profile 0"):
        trt.TrtSession(_FakeEngine(fixed_idle=False), profile=0, prefix="prefill/", device="cpu")


@pytest.mark.parametrize("key", ["tiny-qwen-vl", "tiny-llava"])
def test_the_vision_profile_ranges_every_image_the_processor_makes(builds, key) -> None:
    """The vision engine's profile is a range, not one image's shape: it covers the graph's every input for images
    of any size and aspect the processor takes (smallest, largest, a tall page, a wide strip), with opt at the
    reference image; a processor that crops every image to one size gives min = opt = max."""
    from lightkv_export.runtime import Engine

    engine = Engine.load(builds(key, 0.55).engine_dirs["ort-cpu"])
    images, manifest = engine.processor.images, engine.manifest
    profile = trt.engine_profiles(manifest, images)["vision"].shapes
    assert set(profile) == set(manifest.vision_inputs)  # every input of the exported vision graph
    assert all(len(profile[n][0]) == len(shape) for n, shape in manifest.vision_inputs.items())
    low, high = images.pixel_range()
    side, long = int(high**0.5), int((high * 200) ** 0.5)
    sizes = [
        (1, 1),
        (side, side),
        (3 * side // 2, side // 2),
        (side // 9, 9 * side),
        (900, 5),
        (long, -(-long // 200)),  # the processors' most extreme aspect ratio, 200
        (-(-long // 200), long),
        tuple(manifest.image_size),
    ]
    for h, w in sizes:
        for name, shape in images.feed_shapes(h, w).items():
            lo, _, hi = profile[name]
            assert all(a <= d <= b for a, d, b in zip(lo, shape, hi, strict=True)), (key, (h, w), name, shape)
    assert {n: s[1] for n, s in profile.items()} == images.feed_shapes(*manifest.image_size)
    fixed = all(s[0] == s[2] for s in profile.values())
    assert fixed == (low == high) == (key == "tiny-llava")
