"""Output formats: text, JSON, SRT and WebVTT cue building and timestamps."""

from __future__ import annotations

import io
import json
import re

from harken.output import format_timestamp, make_cues, render, wrap_lines, write_transcripts
from harken.recognizer import Segment, Transcript, Word


def words_at(text, start=0.0, dur=0.4, gap=0.1):
    out, t = [], start
    for w in text.split():
        out.append(Word(w, t, t + dur, 0.9))
        t += dur + gap
    return out


def test_timestamps():
    assert format_timestamp(1.234) == "00:00:01,234"
    assert format_timestamp(1.234, ".") == "00:00:01.234"
    assert format_timestamp(3723.0005) == "01:02:03,000" or format_timestamp(3723.0005) == "01:02:03,001"
    assert format_timestamp(59.9996, ".") == "00:01:00.000"
    assert format_timestamp(-1) == "00:00:00,000"


def test_wrap_lines_balanced_and_limited():
    ws = "the quick brown fox jumps over the lazy dog and keeps on running far away".split()
    lines = wrap_lines(ws[:9], 42, 2)
    assert lines and len(lines) <= 2 and all(len(x) <= 42 for x in lines)
    assert wrap_lines(ws * 3, 42, 2) is None
    assert wrap_lines(["x" * 50], 42, 2) == ["x" * 50]


def test_cues_respect_limits_and_word_boundaries():
    text = " ".join(["alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu"] * 4)
    ws = words_at(text, dur=0.3, gap=0.05)
    t = Transcript(text=text, words=ws, duration=ws[-1].end + 0.5)
    cues = make_cues(t)
    assert len(cues) > 1
    joined = " ".join(" ".join(c.lines) for c in cues)
    assert joined == text  # nothing lost, split only at word boundaries
    for c in cues:
        assert len(c.lines) <= 2 and all(len(x) <= 42 for x in c.lines)
        assert c.end - c.start <= 7.0 + 1e-9
    assert all(a.end <= b.start for a, b in zip(cues, cues[1:]))


def test_cue_duration_limit_and_pause_split():
    slow = words_at("one two three four five six", dur=1.5, gap=0.1)
    cues = make_cues(Transcript("one two three four five six", slow, duration=10))
    assert all(c.end - c.start <= 7.0 for c in cues) and len(cues) >= 2
    gap = words_at("hello there", dur=0.3) + words_at("general kenobi", start=5.0, dur=0.3)
    cues = make_cues(Transcript("hello there general kenobi", gap, duration=6))
    assert [c.text for c in cues] == ["hello there", "general kenobi"]


def test_srt_and_vtt_documents():
    segs = [Segment(0, 0.0, 2.0, "good morning", words_at("good morning", 0.5)),
            Segment(1, 62.0, 64.5, "see you", words_at("see you", 62.25))]
    t = Transcript.from_segments(segs, source="a.wav", duration=65.0)
    srt = render(t, "srt")
    blocks = srt.strip().split("\n\n")
    assert blocks[0].splitlines() == ["1", "00:00:00,500 --> 00:00:01,400", "good morning"]
    assert blocks[1].splitlines()[:2] == ["2", "00:01:02,250 --> 00:01:03,150"]
    vtt = render(t, "vtt")
    assert vtt.startswith("WEBVTT\n\n")
    assert "00:01:02.250 --> 00:01:03.150\nsee you" in vtt
    assert re.search(r"\d\d:\d\d:\d\d,\d\d\d", vtt) is None
    # no word times: spread over the whole file
    plain = render(Transcript("just text here", duration=3.0), "srt")
    assert "00:00:00,000 --> 00:00:03,000" in plain


def test_json_and_text_and_write(tmp_path):
    segs = [Segment(0, 0.0, 2.0, "good morning", words_at("good morning", 0.5), 0.8),
            Segment(1, 3.0, 4.0, "bye", words_at("bye", 3.1), 0.6)]
    t = Transcript.from_segments(segs, source="/x/a.wav", duration=4.0)
    d = json.loads(render(t, "json"))
    assert d["text"] == "good morning bye" and d["duration"] == 4.0
    assert [s["text"] for s in d["segments"]] == ["good morning", "bye"]
    assert [w["word"] for w in d["words"]] == ["good", "morning", "bye"]
    assert set(d["words"][0]) == {"word", "start", "end", "confidence"}
    short = Transcript("hi there", words_at("hi there"), 0.9, 1.0, "b.wav")
    assert json.loads(render(short, "json"))["segments"][0]["text"] == "hi there"
    buf = io.StringIO()
    write_transcripts([t, short], "text", buf)
    assert buf.getvalue() == "/x/a.wav\tgood morning bye\nb.wav\thi there\n"
    buf = io.StringIO()
    write_transcripts([t, short], "json", buf)
    assert len(buf.getvalue().splitlines()) == 2
    paths = write_transcripts([t, short, Transcript("x", source="<array>")], "vtt", tmp_path / "out")
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["a.vtt", "b.vtt", "transcript-2.vtt"]
    assert (tmp_path / "out" / "a.vtt").read_text().startswith("WEBVTT")
