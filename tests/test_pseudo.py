"""Pseudo-labelled real speech: codec2-style recordings cut at pauses, Whisper transcripts kept where
they pass the checks, data.train_repeat for a small labelled set beside a large one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harken.audio import load_audio, resample, save_wav
from harken.data.manifest import Record, read_manifest, write_manifest


def _utterances(tiny_corpus, n=3):
    recs = read_manifest(Path(tiny_corpus[0]) / "test_seen.jsonl")[:n]
    return recs, [load_audio(r.audio) for r in recs]


def test_codec2_recordings_are_cut_at_pauses_and_deduplicated(tmp_path, tiny_corpus):
    from harken.data.pseudo import build_codec2_segments

    recs, waves = _utterances(tiny_corpus)
    gap = np.zeros(16000, np.float32)
    talk = np.concatenate([gap] + [x for w in waves for x in (w, gap)])
    talk8 = resample(talk, 16000, 8000)
    root = tmp_path / "codec2"
    (root / "wav").mkdir(parents=True)
    (root / "raw").mkdir()
    save_wav(root / "wav" / "talk.wav", talk8, 8000)
    import soundfile as sf

    sf.read(str(root / "wav" / "talk.wav"), dtype="int16")[0].astype("<i2").tofile(root / "raw" / "talk.raw")  # again
    rng = np.random.default_rng(0)
    (rng.standard_normal(80000) * 3000).astype("<i2").tofile(root / "raw" / "sine1k_2Hz_spread.raw")  # a test signal
    (root / "wav" / "broken.wav").write_bytes(b"RIFF\x00\x00not a wave file")
    summ = build_codec2_segments(tmp_path / "out", root=root)
    segs = read_manifest(summ["manifest"])
    assert {r.extra["recording"] for r in segs} == {"wav-talk"}, segs  # the .raw copy, the signal, the bad file: out
    assert len(segs) == len(waves)  # one segment per utterance, cut in the pauses
    for r, w in zip(segs, waves):
        a = load_audio(r.audio)
        assert abs(len(a) / 16000 - len(w) / 16000) < 0.6 and r.extra["rate"] == 8000 and not r.text


def test_judge_says_why_a_label_is_not_kept():
    from harken.data.pseudo import compression_ratio, judge

    assert judge("", []) == ("no_words", 0.0)
    assert judge("you", [], no_speech=0.95)[0] == "no_speech"  # Whisper hears silence as "you"
    assert judge("upbeat music", [], no_speech=0.3, raw=" (upbeat music)")[0] == "no_speech"
    assert judge("upbeat music", [], no_speech=0.3, raw=" Upbeat music.")[0] is None
    loop = "thank you " * 30
    assert compression_ratio(loop) > 2.4 and judge(loop.strip(), [])[0] == "repetition"
    text = "the birch canoe slid on the smooth planks"
    assert judge(text, [text]) == (None, 0.0)
    assert judge(text, ["the birch canoe slid on smooth planks"])[0] is None  # 1 of 8 words
    # both ways round (the larger counts): a check that hears fewer words is judged like one that hears more
    for label, check in ((text, "the birch canoe"), ("the birch canoe", text)):
        why, dis = judge(label, [check])
        assert why == "disagreement" and dis == pytest.approx(5 / 3)
    assert judge(text, ["the birch canoe slid on the smooth planks", "a bird can slide"])[0] == "disagreement"


LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")


def _librivox(n=3):
    """n real LibriVox sentences (pocketsphinx-testdata) as records with their transcripts."""
    if not (LIBRIVOX / "transcription").is_file():
        pytest.skip("LOUD SKIP: pocketsphinx-testdata is not installed (make test-apt): no real speech to label")
    from harken.audio import audio_duration
    from harken.text.normalize import normalize_text

    out = []
    for line in (LIBRIVOX / "transcription").read_text().splitlines()[:n]:
        text, rid = line.rsplit("(", 1)
        wav = LIBRIVOX / f"{rid.strip(' )')}.wav"
        out.append(Record(id=wav.stem, audio=str(wav), duration=audio_duration(str(wav)),
                          text=normalize_text(text.replace("<s>", "").replace("</s>", ""))))
    return out


def test_pseudo_label_transcribes_speech_and_reports_what_it_drops(tmp_path, tiny_en):
    pytest.importorskip("tokenizers", reason="LOUD SKIP: tokenizers missing (pip install 'harken[pretrained]')")
    from harken.data.pseudo import pseudo_label
    from harken.evaluate import error_report

    recs = _librivox(4)
    dup = Record(id="again", audio=recs[0].audio, duration=recs[0].duration)  # the same audio twice
    missing = Record(id="missing", audio=str(tmp_path / "gone.wav"), duration=1.0)
    silent = tmp_path / "silence.wav"
    save_wav(silent, np.zeros(32000, np.float32))  # Whisper tiny.en writes "you" for it
    quiet = Record(id="silence", audio=str(silent), duration=2.0)
    todo = [Record(id=r.id, audio=r.audio, duration=r.duration) for r in recs] + [dup, missing, quiet]
    dropped = tmp_path / "dropped.jsonl"
    kept, summ = pseudo_label(todo, [str(tiny_en)], dropped_path=dropped)
    by_id = {r.id: r for r in kept}
    assert set(by_id) == {r.id for r in recs}, summ
    assert summ.dropped == {"unreadable": 1, "duplicate_text": 1, "no_speech": 1}
    truth = {r.id: r.text for r in recs}
    rep = error_report([truth[r.id] for r in kept], [r.text for r in kept])
    assert rep.wer < 0.2, [(truth[r.id], r.text) for r in kept]  # tiny.en on real read speech
    assert all(r.extra["label"] == "pseudo" and r.extra["pseudo_by"] == [str(tiny_en)] for r in kept)
    reasons = [json.loads(x)["reason"] for x in dropped.read_text().splitlines()]
    assert sorted(reasons) == sorted(k for k, n in summ.dropped.items() for _ in range(n))


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "harken.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_pseudo_label_cli(tmp_path, tiny_en):
    pytest.importorskip("tokenizers", reason="LOUD SKIP: tokenizers missing (pip install 'harken[pretrained]')")
    recs = _librivox(2)
    src = tmp_path / "todo.jsonl"
    write_manifest(src, [Record(id=r.id, audio=r.audio, duration=r.duration) for r in recs])
    bad = _cli("pseudo-label", str(src), "--whisper", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o.jsonl"),
               cwd=tmp_path)
    assert bad.returncode == 2 and "nowhere" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    same = _cli("pseudo-label", str(src), "--whisper", str(tiny_en), "--out", str(src), cwd=tmp_path)
    assert same.returncode == 2 and "input manifest" in same.stderr
    ok = _cli("pseudo-label", str(src), "--whisper", str(tiny_en), "--out", str(tmp_path / "lab.jsonl"), cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    lab = read_manifest(tmp_path / "lab.jsonl")
    assert len(lab) >= 1 and all(r.text and r.extra["label"] == "pseudo" for r in lab)
    assert (tmp_path / "lab.dropped.jsonl").exists() and f"of {len(recs)} records" in ok.stdout
    # a folder of recordings: one file holding both sentences with a pause between, one that does not decode
    rec = tmp_path / "recordings"
    rec.mkdir()
    both = np.concatenate([load_audio(recs[0].audio), np.zeros(16000, np.float32), load_audio(recs[1].audio)])
    save_wav(rec / "talk.wav", both)
    (rec / "broken.wav").write_bytes(b"not audio at all")
    fold = _cli("pseudo-label", str(rec), "--whisper", str(tiny_en), "--out", str(tmp_path / "f" / "lab.jsonl"),
                cwd=tmp_path)
    assert fold.returncode == 0, fold.stderr
    assert "broken.wav" in fold.stderr and "cut 1 recordings into 2 segments" in fold.stdout, fold.stdout
    got = read_manifest(tmp_path / "f" / "lab.jsonl")
    from harken.evaluate import error_report

    assert len(got) == 2 and error_report([r.text for r in recs], [r.text for r in got]).wer < 0.2, got


def test_train_repeat_uses_a_manifest_several_times(tmp_path, tiny_corpus):
    from harken.config import ConfigError, load_config
    from harken.train.trainer import load_train_records

    corpus = Path(tiny_corpus[0])
    train, dev = str(corpus / "train.jsonl"), str(corpus / "dev.jsonl")
    n_train, n_dev = len(read_manifest(train)), len(read_manifest(dev))
    cfg = load_config(None, [f"data.train=[{train},{dev}]", "data.train_repeat=[1,3]"])
    recs = load_train_records(cfg)
    assert len(recs) == n_train + 3 * n_dev
    assert len({r.id for r in recs}) == len(recs)  # the copies have their own ids
    assert sum(r.id.endswith("~2") for r in recs) == n_dev
    assert len(load_train_records(load_config(None, [f"data.train=[{train},{dev}]"]))) == n_train + n_dev
    for bad in ("[1]", "[1,0]", "[1,1.5]"):
        with pytest.raises(ConfigError, match="data.train_repeat"):
            load_config(None, [f"data.train=[{train},{dev}]", f"data.train_repeat={bad}"])
