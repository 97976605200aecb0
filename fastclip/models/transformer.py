"""The transformer layers every tower is built from; every compute op goes through an OpTable
(fastclip/backends/dispatch.py).

Parameter names follow OpenAI CLIP / OpenCLIP, so their state dicts load without renaming
(fastclip/loading/keymaps.py maps the Hugging Face layouts onto these names).

Attention has one core (``MultiheadAttention.attend_heads``) behind self-, cross- and pooled attention:
head-split q / k / v in, out-projected rows out. What changes the attention itself -- a mask, rotary
position embeddings on q and k -- goes there, once, for every kind.

Last-block trimming (exact; off with ``tower.trim_last_block = False``, for tests and benchmarks): when a
tower pools one row per sequence (the class token of a ViT, the end-of-text / last token of a text
tower), the final block needs LayerNorm and keys/values of every token but the query, output projection
and MLP of the pooled row only (``ResidualAttentionBlock.apply_pooled``).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import ref
from ..backends.dispatch import EncoderBlockWeights, OpTable


class LayerNorm(nn.LayerNorm):
    """Holds LayerNorm parameters; applied through ``ops.layer_norm``."""

    def apply_op(self, x: torch.Tensor, ops: OpTable) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


class MultiheadAttention(nn.Module):
    """Attention with packed q/k/v projection weights (OpenAI's ``in_proj_weight`` layout).

    in_proj_weight: (3W, W) = [Wq; Wk; Wv], in_proj_bias: (3W,), out_proj: W -> W.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.width, self.heads = width, heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def _split_q_kv(self):
        """(wq (W, W), bq), (wkv (2W, W), bkv): row views of the packed projection."""
        W = self.width
        wq, wkv = self.in_proj_weight.split([W, 2 * W])
        bq, bkv = self.in_proj_bias.split([W, 2 * W])
        return (wq, bq), (wkv, bkv)

    def int8_linears(self):
        """The (weight, bias) pairs passed to ``ops.linear`` (fastclip/backends/int8.py, Int8Linears)."""
        yield self.in_proj_weight, self.in_proj_bias
        yield from self._split_q_kv()
        yield self.out_proj.weight, self.out_proj.bias

    def _heads(self, y: torch.Tensor, parts: int) -> torch.Tensor:
        """y: (B, L, parts * W) projections -> (parts, B, H, L, Dh)."""
        B, L = y.shape[:2]
        return y.view(B, L, parts, self.heads, self.width // self.heads).permute(2, 0, 3, 1, 4)

    def attend_heads(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ops: OpTable, causal: bool = False,
                     query_positions: torch.Tensor | None = None, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The attention core: q (B, H, Q, Dh), k/v (B, H, L, Dh) -> out-projected rows (B, Q, W).

        ``query_positions`` (B,), with Q == 1 and ``causal``: the position of each row's query in the
        sequence, so it sees keys 0..position only (the causal mask of the pooled row). Rows are grouped by
        position, so the ops need no mask argument. ``key_mask`` (B, L) bool, True = a real key: padded keys
        (NaFlex's padded patches) are seen by no query; not combined with ``query_positions``.
        """
        B, H, Q, Dh = q.shape
        if key_mask is not None:
            if query_positions is not None:
                raise ValueError("attend_heads: key_mask and query_positions cannot be combined")
            out = ops.attention(q, k, v, causal=causal, key_mask=key_mask)  # (B, H, Q, Dh)
        elif query_positions is None:
            out = ops.attention(q, k, v, causal=causal)  # (B, H, Q, Dh)
        else:
            out = self._attend_up_to(q, k, v, ops, query_positions)
        out = out.transpose(1, 2).reshape(B, Q, H * Dh)  # (B, Q, W)
        return ops.linear(out, self.out_proj.weight, self.out_proj.bias)

    @staticmethod
    def _attend_up_to(q, k, v, ops: OpTable, positions: torch.Tensor) -> torch.Tensor:
        """Row b's single query sees keys 0..positions[b].  q: (B, H, 1, Dh), k/v: (B, H, L, Dh) -> (B, H, 1, Dh)."""
        L = k.shape[2]
        lengths = positions.tolist()
        if min(lengths) == L - 1:  # every query sees every key
            return ops.attention(q, k, v, causal=False)
        out = q.new_empty(q.shape)
        for p in sorted(set(lengths)):  # rows whose query sits at position p see keys 0..p
            sel = (positions == p).nonzero().squeeze(1)  # (n,)
            out[sel] = ops.attention(q[sel], k[sel, :, : p + 1], v[sel, :, : p + 1], causal=False)
        return out

    def self_attention(self, x: torch.Tensor, ops: OpTable, causal: bool,
                       key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, L, W), key_mask: (B, L) bool or None -> (B, L, W)."""
        qkv = self._heads(ops.linear(x, self.in_proj_weight, self.in_proj_bias), 3)  # (3, B, H, L, Dh)
        return self.attend_heads(qkv[0], qkv[1], qkv[2], ops, causal=causal, key_mask=key_mask)

    def cross_attention(self, query: torch.Tensor, x: torch.Tensor, ops: OpTable,
                        key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """query: (B, Q, W) attends to x: (B, L, W) (the rows where key_mask (B, L) is True) -> (B, Q, W)."""
        (wq, bq), (wkv, bkv) = self._split_q_kv()
        q = self._heads(ops.linear(query, wq, bq), 1)[0]  # (B, H, Q, Dh)
        kv = self._heads(ops.linear(x, wkv, bkv), 2)  # (2, B, H, L, Dh)
        return self.attend_heads(q, kv[0], kv[1], ops, key_mask=key_mask)

    def pooled_attention(self, x: torch.Tensor, index: torch.Tensor, ops: OpTable, causal: bool) -> torch.Tensor:
        """Self-attention output at one row per sequence.  x: (B, L, W), index: (B,) -> (B, W).

        Equals ``self_attention(x, ops, causal)[arange(B), index]``: the query of row ``index[b]`` only,
        over the keys/values of every token (``causal``: of tokens 0..index[b], the keys that row sees
        under the causal mask).
        """
        (wq, bq), (wkv, bkv) = self._split_q_kv()
        rows = torch.arange(x.shape[0], device=x.device)
        q = self._heads(ops.linear(x[rows, index][:, None], wq, bq), 1)[0]  # (B, H, 1, Dh)
        kv = self._heads(ops.linear(x, wkv, bkv), 2)  # (2, B, H, L, Dh)
        out = self.attend_heads(q, kv[0], kv[1], ops, query_positions=index if causal else None)  # (B, 1, W)
        return out[:, 0]


class Mlp(nn.Module):
    """c_fc (W -> M, or 2M for a gated activation: [gate; value] rows) -> activation -> c_proj (M -> W)."""

    def __init__(self, width: int, mlp_width: int, act: str):
        super().__init__()
        self.act = act
        gated = ref.ACTIVATION_TABLE[act].gated
        self.c_fc = nn.Linear(width, 2 * mlp_width if gated else mlp_width)
        self.c_proj = nn.Linear(mlp_width, width)

    def int8_linears(self):
        """The (weight, bias) pairs passed to ``ops.linear`` (c_fc's bias is added with the activation)."""
        yield self.c_fc.weight, None
        yield self.c_proj.weight, self.c_proj.bias

    def apply_op(self, x: torch.Tensor, ops: OpTable) -> torch.Tensor:
        h = ops.linear_act(x, self.c_fc.weight, self.c_fc.bias, self.act)  # (..., M)
        return ops.linear(h, self.c_proj.weight, self.c_proj.bias)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: x + attn(ln_1(x)); x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_width: int, act: str, eps: float):
        super().__init__()
        self.ln_1 = LayerNorm(width, eps=eps)
        self.attn = MultiheadAttention(width, heads)
        self.ln_2 = LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, mlp_width, act)

    def apply_op(self, x: torch.Tensor, ops: OpTable, causal: bool) -> torch.Tensor:
        """x: (B, L, W) -> (B, L, W)."""
        x, m = self.apply_split(x, None, ops, causal)
        return x + m

    def _ln_1(self, x: torch.Tensor, pending: torch.Tensor | None, ops: OpTable):
        """(ln_1(x + pending), x + pending), the sum made inside the LayerNorm op (pending may be None)."""
        if pending is None:
            return self.ln_1.apply_op(x, ops), x
        return ops.layer_norm(pending, self.ln_1.weight, self.ln_1.bias, self.ln_1.eps, residual=x)

    def apply_split(self, x: torch.Tensor, pending: torch.Tensor | None, ops: OpTable, causal: bool,
                    key_mask: torch.Tensor | None = None):
        """The block on ``x + pending`` (``pending``: the previous block's MLP output, or None), returned as
        the pair (s, m) whose sum is the output: the residual add is left to the next block's LayerNorm,
        which makes it in the same pass.  x, pending: (B, L, W) -> s, m: (B, L, W). ``key_mask``: (B, L) bool,
        True = a real token (padded tokens are attended to by none). A table with a fused ``encoder_block``
        runs the whole block in one call where it takes these arguments."""
        if ops.encoder_block is not None:
            fused = ops.encoder_block(x, pending, self.weights(), causal, key_mask)
            if fused is not None:
                return fused
        y, x = self._ln_1(x, pending, ops)
        h = self.attn.self_attention(y, ops, causal, key_mask)
        y, x = ops.layer_norm(h, self.ln_2.weight, self.ln_2.bias, self.ln_2.eps, residual=x)  # x += h; y = ln_2(x)
        return x, self.mlp.apply_op(y, ops)

    def weights(self) -> EncoderBlockWeights:
        """The block's parameters for a fused ``encoder_block``."""
        attn, mlp = self.attn, self.mlp
        return EncoderBlockWeights(
            (self.ln_1.weight, self.ln_1.bias, self.ln_1.eps), (attn.in_proj_weight, attn.in_proj_bias),
            (attn.out_proj.weight, attn.out_proj.bias), (self.ln_2.weight, self.ln_2.bias, self.ln_2.eps),
            (mlp.c_fc.weight, mlp.c_fc.bias), (mlp.c_proj.weight, mlp.c_proj.bias), mlp.act, attn.heads)

    def apply_pooled(self, x: torch.Tensor, ops: OpTable, causal: bool, index: torch.Tensor,
                     pending: torch.Tensor | None = None) -> torch.Tensor:
        """The block's output at row ``index[b]`` of each sequence only, on ``x + pending`` (see
        apply_split).  x, pending: (B, L, W), index: (B,) -> (B, W).

        LayerNorm 1 and keys/values run over all tokens; query, output projection, residual, LayerNorm 2
        and MLP over the B pooled rows.
        """
        y, x = self._ln_1(x, pending, ops)
        h = self.attn.pooled_attention(y, index, ops, causal)  # (B, W)
        pooled = x[torch.arange(x.shape[0], device=x.device), index]  # (B, W)
        y, pooled = ops.layer_norm(h, self.ln_2.weight, self.ln_2.bias, self.ln_2.eps, residual=pooled)
        return pooled + self.mlp.apply_op(y, ops)


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, act: str, eps: float):
        super().__init__()
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_width, act, eps) for _ in range(layers)]
        )

    def apply_op(self, x: torch.Tensor, ops: OpTable, causal: bool, index: torch.Tensor | None = None,
                 key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, L, W) -> (B, L, W); with ``index`` (B,) -> (B, W), the final states of rows ``index[b]``
        only (the last block is trimmed to them: see ResidualAttentionBlock.apply_pooled). ``key_mask``
        (B, L) bool, True = a real token: padded tokens are keys of no query (not combined with ``index``)."""
        if key_mask is not None and index is not None:
            raise ValueError("Transformer.apply_op: key_mask and index cannot be combined")
        blocks = list(self.resblocks)
        last = blocks.pop() if index is not None and blocks else None
        pending = None  # each block's MLP output is added to the stream inside the next LayerNorm
        for block in blocks:
            x, pending = block.apply_split(x, pending, ops, causal, key_mask)
        if last is not None:
            return last.apply_pooled(x, ops, causal, index, pending)
        if pending is not None:
            x = x + pending
        return x if index is None else x[torch.arange(x.shape[0], device=x.device), index]


class AttentionPool(nn.Module):
    """SigLIP's multi-head attention-pooling head: a learned probe attends to all tokens, then an MLP."""

    int8_exempt = ("probe",)  # a learned query, not a linear layer

    def __init__(self, width: int, heads: int, mlp_width: int, act: str, eps: float):
        super().__init__()
        self.probe = nn.Parameter(torch.empty(1, 1, width))
        self.attn = MultiheadAttention(width, heads)
        self.ln = LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, mlp_width, act)

    def apply_op(self, x: torch.Tensor, ops: OpTable, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, L, W), key_mask: (B, L) bool (True = a real token; padding is not pooled) or None -> (B, W)."""
        probe = self.probe.expand(x.shape[0], -1, -1)  # (B, 1, W)
        h = self.attn.cross_attention(probe, x, ops, key_mask)  # (B, 1, W)
        h = h + self.mlp.apply_op(self.ln.apply_op(h, ops), ops)
        return h[:, 0]
