"""Streaming: latency from the end of a chunk to its partial result, and streaming vs offline WER.

Audio is fed to :class:`harken.runtime.streaming.StreamingDecoder` in pieces of one chunk's
duration (chunk_size x 40 ms), as a live source would deliver it; the latency of a chunk is the
wall time of the ``accept_waveform`` call that completed it (incremental fbank + CMVN +
``forward_chunk`` + greedy partial text), i.e. from the moment its last sample arrived to its
partial result.  Median and p90 over all chunks, 1 thread by default.  An SGEMM probe before and
after (GFLOP/s) shows how busy the shared host was.

With ``--manifest``, also the WER of the final streaming result for each chunk size against the
offline (full-context) decode of the same model.  The model should have been trained with
``model.encoder.dynamic_chunk=true model.encoder.causal=true``.

    python bench/streaming.py --checkpoint CKPT --manifest data/corpus/test_seen.jsonl
    python bench/streaming.py                    # latency only, untrained "small" causal conformer
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import emit, sgemm_gflops  # noqa: E402


def _untrained_engine():
    from harken.config import load_config
    from harken.runtime.engine import Engine
    from harken.text.tokenizer import CharTokenizer
    from harken.train.trainer import build_model

    cfg = load_config(None, ["model.encoder.num_layers=8", "model.encoder.causal=true",
                             "model.encoder.dynamic_chunk=true"])
    tok = CharTokenizer.build(["abcdefghijklmnopqrstuvwxyz'"])
    torch.manual_seed(0)
    return Engine.from_model(build_model(cfg, tok.vocab_size), tok, cfg)


def pct(xs, q):
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a harken checkpoint trained with dynamic chunks")
    ap.add_argument("--manifest", help="JSONL manifest for WER (needs --checkpoint) and for latency audio")
    ap.add_argument("--chunks", default="8,16", help="chunk sizes in output frames (40 ms each)")
    ap.add_argument("--left-chunks", type=int, default=None, help="left context in chunks (default: model's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--utts", type=int, default=0, help="at most this many utterances (0: all)")
    ap.add_argument("--seconds", type=float, default=30.0, help="synthetic audio for latency without --manifest")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    from harken.audio import load_audio
    from harken.runtime.engine import Engine

    eng = Engine.load(a.checkpoint, num_threads=a.threads) if a.checkpoint else _untrained_engine()
    if eng.model is None:
        raise SystemExit("streaming needs a .pt checkpoint (torch backend)")
    ecfg = eng.model.encoder.cfg
    if not ecfg.causal and ecfg.type == "conformer":
        raise SystemExit(f"{a.checkpoint}: trained without model.encoder.causal=true; cannot stream")
    records, waves = [], []
    if a.manifest:
        from harken.data.manifest import read_manifest

        records = read_manifest(a.manifest)
        if a.utts:
            records = records[: a.utts]
        waves = [load_audio(r.audio) for r in records]
    else:
        rng = np.random.default_rng(0)
        waves = [(0.05 * rng.standard_normal(int(a.seconds * 16000))).astype(np.float32)]
    chunks = [int(c) for c in a.chunks.split(",") if c]

    gf_before = sgemm_gflops()
    result: dict = {"threads": a.threads, "checkpoint": a.checkpoint or "untrained-small-causal",
                    "utterances": len(waves), "audio_seconds": round(sum(len(w) for w in waves) / 16000, 1),
                    "encoder": {k: getattr(ecfg, k) for k in ("type", "d_model", "num_layers", "causal",
                                                              "dynamic_chunk", "left_chunks")}}
    finals: dict[int, list[str]] = {}
    for c in chunks:
        dec = eng.stream(chunk_size=c, left_chunks=a.left_chunks)
        piece = 160 * 4 * c  # one chunk of audio
        lat, texts, rtf_t = [], [], 0.0
        for w in waves:
            dec.reset()
            t_start = time.perf_counter()
            for i in range(0, len(w), piece):
                t0 = time.perf_counter()
                out = dec.accept_waveform(w[i: i + piece])
                dt = time.perf_counter() - t0
                if len(out) == 1:
                    lat.append(dt)
            texts.append(dec.finish().text)
            rtf_t += time.perf_counter() - t_start
        finals[c] = texts
        ms = f"{c * 40}ms"
        result[f"latency_{ms}_median_ms"] = round(1000 * pct(lat, 50), 2)
        result[f"latency_{ms}_p90_ms"] = round(1000 * pct(lat, 90), 2)
        result[f"chunks_{ms}"] = len(lat)
        result[f"rtf_{ms}"] = round(rtf_t / max(1e-9, result["audio_seconds"]), 4)
    result["sgemm_gflops_before_after"] = [round(gf_before, 1), round(sgemm_gflops(), 1)]

    if records and a.checkpoint:
        from harken.evaluate import error_report
        from harken.text.normalize import normalize_text

        refs = [normalize_text(r.text) for r in records]
        offline = [t.text for t in eng.transcribe_batch(waves)]
        result["wer_offline"] = round(error_report(refs, offline).wer, 4)
        for c in chunks:
            result[f"wer_streaming_{c * 40}ms"] = round(error_report(refs, finals[c]).wer, 4)
    emit("streaming", result)
    return result


if __name__ == "__main__":
    main()
