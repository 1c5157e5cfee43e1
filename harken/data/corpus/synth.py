"""Build the built-in synthetic corpus (``harken synth``).

Layout of ``out_dir``::

    wav/<split>/<id>.wav     16 kHz mono PCM16
    <split>.jsonl            manifests (audio paths relative to out_dir)
    plan.jsonl               what each utterance should be (text, voice, speed, pitch, fingerprint)
    corpus.json              summary: config, voices per split, counts, hours, vocabulary, OOV

Splits: ``train``; ``dev`` and ``test_seen`` (voices of train, unseen sentences); ``test_unseen``
(held-out voices never used in train, unseen sentences). No sentence is in two splits.

Everything is deterministic from the config (texts, voice per utterance, speed, pitch), the work is
spread over a process pool, and a re-run skips utterances whose wav is already there and valid for
the current plan, so an interrupted build continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import soundfile as sf

from harken.audio import SAMPLE_RATE, save_wav
from harken.data.manifest import Record, write_manifest
from harken.fsutil import atomic_open

from .textgen import make_splits, vocab_stats
from .voices import SynthesisError, Voice, select_voices

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test_seen", "test_unseen")
SPEED_RANGE = (0.85, 1.2)
PITCH_RANGE = (-2.0, 2.0)  # semitones
HOLDOUT_ESPEAK_FRACTION = 0.22
# relative cost per utterance, used to schedule the slow engines first
_COST = {"piper": 30.0, "festival": 20.0, "flite": 3.0, "espeak": 1.0}


@dataclass
class CorpusConfig:
    seed: int = 1234
    train_utts: int = 3000
    dev_utts: int = 200
    test_seen_utts: int = 200
    test_unseen_utts: int = 200
    piper_fraction: float = 0.04  # share of utterances voiced by piper (slow)
    voices: list[str] | None = None  # None = all available; else ids or engine names
    holdout: list[str] | None = None  # None = automatic choice

    def counts(self) -> dict[str, int]:
        return {"train": int(self.train_utts), "dev": int(self.dev_utts),
                "test_seen": int(self.test_seen_utts), "test_unseen": int(self.test_unseen_utts)}


@dataclass
class Utterance:
    id: str
    split: str
    text: str
    voice: Voice
    speed: float
    pitch: float
    fingerprint: str = field(default="")

    def __post_init__(self) -> None:
        if not self.fingerprint:
            key = f"{self.text}|{self.voice.id}|{self.speed:.4f}|{self.pitch:.4f}"
            self.fingerprint = hashlib.sha1(key.encode()).hexdigest()[:16]

    def wav_path(self, out_dir: str | os.PathLike) -> Path:
        return Path(out_dir) / "wav" / self.split / f"{self.id}.wav"

    def plan_row(self) -> dict:
        return {"id": self.id, "split": self.split, "text": self.text, "voice": self.voice.id,
                "speed": self.speed, "pitch": self.pitch, "fingerprint": self.fingerprint}


# --------------------------------------------------------------------------------------------------
# planning
# --------------------------------------------------------------------------------------------------

def _stable_key(*parts) -> int:
    return int(hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:12], 16)


def _family(v: Voice) -> str:
    """The recorded speaker behind a voice: flite's slt and festival's slt HTS are one speaker, and so
    are flite kal16 and festival kal diphone. A held-out speaker is held out in every engine."""
    return str(v.params.get("family") or v.id)


def _variant(v: Voice) -> str:
    return v.params.get("name", v.id).split("+", 1)[-1]


def choose_holdout(voices: list[Voice]) -> list[str]:
    """Held-out voices, chosen deterministically from the voice list alone (not the seed), so
    ``test_unseen`` means the same across seeds.

    * espeak: about 22% of its voices, preferring voice variants that no train voice shares, spread
      over accents (round-robin), never all the voices of an accent.
    * flite / festival: one recorded speaker (``slt`` when it can be), held out in every engine that
      has it, as long as each engine keeps a voice in train.
    * an engine's only voice (piper) is never held out.
    """
    held: set[str] = set()
    espeak = [v for v in voices if v.engine == "espeak"]
    if len(espeak) >= 2:
        k = min(len(espeak) - 1, max(1, round(HOLDOUT_ESPEAK_FRACTION * len(espeak))))
        variants: dict[str, int] = {}
        for v in espeak:
            variants[_variant(v)] = variants.get(_variant(v), 0) + 1
        size: dict[str, int] = {}
        for v in espeak:
            size[v.group] = size.get(v.group, 0) + 1
        unique = [v for v in espeak if variants[_variant(v)] == 1]
        for cands in (unique, espeak):
            groups: dict[str, list[Voice]] = {}
            for v in sorted(cands, key=lambda v: _stable_key("holdout", v.id)):
                if v.id not in held:
                    groups.setdefault(v.group, []).append(v)
            order = sorted(groups, key=lambda g: _stable_key("holdout-group", g))
            taken: dict[str, int] = {}
            for v in espeak:
                if v.id in held:
                    taken[v.group] = taken.get(v.group, 0) + 1
            progress = True
            while len(held) < k and progress:
                progress = False
                for g in order:
                    if len(held) >= k or not groups[g]:
                        continue
                    # keep at least one voice of the accent in train, unless it is the only voice
                    if taken.get(g, 0) + 1 >= size[g] and len(groups) > 1:
                        continue
                    held.add(groups[g].pop(0).id)
                    taken[g] = taken.get(g, 0) + 1
                    progress = True
            if len(held) >= k:
                break
    others = [v for v in voices if v.engine in ("flite", "festival")]
    if others:
        engines_n: dict[str, int] = {}
        for v in voices:
            engines_n[v.engine] = engines_n.get(v.engine, 0) + 1
        families = sorted({_family(v) for v in others},
                          key=lambda f: (f != "slt", _stable_key("holdout-family", f)))
        for fam in families:
            members = [v for v in voices if _family(v) == fam]
            lost: dict[str, int] = {}
            for v in members:
                lost[v.engine] = lost.get(v.engine, 0) + 1
            if all(engines_n[e] - n >= 1 for e, n in lost.items()):
                held.update(v.id for v in members)
                break
    return [v.id for v in voices if v.id in held]


def _assign(n: int, voices: list[Voice], rng: random.Random, piper_fraction: float) -> list[Voice]:
    """Voices for ``n`` utterances: piper gets ``piper_fraction`` of them (when present), the rest is
    spread evenly over the other voices in a shuffled order."""
    if n <= 0 or not voices:
        return []
    piper = [v for v in voices if v.engine == "piper"]
    others = [v for v in voices if v.engine != "piper"]
    if not others:
        return [piper[i % len(piper)] for i in range(n)]
    n_piper = min(n, int(round(piper_fraction * n))) if piper else 0
    order = list(others)
    rng.shuffle(order)  # so that a small split still draws from all voices
    slots = [order[i % len(order)] for i in range(n - n_piper)]
    rng.shuffle(slots)
    piper_pos = set(rng.sample(range(n), n_piper)) if n_piper else set()
    it = iter(slots)
    return [piper[i % len(piper)] if i in piper_pos else next(it) for i in range(n)]


def plan_corpus(cfg: CorpusConfig, voices: list[Voice] | None = None) -> dict:
    """Everything about the corpus except the audio: texts, voices, speeds and pitches per split."""
    pool = select_voices(cfg.voices, voices)
    if not pool:
        raise SynthesisError("no TTS voice available: install espeakng-loader (pip) or flite/festival")
    ids = {v.id for v in pool}
    if cfg.holdout is None:
        holdout = choose_holdout(pool)
    else:
        holdout = [v.id for v in select_voices(cfg.holdout, pool)]
    train_voices = [v for v in pool if v.id not in set(holdout)]
    if not train_voices:
        raise SynthesisError("every voice is held out: nothing is left to voice the train split")
    held = [v for v in pool if v.id in set(holdout)]
    warnings = []
    counts = cfg.counts()
    if counts["test_unseen"] > 0 and not held:
        warnings.append("test_unseen is empty: there is no voice to hold out "
                        f"(voices: {sorted(ids)})")
        counts["test_unseen"] = 0
    texts = make_splits(counts, cfg.seed)
    utts: dict[str, list[Utterance]] = {}
    for split in SPLITS:
        rng = random.Random(f"harken-voices-{cfg.seed}-{split}")
        n = len(texts[split])
        split_voices = held if split == "test_unseen" else train_voices
        assigned = _assign(n, split_voices, rng, cfg.piper_fraction)
        rows = []
        for i, (text, voice) in enumerate(zip(texts[split], assigned)):
            uid = f"{split}-{i:05d}"
            r = random.Random(f"harken-prosody-{cfg.seed}-{uid}")
            speed = round(r.uniform(*SPEED_RANGE), 4)
            pitch = round(r.uniform(*PITCH_RANGE), 3)
            rows.append(Utterance(uid, split, text, voice, speed, pitch))
        utts[split] = rows
    return {"utterances": utts, "texts": texts, "holdout": [v.id for v in held],
            "train_voices": [v.id for v in train_voices], "voices": pool, "warnings": warnings}


# --------------------------------------------------------------------------------------------------
# workers
# --------------------------------------------------------------------------------------------------

def _worker_init() -> None:
    # engines are created lazily, once per worker process; keep each worker single-threaded
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch = sys.modules.get("torch")  # only if something already imported it
    if torch is not None:
        try:
            torch.set_num_threads(1)
        except Exception:
            pass


def _cpu_seconds() -> float:
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _synth_one(task: tuple) -> tuple:
    """(uid, path, text, voice, speed, pitch) -> (uid, duration or None, error or None, cpu_s, engine)"""
    uid, path, text, voice, speed, pitch = task
    t0 = _cpu_seconds()
    try:
        wave = voice.synthesize(text, speed, pitch)
        save_wav(path, wave, SAMPLE_RATE)
        dur = len(wave) / SAMPLE_RATE
        err = None
    except Exception as e:  # a bad utterance must not stop a long build; it is reported
        dur, err = None, f"{type(e).__name__}: {e}"
    return uid, dur, err, _cpu_seconds() - t0, voice.engine


def valid_wav_duration(path: str | os.PathLike) -> float | None:
    """Duration of an existing corpus wav if it is complete and usable, else None."""
    try:
        if os.path.getsize(path) <= 44:
            return None
        info = sf.info(str(path))
    except Exception:
        return None
    if info.samplerate != SAMPLE_RATE or info.channels != 1 or info.frames < int(0.05 * SAMPLE_RATE):
        return None
    return info.frames / SAMPLE_RATE


def _read_plan(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    if not path.exists():
        return out
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    d = json.loads(line)
                    out[d["id"]] = d.get("fingerprint", "")
    except Exception:
        return {}
    return out


def _write_json_atomic(path: Path, obj) -> None:
    with atomic_open(path, "w", fsync=False) as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


# --------------------------------------------------------------------------------------------------
# the build
# --------------------------------------------------------------------------------------------------

def synthesize_corpus(cfg: CorpusConfig, out_dir: str, jobs: int = 2, progress: bool = True) -> dict:
    """Build (or complete) the corpus in ``out_dir``; returns the summary also written to corpus.json."""
    start = time.time()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_corpus(cfg)
    for w in plan["warnings"]:
        log.warning(w)
    utts: dict[str, list[Utterance]] = plan["utterances"]
    all_utts = [u for split in SPLITS for u in utts[split]]

    # resume: keep wavs that exist, are valid, and were made for the same plan entry
    plan_path = out / "plan.jsonl"
    old = _read_plan(plan_path)
    durations: dict[str, float] = {}
    todo: list[Utterance] = []
    for u in all_utts:
        p = u.wav_path(out)
        d = valid_wav_duration(p) if old.get(u.id) == u.fingerprint else None
        if d is None:
            todo.append(u)
            if p.exists():  # stale (another plan) or broken: never let it pass for this plan
                p.unlink()
        else:
            durations[u.id] = d
    skipped = len(durations)
    for stale in out.glob("wav/*/.*.tmp*"):  # left by an interrupted save
        stale.unlink(missing_ok=True)
    # every wav left on disk now belongs to this plan, so the plan can be recorded before synthesis
    with atomic_open(plan_path, "w", fsync=False) as f:
        for u in all_utts:
            f.write(json.dumps(u.plan_row(), ensure_ascii=False) + "\n")

    todo.sort(key=lambda u: -_COST.get(u.voice.engine, 1.0))
    tasks = [(u.id, str(u.wav_path(out)), u.text, u.voice, u.speed, u.pitch) for u in todo]
    failed: dict[str, str] = {}
    engine_cpu: dict[str, float] = {}
    engine_audio: dict[str, float] = {}
    synth_start = time.time()
    if tasks:
        from tqdm import tqdm

        bar = tqdm(total=len(all_utts), initial=skipped, disable=not progress, unit="utt",
                   desc="synth", dynamic_ncols=True)
        jobs = max(1, min(int(jobs), len(tasks)))
        pool = None
        ok = False
        try:
            if jobs == 1:
                _worker_init()
                results = map(_synth_one, tasks)
            else:
                pool = mp.get_context("spawn").Pool(jobs, initializer=_worker_init)
                results = pool.imap_unordered(_synth_one, tasks, chunksize=4 if len(tasks) > 200 else 1)
            for uid, dur, err, cpu, engine in results:
                if err is None:
                    durations[uid] = dur
                    engine_audio[engine] = engine_audio.get(engine, 0.0) + dur
                else:
                    failed[uid] = err
                    log.warning("synthesis failed for %s: %s", uid, err)
                engine_cpu[engine] = engine_cpu.get(engine, 0.0) + cpu
                bar.update(1)
            ok = True
        finally:
            bar.close()
            if pool is not None:
                if ok:
                    pool.close()
                else:  # interrupted: stop now; finished wavs are kept and a re-run resumes
                    pool.terminate()
                pool.join()
    synth_wall = time.time() - synth_start

    # manifests
    counts, hours, per_voice, per_engine = {}, {}, {}, {}
    for split in SPLITS:
        records = []
        for u in utts[split]:
            if u.id not in durations:
                continue
            records.append(Record(
                id=u.id, audio=str(u.wav_path(out)), duration=round(durations[u.id], 4), text=u.text,
                speaker=u.voice.id, group=u.voice.group,
                extra={"engine": u.voice.engine, "speed": u.speed, "pitch": u.pitch}))
        write_manifest(out / f"{split}.jsonl", records, relative_to=str(out))
        counts[split] = len(records)
        hours[split] = round(sum(r.duration for r in records) / 3600, 4)
        per_voice[split] = sorted({r.speaker for r in records})
        eng: dict[str, int] = {}
        for r in records:
            eng[r.extra["engine"]] = eng.get(r.extra["engine"], 0) + 1
        per_engine[split] = eng

    stats = vocab_stats(plan["texts"])
    summary = {
        "config": asdict(cfg),
        "sample_rate": SAMPLE_RATE,
        "splits": {s: f"{s}.jsonl" for s in SPLITS},
        "counts": counts,
        "hours": hours,
        "utterances_per_engine": per_engine,
        "voices": per_voice,
        "holdout": plan["holdout"],
        "train_voices": plan["train_voices"],
        "voice_groups": {v.id: {"engine": v.engine, "group": v.group} for v in plan["voices"]},
        "vocab_size": stats["vocab_size"],
        "oov_rate": stats["oov_rate"],
        "oov_types": stats["oov_types"],
        "synthesized": len(tasks) - len(failed),
        "skipped": skipped,
        "failed": failed,
        "warnings": plan["warnings"],
        "speed": {e: {"audio_s": round(engine_audio.get(e, 0.0), 2), "cpu_s": round(engine_cpu[e], 2),
                      "audio_per_cpu_s": round(engine_audio.get(e, 0.0) / engine_cpu[e], 1)
                      if engine_cpu[e] > 0 else None} for e in engine_cpu},
        "synth_wall_s": round(synth_wall, 2),
        "elapsed_s": round(time.time() - start, 2),
    }
    _write_json_atomic(out / "corpus.json", summary)
    if failed:
        log.warning("%d utterances failed; re-run to retry them (see corpus.json 'failed')", len(failed))
    return summary
