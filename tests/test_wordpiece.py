"""WordPieceTokenizer (Chinese-CLIP) against OFA-Sys cn_clip's tokenize and transformers' BERT tokenizers.

``WordPieceTokenizer.chinese_clip()`` must equal ``cn_clip.clip.tokenize`` id for id; ``from_dir`` must equal
transformers' slow Python ``BertTokenizerLegacy`` (an implementation independent of ``tokenizers``) for a vocab.txt
directory and transformers' ``BertTokenizer`` for a tokenizer.json one, called with
``padding="max_length", truncation=True, max_length=L``.
"""
import gzip
import os

import cn_clip.clip as cn_clip
import pytest
import torch
from transformers import BertTokenizer
from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

from fastclip.data.wordpiece import CHINESE_CLIP_VOCAB, WordPieceTokenizer, has_wordpiece_vocab

CN_VOCAB = os.path.join(os.path.dirname(cn_clip.__file__), "vocab.txt")
LONG_WORD = "x" * 150  # cn_clip splits words up to 200 characters, BERT up to 100
CORPUS = [
    "", " ", "一只猫坐在垫子上", "皮卡丘", "杰尼龟，妙蛙种子。小火龙？", "北京大学 Peking University",
    "Hello World! Café naïve RÉSUMÉ Ünïcödé àccents ß İstanbul", "１２３４５ＡＢＣ全角字符！", "\u3000全角空格\u3000",
    "emoji 😀🐱👍🏽 表情 🇨🇳", "数字 3.14159 和 2024年1月1日 ½ ²", "¿Qué? «guillemets» — dash… “引号”",
    "tab\tnew\nline\r\n\x00ctrl\u200b zero\ufffd width", "日本語のテキスト、한국어 텍스트", "𠀀𪚥 扩展区汉字", "Ⅻ ① ㈱ ﬁ ligature",
    "[CLS] [SEP] [MASK] [UNK] [PAD] 特殊", "https://example.com/a_b-c?d=e&f=g#h C++ node.js", "unaffable playing",
    LONG_WORD, "a" * 101 + " 猫", "中文" * 60, "the quick brown fox " * 20,
]


@pytest.fixture(scope="module")
def cn_tok():
    return WordPieceTokenizer.chinese_clip()


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    """A transformers directory written by the slow BertTokenizerLegacy over the Chinese-CLIP vocabulary."""
    d = tmp_path_factory.mktemp("bert_vocab")
    BertTokenizerLegacy(CN_VOCAB).save_pretrained(d)
    return d


def _hf_ids(tok, texts, length):
    return tok(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")["input_ids"]


def test_bundled_vocab_is_cn_clips():
    with gzip.open(CHINESE_CLIP_VOCAB) as f, open(CN_VOCAB, "rb") as g:
        assert f.read() == g.read()


@pytest.mark.parametrize("length", [52, 8, 2])
def test_chinese_clip_equals_cn_clip_tokenize(cn_tok, length):
    ours = cn_tok(CORPUS, context_length=length)
    ref = cn_clip.tokenize(CORPUS, context_length=length)
    assert ours.dtype == torch.int64 and ours.shape == (len(CORPUS), length)
    for text, a, b in zip(CORPUS, ours, ref, strict=True):
        assert torch.equal(a, b), text


def test_vocab_dir_equals_slow_bert_tokenizer(vocab_dir):
    ref_tok = BertTokenizerLegacy.from_pretrained(vocab_dir)
    ours = WordPieceTokenizer.from_dir(vocab_dir)
    for length in (52, 9):
        ref = _hf_ids(ref_tok, CORPUS, length)
        got = ours(CORPUS, context_length=length)
        for text, a, b in zip(CORPUS, got, ref, strict=True):
            assert torch.equal(a, b), text


def test_tokenizer_json_dir_equals_transformers(tmp_path):
    vocab = {line.rstrip("\n"): i for i, line in enumerate(open(CN_VOCAB, encoding="utf-8"))}
    BertTokenizer(vocab=vocab).save_pretrained(tmp_path)
    assert not (tmp_path / "vocab.txt").exists()  # what transformers 5 writes: tokenizer.json alone
    assert has_wordpiece_vocab(tmp_path)
    ref = _hf_ids(BertTokenizer.from_pretrained(tmp_path), CORPUS, 52)
    assert torch.equal(WordPieceTokenizer.from_dir(tmp_path)(CORPUS), ref)


def test_settings_that_differ_are_followed(cn_tok, vocab_dir):
    """cn_clip and BERT part on long words and on special-token strings; do_lower_case False keeps case."""
    bert = WordPieceTokenizer.from_dir(vocab_dir)
    unk = bert.unk_token_id
    assert bert([LONG_WORD])[0, 1] == unk and cn_tok([LONG_WORD])[0, 1] != unk
    assert bert(["[MASK]"])[0, 1] == 103 and cn_tok(["[MASK]"])[0, 1] == cn_tok.encode("[")[0]
    (vocab_dir / "cased").mkdir()
    BertTokenizerLegacy(CN_VOCAB, do_lower_case=False).save_pretrained(vocab_dir / "cased")
    cased = WordPieceTokenizer.from_dir(vocab_dir / "cased")
    texts = ["Hello Café", "ABC 中文"]
    assert torch.equal(cased(texts), _hf_ids(BertTokenizerLegacy.from_pretrained(vocab_dir / "cased"), texts, 52))
    assert not torch.equal(cased(texts), bert(texts))


def test_layout_and_decode(cn_tok):
    ids = cn_tok(["猫", "一只猫坐在垫子上"])
    assert ids[0, :3].tolist() == [cn_tok.cls_token_id, cn_tok.encode("猫")[0], cn_tok.sep_token_id]
    assert (ids[0, 3:] == 0).all() and cn_tok.pad_token_id == 0 and cn_tok.vocab_size == 21128
    assert cn_tok.decode(cn_tok.encode("unaffable 猫")) == "unaffable 猫"
    assert torch.equal(cn_tok("猫"), ids[:1])
    assert cn_tok([]).shape == (0, 52)


def test_errors(cn_tok, tmp_path):
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        cn_tok(["ok", 3])
    with pytest.raises(ValueError, match="context_length"):
        cn_tok(["猫"], context_length=1)
    with pytest.raises(ValueError, match="lacks the special tokens.*cls_token='\\[CLS\\]'"):
        WordPieceTokenizer({"[UNK]": 0, "[SEP]": 1, "[PAD]": 2})
    (tmp_path / "config.json").write_text("{}")
    assert not has_wordpiece_vocab(tmp_path)
    with pytest.raises(FileNotFoundError, match="no BERT WordPiece vocabulary.*config.json"):
        WordPieceTokenizer.from_dir(tmp_path)
