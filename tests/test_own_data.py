"""A new user's own recordings to a manifest, splits and a per-speaker evaluation: ``harken prepare
csv|commonvoice|audiofolder|folder --label-pattern``, ``harken split``, ``harken eval --group-by``.

Audio is real: tones written by soundfile for the importers (one file truncated on disk, one
garbage, one missing) and the espeak-synthesized tiny corpus for evaluation."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import soundfile as sf

from harken.audio import AudioError
from harken.cli import main
from harken.data.importers import (
    DropLog,
    compile_label_pattern,
    finalize_records,
    import_audiofolder,
    import_commonvoice,
    import_folder,
    import_kaldi,
    import_nemo,
    import_table,
)
from harken.data.manifest import ManifestError, Record, read_manifest, write_manifest
from harken.data.split import split_records

SR = 8000  # a telephone-style user's audio


def tone(path, seconds, freq=330.0, sr=SR):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(round(seconds * sr))) / sr
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr, subtype="PCM_16")
    return path


def truncate(path, samples=28):
    """Cut a 16-bit WAV to ``samples`` samples on disk, its header still claiming the full length
    (a copy interrupted mid-file)."""
    data = path.read_bytes()
    head = data.index(b"data") + 8
    path.write_bytes(data[:head + 2 * samples])
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


# ------------------------------------------------------------------------------------ Common Voice
def commonvoice(tmp_path):
    """train.tsv + clips/ + clip_durations.tsv: 3 good rows (2 speakers), a missing clip, an empty
    sentence, a clip truncated to 28 samples whose listed duration says 2.5 s, a garbage file."""
    root = tmp_path / "cv-corpus" / "en"
    clips = root / "clips"
    for name, sec in (("cv_1.wav", 0.8), ("cv_2.wav", 1.1), ("cv_3.wav", 0.6), ("cv_5.wav", 0.7),
                      ("cv_6.wav", 2.5)):
        tone(clips / name, sec)
    truncate(clips / "cv_6.wav")
    (clips / "cv_7.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    rows = [("client_id", "path", "sentence", "up_votes", "gender"),
            ("spk_a", "cv_1.wav", "Turn ON the light.", "2", "female"),
            ("spk_a", "cv_2.wav", "Stop, now!", "2", "female"),
            ("spk_b", "cv_3.wav", 'He said "go 2"', "3", "male"),
            ("spk_b", "cv_4.wav", "never recorded", "1", "male"),
            ("spk_b", "cv_5.wav", "", "0", "male"),
            ("spk_c", "cv_6.wav", "cut short", "1", ""),
            ("spk_c", "cv_7.wav", "not audio", "1", "")]
    (root / "train.tsv").write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    durs = [("clip", "duration[ms]")] + [(f"cv_{i}.wav", str(ms)) for i, ms in
                                          ((1, 800), (2, 1100), (3, 600), (5, 700), (6, 2500), (7, 900))]
    (root / "clip_durations.tsv").write_text("".join("\t".join(r) + "\n" for r in durs))
    return root


def test_commonvoice_tsv_keeps_the_good_and_names_the_bad(tmp_path):
    root = commonvoice(tmp_path)
    drops = DropLog()
    recs = finalize_records(import_commonvoice(root / "train.tsv", drops=drops), drops)
    assert [(r.id, r.speaker, r.text) for r in recs] == [
        ("cv_1", "spk_a", "turn on the light"), ("cv_2", "spk_a", "stop now"), ("cv_3", "spk_b", "he said go two")]
    assert recs[0].extra == {"up_votes": "2", "gender": "female", "raw_text": "Turn ON the light."}
    assert abs(recs[1].duration - 1.1) < 1e-3 and recs[1].audio == str((root / "clips" / "cv_2.wav").resolve())
    why = {d.id: d.reason for d in drops.items}
    assert why == {"cv_4": "missing file", "cv_5": "empty transcript", "cv_6": "duration mismatch",
                   "cv_7": "unreadable"}
    mismatch = next(d for d in drops.items if d.id == "cv_6")
    assert "2.5 s" in mismatch.detail and "0.004 s" in mismatch.detail and mismatch.where.endswith("train.tsv:7")


def test_prepare_cli_reports_and_lists_what_it_dropped(tmp_path, capsys):
    root = commonvoice(tmp_path)
    out = tmp_path / "data" / "train.jsonl"
    code, stdout, err = run(capsys, "prepare", "commonvoice", root / "train.tsv", "-o", out)
    assert code == 0, err
    assert "dropped 4 of 7 utterances" in stdout
    for name in ("cv_4.wav", "cv_5.wav", "cv_6.wav", "cv_7.wav"):
        assert name in stdout
    assert "wrote 3 records" in stdout and "sample rates: 8000 Hz x 3" in stdout
    assert [r.id for r in read_manifest(out)] == ["cv_1", "cv_2", "cv_3"]
    listed = [json.loads(x) for x in (out.parent / "train.dropped.jsonl").read_text().splitlines()]
    assert sorted((d["id"], d["reason"]) for d in listed) == [
        ("cv_4", "missing file"), ("cv_5", "empty transcript"), ("cv_6", "duration mismatch"),
        ("cv_7", "unreadable")]
    # fixed data, run again: the list of drops goes away with the problems
    (root / "train.tsv").write_text("client_id\tpath\tsentence\nspk_a\tcv_1.wav\tyes\n")
    code, stdout, _ = run(capsys, "prepare", "commonvoice", root / "train.tsv", "-o", out)
    assert code == 0 and "dropped" not in stdout and not (out.parent / "train.dropped.jsonl").exists()


# ------------------------------------------------------------------------------------ audiofolder, CSV
def test_audiofolder_metadata_csv(tmp_path):
    d = tmp_path / "my_dataset" / "train"
    tone(d / "a.wav", 1.0)
    tone(d / "sub" / "b.wav", 2.0)
    truncate(tone(d / "c.wav", 2.5))
    tone(d / "d.wav", 0.5)
    (d / "metadata.csv").write_text(
        "file_name,transcription,duration,speaker_id,source\n"
        'a.wav,"Hello, world",1.0,s1,phone\n'
        "sub/b.wav,two words,2.0,s2,web\n"
        "c.wav,cut short,2.5,s1,phone\n"
        "d.wav,???,0.5,s2,web\n")
    drops = DropLog()
    recs = finalize_records(import_audiofolder(d, drops=drops), drops)
    assert [(r.id, r.text, r.speaker, r.extra.get("source")) for r in recs] == [
        ("a", "hello world", "s1", "phone"), ("sub-b", "two words", "s2", "web")]
    assert sorted((x.id, x.reason) for x in drops.items) == [("c", "duration mismatch"), ("d", "empty transcript")]


def test_generic_csv_with_named_columns_and_audio_root(tmp_path, capsys):
    audio = tmp_path / "recordings"
    tone(audio / "x1.wav", 0.6)
    tone(audio / "x2.wav", 0.9, sr=16000)
    (tmp_path / "list.csv").write_text("wav;words;who;ms\nx1.wav;Yes;ann;600\nx2.wav;No;bo;900\n")
    recs = import_table(tmp_path / "list.csv", path_col="wav", text_col="words", speaker_col="who",
                        duration_col="ms", audio_root=audio)
    assert [(r.id, r.text, r.speaker, round(r.duration, 3)) for r in recs] == [("x1", "Yes", "ann", 0.6),
                                                                               ("x2", "No", "bo", 0.9)]
    # the same through the CLI; a column that is not there is a one-line user error
    out = tmp_path / "m.jsonl"
    code, stdout, err = run(capsys, "prepare", "csv", tmp_path / "list.csv", "-o", out, "--path-col", "wav",
                            "--text-col", "words", "--speaker-col", "who", "--audio-root", audio)
    assert code == 0, err
    assert "sample rates: 16000 Hz x 1, 8000 Hz x 1" in stdout
    code, _, err = run(capsys, "prepare", "csv", tmp_path / "list.csv", "-o", out, "--path-col", "file")
    one_line_error(code, err, "no column 'file'", "wav, words, who, ms")
    with pytest.raises(ManifestError, match="no transcript column found"):
        import_table(tmp_path / "list.csv", path_col="wav")


# ------------------------------------------------------------------------------------ file-name labels
def test_labels_from_file_names(tmp_path, capsys):
    root = tmp_path / "rec"
    tone(root / "alice_turn_on_the_light_1.wav", 0.7)
    tone(root / "alice_stop-now_2.wav", 0.5)
    tone(root / "Bob_yes_10.WAV", 0.4)
    tone(root / "notes.wav", 0.4)  # does not match
    sf.write(str(root / "carl_nothing_1.wav"), np.zeros(0, np.float32), SR)  # zero-length audio
    drops = DropLog()
    recs = import_folder(root, drops=drops, label_pattern="{speaker}_{text}_{n}.wav")
    assert [(r.id, r.speaker, r.text, r.extra) for r in recs] == [
        ("Bob_yes_10", "Bob", "yes", {"n": "10"}),
        ("alice_stop-now_2", "alice", "stop now", {"n": "2"}),
        ("alice_turn_on_the_light_1", "alice", "turn on the light", {"n": "1"})]
    assert sorted((d.id, d.reason) for d in drops.items) == [("carl_nothing_1", "zero-length audio"),
                                                            ("notes", "no transcript")]
    # a regular expression with named groups, against the path below the folder
    pat = compile_label_pattern(r"(?P<speaker>[a-z]+)/(?P<text>[a-z_]+)\.wav")
    assert pat.match("dave/good_morning.wav") == {"speaker": "dave", "text": "good_morning"}
    assert pat.match("dave/x/y.wav") is None
    # user mistakes: one line, exit 2
    for bad, needle in (("{speaker}_{n}.wav", "needs a {text} field"), ("{speaker}{text}.wav", "separator"),
                        ("(?P<speaker>[a-z+", "not a valid regular expression")):
        code, _, err = run(capsys, "prepare", "folder", root, "-o", tmp_path / "m.jsonl", "--label-pattern", bad)
        one_line_error(code, err, "--label-pattern")
    code, _, err = run(capsys, "prepare", "kaldi", root, "-o", tmp_path / "m.jsonl", "--label-pattern", "{text}")
    one_line_error(code, err, "only for 'harken prepare folder'")
    # sidecars expected but none there: nothing usable, and the hint says what to do
    code, _, err = run(capsys, "prepare", "folder", root, "-o", tmp_path / "m.jsonl")
    one_line_error(code, err, "no usable utterances", "--label-pattern")


def test_legacy_importers_drop_instead_of_failing(tmp_path):
    a = tone(tmp_path / "a.wav", 1.0)
    b = truncate(tone(tmp_path / "b.wav", 2.5))
    m = tmp_path / "n.json"
    m.write_text("".join(json.dumps(x) + "\n" for x in (
        {"audio_filepath": "a.wav", "duration": 1.0, "text": "fine"},
        {"audio_filepath": "b.wav", "duration": 2.5, "text": "truncated on disk"},
        {"audio_filepath": "c.wav", "duration": 1.0, "text": "missing"})))
    assert len(import_nemo(m)) == 3  # without a drop log the listed durations are trusted, as before
    drops = DropLog()
    assert [r.audio for r in import_nemo(m, drops=drops)] == [str(a)]
    assert sorted(d.reason for d in drops.items) == ["duration mismatch", "missing file"]
    # a Kaldi dir whose wav.scp names a missing file: an error before, a dropped utterance now
    k = tmp_path / "kaldi"
    k.mkdir()
    (k / "wav.scp").write_text(f"u1 {a}\nu2 {tmp_path / 'gone.wav'}\nu3 {b}\n")
    (k / "text").write_text("u1 one\nu2 two\nu3 three\n")
    with pytest.raises(AudioError, match="not found"):
        import_kaldi(k)
    drops = DropLog()
    assert [r.id for r in import_kaldi(k, drops=drops)] == ["u1"]
    assert sorted((d.id, d.reason) for d in drops.items) == [("u2", "missing file"), ("u3", "too short")]


# ------------------------------------------------------------------------------------ split
def speaker_manifest(tmp_path, n_speakers=6, per=7):
    recs = [Record(id=f"s{s}-{i}", audio=str(tmp_path / f"s{s}-{i}.wav"), duration=1.0 + 0.1 * i,
                   text="yes", speaker=f"spk{s}") for s in range(n_speakers) for i in range(per + s)]
    return recs


def test_split_is_deterministic_and_speaker_disjoint(tmp_path, capsys):
    recs = speaker_manifest(tmp_path)
    shuffled = recs[:]
    random.Random(5).shuffle(shuffled)
    a = split_records(recs, dev=0.15, test=0.15, by="speaker", seed=3)
    b = split_records(shuffled, dev=0.15, test=0.15, by="speaker", seed=3)
    assert {k: [r.id for r in v] for k, v in a.items()} == {k: [r.id for r in v] for k, v in b.items()}
    spk = {k: {r.speaker for r in v} for k, v in a.items()}
    assert all(spk[k] for k in spk)
    assert not (spk["train"] & spk["dev"]) and not (spk["train"] & spk["test"]) and not (spk["dev"] & spk["test"])
    assert sum(len(v) for v in a.values()) == len(recs)
    other = split_records(recs, dev=0.15, test=0.15, by="speaker", seed=4)
    assert any([r.id for r in other[k]] != [r.id for r in a[k]] for k in a)  # the seed matters
    rnd = split_records(recs, dev=0.1, test=0.1, by="random", seed=0)
    assert [len(rnd[k]) for k in ("train", "dev", "test")] == [45, 6, 6]

    m = tmp_path / "all.jsonl"
    write_manifest(m, shuffled)
    code, stdout, err = run(capsys, "split", m, "--out", tmp_path / "s", "--dev", "0.15", "--test", "0.15",
                            "--seed", "3")
    assert code == 0, err
    for k in ("train", "dev", "test"):
        assert [r.id for r in read_manifest(tmp_path / "s" / f"{k}.jsonl")] == [r.id for r in a[k]]
        assert k in stdout
    assert "hours" in stdout and f"train  {len(a['train']):>7}" in stdout


def test_split_user_mistakes(tmp_path, capsys):
    m = tmp_path / "two.jsonl"
    write_manifest(m, speaker_manifest(tmp_path, n_speakers=2))
    code, _, err = run(capsys, "split", m, "--out", tmp_path / "s")
    one_line_error(code, err, "2 speaker(s)", "--by random")
    code, _, err = run(capsys, "split", m, "--out", tmp_path / "s", "--dev", "0.6", "--test", "0.5")
    one_line_error(code, err, "nothing to train on")
    write_manifest(tmp_path / "train.jsonl", speaker_manifest(tmp_path))
    code, _, err = run(capsys, "split", tmp_path / "train.jsonl", "--out", tmp_path)
    one_line_error(code, err, "overwrite the input manifest")
    nospk = [Record(id=f"u{i}", audio=f"/x/{i}.wav", duration=1.0, text="a") for i in range(5)]
    with pytest.raises(ManifestError, match="no speaker"):
        split_records(nospk)
    assert sum(map(len, split_records(nospk, by="random", dev=0.2, test=0.2).values())) == 5


# ------------------------------------------------------------------------------------ eval --group-by
def test_eval_group_by_speaker_and_extra_field(tiny_corpus, tmp_path, capsys):
    from conftest import write_tiny_checkpoint

    corpus, _ = tiny_corpus
    ckpt = write_tiny_checkpoint(corpus, tmp_path / "tiny.pt")
    test = read_manifest(corpus / "test_seen.jsonl")
    speakers = sorted({r.speaker for r in test})
    assert len(speakers) >= 2
    out = tmp_path / "eval"
    code, stdout, err = run(capsys, "eval", "--checkpoint", ckpt, corpus / "test_seen.jsonl", "--out", out,
                            "--group-by", "speaker", "--group-by", "engine", "--quiet", "--report", tmp_path / "html")
    assert code == 0, err
    (row,) = json.loads((out / "results.json").read_text())
    by_spk = row["groups"]["speaker"]
    assert [g["value"] for g in by_spk] == speakers
    assert sum(g["num_utts"] for g in by_spk) == row["num_utts"] == len(test)
    assert sum(g["num_words"] for g in by_spk) == row["num_words"]
    errors = sum(g["substitutions"] + g["deletions"] + g["insertions"] for g in by_spk)
    assert abs(errors / row["num_words"] - row["wer"]) < 1e-9
    assert [g["value"] for g in row["groups"]["engine"]] == ["espeak"]
    assert "by speaker" in stdout and all(s in stdout for s in speakers)
    page = (tmp_path / "html" / "index.html").read_text()
    assert "WER by engine" in page and "WER by speaker" in page
    lines = [json.loads(x) for x in (out / "errors-test_seen.jsonl").read_text().splitlines()]
    assert all(x["engine"] == "espeak" for x in lines)

    code, _, err = run(capsys, "eval", "--checkpoint", ckpt, corpus / "test_seen.jsonl", "--out", out,
                       "--group-by", "microphone", "--quiet")
    one_line_error(code, err, "--group-by microphone: no record", "engine")
