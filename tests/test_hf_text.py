"""BERT-style text towers (text type ``hf``, fastclip/models/bert.py): open_clip's HF-text CLIPs.

* the configs ``xlm-roberta-base-ViT-B-32``, ``xlm-roberta-large-ViT-H-14``, ``roberta-ViT-B-32`` are open_clip's
  JSON and build open_clip's architecture (every parameter name and shape, open_clip's HFTextEncoder built from
  the config.json values of ``bert.HF_TEXT_MODELS``); their pretrained tags are open_clip's;
* tiny XLM-R, RoBERTa and BERT ("first" pooling, no projection) CLIPs in open_clip (``CustomTextCLIP`` over a
  transformers config saved in a temp dir), weights perturbed: text and image embeddings within UPSTREAM_ATOL
  on the ref and cpu backends, batch 1 (no padding) and batches of texts of different lengths;
* loading from an open_clip state dict file and from an open_clip hub directory with its tokenizer files
  (XLM-R sentencepiece / RoBERTa byte-level BPE, built here), ``embed_texts`` against open_clip's tokenizer +
  encode_text; int8 against fp32; parser and token errors.
"""
from __future__ import annotations

import copy
import io
import json
import random
from pathlib import Path

import open_clip
import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
import transformers
from tokenizers import ByteLevelBPETokenizer

import fastclip
from fastclip.backends import int8 as quant
from fastclip.loading import hub, keymaps
from fastclip.models import bert
from fastclip.models.clip import CLIP
from fastclip.models.config import parse_config
from fastclip.tokenizer import HFTokenizer
from fastclip.tolerance import SAME_MODEL_ATOL, SAME_MODEL_RTOL, UPSTREAM_ATOL
from helpers.upstream import (
    Upstream,
    assert_matches,
    fastclip_from_openclip,
    perturb_,
    put_in_hub_cache,
    register_configs,
    save_state_dict,
)

NAMES = ["xlm-roberta-base-ViT-B-32", "xlm-roberta-large-ViT-H-14", "roberta-ViT-B-32"]
HF_CONFIGS = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig,
              "xlm-roberta": transformers.XLMRobertaConfig}
BACKENDS = ["ref", "cpu"]
VOCAB, EMBED = 512, 48
VISION = {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32}
_HF_TINY = dict(vocab_size=VOCAB, hidden_size=EMBED, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
                max_position_embeddings=80, layer_norm_eps=1e-5, hidden_act="gelu")
# tiny name: (HF config.json values, open_clip text_cfg keys, (bos, eos, pad) of its token layout, tokenizer kind)
TINY = {
    "tiny-hf-xlmr": (dict(_HF_TINY, model_type="xlm-roberta", type_vocab_size=1, pad_token_id=1),
                     {"hf_pooler_type": "mean_pooler"}, (0, 2, 1), "xlmr"),
    "tiny-hf-roberta": (dict(_HF_TINY, model_type="roberta", type_vocab_size=1, pad_token_id=1),
                        {"hf_pooler_type": "mean_pooler", "hf_proj_type": "linear"}, (0, 2, 1), "roberta"),
    "tiny-hf-bert-first": (dict(_HF_TINY, model_type="bert", type_vocab_size=2, pad_token_id=0, layer_norm_eps=1e-12),
                           {"hf_pooler_type": "cls_last_hidden_state_pooler", "hf_proj_type": None}, (2, 3, 0), None),
}
ROW_LENGTHS = {1: [77], 3: [5, 20, 9], 5: [77, 3, 40, 12, 2]}  # tokens per row, bos and eos included
TEXTS = ["a photo of a cat", "  Un CHAT   noir!! sur le canapé. ", "一只猫在沙发上睡觉", "Tom &amp; Jerry",
         "café crème à Paris", "the dog runs in the park " * 20, "a cat </s> a dog", "x"]
_CORPUS = ["a photo of a cat", "un chat noir sur le canapé", "café crème à Paris", "the dog runs in the park",
           "一只猫在沙发上睡觉", "Tom and Jerry", "a cat and a dog"]


# ---------------------------------------------------------------- tokenizer directories
def _lines(n: int = 2000) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(_CORPUS).split()[: rng.randint(1, 6)]) for _ in range(n)]


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory) -> dict[str, Path]:
    """{"xlmr": an XLMRobertaTokenizer (sentencepiece) dir, "roberta": a RobertaTokenizer (byte-level BPE) dir},
    written by transformers' save_pretrained."""
    root = tmp_path_factory.mktemp("hf_text_tokenizers")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_lines()), model_writer=buf, vocab_size=120,
                                   hard_vocab_limit=False, model_type="unigram", character_coverage=1.0,
                                   num_threads=1, minloglevel=2)
    (root / "xlmr_src").mkdir()
    (root / "xlmr_src" / "sentencepiece.bpe.model").write_bytes(buf.getvalue())
    transformers.XLMRobertaTokenizer.from_pretrained(root / "xlmr_src").save_pretrained(root / "xlmr")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_lines(), vocab_size=400, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    (root / "bpe").mkdir()
    bpe.save_model(str(root / "bpe"))
    vocab = json.loads((root / "bpe" / "vocab.json").read_text())
    merges = [tuple(m.split()) for m in (root / "bpe" / "merges.txt").read_text().splitlines()[1:] if m.strip()]
    transformers.RobertaTokenizer(vocab=vocab, merges=merges).save_pretrained(root / "roberta")
    return {"xlmr": root / "xlmr", "roberta": root / "roberta"}


@pytest.mark.parametrize("kind", ["xlmr", "roberta"])
def test_hf_tokenizer_pads_with_the_pad_id_as_open_clip(tok_dirs, kind):
    ours = HFTokenizer(tok_dirs[kind], context_length=77)
    theirs = open_clip.tokenizer.HFTokenizer(str(tok_dirs[kind]), context_length=77)
    got = ours(TEXTS)
    assert torch.equal(got, theirs(TEXTS)) and got.shape == (len(TEXTS), 77)
    assert ours.pad_token_id == 1 and (got[0] == 1).sum() > 60 and got[5, -1] == 2  # long text: cut, eos kept
    assert got.max() < VOCAB


# ---------------------------------------------------------------- the built-in configs
def _hf_dir(root: Path, values: dict) -> Path:
    """A directory with the transformers config.json of ``values`` (what open_clip's AutoConfig reads)."""
    values = dict(values)
    HF_CONFIGS[values.pop("model_type")](**values).save_pretrained(root)
    return root


@pytest.mark.parametrize("name", NAMES)
def test_config_builds_open_clips_model(name, tmp_path):
    """Same JSON as open_clip; with open_clip's HFTextEncoder built from the HF_TEXT_MODELS values, the same
    parameter names and shapes (both on the meta device), width, vocabulary and pad id."""
    raw = json.loads((Path(fastclip.__file__).parent / "models" / "configs" / f"{name}.json").read_text())
    assert raw == open_clip.get_model_config(name)
    cfg = fastclip.get_model_config(name)
    text = raw["text_cfg"]
    assert (cfg.text.type, cfg.text.hf_model_name, cfg.text.hf_tokenizer_name) == (
        "hf", text["hf_model_name"], text["hf_tokenizer_name"])
    assert (cfg.text.pool_type, cfg.text.proj_type, cfg.text.context_length, cfg.tokenizer) == ("mean", "mlp", 77, "hf")
    oc_raw = copy.deepcopy(raw)
    oc_raw["text_cfg"]["hf_model_name"] = str(_hf_dir(tmp_path, bert.HF_TEXT_MODELS[text["hf_model_name"]]))
    oc_raw["text_cfg"]["hf_model_pretrained"] = False
    with torch.device("meta"):
        theirs = open_clip.CustomTextCLIP(**oc_raw)
        ours = CLIP(cfg, backend="ref")
    mapped = {k: tuple(v.shape) for k, v in keymaps.from_openclip(theirs.state_dict()).items()}
    assert mapped == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    hf = theirs.text.config
    assert (hf.pad_token_id, hf.vocab_size, hf.model_type) == (cfg.text.pad_token_id, cfg.text.vocab_size,
                                                               cfg.text.model_type)


def test_pretrained_tags_are_open_clips():
    ours = sorted(p for p in fastclip.list_pretrained() if p[0] in NAMES)
    assert ours == sorted(p for p in open_clip.list_pretrained() if p[0] in NAMES) and len(ours) == 3
    for name, tag in ours:
        theirs, entry = open_clip.get_pretrained_cfg(name, tag), hub.pretrained_entry(name, tag)
        assert entry["hf_hub"] == theirs["hf_hub"].rstrip("/") and entry["format"] == "openclip"
        assert not entry.get("quick_gelu") and not theirs.get("quick_gelu")
        pre = entry["preprocess"]
        assert (tuple(pre["mean"]), tuple(pre["std"]), pre["interpolation"], pre["resize_mode"]) == (
            theirs["mean"], theirs["std"], theirs["interpolation"], theirs["resize_mode"])


def test_pretrained_tag_resolves_through_the_hub_cache(offline_hub, tmp_path):
    """load(name, pretrained=tag) reads the tag's open_clip repo from the hub cache: a stand-in file there is
    read as open_clip's HF-text layout (and refused, naming the mis-shaped key); an empty cache names the repo."""
    name, tag = "xlm-roberta-base-ViT-B-32", "laion5b_s13b_b90k"
    repo = hub.pretrained_entry(name, tag)["hf_hub"]
    with pytest.raises(fastclip.FastclipError, match=repo):
        fastclip.load(name, pretrained=tag)
    small = {"visual.conv1.weight": torch.zeros(4, 3, 32, 32),
             "text.transformer.embeddings.word_embeddings.weight": torch.zeros(8, 4)}
    put_in_hub_cache(offline_hub, repo, {"open_clip_model.safetensors": save_state_dict(
        small, tmp_path / "stand_in.safetensors", "safetensors")})
    with pytest.raises(fastclip.CheckpointError) as info:
        fastclip.load(name, pretrained=tag)
    message = str(info.value)
    assert "open_clip_model.safetensors" in message and "missing keys: log_logit_scale, text." in message
    assert "text.transformer.embeddings.word_embeddings.weight: checkpoint (8, 4) vs model (250002, 768)" in message


def test_get_tokenizer_of_a_name_reads_its_hf_tokenizer_repo(offline_hub, tok_dirs):
    put_in_hub_cache(offline_hub, "xlm-roberta-base", {f.name: f for f in tok_dirs["xlmr"].iterdir()})
    tok = fastclip.get_tokenizer("xlm-roberta-base-ViT-B-32")
    assert isinstance(tok, HFTokenizer) and (tok.context_length, tok.clean, tok.pad_token_id) == (77, "whitespace", 1)
    assert torch.equal(tok(TEXTS), open_clip.tokenizer.HFTokenizer(str(tok_dirs["xlmr"]), context_length=77)(TEXTS))


# ---------------------------------------------------------------- tiny models vs open_clip
def _tiny_raw(name: str) -> dict:
    """fastclip's config of a tiny model: open_clip's text_cfg keys plus ``hf_model_config``."""
    values, text, _, kind = TINY[name]
    text_cfg = dict(text, hf_model_name=f"tiny/{name}", hf_model_config=values)
    if kind is not None:
        text_cfg["hf_tokenizer_name"] = f"tiny/{name}-tokenizer"
    return {"embed_dim": EMBED, "vision_cfg": VISION, "text_cfg": text_cfg}


@pytest.fixture(scope="module")
def tiny_configs(tmp_path_factory) -> Path:
    return register_configs(tmp_path_factory, "hf_text_tiny", {n: _tiny_raw(n) for n in TINY})


def _tokens(name: str, batch: int) -> torch.Tensor:
    """(B, 77): bos, random ids, eos, then padding, with ROW_LENGTHS[batch] tokens per row."""
    bos, eos, pad = TINY[name][2]
    gen = torch.Generator().manual_seed(batch)
    out = torch.full((batch, 77), pad, dtype=torch.long)
    for row, n in enumerate(ROW_LENGTHS[batch]):
        out[row, :n] = torch.randint(5, VOCAB, (n,), generator=gen)
        out[row, 0], out[row, n - 1] = bos, eos
    return out


@pytest.fixture(scope="module")
def tiny_upstream(tiny_configs, tmp_path_factory) -> dict[str, Upstream]:
    """open_clip CustomTextCLIPs of the tiny configs (HFTextEncoder from a saved transformers config), perturbed."""
    ups = {}
    for seed, (name, (values, text, _, _)) in enumerate(TINY.items()):
        hf_dir = _hf_dir(tmp_path_factory.mktemp(name), values)
        torch.manual_seed(seed)
        model = open_clip.CustomTextCLIP(EMBED, VISION, dict(text, hf_model_name=str(hf_dir), hf_model_pretrained=False))
        ups[name] = Upstream(f"open_clip {name}", perturb_(model, seed), "open_clip", VISION["image_size"],
                             lambda b, n=name: _tokens(n, b))
    return ups


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(TINY))
def test_tiny_parity(tiny_upstream, name, backend):
    up = tiny_upstream[name]
    model = fastclip_from_openclip(name, up.model.state_dict(), backend=backend)
    assert model.backend == backend and model.cfg.text.type == "hf"
    for batch in (1, 3, 5):
        assert_matches(model, up, batch, f"{name} ({backend})", "hftext")
    tokens = up.inputs(5)[1]
    assert model.text.run_lengths(tokens).tolist() == ROW_LENGTHS[5]
    model.text.trim_last_block = False  # "first" pooling: the last layer on every token gives the same numbers
    with torch.no_grad():
        untrimmed = model.encode_text(tokens)
        model.text.trim_last_block = True
        torch.testing.assert_close(model.encode_text(tokens), untrimmed, rtol=SAME_MODEL_RTOL, atol=SAME_MODEL_ATOL)


@pytest.mark.parametrize("name", list(TINY))
def test_padding_changes_the_result(tiny_upstream, name):
    """The padded rows' embeddings (open_clip's) differ from what the same ids give with padding attended to
    and pooled: the parity above would catch a missing mask."""
    up = tiny_upstream[name]
    tokens = up.inputs(5)[1]
    with torch.no_grad():
        masked = up.model.encode_text(tokens)
        ones = torch.ones_like(tokens)
        out = up.model.text.transformer(input_ids=tokens, attention_mask=ones)
        unmasked = up.model.text.proj(up.model.text.pooler(out, ones))
    assert (masked[1:] - unmasked[1:]).abs().amax(dim=1).min() > 1e-3


# ---------------------------------------------------------------- checkpoint files, hub directories, embed_texts
def _open_clip_embeddings(up: Upstream, tok_dir: Path, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return up.model.encode_text(open_clip.tokenizer.HFTokenizer(str(tok_dir), context_length=77)(texts),
                                    normalize=True)


@pytest.mark.parametrize("name", ["tiny-hf-xlmr", "tiny-hf-roberta"])
def test_state_dict_file_and_embed_texts(tiny_upstream, tok_dirs, offline_hub, tmp_path, name):
    """fastclip.load(name, pretrained=file) of open_clip's state dict (with the position_ids buffer older
    transformers saved); the tokenizer from the config's hf_tokenizer_name repo (hub cache); embed_texts equal
    to open_clip's tokenizer + encode_text."""
    up, kind = tiny_upstream[name], TINY[name][3]
    cfg = fastclip.get_model_config(name)
    put_in_hub_cache(offline_hub, cfg.text.hf_tokenizer_name, {f.name: f for f in tok_dirs[kind].iterdir()})
    sd = dict(up.model.state_dict())
    sd["text.transformer.embeddings.position_ids"] = torch.arange(80)[None]
    for fmt in ("safetensors", "bin"):
        model = fastclip.load(name, pretrained=save_state_dict(sd, tmp_path / f"w.{fmt}", fmt), backend="cpu")
        assert isinstance(model.tokenizer, HFTokenizer) and model.tokenizer.pad_token_id == 1
        assert_matches(model, up, 5, f"{name} from .{fmt}", "hftext")
        got = torch.from_numpy(model.embed_texts(TEXTS, batch_size=3))
        err = (got - _open_clip_embeddings(up, tok_dirs[kind], TEXTS)).abs().max().item()
        assert err <= UPSTREAM_ATOL, f"embed_texts max-abs {err:.2e}"


def test_openclip_hub_directory(tiny_upstream, tok_dirs, offline_hub, tmp_path):
    """fastclip.load(dir) of an open_clip hub directory (open_clip_config.json + open_clip_model.safetensors)
    with the tokenizer files beside them: the tokenizer is the directory's (the hub is not asked)."""
    name = "tiny-hf-xlmr"
    up = tiny_upstream[name]
    directory = tmp_path / "repo"
    directory.mkdir()
    meta = {"model_cfg": _tiny_raw(name), "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    (directory / "open_clip_config.json").write_text(json.dumps(meta))
    save_state_dict(up.model.state_dict(), directory / "open_clip_model.safetensors", "safetensors")
    for f in tok_dirs["xlmr"].iterdir():
        (directory / f.name).write_bytes(f.read_bytes())
    model = fastclip.load(directory)
    assert isinstance(model.tokenizer, HFTokenizer) and model.tokenizer.pad_token_id == 1
    assert torch.equal(model.tokenizer(TEXTS), open_clip.tokenizer.HFTokenizer(str(directory))(TEXTS))
    assert_matches(model, up, 5, "open_clip hub directory (tiny XLM-R)", "hftext")
    got = torch.from_numpy(model.embed_texts(TEXTS))
    assert (got - _open_clip_embeddings(up, directory, TEXTS)).abs().max().item() <= UPSTREAM_ATOL


def test_missing_key_is_named(tiny_upstream, tmp_path):
    sd = dict(tiny_upstream["tiny-hf-roberta"].model.state_dict())
    del sd["text.transformer.encoder.layer.1.attention.self.key.bias"]
    path = save_state_dict(sd, tmp_path / "w.safetensors", "safetensors")
    with pytest.raises(fastclip.CheckpointError, match=r"missing keys: text\.transformer\.encoder\.layer\.1\."
                                                       r"attention\.self\.key\.bias"):
        fastclip.load("tiny-hf-roberta", pretrained=path)


@pytest.mark.parametrize("name", ["tiny-hf-xlmr", "tiny-hf-bert-first"])
def test_int8_is_close_to_fp32(tiny_upstream, offline_hub, tmp_path, name):
    path = save_state_dict(tiny_upstream[name].model.state_dict(), tmp_path / "w.safetensors", "safetensors")
    fp32 = fastclip.load(name, pretrained=path, backend="cpu")
    int8 = fastclip.load(name, pretrained=path, precision="int8", backend="cpu")
    layers = quant.int8_layer_names(int8)
    for leaf in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense"):
        assert f"text.transformer.encoder.layer.2.{leaf}.weight" in layers
    tokens = tiny_upstream[name].inputs(5)[1]
    with torch.no_grad():
        cos = F.cosine_similarity(int8.encode_text(tokens), fp32.encode_text(tokens))
    assert cos.min().item() >= 0.99, cos


# ---------------------------------------------------------------- errors
def _with(change: dict, drop: tuple = ()) -> dict:
    raw = copy.deepcopy(open_clip.get_model_config("xlm-roberta-base-ViT-B-32"))
    raw["text_cfg"].update(change)
    for key in drop:
        raw["text_cfg"].pop(key)
    return raw


@pytest.mark.parametrize("raw, needle", [
    (_with({"hf_model_name": "someone/bert-xl"}), "'someone/bert-xl' is not a model fastclip knows"),
    (_with({"hf_pooler_type": "cls_pooler"}), "hf_pooler_type 'cls_pooler' is not supported"),
    (_with({"hf_pooler_type": "max_pooler"}), "hf_pooler_type 'max_pooler' is not supported"),
    (_with({"hf_proj_type": "conv"}), "hf_proj_type 'conv' is not one of"),
    (_with({"context_length": 600}), "context_length 600 is not in 1..512"),
    (_with({"hf_model_config": {"model_type": "gpt2"}}), "model_type 'gpt2' is not one of"),
    (_with({"hf_model_config": {"model_type": "bert", "hidden_act": "relu"}}), "hidden_act 'relu'"),
    (_with({"hf_model_config": {"model_type": "bert", "position_embedding_type": "relative_key"}}),
     "position_embedding_type 'relative_key'"),
    (_with({"hf_model_config": {"model_type": "bert", "hidden_size": 100}}), "width 100 is not a multiple of heads 12"),
    (_with({"tokenizer_kwargs": {"clean": "shout"}}), "clean 'shout'"),
])
def test_bad_configs_are_refused(raw, needle):
    with pytest.raises(ValueError, match="'bad-hf'") as info:
        parse_config("bad-hf", raw)
    assert needle in str(info.value)
    if "fastclip knows" in needle:
        assert "text_cfg.hf_model_config" in str(info.value)


def test_legacy_text_cfg_names_parse_alike():
    """open_clip's first HF-text configs spelled hf_pooler_type / hf_proj_type "pooler_type" / "proj"."""
    legacy = _with({"pooler_type": "cls_last_hidden_state_pooler", "proj": "linear", "vocab_size": 1},
                   drop=("hf_pooler_type",))
    cfg = parse_config("legacy", legacy).text
    assert (cfg.pool_type, cfg.proj_type, cfg.vocab_size) == ("first", "linear", 250002)


def test_no_projection_needs_width_equal_to_embed_dim():
    cfg = parse_config("odd", _with({"hf_proj_type": None}))
    assert cfg.text.proj_type == "none"
    with pytest.raises(ValueError, match="width == embed_dim, got 768 and 512"):
        CLIP(cfg)


def test_bad_token_ids_are_refused(tiny_upstream):
    model = fastclip_from_openclip("tiny-hf-xlmr", tiny_upstream["tiny-hf-xlmr"].model.state_dict())
    good = _tokens("tiny-hf-xlmr", 3)
    cases = [
        (good.clone().index_put_((torch.tensor([1]), torch.tensor([2])), torch.tensor(VOCAB)), rf"\[0, {VOCAB}\)"),
        (good - 5, rf"\[0, {VOCAB}\)"),
        (good.float(), "integer token ids"),
        (good[0], "of shape \\(B, L\\)"),
        (torch.zeros(1, 80, dtype=torch.long), "exceeds the 78 positions"),
        (torch.cat([good[:1], torch.ones(1, 77, dtype=torch.long)]), r"token rows \[1\] hold only padding"),
    ]
    for tokens, needle in cases:
        with pytest.raises(ValueError, match=needle), torch.no_grad():
            model.encode_text(tokens)
    with torch.no_grad():
        assert model.encode_text(good[:0]).shape == (0, EMBED)
