"""Transcript normalisation shared by training, evaluation and the corpus: lowercase ASCII letters,
apostrophes inside words, single spaces."""

from __future__ import annotations

import re
import unicodedata

_SPACE_LIKE = re.compile(r"[-_/\\.,;:!?\"()\[\]{}<>|~`@#$%^&*+=\s]+")
_NOT_ALLOWED = re.compile(r"[^a-z' ]+")
_EDGE_APOS = re.compile(r"(^|\s)'+|'+(?=\s|$)")


def normalize_text(text: str) -> str:
    """``"Hello, World -- it's 5 O'Clock!"`` -> ``"hello world it's o'clock"``.

    Digits are dropped, not spelled out: text that carries numbers should be written out before
    (the built-in corpus writes numbers as words)."""
    t = unicodedata.normalize("NFKD", text)
    t = "".join(c for c in t if not unicodedata.combining(c)).lower()
    t = t.replace("\u2019", "'").replace("`", "'")
    t = _SPACE_LIKE.sub(" ", t)
    t = _NOT_ALLOWED.sub("", t)
    t = _EDGE_APOS.sub(" ", t)
    return " ".join(t.split())
