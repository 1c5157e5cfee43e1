"""Transcript normalisation shared across harken (training, evaluation, the corpus, the tokenizer),
and spoken forms of numbers.

Normalised text is lowercase ASCII letters, apostrophes inside words and single spaces.
"""

from __future__ import annotations

import re
import unicodedata

_APOS = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'", "\u00b4": "'"})
_DIGITS = re.compile(r"\d+")
_NOT_ALLOWED = re.compile(r"[^a-z' ]+")
_EDGE_APOS = re.compile(r"(?<![a-z])'+|'+(?![a-z])")
_SPACES = re.compile(r" +")
# titles that have one spoken form (what a TTS voice says and a listener writes); "dr" (doctor/drive)
# and "st" (saint/street) are ambiguous and stay as written
_TITLES = re.compile(r"\b(mr|mrs)\b\.?")
_TITLE_WORDS = {"mr": "mister", "mrs": "missus"}


def normalize_text(s: str, expand_numbers: bool = True) -> str:
    """Normalize a transcript: lowercase ASCII letters, apostrophes inside words, single spaces.

    Accented letters are folded to ASCII ("café" -> "cafe"). With ``expand_numbers`` runs of digits
    are spelled out as a cardinal ("3 cats" -> "three cats"), otherwise they are dropped. Every other
    character (punctuation, hyphens, symbols) becomes a word break; apostrophes survive only between
    letters ("don't" stays, "'quoted'" loses them). "Mr."/"Mrs." are written as spoken ("mister",
    "missus"), so a recogniser is not scored wrong for the abbreviation.
    """
    s = unicodedata.normalize("NFKD", str(s)).translate(_APOS)
    s = "".join(c for c in s if not unicodedata.combining(c))
    s = s.lower()
    s = _TITLES.sub(lambda m: _TITLE_WORDS[m.group(1)], s)
    if expand_numbers:
        s = _DIGITS.sub(lambda m: " " + _digits_to_words(m.group(0)) + " ", s)
    s = _NOT_ALLOWED.sub(" ", s)
    s = _EDGE_APOS.sub(" ", s)
    return _SPACES.sub(" ", s).strip()


def _digits_to_words(d: str) -> str:
    if len(d) > 1 and d.startswith("0") or len(d) > 12:
        return " ".join(_ONES[int(c)] if c != "0" else "zero" for c in d)
    return number_to_words(int(d))


# spoken numbers -------------------------------------------------------------------------------

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
         "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_SCALES = [(10**9, "billion"), (10**6, "million"), (1000, "thousand")]
_ORD_IRREGULAR = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
                  "nine": "ninth", "twelve": "twelfth"}


def number_to_words(n: int) -> str:
    """Cardinal in words without "and": 125 -> "one hundred twenty five"."""
    n = int(n)
    if n < 0:
        return "minus " + number_to_words(-n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        t, o = divmod(n, 10)
        return _TENS[t] + ("" if o == 0 else " " + _ONES[o])
    if n < 1000:
        h, r = divmod(n, 100)
        return _ONES[h] + " hundred" + ("" if r == 0 else " " + number_to_words(r))
    for value, name in _SCALES:
        if n >= value:
            q, r = divmod(n, value)
            return number_to_words(q) + " " + name + ("" if r == 0 else " " + number_to_words(r))
    raise AssertionError("unreachable")


def ordinal_words(n: int) -> str:
    """Ordinal in words: 3 -> "third", 21 -> "twenty first", 40 -> "fortieth"."""
    words = number_to_words(n).split()
    last = words[-1]
    if last in _ORD_IRREGULAR:
        last = _ORD_IRREGULAR[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last = last + "th"
    return " ".join(words[:-1] + [last])


def year_words(y: int) -> str:
    """A year as spoken: 1984 -> "nineteen eighty four", 2005 -> "two thousand five",
    2023 -> "twenty twenty three", 1900 -> "nineteen hundred"."""
    if 2000 <= y < 2010:
        return number_to_words(y)
    hi, lo = divmod(y, 100)
    if lo == 0:
        return number_to_words(hi) + " hundred"
    if lo < 10:
        return number_to_words(hi) + " oh " + _ONES[lo]
    return number_to_words(hi) + " " + number_to_words(lo)


def digits_words(s: str) -> str:
    """Read a digit string one digit at a time ("0" is read as "oh" or "zero")."""
    return " ".join("zero" if c == "0" else _ONES[int(c)] for c in s)
