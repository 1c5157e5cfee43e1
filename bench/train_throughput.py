"""Training throughput: bucketing vs naive batches on the built-in corpus, and the `medium` yardstick.

Part A (needs a corpus, default data/corpus/train.jsonl): the demo model trains for a fixed number of
steps with (1) the bucketing sampler and (2) fixed-size random batches of the same mean size; reports
audio-seconds trained per wall-second and the fraction of padded frames. The two are interleaved in
rounds so that machine noise hits both.

Part B: configs/medium.yaml on random 10 s utterances, batch 8, at 1 and 2 threads: training
audio-s/s (forward, CTC, backward, AdamW step), model FLOPs/s as a fraction of an SGEMM rate probed
before and after each timed block as the median of GEMM bursts (MFU; the FLOP count has the
rel-pos projection once per batch), and the inference real-time factor of one 10 s utterance.

    python bench/train_throughput.py [--corpus data/corpus/train.jsonl] [--steps 20] [--skip-a] [--skip-b]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, median, sgemm_gflops_median  # noqa: E402

from harken.config import load_config  # noqa: E402
from harken.data.dataset import AsrDataset  # noqa: E402
from harken.data.manifest import read_manifest  # noqa: E402
from harken.data.sampler import BucketSampler, RandomBatchSampler  # noqa: E402
from harken.models.build import build_model  # noqa: E402
from harken.models.ctc import ctc_loss  # noqa: E402
from harken.text.normalize import normalize_text  # noqa: E402
from harken.text.tokenizer import CharTokenizer  # noqa: E402


def train_step(model, opt, wave, lens, targets, tlens):
    lp, ol = model(wave, lens)
    loss = ctc_loss(lp, ol, targets, tlens, reduction="sum") / wave.shape[0]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)


def part_a(args):
    cfg = load_config(args.config)
    recs = read_manifest(args.corpus)
    tok = CharTokenizer.build([normalize_text(r.text) for r in recs])
    ds = AsrDataset(recs, tok, normalize=normalize_text)
    durs = np.array([r.duration for r in recs])
    bucket = BucketSampler(durs, cfg.data.max_duration, num_buckets=cfg.data.num_buckets, seed=0,
                           max_utt_duration=cfg.data.max_utt_duration)
    bb = list(bucket)
    mean_bs = int(round(np.mean([len(b) for b in bb])))
    naive = list(RandomBatchSampler(len(recs), mean_bs, seed=0))

    def pad_frac(batches):
        tot = sum(durs[b].max() * len(b) for b in batches)
        return sum(durs[b].max() * len(b) - durs[b].sum() for b in batches) / tot

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(cfg, tok.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    # pre-load the batches so that only the model is timed
    loads = {"bucket": [ds[(0, b)] for b in bb[: args.steps]], "naive": [ds[(0, b)] for b in naive[: args.steps]]}
    rates = {"bucket": [], "naive": []}
    for rnd in range(args.rounds):
        for name in (("bucket", "naive") if rnd % 2 == 0 else ("naive", "bucket")):
            t = time.perf_counter()
            sec = 0.0
            for b in loads[name]:
                train_step(model, opt, b.wave, b.wave_lens, b.targets, b.target_lens)
                sec += b.seconds
            rates[name].append(sec / (time.perf_counter() - t))
    res = {
        "threads": args.threads, "steps_per_round": args.steps, "rounds": args.rounds,
        "mean_batch_size": mean_bs, "max_duration": cfg.data.max_duration,
        "bucket_audio_s_per_s": round(median(rates["bucket"]), 2),
        "naive_audio_s_per_s": round(median(rates["naive"]), 2),
        "speedup": round(median(rates["bucket"]) / median(rates["naive"]), 2),
        "bucket_padded_fraction": round(pad_frac(bb), 4), "naive_padded_fraction": round(pad_frac(naive), 4),
    }
    print(f"\nA. demo model on {args.corpus}, {args.threads} threads, median of {args.rounds} rounds")
    print("| batches | audio-s/s | padded frames |\n|---|---|---|")
    print(f"| bucketing (max {cfg.data.max_duration:g} s) | {res['bucket_audio_s_per_s']} | "
          f"{100 * res['bucket_padded_fraction']:.1f}% |")
    print(f"| random, fixed size {mean_bs} | {res['naive_audio_s_per_s']} | "
          f"{100 * res['naive_padded_fraction']:.1f}% |")
    emit("train_throughput_bucketing", res)


def part_b(args):
    cfg = load_config(args.medium)
    vocab = cfg.tokenizer.vocab_size
    rows = []
    for threads in args.medium_threads:
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        model = build_model(cfg, vocab)
        nparams = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        B, S = 8, 160000
        wave = torch.randn(B, S) * 0.1
        lens = torch.full((B,), S, dtype=torch.int64)
        targets = torch.randint(1, vocab, (B, 60))
        tlens = torch.full((B,), 60, dtype=torch.int64)
        model.train()
        train_step(model, opt, wave, lens, targets, tlens)  # warm-up
        # one FLOP count: the rel-pos projection is computed once per batch, not per utterance
        flops_step = 3 * model.flops(1 + (S - 400) // 160, batch_size=B)
        times, mfus = [], []
        for _ in range(args.medium_reps):
            g0 = sgemm_gflops_median()
            t = time.perf_counter()
            train_step(model, opt, wave, lens, targets, tlens)
            dt = time.perf_counter() - t
            g1 = sgemm_gflops_median()
            times.append(dt)
            mfus.append(flops_step / dt / 1e9 / ((g0 + g1) / 2))
        model.eval()
        one, one_len = wave[:1], lens[:1]
        with torch.inference_mode():
            model(one, one_len)
            inf = []
            for _ in range(args.medium_reps * 2):
                t = time.perf_counter()
                model(one, one_len)
                inf.append(time.perf_counter() - t)
        row = {"threads": threads, "params_M": round(nparams / 1e6, 2),
               "train_audio_s_per_s": round(B * 10 / median(times), 2), "train_step_s": round(median(times), 3),
               "mfu_vs_sgemm": round(median(mfus), 3), "infer_rtf_10s": round(median(inf) / 10, 4)}
        rows.append(row)
        emit("train_throughput_medium", row)
    print("\nB. configs/medium.yaml, random 10 s utterances, batch 8 (medians)")
    print("| threads | params | train audio-s/s | MFU vs SGEMM | inference RTF (1 x 10 s) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['threads']} | {r['params_M']}M | {r['train_audio_s_per_s']} | {100 * r['mfu_vs_sgemm']:.0f}% | "
              f"{r['infer_rtf_10s']} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--corpus", default="data/corpus/train.jsonl")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--medium", default="configs/medium.yaml")
    p.add_argument("--medium-threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--medium-reps", type=int, default=5)
    p.add_argument("--skip-a", action="store_true")
    p.add_argument("--skip-b", action="store_true")
    args = p.parse_args()
    if not args.skip_a:
        if not Path(args.corpus).exists():
            sys.exit(f"{args.corpus} not found: run `harken synth` first (or pass --skip-a)")
        part_a(args)
    if not args.skip_b:
        part_b(args)


if __name__ == "__main__":
    main()
