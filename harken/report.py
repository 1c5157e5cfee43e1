"""Static HTML error-analysis report: ``harken eval --report DIR``.

One self-contained folder: ``index.html`` (plain HTML + CSS, inline SVG charts drawn here, no
JavaScript, nothing fetched from the network) and ``audio/`` with hard links to (or copies of) the
audio of the worst utterances, so the folder can be zipped and opened anywhere.

Contents: training curves from the run's TensorBoard event files (when there are any), WER by test
set, WER by speaker, by ``group``, by any other manifest field asked for (``harken eval
--group-by engine``: an ``extra`` key) and by utterance length, the most frequent substitutions,
insertions and deletions (jiwer alignments), and the worst utterances with an audio player and the
differing words highlighted.

Statistics follow :func:`harken.evaluate.error_report`: utterances with an empty reference are left
out of every WER (they have no words to score).
"""

from __future__ import annotations

import html
import logging
import math
import os
import re
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence
from urllib.parse import quote

import jiwer

from harken.data.manifest import Record
from harken.fsutil import atomic_write_text

log = logging.getLogger(__name__)

# seconds; buckets are [0, 2), [2, 4), [4, 6), [6, 10), [10, inf)
LENGTH_EDGES = (2.0, 4.0, 6.0, 10.0)
# TensorBoard tags drawn, in order: (tags on one chart, title, y label)
CURVES = (
    (("train/loss_per_utt",), "Training loss", "loss per utterance"),
    (("train/lr",), "Learning rate", "lr"),
    (("dev/wer", "dev/cer"), "Dev error rate", "rate %"),
    (("train/grad_norm",), "Gradient norm", "norm"),
    (("train/audio_seconds_per_second",), "Throughput", "audio s / s"),
)
# audio a browser's <audio> element plays as is; anything else (or a segment of a file) is cut to WAV
_PLAYABLE = {".wav", ".mp3", ".ogg", ".oga", ".flac", ".opus", ".webm", ".m4a"}
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd")


@dataclass
class SetResult:
    """One decoded test set: records, normalized references and hypotheses in the same order, and
    its summary row as written to ``results.json``."""

    name: str
    records: list[Record]
    refs: list[str]
    hyps: list[str]
    summary: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------ analysis
@dataclass
class _Utt:
    rec: Record
    ref: str
    hyp: str
    ref_words: list[str]
    hyp_words: list[str]
    chunks: list  # jiwer AlignmentChunk
    subs: int = 0
    dels: int = 0
    ins: int = 0

    @property
    def errors(self) -> int:
        return self.subs + self.dels + self.ins

    @property
    def words(self) -> int:
        return len(self.ref_words)

    @property
    def wer(self) -> float:
        return self.errors / max(1, self.words)


def _align(s: SetResult) -> list[_Utt]:
    if not (len(s.records) == len(s.refs) == len(s.hyps)):
        raise ValueError(f"set {s.name}: {len(s.records)} records, {len(s.refs)} refs, {len(s.hyps)} hyps")
    keep = [i for i, r in enumerate(s.refs) if r.strip()]
    if not keep:
        return []
    out = jiwer.process_words([s.refs[i] for i in keep], [s.hyps[i] for i in keep])
    utts = []
    for k, i in enumerate(keep):
        u = _Utt(s.records[i], s.refs[i], s.hyps[i], out.references[k], out.hypotheses[k], out.alignments[k])
        for c in u.chunks:
            if c.type == "substitute":
                u.subs += c.ref_end_idx - c.ref_start_idx
            elif c.type == "delete":
                u.dels += c.ref_end_idx - c.ref_start_idx
            elif c.type == "insert":
                u.ins += c.hyp_end_idx - c.hyp_start_idx
        utts.append(u)
    return utts


def _error_counts(utts: Iterable[_Utt]) -> tuple[Counter, Counter, Counter]:
    subs, ins, dels = Counter(), Counter(), Counter()
    for u in utts:
        for c in u.chunks:
            if c.type == "substitute":
                for r, h in zip(u.ref_words[c.ref_start_idx:c.ref_end_idx], u.hyp_words[c.hyp_start_idx:c.hyp_end_idx]):
                    subs[(r, h)] += 1
            elif c.type == "delete":
                dels.update(u.ref_words[c.ref_start_idx:c.ref_end_idx])
            elif c.type == "insert":
                ins.update(u.hyp_words[c.hyp_start_idx:c.hyp_end_idx])
    return subs, ins, dels


def _length_bucket(d: float, edges: Sequence[float] = LENGTH_EDGES) -> tuple[int, str]:
    for i, e in enumerate(edges):
        if d < e:
            lo = edges[i - 1] if i else None
            return i, (f"<{e:g} s" if lo is None else f"{lo:g}–{e:g} s")
    return len(edges), f"≥{edges[-1]:g} s"


def _breakdown(utts: Sequence[_Utt], key) -> list[dict]:
    """Rows of (label, utts, words, S, D, I, errors, wer) per key value."""
    acc: dict = defaultdict(lambda: dict(utts=0, words=0, subs=0, dels=0, ins=0, hours=0.0))
    order = {}
    for u in utts:
        sort_key, label = key(u)
        order[label] = sort_key
        a = acc[label]
        a["utts"] += 1
        a["words"] += u.words
        a["subs"] += u.subs
        a["dels"] += u.dels
        a["ins"] += u.ins
        a["hours"] += u.rec.duration / 3600
    rows = []
    for label, a in acc.items():
        errs = a["subs"] + a["dels"] + a["ins"]
        rows.append(dict(label=label, sort=order[label], errors=errs, wer=errs / max(1, a["words"]), **a))
    return rows


# ------------------------------------------------------------------------------------ SVG charts
def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:  # one value: centre it
        pad = 0.1 * abs(lo) or 1.0
        lo, hi = (0.0 if 0 <= lo < pad else lo - pad), hi + pad  # never below 0 for a non-negative value
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    n_ticks = max(1, math.ceil((hi - start) / step - 1e-9)) + 1
    return [round(start + i * step, 12) for i in range(n_ticks)]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-4:
        return f"{v:.1e}"
    if a >= 100:
        return f"{v:.0f}"
    return f"{v:.4g}"


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def line_chart(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str, ylabel: str,
               width: int = 540, height: int = 260, max_points: int = 800) -> str:
    """An inline SVG line chart; ``series`` maps a legend name to (x, y) points."""
    series = {k: [(x, y) for x, y in v if math.isfinite(y)] for k, v in series.items()}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return ""
    ml, mr, mt, mb = 64, 14, 28, 44
    pw, ph = width - ml - mr, height - mt - mb
    xs = [x for v in series.values() for x, _ in v]
    ys = [y for v in series.values() for _, y in v]
    xt = _nice_ticks(min(xs), max(xs))
    ylo = min(0.0, min(ys)) if min(ys) >= 0 and min(ys) < 0.5 * max(ys) else min(ys)
    yt = _nice_ticks(ylo, max(ys))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]

    def sx(x):
        return ml + (x - x0) / ((x1 - x0) or 1) * pw

    def sy(y):
        return mt + ph - (y - y0) / ((y1 - y0) or 1) * ph

    p = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">',
         f'<text x="{width / 2}" y="16" text-anchor="middle" class="ct">{_e(title)}</text>']
    for t in yt:
        y = sy(t)
        p.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                 f'<text x="{ml - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{_e(_fmt(t))}</text>')
    for t in xt:
        x = sx(t)
        p.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{mt + ph}" y2="{mt + ph + 4}" class="axis"/>'
                 f'<text x="{x:.1f}" y="{mt + ph + 16}" text-anchor="middle" class="tick">{_e(_fmt(t))}</text>')
    p.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{mt + ph}" y2="{mt + ph}" class="axis"/>'
             f'<line x1="{ml}" x2="{ml}" y1="{mt}" y2="{mt + ph}" class="axis"/>'
             f'<text x="{ml + pw / 2}" y="{height - 6}" text-anchor="middle" class="al">{_e(xlabel)}</text>'
             f'<text transform="translate(14 {mt + ph / 2}) rotate(-90)" text-anchor="middle" class="al">'
             f'{_e(ylabel)}</text>')
    for i, (name, pts) in enumerate(series.items()):
        color = _COLORS[i % len(_COLORS)]
        if len(pts) > max_points:
            stride = math.ceil(len(pts) / max_points)
            pts = pts[::stride] + ([pts[-1]] if (len(pts) - 1) % stride else [])
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        p.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{path}"/>')
        if len(pts) <= 40:
            p.extend(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}"/>' for x, y in pts)
        if len(series) > 1:
            lx = ml + pw - 110
            ly = mt + 8 + 16 * i
            p.append(f'<rect x="{lx}" y="{ly - 8}" width="12" height="3" fill="{color}"/>'
                     f'<text x="{lx + 16}" y="{ly - 3}" class="tick">{_e(name)}</text>')
    p.append("</svg>")
    return "".join(p)


def bar_chart(rows: Sequence[tuple[str, float]], title: str, xlabel: str = "WER %",
              width: int = 560, bar_h: int = 18, label_w: int = 190) -> str:
    """An inline SVG horizontal bar chart of (label, value) rows, one bar per row."""
    rows = [(lab, v) for lab, v in rows if math.isfinite(v)]
    if not rows:
        return ""
    mt, mb, mr = 28, 40, 56
    pw = width - label_w - mr
    height = mt + mb + bar_h * len(rows)
    xt = _nice_ticks(0.0, max(max(v for _, v in rows), 1e-9))
    x1 = xt[-1] or 1.0

    def sx(v):
        return label_w + v / x1 * pw

    p = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
         f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">',
         f'<text x="{width / 2}" y="16" text-anchor="middle" class="ct">{_e(title)}</text>']
    base = mt + bar_h * len(rows)
    for t in xt:
        x = sx(t)
        p.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{mt}" y2="{base}" class="grid"/>'
                 f'<text x="{x:.1f}" y="{base + 14}" text-anchor="middle" class="tick">{_e(_fmt(t))}</text>')
    for i, (lab, v) in enumerate(rows):
        y = mt + i * bar_h
        short = lab if len(lab) <= 28 else lab[:27] + "…"
        p.append(f'<text x="{label_w - 6}" y="{y + bar_h * 0.7:.1f}" text-anchor="end" class="tick">'
                 f'<title>{_e(lab)}</title>{_e(short)}</text>'
                 f'<rect x="{label_w}" y="{y + 2}" width="{max(0.0, sx(v) - label_w):.1f}" '
                 f'height="{bar_h - 4}" fill="{_COLORS[0]}"/>'
                 f'<text x="{sx(v) + 4:.1f}" y="{y + bar_h * 0.7:.1f}" class="tick">{_e(_fmt(v))}</text>')
    p.append(f'<line x1="{label_w}" x2="{label_w}" y1="{mt}" y2="{base}" class="axis"/>'
             f'<line x1="{label_w}" x2="{label_w + pw}" y1="{base}" y2="{base}" class="axis"/>'
             f'<text x="{label_w + pw / 2}" y="{height - 8}" text-anchor="middle" class="al">{_e(xlabel)}</text>'
             "</svg>")
    return "".join(p)


# ------------------------------------------------------------------------------------ TensorBoard
def find_exp_dir(checkpoint: str | os.PathLike, config_exp_dir: str | None = None) -> Path | None:
    """The experiment folder of a checkpoint, for its TensorBoard curves: the config's
    ``train.exp_dir`` if it has a ``tensorboard`` folder, else the nearest of the checkpoint's
    parents (``exp/best.pt``, ``exp/checkpoints/step-N.pt``) that has one; None if none does."""
    cands = [Path(config_exp_dir)] if config_exp_dir else []
    cands += list(Path(checkpoint).resolve().parents)[:3]
    for c in cands:
        if (c / "tensorboard").is_dir():
            return c
    return None


def read_scalars(exp_dir: str | os.PathLike | None) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag under ``<exp_dir>/tensorboard`` (or ``exp_dir`` itself, if it holds the
    event files) as sorted (step, value) lists; a step logged twice (a resumed run) keeps its last
    value. Empty when there is nothing to read."""
    if not exp_dir:
        return {}
    root = Path(exp_dir)
    root = root / "tensorboard" if (root / "tensorboard").is_dir() else root
    if not root.is_dir():
        return {}
    dirs = sorted({Path(d) for d, _, files in os.walk(root) if any("tfevents" in f for f in files)})
    if not dirs:
        return {}
    try:
        from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator
    except ImportError:
        log.warning("tensorboard is not installed; the report has no training curves")
        return {}
    merged: dict[str, dict[int, tuple[float, float]]] = defaultdict(dict)
    tb_log = logging.getLogger("tensorboard")  # it logs "No path found after ..." at INFO per file
    level = tb_log.level
    tb_log.setLevel(max(level, logging.WARNING))
    try:
        for d in dirs:
            _read_dir(d, merged, EventAccumulator, SCALARS)
    finally:
        tb_log.setLevel(level)
    return {tag: sorted((s, v) for s, (_, v) in steps.items()) for tag, steps in merged.items()}


def _read_dir(d: Path, merged: dict, accumulator, scalars_key) -> None:
    """Merge one folder's scalars into ``merged[tag][step] = (wall_time, value)``, newest write wins."""
    try:
        acc = accumulator(str(d), size_guidance={scalars_key: 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            for ev in acc.Scalars(tag):
                old = merged[tag].get(ev.step)
                if old is None or ev.wall_time >= old[0]:
                    merged[tag][ev.step] = (ev.wall_time, float(ev.value))
    except Exception as e:  # noqa: BLE001 - a truncated or foreign event file must not sink the report
        log.warning("could not read TensorBoard events in %s: %s", d, e)


# ------------------------------------------------------------------------------------ audio
def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:80] or "utt"


def _export_audio(rec: Record, dest_dir: Path, stem: str) -> str | None:
    """Link or copy the record's audio into ``dest_dir``; a segment (offset > 0) or a format browsers
    do not play is cut/decoded to WAV. Returns the file name, or None when the audio is unusable."""
    src = Path(rec.audio)
    if not src.is_file():
        log.warning("report: audio for %s not found: %s", rec.id, src)
        return None
    dest_dir.mkdir(parents=True, exist_ok=True)
    ext = src.suffix.lower()
    try:
        if rec.offset == 0 and ext in _PLAYABLE:
            name = stem + ext
            dst = dest_dir / name
            if dst.exists():
                dst.unlink()
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
            return name
        from harken.audio import load_audio, save_wav

        name = stem + ".wav"
        save_wav(dest_dir / name, load_audio(src, offset=rec.offset, duration=rec.duration))
        return name
    except Exception as e:  # noqa: BLE001 - one bad file must not sink the report
        log.warning("report: could not export audio for %s: %s", rec.id, e)
        return None


# ------------------------------------------------------------------------------------ HTML
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0 auto;
 max-width:1180px;padding:16px 24px;color:#222;line-height:1.4}
h1{font-size:1.6em;margin:.2em 0}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:1.6em}
h3{margin:1.2em 0 .4em}
table{border-collapse:collapse;margin:.4em 0 1em;font-size:.9em}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fafafa}
.meta{color:#666;font-size:.9em}.note{color:#666;font-style:italic}
.charts{display:flex;flex-wrap:wrap;gap:12px}.chart{background:#fff;border:1px solid #eee}
.chart .ct{font-size:13px;font-weight:600;fill:#222}.chart .tick{font-size:11px;fill:#444}
.chart .al{font-size:11px;fill:#666}.chart .grid{stroke:#eee}.chart .axis{stroke:#888}
.cols{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
.sub{background:#ffe08a}.del{background:#f7b6b6;text-decoration:line-through}.ins{background:#b9e6b9}
.legend span{padding:0 4px;margin-right:6px}
td.tx{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.92em;max-width:560px}
audio{width:220px;height:32px}
nav a{margin-right:12px}
"""


def _table(header: Sequence[str], rows: Iterable[Sequence], numeric: Sequence[bool] | None = None) -> str:
    numeric = numeric or [False] * len(header)
    out = ["<table><thead><tr>", *(f"<th>{_e(h)}</th>" for h in header), "</tr></thead><tbody>"]
    for r in rows:
        out.append("<tr>" + "".join(f'<td class="n">{_e(c)}</td>' if n else f"<td>{_e(c)}</td>"
                                    for c, n in zip(r, numeric)) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _pct(v) -> str:
    return "–" if v is None else f"{100 * float(v):.2f}"


def _highlight(u: _Utt) -> tuple[str, str]:
    """Ref and hyp as HTML with substituted (yellow), deleted (red, struck) and inserted (green) words."""
    ref, hyp = [], []
    for c in u.chunks:
        rw = [_e(w) for w in u.ref_words[c.ref_start_idx:c.ref_end_idx]]
        hw = [_e(w) for w in u.hyp_words[c.hyp_start_idx:c.hyp_end_idx]]
        if c.type == "equal":
            ref += rw
            hyp += hw
        elif c.type == "substitute":
            ref += [f'<span class="sub">{w}</span>' for w in rw]
            hyp += [f'<span class="sub">{w}</span>' for w in hw]
        elif c.type == "delete":
            ref += [f'<span class="del">{w}</span>' for w in rw]
        elif c.type == "insert":
            hyp += [f'<span class="ins">{w}</span>' for w in hw]
    return " ".join(ref), " ".join(hyp) or '<span class="note">(empty)</span>'


def _breakdown_section(title: str, rows: list[dict], chart_title: str, by_wer: bool, column: str,
                       max_bars: int = 40) -> str:
    if not rows:
        return ""
    rows = sorted(rows, key=(lambda r: (-r["wer"], r["label"])) if by_wer else (lambda r: r["sort"]))
    shown = rows[:max_bars]
    more = f" (worst {max_bars} of {len(rows)})" if len(rows) > max_bars else ""
    chart = bar_chart([(r["label"], 100 * r["wer"]) for r in shown], chart_title + more)
    table = _table([column, "utts", "words", "hours", "S", "D", "I", "WER %"],
                   ([r["label"], r["utts"], r["words"], f"{r['hours']:.3f}", r["subs"], r["dels"], r["ins"],
                     _pct(r["wer"])] for r in rows),
                   [False, True, True, True, True, True, True, True])
    return f'<h3>{_e(title)}</h3><div class="cols"><div>{chart}</div><div>{table}</div></div>'


def _set_section(idx: int, s: SetResult, utts: list[_Utt], out_dir: Path, max_worst: int, top_n: int,
                 group_by: Sequence[str] = ()) -> str:
    p = [f'<h2 id="set-{idx}">Test set: {_e(s.name)}</h2>']
    if not utts:
        p.append('<p class="note">No utterance with a non-empty reference.</p>')
        return "".join(p)
    p.append(_breakdown_section("WER by speaker / voice",
                                _breakdown(utts, lambda u: (0, u.rec.speaker or "(none)")),
                                f"{s.name}: WER % by speaker", by_wer=True, column="speaker"))
    if any(u.rec.group for u in utts):
        p.append(_breakdown_section("WER by group", _breakdown(utts, lambda u: (0, u.rec.group or "(none)")),
                                    f"{s.name}: WER % by group", by_wer=True, column="group"))
    for name in group_by:
        if name in ("speaker", "group"):
            continue  # always shown above
        from harken.evaluate import NO_VALUE, record_field

        p.append(_breakdown_section(f"WER by {name}",
                                    _breakdown(utts, lambda u, n=name: (0, record_field(u.rec, n) or NO_VALUE)),
                                    f"{s.name}: WER % by {name}", by_wer=True, column=name))
    p.append(_breakdown_section("WER by utterance length", _breakdown(utts, lambda u: _length_bucket(u.rec.duration)),
                                f"{s.name}: WER % by length", by_wer=False, column="length"))

    subs, ins, dels = _error_counts(utts)
    p.append('<h3>Most frequent errors</h3><div class="cols">')
    p.append("<div><b>Substitutions</b>" + (_table(["ref", "→ hyp", "count"],
             ([r, h, n] for (r, h), n in subs.most_common(top_n)), [False, False, True]) if subs else
             '<p class="note">none</p>') + "</div>")
    p.append("<div><b>Deletions</b>" + (_table(["ref word", "count"], dels.most_common(top_n), [False, True])
             if dels else '<p class="note">none</p>') + "</div>")
    p.append("<div><b>Insertions</b>" + (_table(["hyp word", "count"], ins.most_common(top_n), [False, True])
             if ins else '<p class="note">none</p>') + "</div></div>")

    worst = sorted((u for u in utts if u.errors), key=lambda u: (-u.errors, -u.wer, u.rec.id))[:max_worst]
    p.append(f"<h3>Worst utterances ({len(worst)} shown)</h3>")
    if not worst:
        p.append('<p class="note">No errors.</p>')
        return "".join(p)
    p.append('<p class="legend"><span class="sub">substituted</span><span class="del">deleted</span>'
             '<span class="ins">inserted</span></p>')
    p.append("<table class=\"worst\"><thead><tr><th>#</th><th>utterance</th><th>errors / words</th>"
             "<th>audio</th><th>ref / hyp</th></tr></thead><tbody>")
    adir = out_dir / "audio" / f"{idx:02d}-{_safe(s.name)}"
    for rank, u in enumerate(worst, 1):
        name = _export_audio(u.rec, adir, f"{rank:03d}-{_safe(u.rec.id)}")
        if name:
            rel = "/".join(quote(x) for x in (adir.relative_to(out_dir) / name).parts)
            player = f'<audio controls preload="none" src="{_e(rel)}"></audio>'
        else:
            player = '<span class="note">missing</span>'
        ref_h, hyp_h = _highlight(u)
        info = [f"<b>{_e(u.rec.id)}</b>", f"speaker: {_e(u.rec.speaker or '–')}"]
        if u.rec.group:
            info.append(f"group: {_e(u.rec.group)}")
        info.append(f"{u.rec.duration:.2f} s")
        p.append(f'<tr class="utt" data-id="{_e(u.rec.id)}"><td class="n">{rank}</td><td>{"<br>".join(info)}</td>'
                 f'<td class="n">{u.errors} / {u.words}<br>S{u.subs} D{u.dels} I{u.ins}<br>WER {_pct(u.wer)} %</td>'
                 f"<td>{player}</td>"
                 f'<td class="tx">REF: {ref_h}<br>HYP: {hyp_h}</td></tr>')
    p.append("</tbody></table>")
    return "".join(p)


def _summary_row(s: SetResult, utts: list[_Utt]) -> dict:
    words = sum(u.words for u in utts)
    d = dict(num_utts=len(utts), num_words=words, substitutions=sum(u.subs for u in utts),
             deletions=sum(u.dels for u in utts), insertions=sum(u.ins for u in utts),
             wer=sum(u.errors for u in utts) / max(1, words),
             sentence_error_rate=sum(u.ref != u.hyp for u in utts) / max(1, len(utts)),
             hours=sum(r.duration for r in s.records) / 3600, cer=None, rtf=None)
    d.update({k: v for k, v in (s.summary or {}).items() if v is not None})
    return d


def _curves_section(scalars: dict[str, list[tuple[int, float]]], exp_dir) -> str:
    p = ['<h2 id="training">Training curves</h2>']
    charts = []
    for tags, title, ylabel in CURVES:
        pct = tags[0].startswith("dev/")
        series = {t: [(s, 100 * v if pct else v) for s, v in scalars[t]] for t in tags if scalars.get(t)}
        if series:
            charts.append(line_chart(series, title, "step", ylabel))
    if not charts:
        p.append(f'<p class="note">No TensorBoard scalars found{" in " + _e(exp_dir) if exp_dir else ""}.</p>')
        return "".join(p)
    p.append(f'<p class="meta">From the TensorBoard events in {_e(exp_dir)}.</p>')
    if "dev/wer" in scalars:
        step, best = min(scalars["dev/wer"], key=lambda t: (t[1], t[0]))
        p.append(f"<p>Best dev WER {_pct(best)} % at step {step}.</p>")
    p.append('<div class="charts">' + "".join(charts) + "</div>")
    return "".join(p)


def write_report(out_dir: str | os.PathLike, sets: list[SetResult], exp_dir: str | None = None,
                 max_worst: int = 30, top_n: int = 25, title: str = "harken error analysis",
                 group_by: Sequence[str] = ()) -> Path:
    """Write ``out_dir/index.html`` (+ ``out_dir/audio/``) and return the path of index.html.

    ``exp_dir`` is the training run's folder; its ``tensorboard`` event files give the training
    curves (omitted, with a note, when there are none). ``max_worst`` utterances per set are listed
    with their audio. ``group_by``: manifest fields (``extra`` keys too) each set is also broken
    down by, as a chart and a table (speaker and group are always shown).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = out_dir / ".harken-report"
    if marker.exists() and (out_dir / "audio").is_dir():  # a re-run must not leave stale clips behind
        shutil.rmtree(out_dir / "audio")  # only in a folder this function wrote (never a user's audio/)
    marker.write_text("written by harken.report.write_report\n")
    aligned = [_align(s) for s in sets]

    body = [f"<h1>{_e(title)}</h1>",
            f'<p class="meta">Generated {_e(time.strftime("%Y-%m-%d %H:%M:%S"))}'
            + (f" · run {_e(exp_dir)}" if exp_dir else "") + "</p>",
            '<nav><a href="#training">training</a><a href="#sets">test sets</a>'
            + "".join(f'<a href="#set-{i}">{_e(s.name)}</a>' for i, s in enumerate(sets)) + "</nav>"]
    body.append(_curves_section(read_scalars(exp_dir), exp_dir))

    rows = [(s, _summary_row(s, u)) for s, u in zip(sets, aligned)]
    body.append('<h2 id="sets">WER by test set</h2>')
    if rows:
        body.append('<div class="cols"><div>' + bar_chart([(s.name, 100 * r["wer"]) for s, r in rows],
                                                         "WER % by test set") + "</div><div>")
        body.append(_table(["set", "utts", "words", "WER %", "CER %", "SER %", "S", "D", "I", "hours", "RTF"],
                           ([s.name, r["num_utts"], r["num_words"], _pct(r["wer"]), _pct(r["cer"]),
                             _pct(r["sentence_error_rate"]), r["substitutions"], r["deletions"], r["insertions"],
                             f"{r['hours']:.3f}", "–" if r["rtf"] is None else f"{r['rtf']:.4f}"]
                            for s, r in rows), [False] + [True] * 10))
        body.append("</div></div>")
    else:
        body.append('<p class="note">No test sets.</p>')
    for i, (s, u) in enumerate(zip(sets, aligned)):
        body.append(_set_section(i, s, u, out_dir, max_worst, top_n, group_by))

    doc = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
           f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    path = out_dir / "index.html"
    atomic_write_text(path, doc, fsync=False)
    return path
