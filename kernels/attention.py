"""Fused attention (forward only): softmax(q k^T / sqrt(Dh) [+ masks]) v, flash-style.

One program owns a BLOCK_M tile of queries of one (batch, head) and streams the keys/values in
BLOCK_N tiles, keeping a running row max ``m_i``, row sum ``l_i`` and fp32 accumulator (online
softmax, FlashAttention-2 style). The (Lq, Lk) score matrix is never written to memory.

Reference: ``fastclip.ref.attention``. Extras over the reference: an optional key-padding mask
``(B, Lk) bool, True = masked out``. A query row that sees no key at all (every key masked) returns
zeros (as flash-attention does), not the NaN a dense softmax would give.

Shapes and layouts
  q: (B, H, Lq, Dh), k/v: (B, H, Lk, Dh), any strides (e.g. views into a packed qkv tensor); the
  kernel takes strides, nothing is copied. The output is allocated as (B, Lq, H, Dh) memory and
  returned as its (B, H, Lq, Dh) permuted view, so ``out.transpose(1, 2).reshape(B, Lq, H * Dh)``
  (what a transformer block does next) is free. Head dims up to 128; a non-power-of-two Dh (72, 80,
  104, ...) is padded to BLOCK_D = next_pow2(Dh) with masked loads (zeros add nothing to q.k).
  Any Lq/Lk: partial tiles are masked.

Numerics
  fp16/bf16 operands go to tensor cores (mma.sync / wgmma) with fp32 accumulation; P is rounded to
  the value dtype before the P@V product, as in every flash kernel. fp32 inputs use
  ``input_precision="ieee"`` (true fp32 FMA, no TF32), so the fp32 kernel meets fp32 tolerances.

Autotune configs (BLOCK_M, BLOCK_N, num_warps, num_stages); registers, shared memory and spills of
each are in docs/gpu.md (kernels/compile_check.py). Per dtype and BLOCK_D at most three are tried:
  fp16/bf16 (tensor cores)
  - (64, 64, 4, 2), every head dim: short sequences. CLIP text (77) and ViT-B/32 (50) have one or
    two query tiles per head; BLOCK_M=64 wastes 22 % of the rows at L=50 where 128 wastes 61 %, and
    doubles the programs when B*H is small. 16 query rows per warp = one m16 MMA row block (sm_80)
    and one m64 wgmma per warpgroup (sm_90); 2 stages suffice for a 1-2 trip K/V loop.
  - (128, 64, 8, 3), every head dim: the A100 workhorse (the usual 128x64 sm_80 flash tile). 8 warps,
    not 4: with BLOCK_D=128 the fp32 accumulator alone is 128*128/128 threads = 128 registers per
    thread and 4 warps spill (measured); 3 cp.async stages hide HBM latency in 96 KiB of smem.
  - (128, 128, 8, 3), BLOCK_D <= 64 only: long sequences (197+) and H100, where two warpgroups
    each issue m64n128 wgmmas and the wider key tile halves the softmax bookkeeping per key. At
    BLOCK_D=128 it is dropped: three stages need 160 KiB (A100 max 163 KiB) and spill on sm_80, and
    even two stages hit 255 registers and spill in the bf16 causal variant on sm_90 (measured).
  fp32 (FMA, no tensor cores): (32, 32, 8, 2) everywhere and (64, 32, 8, 2) for BLOCK_D <= 64;
  fp32 64x64 tiles spill (an FMA dot keeps whole operand tiles in registers).
  Queries of <= 64 rows never try BLOCK_M=128. Grid: (B*H, cdiv(Lq, BLOCK_M)).

Interpreter (TRITON_INTERPRET=1, CPU tensors): the launcher skips autotuning and runs one config.
Triton 3.8's interpreter has two bf16 gaps, handled by kernels/interpreter.py behind the INTERPRET_BF16
constexpr (P is rounded to bf16 before P@V, and the output, exactly as cvt.rn.bf16 does).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .interpreter import mma_operand, round_to

MAX_HEAD_DIM = 128
_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

_cfg = lambda m, n, w, st: triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)  # noqa: E731
# (config, "lp" = fp16/bf16 or "fp32", the BLOCK_D values it is tried with); rationale in the docstring
_CONFIG_TABLE = [
    (_cfg(64, 64, 4, 2), "lp", (16, 32, 64, 128)),
    (_cfg(128, 64, 8, 3), "lp", (16, 32, 64, 128)),
    (_cfg(128, 128, 8, 3), "lp", (16, 32, 64)),
    (_cfg(32, 32, 8, 2), "fp32", (16, 32, 64, 128)),
    (_cfg(64, 32, 8, 2), "fp32", (16, 32, 64)),
]
CONFIGS = [c for c, _, _ in _CONFIG_TABLE]


def configs_for(fp32: bool, block_d: int, lq: int | None = None) -> list[triton.Config]:
    """The configs autotuning tries for one dtype class, BLOCK_D and (optionally) query length."""
    pool = [c for c, kind, dims in _CONFIG_TABLE if (kind == "fp32") == fp32 and block_d in dims]
    if lq is not None and lq <= 64:
        pool = [c for c in pool if c.kwargs["BLOCK_M"] <= 64] or pool
    return pool


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out,  # Q: (B, H, Lq, Dh), K/V: (B, H, Lk, Dh), Out: (B, H, Lq, Dh); any strides
    Mask,  # (B, Lk) uint8, nonzero = key masked out; unused unless HAS_MASK
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mn,
    H, Lq, Lk,  # heads, query length, key length
    qk_scale,  # fp32: log2(e) / sqrt(Dh), scores are exponentiated with exp2
    HEAD_DIM: tl.constexpr,  # Dh
    BLOCK_D: tl.constexpr,  # next_pow2(Dh), >= 16
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, INTERPRET_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)  # b * H + h: the large axis (grid axis 1 is capped at 65535)
    start_m = tl.program_id(1) * BLOCK_M
    off_b = (pid_bh // H).to(tl.int64)  # int64: a packed qkv batch stride overflows int32 at large B
    off_h = (pid_bh % H).to(tl.int64)

    offs_m = start_m + tl.arange(0, BLOCK_M)  # (BM,)
    offs_n = tl.arange(0, BLOCK_N)  # (BN,)
    offs_d = tl.arange(0, BLOCK_D)  # (BD,)
    d_ok = offs_d < HEAD_DIM  # (BD,) all true when Dh is a power of two
    m_ok = offs_m < Lq

    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BM, BD)
    q = mma_operand(q, INTERPRET_BF16)
    # scalar base pointers; tile pointers are rebuilt each trip so no (BD, BN) pointer tensor stays live
    K_bh = K + off_b * stride_kb + off_h * stride_kh
    V_bh = V + off_b * stride_vb + off_h * stride_vh
    Mask_b = Mask + off_b * stride_mb

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (log2 domain)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    hi = Lk
    if CAUSAL:  # keys past this tile's last query are never seen (Lq == Lk)
        hi = tl.minimum(Lk, start_m + BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n  # (BN,) key indices
        n_ok = cols < Lk
        kt_ptrs = K_bh + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd
        kt = tl.load(kt_ptrs, mask=d_ok[:, None] & n_ok[None, :], other=0.0)  # (BD, BN)
        s = tl.dot(q, mma_operand(kt, INTERPRET_BF16), input_precision="ieee") * qk_scale  # (BM, BN) fp32
        keep = n_ok[None, :]
        if CAUSAL:
            keep = keep & (offs_m[:, None] >= cols[None, :])
        if HAS_MASK:
            padded = tl.load(Mask_b + cols * stride_mn, mask=n_ok, other=1)
            keep = keep & (padded == 0)[None, :]
        s = tl.where(keep, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)  # all-masked row so far: avoid inf - inf
        p = tl.math.exp2(s - m_base[:, None])  # (BM, BN)
        alpha = tl.math.exp2(m_i - m_base)  # rescales what was accumulated under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptrs = V_bh + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd
        v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BN, BD)
        p = mma_operand(round_to(p, V.dtype.element_ty, INTERPRET_BF16), INTERPRET_BF16)
        acc = tl.dot(p, mma_operand(v, INTERPRET_BF16), acc * alpha[:, None], input_precision="ieee")
        m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # fully masked rows: acc is 0, output 0
    out = acc / l_safe[:, None]
    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, round_to(out, Out.dtype.element_ty, INTERPRET_BF16), mask=m_ok[:, None] & d_ok[None, :])


def _prune_configs(configs, named_args, **kwargs):
    return configs_for(named_args["Q"].dtype == torch.float32, kwargs["BLOCK_D"], named_args["Lq"])


# Interpreted or compiled was decided when @triton.jit ran (TRITON_INTERPRET at import time).
INTERPRETED = not isinstance(_attn_fwd_kernel, triton.runtime.jit.JITFunction)

_attn_fwd_tuned = triton.autotune(
    configs=CONFIGS,
    key=["Lq", "Lk", "HEAD_DIM", "CAUSAL", "HAS_MASK"],  # tensor dtypes are added to the key by Triton
    prune_configs_by={"early_config_prune": _prune_configs},
)(_attn_fwd_kernel)


def _check_inputs(q, k, v, causal, key_padding_mask):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"attention: {name} must be a 4-d tensor (B, H, L, Dh), got {got}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"attention: {name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    if q.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"attention: the Triton kernel needs CUDA tensors, got {q.device} "
                         "(CPU tensors run only if TRITON_INTERPRET=1 was set before the kernels were imported)")
    B, H, Lq, Dh = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[1] != H or k.shape[3] != Dh:
        raise ValueError(f"attention: shapes do not match: q {tuple(q.shape)} (B, H, Lq, Dh), "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)} (B, H, Lk, Dh)")
    if not 1 <= Dh <= MAX_HEAD_DIM:
        raise ValueError(f"attention: head dim {Dh} is not supported (1..{MAX_HEAD_DIM})")
    if causal and Lq != k.shape[2]:
        raise ValueError(f"attention: causal attention needs Lq == Lk, got {Lq} and {k.shape[2]}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (B, k.shape[2]):
            raise ValueError(f"attention: key_padding_mask must be a bool tensor of shape (B, Lk) = "
                             f"{(B, k.shape[2])}, got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"attention: key_padding_mask is on {key_padding_mask.device}, q on {q.device}")


def _empty_out(q):
    """(B, H, Lq, Dh) view of (B, Lq, H, Dh) memory: the next reshape to (B, Lq, H*Dh) is free."""
    B, H, Lq, Dh = q.shape
    return q.new_empty((B, Lq, H, Dh)).permute(0, 2, 1, 3)


def attention(q, k, v, causal: bool = False, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Fused softmax(q k^T / sqrt(Dh)) v.  q: (B, H, Lq, Dh), k/v: (B, H, Lk, Dh) -> (B, H, Lq, Dh).

    ``key_padding_mask``: optional (B, Lk) bool, True = that key is ignored. ``causal`` needs Lq == Lk.
    """
    _check_inputs(q, k, v, causal, key_padding_mask)
    B, H, Lq, Dh = q.shape
    Lk = k.shape[2]
    out = _empty_out(q)
    if out.numel() == 0:
        return out
    has_mask = key_padding_mask is not None
    mask = key_padding_mask.view(torch.uint8) if has_mask else q  # dummy pointer when unused
    mask_strides = mask.stride() if has_mask else (0, 0)
    args = (q, k, v, out, mask, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mask_strides,
            H, Lq, Lk, math.log2(math.e) / math.sqrt(Dh))
    meta = dict(HEAD_DIM=Dh, BLOCK_D=max(16, triton.next_power_of_2(Dh)), CAUSAL=bool(causal),
                HAS_MASK=has_mask, INTERPRET_BF16=INTERPRETED and q.dtype == torch.bfloat16)
    if INTERPRETED:  # autotuning would time configs on the CPU: run one config
        cfg = configs_for(q.dtype == torch.float32, meta["BLOCK_D"], Lq)[0]
        grid = (B * H, triton.cdiv(Lq, cfg.kwargs["BLOCK_M"]))
        _attn_fwd_kernel[grid](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        grid = lambda META: (B * H, triton.cdiv(Lq, META["BLOCK_M"]))  # noqa: E731
        _attn_fwd_tuned[grid](*args, **meta)
    return out


@torch.library.custom_op("fastclip::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                 key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.ops.fastclip.attention``: the launcher as an opaque op for torch.compile graphs."""
    return attention(q, k, v, causal, key_padding_mask)


@attention_op.register_fake
def _(q, k, v, causal=False, key_padding_mask=None):
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
                 lambda: "attention: q, k, v must be 4-d (B, H, L, Dh)")
    return _empty_out(q)


def _compile_specs() -> list[dict]:
    """The variants the models launch (protocol in kernels/compile_check.py): Dh 64 (CLIP), 80 (a
    padded BLOCK_D=128 head, ViT-H), 128, 32 (small models); full (vision), causal (CLIP text),
    key-padding mask; every config autotuning may pick for each."""
    specs = []
    variants = [(64, False, False), (64, True, False), (64, False, True), (80, False, False), (128, True, False),
                (32, False, False)]
    for dtype in ("fp16", "bf16", "fp32"):
        for head_dim, causal, has_mask in variants:
            tag = "causal" if causal else ("kpm" if has_mask else "full")
            sig = {"Q": f"*{dtype}", "K": f"*{dtype}", "V": f"*{dtype}", "Out": f"*{dtype}", "Mask": "*u8"}
            names = _attn_fwd_kernel.arg_names
            strides = [n for n in names if n.startswith("stride_")]
            sig.update({n: "i32" for n in strides})
            sig.update(H="i32", Lq="i32", Lk="i32", qk_scale="fp32")
            constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                              CAUSAL=causal, HAS_MASK=has_mask, INTERPRET_BF16=False)
            # innermost strides are 1 (the JIT specialises ints equal to 1 to constants)
            constexprs.update({n: 1 for n in ("stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_mn")})
            aligned = ["Q", "K", "V", "Out", "Mask"] + [n for n in strides if n not in constexprs and n != "stride_mb"]
            specs.append(dict(name=f"attention Dh={head_dim} {tag}", kernel=_attn_fwd_kernel, dtype=dtype,
                              signature=sig, constexprs=constexprs, aligned=aligned,
                              configs=configs_for(dtype == "fp32", constexprs["BLOCK_D"]),
                              tensor_cores=dtype != "fp32"))
    return specs


COMPILE_SPECS = _compile_specs()
