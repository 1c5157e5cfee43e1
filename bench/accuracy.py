"""WER tables for one or more checkpoints on several manifests, overall and per manifest field.

The A/B and per-engine tables in BENCHMARKS.md come from this script:

    python bench/accuracy.py --model base=exp/ab-base/best.pt --model ema=exp/ab-ema/best.pt \\
        --set dev=data/demo/dev.jsonl --set test_unseen=data/demo/test_unseen.jsonl \\
        --set realdev=data/realdev/realdev.jsonl --group-by engine --json out.json

Greedy decoding unless ``--lm`` is given (then beam search with that ARPA LM as well, in extra
columns). Rows are printed as a Markdown table; ``--json`` keeps every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harken.data.manifest import read_manifest  # noqa: E402
from harken.evaluate import decode_records, error_report, record_field  # noqa: E402
from harken.runtime import DecodeOptions, Engine  # noqa: E402


def field_value(rec, name: str) -> str:
    return record_field(rec, name) or "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, help="NAME=checkpoint (.pt or .onnx)")
    ap.add_argument("--set", action="append", required=True, help="NAME=manifest.jsonl")
    ap.add_argument("--group-by", default=None, help="manifest field for per-value rows (engine, speaker, ...)")
    ap.add_argument("--lm", default=None, help="ARPA LM: also decode with beam_lm")
    ap.add_argument("--lm-weight", type=float, default=1.5)
    ap.add_argument("--word-bonus", type=float, default=4.0)
    ap.add_argument("--beam-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rescore", default=None, metavar="WHISPER_DIR",
                    help="also rescore the beam_lm n-best with Whisper's decoder (harken.decode.rescore): a "
                         "CTranslate2 Whisper dir / pkg:PACKAGE/DIR for every model, or 'auto': each Whisper-CTC "
                         "model's own (other models skip it)")
    ap.add_argument("--rescore-weight", type=float, default=1.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    sets = [s.split("=", 1) for s in args.set]
    models = [m.split("=", 1) for m in args.model]
    decodes = [("greedy", DecodeOptions())]
    if args.lm:
        decodes.append(("beam_lm", DecodeOptions(method="beam_lm", lm_path=args.lm, lm_weight=args.lm_weight,
                                                 word_bonus=args.word_bonus, beam_size=args.beam_size)))
    if args.rescore and not args.lm:
        ap.error("--rescore rescores the beam_lm n-best: give --lm too")
    if args.rescore:
        decodes.append(("beam_lm+rescore", decodes[-1][1].with_(rescore=args.rescore,
                                                                rescore_weight=args.rescore_weight)))
    records = {name: read_manifest(path) for name, path in sets}
    results = []
    for mname, path in models:
        eng = Engine.load(path, num_threads=args.threads)
        model_decodes = decodes
        if args.rescore:
            try:
                eng.rescorer(decodes[-1][1])
            except ValueError as e:
                print(f"{mname}: no rescoring ({e})", file=sys.stderr)
                model_decodes = decodes[:-1]
        for sname, recs in records.items():
            for dname, opts in model_decodes:
                t0 = time.perf_counter()
                hyps = decode_records(eng, recs, opts)
                dt = time.perf_counter() - t0
                refs = [r.text for r in recs]
                rows = [("all", refs, hyps)]
                if args.group_by:
                    vals = sorted({field_value(r, args.group_by) for r in recs})
                    for v in vals if vals != ["?"] else []:  # a set without the field: its "all" row only
                        idx = [i for i, r in enumerate(recs) if field_value(r, args.group_by) == v]
                        rows.append((v, [refs[i] for i in idx], [hyps[i] for i in idx]))
                for gname, rr, hh in rows:
                    rep = error_report(rr, hh)
                    results.append({"model": mname, "set": sname, "decode": dname, "group": gname,
                                    "wer": rep.wer, "cer": rep.cer, "utts": rep.num_utts,
                                    "words": rep.num_words, "seconds": dt if gname == "all" else None})
                print(f"{mname} {sname} {dname}: WER {results[-len(rows)]['wer']:.1%} ({dt:.1f} s)",
                      file=sys.stderr, flush=True)
    # markdown: one row per (model, decode, group), one column per set
    print("| model | decode | " + (f"{args.group_by} | " if args.group_by else "")
          + " | ".join(n for n, _ in sets) + " |")
    print("|---|---|" + ("---|" if args.group_by else "") + "---:|" * len(sets))
    keys = []
    for r in results:
        k = (r["model"], r["decode"], r["group"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        cells = []
        for sname, _ in sets:
            hit = [r for r in results if (r["model"], r["decode"], r["group"]) == k and r["set"] == sname]
            cells.append(f"{hit[0]['wer']:.1%} ({hit[0]['utts']})" if hit else "-")
        print(f"| {k[0]} | {k[1]} | " + (f"{k[2]} | " if args.group_by else "") + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
