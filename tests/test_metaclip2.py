"""MetaCLIP 2 worldwide models (open_clip's ``ViT-*-worldwide*``, transformers' ``MetaClip2Model``).

* the seven configs build open_clip's architecture (shapes of every parameter, pooling rule, eos id,
  tokenizer settings) and their pretrained tags resolve through the hub code (offline hub cache);
* ``fastclip.tokenizer.HFTokenizer`` equals open_clip's ``HFTokenizer`` (and transformers' tokenizer) on
  XLM-V-style (``XLMRobertaTokenizer``: ``<s> ... </s>``, pad 1, eos 2) and mT5-style (``T5Tokenizer``:
  ``... </s>``, pad 0, eos 1) directories built here from a sentencepiece model trained on a small
  multilingual corpus, saved by transformers as a hub repo holds them;
* tiny worldwide configs (shrunk copies) in open_clip with perturbed random weights, loaded by fastclip
  from open_clip state dicts: image and text embeddings within UPSTREAM_ATOL, on the ref and cpu
  backends, with rows where the first eos is not the last one (eos twice, eos then padding);
* a tiny random ``MetaClip2Model`` saved with save_pretrained (with tokenizer files) against
  transformers' get_text_features / get_image_features.
"""
from __future__ import annotations

import copy
import io
import json
import random
import shutil
from pathlib import Path

import open_clip
import pytest
import safetensors.torch
import sentencepiece as spm
import torch
import transformers

import fastclip
from fastclip import CheckpointError, FastclipError
from fastclip.data.tokenizers import MissingTokenizerError
from fastclip.loading import hub, keymaps
from fastclip.models.clip import CLIP
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

WORLDWIDE = ["ViT-L-14-worldwide", "ViT-L-14-worldwide-quickgelu", "ViT-H-14-worldwide", "ViT-H-14-worldwide-quickgelu",
             "ViT-H-14-worldwide-378", "ViT-bigG-14-worldwide", "ViT-bigG-14-worldwide-378"]
# (tiny name, worldwide config it shrinks, tokenizer kind)
TINY = {"tiny-worldwide-xlmv": ("ViT-H-14-worldwide", "xlmv"),
        "tiny-worldwide-mt5-quickgelu": ("ViT-L-14-worldwide-quickgelu", "mt5")}
TINY_VOCAB = 256  # above the test tokenizers' ~170 ids
BACKENDS = ["ref", "cpu"]

_BASE = ["a photo of a cat", "un chat noir sur le canapé", "café crème à Paris", "naïve façade über straße",
         "一只猫在沙发上睡觉", "我喜欢吃苹果和香蕉", "القطة تنام على الأريكة", "صورة لكلب في الحديقة",
         "बिल्ली सोफे पर सो रही है", "एक कुत्ते की तस्वीर", "😀 emoji 🐱 🐶 🎉", "Ελληνικά κείμενο γάτα",
         "кошка спит на диване"]
TEXTS = ["a photo of a cat", "  Un CHAT   noir!! sur le_canapé. ", "一只猫在沙发上睡觉", "القطة تنام على الأريكة",
         "बिल्ली सोफे पर सो रही है", "😀 🐱🎉 emoji", "Tom &amp; Jerry", "cafÃ© ﬁsh Ｆｕｌｌ", "", "   ",
         "a cat </s> a dog", "<s>x</s>", "ÀÉÎÕÜ àéîõü ñ ç", "snake_case, dots... and “quotes”",
         " ".join(_BASE) * 3]  # the last one is cut at every context length used here
EMBED_TEXTS = [t for t in TEXTS if t.strip()]  # embed_texts refuses empty texts


# ---------------------------------------------------------------- tokenizer directories
def _spm_model(**ids) -> bytes:
    """A unigram sentencepiece model (nmt_nfkc normalisation, as XLM-V / mT5) of a small multilingual corpus."""
    rng = random.Random(0)
    lines = []
    for _ in range(3000):
        words = rng.choice(_BASE).split()
        rng.shuffle(words)
        lines.append(" ".join(words[: rng.randint(1, len(words))]))
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=160,
                                   hard_vocab_limit=False, model_type="unigram", character_coverage=1.0,
                                   num_threads=1, minloglevel=2, **ids)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory) -> dict[str, Path]:
    """{"xlmv": XLMRobertaTokenizer dir, "mt5": T5Tokenizer dir}, each converted by transformers from a
    sentencepiece file and written with save_pretrained (tokenizer.json + tokenizer_config.json)."""
    root = tmp_path_factory.mktemp("mc2_tokenizers")
    (root / "xlmv_src").mkdir()
    (root / "xlmv_src" / "sentencepiece.bpe.model").write_bytes(_spm_model())
    transformers.XLMRobertaTokenizer.from_pretrained(root / "xlmv_src").save_pretrained(root / "xlmv")
    (root / "mt5_src").mkdir()
    (root / "mt5_src" / "spiece.model").write_bytes(_spm_model(pad_id=0, eos_id=1, unk_id=2, bos_id=-1))
    transformers.T5Tokenizer.from_pretrained(root / "mt5_src", extra_ids=0).save_pretrained(root / "mt5")
    dirs = {"xlmv": root / "xlmv", "mt5": root / "mt5"}
    for kind in ("xlmv", "mt5"):  # the file's own pipeline other than the class's: transformers 5 rebuilds it
        dirs[f"{kind}_own_pipeline"] = out = root / f"{kind}_own_pipeline"
        shutil.copytree(dirs[kind], out)
        spec = json.loads((out / "tokenizer.json").read_text())
        charsmap = spec["normalizer"]["precompiled_charsmap"]
        spec["normalizer"] = {"type": "Sequence", "normalizers": [
            {"type": "Precompiled", "precompiled_charsmap": charsmap},
            {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]}
        spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
        (out / "tokenizer.json").write_text(json.dumps(spec))
    # sentencepiece files alone (as google/mt5-base holds), the class named by config.json's model_type
    for kind, src, model_type, extra in (("xlmv", "xlmv_src", "xlm-roberta", None), ("mt5", "mt5_src", "mt5", None),
                                         ("mt5", "mt5_src", "mt5", 0)):
        dirs[f"{kind}_spm_only" + ("" if extra is None else f"_extra{extra}")] = out = root / f"{src}_{extra}"
        shutil.copytree(root / src, out)
        (out / "config.json").write_text(json.dumps({"model_type": model_type}))
        if extra is not None:
            (out / "tokenizer_config.json").write_text(json.dumps({"extra_ids": extra}))
    return dirs


# ---------------------------------------------------------------- configs and pretrained tags
@pytest.mark.parametrize("name", WORLDWIDE)
def test_config_builds_open_clips_model(name):
    """Same JSON as open_clip; every parameter shape, the pooling rule, eos id and tokenizer settings agree
    (both models built on the meta device)."""
    assert name in fastclip.list_models()
    raw = json.loads((Path(fastclip.__file__).parent / "models" / "configs" / f"{name}.json").read_text())
    assert raw == open_clip.get_model_config(name)
    cfg = fastclip.get_model_config(name)
    with torch.device("meta"):
        oc = open_clip.create_model(name, device="meta")
        ours = CLIP(cfg, backend="ref")
    theirs = {k: tuple(v.shape) for k, v in keymaps.from_openclip(oc.state_dict()).items()}
    assert theirs == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    text = raw["text_cfg"]
    assert (cfg.text.pool_type, cfg.text.eos_token_id) == (oc.text_pool_type, oc.text_eos_id) == ("eos", text["eos_id"])
    assert cfg.text.hf_tokenizer_name == text["hf_tokenizer_name"]
    assert cfg.text.tokenizer_clean == text.get("tokenizer_kwargs", {}).get("clean", "whitespace")
    assert cfg.text.act == cfg.vision.act == ("quick_gelu" if raw.get("quick_gelu") else "gelu")


@pytest.mark.parametrize("change, needle", [
    ({"tokenizer_kwargs": {"clean": "shout"}}, "clean 'shout'"),
    ({"tokenizer_kwargs": {"clean": "whitespace", "strip_sep_token": True}}, "strip_sep_token"),
    ({"tokenizer_mode": "clips"}, "tokenizer_mode 'clips'"),
    ({"hf_tokenizer_name": None}, "needs text_cfg.hf_tokenizer_name"),
    ({"eos_id": None}, "needs text_cfg.eos_token_id"),
])
def test_bad_text_tokenizer_settings_are_refused(change, needle):
    raw = copy.deepcopy(open_clip.get_model_config("ViT-L-14-worldwide"))
    raw["text_cfg"].update(change)
    with pytest.raises(ValueError, match="bad-worldwide") as info:
        fastclip.models.config.parse_config("bad-worldwide", raw)
    assert needle in str(info.value)


def test_pretrained_tags_are_open_clips():
    ours = sorted(p for p in fastclip.list_pretrained() if "worldwide" in p[0])
    assert ours == sorted(p for p in open_clip.list_pretrained() if "worldwide" in p[0]) and len(ours) == 5
    for name, tag in ours:
        theirs, entry = open_clip.get_pretrained_cfg(name, tag), hub.pretrained_entry(name, tag)
        assert entry["hf_hub"] == theirs["hf_hub"].rstrip("/") and entry["format"] == "openclip"
        assert entry.get("quick_gelu", False) == theirs.get("quick_gelu", False)
        pre = entry["preprocess"]
        assert (tuple(pre["mean"]), tuple(pre["std"]), pre["interpolation"], pre["resize_mode"]) == (
            theirs["mean"], theirs["std"], theirs["interpolation"], theirs["resize_mode"])


def test_pretrained_tag_resolves_through_the_hub_cache(offline_hub, tmp_path, tok_dirs):
    """load(name, pretrained=tag) reads the tag's repo from the hub cache: a stand-in file there is reached
    (and refused, naming the cached file and the mis-shaped key); an empty cache says which repo to fetch."""
    name, tag = "ViT-H-14-worldwide", "metaclip2_worldwide"
    repo = hub.pretrained_entry(name, tag)["hf_hub"]
    with pytest.raises(FastclipError, match=repo):
        fastclip.load(name, pretrained=tag)
    small = {"visual.conv1.weight": torch.zeros(4, 3, 14, 14), "token_embedding.weight": torch.zeros(8, 4)}
    put_in_hub_cache(offline_hub, repo, {"open_clip_model.safetensors": save_state_dict(
        small, tmp_path / "stand_in.safetensors", "safetensors")})
    with pytest.raises(CheckpointError) as info:
        fastclip.load(name, pretrained=tag)
    message = str(info.value)
    assert f"models--{repo.replace('/', '--')}" in message and "open_clip_model.safetensors" in message
    assert "text.token_embedding.weight: checkpoint (8, 4) vs model (901629, 1024)" in message


@pytest.mark.parametrize("name, kind", [("ViT-H-14-worldwide", "xlmv"), ("ViT-L-14-worldwide", "mt5")])
def test_get_tokenizer_of_a_name_reads_its_hf_tokenizer_repo(offline_hub, tok_dirs, name, kind):
    repo = open_clip.get_model_config(name)["text_cfg"]["hf_tokenizer_name"]
    put_in_hub_cache(offline_hub, repo, {f.name: f for f in tok_dirs[kind].iterdir()})
    tok = fastclip.get_tokenizer(name)
    assert isinstance(tok, HFTokenizer) and tok.context_length == 77
    clean = fastclip.get_model_config(name).text.tokenizer_clean
    expected = open_clip.tokenizer.HFTokenizer(str(tok_dirs[kind]), context_length=77, clean=clean)(TEXTS)
    assert torch.equal(tok(TEXTS), expected)


# ---------------------------------------------------------------- the tokenizer
KINDS = ["xlmv", "mt5", "xlmv_own_pipeline", "mt5_own_pipeline", "xlmv_spm_only", "mt5_spm_only", "mt5_spm_only_extra0"]
SPECIAL_TEXTS = ["<extra_id_0> x", "<mask> y <unk>", "<pad>", "x<s>"]  # special-token strings of either class


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("clean", ["whitespace", "lower", "canonicalize"])
@pytest.mark.parametrize("length", [77, 8])
def test_hf_tokenizer_equals_open_clip(tok_dirs, kind, clean, length):
    texts = TEXTS + SPECIAL_TEXTS
    ours = HFTokenizer(tok_dirs[kind], context_length=length, clean=clean)
    theirs = open_clip.tokenizer.HFTokenizer(str(tok_dirs[kind]), context_length=length, clean=clean)
    got, expected = ours(texts), theirs(texts)
    bad = [(t, g.tolist(), e.tolist()) for t, g, e in zip(texts, got, expected, strict=True) if not torch.equal(g, e)]
    assert not bad, f"{len(bad)} of {len(texts)} texts differ, e.g. {bad[0]}"
    assert got.shape == (len(texts), length) and got.dtype == torch.long


@pytest.mark.parametrize("kind", KINDS)
def test_hf_tokenizer_layout_and_truncation_keep_eos(tok_dirs, kind):
    """[bos] ids eos pad...; a text too long is cut with its eos kept last; the empty text is [bos] eos."""
    bos, eos, pad = (0, 2, 1) if kind.startswith("xlmv") else (None, 1, 0)
    tok = HFTokenizer(tok_dirs[kind], context_length=12)
    assert (tok.eos_token_id, tok.pad_token_id) == (eos, pad)
    ids = tok(TEXTS)
    head = [] if bos is None else [bos]
    assert ids[TEXTS.index("")].tolist() == head + [eos] + [pad] * (11 - len(head))
    long = ids[-1].tolist()
    assert long[-1] == eos and eos not in long[:-1] and pad not in long and long[: len(head)] == head
    twice = ids[TEXTS.index("a cat </s> a dog")].tolist()  # the literal eos string is the eos token
    assert twice.count(eos) == 2
    hf = transformers.AutoTokenizer.from_pretrained(tok_dirs[kind])
    texts = TEXTS + SPECIAL_TEXTS
    expected = hf(texts, max_length=12, padding="max_length", truncation=True, return_tensors="pt").input_ids
    assert torch.equal(HFTokenizer(tok_dirs[kind], context_length=12, clean="none")(texts), expected)


def test_hf_tokenizer_errors(tok_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        HFTokenizer(tmp_path)
    with pytest.raises(ValueError, match="clean must be one of"):
        HFTokenizer(tok_dirs["xlmv"], clean="shout")
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str"):
        HFTokenizer(tok_dirs["xlmv"])(["ok", 3])


# ---------------------------------------------------------------- tiny worldwide models vs open_clip
def _tiny_config(base: str) -> dict:
    raw = copy.deepcopy(open_clip.get_model_config(base))
    raw.update(embed_dim=48)
    raw["vision_cfg"].update(image_size=56, layers=2, width=96, head_width=32)
    raw["text_cfg"].update(vocab_size=TINY_VOCAB, width=64, heads=4, layers=3)
    return raw


@pytest.fixture(scope="module")
def tiny_configs(tmp_path_factory) -> Path:
    folder = register_configs(tmp_path_factory, "mc2_tiny", {n: _tiny_config(b) for n, (b, _) in TINY.items()})
    open_clip.add_model_config(folder)
    return folder


def _tokens(batch: int, kind: str, length: int = 77, seed: int = 0) -> torch.Tensor:
    """(B, L) ids in the tokenizer's layout; row 0 holds eos twice (text between them, padding after the
    second), the others eos at the last position / early with padding after it."""
    bos, eos, pad, lo = (0, 2, 1, 4) if kind == "xlmv" else (None, 1, 0, 3)
    gen = torch.Generator().manual_seed(seed)
    out = torch.full((batch, length), pad, dtype=torch.long)
    ends = [9, length - 1, 3, 40, 17, 1, 60][:batch]
    for row, end in enumerate(ends):
        out[row, :end] = torch.randint(lo, TINY_VOCAB, (end,), generator=gen)
        if bos is not None:
            out[row, 0] = bos
        out[row, end] = eos
    out[0, 10:30] = torch.randint(lo, TINY_VOCAB, (20,), generator=gen)
    out[0, 30] = eos
    return out


@pytest.fixture(scope="module")
def tiny_upstream(tiny_configs) -> dict[str, Upstream]:
    ups = {}
    for seed, (name, (_, kind)) in enumerate(TINY.items()):
        torch.manual_seed(seed)
        model = perturb_(open_clip.create_model(name), seed)
        ups[name] = Upstream(f"open_clip {name}", model, "open_clip", 56, lambda b, k=kind: _tokens(b, k, seed=b))
    return ups


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(TINY))
def test_tiny_worldwide_parity(tiny_upstream, name, backend):
    up = tiny_upstream[name]
    tokens = up.inputs(5)[1]
    first_eos = (tokens == fastclip.get_model_config(name).text.eos_token_id).int().argmax(-1)
    assert (first_eos != tokens.argmax(-1)).any(), "argmax pooling would pool these rows at the same place"
    model = fastclip_from_openclip(name, up.model.state_dict(), backend=backend)
    assert model.backend == backend
    for batch in (1, 5):
        assert_matches(model, up, batch, f"{name} ({backend})", "mc2")
    model.text.trim_last_block = False  # the last block on every token: the same numbers
    with torch.no_grad():
        untrimmed = model.encode_text(tokens)
        model.text.trim_last_block = True
        torch.testing.assert_close(model.encode_text(tokens), untrimmed, rtol=SAME_MODEL_RTOL, atol=SAME_MODEL_ATOL)


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_worldwide_checkpoint_and_embed_texts(tiny_upstream, tok_dirs, offline_hub, tmp_path, name):
    """fastclip.load(name, pretrained=file) of an open_clip state dict takes the tokenizer from the config's
    hf_tokenizer_name repo (hub cache); embed_texts (texts grouped by length) equals open_clip's
    encode_text of open_clip's tokenization."""
    up, kind = tiny_upstream[name], TINY[name][1]
    cfg = fastclip.get_model_config(name)
    put_in_hub_cache(offline_hub, cfg.text.hf_tokenizer_name, {f.name: f for f in tok_dirs[kind].iterdir()})
    path = save_state_dict(up.model.state_dict(), tmp_path / f"{name}.safetensors", "safetensors")
    model = fastclip.load(name, pretrained=path)
    assert isinstance(model.tokenizer, HFTokenizer) and model.tokenizer.clean == cfg.text.tokenizer_clean
    oc_tok = open_clip.tokenizer.HFTokenizer(str(tok_dirs[kind]), context_length=77, clean=cfg.text.tokenizer_clean)
    with torch.no_grad():
        expected = up.model.encode_text(oc_tok(EMBED_TEXTS), normalize=True)
    got = torch.from_numpy(model.embed_texts(EMBED_TEXTS, batch_size=4))
    assert (got - expected).abs().max().item() <= UPSTREAM_ATOL


def test_tiny_worldwide_openclip_hub_repo(tiny_upstream, tok_dirs, offline_hub, tmp_path):
    """hf-hub: an OpenCLIP repo (open_clip_config.json + weights) of a worldwide config: its text_cfg's
    hf_tokenizer_name repo gives the tokenizer (clean "canonicalize" for the mT5 config)."""
    name = "tiny-worldwide-mt5-quickgelu"
    up = tiny_upstream[name]
    weights = save_state_dict(up.model.state_dict(), tmp_path / "w.safetensors", "safetensors")
    meta = {"model_cfg": _tiny_config(TINY[name][0]), "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    put_in_hub_cache(offline_hub, "someone/tiny-worldwide", {
        "open_clip_config.json": json.dumps(meta).encode(), "open_clip_model.safetensors": weights})
    put_in_hub_cache(offline_hub, "google/mt5-base", {f.name: f for f in tok_dirs["mt5_spm_only"].iterdir()})
    model = fastclip.load("hf-hub:someone/tiny-worldwide")
    assert isinstance(model.tokenizer, HFTokenizer) and model.tokenizer.clean == "canonicalize"
    assert model.cfg.text.pool_type == "eos" and model.cfg.text.eos_token_id == 1
    assert_matches(model, up, 5, "hf-hub: OpenCLIP repo (tiny worldwide mT5)", "mc2")
    oc_tok = open_clip.tokenizer.HFTokenizer(str(tok_dirs["mt5_spm_only"]), context_length=77, clean="canonicalize")
    assert torch.equal(model.tokenizer(TEXTS), oc_tok(TEXTS))


def test_tiny_worldwide_without_cached_tokenizer_loads_and_says_why(tiny_upstream, offline_hub, tmp_path):
    name = "tiny-worldwide-xlmv"
    path = save_state_dict(tiny_upstream[name].model.state_dict(), tmp_path / "w.safetensors", "safetensors")
    model = fastclip.load(name, pretrained=path)
    assert model.tokenizer is None and "facebook/xlm-v-base" in model.tokenizer_missing
    with pytest.raises(MissingTokenizerError, match="facebook/xlm-v-base"):
        model.embed_texts(["a cat"])


# ---------------------------------------------------------------- transformers MetaClip2Model directories
@pytest.fixture(scope="module")
def hf_metaclip2(tok_dirs, tmp_path_factory):
    """(Upstream, directory): a tiny random MetaClip2Model (XLM-V ids: bos 0, pad 1, eos 2), perturbed, saved
    with save_pretrained next to its tokenizer files and a CLIPImageProcessor config."""
    config = transformers.MetaClip2Config(
        projection_dim=48,
        text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=77, vocab_size=TINY_VOCAB, hidden_act="gelu",
                         bos_token_id=0, pad_token_id=1, eos_token_id=2),
        vision_config=dict(hidden_size=80, intermediate_size=160, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16, hidden_act="quick_gelu"))
    torch.manual_seed(5)
    model = perturb_(transformers.MetaClip2Model(config), seed=5)
    directory = tmp_path_factory.mktemp("hf_metaclip2")
    model.save_pretrained(directory)
    for f in tok_dirs["xlmv_own_pipeline"].iterdir():  # a tokenizer.json whose pipeline transformers 5 rebuilds
        shutil.copy(f, directory / f.name)
    transformers.CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(
        directory)
    return Upstream("transformers MetaClip2Model (small)", model, "hf", 64, lambda b: _tokens(b, "xlmv", seed=b)), directory


@pytest.mark.parametrize("backend", BACKENDS)
def test_hf_metaclip2_dir_parity(hf_metaclip2, backend):
    up, directory = hf_metaclip2
    model = fastclip.load(directory, backend=backend)
    assert model.backend == backend and model.cfg.text.pool_type == "eos" and model.cfg.text.eos_token_id == 2
    for batch in (1, 5):
        assert_matches(model, up, batch, f"MetaClip2Model dir ({backend})", "mc2")
    hf_tok = transformers.AutoTokenizer.from_pretrained(directory)
    tokens = hf_tok(TEXTS, max_length=77, padding="max_length", truncation=True, return_tensors="pt").input_ids
    assert torch.equal(model.tokenizer(TEXTS), tokens)
    assert torch.equal(fastclip.get_tokenizer(directory)(TEXTS), tokens)
    with torch.no_grad():
        keep = [i for i, t in enumerate(TEXTS) if t.strip()]
        expected = up.model.get_text_features(input_ids=tokens[keep])
        expected = expected if isinstance(expected, torch.Tensor) else expected.pooler_output
        got = torch.from_numpy(model.embed_texts(EMBED_TEXTS, batch_size=4))
    assert (got - torch.nn.functional.normalize(expected, dim=-1)).abs().max().item() <= UPSTREAM_ATOL


def test_hf_metaclip2_dir_missing_key_is_named(hf_metaclip2, tmp_path):
    up, directory = hf_metaclip2
    for f in directory.iterdir():
        (tmp_path / f.name).symlink_to(f)
    sd = safetensors.torch.load_file(str(directory / "model.safetensors"))
    del sd["text_model.final_layer_norm.bias"]
    (tmp_path / "model.safetensors").unlink()
    safetensors.torch.save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys: text\.ln_final\.bias"):
        fastclip.load(tmp_path)



def test_hf_metaclip2_config_errors(hf_metaclip2):
    up, _ = hf_metaclip2
    hf = up.model.config.to_dict()
    cfg = keymaps.config_from_hf(hf, "mc2")
    assert (cfg.text.pool_type, cfg.text.eos_token_id, cfg.text.tokenizer_clean) == ("eos", 2, "none")
    assert (cfg.vision.act, cfg.text.act, cfg.embed_dim) == ("quick_gelu", "gelu", 48)
    bad = copy.deepcopy(hf)
    bad["text_config"]["eos_token_id"] = [2, 3]
    with pytest.raises(CheckpointError, match=r"mc2: text_config.eos_token_id must be one token id, got \[2, 3\]"):
        keymaps.config_from_hf(bad, "mc2")
    with pytest.raises(CheckpointError, match="'metaclip_2'"):
        keymaps.config_from_hf({**hf, "model_type": "metaclip_3"}, "mc3")
