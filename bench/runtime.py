"""Runtime speed (RTF) and accuracy (WER) of one model in several runtimes, plus pocketsphinx.

Engines, all on the same utterances, greedy CTC, one utterance per call (batch 1):

    engine-torch        harken's Engine as a user calls it: the WAV file's bytes in
                        (``Engine.transcribe(bytes)``: decode, resample check, batch of one, forward,
                        greedy decoding), text out; torch backend
    engine-torch+words  the same with ``DecodeOptions(word_timestamps=True)`` (forced alignment)
    engine-ort          / engine-ort+words: the Engine on the wave ONNX export (onnxruntime)
    engine-torchscript  the Engine on the TorchScript export; engine-pt2: on the AOTInductor package
    torch        PyTorch eager (the checkpoint itself, fbank + CMVN in torch), raw model + greedy
    ort-fp32     onnxruntime, the wave ONNX export (fbank + CMVN inside the graph)
    ort-int8     onnxruntime, the same export dynamically quantized (QUInt8 weights)
    sherpa-onnx  sherpa-onnx 2.0.1 OfflineRecognizer on the sherpa-wenet export (its own fbank in C++,
                 with its built-in dither, so its WER can differ slightly)
    pocketsphinx pocketsphinx 5.1.1 with its bundled en-us acoustic model, dictionary and LM, fed
                 16 kHz int16 PCM; its text is passed through harken's normalize_text. It is
                 single-threaded, so its "2 threads" row is the same engine timed again.

Each (engine, threads) configuration is timed on every utterance, interleaved: at each thread
count, for each utterance all engines run back to back (in an order rotated per utterance), so the
machine's speed swings hit them alike (torch's thread count is set once per thread pass).
RTF = decode seconds / audio seconds (audio loading, export and model loading excluded). The SGEMM
rate at 1 thread is probed before and after, to tell a slow host from a slow engine. One run;
absolute numbers drift on a shared host, compare rows.

    python bench/runtime.py [--checkpoint exp/demo/best.pt] [--manifest data/corpus/test_unseen.jsonl]
                            [--threads 1,2] [--max-utts N] [--export-dir DIR] [--engines torch,ort-fp32,...]

Prints a markdown table and one ``RESULT {json}`` line per row.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import emit, sgemm_gflops  # noqa: E402

ENGINES = ["engine-torch", "engine-torch+words", "engine-ort", "engine-ort+words", "engine-torchscript",
           "engine-pt2", "torch", "ort-fp32", "ort-int8", "sherpa-onnx", "pocketsphinx"]
DEFAULT_ENGINES = ["engine-torch", "engine-torch+words", "engine-ort", "engine-ort+words", "torch", "ort-fp32",
                   "ort-int8", "sherpa-onnx", "pocketsphinx"]


def build_engines(ckpt: str, export_dir: Path, threads: list[int], names: list[str]) -> tuple[dict, dict]:
    """``{(engine, threads): callable(item) -> text}`` and ``{engine: note}``; ``item`` is
    ``(waveform, file bytes)``."""
    from harken.decode.greedy import greedy_ids
    from harken.export.onnx import export_onnx
    from harken.export.quantize import quantize_int8
    from harken.export.verify import OnnxCtc
    from harken.recognizer import Recognizer

    rec = Recognizer.load(ckpt)
    tok, model = rec.tokenizer, rec.model
    out: dict = {}
    notes: dict = {}

    def ctc_text(lp, n):
        return tok.decode(greedy_ids(torch.as_tensor(lp), torch.as_tensor(n))[0])

    from harken.runtime import DecodeOptions, Engine

    plain, words = DecodeOptions(), DecodeOptions(word_timestamps=True)
    for t in threads:
        if "engine-torch" in names or "engine-torch+words" in names:
            eng = Engine.load(ckpt)  # torch threads: set per pass by the timing loop
            out[("engine-torch", t)] = lambda it, e=eng: e.transcribe(it[1], options=plain).text
            out[("engine-torch+words", t)] = lambda it, e=eng: e.transcribe(it[1], options=words).text
    if "torch" in names:
        for t in threads:
            def run_torch(it):
                w = it[0]
                with torch.inference_mode():
                    lp, n = model(torch.from_numpy(w)[None], torch.tensor([len(w)]))
                return ctc_text(lp, n)
            out[("torch", t)] = run_torch
    wave_path = export_dir / "model.onnx"
    if {"ort-fp32", "ort-int8", "engine-ort", "engine-ort+words"} & set(names):
        export_onnx(ckpt, wave_path, "wave")
    for t in threads:
        if {"engine-ort", "engine-ort+words"} & set(names):
            eng = Engine.load(wave_path, num_threads=t)
            out[("engine-ort", t)] = lambda it, e=eng: e.transcribe(it[1], options=plain).text
            out[("engine-ort+words", t)] = lambda it, e=eng: e.transcribe(it[1], options=words).text
    for name, fmt, suffix in (("engine-torchscript", "torchscript", ".ts"), ("engine-pt2", "pt2", ".pt2")):
        if name not in names:
            continue
        try:
            if fmt == "torchscript":
                from harken.export.torchscript import export_torchscript as export_fn
            else:
                from harken.export.pt2 import export_pt2 as export_fn
            path = export_fn(ckpt, export_dir / f"model{suffix}")
            for t in threads:
                eng = Engine.load(path, num_threads=t)
                out[(name, t)] = lambda it, e=eng: e.transcribe(it[1], options=plain).text
        except Exception as e:  # noqa: BLE001
            notes[name] = f"skipped: {type(e).__name__}: {e}"
    int8_path = export_dir / "model.int8.onnx"
    if "ort-int8" in names:
        quantize_int8(wave_path, int8_path)
    for name, path in (("ort-fp32", wave_path), ("ort-int8", int8_path)):
        if name not in names:
            continue
        for t in threads:
            m = OnnxCtc(path, num_threads=t)

            def run_ort(it, m=m):
                w = it[0]
                lp, n = m(w[None], np.array([len(w)], dtype=np.int64))
                return ctc_text(lp, n)
            out[(name, t)] = run_ort
    if "sherpa-onnx" in names:
        try:
            import sherpa_onnx  # noqa: F401

            from harken.export.sherpa import clean_text, probe, recognizer

            sp = export_dir / "sherpa" / "model.onnx"
            export_onnx(ckpt, sp, "sherpa-wenet")
            probe(sp, sp.parent / "tokens.txt")  # a contract violation would kill this process
            for t in threads:
                r = recognizer(sp, sp.parent / "tokens.txt", num_threads=t)

                def run_sherpa(it, r=r):
                    w = it[0]
                    s = r.create_stream()
                    s.accept_waveform(16000, w)
                    r.decode_stream(s)
                    return clean_text(s.result.text)
                out[("sherpa-onnx", t)] = run_sherpa
        except Exception as e:  # not installed, or a front end sherpa cannot run
            notes["sherpa-onnx"] = f"skipped: {type(e).__name__}: {e}"
    if "pocketsphinx" in names:
        try:
            from pocketsphinx import Decoder

            from harken.text.normalize import normalize_text

            for t in threads:  # one decoder per row: its live CMN adapts across utterances, so each
                dec = Decoder(loglevel="ERROR")  # row must see the same utterance sequence
                if int(dec.config["samprate"]) != 16000:
                    raise RuntimeError(f"bundled model expects {dec.config['samprate']} Hz")

                def run_ps(it, dec=dec):
                    w = it[0]
                    pcm = (np.clip(w, -1.0, 1.0) * 32767.0).astype(np.int16).tobytes()
                    dec.start_utt()
                    dec.process_raw(pcm, full_utt=True)
                    dec.end_utt()
                    h = dec.hyp()
                    return normalize_text(h.hypstr) if h is not None else ""
                out[("pocketsphinx", t)] = run_ps
            notes["pocketsphinx"] = "bundled en-us model + LM, default config; single-threaded (threads ignored)"
        except Exception as e:
            notes["pocketsphinx"] = f"skipped: {type(e).__name__}: {e}"
    return out, notes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="exp/demo/best.pt")
    p.add_argument("--manifest", default="data/corpus/test_unseen.jsonl")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--max-utts", type=int, default=0, help="use the first N utterances (0: all)")
    p.add_argument("--export-dir", default=None, help="write (and keep) the exports here; default: a temp dir")
    p.add_argument("--engines", default=",".join(DEFAULT_ENGINES), help=f"any of {','.join(ENGINES)}")
    a = p.parse_args(argv)

    from harken.audio import load_audio
    from harken.data.manifest import read_manifest
    from harken.evaluate import error_report
    from harken.text.normalize import normalize_text

    for path, what in ((a.checkpoint, "checkpoint"), (a.manifest, "manifest")):
        if not Path(path).is_file():
            print(f"bench/runtime.py: error: {what} not found: {path}", file=sys.stderr)
            return 2
    names = [e for e in a.engines.split(",") if e]
    unknown = set(names) - set(ENGINES)
    if unknown:
        print(f"bench/runtime.py: error: unknown engines {sorted(unknown)}; known: {ENGINES}", file=sys.stderr)
        return 2
    threads = [int(x) for x in a.threads.split(",") if x]
    recs = read_manifest(a.manifest)
    if a.max_utts:
        recs = recs[: a.max_utts]
    waves = [load_audio(r.audio, offset=r.offset, duration=r.duration) for r in recs]
    blobs = []  # what a user hands the Engine: the file's bytes
    for r, w in zip(recs, waves):
        if not r.offset and str(r.audio).endswith(".wav"):
            blobs.append(Path(r.audio).read_bytes())
        else:
            import io

            import soundfile as sf

            buf = io.BytesIO()
            sf.write(buf, w, 16000, subtype="PCM_16", format="WAV")
            blobs.append(buf.getvalue())
    items = list(zip(waves, blobs))
    refs = [normalize_text(r.text) for r in recs]
    audio_s = sum(len(w) for w in waves) / 16000.0

    tmp = None
    if a.export_dir:
        export_dir = Path(a.export_dir)
        export_dir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="harken-bench-")
        export_dir = Path(tmp.name)
    torch.set_num_threads(max(threads))
    engines, notes = build_engines(a.checkpoint, export_dir, threads, names)
    configs = list(engines)
    for c in configs:  # warm-up (first-call allocations, ORT arena, pocketsphinx search setup)
        torch.set_num_threads(c[1])
        engines[c](items[0])

    torch.set_num_threads(1)
    gemm_before = sgemm_gflops(1024)
    secs = {c: 0.0 for c in configs}
    hyps = {c: [""] * len(waves) for c in configs}
    for t in threads:  # thread count outermost: switching torch's pool size per call costs time
        torch.set_num_threads(t)
        group = [c for c in configs if c[1] == t]
        for i, it in enumerate(items):
            k = i % len(group)
            for c in group[k:] + group[:k]:
                t0 = time.perf_counter()
                hyps[c][i] = engines[c](it)
                secs[c] += time.perf_counter() - t0
    torch.set_num_threads(1)
    gemm_after = sgemm_gflops(1024)

    rows = []
    for c in configs:
        rep = error_report(refs, hyps[c])
        rows.append({"engine": c[0], "threads": c[1], "rtf": secs[c] / audio_s, "wer": rep.wer, "cer": rep.cer,
                     "utts": len(waves), "audio_s": round(audio_s, 2), "note": notes.get(c[0], "")})
    print(f"\n{len(waves)} utterances, {audio_s:.1f} s of audio from {a.manifest}; checkpoint {a.checkpoint}")
    print(f"SGEMM 1 thread: {gemm_before:.0f} GFLOP/s before, {gemm_after:.0f} after\n")
    raw = {"engine-torch": "torch", "engine-torch+words": "torch", "engine-ort": "ort-fp32",
           "engine-ort+words": "ort-fp32", "engine-torchscript": "torch", "engine-pt2": "torch"}
    by = {(r["engine"], r["threads"]): r for r in rows}
    for r in rows:
        base = by.get((raw.get(r["engine"], ""), r["threads"]))
        r["vs_raw"] = r["rtf"] / base["rtf"] if base else None
    print("| engine | threads | RTF | x real time | vs raw model | WER | CER | note |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        vs = f"{r['vs_raw']:.2f}x" if r["vs_raw"] else ""
        print(f"| {r['engine']} | {r['threads']} | {r['rtf']:.4f} | {1 / max(r['rtf'], 1e-9):.1f} | {vs} | "
              f"{100 * r['wer']:.2f}% | {100 * r['cer']:.2f}% | {r['note']} |")
    for name, note in notes.items():
        if note.startswith("skipped"):
            print(f"\n{name}: {note}")
    print()
    for r in rows:
        emit("runtime", {**r, "rtf": round(r["rtf"], 5), "wer": round(r["wer"], 4), "cer": round(r["cer"], 4),
                         "sgemm_gflops_1t": [round(gemm_before, 1), round(gemm_after, 1)],
                         "checkpoint": a.checkpoint, "manifest": a.manifest})
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
