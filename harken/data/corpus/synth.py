"""Build the built-in synthetic corpus (``harken synth``).

Layout of ``out_dir``::

    wav/<split>/<id>.wav     16 kHz mono PCM16
    <split>.jsonl            manifests (audio paths relative to out_dir)
    plan.jsonl               what each utterance should be (text, voice, prosody, level, channel, fingerprint)
    corpus.json              summary: config, voices per split, counts, hours, vocabulary, OOV

Splits: ``train``; ``dev`` and ``test_seen`` (voices of train, unseen sentences); ``test_unseen``
(held-out voices never used in train, unseen sentences). No sentence is in two splits.

What varies, per utterance (so the corpus teaches speech rather than one voice):

* the engine, by ``engine_shares`` (renormalised over the engines present in a split; each engine's
  share spread evenly over its voices), so the natural voices (flite, festival, piper) are not
  drowned by espeak's many variants;
* for espeak, with ``espeak_variants="wide"``, the accent (evenly over the train accents) and the
  voice variant (alternately female and male, evenly over the variants of
  :data:`~harken.data.corpus.voices.ESPEAK_VARIANTS_FEMALE` / ``_MALE`` that no held-out voice
  uses); dev and test_seen draw from the accent+variant voices train actually used;
* speed (``speed_range``) and pitch (``pitch_range``, semitones);
* the level: a uniform RMS level in ``level_db`` dBFS, the peak capped at ``peak_db``;
* for a ``codec_fraction`` of train utterances, a GSM (8 kHz, 13 kbit/s) or Opus (8-24 kbit/s)
  round trip through ffmpeg, recorded as the manifest's ``extra.channel`` ("clean" otherwise); a
  codec this machine's ffmpeg lacks is skipped with a warning (those utterances stay clean);
* a noise floor (white or pink) ``floor_snr_db`` below the utterance's RMS level, never below
  -84 dBFS (about 2 LSB in 16-bit PCM): no run of exact zeros is left anywhere.

Every manifest record carries ``speaker`` (the voice id), ``group`` (the espeak accent or the
engine name) and ``extra`` with ``engine``, ``channel``, ``speed``, ``pitch`` and ``level_db``.

Everything is deterministic from the config (texts, voice per utterance, prosody, level, channel,
noise), the work is spread over a process pool, and a re-run skips utterances whose wav is already
there and whose fingerprint (every parameter that shapes the audio) is unchanged, so an interrupted
build continues where it stopped and a changed setting regenerates only the utterances it changes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import multiprocessing as mp
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from harken.audio import SAMPLE_RATE, save_wav
from harken.data.manifest import Record, write_manifest
from harken.fsutil import atomic_open

from .textgen import make_splits, vocab_stats
from .voices import (
    ENGINES,
    ESPEAK_VARIANTS_FEMALE,
    ESPEAK_VARIANTS_MALE,
    SynthesisError,
    Voice,
    espeak_voice,
    select_voices,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test_seen", "test_unseen")
SPEED_RANGE = (0.8, 1.3)
PITCH_RANGE = (-4.0, 4.0)  # semitones
LEVEL_RANGE = (-50.0, -15.0)  # dBFS RMS (the peak cap trims the top: about 30 dB are reached)
PEAK_DB = -1.0  # highest peak a level may reach (dBFS)
FLOOR_SNR_RANGE = (40.0, 60.0)  # dB below the utterance's RMS level
FLOOR_MIN_DB = -84.0  # dBFS RMS: about 2 LSB of 16-bit PCM, so rounding never leaves zero runs
CODECS = ("gsm", "opus")
OPUS_BITRATES = (8, 12, 16, 24)  # kbit/s
# default engine mix: natural voices get more than their voice count would give them. Piper is the
# slowest engine (~0.25 s of CPU per utterance); at 0.2 the 3,600-utterance demo corpus builds in
# about 5 minutes on 2 cores.
ENGINE_SHARES = {"espeak": 0.45, "flite": 0.2, "festival": 0.15, "piper": 0.2}
HOLDOUT_ESPEAK_FRACTION = 0.22
# bump when the audio a given plan row produces changes, so old wavs are not reused
RENDER_VERSION = 2
# relative cost per utterance, used to schedule the slow engines first
_COST = {"piper": 30.0, "festival": 20.0, "flite": 3.0, "espeak": 1.0}


def _pair(x, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in x)
    except (TypeError, ValueError):
        raise SynthesisError(f"corpus {name} must be a [low, high] pair, got {x!r}") from None
    if lo > hi:
        raise SynthesisError(f"corpus {name} must be [low, high] with low <= high, got {list(x)}")
    return lo, hi


def parse_engine_shares(text: str) -> dict[str, float] | None:
    """``"espeak=0.45,flite=0.2"`` -> ``{"espeak": 0.45, "flite": 0.2}``; ``"none"`` -> None."""
    if text.strip().lower() in ("none", "even", ""):
        return None
    out: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise SynthesisError(f"engine shares: expected ENGINE=SHARE[,ENGINE=SHARE...], got {part.strip()!r} "
                                 f"(engines: {', '.join(ENGINES)})") from None
    return out


@dataclass
class CorpusConfig:
    seed: int = 1234
    train_utts: int = 3000
    dev_utts: int = 200
    test_seen_utts: int = 200
    test_unseen_utts: int = 200
    # share of each engine's utterances (renormalised over the engines present); None: every voice
    # gets the same number of utterances, whatever its engine
    engine_shares: dict[str, float] | None = field(default_factory=lambda: dict(ENGINE_SHARES))
    # if set, piper's exact share of every split; the other engines divide the rest by engine_shares
    piper_fraction: float | None = None
    voices: list[str] | None = None  # None = all available; else ids or engine names
    holdout: list[str] | None = None  # None = automatic choice
    # "wide": espeak accent and variant chosen per utterance (see the module doc); "listed": only
    # the espeak voices of the voice list (evenly over accents, then over each accent's voices)
    espeak_variants: str = "wide"
    speed_range: tuple[float, float] = SPEED_RANGE
    pitch_range: tuple[float, float] = PITCH_RANGE  # semitones
    level_db: tuple[float, float] | None = LEVEL_RANGE  # dBFS RMS; None: every voice peaks at -3 dBFS
    peak_db: float = PEAK_DB
    floor_snr_db: tuple[float, float] | None = FLOOR_SNR_RANGE  # None: no noise floor
    codec_fraction: float = 0.1  # of train utterances, through a codec round trip
    codecs: tuple[str, ...] = CODECS
    # real English text (harken.data.corpus.textfile): text_share of the train sentences are drawn from
    # these files instead of the templates (dev and the test sets stay template text)
    text_files: list[str] | None = None
    text_share: float = 0.0

    def __post_init__(self) -> None:
        if self.engine_shares is not None:
            shares = dict(self.engine_shares)
            for e, w in shares.items():
                if e not in ENGINES:
                    raise SynthesisError(f"corpus engine_shares: unknown engine '{e}' (engines: {', '.join(ENGINES)})")
                if not (isinstance(w, (int, float)) and w >= 0):
                    raise SynthesisError(f"corpus engine_shares: share of '{e}' must be a number >= 0, got {w!r}")
            self.engine_shares = shares
        if self.piper_fraction is not None and not 0.0 <= float(self.piper_fraction) <= 1.0:
            raise SynthesisError(f"corpus piper_fraction must be in [0, 1], got {self.piper_fraction}")
        if not 0.0 <= float(self.text_share) <= 1.0:
            raise SynthesisError(f"corpus text_share must be in [0, 1], got {self.text_share}")
        if self.text_share > 0 and not self.text_files:
            raise SynthesisError("corpus text_share > 0 needs text_files (--text-file)")
        if self.espeak_variants not in ("wide", "listed"):
            raise SynthesisError(f"corpus espeak_variants must be 'wide' or 'listed', got {self.espeak_variants!r}")
        self.speed_range = _pair(self.speed_range, "speed_range")
        if self.speed_range[0] <= 0:
            raise SynthesisError(f"corpus speed_range must be > 0, got {list(self.speed_range)}")
        self.pitch_range = _pair(self.pitch_range, "pitch_range")
        if self.level_db is not None:
            self.level_db = _pair(self.level_db, "level_db")
            if self.level_db[1] > 0:
                raise SynthesisError(f"corpus level_db must be <= 0 dBFS, got {list(self.level_db)}")
        if not -40.0 <= float(self.peak_db) <= 0.0:
            raise SynthesisError(f"corpus peak_db must be in [-40, 0] dBFS, got {self.peak_db}")
        if self.floor_snr_db is not None:
            self.floor_snr_db = _pair(self.floor_snr_db, "floor_snr_db")
        if not 0.0 <= float(self.codec_fraction) <= 1.0:
            raise SynthesisError(f"corpus codec_fraction must be in [0, 1], got {self.codec_fraction}")
        self.codecs = tuple(self.codecs or ())
        for c in self.codecs:
            if c not in CODECS:
                raise SynthesisError(f"corpus codecs: unknown codec '{c}' (known: {', '.join(CODECS)})")
        if self.codec_fraction > 0 and not self.codecs:
            raise SynthesisError("corpus codec_fraction > 0 needs at least one codec")

    def counts(self) -> dict[str, int]:
        return {"train": int(self.train_utts), "dev": int(self.dev_utts),
                "test_seen": int(self.test_seen_utts), "test_unseen": int(self.test_unseen_utts)}


@dataclass
class Utterance:
    id: str
    split: str
    text: str
    voice: Voice
    speed: float
    pitch: float
    level_db: float | None = None  # RMS dBFS target; None: as the voice made it (peak -3 dBFS)
    peak_db: float = PEAK_DB
    channel: str = "clean"  # clean | gsm | opus
    bitrate: int = 0  # kbit/s, for opus
    floor_snr_db: float | None = None  # noise floor this far below the RMS level; None: no floor
    floor_kind: str = "white"
    noise_seed: int = 0
    fingerprint: str = field(default="")

    def __post_init__(self) -> None:
        if not self.fingerprint:
            self.fingerprint = self.compute_fingerprint()

    def compute_fingerprint(self) -> str:
        """A hash of every parameter that shapes this utterance's audio."""
        level = "-" if self.level_db is None else f"{self.level_db:.3f}/{self.peak_db:.2f}"
        floor = "-" if self.floor_snr_db is None else f"{self.floor_snr_db:.3f}/{self.floor_kind}"
        key = (f"{self.text}|{self.voice.id}|{self.speed:.4f}|{self.pitch:.4f}|v{RENDER_VERSION}|{level}|"
               f"{self.channel}/{self.bitrate}|{floor}|{self.noise_seed}")
        return hashlib.sha1(key.encode()).hexdigest()[:16]

    def wav_path(self, out_dir: str | os.PathLike) -> Path:
        return Path(out_dir) / "wav" / self.split / f"{self.id}.wav"

    def render_params(self) -> dict:
        return {"level_db": self.level_db, "peak_db": self.peak_db, "channel": self.channel,
                "bitrate": self.bitrate, "floor_snr_db": self.floor_snr_db, "floor_kind": self.floor_kind,
                "noise_seed": self.noise_seed}

    def plan_row(self) -> dict:
        return {"id": self.id, "split": self.split, "text": self.text, "voice": self.voice.id,
                "engine": self.voice.engine, "speed": self.speed, "pitch": self.pitch,
                "level_db": self.level_db, "channel": self.channel, "bitrate": self.bitrate,
                "floor_snr_db": self.floor_snr_db, "floor_kind": self.floor_kind,
                "fingerprint": self.fingerprint}


# --------------------------------------------------------------------------------------------------
# planning
# --------------------------------------------------------------------------------------------------

def _stable_key(*parts) -> int:
    return int(hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:12], 16)


def _family(v: Voice) -> str:
    """The recorded speaker behind a voice: flite's slt and festival's slt HTS are one speaker, and so
    are flite kal16 and festival kal diphone. A held-out speaker is held out in every engine."""
    return str(v.params.get("family") or v.id)


def _variant(v: Voice) -> str:
    return v.params.get("name", v.id).split("+", 1)[-1]


def _accent(v: Voice) -> str:
    return v.params.get("name", v.id).split("+", 1)[0].split(":")[-1]

def choose_holdout(voices: list[Voice]) -> list[str]:
    """Held-out voices, chosen deterministically from the voice list alone (not the seed), so
    ``test_unseen`` means the same across seeds.

    * espeak: about 22% of its voices, preferring voice variants that no train voice shares, spread
      over accents (round-robin), never all the voices of an accent.
    * flite / festival: one recorded speaker (``slt`` when it can be), held out in every engine that
      has it, as long as each engine keeps a voice in train.
    * an engine's only voice (piper) is never held out.
    """
    held: set[str] = set()
    espeak = [v for v in voices if v.engine == "espeak"]
    if len(espeak) >= 2:
        k = min(len(espeak) - 1, max(1, round(HOLDOUT_ESPEAK_FRACTION * len(espeak))))
        variants: dict[str, int] = {}
        for v in espeak:
            variants[_variant(v)] = variants.get(_variant(v), 0) + 1
        size: dict[str, int] = {}
        for v in espeak:
            size[v.group] = size.get(v.group, 0) + 1
        unique = [v for v in espeak if variants[_variant(v)] == 1]
        for cands in (unique, espeak):
            groups: dict[str, list[Voice]] = {}
            for v in sorted(cands, key=lambda v: _stable_key("holdout", v.id)):
                if v.id not in held:
                    groups.setdefault(v.group, []).append(v)
            order = sorted(groups, key=lambda g: _stable_key("holdout-group", g))
            taken: dict[str, int] = {}
            for v in espeak:
                if v.id in held:
                    taken[v.group] = taken.get(v.group, 0) + 1
            progress = True
            while len(held) < k and progress:
                progress = False
                for g in order:
                    if len(held) >= k or not groups[g]:
                        continue
                    # keep at least one voice of the accent in train, unless it is the only voice
                    if taken.get(g, 0) + 1 >= size[g] and len(groups) > 1:
                        continue
                    held.add(groups[g].pop(0).id)
                    taken[g] = taken.get(g, 0) + 1
                    progress = True
            if len(held) >= k:
                break
    others = [v for v in voices if v.engine in ("flite", "festival")]
    if others:
        engines_n: dict[str, int] = {}
        for v in voices:
            engines_n[v.engine] = engines_n.get(v.engine, 0) + 1
        families = sorted({_family(v) for v in others},
                          key=lambda f: (f != "slt", _stable_key("holdout-family", f)))
        for fam in families:
            members = [v for v in voices if _family(v) == fam]
            lost: dict[str, int] = {}
            for v in members:
                lost[v.engine] = lost.get(v.engine, 0) + 1
            if all(engines_n[e] - n >= 1 for e, n in lost.items()):
                held.update(v.id for v in members)
                break
    return [v.id for v in voices if v.id in held]


def _engine_counts(n: int, voices: list[Voice], cfg: CorpusConfig) -> dict[str, int] | None:
    """Utterances per engine for a split of ``n`` voiced by ``voices``: ``engine_shares`` (and
    ``piper_fraction``) renormalised over the engines present, rounded by largest remainder.
    ``None`` when no present engine has a share (every voice then gets the same number)."""
    present = [e for e in ENGINES if any(v.engine == e for v in voices)]
    if cfg.engine_shares is None:
        if cfg.piper_fraction is None or "piper" not in present or len(present) == 1:
            return None
        others = {e: float(sum(v.engine == e for v in voices)) for e in present if e != "piper"}
    else:
        others = {e: float(cfg.engine_shares.get(e, 0.0)) for e in present
                  if not (e == "piper" and cfg.piper_fraction is not None)}
    weights = dict(others)
    if cfg.piper_fraction is not None and "piper" in present:
        rest = sum(others.values())
        pf = float(cfg.piper_fraction) if rest > 0 else 1.0
        weights = {e: (1.0 - pf) * w / rest for e, w in others.items()} if rest > 0 else {}
        weights["piper"] = pf
    total = sum(weights.values())
    if total <= 0:
        return None
    raw = {e: n * weights.get(e, 0.0) / total for e in present}
    counts = {e: int(raw[e]) for e in present}
    order = sorted(present, key=lambda e: (-(raw[e] - counts[e]), ENGINES.index(e)))
    for e in order[: n - sum(counts.values())]:
        counts[e] += 1
    return counts


def _cycle(items: list, n: int, rng: random.Random) -> list:
    """``n`` items drawn evenly from ``items``: whole shuffled passes over the list."""
    out: list = []
    while len(out) < n and items:
        order = list(items)
        rng.shuffle(order)
        out.extend(order[: n - len(out)])
    return out


def _wide_espeak(n: int, train_espeak: list[Voice], held: list[Voice], rng: random.Random) -> list[Voice]:
    """``n`` espeak voices, one per utterance: the accent evenly over the train voices' accents, the
    variant alternately female and male, evenly over the wide variant lists and the train voices'
    own variants, never a variant of a held-out voice (so test_unseen's voices stay unheard)."""
    groups: dict[str, str] = {}
    for v in train_espeak:
        groups.setdefault(_accent(v), v.group)
    held_variants = {_variant(v) for v in held if v.engine == "espeak"}
    own = [_variant(v) for v in train_espeak]
    female = [x for x in ESPEAK_VARIANTS_FEMALE if x not in held_variants]
    male = [x for x in dict.fromkeys(list(ESPEAK_VARIANTS_MALE) + own)
            if x not in held_variants and x not in ESPEAK_VARIANTS_FEMALE]
    pools = [p for p in (female, male) if p]
    if not pools:
        return _cycle(list(train_espeak), n, rng)
    first = rng.randrange(len(pools))
    which = [(first + i) % len(pools) for i in range(n)]
    drawn = [iter(_cycle(p, which.count(k), rng)) for k, p in enumerate(pools)]
    variants = [next(drawn[k]) for k in which]
    accents = _cycle(sorted(groups), n, rng)
    return [espeak_voice(f"{a}+{x}", groups[a]) for a, x in zip(accents, variants)]


def _assign(n: int, voices: list[Voice], rng: random.Random, cfg: CorpusConfig,
            espeak_fn=None) -> list[Voice]:
    """Voices for ``n`` utterances: engines by :func:`_engine_counts`, each engine's count spread
    evenly over its voices (or, for espeak, drawn by ``espeak_fn(count)``), in a shuffled order."""
    if n <= 0 or not voices:
        return []
    counts = _engine_counts(n, voices, cfg)
    if counts is None:
        return _cycle(list(voices), n, rng)
    slots: list[Voice] = []
    for e in ENGINES:
        k = counts.get(e, 0)
        if not k:
            continue
        if e == "espeak" and espeak_fn is not None:
            slots.extend(espeak_fn(k))
        else:
            slots.extend(_cycle([v for v in voices if v.engine == e], k, rng))
    rng.shuffle(slots)
    return slots


def _listed_espeak(voices: list[Voice], rng: random.Random):
    """espeak voices per utterance from a fixed list: evenly over accents, then over each accent's voices."""
    by_accent: dict[str, list[Voice]] = {}
    for v in voices:
        by_accent.setdefault(v.group, []).append(v)

    def draw(k: int) -> list[Voice]:
        accents = _cycle(sorted(by_accent), k, rng)
        per = {a: iter(_cycle(by_accent[a], accents.count(a), rng)) for a in by_accent}
        return [next(per[a]) for a in accents]

    return draw


def _mix_text_files(train: list[str], cfg: CorpusConfig, warnings: list[str]) -> list[str]:
    """``train`` with its first ``text_share`` sentences replaced by sentences of ``cfg.text_files``
    (drawn in a seeded order; sentences of the other splits are never used)."""
    from .textfile import read_sentences

    try:
        pool = read_sentences(cfg.text_files)
    except FileNotFoundError as e:
        raise SynthesisError(str(e)) from None
    random.Random(f"harken-textfile-{cfg.seed}").shuffle(pool)
    k = int(round(cfg.text_share * len(train)))
    if len(pool) < k:
        warnings.append(f"text files hold {len(pool)} usable sentences, fewer than the {k} asked for")
        k = len(pool)
    if k == 0 and cfg.text_share > 0:
        raise SynthesisError(f"no usable sentence in the text files {cfg.text_files}")
    return pool[:k] + train[k:]


def plan_corpus(cfg: CorpusConfig, voices: list[Voice] | None = None,
                available_codecs: set[str] | None = None) -> dict:
    """Everything about the corpus except the audio: texts, voices, prosody, levels, channels per split.

    ``available_codecs``: the codecs this machine can run (None: all of ``cfg.codecs``); an utterance
    planned for a missing codec stays clean."""
    pool = select_voices(cfg.voices, voices)
    if not pool:
        raise SynthesisError("no TTS voice available: install espeakng-loader (pip) or flite/festival")
    ids = {v.id for v in pool}
    if cfg.holdout is None:
        holdout = choose_holdout(pool)
    else:
        holdout = [v.id for v in select_voices(cfg.holdout, pool)]
    train_voices = [v for v in pool if v.id not in set(holdout)]
    if not train_voices:
        raise SynthesisError("every voice is held out: nothing is left to voice the train split")
    held = [v for v in pool if v.id in set(holdout)]
    warnings = []
    counts = cfg.counts()
    if counts["test_unseen"] > 0 and not held:
        warnings.append("test_unseen is empty: there is no voice to hold out "
                        f"(voices: {sorted(ids)})")
        counts["test_unseen"] = 0
    if cfg.engine_shares is not None and sum(cfg.engine_shares.get(v.engine, 0.0) for v in train_voices) <= 0 \
            and cfg.piper_fraction is None:
        raise SynthesisError(f"corpus engine_shares {cfg.engine_shares} gives no share to any engine of the "
                             f"train voices ({sorted({v.engine for v in train_voices})})")
    codecs = [c for c in cfg.codecs if available_codecs is None or c in available_codecs]
    train_espeak = [v for v in train_voices if v.engine == "espeak"]
    wide = cfg.espeak_variants == "wide" and bool(train_espeak) and \
        (cfg.voices is None or "espeak" in cfg.voices)
    texts = make_splits(counts, cfg.seed)
    if cfg.text_files and cfg.text_share > 0:
        texts["train"] = _mix_text_files(texts["train"], cfg, warnings)
    utts: dict[str, list[Utterance]] = {}
    seen_espeak: list[Voice] = []
    for split in SPLITS:
        rng = random.Random(f"harken-voices-{cfg.seed}-{split}")
        n = len(texts[split])
        split_voices = held if split == "test_unseen" else train_voices
        split_espeak = [v for v in split_voices if v.engine == "espeak"]
        if split == "test_unseen" or not wide:
            espeak_fn = _listed_espeak(split_espeak, rng)
        elif split == "train":
            espeak_fn = functools.partial(_wide_espeak, train_espeak=train_espeak, held=held, rng=rng)
        else:  # dev, test_seen: voices train has
            espeak_fn = functools.partial(_cycle, seen_espeak or train_espeak, rng=rng)
        assigned = _assign(n, split_voices, rng, cfg, espeak_fn)
        rows = []
        for i, (text, voice) in enumerate(zip(texts[split], assigned)):
            uid = f"{split}-{i:05d}"
            r = random.Random(f"harken-prosody-{cfg.seed}-{uid}")
            speed = round(r.uniform(*cfg.speed_range), 4)
            pitch = round(r.uniform(*cfg.pitch_range), 3)
            # every draw is made whatever the settings, so changing one setting changes only what it governs
            level = round(r.uniform(*(cfg.level_db or (0.0, 0.0))), 2)
            floor_snr = round(r.uniform(*(cfg.floor_snr_db or (0.0, 0.0))), 2)
            floor_kind = "pink" if r.random() < 0.5 else "white"
            codec_u = r.random()
            codec = cfg.codecs[r.randrange(len(cfg.codecs))] if cfg.codecs else ""
            bitrate = OPUS_BITRATES[r.randrange(len(OPUS_BITRATES))]
            noise_seed = r.getrandbits(32)
            channel = "clean"
            if split == "train" and codec_u < cfg.codec_fraction and codec in codecs:
                channel = codec
            rows.append(Utterance(
                uid, split, text, voice, speed, pitch,
                level_db=level if cfg.level_db is not None else None, peak_db=float(cfg.peak_db),
                channel=channel, bitrate=bitrate if channel == "opus" else 0,
                floor_snr_db=floor_snr if cfg.floor_snr_db is not None else None, floor_kind=floor_kind,
                noise_seed=noise_seed))
        utts[split] = rows
        if split == "train":
            seen_espeak = list({u.voice.id: u.voice for u in rows if u.voice.engine == "espeak"}.values())
    return {"utterances": utts, "texts": texts, "holdout": [v.id for v in held],
            "train_voices": [v.id for v in train_voices], "voices": pool, "warnings": warnings}


# --------------------------------------------------------------------------------------------------
# rendering: level, channel, noise floor
# --------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def ffmpeg_codecs() -> frozenset[str]:
    """The corpus codecs this machine's ffmpeg can encode (empty without ffmpeg)."""
    exe = shutil.which("ffmpeg")
    if not exe:
        return frozenset()
    try:
        proc = subprocess.run([exe, "-hide_banner", "-encoders"], capture_output=True, timeout=30,
                              stdin=subprocess.DEVNULL)
    except Exception:
        return frozenset()
    names = set(proc.stdout.decode(errors="replace").split())
    have = set()
    if "libgsm" in names:
        have.add("gsm")
    if "libopus" in names:
        have.add("opus")
    return frozenset(have)


def _ffmpeg(args: list[str], data: bytes, what: str) -> bytes:
    cmd = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-threads", "1"] + args
    proc = subprocess.run(cmd, input=data, capture_output=True, timeout=120)
    if proc.returncode != 0 or not proc.stdout:
        msg = proc.stderr.decode(errors="replace").strip().splitlines()
        raise SynthesisError(f"{what}: ffmpeg exit {proc.returncode} ({msg[-1] if msg else 'no output'})")
    return proc.stdout


def _pcm16(x: np.ndarray) -> bytes:
    return (np.clip(np.round(x * 32767.0), -32768, 32767).astype("<i2")).tobytes()


def codec_roundtrip(wave: np.ndarray, codec: str, bitrate: int = 12, sr: int = SAMPLE_RATE) -> np.ndarray:
    """``wave`` encoded and decoded again by ffmpeg: ``gsm`` (GSM 06.10 full rate, 8 kHz, 13 kbit/s)
    or ``opus`` (``bitrate`` kbit/s, VoIP mode; the encoder picks narrow- or wideband). Returns
    float32 at ``sr`` with the length of ``wave``."""
    import soxr

    wave = np.asarray(wave, dtype=np.float32)
    n = len(wave)
    if codec == "gsm":
        x = soxr.resample(wave, sr, 8000, quality="HQ").astype(np.float32)
        enc = _ffmpeg(["-f", "s16le", "-ar", "8000", "-ac", "1", "-i", "pipe:0", "-c:a", "libgsm",
                       "-f", "gsm", "pipe:1"], _pcm16(x), "gsm encode")
        dec = _ffmpeg(["-f", "gsm", "-i", "pipe:0", "-f", "s16le", "-ac", "1", "-ar", "8000", "pipe:1"],
                      enc, "gsm decode")
        y = soxr.resample(np.frombuffer(dec, "<i2").astype(np.float32) / 32768.0, 8000, sr, quality="HQ")
    elif codec == "opus":
        enc = _ffmpeg(["-f", "s16le", "-ar", str(sr), "-ac", "1", "-i", "pipe:0", "-c:a", "libopus",
                       "-b:a", f"{int(bitrate)}k", "-application", "voip", "-fflags", "+bitexact",
                       "-f", "ogg", "pipe:1"], _pcm16(wave), "opus encode")
        dec = _ffmpeg(["-f", "ogg", "-i", "pipe:0", "-f", "s16le", "-ac", "1", "-ar", str(sr), "pipe:1"],
                      enc, "opus decode")
        y = np.frombuffer(dec, "<i2").astype(np.float32) / 32768.0
    else:
        raise SynthesisError(f"unknown codec {codec!r}")
    y = np.asarray(y, dtype=np.float32)
    if len(y) >= n:
        return y[:n]
    return np.concatenate([y, np.zeros(n - len(y), np.float32)])


def _rms_db(x: np.ndarray) -> float:
    p = float(np.mean(np.square(x, dtype=np.float64))) if x.size else 0.0
    return 10.0 * np.log10(max(p, 1e-20))


def render(wave: np.ndarray, level_db: float | None = None, peak_db: float = PEAK_DB, channel: str = "clean",
           bitrate: int = 0, floor_snr_db: float | None = None, floor_kind: str = "white",
           noise_seed: int = 0, sr: int = SAMPLE_RATE) -> np.ndarray:
    """A voice's output made into one corpus utterance: brought to ``level_db`` dBFS RMS (the peak
    capped at ``peak_db``), passed through ``channel`` (a codec round trip, or ``clean``), and given
    a noise floor ``floor_snr_db`` below its RMS level (never under :data:`FLOOR_MIN_DB`). The noise
    is drawn from ``noise_seed`` alone, so the same inputs give the same samples."""
    from harken.data.augment import noise_floor

    x = np.asarray(wave, dtype=np.float32)
    if level_db is not None and x.size:
        gain = 10.0 ** ((level_db - _rms_db(x)) / 20.0)
        peak = float(np.max(np.abs(x)))
        cap = 10.0 ** (peak_db / 20.0)
        if peak * gain > cap:
            gain = cap / peak
        x = (x * np.float32(gain)).astype(np.float32)
    if channel != "clean":
        x = codec_roundtrip(x, channel, bitrate or 12, sr)
    if floor_snr_db is not None and x.size:
        level = max(_rms_db(x) - floor_snr_db, FLOOR_MIN_DB)
        x = (x + noise_floor(len(x), np.random.default_rng(noise_seed), level, floor_kind)).astype(np.float32)
    return np.clip(x, -1.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# workers
# --------------------------------------------------------------------------------------------------

def _worker_init() -> None:
    # engines are created lazily, once per worker process; keep each worker single-threaded
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch = sys.modules.get("torch")  # only if something already imported it
    if torch is not None:
        try:
            torch.set_num_threads(1)
        except Exception:
            pass


def _cpu_seconds() -> float:
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _synth_one(task: tuple) -> tuple:
    """(uid, path, text, voice, speed, pitch, render params) -> (uid, duration or None, error or None,
    cpu_s, engine)"""
    uid, path, text, voice, speed, pitch, params = task
    t0 = _cpu_seconds()
    try:
        wave = render(voice.synthesize(text, speed, pitch), **params)
        save_wav(path, wave, SAMPLE_RATE)
        dur = len(wave) / SAMPLE_RATE
        err = None
    except Exception as e:  # a bad utterance must not stop a long build; it is reported
        dur, err = None, f"{type(e).__name__}: {e}"
    return uid, dur, err, _cpu_seconds() - t0, voice.engine


def valid_wav_duration(path: str | os.PathLike) -> float | None:
    """Duration of an existing corpus wav if it is complete and usable, else None."""
    try:
        if os.path.getsize(path) <= 44:
            return None
        info = sf.info(str(path))
    except Exception:
        return None
    if info.samplerate != SAMPLE_RATE or info.channels != 1 or info.frames < int(0.05 * SAMPLE_RATE):
        return None
    return info.frames / SAMPLE_RATE


def _read_plan(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    if not path.exists():
        return out
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    d = json.loads(line)
                    out[d["id"]] = d.get("fingerprint", "")
    except Exception:
        return {}
    return out


def _write_json_atomic(path: Path, obj) -> None:
    with atomic_open(path, "w", fsync=False) as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


# --------------------------------------------------------------------------------------------------
# the build
# --------------------------------------------------------------------------------------------------

def synthesize_corpus(cfg: CorpusConfig, out_dir: str, jobs: int = 2, progress: bool = True) -> dict:
    """Build (or complete) the corpus in ``out_dir``; returns the summary also written to corpus.json."""
    start = time.time()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    have = ffmpeg_codecs() if cfg.codec_fraction > 0 and cfg.codecs else frozenset()
    missing = [c for c in cfg.codecs if c not in have] if cfg.codec_fraction > 0 else []
    plan = plan_corpus(cfg, available_codecs=set(have))
    if missing:
        plan["warnings"].append(
            f"codec round trips skipped for {', '.join(missing)}: "
            + ("ffmpeg is not installed" if shutil.which("ffmpeg") is None else "this ffmpeg lacks the encoder")
            + " (those train utterances stay clean)")
    for w in plan["warnings"]:
        log.warning(w)
    utts: dict[str, list[Utterance]] = plan["utterances"]
    all_utts = [u for split in SPLITS for u in utts[split]]

    # resume: keep wavs that exist, are valid, and were made for the same plan entry
    plan_path = out / "plan.jsonl"
    old = _read_plan(plan_path)
    durations: dict[str, float] = {}
    todo: list[Utterance] = []
    for u in all_utts:
        p = u.wav_path(out)
        d = valid_wav_duration(p) if old.get(u.id) == u.fingerprint else None
        if d is None:
            todo.append(u)
            if p.exists():  # stale (another plan) or broken: never let it pass for this plan
                p.unlink()
        else:
            durations[u.id] = d
    skipped = len(durations)
    for stale in out.glob("wav/*/.*.tmp*"):  # left by an interrupted save
        stale.unlink(missing_ok=True)
    # every wav left on disk now belongs to this plan, so the plan can be recorded before synthesis
    with atomic_open(plan_path, "w", fsync=False) as f:
        for u in all_utts:
            f.write(json.dumps(u.plan_row(), ensure_ascii=False) + "\n")

    todo.sort(key=lambda u: -(_COST.get(u.voice.engine, 1.0) + (3.0 if u.channel != "clean" else 0.0)))
    tasks = [(u.id, str(u.wav_path(out)), u.text, u.voice, u.speed, u.pitch, u.render_params()) for u in todo]
    failed: dict[str, str] = {}
    engine_cpu: dict[str, float] = {}
    engine_audio: dict[str, float] = {}
    synth_start = time.time()
    if tasks:
        from tqdm import tqdm

        bar = tqdm(total=len(all_utts), initial=skipped, disable=not progress, unit="utt",
                   desc="synth", dynamic_ncols=True)
        jobs = max(1, min(int(jobs), len(tasks)))
        pool = None
        ok = False
        try:
            if jobs == 1:
                _worker_init()
                results = map(_synth_one, tasks)
            else:
                pool = mp.get_context("spawn").Pool(jobs, initializer=_worker_init)
                results = pool.imap_unordered(_synth_one, tasks, chunksize=4 if len(tasks) > 200 else 1)
            for uid, dur, err, cpu, engine in results:
                if err is None:
                    durations[uid] = dur
                    engine_audio[engine] = engine_audio.get(engine, 0.0) + dur
                else:
                    failed[uid] = err
                    log.warning("synthesis failed for %s: %s", uid, err)
                engine_cpu[engine] = engine_cpu.get(engine, 0.0) + cpu
                bar.update(1)
            ok = True
        finally:
            bar.close()
            if pool is not None:
                if ok:
                    pool.close()
                else:  # interrupted: stop now; finished wavs are kept and a re-run resumes
                    pool.terminate()
                pool.join()
    synth_wall = time.time() - synth_start

    # manifests
    counts, hours, per_voice, per_engine, per_channel = {}, {}, {}, {}, {}
    for split in SPLITS:
        records = []
        for u in utts[split]:
            if u.id not in durations:
                continue
            records.append(Record(
                id=u.id, audio=str(u.wav_path(out)), duration=round(durations[u.id], 4), text=u.text,
                speaker=u.voice.id, group=u.voice.group,
                extra={"engine": u.voice.engine, "channel": u.channel, "speed": u.speed, "pitch": u.pitch,
                       "level_db": u.level_db}))
        write_manifest(out / f"{split}.jsonl", records, relative_to=str(out))
        counts[split] = len(records)
        hours[split] = round(sum(r.duration for r in records) / 3600, 4)
        per_voice[split] = sorted({r.speaker for r in records})
        eng: dict[str, int] = {}
        for r in records:
            eng[r.extra["engine"]] = eng.get(r.extra["engine"], 0) + 1
        per_engine[split] = eng
        ch: dict[str, int] = {}
        for r in records:
            ch[r.extra["channel"]] = ch.get(r.extra["channel"], 0) + 1
        per_channel[split] = ch

    stats = vocab_stats(plan["texts"])
    summary = {
        "config": asdict(cfg),
        "sample_rate": SAMPLE_RATE,
        "splits": {s: f"{s}.jsonl" for s in SPLITS},
        "counts": counts,
        "hours": hours,
        "utterances_per_engine": per_engine,
        "utterances_per_channel": per_channel,
        "codecs_available": sorted(have),
        "voices": per_voice,
        "holdout": plan["holdout"],
        "train_voices": plan["train_voices"],
        "voice_groups": {v.id: {"engine": v.engine, "group": v.group}
                         for v in list(plan["voices"]) + [u.voice for u in all_utts]},
        "vocab_size": stats["vocab_size"],
        "oov_rate": stats["oov_rate"],
        "oov_types": stats["oov_types"],
        "synthesized": len(tasks) - len(failed),
        "skipped": skipped,
        "failed": failed,
        "warnings": plan["warnings"],
        "speed": {e: {"audio_s": round(engine_audio.get(e, 0.0), 2), "cpu_s": round(engine_cpu[e], 2),
                      "audio_per_cpu_s": round(engine_audio.get(e, 0.0) / engine_cpu[e], 1)
                      if engine_cpu[e] > 0 else None} for e in engine_cpu},
        "synth_wall_s": round(synth_wall, 2),
        "elapsed_s": round(time.time() - start, 2),
    }
    _write_json_atomic(out / "corpus.json", summary)
    if failed:
        log.warning("%d utterances failed; re-run to retry them (see corpus.json 'failed')", len(failed))
    return summary
