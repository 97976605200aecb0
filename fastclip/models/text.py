"""The CLIP text tower (OpenAI CLIP, OpenCLIP, SigLIP's bidirectional variant): its config, its parser from
OpenCLIP's JSON shape, and the tower. Registered as text tower type ``clip``."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..backends.dispatch import OpTable
from .registry import act_problem, check_options, register_tower, tower_act
from .transformer import LayerNorm, Transformer

POOL_TYPES = ("argmax", "eos", "last", "first")
# Text cleaning before an HF tokenizer (open_clip's HFTokenizer ``clean``; "none": transformers' tokenizer as is)
TOKENIZER_CLEAN = ("whitespace", "lower", "canonicalize", "none")


@dataclass(frozen=True)
class TextConfig:
    """Text transformer.  Tokens: (B, context_length) int64 -> (B, context_length, width)."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    act: str = "gelu"
    norm_eps: float = 1e-5
    causal: bool = True
    pool_type: str = "argmax"  # "argmax" (highest id = end of text), "eos", "last", "first"
    eos_token_id: int | None = None
    proj_bias: bool = False
    hf_tokenizer_name: str | None = None  # open_clip's HFTokenizer: the hub repo of the tokenizer files (MetaCLIP 2)
    tokenizer_clean: str | None = None  # its text cleaning (TOKENIZER_CLEAN), with hf_tokenizer_name
    type: str = "clip"  # the tower type (fastclip/models/registry.py)

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio + 1e-4)  # ratios stored as rounded decimals (4304/1152)


def parse_text_config(name: str, raw: dict, quick_gelu: bool) -> TextConfig:
    """OpenCLIP's ``text_cfg`` -> TextConfig; errors name the model."""
    check_options(name, "text_cfg", raw)
    cfg = TextConfig(
        context_length=int(raw.get("context_length", 77)),
        vocab_size=int(raw.get("vocab_size", 49408)),
        width=int(raw.get("width", 512)),
        heads=int(raw.get("heads", 8)),
        layers=int(raw.get("layers", 12)),
        mlp_ratio=float(raw.get("mlp_ratio", 4.0)),
        act=tower_act(raw, quick_gelu),
        norm_eps=float(raw.get("norm_kwargs", {}).get("eps", 1e-5)),
        causal=not raw.get("no_causal_mask", False),
        pool_type=raw.get("pool_type", "argmax"),
        eos_token_id=raw.get("eos_token_id", raw.get("eos_id")),  # "eos_id" is open_clip's spelling
        proj_bias=bool(raw.get("proj_bias", False)),
        **_hf_tokenizer_fields(raw),
    )
    problems = []
    if cfg.width % cfg.heads:
        problems.append(f"text width {cfg.width} is not a multiple of heads {cfg.heads}")
    if cfg.pool_type not in POOL_TYPES:
        problems.append(f"text pool_type {cfg.pool_type!r} is not one of {', '.join(POOL_TYPES)}")
    if cfg.pool_type == "eos" and cfg.eos_token_id is None:
        problems.append("text pool_type 'eos' needs text_cfg.eos_token_id")
    if act_problem(cfg.act):
        problems.append(act_problem(cfg.act))
    problems += _hf_tokenizer_problems(raw)
    if problems:
        raise ValueError(f"model config {name!r}: " + "; ".join(problems))
    return cfg


def _hf_tokenizer_fields(raw: dict) -> dict:
    """``hf_tokenizer_name`` / ``tokenizer_kwargs.clean`` of a text_cfg (open_clip's default clean: whitespace)."""
    name = raw.get("hf_tokenizer_name")
    if not name:
        return {}
    return {"hf_tokenizer_name": str(name), "tokenizer_clean": (raw.get("tokenizer_kwargs") or {}).get("clean", "whitespace")}


def _hf_tokenizer_problems(raw: dict) -> list[str]:
    """What of a text_cfg's HF tokenizer settings fastclip cannot reproduce."""
    problems = []
    kwargs = raw.get("tokenizer_kwargs") or {}
    if kwargs and not raw.get("hf_tokenizer_name"):
        problems.append("text_cfg.tokenizer_kwargs needs text_cfg.hf_tokenizer_name")
    unknown = sorted(set(kwargs) - {"clean"})
    if unknown:
        problems.append(f"text_cfg.tokenizer_kwargs {', '.join(unknown)} not supported (only 'clean')")
    if kwargs.get("clean", "whitespace") not in TOKENIZER_CLEAN:
        problems.append(f"text_cfg.tokenizer_kwargs.clean {kwargs['clean']!r} is not one of {', '.join(TOKENIZER_CLEAN)}")
    if raw.get("tokenizer_mode"):
        problems.append(f"text_cfg.tokenizer_mode {raw['tokenizer_mode']!r} is not supported")
    return problems


class TextTransformer(nn.Module):
    """Text tower.  Token ids (B, L) -> embeddings (B, embed_dim)."""

    int8_exempt = ("token_embedding.weight", "positional_embedding", "text_projection")  # embeddings, pooled projection

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

    @property
    def stops_at_pooled(self) -> bool:
        """A causal tower pooled at a token (not the last position): no position sees a later one, so the
        tokens after each row's pooled token cannot change its output."""
        return self.cfg.causal and self.cfg.pool_type in ("argmax", "eos", "first")

    def run_lengths(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """(B,) tokens each row needs: up to its pooled token when ``stops_at_pooled``, else None (every row
        runs at full length).  tokens: (B, L)."""
        return self.pool_index(tokens) + 1 if self.stops_at_pooled else None

    def apply_op(self, tokens: torch.Tensor, ops: OpTable, normalize: bool = False) -> torch.Tensor:
        """tokens: (B, L) int64 from the model's tokenizer -> (B, embed_dim)."""
        cfg = self.cfg
        if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"expected integer token ids of shape (B, L), got {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.shape[1] > cfg.context_length:
            raise ValueError(f"token sequence length {tokens.shape[1]} exceeds the context length {cfg.context_length}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}), got [{int(tokens.min())}, {int(tokens.max())}]")
        tokens = tokens.long()
        index = self.pool_index(tokens)  # (B,)
        if self.stops_at_pooled and tokens.shape[0]:  # exact: run only up to the batch's last pooled token
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


register_tower("text", "clip", parse_text_config, TextTransformer)
