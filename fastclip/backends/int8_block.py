"""The int8 table's fused ``encoder_block`` (``OpTable.encoder_block``): a pre-norm transformer block in one
call of the cpu backend's kernel (fastclip/backends/cpu/encoder_block.py), where every linear layer of the
block is on fastclip's int8 kernel. It runs what the op-by-op int8 path runs -- the smoothed LayerNorms,
the packs and run-time input scales of ``Int8Weights``, the bf16 attention products where the CPU has them
-- so the two agree bit for bit; anything else (fp32-kept layers, fbgemm packs, a gated MLP, autograd, a
key mask that is not a prefix) returns None and the model composes the block from the ops.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .dispatch import EncoderBlockWeights


def fused_block(weights, kernel) -> Callable:
    """``encoder_block`` for an int8 table over the cpu backend: ``weights`` the model's Int8Weights, ``kernel``
    fastclip/backends/cpu/linear_int8.py."""
    from .cpu import encoder_block as block_kernel
    from .cpu.attention import bf16_dots_supported

    plans: dict[int, tuple] = {}  # id(in_proj weight) -> (act, heads, versions of the tensors), plan or None

    def plan_of(blk: EncoderBlockWeights):
        """(ln_1, ln_2, layers, mlp, keep-alive) of the block's current weights, or None if it cannot be fused."""
        tensors = (*blk.ln_1[:2], *blk.in_proj, *blk.out_proj, *blk.ln_2[:2], *blk.fc, *blk.proj)
        versions = (blk.act, blk.heads, *(None if t is None else (t._version, t.data_ptr()) for t in tensors))
        cached = plans.get(id(blk.in_proj[0]))
        if cached is not None and cached[0] == versions:
            return cached[1]
        plan = _make_plan(blk, weights, kernel, block_kernel)
        plans[id(blk.in_proj[0])] = (versions, plan)
        return plan

    def encoder_block(x: torch.Tensor, pending: torch.Tensor | None, blk: EncoderBlockWeights, causal: bool,
                      key_mask: torch.Tensor | None):
        """(s, m) of the pre-norm block on ``x + pending`` (x, pending: (B, L, W)), or None (not fused here)."""
        ok, lengths = block_kernel.takes(x, pending, key_mask)
        plan = plan_of(blk) if ok else None
        if plan is None or x.shape[-1] != plan[0][0].shape[0]:
            return None
        ln_1, ln_2, layers, mlp = plan[:4]
        return block_kernel.run_block(x, pending, ln_1, ln_2, layers, blk.heads, mlp, blk.act, causal, lengths,
                                      bf16_dots_supported(), int8=True)

    return encoder_block


def _make_plan(blk: EncoderBlockWeights, weights, kernel, block_kernel):
    """The kernel's operands of ``blk`` as the int8 table's ops would use them, or None."""
    if not block_kernel.plain_act(blk.act) or blk.fc[1] is None:
        return None
    entries = (weights.lookup(*blk.in_proj), weights.lookup(*blk.out_proj), weights.lookup(blk.fc[0], None),
               weights.lookup(*blk.proj))
    if any(e is None or not isinstance(e.pack, kernel.Int8Pack) for e in entries):
        return None
    fc_pack = weights.with_bias(*blk.fc)
    if fc_pack is None:
        return None
    packs = (entries[0].pack, entries[1].pack, fc_pack, entries[3].pack)
    W, mlp = packs[1].N, packs[2].N
    if ((packs[0].N, packs[0].K, packs[1].K, packs[2].K, packs[3].N, packs[3].K) != (3 * W, W, W, W, W, mlp)
            or W % blk.heads):
        return None
    ln = block_kernel.norms(blk, W, weights.norm)
    if ln is None:
        return None
    scales = [e.input_scale for e in entries]
    layers = tuple(block_kernel.int8_layer(p, s) for p, s in zip(packs, scales, strict=True))
    return ln[0], ln[1], layers, mlp, (packs, scales)  # the last item keeps the pointed-to tensors alive
