"""Streaming: chunk masks, forward_chunk with caches, the incremental front-end, the streaming
decoder, dynamic-chunk training and the ONNX chunk model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harken.features import Fbank, FbankConfig
from harken.models.conformer import chunk_attention_mask
from harken.models.registry import EncoderConfig, build_encoder
from harken.runtime.streaming import StreamingDecoder, StreamingFeatures, offline_chunked_log_probs

SMALL = dict(d_model=32, num_heads=2, ff_dim=64, num_layers=2, conv_kernel=5, subsampling_channels=8,
             input_dim=20, causal=True)


def test_chunk_mask():
    m = chunk_attention_mask(6, 2, left_chunks=1)
    assert m[0].tolist() == [True, True, False, False, False, False]
    assert m[5].tolist() == [False, False, True, True, True, True]
    assert chunk_attention_mask(5, 2)[4].all()


@pytest.mark.parametrize("typ,pe", [("conformer", "rel"), ("conformer", "abs"), ("transformer", "rel")])
@pytest.mark.parametrize("chunk,left", [(4, -1), (3, 2), (1, 0)])
def test_forward_chunk_equals_masked_forward(typ, pe, chunk, left):
    torch.manual_seed(0)
    enc = build_encoder(EncoderConfig(type=typ, pos_enc=pe, **SMALL)).eval()
    T = 97
    x = torch.randn(1, T, 20)
    with torch.no_grad():
        full, lens = enc(x, torch.tensor([T]), chunk_size=chunk, left_chunks=left)
        att, cnn = enc.init_cache()
        outs, off, s = [], 0, 0
        while s + 7 <= T:
            o, att, cnn = enc.forward_chunk(x[:, s: s + 4 * chunk + 3], off, att, cnn,
                                            required_cache_size=left * chunk if left >= 0 else -1)
            outs.append(o)
            off += o.size(1)
            s += 4 * chunk
            if left >= 0:
                assert att.size(3) <= left * chunk
    st = torch.cat(outs, 1)
    assert st.shape == full.shape
    assert (st - full).abs().max() < 1e-4


def test_full_context_equals_offline_and_chunk_mask_changes_outputs():
    torch.manual_seed(0)
    enc = build_encoder(EncoderConfig(**SMALL)).eval()
    x = torch.randn(1, 80, 20)
    with torch.no_grad():
        off, _ = enc(x, torch.tensor([80]))
        one, _ = enc(x, torch.tensor([80]), chunk_size=1000)
        ch, _ = enc(x, torch.tensor([80]), chunk_size=4)
        att, cnn = enc.init_cache()
        st, *_ = enc.forward_chunk(x, 0, att, cnn)  # one chunk = the whole utterance
    assert torch.equal(off, one)
    assert (st - off).abs().max() < 1e-4
    assert (ch - off).abs().max() > 1e-3


def test_non_streaming_config_unchanged_and_conv_is_causal():
    # defaults: no chunk mask, no RNG draws in training
    enc = build_encoder(EncoderConfig(**{**SMALL, "causal": False})).train()
    s = torch.random.get_rng_state()
    torch.manual_seed(1)
    s = torch.random.get_rng_state()
    assert enc.draw_chunk(50) == (0, -1)
    assert torch.equal(torch.random.get_rng_state(), s)
    # a causal conv: changing future frames does not change the past
    torch.manual_seed(0)
    enc = build_encoder(EncoderConfig(**SMALL)).eval()
    x = torch.randn(1, 83, 20)
    y = x.clone()
    y[:, 60:] += 1.0
    with torch.no_grad():
        a, _ = enc(x, torch.tensor([83]), chunk_size=1)
        b, _ = enc(y, torch.tensor([83]), chunk_size=1)
    k = (60 - 3) // 4  # output frames whose input window ends before frame 60
    assert (a[:, :k] - b[:, :k]).abs().max() < 1e-5
    assert (a[:, k + 2:] - b[:, k + 2:]).abs().max() > 1e-4


def test_dynamic_chunk_draws_from_global_rng():
    enc = build_encoder(EncoderConfig(**SMALL, dynamic_chunk=True, dynamic_left_chunks=True)).train()
    torch.manual_seed(3)
    a = [enc.draw_chunk(100) for _ in range(50)]
    torch.manual_seed(3)
    b = [enc.draw_chunk(100) for _ in range(50)]
    assert a == b
    assert any(c == 0 for c, _ in a) and any(0 < c <= 25 for c, _ in a)
    enc.eval()
    assert enc.draw_chunk(100) == (0, -1)


@pytest.mark.parametrize("snip", [True, False])
def test_streaming_features_equal_full_fbank(snip):
    rng = np.random.default_rng(0)
    cfg = FbankConfig(snip_edges=snip)
    for n in (300, 700, 16000 + 37):
        w = (0.1 * rng.standard_normal(n)).astype(np.float32)
        full, _ = Fbank(cfg)(torch.from_numpy(w)[None], torch.tensor([n]))
        sf = StreamingFeatures(cfg)
        parts, i = [], 0
        while i < n:
            k = int(rng.integers(1, 2500))
            parts.append(sf.accept(w[i: i + k]))
            i += k
        parts.append(sf.finish())
        st = torch.cat(parts)
        assert st.shape == full[0].shape
        if st.numel():
            assert (st - full[0]).abs().max() < 1e-4


@pytest.fixture(scope="module")
def stream_model(tiny_corpus):
    """A tiny dynamic-chunk causal conformer trained a few steps (its outputs are not blank-only
    noise after training, so text comparisons mean something)."""
    from harken.config import load_config
    from harken.data.manifest import read_manifest
    from harken.text.tokenizer import CharTokenizer
    from harken.train.trainer import build_model

    corpus, _ = tiny_corpus
    recs = read_manifest(corpus / "train.jsonl")
    tok = CharTokenizer.build([r.text.lower() for r in recs])
    cfg = load_config(None, ["model.encoder.d_model=48", "model.encoder.num_layers=2",
                             "model.encoder.num_heads=2", "model.encoder.ff_dim=96",
                             "model.encoder.conv_kernel=7", "model.encoder.subsampling_channels=16",
                             "model.encoder.causal=true", "model.encoder.dynamic_chunk=true"])
    torch.manual_seed(0)
    model = build_model(cfg, tok.vocab_size).eval()
    with torch.no_grad():  # make the output layer favour non-blank symbols somewhere
        model.output.bias[0] -= 2.0
    return model, tok, cfg, recs


def _wave(rec):
    from harken.audio import load_audio

    return load_audio(rec.audio)


@pytest.mark.parametrize("chunk,left", [(8, -1), (4, 2)])
def test_streaming_decoder_random_pieces_equal_offline_chunked(stream_model, chunk, left):
    from harken.decode.greedy import greedy_ids

    model, tok, _, recs = stream_model
    rng = np.random.default_rng(1)
    for rec in recs[:2]:
        w = _wave(rec)
        ref = offline_chunked_log_probs(model, w, chunk, left)
        dec = StreamingDecoder(model, tok, chunk_size=chunk, left_chunks=left)
        i, partials = 0, []
        while i < len(w):
            k = int(rng.integers(1, 6000))
            partials += dec.accept_waveform(w[i: i + k])
            i += k
        final = dec.finish()
        lp = dec.all_log_probs()
        assert lp.shape == ref.shape
        assert (lp - ref).abs().max() < 1e-3
        ref_text = tok.decode(greedy_ids(ref[None], torch.tensor([ref.shape[0]]))[0])
        assert final.is_final and final.text == ref_text
        assert len(partials) >= ref.shape[0] // chunk
        assert all(p.frames % chunk == 0 for p in partials)


def test_streaming_with_whole_utterance_chunk_equals_offline(stream_model):
    model, tok, _, recs = stream_model
    w = _wave(recs[0])
    wt = torch.from_numpy(w)[None]
    with torch.no_grad():
        ref, _ = model(wt, torch.tensor([wt.shape[1]]))  # the plain offline forward (full context)
    dec = StreamingDecoder(model, tok, chunk_size=10_000)
    dec.accept_waveform(w)
    final = dec.finish()
    assert (dec.all_log_probs() - ref[0]).abs().max() < 1e-3
    from harken.decode.greedy import greedy_ids

    assert final.text == tok.decode(greedy_ids(ref, torch.tensor([ref.shape[1]]))[0])


def test_dynamic_chunk_training_runs(tiny_corpus, tmp_path):
    import sys
    from pathlib import Path

    from harken.config import load_config
    from harken.train.trainer import train

    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import TINY, subset

    corpus, _ = tiny_corpus
    man = subset(corpus, 6, tmp_path)
    cfg = load_config(None, TINY + [f"data.train=[{man}]", "data.dev=null", f"train.exp_dir={tmp_path / 'e'}",
                                    "train.max_steps=3", "train.checkpoint_every=3",
                                    "model.encoder.causal=true", "model.encoder.dynamic_chunk=true",
                                    "model.encoder.dynamic_left_chunks=true"])
    run = train(cfg)
    assert run.state.step == 3 and run.state.nonfinite_skipped == 0


def test_streaming_onnx_matches_torch(stream_model, tmp_path):
    pytest.importorskip("onnxruntime")
    from harken.runtime.streaming_onnx import export_streaming_onnx, load_onnx_streaming

    model, tok, _, recs = stream_model
    chunk, left = 4, 3
    path = export_streaming_onnx(model, tmp_path / "s.onnx", chunk_size=chunk, left_chunks=left, tokenizer=tok)
    w = _wave(recs[0])
    ref = StreamingDecoder(model, tok, chunk_size=chunk, left_chunks=left)
    ref.accept_waveform(w)
    rt = ref.finish()
    dec = load_onnx_streaming(path, num_threads=1)
    rng = np.random.default_rng(2)
    i = 0
    while i < len(w):
        k = int(rng.integers(100, 5000))
        dec.accept_waveform(w[i: i + k])
        i += k
    fin = dec.finish()
    a, b = dec.all_log_probs(), ref.all_log_probs()
    assert a.shape == b.shape
    assert (a - b).abs().max() < 1e-3
    assert fin.text == rt.text
