"""EVA image towers (EVA-01, EVA-02, Perception Encoder): the trunks OpenCLIP runs through timm's ``Eva``
class, as vision tower type ``timm``.

OpenCLIP's EVA configs name a timm trunk (``vision_cfg.timm_model_name``) with ``timm_pool: "token"`` and
``timm_proj: null`` (the trunk's head Linear projects the pooled class token to embed_dim). fastclip does
not import timm: the hyperparameters of each supported trunk are in ``TIMM_TRUNKS`` below, and a config may
override some of them with ``vision_cfg.timm_model_kwargs`` (timm's keyword names, as passed to
``timm.create_model``).

A block (timm's ``EvaBlock``; ``EvaBlockPostNorm`` with ``post_norm``):

* attention: one packed q/k/v projection ``attn.qkv`` (3W, W) whose bias holds q's and v's bias and zeros for
  k; 2-D rotary position embeddings on the patch tokens' q and k (``ops.attention(rotary=...)``: the cpu
  backend rotates them inside its attention kernel), not on the class token;
  an optional sub-LayerNorm ``attn.norm`` on the attention output before ``attn.proj``;
* MLP: ``mlp.fc1`` (W -> M, or 2M rows [gate; value] for SwiGLU: silu(gate) * value), an optional
  sub-LayerNorm ``mlp.norm`` on the hidden layer, ``mlp.fc2`` (M -> W);
* pre-norm ``x + attn(norm1(x)); x + mlp(norm2(x))``, or post-norm ``x + norm1(attn(x)); x + norm2(mlp(x))``.

Perception Encoder adds a LayerNorm before the blocks (``norm_pre``), full q/k/v biases and an
attention-pooling head (``attn_pool``, fastclip's AttentionPool) over the final tokens.

MobileCLIP2's trunks are timm's ``VisionTransformer`` (full q/k/v biases, GELU MLP): MobileCLIP2-L-14 with the
LayerNorm before the blocks; MobileCLIP2-B with a convolutional stem for the patch embedding (``stem``,
fastclip/models/mobileclip.py) and position embeddings on the patch tokens only (``no_embed_class``).

Parameter names are timm's (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.{i}.*``, ``norm``)
except the packed ``attn.qkv`` / ``mlp.fc1`` and the head, held as ``proj`` (W, E) and ``proj_bias`` (E,);
fastclip/loading/keymaps_eva.py maps OpenCLIP's ``visual.trunk.*`` onto them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..backends.dispatch import OpTable
from ..backends.weight_packs import DerivedWeights
from .mobileclip import ConvStem
from .registry import register_tower
from .transformer import AttentionPool, LayerNorm
from .vit import PixelNorm, fold_pixel_norm

# timm's definitions (timm/models/eva.py) of the trunks fastclip runs, in timm's keyword names.
_EVA02 = dict(qkv_fused=False, mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True,
              use_rot_pos_emb=True, ref_feat_shape=16)
_PE = dict(use_rot_pos_emb=True, ref_feat_shape=24, rope_grid_offset=1.0, rope_grid_indexing="xy",
           use_pre_transformer_norm=True, global_pool="map", attn_pool_num_heads=8, attn_pool_mlp_ratio=4.0,
           norm_eps=1e-5)
TIMM_TRUNKS: dict[str, dict] = {
    "eva02_base_patch16_clip_224": dict(_EVA02, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "eva02_large_patch14_clip_224": dict(_EVA02, img_size=224, patch_size=14, embed_dim=1024, depth=24, num_heads=16),
    "eva02_large_patch14_clip_336": dict(_EVA02, img_size=336, patch_size=14, embed_dim=1024, depth=24, num_heads=16),
    "eva02_enormous_patch14_clip_224": dict(img_size=224, patch_size=14, embed_dim=1792, depth=64, num_heads=16,
                                            mlp_ratio=15360 / 1792, use_post_norm=True),
    "eva_giant_patch14_224": dict(img_size=224, patch_size=14, embed_dim=1408, depth=40, num_heads=16,
                                  mlp_ratio=6144 / 1408),
    # Perception Encoder: absolute + rotary positions, a LayerNorm before the blocks, attention pooling
    "vit_pe_core_tiny_patch16_384": dict(_PE, img_size=384, patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_pe_core_small_patch16_384": dict(_PE, img_size=384, patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_pe_core_base_patch16_224": dict(_PE, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                                         ref_feat_shape=14),
    "vit_pe_core_large_patch14_336": dict(_PE, img_size=336, patch_size=14, embed_dim=1024, depth=24, num_heads=16),
    "vit_pe_core_gigantic_patch14_448": dict(_PE, img_size=448, patch_size=14, embed_dim=1536, depth=50, num_heads=16,
                                             mlp_ratio=8960 / 1536, class_token=False, ref_feat_shape=32,
                                             rope_grid_offset=0.0),
    # MobileCLIP2: timm's VisionTransformer (full q/k/v bias, GELU MLP); L-14 with a LayerNorm before the blocks
    "vit_large_patch14_clip_224": dict(img_size=224, patch_size=14, embed_dim=1024, depth=24, num_heads=16,
                                       use_pre_transformer_norm=True, norm_eps=1e-5),
    # MobileCLIP2-B: a convolutional stem (models/mobileclip.py; (kernel = stride, channels) per stage, 16x16 per
    # token) and positions on the patch tokens only (timm no_embed_class)
    "vit_base_mci_224": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, no_embed_class=True,
                             conv_stem=((4, 192), (2, 192), (2, 768))),
}
# Keywords a config's timm_model_kwargs may override (the rest of a trunk's definition is fixed).
OVERRIDABLE = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
_TRUNK_DEFAULTS = dict(qkv_fused=True, mlp_ratio=4.0, swiglu_mlp=False, scale_mlp=False, scale_attn_inner=False,
                       use_rot_pos_emb=False, ref_feat_shape=None, rope_grid_offset=0.0, rope_grid_indexing="ij",
                       use_post_norm=False, use_pre_transformer_norm=False, global_pool="token",
                       attn_pool_num_heads=None, attn_pool_mlp_ratio=None, norm_eps=1e-6, class_token=True,
                       no_embed_class=False, conv_stem=())


@dataclass(frozen=True)
class EvaConfig:
    """An EVA image tower.  Tokens: (B, 1 + grid^2, width), the class token first (or (B, grid^2, width))."""

    timm_model_name: str
    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_width: int  # the hidden width M (timm: int(width * mlp_ratio))
    swiglu: bool  # SwiGLU MLP (fc1 holds 2M rows: gate, value), else GELU
    mlp_norm: bool  # sub-LayerNorm on the MLP's hidden layer (timm scale_mlp)
    attn_norm: bool  # sub-LayerNorm on the attention output (timm scale_attn_inner)
    rope: bool  # 2-D rotary position embeddings on the patch tokens' q and k
    rope_ref_grid: int | None  # positions rescaled to this grid (timm ref_feat_shape), or None
    post_norm: bool
    norm_eps: float = 1e-6  # timm's LayerNorm
    rope_temperature: float = 10000.0
    rope_offset: float = 0.0  # added to the grid positions (timm rope_grid_offset)
    rope_xy: bool = False  # pairs [x * f, y * f] (timm rope_grid_indexing 'xy'), else [y * f, x * f]
    ln_pre: bool = False  # LayerNorm before the blocks (timm use_pre_transformer_norm; the patch conv has no bias)
    pool: str = "token"  # "token" (class token) or "map" (attention pooling head, then the head Linear)
    pool_heads: int = 0  # attention pooling heads ("map")
    pool_mlp_width: int = 0  # attention pooling MLP width ("map")
    class_token: bool = True  # a class token first (no rotary embedding, its own position embedding)
    no_embed_class: bool = False  # position embeddings for the patch tokens only (timm no_embed_class)
    stem: tuple = ()  # a convolutional stem's (kernel = stride, out channels) per stage (mobileclip.py), or ()
    type: str = "timm"

    @property
    def head_width(self) -> int:
        return self.width // self.heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid**2 + int(self.class_token)

    @property
    def pos_tokens(self) -> int:
        """Rows of ``pos_embed``: every token, or the patch tokens only with ``no_embed_class``."""
        return self.grid**2 + int(self.class_token and not self.no_embed_class)


def parse_eva_config(name: str, raw: dict, quick_gelu: bool) -> EvaConfig:
    """OpenCLIP's ``vision_cfg`` of a timm trunk -> EvaConfig; errors name the model. ``quick_gelu`` does
    not apply: timm trunks run GELU whatever the config says (as in open_clip)."""
    trunk = raw.get("timm_model_name")
    if trunk not in TIMM_TRUNKS:
        raise ValueError(f"model config {name!r}: timm trunk {trunk!r} is not supported by fastclip "
                         f"(supported timm trunks: {', '.join(sorted(TIMM_TRUNKS))})")
    problems = []
    pool = TIMM_TRUNKS[trunk].get("global_pool", "token")
    if raw.get("timm_pool", pool) != pool:
        problems.append(f"timm_pool {raw['timm_pool']!r} (only {pool!r} is supported for {trunk})")
    if raw.get("timm_proj") not in (None, "", "none"):
        problems.append(f"timm_proj {raw['timm_proj']!r} (only null: the trunk's head is the projection)")
    if raw.get("timm_model_pretrained"):
        problems.append("timm_model_pretrained true (fastclip loads weights from the checkpoint only)")
    overrides = dict(raw.get("timm_model_kwargs", {}))
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        problems.append(f"timm_model_kwargs {', '.join(unknown)} (overridable: {', '.join(OVERRIDABLE)})")
    if problems:
        raise ValueError(f"model config {name!r}: vision_cfg " + "; ".join(problems) + " is not supported by fastclip")
    t = {**_TRUNK_DEFAULTS, **TIMM_TRUNKS[trunk], **overrides}
    width, heads = int(t["embed_dim"]), int(t["num_heads"])
    cfg = EvaConfig(
        timm_model_name=trunk, image_size=int(t["img_size"]), patch_size=int(t["patch_size"]), width=width,
        layers=int(t["depth"]), heads=heads, mlp_width=int(width * t["mlp_ratio"]), swiglu=bool(t["swiglu_mlp"]),
        mlp_norm=bool(t["scale_mlp"]), attn_norm=bool(t["scale_attn_inner"]), rope=bool(t["use_rot_pos_emb"]),
        rope_ref_grid=t["ref_feat_shape"], post_norm=bool(t["use_post_norm"]), norm_eps=float(t["norm_eps"]),
        rope_offset=float(t["rope_grid_offset"]), rope_xy=t["rope_grid_indexing"] == "xy",
        ln_pre=bool(t["use_pre_transformer_norm"]), pool=t["global_pool"],
        pool_heads=int(t["attn_pool_num_heads"] or heads),
        pool_mlp_width=int(width * (t["attn_pool_mlp_ratio"] or t["mlp_ratio"])), class_token=bool(t["class_token"]),
        no_embed_class=bool(t["no_embed_class"]), stem=tuple((int(k), int(c)) for k, c in t["conv_stem"]),
    )
    if "image_size" in raw and int(raw["image_size"]) != cfg.image_size:
        problems.append(f"image_size {raw['image_size']} differs from the trunk's img_size {cfg.image_size}")
    if width % heads:
        problems.append(f"embed_dim {width} is not a multiple of num_heads {heads}")
    elif cfg.rope and cfg.head_width % 4:
        problems.append(f"rotary embeddings need a head width divisible by 4, got {cfg.head_width}")
    if cfg.pool == "token" and not cfg.class_token:
        problems.append("timm_pool 'token' needs a class token")
    if cfg.pool == "map" and width % cfg.pool_heads:
        problems.append(f"embed_dim {width} is not a multiple of attn_pool_num_heads {cfg.pool_heads}")
    if cfg.stem and (math.prod(k for k, _ in cfg.stem) != cfg.patch_size or cfg.stem[-1][1] != width):
        problems.append(f"conv stem {cfg.stem} must span patch_size {cfg.patch_size} and end at embed_dim {width}")
    if cfg.image_size < cfg.patch_size:
        problems.append(f"img_size {cfg.image_size} is smaller than patch_size {cfg.patch_size}")
    if problems:
        raise ValueError(f"model config {name!r}: " + "; ".join(problems))
    return cfg


def rope_angles(cfg: EvaConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of the rotary angles of the patch tokens, each (grid^2, head_width/2) float32, row-major
    patch order; as timm's RotaryEmbeddingCat (in_pixels=False): per token at (y, x) (each + ``rope_offset``,
    then rescaled to ``rope_ref_grid``), the pairs are [y * f_0 .. y * f_{n-1}, x * f_0 .. x * f_{n-1}]
    ([x ..., y ...] with ``rope_xy``), n = head_width/4 and f_j = temperature^(-j/n)."""
    n, g = cfg.head_width // 4, cfg.grid
    exp = torch.arange(n, dtype=torch.int64, device=device).to(torch.float32) / n
    bands = 1.0 / (cfg.rope_temperature ** exp)  # (n,)
    t = torch.arange(g, dtype=torch.int64, device=device).to(torch.float32) + cfg.rope_offset  # (g,)
    if cfg.rope_ref_grid is not None:
        t = t / g * cfg.rope_ref_grid
    grid = torch.stack(torch.meshgrid(t, t, indexing="xy" if cfg.rope_xy else "ij"), dim=-1)  # (g, g, 2)
    angles = (grid.unsqueeze(-1) * bands).reshape(g * g, 2 * n)  # (g², Dh/2)
    return angles.cos(), angles.sin()


class EvaAttention(nn.Module):
    """Self-attention with a packed q/k/v projection (k without bias), rotary q/k and a sub-LayerNorm."""

    def __init__(self, width: int, heads: int, attn_norm: bool, eps: float, prefix: int = 1):
        super().__init__()
        self.width, self.heads = width, heads
        self.prefix = prefix  # leading tokens without rotary embeddings (the class token)
        self.qkv = nn.Linear(width, 3 * width)  # rows [Wq; Wk; Wv]; bias [bq; 0; bv]
        self.norm = LayerNorm(width, eps=eps) if attn_norm else None
        self.proj = nn.Linear(width, width)

    def int8_linears(self):
        """The (weight, bias) pairs passed to ``ops.linear`` (fastclip/backends/int8.py, Int8Linears)."""
        yield self.qkv.weight, self.qkv.bias
        yield from self._split_q_kv()
        yield self.proj.weight, self.proj.bias

    def _split_q_kv(self):
        """(wq (W, W), bq), (wkv (2W, W), bkv): row views of the packed projection."""
        W = self.width
        wq, wkv = self.qkv.weight.split([W, 2 * W])
        bq, bkv = self.qkv.bias.split([W, 2 * W])
        return (wq, bq), (wkv, bkv)

    def _heads(self, y: torch.Tensor, parts: int) -> torch.Tensor:
        """y: (B, L, parts * W) projections -> (parts, B, H, L, Dh)."""
        B, L = y.shape[:2]
        return y.view(B, L, parts, self.heads, self.width // self.heads).permute(2, 0, 3, 1, 4)

    def _output(self, out: torch.Tensor, ops: OpTable) -> torch.Tensor:
        """out: (B, H, Q, Dh) attention output -> (B, Q, W): merged heads, sub-LayerNorm, projection."""
        B, H, Q, Dh = out.shape
        out = out.transpose(1, 2).reshape(B, Q, H * Dh)  # (B, Q, W)
        if self.norm is not None:
            out = self.norm.apply_op(out, ops)
        return ops.linear(out, self.proj.weight, self.proj.bias)

    def self_attention(self, x: torch.Tensor, ops: OpTable, rope) -> torch.Tensor:
        """x: (B, L, W), rope: (cos, sin) (L - prefix, Dh/2) or None -> (B, L, W)."""
        q, k, v = self._heads(ops.linear(x, self.qkv.weight, self.qkv.bias), 3)  # (B, H, L, Dh) each
        rotary = None if rope is None else (*rope, self.prefix)  # q and k rotated inside the attention op
        return self._output(ops.attention(q, k, v, rotary=rotary), ops)

    def pooled_attention(self, x: torch.Tensor, ops: OpTable, rope) -> torch.Tensor:
        """The class token's row of ``self_attention``: its query over every token's key and value.
        x: (B, L, W) -> (B, W). The class token's query has no rotary embedding."""
        (wq, bq), (wkv, bkv) = self._split_q_kv()
        q = self._heads(ops.linear(x[:, :1], wq, bq), 1)[0]  # (B, H, 1, Dh)
        k, v = self._heads(ops.linear(x, wkv, bkv), 2)  # (B, H, L, Dh) each
        rotary = None if rope is None else (*rope, self.prefix)  # the query sits at position 0 < prefix: unrotated
        return self._output(ops.attention(q, k, v, rotary=rotary), ops)[:, 0]


class EvaMlp(nn.Module):
    """fc1 (W -> M, or 2M rows [gate; value] for SwiGLU) -> activation -> optional LayerNorm(M) -> fc2 (M -> W)."""

    def __init__(self, width: int, mlp_width: int, swiglu: bool, mlp_norm: bool, eps: float):
        super().__init__()
        self.act = "swiglu" if swiglu else "gelu"
        self.fc1 = nn.Linear(width, 2 * mlp_width if swiglu else mlp_width)
        self.norm = LayerNorm(mlp_width, eps=eps) if mlp_norm else None
        self.fc2 = nn.Linear(mlp_width, width)

    def int8_linears(self):
        """The (weight, bias) pairs passed to ``ops.linear`` (fc1's bias is added with the activation)."""
        yield self.fc1.weight, None
        yield self.fc2.weight, self.fc2.bias

    def apply_op(self, x: torch.Tensor, ops: OpTable) -> torch.Tensor:
        """x: (..., W) -> (..., W)."""
        h = ops.linear_act(x, self.fc1.weight, self.fc1.bias, self.act)  # (..., M)
        if self.norm is not None:
            h = self.norm.apply_op(h, ops)
        return ops.linear(h, self.fc2.weight, self.fc2.bias)


class EvaBlock(nn.Module):
    """Pre-norm (``x + attn(norm1(x)); x + mlp(norm2(x))``) or post-norm (``x + norm1(attn(x)); x + norm2(mlp(x))``)."""

    def __init__(self, cfg: EvaConfig):
        super().__init__()
        w, eps = cfg.width, cfg.norm_eps
        self.post_norm = cfg.post_norm
        self.norm1 = LayerNorm(w, eps=eps)
        self.attn = EvaAttention(w, cfg.heads, cfg.attn_norm, eps, prefix=int(cfg.class_token))
        self.norm2 = LayerNorm(w, eps=eps)
        self.mlp = EvaMlp(w, cfg.mlp_width, cfg.swiglu, cfg.mlp_norm, eps)

    def apply_op(self, x: torch.Tensor, ops: OpTable, rope, pooled: bool = False) -> torch.Tensor:
        """x: (B, L, W) -> (B, L, W); ``pooled``: the class token's output only, (B, W) (exact: attention needs
        every token's key and value, everything else is per token)."""
        if self.post_norm:
            h = self.attn.pooled_attention(x, ops, rope) if pooled else self.attn.self_attention(x, ops, rope)
            x = (x[:, 0] if pooled else x) + self.norm1.apply_op(h, ops)
            return x + self.norm2.apply_op(self.mlp.apply_op(x, ops), ops)
        y = self.norm1.apply_op(x, ops)
        h = self.attn.pooled_attention(y, ops, rope) if pooled else self.attn.self_attention(y, ops, rope)
        n2 = self.norm2
        y, x = ops.layer_norm(h, n2.weight, n2.bias, n2.eps, residual=x[:, 0] if pooled else x)  # x += h
        return x + self.mlp.apply_op(y, ops)


def _fold(weight: torch.Tensor, bias: torch.Tensor | None, pixel_norm: PixelNorm):
    """fold_pixel_norm in the weight's dtype, outside inference mode (see vit.py)."""
    with torch.inference_mode(False), torch.no_grad():
        w, b = fold_pixel_norm(weight, bias, pixel_norm)
        return w.to(weight.dtype), b.to(weight.dtype)


_FOLDED = DerivedWeights(_fold)  # the patch embedding's folded (weight, bias), keyed by it and the pixel_norm


class PatchEmbed(nn.Module):
    """timm's PatchEmbed: a (P, P)-stride convolution with bias (held as ``proj``)."""

    def __init__(self, width: int, patch_size: int, bias: bool):
        super().__init__()
        self.proj = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=bias)


class EvaVisionTower(nn.Module):
    """EVA image tower.  Pixels (B, 3, S, S) -> embeddings (B, embed_dim)."""

    int8_exempt = ("patch_embed.proj.weight", "cls_token", "pos_embed", "proj")  # embeddings, pooled projection

    def __init__(self, cfg: EvaConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.trim_last_block = True  # exact; False runs the last block on every token (tests, benchmarks)
        w = cfg.width
        self.patch_embed = ConvStem(cfg.stem) if cfg.stem else PatchEmbed(w, cfg.patch_size, bias=not cfg.ln_pre)
        if cfg.stem:  # the stem lists its own convolutions
            self.int8_exempt = tuple(n for n in type(self).int8_exempt if not n.startswith("patch_embed."))
        self.cls_token = nn.Parameter(torch.empty(1, 1, w)) if cfg.class_token else None
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.pos_tokens, w))
        self.norm_pre = LayerNorm(w, eps=cfg.norm_eps) if cfg.ln_pre else None
        self.blocks = nn.ModuleList([EvaBlock(cfg) for _ in range(cfg.layers)])
        self.norm = LayerNorm(w, eps=cfg.norm_eps)
        if cfg.pool == "map":
            self.attn_pool = AttentionPool(w, cfg.pool_heads, cfg.pool_mlp_width, "gelu", cfg.norm_eps)
        self.proj = nn.Parameter(torch.empty(w, embed_dim))
        self.proj_bias = nn.Parameter(torch.empty(embed_dim))
        self._rope: dict = {}  # device -> (cos, sin), made on first use

    def rope(self, device: torch.device):
        """(cos, sin) (grid^2, head_width/2) float32 on ``device``, or None without rotary embeddings."""
        if not self.cfg.rope:
            return None
        if device not in self._rope:
            self._rope[device] = tuple(t.to(device) for t in rope_angles(self.cfg))
        return self._rope[device]

    def patch_tokens(self, pixels: torch.Tensor, ops: OpTable, pixel_norm: PixelNorm | None = None) -> torch.Tensor:
        """pixels: (B, 3, S, S) -> patch tokens (B, grid*grid, W): the convolution as one ``ops.linear`` over
        flattened patches (as in vit.py); with ``pixel_norm``, raw uint8 levels and folded weights."""
        if self.cfg.stem:
            return self.patch_embed.apply_op(pixels, ops, pixel_norm)
        B, P, g, W = pixels.shape[0], self.cfg.patch_size, self.cfg.grid, self.cfg.width
        conv = self.patch_embed.proj
        if pixel_norm is None:
            weight, bias = conv.weight, conv.bias
        elif pixels.dtype != torch.uint8:
            raise ValueError(f"pixel_norm expects raw uint8 pixels, got {pixels.dtype}")
        else:
            folded = _FOLDED.get(conv.weight, conv.bias, extra=pixel_norm)
            weight, bias = folded if folded is not None else _fold(conv.weight, conv.bias, pixel_norm)
        cells = pixels[:, :, : g * P, : g * P].reshape(B, 3, g, P, g, P)  # (B, 3, gy, py, gx, px)
        patches = cells.permute(0, 2, 4, 1, 3, 5).reshape(B * g * g, 3 * P * P).to(conv.weight.dtype)
        return ops.linear(patches, weight.reshape(W, 3 * P * P), bias).view(B, g * g, W)

    def apply_op(self, pixels: torch.Tensor, ops: OpTable, normalize: bool = False,
                 pixel_norm: PixelNorm | None = None) -> torch.Tensor:
        """pixels: (B, 3, S, S) normalised floats, or raw uint8 levels with ``pixel_norm`` -> (B, embed_dim)."""
        cfg = self.cfg
        expected = (3, cfg.image_size, cfg.image_size)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            raise ValueError(f"expected pixels of shape (B, {', '.join(map(str, expected))}), got {tuple(pixels.shape)}")
        x = self.patch_tokens(pixels, ops, pixel_norm)  # (B, g², W)
        if cfg.no_embed_class:  # positions of the patch tokens only; the class token has none
            x = x + self.pos_embed.to(x.dtype)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + g², W)
        if not cfg.no_embed_class:
            x = x + self.pos_embed.to(x.dtype)
        if self.norm_pre is not None:
            x = self.norm_pre.apply_op(x, ops)
        rope = self.rope(x.device)
        blocks = list(self.blocks)
        # class-token pooling needs the last block's class-token row only; attention pooling every token
        last = blocks.pop() if self.trim_last_block and blocks and cfg.pool == "token" else None
        for block in blocks:
            x = block.apply_op(x, ops, rope)
        n = self.norm
        if cfg.pool == "map":
            pooled = self.attn_pool.apply_op(n.apply_op(x, ops), ops) @ self.proj + self.proj_bias  # (B, E)
            return ops.l2_normalize(pooled) if normalize else pooled
        pooled = last.apply_op(x, ops, rope, pooled=True) if last is not None else x[:, 0]  # (B, W)
        return ops.normalize_project(pooled, n.weight, n.bias, n.eps, self.proj, self.proj_bias, normalize)


register_tower("vision", "timm", parse_eva_config, EvaVisionTower)
