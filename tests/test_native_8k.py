"""Native 8 kHz models: config, data loading (speech and noise at the model's rate), the fbank at
8 kHz, the rate in the checkpoint and the exports, and every input path (Engine, streaming, ONNX,
sherpa-onnx, the server) resampling any input rate to the model's.

One tiny model is trained for a few steps on an 8 kHz copy of the tiny corpus (with speed
perturbation and a 16 kHz noise folder, both read at 8 kHz); the tests share it."""

from __future__ import annotations

import dataclasses
import io
import json
import math

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch

from harken.audio import load_audio, resample, save_wav
from harken.config import ConfigError, load_config
from harken.data.manifest import read_manifest, write_manifest

TRAIN_8K = [
    "model.fbank.sample_rate=8000", "model.fbank.snip_edges=false", "model.fbank.high_freq=-400",  # sherpa's
    "model.encoder.d_model=64", "model.encoder.num_layers=2", "model.encoder.num_heads=2",
    "model.encoder.ff_dim=128", "model.encoder.conv_kernel=7", "model.encoder.subsampling_channels=32",
    "model.encoder.causal=true", "model.encoder.chunk_size=8",  # streamable
    "data.num_workers=0", "data.max_duration=40", "data.min_utt_duration=0.0", "train.progress=false",
    "train.tensorboard=false", "train.log_every=10", "train.average_last=0", "train.max_steps=40",
    "train.eval_every=0", "train.checkpoint_every=40", "optim.lr=3e-3", "optim.warmup_steps=5",
    "optim.schedule=constant", "model.encoder.dropout=0.0",
    "data.augment.speed_factors=[0.9,1.0,1.1]", "data.augment.noise_prob=0.5", "data.augment.snr_db=[20,30]",
]
SPLITS = ("train", "dev", "test_seen")


@pytest.fixture(scope="module")
def corpus8k(tiny_corpus, tmp_path_factory):
    """(16 kHz corpus dir, 8 kHz copy dir): every utterance read at 8 kHz and written as 16-bit PCM
    at 8 kHz, as a telephone recording would arrive."""
    corpus, _ = tiny_corpus
    out = tmp_path_factory.mktemp("corpus8k")
    for split in SPLITS:
        recs = []
        for r in read_manifest(corpus / f"{split}.jsonl"):
            wave = load_audio(r.audio, sample_rate=8000, offset=r.offset, duration=r.duration)
            p = out / "wav" / f"{r.id}.wav"
            save_wav(p, wave, 8000)
            recs.append(dataclasses.replace(r, audio=str(p), offset=0.0, duration=len(wave) / 8000))
        write_manifest(out / f"{split}.jsonl", recs)
    return corpus, out


@pytest.fixture(scope="module")
def trained(corpus8k, tmp_path_factory):
    """(run, checkpoint path) of a tiny 8 kHz model trained a few steps, noise from a 16 kHz folder."""
    from harken.data.augment import generate_noise_folder
    from harken.train import checkpoint as ckpt
    from harken.train.trainer import train

    _, c8 = corpus8k
    tmp = tmp_path_factory.mktemp("m8k")
    generate_noise_folder(tmp / "noise", [], seconds_each=2.0, count_per_kind=1, sample_rate=16000)
    cfg = load_config(None, TRAIN_8K + [f"data.train=[{c8 / 'train.jsonl'}]", f"data.dev={c8 / 'dev.jsonl'}",
                                        f"train.exp_dir={tmp / 'exp'}", f"data.augment.noise_dir={tmp / 'noise'}"])
    run = train(cfg)
    return run, ckpt.latest_checkpoint(tmp / "exp" / "checkpoints")


@pytest.fixture(scope="module")
def engine8k(trained):
    from harken.runtime import Engine

    return Engine.load(trained[1], num_threads=2)


def pairs(corpus8k, split="test_seen", n=4):
    """(16 kHz record, 8 kHz record) of the same utterances."""
    c16, c8 = corpus8k
    a, b = read_manifest(c16 / f"{split}.jsonl"), read_manifest(c8 / f"{split}.jsonl")
    return list(zip(a, b))[:n]


# ------------------------------------------------------------------------------------------ config
def test_config_takes_8000_and_16000_and_refuses_other_rates():
    cfg = load_config(None, ["model.fbank.sample_rate=8000"])
    assert cfg.model.fbank.sample_rate == 8000 and cfg.data.augment.sample_rate == 8000  # follows the model
    assert load_config(None, []).data.augment.sample_rate == 16000
    for bad in ("22050", "44100", "11025"):
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"model.fbank.sample_rate={bad}"])
        msg = str(e.value)
        assert "\n" not in msg and "8000" in msg and "16000" in msg and bad in msg
    with pytest.raises(ConfigError, match="disagrees with model.fbank.sample_rate=8000"):
        load_config(None, ["model.fbank.sample_rate=8000", "data.augment.sample_rate=16000"])
    with pytest.raises(ConfigError, match="pretrained on 16000 Hz"):
        load_config(None, ["model.encoder.type=wav2vec2", "model.encoder.pretrained=/m",
                           "model.fbank.sample_rate=8000"])


# --------------------------------------------------------------------------------------- training
def test_training_reads_speech_and_noise_at_the_model_rate(trained, corpus8k):
    from harken.models.load import load_model

    run, path = trained
    ds = run.dataset
    assert ds.sample_rate == 8000 and ds.augmenter.cfg.sample_rate == 8000
    noise = ds.augmenter.noise  # the folder holds 2 s files at 16 kHz
    assert noise is not None and all(len(w) == 2 * 8000 for w in noise.waves)
    for i in range(3):
        r = ds.records[i]
        n = len(ds.load(i, 0))  # speed-perturbed by 0.9..1.1
        assert 0.85 * r.duration * 8000 < n < 1.15 * r.duration * 8000
    b = ds[(0, [0, 1])]
    assert b.sample_rate == 8000 and abs(b.seconds - sum(len(ds.load(i, 0)) for i in (0, 1)) / 8000) < 1e-6
    assert run.state.step == 40 and run.state.nonfinite_skipped == 0
    lm = load_model(path)
    assert lm.info.sample_rate == 8000 and lm.config.model.fbank.sample_rate == 8000
    assert lm.info.feature_config["sample_rate"] == 8000


def _empty_bins(feats: torch.Tensor) -> int:
    """Mel bins whose mean log-energy is more than 50 dB below the median bin's: no signal there."""
    m = feats.mean(dim=0)
    return int((m < m.median() - math.log(10 ** 5)).sum())


def test_8k_fbank_has_no_empty_bins_where_upsampled_audio_leaves_16k_bins_empty(engine8k, corpus8k):
    from harken.features import Fbank, FbankConfig

    fb8 = engine8k.model.frontend.fbank
    assert fb8.cfg.sample_rate == 8000 and fb8.num_mel_bins == 80
    fb16 = Fbank(FbankConfig()).eval()
    with torch.no_grad():
        for _, r8 in pairs(corpus8k, n=3):
            w8 = torch.from_numpy(load_audio(r8.audio, sample_rate=8000))[None]
            w16 = torch.from_numpy(load_audio(r8.audio))[None]  # the same 8 kHz audio upsampled
            f8, n8 = fb8(w8, torch.tensor([w8.shape[1]]))
            f16, _ = fb16(w16, torch.tensor([w16.shape[1]]))
            assert _empty_bins(f8[0]) == 0
            assert _empty_bins(f16[0]) >= 15  # the bins above 4 kHz
            assert int(n8[0]) == round(w8.shape[1] / 80)  # 10 ms frames at 8 kHz (snip_edges=false)


# ----------------------------------------------------------------------------------------- engine
def test_engine_gives_an_8k_model_any_input_rate(engine8k, corpus8k):
    assert engine8k.sample_rate == 8000 and engine8k.info.sample_rate == 8000
    for r16, r8 in pairs(corpus8k, n=3):
        t8, t16 = engine8k.transcribe(r8.audio), engine8k.transcribe(r16.audio)  # files at 8 and 16 kHz
        assert t8.text == t16.text and abs(t8.duration - t16.duration) < 0.01
        lp8 = engine8k.log_probs([load_audio(r8.audio, sample_rate=8000)])[0]
        lp16 = engine8k.log_probs([load_audio(r16.audio, sample_rate=8000)])[0]
        assert lp8.shape == lp16.shape and float((lp8 - lp16).abs().max()) < 0.05
        w16 = load_audio(r16.audio)  # arrays: at the rate the caller names
        res = engine8k.infer_batch([w16, load_audio(r8.audio, sample_rate=8000)], sample_rate=None)
        assert res[1].text == t8.text
        assert engine8k.infer_batch([w16], sample_rate=16000)[0].text == t16.text
        segs = list(engine8k.transcribe_segments(w16, sample_rate=16000))
        assert segs and abs(segs[-1].end - t16.duration) < 0.3
        ta = engine8k.transcribe(w16, sample_rate=16000)
        assert ta.text == t16.text and abs(ta.duration - t16.duration) < 0.01
        assert abs(engine8k.transcribe(w16).duration - 2 * t16.duration) < 0.01  # unnamed: taken as 8 kHz


def test_16k_model_takes_8k_input(tiny_corpus, corpus8k, tmp_path):
    from conftest import write_tiny_checkpoint

    from harken.runtime import Engine

    corpus, _ = tiny_corpus
    eng = Engine.load(write_tiny_checkpoint(corpus, tmp_path / "tiny16.pt"), num_threads=2)
    assert eng.sample_rate == 16000
    for r16, r8 in pairs(corpus8k, n=2):
        t8, t16 = eng.transcribe(r8.audio), eng.transcribe(r16.audio)
        assert abs(t8.duration - t16.duration) < 0.01 and t8.text
        w8 = load_audio(r8.audio, sample_rate=8000)
        assert eng.transcribe(w8, sample_rate=8000).text == t8.text
        assert len(eng.log_probs([load_audio(r8.audio)])[0]) == len(eng.log_probs([load_audio(r16.audio)])[0])


def test_streaming_sessions_resample_their_input(engine8k, corpus8k):
    sm = engine8k.streaming_model()
    assert sm.sample_rate == 8000
    for r16, r8 in pairs(corpus8k, n=1):
        a = sm.new_session(keep_log_probs=True)
        b = sm.new_session(keep_log_probs=True)
        w8, w16 = load_audio(r8.audio, sample_rate=8000), load_audio(r16.audio)
        for i in range(0, len(w8), 1234):
            a.accept_waveform(w8[i: i + 1234])
        for i in range(0, len(w16), 3001):
            b.accept_waveform(w16[i: i + 3001], sample_rate=16000)
        a.input_finished()
        b.input_finished()
        out = sm.run([a, b])
        assert a.done and b.done
        fa, fb = [r for r in out[0] if r.is_final][-1], [r for r in out[1] if r.is_final][-1]
        assert fa.text == fb.text == engine8k.transcribe(r8.audio).text
        la, lb = a.all_log_probs(), b.all_log_probs()
        assert la.shape == lb.shape and float((la - lb).abs().max()) < 0.05
        assert abs(a.seconds_received - b.seconds_received) < 0.01
        with pytest.raises(ValueError, match="changed"):
            c = sm.new_session()
            c.accept_waveform(w16[:1600], sample_rate=16000)
            c.accept_waveform(w16[:1600], sample_rate=44100)


# ----------------------------------------------------------------------------------------- export
def test_export_onnx_at_8k_verifies_and_says_8000(trained, engine8k, corpus8k, tmp_path, capsys):
    from harken.cli import main
    from harken.export.onnx import build_metadata, read_metadata
    from harken.runtime import Engine

    _, path = trained
    _, c8 = corpus8k
    out = tmp_path / "export"
    rc = main(["export", "--checkpoint", str(path), "--format", "onnx", "--out", str(out), "--verify",
               "--manifest", str(c8 / "dev.jsonl"), "--max-utts", "3"])
    assert rc == 0, capsys.readouterr().err
    md = read_metadata(out / "model.onnx")
    assert md["sample_rate"] == 8000 and md["feature_config"]["sample_rate"] == 8000
    (row,) = [r for r in json.loads((out / "verify.json").read_text()) if r["kind"] == "wave"]
    # the frontend inside the graph computes the same 8 kHz features as torch
    assert row["max_abs_diff"] < 1e-3 and row["argmax_agreement"] == 1.0 and row["wer"] == row["torch_wer"], row
    onnx = Engine.load(out / "model.onnx", num_threads=2)
    assert onnx.sample_rate == 8000
    for r16, r8 in pairs(corpus8k, n=2):  # a 16 kHz file through the ONNX engine: resampled to 8 kHz
        assert onnx.transcribe(r16.audio).text == engine8k.transcribe(r8.audio).text
    # sherpa's metadata (the same schema) says 8000 too; the sherpa export itself is the slow test below
    sherpa_md = build_metadata(engine8k.model, engine8k.tokenizer, engine8k.config, "sherpa-wenet", 7)
    assert sherpa_md["sample_rate"] == "8000" and sherpa_md["model_type"] == "wenet_ctc"


@pytest.mark.slow
def test_sherpa_onnx_runs_the_8k_model_with_8k_features(trained, corpus8k, tmp_path):
    pytest.importorskip("sherpa_onnx")
    from harken.export.onnx import export_onnx, read_metadata
    from harken.export.sherpa import model_rate
    from harken.export.verify import verify_artifacts

    _, path = trained
    _, c8 = corpus8k
    p = export_onnx(path, tmp_path / "sherpa" / "model.onnx", "sherpa-wenet")
    assert read_metadata(p)["sample_rate"] == 8000 and model_rate(p) == (8000, 80)
    rows = verify_artifacts(path, [p], c8 / "dev.jsonl", max_utts=4)
    (graph,) = [r for r in rows if r["kind"] == "sherpa-wenet"]
    assert graph["max_abs_diff"] < 1e-3 and graph["argmax_agreement"] == 1.0, graph
    (runtime,) = [r for r in rows if r["kind"] == "sherpa-onnx runtime"]
    assert "error" not in runtime, runtime  # sherpa ran it with its own front end at 8 kHz (and dither)
    assert abs(runtime["wer"] - runtime["torch_wer"]) <= 0.25, runtime


# ------------------------------------------------------------------------------------------ serve
def test_server_takes_uploads_at_any_rate_for_an_8k_model(engine8k, corpus8k, tmp_path):
    from harken.serve.config import load_serve_config
    from harken.serve.testing import LiveServer

    def wav(wave, sr):
        buf = io.BytesIO()
        sf.write(buf, wave, sr, format="WAV", subtype="PCM_16")
        return buf.getvalue()

    cfg = load_serve_config(None, [f"store.url={tmp_path / 'log.sqlite'}", "grpc_port=0"])
    (r16, r8), = pairs(corpus8k, n=1)
    w16 = load_audio(r16.audio)
    expect = engine8k.transcribe(r16.audio)
    with LiveServer(cfg, engine8k) as srv:
        for data in (open(r8.audio, "rb").read(), open(r16.audio, "rb").read(),
                     wav(resample(w16, 16000, 44100), 44100)):
            r = httpx.post(srv.url + "/v1/transcribe", files={"file": ("a.wav", data, "audio/wav")}, timeout=60)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["text"] == expect.text and abs(body["duration"] - expect.duration) < 0.02
        pcm = (np.clip(load_audio(r8.audio, sample_rate=8000), -1, 1) * 32767).astype("<i2").tobytes()
        r = httpx.post(srv.url + "/v1/transcribe?encoding=pcm_s16le&sample_rate=8000", content=pcm,
                       headers={"Content-Type": "audio/pcm"}, timeout=60)
        assert r.status_code == 200 and r.json()["text"] == engine8k.transcribe(r8.audio).text
        info = httpx.get(srv.url + "/v1/models", timeout=10).json()
        assert info["data"][0]["harken"]["sample_rate"] == 8000
