"""The gRPC interface of ``harken serve``: ``harken_asr.proto`` (shipped in the package) and the
modules protoc generates from it (``harken_asr_pb2``, ``harken_asr_pb2_grpc``, committed).

Regenerate after editing the .proto (needs ``grpcio-tools``)::

    python -m harken.serve.proto
"""

from __future__ import annotations

from pathlib import Path

PROTO = Path(__file__).with_name("harken_asr.proto")
NOQA = "# ruff: noqa\n"

__all__ = ["PROTO", "generate"]


def generate(out_root: str | Path | None = None) -> list[Path]:
    """Run protoc (grpcio-tools) on the shipped .proto; writes ``harken/serve/proto/harken_asr_pb2.py``
    and ``..._pb2_grpc.py`` (and the ``.pyi`` stub) under ``out_root`` (default: the installed package's
    root) and returns their paths."""
    import grpc_tools
    from grpc_tools import protoc

    root = PROTO.parents[3]  # the folder holding the `harken` package
    out = Path(out_root) if out_root is not None else root
    rel = PROTO.relative_to(root).as_posix()
    (out / PROTO.parent.relative_to(root)).mkdir(parents=True, exist_ok=True)
    include = Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main(["grpc_tools.protoc", f"-I{root}", f"-I{include}", f"--python_out={out}",
                      f"--pyi_out={out}", f"--grpc_python_out={out}", rel])
    if rc != 0:
        raise RuntimeError(f"protoc failed on {PROTO} (exit {rc})")
    d = out / PROTO.parent.relative_to(root)
    paths = [d / "harken_asr_pb2.py", d / "harken_asr_pb2.pyi", d / "harken_asr_pb2_grpc.py"]
    for p in paths:  # generated code: exempt from the project's lint rules
        text = p.read_text(encoding="utf-8")
        if not text.startswith(NOQA):
            p.write_text(NOQA + text, encoding="utf-8")
    return paths
