import json
import logging

import numpy as np
import pytest
import soundfile as sf

from harken.audio import AudioError
from harken.data.importers import (
    IMPORTERS,
    export_kaldi,
    export_nemo,
    import_folder,
    import_kaldi,
    import_librispeech,
    import_nemo,
)
from harken.data.manifest import ManifestError, Record

SR = 16000


def make_audio(path, seconds, fmt=None, freq=440.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(round(seconds * SR))) / SR
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), SR,
             format=fmt, subtype="PCM_16")
    return str(path.resolve())


def key(records):
    return sorted((r.id, r.audio, round(r.duration, 6), r.text, round(r.offset, 6), r.speaker, r.group)
                  for r in records)


# ---------------------------------------------------------------------------------------------- kaldi
def kaldi_dir(tmp_path, segments=False):
    d = tmp_path / "data" / "train"
    d.mkdir(parents=True)
    a = make_audio(tmp_path / "wav" / "rec1.wav", 2.0)
    b = make_audio(tmp_path / "wav" / "rec2.wav", 1.5)
    if segments:
        (d / "wav.scp").write_text(f"rec1 {a}\nrec2 {b}\n")
        (d / "segments").write_text("spkA-u1 rec1 0.0 0.8\nspkA-u2 rec1 0.8 2.0\nspkB-u3 rec2 0.25 -1\n")
        (d / "text").write_text("spkA-u1 Hello, World!\nspkA-u2 second  one\nspkB-u3 third\n")
        (d / "utt2spk").write_text("spkA-u1 spkA\nspkA-u2 spkA\nspkB-u3 spkB\n")
    else:
        (d / "wav.scp").write_text(f"spkA-u1 {a}\nspkB-u2 flac -c -d -s {b} |\n")
        (d / "text").write_text("spkA-u1 Hello, World!\nspkB-u2 ÇA VA?\n")
        (d / "utt2spk").write_text("spkA-u1 spkA\nspkB-u2 spkB\n")
        (d / "utt2group").write_text("spkA-u1 us\nspkB-u2 fr\n")
    return d, a, b


def test_kaldi_plain(tmp_path):
    d, a, b = kaldi_dir(tmp_path)
    recs = import_kaldi(d)
    assert key(recs) == [
        ("spkA-u1", a, 2.0, "Hello, World!", 0.0, "spkA", "us"),
        ("spkB-u2", b, 1.5, "ÇA VA?", 0.0, "spkB", "fr"),
    ]


def test_kaldi_segments(tmp_path):
    d, a, b = kaldi_dir(tmp_path, segments=True)
    recs = import_kaldi(d)
    assert key(recs) == [
        ("spkA-u1", a, 0.8, "Hello, World!", 0.0, "spkA", ""),
        ("spkA-u2", a, 1.2, "second  one", 0.8, "spkA", ""),  # raw text kept
        ("spkB-u3", b, 1.25, "third", 0.25, "spkB", ""),  # end -1 = end of recording
    ]


def test_kaldi_relative_paths_and_missing_text(tmp_path, caplog):
    d, a, b = kaldi_dir(tmp_path)
    (d / "wav.scp").write_text("spkA-u1 wav/rec1.wav\nspkB-u2 wav/rec2.wav\n")  # relative to recipe dir
    (d / "text").write_text("spkA-u1 only one\nghost never recorded\n")
    with caplog.at_level(logging.WARNING):
        recs = import_kaldi(d)
    assert [(r.id, r.audio) for r in recs] == [("spkA-u1", a)]
    assert "spkB-u2" in caplog.text and "ghost" in caplog.text
    with pytest.raises(ManifestError, match="spkB-u2"):
        import_kaldi(d, strict=True)


@pytest.mark.parametrize("fname,content,pattern", [
    ("segments", "u1 rec1 0.0\n", r"segments:1: expected"),
    ("segments", "spkA-u1 rec1 0.0 0.5\nspkA-u2 rec1 1.0 0.5\n", r"segments:2: invalid segment"),
    ("segments", "spkA-u1 rec1 zero 0.5\n", r"segments:1: start and end must be numbers"),
    ("text", "spkA-u1 a\nspkA-u1 b\n", r"text:2: duplicate id 'spkA-u1'"),
    ("utt2spk", "spkA-u1 spkA\n\nspkB-u2\n", r"utt2spk:3: expected"),
    ("wav.scp", "spkA-u1 sox x.wav -t wav - speed 1.1 |\n", r"wav.scp:1: piped command .* not supported"),
])
def test_kaldi_malformed_names_file_and_line(tmp_path, fname, content, pattern):
    d, a, b = kaldi_dir(tmp_path, segments=(fname == "segments"))
    (d / fname).write_text(content)
    with pytest.raises(ManifestError, match=pattern):
        import_kaldi(d)


def test_kaldi_missing_audio_and_files(tmp_path):
    d, a, b = kaldi_dir(tmp_path)
    (d / "wav.scp").write_text(f"spkA-u1 {a}\nspkB-u2 /nonexistent/x.wav\n")
    with pytest.raises(AudioError, match=r"wav.scp:2: .*not found"):
        import_kaldi(d)
    (d / "text").unlink()
    with pytest.raises(ManifestError, match="missing required file 'text'"):
        import_kaldi(d)


def test_kaldi_round_trip(tmp_path):
    a = make_audio(tmp_path / "a.wav", 1.0)
    b = make_audio(tmp_path / "b b.wav", 2.5)  # a space in the path
    plain = [Record("u1", a, 1.0, "One two", speaker="s1", group="g1"),
             Record("u2", b, 2.5, "Three", speaker="s2")]
    export_kaldi(plain, tmp_path / "k1")
    assert not (tmp_path / "k1" / "segments").exists()
    assert (tmp_path / "k1" / "spk2utt").read_text() == "s1 u1\ns2 u2\n"
    assert key(import_kaldi(tmp_path / "k1")) == key(plain)

    segs = [Record("x1", b, 0.75, "first part", offset=0.0, speaker="s"),
            Record("x2", b, 1.125, "second part", offset=1.3, speaker="s"),
            Record("x3", a, 0.5, "", offset=0.25, speaker="t", group="g")]
    export_kaldi(segs, tmp_path / "k2")
    assert (tmp_path / "k2" / "segments").exists()
    assert key(import_kaldi(tmp_path / "k2")) == key(segs)

    with pytest.raises(ManifestError, match="whitespace"):
        export_kaldi([Record("bad id", a, 1.0)], tmp_path / "k3")


# ------------------------------------------------------------------------------------------ librispeech
def test_librispeech(tmp_path):
    root = tmp_path / "LibriSpeech" / "dev-clean"
    expected = []
    for spk, chap, n in (("84", "121123", 2), ("174", "50561", 1)):
        cdir = root / spk / chap
        lines = []
        for i in range(n):
            uid = f"{spk}-{chap}-{i:04d}"
            dur = 0.5 + 0.25 * i
            path = make_audio(cdir / f"{uid}.flac", dur, fmt="FLAC")
            lines.append(f"{uid} WORDS OF {spk} NUMBER {i}")
            expected.append((uid, path, dur, lines[-1].split(" ", 1)[1], 0.0, spk, ""))
        (cdir / f"{spk}-{chap}.trans.txt").write_text("\n".join(lines) + "\n")
    recs = import_librispeech(tmp_path / "LibriSpeech")
    assert key(recs) == sorted(expected)


def test_librispeech_errors(tmp_path):
    with pytest.raises(ManifestError, match="no '\\*.trans.txt'"):
        import_librispeech(tmp_path)
    cdir = tmp_path / "1" / "2"
    make_audio(cdir / "1-2-0000.flac", 0.5, fmt="FLAC")
    tf = cdir / "1-2.trans.txt"
    tf.write_text("1-2-0000 HELLO\n1-2-0001\n")
    with pytest.raises(ManifestError, match=r"1-2.trans.txt:2: expected"):
        import_librispeech(tmp_path)
    tf.write_text("1-2-0000 HELLO\n1-2-0001 MISSING AUDIO\n")
    assert [r.id for r in import_librispeech(tmp_path)] == ["1-2-0000"]
    with pytest.raises(ManifestError, match=r"1-2.trans.txt:2: audio file not found"):
        import_librispeech(tmp_path, strict=True)


# ------------------------------------------------------------------------------------------------ nemo
def test_nemo(tmp_path):
    a = make_audio(tmp_path / "audio" / "talk.wav", 3.0)
    b = make_audio(tmp_path / "audio" / "other.wav", 1.0)
    lines = [
        {"audio_filepath": "audio/talk.wav", "duration": 1.0, "text": "Part one", "offset": 0.0},
        {"audio_filepath": "audio/talk.wav", "duration": 1.5, "text": "Part two", "offset": 1.5,
         "speaker": "spk1", "lang": "en"},
        {"audio_filepath": b, "text": "no duration given", "snr": 12.5},
    ]
    m = tmp_path / "manifests" / "train.json"
    m.parent.mkdir()
    # relative to the manifest's folder
    lines[0]["audio_filepath"] = lines[1]["audio_filepath"] = "../audio/talk.wav"
    m.write_text("".join(json.dumps(x) + "\n" for x in lines))
    recs = import_nemo(m)
    assert key(recs) == sorted([
        ("talk-000000", a, 1.0, "Part one", 0.0, "", ""),
        ("talk-001500", a, 1.5, "Part two", 1.5, "spk1", "en"),
        ("other", b, 1.0, "no duration given", 0.0, "", ""),
    ])
    assert recs[2].extra == {"snr": 12.5}

    out = tmp_path / "rt.json"
    assert export_nemo(recs, out) == 3
    back = import_nemo(out)
    assert key(back) == key(recs) and [r.extra for r in back] == [r.extra for r in recs]


@pytest.mark.parametrize("line,pattern", [
    ("{not json", r"train.json:2: not valid JSON"),
    ('{"duration": 1.0, "text": "x"}', r"train.json:2: missing or invalid 'audio_filepath'"),
    ('{"audio_filepath": "a.wav", "duration": "long"}', r"train.json:2: 'duration' and 'offset' must be numbers"),
    ('[1, 2]', r"train.json:2: expected a JSON object"),
])
def test_nemo_malformed(tmp_path, line, pattern):
    make_audio(tmp_path / "a.wav", 1.0)
    m = tmp_path / "train.json"
    m.write_text('{"audio_filepath": "a.wav", "duration": 1.0, "text": "ok"}\n' + line + "\n")
    with pytest.raises(ManifestError, match=pattern):
        import_nemo(m)


# ---------------------------------------------------------------------------------------------- folder
def test_folder(tmp_path, caplog):
    root = tmp_path / "corpus"
    a = make_audio(root / "alice" / "hello.wav", 1.0)
    (root / "alice" / "hello.txt").write_text("  Hello there.\n")
    b = make_audio(root / "bob" / "sub" / "x.flac", 0.5, fmt="FLAC")
    (root / "bob" / "sub" / "x.txt").write_text("Ünïcode text", encoding="utf-8")
    c = make_audio(root / "loose.wav", 0.25)  # no sidecar
    with caplog.at_level(logging.WARNING):
        recs = import_folder(root)
    assert key(recs) == [
        ("alice-hello", a, 1.0, "Hello there.", 0.0, "alice", ""),
        ("bob-sub-x", b, 0.5, "Ünïcode text", 0.0, "sub", ""),
    ]
    assert "loose.wav" in caplog.text
    recs = import_folder(root, allow_unlabelled=True)
    assert ("loose", c, 0.25, "", 0.0, "", "") in key(recs)
    assert [r.id for r in import_folder(root, exts=(".flac",))] == ["bob-sub-x"]


def test_folder_errors(tmp_path):
    make_audio(tmp_path / "a.wav", 0.5)
    (tmp_path / "a.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(ManifestError, match=r"a.txt: not valid UTF-8"):
        import_folder(tmp_path)
    (tmp_path / "b.wav").write_bytes(b"")
    (tmp_path / "b.txt").write_text("empty audio")
    (tmp_path / "a.txt").write_text("fine")
    with pytest.raises(AudioError, match="b.wav"):
        import_folder(tmp_path)


def test_registry():
    assert set(IMPORTERS) == {"kaldi", "librispeech", "nemo", "folder", "csv", "commonvoice", "audiofolder",
                              "asterisk"}
    assert all(callable(f) for f in IMPORTERS.values())
