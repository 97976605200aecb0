"""BERT WordPiece tokenizer (Chinese-CLIP), built on Hugging Face ``tokenizers``.

``WordPieceTokenizer`` reproduces BERT's basic tokenizer + WordPiece as Chinese-CLIP runs them:
control characters dropped and whitespace unified (``clean_text``), spaces put around every CJK ideograph,
lower-casing and accent stripping (NFD, combining marks removed) when ``lowercase``, a split on whitespace and
punctuation, then greedy longest-match-first WordPiece with ``##`` continuations and ``[UNK]`` for a word that
has no split or is longer than ``max_input_chars_per_word``. Each text becomes ``[CLS] ids[:L-2] [SEP]``,
padded with the ``[PAD]`` id (0 in Chinese-CLIP's vocabulary) to ``L = context_length``: LongTensor (B, L).

Two sources of settings:

* ``WordPieceTokenizer.chinese_clip()``: the vocabulary bundled next to this module,
  ``chinese_clip_vocab.txt.gz`` (21128 tokens), with OFA-Sys cn_clip's own settings (``cn_clip.clip.tokenize``:
  words up to 200 characters, special-token strings in a text are split like any text). The vocabulary is
  cn_clip's ``clip/vocab.txt`` (https://github.com/OFA-Sys/Chinese-CLIP, MIT licence, Copyright (c) 2012-2022
  OFA-Sys), Chinese-BERT-wwm's vocabulary, gzipped byte for byte.
* ``WordPieceTokenizer.from_dir(path)``: a transformers directory (``vocab.txt`` + ``tokenizer_config.json``, or
  ``tokenizer.json``), as transformers' ``BertTokenizer`` runs it: words up to 100 characters, the special
  tokens written in a text matched as those tokens, ``do_lower_case`` / ``strip_accents`` /
  ``tokenize_chinese_chars`` and the special-token names from the directory's config.
"""
from __future__ import annotations

import functools
import gzip
import os
from collections.abc import Sequence

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

from .tokenizers import _check_texts, _read_json, _token_str

__all__ = ["WordPieceTokenizer", "CHINESE_CLIP_VOCAB", "has_wordpiece_vocab"]

CHINESE_CLIP_VOCAB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chinese_clip_vocab.txt.gz")
_SPECIALS = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_DEFAULT_SPECIALS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                     "mask_token": "[MASK]"}


def has_wordpiece_vocab(path) -> bool:
    """Whether directory ``path`` holds a BERT vocabulary: ``vocab.txt``, or a ``tokenizer.json`` whose model is
    WordPiece."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, "vocab.txt")):
        return True
    return _read_json(os.path.join(path, "tokenizer.json")).get("model", {}).get("type") == "WordPiece"


def _vocab_lines(text: str) -> dict[str, int]:
    """vocab.txt -> {token: id}: one token a line, the id its line number (transformers' load_vocab)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    return {line.rstrip("\r"): i for i, line in reversed(list(enumerate(lines)))}  # first occurrence wins


@functools.cache
def _bundled_vocab() -> tuple[tuple[str, int], ...]:
    with gzip.open(CHINESE_CLIP_VOCAB) as f:
        return tuple(_vocab_lines(f.read().decode("utf-8")).items())


class WordPieceTokenizer:
    """BERT WordPiece tokenizer: ``tok(texts)`` -> LongTensor (B, L) of ``[CLS] ids[:L-2] [SEP] [PAD]...``.

    ``vocab``: {token: id}. ``lowercase``: lower-case (and, unless ``strip_accents`` says otherwise, strip
    accents). ``match_special_tokens``: a special token written in a text (``[MASK]``) becomes that token
    (transformers) or is tokenized as text (cn_clip). Attributes: ``context_length``, ``vocab_size``,
    ``pad_token_id``, ``cls_token_id``, ``sep_token_id``, ``unk_token_id``.
    """

    def __init__(self, vocab: dict[str, int], context_length: int = 52, *, lowercase: bool = True,
                 strip_accents: bool | None = None, handle_chinese_chars: bool = True,
                 max_input_chars_per_word: int = 100, match_special_tokens: bool = True,
                 specials: dict[str, str] | None = None):
        specials = {**_DEFAULT_SPECIALS, **(specials or {})}
        missing = [f"{k}={v!r}" for k, v in specials.items() if k != "mask_token" and v not in vocab]
        if missing:
            raise ValueError(f"the WordPiece vocabulary ({len(vocab)} tokens) lacks the special tokens {', '.join(missing)}")
        self.context_length = int(context_length)
        if self.context_length < 2:
            raise ValueError(f"context_length must be >= 2 (room for [CLS] and [SEP]), got {self.context_length}")
        self.vocab_size = len(vocab)
        self.unk_token_id, self.sep_token_id = vocab[specials["unk_token"]], vocab[specials["sep_token"]]
        self.pad_token_id, self.cls_token_id = vocab[specials["pad_token"]], vocab[specials["cls_token"]]
        self.lowercase, self.max_input_chars_per_word = bool(lowercase), int(max_input_chars_per_word)
        self._tok = tok = Tokenizer(models.WordPiece(vocab, unk_token=specials["unk_token"],
                                                     max_input_chars_per_word=self.max_input_chars_per_word))
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=handle_chinese_chars,
                                                    strip_accents=strip_accents, lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        if match_special_tokens:
            tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t in dict.fromkeys(specials.values()) if t in vocab])
        self._vocab_list: list[str] | None = None

    @classmethod
    def chinese_clip(cls, context_length: int = 52) -> WordPieceTokenizer:
        """The tokenizer of OFA-Sys cn_clip checkpoints (``cn_clip.clip.tokenize``): the bundled vocabulary."""
        return cls(dict(_bundled_vocab()), context_length, max_input_chars_per_word=200, match_special_tokens=False)

    @classmethod
    def from_dir(cls, path, context_length: int = 52) -> WordPieceTokenizer:
        """The tokenizer of a transformers directory: ``vocab.txt`` (+ ``tokenizer_config.json``,
        ``special_tokens_map.json``), else a WordPiece ``tokenizer.json``."""
        path = os.fspath(path)
        cfg = _read_json(os.path.join(path, "tokenizer_config.json"))
        if "added_tokens_decoder" not in cfg:
            cfg.update(_read_json(os.path.join(path, "special_tokens_map.json")))
        specials = {k: _token_str(cfg[k]) for k in _SPECIALS if cfg.get(k)}
        kwargs = dict(lowercase=cfg.get("do_lower_case", True), strip_accents=cfg.get("strip_accents"),
                      handle_chinese_chars=cfg.get("tokenize_chinese_chars", True))
        vocab_file, tjson = os.path.join(path, "vocab.txt"), os.path.join(path, "tokenizer.json")
        if os.path.isfile(vocab_file):
            with open(vocab_file, encoding="utf-8") as f:
                return cls(_vocab_lines(f.read()), context_length, specials=specials, **kwargs)
        file = _read_json(tjson)
        model = file.get("model", {})
        if model.get("type") != "WordPiece":
            found = sorted(os.listdir(path)) if os.path.isdir(path) else "no directory"
            raise FileNotFoundError(f"{path} has no BERT WordPiece vocabulary: expected vocab.txt or a tokenizer.json "
                                    f"with a WordPiece model (found {found})")
        norm = file.get("normalizer") or {}
        if norm.get("type") == "BertNormalizer" and "do_lower_case" not in cfg:
            kwargs.update(lowercase=norm.get("lowercase", True), strip_accents=norm.get("strip_accents"),
                          handle_chinese_chars=norm.get("handle_chinese_chars", True))
        specials.setdefault("unk_token", model.get("unk_token", "[UNK]"))
        return cls(dict(model["vocab"]), context_length, specials=specials,
                   max_input_chars_per_word=model.get("max_input_chars_per_word", 100), **kwargs)

    def encode(self, text: str) -> list[int]:
        """WordPiece ids of one text, without [CLS] / [SEP], truncation or padding."""
        (text,) = _check_texts([text])
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """Tokens of ids joined as BERT does (``##`` pieces glued to the previous one), specials and padding kept."""
        if self._vocab_list is None:
            vocab = self._tok.get_vocab(with_added_tokens=False)
            self._vocab_list = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        return " ".join(self._vocab_list[int(i)] for i in ids).replace(" ##", "")

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.LongTensor:
        """Tokenize a text or a batch -> LongTensor (B, L), L = context_length or self.context_length."""
        texts = _check_texts(texts)
        length = int(context_length or self.context_length)
        if length < 2:
            raise ValueError(f"context_length must be >= 2 (room for [CLS] and [SEP]), got {length}")
        out = np.full((len(texts), length), self.pad_token_id, dtype=np.int64)
        encs = self._tok.encode_batch(texts, add_special_tokens=False) if texts else []
        for row, enc in zip(out, encs, strict=True):
            ids = enc.ids[: length - 2]  # truncation keeps [SEP] last
            row[0], row[1 : len(ids) + 1], row[len(ids) + 1] = self.cls_token_id, ids, self.sep_token_id
        return torch.from_numpy(out)
