"""BERT-style text towers (BERT, RoBERTa, XLM-RoBERTa): open_clip's ``HFTextEncoder`` text towers (text_cfg
``hf_model_name``: ``xlm-roberta-base-ViT-B-32``, ``roberta-ViT-B-32``, ...) and the Chinese-CLIP text encoders.
Registered as text tower type ``hf``.

The encoder is post-norm: ``x = LN(x + attn(x)); x = LN(x + mlp(x))`` (each ``LN(x + h)`` one
``ops.layer_norm(h, ..., residual=x)``), with bidirectional attention under the padding mask (``tokens !=
pad_token_id``), word + token-type (id 0) + absolute position embeddings and a LayerNorm before the first
layer. Position ids are ``arange(L)`` for BERT; RoBERTa / XLM-R number the non-pad tokens from
``pad_token_id + 1`` (transformers' ``create_position_ids_from_input_ids``). Pooling: ``mean`` (open_clip's
``mean_pooler``, over the non-pad tokens) or ``first`` (the first token's final state, no pooler layer); then
open_clip's projection (``linear``; ``mlp``: Linear, exact GELU, Linear, no biases; ``none``).

Exact shortcuts: ``apply_op`` runs only up to the batch's longest non-pad extent (padded keys are masked
and a position id never depends on later tokens), and with ``first`` pooling the last layer runs the query,
output projection and MLP of the first token only (``trim_last_block``).

q, k and v run as one GEMM over ``[Wq; Wk; Wv]``, a derived weight made once per version of the three
(fastclip/backends/weight_packs.py). Under ``precision="int8"`` they are three int8 layers (see
``BertSelfAttention.int8_linears``).

Parameter names are open_clip's (``HFTextEncoder``: ``transformer.embeddings.*``,
``transformer.encoder.layer.{i}.*`` in transformers' names, ``proj.*``), so its state dicts load unrenamed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..backends.dispatch import OpTable
from ..backends.weight_packs import DerivedWeights
from .registry import act_problem, register_tower
from .text import _hf_tokenizer_fields, _hf_tokenizer_problems
from .transformer import LayerNorm

MODEL_TYPES = ("bert", "roberta", "xlm-roberta")
POOL_TYPES = ("mean", "first")
PROJ_TYPES = ("linear", "mlp", "none")
# open_clip's hf_pooler_type -> pool_type ("cls_pooler" runs the HF pooler layer: not supported)
POOLERS = {"mean_pooler": "mean", "cls_last_hidden_state_pooler": "first"}
# transformers' hidden_act -> fastclip's activation names
HF_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu"}

# The config.json values of the Hugging Face text models open_clip's and Chinese-CLIP's configs name
# (a text_cfg may give any other model's values in ``hf_model_config``).
_XLMR = dict(model_type="xlm-roberta", vocab_size=250002, max_position_embeddings=514, type_vocab_size=1,
             pad_token_id=1, layer_norm_eps=1e-5, hidden_act="gelu")
_CN_BERT = dict(model_type="bert", vocab_size=21128, max_position_embeddings=512, type_vocab_size=2,
                pad_token_id=0, layer_norm_eps=1e-12, hidden_act="gelu")
HF_TEXT_MODELS: dict[str, dict] = {
    "xlm-roberta-base": dict(_XLMR, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                             intermediate_size=3072),
    "xlm-roberta-large": dict(_XLMR, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                              intermediate_size=4096),
    "roberta-base": dict(model_type="roberta", vocab_size=50265, hidden_size=768, num_hidden_layers=12,
                         num_attention_heads=12, intermediate_size=3072, max_position_embeddings=514,
                         type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5, hidden_act="gelu"),
    "hfl/chinese-roberta-wwm-ext": dict(_CN_BERT, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                        intermediate_size=3072),
    "hfl/chinese-roberta-wwm-ext-large": dict(_CN_BERT, hidden_size=1024, num_hidden_layers=24,
                                              num_attention_heads=16, intermediate_size=4096),
    "hfl/rbt3": dict(_CN_BERT, hidden_size=768, num_hidden_layers=3, num_attention_heads=12, intermediate_size=3072),
}
# transformers' defaults (BertConfig / RobertaConfig / XLMRobertaConfig) for keys a config.json omits
_HF_DEFAULTS = {
    "bert": dict(vocab_size=30522, pad_token_id=0),
    "roberta": dict(vocab_size=50265, pad_token_id=1),
    "xlm-roberta": dict(vocab_size=30522, pad_token_id=1),
}
_HF_COMMON_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                           max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu")


@dataclass(frozen=True)
class BertTextConfig:
    """A BERT-style text encoder.  Tokens: (B, L) int64 padded with ``pad_token_id`` -> (B, width) pooled."""

    hf_model_name: str | None = None
    model_type: str = "bert"  # "bert" (positions arange(L)) | "roberta" | "xlm-roberta" (padding-offset positions)
    vocab_size: int = 30522
    width: int = 768  # hidden_size
    heads: int = 12
    layers: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    pad_token_id: int = 0
    norm_eps: float = 1e-12  # layer_norm_eps
    act: str = "gelu"  # hidden_act ("gelu": exact erf GELU)
    pool_type: str = "mean"  # "mean" over non-pad tokens | "first": the first token's final state
    proj_type: str = "mlp"  # "linear" | "mlp" | "none"
    context_length: int = 77  # what the tokenizer pads to
    hf_tokenizer_name: str | None = None
    tokenizer_clean: str | None = None
    type: str = "hf"

    @property
    def padding_positions(self) -> bool:
        """RoBERTa / XLM-R: position ids count the non-pad tokens from pad_token_id + 1."""
        return self.model_type in ("roberta", "xlm-roberta")

    @property
    def max_length(self) -> int:
        """The longest token sequence the position table covers."""
        return self.max_position_embeddings - (self.pad_token_id + 1 if self.padding_positions else 0)


def _hf_values(name: str, raw: dict) -> dict:
    """The HF config.json values of a text_cfg: ``hf_model_config`` (keys it lacks take transformers' defaults
    for its model_type, as its config class would give them), else the HF_TEXT_MODELS row of ``hf_model_name``."""
    hf_name, given = raw.get("hf_model_name"), raw.get("hf_model_config")
    if given is None:
        if hf_name not in HF_TEXT_MODELS:
            raise ValueError(f"model config {name!r}: text_cfg.hf_model_name {hf_name!r} is not a model fastclip knows "
                             f"({', '.join(HF_TEXT_MODELS)}); put the values of its config.json in "
                             "text_cfg.hf_model_config")
        return dict(HF_TEXT_MODELS[hf_name])
    if not isinstance(given, dict):
        raise ValueError(f"model config {name!r}: text_cfg.hf_model_config must be a dict of config.json values")
    model_type = given.get("model_type", HF_TEXT_MODELS.get(hf_name, {}).get("model_type"))
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model config {name!r}: text_cfg.hf_model_config.model_type {model_type!r} is not one of "
                         f"{', '.join(MODEL_TYPES)}")
    problems = []
    if given.get("position_embedding_type", "absolute") != "absolute":
        problems.append(f"position_embedding_type {given['position_embedding_type']!r} (only 'absolute')")
    if given.get("is_decoder") or given.get("add_cross_attention"):
        problems.append("a decoder (is_decoder / add_cross_attention)")
    if problems:
        raise ValueError(f"model config {name!r}: text_cfg.hf_model_config: {'; '.join(problems)} not supported")
    return {**_HF_COMMON_DEFAULTS, **_HF_DEFAULTS[model_type], **given, "model_type": model_type}


def parse_bert_config(name: str, raw: dict, quick_gelu: bool = False) -> BertTextConfig:
    """open_clip's HF ``text_cfg`` (``hf_model_name``, ``hf_tokenizer_name``, ``hf_pooler_type``, ``hf_proj_type``,
    ``context_length``, ``tokenizer_kwargs``; optionally ``hf_model_config``) -> BertTextConfig (the text_cfg's
    ``vocab_size``, ``width``, ... are not read: the HF values rule, as in open_clip). ``quick_gelu``
    does not apply: open_clip's HF text towers keep their own activation. Errors name the model and key."""
    hf = _hf_values(name, raw)
    # "pooler_type" / "proj": the names of open_clip's first HF-text configs (older hub repos' open_clip_config.json)
    pooler = raw.get("hf_pooler_type", raw.get("pooler_type", "mean_pooler"))
    if pooler not in POOLERS:
        raise ValueError(f"model config {name!r}: text_cfg.hf_pooler_type {pooler!r} is not supported "
                         f"(supported: {', '.join(POOLERS)})")
    proj = raw.get("hf_proj_type", raw.get("proj", "mlp"))
    proj = "none" if proj is None else proj
    hidden_act = hf["hidden_act"]
    cfg = BertTextConfig(
        hf_model_name=raw.get("hf_model_name"),
        model_type=hf["model_type"],
        vocab_size=int(hf["vocab_size"]),
        width=int(hf["hidden_size"]),
        heads=int(hf["num_attention_heads"]),
        layers=int(hf["num_hidden_layers"]),
        intermediate_size=int(hf["intermediate_size"]),
        max_position_embeddings=int(hf["max_position_embeddings"]),
        type_vocab_size=int(hf["type_vocab_size"]),
        pad_token_id=int(hf["pad_token_id"]),
        norm_eps=float(hf["layer_norm_eps"]),
        act=HF_ACTS.get(hidden_act, str(hidden_act)),
        pool_type=POOLERS[pooler],
        proj_type=proj,
        context_length=int(raw.get("context_length", 77)),
        **_hf_tokenizer_fields(raw),
    )
    problems = []
    if hidden_act not in HF_ACTS:
        problems.append(f"hidden_act {hidden_act!r} is not one of {', '.join(HF_ACTS)}")
    elif act_problem(cfg.act):
        problems.append(act_problem(cfg.act))
    if cfg.width % cfg.heads:
        problems.append(f"text width {cfg.width} is not a multiple of heads {cfg.heads}")
    if cfg.proj_type not in PROJ_TYPES:
        problems.append(f"text_cfg.hf_proj_type {cfg.proj_type!r} is not one of linear, mlp, None")
    if cfg.type_vocab_size < 1:
        problems.append("type_vocab_size must be at least 1 (token type 0 is added)")
    if not 0 <= cfg.pad_token_id < cfg.vocab_size:
        problems.append(f"pad_token_id {cfg.pad_token_id} is not an id of the vocabulary (size {cfg.vocab_size})")
    if not 1 <= cfg.context_length <= cfg.max_length:
        problems.append(f"text context_length {cfg.context_length} is not in 1..{cfg.max_length} (the positions "
                        f"of max_position_embeddings {cfg.max_position_embeddings})")
    problems += _hf_tokenizer_problems(raw)
    if problems:
        raise ValueError(f"model config {name!r}: " + "; ".join(problems))
    return cfg


# ---------------------------------------------------------------- modules (transformers' names)
def _pack(wq, bq, wk, bk, wv, bv):
    """([Wq; Wk; Wv] (3W, W), [bq; bk; bv] (3W,)), made outside inference mode (see weight_packs.py)."""
    with torch.inference_mode(False), torch.no_grad():
        return torch.cat([wq, wk, wv]), torch.cat([bq, bk, bv])


_QKV = DerivedWeights(_pack)  # each layer's packed q/k/v projection, remade when one of them changes


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertTextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.width)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.width)
        self.LayerNorm = LayerNorm(cfg.width, eps=cfg.norm_eps)

    def apply_op(self, tokens: torch.Tensor, positions: torch.Tensor, ops: OpTable) -> torch.Tensor:
        """LN(word + token type 0 + position).  tokens, positions: (B, L) int64 -> (B, L, W)."""
        x = self.word_embeddings.weight[tokens] + self.token_type_embeddings.weight[0]  # (B, L, W)
        ln = self.LayerNorm
        return ops.layer_norm(x, ln.weight, ln.bias, ln.eps, residual=self.position_embeddings.weight[positions])[0]


class BertSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.width, self.heads = width, heads
        self.query, self.key, self.value = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.pack_qkv = True  # one GEMM over [Wq; Wk; Wv]; False: three (what int8 quantises)

    def int8_linears(self):
        """The (weight, bias) pairs passed to ``ops.linear`` under int8: q, k and v as three layers (int8 packs
        belong to parameters, the packed [Wq; Wk; Wv] is derived), so from this call on they run as three GEMMs."""
        self.pack_qkv = False
        for lin in (self.query, self.key, self.value):
            yield lin.weight, lin.bias

    def _heads(self, y: torch.Tensor) -> torch.Tensor:
        """y: (B, L, W) -> (B, H, L, Dh)."""
        B, L = y.shape[:2]
        return y.view(B, L, self.heads, self.width // self.heads).transpose(1, 2)

    def qkv(self, x: torch.Tensor, ops: OpTable, queries: int | None = None):
        """q (B, H, Q, Dh) of the first ``queries`` tokens (None: all), k and v (B, H, L, Dh).  x: (B, L, W)."""
        q, k, v = self.query, self.key, self.value
        if not self.pack_qkv:
            xq = x if queries is None else x[:, :queries]
            return tuple(self._heads(ops.linear(t, lin.weight, lin.bias)) for t, lin in ((xq, q), (x, k), (x, v)))
        tensors = (q.weight, q.bias, k.weight, k.bias, v.weight, v.bias)
        w, b = _QKV.get(*tensors) or _pack(*tensors)
        B, L, W = x.shape
        y = ops.linear(x, w, b).view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, H, L, Dh)
        return (y[0] if queries is None else y[0][:, :, :queries]), y[1], y[2]


class BertSelfOutput(nn.Module):
    def __init__(self, width: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.LayerNorm = LayerNorm(width, eps=eps)

    def int8_linears(self):
        yield self.dense.weight, self.dense.bias


class BertAttention(nn.Module):
    def __init__(self, width: int, heads: int, eps: float):
        super().__init__()
        self.self = BertSelfAttention(width, heads)
        self.output = BertSelfOutput(width, eps)

    def apply_op(self, x: torch.Tensor, ops: OpTable, key_mask: torch.Tensor | None,
                 queries: int | None = None) -> torch.Tensor:
        """LN(x + dense(attention(x))) at the first ``queries`` tokens (None: all).  x: (B, L, W), key_mask:
        (B, L) bool (True = a real token) or None -> (B, Q, W)."""
        q, k, v = self.self.qkv(x, ops, queries)
        ctx = ops.attention(q, k, v, causal=False, key_mask=key_mask)  # (B, H, Q, Dh)
        B, H, Q, Dh = ctx.shape
        ctx = ctx.transpose(1, 2).reshape(B, Q, H * Dh)  # (B, Q, W)
        out = self.output
        h = ops.linear(ctx, out.dense.weight, out.dense.bias)
        residual = x if queries is None else x[:, :queries]
        return ops.layer_norm(h, out.LayerNorm.weight, out.LayerNorm.bias, out.LayerNorm.eps, residual=residual)[0]


class BertIntermediate(nn.Module):
    def __init__(self, width: int, intermediate_size: int):
        super().__init__()
        self.dense = nn.Linear(width, intermediate_size)

    def int8_linears(self):
        yield self.dense.weight, None  # its bias is added with the activation (linear_act)


class BertOutput(nn.Module):
    def __init__(self, width: int, intermediate_size: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(intermediate_size, width)
        self.LayerNorm = LayerNorm(width, eps=eps)

    def int8_linears(self):
        yield self.dense.weight, self.dense.bias


class BertLayer(nn.Module):
    """Post-norm block: x = LN(x + attn(x)); x = LN(x + mlp(x))."""

    def __init__(self, cfg: BertTextConfig):
        super().__init__()
        self.act = cfg.act
        self.attention = BertAttention(cfg.width, cfg.heads, cfg.norm_eps)
        self.intermediate = BertIntermediate(cfg.width, cfg.intermediate_size)
        self.output = BertOutput(cfg.width, cfg.intermediate_size, cfg.norm_eps)

    def apply_op(self, x: torch.Tensor, ops: OpTable, key_mask: torch.Tensor | None,
                 queries: int | None = None) -> torch.Tensor:
        """x: (B, L, W) -> (B, L, W), or (B, queries, W): the first ``queries`` tokens only."""
        x = self.attention.apply_op(x, ops, key_mask, queries)
        h = ops.linear_act(x, self.intermediate.dense.weight, self.intermediate.dense.bias, self.act)  # (B, Q, M)
        out = self.output
        h = ops.linear(h, out.dense.weight, out.dense.bias)
        return ops.layer_norm(h, out.LayerNorm.weight, out.LayerNorm.bias, out.LayerNorm.eps, residual=x)[0]


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertTextConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(cfg) for _ in range(cfg.layers)])


class BertModel(nn.Module):
    """transformers' BertModel / RobertaModel / XLMRobertaModel without the pooler layer (open_clip's
    ``HFTextEncoder.transformer``)."""

    def __init__(self, cfg: BertTextConfig):
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)


# ---------------------------------------------------------------- the tower
class BertTextTower(nn.Module):
    """BERT-style text tower.  Token ids (B, L) -> embeddings (B, embed_dim)."""

    def __init__(self, cfg: BertTextConfig, embed_dim: int):
        super().__init__()
        if cfg.proj_type == "none" and cfg.width != embed_dim:
            raise ValueError(f"text hf_proj_type None needs width == embed_dim, got {cfg.width} and {embed_dim}")
        self.cfg = cfg
        self.trim_last_block = True  # exact; False runs the last layer on every token (tests, benchmarks)
        self.transformer = BertModel(cfg)
        W = cfg.width
        if cfg.proj_type == "linear":
            self.proj = nn.Linear(W, embed_dim, bias=False)
            projections = ("proj.weight",)
        elif cfg.proj_type == "mlp":
            hidden = (W + embed_dim) // 2
            self.proj = nn.Sequential(nn.Linear(W, hidden, bias=False), nn.GELU(), nn.Linear(hidden, embed_dim, bias=False))
            projections = ("proj.0.weight", "proj.2.weight")
        else:
            self.proj = None
            projections = ()
        # embeddings and the projection of the pooled rows stay fp32 under int8
        emb = "transformer.embeddings."
        self.int8_exempt = (f"{emb}word_embeddings.weight", f"{emb}position_embeddings.weight",
                            f"{emb}token_type_embeddings.weight", *projections)

    def run_lengths(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) the tokens each row needs: up to and including its last non-pad token (its non-pad count, for
        right-padded rows); the tokens after it are padding no query sees.  tokens: (B, L)."""
        real = tokens != self.cfg.pad_token_id  # (B, L)
        last = torch.arange(1, tokens.shape[1] + 1, device=tokens.device) * real  # (B, L): position + 1 where real
        return last.amax(dim=1) if tokens.shape[1] else real.sum(dim=1)

    def positions(self, tokens: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Position ids (B, L) int64: arange(L) (BERT), or RoBERTa's cumsum of the non-pad mask, offset by
        pad_token_id (pad tokens at pad_token_id).  tokens, real: (B, L)."""
        if not self.cfg.padding_positions:
            return torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        mask = real.long()
        return torch.cumsum(mask, dim=1) * mask + self.cfg.pad_token_id

    def _check(self, tokens: torch.Tensor) -> None:
        cfg = self.cfg
        if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"expected integer token ids of shape (B, L), got {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.shape[1] > cfg.max_length:
            raise ValueError(f"token sequence length {tokens.shape[1]} exceeds the {cfg.max_length} positions of "
                             f"this text tower (max_position_embeddings {cfg.max_position_embeddings})")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}), got [{int(tokens.min())}, {int(tokens.max())}]")

    def project(self, pooled: torch.Tensor, ops: OpTable) -> torch.Tensor:
        """open_clip's projection of the pooled states.  pooled: (B, W) -> (B, E)."""
        if self.cfg.proj_type == "linear":
            return ops.linear(pooled, self.proj.weight)
        if self.cfg.proj_type == "mlp":
            h = ops.linear_act(pooled, self.proj[0].weight, None, "gelu")  # (B, (W + E) // 2)
            return ops.linear(h, self.proj[2].weight)
        return pooled

    def apply_op(self, tokens: torch.Tensor, ops: OpTable, normalize: bool = False) -> torch.Tensor:
        """tokens: (B, L) int64 padded with pad_token_id -> (B, embed_dim)."""
        self._check(tokens)
        tokens = tokens.long()
        lengths = self.run_lengths(tokens)  # (B,)
        empty = (lengths == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"token rows {empty} hold only padding (pad id {self.cfg.pad_token_id}): a text has at "
                             "least its special tokens")
        if tokens.shape[0] == 0:
            out = self.proj[2] if self.cfg.proj_type == "mlp" else self.proj
            weight = self.transformer.embeddings.word_embeddings.weight
            return weight.new_empty(0, self.cfg.width if out is None else out.weight.shape[0])
        tokens = tokens[:, : int(lengths.max())]  # exact: the tokens after every row's last real one are padding
        real = tokens != self.cfg.pad_token_id  # (B, L)
        key_mask = None if bool(real.all()) else real
        x = self.transformer.embeddings.apply_op(tokens, self.positions(tokens, real), ops)  # (B, L, W)
        layers = list(self.transformer.encoder.layer)
        first = self.cfg.pool_type == "first"
        last = layers.pop() if first and self.trim_last_block and layers else None
        for layer in layers:
            x = layer.apply_op(x, ops, key_mask)
        if last is not None:  # the first token's final state: its query only in the last layer
            pooled = last.apply_op(x, ops, key_mask, queries=1)[:, 0]  # (B, W)
        elif first:
            pooled = x[:, 0]
        else:  # open_clip's mean_pooler: the mean of the non-pad tokens' final states
            weights = real.to(torch.float32)  # (B, L)
            pooled = ((x.float() * weights[..., None]).sum(dim=1) / weights.sum(dim=1, keepdim=True)).to(x.dtype)
        out = self.project(pooled, ops)  # (B, E)
        return ops.l2_normalize(out) if normalize else out


register_tower("text", "hf", parse_bert_config, BertTextTower)
