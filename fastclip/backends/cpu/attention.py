"""``attention`` of the cpu backend (csrc/attention.cpp)."""
from __future__ import annotations

import math

import torch

from ... import _C, ref
from . import buffers
from .common import native, ptr, unit_last


def bf16_dots_supported() -> bool:
    """True if ``attention(..., bf16_dots=True)`` runs its bf16 products here: AVX512-BF16 (Zen 4, Cooper Lake,
    Sapphire Rapids and later) and AVX-512 not switched off (``_C.set_avx512`` / FASTCLIP_DISABLE_AVX512)."""
    return _C.attention_bf16_supported()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, upcast: bool = False,
              key_mask: torch.Tensor | None = None, rotary: tuple | None = None, bf16_dots: bool = False):
    """softmax(q k^T / sqrt(Dh) [+ causal mask]) v.  q: (B, H, Lq, Dh), k/v: (B, H, Lk, Dh) -> (B, H, Lq, Dh).

    The result is a (B, H, Lq, Dh) view of a (B, Lq, H, Dh) buffer, so ``out.transpose(1, 2).reshape(B, Lq,
    H * Dh)`` (what the model does next) is free. ``key_mask`` (B, Lk) bool (True = a real key): a prefix
    mask (each row's real keys first, as NaFlex pads) runs in the kernel as per-row key counts; any other mask
    runs the reference op. ``rotary`` (cos, sin, start): q and k rotated by position inside the kernel (each
    query block and each head's keys as the kernel loads them; see ``fastclip.ref.attention``). bf16 q, k, v
    (a bf16 model) run the same kernel on fp32 copies, the result rounded to bf16 once (``_bf16``).

    ``bf16_dots`` (bf16 and int8 models): both products on q, k, v and the softmax weights rounded to bf16,
    summed in fp32 (vdpbf16ps, twice the fp32 FMA rate; csrc/attention_bf16.h), where ``bf16_dots_supported()``;
    elsewhere the fp32 products. The softmax stays fp32.
    """
    if not upcast and native(q, k, v, dtype=torch.bfloat16):
        return _bf16(q, k, v, causal, key_mask, rotary)
    bf16_dots = bool(bf16_dots) and not upcast and bf16_dots_supported()
    lengths = None if key_mask is None or k.ndim != 4 else prefix_lengths(key_mask, k.shape[0], k.shape[2])
    angles = None if rotary is None else _angles(rotary, q, k)
    fallback = dict(causal=causal, upcast=upcast, key_mask=key_mask, rotary=rotary)
    if (key_mask is not None and lengths is None) or (rotary is not None and angles is None):
        return ref.attention(q, k, v, **fallback)
    if upcast or not native(q, k, v) or q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
        return ref.attention(q, k, v, **fallback)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D or (causal and Lq != Lk):
        return ref.attention(q, k, v, causal=causal)  # raises the reference's error for bad shapes
    q, k, v = unit_last(q), unit_last(k), unit_last(v)
    cos, sin, start = angles if angles is not None else (None, None, 0)
    out = buffers.empty((B, Lq, H, D), q.dtype).transpose(1, 2)
    _C.attention(q=q.data_ptr(), q_strides=q.stride()[:3], k=k.data_ptr(), k_strides=k.stride()[:3], v=v.data_ptr(),
                 v_strides=v.stride()[:3], out=out.data_ptr(), out_strides=out.stride()[:3], B=B, H=H, Lq=Lq, Lk=Lk,
                 D=D, causal=bool(causal), scale=1.0 / math.sqrt(D),
                 key_lengths=0 if lengths is None else lengths.data_ptr(), rope_cos=ptr(cos), rope_sin=ptr(sin),
                 rope_start=start, bf16_dots=bf16_dots)
    return out


def _bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, key_mask: torch.Tensor | None,
          rotary: tuple | None) -> torch.Tensor:
    """bf16 q, k, v (shapes as ``attention``) -> bf16: the kernel on fp32 copies, with its bf16 products where
    the CPU has them (exact on bf16 q, k, v; the softmax weights are rounded to bf16, as in the reference's
    bf16 product), else fp32 ones. The rotation and the softmax are fp32. At ViT-B/16 shapes (32 x 12 heads x
    197 tokens, rotary) the fp32-product kernel took 42 ms against the reference's 147 on a 2-core Zen 4. The
    copies cost two bytes more per element, for the duration of the call."""
    if rotary is not None:
        cos, sin, start = rotary
        rotary = (cos.float(), sin.float(), start)
    out = attention(q.float(), k.float(), v.float(), causal=causal, key_mask=key_mask, rotary=rotary, bf16_dots=True)
    return out.to(torch.bfloat16)  # keeps the (B, Lq, H, Dh) layout of the fp32 result


def _angles(rotary: tuple, q: torch.Tensor, k: torch.Tensor):
    """(cos, sin, start) as the kernel takes them -- fp32 contiguous (N, Dh/2), N >= max(Lq, Lk) - start, an
    even Dh -- or None (the reference op then runs, and raises its error for bad ones)."""
    cos, sin, start = rotary
    if q.ndim != 4 or k.ndim != 4 or not native(cos, sin) or cos.shape != sin.shape or cos.ndim != 2:
        return None
    D, L = q.shape[-1], max(q.shape[2], k.shape[2])
    if D % 2 or cos.shape[1] != D // 2 or start < 0 or cos.shape[0] < L - min(start, L):
        return None
    return cos.contiguous(), sin.contiguous(), int(start)


def prefix_lengths(key_mask: torch.Tensor, batch: int, keys: int) -> torch.Tensor | None:
    """(B,) int32 counts of real keys if ``key_mask`` (B, Lk) bool is a prefix mask on the CPU, else None."""
    if key_mask.dtype != torch.bool or key_mask.ndim != 2 or key_mask.shape != (batch, keys):
        return None  # the reference op raises its error for a bad mask
    lengths = key_mask.sum(dim=1, dtype=torch.int32)  # (B,)
    prefix = torch.arange(key_mask.shape[1]) < lengths[:, None]  # (B, Lk)
    return lengths.contiguous() if torch.equal(prefix, key_mask) else None
