"""``fastclip.tokenizer``: the documented import path of the tokenizers (they live in fastclip/data/tokenizers.py).

    from fastclip.tokenizer import ClipTokenizer, SiglipTokenizer, tokenizer_from_dir
"""
from .data.tokenizers import ClipTokenizer, SiglipTokenizer, tokenizer_from_dir

__all__ = ["ClipTokenizer", "SiglipTokenizer", "tokenizer_from_dir"]
