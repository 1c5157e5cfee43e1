"""Sentences from real English text for the synthetic corpus (``harken synth --text-file``).

The template generator (:mod:`.textgen`) knows about 1,500 words; a recogniser trained on it alone
has never had to spell most English words (two thirds of the word types in harken's real dev set are
not among them).  Any plain-text file widens that: prose, quotations, a book.  Two layouts are read:

* fortune files (Debian's ``fortunes``: entries separated by lines holding only ``%``), and
* plain text (paragraphs separated by blank lines).

Each entry's attribution lines (starting with ``--``) are dropped, lines are joined, and the text is
cut into sentences at ``.``, ``!`` and ``?``.  A sentence is kept when it looks like something a person
would say: only letters, digits and ordinary punctuation (no code, markup, URLs or ASCII art), at
least one lowercase letter, ``min_words``..``max_words`` words after normalisation, and no word over
``MAX_WORD_LETTERS`` letters.  Kept sentences are normalised (:func:`harken.text.normalize.normalize_text`),
de-duplicated and sorted, so the result depends only on the files' contents.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from harken.text.normalize import normalize_text

MAX_WORD_LETTERS = 16
_ALLOWED = re.compile(r"^[A-Za-z0-9 .,;:!?'\"\-\u2019\u2018\u201c\u201d]+$")
_SENT_END = re.compile(r"(?<=[.!?])[\"'\u201d\u2019]?\s+")
_ATTRIBUTION = re.compile(r"^\s*--")
_ABBREV_END = re.compile(r"\b(mr|mrs|ms|dr|st|jr|sr|vs|etc|prof|rev|gen|col|capt|lt|sgt|no|mt)\.$", re.I)


def entries(text: str) -> list[str]:
    """The entries of a fortune file (``%`` lines) or the paragraphs of plain text, attribution lines
    removed, each joined into one line."""
    if re.search(r"^%\s*$", text, flags=re.M):
        parts = re.split(r"^%\s*$", text, flags=re.M)
    else:
        parts = re.split(r"\n\s*\n", text)
    out = []
    for p in parts:
        lines = [ln.strip() for ln in p.splitlines() if ln.strip() and not _ATTRIBUTION.match(ln)]
        if lines:
            out.append(" ".join(lines))
    return out


def sentences_of(entry: str, min_words: int = 3, max_words: int = 20) -> list[str]:
    """The speakable sentences of one entry, normalised."""
    pieces: list[str] = []
    for piece in _SENT_END.split(entry):  # "Mr. Smith" is one sentence, not two
        if pieces and _ABBREV_END.search(pieces[-1]):
            pieces[-1] += " " + piece
        else:
            pieces.append(piece)
    out = []
    for s in pieces:
        s = re.sub(r"\s+", " ", s).strip()
        if not s or not _ALLOWED.match(s) or not re.search(r"[a-z]", s):
            continue
        n = normalize_text(s)
        words = n.split()
        if min_words <= len(words) <= max_words and all(len(w.replace("'", "")) <= MAX_WORD_LETTERS for w in words):
            out.append(n)
    return out


def read_sentences(paths: Iterable[str | Path], min_words: int = 3, max_words: int = 20) -> list[str]:
    """Unique normalised sentences from text files (a directory: every regular file in it that is not a
    fortune index, ``*.dat``), sorted.  Undecodable bytes are replaced; a missing path is an error."""
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files.extend(sorted(f for f in p.iterdir() if f.is_file() and f.suffix not in (".dat", ".u8")))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"text file not found: {p}")
    found: set[str] = set()
    for f in files:
        for e in entries(f.read_text(encoding="utf-8", errors="replace")):
            found.update(sentences_of(e, min_words, max_words))
    return sorted(found)
