"""Corpus importers (Kaldi data dir, LibriSpeech tree, NeMo manifest, folder of audio + .txt
sidecars or labels in the file names, CSV/TSV tables such as Common Voice TSVs and Hugging Face
audiofolder ``metadata.csv``) to :class:`Record` lists, and writers back to Kaldi and NeMo layouts.

Transcripts are kept exactly as given (only surrounding whitespace is stripped) except labels
taken from file names (underscores and dashes become spaces); text normalisation happens in
:func:`finalize_records` (``harken prepare``) and again in the training pipeline. Malformed input
raises :class:`ManifestError` (or :class:`AudioError` for audio) naming the file and the line.

Every importer takes an optional :class:`DropLog`: with one, a bad utterance (missing, unreadable
or empty audio, a duration that disagrees with the file, no transcript) is recorded there with
its reason and left out, and the good ones are imported; without one, the importers keep their
older behaviour (skip with a warning, or raise). The table importers always drop and report.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shlex
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from harken.audio import AudioError, audio_duration
from harken.data.manifest import ManifestError, Record
from harken.fsutil import atomic_open, atomic_write_text

log = logging.getLogger(__name__)

AUDIO_EXTS = (".wav", ".flac", ".ogg", ".mp3", ".m4a")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Non-blank lines (without the newline) with their 1-based numbers."""
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if line.strip():
                    yield lineno, line
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _key_value(path: Path, lineno: int, line: str, need_value: bool = True) -> tuple[str, str]:
    parts = line.strip().split(maxsplit=1)
    key = parts[0]
    value = parts[1].strip() if len(parts) > 1 else ""
    if need_value and not value:
        raise ManifestError(f"{path}:{lineno}: expected '<id> <value>', got {line.strip()!r}")
    return key, value


def _read_table(path: Path, need_value: bool = True) -> dict[str, tuple[str, int]]:
    """Kaldi-style ``key value`` table -> {key: (value, lineno)}; duplicate keys are errors."""
    table: dict[str, tuple[str, int]] = {}
    for lineno, line in _lines(path):
        key, value = _key_value(path, lineno, line, need_value)
        if key in table:
            raise ManifestError(f"{path}:{lineno}: duplicate id '{key}' (first on line {table[key][1]})")
        table[key] = (value, lineno)
    return table


def _problem(strict: bool, msg: str, counter: Counter, kind: str) -> None:
    if strict:
        raise ManifestError(msg)
    counter[kind] += 1
    if counter[kind] <= 5:
        log.warning("%s (skipped)", msg)


def _report(name: str, counter: Counter, kept: int) -> None:
    if counter:
        detail = ", ".join(f"{n} {k}" for k, n in sorted(counter.items()))
        log.warning("%s: kept %d utterances, skipped %s", name, kept, detail)


def _positive_duration(path: str, where: str) -> float:
    d = audio_duration(path)
    if d <= 0:
        raise AudioError(f"{path}: no audio samples ({where})")
    return d


# ------------------------------------------------------------------------------------------------
# what an import leaves out, and why
DROP_REASONS = ("missing file", "unreadable", "zero-length audio", "too short", "duration mismatch",
                "no transcript", "empty transcript", "duplicate id")
# one 25 ms analysis window: shorter audio gives no feature frame, so nothing can be recognised in it
MIN_AUDIO_SECONDS = 0.025
# seconds a duration column (or a segment's end) may differ from the audio actually read; a
# relative 1% is allowed on top for long files (codec priming and padding)
DURATION_TOLERANCE = 0.1


@dataclass
class Dropped:
    """One utterance left out of an import: ``reason`` (one of :data:`DROP_REASONS`), ``where``
    (the source file and line, or the audio path), the audio path, the id and a detail."""

    reason: str
    where: str
    audio: str = ""
    id: str = ""
    detail: str = ""


class DropLog:
    """The utterances an import left out, with their reasons, so nothing is lost silently:
    ``harken prepare`` prints :meth:`summary` and writes :meth:`write` beside its manifest."""

    def __init__(self) -> None:
        self.items: list[Dropped] = []

    def add(self, reason: str, where: str, audio: str = "", id: str = "", detail: str = "") -> None:
        if reason not in DROP_REASONS:
            raise ValueError(f"unknown drop reason {reason!r}")
        self.items.append(Dropped(reason, where, str(audio), str(id), detail))
        log.debug("dropped %s (%s): %s %s", id or audio, reason, where, detail)

    def __len__(self) -> int:
        return len(self.items)

    def counts(self) -> Counter:
        return Counter(d.reason for d in self.items)

    def summary(self, kept: int) -> str:
        """One line: how many of how many were dropped, by reason."""
        total = kept + len(self.items)
        by = ", ".join(f"{n} {r}" for r, n in sorted(self.counts().items(), key=lambda x: (-x[1], x[0])))
        return f"dropped {len(self.items)} of {total} utterances ({by})"

    def first(self, n: int = 5) -> list[str]:
        """The first ``n`` drops, one short line each (name, reason, detail)."""
        out = []
        for d in self.items[:n]:
            name = Path(d.audio).name if d.audio else d.id
            out.append(f"{name or d.where}: {d.reason}" + (f" ({d.detail})" if d.detail else "")
                       + (f" [{d.where}]" if d.where and Path(d.where).name != name else ""))
        return out

    def write(self, path: str | os.PathLike) -> None:
        """One JSON object per dropped utterance (reason, where, audio, id, detail)."""
        with atomic_open(path, "w", fsync=False) as f:
            for d in self.items:
                f.write(json.dumps(asdict(d), ensure_ascii=False) + "\n")


def _tolerance(declared: float, tolerance: float) -> float:
    return max(tolerance, 0.01 * declared)


class _Prober:
    """Reads each audio file's duration once (libsndfile's frame count for WAV/FLAC/OGG, which
    for a WAV is the data actually present whatever the header claims; a decode through ffmpeg
    for other formats, see :func:`harken.audio.audio_duration`) and turns a problem into a
    :class:`DropLog` entry for the utterance that needed the file."""

    def __init__(self, drops: DropLog):
        self.drops = drops
        self.cache: dict[str, tuple[float | None, str, str]] = {}

    @staticmethod
    def _probe(audio: str) -> tuple[float | None, str, str]:
        if not audio or "://" in audio or not os.path.isfile(audio):
            return None, "missing file", audio or "no path given"
        try:
            d = audio_duration(audio)
        except AudioError as e:
            why = e.message.split(": ", 1)[-1] if e.message.startswith(audio) else e.message
            return None, "zero-length audio" if e.code == "empty" else "unreadable", why
        except OSError as e:
            return None, "unreadable", str(e)
        if d <= 0:
            return None, "zero-length audio", "no audio samples"
        if d < MIN_AUDIO_SECONDS:  # the duration is kept: a listed duration that disagrees says more
            return d, "too short", f"{1000 * d:.1f} ms, less than one {1000 * MIN_AUDIO_SECONDS:.0f} ms frame"
        return d, "", ""

    def duration(self, audio: str, where: str, rid: str, declared: float | None = None, said: str = "",
                 tolerance: float = DURATION_TOLERANCE) -> float | None:
        """The file's duration in seconds, or None (recorded in the drop log) when the file is
        unusable or differs from ``declared`` (a whole-file duration the source lists, described
        by ``said``) by more than the tolerance."""
        if audio not in self.cache:
            self.cache[audio] = self._probe(audio)
        d, reason, detail = self.cache[audio]
        if d is None:
            self.drops.add(reason, where, audio, rid, detail)
            return None
        if declared is not None and abs(d - declared) > _tolerance(declared, tolerance):
            self.drops.add("duration mismatch", where, audio, rid, f"{said or f'listed as {declared:g} s'}, "
                                                                  f"the file has {d:.3f} s")
            return None
        if reason:
            self.drops.add(reason, where, audio, rid, detail)
            return None
        return d

    def segment(self, audio: str, offset: float, duration: float, where: str, rid: str,
                tolerance: float = DURATION_TOLERANCE) -> bool:
        """True when the segment [offset, offset + duration] lies inside the file (within the
        tolerance); otherwise the utterance is dropped as a duration mismatch."""
        if audio not in self.cache:
            self.cache[audio] = self._probe(audio)
        total, reason, detail = self.cache[audio]
        if total is None:
            self.drops.add(reason, where, audio, rid, detail)
            return False
        end = offset + duration
        if end > total + _tolerance(duration, tolerance):
            what = f"segment {offset:g}-{end:g} s" if offset else f"duration {duration:g} s"
            self.drops.add("duration mismatch", where, audio, rid, f"{what}, the file has {total:.3f} s")
            return False
        if reason:
            self.drops.add(reason, where, audio, rid, detail)
            return False
        return True


# ------------------------------------------------------------------------------------------------
# Kaldi
_PIPE_FLAGS = {
    # program -> flags that only select decoding to stdout (no effects, no channel selection)
    "flac": {"-c", "-d", "-s", "--decode", "--stdout", "--silent", "-dc", "-cd", "-dcs", "-cds", "-sdc"},
    "sph2pipe": {"-f", "wav", "-p"},
}


def _pipe_source(cmd: str) -> str | None:
    """The input file of a piped wav.scp command that only decodes a file to stdout (``flac -c -d
    f |``, ``sph2pipe -f wav f |``, ``sox f -t wav - |``, ``ffmpeg -i f -f wav - |``); else None.
    Commands with effects (``sox ... speed 1.1``, ``remix``, channel selection ...) are not
    recognised, so they are never silently replaced by the unprocessed file."""
    try:
        toks = shlex.split(cmd)
    except ValueError:
        return None
    if not toks:
        return None
    prog = os.path.basename(toks[0])
    args = toks[1:]
    if prog in _PIPE_FLAGS:
        files = [a for a in args if a not in _PIPE_FLAGS[prog]]
        return files[0] if len(files) == 1 and not files[0].startswith("-") else None
    if prog == "sox":
        # sox IN [-t wav] [-r N] [-b N] [-e signed-integer] [-c 1] -   (format conversion only)
        if len(args) < 2 or args[-1] != "-" or args[0].startswith("-"):
            return None
        rest = args[1:-1]
        ok_opts = {"-t": {"wav", "wavpcm"}, "-r": None, "-b": {"16", "32"}, "-e": {"signed-integer",
                   "signed", "floating-point"}, "-c": {"1"}}
        i = 0
        while i < len(rest):
            opt = rest[i]
            if opt not in ok_opts or i + 1 >= len(rest):
                return None
            allowed = ok_opts[opt]
            if allowed is not None and rest[i + 1] not in allowed:
                return None
            i += 2
        return args[0]
    if prog == "ffmpeg":
        # ffmpeg [-nostdin] [-v level] -i IN [-f wav] [-ar N] [-ac 1] -
        if not args or args[-1] != "-":
            return None
        src = None
        i = 0
        rest = args[:-1]
        while i < len(rest):
            opt = rest[i]
            if opt in ("-nostdin", "-y", "-hide_banner"):
                i += 1
                continue
            if i + 1 >= len(rest):
                return None
            val = rest[i + 1]
            if opt == "-i" and src is None:
                src = val
            elif opt in ("-v", "-loglevel", "-ar") or (opt == "-f" and val == "wav") or (
                    opt == "-ac" and val == "1"):
                pass
            else:
                return None
            i += 2
        return src
    return None


def _resolve(path: str, bases: list[Path]) -> str:
    """An absolute path for a wav.scp entry: absolute as is; relative ones are looked up against
    each of ``bases`` in turn (Kaldi recipes use paths relative to the recipe dir, the data dir's
    grandparent, or the current directory); the first that exists wins."""
    if os.path.isabs(path):
        return path
    for b in bases:
        cand = b / path
        if cand.exists():
            return str(cand.resolve())
    return str((Path.cwd() / path).resolve())


def _parse_wav_scp(path: Path, data_dir: Path, keep_missing: bool = False) -> dict[str, tuple[str, int]]:
    bases = [Path.cwd(), data_dir, data_dir.parent, data_dir.parent.parent]
    out: dict[str, tuple[str, int]] = {}
    for key, (value, lineno) in _read_table(path).items():
        src = value
        if value.endswith("|"):
            src = _pipe_source(value[:-1].strip())
            if src is None:
                raise ManifestError(
                    f"{path}:{lineno}: piped command for '{key}' is not supported "
                    f"({value!r}); run the command to write an audio file and list that file's path "
                    f"instead (only plain decoders such as 'flac -c -d FILE |' or "
                    f"'sox FILE -t wav - |' are read directly)")
        elif value == "-":
            raise ManifestError(f"{path}:{lineno}: stdin/stdout entries are not supported: {value!r}")
        resolved = _resolve(src, bases)
        if not os.path.exists(resolved) and not keep_missing:
            hint = " (Kaldi archive offsets such as 'x.ark:123' are not supported)" if ".ark:" in src else ""
            raise AudioError(f"{path}:{lineno}: audio file for '{key}' not found: {src}{hint}")
        out[key] = (resolved, lineno)
    return out


def import_kaldi(data_dir: str | os.PathLike, strict: bool = False, drops: DropLog | None = None) -> list[Record]:
    """A Kaldi data dir: ``wav.scp`` and ``text`` (required), ``segments``, ``utt2spk`` and
    ``utt2group`` (optional). With ``segments`` each segment becomes a record (offset = start,
    duration = end - start; ``end`` of -1 means the end of the recording); without, each wav.scp
    entry is one utterance whose duration is read from the audio header.

    Utterances without a transcript, transcripts without audio and empty recordings are skipped
    with a warning; ``strict=True`` makes them errors instead. Malformed lines are always errors.
    With ``drops`` every audio file is checked (present, readable, each segment inside it) and
    each problem is recorded there instead (a missing file is then not an error either).
    """
    d = Path(data_dir)
    if not d.is_dir():
        raise ManifestError(f"Kaldi data dir not found: {d}")
    for req in ("wav.scp", "text"):
        if not (d / req).is_file():
            raise ManifestError(f"{d}: missing required file '{req}'")
    wavs = _parse_wav_scp(d / "wav.scp", d, keep_missing=drops is not None)
    texts = _read_table(d / "text", need_value=False)
    prober = _Prober(drops) if drops is not None else None
    spk = _read_table(d / "utt2spk") if (d / "utt2spk").is_file() else {}
    grp = _read_table(d / "utt2group") if (d / "utt2group").is_file() else {}
    skipped: Counter = Counter()

    # (utt id, audio path, offset, duration or None, where)
    utts: list[tuple[str, str, float, float | None, str]] = []
    seg_path = d / "segments"
    if seg_path.is_file():
        seen: dict[str, int] = {}
        for lineno, line in _lines(seg_path):
            parts = line.split()
            where = f"{seg_path}:{lineno}"
            if len(parts) != 4:
                raise ManifestError(f"{where}: expected '<utt> <recording> <start> <end>', got {line.strip()!r}")
            utt, rec, s, e = parts
            if utt in seen:
                raise ManifestError(f"{where}: duplicate id '{utt}' (first on line {seen[utt]})")
            seen[utt] = lineno
            try:
                start, end = float(s), float(e)
            except ValueError:
                raise ManifestError(f"{where}: start and end must be numbers, got {s!r} {e!r}") from None
            if start < 0 or (end != -1 and end <= start):
                raise ManifestError(f"{where}: invalid segment times start={s} end={e}")
            if rec not in wavs:
                if prober is not None and not strict:
                    drops.add("missing file", where, "", utt, f"recording '{rec}' is not in wav.scp")
                    continue
                _problem(strict, f"{where}: recording '{rec}' is not in wav.scp", skipped,
                         "segments without recording")
                continue
            dur = None if end == -1 else round(end - start, 6)
            utts.append((utt, wavs[rec][0], start, dur, where))
    else:
        for utt, (p, lineno) in wavs.items():
            utts.append((utt, p, 0.0, None, f"{d / 'wav.scp'}:{lineno}"))

    records = []
    for utt, audio, offset, dur, where in utts:
        if utt not in texts:
            if prober is not None and not strict:
                drops.add("no transcript", where, audio, utt, f"no line in {d / 'text'}")
                continue
            _problem(strict, f"{where}: utterance '{utt}' has no line in {d / 'text'}", skipped,
                     "without text")
            continue
        if prober is not None:
            if dur is not None:
                if not prober.segment(audio, offset, dur, where, utt):
                    continue
            else:
                total = prober.duration(audio, where, utt)
                if total is None:
                    continue
                dur = round(total - offset, 6)
                if dur <= 0:
                    drops.add("duration mismatch", where, audio, utt,
                              f"segment starts at {offset:g} s, the file has {total:.3f} s")
                    continue
        if dur is None:
            total = audio_duration(audio)
            dur = round(total - offset, 6)
            if dur <= 0:
                _problem(strict, f"{where}: utterance '{utt}' has no audio ({audio})", skipped,
                         "empty audio")
                continue
        records.append(Record(id=utt, audio=audio, duration=dur, text=texts[utt][0], offset=offset,
                              speaker=spk.get(utt, ("", 0))[0], group=grp.get(utt, ("", 0))[0]))
    listed = {u for u, *_ in utts}
    for utt, (_, lineno) in texts.items():
        if utt not in listed:
            if prober is not None and not strict:
                drops.add("missing file", f"{d / 'text'}:{lineno}", "", utt,
                          f"not in {'segments' if seg_path.is_file() else 'wav.scp'}")
                continue
            _problem(strict, f"{d / 'text'}:{lineno}: utterance '{utt}' has no audio "
                     f"(not in {'segments' if seg_path.is_file() else 'wav.scp'})", skipped, "text without audio")
    _report(f"import_kaldi({d})", skipped, len(records))
    return records


def _check_kaldi_field(value: str, what: str, rid: str, allow_space: bool = False) -> None:
    if not value:
        raise ManifestError(f"record '{rid}': empty {what} cannot be written to a Kaldi dir")
    bad = ("\n" in value or "\r" in value) if allow_space else len(value.split()) != 1 or value != value.strip()
    if bad:
        raise ManifestError(f"record '{rid}': {what} {value!r} contains whitespace/newlines, "
                            f"which a Kaldi dir cannot hold")


def export_kaldi(records: Iterable[Record], out_dir: str | os.PathLike) -> None:
    """Write a Kaldi data dir (``wav.scp``, ``text``, and ``segments`` / ``utt2spk`` + ``spk2utt`` /
    ``utt2group`` when needed), sorted by id as Kaldi expects.

    ``segments`` is written when any record has an offset or shares its audio file with another
    record (recording ids are then the audio file stems, made unique). ``utt2spk`` is written when
    any record has a speaker (a record without one gets its own id, the Kaldi convention). Audio
    paths are written absolute.
    """
    recs = sorted(records, key=lambda r: r.id)
    ids = [r.id for r in recs]
    dup = [k for k, n in Counter(ids).items() if n > 1]
    if dup:
        raise ManifestError(f"duplicate record id(s): {dup[:5]}")
    for r in recs:
        _check_kaldi_field(r.id, "id", r.id)
        _check_kaldi_field(os.path.abspath(r.audio), "audio path", r.id, allow_space=True)
        if "\n" in r.text or "\r" in r.text:
            raise ManifestError(f"record '{r.id}': text contains a newline, which a Kaldi 'text' file cannot hold")
        if r.speaker:
            _check_kaldi_field(r.speaker, "speaker", r.id)
        if r.group:
            _check_kaldi_field(r.group, "group", r.id)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    audio_count = Counter(os.path.abspath(r.audio) for r in recs)
    use_segments = any(r.offset != 0 for r in recs) or any(n > 1 for n in audio_count.values())

    def write(name: str, lines: list[str]) -> None:
        atomic_write_text(out / name, "".join(line + "\n" for line in lines), fsync=False)

    for stale in ("segments", "utt2spk", "spk2utt", "utt2group"):
        if (out / stale).exists():
            (out / stale).unlink()
    if use_segments:
        rec_ids: dict[str, str] = {}
        taken: set[str] = set()
        for audio in sorted(audio_count):
            base = Path(audio).stem.replace(" ", "_") or "rec"
            rid, k = base, 1
            while rid in taken:
                k += 1
                rid = f"{base}-{k}"
            taken.add(rid)
            rec_ids[audio] = rid
        write("wav.scp", [f"{rid} {audio}" for audio, rid in sorted(rec_ids.items(), key=lambda x: x[1])])
        write("segments", [f"{r.id} {rec_ids[os.path.abspath(r.audio)]} {_num(r.offset)} "
                           f"{_num(r.offset + r.duration)}" for r in recs])
    else:
        write("wav.scp", [f"{r.id} {os.path.abspath(r.audio)}" for r in recs])
    write("text", [f"{r.id} {r.text}".rstrip() for r in recs])
    if any(r.speaker for r in recs):
        spk = {r.id: r.speaker or r.id for r in recs}
        write("utt2spk", [f"{u} {s}" for u, s in spk.items()])
        by_spk: dict[str, list[str]] = {}
        for u, s in spk.items():
            by_spk.setdefault(s, []).append(u)
        write("spk2utt", [f"{s} {' '.join(us)}" for s, us in sorted(by_spk.items())])
    if any(r.group for r in recs):
        write("utt2group", [f"{r.id} {r.group}" for r in recs if r.group])


def _num(x: float) -> str:
    s = f"{x:.6f}".rstrip("0").rstrip(".")
    return s or "0"


# ------------------------------------------------------------------------------------------------
# LibriSpeech
def import_librispeech(root: str | os.PathLike, strict: bool = False, drops: DropLog | None = None) -> list[Record]:
    """A LibriSpeech-style tree ``speaker/chapter/speaker-chapter.trans.txt`` (lines ``ID TEXT``)
    with ``ID.flac`` beside each transcript file. ``root`` may be the corpus root or any subset
    folder; all ``*.trans.txt`` below it are read. Speaker = the speaker part of the id. A listed
    utterance whose flac is missing is skipped with a warning (an error with ``strict``); with
    ``drops``, missing, unreadable and empty files are recorded there instead."""
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"LibriSpeech folder not found: {root}")
    trans_files = sorted(root.rglob("*.trans.txt"))
    if not trans_files:
        raise ManifestError(f"{root}: no '*.trans.txt' transcript files found (not a LibriSpeech tree?)")
    records: list[Record] = []
    seen: dict[str, str] = {}
    skipped: Counter = Counter()
    prober = _Prober(drops) if drops is not None else None
    for tf in trans_files:
        for lineno, line in _lines(tf):
            where = f"{tf}:{lineno}"
            utt, text = _key_value(tf, lineno, line, need_value=True)
            if utt in seen:
                raise ManifestError(f"{where}: duplicate id '{utt}' (also in {seen[utt]})")
            seen[utt] = where
            audio = tf.parent / f"{utt}.flac"
            if prober is not None and not strict:
                dur = prober.duration(str(audio.resolve()), where, utt)
                if dur is not None:
                    records.append(Record(id=utt, audio=str(audio.resolve()), duration=dur, text=text,
                                          speaker=utt.split("-")[0]))
                continue
            if not audio.is_file():
                _problem(strict, f"{where}: audio file not found: {audio}", skipped, "missing audio")
                continue
            dur = audio_duration(audio)
            if dur <= 0:
                _problem(strict, f"{where}: audio file is empty: {audio}", skipped, "empty audio")
                continue
            records.append(Record(id=utt, audio=str(audio.resolve()), duration=dur, text=text,
                                  speaker=utt.split("-")[0]))
    _report(f"import_librispeech({root})", skipped, len(records))
    return records


# ------------------------------------------------------------------------------------------------
# NeMo
_NEMO_KNOWN = {"audio_filepath", "duration", "text", "offset", "speaker", "lang", "id"}


def import_nemo(manifest_path: str | os.PathLike, drops: DropLog | None = None) -> list[Record]:
    """A NeMo JSONL manifest (``audio_filepath``, ``duration``, ``text``; optional ``offset``,
    ``speaker``, ``lang`` -> group). Relative audio paths are resolved against the manifest's
    folder. A missing or null duration is read from the audio header. Ids: an ``id`` field if
    present (as written by :func:`export_nemo`), else the audio file's stem; when several entries
    share a stem the offset in milliseconds is appended (``stem-001500``), and any clash left gets a
    counter. Other fields are kept in ``Record.extra``. With ``drops`` every audio file is read:
    a missing, unreadable or empty file, or a segment that runs past the file's end (a declared
    duration longer than the audio), is recorded there and the entry left out."""
    path = Path(manifest_path)
    if not path.is_file():
        raise ManifestError(f"NeMo manifest not found: {path}")
    base = path.resolve().parent
    prober = _Prober(drops) if drops is not None else None
    rows: list[tuple[dict, str]] = []
    for lineno, line in _lines(path):
        where = f"{path}:{lineno}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: expected a JSON object, got {type(d).__name__}")
        if not isinstance(d.get("audio_filepath"), str) or not d["audio_filepath"]:
            raise ManifestError(f"{where}: missing or invalid 'audio_filepath'")
        audio = d["audio_filepath"]
        if not os.path.isabs(audio) and "://" not in audio:
            audio = os.path.normpath(str(base / audio))
        try:
            offset = float(d.get("offset") or 0.0)
            dur = d.get("duration")
            dur = None if dur is None else float(dur)
        except (TypeError, ValueError):
            raise ManifestError(f"{where}: 'duration' and 'offset' must be numbers") from None
        if offset < 0:
            raise ManifestError(f"{where}: 'offset' must be >= 0, got {offset}")
        if prober is not None:
            name = str(d.get("id") or Path(audio).stem)
            if dur is None or dur < 0:
                total = prober.duration(audio, where, name)
                if total is None:
                    continue
                dur = round(total - offset, 6)
                if dur <= 0:
                    drops.add("duration mismatch", where, audio, name,
                              f"offset {offset:g} s, the file has {total:.3f} s")
                    continue
            elif dur == 0:
                drops.add("zero-length audio", where, audio, name, "declared duration 0")
                continue
            elif not prober.segment(audio, offset, dur, where, name):
                continue
        if dur is None or dur < 0:  # NeMo uses -1 / null for "unknown"
            dur = round(audio_duration(audio) - offset, 6)
        if dur <= 0:
            raise ManifestError(f"{where}: 'duration' must be > 0, got {dur}")
        text = d.get("text", "")
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise ManifestError(f"{where}: 'text' must be a string, got {type(text).__name__}")
        extra = {k: v for k, v in d.items() if k not in _NEMO_KNOWN}
        rec = Record(id="", audio=audio, duration=dur, text=text, offset=offset,
                     speaker=str(d.get("speaker", "") or ""), group=str(d.get("lang", "") or ""),
                     extra=extra)
        if d.get("id") not in (None, ""):
            rec.id = str(d["id"])
        rows.append((rec, where))

    stems = Counter(Path(r.audio).stem for r, _ in rows if not r.id)
    taken = {r.id for r, _ in rows if r.id}
    first: dict[str, str] = {}
    for r, where in rows:
        if r.id:
            if r.id in first:
                raise ManifestError(f"{where}: duplicate id '{r.id}' (first at {first[r.id]})")
            first[r.id] = where
    for r, _ in rows:
        if r.id:
            continue
        stem = Path(r.audio).stem
        rid = stem if stems[stem] == 1 else f"{stem}-{int(round(r.offset * 1000)):06d}"
        cand, k = rid, 1
        while cand in taken:
            k += 1
            cand = f"{rid}-{k}"
        taken.add(cand)
        r.id = cand
    return [r for r, _ in rows]


def export_nemo(records: Iterable[Record], path: str | os.PathLike) -> int:
    """Write a NeMo JSONL manifest (absolute audio paths). ``id`` is written too (NeMo ignores it;
    :func:`import_nemo` reads it back), ``offset`` when non-zero, ``speaker`` and ``lang`` (from
    ``group``) when set, and the record's ``extra`` fields at the top level. Returns the count."""
    path = Path(path)
    n = 0
    with atomic_open(path, "w", fsync=False) as f:
        for r in records:
            d = {"audio_filepath": os.path.abspath(r.audio) if "://" not in r.audio else r.audio,
                 "duration": r.duration, "text": r.text, "id": r.id}
            if r.offset:
                d["offset"] = r.offset
            if r.speaker:
                d["speaker"] = r.speaker
            if r.group:
                d["lang"] = r.group
            for k, v in (r.extra or {}).items():
                if k in _NEMO_KNOWN:
                    raise ManifestError(f"record '{r.id}': extra field '{k}' clashes with a NeMo field")
                d[k] = v
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
            n += 1
    return n


# ------------------------------------------------------------------------------------------------
# labels in file names
_FIELD_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)?\}")


@dataclass
class LabelPattern:
    """A compiled ``--label-pattern``: ``regex`` is matched in full against the file name (or the
    path relative to the folder when the pattern has a ``/``), with its extension when the
    pattern has one (``with_ext``; None for a regular expression: without, then with)."""

    source: str
    regex: re.Pattern
    on_path: bool
    with_ext: bool | None

    def match(self, rel: str) -> dict[str, str] | None:
        """The named fields for ``rel`` (a posix path relative to the folder), or None."""
        base = rel if self.on_path else rel.rsplit("/", 1)[-1]
        stem = base[: len(base) - len(Path(base).suffix)] if Path(base).suffix else base
        targets = [stem, base] if self.with_ext is None else [base if self.with_ext else stem]
        for t in targets:
            m = self.regex.fullmatch(t)
            if m:
                return {k: v for k, v in m.groupdict().items() if v is not None}
        return None


def compile_label_pattern(pattern: str) -> LabelPattern:
    """``'{speaker}_{text}_{n}.wav'`` (fields in braces; ``{}`` matches anything and is not kept)
    or a regular expression with named groups (``(?P<speaker>[a-z]+)-(?P<text>.+)``). ``text`` is
    required; ``speaker`` and ``group`` fill those fields and any other name goes to
    ``Record.extra``. In a template ``{text}`` may hold the separators (``_``, ``-``) and every
    other field stops at the character that follows it in the pattern, so
    ``'{speaker}_{text}_{n}.wav'`` reads ``alice_turn_on_the_light_3.wav`` as speaker ``alice``,
    text ``turn_on_the_light``, n ``3``. Literal text matches case-insensitively."""
    if not pattern or not pattern.strip():
        raise ManifestError("--label-pattern is empty")
    if "(?P<" in pattern:
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ManifestError(f"--label-pattern {pattern!r} is not a valid regular expression ({e})") from None
        if "text" not in rx.groupindex:
            raise ManifestError(f"--label-pattern {pattern!r} needs a group named text, e.g. (?P<text>.+)")
        return LabelPattern(pattern, rx, on_path="/" in pattern, with_ext=None)
    items = list(_FIELD_RE.finditer(pattern))
    names = [m.group(1) for m in items]
    if "text" not in names:
        raise ManifestError(f"--label-pattern {pattern!r} needs a {{text}} field, e.g. '{{speaker}}_{{text}}.wav'")
    dup = sorted({n for n in names if n and names.count(n) > 1})
    if dup:
        raise ManifestError(f"--label-pattern {pattern!r}: field {{{dup[0]}}} appears twice")
    parts, pos = [], 0
    for k, m in enumerate(items):
        lit = pattern[pos:m.start()]
        if k and not lit:
            raise ManifestError(f"--label-pattern {pattern!r}: fields {items[k - 1].group(0)} and {m.group(0)} "
                                f"need a separator between them")
        nxt = pattern[m.end(): items[k + 1].start() if k + 1 < len(items) else len(pattern)]
        parts.append(re.escape(lit))
        if m.group(1) == "text":
            parts.append(r"(?P<text>[^/]+)")
        else:
            cls = "[^" + re.escape("/" + nxt[:1]) + "]+"
            parts.append(f"(?P<{m.group(1)}>{cls})" if m.group(1) else f"(?:{cls})")
        pos = m.end()
    parts.append(re.escape(pattern[pos:]))
    last = pattern[items[-1].end():].rsplit("/", 1)[-1]
    return LabelPattern(pattern, re.compile("".join(parts), re.IGNORECASE), on_path="/" in pattern,
                        with_ext="." in last)


def _label_text(s: str) -> str:
    """A label from a file name: underscores and dashes are word breaks."""
    return " ".join(re.sub(r"[_\-]+", " ", s).split())


# ------------------------------------------------------------------------------------------------
# folder with sidecars, or labels in the file names
def import_folder(root: str | os.PathLike, exts: tuple[str, ...] = AUDIO_EXTS,
                  allow_unlabelled: bool = False, drops: DropLog | None = None,
                  label_pattern: str | LabelPattern | None = None) -> list[Record]:
    """Every audio file under ``root`` (searched recursively, sorted) with a ``.txt`` sidecar of the
    same stem; text = the sidecar's content, stripped. Files without a sidecar are skipped with a
    warning, or kept with empty text when ``allow_unlabelled``. Speaker = the parent folder's name
    ("" for files directly in ``root``); id = the path relative to ``root`` without extension, with
    ``/`` replaced by ``-``.

    With ``label_pattern`` (see :func:`compile_label_pattern`) the labels come from the file
    names instead of sidecars: text (underscores and dashes made spaces), speaker (default: the
    parent folder), group and extra fields; a file whose name does not match is skipped. With
    ``drops``, unlabelled, unreadable and empty files are recorded there instead of warned about."""
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"audio folder not found: {root}")
    pat = compile_label_pattern(label_pattern) if isinstance(label_pattern, str) else label_pattern
    want = {e.lower() if e.startswith(".") else "." + e.lower() for e in exts}
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in want
                   and not p.name.startswith("."))
    prober = _Prober(drops) if drops is not None else None
    records: list[Record] = []
    first: dict[str, Path] = {}
    unlabelled = 0
    for p in files:
        rel = p.relative_to(root).with_suffix("")
        rid = "-".join(rel.parts)
        audio = str(p.resolve())
        if rid in first:
            if prober is not None:
                drops.add("duplicate id", str(p), audio, rid, f"same name as {first[rid].name}, other extension")
                continue
            raise ManifestError(f"{p}: id '{rid}' clashes with {first[rid]} (same name, other extension)")
        first[rid] = p
        speaker = p.parent.name if p.parent != root else ""
        group, extra = "", {}
        if pat is not None:
            fields = pat.match(p.relative_to(root).as_posix())
            if fields is None:
                if prober is not None:
                    drops.add("no transcript", str(p), audio, rid,
                              f"name does not match --label-pattern {pat.source!r}")
                    continue
                unlabelled += 1
                if unlabelled <= 5:
                    log.warning("%s: name does not match the label pattern %r (skipped)", p, pat.source)
                continue
            text = _label_text(fields.pop("text", ""))
            speaker = fields.pop("speaker", "") or speaker
            group = fields.pop("group", "")
            extra = fields
        else:
            side = p.with_suffix(".txt")
            if side.is_file():
                try:
                    text = side.read_text(encoding="utf-8-sig").strip()
                except UnicodeDecodeError as e:
                    raise ManifestError(f"{side}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            elif allow_unlabelled:
                text = ""
            elif prober is not None:
                drops.add("no transcript", str(p), audio, rid, f"no sidecar {side.name}")
                continue
            else:
                unlabelled += 1
                if unlabelled <= 5:
                    log.warning("%s: no transcript sidecar %s (skipped)", p, side.name)
                continue
        if prober is not None:
            dur = prober.duration(audio, str(p), rid)
            if dur is None:
                continue
        else:
            dur = audio_duration(p)
            if dur <= 0:
                log.warning("%s: no audio samples (skipped)", p)
                continue
        records.append(Record(id=rid, audio=audio, duration=dur, text=text, speaker=speaker, group=group,
                              extra=extra))
    if unlabelled:
        how = ("did not match the label pattern" if pat is not None else
               "without a .txt sidecar skipped (allow_unlabelled=True keeps them with empty text)")
        log.warning("import_folder(%s): %d audio files %s", root, unlabelled, how)
    return records


# ------------------------------------------------------------------------------------------------
# CSV / TSV tables: Common Voice, Hugging Face audiofolder, anything with a path and a text column
PATH_COLUMNS = ("path", "file_name", "filename", "file", "audio", "audio_path", "audio_filepath", "filepath",
                "wav", "wav_path", "clip")
TEXT_COLUMNS = ("transcription", "text", "sentence", "transcript", "normalized_text", "label")
SPEAKER_COLUMNS = ("speaker", "speaker_id", "client_id", "spk", "spk_id", "speaker_name")
GROUP_COLUMNS = ("group",)
DURATION_COLUMNS = ("duration", "duration_s", "duration_sec", "duration_seconds", "seconds", "duration_ms",
                    "duration[ms]")
ID_COLUMNS = ("id", "utt_id", "utterance_id")


def _table_rows(path: Path) -> tuple[list[str], Iterator[tuple[int, dict]]]:
    """The header and ``(line number, row dict)`` of a CSV, TSV (``.tsv``/``.tab``, or a first
    line with tabs and no commas; read without quote handling, as Common Voice writes them) or
    JSON-lines table."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            first = f.readline()
    except UnicodeDecodeError as e:
        raise ManifestError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not first.strip():
        raise ManifestError(f"{path}: empty file (a CSV/TSV needs a header line naming its columns)")
    if path.suffix.lower() == ".jsonl":
        def jrows():
            for lineno, line in _lines(path):
                try:
                    d = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ManifestError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(d, dict):
                    raise ManifestError(f"{path}:{lineno}: expected a JSON object, got {type(d).__name__}")
                yield lineno, {str(k): "" if v is None else str(v) for k, v in d.items()}
        rows = list(jrows())
        header = list(dict.fromkeys(k for _, d in rows for k in d))
        return header, iter(rows)
    if path.suffix.lower() in (".tsv", ".tab") or ("\t" in first and "," not in first):
        delim, quoting = "\t", csv.QUOTE_NONE
    elif ";" in first and "," not in first:
        delim, quoting = ";", csv.QUOTE_MINIMAL
    else:
        delim, quoting = ",", csv.QUOTE_MINIMAL
    header = [h.strip() for h in next(csv.reader([first], delimiter=delim, quoting=quoting))]

    def rows_():
        try:
            with open(path, encoding="utf-8-sig", newline="") as f:
                r = csv.reader(f, delimiter=delim, quoting=quoting)
                next(r, None)
                for cells in r:
                    if not any(c.strip() for c in cells):
                        continue
                    yield r.line_num, {h: (cells[k] if k < len(cells) else "") for k, h in enumerate(header)}
        except UnicodeDecodeError as e:
            raise ManifestError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        except csv.Error as e:
            raise ManifestError(f"{path}: not a readable CSV/TSV ({e})") from None
    return header, rows_()


def _column(header: list[str], given: str | None, candidates: Iterable[str], what: str, path: Path,
            option: str, required: bool) -> str | None:
    """The header name to use for ``what``: ``given`` (must exist), else the first candidate
    present (case-insensitive)."""
    by_lc = {h.lower(): h for h in header}
    if given:
        if given in header:
            return given
        if given.lower() in by_lc:
            return by_lc[given.lower()]
        raise ManifestError(f"{path}: no column '{given}' ({option}); the columns are: {', '.join(header)}")
    for c in candidates:
        if c in by_lc:
            return by_lc[c]
    if required:
        raise ManifestError(f"{path}: no {what} column found (looked for {', '.join(candidates)}); the columns "
                            f"are: {', '.join(header)}; name it with {option}")
    return None


def _id_from_path(cell: str) -> str:
    parts = [p for p in Path(cell).with_suffix("").parts if p not in ("/", "..", ".", "")]
    return "-".join(parts) or cell


def import_table(path: str | os.PathLike, path_col: str | None = None, text_col: str | None = None,
                 speaker_col: str | None = None, group_col: str | None = None, duration_col: str | None = None,
                 audio_root: str | os.PathLike | None = None, drops: DropLog | None = None,
                 tolerance: float = DURATION_TOLERANCE, durations: dict[str, float] | None = None,
                 text_columns: tuple[str, ...] = TEXT_COLUMNS) -> list[Record]:
    """A CSV/TSV (or JSON-lines) table with a header: one row per utterance with an audio path and
    its transcript. Columns are found by name (case-insensitive) unless given: path
    (:data:`PATH_COLUMNS`), text (``text_columns``), speaker (:data:`SPEAKER_COLUMNS`, e.g. Common
    Voice's ``client_id``), group, a duration in seconds (``duration_ms``: milliseconds) and an
    id; every other non-empty cell is kept in ``Record.extra`` (so ``harken eval --group-by``
    can use it, e.g. Common Voice's ``gender`` or ``accents``).

    Relative paths are resolved against ``audio_root``, else the table's folder, else a
    ``clips/`` folder beside it (the Common Voice layout). Every file is read: a missing,
    unreadable or empty file, an empty transcript, a repeated id, or a duration (from the column
    or ``durations``, keyed by the path cell) that differs from the audio read by more than
    ``tolerance`` seconds (or 1%) is recorded in ``drops`` and left out (logged when ``drops`` is
    None); the duration kept is the one read. Ids: the id column, else the path cell without
    extension (``/`` -> ``-``)."""
    path = Path(path)
    if path.is_dir():
        tables = sorted(p.name for p in path.iterdir() if p.suffix.lower() in (".csv", ".tsv"))
        raise ManifestError(f"{path} is a folder: give the CSV/TSV file itself"
                            + (f" (found {', '.join(tables[:6])})" if tables else ""))
    if not path.is_file():
        raise ManifestError(f"table not found: {path}")
    own = drops is None
    drops = DropLog() if own else drops
    header, rows = _table_rows(path)
    pcol = _column(header, path_col, PATH_COLUMNS, "audio path", path, "--path-col", True)
    tcol = _column(header, text_col, text_columns, "transcript", path, "--text-col", True)
    scol = _column(header, speaker_col, SPEAKER_COLUMNS, "speaker", path, "--speaker-col", False)
    gcol = _column(header, group_col, GROUP_COLUMNS, "group", path, "--group-col", False)
    dcol = _column(header, duration_col, DURATION_COLUMNS, "duration", path, "--duration-col", False)
    icol = _column(header, None, ID_COLUMNS, "id", path, "", False)
    if pcol == tcol:
        raise ManifestError(f"{path}: the audio path and the transcript are both column '{pcol}'")
    log.info("%s: audio path from column '%s', text from '%s'%s%s%s", path.name, pcol, tcol,
             f", speaker from '{scol}'" if scol else "", f", group from '{gcol}'" if gcol else "",
             f", duration from '{dcol}'" if dcol else "")
    scale = 0.001 if dcol and (dcol.lower().endswith(("_ms", "[ms]", "(ms)")) or dcol.lower() == "ms") else 1.0
    used = {c for c in (pcol, tcol, scol, gcol, dcol, icol) if c}
    table_dir = path.resolve().parent
    bases = [Path(audio_root).resolve()] if audio_root else [table_dir, table_dir / "clips"]
    prober = _Prober(drops)
    records: list[Record] = []
    seen: dict[str, str] = {}
    for lineno, row in rows:
        where = f"{path}:{lineno}"
        cell = (row.get(pcol) or "").strip()
        rid = (row.get(icol) or "").strip() if icol else ""
        rid = rid or _id_from_path(cell)
        if not cell:
            drops.add("missing file", where, "", rid, f"empty '{pcol}' cell")
            continue
        if os.path.isabs(cell):
            audio = cell
        else:
            hit = next((b / cell for b in bases if (b / cell).exists()), None)
            audio = str((hit if hit is not None else bases[0] / cell).resolve())
        if rid in seen:
            drops.add("duplicate id", where, audio, rid, f"id '{rid}' also at {seen[rid]}")
            continue
        seen[rid] = where
        text = (row.get(tcol) or "").strip()
        if not text:
            drops.add("empty transcript", where, audio, rid, f"empty '{tcol}' cell")
            continue
        declared, said = None, ""
        if dcol and (row.get(dcol) or "").strip():
            raw = row[dcol].strip()
            try:
                declared, said = float(raw) * scale, f"column '{dcol}' says {raw}"
            except ValueError:
                drops.add("duration mismatch", where, audio, rid, f"column '{dcol}' is not a number: {raw!r}")
                continue
        elif durations is not None and cell in durations:
            declared = durations[cell]
            said = f"listed as {declared:g} s"
        dur = prober.duration(audio, where, rid, declared, said, tolerance)
        if dur is None:
            continue
        extra = {k: v.strip() for k, v in row.items() if k not in used and v and v.strip()}
        records.append(Record(id=rid, audio=audio, duration=dur, text=text,
                              speaker=(row.get(scol) or "").strip() if scol else "",
                              group=(row.get(gcol) or "").strip() if gcol else "", extra=extra))
    if own and drops.items:
        log.warning("import_table(%s): %s; first: %s", path, drops.summary(len(records)), "; ".join(drops.first(5)))
    return records


def import_commonvoice(tsv: str | os.PathLike, drops: DropLog | None = None,
                       audio_root: str | os.PathLike | None = None, tolerance: float = DURATION_TOLERANCE,
                       **columns) -> list[Record]:
    """One Common Voice TSV (``train.tsv``, ``dev.tsv``, ``test.tsv``, ``validated.tsv`` ...):
    columns ``path`` (a clip in the ``clips/`` folder beside the TSV, unless ``audio_root``),
    ``sentence`` and ``client_id`` (the speaker); ``age``, ``gender``, ``accents``, ``locale`` ...
    go to ``Record.extra``. When ``clip_durations.tsv`` (``clip``, ``duration[ms]``) sits beside
    the TSV, every clip's duration is checked against it. See :func:`import_table`."""
    tsv = Path(tsv)
    if tsv.is_dir():
        tables = sorted(p.name for p in tsv.glob("*.tsv") if p.name != "clip_durations.tsv")
        raise ManifestError(f"{tsv} is a folder: give one of its TSV files"
                            + (f" ({', '.join(tables[:8])})" if tables else " (none found)"))
    durations = None
    cd = tsv.parent / "clip_durations.tsv"
    if cd.is_file() and tsv.name != cd.name:
        header, rows = _table_rows(cd)
        ccol = _column(header, None, ("clip", "path"), "clip", cd, "", True)
        mcol = _column(header, None, ("duration[ms]", "duration_ms", "duration"), "duration", cd, "", True)
        durations = {}
        for lineno, row in rows:
            try:
                durations[row[ccol].strip()] = float(row[mcol]) / 1000.0
            except (TypeError, ValueError):
                raise ManifestError(f"{cd}:{lineno}: duration must be a number of milliseconds, "
                                    f"got {row.get(mcol)!r}") from None
    defaults = dict(path_col="path", text_col="sentence", speaker_col="client_id")
    columns = {**defaults, **{k: v for k, v in columns.items() if v}}
    return import_table(tsv, audio_root=audio_root or tsv.resolve().parent / "clips", drops=drops,
                        tolerance=tolerance, durations=durations, **columns)


def import_audiofolder(source: str | os.PathLike, drops: DropLog | None = None, tolerance: float = DURATION_TOLERANCE,
                       **columns) -> list[Record]:
    """A Hugging Face ``audiofolder`` dataset: ``metadata.csv`` (or ``metadata.jsonl``) with a
    ``file_name`` column relative to the metadata file's folder and the transcript in
    ``transcription``, ``text`` or ``sentence`` (first found). ``source``: the folder or the
    metadata file. See :func:`import_table`."""
    src = Path(source)
    if src.is_dir():
        found = [src / n for n in ("metadata.csv", "metadata.jsonl") if (src / n).is_file()]
        if not found:
            subs = sorted(p.parent.name for p in src.glob("*/metadata.*"))
            raise ManifestError(f"{src}: no metadata.csv or metadata.jsonl"
                                + (f"; prepare each split folder on its own ({', '.join(subs)})" if subs else ""))
        src = found[0]
    if not src.is_file():
        raise ManifestError(f"audiofolder metadata not found: {src}")
    columns = {"path_col": "file_name", **{k: v for k, v in columns.items() if v}}
    return import_table(src, audio_root=src.resolve().parent, drops=drops, tolerance=tolerance,
                        text_columns=("transcription", "text", "sentence"), **columns)


# ------------------------------------------------------------------------------------------------
# Asterisk's English prompts (Debian asterisk-core-sounds-en-wav + asterisk-core-sounds-en)
#: where Debian puts the prompts (one professional speaker, 8 kHz, CC-BY-SA-3.0) and their texts
ASTERISK_SOUNDS = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
ASTERISK_TEXTS = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
_KEYPAD = {"*": " star ", "#": " pound "}  # keypad keys as the prompts say them


def import_asterisk(root: str | os.PathLike = ASTERISK_SOUNDS, drops: DropLog | None = None,
                    texts: str | os.PathLike | None = None) -> list[Record]:
    """The Asterisk PBX's recorded English prompts: ``root/NAME.wav`` for every ``NAME: text`` line
    of ``core-sounds-en.txt[.gz]`` (``texts``; default: that file in ``root``, else where Debian's
    ``asterisk-core-sounds-en`` installs it). Keypad symbols become the words the speaker says
    ("star", "pound"). Sound effects (texts in square brackets: tones, beeps) are left out as
    "no transcript"; missing and unreadable files as the other importers leave them out."""
    import gzip

    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"{root}: no Asterisk prompts here; install them with `apt-get install "
                            "asterisk-core-sounds-en-wav asterisk-core-sounds-en` (Debian)")
    if texts is None:
        found = [root / n for n in ("core-sounds-en.txt.gz", "core-sounds-en.txt") if (root / n).is_file()]
        texts = found[0] if found else ASTERISK_TEXTS
    texts = Path(texts)
    if not texts.is_file():
        raise ManifestError(f"{texts}: the prompts' transcript file is missing; install "
                            "`asterisk-core-sounds-en` (Debian)")
    drops = drops if drops is not None else DropLog()
    prober = _Prober(drops)
    records: list[Record] = []
    with (gzip.open(texts, "rt", encoding="utf-8") if texts.suffix == ".gz"
          else open(texts, encoding="utf-8")) as f:
        for lineno, line in enumerate(f, 1):
            if line.startswith(";") or ":" not in line:
                continue
            name, text = (x.strip() for x in line.split(":", 1))
            rid, audio, where = f"asterisk-{name.replace('/', '-')}", str(root / f"{name}.wav"), f"{texts}:{lineno}"
            if not text or text.startswith("["):
                drops.add("no transcript", where, audio, rid, f"a sound, not speech: {text!r}")
                continue
            d = prober.duration(audio, where, rid)
            if d is None:
                continue
            for k, v in _KEYPAD.items():
                text = text.replace(k, v)
            records.append(Record(rid, audio, round(d, 3), " ".join(text.split()), speaker="asterisk:allison",
                                  group="asterisk", extra={"source": "asterisk"}))
    return records


# ------------------------------------------------------------------------------------------------
# the last step of `harken prepare`
def finalize_records(records: Iterable[Record], drops: DropLog) -> list[Record]:
    """Normalise every transcript with :func:`harken.text.normalize.normalize_text` (the form the
    tokenizer and the WER see: lowercase a-z, apostrophes inside words, numbers spelled out,
    punctuation dropped), keeping the original in ``extra["raw_text"]`` when it differs; a
    transcript with nothing left, or a repeated id, goes to ``drops``."""
    from harken.text.normalize import normalize_text

    out: list[Record] = []
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            drops.add("duplicate id", r.audio, r.audio, r.id, "id already used")
            continue
        raw = r.text
        norm = normalize_text(raw)
        if not norm:
            drops.add("empty transcript", r.audio, r.audio, r.id,
                      f"nothing of {raw.strip()!r} is left after normalisation to a-z and apostrophes"
                      if raw.strip() else "no text")
            continue
        seen.add(r.id)
        if norm != raw:
            r = Record(**{**asdict(r), "text": norm, "extra": {**(r.extra or {}), "raw_text": raw}})
        out.append(r)
    return out


def sample_rates(records: Iterable[Record]) -> Counter:
    """How many distinct audio files there are at each sample rate (from the file headers; files
    soundfile cannot open are counted under 0)."""
    import soundfile as sf

    rates: Counter = Counter()
    for audio in sorted({r.audio for r in records}):
        try:
            rates[int(sf.info(audio).samplerate)] += 1
        except Exception:  # noqa: BLE001 - e.g. MP3 on an old libsndfile: decoded through ffmpeg
            rates[0] += 1
    return rates


IMPORTERS: dict[str, Callable[..., list[Record]]] = {
    "kaldi": import_kaldi,
    "librispeech": import_librispeech,
    "nemo": import_nemo,
    "folder": import_folder,
    "csv": import_table,
    "commonvoice": import_commonvoice,
    "audiofolder": import_audiofolder,
    "asterisk": import_asterisk,
}
