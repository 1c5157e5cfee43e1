"""Character and BPE/unigram (sentencepiece) tokenizers.

Every tokenizer has ``<blk>`` (CTC blank) at id 0 and ``<unk>`` at id 1.
Word boundaries are the symbol ``▁`` (U+2581).  ``tokens.txt`` is written in
sherpa-onnx format: one ``symbol id`` per line.
"""

from __future__ import annotations

import abc
import base64
import io
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable

BLANK = "<blk>"
UNK = "<unk>"
BLANK_ID = 0
UNK_ID = 1
SPACE = "\u2581"  # ▁

log = logging.getLogger(__name__)

__all__ = [
    "BLANK",
    "BLANK_ID",
    "UNK",
    "UNK_ID",
    "SPACE",
    "Tokenizer",
    "CharTokenizer",
    "BpeTokenizer",
    "build_tokenizer",
    "load_tokenizer",
    "tokenizer_from_dict",
]


def _write_tokens_txt(tokens: list[str], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i, tok in enumerate(tokens):
            f.write(f"{tok} {i}\n")


def _read_tokens_txt(path: Path) -> list[str]:
    pairs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            sym, idx = line.rsplit(" ", 1)
            pairs.append((int(idx), sym))
    pairs.sort()
    if [i for i, _ in pairs] != list(range(len(pairs))):
        raise ValueError(f"{path}: ids are not 0..N-1")
    return [s for _, s in pairs]


class Tokenizer(abc.ABC):
    """Common interface."""

    kind = "base"
    blank_id = BLANK_ID
    unk_id = UNK_ID
    tokens: list[str]

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        ...

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        ...

    def id_to_token(self, i: int) -> str:
        return self.tokens[i]

    @abc.abstractmethod
    def save(self, path: str | os.PathLike) -> None:
        ...

    @abc.abstractmethod
    def to_dict(self) -> dict[str, Any]:
        ...

    def __len__(self) -> int:
        return self.vocab_size


class CharTokenizer(Tokenizer):
    """Characters of the (normalized) training text; space -> ``▁``.

    Layout: ``<blk>`` 0, ``<unk>`` 1, ``▁`` 2, then the other characters in
    code-point order.  ``decode`` drops blanks and ``<unk>`` and maps ``▁``
    to spaces (collapsed, stripped)."""

    kind = "char"

    def __init__(self, tokens: list[str]):
        if tokens[:2] != [BLANK, UNK]:
            raise ValueError("tokens must start with <blk>, <unk>")
        self.tokens = list(tokens)
        self._id = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def build(cls, texts: Iterable[str]) -> "CharTokenizer":
        chars: set[str] = set()
        for t in texts:
            chars.update(t)
        chars -= {" ", "\t", "\n", "\r", SPACE}
        return cls([BLANK, UNK, SPACE] + sorted(chars))

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        sp = self._id.get(SPACE, UNK_ID)
        for wi, word in enumerate(text.split()):
            if wi:
                ids.append(sp)
            ids.extend(self._id.get(c, UNK_ID) for c in word)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        n = len(self.tokens)
        for i in ids:
            i = int(i)
            if i <= UNK_ID or i >= n:
                continue
            out.append(self.tokens[i])
        return " ".join("".join(out).replace(SPACE, " ").split())

    def save(self, path: str | os.PathLike) -> None:
        """``path``: a directory (writes ``tokens.txt`` in it) or a file path."""
        p = Path(path)
        if p.suffix != ".txt":
            p.mkdir(parents=True, exist_ok=True)
            p = p / "tokens.txt"
        _write_tokens_txt(self.tokens, p)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CharTokenizer":
        p = Path(path)
        if p.is_dir():
            p = p / "tokens.txt"
        return cls(_read_tokens_txt(p))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "char", "tokens": list(self.tokens)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CharTokenizer":
        return cls(d["tokens"])


class BpeTokenizer(Tokenizer):
    """sentencepiece BPE (or unigram) model trained with ``pad_id=0`` (piece
    ``<blk>``), ``unk_id=1``, no BOS/EOS, so its ids are directly the CTC
    output ids.  ``decode`` drops blank/unk ids."""

    kind = "bpe"

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self.model_proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        if self.sp.piece_to_id(BLANK) != BLANK_ID or self.sp.unk_id() != UNK_ID:
            raise ValueError("sentencepiece model must have <blk>=0 and <unk>=1")
        self.tokens = [self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size())]
        self.tokens[UNK_ID] = UNK

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        model_type: str = "bpe",
        out_file: str | os.PathLike | None = None,
    ) -> "BpeTokenizer":
        """Train on an iterable of normalized texts.  ``vocab_size`` includes
        ``<blk>`` and ``<unk>``; it is a soft limit: a text that supports fewer
        pieces gets the largest vocabulary it gives (logged), not an error.  For
        BPE that is the point where every word of the text is one piece, so a
        small vocabulary (30 command words) asked for with a large
        ``vocab_size`` yields word-level units.  A ``vocab_size`` below the
        number of distinct characters (+2) raises ValueError."""
        import sentencepiece as spm

        texts = [t for t in texts if t.strip()]
        if not texts:
            raise ValueError(f"{model_type} tokenizer: no training text (every transcript is empty)")
        buf = io.BytesIO()
        try:
            _train_sentencepiece(spm, texts, buf, vocab_size, model_type)
        except RuntimeError as e:
            m = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(e))
            if m:
                raise ValueError(f"{model_type} tokenizer: vocab_size={m.group(1)} is smaller than the {m.group(2)} "
                                 "pieces the training text needs at least (one per character and the word mark, "
                                 f"plus <blk> and <unk>); use vocab_size >= {m.group(2)}, or tokenizer.kind=char"
                                 ) from None
            why = " ".join(str(e).split())
            raise ValueError(f"{model_type} tokenizer: sentencepiece could not train on this text "
                             f"(vocab_size={vocab_size}): {why[:300]}") from None
        tok = cls(buf.getvalue())
        if tok.vocab_size < vocab_size:
            words = {w for t in texts for w in t.split()}
            whole = sum(len(tok.sp.encode(w, out_type=int)) == 1 for w in words)
            log.info("%s tokenizer: vocab_size=%d is more than this text supports; using its largest vocabulary, "
                     "%d pieces (%d of its %d distinct words are one piece each)", model_type, vocab_size,
                     tok.vocab_size, whole, len(words))
        if out_file is not None:
            tok.save(out_file)
        return tok

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(" ".join(text.split()), out_type=int))

    def decode(self, ids: Iterable[int]) -> str:
        n = len(self.tokens)
        keep = [int(i) for i in ids if UNK_ID < int(i) < n]
        return " ".join(self.sp.decode(keep).split())

    def save(self, path: str | os.PathLike) -> None:
        """``path``: a directory (writes ``bpe.model`` and ``tokens.txt``) or a
        ``*.model`` file (``tokens.txt`` written next to it)."""
        p = Path(path)
        if p.suffix != ".model":
            p.mkdir(parents=True, exist_ok=True)
            p = p / "bpe.model"
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(self.model_proto)
        _write_tokens_txt(self.tokens, p.parent / "tokens.txt")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BpeTokenizer":
        p = Path(path)
        if p.is_dir():
            p = p / "bpe.model"
        return cls(p.read_bytes())

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "bpe",
            "model_proto": base64.b64encode(self.model_proto).decode("ascii"),
            "tokens": list(self.tokens),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BpeTokenizer":
        return cls(base64.b64decode(d["model_proto"]))


def _train_sentencepiece(spm, texts: list[str], writer, vocab_size: int, model_type: str) -> None:
    """sentencepiece with harken's id layout (``<blk>`` 0 as its pad piece, ``<unk>`` 1, no
    BOS/EOS) and ``hard_vocab_limit=False`` (``vocab_size`` is an upper bound)."""
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=writer,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        pad_id=BLANK_ID,
        pad_piece=BLANK,
        unk_id=UNK_ID,
        unk_piece=UNK,
        bos_id=-1,
        eos_id=-1,
        hard_vocab_limit=False,
        split_digits=True,
        num_threads=2,
        minloglevel=2,
    )


def build_tokenizer(
    kind: str,
    texts: Iterable[str],
    vocab_size: int | None = None,
    out_dir: str | os.PathLike | None = None,
) -> Tokenizer:
    """kind: "char", "bpe" or "unigram" (sentencepiece unigram, same class).
    Saves into ``out_dir`` when given."""
    if kind == "char":
        tok: Tokenizer = CharTokenizer.build(texts)
    elif kind in ("bpe", "unigram"):
        if not vocab_size:
            raise ValueError(f"{kind} tokenizer needs vocab_size")
        tok = BpeTokenizer.train(texts, vocab_size, model_type=kind)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    if out_dir is not None:
        tok.save(out_dir)
    return tok


def load_tokenizer(dir_or_file: str | os.PathLike) -> Tokenizer:
    """Directory with ``bpe.model`` -> BPE; with only ``tokens.txt`` -> char.
    A ``*.model`` file -> BPE; a ``*.txt`` file -> char."""
    p = Path(dir_or_file)
    if p.is_dir():
        if (p / "bpe.model").exists():
            return BpeTokenizer.load(p / "bpe.model")
        if (p / "tokens.txt").exists():
            return CharTokenizer.load(p / "tokens.txt")
        raise FileNotFoundError(f"no bpe.model or tokens.txt in {p}")
    if p.suffix == ".model":
        return BpeTokenizer.load(p)
    return CharTokenizer.load(p)


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Inverse of ``Tokenizer.to_dict()`` (for checkpoints)."""
    if d["kind"] == "char":
        return CharTokenizer.from_dict(d)
    if d["kind"] == "bpe":
        return BpeTokenizer.from_dict(d)
    raise ValueError(f"unknown tokenizer kind {d['kind']!r}")
