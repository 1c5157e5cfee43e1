"""Corpus importers (Kaldi data dir, LibriSpeech tree, NeMo manifest, folder of audio + .txt
sidecars) to :class:`Record` lists, and writers back to Kaldi and NeMo layouts.

Transcripts are kept exactly as given (only surrounding whitespace is stripped); text
normalisation happens later in the training pipeline. Malformed input raises
:class:`ManifestError` (or :class:`AudioError` for audio) naming the file and the line.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
from collections import Counter
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


def _parse_wav_scp(path: Path, data_dir: Path) -> dict[str, tuple[str, int]]:
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
        if not os.path.exists(resolved):
            hint = " (Kaldi archive offsets such as 'x.ark:123' are not supported)" if ".ark:" in src else ""
            raise AudioError(f"{path}:{lineno}: audio file for '{key}' not found: {src}{hint}")
        out[key] = (resolved, lineno)
    return out


def import_kaldi(data_dir: str | os.PathLike, strict: bool = False) -> list[Record]:
    """A Kaldi data dir: ``wav.scp`` and ``text`` (required), ``segments``, ``utt2spk`` and
    ``utt2group`` (optional). With ``segments`` each segment becomes a record (offset = start,
    duration = end - start; ``end`` of -1 means the end of the recording); without, each wav.scp
    entry is one utterance whose duration is read from the audio header.

    Utterances without a transcript, transcripts without audio and empty recordings are skipped
    with a warning; ``strict=True`` makes them errors instead. Malformed lines are always errors.
    """
    d = Path(data_dir)
    if not d.is_dir():
        raise ManifestError(f"Kaldi data dir not found: {d}")
    for req in ("wav.scp", "text"):
        if not (d / req).is_file():
            raise ManifestError(f"{d}: missing required file '{req}'")
    wavs = _parse_wav_scp(d / "wav.scp", d)
    texts = _read_table(d / "text", need_value=False)
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
            _problem(strict, f"{where}: utterance '{utt}' has no line in {d / 'text'}", skipped,
                     "without text")
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
def import_librispeech(root: str | os.PathLike, strict: bool = False) -> list[Record]:
    """A LibriSpeech-style tree ``speaker/chapter/speaker-chapter.trans.txt`` (lines ``ID TEXT``)
    with ``ID.flac`` beside each transcript file. ``root`` may be the corpus root or any subset
    folder; all ``*.trans.txt`` below it are read. Speaker = the speaker part of the id. A listed
    utterance whose flac is missing is skipped with a warning (an error with ``strict``)."""
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"LibriSpeech folder not found: {root}")
    trans_files = sorted(root.rglob("*.trans.txt"))
    if not trans_files:
        raise ManifestError(f"{root}: no '*.trans.txt' transcript files found (not a LibriSpeech tree?)")
    records: list[Record] = []
    seen: dict[str, str] = {}
    skipped: Counter = Counter()
    for tf in trans_files:
        for lineno, line in _lines(tf):
            where = f"{tf}:{lineno}"
            utt, text = _key_value(tf, lineno, line, need_value=True)
            if utt in seen:
                raise ManifestError(f"{where}: duplicate id '{utt}' (also in {seen[utt]})")
            seen[utt] = where
            audio = tf.parent / f"{utt}.flac"
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


def import_nemo(manifest_path: str | os.PathLike) -> list[Record]:
    """A NeMo JSONL manifest (``audio_filepath``, ``duration``, ``text``; optional ``offset``,
    ``speaker``, ``lang`` -> group). Relative audio paths are resolved against the manifest's
    folder. A missing or null duration is read from the audio header. Ids: an ``id`` field if
    present (as written by :func:`export_nemo`), else the audio file's stem; when several entries
    share a stem the offset in milliseconds is appended (``stem-001500``), and any clash left gets a
    counter. Other fields are kept in ``Record.extra``."""
    path = Path(manifest_path)
    if not path.is_file():
        raise ManifestError(f"NeMo manifest not found: {path}")
    base = path.resolve().parent
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
# folder with sidecars
def import_folder(root: str | os.PathLike, exts: tuple[str, ...] = AUDIO_EXTS,
                  allow_unlabelled: bool = False) -> list[Record]:
    """Every audio file under ``root`` (searched recursively, sorted) with a ``.txt`` sidecar of the
    same stem; text = the sidecar's content, stripped. Files without a sidecar are skipped with a
    warning, or kept with empty text when ``allow_unlabelled``. Speaker = the parent folder's name
    ("" for files directly in ``root``); id = the path relative to ``root`` without extension, with
    ``/`` replaced by ``-``."""
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"audio folder not found: {root}")
    want = {e.lower() if e.startswith(".") else "." + e.lower() for e in exts}
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in want
                   and not p.name.startswith("."))
    records: list[Record] = []
    first: dict[str, Path] = {}
    unlabelled = 0
    for p in files:
        rel = p.relative_to(root).with_suffix("")
        rid = "-".join(rel.parts)
        if rid in first:
            raise ManifestError(f"{p}: id '{rid}' clashes with {first[rid]} (same name, other extension)")
        first[rid] = p
        side = p.with_suffix(".txt")
        if side.is_file():
            try:
                text = side.read_text(encoding="utf-8-sig").strip()
            except UnicodeDecodeError as e:
                raise ManifestError(f"{side}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        elif allow_unlabelled:
            text = ""
        else:
            unlabelled += 1
            if unlabelled <= 5:
                log.warning("%s: no transcript sidecar %s (skipped)", p, side.name)
            continue
        dur = audio_duration(p)
        if dur <= 0:
            log.warning("%s: no audio samples (skipped)", p)
            continue
        speaker = p.parent.name if p.parent != root else ""
        records.append(Record(id=rid, audio=str(p.resolve()), duration=dur, text=text, speaker=speaker))
    if unlabelled:
        log.warning("import_folder(%s): %d audio files without a .txt sidecar skipped "
                    "(allow_unlabelled=True keeps them with empty text)", root, unlabelled)
    return records


IMPORTERS: dict[str, Callable[..., list[Record]]] = {
    "kaldi": import_kaldi,
    "librispeech": import_librispeech,
    "nemo": import_nemo,
    "folder": import_folder,
}
