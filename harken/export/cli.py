"""``harken export``: ONNX / sherpa-onnx / TorchScript / AOTInductor artifacts from a checkpoint.

    from harken.export.cli import add_commands as add_export_commands
    add_export_commands(sub)          # in harken.cli.build_parser()

    harken export --checkpoint exp/demo/best.pt --format onnx --quantize int8 --out export/ --verify \
        --manifest data/corpus/test_unseen.jsonl

Writes into ``--out``:

    onnx         model.onnx (+ model.int8.onnx)         waveform in, fbank + CMVN inside
    sherpa       sherpa/model.onnx (+ sherpa/model.int8.onnx), sherpa/tokens.txt   (WeNet-CTC contract)
    torchscript  model.ts                               torch.jit trace, waveform in; runs with
                                                        torch.jit.load alone (metadata: harken.json inside)
    pt2          model.pt2                              torch.export + AOTInductor package (compiled C++;
                                                        slow to build), torch._inductor.aoti_load_package

``--format`` may be given more than once. ``--verify`` prints a table (max abs log-prob difference
and argmax agreement vs PyTorch; greedy WER vs PyTorch's with ``--manifest``) and writes
``verify.json``. Errors a user can fix (missing checkpoint, unsupported export) print one line and
exit 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def cmd_export(a) -> int:
    from harken.export.onnx import ExportError, export_onnx
    from harken.export.quantize import quantize_int8

    if not Path(a.checkpoint).is_file():
        print(f"harken export: error: checkpoint not found: {a.checkpoint}", file=sys.stderr)
        return 2
    if a.manifest and not Path(a.manifest).is_file():
        print(f"harken export: error: manifest not found: {a.manifest}", file=sys.stderr)
        return 2
    out = Path(a.out)
    formats = a.format or ["onnx"]
    written: list[Path] = []
    try:
        for fmt in dict.fromkeys(formats):
            if fmt == "onnx":
                p = export_onnx(a.checkpoint, out / "model.onnx", "wave", opset=a.opset)
            elif fmt == "sherpa":
                p = export_onnx(a.checkpoint, out / "sherpa" / "model.onnx", "sherpa-wenet", opset=a.opset,
                                force=a.force)
            else:
                if a.quantize:
                    print(f"harken export: note: --quantize applies to ONNX only; {fmt} stays float",
                          file=sys.stderr)
                if fmt == "torchscript":
                    from harken.export.torchscript import export_torchscript

                    p = export_torchscript(a.checkpoint, out / "model.ts")
                else:
                    from harken.export.pt2 import export_pt2

                    p = export_pt2(a.checkpoint, out / "model.pt2")
                written.append(p)
                print(f"wrote {p}", file=sys.stderr)
                continue
            written.append(p)
            print(f"wrote {p}", file=sys.stderr)
            if a.quantize == "int8":
                q = quantize_int8(p, p.with_name("model.int8.onnx"))
                written.append(q)
                print(f"wrote {q}", file=sys.stderr)
    except (ExportError, ValueError) as e:
        print(f"harken export: error: {e}", file=sys.stderr)
        return 2
    result: dict = {"artifacts": [str(p) for p in written]}
    if a.verify:
        from harken.export.verify import format_rows, verify_artifacts

        rows = verify_artifacts(a.checkpoint, written, a.manifest, max_utts=a.max_utts,
                                num_threads=a.threads or None)
        print(format_rows(rows))
        (out / "verify.json").write_text(json.dumps(rows, indent=1))
        result["verify"] = rows
    print(json.dumps(result))
    return 0


def add_commands(sub) -> None:
    """Add ``export`` to harken's subparsers."""
    s = sub.add_parser("export", help="export a checkpoint to ONNX / sherpa-onnx / TorchScript / AOTInductor")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--format", action="append", choices=["onnx", "sherpa", "torchscript", "pt2"],
                   help="onnx: waveform-in ONNX; sherpa: sherpa-onnx WeNet-CTC ONNX + tokens.txt; "
                        "torchscript: waveform-in TorchScript (model.ts); pt2: torch.export program compiled "
                        "by AOTInductor (model.pt2; takes minutes). Repeatable; default onnx")
    s.add_argument("--quantize", choices=["int8"], default=None,
                   help="also write a dynamically quantized copy (QUInt8 weights) of each ONNX model")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--opset", type=int, default=18)
    s.add_argument("--force", action="store_true",
                   help="sherpa: export even if the checkpoint's fbank differs from sherpa's front end")
    s.add_argument("--verify", action="store_true", help="compare every artifact with PyTorch")
    s.add_argument("--manifest", default=None, help="with --verify: also compare greedy WER on this manifest")
    s.add_argument("--max-utts", type=int, default=None, help="with --manifest: use only the first N")
    s.add_argument("--threads", type=int, default=0)
    s.set_defaults(func=cmd_export)


def main(argv: list[str] | None = None) -> int:
    """``python -m harken.export.cli export ...`` (the same command without harken's main CLI)."""
    import argparse

    p = argparse.ArgumentParser(prog="harken")
    sub = p.add_subparsers(dest="cmd", required=True)
    add_commands(sub)
    a = p.parse_args(argv)
    try:
        return a.func(a)
    except FileNotFoundError as e:
        print(f"harken {a.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
