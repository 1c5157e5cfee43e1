"""`harken train` with ``train.feature_store: true``: the frozen lower layers of a Whisper encoder run
once over the corpus, the top layers + CTC head train on the stored states; the run writes ordinary
checkpoints (resumable, read by the Engine), keeps the stored layers untouched, and refuses the
settings it cannot honour with one line."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch

from harken.config import ConfigError, load_config

TINY_WHISPER = ["model.encoder.type=whisper", "model.encoder.input_dim=80", "model.encoder.d_model=64",
                "model.encoder.num_layers=2", "model.encoder.num_heads=4", "model.encoder.ff_dim=128",
                "model.encoder.dropout=0.0"]


def _overrides(corpus, exp_dir, **extra):
    o = TINY_WHISPER + [f"data.train=[{corpus / 'train.jsonl'}]", f"data.dev={corpus / 'dev.jsonl'}",
                        f"train.exp_dir={exp_dir}", "train.feature_store=true", "model.encoder.trainable_layers=1",
                        "model.encoder.mask_time_prob=0.05", "optim.lr=3e-3", "optim.warmup_steps=5",
                        "train.max_steps=24", "train.eval_every=12", "train.checkpoint_every=8",
                        "train.log_every=4", "train.num_threads=2", "data.max_duration=20",
                        "train.feature_store_views=2", "data.augment.speed_factors=[]", "data.augment.noise_prob=0",
                        "data.augment.volume_prob=1.0", "train.tensorboard=false", "train.progress=false"]
    return o + [f"{k}={v}" for k, v in extra.items()]


def _train_loss(model, corpus, tok) -> float:
    from harken.audio import load_audio
    from harken.data.manifest import read_manifest
    from harken.models.ctc import ctc_loss
    from harken.text.normalize import normalize_text

    recs = read_manifest(corpus / "train.jsonl")[:8]
    waves = [torch.from_numpy(load_audio(r.audio)) for r in recs]
    x = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
    lens = torch.tensor([len(w) for w in waves])
    tg = [torch.tensor(tok.encode(normalize_text(r.text))) for r in recs]
    model.eval()
    with torch.no_grad():
        lp, ol = model(x, lens)
        return float(ctc_loss(lp, ol, torch.nn.utils.rnn.pad_sequence(tg, batch_first=True),
                              torch.tensor([len(t) for t in tg]), reduction="mean"))


def test_feature_store_trains_top_layer_only_resumes_and_serves(tiny_corpus, tmp_path, caplog):
    from harken.models.build import build_model
    from harken.runtime import Engine
    from harken.text.tokenizer import tokenizer_from_dict
    from harken.train.trainer import train

    corpus, _ = tiny_corpus
    exp = tmp_path / "exp"
    cfg = load_config(None, _overrides(corpus, exp, **{"train.ema_decay": 0.9}))
    torch.manual_seed(cfg.train.seed)  # the trainer seeds the same way before it builds the model
    with caplog.at_level(logging.INFO, logger="harken"):
        run = train(cfg)
    assert run.state.step == 24 and run.state.best_step in (12, 24)
    # the steps and time it expects, like the ordinary loop: the plan first, the measured ETA after 20 steps
    assert "max_steps 24 (about" in caplog.text and "batches), max_epochs" in caplog.text
    assert "expect to stop at step 24 of max_steps 24 (by max_steps)" in caplog.text
    best = torch.load(exp / "best.pt", weights_only=True)
    tok = tokenizer_from_dict(best["tokenizer"])
    sel = json.loads((exp / "selection.json").read_text())
    fs = sel["feature_store"]
    assert fs["views"] == 2 and fs["stored_layers"] == 1 and fs["trained_layers"] == 1
    assert fs["utterances"] + sum(fs["dropped"].values()) == 2 * 24

    # best.pt is chosen among everything the run wrote: final (or best step), the average of the last 3
    # step checkpoints, the EMA; each scored on dev, the lowest WER kept
    names = {c["name"] for c in sel["candidates"]}
    assert {"final", "avg", "ema"} <= names <= {"final", "best_step", "avg", "ema"}, names
    win = min(sel["candidates"], key=lambda c: (c["wer"], c["cer"]))
    assert sel["chosen"] == win["name"] and sel["dev_utts"] == 6
    key = "encoder.layers.1.fc1.weight"
    steps = [torch.load(exp / "checkpoints" / f"step-{s:08d}.pt", weights_only=True) for s in (8, 16, 24)]
    avg = torch.load(exp / "avg.pt", weights_only=True)
    assert avg["averaged"] == [8, 16, 24]
    assert torch.allclose(avg["model"][key], sum(c["model"][key] for c in steps) / 3, atol=1e-6)
    ema = torch.load(exp / "ema.pt", weights_only=True)
    assert steps[-1]["ema"].keys() >= {key} and torch.equal(ema["model"][key], steps[-1]["ema"][key])
    assert not torch.equal(ema["model"][key], steps[-1]["model"][key])
    chosen = {"final": steps[-1]["model"], "avg": avg["model"], "ema": ema["model"]}.get(sel["chosen"])
    if chosen is not None:
        assert torch.equal(best["model"][key], chosen[key]) and best["selected"] == sel["chosen"]

    # the stored layer and the conv stem are exactly the initial (random, seeded) weights; the top trained
    torch.manual_seed(cfg.train.seed)
    init = build_model(cfg, tok.vocab_size)
    sd = steps[-1]["model"]
    for k, v in init.state_dict().items():
        if k.startswith(("encoder.layers.0.", "encoder.conv")):
            assert torch.equal(v, sd[k]), k
    assert not torch.equal(init.state_dict()["encoder.layers.1.fc1.weight"], sd["encoder.layers.1.fc1.weight"])
    trained = build_model(cfg, tok.vocab_size)
    trained.load_state_dict(sd)
    assert _train_loss(trained, corpus, tok) < 0.8 * _train_loss(init, corpus, tok)

    # an ordinary checkpoint: the Engine reads it and transcribes
    eng = Engine.load(str(exp / "best.pt"))
    from harken.data.manifest import read_manifest

    rec = read_manifest(corpus / "test_unseen.jsonl")[0]
    assert isinstance(eng.transcribe(rec.audio).text, str)

    # resume: the same exp_dir with more steps continues from step 24 (the store is rebuilt)
    run2 = train(load_config(None, _overrides(corpus, exp, **{"train.max_steps": 32, "train.ema_decay": 0.9})))
    assert run2.state.step == 32
    last = torch.load(exp / "checkpoints" / "step-00000032.pt", weights_only=True)
    assert last["state"]["step"] == 32 and last["state"]["elapsed_seconds"] > 0


def test_store_shares_the_clean_view_of_repeated_records(tiny_corpus):
    """``data.train_repeat`` copies (same audio span, new id) are encoded once in the clean view and
    share its tensor; an augmented view encodes each copy on its own; an unreadable file is None."""
    from dataclasses import replace

    from harken.data.augment import WaveAugmenter
    from harken.data.manifest import read_manifest
    from harken.models.build import build_model
    from harken.train.feature_store import build_store

    corpus, _ = tiny_corpus
    cfg = load_config(None, TINY_WHISPER + ["data.augment.noise_prob=0", "data.augment.speed_factors=[0.9,1.1]"])
    enc = build_model(cfg, 30).encoder.eval()
    recs = read_manifest(corpus / "train.jsonl")[:3]
    recs = recs + [replace(recs[0], id=recs[0].id + "~1"), replace(recs[1], id="gone", audio="/nonexistent.wav")]
    clean = build_store(enc, recs, 1, None, seed=0)
    alone = build_store(enc, recs[:1], 1, None, seed=0)
    assert clean[3] is clean[0] and clean[4] is None
    assert torch.allclose(clean[0].float(), alone[0].float(), atol=1e-2, rtol=1e-2)  # batching: fp rounding only
    assert all(clean[i] is not clean[j] for i in range(3) for j in range(i))
    aug = build_store(enc, recs, 1, WaveAugmenter(cfg.data.augment), seed=0)
    assert aug[3] is not aug[0] and not torch.equal(aug[3], aug[0])  # each copy its own augmentation


def test_feature_store_settings_refused_in_one_line(tiny_corpus, tmp_path):
    corpus, _ = tiny_corpus
    from harken.train.trainer import train

    with pytest.raises(ConfigError, match="trainable_layers >= 0"):
        train(load_config(None, _overrides(corpus, tmp_path / "a", **{"model.encoder.trainable_layers": -1})))
    conformer = [o for o in _overrides(corpus, tmp_path / "b") if not o.startswith("model.encoder.")]
    with pytest.raises(ConfigError, match="split into stored lower layers"):
        train(load_config(None, conformer))
    with pytest.raises(ConfigError, match="apply to the whisper encoder"):
        load_config(None, ["model.encoder.trainable_layers=2"])
    # through the CLI: one line, exit 2
    (tmp_path / "c.yaml").write_text("train:\n  feature_store: true\n")
    p = subprocess.run([sys.executable, "-m", "harken.cli", "train", "--config", str(tmp_path / "c.yaml"),
                        *_overrides(corpus, tmp_path / "c", **{"optim.accum_steps": 2})],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert "accum_steps" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_whisper_ctc_checkpoint_exports_to_onnx_and_int8_and_runs_in_the_engine(tiny_corpus, tmp_path):
    """The fine-tuned Whisper-CTC model through `harken export` (log-mel frontend inside the graph):
    the ONNX file and its int8 twin load in the Engine and transcribe like the checkpoint."""
    pytest.importorskip("onnxruntime")
    from harken.data.manifest import read_manifest
    from harken.runtime import Engine
    from harken.train.trainer import train

    corpus, _ = tiny_corpus
    exp = tmp_path / "exp"
    train(load_config(None, _overrides(corpus, exp, **{"train.feature_store_views": 1})))
    out = tmp_path / "export"
    p = subprocess.run([sys.executable, "-m", "harken.cli", "export", "--checkpoint", str(exp / "best.pt"),
                        "--format", "onnx", "--quantize", "int8", "--out", str(out), "--verify",
                        "--manifest", str(corpus / "test_unseen.jsonl")], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    onnx_files = sorted(out.glob("*.onnx"))
    assert len(onnx_files) >= 2, [f.name for f in out.iterdir()]
    recs = read_manifest(corpus / "test_unseen.jsonl")[:4]
    ref = Engine.load(str(exp / "best.pt"))
    want = [ref.transcribe(r.audio).text for r in recs]
    fp32 = [f for f in onnx_files if "int8" not in f.name][0]
    eng = Engine.load(str(fp32))
    assert [eng.transcribe(r.audio).text for r in recs] == want
    assert eng.info.max_input_seconds == pytest.approx(30.0)
    int8 = [f for f in onnx_files if "int8" in f.name][0]
    got8 = [Engine.load(str(int8)).transcribe(r.audio).text for r in recs]
    assert all(isinstance(t, str) for t in got8)
