"""Recipe options of the encoder (issue 11): the depthwise-separable stems (``dwconv4``/``dwconv8``),
half-rate middle layers (``time_reduce_layers``) and intermediate CTC (``interctc_layers`` with
``model.interctc_weight``).  Each is off by default; these tests check geometry, padding, streaming,
ONNX export and the Engine, the loss, the refusals and the FLOP estimate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harken.config import ConfigError, load_config, to_dict
from harken.models import CtcModel, EncoderConfig, build_encoder, ctc_loss
from harken.models.subsampling import build_subsampling, subsampling_geometry


@pytest.fixture(autouse=True, scope="module")
def _two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(min(2, n))
    yield
    torch.set_num_threads(n)


def small(**kw) -> EncoderConfig:
    base = dict(input_dim=20, d_model=32, num_layers=4, num_heads=4, ff_dim=64, conv_kernel=5, dropout=0.0,
                subsampling_channels=8)
    base.update(kw)
    return EncoderConfig(**base)


def feats(lens, dim=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(lens), max(lens), dim, generator=g), torch.tensor(lens, dtype=torch.int64)


# ------------------------------------------------------------------------------------ geometry
@pytest.mark.parametrize("name, factor, right", [("conv2d4", 4, 6), ("dwconv4", 4, 6), ("dwconv8", 8, 14)])
def test_stem_geometry_is_what_the_convolutions_do(name, factor, right):
    cfg = small(subsampling=name)
    sub = build_subsampling(cfg).eval()
    assert (sub.factor, sub.right_context) == subsampling_geometry(cfg) == (factor, right)
    with torch.no_grad():
        for t in range(right + 1, 50):
            n = int(sub.output_lengths(torch.tensor([t]))[0])
            assert sub.project(torch.randn(1, t, 20)).shape[1] == n == sub.output_lengths(t)
            assert (n >= 1) == (t >= right + 1)
        for c in range(1, 6):  # a streaming chunk of C output frames
            assert sub.project(torch.randn(1, sub.input_frames(c), 20)).shape[1] == c
            assert sub.input_frames(c) == factor * (c - 1) + right + 1
    enc = build_encoder(cfg)
    assert (enc.subsampling_factor, enc.right_context) == (factor, right)


def test_defaults_build_the_same_model_as_before():
    """Default options add no parameter, and an old config without the new keys still loads."""
    enc = build_encoder(small())
    names = {n.split(".")[0] for n, _ in enc.named_parameters()}
    assert names == {"subsampling", "layers"}
    old = {k: v for k, v in small().to_dict().items() if k not in ("time_reduce_layers", "interctc_layers")}
    assert EncoderConfig.from_dict(old) == small()
    cfg = load_config(None, [])
    assert cfg.model.interctc_weight == 0.0 and cfg.model.encoder.subsampling == "conv2d4"
    assert cfg.model.encoder.time_reduce_layers == [] and cfg.model.encoder.interctc_layers == []


# ------------------------------------------------------------------------------------ padding
@pytest.mark.parametrize("variant", [
    dict(subsampling="dwconv4"),
    dict(subsampling="dwconv8"),
    dict(time_reduce_layers=[1, 3]),
    dict(time_reduce_layers=[0, 4], pos_enc="abs"),  # from the stem to the end
    dict(time_reduce_layers=[2, 4], conv_norm="batch_norm", subsampling="dwconv4"),
    dict(type="transformer", time_reduce_layers=[1, 2]),
])
def test_padded_batch_equals_each_item_alone(variant):
    torch.manual_seed(0)
    enc = build_encoder(small(**variant)).eval()
    if variant.get("conv_norm") == "batch_norm":  # non-trivial running stats
        for layer in enc.layers:
            layer.conv.bn.running_mean.uniform_(-1, 1)
            layer.conv.bn.running_var.uniform_(0.5, 2)
    lens = [125, 98, 61, 46]  # odd and even output lengths at both rates
    x, n = feats(lens)
    for i, t in enumerate(lens):
        x[i, t:] = 100.0 * (-1) ** i  # garbage in the padding
    with torch.no_grad():
        out, out_lens = enc(x, n)
        for i, t in enumerate(lens):
            alone, alone_lens = enc(x[i:i + 1, :t], n[i:i + 1])
            m = int(alone_lens[0])
            assert int(out_lens[i]) == m == alone.shape[1]
            assert (out[i, :m] - alone[0]).abs().max() < 1e-4, (variant, i)


def test_time_reduction_runs_the_middle_layers_at_half_rate():
    enc = build_encoder(small(time_reduce_layers=[1, 3])).eval()
    seen = []
    for layer in enc.layers:
        layer.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1]))
    x, n = feats([101])
    with torch.no_grad():
        out, lens = enc(x, n)
    t = int(lens[0])
    assert out.shape[1] == t == 24 and seen == [t, (t + 1) // 2, (t + 1) // 2, t]


# ------------------------------------------------------------------------------------ intermediate CTC
def test_intermediate_outputs_only_when_asked():
    torch.manual_seed(0)
    model = CtcModel(small(interctc_layers=[1, 3], time_reduce_layers=[2, 4]), vocab_size=11).eval()
    x, n = feats([90, 64])
    with torch.no_grad():
        lp, lens = model(x, n)
        lp2, lens2, inter = model(x, n, intermediate=True)
    assert torch.equal(lp, lp2) and torch.equal(lens, lens2)
    assert len(inter) == 2 and all(k.shape == lp.shape for k in inter)
    assert all(torch.allclose(k.exp().sum(-1), torch.ones(lp.shape[:2])) for k in inter)
    assert not torch.allclose(inter[0], lp)
    # the first intermediate output is layer 1 through the shared head, and nothing else
    seen = []
    model.encoder.layers[0].register_forward_hook(lambda m, a, o: seen.append(o))
    with torch.no_grad():
        _, _, inter = model(x, n, intermediate=True)
        ref = torch.log_softmax(model.output(seen[0]).float(), -1)
    assert torch.allclose(inter[0], ref)


def test_compute_loss_adds_the_intermediate_term(tiny_corpus, tmp_path):
    """compute_loss (the trainer's) gives (1-w)*CTC(final) + w*mean CTC(intermediate) per utterance,
    in a model trained a few steps with all three options, whose checkpoint the Engine runs."""
    from harken.data.dataset import make_loader
    from harken.data.manifest import read_manifest, write_manifest
    from harken.runtime import Engine
    from harken.train.trainer import compute_loss, train

    corpus, _ = tiny_corpus
    man = tmp_path / "train8.jsonl"
    write_manifest(man, read_manifest(corpus / "train.jsonl")[:8])
    w = 0.3
    common = ["model.encoder.d_model=32", "model.encoder.num_layers=4", "model.encoder.num_heads=2",
              "model.encoder.ff_dim=64", "model.encoder.conv_kernel=7", "model.encoder.subsampling_channels=8",
              "model.encoder.dropout=0.0", "model.specaug.num_time_masks=0", "model.specaug.num_freq_masks=0",
              "data.num_workers=0", "data.max_duration=20", "train.progress=false", "train.tensorboard=false",
              "train.average_last=0", "data.augment.speed_factors=[]", "data.augment.noise_prob=0",
              "data.augment.volume_prob=0", f"data.train=[{man}]", "data.dev=null",
              "model.encoder.subsampling=dwconv4", "model.encoder.time_reduce_layers=[1,3]",
              "model.encoder.interctc_layers=[2]", f"model.interctc_weight={w}"]
    run = train(load_config(None, common + [f"train.exp_dir={tmp_path}", "train.max_steps=3",
                                            "train.checkpoint_every=3"]))
    assert run.state.step == 3
    run.sampler.set_epoch(run.sampler.epoch + 1)  # a fresh epoch of the run's own batches
    batch = next(iter(make_loader(run.dataset, run.sampler, 0)))
    run.model.train()
    torch.manual_seed(1)
    per_utt, out_lens, frames = compute_loss(run, batch)
    assert per_utt.shape == (len(batch.ids),) and frames == int(out_lens.sum())
    torch.manual_seed(1)
    with torch.no_grad():
        lp, lens, inter = run.core(batch.wave, batch.wave_lens, intermediate=True)

        def ctc(x):
            return ctc_loss(x, lens, batch.targets, batch.target_lens, reduction="none")

        expect = (1 - w) * ctc(lp) + w * ctc(inter[0])
    assert torch.equal(lens, out_lens)
    assert torch.allclose(per_utt.detach(), expect, rtol=1e-5)
    assert not torch.allclose(per_utt.detach(), ctc(lp), rtol=1e-3)  # the intermediate term counts

    # the checkpoint loads into the Engine, whose plain forward has no intermediate outputs
    eng = Engine.load(tmp_path / "checkpoints" / "step-00000003.pt")
    assert eng.model.encoder.cfg.time_reduce_layers == [1, 3] and eng.model.subsampling_factor == 4
    wave = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    got = eng.log_probs([wave])[0]
    with torch.no_grad():
        ref, _, _ = eng.model(torch.from_numpy(wave)[None], torch.tensor([len(wave)]), intermediate=True)
    assert got.shape == ref[0].shape and torch.allclose(got, ref[0], atol=1e-5)


# ------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("overrides, expect", [
    (["model.encoder.time_reduce_layers=[2,5]", "model.encoder.causal=true"], "cannot stream"),
    (["model.encoder.time_reduce_layers=[2,5]", "model.encoder.chunk_size=16", "model.encoder.causal=true"],
     "cannot stream"),
    (["model.encoder.time_reduce_layers=[2,5]", "model.encoder.dynamic_chunk=true"], "cannot stream"),
    (["model.encoder.time_reduce_layers=[4,2]"], "must be [start, end] with 0 <= start < end <= num_layers=6"),
    (["model.encoder.time_reduce_layers=[2,7]"], "must be [start, end]"),
    (["model.encoder.time_reduce_layers=[3]"], "must be [start, end]"),
    (["model.encoder.time_reduce_layers=[-1,2]"], "time_reduce_layers[0]: must be >= 0"),
    (["model.encoder.interctc_layers=[6]"], "1..5 for num_layers=6"),
    (["model.encoder.interctc_layers=[0]"], "interctc_layers[0]: must be >= 1"),
    (["model.interctc_weight=0.3"], "needs model.encoder.interctc_layers"),
    (["model.interctc_weight=1.0", "model.encoder.interctc_layers=[3]"], "must be in [0,1)"),
    (["model.encoder.subsampling=dwconv16"], "choose one of 'conv2d4', 'dwconv4', 'dwconv8'"),
    (["model.encoder.subsampling=dwconv8", "model.fbank.num_mel_bins=12"],
     "too few for dwconv8 subsampling (needs at least 15)"),
    (["model.encoder.type=whisper", "model.encoder.interctc_layers=[2]"], "need a conformer or transformer"),
])
def test_bad_combinations_are_one_line_config_errors(overrides, expect):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    msg = str(e.value)
    assert "\n" not in msg and expect in msg, msg


def test_time_reduced_model_refuses_to_stream():
    from harken.runtime.streaming import StreamingDecoder
    from harken.text.tokenizer import CharTokenizer
    from harken.train.trainer import build_model

    cfg = load_config(None, ["model.encoder.type=transformer", "model.encoder.d_model=32", "model.encoder.num_layers=2",
                             "model.encoder.num_heads=2", "model.encoder.ff_dim=64",
                             "model.encoder.time_reduce_layers=[1,2]"])
    tok = CharTokenizer.build(["ab c"])
    model = build_model(cfg, tok.vocab_size).eval()
    with pytest.raises(ValueError, match="cannot stream"):
        StreamingDecoder(model, tok, chunk_size=4)  # its first session asks for the caches
    with pytest.raises(ValueError, match="chunked attention"):
        model.encoder(torch.randn(1, 50, 80), torch.tensor([50]), chunk_size=4)


# ------------------------------------------------------------------------------------ streaming (dwconv8)
def test_dwconv8_forward_chunk_equals_masked_forward():
    torch.manual_seed(0)
    enc = build_encoder(small(subsampling="dwconv8", causal=True, num_layers=2)).eval()
    T, chunk, left = 201, 3, 2
    x = torch.randn(1, T, 20)
    win, hop = enc.subsampling.input_frames(chunk), enc.subsampling_factor * chunk
    assert (win, hop) == (8 * chunk + 7, 8 * chunk)
    with torch.no_grad():
        full, _ = enc(x, torch.tensor([T]), chunk_size=chunk, left_chunks=left)
        att, cnn = enc.init_cache()
        outs, off, s = [], 0, 0
        while s + enc.right_context + 1 <= T:
            o, att, cnn = enc.forward_chunk(x[:, s: s + win], off, att, cnn, required_cache_size=left * chunk)
            outs.append(o)
            off += o.size(1)
            s += hop
    st = torch.cat(outs, 1)
    assert st.shape == full.shape
    assert (st - full).abs().max() < 1e-4


@pytest.fixture(scope="module")
def dwconv8_stream(tiny_corpus):
    from harken.data.manifest import read_manifest
    from harken.text.tokenizer import CharTokenizer
    from harken.train.trainer import build_model

    corpus, _ = tiny_corpus
    recs = read_manifest(corpus / "train.jsonl")
    tok = CharTokenizer.build([r.text.lower() for r in recs])
    cfg = load_config(None, ["model.encoder.d_model=32", "model.encoder.num_layers=2", "model.encoder.num_heads=2",
                             "model.encoder.ff_dim=64", "model.encoder.conv_kernel=5",
                             "model.encoder.subsampling_channels=8", "model.encoder.causal=true",
                             "model.encoder.subsampling=dwconv8"])
    torch.manual_seed(0)
    model = build_model(cfg, tok.vocab_size).eval()
    with torch.no_grad():
        model.output.bias[0] -= 2.0
    from harken.audio import load_audio

    return model, tok, [load_audio(r.audio) for r in recs[:1]]


def test_dwconv8_streaming_decoder_and_onnx_equal_offline_chunked(dwconv8_stream, tmp_path):
    pytest.importorskip("onnxruntime")
    from harken.runtime.streaming import StreamingDecoder, offline_chunked_log_probs
    from harken.runtime.streaming_onnx import export_streaming_onnx, load_onnx_streaming

    model, tok, waves = dwconv8_stream
    chunk, left = 4, 2
    path = export_streaming_onnx(model, tmp_path / "s.onnx", chunk_size=chunk, left_chunks=left, tokenizer=tok)
    dec_t = StreamingDecoder(model, tok, chunk_size=chunk, left_chunks=left)
    dec_o = load_onnx_streaming(path, num_threads=1)
    assert dec_t.model.geometry.subsampling == 8 and dec_t.model.geometry.right_context == 14
    assert dec_o.model.geometry == dec_t.model.geometry  # read back from the ONNX metadata
    rng = np.random.default_rng(1)
    for w in waves:
        ref = offline_chunked_log_probs(model, w, chunk, left)
        for dec in (dec_t, dec_o):
            dec.reset()
            i = 0
            while i < len(w):
                k = int(rng.integers(1, 6000))
                dec.accept_waveform(w[i: i + k])
                i += k
            dec.finish()
            lp = dec.all_log_probs()
            assert lp.shape == ref.shape
            assert (lp - ref).abs().max() < 1e-3


# ------------------------------------------------------------------------------------ ONNX export, Engine
def _checkpoint(path, *extra):
    from harken.text.tokenizer import CharTokenizer
    from harken.train.checkpoint import atomic_save
    from harken.train.trainer import build_model

    cfg = load_config(None, ["model.encoder.d_model=32", "model.encoder.num_layers=3", "model.encoder.num_heads=2",
                             "model.encoder.ff_dim=64", "model.encoder.conv_kernel=5",
                             "model.encoder.subsampling_channels=8", *extra])
    tok = CharTokenizer.build(["abc def"])
    torch.manual_seed(0)
    m = build_model(cfg, tok.vocab_size)
    with torch.no_grad():
        m.output.bias[0] -= 2.0
    atomic_save({"config": to_dict(cfg), "model": m.state_dict(), "tokenizer": tok.to_dict()}, path)
    return path


@pytest.mark.slow
def test_onnx_export_and_engine_agree_with_torch(tmp_path):
    """One export of a model with every new piece: the dwconv8 stem, half-rate layers and
    intermediate CTC (which the exported forward never runs).  Slow: a dynamo export takes 15-45 s
    on a 2-core host (the dwconv8 ONNX graph is also built, fast, by the streaming test above)."""
    ort = pytest.importorskip("onnxruntime")
    from harken.data.dataset import pad_waves
    from harken.export.onnx import export_onnx, read_metadata
    from harken.runtime import Engine

    ck = _checkpoint(tmp_path / "m.pt", "model.encoder.subsampling=dwconv8", "model.encoder.time_reduce_layers=[1,3]",
                     "model.encoder.interctc_layers=[1]", "model.interctc_weight=0.3")
    onnx_path = export_onnx(ck, tmp_path / "m.onnx", "wave")
    ref = Engine.load(ck)
    meta = read_metadata(onnx_path)
    assert meta["subsampling_factor"] == ref.model.subsampling_factor == 8
    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (24000, 17000, 9001)]
    w, lens = pad_waves(waves)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        lp_t, lens_t = ref.model(w, lens)
    lp_o, lens_o = sess.run(None, {"waveform": w.numpy(), "waveform_lens": lens.numpy()})
    assert lens_o.tolist() == lens_t.tolist()
    for j, n in enumerate(lens_t.tolist()):
        assert np.abs(lp_o[j, :n] - lp_t[j, :n].numpy()).max() < 1e-3
    eng = Engine.load(onnx_path)
    for a, b in zip(eng.log_probs(waves), ref.log_probs(waves)):
        assert a.shape == b.shape and float((a - b).abs().max()) < 1e-3


# ------------------------------------------------------------------------------------ FLOPs
def test_flops_follow_the_stem_and_the_time_reduction():
    from torch.utils.flop_counter import FlopCounterMode

    base = dict(input_dim=80, d_model=144, num_layers=6, num_heads=4, ff_dim=576, conv_kernel=15)
    est = {}
    for name, kw in [("conv2d4", {}), ("dwconv4", dict(subsampling="dwconv4")),
                     ("dwconv8", dict(subsampling="dwconv8")), ("reduce", dict(time_reduce_layers=[2, 5]))]:
        model = CtcModel(EncoderConfig(**base, **kw), 40).eval()
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model.encode_features(torch.randn(1, 200, 80), torch.tensor([200]))
        est[name] = model.flops(200)
        # matmuls and convolutions as counted by torch, within 10% (element-wise ops are in neither)
        assert abs(est[name] / fc.get_total_flops() - 1) < 0.1, (name, est[name], fc.get_total_flops())
    assert est["dwconv8"] < est["reduce"] < est["conv2d4"] and est["dwconv4"] < est["conv2d4"]
