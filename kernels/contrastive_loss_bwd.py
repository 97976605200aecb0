"""Contrastive-loss tiles on the GPU, backward pass: feature gradients from recomputed logit tiles.

With ``L = scale * A @ B.T`` (+ bias) over a (rows x columns) block pair, both losses have a gradient
``dL/dlogits`` proportional to a matrix G that depends on L element-wise:

* InfoNCE: ``G = exp(L - lse_row) + exp(L - lse_col)`` (row softmax + column softmax) minus 2 on the
  diagonal, where it is evaluated as ``expm1(L - lse_row) + expm1(L - lse_col)`` (exact for confident
  pairs, whose softmaxes are ~1);
* SigLIP: ``G = sigmoid(L)`` minus 1 on the diagonal, evaluated there as ``-sigmoid(-L)``.

G is symmetric in its two operands: ``G.T`` is the same formula over ``B @ A.T`` with the two
log-sum-exps swapped and the diagonal offset negated. So one kernel, ``_grad_kernel``, computes
``dA += alpha * G @ B`` for the rows of A, and the launcher runs it twice: over image row blocks
(d_image = G @ text) and over text row blocks (d_text = G.T @ image). Each program owns its rows of dA,
so there are no atomics and the result is deterministic. It recomputes each logit tile (a K-loop of
``tl.dot`` over D), applies G in registers, rounds it to the feature dtype (as flash attention rounds
P) and multiplies it with the streamed B tile chunk by chunk of D, adding into the fp32 dA rows (a
read-modify-write of the program's own rows, so any D fits: no (BLOCK_M, D) accumulator lives in
registers). Cost: 2 tile GEMMs per launch, so the backward pass is 4 passes of N²·D multiply-adds and
the whole loss 5 (forward 1); fusing both launches would need atomics on dB (see docs/gpu.md).

The lse vectors arrive as float64 and are split into fp32 hi + lo parts (``exp((L - hi) - lo)``), so a
confident pair's ``L - lse`` keeps fp32 accuracy. The kernel also writes the row sums of G (SigLIP's
logit_bias gradient).

Launch configs: ``kernels.contrastive_loss.launch_config``; registers and spills in docs/gpu.md.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .contrastive_loss import _expm1, _launch, _logit_tile, check_operands, compile_spec, launch_config, spec_configs
from .interpreter import mma_operand, round_to


@triton.jit
def _grad_kernel(
    A, B,  # (M, D), (N, D) row-major, same dtype: this launch's rows and the streamed operand
    Scale, Bias,  # (1,) fp32 each: logit_scale, logit_bias (Bias is read only if SIGMOID)
    LseA, LseALo,  # (M,) fp32: hi and lo parts of the rows' log-sum-exp (InfoNCE only)
    LseB, LseBLo,  # (N,) fp32: the same for the columns
    dA,  # (M, D) fp32, accumulated in place: dA += alpha * G @ B
    GSum,  # (M,) fp32 out: sum_j G[r, j]
    M, N, D, diag_offset,  # diagonal: (r, r + diag_offset); diag_offset >= N means none
    alpha,  # fp32 multiplier of this launch's contribution
    SIGMOID: tl.constexpr,  # False: InfoNCE, True: SigLIP
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    row_ok = rows < M
    offs_k = tl.arange(0, BLOCK_K)  # (BK,)
    scale = tl.load(Scale)
    if SIGMOID:
        bias = tl.load(Bias)
    else:
        lse_a = tl.load(LseA + rows, mask=row_ok, other=0.0)  # (BM,)
        lse_a_lo = tl.load(LseALo + rows, mask=row_ok, other=0.0)
    da_base = dA + rows.to(tl.int64)[:, None] * D  # (BM, 1)
    g_sum = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)  # (BN,)
        col_ok = cols < N
        valid = row_ok[:, None] & col_ok[None, :]  # (BM, BN)
        on_diag = valid & (cols[None, :] == rows[:, None] + diag_offset)
        s = _logit_tile(A, B, rows, cols, row_ok, col_ok, D, BLOCK_M, BLOCK_N, BLOCK_K, INTERPRET_BF16) * scale
        if SIGMOID:
            z = s + bias
            e = tl.exp(-tl.abs(z))  # no overflow for any z
            sig_pos = tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))  # sigmoid(z)
            sig_neg = tl.where(z >= 0, e / (1.0 + e), 1.0 / (1.0 + e))  # sigmoid(-z)
            g = tl.where(on_diag, -sig_neg, sig_pos)
        else:
            lse_b = tl.load(LseB + cols, mask=col_ok, other=0.0)  # (BN,)
            lse_b_lo = tl.load(LseBLo + cols, mask=col_ok, other=0.0)
            x_a = (s - lse_a[:, None]) - lse_a_lo[:, None]  # (BM, BN) log row-softmax
            x_b = (s - lse_b[None, :]) - lse_b_lo[None, :]  # log column-softmax
            g = tl.where(on_diag, _expm1(x_a) + _expm1(x_b), tl.exp(x_a) + tl.exp(x_b))
        g = tl.where(valid, g, 0.0)
        g_sum += tl.sum(g, 1)
        g_op = mma_operand(round_to(g, B.dtype.element_ty, INTERPRET_BF16), INTERPRET_BF16)  # (BM, BN)
        b_base = B + cols.to(tl.int64)[:, None] * D  # (BN, 1)
        for k0 in range(0, D, BLOCK_K):
            k = k0 + offs_k
            k_ok = k < D
            b = tl.load(b_base + k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)  # (BN, BK)
            part = tl.dot(g_op, mma_operand(b, INTERPRET_BF16), input_precision="ieee")  # (BM, BK) fp32
            ptrs = da_base + k[None, :]
            m = row_ok[:, None] & k_ok[None, :]
            tl.store(ptrs, tl.load(ptrs, mask=m, other=0.0) + alpha * part, mask=m)
        tl.debug_barrier()  # this tile's dA stores are visible to all threads before the next tile loads
    tl.store(GSum + rows, g_sum, mask=row_ok)


def _split(x: torch.Tensor):
    """float64 -> (hi, lo) fp32 with hi + lo == x to ~1e-14."""
    hi = x.to(torch.float32)
    return hi, (x - hi.double()).to(torch.float32)


def _grad_launch(a, b, scale, bias, lse_a, lse_b, d_a, diag_offset, alpha, sigmoid) -> torch.Tensor:
    """d_a += alpha * G @ b over the rows of ``a``; returns the (M,) fp32 row sums of G."""
    (m, dim), n = a.shape, b.shape[0]
    if d_a.dtype != torch.float32 or d_a.shape != a.shape or not d_a.is_contiguous() or d_a.device != a.device:
        raise ValueError(f"contrastive loss kernels: gradient accumulators must be contiguous fp32 {tuple(a.shape)} "
                         f"on {a.device}, got {d_a.dtype} {tuple(d_a.shape)} on {d_a.device}")
    g_sum = torch.empty(m, dtype=torch.float32, device=a.device)
    if sigmoid:
        a_hi = a_lo = b_hi = b_lo = scale  # unused pointers
    else:
        (a_hi, a_lo), (b_hi, b_lo) = _split(lse_a), _split(lse_b)
    offset = n if diag_offset is None else diag_offset
    _launch(_grad_kernel, m, launch_config(a.dtype, dim, backward=True), a, b, scale, bias if sigmoid else scale, a_hi, a_lo,
            b_hi, b_lo, d_a, g_sum, m, n, dim, offset, float(alpha), SIGMOID=sigmoid, dtype=a.dtype)
    return g_sum


def clip_grad_(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, lse_row: torch.Tensor,
               lse_col: torch.Tensor, d_img: torch.Tensor, d_txt: torch.Tensor, alpha_img: float = 1.0,
               alpha_txt: float = 1.0, diag_offset: int | None = None) -> None:
    """With ``G = exp(L - lse_row) + exp(L - lse_col)`` (L = scale * img @ txt.T; lse float64, (M,) and
    (N,)) minus 2 on the diagonal ``(r, r + diag_offset)`` if given: ``d_img += alpha_img * G @ txt``,
    ``d_txt += alpha_txt * G.T @ img`` (fp32 accumulators)."""
    check_operands(img, txt, scale)
    back = None if diag_offset is None else -diag_offset
    _grad_launch(img, txt, scale, None, lse_row, lse_col, d_img, diag_offset, alpha_img, False)
    _grad_launch(txt, img, scale, None, lse_col, lse_row, d_txt, back, alpha_txt, False)


def siglip_grad_blocks_(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                        d_img: torch.Tensor, d_txt: torch.Tensor, alpha_img: float = 1.0, alpha_txt: float = 1.0,
                        diag_offset: int | None = None) -> torch.Tensor:
    """With ``G = sigmoid(scale * img @ txt.T + bias)`` minus 1 on the diagonal ``(r, r + diag_offset)``
    if given: ``d_img += alpha_img * G @ txt``, ``d_txt += alpha_txt * G.T @ img``; returns G.sum() (float64)."""
    check_operands(img, txt, scale, bias)
    back = None if diag_offset is None else -diag_offset
    g_sum = _grad_launch(img, txt, scale, bias, None, None, d_img, diag_offset, alpha_img, True)
    _grad_launch(txt, img, scale, bias, None, None, d_txt, back, alpha_txt, True)
    return g_sum.sum(dtype=torch.float64)


def _compile_specs() -> list[dict]:
    pointers = dict(A="feat", B="feat", Scale="fp32", Bias="fp32", LseA="fp32", LseALo="fp32", LseB="fp32",
                    LseBLo="fp32", dA="fp32", GSum="fp32")
    specs = []
    for name, cfg in spec_configs(backward=True):
        for sigmoid, loss in ((False, "clip_loss"), (True, "siglip_loss")):
            specs.append(compile_spec(f"{loss} bwd", _grad_kernel, name, pointers, ["M", "N", "D", "diag_offset"],
                                      ["alpha"], dict(SIGMOID=sigmoid), cfg))
    return specs


COMPILE_SPECS = _compile_specs
