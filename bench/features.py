"""Benchmark harken.features.Fbank (torch, 1 thread) against kaldi-native-fbank on the same audio.

A/B runs are interleaved (pairs, alternating which goes first) so machine noise hits both alike.
Prints a markdown table and one JSON line.

    python bench/features.py --seconds 60 --pairs 15
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harken.features import Fbank, FbankConfig  # noqa: E402


def make_audio(seconds: float, sr: int = 16000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    f0 = 150 + 30 * np.sin(2 * np.pi * 0.5 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    x = sum(0.1 / k * np.sin(k * phase) for k in range(1, 12))
    x = x * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2) + 0.01 * rng.standard_normal(n)
    return (x / np.abs(x).max() * 0.8).astype(np.float32)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0, help="audio length (default 60)")
    ap.add_argument("--pairs", type=int, default=15, help="interleaved A/B pairs (default 15)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-snip-edges", action="store_true", help="snip_edges=False for both")
    args = ap.parse_args(argv)

    import kaldi_native_fbank as knf

    torch.set_num_threads(1)
    sr = 16000
    snip = not args.no_snip_edges
    x = make_audio(args.seconds, sr)
    wave = torch.from_numpy(x)[None]
    lens = torch.tensor([len(x)])
    model = Fbank(FbankConfig(snip_edges=snip)).eval()

    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.snip_edges = snip
    opts.mel_opts.num_bins = 80
    samples_int16 = (x * 32768.0).tolist()  # int16 scale (knf does not scale); converted once, untimed

    def run_torch():
        with torch.inference_mode():
            feats, _ = model(wave, lens)
        return feats

    def run_knf(fetch: bool = False):
        # timed: compute only (knf computes inside accept_waveform); a Python list is its fastest input
        fb = knf.OnlineFbank(opts)
        fb.accept_waveform(sr, samples_int16)
        fb.input_finished()
        if fetch:
            return np.stack([np.asarray(fb.get_frame(i)) for i in range(fb.num_frames_ready)])
        return fb.num_frames_ready

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        run_torch()
        run_knf()
    t_torch, t_knf = [], []
    for i in range(args.pairs):
        if i % 2 == 0:
            t_torch.append(timed(run_torch))
            t_knf.append(timed(run_knf))
        else:
            t_knf.append(timed(run_knf))
            t_torch.append(timed(run_torch))

    ref = run_knf(fetch=True)
    ours = run_torch()[0].numpy()
    max_diff = float(np.abs(ours - ref).max()) if ours.shape == ref.shape else float("nan")

    med_t, med_k = statistics.median(t_torch), statistics.median(t_knf)
    res = {
        "bench": "features",
        "seconds": args.seconds,
        "pairs": args.pairs,
        "snip_edges": snip,
        "threads": torch.get_num_threads(),
        "torch_ms": round(med_t * 1000, 2),
        "knf_ms": round(med_k * 1000, 2),
        "torch_rtf_x": round(args.seconds / med_t, 1),
        "knf_rtf_x": round(args.seconds / med_k, 1),
        "knf_over_torch": round(med_k / med_t, 2),
        "frames": int(ours.shape[0]),
        "max_abs_diff": max_diff,
        "torch_version": torch.__version__,
        "knf_version": getattr(knf, "__version__", "?"),
    }
    print(f"| impl | median ms ({args.seconds:g} s audio) | x real time |")
    print("|---|---:|---:|")
    print(f"| harken Fbank (torch, 1 thread) | {res['torch_ms']:.2f} | {res['torch_rtf_x']:.0f} |")
    print(f"| kaldi-native-fbank | {res['knf_ms']:.2f} | {res['knf_rtf_x']:.0f} |")
    print(f"\nknf / torch time ratio: {res['knf_over_torch']:.2f}  (max |diff| {max_diff:.2e}, {res['frames']} frames)")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
