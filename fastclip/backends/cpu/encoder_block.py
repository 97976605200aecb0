"""``encoder_block`` of the cpu backend (csrc/encoder_block.cpp): one pre-norm transformer block in one call --
LayerNorm, the q/k/v projection, attention, the output projection with the residual add, LayerNorm, the MLP
-- the same kernels with the same arguments as the op-by-op path, so the same bits, without a return to
Python between them. At batch 1 that return costs more than the arithmetic of the small ops: each op's
Python runs with caches the GEMMs just flushed.

Two callers: fp32 models on this table (``encoder_block`` below, where every linear layer takes the
packed-panel kernel: M <= ``linear.KERNEL_MAX_ROWS``), and the int8 table (fastclip/backends/int8_block.py).
"""
from __future__ import annotations

import torch

from ... import _C, ref
from . import buffers
from . import linear as fp32_linear
from .attention import prefix_lengths
from .common import ACT_CODES, native, ptr


def int8_layer(pack, x_scale: torch.Tensor | None) -> tuple[int, int, int, int, int]:
    """The kernel's pointers of one int8 layer: its pack's (packed, w_scale, colsum, bias) and x_scale (K,) or 0."""
    return (*pack.ptrs, ptr(x_scale))


def run_block(x: torch.Tensor, pending: torch.Tensor | None, ln_1: tuple, ln_2: tuple, layers: tuple, heads: int,
              mlp: int, act: str, causal: bool, key_lengths: torch.Tensor | None, bf16_dots: bool, int8: bool):
    """(s, m) of the block on ``x + pending``: s = x + pending + attention output, m = the MLP output.

    x, pending: (B, L, W) contiguous fp32 CPU (pending may be None); ``ln_1`` / ``ln_2``: (gain (W,), bias (W,),
    eps) contiguous fp32; ``layers``: the pointers of q/k/v (3W, W), output (W, W), MLP in (mlp, W, with its
    bias, followed by ``act``) and MLP out (W, mlp) -- ``int8_layer()``s, or fp32 (packed, panel, bias, 0, 0);
    ``key_lengths``: (B,) int32 real keys per row, or None -> s, m: (B, L, W)."""
    B, L, W = x.shape
    s = buffers.empty((B, L, W))
    m = buffers.empty((B, L, W))
    scratch = buffers.empty((B * L, 2 * W + max(4 * W, mlp)))
    (w1, b1, eps1), (w2, b2, eps2) = ln_1, ln_2
    _C.encoder_block(int8=int8, x=x.data_ptr(), pending=ptr(pending), s_out=s.data_ptr(), m_out=m.data_ptr(),
                     scratch=scratch.data_ptr(), B=B, L=L, W=W, H=heads, mlp=mlp, ln1_w=w1.data_ptr(),
                     ln1_b=b1.data_ptr(), ln1_eps=float(eps1), ln2_w=w2.data_ptr(), ln2_b=b2.data_ptr(),
                     ln2_eps=float(eps2), qkv=layers[0], out=layers[1], fc=layers[2], proj=layers[3],
                     act=ACT_CODES[act], causal=bool(causal), key_lengths=ptr(key_lengths), bf16_dots=bf16_dots)
    return s, m


def takes(x: torch.Tensor, pending: torch.Tensor | None, key_mask: torch.Tensor | None):
    """(True, key lengths (B,) int32 or None) if the fused block takes these activations -- contiguous fp32 CPU
    (B, L, W) without autograd, a prefix key mask -- else (False, None)."""
    if (x.dtype != torch.float32 or not x.is_cpu or x.ndim != 3 or x.numel() == 0 or not x.is_contiguous()
            or (torch.is_grad_enabled() and x.requires_grad)):
        return False, None
    if pending is not None and (pending.shape != x.shape or pending.dtype != x.dtype or not pending.is_cpu
                                or not pending.is_contiguous() or pending.requires_grad):
        return False, None
    if key_mask is None:
        return True, None
    lengths = prefix_lengths(key_mask, x.shape[0], x.shape[1])
    return lengths is not None, lengths


def norms(blk, W: int, smoothed=None):
    """((gain, bias, eps) of ln_1, of ln_2) as contiguous fp32 (W,) tensors, or None; ``smoothed(gain, bias)``
    may give replacement (gain, bias) pairs (the int8 table's smoothed LayerNorms) or None."""
    out = []
    for gain, bias, eps in (blk.ln_1, blk.ln_2):
        g, b = (smoothed(gain, bias) if smoothed is not None else None) or (gain, bias)
        if g is None or b is None or not native(g, b) or g.shape != (W,) or b.shape != (W,):
            return None
        out.append((g.detach().contiguous(), b.detach().contiguous(), float(eps)))
    return tuple(out)


def plain_act(act: str) -> bool:
    """``act`` is one the kernels apply in their epilogue (not gated)."""
    return act in ACT_CODES and not ref.ACTIVATION_TABLE[act].gated


def encoder_block(x: torch.Tensor, pending: torch.Tensor | None, blk, causal: bool, key_mask: torch.Tensor | None):
    """The fp32 table's fused block: (s, m) of ``blk`` (EncoderBlockWeights) on ``x + pending`` (x, pending:
    (B, L, W)), or None where a layer would not take the packed-panel kernel (too many rows for the path that
    runs now, packing off, fp32 weights not plain) -- the model then composes the block from the ops."""
    ok, lengths = takes(x, pending, key_mask)
    if not ok or not fp32_linear._KERNEL or not plain_act(blk.act):
        return None
    B, L, W = x.shape
    panel = _C.linear_panel_width()
    if B * L > fp32_linear.KERNEL_MAX_ROWS.get(panel, 0):
        return None
    mlp = blk.fc[0].shape[0]
    shapes = (blk.in_proj[0].shape, blk.out_proj[0].shape, blk.fc[0].shape, blk.proj[0].shape)
    if shapes != ((3 * W, W), (W, W), (mlp, W), (W, mlp)) or W % blk.heads:
        return None
    layers = []
    for weight, bias in (blk.in_proj, blk.out_proj, blk.fc, blk.proj):
        if (weight.ndim != 2 or not native(weight, bias)
                or (bias is not None and (bias.shape != weight.shape[:1] or not bias.is_contiguous()))
                or (torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)))):
            return None
        packed = fp32_linear.kernel_packed(weight, panel)
        if packed is None:
            return None
        layers.append((packed.data_ptr(), panel, ptr(bias), 0, 0))
    ln = norms(blk, W)
    if ln is None:
        return None
    return run_block(x, pending, ln[0], ln[1], tuple(layers), blk.heads, mlp, blk.act, causal, lengths, False,
                     int8=False)
