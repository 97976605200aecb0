"""Tokenizers: fastclip.tokenizer against open_clip and transformers, all built offline.

ClipTokenizer must equal open_clip's SimpleTokenizer id for id; SiglipTokenizer must equal transformers'
tokenizer for the directory called with padding="max_length", truncation=True, max_length=L. The
transformers CLIP tokenizer's documented differences (docs/tokenizers.md) are asserted here too.
"""
import html
import json
import random
import shutil

import ftfy
import open_clip
import pytest
import sentencepiece as spm
import torch
import transformers
from transformers import AutoTokenizer
from transformers.tokenization_utils_sentencepiece import SentencePieceExtractor

from fastclip.data.tokenizers import ClipTokenizer, SiglipTokenizer, _clip_vocab, tokenizer_from_dir

CORPUS = [
    "", " ", "a photo of a cat", "A PHOTO OF A DOG.", "Hello, World!!", "it's we're they've I'm you'll he'd 'S 'LL",
    "Café naïve façade Ünïcödé ÜBER", "日本語のテキスト 中文 한국어", "صورة قطة", "фото кошки", "Ελλάδα ΣΑΣ İstanbul ǅ",
    "emoji 🐱🐶👍🏽 ok 🇫🇷", "&amp; &#39; &lt;b&gt; &amp;amp;lt; &quot;x&quot; &eacute;", "Tom &amp; Jerry", "ﬁsh ﬂour",
    "“quoted” ‘single’", "Ｆｕｌｌ ｗｉｄｔｈ", "cafÃ© mojibake", "3.14159 1,000,000 2024-01-01 ½ ²", "...!!!???---***",
    "<|startoftext|> dog <|endoftext|>", "<start_of_text>", "x <end_of_text> y", "!!<start_of_text>hi", "'<end_of_text>",
    "it's<end_of_text>", "<start_of_text><end_of_text>", "tabs\tand\nnewlines\r\n  and   spaces ", "\u00a0nbsp\u2003em\u200bzw",
    "\x00ctrl\x1b[31mred\x1b[0m", "a\u0345b e\u0301", "\U000107bb\u0558 a\ua7ce", "a " * 100, "the quick brown fox " * 30,
    "supercalifragilisticexpialidocious" * 4, "https://example.com/a_b-c?d=e&f=g#h", "C++ C# F# .NET node.js",
]


@pytest.fixture(scope="module")
def oc():
    return open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture(scope="module")
def ours():
    return ClipTokenizer()


def _fuzz(n, seed=0):
    rng = random.Random(seed)
    pool = list("abcXYZ019 ,.'!?&;#<>|_-\t\n") + list("éÉñüßøçΣσİıﬁ") + list("日本中文한") + ["🐱", "👍🏽", "\u200b", "\u00a0",
            "&amp;", "&#39;", "&lt;", "<|endoftext|>", "<end_of_text>", "<start_of_text>", "'s", "'ll", "Ã©", "\r\n"]
    return ["".join(rng.choice(pool) for _ in range(rng.randint(0, 40))) for _ in range(n)]


# ---------------------------------------------------------------- ClipTokenizer vs open_clip
def test_clip_equals_open_clip(oc, ours):
    texts = CORPUS + _fuzz(400)
    expected, got = oc(texts), ours(texts)
    assert got.dtype == torch.long and got.shape == (len(texts), 77)
    bad = [t for t, a, b in zip(texts, expected, got, strict=True) if not torch.equal(a, b)]
    assert not bad, f"{len(bad)} texts differ, first: {bad[0]!r}"
    for t in texts[:60]:
        assert ours.encode(t) == oc.encode(t), t
        assert ours.decode(oc.encode(t)) == oc.decode(oc.encode(t)), t


@pytest.mark.parametrize("length", [1, 2, 3, 16, 64, 100])
def test_clip_context_lengths(oc, ours, length):
    assert torch.equal(ours(CORPUS, context_length=length), oc(CORPUS, context_length=length))
    assert torch.equal(ClipTokenizer(length)(CORPUS), oc(CORPUS, context_length=length))


def test_clip_truncation_keeps_eot(ours):
    row = ours("the quick brown fox " * 30)[0]
    assert row[0] == ours.sot_token_id == 49406 and row[-1] == ours.eot_token_id == 49407
    assert (row != ours.pad_token_id).all()
    assert ours.encode("the quick brown fox " * 30)[:75] == row[1:76].tolist()


def test_clip_ascii_fast_path_is_identity_for_ftfy():
    # printable ASCII without '&' skips ftfy + html.unescape in _clip_clean: they must be the identity
    rng = random.Random(1)
    chars = [chr(c) for c in range(32, 127) if chr(c) != "&"]
    texts = ["".join(rng.choice(chars) for _ in range(rng.randint(0, 60))) for _ in range(3000)]
    assert all(ftfy.fix_text(t) == t and html.unescape(t) == t for t in texts)


def test_clip_api(ours):
    assert (ours.vocab_size, ours.sot_token_id, ours.eot_token_id, ours.pad_token_id) == (49408, 49406, 49407, 0)
    one = ours("a dog")
    assert one.shape == (1, 77) and one[0, :4].tolist() == [49406, 320, 1929, 49407] and one[0, 4:].eq(0).all()
    assert torch.equal(ours(("a dog", "a cat")), ours(["a dog", "a cat"]))
    assert ours([]).shape == (0, 77)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        ours(["ok", 3])
    with pytest.raises(TypeError, match=r"texts\[0\]"):
        ours([None])
    hits = _clip_vocab.cache_info().hits
    ClipTokenizer(), ClipTokenizer()
    assert _clip_vocab.cache_info().hits == hits + 2  # the BPE file is parsed once per process


# ---------------------------------------------------------------- transformers' CLIP tokenizer
@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """vocab.json + merges.txt laid out as openai/clip-vit-base-patch32's, derived from the bundled file."""
    d = tmp_path_factory.mktemp("clip")
    vocab, merges = _clip_vocab()
    hf_vocab = {t: i for i, t in enumerate(vocab[:-2])} | {"<|startoftext|>": 49406, "<|endoftext|>": 49407}
    (d / "vocab.json").write_text(json.dumps(hf_vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (d / "config.json").write_text(json.dumps({"model_type": "clip", "text_config": {"max_position_embeddings": 77}}))
    return d


def _hf_clip(cls, d, texts):
    tok = cls(vocab=str(d / "vocab.json"), merges=str(d / "merges.txt"))
    return tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]


def _pad0(ids):
    """transformers pads with <|endoftext|> (49407): re-pad with 0 after the first eot, as open_clip."""
    ids = ids.clone()
    for row in ids:
        row[int((row == 49407).nonzero()[0]) + 1:] = 0
    return ids


AGREE = ["a photo of a cat", "Hello, World!!", "it's", "naïve 日本語 🐱", "İstanbul", "  spaced   out  ", "", "a " * 100]
DIFFER = {  # text: (open_clip ids without padding, transformers ids up to its first eot); see docs/tokenizers.md
    "Tom &amp; Jerry": ([49406, 2435, 261, 9164, 49407], [49406, 2435, 261, 6259, 282, 9164, 49407]),
    "ﬁsh": ([49406, 2759, 49407], [49406, 171, 105, 223, 849, 49407]),
    "Ｆｕｌｌ": ([49406, 1476, 49407], [49406, 171, 121, 228, 171, 121, 243, 171, 121, 234, 171, 121, 490, 49407]),
    "cafÃ©": ([49406, 15304, 49407], [49406, 3471, 127, 352, 5811, 49407]),
    "ΣΑΣ": ([49406, 139, 225, 138, 109, 139, 480, 49407], [49406, 139, 225, 138, 109, 139, 481, 49407]),
    "<|endoftext|>": ([49406, 27, 347, 40786, 4160, 91, 285, 49407], [49406, 49407, 49407]),
    "x <end_of_text> y": ([49406, 343, 49407, 344, 49407], [49406, 343, 283, 806, 318, 539, 318, 4160, 285, 344, 49407]),
}


@pytest.mark.parametrize("name", ["CLIPTokenizer", "CLIPTokenizerFast"])
def test_transformers_clip_agreement_and_differences(oc, clip_dir, name):
    cls = getattr(transformers, name)
    assert transformers.CLIPTokenizerFast is transformers.CLIPTokenizer  # transformers 5: one (Rust) class
    hf = _hf_clip(cls, clip_dir, AGREE)
    assert (hf[0, 7:] == 49407).all()  # pads with <|endoftext|>, not 0
    assert torch.equal(_pad0(hf), oc(AGREE))  # same ids otherwise, incl. truncation keeping eot
    hf = _hf_clip(cls, clip_dir, list(DIFFER))
    for row, ref, (want_oc, want_hf) in zip(hf, oc(list(DIFFER)), DIFFER.values(), strict=True):
        assert ref[ref != 0].tolist() == want_oc
        assert row.tolist()[: len(want_hf)] == want_hf and want_oc != want_hf


def test_tokenizer_from_dir_clip(oc, clip_dir, tmp_path):
    tok = tokenizer_from_dir(clip_dir)
    assert isinstance(tok, ClipTokenizer) and tok.context_length == 77
    assert torch.equal(tok(CORPUS), oc(CORPUS))
    no_config = tmp_path / "no_config"
    shutil.copytree(clip_dir, no_config)
    (no_config / "config.json").unlink()
    (no_config / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizerFast"}))
    assert isinstance(tokenizer_from_dir(no_config), ClipTokenizer)
    other = tmp_path / "other"
    shutil.copytree(clip_dir, other)
    (other / "vocab.json").write_text(json.dumps({"a": 0}))
    with pytest.raises(ValueError, match="differ"):
        tokenizer_from_dir(other)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json.*spiece\.model.*vocab\.json"):
        tokenizer_from_dir(empty)


# ---------------------------------------------------------------- SigLIP / SigLIP 2 vs transformers
SIG_CORPUS = CORPUS + [
    "A </s> b", "</s>", "x<unk>y", "a</s>", "</s>b", "</s></s>", "<pad> z", "<eos>", "A <eos> b", "<bos>hi", "<mask>",
    "<EOS>", "▁lead ▁ x", "  leading", "trailing  ", "UPPER lower MiXeD", "don't stop-believing; (really) [ok] {x}",
] + _fuzz(150, seed=2)


@pytest.fixture(scope="module")
def sp_corpus(tmp_path_factory):
    rng = random.Random(0)
    syl = "ka ri to mo na su pe la di go ve chu shi an er in on th st qu".split()
    words = "a photo of the cat dog on table red big house".split()
    words += ["".join(rng.choice(syl) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(3000)]
    lines += ["Café naïve 日本語 東京 Ünïcödé, São Paulo: 3.14 — ümlaut ÄÖÜ éèê 🐱"] * 20
    path = tmp_path_factory.mktemp("spm") / "corpus.txt"
    path.write_text("\n".join(lines))
    return path


def _reference(path, texts, length):
    ref = AutoTokenizer.from_pretrained(str(path))
    return ref, ref(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")["input_ids"]


def _assert_same(ref_ids, got, texts):
    bad = [t for t, a, b in zip(texts, ref_ids, got, strict=True) if not torch.equal(a, b)]
    assert got.shape == ref_ids.shape and not bad, f"{len(bad)} texts differ, first: {bad[:1]!r}"


@pytest.fixture(scope="module")
def siglip_dir(sp_corpus, tmp_path_factory):
    """A SigLIP-style directory: unigram spiece.model (pad 0, eos 1, unk 2) saved by transformers."""
    d = tmp_path_factory.mktemp("siglip")
    spm.SentencePieceTrainer.train(input=str(sp_corpus), model_prefix=str(d / "sp"), vocab_size=300,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, eos_piece="</s>",
                                   minloglevel=2)
    out = d / "model"
    transformers.SiglipTokenizer(vocab_file=str(d / "sp.model")).save_pretrained(out)
    config = {"model_type": "siglip", "text_config": {"max_position_embeddings": 64}}
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.filterwarnings("ignore:This sequence already has")
@pytest.mark.parametrize("variant", ["saved", "hub_strip", "no_lower"])
def test_siglip_spiece_equals_transformers(siglip_dir, tmp_path, variant):
    d = tmp_path / variant
    shutil.copytree(siglip_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    if variant == "hub_strip":  # google/siglip-* configs mark </s>, <unk> lstrip/rstrip
        for tok in cfg["added_tokens_decoder"].values():
            tok["lstrip"] = tok["rstrip"] = True
    if variant == "no_lower":
        cfg["do_lower_case"] = False
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    for length in (64, 8):
        ref, want = _reference(d, SIG_CORPUS, length)
        assert type(ref).__name__ == "SiglipTokenizer"
        got = SiglipTokenizer.from_dir(d)(SIG_CORPUS, context_length=length)
        _assert_same(want, got, SIG_CORPUS)
    tok = tokenizer_from_dir(d)
    assert isinstance(tok, SiglipTokenizer) and tok.context_length == 64 and tok.pad_token_id == 1
    assert tok.vocab_size == 300 and tok("a photo")[0, -1] == 1 and tok([]).shape == (0, 64)
    with pytest.raises(TypeError, match=r"texts\[2\]"):
        tok(["a", "b", b"c"])


@pytest.fixture(scope="module")
def gemma_dir(sp_corpus, tmp_path_factory):
    """A SigLIP 2-style directory: Gemma tokenizer.json (byte-fallback BPE) saved by transformers as
    google/siglip2-* were: add_bos_token=False, add_eos_token=True, padding_side right."""
    d = tmp_path_factory.mktemp("gemma")
    spm.SentencePieceTrainer.train(
        input=str(sp_corpus), model_prefix=str(d / "g"), vocab_size=600, model_type="bpe", pad_id=0, eos_id=1, bos_id=2,
        unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", user_defined_symbols=["<mask>"],
        byte_fallback=True, add_dummy_prefix=False, remove_extra_whitespaces=False, split_digits=True,
        normalization_rule_name="identity", minloglevel=2)
    vocab, _, merges = SentencePieceExtractor(str(d / "g.model")).extract()
    out = d / "model"
    transformers.GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=False, add_eos_token=True,
                                padding_side="right").save_pretrained(out)
    (out / "config.json").write_text(json.dumps({"model_type": "siglip2"}))
    return out


@pytest.mark.parametrize("variant", ["siglip2", "hub_flags", "gemma_no_config", "left_default"])
def test_siglip2_gemma_equals_transformers(gemma_dir, tmp_path, variant):
    d = tmp_path / variant
    shutil.copytree(gemma_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    if variant == "hub_flags":  # transformers 5 ignores these flags when tokenizer.json is present
        cfg.update(add_bos_token=True, add_eos_token=True)
    if variant == "gemma_no_config":  # no config.json: transformers loads GemmaTokenizer, no lower-casing
        (d / "config.json").unlink()
    if variant == "left_default":  # no padding_side: Siglip2Tokenizer's class default (left) applies
        cfg.pop("padding_side")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    for length in (64, 8):
        ref, want = _reference(d, SIG_CORPUS, length)
        expected_class = "GemmaTokenizer" if variant == "gemma_no_config" else "Siglip2Tokenizer"
        assert type(ref).__name__ == expected_class
        got = SiglipTokenizer.from_dir(d)(SIG_CORPUS, context_length=length)
        _assert_same(want, got, SIG_CORPUS)
    tok = tokenizer_from_dir(d, context_length=16)
    row = tok("A Photo")[0]
    assert row.shape == (16,) and tok.pad_token_id == 0 and tok([]).shape == (0, 16)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tok(["a", None])
    lowered = tok.encode("A Photo") == tok.encode("a photo")
    assert lowered == (variant != "gemma_no_config")
    assert SiglipTokenizer.from_dir(d, lowercase=True).encode("A Photo") == tok.encode("a photo")
