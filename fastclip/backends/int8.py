"""``precision="int8"``: int8 weights and activations on the CPU, int32 accumulation.

Scheme (per linear layer y = x @ W.T + b):

- weights: symmetric int8 per output channel, ``W[n] ~ scale[n] * Wq[n]`` with ``scale[n] = max|W[n]| / 127``,
  quantised once and pre-packed for the int8 GEMM (``quantize_model``); the fp32 master weights stay in
  the model, so ``state_dict`` is unchanged. Which weights: those each module declares in its
  ``int8_linears()`` (``Int8Linears``); a matrix no module declares, as int8 or as exempt, is an error;
- activations: asymmetric, quantised in the call from their min and max (dynamic quantisation, nothing to
  calibrate), int32 accumulation, dequantised with the bias into fp32. Two GEMMs (chosen when a weight is
  packed, by ``gemm()``; ``FASTCLIP_INT8_GEMM=kernel|fbgemm`` overrides the default):

  * ``kernel``: fastclip's own (csrc/linear_int8.cpp, fastclip/backends/cpu/linear_int8.py): one scale and
    zero point per row (token), u8 activations with VNNI, u7 without. The default wherever it runs. With
    AVX-512 VNNI: 1.33-1.39x fbgemm's VNNI kernel inside a 12-layer ViT-B stack at 50 and 197 rows, two
    threads (bench/bench_linear_int8.py, AMD EPYC Zen 4). Without VNNI it is the default for accuracy: its
    per-row scales kept EVA02-B-16's lowest per-item cosine to fp32 at 0.9911 where fbgemm's one scale per
    call gave 0.9874 (docs/int8.md, "CPUs without VNNI"); its speed there against fbgemm's own AVX2 kernel
    needs an AVX2-only CPU to measure (on a VNNI CPU fbgemm always runs its VNNI code).
  * ``fbgemm``: PyTorch's ``quantized::linear_dynamic`` (fbgemm), one scale / zero point per call. The
    default where the kernel cannot run (no C++ extension).

Only ``linear`` changes: layer norm, attention, bias + activation and the pooled-row projections run
the fp32 ops of the model's backend (``cpu``, the C++ kernels, or ``ref``) -- except that the cpu backend's
attention takes its bf16 products (``bf16_dots``) on CPUs with AVX512-BF16. The int8 table looks the packed weight up by
the fp32 weight tensor it is called with (or a row view of one that was packed); a weight that is not
packed runs the fp32 op. A packed weight whose fp32 master changed in place is
re-quantised on its next use.

Calibrated int8 (``Int8Plan``, made by ``fastclip quantize`` / fastclip/quantize.py; docs/int8.md): trained
checkpoints have a few activation channels hundreds of times larger than the rest, which would set the one
activation scale per call alone. A plan gives, per linear layer, SmoothQuant-style per-channel smoothing
``s`` (the layer computes ``(x / s) @ (W * s).T``: the same product, with the outlier channels moved into the
weight) and the layers kept in fp32. Where the layer's input comes from a LayerNorm (attention ``in_proj``,
MLP ``c_fc``) ``1 / s`` is folded into that LayerNorm's gain and bias; for ``out_proj`` into the rows of the
v projection (attention is linear in v per channel); elsewhere (``c_proj``, after the activation) the input
is multiplied by ``1 / s`` in the call. The smoothed weights and LayerNorm parameters are copies the int8
table uses in place of the model's own (found, like the packs, by the fp32 tensors the model passes):
the model's fp32 weights and ``state_dict`` stay as they are. Without a plan from calibration,
``precision="int8"`` uses ``fastclip.quantize.default_plan`` (smoothing a=0.5 from a built-in synthetic set).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import warnings
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import nn

from .dispatch import OpTable, compose_linear_act
from .weight_packs import DerivedWeights

# A packed int8 weight: torch's (a ScriptObject, fbgemm) or the kernel's (linear_int8.Int8Pack).
Int8Operand = Any
# fbgemm's int8 kernel without VNNI sums pairs of u8*s8 products in int16, which can saturate; 7-bit
# activations (reduce_range) avoid it. With VNNI (vpdpbusd) the sums are int32 and all 8 bits are used.
REDUCE_RANGE = not (hasattr(torch.cpu, "_is_vnni_supported") and torch.cpu._is_vnni_supported())
# The quantized engine the weights are packed for (fbgemm measured fastest inside ViT-B-32 here); a
# packed weight carries its engine, so torch's global engine setting does not matter at run time.
ENGINE = next((e for e in ("fbgemm", "x86", "onednn") if e in torch.backends.quantized.supported_engines), None)


def _kernel():
    """fastclip/backends/cpu/linear_int8.py where this CPU runs it (C++ extension built, AVX2 + FMA), else None."""
    try:
        from .cpu import linear_int8
    except ImportError:
        return None
    return linear_int8 if linear_int8.available() else None


KERNEL = _kernel()
if KERNEL is not None:
    from .cpu import attention as cpu_attention
GEMMS = ("kernel", "fbgemm")
# where the kernel is the default GEMM: every path it has (faster with VNNI, more accurate without: module docstring)
KERNEL_DEFAULT_PATHS = ("avx512_vnni", "avx512", "avx_vnni", "avx2")


def choose_gemm(setting: str | None = None) -> str:
    """The int8 GEMM for ``setting`` ("kernel", "fbgemm", or ""/"auto"/None: by the CPU, see the module
    docstring). ValueError for an unknown name or a GEMM that cannot run here."""
    name = (setting or "auto").strip().lower()
    if name == "auto":
        return "kernel" if KERNEL is not None and KERNEL.path() in KERNEL_DEFAULT_PATHS else "fbgemm"
    if name not in GEMMS:
        raise ValueError(f"FASTCLIP_INT8_GEMM={setting!r}: expected one of {', '.join(GEMMS)} or auto")
    if name == "kernel" and KERNEL is None:
        raise ValueError("FASTCLIP_INT8_GEMM=kernel: fastclip's int8 kernel needs the C++ extension and AVX2 + FMA")
    if name == "fbgemm" and ENGINE is None:
        raise ValueError("FASTCLIP_INT8_GEMM=fbgemm: this PyTorch build has no x86 int8 GEMM engine")
    return name


def gemm() -> str:
    """The int8 GEMM that new packs use: ``FASTCLIP_INT8_GEMM`` (kernel, fbgemm, auto), by default by the CPU."""
    return choose_gemm(os.environ.get("FASTCLIP_INT8_GEMM"))


def activation_levels() -> int:
    """The largest quantised activation value of the GEMM new packs use: 255 (8-bit) or 127 (7-bit: the kernel
    and fbgemm without VNNI)."""
    if gemm() == "kernel":
        return KERNEL.levels()
    return 127 if REDUCE_RANGE else 255


def why_not_int8(device: torch.device | str, backend: str | None) -> str | None:
    """None if an int8 model can run on ``device`` with ``backend`` (None: ``FASTCLIP_BACKEND``, as the
    op table resolves it), else the reason it cannot."""
    device = torch.device(device)
    if device.type != "cpu":
        return f"int8 precision runs on the CPU only, not on {device.type!r} (use fp16 or bf16 on GPUs)"
    backend = backend or os.environ.get("FASTCLIP_BACKEND", "")
    if backend.strip().lower() == "triton":
        return "int8 precision runs with the cpu or ref backend, not triton (the Triton kernels are GPU kernels)"
    try:
        name = gemm()
    except ValueError as exc:
        return str(exc)
    if name == "fbgemm" and ENGINE is None:
        return ("this PyTorch build has no x86 int8 GEMM engine (fbgemm, x86 or onednn; it has "
                f"{torch.backends.quantized.supported_engines}) and fastclip's own int8 kernel does not run here")
    return None


def check_int8(device: torch.device | str, backend: str | None) -> None:
    """Raise ValueError naming the reason if an int8 model cannot run on ``device`` with ``backend``."""
    reason = why_not_int8(device, backend)
    if reason is not None:
        raise ValueError(reason)


@contextlib.contextmanager
def _engine(name: str):
    """Pack for ``name`` without leaving torch's global quantized engine changed."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


@torch.no_grad()
def pack_linear(weight: torch.Tensor, bias: torch.Tensor | None, gemm_name: str | None = None) -> Int8Operand:
    """A (N, K) fp32 weight (and its (N,) bias) as a pre-packed per-channel int8 operand of the GEMM
    ``gemm_name`` (default ``gemm()``)."""
    return pack_quantized(*quantize_weight(weight), bias, gemm_name)


@torch.no_grad()
def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) fp32 -> (int8 values (N, K) in -127..127, fp32 scales (N,)), ``W[n] ~ scale[n] * q[n]``."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)  # (N,)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


@torch.no_grad()
def pack_quantized(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                   gemm_name: str | None = None) -> Int8Operand:
    """int8 values (N, K) with fp32 per-row scales (N,) (and a bias (N,)) as a pre-packed operand of the GEMM
    ``gemm_name`` ("kernel": an ``Int8Pack``; "fbgemm": torch's packed weight; default ``gemm()``)."""
    if (gemm_name or gemm()) == "kernel":
        if KERNEL is None:
            raise ValueError("the int8 kernel needs the C++ extension and AVX2 + FMA")
        b = None if bias is None else bias.detach().float()
        return KERNEL.pack_int8_quantized(q, scale.float(), b, keep_qweight=False)
    zero = torch.zeros(q.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the quantized-tensor deprecation notice
        wq = torch._make_per_channel_quantized_tensor(q.contiguous(), scale.double(), zero, 0)
    b = None if bias is None else bias.detach().float().contiguous()
    with _engine(ENGINE):
        return torch.ops.quantized.linear_prepack(wq, b)


def int8_matmul(x: torch.Tensor, operand: Int8Operand, x_scale: torch.Tensor | None = None) -> torch.Tensor:
    """(x * x_scale) @ the operand's int8 weight (N, K).T + its bias -> (M, N) fp32.  x: (M, K) fp32 (unit
    stride on K); x_scale: (K,) per-channel input scales (run-time smoothing) or None."""
    if isinstance(operand, torch.ScriptObject):
        if x_scale is not None:
            x = x * x_scale
        return torch.ops.quantized.linear_dynamic(x if x.is_contiguous() else x.contiguous(), operand, REDUCE_RANGE)
    return KERNEL.linear_int8(x, operand, x_scale=x_scale)


@dataclasses.dataclass(frozen=True)
class Int8Plan:
    """Calibrated choices for ``quantize_model`` (made by fastclip/quantize.py), by parameter name.

    ``smooth``: {linear weight name: s (K,) > 0}: that layer's input enters the int8 GEMM as ``x / s`` and its
    weight as ``W * s`` (see the module docstring for where ``1 / s`` goes); ``fp32``: names of the linear
    weights kept in fp32 (their smoothing, if any, is dropped).
    """

    smooth: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    fp32: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True)
class LinearTransform:
    """How the int8 table derives one linear's operand from its fp32 master (weight (N, K), bias (N,)):
    ``W' = W * in_scale / row_scale[:, None]``, ``b' = bias / row_scale``; with ``input_scale`` (K,) the
    call multiplies its input by it first (run-time smoothing); ``int8`` False: the fp32 op on (W', b')."""

    in_scale: torch.Tensor | None = None  # (K,)
    row_scale: torch.Tensor | None = None  # (N,)
    input_scale: torch.Tensor | None = None  # (K,) = 1 / in_scale, when nothing upstream divides by it
    int8: bool = True

    def apply(self, weight: torch.Tensor, bias: torch.Tensor | None):
        """(W', b') in fp32, new tensors."""
        w, b = weight.detach().float(), None if bias is None else bias.detach().float()
        if self.in_scale is not None:
            w = w * self.in_scale
        if self.row_scale is not None:
            w = w / self.row_scale[:, None]
            b = None if b is None else b / self.row_scale
        return w, b

    def invert(self, w: torch.Tensor) -> torch.Tensor:
        """The fp32 master weight (N, K) whose ``apply`` gives ``w`` (N, K) (up to fp32 rounding)."""
        w = w.float()
        if self.row_scale is not None:
            w = w * self.row_scale[:, None]
        return w if self.in_scale is None else w / self.in_scale


@dataclasses.dataclass(frozen=True)
class Int8Entry:
    """What the int8 table runs for one (weight, bias): ``pack`` (int8) or fp32 ``weight`` / ``bias``
    copies; ``input_scale`` (K,) multiplies the input first, or None."""

    pack: Int8Operand | None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None


def _key(*tensors: torch.Tensor | None) -> tuple:
    """Where ``tensors`` live (as DerivedWeights keys them): data pointer, shape, strides, dtype."""
    return tuple(None if t is None else (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype) for t in tensors)


class Int8Weights:
    """The packed int8 copies of a model's linear weights, in the cache every derived weight uses
    (fastclip/backends/weight_packs.py): keyed by where a weight and its bias live, so views of a packed
    layer's rows -- the q and kv halves of ``in_proj_weight`` that trimmed last blocks and attention pooling
    split off on every call -- find their pack too, and a weight changed in place is re-quantised on its
    next use. Only the (weight, bias) pairs added here are int8 (or, with a transform that is not int8,
    their smoothed fp32 copies); any other linear runs the fp32 op on the model's weights.

    Each pair's ``LinearTransform`` (identity by default) is applied to the fp32 master whenever its entry
    is made; ``preloaded`` int8 values and scales (from an int8 checkpoint) are used for the first entry
    instead of quantising. ``add_norm`` registers a LayerNorm whose gain and bias the int8 table replaces
    by ``gain / s``, ``bias / s`` (smoothing folded into it). ``plan`` is the Int8Plan the packs follow.
    """

    def __init__(self):
        self._packs = DerivedWeights(self._make)
        self._transforms: dict[tuple, LinearTransform] = {}
        self._preloaded: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._norms = DerivedWeights(self._make_norm)
        self._norm_scales: dict[tuple, torch.Tensor] = {}
        self._with_bias = DerivedWeights(self._make_with_bias)  # kernel packs with a linear_act's bias
        self.nbytes = 0  # int8 weights + fp32 biases held by the packs (besides the fp32 masters)
        self.plan = Int8Plan()

    def _make(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Entry:
        key = _key(weight, bias)
        t = self._transforms.get(key, LinearTransform())
        with torch.inference_mode(False), torch.no_grad():
            w, b = t.apply(weight, bias)
            if not t.int8:
                return Int8Entry(None, w, b)
            preloaded = self._preloaded.pop(key, None)
            q, scale = preloaded if preloaded is not None else quantize_weight(w)
            return Int8Entry(pack_quantized(q, scale, b), input_scale=t.input_scale)

    def _make_norm(self, weight: torch.Tensor, bias: torch.Tensor | None):
        s = self._norm_scales[_key(weight, bias)]
        with torch.inference_mode(False), torch.no_grad():
            return weight.detach() / s, None if bias is None else bias.detach() / s

    def add(self, weight: torch.Tensor, bias: torch.Tensor | None, transform: LinearTransform | None = None,
            preloaded: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Make the entry of (weight (N, K), bias (N,) or None) now; ``preloaded``: (int8 (N, K), fp32 (N,))
        values and scales of ``transform.apply(weight, bias)`` to use as they are."""
        key = _key(weight, bias)
        t = transform or LinearTransform()
        self._transforms[key] = t
        if preloaded is not None:
            self._preloaded[key] = preloaded
        self._packs.add(weight, bias)
        self._preloaded.pop(key, None)
        per_value = 1 if t.int8 else 4
        self.nbytes += per_value * weight.numel() + (0 if bias is None else 4 * bias.numel())

    def add_norm(self, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor) -> None:
        """The int8 table runs this LayerNorm (gain (D,), bias (D,)) with ``gain / scale``, ``bias / scale``."""
        self._norm_scales[_key(weight, bias)] = scale.detach().float()
        self._norms.add(weight, bias)

    def __len__(self) -> int:
        return len(self._packs)

    @property
    def has_norms(self) -> bool:
        return len(self._norms) > 0

    def _make_with_bias(self, weight: torch.Tensor, bias: torch.Tensor):
        entry = self.lookup(weight, None)
        if entry is None or KERNEL is None or not isinstance(entry.pack, KERNEL.Int8Pack):
            return None
        with torch.inference_mode(False), torch.no_grad():
            padded = torch.zeros_like(entry.pack.bias)  # (16 * ceil(N / 16),), zero past N
            padded[: bias.shape[0]] = bias.detach().float()
        return dataclasses.replace(entry.pack, bias=padded)

    def with_bias(self, weight: torch.Tensor, bias: torch.Tensor):
        """The kernel pack of (weight, None) with ``bias`` (N,) in its epilogue (made once per version of
        both; None if that layer is not on the kernel or ``bias`` is an inference tensor)."""
        return self._with_bias.get(weight, bias)

    def lookup(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Entry | None:
        """The entry of ``weight`` with this ``bias`` (remade if either changed), or None."""
        return self._packs.get(weight, bias, create=False)

    def norm(self, weight: torch.Tensor, bias: torch.Tensor | None):
        """(gain / s, bias / s) for a LayerNorm added with ``add_norm`` (remade if either changed), or None."""
        return self._norms.get(weight, bias, create=False)


class Int8Linears(Protocol):
    """A module whose linear layers run in int8 under ``precision="int8"``.

    ``int8_linears()`` yields each (weight (N, K), bias (N,) or None) exactly as the module passes them to
    ``ops.linear`` (row views included); ``int8_exempt`` names (dotted, relative to the module) the
    matrices it holds that are not linear layers or stay fp32 on purpose (embeddings, the patch
    embedding, projections of the pooled rows).
    """

    int8_exempt: tuple[str, ...]

    def int8_linears(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]: ...


def _matrix_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters() if p.ndim >= 2}


class Owners:
    """Finds the matrix parameter of ``model`` whose memory a weight (or a row view of one) is: the view's
    base, or -- for a view of an inference tensor (a model made under ``torch.inference_mode()``), which has
    no base -- the matrix whose storage and element range hold it; else the tensor itself."""

    def __init__(self, model: nn.Module):
        self._by_storage: dict[int, list[torch.Tensor]] = {}
        for p in model.parameters():
            if p.ndim >= 2:
                self._by_storage.setdefault(p.untyped_storage().data_ptr(), []).append(p)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if t._base is not None:
            return t._base
        for p in self._by_storage.get(t.untyped_storage().data_ptr(), ()):
            if p.storage_offset() <= t.storage_offset() < p.storage_offset() + p.numel():
                return p
        return t


def int8_linears(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Every (weight, bias) the modules of ``model`` declare as int8 linear layers (see Int8Linears).

    Raises ValueError naming any matrix parameter that no module declares either as an int8 linear or as
    exempt, so a new block cannot silently stay fp32 under ``precision="int8"``.
    """
    pairs, covered, owner = [], set(), Owners(model)
    for module in model.modules():
        for name in getattr(module, "int8_exempt", ()):
            holder, _, leaf = name.rpartition(".")
            if getattr(module.get_submodule(holder), leaf) is not None:  # an optional parameter may be None
                covered.add(id(module.get_parameter(name)))
        if hasattr(module, "int8_linears"):
            for weight, bias in module.int8_linears():
                pairs.append((weight, bias))
                covered.add(id(owner(weight)))
    missing = [name for key, name in _matrix_names(model).items() if key not in covered]
    if missing:
        raise ValueError(
            f"precision='int8': the parameters {', '.join(missing)} are neither int8 linear layers nor exempt; "
            "the module that owns them must list them in int8_linears() or int8_exempt "
            "(fastclip/backends/int8.py, Int8Linears)")
    return pairs


def int8_layer_names(model: nn.Module) -> list[str]:
    """The parameter names of the matrices of ``model`` that run as int8 linear layers, in model order."""
    names, owner = _matrix_names(model), Owners(model)
    seen: dict[str, None] = {}
    for weight, _ in int8_linears(model):
        seen.setdefault(names[id(owner(weight))])
    return list(seen)


def fold_sites(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """{linear weight name: (kind, module)} for the layers whose input smoothing folds into what makes the
    input: ("norm", LayerNorm) -- a block's ``ln_1`` before ``attn.in_proj_weight``, ``ln_2`` (and an attention
    pool's ``ln``) before ``mlp.c_fc.weight`` -- and ("v_rows", MultiheadAttention) before ``out_proj.weight``.
    Other int8 layers (``c_proj``) are smoothed at run time."""
    from ..models.transformer import AttentionPool, MultiheadAttention, ResidualAttentionBlock

    sites: dict[str, tuple[str, nn.Module]] = {}
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(module, ResidualAttentionBlock):
            sites[f"{dot}attn.in_proj_weight"] = ("norm", module.ln_1)
            sites[f"{dot}mlp.c_fc.weight"] = ("norm", module.ln_2)
        elif isinstance(module, AttentionPool):
            sites[f"{dot}mlp.c_fc.weight"] = ("norm", module.ln)
        elif isinstance(module, MultiheadAttention):
            sites[f"{dot}out_proj.weight"] = ("v_rows", module)
    return sites


def _check_fp32_cpu(model: nn.Module) -> None:
    for p in model.parameters():
        if p.dtype != torch.float32 or p.device.type != "cpu":
            raise ValueError(f"int8 quantisation needs fp32 CPU weights, got {p.dtype} on {p.device}")


def _row_range(view: torch.Tensor, owner: torch.Tensor) -> slice:
    """The rows of ``owner`` (N, K) that the row view ``view`` covers."""
    start = (view.storage_offset() - owner.storage_offset()) // max(owner.stride(0), 1)
    return slice(start, start + view.shape[0])


def transforms(model: nn.Module, plan: Int8Plan) -> tuple[dict[str, LinearTransform], list]:
    """What ``plan`` means for the layers of ``model``: ({linear weight name: transform of the whole matrix},
    [(LayerNorm, s) to fold]). Raises ValueError for names that are not int8 layers or a bad scale."""
    names = int8_layer_names(model)
    params = dict(model.named_parameters())
    unknown = sorted((set(plan.smooth) | set(plan.fp32)) - set(names))
    if unknown:
        raise ValueError(f"int8 plan names layers this model has not: {', '.join(unknown[:5])}")
    sites = fold_sites(model)
    in_scale, row_scale, runtime, norms = {}, {}, set(), []
    for name, s in plan.smooth.items():
        if name in plan.fp32:
            continue
        s = s.detach().float()
        if s.shape != (params[name].shape[1],) or not bool((s > 0).all() and torch.isfinite(s).all()):
            raise ValueError(f"int8 plan: smoothing of {name} must be ({params[name].shape[1]},) finite and > 0")
        in_scale[name] = s
        kind, module = sites.get(name, ("runtime", None))
        if kind == "norm":
            norms.append((module, s))
        elif kind == "v_rows":
            W = module.width
            proj = next(n for n in names if params[n] is module.in_proj_weight)
            row_scale[proj] = torch.cat([torch.ones(2 * W), s])
        else:
            runtime.add(name)
    out = {}
    for name in names:
        out[name] = LinearTransform(in_scale.get(name), row_scale.get(name),
                                    (1.0 / in_scale[name]) if name in runtime else None, name not in plan.fp32)
    return out, norms


def _rows(t: LinearTransform, rows: slice) -> LinearTransform:
    return dataclasses.replace(t, row_scale=None if t.row_scale is None else t.row_scale[rows])


def quantize_model(model: nn.Module, plan: Int8Plan | None = None,
                   preloaded: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> Int8Weights:
    """Pack every linear layer the modules of ``model`` (fp32, on the CPU) declare as int8 (see
    Int8Linears), following ``plan`` (smoothing, layers kept fp32; None: every layer int8, unsmoothed);
    returns the packs. ``preloaded``: {weight name: (int8 (N, K), fp32 scales (N,))} of the transformed
    whole matrices, used instead of quantising (an int8 checkpoint's values).

    The parameters are frozen (``requires_grad=False``): int8 layers have no backward.
    """
    _check_fp32_cpu(model)
    plan = plan or Int8Plan()
    preloaded = preloaded or {}
    pairs = int8_linears(model)
    per_layer, norms = transforms(model, plan)
    names, owners = _matrix_names(model), Owners(model)
    model.requires_grad_(False)
    weights = Int8Weights()
    weights.plan = plan
    for weight, bias in pairs:
        owner = owners(weight)
        name = names[id(owner)]
        rows = _row_range(weight, owner)
        t = _rows(per_layer[name], rows)
        if not t.int8 and t.in_scale is None and t.row_scale is None:
            continue  # kept fp32 as it is: the fp32 op on the model's own weights
        pre = preloaded.get(name)
        weights.add(weight, bias, t, None if pre is None or not t.int8 else (pre[0][rows], pre[1][rows]))
    for ln, s in norms:
        weights.add_norm(ln.weight, ln.bias, s)
    return weights


def int8_ops(base: OpTable, weights: Int8Weights) -> OpTable:
    """``base`` with its ``linear`` replaced by the int8 GEMM for every weight in ``weights`` (and its
    ``layer_norm`` using the smoothed gain and bias of the LayerNorms that ``weights`` folds smoothing into)."""
    fp32_linear, fp32_layer_norm = base.linear, base.layer_norm

    def int8_entry(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, upcast: bool):
        """The entry of (weight, bias) if this call runs it (fp32 CPU input, checked), else None: the fp32 op."""
        if upcast or x.dtype != torch.float32 or x.numel() == 0:
            return None
        if x.device.type != "cpu":
            raise ValueError(f"int8 models run on the CPU, got an input on {x.device}")
        entry = weights.lookup(weight, bias)
        if entry is None or entry.pack is None:
            return entry
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("int8 linear layers have no backward; run the model under torch.no_grad() "
                               "or torch.inference_mode(), or use precision='fp32' to train")
        if x.shape[-1] != weight.shape[1]:
            raise ValueError(f"linear: input has {x.shape[-1]} features, weight expects {weight.shape[1]}")
        return entry

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, upcast: bool = False):
        """y = x @ weight.T + bias.  x: (..., K) fp32, weight: (N, K), bias: (N,) -> (..., N) fp32."""
        entry = int8_entry(x, weight, bias, upcast)
        if entry is None:
            return fp32_linear(x, weight, bias, upcast=upcast)
        if entry.pack is None:
            return fp32_linear(x, entry.weight, entry.bias)
        return int8_matmul(x.reshape(-1, x.shape[-1]), entry.pack, entry.input_scale).view(*x.shape[:-1],
                                                                                          weight.shape[0])

    composed_linear_act = compose_linear_act(linear, base.bias_act)

    def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str, upcast: bool = False):
        """act(x @ weight.T + bias).  x: (..., K) fp32, weight: (N, K), bias: (N,) or None -> (..., N) fp32. A
        layer on fastclip's int8 kernel gets the bias and activation in the kernel's epilogue (the MLP's hidden
        layer is written once); otherwise the int8 ``linear``, then ``bias_act``."""
        if KERNEL is not None and bias is not None and act in KERNEL.ACT_CODES:
            entry = int8_entry(x, weight, None, upcast)
            if entry is not None and isinstance(entry.pack, KERNEL.Int8Pack):
                pack = weights.with_bias(weight, bias)
                if pack is not None:
                    return KERNEL.linear_int8(x, pack, act, x_scale=entry.input_scale)
        return composed_linear_act(x, weight, bias, act, upcast=upcast)

    def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                   residual: torch.Tensor | None = None, upcast: bool = False):
        """``base.layer_norm`` with a smoothed LayerNorm's gain and bias.  x: (..., D) -> (..., D)."""
        smoothed = weights.norm(weight, bias)
        if smoothed is not None:
            weight, bias = smoothed
        return fp32_layer_norm(x, weight, bias, eps, residual=residual, upcast=upcast)

    table = dataclasses.replace(base, linear=linear, linear_act=linear_act)
    if KERNEL is not None and base.attention is cpu_attention.attention:  # bf16 products where the CPU has them
        table = dataclasses.replace(table, attention=functools.partial(cpu_attention.attention, bf16_dots=True))
    fused = None  # whole pre-norm blocks in one call (int8_block.py); never the base table's fp32 one
    if KERNEL is not None and base.backend == "cpu":
        from .int8_block import fused_block

        fused = fused_block(weights, KERNEL)
    table = dataclasses.replace(table, encoder_block=fused)
    return dataclasses.replace(table, layer_norm=layer_norm) if weights.has_norms else table
