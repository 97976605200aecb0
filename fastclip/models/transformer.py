"""Transformer towers, written once; every compute op goes through an OpTable (fastclip/backends/dispatch.py).

Parameter names follow OpenAI CLIP / OpenCLIP, so their state dicts load without renaming
(fastclip/loading/keymaps.py maps the Hugging Face layouts onto these names).

Two exact shortcuts (both can be switched off per tower with ``tower.trim_last_block = False`` and by
passing normalised pixels, for tests and benchmarks):

* Last-block trimming. When a tower pools one row per sequence (the class token of a ViT, the
  end-of-text / last token of a text tower), the final block needs LayerNorm and keys/values of every
  token but the query, output projection and MLP of the pooled row only.
* Folded pixel normalisation. ``VisionTransformer.apply_op(..., pixel_norm=(scale, mean, std))`` takes
  raw uint8 levels x and applies the patch embedding with weights folded so that
  conv(w', x) + b' = conv(w, (scale * x - mean) / std) (see ``fold_pixel_norm``).
"""
from __future__ import annotations


import torch
from torch import nn

from ..backends.dispatch import OpTable
from .config import TextConfig, VisionConfig


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

    def self_attention(self, x: torch.Tensor, ops: OpTable, causal: bool) -> torch.Tensor:
        """x: (B, L, W) -> (B, L, W)."""
        B, L, W = x.shape
        qkv = ops.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, L, 3W)
        qkv = qkv.view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, H, L, Dh)
        out = ops.attention(qkv[0], qkv[1], qkv[2], causal=causal)  # (B, H, L, Dh)
        out = out.transpose(1, 2).reshape(B, L, W)
        return ops.linear(out, self.out_proj.weight, self.out_proj.bias)

    def cross_attention(self, query: torch.Tensor, x: torch.Tensor, ops: OpTable) -> torch.Tensor:
        """query: (B, Q, W) attends to x: (B, L, W) -> (B, Q, W)."""
        B, L, W = x.shape
        Q, H, Dh = query.shape[1], self.heads, W // self.heads
        wq, wkv = self.in_proj_weight.split([W, 2 * W])
        bq, bkv = self.in_proj_bias.split([W, 2 * W])
        q = ops.linear(query, wq, bq).view(B, Q, H, Dh).transpose(1, 2)  # (B, H, Q, Dh)
        kv = ops.linear(x, wkv, bkv).view(B, L, 2, H, Dh).permute(2, 0, 3, 1, 4)  # (2, B, H, L, Dh)
        out = ops.attention(q, kv[0], kv[1], causal=False).transpose(1, 2).reshape(B, Q, W)
        return ops.linear(out, self.out_proj.weight, self.out_proj.bias)

    def pooled_attention(self, x: torch.Tensor, index: torch.Tensor, ops: OpTable, causal: bool) -> torch.Tensor:
        """Self-attention output at one row per sequence.  x: (B, L, W), index: (B,) -> (B, W).

        Equals ``self_attention(x, ops, causal)[arange(B), index]``: the query of row ``index[b]`` only,
        over the keys/values of every token (``causal``: of tokens 0..index[b], the keys that row sees
        under the causal mask). Rows are grouped by index, so the ops need no mask argument.
        """
        B, L, W = x.shape
        H, Dh = self.heads, W // self.heads
        wq, wkv = self.in_proj_weight.split([W, 2 * W])
        bq, bkv = self.in_proj_bias.split([W, 2 * W])
        rows = torch.arange(B, device=x.device)
        q = ops.linear(x[rows, index], wq, bq).view(B, 1, H, Dh).transpose(1, 2)  # (B, H, 1, Dh)
        kv = ops.linear(x, wkv, bkv).view(B, L, 2, H, Dh).permute(2, 0, 3, 1, 4)  # (2, B, H, L, Dh)
        k, v = kv[0], kv[1]
        lengths = index.tolist() if causal else []
        if not lengths or min(lengths) == L - 1:  # every query sees every key
            out = ops.attention(q, k, v, causal=False)  # (B, H, 1, Dh)
        else:
            out = q.new_empty(B, H, 1, Dh)
            for p in sorted(set(lengths)):  # rows whose query sits at position p see keys 0..p
                sel = (index == p).nonzero().squeeze(1)  # (n,)
                out[sel] = ops.attention(q[sel], k[sel, :, : p + 1], v[sel, :, : p + 1], causal=False)
        out = out.transpose(1, 2).reshape(B, W)
        return ops.linear(out, self.out_proj.weight, self.out_proj.bias)


class Mlp(nn.Module):
    """c_fc (W -> M) -> activation -> c_proj (M -> W)."""

    def __init__(self, width: int, mlp_width: int, act: str):
        super().__init__()
        self.act = act
        self.c_fc = nn.Linear(width, mlp_width)
        self.c_proj = nn.Linear(mlp_width, width)

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

    def apply_split(self, x: torch.Tensor, pending: torch.Tensor | None, ops: OpTable, causal: bool):
        """The block on ``x + pending`` (``pending``: the previous block's MLP output, or None), returned as
        the pair (s, m) whose sum is the output: the residual add is left to the next block's LayerNorm,
        which makes it in the same pass.  x, pending: (B, L, W) -> s, m: (B, L, W)."""
        y, x = self._ln_1(x, pending, ops)
        h = self.attn.self_attention(y, ops, causal)
        y, x = ops.layer_norm(h, self.ln_2.weight, self.ln_2.bias, self.ln_2.eps, residual=x)  # x += h; y = ln_2(x)
        return x, self.mlp.apply_op(y, ops)

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

    def apply_op(self, x: torch.Tensor, ops: OpTable, causal: bool, index: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, L, W) -> (B, L, W); with ``index`` (B,) -> (B, W), the final states of rows ``index[b]``
        only (the last block is trimmed to them: see ResidualAttentionBlock.apply_pooled)."""
        blocks = list(self.resblocks)
        last = blocks.pop() if index is not None and blocks else None
        pending = None  # each block's MLP output is added to the stream inside the next LayerNorm
        for block in blocks:
            x, pending = block.apply_split(x, pending, ops, causal)
        if last is not None:
            return last.apply_pooled(x, ops, causal, index, pending)
        if pending is not None:
            x = x + pending
        return x if index is None else x[torch.arange(x.shape[0], device=x.device), index]


class AttentionPool(nn.Module):
    """SigLIP's multi-head attention-pooling head: a learned probe attends to all tokens, then an MLP."""

    def __init__(self, width: int, heads: int, mlp_width: int, act: str, eps: float):
        super().__init__()
        self.probe = nn.Parameter(torch.empty(1, 1, width))
        self.attn = MultiheadAttention(width, heads)
        self.ln = LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, mlp_width, act)

    def apply_op(self, x: torch.Tensor, ops: OpTable) -> torch.Tensor:
        """x: (B, L, W) -> (B, W)."""
        probe = self.probe.expand(x.shape[0], -1, -1)  # (B, 1, W)
        h = self.attn.cross_attention(probe, x, ops)  # (B, 1, W)
        h = h + self.mlp.apply_op(self.ln.apply_op(h, ops), ops)
        return h[:, 0]


PixelNorm = tuple  # (scale, mean (3,), std (3,)): normalised = (scale * level - mean) / std per channel


def _tensor_state(*tensors: torch.Tensor | None) -> tuple | None:
    """What identifies the current contents of ``tensors`` (storage, version counter, dtype, device), or
    None if one is an inference tensor (no version counter: its changes cannot be seen)."""
    state = []
    for t in tensors:
        if t is None:
            state.append(None)
        elif t.is_inference():
            return None
        else:
            state.append((t.data_ptr(), t._version, t.dtype, t.device))
    return tuple(state)


def fold_pixel_norm(weight: torch.Tensor, bias: torch.Tensor | None, pixel_norm: PixelNorm):
    """Fold a per-channel pixel normalisation into a patch-embedding convolution.

    weight: (W, 3, P, P), bias: (W,) or None; pixel_norm = (scale, mean, std) with
    normalised = (scale * level - mean) / std per input channel. Returns (w', b') in float32 with
    conv(w', level) + b' == conv(w, normalised) + bias:
    w' = w * scale / std[c] and b' = bias - sum over (c, i, j) of w * mean[c] / std[c].
    """
    scale, mean, std = pixel_norm
    w = weight.float()
    mean = torch.as_tensor(mean, dtype=torch.float32, device=w.device)  # (3,)
    std = torch.as_tensor(std, dtype=torch.float32, device=w.device)  # (3,)
    folded_bias = -(w.sum(dim=(2, 3)) @ (mean / std))  # (W, 3) @ (3,) -> (W,)
    if bias is not None:
        folded_bias = folded_bias + bias.float()
    return w * (float(scale) / std).view(1, 3, 1, 1), folded_bias


class VisionTransformer(nn.Module):
    """ViT image tower.  Pixels (B, 3, S, S) -> embeddings (B, embed_dim)."""

    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.trim_last_block = True  # exact; False runs the last block on every token (tests, benchmarks)
        w = cfg.width
        self.conv1 = nn.Conv2d(3, w, cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias)
        if cfg.class_token:
            self.class_embedding = nn.Parameter(torch.empty(w))
        self.positional_embedding = nn.Parameter(torch.empty(cfg.num_tokens, w))
        if cfg.ln_pre:
            self.ln_pre = LayerNorm(w, eps=cfg.norm_eps)
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_width, cfg.act, cfg.norm_eps)
        self.ln_post = LayerNorm(w, eps=cfg.norm_eps)
        if cfg.pool_type == "map":
            self.attn_pool = AttentionPool(w, cfg.heads, cfg.mlp_width, cfg.act, cfg.norm_eps)
        self.proj = nn.Parameter(torch.empty(w, embed_dim)) if cfg.proj else None

    def patch_embed(self, pixels: torch.Tensor, ops: OpTable, pixel_norm: PixelNorm | None = None) -> torch.Tensor:
        """pixels: (B, 3, S, S) -> patch tokens (B, grid*grid, W).

        conv1 (kernel = stride = P, no padding) is one GEMM over the flattened patches, run through
        ``ops.linear``: the same sums as the convolution, without a convolution library's per-call cost.
        Normalised float pixels use conv1's weights as they are; with ``pixel_norm`` the pixels are raw
        levels (uint8) and the normalisation is folded into the weights (fold_pixel_norm).
        """
        B, P, g, W = pixels.shape[0], self.cfg.patch_size, self.cfg.grid, self.cfg.width
        dtype = self.conv1.weight.dtype
        if pixel_norm is None:
            weight, bias = self.conv1.weight, self.conv1.bias
        elif pixels.dtype != torch.uint8:
            raise ValueError(f"pixel_norm expects raw uint8 pixels, got {pixels.dtype}")
        else:
            weight, bias = self._folded_conv(pixel_norm)
        cells = pixels[:, :, : g * P, : g * P].reshape(B, 3, g, P, g, P)  # (B, 3, gy, py, gx, px)
        patches = cells.permute(0, 2, 4, 1, 3, 5).reshape(B * g * g, 3 * P * P).to(dtype)  # (B·g², 3·P·P)
        out = ops.linear(patches, weight.reshape(W, 3 * P * P), bias)  # (B·g², W)
        return out.view(B, g * g, W)

    def _folded_conv(self, pixel_norm: PixelNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """conv1's (weight, bias) with ``pixel_norm`` folded in, in conv1's dtype.

        Kept until conv1 or ``pixel_norm`` changes (keyed by their values, storage and version counters),
        so the backend finds the folded weight's packed copy on the next call instead of repacking it.
        They are made outside inference mode: inference tensors cannot be packed (no version counter).
        """
        key = _tensor_state(self.conv1.weight, self.conv1.bias)
        key = None if key is None else (key, pixel_norm)
        cached = self.__dict__.get("_folded")
        if key is not None and cached is not None and cached[0] == key:
            return cached[1]
        with torch.inference_mode(False), torch.no_grad():
            weight, bias = fold_pixel_norm(self.conv1.weight, self.conv1.bias, pixel_norm)
            folded = weight.to(self.conv1.weight.dtype), bias.to(self.conv1.weight.dtype)
        self.__dict__["_folded"] = (key, folded) if key is not None else None
        return folded

    def tokens(self, pixels: torch.Tensor, ops: OpTable, pixel_norm: PixelNorm | None = None) -> torch.Tensor:
        """pixels: (B, 3, S, S) -> final tokens before pooling (B, T, W), or (B, W) for class-token
        pooling with ``trim_last_block`` (the final state of token 0 only)."""
        x = self.patch_embed(pixels, ops, pixel_norm)  # (B, grid*grid, W)
        if self.cfg.class_token:
            cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)  # (B, 1 + grid*grid, W)
        x = x + self.positional_embedding.to(x.dtype)
        if self.cfg.ln_pre:
            x = self.ln_pre.apply_op(x, ops)
        index = None
        if self.cfg.pool_type == "tok" and self.trim_last_block:
            index = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # (B,) row 0 is pooled
        return self.transformer.apply_op(x, ops, causal=False, index=index)

    def apply_op(self, pixels: torch.Tensor, ops: OpTable, normalize: bool = False,
                 pixel_norm: PixelNorm | None = None) -> torch.Tensor:
        """pixels: (B, 3, S, S) normalised floats, or raw uint8 levels with ``pixel_norm`` -> (B, embed_dim)."""
        cfg = self.cfg
        expected = (3, cfg.image_size, cfg.image_size)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            raise ValueError(f"expected pixels of shape (B, {', '.join(map(str, expected))}), got {tuple(pixels.shape)}")
        x = self.tokens(pixels, ops, pixel_norm)  # (B, T, W), or (B, W) when trimmed
        ln = self.ln_post
        if cfg.pool_type == "map":
            pooled = self.attn_pool.apply_op(ln.apply_op(x, ops), ops)  # (B, W)
            return _project(pooled, self.proj, None, ops, normalize)
        if cfg.pool_type == "tok":
            # LayerNorm is per token, so normalising the class token alone is exact.
            pooled = x if x.ndim == 2 else x[:, 0]  # (B, W)
            return ops.normalize_project(pooled, ln.weight, ln.bias, ln.eps, self.proj, None, normalize)
        patches = x[:, int(cfg.class_token):]  # (B, grid*grid, W)
        if cfg.final_ln_after_pool:
            return ops.normalize_project(patches.mean(dim=1), ln.weight, ln.bias, ln.eps, self.proj, None, normalize)
        return _project(ln.apply_op(patches, ops).mean(dim=1), self.proj, None, ops, normalize)


def _project(x, proj, bias, ops: OpTable, normalize: bool) -> torch.Tensor:
    if proj is not None:
        x = x @ proj
    if bias is not None:
        x = x + bias
    return ops.l2_normalize(x) if normalize else x


class TextTransformer(nn.Module):
    """Text tower.  Token ids (B, L) -> embeddings (B, embed_dim)."""

    def __init__(self, cfg: TextConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.trim_last_block = True  # exact; False runs the last block on every token (tests, benchmarks)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_width, cfg.act, cfg.norm_eps)
        self.ln_final = LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, embed_dim))
        self.text_projection_bias = nn.Parameter(torch.empty(embed_dim)) if cfg.proj_bias else None

    def pool_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """Position of the pooled token in each row.  tokens: (B, L) -> (B,) int64."""
        B, L = tokens.shape
        kind = self.cfg.pool_type
        if kind == "argmax":
            return tokens.argmax(dim=-1)
        if kind == "eos":
            return (tokens == self.cfg.eos_token_id).int().argmax(dim=-1)
        return torch.full((B,), L - 1 if kind == "last" else 0, dtype=torch.long, device=tokens.device)

    def apply_op(self, tokens: torch.Tensor, ops: OpTable, normalize: bool = False) -> torch.Tensor:
        cfg = self.cfg
        if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"expected integer token ids of shape (B, L), got {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.shape[1] > cfg.context_length:
            raise ValueError(f"token sequence length {tokens.shape[1]} exceeds the context length {cfg.context_length}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}), got [{int(tokens.min())}, {int(tokens.max())}]")
        tokens = tokens.long()
        index = self.pool_index(tokens)  # (B,)
        if cfg.causal and cfg.pool_type in ("argmax", "eos", "first") and tokens.shape[0]:
            # Exact: with a causal mask no position sees a later one, so tokens after the last pooled
            # position cannot change the pooled outputs.
            tokens = tokens[:, : int(index.max()) + 1]
        L = tokens.shape[1]
        dtype = self.positional_embedding.dtype
        x = self.token_embedding(tokens).to(dtype) + self.positional_embedding[:L]  # (B, L, W)
        ln = self.ln_final  # applied to the pooled rows only (it is per token, so this is exact)
        if self.trim_last_block:
            x = self.transformer.apply_op(x, ops, causal=cfg.causal, index=index)  # (B, W) pooled rows
            return ops.normalize_project(x, ln.weight, ln.bias, ln.eps, self.text_projection,
                                         self.text_projection_bias, normalize)
        x = self.transformer.apply_op(x, ops, causal=cfg.causal)  # (B, L, W)
        return ops.normalize_project(
            x, ln.weight, ln.bias, ln.eps, self.text_projection, self.text_projection_bias, normalize, index=index
        )
