"""What Whisper-decoder rescoring costs and buys: WER and RTF of greedy, beam + LM, and beam + LM
rescored (harken.decode.rescore), each utterance alone (batch 1, like bench/peers.py), after a warm-up.

    python bench/rescore.py --checkpoint exp/whisper-tiny-ctc/best.pt --manifest data/realdev/realdev.jsonl \\
        --lm exp/whisper-tiny-ctc/lm4.arpa --lm-weight 1.0 --word-bonus 4 --threads 1 2

RTF = wall seconds / audio seconds, over the whole set; the three decodes run side by side in one
process, per utterance in turn, so that host noise hits them alike.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from harken.audio import load_audio  # noqa: E402
from harken.data.manifest import read_manifest  # noqa: E402
from harken.evaluate import error_report  # noqa: E402
from harken.runtime import DecodeOptions, Engine  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--lm", required=True)
    ap.add_argument("--lm-weight", type=float, default=1.0)
    ap.add_argument("--word-bonus", type=float, default=4.0)
    ap.add_argument("--beam-size", type=int, default=16)
    ap.add_argument("--rescore", default="auto")
    ap.add_argument("--rescore-weight", type=float, default=1.0)
    ap.add_argument("--rescore-nbest", type=int, default=16)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    recs = read_manifest(a.manifest)
    waves = [load_audio(r.audio, offset=r.offset, duration=r.duration or None) for r in recs]
    audio_s = sum(len(w) for w in waves) / 16000
    lm = DecodeOptions(method="beam_lm", lm_path=a.lm, lm_weight=a.lm_weight, word_bonus=a.word_bonus,
                       beam_size=a.beam_size)
    decodes = {"greedy": DecodeOptions(), "beam_lm": lm,
               "beam_lm+rescore": lm.with_(rescore=a.rescore, rescore_weight=a.rescore_weight,
                                           rescore_nbest=a.rescore_nbest)}
    out = []
    for th in a.threads:
        torch.set_num_threads(th)
        eng = Engine.load(a.checkpoint)
        eng.rescorer(decodes["beam_lm+rescore"])
        for opts in decodes.values():  # warm-up
            eng.transcribe(waves[0], options=opts)
        hyps = {k: [] for k in decodes}
        wall = {k: 0.0 for k in decodes}
        rescore_s = 0.0
        for w in waves:
            for k, opts in decodes.items():
                t0 = time.perf_counter()
                t = eng.transcribe(w, options=opts)
                wall[k] += time.perf_counter() - t0
                hyps[k].append(t.text)
                rescore_s += t.timings.get("rescore", 0.0)
        for k in decodes:
            rep = error_report([r.text for r in recs], hyps[k])
            out.append({"threads": th, "decode": k, "wer": rep.wer, "rtf": wall[k] / audio_s,
                        "utts": len(recs), "audio_s": audio_s})
            print(f"threads {th} {k:16s} WER {rep.wer:6.2%}  RTF {wall[k] / audio_s:.4f}", flush=True)
        print(f"threads {th} rescoring alone: RTF {rescore_s / audio_s:.4f}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
