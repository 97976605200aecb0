"""Calibrated int8: measure a model's activations on sample inputs, choose per layer how it runs in int8
(fastclip/backends/int8.py, ``Int8Plan``), and report what that costs in accuracy (docs/int8.md).

``calibrate(model, batches)`` runs the fp32 model over the calibration inputs twice:

1. it records each int8 layer's largest input magnitude per channel, ``max|X_j|``;
2. for every layer call it computes, besides the fp32 output it passes on, the int8 output without
   smoothing and with SmoothQuant smoothing ``s_j = max|X_j|^a / max|W_j|^(1-a)`` for each ``a`` in
   ``alphas``, and sums each one's squared error against fp32 per output channel over all its calls (on
   fp32 inputs, so errors do not compound): a layer's relative error is
   ``sqrt(mean_n ||y_int8[:, n] - y_fp32[:, n]||^2 / median_n ||y_fp32[:, n]||^2)`` over its output
   channels n (the error against a typical channel's size).

Each layer then takes the candidate of least error where smoothing folds into a LayerNorm or the v
projection (it costs nothing at run time); a layer smoothed at run time (``c_proj``: one multiply of its
input per call) takes smoothing only when unsmoothed int8 exceeds ``max_error``. Layers whose chosen error
still exceeds ``max_error`` stay fp32, worst first, at most ``max_fp32_fraction`` of the int8 layers.

``batches`` is a callable returning an iterable of ``("image", pixels (B, 3, S, S) normalised)`` and
``("text", tokens (B, L))`` items, called once per pass (inputs are streamed, never all held; the fp32
embeddings, E floats per item, are kept to compare the int8 model with).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from .backends import int8 as quant
from .backends.dispatch import compose_linear_act

ALPHAS = (0.5, 0.75)  # SmoothQuant's migration strengths tried per layer
# A layer's relative output error above which it is smoothed at run time, then kept fp32, with 8-bit activations:
# unsmoothed int8 layers without outliers measure 0.5-1.5%, layers crushed by an outlier channel 10-100%.
MAX_LAYER_ERROR = 0.04


def max_layer_error() -> float:
    """``MAX_LAYER_ERROR`` scaled to the activation levels of the int8 GEMM in use: 7-bit activations (no VNNI)
    have twice the quantisation step, and twice the error on every layer, outliers or not."""
    return MAX_LAYER_ERROR * 255 / quant.activation_levels()

MAX_FP32_FRACTION = 0.1  # at most this share of the int8 layers is kept fp32
Batches = Callable[[], Iterable[tuple[str, torch.Tensor]]]


@dataclasses.dataclass
class LayerReport:
    """One int8 layer's calibration: ``site`` where its smoothing goes ("norm", "v_rows", "runtime"),
    relative errors unsmoothed (``naive_error``) and as chosen (``error``), ``alpha`` (None: unsmoothed),
    ``fp32`` kept fp32."""

    name: str
    site: str
    naive_error: float
    error: float
    alpha: float | None
    fp32: bool


@dataclasses.dataclass
class Calibration:
    """The plan, one LayerReport per int8 layer, items seen per tower, and (after ``evaluate``) the
    per-item cosine of int8 to fp32 embeddings per tower: {"image": (mean, min), "text": (mean, min)}."""

    plan: quant.Int8Plan
    layers: list[LayerReport]
    items: dict[str, int]
    cosine: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    reference: dict[str, list[torch.Tensor]] = dataclasses.field(default_factory=dict, repr=False)


def smoothing_scale(x_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel scale.  x_absmax: (K,) max |X_j|, weight: (N, K) -> s (K,) > 0
    with ``s_j = max|X_j|^alpha / max_n |W_nj|^(1 - alpha)`` (1 where a channel or column is all zero)."""
    w_absmax = weight.detach().float().abs().amax(dim=0)
    s = x_absmax.float().pow(alpha) / w_absmax.pow(1.0 - alpha)
    ok = (x_absmax > 0) & (w_absmax > 0) & torch.isfinite(s)
    return torch.where(ok, s, torch.ones_like(s)).clamp(1e-4, 1e4)


@contextlib.contextmanager
def _tapped(model, linear: Callable):
    """Run ``model``'s fp32 ops with ``linear`` in place of the table's own (and no fused block, which would
    run its layers without calling ``linear``)."""
    ops = model.ops
    model.ops = dataclasses.replace(ops, linear=linear, linear_act=compose_linear_act(linear, ops.bias_act),
                                    encoder_block=None)
    try:
        yield ops.linear
    finally:
        model.ops = ops


def _encode(model, kind: str, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        if kind == "image":
            return model.encode_image(x, normalize=True)
        if kind == "text":
            return model.encode_text(x, normalize=True)
    raise ValueError(f"calibration batches are ('image', pixels) or ('text', tokens), got {kind!r}")


def _names(model) -> tuple[dict[int, str], dict[str, torch.Tensor], quant.Owners]:
    layers = quant.int8_layer_names(model)
    params = dict(model.named_parameters())
    return {id(params[n]): n for n in layers}, {n: params[n] for n in layers}, quant.Owners(model)


def _progress(enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(disable=not enabled, desc=desc, unit="item")


def collect_absmax(model, batches: Batches, progress: bool = False) -> dict[str, torch.Tensor]:
    """{int8 layer name: max |input| per channel (K,)} over every call on ``batches`` (fp32 model)."""
    by_id, _, owner = _names(model)
    absmax: dict[str, torch.Tensor] = {}

    def linear(x, weight, bias=None, upcast=False):
        name = by_id.get(id(owner(weight)))
        if name is not None and x.numel():
            m = x.detach().reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
            absmax[name] = torch.maximum(absmax[name], m) if name in absmax else m
        return fp32(x, weight, bias, upcast=upcast)

    with _tapped(model, linear) as fp32, _progress(progress, "calibration 1/3: ranges") as bar:
        for kind, x in batches():
            _encode(model, kind, x)
            bar.update(len(x))
    return absmax


def _relative(err: torch.Tensor, ref: torch.Tensor) -> float:
    """sqrt(mean_n ||error_n||^2 / median_n ||y_n||^2) over output channels n: the error against a typical
    channel's size, so a few large output channels (a massive residual written by c_proj) neither hide the
    error of the others nor -- where they are the ones off -- their own."""
    live = ref > 0
    return math.sqrt(err.mean().item() / ref[live].median().item()) if bool(live.any()) else 0.0


def layer_errors(model, batches: Batches, absmax: dict[str, torch.Tensor], alphas=ALPHAS, progress: bool = False):
    """({layer name: {alpha or None: (squared error (N,), squared fp32 output (N,)) per output channel,
    float64 (2, N)}}, {tower: [fp32 embedding batches (B, E)]}, {layer name: {alpha: s (K,)}})."""
    by_id, params, owner = _names(model)
    scales = {n: {a: smoothing_scale(absmax[n], params[n], a) for a in alphas} for n in absmax}
    sums: dict[str, dict] = {}
    packs: dict[tuple, quant.Int8Operand] = {}

    def pack(weight, bias, name, alpha):
        key = (quant._key(weight, bias), alpha)
        if key not in packs:
            w = weight if alpha is None else weight * scales[name][alpha]
            packs[key] = quant.pack_linear(w, bias)
        return packs[key]

    def linear(x, weight, bias=None, upcast=False):
        y = fp32(x, weight, bias, upcast=upcast)
        name = by_id.get(id(owner(weight)))
        if name is None or not x.numel():
            return y
        x2, y2 = x.detach().reshape(-1, x.shape[-1]).contiguous(), y.detach().reshape(-1, y.shape[-1]).double()
        rows = quant._row_range(weight, owner(weight))  # a q / kv view's rows of in_proj
        acc = sums.setdefault(name, {})
        for alpha in (None, *scales.get(name, {})):
            xa = x2 if alpha is None else (x2 / scales[name][alpha]).contiguous()
            yq = quant.int8_matmul(xa, pack(weight, bias, name, alpha))
            if alpha not in acc:
                acc[alpha] = torch.zeros(2, params[name].shape[0], dtype=torch.float64)  # (error, reference) per row
            acc[alpha][0, rows] += (yq.double() - y2).pow(2).sum(dim=0)
            acc[alpha][1, rows] += y2.pow(2).sum(dim=0)
        return y

    reference: dict[str, list[torch.Tensor]] = {}
    with _tapped(model, linear) as fp32, _progress(progress, "calibration 2/3: layer errors") as bar:
        for kind, x in batches():
            reference.setdefault(kind, []).append(_encode(model, kind, x).float())
            bar.update(len(x))
    return sums, reference, scales


def choose(model, sums: dict, scales: dict, max_error: float | None = None,
           max_fp32_fraction: float = MAX_FP32_FRACTION) -> tuple[quant.Int8Plan, list[LayerReport]]:
    """The plan from ``layer_errors``' sums (see the module docstring); layers never called stay unsmoothed.

    The v rows of an ``in_proj`` are divided by its ``out_proj``'s smoothing, which scales those output
    channels' errors and sizes alike (per-row weight scales, the bias divided too): in_proj is judged with
    them so scaled, after out_proj has chosen. ``max_error`` None: ``max_layer_error()``."""
    max_error = max_layer_error() if max_error is None else max_error
    layers, sites = quant.int8_layer_names(model), quant.fold_sites(model)

    def pick(name: str, row_scale: torch.Tensor | None) -> LayerReport:
        errs = {}
        for alpha, (err, ref) in sums.get(name, {None: torch.zeros(2, 1, dtype=torch.float64)}).items():
            if row_scale is not None:
                err, ref = err / row_scale.double() ** 2, ref / row_scale.double() ** 2
            errs[alpha] = _relative(err, ref)
        site = sites.get(name, ("runtime", None))[0]
        best = min(errs, key=errs.get)
        if site == "runtime" and errs[None] <= max_error:
            best = None
        return LayerReport(name, site, errs[None], errs[best], best, False)

    reports = {name: pick(name, None) for name in layers}
    first = {r.name: scales[r.name][r.alpha] for r in reports.values() if r.alpha is not None}
    for name, t in quant.transforms(model, quant.Int8Plan(first))[0].items():
        if t.row_scale is not None:
            reports[name] = pick(name, t.row_scale)
    over = sorted((r for r in reports.values() if r.error > max_error), key=lambda r: -r.error)
    for r in over[: int(max_fp32_fraction * len(layers))]:
        r.fp32 = True
    ordered = [reports[name] for name in layers]
    smooth = {r.name: scales[r.name][r.alpha] for r in ordered if r.alpha is not None and not r.fp32}
    return quant.Int8Plan(smooth, frozenset(r.name for r in ordered if r.fp32)), ordered


def calibrate(model, batches: Batches, alphas=ALPHAS, max_error: float | None = None,
              max_fp32_fraction: float = MAX_FP32_FRACTION, progress: bool = False) -> Calibration:
    """Measure the fp32 ``model`` (unchanged) on ``batches`` and choose its Int8Plan (module docstring);
    ``max_error`` None: ``max_layer_error()``, the bar of the int8 GEMM in use."""
    if model.int8_weights is not None:
        raise ValueError("calibrate needs the fp32 model; this one is already int8")
    quant._check_fp32_cpu(model)
    absmax = collect_absmax(model, batches, progress)
    if not absmax:
        raise ValueError("calibration saw no inputs: the batches were empty")
    sums, reference, scales = layer_errors(model, batches, absmax, alphas, progress)
    plan, reports = choose(model, sums, scales, max_error, max_fp32_fraction)
    items = {k: sum(len(e) for e in v) for k, v in reference.items()}
    return Calibration(plan, reports, items, reference=reference)


def apply(model, plan: quant.Int8Plan, backend: str | None = None):
    """Make the fp32 ``model`` int8 with ``plan``, in place (its fp32 weights stay as they are); returns it."""
    model.int8_weights = quant.quantize_model(model, plan)
    return model.set_backend(backend or model.backend)


def evaluate(model, batches: Batches, calibration: Calibration, progress: bool = False) -> Calibration:
    """Per-item cosine of the int8 ``model``'s embeddings to the fp32 ones calibration kept, per tower."""
    got: dict[str, list[torch.Tensor]] = {}
    with _progress(progress, "calibration 3/3: int8 vs fp32") as bar:
        for kind, x in batches():
            got.setdefault(kind, []).append(_encode(model, kind, x).float())
            bar.update(len(x))
    for kind, ref in calibration.reference.items():
        cos = F.cosine_similarity(torch.cat(got[kind]), torch.cat(ref), dim=-1)
        calibration.cosine[kind] = (cos.mean().item(), cos.min().item())
    return calibration


def quantize_calibrated(model, batches: Batches, backend: str | None = None, progress: bool = False,
                        **options) -> tuple[object, Calibration]:
    """``calibrate`` + ``apply`` + ``evaluate``: the fp32 ``model`` becomes the calibrated int8 model (in
    place); returns it with its Calibration (plan, per-layer report, cosines). ``options``: calibrate's."""
    calibration = calibrate(model, batches, progress=progress, **options)
    apply(model, calibration.plan, backend)
    return model, evaluate(model, batches, calibration, progress)


def format_report(calibration: Calibration) -> str:
    """The per-layer table and the embedding cosines, as text."""
    width = max([len(r.name) for r in calibration.layers] + [5])
    lines = [f"{'layer':{width}}  {'smoothing':>9}  {'alpha':>5}  {'unsmoothed':>10}  {'chosen':>8}  runs as"]
    for r in calibration.layers:
        smoothing = r.site if r.alpha is not None and not r.fp32 else "none"
        alpha = f"{r.alpha:.2f}" if r.alpha is not None and not r.fp32 else "-"
        error = 0.0 if r.fp32 else r.error
        lines.append(f"{r.name:{width}}  {smoothing:>9}  {alpha:>5}  {r.naive_error:10.2%}  {error:8.2%}  "
                     f"{'fp32' if r.fp32 else 'int8'}")
    kept = sum(r.fp32 for r in calibration.layers)
    smoothed = sum(r.alpha is not None and not r.fp32 for r in calibration.layers)
    lines.append(f"{len(calibration.layers)} layers: {len(calibration.layers) - kept} int8 ({smoothed} smoothed), "
                 f"{kept} fp32 (relative error of each layer's output, int8 vs fp32, on the calibration inputs)")
    for kind, (mean, low) in calibration.cosine.items():
        lines.append(f"{kind} embeddings, cosine int8 to fp32 over {calibration.items.get(kind, 0)} items: "
                     f"mean {mean:.5f}, min {low:.5f}")
    return "\n".join(lines)


# --- the default plan: fastclip.load(..., precision="int8") on an fp32 checkpoint, no user data -----------

DEFAULT_ALPHA = 0.5  # SmoothQuant's usual strength: splits each outlier channel's range evenly with the weight
DEFAULT_ITEMS = 4  # synthetic images and token rows of the built-in calibration set


def synthetic_batches(model, items: int = DEFAULT_ITEMS, seed: int = 0) -> Batches:
    """A small built-in calibration set: ``items`` smooth random images (B, 3, S, S) (normalised pixel
    scale) and ``items`` token rows (B, L) of random ids ending in the highest id (CLIP's end-of-text, where
    the text tower pools). Trained models' outlier channels are the same for every input ("massive
    activations" are input-independent), so their ranges show on any input."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    size, length, vocab = cfg.vision.image_size, cfg.text.context_length, cfg.text.vocab_size
    low = torch.randn(items, 3, max(size // 16, 1), max(size // 16, 1), generator=gen)
    images = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    images = images + 0.3 * torch.randn(items, 3, size, size, generator=gen)
    tokens = torch.zeros(items, length, dtype=torch.long)
    for row in range(items):
        n = min(length, 8 + 4 * row)
        tokens[row, :n] = torch.randint(1, vocab - 1, (n,), generator=gen)
        tokens[row, n - 1] = vocab - 1
    return lambda: [("image", images), ("text", tokens)]


def default_plan(model, alpha: float = DEFAULT_ALPHA) -> quant.Int8Plan:
    """The plan ``precision="int8"`` uses without calibration data: every int8 layer smoothed with
    ``alpha`` from its input ranges on ``synthetic_batches`` (one fp32 pass, no per-layer error pass, no
    layer kept fp32). ``FASTCLIP_INT8_SMOOTHING=0`` turns smoothing off (the plain per-call scheme)."""
    import os

    if os.environ.get("FASTCLIP_INT8_SMOOTHING", "1").strip() == "0":
        return quant.Int8Plan()
    absmax = collect_absmax(model, synthetic_batches(model))
    params = dict(model.named_parameters())
    return quant.Int8Plan({n: smoothing_scale(m, params[n], alpha) for n, m in absmax.items()})


# --- the int8 checkpoint: safetensors, int8 weights + scales, the plan in the metadata -------------------

FORMAT = "fastclip-int8-v1"
SCALE, SMOOTH = ".int8_scale", ".int8_smooth"


def save_int8(model, path, name: str, calibration: Calibration | None = None) -> None:
    """Write the int8 ``model`` to ``path`` (safetensors, no pickle): each int8 layer's weight as the int8
    values (N, K) of its smoothed matrix with ``<name>.int8_scale`` (N,) fp32 per-row scales and, if smoothed,
    ``<name>.int8_smooth`` (K,); every other tensor fp32 as in ``state_dict``. Metadata: ``format``,
    ``model`` (the architecture name), ``fp32`` (JSON list of the layers kept fp32), ``report`` (JSON)."""
    import json

    import safetensors.torch

    if model.int8_weights is None:
        raise ValueError("save_int8 needs an int8 model (fastclip.quantize.apply or precision='int8')")
    plan = model.int8_weights.plan
    per_layer, _ = quant.transforms(model, plan)
    tensors = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    for layer, t in per_layer.items():
        if not t.int8:
            continue
        bias = params.get(layer[: -len("weight")] + "bias")
        w, _ = t.apply(params[layer], bias)
        q, scale = quant.quantize_weight(w)
        tensors[layer], tensors[layer + SCALE] = q.contiguous(), scale.contiguous()
        if layer in plan.smooth:
            tensors[layer + SMOOTH] = plan.smooth[layer].float().contiguous()
    report = [dataclasses.asdict(r) for r in calibration.layers] if calibration is not None else []
    meta = {"format": FORMAT, "model": name, "fp32": json.dumps(sorted(plan.fp32)), "report": json.dumps(report),
            "cosine": json.dumps(calibration.cosine if calibration is not None else {})}
    safetensors.torch.save_file(tensors, str(path), metadata=meta)


def is_int8_file(path) -> bool:
    """Whether ``path`` is a safetensors file written by ``save_int8``."""
    from pathlib import Path

    if Path(path).suffix != ".safetensors":
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # not readable as safetensors: the ordinary loader reports it
        return False


def int8_file_model(path) -> str:
    """The architecture name an int8 checkpoint was written for (its ``model`` metadata)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("model", "")


def load_int8_file(path, build: Callable, precision: str, backend: str | None):
    """The model of an int8 checkpoint. ``build(state_dict, precision)`` makes the fp32 model of a state dict
    (fastclip/loading/factory.py). precision "int8": the saved int8 values and plan are used as they are
    (no calibration); "fp32": the dequantised weights in fp32; other precisions: ValueError."""
    import json

    import safetensors.torch
    from safetensors import safe_open

    if precision not in ("int8", "fp32"):
        raise ValueError(f"{path} is an int8 checkpoint (fastclip quantize): load it with precision='int8' "
                         f"(or 'fp32', dequantised), not {precision!r}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    raw = safetensors.torch.load_file(str(path))
    layers = [k[: -len(SCALE)] for k in raw if k.endswith(SCALE)]
    preloaded = {n: (raw.pop(n), raw.pop(n + SCALE)) for n in layers}
    smooth = {n: raw.pop(n + SMOOTH) for n in layers if n + SMOOTH in raw}
    plan = quant.Int8Plan(smooth, frozenset(json.loads(meta.get("fp32", "[]"))))
    sd = dict(raw)
    for n, (q, scale) in preloaded.items():
        sd[n] = q.float() * scale[:, None]  # the smoothed matrix W' = W * s / row_scale, undone below
    model = build(sd, "fp32")
    per_layer, _ = quant.transforms(model, plan)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in preloaded:
            t = per_layer[n]
            w = params[n]
            if t.in_scale is not None:
                w.div_(t.in_scale)
            if t.row_scale is not None:
                w.mul_(t.row_scale[:, None])
    if precision == "int8":
        model.int8_weights = quant.quantize_model(model, plan, preloaded)
        model.set_backend(backend or model.backend)
    return model
