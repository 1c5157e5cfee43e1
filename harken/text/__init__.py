"""Text processing: normalization and tokenizers (char, sentencepiece BPE/unigram)."""

from harken.text.normalize import normalize_text
from harken.text.tokenizer import (
    BLANK,
    BLANK_ID,
    SPACE,
    UNK,
    UNK_ID,
    BpeTokenizer,
    CharTokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
    tokenizer_from_dict,
)

__all__ = [
    "BLANK",
    "BLANK_ID",
    "SPACE",
    "UNK",
    "UNK_ID",
    "BpeTokenizer",
    "CharTokenizer",
    "Tokenizer",
    "build_tokenizer",
    "load_tokenizer",
    "normalize_text",
    "tokenizer_from_dict",
]
