"""``harken serve`` as a real process: liveness stays fast under full load (the load comes from
bench/serve_load.py in another process), and SIGTERM drains: /readyz turns 503, the in-flight
request still completes, then the process exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from harken.serve.testing import ServerProcess
from tests.test_serve import clips, engine, model_path, wav_bytes  # noqa: F401  (fixtures)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_healthz_under_load_and_graceful_sigterm_drain(model_path, clips, tmp_path):  # noqa: F811
    srv = ServerProcess(model_path, ["store.url=null", "limits.drain_grace_s=1.5", "limits.drain_timeout_s=30",
                                     "batching.max_queue=1024", "num_threads=1"]).start()
    try:
        clip = tmp_path / "clip.wav"
        clip.write_bytes(wav_bytes(np.concatenate([w for _, _, w in clips[:3]])))
        load = subprocess.Popen(["nice", "-n", "10", sys.executable, os.path.join(ROOT, "bench", "serve_load.py"),
                                 "--url", srv.url,
                                 "--clip", str(clip), "--concurrency", "16", "--seconds", "5"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)
        lat = []
        with httpx.Client(timeout=5) as c:
            while load.poll() is None and len(lat) < 60:
                t0 = time.perf_counter()
                assert c.get(srv.url + "/healthz").status_code == 200
                lat.append(time.perf_counter() - t0)
                time.sleep(0.05)
        out, err = load.communicate(timeout=60)
        assert load.returncode == 0, err
        assert '"200"' in out and len(lat) >= 20
        lat.sort()
        assert lat[int(0.95 * len(lat))] < 0.05, lat  # p95 of liveness under 16 saturating clients

        # SIGTERM while a request is in flight: it completes, readiness is 503 meanwhile, exit 0
        long = wav_bytes(np.concatenate([w for _, _, w in clips] * 6))
        res = {}

        def inflight():
            res["r"] = httpx.post(srv.url + "/v1/transcribe", files={"file": ("a.wav", long)}, timeout=60)

        t = threading.Thread(target=inflight)
        t.start()
        time.sleep(0.3)
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        ready = httpx.get(srv.url + "/readyz", timeout=5)
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        assert httpx.get(srv.url + "/healthz", timeout=5).status_code == 200
        t.join(60)
        assert res["r"].status_code == 200 and res["r"].json()["text"]
        assert srv.proc.wait(30) == 0, srv.output()
        with pytest.raises(httpx.HTTPError):
            httpx.get(srv.url + "/healthz", timeout=2)
    finally:
        srv.stop()


@pytest.mark.slow
def test_serve_an_onnx_export(model_path, clips, tmp_path):  # noqa: F811
    """`harken serve --model x.onnx` (onnxruntime backend) answers like the ONNX engine itself; the
    startup log holds the config with the API key digest redacted."""
    pytest.importorskip("onnxruntime")
    from harken.export.onnx import export_onnx
    from harken.runtime import Engine
    from harken.serve.config import hash_key

    onnx_path = export_onnx(model_path, tmp_path / "tiny.onnx", variant="wave", check=False)
    digest = hash_key("sk-onnx")
    with ServerProcess(onnx_path, ["store.url=null", f"auth.api_keys=[{{id: k, sha256: {digest}}}]"]) as srv:
        _, data, wave = clips[0]
        r = httpx.post(srv.url + "/v1/transcribe", files={"file": ("a.wav", data)},
                       headers={"Authorization": "Bearer sk-onnx"}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["text"] == Engine.load(onnx_path, num_threads=1).transcribe(wave).text
        info = httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer sk-onnx"}).json()
        assert info["data"][0]["harken"]["backend"] == "onnx"
        log = srv.output()
        assert '"port": %d' % srv.port in log and digest not in log and "sk-onnx" not in log


@pytest.mark.slow
def test_serve_a_streaming_onnx_export(tiny_corpus, clips, tmp_path):  # noqa: F811
    """A streaming-only ONNX export serves the offline routes too: its answer is the streaming
    model's own final for the whole file."""
    pytest.importorskip("onnxruntime")
    import torch

    from harken.config import load_config
    from harken.data.manifest import read_manifest
    from harken.runtime.streaming import StreamingModel
    from harken.runtime.streaming_onnx import export_streaming_onnx
    from harken.serve.streaming_engine import StreamingOfflineEngine
    from harken.text.tokenizer import CharTokenizer
    from harken.train.trainer import build_model

    corpus, _ = tiny_corpus
    tok = CharTokenizer.build([r.text.lower() for r in read_manifest(corpus / "train.jsonl")])
    cfg = load_config(None, ["model.encoder.d_model=48", "model.encoder.num_layers=2", "model.encoder.num_heads=2",
                             "model.encoder.ff_dim=96", "model.encoder.conv_kernel=7",
                             "model.encoder.subsampling_channels=16", "model.encoder.causal=true",
                             "model.encoder.dynamic_chunk=true"])
    torch.manual_seed(0)
    model = build_model(cfg, tok.vocab_size).eval()
    with torch.no_grad():
        model.output.bias[0] -= 2.0
    path = export_streaming_onnx(model, tmp_path / "stream.onnx", chunk_size=4, left_chunks=3, tokenizer=tok)
    _, data, wave = clips[1]
    expect = StreamingOfflineEngine(StreamingModel.from_onnx(path, num_threads=1)).transcribe(wave).text
    assert expect
    with ServerProcess(path, ["store.url=null"]) as srv:
        r = httpx.post(srv.url + "/v1/transcribe", files={"file": ("a.wav", data)}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["text"] == expect
        m = httpx.get(srv.url + "/v1/models").json()["data"][0]["harken"]
        assert m["backend"] == "onnx-streaming" and m["streaming"] is True
