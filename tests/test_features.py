"""Tests for harken.features: Kaldi parity (vs kaldi-native-fbank), batching, CMVN, SpecAugment, ONNX."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harken.features import (  # noqa: E402
    CmvnAccumulator,
    Fbank,
    FbankConfig,
    Frontend,
    GlobalCMVN,
    SpecAugment,
    SpecAugmentConfig,
    compute_cmvn,
)

SR = 16000
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tolerances (natural-log domain). Both implementations are float32: in bins far below a frame's peak
# bin (> 60 dB) FFT round-off dominates, and there knf itself is ~3e-3 away from a float64 reference.
TOL_MAIN = 1e-3  # bins within 60 dB of the frame's strongest mel bin (measured ~2e-4)
TOL_ALL = 5e-3  # every bin (measured ~2e-3)
TOL_MEAN = 5e-5  # mean over all bins (measured ~8e-6)


def _signal(seconds: float = 2.0, seed: int = 0, extra: int = 123) -> np.ndarray:
    """Chirp + harmonic series + noise, peak 0.8: speech-like spectral dynamics."""
    rng = np.random.default_rng(seed)
    n = int(SR * seconds) + extra
    t = np.arange(n) / SR
    x = 0.3 * np.sin(2 * np.pi * (100 * t + 1000 * t * t))
    f0 = 150 + 30 * np.sin(2 * np.pi * 2 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    x += sum(0.1 / k * np.sin(k * phase) for k in range(1, 12))
    x *= 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2  # syllable-like envelope
    x += 0.01 * rng.standard_normal(n)
    return (x / np.abs(x).max() * 0.8).astype(np.float32)


def _knf(x: np.ndarray, snip_edges: bool, window: str, num_bins: int = 80) -> np.ndarray:
    knf = pytest.importorskip("kaldi_native_fbank")
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.snip_edges = snip_edges
    opts.frame_opts.window_type = window
    opts.mel_opts.num_bins = num_bins
    opts.mel_opts.low_freq = 20.0
    opts.mel_opts.high_freq = 0.0
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(SR, (x * 32768.0).tolist())  # knf does not scale to int16
    fb.input_finished()
    if fb.num_frames_ready == 0:
        return np.zeros((0, num_bins), np.float32)
    return np.stack([np.asarray(fb.get_frame(i)) for i in range(fb.num_frames_ready)])


def _check_parity(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape
    d = np.abs(ours - ref)
    strong = (ref.max(axis=1, keepdims=True) - ref) < 6.0 * np.log(10.0)  # within 60 dB of peak
    assert d[strong].max() < TOL_MAIN, d[strong].max()
    assert d.max() < TOL_ALL, d.max()
    assert d.mean() < TOL_MEAN, d.mean()


@pytest.mark.parametrize("snip_edges", [True, False])
@pytest.mark.parametrize("window", ["povey", "hann", "hamming"])
def test_parity_knf(snip_edges, window):
    x = _signal()
    ref = _knf(x, snip_edges, window)
    m = Fbank(FbankConfig(snip_edges=snip_edges, window_type=window)).eval()
    feats, n = m(torch.from_numpy(x)[None], torch.tensor([len(x)]))
    assert int(n[0]) == ref.shape[0] == m.num_frames(len(x))
    _check_parity(feats[0].numpy(), ref)


@pytest.mark.parametrize("snip_edges", [True, False])
def test_frame_counts_knf(snip_edges):
    m = Fbank(FbankConfig(snip_edges=snip_edges))
    x = _signal(1.0, extra=0)
    for n in [0, 1, 79, 80, 81, 239, 240, 399, 400, 401, 560, 561, 4000, 16000]:
        ref = _knf(x[:n], snip_edges, "povey") if n else np.zeros((0, 80))
        assert m.num_frames(n) == ref.shape[0], n
        assert int(m.num_frames(torch.tensor([n]))[0]) == ref.shape[0]
        if n:
            feats, nf = m(torch.from_numpy(x[:n])[None], torch.tensor([n]))
            assert feats.shape[1] == int(nf[0]) == ref.shape[0]
            if ref.shape[0]:
                # tiny inputs (heavy reflection): looser, but still matching
                assert np.abs(feats[0].numpy() - ref).max() < TOL_ALL


def test_synthesized_speech_matches_knf(tiny_corpus):
    """Real speech (the espeak corpus of the test session) against kaldi-native-fbank."""
    from harken.audio import load_audio

    corpus, _ = tiny_corpus
    wav = sorted((corpus / "wav" / "train").glob("*.wav"))[0]
    x = load_audio(wav)
    assert len(x) > 400 and np.abs(x).max() > 0
    ref = _knf(x, True, "povey")
    feats, _ = Fbank().eval()(torch.from_numpy(x)[None], torch.tensor([len(x)]))
    d = np.abs(feats[0].numpy() - ref)
    strong = (ref.max(axis=1, keepdims=True) - ref) < 6.0 * np.log(10.0)
    strong &= ref.max(axis=1, keepdims=True) > 10.0  # skip digital-silence frames
    assert d[strong].max() < TOL_MAIN


@pytest.mark.parametrize("snip_edges", [True, False])
def test_batch_equals_single(snip_edges):
    m = Fbank(FbankConfig(snip_edges=snip_edges)).eval()
    lens = [16000, 9000, 4321, 300]
    xs = [_signal(1.0, seed=i, extra=0)[:n] for i, n in enumerate(lens)]
    wave = torch.zeros(len(xs), max(lens))
    for i, x in enumerate(xs):
        wave[i, : len(x)] = torch.from_numpy(x)
        wave[i, len(x) :] = 0.5  # garbage in the padding must not leak in
    feats, n = m(wave, torch.tensor(lens))
    assert feats.shape == (4, m.num_frames(max(lens)), 80)
    for i, x in enumerate(xs):
        single, ns = m(torch.from_numpy(x)[None], torch.tensor([len(x)]))
        k = int(ns[0])
        assert int(n[i]) == k == m.num_frames(len(x))
        torch.testing.assert_close(feats[i, :k], single[0, :k], atol=1e-4, rtol=0)
        assert torch.all(feats[i, k:] == 0)


def test_buffers_not_persistent_and_dither():
    m = Fbank(FbankConfig(dither=1.0))
    assert len(m.state_dict()) == 0
    x = torch.from_numpy(_signal(0.5))[None]
    lens = torch.tensor([x.shape[1]])
    m.eval()
    a, _ = m(x, lens)
    b, _ = m(x, lens)
    assert torch.equal(a, b)
    m.train()
    c, _ = m(x, lens)
    assert not torch.equal(a, c)
    assert (a - c).abs().mean() < 0.05


def test_cmvn_accumulator_and_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 50, 80, generator=g) * 3 + 7
    lens = torch.tensor([50, 20, 5])
    feats[1, 20:] = 1e6  # padding must be ignored
    feats[2, 5:] = -1e6
    acc = CmvnAccumulator()
    acc.update(feats[:2], lens[:2])
    acc.update(feats[2:], lens[2:])
    valid = np.concatenate([feats[i, : lens[i]].numpy() for i in range(3)]).astype(np.float64)
    cmvn = acc.result()
    assert cmvn.count == 75
    np.testing.assert_allclose(cmvn.mean.numpy(), valid.mean(0), rtol=1e-5)
    np.testing.assert_allclose(cmvn.istd.numpy(), 1.0 / valid.std(0), rtol=1e-4)
    # normalised valid frames have zero mean, unit variance
    y = cmvn(torch.from_numpy(valid).float()).double()
    assert y.mean(0).abs().max() < 1e-4 and (y.std(0, unbiased=False) - 1).abs().max() < 1e-4
    assert set(cmvn.state_dict()) == {"mean", "istd"}
    p = tmp_path / "cmvn.json"
    cmvn.to_file(p)
    d = json.loads(p.read_text())
    assert set(d) == {"mean", "istd", "count"} and d["count"] == 75
    back = GlobalCMVN.from_file(p)
    assert torch.equal(back.mean, cmvn.mean) and torch.equal(back.istd, cmvn.istd) and back.count == 75
    ident = GlobalCMVN.identity(80)
    assert torch.equal(ident(feats), feats)
    # constant bin: std floored, no inf
    acc2 = CmvnAccumulator()
    acc2.update(torch.ones(1, 10, 4), torch.tensor([10]))
    assert torch.isfinite(acc2.result().istd).all()


def test_compute_cmvn():
    waves = [_signal(0.5, seed=i) for i in range(3)]
    cmvn = compute_cmvn(iter(waves), FbankConfig())
    fb = Fbank().eval()
    allf = torch.cat([fb(torch.from_numpy(w)[None], torch.tensor([len(w)]))[0][0] for w in waves]).double()
    assert cmvn.count == allf.shape[0]
    torch.testing.assert_close(cmvn.mean.double(), allf.mean(0), atol=1e-4, rtol=1e-5)


def test_specaugment():
    cfg = SpecAugmentConfig(num_freq_masks=2, max_freq_width=15, num_time_masks=2, max_time_width=30)
    sa = SpecAugment(cfg)
    feats = torch.randn(4, 400, 80) + 5.0  # no exact zeros
    lens = torch.tensor([400, 300, 100, 10])
    sa.eval()
    assert sa(feats, lens) is feats
    sa.train()
    torch.manual_seed(123)
    a = sa(feats, lens)
    torch.manual_seed(123)
    b = sa(feats, lens)
    assert torch.equal(a, b)
    assert not torch.equal(a, feats)
    for _ in range(20):
        out = sa(feats, lens)
        zero = out == 0
        full_t = zero.all(dim=2)  # (B, T) frames zeroed in every bin: time masks
        for i, n in enumerate(lens.tolist()):
            # time masks stay inside the utterance, total width <= 2 * min(30, 5% of len)
            assert not full_t[i, n:].any()
            assert full_t[i, :n].sum() <= 2 * min(30, int(0.05 * n))
            # frequency masks: at most 2 * 15 bins zeroed in every valid non-time-masked frame
            keep = ~full_t[i, :n]
            fz = zero[i, :n][keep].all(dim=0)
            assert fz.sum() <= 30
            # nothing else is zeroed
            assert torch.equal(zero[i], full_t[i][:, None] | fz[None, :])
    # short utterance: 5% of 10 frames -> no time mask at all
    assert not (sa(feats, lens) == 0).all(dim=2)[3].any()


def test_frontend():
    cmvn = GlobalCMVN(torch.full((80,), 10.0), torch.full((80,), 0.5))
    fe = Frontend(FbankConfig(), SpecAugmentConfig(), cmvn)
    assert fe.fbank.cfg.num_mel_bins == 80 and fe.cmvn is cmvn and fe.specaug is not None
    assert set(fe.state_dict()) == {"cmvn.mean", "cmvn.istd"}
    x = torch.from_numpy(_signal(1.0))[None].repeat(2, 1)
    lens = torch.tensor([x.shape[1], 8000])
    fe.eval()
    y, n = fe(x, lens)
    f, n2 = fe.fbank(x, lens)
    assert torch.equal(n, n2)
    torch.testing.assert_close(y[0], (f[0] - 10.0) * 0.5)
    assert torch.all(y[1, int(n[1]) :] == 0)  # padded frames stay zero after CMVN
    fe.set_cmvn(GlobalCMVN.identity(80))
    torch.testing.assert_close(fe(x, lens)[0], f)
    fe.train()
    torch.manual_seed(0)
    yt, _ = fe(x, lens)
    assert (yt == 0).sum() > (f == 0).sum()
    assert Frontend(FbankConfig(), None).specaug is None


@pytest.mark.parametrize("snip_edges", [True, False])
def test_onnx_export(tmp_path, snip_edges):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    m = Fbank(FbankConfig(snip_edges=snip_edges)).eval()
    batch = torch.export.Dim("batch", min=1, max=256)
    samples = torch.export.Dim("samples", min=m.win, max=SR * 3600)
    x = torch.randn(2, 8000) * 0.1
    lens = torch.tensor([8000, 6000])
    prog = torch.onnx.export(
        m,
        (x, lens),
        dynamo=True,
        input_names=["wave", "lengths"],
        output_names=["feats", "feat_lens"],
        dynamic_shapes={"wave": {0: batch, 1: samples}, "lengths": {0: batch}},
        verbose=False,
    )
    path = str(tmp_path / "fbank.onnx")
    prog.save(path)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for b, s in [(3, 24000), (1, 5123)]:
        wave = torch.from_numpy(np.stack([_signal(s / SR, seed=i, extra=0)[:s] for i in range(b)]))
        lens = torch.tensor([s] + [s - 1000 * (i + 1) for i in range(b - 1)])
        ref, ref_n = m(wave, lens)
        out, out_n = sess.run(None, {"wave": wave.numpy(), "lengths": lens.numpy()})
        assert out.shape == tuple(ref.shape)
        np.testing.assert_array_equal(out_n, ref_n.numpy())
        np.testing.assert_allclose(out, ref.numpy(), atol=2e-3, rtol=0)
