"""Command-line pieces for decoding: ``harken lm build``, ``harken tune`` and the shared decoding
options of ``harken eval`` / ``harken transcribe``.

    from harken.decode.cli import add_commands, add_decode_args, decode_config_from_args
    add_commands(sub)                 # in build_parser(), after the other subparsers
    add_decode_args(eval_parser)      # --decode --lm --lm-weight --word-bonus --beam-size --hotword
    cfg = decode_config_from_args(a)  # a harken.decode.DecodeConfig
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _floats(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def add_decode_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding")
    g.add_argument("--decode", choices=["greedy", "beam", "beam_lm"], default=None,
                   help="decoding method (default: greedy; beam_lm when --lm is given)")
    g.add_argument("--lm", default=None, help="word n-gram LM (ARPA) for --decode beam_lm")
    g.add_argument("--lm-weight", type=float, default=0.5, help="LM weight (natural-log LM score)")
    g.add_argument("--word-bonus", type=float, default=0.0, help="score added per word with an LM")
    g.add_argument("--beam-size", type=int, default=8)
    g.add_argument("--hotword", action="append", default=[], metavar="PHRASE[:BOOST]",
                   help="bias the beam search towards PHRASE, BOOST per token (default 2.0); repeatable")
    g.add_argument("--hotwords-file", default=None, help="file with one PHRASE[:BOOST] per line")
    g.add_argument("--rescore", default=None, metavar="WHISPER_DIR",
                   help="rescore the beam's n-best with Whisper's decoder: a CTranslate2 Whisper directory, "
                        "pkg:PACKAGE/DIR, or 'auto' (a Whisper-CTC model's own); implies --decode beam")
    g.add_argument("--rescore-weight", type=float, default=None,
                   help="weight of Whisper's log-probability against the beam's score (default 1.0)")
    g.add_argument("--rescore-nbest", type=int, default=None,
                   help="candidates rescored (default 16; the beam gives at most --beam-size)")


def decode_config_from_args(a: argparse.Namespace):
    from harken.decode import DecodeConfig
    from harken.decode.context import parse_hotword

    specs = list(getattr(a, "hotword", None) or [])
    if getattr(a, "hotwords_file", None):
        with open(a.hotwords_file, encoding="utf-8") as f:
            specs += [line.strip() for line in f if line.strip() and not line.startswith("#")]
    hot = [parse_hotword(s) for s in specs]
    rescore = a.rescore
    method = a.decode or ("beam_lm" if a.lm else ("beam" if hot or rescore else "greedy"))
    if method == "beam_lm" and not a.lm:
        raise ValueError("--decode beam_lm needs --lm PATH")
    if a.lm and not Path(a.lm).exists():
        raise FileNotFoundError(f"language model {a.lm} not found")
    if rescore is None and (a.rescore_weight is not None or a.rescore_nbest is not None):
        raise ValueError("--rescore-weight / --rescore-nbest need --rescore")
    if rescore and rescore != "auto" and not rescore.startswith("pkg:") and not Path(rescore).is_dir():
        raise FileNotFoundError(f"--rescore {rescore}: no such directory")
    extra = {}
    if rescore:
        from harken.decode.rescore import DEFAULT_RESCORE_NBEST, DEFAULT_RESCORE_WEIGHT

        extra = dict(rescore=rescore,
                     rescore_weight=DEFAULT_RESCORE_WEIGHT if a.rescore_weight is None else a.rescore_weight,
                     rescore_nbest=DEFAULT_RESCORE_NBEST if a.rescore_nbest is None else a.rescore_nbest)
    return DecodeConfig(method=method, beam_size=a.beam_size, lm_path=a.lm, lm_weight=a.lm_weight,
                        word_bonus=a.word_bonus, hotwords=hot, **extra).validate()


# ------------------------------------------------------------------------------------ lm build
def lm_training_text(texts=(), manifests=(), sentence_files=()) -> list[str]:
    """Lines for an LM: text files (one sentence per line), the transcripts of manifests, and the
    sentences of prose / fortune files (cut and filtered by :func:`harken.data.corpus.textfile.read_sentences`,
    the rule ``harken synth --text-file`` uses, but any length from 1 word up to 60)."""
    from harken.data.manifest import read_manifest

    lines: list[str] = []
    for t in texts:
        if not Path(t).is_file():
            raise FileNotFoundError(f"text file {t} not found")
        with open(t, encoding="utf-8") as f:
            lines += [x.strip() for x in f if x.strip()]
    for m in manifests:
        if not Path(m).is_file():
            raise FileNotFoundError(f"manifest {m} not found")
        lines += [r.text for r in read_manifest(m) if r.text.strip()]
    if sentence_files:
        from harken.data.corpus.textfile import read_sentences

        for t in sentence_files:
            if not Path(t).is_file():
                raise FileNotFoundError(f"sentence file {t} not found")
        lines += read_sentences(sentence_files, min_words=1, max_words=60)
    return lines


def cmd_lm_build(a) -> int:
    import tempfile

    from harken.decode.lm import build_lm

    if not (a.text or a.manifest or a.sentences):
        raise ValueError("harken lm build needs training text: --text, --manifest or --sentences (each repeatable)")
    lines = lm_training_text(a.text, a.manifest, a.sentences)
    if not lines:
        raise ValueError("the LM's training text is empty (no non-blank line in --text/--manifest/--sentences)")
    t0 = time.time()
    use = False if a.builtin else None
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "lm_text.txt"
        text.write_text("\n".join(lines) + "\n", encoding="utf-8")
        which = build_lm(str(text), a.order, a.out, normalize=not a.no_normalize, use_lmplz=use)
    counts = []
    with open(a.out, encoding="utf-8") as f:
        for line in f:
            if line.startswith("ngram "):
                counts.append(int(line.split("=")[1]))
            elif line.startswith("\\1-grams"):
                break
    print(json.dumps({"arpa": str(a.out), "order": a.order, "estimator": which, "lines": len(lines), "ngrams": counts,
                      "seconds": round(time.time() - t0, 2)}))
    return 0


# ------------------------------------------------------------------------------------ tune
def cmd_tune(a) -> int:
    from harken.data.manifest import read_manifest
    from harken.decode.context import parse_hotword
    from harken.decode.tune import grid_search
    from harken.evaluate import log_probs_for_records
    from harken.recognizer import Recognizer
    from harken.text.normalize import normalize_text

    if not Path(a.lm).exists():
        raise FileNotFoundError(f"language model {a.lm} not found")
    rec = Recognizer.load(a.checkpoint, num_threads=a.threads or None)
    records = read_manifest(a.manifest)
    refs = [normalize_text(r.text) for r in records]
    lps = log_probs_for_records(rec, records, max_duration=a.max_duration)
    table: list = []
    w, b, wer = grid_search(lps, refs, rec.tokenizer, a.lm, a.lm_weights, a.word_bonuses,
                            beam_size=a.beam_size, hotwords=[parse_hotword(s) for s in a.hotword],
                            table=table)
    for tw, tb, twer in table:
        print(f"lm_weight={tw:<6g} word_bonus={tb:<6g} WER={100 * twer:6.2f}%")
    out = {"lm_weight": w, "word_bonus": b, "wer": round(wer, 4), "utts": len(records)}
    if a.rescore:
        out.update(_tune_rescore(a, rec, records, refs, lps, w, b))
    print(json.dumps(out))
    return 0


def _tune_rescore(a, rec, records, refs, lps, lm_weight: float, word_bonus: float) -> dict:
    """The rescoring weight on top of the best (lm_weight, word_bonus): the n-best is decoded and
    scored by Whisper once, then every weight of ``--rescore-weights`` (0 = no rescoring) is tried."""
    import torch

    from harken.data.dataset import AsrDataset
    from harken.decode import DecodeConfig, build_decoder
    from harken.decode.context import parse_hotword
    from harken.decode.rescore import SAMPLE_RATE
    from harken.decode.tune import rescore_grid
    from harken.runtime import DecodeOptions

    rs = rec.rescorer(DecodeOptions(method="beam", rescore=a.rescore))
    dec = build_decoder(rec.tokenizer, DecodeConfig(
        method="beam_lm", beam_size=max(a.beam_size, a.rescore_nbest), lm_path=a.lm, lm_weight=lm_weight,
        word_bonus=word_bonus, hotwords=[parse_hotword(s) for s in a.hotword]))
    ds = AsrDataset(records, sample_rate=SAMPLE_RATE)  # the audio as evaluation reads it
    nbests, scores = [], []
    for i, lp in enumerate(lps):
        lp = torch.as_tensor(lp)
        hs = dec.decode(lp[None], torch.tensor([lp.shape[0]]), nbest=a.rescore_nbest)[0]
        wave = ds.load(i, 0)
        nbests.append(hs)
        scores.append(rs.score(wave, [h.text for h in hs]) if len(hs) > 1 else [0.0] * len(hs))
    table: list = []
    w, wer = rescore_grid(nbests, scores, refs, a.rescore_weights, table)
    for tw, twer in table:
        print(f"rescore_weight={tw:<6g} WER={100 * twer:6.2f}%")
    return {"rescore_weight": w, "rescore_wer": round(wer, 4), "rescore_nbest": a.rescore_nbest}


def add_commands(sub) -> None:
    """Add ``lm`` (``lm build``) and ``tune`` to harken's subparsers."""
    s = sub.add_parser("lm", help="word n-gram language models")
    lsub = s.add_subparsers(dest="lm_cmd", required=True)
    b = lsub.add_parser("build", help="estimate an interpolated modified Kneser-Ney ARPA model")
    b.add_argument("--text", action="append", default=[], help="training text, one sentence per line; repeatable")
    b.add_argument("--manifest", action="append", default=[],
                   help="a manifest whose transcripts join the text; repeatable")
    b.add_argument("--sentences", action="append", default=[], metavar="FILE",
                   help="prose or a fortune file, cut into sentences (as harken synth --text-file); repeatable")
    b.add_argument("--order", type=int, default=3)
    b.add_argument("--out", required=True, help="ARPA file to write")
    b.add_argument("--no-normalize", action="store_true", help="use lines as they are (no normalize_text)")
    b.add_argument("--builtin", action="store_true", help="use harken's estimator even if lmplz is on PATH")
    b.set_defaults(func=cmd_lm_build)

    t = sub.add_parser("tune", help="grid-search LM weight and word bonus on a dev manifest")
    t.add_argument("--checkpoint", required=True)
    t.add_argument("--manifest", required=True)
    t.add_argument("--lm", required=True)
    t.add_argument("--lm-weights", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0, 1.5])
    t.add_argument("--word-bonuses", type=_floats, default=[-1.0, 0.0, 1.0, 2.0])
    t.add_argument("--beam-size", type=int, default=8)
    t.add_argument("--hotword", action="append", default=[], metavar="PHRASE[:BOOST]")
    t.add_argument("--max-duration", type=float, default=200.0)
    t.add_argument("--threads", type=int, default=0)
    t.add_argument("--rescore", default=None, metavar="WHISPER_DIR",
                   help="also pick the Whisper-decoder rescoring weight (auto: a Whisper-CTC model's own Whisper)")
    t.add_argument("--rescore-weights", type=_floats, default=[0.0, 0.3, 0.5, 1.0, 2.0])
    t.add_argument("--rescore-nbest", type=int, default=16)
    t.set_defaults(func=cmd_tune)
