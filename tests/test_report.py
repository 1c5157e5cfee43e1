"""The static HTML error-analysis report (harken.report)."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from harken.audio import save_wav
from harken.data.manifest import Record
from harken.report import SetResult, bar_chart, line_chart, read_scalars, write_report


class _Collector(HTMLParser):
    """Parses the page and keeps what the tests look at; fails on unbalanced block tags."""

    VOID = {"meta", "br", "img", "input", "link", "hr", "source", "line", "rect", "circle", "polyline", "path"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.audio_src: list[str] = []
        self.rows: list[str] = []  # data-id of worst-utterance rows, in page order
        self.h2: list[str] = []
        self.scripts = 0
        self.svgs = 0
        self._in_h2 = False
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "script":
            self.scripts += 1
        if tag == "svg":
            self.svgs += 1
        if tag == "audio":
            self.audio_src.append(a["src"])
        if tag == "tr" and "data-id" in a:
            self.rows.append(a["data-id"])
        self._in_h2 = tag == "h2"
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        pass

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()
        if tag == "h2":
            self._in_h2 = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_h2:
            self.h2.append(data)


def _parse(path: Path) -> _Collector:
    c = _Collector()
    c.feed(path.read_text(encoding="utf-8"))
    c.close()
    assert not c.stack, f"unclosed tags: {c.stack}"
    return c


def _wav(path: Path, seconds: float, kind: str, seed: int = 0) -> Path:
    sr = 16000
    t = np.arange(int(seconds * sr)) / sr
    if kind == "tone":
        w = 0.3 * np.sin(2 * np.pi * 440 * t)
    else:
        w = 0.1 * np.random.default_rng(seed).standard_normal(t.size)
    save_wav(path, w.astype(np.float32))
    return path


@pytest.fixture()
def sets(tmp_path):
    a = _wav(tmp_path / "wav" / "a.wav", 1.5, "tone")
    b = _wav(tmp_path / "wav" / "b.wav", 3.0, "noise", seed=1)
    c = _wav(tmp_path / "wav" / "c.wav", 12.0, "noise", seed=2)
    recs = [Record("u1", str(a), 1.5, speaker="alice", group="us"),
            Record("u2", str(b), 3.0, speaker="bob", group="uk"),
            Record("u3", str(c), 12.0, speaker="alice", group="us"),
            Record("u4", str(a), 1.5, speaker="carol", group="uk"),
            Record("u5", str(b), 1.0, offset=0.5, speaker="bob", group="uk")]  # a segment: cut to WAV
    refs = ["the cat sat on the mat",
            "a dog barked at the cat",
            "the cat ran over the hill and the cat hid",
            "hello world",
            "i said <script>alert(1)</script> now"]
    hyps = ["the hat sat on the mat",               # 1 sub cat->hat
            "a dog barked today at the hat",        # 1 ins + 1 sub (unambiguous alignment)
            "the hat ran over hill and the hat",    # 2 subs cat->hat, 2 dels (the, hid) -> 4 errors
            "hello world",                          # correct
            "i said <script>alert(2)</script> now"]  # 1 sub, with markup in the words
    seen = SetResult("test_seen", recs, refs, hyps,
                     {"set": "test_seen", "num_utts": 5, "num_words": 30, "wer": 0.3, "cer": 0.12,
                      "sentence_error_rate": 0.8, "substitutions": 5, "deletions": 2, "insertions": 1,
                      "hours": 0.005, "rtf": 0.0123})
    other = SetResult("test_unseen", [Record("v1", str(a), 1.5, speaker="dave")], ["good morning"], ["good evening"],
                      {})  # no summary: the report computes what it can
    return [seen, other]


def test_report_contents(tmp_path, sets):
    out = tmp_path / "report"
    path = write_report(out, sets, exp_dir=None, max_worst=10)
    assert path == out / "index.html"
    page = path.read_text(encoding="utf-8")
    c = _parse(path)
    text = " ".join(c.text)

    assert c.scripts == 0, "planted <script> must be escaped, and the page has no JavaScript"
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script" not in page.lower()
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing fetched
    assert "https://" not in page

    assert "Test set: test_seen" in c.h2 and "Test set: test_unseen" in c.h2
    assert "Training curves" in c.h2 and "No TensorBoard scalars" in text  # omitted gracefully
    assert c.svgs >= 4  # set bars + speaker/group/length charts

    # the planted top substitution (cat -> hat, 4 times) is the first substitution row
    m = re.search(r"<b>Substitutions</b><table>.*?<tbody><tr><td>([^<]*)</td><td>([^<]*)</td><td class=\"n\">(\d+)",
                  page)
    assert m and m.groups() == ("cat", "hat", "4")
    assert "hid" in text and "today" in text  # a deletion and an insertion listed

    # worst first: u3 (4 errors), u2 (2), then the ties on 1 error by WER: u5 (1/4) before u1 (1/6);
    # the correct u4 is not listed
    assert c.rows[:4] == ["u3", "u2", "u5", "u1"] and "u4" not in c.rows
    assert c.rows[4:] == ["v1"]

    # audio: relative paths inside the report folder, files present
    assert len(c.audio_src) == 5
    for src in c.audio_src:
        assert not src.startswith("/") and "://" not in src and src.startswith("audio/")
        assert (out / src).is_file()
    seg = [s for s in c.audio_src if "u5" in s][0]
    import soundfile as sf
    assert abs(sf.info(str(out / seg)).duration - 1.0) < 0.01  # a segment is cut, not the whole file

    # breakdowns by speaker, group and length bucket
    for label in ("alice", "bob", "carol", "us", "uk", "<2 s", "2–4 s", "≥10 s"):
        assert label in text, label
    assert "30.00" in text and "0.0123" in text  # summary numbers from results.json are used

    # a re-run into the same folder works and does not leave stale clips
    write_report(out, sets[:1], max_worst=1)
    assert len(list((out / "audio").rglob("*.*"))) == 1


def test_report_training_curves(tmp_path, sets):
    from torch.utils.tensorboard import SummaryWriter

    exp = tmp_path / "exp"
    w = SummaryWriter(str(exp / "tensorboard"))
    for step in range(1, 21):
        w.add_scalar("train/loss_per_utt", 100.0 / step, step)
        w.add_scalar("train/lr", 1e-3 * min(1.0, step / 5), step)
        if step % 5 == 0:
            w.add_scalar("dev/wer", 1.0 / step, step)
            w.add_scalar("dev/cer", 0.5 / step, step)
    w.close()
    sc = read_scalars(exp)
    assert [s for s, _ in sc["dev/wer"]] == [5, 10, 15, 20]
    path = write_report(tmp_path / "r", sets[1:], exp_dir=str(exp))
    page = path.read_text(encoding="utf-8")
    c = _parse(path)
    assert "No TensorBoard scalars" not in page
    for title in ("Training loss", "Learning rate", "Dev error rate"):
        assert f'aria-label="{title}"' in page
    assert "Best dev WER 5.00 % at step 20" in " ".join(c.text)
    # an exp dir without event files: still a report, with a note
    (tmp_path / "empty").mkdir()
    page = write_report(tmp_path / "r2", sets[1:], exp_dir=str(tmp_path / "empty")).read_text(encoding="utf-8")
    assert "No TensorBoard scalars" in page


def test_charts_escape_and_degenerate_inputs():
    svg = bar_chart([("<b>", 10.0), ("x", 0.0)], "t & t")
    assert "&lt;b&gt;" in svg and "t &amp; t" in svg
    assert bar_chart([], "empty") == ""
    assert line_chart({"a": [(0, 1.0)]}, "one point", "step", "y").startswith("<svg")  # no division by zero
    assert line_chart({"a": [(0, float("nan"))]}, "nan", "x", "y") == ""


def test_find_exp_dir(tmp_path):
    from harken.report import find_exp_dir

    exp = tmp_path / "exp"
    (exp / "tensorboard").mkdir(parents=True)
    (exp / "checkpoints").mkdir()
    assert find_exp_dir(exp / "checkpoints" / "step-00000010.pt") == exp
    assert find_exp_dir(exp / "best.pt") == exp
    assert find_exp_dir(tmp_path / "elsewhere" / "avg.pt", config_exp_dir=str(exp)) == exp
    assert find_exp_dir(tmp_path / "x" / "y" / "z" / "model.pt") is None
    assert read_scalars(None) == {} and read_scalars(tmp_path / "missing") == {}


def test_nice_ticks_degenerate():
    from harken.report import _nice_ticks

    for v in (60.0, 100.0, 0.0, 0.5, -3.0):
        ticks = _nice_ticks(v, v)
        assert ticks[0] < v < ticks[-1] or (v == 0.0 and ticks[0] == 0.0 < ticks[-1])
