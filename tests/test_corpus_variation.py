"""The corpus teaches speech, not one voice: engine balance, per-utterance variation (espeak variant,
prosody, level), no digital silence, codec channels, held-out voices, determinism; and the
on-the-fly room / telephone / noise-floor augmentation. Real synthesized audio throughout."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from harken.data.augment import (
    AugmentConfig,
    WaveAugmenter,
    exp_decay_rir,
    mulaw_roundtrip,
    reverberate,
    speed_perturb,
    telephone_channel,
    volume_perturb,
)
from harken.data.corpus.synth import (
    ENGINE_SHARES,
    SPLITS,
    CorpusConfig,
    _synth_one,
    codec_roundtrip,
    ffmpeg_codecs,
    plan_corpus,
    render,
    synthesize_corpus,
)
from harken.data.corpus.voices import (
    ESPEAK_VARIANTS_FEMALE,
    SynthesisError,
    Voice,
    available_voices,
    postprocess,
)
from harken.data.manifest import read_manifest

SR = 16000
VOICES = available_voices()
ENGINES_HERE = sorted({v.engine for v in VOICES})
needs_espeak = pytest.mark.skipif("espeak" not in ENGINES_HERE, reason="espeakng-loader is not installed")
CFG = dict(seed=11, train_utts=40, dev_utts=4, test_seen_utts=4, test_unseen_utts=6, codec_fraction=0.25)


def _rms_db(x: np.ndarray) -> float:
    return 10 * np.log10(max(float(np.mean(np.square(x, dtype=np.float64))), 1e-20))


def _longest_zero_run(x: np.ndarray) -> int:
    z = np.concatenate([[0], (x == 0).astype(np.int8), [0]])
    d = np.diff(z)
    starts, ends = np.nonzero(d == 1)[0], np.nonzero(d == -1)[0]
    return int((ends - starts).max()) if starts.size else 0


def _band_db(x: np.ndarray, lo: float, hi: float, sr: int = SR) -> float:
    spec = np.abs(np.fft.rfft(x.astype(np.float64))) ** 2
    f = np.fft.rfftfreq(len(x), 1 / sr)
    return 10 * np.log10(float(spec[(f >= lo) & (f < hi)].sum()) + 1e-20)


def _fake_voices():
    vs = [Voice(f"espeak:{a}+{v}", "espeak", a, {"name": f"{a}+{v}"})
          for a in ("en-us", "en", "en-029") for v in ("m1", "f1", "m2")]
    vs.append(Voice("espeak:en-us+solo", "espeak", "en-us", {"name": "en-us+solo"}))
    vs += [Voice("piper:joe", "piper", "piper", {}), Voice("piper:joe-f", "piper", "piper", {"shift": 4.0})]
    vs += [Voice(f"flite:{n}", "flite", "flite", {"family": f}) for n, f in (("kal16", "kal"), ("slt", "slt"))]
    vs += [Voice(f"festival:{n}", "festival", "festival", {"family": f})
           for n, f in (("kal_diphone", "kal"), ("cmu_us_slt_arctic_hts", "slt"), ("ked_diphone", "ked"))]
    return vs


# ---------------------------------------------------------------------------------------------- plan

def test_plan_engine_shares_and_variants():
    vs = _fake_voices()
    plan = plan_corpus(CorpusConfig(seed=2, train_utts=3000, dev_utts=200, test_seen_utts=200,
                                    test_unseen_utts=200), vs)
    u = plan["utterances"]
    for split in ("train", "dev", "test_seen"):
        n = len(u[split])
        for engine, share in ENGINE_SHARES.items():
            got = sum(x.voice.engine == engine for x in u[split]) / n
            assert abs(got - share) <= 0.005, (split, engine, got)
    # each engine's share is spread evenly over its train voices
    train = u["train"]
    for engine in ("piper", "flite", "festival"):
        per = {}
        for x in train:
            if x.voice.engine == engine:
                per[x.voice.id] = per.get(x.voice.id, 0) + 1
        assert max(per.values()) - min(per.values()) <= 1, per
    # espeak: a variant per utterance, female and male alternately, never a held-out variant
    held = set(plan["holdout"])
    held_variants = {h.split("+", 1)[1] for h in held if h.startswith("espeak:")}
    esp = [x for x in train if x.voice.engine == "espeak"]
    variants = {x.voice.id.split("+", 1)[1] for x in esp}
    assert len(variants) > 40 and not (variants & held_variants)
    female = sum(x.voice.id.split("+", 1)[1] in ESPEAK_VARIANTS_FEMALE for x in esp) / len(esp)
    assert 0.45 <= female <= 0.55
    train_ids = {x.voice.id for x in train}
    assert not (train_ids & {x.voice.id for x in u["test_unseen"]})
    assert {x.voice.id for x in u["dev"] + u["test_seen"]} <= train_ids
    # wider prosody and level
    assert min(x.speed for x in train) < 0.82 and max(x.speed for x in train) > 1.28
    assert min(x.pitch for x in train) < -3.8 and max(x.pitch for x in train) > 3.8
    levels = [x.level_db for x in train]
    assert min(levels) < -49 and max(levels) > -16
    # codecs only in train, on about codec_fraction of it
    assert all(x.channel == "clean" for s in ("dev", "test_seen", "test_unseen") for x in u[s])
    assert 0.08 <= sum(x.channel != "clean" for x in train) / len(train) <= 0.12


def test_plan_fingerprints_follow_each_setting():
    vs = _fake_voices()
    base = dict(seed=4, train_utts=300, dev_utts=20, test_seen_utts=20, test_unseen_utts=20)
    a = plan_corpus(CorpusConfig(**base, codec_fraction=0.1), vs)["utterances"]
    b = plan_corpus(CorpusConfig(**base, codec_fraction=0.2), vs)["utterances"]
    changed = [(x, y) for s in SPLITS for x, y in zip(a[s], b[s]) if x.fingerprint != y.fingerprint]
    # more codec utterances: exactly the utterances whose channel changed are regenerated
    assert changed and all(x.channel == "clean" and y.channel != "clean" for x, y in changed)
    assert len(changed) == sum(y.channel != "clean" for y in b["train"]) - sum(x.channel != "clean" for x in a["train"])
    c = plan_corpus(CorpusConfig(**base, codec_fraction=0.1, level_db=(-30.0, -20.0)), vs)["utterances"]
    assert all(x.fingerprint != y.fingerprint for s in SPLITS for x, y in zip(a[s], c[s]))
    # a codec this machine lacks leaves those utterances clean (and their fingerprint says so)
    d = plan_corpus(CorpusConfig(**base, codec_fraction=0.1), vs, available_codecs={"opus"})["utterances"]
    assert {x.channel for x in d["train"]} == {"clean", "opus"}
    # the old even spread (and piper_fraction) still work
    e = plan_corpus(CorpusConfig(**base, engine_shares=None, piper_fraction=0.1), vs)["utterances"]
    assert sum(x.voice.engine == "piper" for x in e["train"]) == 30


def test_corpus_settings_are_checked():
    for bad in (dict(engine_shares={"espeak": -1}), dict(engine_shares={"nope": 1}), dict(level_db=(-10, -30)),
                dict(codec_fraction=1.5), dict(codecs=("mp3",)), dict(espeak_variants="all"),
                dict(speed_range=(0, 1))):
        with pytest.raises(SynthesisError):
            CorpusConfig(**bad)
    assert issubclass(SynthesisError, ValueError)  # the CLI reports it in one line


# ---------------------------------------------------------------------------------------------- build

@pytest.fixture(scope="module")
def varied_corpus(tmp_path_factory):
    if "espeak" not in ENGINES_HERE:
        pytest.skip("espeakng-loader is not installed")
    out = tmp_path_factory.mktemp("varied")
    summary = synthesize_corpus(CorpusConfig(**CFG), str(out), jobs=2, progress=False)
    return out, summary


def test_build_engine_mix_levels_and_no_digital_silence(varied_corpus):
    out, summary = varied_corpus
    assert not summary["failed"], summary["failed"]
    train = read_manifest(out / "train.jsonl")
    assert len(train) == CFG["train_utts"]
    present = [e for e in ENGINE_SHARES if e in {v.engine for v in VOICES}]
    total = sum(ENGINE_SHARES[e] for e in present)
    for e in present:
        got = sum(r.extra["engine"] == e for r in train) / len(train)
        assert abs(got - ENGINE_SHARES[e] / total) <= 0.03, (e, got)
    levels, longest = [], 0
    for split in SPLITS:
        for r in read_manifest(out / f"{split}.jsonl"):
            assert r.extra["engine"] == r.speaker.split(":")[0] and r.group
            x, sr = sf.read(r.audio, dtype="int16")
            assert sr == SR
            longest = max(longest, _longest_zero_run(x))
            if split == "train":
                levels.append(_rms_db(x / 32768.0))
                peak = np.max(np.abs(x)) / 32768.0
                assert peak < 0.999  # never clipped
    assert longest <= SR // 100, f"a run of {longest} exact zeros"
    assert max(levels) - min(levels) >= 25.0, (min(levels), max(levels))


def test_build_holdout_and_channels(varied_corpus):
    out, summary = varied_corpus
    recs = {s: read_manifest(out / f"{s}.jsonl") for s in SPLITS}
    train_spk = {r.speaker for r in recs["train"]}
    assert not (train_spk & set(summary["holdout"]))
    assert not (train_spk & {r.speaker for r in recs["test_unseen"]})
    held_variants = {h.split("+", 1)[1] for h in summary["holdout"] if h.startswith("espeak:")}
    assert not ({s.split("+", 1)[1] for s in train_spk if s.startswith("espeak:")} & held_variants)
    if "flite" in ENGINES_HERE:
        assert "flite:slt" not in train_spk
    if "piper" in ENGINES_HERE:
        assert "piper:joe-f" in train_spk
    channels = {r.extra["channel"] for r in recs["train"]}
    have = ffmpeg_codecs()
    assert channels - {"clean"} <= have
    if have:
        assert channels - {"clean"}, "codec_fraction=0.25 put no train utterance through a codec"
    else:
        assert channels == {"clean"} and any("codec" in w for w in summary["warnings"])
    assert {r.extra["channel"] for s in ("dev", "test_seen", "test_unseen") for r in recs[s]} == {"clean"}


def test_build_is_deterministic(varied_corpus, tmp_path):
    """Same seed, same bytes: re-render one utterance of each engine (and a codec one) from a fresh
    plan, in this process rather than a worker, and compare the files byte for byte."""
    out, _ = varied_corpus
    plan = plan_corpus(CorpusConfig(**CFG), available_codecs=set(ffmpeg_codecs()))
    picks, seen = [], set()
    for u in plan["utterances"]["train"]:
        key = u.voice.engine if u.channel == "clean" else f"codec-{u.channel}"
        if key not in seen:
            seen.add(key)
            picks.append(u)
    assert len(picks) >= 1
    for u in picks:
        path = tmp_path / f"{u.id}.wav"
        uid, dur, err, _, _ = _synth_one((u.id, str(path), u.text, u.voice, u.speed, u.pitch, u.render_params()))
        assert err is None, err
        assert path.read_bytes() == u.wav_path(out).read_bytes(), (u.id, u.voice.id, u.channel)
    # and a re-run over the finished corpus has nothing to do
    again = synthesize_corpus(CorpusConfig(**CFG), str(out), jobs=1, progress=False)
    assert again["synthesized"] == 0 and again["skipped"] == sum(again["counts"].values())


@needs_espeak
def test_trim_pads_with_noise_not_zeros():
    sr = SR
    t = np.arange(sr) / sr
    tone = (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    out = postprocess(tone, sr)  # no silence around it: both edges padded
    assert len(out) > len(tone) + 0.25 * sr
    edge = out[: int(0.1 * sr)]
    assert np.count_nonzero(edge == 0) == 0 and np.count_nonzero(out[-int(0.1 * sr):] == 0) == 0
    assert -75 < _rms_db(edge) - _rms_db(out) < -55
    assert np.array_equal(out, postprocess(tone, sr))


@pytest.mark.skipif("piper" not in ENGINES_HERE, reason="piper voice not installed")
def test_joe_f_is_shifted_up():
    joe, joe_f = (next(v for v in VOICES if v.id == i) for i in ("piper:joe", "piper:joe-f"))
    text = "please call me back this afternoon"

    def centroid(x):
        spec = np.abs(np.fft.rfft(x))
        return float((spec * np.fft.rfftfreq(len(x), 1 / SR)).sum() / spec.sum())

    a, b = joe.synthesize(text), joe_f.synthesize(text)
    assert 0.8 < len(b) / len(a) < 1.25  # same tempo
    assert centroid(b) / centroid(a) > 1.1  # pitch and formants up by about a third of an octave


# ---------------------------------------------------------------------------------------------- channels

@pytest.fixture(scope="module")
def speech():
    if "espeak" not in ENGINES_HERE:
        pytest.skip("espeakng-loader is not installed")
    v = next(v for v in VOICES if v.engine == "espeak")
    return v.synthesize("the sixth sick sheikh's sixth sheep is sick", 1.0, 0.0)


def test_telephone_removes_the_high_band(speech):
    tel = telephone_channel(speech, SR)
    assert len(tel) == len(speech)
    drop = _band_db(speech, 4200, 8000) - _band_db(tel, 4200, 8000)
    assert drop > 20, drop
    assert abs(_band_db(speech, 500, 3000) - _band_db(tel, 500, 3000)) < 3  # the voice band stays
    assert _band_db(speech, 0, 200) - _band_db(tel, 0, 200) > 10  # and the lows go
    mu = telephone_channel(speech, SR, mulaw=True)
    assert not np.array_equal(mu, tel) and _band_db(speech, 4200, 8000) - _band_db(mu, 4200, 8000) > 20
    x = np.linspace(-1, 1, 1001)
    err = np.abs(mulaw_roundtrip(x) - x)
    assert err[np.abs(x) < 0.01].max() < 2e-4 and err.max() < 0.025  # fine near zero, coarse near full scale


def test_reverb_adds_a_decaying_tail(speech):
    rng = np.random.default_rng(0)
    rir = exp_decay_rir(0.8, 0.0, rng)
    assert rir[0] >= 1.0 and abs(len(rir) / SR - 0.88) < 0.01
    env = [_rms_db(rir[i:i + 800]) for i in range(800, len(rir) - 800, 4000)]
    assert all(a > b for a, b in zip(env, env[1:]))  # decays
    wet = reverberate(speech, rir)
    assert len(wet) == len(speech) and abs(_rms_db(wet) - _rms_db(speech)) < 0.1
    tail = slice(len(speech) - int(0.1 * SR), len(speech))  # the padding after the last word
    assert _rms_db(wet[tail]) - _rms_db(speech[tail]) > 20
    # the spectrogram is smeared: frame energies vary much less over time
    def frame_db(x):
        n = len(x) // 400
        return 10 * np.log10(np.mean(x[: n * 400].reshape(n, 400).astype(np.float64) ** 2, axis=1) + 1e-12)

    assert np.std(frame_db(wet)) < 0.7 * np.std(frame_db(speech))
    dry = reverberate(speech, exp_decay_rir(0.2, 15.0, np.random.default_rng(0)))
    assert np.corrcoef(dry, speech)[0, 1] > 0.9 > np.corrcoef(wet, speech)[0, 1]


@pytest.mark.skipif(not ffmpeg_codecs(), reason="ffmpeg with libgsm/libopus is not installed")
def test_codec_roundtrip_and_render(speech):
    for codec in sorted(ffmpeg_codecs()):
        y = codec_roundtrip(speech, codec, 8)
        assert len(y) == len(speech) and not np.array_equal(y, speech)
        assert np.corrcoef(y, speech)[0, 1] > 0.5
        if codec == "gsm":
            assert _band_db(speech, 4200, 8000) - _band_db(y, 4200, 8000) > 20
        assert np.array_equal(y, codec_roundtrip(speech, codec, 8))
    quiet = render(speech, -45.0, floor_snr_db=50.0, noise_seed=1)
    assert abs(_rms_db(quiet) - (-45.0)) < 0.5
    loud = render(speech, -5.0, peak_db=-1.0, floor_snr_db=None)
    assert abs(20 * np.log10(np.max(np.abs(loud))) - (-1.0)) < 0.01  # peak cap wins over the level


def test_augmenter_new_transforms(speech):
    cfg = AugmentConfig(speed_factors=(), volume_prob=0.0, noise_prob=0.0, reverb_prob=1.0, telephone_prob=1.0,
                        telephone_mulaw_prob=1.0, floor_prob=1.0, floor_db=(-60.0, -60.0))
    aug = WaveAugmenter(cfg)
    assert aug.active
    a = aug(speech, np.random.default_rng(3))
    b = aug(speech, np.random.default_rng(3))
    assert np.array_equal(a, b) and len(a) == len(speech) and np.all(np.isfinite(a))
    assert np.max(np.abs(a)) <= 1.0 and _longest_zero_run(a) == 0
    assert not WaveAugmenter(AugmentConfig(speed_factors=(), volume_prob=0.0)).active
    with pytest.raises(ValueError):
        AugmentConfig(rt60=(0.8, 0.2))


def test_augmenter_defaults_draw_as_before(speech):
    """New transforms are off by default and draw nothing from the RNG, so an old config augments
    exactly as it did: speed then volume, from the same generator."""
    cfg = AugmentConfig(speed_factors=(0.9, 1.1), volume_prob=1.0, volume_db=(-15.0, 15.0))
    got = WaveAugmenter(cfg)(speech, np.random.default_rng(7))
    rng = np.random.default_rng(7)
    factor = (0.9, 1.1)[int(rng.integers(2))]
    x = speed_perturb(speech, factor)
    rng.random()
    want = volume_perturb(x, float(rng.uniform(-15.0, 15.0)))
    assert np.array_equal(got, want)
