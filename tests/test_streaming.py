"""Streaming: chunk masks, forward_chunk with caches, the incremental front-end, the streaming
decoder, dynamic-chunk training and the ONNX chunk model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harken.features import Fbank, FbankConfig
from harken.models.conformer import chunk_attention_mask
from harken.models.registry import EncoderConfig, build_encoder
from harken.runtime.streaming import (
    EndpointConfig,
    StreamingDecoder,
    StreamingFeatures,
    StreamingModel,
    offline_chunked_log_probs,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Chunk steps are tiny matrices: one intra-op thread (two threads on a busy 2-core host made
    them 50x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


@pytest.fixture(scope="module")
def stream_onnx(stream_model, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from harken.runtime.streaming_onnx import export_streaming_onnx

    model, tok, _, _ = stream_model
    path = tmp_path_factory.mktemp("sonnx") / "s.onnx"
    return export_streaming_onnx(model, path, chunk_size=4, left_chunks=3, tokenizer=tok), 4, 3


def test_streaming_onnx_matches_torch(stream_model, stream_onnx):
    from harken.runtime.streaming_onnx import load_onnx_streaming

    model, tok, _, recs = stream_model
    path, chunk, left = stream_onnx
    w = _wave(recs[0])
    ref = StreamingDecoder(model, tok, chunk_size=chunk, left_chunks=left)
    ref.accept_waveform(w)
    rt = ref.finish()
    dec = load_onnx_streaming(path, num_threads=1)
    assert dec.model.geometry == ref.model.geometry  # geometry read back from the ONNX metadata
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


# ------------------------------------------------------------------ one shared model, many sessions
def _alone(sm, waves):
    """Each wave streamed on its own session, stepped alone: (log-probs, final text) per wave."""
    out = []
    for w in waves:
        s = sm.new_session(keep_log_probs=True)
        s.accept_waveform(w)
        s.input_finished()
        res = sm.run([s])[0]
        assert s.done and res[-1].is_final and res[-1].stream_end
        out.append((s.all_log_probs(), res[-1].text))
    return out


def _together(sm, waves, starts, seed):
    """All waves on sessions of one model, started at different ticks, fed random pieces, ONE step
    of the whole set per tick.  Returns per wave (log-probs, final text), and the batch sizes seen."""
    rng = np.random.default_rng(seed)
    sessions = [sm.new_session(keep_log_probs=True) for _ in waves]
    pos = [0] * len(waves)
    finals: list = [None] * len(waves)
    sizes = []
    tick = 0
    while not all(s.done for s in sessions):
        for i, (s, w) in enumerate(zip(sessions, waves)):
            if tick >= starts[i] and not s.input_done:
                k = int(rng.integers(800, 4000))
                s.accept_waveform(w[pos[i]: pos[i] + k])
                pos[i] += k
                if pos[i] >= len(w):
                    s.input_finished()
        res = sm.step(sessions)
        sizes.append(sum(1 for r in res if any(not x.is_final for x in r)))
        for i, r in enumerate(res):
            for x in r:
                assert x.session_id == sessions[i].id
                if x.is_final:
                    finals[i] = x
        tick += 1
    return [(s.all_log_probs(), f.text) for s, f in zip(sessions, finals)], sizes


def _check_same(alone, together, tol=1e-4):
    for (a, ta), (b, tb) in zip(alone, together):
        assert a.shape == b.shape
        assert (a - b).abs().max() < tol
        assert ta == tb


@pytest.mark.parametrize("chunk,left", [(4, 2), (6, -1)])
def test_batched_step_equals_alone_and_offline(stream_model, chunk, left):
    """8 sessions of different lengths, started at different times (different cache fill): stepped in
    one batch they give what each gives alone, and the masked offline forward."""
    model, tok, _, recs = stream_model
    sm = StreamingModel.from_torch(model, tok, chunk_size=chunk, left_chunks=left)
    waves = [_wave(r)[: 16000 * (2 + i % 3)] for i, r in enumerate(recs[:8])]  # 2..4 s
    alone = _alone(sm, waves)
    together, sizes = _together(sm, waves, starts=[0, 0, 1, 3, 4, 6, 9, 12], seed=3)
    assert max(sizes) >= 6  # real batches happened
    _check_same(alone, together)
    sm.max_batch = 3  # forwards of at most 3 sessions: still the same
    _check_same(alone, _together(sm, waves, starts=[0, 0, 1, 3, 4, 6, 9, 12], seed=4)[0])
    for w, (lp, _) in zip(waves[:3], together):
        ref = offline_chunked_log_probs(model, w, chunk, left)
        assert lp.shape == ref.shape and (lp - ref).abs().max() < 1e-3


def test_batched_step_abs_positions_per_row_offsets():
    """Absolute positional encodings: each row of a batch gets its own offset."""
    from harken.config import load_config
    from harken.text.tokenizer import CharTokenizer
    from harken.train.trainer import build_model

    tok = CharTokenizer.build(["abc def"])
    cfg = load_config(None, ["model.encoder.d_model=32", "model.encoder.num_layers=2", "model.encoder.num_heads=2",
                             "model.encoder.ff_dim=64", "model.encoder.subsampling_channels=8",
                             "model.encoder.causal=true", "model.encoder.pos_enc=abs"])
    torch.manual_seed(0)
    model = build_model(cfg, tok.vocab_size).eval()
    sm = StreamingModel.from_torch(model, tok, chunk_size=3, left_chunks=2)
    rng = np.random.default_rng(0)
    waves = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in (9000, 16000, 12345, 20000)]
    alone = _alone(sm, waves)
    together, sizes = _together(sm, waves, starts=[0, 2, 3, 5], seed=1)
    assert max(sizes) >= 3
    _check_same(alone, together)
    ref = offline_chunked_log_probs(model, waves[1], 3, 2)
    assert (together[1][0] - ref).abs().max() < 1e-3


def test_batched_onnx_equals_alone_and_torch(stream_model, stream_onnx):
    model, tok, _, recs = stream_model
    path, chunk, left = stream_onnx
    sm = StreamingModel.from_onnx(path, num_threads=1)
    assert sm.backend.max_batch == 0  # dynamic batch axis
    waves = [_wave(r)[: 16000 * (2 + i % 3)] for i, r in enumerate(recs[:8])]
    alone = _alone(sm, waves)
    together, sizes = _together(sm, waves, starts=[0, 1, 1, 2, 4, 5, 7, 10], seed=5)
    assert max(sizes) >= 6
    _check_same(alone, together)
    torch_alone = _alone(StreamingModel.from_torch(model, tok, chunk_size=chunk, left_chunks=left), waves[:2])
    _check_same(torch_alone, together[:2], tol=1e-3)


def test_concurrent_steps_from_threads(stream_model):
    """step() from several threads over disjoint session sets, audio fed from other threads."""
    import threading

    model, tok, _, recs = stream_model
    sm = StreamingModel.from_torch(model, tok, chunk_size=4, left_chunks=2)
    waves = [_wave(r) for r in recs[:4]]
    alone = _alone(sm, waves)
    sessions = [sm.new_session(keep_log_probs=True) for _ in waves]
    errors = []

    def feed(s, w):
        for i in range(0, len(w), 1500):
            s.accept_waveform(w[i: i + 1500])
        s.input_finished()

    def stepper(group):
        try:
            while not all(s.done for s in group):
                sm.step(group)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=feed, args=(s, w)) for s, w in zip(sessions, waves)]
    threads += [threading.Thread(target=stepper, args=(sessions[:2],)),
                threading.Thread(target=stepper, args=(sessions[2:],))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    for (a, _), s in zip(alone, sessions):
        b = s.all_log_probs()
        assert a.shape == b.shape and (a - b).abs().max() < 1e-4


# ------------------------------------------------------------------ endpointing
def _speech_blocks(w, block=640, db=-45.0):
    e = 10 * np.log10(np.mean(w[: len(w) // block * block].reshape(-1, block).astype(np.float64) ** 2, 1) + 1e-12)
    loud = np.nonzero(e >= db)[0]
    return w[loud[0] * block: (loud[-1] + 1) * block]


def test_energy_endpoint_splits_two_utterances(stream_model):
    model, tok, _, recs = stream_model
    sm = StreamingModel.from_torch(model, tok, chunk_size=4, left_chunks=2)
    sr = sm.sample_rate
    a, b = _speech_blocks(_wave(recs[0])), _speech_blocks(_wave(recs[1]))
    lead, gap = np.zeros(int(0.32 * sr), np.float32), np.zeros(int(1.2 * sr), np.float32)
    w = np.concatenate([lead, a, gap, b])
    ep = EndpointConfig(trailing_silence_ms=800, max_segment_ms=0, silence="energy")
    s = sm.new_session(endpoint=ep, word_timestamps=True, keep_log_probs=True)
    res = []
    for i in range(0, len(w), 2000):
        s.accept_waveform(w[i: i + 2000])
        res += sm.run([s])[0]
    s.input_finished()
    res += sm.run([s])[0]
    finals = [r for r in res if r.is_final]
    assert [f.segment_id for f in finals] == [0, 1]
    assert finals[-1].stream_end and not finals[0].stream_end and s.done
    speech_end = (len(lead) + len(a)) / sr
    assert speech_end + 0.8 - 0.05 <= finals[0].end <= speech_end + 0.8 + sm.chunk_seconds + 0.05
    assert finals[0].start == 0.0 and finals[1].start == pytest.approx(finals[0].end)
    assert finals[1].end == pytest.approx(len(w) / sr, abs=1e-6)
    # partials carry their segment's id; the final holds the segment's last partial text
    cut = res.index(finals[0])
    assert {r.segment_id for r in res[:cut]} == {0} and {r.segment_id for r in res[cut + 1:]} == {1}
    assert finals[0].text == res[cut - 1].text
    # words are aligned inside their segment
    for f in finals:
        for wd in f.words:
            assert f.start - 0.05 <= wd.start <= wd.end <= f.end + 0.05
        assert " ".join(wd.word for wd in f.words) == f.text
    d = finals[0].as_dict()
    assert d["type"] == "final" and d["segment_id"] == 0 and d["text"] == finals[0].text
    assert res[0].as_dict()["type"] == "partial" and "words" not in res[0].as_dict()
    # segments do not change the acoustics: the whole stream still equals the offline forward
    ref = offline_chunked_log_probs(model, w, 4, 2)
    assert (s.all_log_probs() - ref).abs().max() < 1e-3


def test_blank_endpoint_and_max_segment(stream_model):
    model, tok, cfg, recs = stream_model
    import copy

    w = np.concatenate([_wave(recs[0]), _wave(recs[1])])
    sr = 16000
    # a model that never outputs blank: only the maximum segment length cuts
    chatty = copy.deepcopy(model)
    with torch.no_grad():
        chatty.output.bias[0] -= 100.0
    sm = StreamingModel.from_torch(chatty, tok, chunk_size=4, left_chunks=2)
    s = sm.new_session(endpoint=EndpointConfig(trailing_silence_ms=300, max_segment_ms=1000))
    s.accept_waveform(w)
    s.input_finished()
    finals = [r for r in sm.run([s])[0] if r.is_final]
    assert [f.segment_id for f in finals] == list(range(len(finals)))
    assert len(finals) >= int(len(w) / sr / 1.2)
    for f in finals[:-1]:  # cut at the first chunk end at or after 1 s
        assert 1.0 <= f.end - f.start < 1.0 + sm.chunk_seconds + 1e-6 and f.text
    assert finals[-1].end == pytest.approx(len(w) / sr)
    # a model that only outputs blank: nothing is said, no segment is emitted before the end and
    # the segment start slides forward
    mute = copy.deepcopy(model)
    with torch.no_grad():
        mute.output.bias[0] += 100.0
    sm = StreamingModel.from_torch(mute, tok, chunk_size=4, left_chunks=2)
    s = sm.new_session(endpoint=EndpointConfig(trailing_silence_ms=500, max_segment_ms=1000))
    s.accept_waveform(w)
    s.input_finished()
    res = sm.run([s])[0]
    finals = [r for r in res if r.is_final]
    assert len(finals) == 1 and finals[0].segment_id == 0 and finals[0].text == ""
    assert finals[0].start > len(w) / sr - 1.0


def test_session_errors(stream_model):
    model, tok, _, _ = stream_model
    sm = StreamingModel.from_torch(model, tok, chunk_size=4)
    s = sm.new_session()
    s.input_finished()
    with pytest.raises(RuntimeError, match="after input_finished"):
        s.accept_waveform(np.zeros(10, np.float32))
    t = sm.new_session()
    with pytest.raises(ValueError, match="NaN"):
        t.accept_waveform(np.array([0.0, np.nan], np.float32))
    with pytest.raises(ValueError, match="mono"):
        t.accept_waveform(np.zeros((2, 100), np.float32))
    res = sm.step([s])[0]  # no audio at all: one empty final
    assert len(res) == 1 and res[0].is_final and res[0].text == "" and s.done
    other = StreamingModel.from_torch(model, tok, chunk_size=4)
    with pytest.raises(ValueError, match="another StreamingModel"):
        other.step([sm.new_session()])
    with pytest.raises(ValueError, match="silence"):
        EndpointConfig(silence="loud")


def test_beam_final_per_segment_equals_offline_beam(stream_model):
    """With a beam decoder the final of each segment is the beam search over that segment's
    log-probs; partials stay greedy."""
    import copy

    from harken.decode import DecodeConfig, build_decoder, decode_texts

    model, tok, _, recs = stream_model
    chatty = copy.deepcopy(model)
    with torch.no_grad():
        chatty.output.bias[0] -= 1.0
    dcfg = DecodeConfig(method="beam", beam_size=4)
    dec = build_decoder(tok, dcfg)
    sm = StreamingModel.from_torch(chatty, tok, chunk_size=4, left_chunks=2, decode_cfg=dcfg, decoder=dec)
    w = _wave(recs[2])
    s = sm.new_session(endpoint=EndpointConfig(trailing_silence_ms=0, max_segment_ms=800), keep_log_probs=True)
    s.accept_waveform(w)
    s.input_finished()
    res = sm.run([s])[0]
    finals = [r for r in res if r.is_final]
    assert len(finals) >= 2
    lp = s.all_log_probs()
    fs = sm.frame_seconds
    for f in finals:
        a, b = round(f.start / fs), min(lp.shape[0], round(f.end / fs))
        seg = lp[a:b]
        assert f.text == decode_texts(seg[None], torch.tensor([seg.shape[0]]), tok, dcfg, dec)[0]


def test_from_engine_shares_model_tokenizer_and_decoder(stream_model):
    import json

    from harken.runtime import DecodeOptions, Engine

    model, tok, cfg, recs = stream_model
    eng = Engine.from_model(model, tok, cfg)
    sm = StreamingModel.from_engine(eng, chunk_size=4, left_chunks=2)
    assert sm.backend_name == "torch" and sm.backend.model is eng.model and sm.tokenizer is eng.tokenizer
    assert sm.decoder is None and sm.info()["chunk_ms"] == pytest.approx(160.0)
    beam = StreamingModel.from_engine(eng, chunk_size=4, options=DecodeOptions(method="beam", beam_size=4))
    assert beam.decoder is not None and beam.decode_cfg.method == "beam"
    s = sm.new_session(word_timestamps=True)
    s.accept_waveform(_wave(recs[0]))
    s.input_finished()
    res = sm.run([s])[0]
    json.dumps([r.as_dict() for r in res])  # results are plain JSON
    ref = StreamingDecoder(model, tok, chunk_size=4, left_chunks=2)
    ref.accept_waveform(_wave(recs[0]))
    assert res[-1].text == ref.finish().text
