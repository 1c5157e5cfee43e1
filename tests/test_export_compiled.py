"""TorchScript and torch.export/AOTInductor exports: the files run without harken, at any batch size
and length, match eager PyTorch within 1e-4, and carry the model facts; and the engine backends
over them (harken.runtime.backends_compiled)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from harken.config import load_config, to_dict
from harken.export.onnx import ExportError, build_metadata
from harken.export.torchscript import (
    WaveCtcCore,
    export_model_torchscript,
    min_input_samples,
    read_torchscript_metadata,
    trace_model,
)
from harken.models.build import build_model
from harken.runtime.backends_compiled import Pt2Backend, TorchScriptBackend, open_compiled
from harken.text.tokenizer import CharTokenizer

TINY = [
    "model.encoder.d_model=64", "model.encoder.num_layers=2", "model.encoder.num_heads=2",
    "model.encoder.ff_dim=128", "model.encoder.conv_kernel=7", "model.encoder.subsampling_channels=16",
    "model.encoder.dropout=0.0", "tokenizer.kind=char",
]


def _model(*extra: str):
    cfg = load_config(None, TINY + list(extra))
    tok = CharTokenizer.build(["the quick brown fox jumps over the lazy dog"])
    torch.manual_seed(0)
    model = build_model(cfg, tok.vocab_size).eval()
    with torch.no_grad():  # CMVN that is not the identity, so a dropped CMVN would show
        model.frontend.cmvn.mean.uniform_(5.0, 10.0)
        model.frontend.cmvn.istd.uniform_(0.2, 0.5)
    return model, tok, cfg


@pytest.fixture(scope="module")
def speech(tiny_corpus):
    """Two synthesized utterances: one as it is, one made ~8x longer by concatenation."""
    from harken.audio import load_audio
    from harken.data.manifest import read_manifest

    corpus, _ = tiny_corpus
    recs = read_manifest(corpus / "test_seen.jsonl")
    waves = [load_audio(r.audio, 16000) for r in recs[:4]]
    short = waves[0][: int(0.7 * 16000)].astype(np.float32)
    long = np.concatenate(waves).astype(np.float32)
    while len(long) <= 6 * len(short):
        long = np.concatenate([long, waves[0]]).astype(np.float32)
    assert len(long) > 6 * len(short)
    return short, long


@pytest.fixture(scope="module")
def ts_export(tmp_path_factory):
    model, tok, cfg = _model()
    out = tmp_path_factory.mktemp("ts") / "model.ts"
    export_model_torchscript(model, tok, cfg, out)
    return model, tok, cfg, out


def _eager(model, wave: np.ndarray):
    with torch.no_grad():
        return WaveCtcCore(model)(torch.from_numpy(wave)[None], torch.tensor([len(wave)]))


CHILD = textwrap.dedent("""
    import importlib.util, json, sys
    class BlockHarken:  # the editable install's finder would find the repo: refuse it outright
        def find_spec(self, name, path=None, target=None):
            if name == "harken" or name.startswith("harken."):
                raise ImportError("harken must not be needed to run the exported file")
    sys.meta_path.insert(0, BlockHarken())
    import numpy as np, torch
    files = {"harken.json": ""}
    m = torch.jit.load(sys.argv[1], _extra_files=files)
    out = {"meta": json.loads(files["harken.json"])}
    for name in ("short", "long"):
        w = torch.from_numpy(np.load(name + ".npy"))
        with torch.no_grad():
            lp, n = m(w[None], torch.tensor([w.shape[0]]))
        out[name] = {"n": n.tolist(), "shape": list(lp.shape), "dtype": str(lp.dtype), "ndtype": str(n.dtype)}
        torch.save(lp, name + ".pt")
    try:
        importlib.util.find_spec("harken")
        out["harken_importable"] = True
    except ImportError:
        out["harken_importable"] = False
    out["harken_loaded"] = any(k == "harken" or k.startswith("harken.") for k in sys.modules)
    out["path"] = sys.path
    print(json.dumps(out))
""")


def test_torchscript_file_runs_without_harken_at_two_lengths(ts_export, speech, tmp_path):
    model, tok, cfg, path = ts_export
    short, long = speech
    np.save(tmp_path / "short.npy", short)
    np.save(tmp_path / "long.npy", long)
    (tmp_path / "child.py").write_text(CHILD)
    r = subprocess.run([sys.executable, "-I", "child.py", str(path)], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["harken_importable"] is False and res["harken_loaded"] is False
    repo = str(Path(__file__).resolve().parents[1])
    assert repo not in res["path"]
    for name, wave in (("short", short), ("long", long)):
        ref, ref_n = _eager(model, wave)
        got = torch.load(tmp_path / f"{name}.pt")
        assert res[name]["n"] == ref_n.tolist() and res[name]["ndtype"] == "torch.int64"
        assert got.dtype == torch.float32 and got.shape == ref.shape
        assert float((got - ref).abs().max()) < 1e-4
    assert res["long"]["shape"][1] > 6 * res["short"]["shape"][1]  # really a dynamic time axis
    # the model facts travel inside the archive: the ONNX metadata keys, string values
    meta = res["meta"]
    onnx_keys = set(build_metadata(model, tok, cfg, "wave", int(meta["min_input"])))
    assert onnx_keys <= set(meta)
    assert meta["harken_variant"] == "torchscript" and json.loads(meta["vocabulary"]) == list(tok.tokens)
    assert int(meta["subsampling_factor"]) == model.subsampling_factor == 4
    assert int(meta["right_context"]) == model.right_context == 6
    assert read_torchscript_metadata(path) == meta


def test_torchscript_backend_matches_the_model_on_a_padded_batch(ts_export, speech):
    from harken.runtime.engine import TorchBackend

    model, tok, cfg, path = ts_export
    be = open_compiled(path)
    assert isinstance(be, TorchScriptBackend) and be.name == "torchscript"
    assert be.metadata == read_torchscript_metadata(path)
    short, long = speech
    wave = torch.zeros(3, len(long))
    wave[0], wave[1, : len(short)] = torch.from_numpy(long), torch.from_numpy(short)
    wave[2, :5000] = torch.from_numpy(long[:5000])
    lens = torch.tensor([len(long), len(short), 5000])
    lp, n = be(wave, lens)
    ref, ref_n = TorchBackend(model)(wave, lens)
    assert lp.dtype == torch.float32 and n.dtype == torch.int64 and n.tolist() == ref_n.tolist()
    for i, k in enumerate(n.tolist()):
        assert float((lp[i, :k] - ref[i, :k]).abs().max()) < 1e-4
    # shorter than the graph's smallest input: padded up to it, lengths kept (no conv error)
    tiny = torch.from_numpy(short[:100])[None]
    lp, n = be(tiny, torch.tensor([100]))
    assert n.tolist() == [0] and lp.shape[0] == 1
    assert be.min_input == min_input_samples(model, cfg) > 100


@pytest.mark.parametrize("extra", [
    ("model.encoder.type=transformer", "model.encoder.pos_enc=abs"),
    ("model.encoder.causal=true", "model.encoder.chunk_size=4", "model.encoder.left_chunks=2",
     "model.fbank.snip_edges=false", "model.fbank.high_freq=-400.0"),
], ids=["transformer-abs", "chunked-causal-conformer-no-snip"])
def test_trace_holds_at_other_batch_sizes_and_lengths(extra):
    model, _, cfg = _model(*extra)
    min_in = min_input_samples(model, cfg)
    traced = trace_model(model, min_in)  # itself compares 3 x 2.1 s and 1 x 0.6 s against eager
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 47777, generator=g) * 0.1
    lens = torch.tensor([47777, 21000])
    with torch.no_grad():
        got, got_n = traced(x, lens)
        ref, ref_n = WaveCtcCore(model)(x, lens)
    assert got.shape == ref.shape and got_n.tolist() == ref_n.tolist()
    assert float((got[0] - ref[0]).abs().max()) < 1e-4
    assert float((got[1, : ref_n[1]] - ref[1, : ref_n[1]]).abs().max()) < 1e-4


def test_cli_exports_torchscript_and_errors_are_one_line(tmp_path, capsys):
    from harken.export.cli import main

    model, tok, cfg = _model()
    ck = tmp_path / "m.pt"
    torch.save({"version": 1, "config": to_dict(cfg), "model": model.state_dict(), "tokenizer": tok.to_dict()}, ck)
    assert main(["export", "--checkpoint", str(ck), "--format", "torchscript", "--out", str(tmp_path / "o")]) == 0
    be = TorchScriptBackend(tmp_path / "o" / "model.ts")
    assert be.metadata["source_checkpoint"] == "m.pt"
    junk = tmp_path / "junk.ts"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.ts"):
        TorchScriptBackend(junk)
    junk2 = tmp_path / "junk.pt2"
    junk2.write_bytes(b"not a package")
    with pytest.raises(ValueError, match="junk.pt2"):
        Pt2Backend(junk2)
    with pytest.raises(ValueError, match="compiled harken export"):
        open_compiled(tmp_path / "m.onnx")


@pytest.mark.slow
def test_pt2_aotinductor_package_matches_and_carries_metadata(speech, tmp_path):
    from harken.export.pt2 import export_model_pt2, read_pt2_metadata

    model, tok, cfg = _model()
    path = export_model_pt2(model, tok, cfg, tmp_path / "model.pt2")  # checks 3 x 2.3 s against eager itself
    meta = read_pt2_metadata(path)
    assert meta["harken_variant"] == "pt2"
    assert set(build_metadata(model, tok, cfg, "wave", int(meta["min_input"]))) <= set(meta)
    runner = torch._inductor.aoti_load_package(str(path))
    short, long = speech
    for wave in (short, long):
        ref, ref_n = _eager(model, wave)
        got, got_n = runner(torch.from_numpy(np.stack([wave, wave])), torch.tensor([len(wave)] * 2))
        got, got_n = got[:1], got_n[:1]  # the program takes >= 2 rows (metadata min_batch)
        assert got_n.tolist() == ref_n.tolist() and got.shape == ref.shape
        assert float((got - ref).abs().max()) < 1e-4
    be = Pt2Backend(path)
    assert be.name == "pt2" and be.metadata == meta
    wave = torch.zeros(2, len(long))
    wave[0], wave[1, : len(short)] = torch.from_numpy(long), torch.from_numpy(short)
    lp, n = be(wave, torch.tensor([len(long), len(short)]))
    with torch.no_grad():
        ref, ref_n = WaveCtcCore(model)(wave, torch.tensor([len(long), len(short)]))
    assert n.tolist() == ref_n.tolist()
    for i, k in enumerate(n.tolist()):
        assert float((lp[i, :k] - ref[i, :k]).abs().max()) < 1e-4


def test_a_trace_that_bakes_in_a_length_is_refused():
    class BakesLength(torch.nn.Module):  # turns a length into a Python int: the trace freezes it
        def forward(self, w, n):
            t = int(n.max()) // 320
            return torch.log_softmax(w[:, : t * 320].reshape(w.shape[0], t, 320)[..., :3], -1), n // 320

    with pytest.raises(ExportError, match="differs from PyTorch"):
        trace_model(BakesLength(), 400)
