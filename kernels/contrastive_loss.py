"""Contrastive-loss tiles on the GPU, forward pass: row/column log-sum-exp (InfoNCE) and softplus sums (SigLIP).

The logit matrix of a (rows x columns) block pair is ``L = scale * A @ B.T`` (``+ bias`` for SigLIP), with
A the image features (M, D) and B the text features (N, D), both row-major in one dtype (fp32, fp16 or
bf16). It is never stored: one program owns BLOCK_M rows of A and streams B in BLOCK_N-row tiles; each
logit tile is a K-loop of ``tl.dot`` over D in BLOCK_K chunks (any D: the last chunk is masked), fp32
accumulation, then the element-wise work happens on the tile in registers.

* ``_clip_fwd_kernel``: per row, the online log-sum-exp over all N columns (image -> text); per column,
  the log-sum-exp over this program's BLOCK_M rows, written to (cdiv(M, BLOCK_M), N) buffers that the
  host reduces (text -> image). Both directions from one tile pass; the buffers are O(N·M/BLOCK_M) and
  the launcher bounds them by launching over row chunks. Every log-sum-exp leaves the kernel as a max
  and a log-sum, added in float64 by the host: an fp32 ``max + log(sum)`` would be off by up to half an
  ulp of the logits (~1e-6 at |L| ~ 20), an error every softmax of the backward pass would inherit. It
  also returns the diagonal logits ``L[r, r + diag_offset]`` exactly as the tiles hold them.
* ``_siglip_fwd_kernel``: per row, ``sum_j softplus(z_rj)`` with ``z = L`` off the diagonal and ``-L``
  on it (``-log sigmoid(label * L)`` with labels +1 on the diagonal, -1 elsewhere).

The functions at the bottom (``clip_lse_``, ``siglip_softplus_sum``) have the contract of their
namesakes in ``fastclip/losses/blocks.py`` (float64 accumulators folded in place), with the image operand
unscaled and ``scale`` / ``bias`` as fp32 scalar tensors read by the kernels (no host sync). The
backward kernels are in ``kernels/contrastive_loss_bwd.py``.

Numerics: fp16/bf16 tiles run on tensor cores with fp32 accumulation; fp32 inputs use
``input_precision="ieee"`` (true fp32 FMAs, no TF32). log1p and expm1 are evaluated without a
cancelling ``log(1 + x)`` / ``exp(x) - 1`` (``_log1p``, ``_expm1``), so the sum of tiny softplus terms
and the gradient of confident pairs keep fp32 accuracy. Under ``TRITON_INTERPRET=1`` bf16 dot operands
go through ``kernels/interpreter.py`` (``INTERPRET_BF16``).

Launch configs (no autotuning: the backward kernel accumulates into its output, so timing trial runs
would need restores; registers / shared memory / spills in docs/gpu.md, measured by the compile checks):
fp16/bf16 BLOCK_K = 64 (16 or 32 for D < 64), 8 warps, 3 stages, tiles of 128 rows x 64 columns in the
forward kernels (4 warps spill on sm_80; 128 x 128 reaches 255 registers and spills) and 64 x 128 in the
backward kernel (each column tile ends with a read-modify-write of the program's (64, D) fp32 gradient
rows, so wider column tiles halve that traffic; 64 x 256 spills on sm_90, and so does 64 x 128 with
BLOCK_K = 16 on sm_80, which keeps 128 x 64); fp32 32 x 32 tiles,
BLOCK_K = 32, 8 warps, 2 stages (an FMA dot keeps whole operand tiles in registers: 4 warps spill in
the backward kernel on sm_80).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .interpreter import interpret_bf16, mma_operand

_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# upper bound on the elements of each (row blocks x N) fp32 column buffer of one forward launch (64 MiB)
_MAX_PARTIAL = 1 << 24


@triton.jit
def _logit_tile(A, B, rows, cols, row_ok, col_ok, D,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32 tile of A[rows] @ B[cols].T; A: (M, D), B: (N, D) row-major."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    a_base = A + rows.to(tl.int64)[:, None] * D  # (BM, 1) row starts; int64: M * D may pass 2**31
    b_base = B + cols.to(tl.int64)[None, :] * D  # (1, BN)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + offs_k  # (BK,)
        k_ok = k < D
        a = tl.load(a_base + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # (BM, BK)
        bt = tl.load(b_base + k[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # (BK, BN)
        acc = tl.dot(mma_operand(a, INTERPRET_BF16), mma_operand(bt, INTERPRET_BF16), acc, input_precision="ieee")
    return acc


@triton.jit
def _log1p(x):
    """log(1 + x) for x in [0, 1], as 2 atanh(t), t = x / (2 + x) <= 1/3: an odd series in t, no cancellation."""
    t = x / (2.0 + x)
    t2 = t * t
    p = 1.0 / 17.0
    p = p * t2 + 1.0 / 15.0
    p = p * t2 + 1.0 / 13.0
    p = p * t2 + 1.0 / 11.0
    p = p * t2 + 1.0 / 9.0
    p = p * t2 + 1.0 / 7.0
    p = p * t2 + 1.0 / 5.0
    p = p * t2 + 1.0 / 3.0
    p = p * t2 + 1.0
    return 2.0 * t * p


@triton.jit
def _softplus(x):
    """log(1 + exp(x)), stable for any x."""
    return tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _expm1(x):
    """exp(x) - 1 without cancellation: a degree-8 Taylor polynomial for |x| < 1/4, exp(x) - 1 beyond."""
    p = 1.0 + x * (1.0 / 8.0)
    p = 1.0 + x * (1.0 / 7.0) * p
    p = 1.0 + x * (1.0 / 6.0) * p
    p = 1.0 + x * (1.0 / 5.0) * p
    p = 1.0 + x * (1.0 / 4.0) * p
    p = 1.0 + x * (1.0 / 3.0) * p
    p = 1.0 + x * (1.0 / 2.0) * p
    return tl.where(tl.abs(x) < 0.25, x * p, tl.exp(x) - 1.0)


@triton.jit
def _clip_fwd_kernel(
    A, B,  # (M, D), (N, D) row-major, same dtype: image rows, text columns
    Scale,  # (1,) fp32: logit_scale (already exponentiated)
    RowMax, RowLog,  # (M,) fp32 out: log-sum-exp of each row of L over the N columns = RowMax + RowLog
    ColMax, ColLog,  # (cdiv(M, BLOCK_M), N) fp32 out: the same for each column over this program's rows
    Diag,  # (M,) fp32 out: L[r, r + diag_offset] (0 where that column is outside [0, N))
    M, N, D, diag_offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    row_ok = rows < M
    scale = tl.load(Scale)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp(L - m_i)
    diag = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)  # (BN,)
        col_ok = cols < N
        valid = row_ok[:, None] & col_ok[None, :]  # (BM, BN)
        s = _logit_tile(A, B, rows, cols, row_ok, col_ok, D, BLOCK_M, BLOCK_N, BLOCK_K, INTERPRET_BF16) * scale
        on_diag = valid & (cols[None, :] == rows[:, None] + diag_offset)
        diag += tl.sum(tl.where(on_diag, s, 0.0), 1)
        s = tl.where(valid, s, float("-inf"))
        # image -> text: online log-sum-exp along the row
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)  # padding rows: avoid inf - inf
        l_i = l_i * tl.exp(m_i - m_base) + tl.sum(tl.exp(s - m_base[:, None]), 1)
        m_i = m_new
        # text -> image: this program sees each column once, so its partial column log-sum-exp is final
        c_max = tl.max(s, 0)  # (BN,) finite for real columns: every program has a real row
        c_base = tl.where(c_max == float("-inf"), 0.0, c_max)
        c_sum = tl.where(col_ok, tl.sum(tl.exp(s - c_base[None, :]), 0), 1.0)  # padding columns: log(1)
        tl.store(ColMax + pid.to(tl.int64) * N + cols, c_base, mask=col_ok)
        tl.store(ColLog + pid.to(tl.int64) * N + cols, tl.log(c_sum), mask=col_ok)
    l_safe = tl.where(row_ok, l_i, 1.0)
    tl.store(RowMax + rows, m_i, mask=row_ok)
    tl.store(RowLog + rows, tl.log(l_safe), mask=row_ok)
    tl.store(Diag + rows, diag, mask=row_ok)


@triton.jit
def _siglip_fwd_kernel(
    A, B,  # (M, D), (N, D) row-major, same dtype
    Scale, Bias,  # (1,) fp32 each: logit_scale, logit_bias
    RowSum,  # (M,) fp32 out: sum_j softplus(z_rj), z = -L on the diagonal, L elsewhere
    M, N, D, diag_offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    row_ok = rows < M
    scale = tl.load(Scale)
    bias = tl.load(Bias)
    acc = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)  # (BN,)
        col_ok = cols < N
        valid = row_ok[:, None] & col_ok[None, :]  # (BM, BN)
        z = _logit_tile(A, B, rows, cols, row_ok, col_ok, D, BLOCK_M, BLOCK_N, BLOCK_K, INTERPRET_BF16) * scale + bias
        z = tl.where(cols[None, :] == rows[:, None] + diag_offset, -z, z)  # positives: -log sigmoid(L)
        acc += tl.sum(tl.where(valid, _softplus(z), 0.0), 1)
    tl.store(RowSum + rows, acc, mask=row_ok)


# Interpreted or compiled was decided when @triton.jit ran (TRITON_INTERPRET at import time).
INTERPRETED = not isinstance(_clip_fwd_kernel, triton.runtime.jit.JITFunction)


# ---------------------------------------------------------------- launch configs
def launch_config(dtype: torch.dtype, dim: int, backward: bool = False) -> dict:
    """Tile sizes and launch options for features of ``dtype`` and width ``dim`` (see the docstring)."""
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32 if dim >= 32 else 16, num_warps=8, num_stages=2)
    block_k = 64 if dim >= 64 else max(16, triton.next_power_of_2(dim))
    block_m, block_n = (64, 128) if backward and block_k >= 32 else (128, 64)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=8, num_stages=3)


def check_operands(a: torch.Tensor, b: torch.Tensor, *scalars: torch.Tensor) -> None:
    """The kernels read row-major (rows, D) features of one dtype and fp32 scalars on the same device."""
    if a.dtype not in _DTYPES or a.dtype != b.dtype:
        raise TypeError(f"contrastive loss kernels: features must share one of float32/float16/bfloat16, "
                        f"got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"contrastive loss kernels: features must be (rows, D) with one D, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if not (a.is_contiguous() and b.is_contiguous()):
        raise ValueError("contrastive loss kernels: features must be contiguous (row-major)")
    for t in (b, *scalars):
        if t.device != a.device:
            raise ValueError(f"contrastive loss kernels: tensors on {a.device} and {t.device}")
    for t in scalars:
        if t.dtype != torch.float32 or t.numel() != 1:
            raise TypeError(f"contrastive loss kernels: scale/bias must be one fp32 value, got {t.dtype} "
                            f"{tuple(t.shape)}")
    if a.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"contrastive loss kernels need CUDA tensors, got {a.device} (CPU tensors run only "
                         "if TRITON_INTERPRET=1 was set before the kernels were imported)")


def _launch(kernel, grid_rows: int, cfg: dict, *args, dtype, **constexprs) -> None:
    """One program per BLOCK_M rows; ``dtype`` (the features') sets INTERPRET_BF16."""
    meta = {k: v for k, v in cfg.items() if k.startswith("BLOCK_")}
    kernel[(triton.cdiv(grid_rows, cfg["BLOCK_M"]),)](*args, **meta, **constexprs, INTERPRET_BF16=interpret_bf16(dtype),
                                                       num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


# ---------------------------------------------------------------- block functions (forward)
def clip_lse_(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, lse_row: torch.Tensor,
              lse_col: torch.Tensor, diag: torch.Tensor | None = None, diag_offset: int = 0) -> None:
    """Fold the row and column log-sum-exp of ``L = scale * img @ txt.T`` into ``lse_row`` (M,) and
    ``lse_col`` (N,), both float64, in place. img: (M, D), txt: (N, D). If ``diag`` (M,) float64 is
    given, ``diag[r] = L[r, r + diag_offset]`` for the rows whose diagonal column is in [0, N)."""
    check_operands(img, txt, scale)
    (m, dim), n = img.shape, txt.shape[0]
    cfg = launch_config(img.dtype, dim)
    bm = cfg["BLOCK_M"]
    chunk = max(bm, _MAX_PARTIAL // max(n, 1) // bm * bm)  # rows per launch: bounds the column buffer
    f32 = dict(dtype=torch.float32, device=img.device)
    for r0 in range(0, m, chunk):
        r1 = min(m, r0 + chunk)
        row_max, row_log, dg = (torch.empty(r1 - r0, **f32) for _ in range(3))
        col_max, col_log = (torch.empty(triton.cdiv(r1 - r0, bm), n, **f32) for _ in range(2))  # (row blocks, N)
        _launch(_clip_fwd_kernel, r1 - r0, cfg, img[r0:r1], txt, scale, row_max, row_log, col_max, col_log, dg,
                r1 - r0, n, dim, diag_offset + r0, dtype=img.dtype)
        torch.logaddexp(lse_row[r0:r1], row_max.double() + row_log.double(), out=lse_row[r0:r1])
        top = col_max.amax(0)  # (N,) the blocks' sums are rescaled to the largest max, in fp32
        col_sum = col_max.sub_(top).add_(col_log).exp_().sum(0)
        torch.logaddexp(lse_col, top.double() + col_sum.log().double(), out=lse_col)
        if diag is not None:
            lo, hi = max(r0, -diag_offset), min(r1, n - diag_offset)
            if lo < hi:
                diag[lo:hi] = dg[lo - r0:hi - r0].double()


def siglip_softplus_sum(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                        diag_offset: int | None = None) -> torch.Tensor:
    """sum_ij softplus(z_ij), z = scale * img[i] . txt[j] + bias, as a float64 scalar; on the diagonal
    (r, r + diag_offset), if given, the positives' softplus(-z) = -log sigmoid(z) instead."""
    check_operands(img, txt, scale, bias)
    (m, dim), n = img.shape, txt.shape[0]
    cfg = launch_config(img.dtype, dim)
    rows = torch.empty(m, dtype=torch.float32, device=img.device)
    offset = n if diag_offset is None else diag_offset  # r + n is never a column: no positives
    _launch(_siglip_fwd_kernel, m, cfg, img, txt, scale, bias, rows, m, n, dim, offset, dtype=img.dtype)
    return rows.sum(dtype=torch.float64)


# ---------------------------------------------------------------- compile checks (kernels/compile_check.py)
def compile_spec(name: str, kernel, dtype: str, pointers: dict, ints: list, floats: list, constexprs: dict,
                 cfg: dict) -> dict:
    """One COMPILE_SPECS entry: pointers {arg: "feat" | "fp32"}, ints/floats the scalar runtime args."""
    sig = {p: (f"*{dtype}" if kind == "feat" else "*fp32") for p, kind in pointers.items()}
    sig.update({a: "i32" for a in ints})
    sig.update({a: "fp32" for a in floats})
    blocks = {k: v for k, v in cfg.items() if k.startswith("BLOCK_")}
    return dict(name=name, kernel=kernel, dtype=dtype, signature=sig,
                constexprs=dict(constexprs, INTERPRET_BF16=False, **blocks),
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                aligned=list(pointers) + ["D"], tensor_cores=dtype != "fp32")


def spec_configs(backward: bool = False):
    """(dtype name, launch config) for every config ``launch_config`` can return (BLOCK_K follows D)."""
    out = []
    for dt, name in _DTYPES.items():
        for dim in (768, 32, 16):
            cfg = launch_config(dt, dim, backward)
            if (name, cfg) not in out:
                out.append((name, cfg))
    return out


def _compile_specs() -> list[dict]:
    specs = []
    for name, cfg in spec_configs():
        specs.append(compile_spec("clip_loss fwd", _clip_fwd_kernel, name,
                                  dict(A="feat", B="feat", Scale="fp32", RowMax="fp32", RowLog="fp32",
                                       ColMax="fp32", ColLog="fp32", Diag="fp32"),
                                  ["M", "N", "D", "diag_offset"], [], {}, cfg))
        specs.append(compile_spec("siglip_loss fwd", _siglip_fwd_kernel, name,
                                  dict(A="feat", B="feat", Scale="fp32", Bias="fp32", RowSum="fp32"),
                                  ["M", "N", "D", "diag_offset"], [], {}, cfg))
    return specs


COMPILE_SPECS = _compile_specs
