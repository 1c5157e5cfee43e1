"""The WebSocket streaming route /v1/stream of `harken serve` against a live server on loopback:
protocol v1 happy path (results equal the StreamingModel's on the same audio), any frame sizes,
resampling, batched stepping across streams, limits (frame size, idle, stream length, max
streams -> 503), protocol errors with their close codes, auth, and clients that vanish."""

from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
websockets = pytest.importorskip("websockets")
from websockets.exceptions import ConnectionClosed, InvalidStatus  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

KEY = "stream-test-secret"
MAX_STREAMS = 6
IDLE_S = 1.5
MAX_STREAM_S = 12.0


# ----------------------------------------------------------------------------- shared helpers
def serve_model_path(tiny_corpus, tmp_path_factory):
    """A tiny causal chunked conformer (chunk 8 = 320 ms) saved as a harken checkpoint, made once
    per test session and shared by the serve stream/gRPC/page tests. Untrained, with the output
    bias pushed off blank so the greedy text is not empty: its text is nonsense but a
    deterministic function of the audio, which is what the comparisons need."""
    from conftest import TINY_MODEL, write_tiny_checkpoint

    path = tmp_path_factory.getbasetemp() / "serve_stream_model" / "model.pt"
    if path.exists():
        return path
    corpus, _ = tiny_corpus
    return write_tiny_checkpoint(corpus, path, TINY_MODEL + ["model.encoder.causal=true", "model.encoder.chunk_size=8"])


def speech(tiny_corpus, n=2, gap=0.4, split="test_seen"):
    """n synthesized utterances joined by `gap` seconds of silence (16 kHz float32)."""
    from harken.audio import load_audio
    from harken.data.manifest import read_manifest

    corpus, _ = tiny_corpus
    recs = read_manifest(corpus / f"{split}.jsonl")[:n]
    z = np.zeros(int(gap * 16000), np.float32)
    parts = [z]
    for r in recs:
        parts += [load_audio(r.audio), z]
    return np.concatenate(parts)


def reference(sm, wave16, endpoint=None, word_timestamps=True):
    """Finals of the StreamingModel run directly on 16 kHz audio (the server's default endpointing)."""
    from harken.runtime.streaming import EndpointConfig

    s = sm.new_session(endpoint=endpoint or EndpointConfig(), word_timestamps=word_timestamps)
    s.accept_waveform(wave16)
    s.input_finished()
    return [r for r in sm.run([s])[0] if r.is_final and r.text.strip()]


def pcm16(wave) -> bytes:
    return (np.clip(wave, -1, 1) * 32767.0).round().astype("<i2").tobytes()


def from_pcm16(b: bytes) -> np.ndarray:
    return np.frombuffer(b, "<i2").astype(np.float32) / 32768.0


def ws_url(srv) -> str:
    return srv.url.replace("http://", "ws://") + "/v1/stream"


def stream(srv, data: bytes, rate=16000, sizes=(3200,), encoding="pcm_s16le", key=KEY, headers=None,
           stop="json", **start):
    """Send one stream; returns (messages, close code)."""
    msgs = []
    rng = np.random.default_rng(len(data))
    with connect(ws_url(srv), additional_headers=headers, max_size=None, open_timeout=10) as ws:
        first = {"type": "start", "version": 1, "sample_rate": rate, "encoding": encoding, **start}
        if key is not None:
            first["api_key"] = key
        ws.send(json.dumps(first))
        msgs.append(json.loads(ws.recv(timeout=10)))
        i = 0
        while i < len(data):
            k = int(sizes[0]) if len(sizes) == 1 else int(rng.integers(sizes[0], sizes[1] + 1))
            ws.send(data[i: i + k])
            i += k
        ws.send(json.dumps({"type": "stop"}) if stop == "json" else b"")
        try:
            while True:
                msgs.append(json.loads(ws.recv(timeout=30)))
        except ConnectionClosed:
            pass
        code = ws.protocol.close_rcvd.code if ws.protocol.close_rcvd else None
    return msgs, code


def finals(msgs):
    return [m for m in msgs if m["type"] == "final"]


def one_error(srv, send, key=KEY, start=True, timeout=10.0):
    """Connect, optionally start, then send `send` (bytes/str or None); returns (error msg, close code)."""
    with connect(ws_url(srv), max_size=None, open_timeout=10) as ws:
        if start:
            ws.send(json.dumps({"type": "start", "sample_rate": 16000, "api_key": key}))
            assert json.loads(ws.recv(timeout=10))["type"] == "ready"
        if send is not None:
            ws.send(send)
        msg = None
        try:
            while True:
                m = json.loads(ws.recv(timeout=timeout))
                if m["type"] == "error":
                    msg = m
        except ConnectionClosed:
            pass
        code = ws.protocol.close_rcvd.code if ws.protocol.close_rcvd else None
    return msg, code


def metric(srv, name: str, **labels) -> float:
    import httpx

    text = httpx.get(srv.url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, val = line.rpartition(" ")
        nm, _, lab = head.partition("{")
        if nm != name:
            continue
        if all(f'{k}="{v}"' in lab for k, v in labels.items()):
            total += float(val)
    return total


def wait_for(cond, timeout=10.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def served(tiny_corpus, tmp_path_factory):
    from harken.runtime import Engine
    from harken.runtime.streaming import StreamingModel
    from harken.serve.config import ApiKey, ServeConfig, hash_key
    from harken.serve.testing import LiveServer

    path = serve_model_path(tiny_corpus, tmp_path_factory)
    engine = Engine.load(path, num_threads=1)
    sm = StreamingModel.from_engine(engine)
    cfg = ServeConfig()
    cfg.grpc_port = 0
    cfg.limits.max_streams = MAX_STREAMS
    cfg.limits.stream_idle_timeout_s = IDLE_S
    cfg.limits.max_stream_seconds = MAX_STREAM_S
    cfg.auth.api_keys = [ApiKey(id="tester", sha256=hash_key(KEY))]
    cfg.store.url = str(tmp_path_factory.mktemp("stream_store") / "requests.sqlite")
    with LiveServer(cfg, engine, sm) as srv:
        yield srv, sm


@pytest.fixture(scope="module")
def wave(tiny_corpus):
    return speech(tiny_corpus, n=2)


# ---------------------------------------------------------------------------------------- tests
def test_happy_path_results_equal_streaming_model(served, wave):
    srv, sm = served
    data = pcm16(wave)
    ref = reference(sm, from_pcm16(data))
    assert ref, "the reference produced no final (the test model is broken)"
    msgs, code = stream(srv, data, word_timestamps=True)
    assert code == 1000
    assert msgs[0]["type"] == "ready" and msgs[0]["version"] == 1 and msgs[0]["sample_rate"] == 16000
    assert msgs[0]["chunk_ms"] == pytest.approx(320.0)
    assert msgs[-1]["type"] == "end"
    assert msgs[-1]["audio_seconds"] == pytest.approx(len(wave) / 16000, abs=1e-3)
    got = finals(msgs)
    assert [f["text"] for f in got] == [r.text for r in ref]
    assert msgs[-1]["segments"] == len(got)
    assert any(m["type"] == "partial" for m in msgs)
    assert all("segment_id" in m for m in msgs if m["type"] in ("partial", "final"))
    ids = [f["segment_id"] for f in got]
    assert ids == sorted(set(ids))
    prev_end = 0.0
    dur = len(wave) / 16000
    for f, r in zip(got, ref):
        assert f["start"] == pytest.approx(r.start, abs=1e-3) and f["end"] == pytest.approx(r.end, abs=1e-3)
        assert prev_end - 1e-6 <= f["start"] < f["end"] <= dur + 1e-3
        prev_end = f["end"]
        assert [w["word"] for w in f["words"]] == [w.word for w in r.words]
        for w in f["words"]:
            assert f["start"] - 0.05 <= w["start"] <= w["end"] <= f["end"] + 0.05


def test_session_is_logged_and_metrics_move(served, wave):
    import httpx

    srv, _ = served
    msgs, _ = stream(srv, pcm16(wave[:16000 * 2]))
    sid = msgs[0]["session_id"]
    srv.state.store.flush()
    r = httpx.get(f"{srv.url}/v1/requests/{sid}", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 200, r.text
    rec = r.json()
    assert rec["endpoint"] == "ws" and rec["status"] == 200 and rec["key_id"] == "tester"
    assert rec["text"] == " ".join(f["text"] for f in finals(msgs))
    assert rec["audio_seconds"] == pytest.approx(2.0, abs=1e-3)
    assert metric(srv, "harken_stream_partial_latency_seconds_count", protocol="ws") > 0
    assert metric(srv, "harken_stream_final_latency_seconds_count", protocol="ws") > 0
    assert metric(srv, "harken_batch_size_count", kind="stream_step") > 0
    wait_for(lambda: metric(srv, "harken_streams_active", protocol="ws") == 0, what="streams_active 0")


@pytest.mark.parametrize("encoding", ["pcm_s16le", "pcm_f32le"])
def test_any_frame_sizes_same_result(served, wave, encoding):
    srv, sm = served
    if encoding == "pcm_s16le":
        data, ref_wave = pcm16(wave), from_pcm16(pcm16(wave))
    else:
        data, ref_wave = wave.astype("<f4").tobytes(), wave
    ref = [r.text for r in reference(sm, ref_wave)]
    for sizes in ((1, 7), (1, 9000), (64000,)):
        small = sizes == (1, 7)
        part = data[: (16000 * 2 * (2 if encoding == "pcm_f32le" else 1)) // 2] if small else data
        msgs, code = stream(srv, part, sizes=sizes, encoding=encoding, stop="empty" if small else "json")
        assert code == 1000 and msgs[-1]["type"] == "end", msgs[-3:]
        expect = ref if not small else [r.text for r in reference(
            sm, from_pcm16(part) if encoding == "pcm_s16le" else np.frombuffer(part, "<f4"))]
        assert [f["text"] for f in finals(msgs)] == expect, sizes


@pytest.mark.parametrize("rate", [8000, 44100])
def test_server_resamples_any_rate(served, wave, rate):
    import soxr

    srv, sm = served
    w = soxr.resample(wave, 16000, rate, quality="HQ").astype(np.float32)
    data = pcm16(w)
    ref = reference(sm, soxr.resample(from_pcm16(data), rate, 16000, quality="HQ").astype(np.float32))
    msgs, code = stream(srv, data, rate=rate, sizes=(rate // 10 * 2,))
    assert code == 1000
    assert msgs[0]["input_sample_rate"] == rate
    assert [f["text"] for f in finals(msgs)] == [r.text for r in ref]
    assert msgs[-1]["audio_seconds"] == pytest.approx(len(w) / rate, abs=1e-3)


def test_concurrent_streams_are_stepped_in_batches(served, tiny_corpus):
    srv, sm = served
    waves = [speech(tiny_corpus, n=1, split=s)[: 16000 * 3] for s in ("train", "dev", "test_unseen", "test_seen")]
    refs = [[r.text for r in reference(sm, from_pcm16(pcm16(w)))] for w in waves]
    n0 = metric(srv, "harken_batch_size_count", kind="stream_step")
    s0 = metric(srv, "harken_batch_size_sum", kind="stream_step")
    out = [None] * len(waves)

    def run(i):
        out[i] = stream(srv, pcm16(waves[i]), sizes=(32000,))

    ts = [threading.Thread(target=run, args=(i,)) for i in range(len(waves))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    for (msgs, code), ref in zip(out, refs):
        assert code == 1000 and [f["text"] for f in finals(msgs)] == ref
    n = metric(srv, "harken_batch_size_count", kind="stream_step") - n0
    s = metric(srv, "harken_batch_size_sum", kind="stream_step") - s0
    assert n > 0 and s / n > 1.0, f"mean stream batch {s / max(n, 1):.2f}: streams were not stepped together"


def test_endpointing_closes_segments(served, wave):
    srv, sm = served
    from harken.runtime.streaming import EndpointConfig

    data = pcm16(wave)
    ref = reference(sm, from_pcm16(data), EndpointConfig(max_segment_ms=1000.0))
    msgs, code = stream(srv, data, endpointing={"max_segment_ms": 1000}, interim_results=False)
    got = finals(msgs)
    assert code == 1000 and len(got) >= 2
    assert [f["text"] for f in got] == [r.text for r in ref]
    assert not any(m["type"] == "partial" for m in msgs)  # interim_results off
    for a, b in zip(got, got[1:]):
        assert b["segment_id"] > a["segment_id"] and b["start"] >= a["end"] - 1e-6


def test_protocol_errors_have_codes_and_close_codes(served):
    srv, _ = served
    m, code = one_error(srv, b"\x00\x01" * 100, start=False)
    assert m["code"] == "audio_before_start" and code == 1003
    m, code = one_error(srv, "{not json", start=False)
    assert m["code"] == "bad_json" and code == 1003
    m, code = one_error(srv, json.dumps({"type": "launch"}))
    assert m["code"] == "bad_message" and code == 1003
    m, code = one_error(srv, json.dumps([1, 2]))
    assert m["code"] == "bad_json" and code == 1003
    m, code = one_error(srv, json.dumps({"type": "start", "sample_rate": 16000, "api_key": KEY}))
    assert m["code"] == "bad_message" and code == 1003  # a second start
    m, code = one_error(srv, json.dumps({"type": "start", "sample_rate": 5, "api_key": KEY}), start=False)
    assert m["code"] == "bad_config" and code == 1008 and "sample_rate" in m["message"]
    m, code = one_error(srv, json.dumps({"type": "start", "encoding": "opus", "api_key": KEY}), start=False)
    assert m["code"] == "unsupported_encoding" and code == 1003
    m, code = one_error(srv, json.dumps({"type": "start", "version": 2, "api_key": KEY}), start=False)
    assert m["code"] == "unsupported_version" and code == 1003
    m, code = one_error(srv, b"\x00" * (1024 * 1024 + 2))  # over the 1 MiB frame limit
    assert m["code"] == "too_large" and code == 1009
    m, code = one_error(srv, json.dumps({"type": "stop", "pad": "x" * 70000}))
    assert m["code"] == "too_large" and code == 1009
    assert metric(srv, "harken_rejected_total", reason="too_large") >= 2


def test_auth_header_or_start_message(served, wave):
    srv, _ = served
    data = pcm16(wave[:8000])
    msgs, code = stream(srv, data, key=None, headers={"Authorization": f"Bearer {KEY}"})
    assert code == 1000 and msgs[-1]["type"] == "end"
    m, code = one_error(srv, json.dumps({"type": "start", "sample_rate": 16000}), start=False)
    assert m["code"] == "unauthorized" and code == 1008
    m, code = one_error(srv, json.dumps({"type": "start", "sample_rate": 16000, "api_key": "nope"}), start=False)
    assert m["code"] == "unauthorized" and code == 1008
    with pytest.raises(InvalidStatus) as e:
        with connect(ws_url(srv), additional_headers={"Authorization": "Bearer wrong"}, open_timeout=10):
            pass
    assert e.value.response.status_code == 401
    assert json.loads(e.value.response.body)["error"]["code"] == "unauthorized"


def test_cross_site_pages_are_refused(served):
    srv, _ = served
    with pytest.raises(InvalidStatus) as e:
        with connect(ws_url(srv), origin="http://evil.example", open_timeout=10):
            pass
    assert e.value.response.status_code == 403
    assert json.loads(e.value.response.body)["error"]["code"] == "forbidden_origin"
    with connect(ws_url(srv), origin=srv.url, open_timeout=10) as ws:  # the server's own page
        ws.send(json.dumps({"type": "start", "sample_rate": 16000, "api_key": KEY}))
        assert json.loads(ws.recv(timeout=10))["type"] == "ready"


def test_idle_timeout(served):
    srv, _ = served
    t0 = time.monotonic()
    m, code = one_error(srv, None, start=True)
    assert m["code"] == "idle_timeout" and code == 1008
    assert IDLE_S <= time.monotonic() - t0 < IDLE_S + 5
    m, code = one_error(srv, None, start=False)  # no start at all
    assert m["code"] == "idle_timeout" and code == 1008


def test_max_stream_seconds(served, wave):
    srv, sm = served
    long = np.tile(wave, int(np.ceil((MAX_STREAM_S + 2) * 16000 / len(wave))))[: int((MAX_STREAM_S + 2) * 16000)]
    msgs, code = stream(srv, pcm16(long), sizes=(64000,))
    assert msgs[-1]["type"] == "error" and msgs[-1]["code"] == "too_long" and code == 1008
    ref = reference(sm, from_pcm16(pcm16(long[: int(MAX_STREAM_S * 16000)])))
    assert [f["text"] for f in finals(msgs)] == [r.text for r in ref]  # results up to the limit came first


def test_max_streams_rejects_handshake_with_503(served):
    import httpx

    srv, _ = served
    wait_for(lambda: metric(srv, "harken_streams_active", protocol="ws") == 0, what="no streams open")
    held = []
    try:
        for _ in range(MAX_STREAMS):
            ws = connect(ws_url(srv), open_timeout=10).__enter__()
            ws.send(json.dumps({"type": "start", "sample_rate": 16000, "api_key": KEY}))
            assert json.loads(ws.recv(timeout=10))["type"] == "ready"
            held.append(ws)
        with pytest.raises(InvalidStatus) as e:
            connect(ws_url(srv), open_timeout=10).__enter__()
        assert e.value.response.status_code == 503
        assert int(e.value.response.headers["Retry-After"]) >= 1
        assert json.loads(e.value.response.body)["error"]["code"] == "overloaded"
        assert httpx.get(srv.url + "/healthz", timeout=5).status_code == 200
        assert metric(srv, "harken_rejected_total", reason="too_many_streams") >= 1
    finally:
        for ws in held:
            ws.close()
    wait_for(lambda: metric(srv, "harken_streams_active", protocol="ws") == 0, what="slots freed")
    msgs, code = stream(srv, b"\x00\x00" * 8000)
    assert code == 1000


def _abandon(ws):
    """Drop the TCP connection without a close frame."""
    sock = ws.socket
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
    except OSError:
        pass
    sock.close()


def test_client_vanishing_mid_stream_and_50_abandoned_connections(served, wave):
    import httpx

    srv, sm = served
    data = pcm16(wave)
    # one client vanishes in the middle of its audio
    ws = connect(ws_url(srv), open_timeout=10).__enter__()
    ws.send(json.dumps({"type": "start", "sample_rate": 16000, "api_key": KEY}))
    assert json.loads(ws.recv(timeout=10))["type"] == "ready"
    for i in range(0, len(data) // 2, 3200):
        ws.send(data[i: i + 3200])
    _abandon(ws)
    # 50 more: handshakes that are accepted (up to the limit) or refused, then dropped at random points
    rng = np.random.default_rng(0)
    opened = refused = 0
    held = []
    for k in range(50):
        try:
            ws = connect(ws_url(srv), open_timeout=10).__enter__()
        except InvalidStatus as e:
            assert e.response.status_code == 503
            refused += 1
            continue
        opened += 1
        step = int(rng.integers(0, 3))
        if step >= 1:
            ws.send(json.dumps({"type": "start", "sample_rate": 16000, "api_key": KEY}))
        if step >= 2:
            ws.send(data[: int(rng.integers(2, 32000)) * 2])
        held.append(ws)
        if len(held) >= MAX_STREAMS - 1 or k == 49:
            for h in held:
                _abandon(h)
            held = []
    assert opened >= 10
    assert httpx.get(srv.url + "/healthz", timeout=5).status_code == 200
    wait_for(lambda: metric(srv, "harken_streams_active", protocol="ws") == 0, timeout=15, what="all slots freed")
    from harken.serve.stream import active_streams

    assert active_streams(srv.state) == 0 and not srv.state._stream_hub.live
    msgs, code = stream(srv, data)  # and the server still streams correctly
    assert code == 1000 and [f["text"] for f in finals(msgs)] == [r.text for r in reference(sm, from_pcm16(data))]


def test_page_is_served(served):
    import httpx

    srv, _ = served
    r = httpx.get(srv.url + "/", timeout=5)
    assert r.status_code == 200 and "/v1/stream" in r.text and "app.js" in r.text
    for name in ("app.js", "recorder-worklet.js", "style.css"):
        r = httpx.get(f"{srv.url}/static/{name}", timeout=5)
        assert r.status_code == 200 and len(r.content) > 100
    assert httpx.get(srv.url + "/static/../stream.py", timeout=5).status_code == 404


def test_example_ws_client(served, wave, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from harken.audio import save_wav

    srv, sm = served
    wav = tmp_path / "a.wav"
    save_wav(wav, wave, 16000)
    script = Path(__file__).parents[1] / "examples" / "ws_client.py"
    r = subprocess.run([sys.executable, str(script), str(wav), "--url", ws_url(srv), "--words"], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "HARKEN_API_KEY": KEY})
    assert r.returncode == 0, r.stderr
    texts = [line.split("] ", 1)[1] for line in r.stdout.splitlines() if line.startswith("[")]
    import soundfile as sf

    sent = sf.read(str(wav), dtype="int16")[0].astype(np.float32) / 32768.0  # what the client sends
    assert texts == [f.text for f in reference(sm, sent)]
    assert "[end:" in r.stderr


def test_drain_ends_live_streams_with_their_finals(served, wave):
    import asyncio

    from harken.serve.stream import active_streams, drain

    srv, sm = served
    data = pcm16(wave)
    st = srv.state
    with connect(ws_url(srv), max_size=None, open_timeout=10) as ws:
        ws.send(json.dumps({"type": "start", "sample_rate": 16000, "api_key": KEY}))
        assert json.loads(ws.recv(timeout=10))["type"] == "ready"
        ws.send(data)  # all of it, no stop: a live microphone
        time.sleep(0.5)
        st.draining = True
        try:
            fut = asyncio.run_coroutine_threadsafe(drain(st, 20.0), st.loop)
            msgs = []
            try:
                while True:
                    msgs.append(json.loads(ws.recv(timeout=20)))
            except ConnectionClosed:
                pass
            assert fut.result(timeout=20) is True
            with pytest.raises(InvalidStatus) as e:  # no new streams while draining
                connect(ws_url(srv), open_timeout=10).__enter__()
            assert e.value.response.status_code == 503 and e.value.response.headers["Retry-After"]
        finally:
            st.draining = False
    assert ws.protocol.close_rcvd.code == 1013
    assert msgs[-1]["type"] == "error" and msgs[-1]["code"] == "draining"
    assert [f["text"] for f in finals(msgs)] == [r.text for r in reference(sm, from_pcm16(data))]
    assert active_streams(st) == 0
