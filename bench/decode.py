"""Decoding speed (x real time, 1 thread) of greedy, beam and beam+LM (+ hotwords), optionally WER.

Without a model: synthetic "peaky" CTC posteriors at 25 frames per second of audio that spell
sentences from harken's text generator (a character tokenizer; each token 1-3 frames, blanks in
between, random peak heights so some blank frames fall under the skip threshold and some tokens are
confusable), and a 3-gram LM estimated on other generated sentences.  With ``--checkpoint`` and
``--manifest``: real model outputs, and WER per mode.

Modes run interleaved (round-robin over repeats) so machine noise hits all alike; the median time
per mode is reported.

    python bench/decode.py --utts 40 --repeats 3
    python bench/decode.py --checkpoint exp/x/best.pt --manifest data/corpus/dev.jsonl --lm lm.arpa
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import emit  # noqa: E402
from harken.decode import DecodeConfig, build_decoder, decode  # noqa: E402

FPS = 25.0


def synthetic(tok, sentences, seed=0):
    """Peaky log-probs spelling each sentence; returns list of (T,V) tensors."""
    rng = np.random.default_rng(seed)
    v = tok.vocab_size
    out = []
    for s in sentences:
        frames = []
        for k in tok.encode(s):
            frames += [0] * int(rng.integers(0, 3))  # blanks before the token
            frames += [k] * int(rng.integers(1, 3))
        frames += [0] * int(rng.integers(1, 4))
        t = len(frames)
        x = rng.normal(size=(t, v)).astype(np.float32)
        peak = rng.uniform(4.0, 14.0, size=t).astype(np.float32)
        x[np.arange(t), frames] += peak
        # a few confusions: the right token is only second best
        conf = rng.random(t) < 0.03
        for i in np.nonzero(conf)[0]:
            j = int(rng.integers(3, v))
            x[i, j] = x[i, frames[i]] + 0.5
        out.append(torch.log_softmax(torch.from_numpy(x), -1))
    return out


def run_mode(lps, tok, cfg, decoder):
    t0 = time.perf_counter()
    texts = []
    for lp in lps:  # one utterance at a time, like a server; batching only vectorises the top-k
        h = decode(lp[None], torch.tensor([lp.shape[0]]), tok, cfg, decoder=decoder)
        texts.append(h[0][0].text)
    return time.perf_counter() - t0, texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--manifest", default=None)
    ap.add_argument("--lm", default=None, help="ARPA LM (default with synthetic data: built here)")
    ap.add_argument("--lm-weight", type=float, default=0.5)
    ap.add_argument("--word-bonus", type=float, default=1.0)
    ap.add_argument("--beam-size", type=int, default=8)
    ap.add_argument("--hotword", action="append", default=[])
    ap.add_argument("--utts", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from harken.decode.context import parse_hotword
    from harken.evaluate import error_report

    refs = None
    if a.checkpoint:
        if not a.manifest:
            ap.error("--checkpoint needs --manifest")
        from harken.data.manifest import read_manifest
        from harken.evaluate import log_probs_for_records
        from harken.recognizer import Recognizer
        from harken.text.normalize import normalize_text

        rec = Recognizer.load(a.checkpoint, num_threads=a.threads)
        records = read_manifest(a.manifest)[: a.utts] if a.utts else read_manifest(a.manifest)
        tok = rec.tokenizer
        lps = log_probs_for_records(rec, records)
        refs = [normalize_text(r.text) for r in records]
        audio = sum(r.duration for r in records)
        source = a.manifest
    else:
        from harken.data.corpus.textgen import generate_sentences
        from harken.text.tokenizer import CharTokenizer

        sents = generate_sentences(a.utts + 3000, seed=11)
        test, train = sents[: a.utts], sents[a.utts:]
        tok = CharTokenizer.build(train + test)
        lps = synthetic(tok, test)
        refs = test
        audio = sum(lp.shape[0] for lp in lps) / FPS
        source = "synthetic"
    lm_path = a.lm
    if lm_path is None:
        from harken.decode.lm import KneserNey

        if a.checkpoint:
            ap.error("give --lm with --checkpoint")
        lm_path = os.path.join(tempfile.mkdtemp(), "bench3.arpa")
        KneserNey([s.split() for s in train], 3).write_arpa(lm_path)

    hot = [parse_hotword(s) for s in a.hotword] or [("rosalind", 2.0), ("mister", 1.5)]
    modes = {
        "greedy": DecodeConfig(method="greedy"),
        "beam": DecodeConfig(method="beam", beam_size=a.beam_size),
        "beam_lm": DecodeConfig(method="beam_lm", beam_size=a.beam_size, lm_path=lm_path,
                                lm_weight=a.lm_weight, word_bonus=a.word_bonus),
        "beam_lm_hotwords": DecodeConfig(method="beam_lm", beam_size=a.beam_size, lm_path=lm_path,
                                         lm_weight=a.lm_weight, word_bonus=a.word_bonus, hotwords=hot),
    }
    decoders = {k: build_decoder(tok, c) for k, c in modes.items()}  # LM loaded outside the timing
    for k, c in modes.items():  # warm-up (also fills the LM score cache as a server would)
        run_mode(lps[:2], tok, c, decoders[k])
    times = {k: [] for k in modes}
    texts = {}
    for _ in range(a.repeats):
        for k, c in modes.items():
            dt, texts[k] = run_mode(lps, tok, c, decoders[k])
            times[k].append(dt)
    frames = sum(lp.shape[0] for lp in lps)
    skipped = sum(int((lp[:, 0] > np.log(0.999)).sum()) for lp in lps) / frames
    res = {"source": source, "utts": len(lps), "audio_s": round(audio, 1), "frames": frames,
           "blank_skip_fraction": round(skipped, 3), "beam_size": a.beam_size, "threads": a.threads,
           "vocab": tok.vocab_size}
    print(f"{'mode':<18} {'x real time':>12} {'ms / audio s':>13} {'WER %':>7}")
    for k in modes:
        med = statistics.median(times[k])
        wer = error_report(refs, texts[k]).wer if refs else None
        res[k] = {"x_real_time": round(audio / med, 1), "ms_per_audio_s": round(1000 * med / audio, 3),
                  "wer": None if wer is None else round(wer, 4)}
        print(f"{k:<18} {audio / med:>12.1f} {1000 * med / audio:>13.3f} "
              f"{'' if wer is None else f'{100 * wer:7.2f}'}")
    emit("decode", res)


if __name__ == "__main__":
    main()
