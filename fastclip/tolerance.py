"""fastclip's one tolerance policy: every numeric threshold the tests hold results to lives here, with its
reason (``fastclip verify`` uses the low-precision rule too).

Two rules compare a computation with a reference run on the same inputs:

* fp32 (``check_fp32``): run the reference in float64 too. The result's max-abs error against the
  float64 reference may be at most ``FP32_ERROR_FACTOR`` times the fp32 reference's own max-abs error
  against float64, plus a floor of ``FP32_FLOOR_ULPS`` ulp of the result's magnitude (for results the
  fp32 reference happens to get exactly). The bar follows how hard the input is for fp32 -- long dot
  products, large scores, the lane width and FMA order of the CPU (AVX2 vs AVX-512) or GPU -- where a
  fixed atol/rtol is either too tight for some CPUs or too loose for easy inputs.
* fp16/bf16 (``check_low_precision``, ``low_precision_bound``): the max-abs error against the fp32
  reference may be at most twice the error of the reference op run in the same low dtype, plus a small
  absolute term per dtype (the flash-attention rule).

``check`` (and ``check_close``) applies the rule of the result's dtype. The remaining constants are fixed
bars of particular contracts (parity with upstream, int8, the losses, one model along equivalent paths).
"""
from __future__ import annotations

import torch

# ---------------------------------------------------------------------------------------- the fp32 rule
FP32_EPS = torch.finfo(torch.float32).eps
# A kernel sums in another order than the reference (tiles, online softmax rescaling, FMA, 8- or 16-lane
# partial sums), so its error is of the same order as the reference's own, not smaller. Measured worst ratios
# (tests/kernels' summary table, where the ulp floor does not decide) are ~1.3-3.9 on AVX-512 and up to 4.7
# on AVX2 (the C++ normalize_project's projection against MKL's blocked sums): 4 would be too tight, 8 leaves
# room for other CPUs and GPUs, while a real bug (a dropped tile, a wrong mask or scale) is off by orders
# of magnitude more.
FP32_ERROR_FACTOR = 8
# Floor for results the fp32 reference gets (nearly) exactly -- attention over one key, an identity
# activation, a reduction to one scalar that torch sums pairwise: a few ulp of the result's largest magnitude.
FP32_FLOOR_ULPS = 4

# ---------------------------------------------------------------------------------------- the low-precision rule
# Elementwise ops and whole tiny models (``fastclip verify``): about an ulp at 1.0 (fp16 2^-10, bf16 2^-7).
LOW_PRECISION_ATOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}
# Attention: a tenth of an ulp at 1.0 -- its outputs are convex averages of v that the kernel rounds once.
ATTENTION_LOW_PRECISION_ATOL = {torch.float16: 1e-4, torch.bfloat16: 8e-4}

# ---------------------------------------------------------------------------------------- fixed bars
# fp32 reference model vs open_clip / transformers, raw and L2-normalised embeddings (random weights):
# both sum the same products in other orders through ~12 blocks.
UPSTREAM_ATOL = 1e-4
# A backend against the reference backend on the same tiny model in fp32 (``fastclip verify``): the same bar.
BACKEND_MODEL_ATOL = UPSTREAM_ATOL
# One fp32 model along paths that are exactly equivalent in real arithmetic (batch sizes, text grouping,
# last-block trimming, the server's batching): GEMMs of other shapes sum in other orders.
SAME_MODEL_ATOL = 1e-5
SAME_MODEL_RTOL = 1e-5
# The same batch through the same code twice (a file or CLI round trip): only fp32 storage in between.
REPEAT_ATOL = 1e-6
# An fp32 scalar computed twice by different code (exp of a stored log, a copied bias): a few ulp.
FP32_SCALAR_RTOL = 8 * FP32_EPS
# A weight change must move the embeddings by more than this (far above SAME_MODEL_ATOL).
CHANGED_OUTPUT_MIN = 1e-3
# Pixel mean/std folded into the patch embedding vs normalised pixels: relative to the largest value,
# the rounding of the folded weights.
FOLDED_PIXEL_NORM_REL = 1e-5
# L2-normalised outputs have norm 1 (and probability rows sum to 1) up to the rounding of their elements in
# the output dtype.
UNIT_NORM_ATOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
# Quantised (int8) or low-precision (fp16/bf16) embeddings: per-item cosine to the fp32 embedding.
MIN_COSINE = 0.99
# int8 vs int8 with only the fp32 ops' backend changed: the same int8 GEMMs, a few activation roundings.
INT8_SAME_GEMM_COSINE = 0.9999
# One int8 linear layer (per-channel weight, per-row activation scales): relative Frobenius error ~1%.
INT8_LINEAR_REL = 0.02
# The same on the int8 kernel's paths without VNNI: 7-bit activations (127 levels; int16 pair sums cannot saturate).
INT8_U7_LINEAR_REL = 0.03
# int8 image -> text top-1 agreement with fp32, where scores spread 10x more than int8's score error.
INT8_I2T_AGREEMENT = 0.95
INT8_SPREAD_MARGIN = 10
# int8 text -> image top-1 agreement: scores spread less than int8's error, so only a floor against a broken
# path (chance is 1/64).
INT8_T2I_AGREEMENT_FLOOR = 0.25
# Preprocessing: fp32 rounding of normalised pixel values (|v| < 3): a few ulp.
PIXEL_ATOL = 1e-6
# transformers' torchvision backend normalises as (x - 255 mean) / (255 std): ~2 ulp from open_clip's order.
HF_NORMALISE_GAP = 3e-7

# ---------------------------------------------------------------------------------------- contrastive losses
# Errors of the losses are relative: max-abs error / max-abs of the float64 value (helpers.loss_reference).
# fp32 blockwise / Triton loss vs float64: 2 x OpenCLIP's dense fp32 error, plus a floor for sums of
# thousands of fp32 products (~17 ulp).
LOSS_FP32_FACTOR = 2
LOSS_FP32_FLOOR = 2e-6
# A single pair: the CLIP loss is the constant 0, its gradients 0, up to fp32 rounding of the log terms.
ZERO_LOSS_ATOL = 1e-5
# Logits of ~4e3: fp32 rounds each exponent by up to ~2.4e-4, so the dense fp32 error is ~1e-5.
EXTREME_LOGITS_REL = 1e-4
# Two loss implementations on the same inputs (Triton vs torch tiles, across the ring, or vs OpenCLIP's dense
# loss): fp32 summation order; fp16 the returned gradients rounded to fp16 (2^-11 relative, times a few).
LOSS_BACKEND_REL = {torch.float32: 1e-5, torch.float16: 2e-3}
# Ranks sum the partial results of a distributed loss in another order than one process does.
LOSS_DISTRIBUTED = dict(rtol=2e-5, atol=2e-6)
# Column log-sum-exps folded in float64 from row chunks in another order: float64 rounding of fp32 tiles.
CHUNKED_LSE_RTOL = 1e-7


def loss_fp32_bound(ref_err: float, logit_scale: float = 1.0) -> float:
    """Allowed relative error of an fp32 loss (or gradient) whose dense fp32 reference is ``ref_err`` off.

    ``logit_scale``: the loss's temperature s. Each logit s * <a, b> of unit vectors is rounded in fp32 by up
    to s * 2^-24, which moves the softmax / sigmoid terms, and so the loss and its gradients, by that much
    relative whichever order the sums run in: the floor is at least that (100 for trained CLIP: 6e-6)."""
    return LOSS_FP32_FACTOR * ref_err + max(LOSS_FP32_FLOOR, float(logit_scale) * 2.0 ** -24)


def rounding_rel(dtype: torch.dtype) -> float:
    """Relative error of a result computed exactly enough in fp32 and rounded once to ``dtype``: 2 eps."""
    return 2 * torch.finfo(dtype).eps


def rounding_bound(magnitude: float, dtype: torch.dtype) -> float:
    """Max-abs error of values up to ``magnitude`` rounded once to ``dtype``: one ulp at that magnitude."""
    return torch.finfo(dtype).eps * magnitude


# ---------------------------------------------------------------------------------------- the rules
def wider(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference runs in to judge a ``dtype`` result: float64 for fp32, fp32 for fp16/bf16."""
    return torch.float64 if dtype == torch.float32 else torch.float32


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64 (0.0 for empty tensors); the shapes must match."""
    assert a.shape == b.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def fp32_bound(ref_err: float, magnitude: float) -> float:
    """Allowed max-abs error of an fp32 result whose fp32 reference is ``ref_err`` from float64, for
    results of largest magnitude ``magnitude``."""
    return FP32_ERROR_FACTOR * ref_err + FP32_FLOOR_ULPS * FP32_EPS * magnitude


def check_fp32(out: torch.Tensor, ref64: torch.Tensor, ref32: torch.Tensor, what: str) -> tuple[float, float]:
    """Assert the fp32 rule for ``out`` against ``ref64`` (the reference run in float64) and ``ref32`` (the
    reference run in fp32, on the same inputs). Non-finite reference values (inf, NaN) must be matched
    exactly. Returns (error of ``out``, error of ``ref32``), both against float64."""
    assert ref64.dtype == torch.float64, f"{what}: the fp32 rule needs a float64 reference, got {ref64.dtype}"
    assert out.shape == ref64.shape == ref32.shape, f"{what}: shapes {out.shape}, {ref64.shape}, {ref32.shape}"
    out, ref32 = out.double(), ref32.double()
    finite = torch.isfinite(ref64)
    if not finite.all():
        torch.testing.assert_close(out[~finite], ref64[~finite], rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m: f"{what}: non-finite values differ: {m}")
        out, ref64, ref32 = out[finite], ref64[finite], ref32[finite]
    err, ref_err = max_abs(out, ref64), max_abs(ref32, ref64)
    magnitude = ref64.abs().max().item() if ref64.numel() else 0.0
    bound = fp32_bound(ref_err, magnitude)
    assert err <= bound, (f"{what}: max-abs error {err:.3e} vs float64 exceeds {FP32_ERROR_FACTOR} x {ref_err:.3e} "
                          f"(the fp32 reference's) + {FP32_FLOOR_ULPS} ulp of {magnitude:.3g} = {bound:.3e}")
    return err, ref_err


def low_precision_bound(ref_err: float, dtype: torch.dtype, atol: float | None = None) -> float:
    """Allowed max-abs error of a low-precision result whose reference-in-dtype error is ``ref_err``."""
    return 2 * ref_err + (LOW_PRECISION_ATOL[dtype] if atol is None else atol)


def check_low_precision(out: torch.Tensor, ref32: torch.Tensor, ref_low: torch.Tensor, dtype: torch.dtype, what: str,
                        atol: float | None = None) -> tuple[float, float]:
    """Assert the low-precision rule for ``out`` (in ``dtype``) against ``ref32`` (the fp32 reference), with
    ``ref_low`` the reference op run in ``dtype``. Returns (error of ``out``, error of ``ref_low``)."""
    err, ref_err = max_abs(out, ref32), max_abs(ref_low, ref32)
    bound = low_precision_bound(ref_err, dtype, atol)
    assert err <= bound, (f"{what}: max-abs error {err:.3e} vs the fp32 reference exceeds 2 x {ref_err:.3e} "
                          f"(reference in {dtype}) + atol = {bound:.3e}")
    return err, ref_err


def check(out: torch.Tensor, expected: torch.Tensor, ref_low: torch.Tensor, dtype: torch.dtype, what: str,
          atol: float | None = None) -> tuple[float, float]:
    """Assert the rule of ``dtype`` for ``out``: ``expected`` is the reference run in ``wider(dtype)`` (float64
    for fp32 results, fp32 for fp16/bf16) and ``ref_low`` the reference run in ``dtype``; ``atol`` replaces
    LOW_PRECISION_ATOL. Returns (error of ``out``, error of ``ref_low``), both against ``expected``."""
    if dtype == torch.float32:
        return check_fp32(out, expected, ref_low, what)
    return check_low_precision(out, expected, ref_low, dtype, what, atol)


def check_close(out: torch.Tensor, expected: torch.Tensor, ref_low: torch.Tensor, dtype: torch.dtype, what: str,
                atol: float | None = None, record: dict | None = None) -> float:
    """``check`` returning only the error of ``out``; ``record`` keeps the worst error per dtype."""
    err, _ = check(out, expected, ref_low, dtype, what, atol)
    if record is not None:
        record[dtype] = max(record.get(dtype, 0.0), err)
    return err
# The outlier test models' massive residual channels over the median channel: trained checkpoints show 100x+.
INT8_OUTLIER_RATIO = 100
