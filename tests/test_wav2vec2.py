"""wav2vec2: a pretrained Hugging Face encoder fine-tuned with harken's CTC head, and transcription
with an already fine-tuned Wav2Vec2ForCTC directory.  Tiny randomly initialised models saved to
temp dirs stand in for real checkpoints; nothing is downloaded."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    Wav2Vec2Config,
    Wav2Vec2CTCTokenizer,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForCTC,
    Wav2Vec2Model,
    Wav2Vec2Processor,
)

from harken.audio import load_audio  # noqa: E402
from harken.data.dataset import AsrDataset  # noqa: E402
from harken.data.manifest import read_manifest  # noqa: E402
from harken.evaluate import decode_records  # noqa: E402
from harken.models.ctc import ctc_loss  # noqa: E402
from harken.models.hf_wav2vec2 import HFWav2Vec2Recognizer, is_hf_ctc_dir  # noqa: E402
from harken.models.registry import EncoderConfig  # noqa: E402
from harken.models.wav2vec2 import build_wav2vec2_ctc, param_groups  # noqa: E402
from harken.text.normalize import normalize_text  # noqa: E402
from harken.text.tokenizer import CharTokenizer  # noqa: E402

torch.set_num_threads(2)

# 80 samples (5 ms) per frame instead of 320 keeps the tiny model's conv stack cheap
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            conv_dim=(32, 32, 32), conv_kernel=(10, 4, 4), conv_stride=(5, 4, 4), num_feat_extract_layers=3,
            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, mask_time_length=4)


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    """A tiny randomly initialised 'pretrained' Wav2Vec2Model with a feature-extractor config."""
    d = tmp_path_factory.mktemp("w2v_pretrained")
    torch.manual_seed(0)
    Wav2Vec2Model(Wav2Vec2Config(**TINY)).save_pretrained(d)
    Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=False).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def records(tiny_corpus):
    corpus, _ = tiny_corpus
    return sorted(read_manifest(corpus / "train.jsonl"), key=lambda r: r.duration)[:4]


def w2v_cfg(d, **kw) -> EncoderConfig:
    return EncoderConfig(type="wav2vec2", pretrained=str(d), dropout=0.0, **kw)


def test_encoder_matches_hf_and_ignores_padding(pretrained_dir, records):
    cfg = w2v_cfg(pretrained_dir)
    model = build_wav2vec2_ctc(cfg, vocab_size=11).eval()
    enc = model.encoder
    assert cfg.d_model == 144 and model.encoder_cfg.d_model == 32  # taken from the checkpoint
    assert model.output.in_features == 32 and model.frontend is None
    assert enc.subsampling_factor == 80 and enc.frame_seconds == pytest.approx(0.005)
    waves = [load_audio(r.audio) for r in records[:2]]
    hf = Wav2Vec2Model.from_pretrained(str(pretrained_dir), local_files_only=True).eval()
    fe = Wav2Vec2FeatureExtractor.from_pretrained(str(pretrained_dir), local_files_only=True)
    with torch.no_grad():
        singles = []
        for w in waves:  # one utterance: exactly HF's feature extractor + model
            ref = hf(fe(w, sampling_rate=16000, return_tensors="pt").input_values).last_hidden_state[0]
            h, lens = enc(torch.from_numpy(w)[None], torch.tensor([len(w)]))
            assert h.shape[1] == int(lens[0]) == ref.shape[0]
            torch.testing.assert_close(h[0], ref, atol=2e-5, rtol=1e-4)
            singles.append(h[0])
        # padded batch: the same frames as alone (attention mask + masked GroupNorm statistics)
        lens = torch.tensor([len(w) for w in waves])
        x = torch.zeros(2, int(lens.max()))
        for i, w in enumerate(waves):
            x[i, : len(w)] = torch.from_numpy(w)
        h, out_lens = enc(x, lens)
        assert out_lens.tolist() == [s.shape[0] for s in singles] == enc.output_lengths(lens).tolist()
        for i, s in enumerate(singles):
            torch.testing.assert_close(h[i, : out_lens[i]], s, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="pretrained"):
        build_wav2vec2_ctc(EncoderConfig(type="wav2vec2"), 11)


def test_checkpoint_feature_extractor_settings_are_honoured(pretrained_dir, tmp_path):
    import shutil

    d = tmp_path / "nonorm"
    shutil.copytree(pretrained_dir, d)
    (d / "preprocessor_config.json").write_text(json.dumps({"do_normalize": False, "sampling_rate": 16000}))
    assert build_wav2vec2_ctc(w2v_cfg(d), 5).encoder.normalize is False
    (d / "preprocessor_config.json").unlink()  # transformers 5 layout: processor_config.json
    (d / "processor_config.json").write_text(json.dumps({"feature_extractor": {"sampling_rate": 8000}}))
    with pytest.raises(ValueError, match="8000 Hz"):
        build_wav2vec2_ctc(w2v_cfg(d), 5)
    (d / "processor_config.json").unlink()
    assert build_wav2vec2_ctc(w2v_cfg(d), 5).encoder.normalize is True  # nothing said: normalise


def test_layerdrop_and_time_masking_only_in_training(pretrained_dir):
    model = build_wav2vec2_ctc(w2v_cfg(pretrained_dir, layerdrop=0.5, mask_time_prob=0.3), 11)
    enc = model.encoder
    assert enc.model.config.layerdrop == 0.5
    calls = [0, 0]
    for i, layer in enumerate(enc.model.encoder.layers):
        layer.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    x, lens = torch.randn(2, 4000) * 0.1, torch.tensor([4000, 2500])
    torch.manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(12):
            model(x, lens)
    assert min(calls) < 12 and sum(calls) > 0  # layers skipped at random while training
    mask = enc._time_mask(2, 49, enc.output_lengths(lens))
    assert mask is not None and mask[0].any() and mask[1].any()
    assert not mask[1, int(enc.output_lengths(lens)[1]):].any()  # never inside padding
    assert enc._time_mask(1, 3, torch.tensor([3])) is None  # shorter than one span: not masked
    model(torch.randn(1, 300), torch.tensor([300]))  # a 3-frame utterance trains without error
    model.eval()
    calls[:] = [0, 0]
    with torch.no_grad():
        a, _ = model(x, lens)
        b, _ = model(x, lens)
    assert calls == [2, 2] and torch.equal(a, b)  # eval: every layer, deterministic
    assert enc._time_mask(2, 49, enc.output_lengths(lens)) is None


def test_finetune_ctc_on_synthesized_speech(pretrained_dir, records):
    texts = [normalize_text(r.text) for r in records]
    tok = CharTokenizer.build(texts)
    torch.manual_seed(0)
    np.random.seed(0)  # wav2vec2's time-mask spans are drawn with numpy
    model = build_wav2vec2_ctc(w2v_cfg(pretrained_dir, layerdrop=0.1), tok.vocab_size)
    groups = param_groups(model, base_lr=5e-3, weight_decay=0.01)
    by_name = {g["name"]: g for g in groups}
    assert by_name["encoder"]["lr"] == pytest.approx(5e-4) and by_name["head"]["lr"] == 5e-3
    assert by_name["head_no_decay"]["weight_decay"] == 0.0
    frozen = dict(model.encoder.model.feature_extractor.named_parameters())
    assert frozen and not any(p.requires_grad for p in frozen.values())
    grouped = {id(p) for g in groups for p in g["params"]}
    assert all(id(p) not in grouped for p in frozen.values())
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    opt = torch.optim.AdamW(groups, lr=5e-3)
    batch = AsrDataset(records, tok, normalize=normalize_text)[(0, [0, 1])]
    assert batch.wave.dim() == 2  # the raw waveform goes straight into the encoder
    model.train()
    losses = []
    for _ in range(15):
        log_probs, out_lens = model(batch.wave, batch.wave_lens)
        assert bool((out_lens >= batch.target_lens).all())
        loss = ctc_loss(log_probs, out_lens, batch.targets, batch.target_lens, reduction="mean")
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.75 * losses[0], losses  # ~0.59 on this seed

    after = dict(model.named_parameters())
    for n in before:
        if n.startswith("encoder.model.feature_extractor."):
            assert torch.equal(before[n], after[n]), n  # frozen
        else:
            assert not torch.equal(before[n], after[n]), n  # everything else trained
    from harken.config import ExperimentConfig
    from harken.evaluate import as_engine

    cfg = ExperimentConfig()
    cfg.model.encoder = model.encoder_cfg
    hyps = decode_records(as_engine(model.eval(), tok, cfg), records)
    assert len(hyps) == len(records) and all(isinstance(h, str) for h in hyps)


# ------------------------------------------------------------------------------- inference
VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|"] + list("abcdefghijklmnopqrstuvwxyz'")


def make_ctc_dir(d, layer_norm: bool):
    vocab = d / "vocab_src.json"
    vocab.write_text(json.dumps({c: i for i, c in enumerate(VOCAB)}))
    tok = Wav2Vec2CTCTokenizer(str(vocab), unk_token="<unk>", pad_token="<pad>", word_delimiter_token="|")
    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                  return_attention_mask=layer_norm)
    proc = Wav2Vec2Processor(feature_extractor=fe, tokenizer=tok)
    proc.save_pretrained(d)
    torch.manual_seed(3)
    cfg = Wav2Vec2Config(**TINY, vocab_size=len(VOCAB), pad_token_id=0,
                         feat_extract_norm="layer" if layer_norm else "group", do_stable_layer_norm=layer_norm)
    model = Wav2Vec2ForCTC(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # decisive, varied argmax for a random model
    model.save_pretrained(d)
    return proc, model.eval()


def test_hf_recognizer_equals_direct_transformers(tmp_path, tiny_corpus):
    corpus, _ = tiny_corpus
    files = [r.audio for r in read_manifest(corpus / "test_unseen.jsonl")[:3]]
    proc, model = make_ctc_dir(tmp_path, layer_norm=False)
    assert is_hf_ctc_dir(tmp_path)
    rec = HFWav2Vec2Recognizer.load(tmp_path)
    assert not rec.batched and rec.frame_seconds == pytest.approx(0.005)
    direct = []
    with torch.no_grad():
        for f in files:
            inp = proc(load_audio(f), sampling_rate=16000, return_tensors="pt")
            ids = model(inp.input_values).logits.argmax(-1)
            direct.append(proc.batch_decode(ids)[0])
    assert any(len(t.split()) > 1 for t in direct)  # non-trivial strings with words
    singles = [rec.transcribe(f) for f in files]
    assert [t.text for t in singles] == direct
    batch = rec.transcribe_batch(files[::-1])
    assert [t.text for t in batch] == direct[::-1] and [t.source for t in batch] == files[::-1]
    for t in singles:
        assert [w.word for w in t.words] == t.text.split()
        assert all(0 <= w.start < w.end <= t.duration + 0.01 for w in t.words)
        assert all(a.end <= b.start for a, b in zip(t.words, t.words[1:]))
        assert 0 < t.confidence <= 1
    assert rec.transcribe(load_audio(files[0])).text == direct[0]


def test_hf_recognizer_batches_layer_norm_models(tmp_path, tiny_corpus):
    corpus, _ = tiny_corpus
    files = [r.audio for r in read_manifest(corpus / "test_unseen.jsonl")[:3]]
    proc, model = make_ctc_dir(tmp_path, layer_norm=True)
    rec = HFWav2Vec2Recognizer.load(tmp_path)
    assert rec.batched
    waves = [load_audio(f) for f in files]
    logits, lens = rec.logits(waves)  # one padded batch
    for i, w in enumerate(waves):
        with torch.no_grad():
            ref = model(proc(w, sampling_rate=16000, return_tensors="pt").input_values).logits[0]
        assert int(lens[i]) == ref.shape[0]
        torch.testing.assert_close(logits[i, : lens[i]], ref, atol=1e-4, rtol=1e-4)
    out = rec.transcribe_batch(files)
    assert [t.source for t in out] == files
    assert [t.text for t in out] == [rec.transcribe(f).text for f in files]


def test_built_through_the_registry_and_exported_to_torchscript(pretrained_dir, tmp_path):
    """build_model asks the encoder class: no fbank frontend, d_model from the checkpoint, the
    encoder's own optimizer groups; and the model traces into a TorchScript file that matches."""
    import dataclasses

    from harken.config import ExperimentConfig
    from harken.export.torchscript import WaveCtcCore, export_model_torchscript
    from harken.models.build import build_model, find_unused_parameters
    from harken.models.build import param_groups as model_param_groups
    from harken.runtime.backends_compiled import TorchScriptBackend

    cfg = ExperimentConfig()
    cfg.model.encoder = dataclasses.replace(w2v_cfg(pretrained_dir), d_model=144)
    model = build_model(cfg, 11).eval()
    assert model.frontend is None and model.takes_waveform
    assert model.encoder_cfg.d_model == 32 == model.output.in_features and cfg.model.encoder.d_model == 144
    assert find_unused_parameters(model)
    got = [(g["name"], g["lr"], len(g["params"])) for g in model_param_groups(model, 1e-3, 0.01)]
    assert got == [(g["name"], g["lr"], len(g["params"])) for g in param_groups(model, 1e-3, 0.01)]
    tok = CharTokenizer.build(["abc def ghi"])
    path = export_model_torchscript(model, tok, cfg, tmp_path / "w2v.ts")  # checks other sizes itself
    be = TorchScriptBackend(path)
    assert be.metadata["encoder_type"] == "wav2vec2"
    g = torch.Generator().manual_seed(0)
    wave = torch.randn(2, 24000, generator=g) * 0.1
    lens = torch.tensor([24000, 9000])
    lp, n = be(wave, lens)
    with torch.no_grad():
        ref, ref_n = WaveCtcCore(model)(wave, lens)
    assert n.tolist() == ref_n.tolist()
    for i, k in enumerate(n.tolist()):
        assert float((lp[i, :k] - ref[i, :k]).abs().max()) < 1e-4
