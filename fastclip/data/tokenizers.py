"""Text tokenizers for CLIP / OpenCLIP and SigLIP / SigLIP 2, built on Hugging Face ``tokenizers``.

``ClipTokenizer`` reproduces OpenCLIP's ``SimpleTokenizer`` (``open_clip.get_tokenizer("ViT-B-32")``)
id for id: ftfy + double HTML unescape + whitespace collapse + lower-casing, the CLIP pre-tokenisation
regex, byte-level BPE with ``</w>`` end-of-word merges, ``<start_of_text>``/``<end_of_text>`` around
the text, truncation that keeps end-of-text last, padding with 0. Output: LongTensor (B, L), L = 77.

The BPE vocabulary shipped next to this module, ``bpe_simple_vocab_16e6.txt.gz``, comes from the OpenAI
CLIP repository (https://github.com/openai/CLIP, ``clip/bpe_simple_vocab_16e6.txt.gz``), MIT licence,
Copyright (c) 2021 OpenAI; it is byte-identical to the copy open_clip ships.

``SiglipTokenizer`` reads a Hugging Face checkpoint directory's own files (``spiece.model`` for SigLIP,
``tokenizer.json`` for SigLIP 2 / Gemma) and returns what transformers' tokenizer for that directory
returns when called with ``padding="max_length", truncation=True, max_length=L``: LongTensor (B, L).
Details and the differences from transformers' CLIP tokenizer: docs/tokenizers.md.
"""
from __future__ import annotations

import functools
import gzip
import html
import json
import os
import re
import string
import threading
from collections.abc import Sequence

import ftfy
import numpy as np
import regex
import sentencepiece as spm
import torch
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

from ..errors import FastclipError

__all__ = ["ClipTokenizer", "SiglipTokenizer", "tokenizer_from_dir", "MissingTokenizerError"]


class MissingTokenizerError(FastclipError, RuntimeError):
    """Texts were given to a model that has no tokenizer (a SigLIP directory without tokenizer files, or a
    randomly initialised SigLIP model). The message says which files are missing and how to add them."""


# What a SigLIP / SigLIP 2 directory's tokenizer is read from (as transformers' SiglipTokenizer /
# Siglip2Tokenizer do): the vocabulary, then the special tokens and settings.
SIGLIP_VOCAB_FILES = ("spiece.model", "tokenizer.json")
SIGLIP_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")


def has_siglip_vocab(path) -> bool:
    """Whether ``path`` holds a SigLIP (spiece.model) or SigLIP 2 (tokenizer.json) vocabulary."""
    return any(os.path.isfile(os.path.join(os.fspath(path), f)) for f in SIGLIP_VOCAB_FILES)


def siglip_tokenizer_help(path, repo_id: str | None = None, for_model: bool = True) -> str:
    """Which tokenizer files ``path`` lacks, and how to add them (``repo_id``: the hub repo it came from;
    ``for_model``: the directory is a loaded model's, which can also be given a tokenizer from elsewhere)."""
    path = os.fspath(path)
    missing = [] if has_siglip_vocab(path) else [" or ".join(SIGLIP_VOCAB_FILES)]
    missing += [f for f in SIGLIP_CONFIG_FILES if not os.path.isfile(os.path.join(path, f))]
    repo = repo_id or "<hub repo of the model>"
    files = " ".join((*SIGLIP_VOCAB_FILES, *SIGLIP_CONFIG_FILES))
    return (f"{path} has no tokenizer files: missing {', '.join(missing)} (spiece.model for SigLIP or "
            f"tokenizer.json for SigLIP 2, with tokenizer_config.json and special_tokens_map.json). Copy them "
            f"into the directory from the model's hub repo, e.g. `hf download {repo} {files} --local-dir {path}` "
            f"(files the repo does not have are skipped)"
            + (", or set model.tokenizer = fastclip.get_tokenizer(<directory with those files, or hub id>)"
               if for_model else ", or pass a directory that has them"))


def no_tokenizer_message(model, what: str = "embed texts") -> str:
    """Why ``model`` (whose ``tokenizer`` is None) cannot ``what``, and how to give it a tokenizer."""
    why = model.tokenizer_missing or (
        "it was created without tokenizer files (a randomly initialised SigLIP model has none); set "
        "model.tokenizer = fastclip.get_tokenizer(<model directory or hub id>)")
    return f"this model has no tokenizer, so it cannot {what}: {why}"


_BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")
_N_MERGES = 49152 - 256 - 2  # open_clip keeps lines [1, 48895) of the merges file
_SOT, _EOT = "<start_of_text>", "<end_of_text>"
# open_clip's pattern, compiled with the same `regex` module and flags, so the word split is its split
# (Oniguruma, the regex engine inside `tokenizers`, disagrees on ~17k code points: other Unicode version).
_WORDS = regex.compile(
    f"{_SOT}|{_EOT}" + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
_MAX_CACHED_WORDS = 1 << 17


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP reversible map from the 256 byte values to printable unicode characters."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


@functools.cache
def _clip_vocab() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(tokens in id order: 49408, merges in rank order: 48894), parsed once per process."""
    with gzip.open(_BPE_PATH) as f:
        lines = f.read().decode("utf-8").split("\n")[1 : _N_MERGES + 1]
    merges = tuple(tuple(line.split()) for line in lines)
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [_SOT, _EOT]
    return tuple(vocab), merges


def _clip_clean(text: str) -> str:
    """open_clip's cleaning: ftfy.fix_text, html.unescape twice, whitespace collapsed, lower-cased.
    Printable ASCII without '&' skips ftfy and unescaping, which are the identity on it (tested)."""
    if not (text.isascii() and text.isprintable() and "&" not in text):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
    return texts


class ClipTokenizer:
    """CLIP BPE tokenizer, equal to open_clip's ``SimpleTokenizer`` (pad id 0, eot kept on truncation).

    Text is cleaned and split into words in Python (open_clip's code path); the byte-level BPE of each
    distinct word is computed by a ``tokenizers.Tokenizer`` (``encode_batch`` over the batch's unseen
    words) and memoised per instance, so repeated words cost one dict look-up.
    ``tok(texts)`` -> LongTensor (B, L): ``[sot, bpe ids..., eot, 0, ...]``; if too long, the first
    ``L - 2`` BPE ids are kept and the last position holds eot.
    """

    def __init__(self, context_length: int = 77):
        vocab, merges = _clip_vocab()
        self.context_length = int(context_length)
        self.vocab_size = len(vocab)  # 49408
        self.sot_token_id, self.eot_token_id = len(vocab) - 2, len(vocab) - 1  # 49406, 49407
        self.pad_token_id = 0
        self._vocab = vocab
        self._byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
        bpe = models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=list(merges),
                         end_of_word_suffix="</w>", fuse_unk=False)
        self._tok = Tokenizer(bpe)  # input: pre-split words; each word -> bytes -> BPE, '</w>' on the last
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        self._cache: dict[str, list[int]] = {}

    def _encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        """BPE ids (no sot/eot) of each text: list of B lists."""
        words = [_WORDS.findall(_clip_clean(t)) for t in texts]
        cache = self._cache
        new = list({w for ws in words for w in ws if w not in cache})
        if new:
            if len(cache) + len(new) > _MAX_CACHED_WORDS:  # start afresh (a new dict: thread-safe)
                cache = self._cache = {}
                new = list({w for ws in words for w in ws})
            fn = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
            for w, e in zip(new, fn([[w] for w in new], is_pretokenized=True, add_special_tokens=False), strict=True):
                cache[w] = e.ids
            cache[_SOT], cache[_EOT] = [self.sot_token_id], [self.eot_token_id]  # open_clip maps these words
        out = []
        for ws in words:
            ids: list[int] = []
            for w in ws:
                ids += cache[w]
            out.append(ids)
        return out

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without start/end tokens (open_clip ``SimpleTokenizer.encode``)."""
        return self._encode_many(_check_texts([text]))[0]

    def decode(self, ids) -> str:
        """Text of ids (list, 1-D tensor or array) as open_clip decodes it: ``</w>`` -> space; special
        tokens and the padding id 0 (the token '!') are decoded as text too."""
        text = "".join(self._vocab[int(i)] for i in ids)
        return bytearray(self._byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.LongTensor:
        """Tokenize a text or a batch -> LongTensor (B, L), L = context_length or self.context_length."""
        texts = _check_texts(texts)
        length = int(context_length or self.context_length)
        if length < 1:
            raise ValueError(f"context_length must be >= 1, got {length}")
        out = np.zeros((len(texts), length), dtype=np.int64)
        for row, ids in zip(out, self._encode_many(texts), strict=True):
            toks = [self.sot_token_id, *ids, self.eot_token_id]
            if len(toks) > length:  # as open_clip: cut, then the last kept position becomes eot
                toks = toks[:length]
                toks[-1] = self.eot_token_id
            row[: len(toks)] = toks
        return torch.from_numpy(out)


# ---------------------------------------------------------------------------------------------------
# SigLIP (sentencepiece) and SigLIP 2 (Gemma tokenizer.json)
# ---------------------------------------------------------------------------------------------------
def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_str(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _special_config(path: str) -> dict:
    """tokenizer_config.json, with special_tokens_map.json filling in as transformers does (only when
    the config has no ``added_tokens_decoder``); token values become plain strings."""
    cfg = _read_json(os.path.join(path, "tokenizer_config.json"))
    if "added_tokens_decoder" not in cfg:
        cfg.update(_read_json(os.path.join(path, "special_tokens_map.json")))
    for key in ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token"):
        if key in cfg:
            cfg[key] = _token_str(cfg[key])
    extra = cfg.get("additional_special_tokens") or cfg.get("extra_special_tokens") or []
    cfg["_extra"] = [_token_str(t) for t in (extra.values() if isinstance(extra, dict) else extra)]
    return cfg


class _SentencePieceText:
    """transformers' ``SiglipTokenizer`` (sentencepiece backend), re-done: text -> ids (no eos)."""

    def __init__(self, model_file: str, cfg: dict):
        self.sp = spm.SentencePieceProcessor()
        self.sp.Load(model_file)
        if cfg.get("legacy", True) is False:  # SentencePieceBackend drops the dummy prefix then
            from sentencepiece import sentencepiece_model_pb2 as pb

            proto = pb.ModelProto.FromString(self.sp.serialized_model_proto())
            if proto.normalizer_spec.add_dummy_prefix:
                proto.normalizer_spec.add_dummy_prefix = False
                self.sp.LoadFromSerializedProto(proto.SerializeToString())
        self.lower = cfg.get("do_lower_case", True)
        self.unk = cfg.get("unk_token", "<unk>")
        self.unk_len = len(self.sp.encode(self.unk))
        self.eos = cfg.get("eos_token", "</s>")
        self.pad = cfg.get("pad_token", "</s>")
        self.specials = {t for t in (self.eos, self.unk, self.pad, *cfg["_extra"]) if t}
        # added tokens: content -> (id, lstrip, rstrip); SiglipTokenizer makes eos/unk/pad strip both sides
        self.added = {t: (self.sp.piece_to_id(t), True, True) for t in self.specials}
        for i, tok in (cfg.get("added_tokens_decoder") or {}).items():
            tok = tok if isinstance(tok, dict) else {"content": tok}
            self.added[tok["content"]] = (int(i), tok.get("lstrip", False), tok.get("rstrip", False))
        alts = sorted(self.added, key=len, reverse=True)
        self.split_re = re.compile("(" + "|".join(map(re.escape, alts)) + ")")
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id, self.pad_id = self.token_id(self.eos), self.token_id(self.pad)

    def token_id(self, token: str) -> int:
        return self.added[token][0] if token in self.added else self.sp.piece_to_id(token)

    def _canon(self, text: str) -> str:  # SiglipTokenizer.canonicalize_text
        if self.lower:
            text = text.lower()
        text = text.translate(str.maketrans("", "", string.punctuation))
        return re.sub(r"\s+", " ", text).strip()

    def _pieces(self, chunk: str) -> list[str]:  # SiglipTokenizer._tokenize: encode "<unk>"+text, drop <unk>
        toks = self.sp.encode(self.unk + self._canon(chunk), out_type=str)
        return toks[self.unk_len :] if len(toks) >= self.unk_len else toks

    def _slow(self, text: str) -> list[int]:
        """Text containing added-token strings: transformers' trie split + lstrip/rstrip, per chunk."""
        parts = self.split_re.split(text)  # [text, added token, text, added token, ..., text]
        for i, p in enumerate(parts):
            if p in self.added and i % 2 == 1:
                _, lstrip, rstrip = self.added[p]
                if rstrip and i + 1 < len(parts) and parts[i + 1]:
                    parts[i + 1] = parts[i + 1].lstrip()
                if lstrip and i > 0 and parts[i - 1]:
                    parts[i - 1] = parts[i - 1].rstrip()
        toks: list[str] = []
        for i, p in enumerate(parts):
            if p:
                toks += [p] if i % 2 == 1 else self._pieces(p)
        if len(toks) > 1 and toks[0] == "▁" and toks[1] in self.specials:
            toks = toks[1:]
        return [self.token_id(t) for t in toks]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        texts = ["▁" + t.replace("▁", " ") for t in texts]
        out: list = [None] * len(texts)
        fast = [i for i, t in enumerate(texts) if not self.split_re.search(t)]
        ids = self.sp.encode([self.unk + self._canon(texts[i]) for i in fast], out_type=int)
        for i, seq in zip(fast, ids, strict=True):
            out[i] = seq[self.unk_len :] if len(seq) >= self.unk_len else seq
        for i, t in enumerate(texts):
            if out[i] is None:
                out[i] = self._slow(t)
        return out

    def finish(self, ids: list[int], length: int, trunc_left: bool) -> list[int]:
        """Truncate to length - 1, then append eos unless the text already ends with it."""
        keep = max(length - 1, 0)
        if len(ids) > keep:
            ids = ids[len(ids) - keep :] if trunc_left else ids[:keep]
        return ids if ids and ids[-1] == self.eos_id else ids + [self.eos_id]


class SiglipTokenizer:
    """Tokenizer of a SigLIP / SigLIP 2 Hugging Face directory, equal to transformers' tokenizer for it
    called with ``padding="max_length", truncation=True, max_length=L``.

    ``spiece.model`` (SigLIP): SiglipTokenizer's canonicalisation (lower-case unless ``do_lower_case`` is
    false, ASCII punctuation removed, whitespace collapsed), sentencepiece, eos appended, padded with
    ``pad_token`` (``</s>``). ``tokenizer.json`` (SigLIP 2 / Gemma): the file's pipeline, lower-cased
    first when transformers would load ``Siglip2Tokenizer`` (``model_type`` siglip2 in config.json); the
    file's post-processor adds the special tokens (transformers 5 ignores ``add_bos_token`` /
    ``add_eos_token`` in tokenizer_config.json when a tokenizer.json is present).
    ``tok(texts)`` -> LongTensor (B, L).
    """

    def __init__(self, path, context_length: int = 64, *, lowercase: bool | None = None):
        path = os.fspath(path)
        cfg = _special_config(path)
        model_type = _read_json(os.path.join(path, "config.json")).get("model_type", "")
        klass = (cfg.get("tokenizer_class") or "").removesuffix("Fast")
        spiece, tjson = os.path.join(path, "spiece.model"), os.path.join(path, "tokenizer.json")
        want_spm = model_type == "siglip" or klass == "SiglipTokenizer" or not os.path.isfile(tjson)
        self.context_length = int(context_length)
        self._trunc_left = cfg.get("truncation_side", "right") == "left"
        if want_spm and os.path.isfile(spiece):
            if lowercase is not None:
                cfg["do_lower_case"] = lowercase
            self._sp = _SentencePieceText(spiece, cfg)
            self._tok = None
            self.vocab_size, self.pad_token_id = self._sp.vocab_size, self._sp.pad_id
            self.eos_token_id = self._sp.eos_id
            self._pad_left = cfg.get("padding_side", "right") == "left"
        elif os.path.isfile(tjson):
            self._sp = None
            self._tok = tok = Tokenizer.from_file(tjson)
            siglip2 = model_type == "siglip2" or klass == "Siglip2Tokenizer"
            if lowercase if lowercase is not None else siglip2:
                # Siglip2Tokenizer = Gemma + a Lowercase normalizer (Rust, char by char) in front
                if tok.normalizer is None:
                    tok.normalizer = normalizers.Lowercase()
                elif tok.normalizer.normalize_str("A") != "a":
                    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), tok.normalizer])
            specials = [cfg.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")]
            present = tok.get_vocab(with_added_tokens=True)
            tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t in (*specials, *cfg["_extra"]) if t and t not in present])
            pad = cfg.get("pad_token") or (tok.padding or {}).get("pad_token")
            if pad is None or tok.token_to_id(pad) is None:
                raise ValueError(f"{path}: no usable pad_token in tokenizer_config.json / tokenizer.json")
            self._pad = pad
            self.vocab_size = tok.get_vocab_size(with_added_tokens=False)
            self.pad_token_id = tok.token_to_id(pad)
            eos = cfg.get("eos_token")
            self.eos_token_id = tok.token_to_id(eos) if eos else None
            default_side = "left" if siglip2 or klass == "GemmaTokenizer" else "right"  # class attribute
            side = cfg.get("padding_side") or (tok.padding or {}).get("direction") or default_side
            self._pad_left = side == "left"
            trunc = cfg.get("truncation_side") or (tok.truncation or {}).get("direction") or "right"
            self._trunc_left = trunc == "left"
            self._configured = None
            self._lock = threading.Lock()
        else:
            raise FileNotFoundError(siglip_tokenizer_help(path, for_model=False))

    @classmethod
    def from_dir(cls, path, context_length: int = 64, *, lowercase: bool | None = None) -> SiglipTokenizer:
        """Tokenizer of a Hugging Face SigLIP / SigLIP 2 directory. ``lowercase`` (default: as
        transformers) overrides ``do_lower_case`` (spiece.model) or whether a Lowercase normalizer is put
        in front of tokenizer.json's (transformers does so exactly when it loads ``Siglip2Tokenizer``)."""
        return cls(path, context_length, lowercase=lowercase)

    def encode(self, text: str) -> list[int]:
        """Ids of one text without special tokens, truncation or padding."""
        (text,) = _check_texts([text])
        if self._sp is not None:
            return self._sp.encode_batch([text])[0]
        with self._lock:
            self._tok.no_truncation()
            self._tok.no_padding()
            self._configured = None
            return self._tok.encode(text, add_special_tokens=False).ids

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.LongTensor:
        """Tokenize a text or a batch -> LongTensor (B, L), L = context_length or self.context_length."""
        texts = _check_texts(texts)
        length = int(context_length or self.context_length)
        if length < 1:
            raise ValueError(f"context_length must be >= 1, got {length}")
        out = np.full((len(texts), length), self.pad_token_id, dtype=np.int64)
        if self._sp is not None:
            rows = [self._sp.finish(ids, length, self._trunc_left) for ids in self._sp.encode_batch(texts)]
            for row, ids in zip(out, rows, strict=True):  # len(ids) <= length
                if self._pad_left:
                    row[length - len(ids):] = ids
                else:
                    row[: len(ids)] = ids
            return torch.from_numpy(out)
        with self._lock:  # the Rust tokenizer carries truncation/padding state: set it as transformers does
            if self._configured != length:
                self._tok.enable_truncation(length, direction="left" if self._trunc_left else "right")
                self._tok.enable_padding(direction="left" if self._pad_left else "right", pad_id=self.pad_token_id,
                                         pad_token=self._pad, length=length)
                self._configured = length
            encs = self._tok.encode_batch(texts, add_special_tokens=True)
        return torch.tensor([e.ids for e in encs], dtype=torch.long).reshape(len(texts), length)


def tokenizer_from_dir(path, context_length: int | None = None):
    """Tokenizer for a Hugging Face checkpoint directory -> ``ClipTokenizer`` or ``SiglipTokenizer``.

    CLIP (``vocab.json`` + ``merges.txt``, and ``model_type`` clip in config.json or ``tokenizer_class``
    CLIPTokenizer in tokenizer_config.json): a ``ClipTokenizer``
    (open_clip semantics, see docs/tokenizers.md), after checking that the directory's vocabulary is the
    bundled CLIP one. Otherwise a ``SiglipTokenizer`` from ``spiece.model`` / ``tokenizer.json``.
    ``context_length`` defaults to config.json's ``text_config.max_position_embeddings`` (77 / 64).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory")
    config = _read_json(os.path.join(path, "config.json"))
    model_type = config.get("model_type", "")
    text_len = (config.get("text_config") or config).get("max_position_embeddings")
    names = ("vocab.json", "merges.txt", "tokenizer.json", "spiece.model")
    files = {f for f in names if os.path.isfile(os.path.join(path, f))}
    klass = _read_json(os.path.join(path, "tokenizer_config.json")).get("tokenizer_class") or ""
    if model_type == "chinese_clip" or klass.removesuffix("Fast") == "BertTokenizer":  # BERT WordPiece (Chinese-CLIP)
        from .wordpiece import WordPieceTokenizer

        return WordPieceTokenizer.from_dir(path, context_length or 52)
    is_clip = model_type in ("clip", "clip_text_model") or klass.removesuffix("Fast") == "CLIPTokenizer"
    if {"vocab.json", "merges.txt"} <= files and is_clip:
        _check_clip_vocab(path)
        return ClipTokenizer(context_length or text_len or 77)
    if not files & {"tokenizer.json", "spiece.model"}:
        raise FileNotFoundError(
            f"{path}: no tokenizer files found; expected tokenizer.json or spiece.model (SigLIP / SigLIP 2), "
            f"or vocab.json + merges.txt with model_type 'clip' in config.json (CLIP); found {sorted(files) or 'none'}")
    return SiglipTokenizer(path, context_length or text_len or 64)


def _check_clip_vocab(path: str) -> None:
    """A CLIP directory must hold the bundled vocabulary (HF names the specials <|startoftext|>, ...)."""
    vocab, merges = _clip_vocab()
    theirs = _read_json(os.path.join(path, "vocab.json"))
    with open(os.path.join(path, "merges.txt"), encoding="utf-8") as f:
        lines = f.read().split("\n")
    their_merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    same = (len(theirs) == len(vocab) and all(theirs.get(t) == i for i, t in enumerate(vocab[:-2]))
            and their_merges[: len(merges)] == list(merges))
    if not same:
        raise ValueError(f"{path}: vocab.json / merges.txt differ from the CLIP BPE vocabulary that "
                         "ClipTokenizer implements; this tokenizer is not supported")
