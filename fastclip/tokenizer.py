"""``fastclip.tokenizer``: the documented import path of the tokenizers (they live in fastclip/data/tokenizers.py).

    from fastclip.tokenizer import ClipTokenizer, SiglipTokenizer, tokenizer_from_dir

``HFTokenizer`` (open_clip's HFTokenizer: its text cleaning, then a directory's tokenizer.json; MetaCLIP 2's
XLM-V / mT5 tokenizers) is defined here.
"""
from __future__ import annotations

import base64
import html
import os
import string
import threading
from collections.abc import Sequence

import ftfy
import torch
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors

from .data.tokenizers import ClipTokenizer, SiglipTokenizer, _check_texts, _read_json, _token_str, tokenizer_from_dir
from .data.wordpiece import WordPieceTokenizer

__all__ = ["ClipTokenizer", "SiglipTokenizer", "tokenizer_from_dir", "HFTokenizer", "WordPieceTokenizer"]


# ---------------------------------------------------------------------------------------------------
# open_clip's HFTokenizer (MetaCLIP 2: XLM-V / mT5 vocabularies)
# ---------------------------------------------------------------------------------------------------
_TRANS_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _basic_clean(text: str) -> str:
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def _whitespace(text: str) -> str:
    return " ".join(text.split()).strip()


def _canonicalize(text: str) -> str:
    """open_clip's canonicalize_text: '_' -> ' ', ASCII punctuation removed, lower-cased, whitespace collapsed."""
    return " ".join(text.replace("_", " ").translate(_TRANS_PUNCTUATION).lower().split()).strip()


# open_clip's get_clean_fn, and "none" (transformers' tokenizer as it is)
CLEAN_FNS = {
    "whitespace": lambda t: _whitespace(_basic_clean(t)),
    "lower": lambda t: _whitespace(_basic_clean(t)).lower(),
    "canonicalize": lambda t: _canonicalize(_basic_clean(t)),
    "none": lambda t: t,
}


# Tokenizer classes whose pipeline transformers 5 rebuilds from the file's vocabulary and charsmap (their
# __init__), whatever normalizer / pre-tokenizer the tokenizer.json holds -> whether its template opens with bos
_REBUILT = {"XLMRobertaTokenizer": True, "T5Tokenizer": False}
_CLASS_OF_MODEL_TYPE = {"metaclip_2": "XLMRobertaTokenizer", "xlm-roberta": "XLMRobertaTokenizer",
                        "t5": "T5Tokenizer", "mt5": "T5Tokenizer"}  # transformers' AutoTokenizer table


def _charsmap(tokenizer_json: dict) -> bytes | None:
    """The sentencepiece charsmap of a tokenizer.json's Precompiled normalizer (inside a Sequence or not)."""
    norm = tokenizer_json.get("normalizer") or {}
    for n in norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]:
        if n.get("type") == "Precompiled" and n.get("precompiled_charsmap"):
            return base64.b64decode(n["precompiled_charsmap"])
    return None


# the sentencepiece file each class reads when a directory has no tokenizer.json
_SPM_FILES = {"XLMRobertaTokenizer": ("sentencepiece.bpe.model",), "T5Tokenizer": ("spiece.model",)}


def _spm_proto(model_file: str):
    from sentencepiece import sentencepiece_model_pb2 as pb

    with open(model_file, "rb") as f:
        return pb.ModelProto.FromString(f.read())


def _from_sentencepiece(model_file: str, klass: str, cfg: dict) -> Tokenizer:
    """The Unigram tokenizer transformers 5 builds from a sentencepiece file alone: XLM-R's fairseq layout
    (``<s> <pad> </s> <unk>``, the file's pieces after its first three, ``<mask>``) or T5's (the file's pieces,
    then ``extra_ids`` sentinels); special tokens: the class's, the file's control / user-defined pieces and
    T5's sentinels. Normalizer, pre-tokenizer and post-processor are set by the caller."""
    proto = _spm_proto(model_file)
    pieces = [(p.piece, p.score) for p in proto.pieces]
    names = {k: _token_str(cfg.get(f"{k}_token")) for k in ("bos", "eos", "unk", "pad", "mask")}
    if klass == "XLMRobertaTokenizer":
        first = [names["bos"] or "<s>", names["pad"] or "<pad>", names["eos"] or "</s>", names["unk"] or "<unk>"]
        specials = [*first, names["mask"] or "<mask>"]
        vocab, unk_id = [(t, 0.0) for t in first] + pieces[3:] + [(specials[-1], 0.0)], 3
    else:
        sentinels = [f"<extra_id_{i}>" for i in range(int(cfg.get("extra_ids", 100)) - 1, -1, -1)]
        specials = [names["eos"] or "</s>", names["unk"] or "<unk>", names["pad"] or "<pad>", *sentinels]
        vocab, unk_id = pieces + [(t, 0.0) for t in sentinels], 2
    tok = Tokenizer(models.Unigram(vocab, unk_id=unk_id, byte_fallback=False))
    control = [p.piece for p in proto.pieces if p.type == 3]  # sentencepiece CONTROL pieces
    user = [p.piece for p in proto.pieces if p.type == 4]  # USER_DEFINED pieces: added, not special
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(specials + control)])
    if user:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    return tok


class HFTokenizer:
    """open_clip's ``HFTokenizer`` over a Hugging Face tokenizer directory (``tokenizer.json``, or for
    XLMRobertaTokenizer / T5Tokenizer their sentencepiece file alone, converted as transformers 5 does): each text
    cleaned as ``clean`` says (open_clip's ``whitespace``: ftfy, HTML unescaped twice, whitespace collapsed;
    ``lower``: also lower-cased; ``canonicalize``: also ASCII punctuation and '_' removed, lower-cased;
    ``none``: as transformers' tokenizer takes it), then what transformers' ``AutoTokenizer`` for the
    directory does with ``max_length=L, padding="max_length", truncation=True``: the vocabulary and
    special tokens of the file; for ``XLMRobertaTokenizer`` (XLM-V) and ``T5Tokenizer`` (mT5) the
    pipeline transformers 5 rebuilds (the file's sentencepiece charsmap as the only normalizer,
    whitespace split + Metaspace, ``<s> $A </s>`` / ``$A </s>``), else the file's own; right truncation
    to L keeping the special tokens (eos stays last), padding with the pad token (on the right unless
    tokenizer_config.json says otherwise).
    ``tok(texts)`` -> LongTensor (B, L).

    Attributes: ``context_length``, ``clean``, ``vocab_size``, ``pad_token_id``, ``eos_token_id``.
    """

    def __init__(self, path, context_length: int = 77, clean: str = "whitespace"):
        path = os.fspath(path)
        if clean not in CLEAN_FNS:
            raise ValueError(f"clean must be one of {', '.join(CLEAN_FNS)}, got {clean!r}")
        file = os.path.join(path, "tokenizer.json")
        cfg = _read_json(os.path.join(path, "tokenizer_config.json"))
        if "added_tokens_decoder" not in cfg:
            cfg.update(_read_json(os.path.join(path, "special_tokens_map.json")))
        klass = (cfg.get("tokenizer_class") or "").removesuffix("Fast") or _CLASS_OF_MODEL_TYPE.get(
            _read_json(os.path.join(path, "config.json")).get("model_type", ""), "")
        spm_file = next((os.path.join(path, f) for f in _SPM_FILES.get(klass, ()) if os.path.isfile(os.path.join(path, f))),
                        None)
        if not os.path.isfile(file) and spm_file is None:
            found = sorted(os.listdir(path)) if os.path.isdir(path) else "no directory"
            raise FileNotFoundError(
                f"{path} has no tokenizer.json (found {found}), nor the sentencepiece file of an XLMRobertaTokenizer / "
                "T5Tokenizer directory; write one with transformers: "
                "AutoTokenizer.from_pretrained(<repo or dir>).save_pretrained(<dir>)")
        bos, eos, pad = (_token_str(cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token"))
        if os.path.isfile(file):
            self._tok = tok = Tokenizer.from_file(file)
            charsmap = _charsmap(_read_json(file)) if klass in _REBUILT else None
        else:
            self._tok = tok = _from_sentencepiece(spm_file, klass, cfg)
            charsmap = _spm_proto(spm_file).normalizer_spec.precompiled_charsmap or None
        if klass in _REBUILT:
            tok.normalizer = normalizers.Precompiled(charsmap) if charsmap is not None else None
            scheme = "always" if cfg.get("add_prefix_space", True) else "never"
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)])
            bos, eos = (bos or "<s>") if _REBUILT[klass] else None, eos or "</s>"
            single = [bos, "$A", eos] if bos else ["$A", eos]
            tok.post_processor = processors.TemplateProcessing(
                single=single, special_tokens=[(t, tok.token_to_id(t)) for t in (bos, eos) if t])
        pad = pad or (tok.padding or {}).get("pad_token") or "<pad>"
        if tok.token_to_id(pad) is None:
            raise ValueError(f"{path}: the pad token {pad!r} is not in the tokenizer's vocabulary")
        self.clean, self._clean = clean, CLEAN_FNS[clean]
        self.context_length = int(context_length)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=False)
        self.pad_token_id = tok.token_to_id(pad)
        self.eos_token_id = tok.token_to_id(eos) if eos else None
        self._pad = pad
        self._pad_side = cfg.get("padding_side") or (tok.padding or {}).get("direction") or "right"
        self._trunc_side = cfg.get("truncation_side") or (tok.truncation or {}).get("direction") or "right"
        self._configured: int | None = None
        self._lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        """Ids of one cleaned text, without special tokens, truncation or padding."""
        (text,) = _check_texts([text])
        with self._lock:
            self._tok.no_truncation()
            self._tok.no_padding()
            self._configured = None
            return self._tok.encode(self._clean(text), add_special_tokens=False).ids

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.LongTensor:
        """Tokenize a text or a batch -> LongTensor (B, L), L = context_length or self.context_length."""
        texts = [self._clean(t) for t in _check_texts(texts)]
        length = int(context_length or self.context_length)
        if length < 1:
            raise ValueError(f"context_length must be >= 1, got {length}")
        with self._lock:  # the Rust tokenizer holds truncation/padding state: set it as transformers does
            if self._configured != length:
                self._tok.enable_truncation(length, direction=self._trunc_side)
                self._tok.enable_padding(direction=self._pad_side, pad_id=self.pad_token_id, pad_token=self._pad,
                                         length=length)
                self._configured = length
            encs = self._tok.encode_batch(texts, add_special_tokens=True)
        return torch.tensor([e.ids for e in encs], dtype=torch.long).reshape(len(texts), length)
