"""The inference Engine: torch and onnxruntime backends agree, warm-up at load, batching, lazy
segments, and the Recognizer layered on top."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch

from harken.runtime.engine import Engine, VocabTokenizer

TINY = ["model.encoder.d_model=48", "model.encoder.num_layers=2", "model.encoder.num_heads=2",
        "model.encoder.ff_dim=96", "model.encoder.conv_kernel=7", "model.encoder.subsampling_channels=16"]


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_corpus, tmp_path_factory):
    """An untrained tiny model saved as a harken checkpoint (output bias pushed off blank so the
    greedy text is not empty)."""
    from harken.config import load_config, to_dict
    from harken.data.manifest import read_manifest
    from harken.text.tokenizer import CharTokenizer
    from harken.train.checkpoint import atomic_save
    from harken.train.trainer import build_model

    corpus, _ = tiny_corpus
    recs = read_manifest(corpus / "test_seen.jsonl")
    tok = CharTokenizer.build([r.text.lower() for r in read_manifest(corpus / "train.jsonl")])
    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    model = build_model(cfg, tok.vocab_size)
    with torch.no_grad():
        model.output.bias[0] -= 2.0
    out = tmp_path_factory.mktemp("engine")
    path = out / "model.pt"
    atomic_save({"config": to_dict(cfg), "model": model.state_dict(), "tokenizer": tok.to_dict()}, path)
    return path, recs


@pytest.fixture(scope="module")
def tiny_onnx(tiny_ckpt):
    pytest.importorskip("onnxruntime")
    path, _ = tiny_ckpt
    out = path.with_suffix(".onnx")
    try:
        from harken.export.onnx import export_onnx
    except ImportError:  # the exporter is not there yet: a minimal wave export with the same metadata
        return _export_wave(path, out)
    export_onnx(path, out, variant="wave", check=False)
    return out


def _export_wave(ckpt_path, out):
    import dataclasses

    import onnx

    eng = Engine.load(ckpt_path, warmup=False)
    model, cfg = eng.model, eng.config
    s = torch.export.Dim("s", min=1000, max=16000 * 120)
    torch.onnx.export(model, (torch.randn(2, 16000), torch.tensor([16000, 12000])), str(out), dynamo=True,
                      input_names=["waveform", "lengths"], output_names=["log_probs", "out_lens"],
                      dynamic_shapes=({0: torch.export.Dim("b", max=64), 1: s}, {0: torch.export.Dim("b", max=64)}))
    proto = onnx.load(str(out))
    md = {"sample_rate": "16000", "feature_config": json.dumps(dataclasses.asdict(cfg.model.fbank)),
          "vocabulary": json.dumps(eng.tokenizer.tokens), "subsampling_factor": "4", "model_type": "ctc",
          "encoder_type": "conformer", "frame_shift": "0.01", "blank_id": "0", "streaming_chunk": "0"}
    for k, v in md.items():
        p = proto.metadata_props.add()
        p.key, p.value = k, v
    onnx.save(proto, str(out))
    return out


def test_torch_and_onnx_backends_agree(tiny_ckpt, tiny_onnx):
    path, recs = tiny_ckpt
    et = Engine.load(path, num_threads=1)
    eo = Engine.load(tiny_onnx, num_threads=1)
    assert et.backend_name == "torch" and eo.backend_name == "onnx"
    assert eo.model is None and isinstance(eo.tokenizer.tokens, list)
    files = [r.audio for r in recs[:4]]
    from harken.audio import load_audio

    waves = [load_audio(f) for f in files]
    lt, lo = et.log_probs(waves), eo.log_probs(waves)  # one padded batch each
    for a, b in zip(lt, lo):
        assert a.shape == b.shape
        assert (a - b).abs().max() < 1e-3
    tt, to = et.transcribe_batch(files), eo.transcribe_batch(files)
    assert any(t.text for t in tt)
    assert [t.text for t in tt] == [t.text for t in to]
    assert [t.source for t in to] == [str(f) for f in files]
    for a, b in zip(tt, to):
        assert abs(a.confidence - b.confidence) < 1e-3
        assert [w.word for w in a.words] == [w.word for w in b.words]
        assert all(abs(x.start - y.start) < 1e-3 for x, y in zip(a.words, b.words))
    # batching does not change results
    assert et.transcribe(files[1]).text == tt[1].text


def test_warmup_at_load(tiny_ckpt, monkeypatch):
    path, recs = tiny_ckpt
    calls = []
    orig = Engine._log_probs

    def spy(self, waves):
        calls.append([len(w) for w in waves])
        return orig(self, waves)

    monkeypatch.setattr(Engine, "_log_probs", spy)
    eng = Engine.load(path)
    assert eng.warmup_calls == 1 and len(calls) == 1  # one dummy inference, before any request
    eng.transcribe(recs[0].audio)
    assert len(calls) == 2
    assert Engine.load(path, warmup=False).warmup_calls == 0


def test_segments_are_lazy(tiny_ckpt):
    from harken.audio import load_audio

    path, recs = tiny_ckpt
    eng = Engine.load(path, warmup=False)
    sil = np.zeros(16000, np.float32)
    wave = np.concatenate([sil] + [x for r in recs[:3] for x in (load_audio(r.audio), sil)])
    gen = eng.transcribe_segments(wave, batch_size=1)
    assert inspect.isgenerator(gen)
    first = next(gen)  # decoding happens on demand
    rest = list(gen)
    segs = [first] + rest
    assert [s.id for s in segs] == list(range(len(segs))) and len(segs) >= 2
    assert all(a.end <= b.start for a, b in zip(segs, segs[1:]))


def test_recognizer_is_an_engine(tiny_ckpt):
    from harken.recognizer import Recognizer

    path, recs = tiny_ckpt
    rec = Recognizer.load(path)
    assert isinstance(rec, Engine) and rec.warmup_calls == 1
    assert rec.transcribe(recs[0].audio).text == Engine.load(path, warmup=False).transcribe(recs[0].audio).text
    r2 = Recognizer(rec.model, rec.tokenizer, rec.config)
    assert r2.transcribe(recs[0].audio).text == rec.transcribe(recs[0].audio).text
    from harken.decode import DecodeConfig

    r3 = Recognizer(rec.model, rec.tokenizer, rec.config, decode_cfg=DecodeConfig(method="beam", beam_size=4))
    assert isinstance(r3.transcribe(recs[0].audio).text, str)


def test_bad_inputs_have_clear_errors(tiny_ckpt, tmp_path):
    path, _ = tiny_ckpt
    with pytest.raises(FileNotFoundError, match="no such model"):
        Engine.load(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="backend"):
        Engine.load(path, backend="tensorrt")
    with pytest.raises(ValueError, match="onnx"):
        Engine.load(path, backend="onnx")


def test_vocab_tokenizer():
    tok = VocabTokenizer(["<blk>", "<unk>", "\u2581", "a", "b"])
    assert tok.decode([3, 2, 4, 0, 1]) == "a b"
    assert tok.encode("ab a") == [3, 4, 2, 3]
    bpe = VocabTokenizer(["<blk>", "<unk>", "\u2581ab", "\u2581a", "b", "\u2581"])
    assert bpe.decode(bpe.encode("ab ab b")) == "ab ab b"


def test_engine_streaming(tiny_ckpt):
    from harken.audio import load_audio

    path, recs = tiny_ckpt
    eng = Engine.load(path, warmup=False)
    with pytest.raises(ValueError, match="causal"):  # this model has a non-causal conv
        s = eng.stream(chunk_size=4)
        s.accept_waveform(load_audio(recs[0].audio))
