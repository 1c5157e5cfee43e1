"""VAD and long-file segmentation: pauses, forced splits, streaming, and bounded memory."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from harken.audio import SAMPLE_RATE
from harken.vad import EnergyVad, Segmenter, make_vad, segment_stream, webrtcvad_available

SR = SAMPLE_RATE


def tone_bursts(spec, noise=1e-3, seed=0):
    """spec: list of (seconds, is_speech). Speech = modulated harmonic tones at about -15 dBFS."""
    rng = np.random.default_rng(seed)
    parts, truth, pos = [], [], 0
    for dur, speech in spec:
        n = int(dur * SR)
        t = np.arange(n) / SR
        x = np.zeros(n, np.float32)
        if speech:
            env = 0.6 + 0.4 * np.sin(2 * np.pi * 4 * t)  # syllable-like modulation, never silent
            x = (0.2 * env * (np.sin(2 * np.pi * 150 * t) + 0.5 * np.sin(2 * np.pi * 450 * t))).astype(np.float32)
            truth.append((pos / SR, (pos + n) / SR))
        parts.append(x)
        pos += n
    w = np.concatenate(parts)
    return w + rng.normal(0, noise, len(w)).astype(np.float32), truth


def blocks(w, n=SR // 3):
    for i in range(0, len(w), n):
        yield w[i: i + n]


def test_energy_vad_frames():
    w, truth = tone_bursts([(1.0, False), (1.0, True), (1.0, False)])
    vad = EnergyVad(hangover=0.0)
    dec = np.concatenate([vad(b) for b in blocks(w, 1234)])
    assert len(dec) == len(w) // 160
    assert dec[105:195].all() and not dec[:95].any() and not dec[210:].any()


def test_segments_cut_at_pauses_with_padding():
    w, truth = tone_bursts([(0.7, False), (2.0, True), (0.25, False), (1.5, True), (1.0, False),
                            (3.0, True), (2.0, False), (0.05, True), (1.0, False)])
    segs = list(segment_stream(blocks(w), max_segment=20, min_silence=0.5, pad=0.2))
    # the 0.25 s pause does not split; the 1 s pause does; the 50 ms click is dropped
    assert len(segs) == 2
    (s0, a), (s1, b) = segs
    assert abs(s0 / SR - (truth[0][0] - 0.2)) < 0.03 and s0 / SR + len(a) / SR >= truth[1][1]
    assert abs(s1 / SR - (truth[2][0] - 0.2)) < 0.03 and s1 / SR + len(b) / SR >= truth[2][1]
    assert np.array_equal(a, w[s0: s0 + len(a)]) and np.array_equal(b, w[s1: s1 + len(b)])


def test_forced_split_without_pauses_and_split_at_short_pause():
    w, _ = tone_bursts([(0.5, False), (45.0, True), (0.5, False)])
    segs = list(segment_stream(blocks(w), max_segment=20))
    assert len(segs) == 3 and all(len(x) <= 20 * SR for _, x in segs)
    starts = [s for s, _ in segs]
    assert starts == sorted(starts)
    # contiguous: forced splits lose no samples
    assert all(s + len(x) == t for (s, x), (t, _) in zip(segs, segs[1:]))
    # a long utterance with only short (0.3 s) pauses is cut inside a pause
    spec = [(0.5, False)] + [(3.0, True), (0.3, False)] * 10
    w, truth = tone_bursts(spec)
    segs = list(segment_stream(blocks(w), max_segment=20))
    pauses = [(a[1], b[0]) for a, b in zip(truth, truth[1:])]
    for s, x in segs[:-1]:
        cut = (s + len(x)) / SR
        assert any(p0 - 0.01 <= cut <= p1 + 0.01 for p0, p1 in pauses), cut


def test_block_size_does_not_matter():
    w, _ = tone_bursts([(0.3, False), (2.0, True), (0.8, False), (1.0, True), (0.5, False)])
    a = [(s, len(x)) for s, x in segment_stream(blocks(w, 160 * 7 + 3))]
    b = [(s, len(x)) for s, x in segment_stream([w])]
    assert a == b and len(a) == 2


def test_make_vad_kinds():
    assert isinstance(make_vad("energy"), EnergyVad)
    assert isinstance(make_vad("auto"), EnergyVad) or webrtcvad_available()
    with pytest.raises(ValueError):
        make_vad("nope")
    if not webrtcvad_available():
        with pytest.raises(ImportError, match="webrtcvad"):
            make_vad("webrtc")
    with pytest.raises(ValueError):
        Segmenter(max_segment=0.5)


@pytest.fixture(scope="module")
def untrained_recognizer():
    """A tiny untrained model: enough to exercise the long-file pipeline (its text is noise)."""
    import torch

    from harken.config import load_config
    from harken.recognizer import Recognizer
    from harken.text.tokenizer import CharTokenizer
    from harken.train.trainer import build_model

    torch.manual_seed(0)
    cfg = load_config(None, ["model.encoder.d_model=32", "model.encoder.num_layers=1",
                             "model.encoder.num_heads=2", "model.encoder.ff_dim=64",
                             "model.encoder.subsampling_channels=8"])
    tok = CharTokenizer.build(["abc def"])
    return Recognizer(build_model(cfg, tok.vocab_size), tok, cfg)


def write_long(path, minutes, seed=0):
    """Repeated 4 s speech + 1 s pause, written block by block."""
    unit, _ = tone_bursts([(4.0, True), (1.0, False)], seed=seed)
    with sf.SoundFile(str(path), "w", SR, 1, subtype="PCM_16") as f:
        for _ in range(int(minutes * 60 / 5)):
            f.write(unit)
    return int(minutes * 60 / 5)


def test_transcribe_long_streams_in_bounded_memory(untrained_recognizer, tmp_path):
    import tracemalloc

    rec = untrained_recognizer
    peaks, counts = {}, {}
    for minutes in (1, 3):
        path = tmp_path / f"long{minutes}.wav"
        n_units = write_long(path, minutes)
        tracemalloc.start()
        segs = []
        for g in rec.transcribe_long(str(path), max_segment=20.0, batch_size=4):
            segs.append((g.id, g.start, g.end))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        peaks[minutes], counts[minutes] = peak, len(segs)
        # 4 s speech units separated by 1 s pauses -> one segment per unit, in order, file-relative
        assert len(segs) == n_units
        assert [i for i, *_ in segs] == list(range(n_units))
        for k, (_, s, e) in enumerate(segs):
            assert abs(s - (5 * k - 0.2)) < 0.05 or (k == 0 and s == 0.0)
            assert 4.0 <= e - s <= 4.6
    print(f"\ntracemalloc peaks: 1 min {peaks[1] / 1e6:.2f} MB, 3 min {peaks[3] / 1e6:.2f} MB")
    # a 3x longer file must not need (anywhere near) 3x the memory; its audio alone is 11.5 MB
    assert peaks[3] < 1.3 * peaks[1] + 1e6
    assert peaks[3] < 5e6


def test_transcribe_long_accepts_arrays_and_resamples(untrained_recognizer, tmp_path):
    rec = untrained_recognizer
    w, truth = tone_bursts([(0.5, False), (2.0, True), (1.0, False), (2.0, True), (0.5, False)])
    segs = list(rec.transcribe_long(w))
    assert len(segs) == 2
    p = tmp_path / "a44.flac"
    import soxr

    sf.write(str(p), np.stack([soxr.resample(w, SR, 44100)] * 2, 1), 44100)
    segs44 = list(rec.transcribe_long(str(p)))
    assert [round(g.start, 1) for g in segs44] == [round(g.start, 1) for g in segs]
