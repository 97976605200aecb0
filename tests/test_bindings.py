"""The C++ extension's Python surface: every binding is in the type stub with the same argument names, the
kernels refuse positional arguments, and the activation codes come from the extension itself."""
import ast
import inspect
import re
from pathlib import Path

import pytest
import torch

import fastclip
from fastclip import _C, ref, tolerance  # an ImportError here: build the extension with `pip install -e .`
from fastclip.backends.cpu import common
from fastclip.backends.cpu import ops as cpu_ops

STUB = Path(fastclip.__file__).with_name("_C.pyi")
KERNELS = ("attention", "bias_act", "layer_norm", "normalize_project", "linear", "linear_pack")


def _stub_signatures() -> dict[str, tuple[list[str], list[str]]]:
    """{function: (positional-or-keyword names, keyword-only names)} from fastclip/_C.pyi."""
    tree = ast.parse(STUB.read_text())
    return {f.name: ([a.arg for a in f.args.args], [a.arg for a in f.args.kwonlyargs])
            for f in tree.body if isinstance(f, ast.FunctionDef)}


def _binding_signature(fn) -> tuple[list[str], list[str]]:
    """The same from pybind11's generated signature line, e.g. ``f(*, a: int, b: float) -> None``."""
    first = fn.__doc__.splitlines()[0]
    inside = first[first.index("(") + 1: first.rindex(")")]
    names, kwonly, keyword_only = [], [], False
    for part in re.split(r",\s*(?![^\[]*\])", inside) if inside else []:
        part = part.strip()
        if part == "*":
            keyword_only = True
            continue
        (kwonly if keyword_only else names).append(part.split(":")[0].strip())
    return names, kwonly


def test_stub_lists_every_binding_with_its_argument_names():
    public = sorted(n for n in dir(_C) if not n.startswith("_") and callable(getattr(_C, n)))
    stub = _stub_signatures()
    assert sorted(stub) == public, "fastclip/_C.pyi and the extension list different functions"
    for name in public:
        assert _binding_signature(getattr(_C, name)) == stub[name], f"_C.{name}: stub and binding differ"


@pytest.mark.parametrize("name", KERNELS)
def test_kernels_take_arguments_by_name_only(name):
    _, kwonly = _binding_signature(getattr(_C, name))
    assert kwonly, f"_C.{name} should be keyword-only"
    with pytest.raises(TypeError):
        getattr(_C, name)(*range(len(kwonly)))  # positional integers are refused before any pointer is used


def test_cpu_ops_pass_every_kernel_argument_by_name():
    """Each call of a _C kernel in fastclip/backends/cpu/ names its arguments (no positional pointers)."""
    for path in Path(common.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in KERNELS
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "_C"):
                assert not node.args, f"{path.name}:{node.lineno}: _C.{node.func.attr} called with positional args"


def test_activation_codes_come_from_the_extension():
    codes = _C.activation_codes()
    assert common.ACT_CODES == codes and set(codes) <= set(ref.ACTIVATIONS)
    assert sorted(codes.values()) == list(range(len(codes)))
    x = torch.randn(4, 24)
    for act in ref.ACTIVATIONS:  # kernel codes and the reference agree; the others fall back to it
        tolerance.check_fp32(cpu_ops.bias_act(x, None, act), ref.bias_act(x.double(), None, act),
                             ref.bias_act(x, None, act), f"bias_act {act}")
    assert inspect.signature(cpu_ops.bias_act).parameters.keys() == inspect.signature(ref.bias_act).parameters.keys()


def test_peak_rate_kinds_follow_the_cpu_and_switch():
    flags = set(open("/proc/cpuinfo").read().split())
    kinds = _C.peak_kinds()
    assert kinds[0] == "fp32_fma" and "int8_vpmaddubsw" in kinds
    assert ("int8_vpdpbusd" in kinds) == ({"avx512bw", "avx512_vnni"} <= flags and _C.avx512_present())
    for kind in kinds:
        rate = _C.peak_rate(kind, 20000)
        assert 1e6 < rate < 1e15  # ops per second, finite and positive
    was = _C.set_avx512(False)
    try:
        assert "int8_vpdpbusd" not in _C.peak_kinds()  # the VNNI loop is zmm only
        with pytest.raises(ValueError, match="does not run on this CPU"):
            _C.peak_rate("int8_vpdpbusd", 10)
    finally:
        _C.set_avx512(was)
    with pytest.raises(ValueError, match="iters must be > 0"):
        _C.peak_rate("fp32_fma", 0)
    with pytest.raises(ValueError, match="does not run"):
        _C.peak_rate("fp64", 10)
