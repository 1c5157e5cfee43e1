"""harken serve, the HTTP core: REST and OpenAI-compatible routes against a live uvicorn server on
loopback (the official ``openai`` client, sync and async), cross-request batching, backpressure,
limits, auth, metrics and the recognition log, on synthesized speech and a tiny real model."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import soundfile as sf

from harken.serve.config import ApiKey, ServeConfig, hash_key, load_serve_config
from harken.serve.testing import LiveServer

TINY = ["model.encoder.d_model=48", "model.encoder.num_layers=2", "model.encoder.num_heads=2",
        "model.encoder.ff_dim=96", "model.encoder.conv_kernel=7", "model.encoder.subsampling_channels=16"]
KEY = "sk-test-harken-0123456789"


@pytest.fixture(scope="module")
def model_path(tiny_corpus, tmp_path_factory):
    """An untrained tiny Conformer-CTC checkpoint (output bias pushed off blank so texts are not
    empty): real inference, deterministic output."""
    from conftest import write_tiny_checkpoint

    corpus, _ = tiny_corpus
    path = write_tiny_checkpoint(corpus, tmp_path_factory.mktemp("serve") / "tiny.pt", TINY)
    return path


@pytest.fixture(scope="module")
def engine(model_path):
    from harken.runtime import Engine

    return Engine.load(model_path, num_threads=1)


@pytest.fixture(scope="module")
def clips(tiny_corpus):
    """(name, wav bytes, waveform) of real synthesized utterances."""
    from harken.audio import load_audio
    from harken.data.manifest import read_manifest

    corpus, _ = tiny_corpus
    out = []
    for r in read_manifest(corpus / "test_seen.jsonl") + read_manifest(corpus / "dev.jsonl"):
        data = open(r.audio, "rb").read()
        out.append((r.id, data, load_audio(data)))
    out = sorted(out, key=lambda c: len(c[2]))[:6]  # the shortest: each one VAD piece (< 4 s)
    assert len(out[-1][2]) < 4 * 16000
    return out


def wav_bytes(wave: np.ndarray, sr: int = 16000, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format="WAV", subtype=subtype)
    return buf.getvalue()


def make_cfg(tmp_path, *overrides) -> ServeConfig:
    return load_serve_config(None, [f"store.url={tmp_path / 'log.sqlite'}", "grpc_port=0",
                                    "limits.header_timeout_s=2", "limits.body_idle_timeout_s=1.5", *overrides])


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    """The main server: auth on (one admin key, one plain key), audio retention on, VAD pieces of 4 s."""
    tmp = tmp_path_factory.mktemp("srv")
    cfg = make_cfg(tmp, "store.retain_audio=true", "store.audio_max_bytes=400000", "batching.segment_seconds=4",
                   "limits.max_upload_bytes=2000000", "limits.max_audio_seconds=60", "batching.max_wait_ms=20")
    cfg.auth.api_keys = [ApiKey("admin", hash_key(KEY), admin=True), ApiKey("team-b", hash_key("sk-b"))]
    with LiveServer(cfg, engine) as srv:
        yield srv


def H(key=KEY):
    return {"Authorization": f"Bearer {key}"}


def post(srv, data: bytes, key=KEY, route="/v1/transcribe", files_name="a.wav", **fields):
    return httpx.post(srv.url + route, files={"file": (files_name, data, "audio/wav")}, data=fields,
                      headers=H(key) if key else {}, timeout=60)


# ------------------------------------------------------------------------------------ REST
def test_rest_json_matches_the_engine(server, clips, engine):
    _, data, wave = clips[0]
    r = post(server, data)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["text"] == engine.transcribe(wave).text and body["text"]
    assert body["id"] == r.headers["x-request-id"] and body["model"] == "tiny"
    assert abs(body["duration"] - len(wave) / 16000) < 0.01
    assert body["segments"][0]["start"] == 0.0 and "words" not in body


def test_rest_raw_body_formats_and_word_times(server, clips, engine):
    _, data, wave = clips[1]
    expect = engine.transcribe(wave).text
    r = httpx.post(server.url + "/v1/transcribe?word_timestamps=true", content=data,
                   headers={**H(), "Content-Type": "audio/wav"}, timeout=60)
    assert r.status_code == 200, r.text
    words = r.json()["words"]
    assert " ".join(w["word"] for w in words) == expect
    assert all(0 <= w["start"] <= w["end"] <= len(wave) / 16000 + 0.05 for w in words)
    assert all(a["start"] <= b["start"] for a, b in zip(words, words[1:]))
    r = httpx.post(server.url + "/v1/transcribe?format=text", content=data, headers=H(), timeout=60)
    assert r.status_code == 200 and r.text == expect + "\n" and r.headers["content-type"].startswith("text/plain")
    r = post(server, data, format="srt")
    assert r.headers["content-type"].startswith("application/x-subrip")
    assert r.text.startswith("1\n00:00:") and " --> " in r.text
    r = post(server, data, format="vtt")
    assert r.text.startswith("WEBVTT") and r.headers["content-type"].startswith("text/vtt")


def test_rest_raw_pcm(server, clips, engine):
    _, _, wave = clips[2]
    pcm = (np.clip(wave, -1, 1) * 32767).astype("<i2").tobytes()
    r = httpx.post(server.url + "/v1/transcribe?encoding=pcm_s16le&sample_rate=16000", content=pcm,
                   headers={**H(), "Content-Type": "audio/pcm"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["text"] == engine.transcribe(np.frombuffer(pcm, "<i2").astype(np.float32) / 32768).text
    r = httpx.post(server.url + "/v1/transcribe?encoding=pcm_s16le", content=pcm[:-1],
                   headers={**H(), "Content-Type": "audio/pcm"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "corrupt_audio"


def test_rest_beam_and_hotwords(server, clips, engine):
    from harken.runtime.options import DecodeOptions

    _, data, wave = clips[0]
    r = post(server, data, decoding="beam", beam_size="4")
    assert r.status_code == 200, r.text
    assert r.json()["text"] == engine.transcribe(wave, DecodeOptions(method="beam", beam_size=4)).text
    r = post(server, data, hotwords="seven:4.0")
    assert r.status_code == 200, r.text
    rec = httpx.get(server.url + f"/v1/requests/{r.headers['x-request-id']}", headers=H()).json()
    assert rec["options"]["decoding"] == "beam" and rec["options"]["hotwords"] == [["seven", 4.0]]
    r = post(server, data, decoding="beam_lm")  # no server-side LM configured
    assert r.status_code == 400 and r.json()["error"]["param"] == "decoding"
    r = post(server, data, decoding="greedy", hotwords="x")
    assert r.status_code == 400 and r.json()["error"]["param"] == "hotwords"


def test_long_audio_comes_back_as_vad_segments(server, clips, engine):
    gap = np.zeros(int(0.8 * 16000), np.float32)
    parts = [w for _, _, w in clips[:4]]
    wave = np.concatenate([x for w in parts for x in (w, gap)])
    assert len(wave) / 16000 > 8  # over two 4 s pieces
    r = post(server, wav_bytes(wave), word_timestamps="true")
    assert r.status_code == 200, r.text
    body = r.json()
    segs = body["segments"]
    assert len(segs) >= 2
    assert all(s["end"] - s["start"] <= 4.0 + 1e-3 for s in segs)
    assert all(a["end"] <= b["start"] + 1e-3 for a, b in zip(segs, segs[1:]))
    assert body["text"] == " ".join(s["text"] for s in segs if s["text"])
    assert all(segs[0]["start"] <= w["start"] <= segs[-1]["end"] for w in body["words"])
    assert abs(body["duration"] - len(wave) / 16000) < 0.01


# ------------------------------------------------------------------------------- batching
def test_concurrent_requests_are_batched_and_agree_with_batch_of_one(server, clips, engine):
    expect = {name: engine.transcribe(w).text for name, _, w in clips}
    b0, i0 = server.state.batcher.batches, server.state.batcher.items_done

    async def go():
        async with httpx.AsyncClient(base_url=server.url, headers=H(), timeout=60) as c:
            async def one(name, data):
                r = await c.post("/v1/transcribe", files={"file": ("a.wav", data)})
                return name, r
            return await asyncio.gather(*[one(n, d) for _ in range(3) for n, d, _ in clips])

    got = asyncio.run(go())
    assert all(r.status_code == 200 for _, r in got), [r.text for _, r in got if r.status_code != 200]
    for name, r in got:
        assert r.json()["text"] == expect[name]
    batches, items = server.state.batcher.batches - b0, server.state.batcher.items_done - i0
    assert items == len(got) and batches < items  # several requests shared a forward pass
    text = httpx.get(server.url + "/metrics").text
    assert 'harken_batch_size_bucket{kind="offline",le="1.0",model="tiny"}' in text


class Gated:
    """The real engine behind a gate: infer_batch waits until the test opens it (to hold the
    inference thread busy deterministically)."""

    def __init__(self, eng):
        self._e = eng
        self.gate = threading.Event()
        self.calls = 0

    def __getattr__(self, k):
        return getattr(self._e, k)

    def infer_batch(self, *a, **kw):
        self.calls += 1
        self.gate.wait(30)
        return self._e.infer_batch(*a, **kw)


@pytest.fixture(scope="module")
def gated(engine, tmp_path_factory):
    cfg = make_cfg(tmp_path_factory.mktemp("gated"), "batching.max_queue=2", "batching.max_batch_size=1",
                   "limits.retry_after_s=1", "limits.request_timeout_s=5")
    g = Gated(engine)
    with LiveServer(cfg, g) as srv:
        yield srv, g
        g.gate.set()


async def _until(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.01)


def test_queue_full_is_503_with_retry_after_and_the_loop_stays_responsive(gated, clips):
    """One request computing (held), two queued (max_queue=2): the next is refused at once,
    /healthz answers fast and /readyz says saturated; opening the gate finishes all three."""
    srv, g = gated
    g.gate.clear()
    _, data, _ = clips[0]

    async def go():
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
            def send():
                return asyncio.ensure_future(c.post("/v1/transcribe", files={"file": ("a.wav", data)}))
            first = send()
            await _until(lambda: srv.state.batcher._busy == 1)
            queued = [send(), send()]
            await _until(lambda: srv.state.batcher.depth == 2)
            t0 = time.perf_counter()
            refused = await c.post("/v1/transcribe", files={"file": ("a.wav", data)})
            t_refused = time.perf_counter() - t0
            ready = await c.get("/readyz")
            # the official client honours Retry-After and retries a 503 twice: three attempts in all
            import openai

            rejected = srv.state.metrics.rejected.labels(reason="queue_full")
            before = rejected._value.get()
            oa = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=2)
            with pytest.raises(openai.InternalServerError) as e:
                await oa.audio.transcriptions.create(model="m", file=("a.wav", data))
            assert e.value.status_code == 503 and e.value.code == "server_busy"
            assert rejected._value.get() - before == 3
            lat = []
            for _ in range(20):
                t0 = time.perf_counter()
                assert (await c.get("/healthz")).status_code == 200
                lat.append(time.perf_counter() - t0)
            g.gate.set()
            done = await asyncio.gather(first, *queued)
            return refused, t_refused, ready, lat, done

    refused, t_refused, ready, lat, done = asyncio.run(go())
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1" and t_refused < 1.0
    assert refused.json()["error"]["code"] == "server_busy"
    assert ready.status_code == 503 and ready.json()["status"] == "queue_full"
    assert sorted(lat)[len(lat) // 2] < 0.05, lat
    assert [r.status_code for r in done] == [200, 200, 200]
    assert 'harken_rejected_total{reason="queue_full"}' in httpx.get(srv.url + "/metrics").text


def test_work_of_a_disconnected_client_is_dropped(gated, clips):
    srv, g = gated
    g.gate.clear()
    _, data, _ = clips[1]
    b = srv.state.batcher
    dropped0, calls0 = b.dropped, g.calls

    async def go():
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
            first = asyncio.ensure_future(c.post("/v1/transcribe", files={"file": ("a.wav", data)}))
            await _until(lambda: b._busy == 1)
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c2:
                gone = asyncio.ensure_future(c2.post("/v1/transcribe", files={"file": ("a.wav", data)}))
                await _until(lambda: b.depth == 1)
                gone.cancel()  # the client goes away while its item waits in the queue
            await asyncio.sleep(0.3)
            g.gate.set()
            r = await first
            await _until(lambda: b.depth == 0)
            return r

    r = asyncio.run(go())
    assert r.status_code == 200
    assert b.dropped == dropped0 + 1 and g.calls == calls0 + 1  # the abandoned item never reached the engine
    assert srv.state.store.flush()
    recs = srv.state.store.list(limit=5)[0]
    assert 499 in [x["status"] for x in recs]


def test_request_timeout_is_504(gated, clips):
    srv, g = gated
    g.gate.clear()
    _, data, _ = clips[2]
    t0 = time.monotonic()
    r = httpx.post(srv.url + "/v1/transcribe", files={"file": ("a.wav", data)}, timeout=30)
    g.gate.set()
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout" and r.headers["x-should-retry"] == "false"
    assert 4.5 < time.monotonic() - t0 < 12


# ------------------------------------------------------------------------------- OpenAI
def test_openai_client_every_response_format(server, clips, engine):
    openai = pytest.importorskip("openai")
    _, data, wave = clips[3]
    expect = engine.transcribe(wave).text
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    t = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", data))
    assert t.text == expect
    assert client.audio.transcriptions.create(model="whisper-1", file=("a.wav", data),
                                              response_format="text").strip() == expect
    srt = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", data), response_format="srt")
    assert srt.startswith("1\n00:00:00,")
    vtt = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", data), response_format="vtt")
    assert vtt.startswith("WEBVTT")
    v = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", data), response_format="verbose_json",
                                           timestamp_granularities=["word", "segment"], language="en",
                                           temperature=0.0, prompt="ignored")
    assert v.text == expect and v.language == "english" and abs(v.duration - len(wave) / 16000) < 0.01
    assert [w.word for w in v.words] == expect.split()
    seg = v.segments[0]
    assert seg.start == 0.0 and seg.text == expect and seg.temperature == 0.0 and isinstance(seg.tokens, list)
    v2 = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", data), response_format="verbose_json")
    assert v2.words is None and v2.segments
    # the curl spelling of the granularity field
    r = httpx.post(server.url + "/v1/audio/transcriptions", headers=H(), files={"file": ("a.wav", data)},
                   data={"model": "m", "response_format": "verbose_json", "timestamp_granularities": "word"})
    assert [w["word"] for w in r.json()["words"]] == expect.split()
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_openai_async_client_and_streaming(server, clips, engine):
    openai = pytest.importorskip("openai")
    gap = np.zeros(8000, np.float32)
    wave = np.concatenate([clips[0][2], gap, clips[1][2], gap, clips[2][2]])
    data = wav_bytes(wave)

    async def go():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        plain = await client.audio.transcriptions.create(model="whisper-1", file=("a.wav", data))
        events = []
        stream = await client.audio.transcriptions.create(model="whisper-1", file=("a.wav", data), stream=True)
        async for ev in stream:
            events.append(ev)
        await client.close()
        return plain, events

    plain, events = asyncio.run(go())
    deltas = [e for e in events if e.type == "transcript.text.delta"]
    done = [e for e in events if e.type == "transcript.text.done"]
    assert len(deltas) >= 2 and len(done) == 1  # one delta per VAD piece
    assert "".join(d.delta for d in deltas) == done[0].text == plain.text


def test_openai_errors_in_openai_shape(server, clips, tmp_path):
    openai = pytest.importorskip("openai")
    _, data, _ = clips[0]
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.audio.transcriptions.create(model="whisper-1", file=("a.wav", data))
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key" and e.value.request_id
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.APIStatusError) as e:
        client.audio.transcriptions.create(model="whisper-1", file=("big.wav", b"RIFF" + b"\0" * 2_100_000))
    assert e.value.status_code == 413 and e.value.code == "file_too_large"
    with pytest.raises(openai.APIStatusError) as e:
        client.audio.transcriptions.create(model="whisper-1", file=("notes.wav", b"this is not audio at all" * 50))
    assert e.value.status_code == 415 and e.value.code == "unsupported_format" and e.value.param == "file"
    with pytest.raises(openai.BadRequestError) as e:
        client.audio.transcriptions.create(model="whisper-1", file=("a.wav", data), response_format="xml")
    assert e.value.param == "response_format"
    with pytest.raises(openai.BadRequestError) as e:
        client.audio.transcriptions.create(model="whisper-1", file=("a.wav", data), temperature=3)
    assert e.value.param == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


# ------------------------------------------------------------------------- limits, faults
def test_bad_inputs_get_documented_4xx_and_the_server_survives(server, clips):
    _, data, wave = clips[0]
    hdr = wav_bytes(wave)
    claims_hours = bytearray(hdr)
    claims_hours[40:44] = (0x7FFFFFF0).to_bytes(4, "little")  # data chunk size: hours of samples
    nan = wav_bytes(np.full(16000, np.nan, np.float32), subtype="FLOAT")
    rng = np.random.default_rng(0)
    cases = {
        "empty file": (b"", 400, "empty_audio"),
        "random bytes": (rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), 415, "unsupported_format"),
        "truncated wav": (hdr[:30], None, None),
        "header claiming hours": (bytes(claims_hours), 200, None),
        "nan samples": (nan, 400, "corrupt_audio"),
        "zero samples": (wav_bytes(np.zeros(0, np.float32)), 400, "empty_audio"),
        "too long when decoded": (wav_bytes(np.zeros(61 * 8000, np.float32), sr=8000), 413, "audio_too_long"),
    }
    for name, (payload, status, code) in cases.items():
        r = post(server, payload)
        if status is None:
            assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
        else:
            assert r.status_code == status, (name, r.status_code, r.text)
        if code:
            assert r.json()["error"]["code"] == code, (name, r.text)
        assert httpx.get(server.url + "/healthz").status_code == 200
    # wrong content types, malformed multipart, missing file part
    r = httpx.post(server.url + "/v1/transcribe", json={"a": 1}, headers=H())
    assert r.status_code == 415
    r = httpx.post(server.url + "/v1/transcribe", content=b"--xx\r\nContent-Disposition: form-data; name=\"file\"\r\n",
                   headers={**H(), "Content-Type": "multipart/form-data; boundary=xx"})
    assert r.status_code == 400 and r.json()["error"]["code"] in ("invalid_multipart", "missing_file")
    r = httpx.post(server.url + "/v1/transcribe", data={"format": "json"}, files={"other": ("x", b"1")}, headers=H())
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_file"
    r = httpx.post(server.url + "/v1/audio/transcriptions", content=data, headers={**H(), "Content-Type": "audio/wav"})
    assert r.status_code == 415
    r = httpx.post(server.url + "/v1/transcribe", content=b"", headers={**H(), "Content-Type": "audio/wav"})
    assert r.status_code == 400
    # an upload over the limit is refused from its Content-Length, before the body is read
    r = httpx.post(server.url + "/v1/transcribe", content=b"\0" * 3_200_000, headers=H())
    assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"
    assert server.state.preparing == 0 and server.state.inflight == 0  # nothing leaked by the failures
    text = httpx.get(server.url + "/metrics").text
    assert 'harken_decode_failures_total{format="other"}' in text
    assert 'harken_rejected_total{reason="too_large"}' in text


def test_slow_clients_are_cut_off(server):
    # headers trickled: the connection is closed after header_timeout_s (2 s)
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(b"POST /v1/transcribe HTTP/1.1\r\nHost: x\r\n")
    t0 = time.monotonic()
    s.settimeout(6)
    got = b""
    try:
        while chunk := s.recv(1000):
            got += chunk
    except OSError:
        pass
    assert time.monotonic() - t0 < 5 and (got == b"" or b"408" in got)
    s.close()
    # a body that stalls: 408 after body_idle_timeout_s (1.5 s)
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(b"POST /v1/transcribe HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
              b"\r\nContent-Type: audio/wav\r\nContent-Length: 100000\r\n\r\nRIFF")
    s.settimeout(6)
    got = s.recv(4000)
    s.close()
    assert got.startswith(b"HTTP/1.1 408"), got[:200]
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_auth_probes_and_metrics(server):
    assert httpx.post(server.url + "/v1/transcribe", content=b"x").status_code == 401
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert r.headers["x-request-id"]
    assert httpx.get(server.url + "/v1/models", headers=H("sk-b")).status_code == 200
    # probes and metrics stay open; a client's request id is echoed
    r = httpx.get(server.url + "/readyz", headers={"x-request-id": "probe-1"})
    assert r.status_code == 200 and r.json()["ready"] and r.headers["x-request-id"] == "probe-1"
    text = httpx.get(server.url + "/metrics").text
    for name in ("harken_requests_total", "harken_request_duration_seconds_bucket", "harken_queue_wait_seconds",
                 "harken_batch_compute_seconds", "harken_batch_padding_ratio", "harken_audio_duration_seconds",
                 "harken_audio_seconds_total", "harken_rtf", "harken_queue_depth", "harken_inflight_requests",
                 "harken_streams_active", "harken_rejected_total", "harken_build_info", "harken_model_loaded"):
        assert name in text, name
    assert 'harken_requests_total{endpoint="models",model="tiny",status_class="4xx"}' in text
    assert KEY not in text and hash_key(KEY) not in text


def test_no_cors_by_default_and_cors_when_configured(engine, tmp_path):
    cfg = make_cfg(tmp_path, "store.url=null")
    with LiveServer(cfg, engine) as srv:
        r = httpx.options(srv.url + "/v1/transcribe", headers={"Origin": "https://a.example",
                                                               "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in r.headers
    cfg = make_cfg(tmp_path, "store.url=null", "cors_origins=[https://a.example]")
    with LiveServer(cfg, engine) as srv:
        r = httpx.options(srv.url + "/v1/transcribe", headers={"Origin": "https://a.example",
                                                               "Access-Control-Request-Method": "POST"})
        assert r.headers["access-control-allow-origin"] == "https://a.example"
        r = httpx.get(srv.url + "/v1/requests")
        assert r.status_code == 404 and r.json()["error"]["code"] == "store_off"


def test_rate_limit_per_key_is_429_with_retry_after(engine, clips, tmp_path):
    cfg = make_cfg(tmp_path, "limits.rate_limit_per_minute=6", "limits.rate_limit_burst=2")
    cfg.auth.api_keys = [ApiKey("a", hash_key("ka")), ApiKey("b", hash_key("kb"))]
    _, data, _ = clips[0]
    with LiveServer(cfg, engine) as srv:
        codes = [post(srv, data, key="ka").status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        r = post(srv, data, key="ka")
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 10
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert post(srv, data, key="kb").status_code == 200  # buckets are per key


# ------------------------------------------------------------------------ recognition log
def test_recognition_log_records_and_pages(server, clips):
    _, data, _ = clips[4]
    r = post(server, data, key="sk-b")
    rid = r.headers["x-request-id"]
    assert server.state.store.flush()
    rec = httpx.get(server.url + f"/v1/requests/{rid}", headers=H("sk-b")).json()
    assert rec["id"] == rid and rec["key_id"] == "team-b" and rec["status"] == 200 and rec["endpoint"] == "rest"
    assert rec["text"] == r.json()["text"] and rec["audio_seconds"] > 0 and rec["latency"] > 0
    assert rec["model_id"].startswith("sha256:") and rec["audio_bytes"] == len(data)
    audio = httpx.get(server.url + f"/v1/requests/{rid}/audio", headers=H("sk-b"))
    assert audio.content == data
    # a failed request is logged too; team-b sees only its own records, the admin key sees all
    post(server, b"garbage" * 10, key="sk-b")
    assert server.state.store.flush()
    mine = httpx.get(server.url + "/v1/requests?limit=100", headers=H("sk-b")).json()["data"]
    assert {x["key_id"] for x in mine} == {"team-b"} and mine[0]["status"] == 415
    seen, cursor = [], None
    while True:
        page = httpx.get(server.url + "/v1/requests", params={"limit": 3, **({"cursor": cursor} if cursor else {})},
                         headers=H()).json()
        seen += [x["id"] for x in page["data"]]
        cursor = page["next_cursor"]
        if not page["has_more"]:
            break
    assert len(seen) == len(set(seen)) >= len(mine) + 3 and rid in seen
    assert httpx.get(server.url + f"/v1/requests/{rid}", headers=H()).status_code == 200
    other = [x["id"] for x in httpx.get(server.url + "/v1/requests?limit=500", headers=H()).json()["data"]
             if x["key_id"] == "admin"][0]
    assert httpx.get(server.url + f"/v1/requests/{other}", headers=H("sk-b")).status_code == 404
    # retained audio stays under its cap (400 kB): the oldest is deleted first
    assert server.state.store.audio_total() <= 400000


def test_store_failure_never_fails_a_transcription(engine, clips, tmp_path):
    cfg = make_cfg(tmp_path)
    _, data, _ = clips[0]
    with LiveServer(cfg, engine) as srv:
        import sqlite3

        conn = sqlite3.connect(str(tmp_path / "log.sqlite"))
        conn.execute("DROP TABLE requests")
        conn.close()
        r = post(srv, data, key=None)
        assert r.status_code == 200 and r.json()["text"]
        assert srv.state.store.flush()
        assert srv.state.store.failures >= 1
        assert 'harken_db_write_failures_total{backend="sqlite"} 1.0' in httpx.get(srv.url + "/metrics").text


def test_config_is_validated_with_clear_errors(tmp_path):
    from harken.config import ConfigError

    with pytest.raises(ConfigError, match="port"):
        load_serve_config(None, ["port=70000"])
    with pytest.raises(ConfigError, match="batching"):
        load_serve_config(None, ["batching.max_batch_sise=3"])
    with pytest.raises(ConfigError, match="sha256"):
        load_serve_config(None, ['auth.api_keys=[{id: a, sha256: plain-secret}]'])
    p = tmp_path / "serve.yaml"
    p.write_text("serve:\n  port: 9001\n  batching: {max_batch_size: 4}\n")
    cfg = load_serve_config(str(p), ["limits.max_upload_bytes=1000"])
    assert (cfg.port, cfg.batching.max_batch_size, cfg.limits.max_upload_bytes) == (9001, 4, 1000)
    assert json.loads(json.dumps(cfg.to_dict()))["port"] == 9001


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def test_decode_bomb_forged_rates_huge_uploads_and_abandoned_connections(server, clips):
    """The in-process server (RSS measured here) survives: a 180 kB FLAC that decodes to an hour
    stops at the 60 s cap (413 in bounded time), forged sample rates are 400, a chunked 100 MB
    upload is cut at the limit, 200 connections opened and abandoned are closed by the header
    timeout while /healthz stays green."""
    rss0 = _rss_mb()
    buf = io.BytesIO()
    z = np.zeros(16000 * 60, np.float32)
    with sf.SoundFile(buf, "w", 16000, 1, format="FLAC", subtype="PCM_16") as f:
        for _ in range(60):
            f.write(z)
    bomb = buf.getvalue()
    assert len(bomb) < 400_000
    t0 = time.monotonic()
    r = post(server, bomb)
    assert r.status_code == 413 and r.json()["error"]["code"] == "audio_too_long", r.text
    assert time.monotonic() - t0 < 10
    for rate in (1, 0x7FFFFFF0):
        forged = bytearray(clips[0][1])
        forged[24:28] = rate.to_bytes(4, "little")
        r = post(server, bytes(forged))
        assert r.status_code in (400, 415), (rate, r.status_code, r.text)
    # 100 MB, chunked (no Content-Length): cut at the limit, the server keeps going
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(b"POST /v1/transcribe HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
              b"\r\nContent-Type: audio/wav\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n" % 65536 + b"\0" * 65536 + b"\r\n"
    sent = 0
    try:
        while sent < 100_000_000:
            s.sendall(chunk)
            sent += 65536
    except OSError:
        pass
    s.settimeout(5)
    try:
        reply = s.recv(2000)
    except OSError:
        reply = b""
    s.close()
    assert sent < 20_000_000 and (reply == b"" or reply.startswith(b"HTTP/1.1 413")), (sent, reply[:100])
    # 200 abandoned connections: some silent, some with half a request line
    socks = []
    for i in range(200):
        c = socket.create_connection(("127.0.0.1", server.port))
        if i % 2:
            c.sendall(b"GET /heal")
        socks.append(c)
    t0 = time.perf_counter()
    assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200
    assert time.perf_counter() - t0 < 1.0
    time.sleep(server.cfg.limits.header_timeout_s + 1.0)
    closed = 0
    for c in socks:
        c.settimeout(0.5)
        try:
            got = c.recv(100)
            closed += got == b"" or got.startswith(b"HTTP/1.1 408")
        except OSError:
            closed += 1
        c.close()
    assert closed == 200
    assert httpx.get(server.url + "/healthz").status_code == 200
    assert _rss_mb() - rss0 < 300, (rss0, _rss_mb())


def test_compressed_uploads_and_decode_timeout(engine, clips, tmp_path):
    """WebM/Opus and MP3 decode through the ffmpeg child; a decode slower than
    limits.decode_timeout_s is 422 decode_timeout."""
    import shutil
    import subprocess

    from harken.audio import load_audio

    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed (apt-get install ffmpeg): compressed uploads untested")
    _, data, _ = clips[3]
    src = tmp_path / "a.wav"
    src.write_bytes(data)
    files = {}
    for ext, codec in (("webm", "libopus"), ("mp3", "libmp3lame")):
        out = tmp_path / f"a.{ext}"
        r = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(src), "-c:a", codec, "-b:a", "32k",
                            str(out)], capture_output=True)
        if r.returncode == 0:
            files[ext] = out.read_bytes()
    assert files, "ffmpeg could encode neither webm/opus nor mp3"
    with LiveServer(make_cfg(tmp_path), engine) as srv:
        for ext, blob in files.items():
            r = httpx.post(srv.url + "/v1/transcribe", files={"file": ("upload.bin", blob)}, timeout=60)
            assert r.status_code == 200, (ext, r.text)
            assert r.json()["text"] == engine.transcribe(load_audio(blob)).text
    with LiveServer(make_cfg(tmp_path, "limits.decode_timeout_s=0.001"), engine) as srv:
        blob = next(iter(files.values()))
        r = httpx.post(srv.url + "/v1/transcribe", files={"file": ("upload.bin", blob)}, timeout=60)
        assert r.status_code == 422 and r.json()["error"]["code"] == "decode_timeout", r.text
        assert httpx.get(srv.url + "/healthz").status_code == 200


def test_cli_errors_are_one_line_and_hash_key(tmp_path, capsys, monkeypatch):
    from harken.serve.cli import main

    assert main(["--model", str(tmp_path / "nope.pt"), "store.url=null"]) == 2
    err = capsys.readouterr().err
    assert "nope.pt" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["--model", "x.pt", "batching.max_wait_ms=-1"]) == 2
    assert "max_wait_ms" in capsys.readouterr().err
    assert main([]) == 2 and "--model" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("sk-secret\n"))
    assert main(["--hash-key", "-", "--key-id", "ops"]) == 0
    entry = json.loads(capsys.readouterr().out)["auth"]["api_keys"][0]
    assert entry == {"id": "ops", "sha256": hash_key("sk-secret")}
    cfg = load_serve_config(None, [f"auth.api_keys=[{{id: ops, sha256: {entry['sha256']}}}]"])
    assert cfg.auth.api_keys[0].id == "ops"


def test_websocket_connections_outlive_the_header_timeout(engine, tmp_path):
    """The header deadline of the HTTP protocol must not fire on a connection upgraded to a
    WebSocket (an echo route added to the real app, served by the real protocol class)."""
    websockets = pytest.importorskip("websockets")
    from websockets.sync.client import connect

    cfg = make_cfg(tmp_path, "store.url=null", "limits.header_timeout_s=1")
    srv = LiveServer(cfg, engine)

    async def echo(ws):
        await ws.accept()
        while True:
            msg = await ws.receive_text()
            await ws.send_text(msg)

    srv.app.router.add_websocket_route("/test-echo", echo)  # plain Starlette route: no injection
    with srv:
        with connect(f"ws://127.0.0.1:{srv.port}/test-echo") as ws:
            ws.send("a")
            assert ws.recv(timeout=5) == "a"
            time.sleep(2.0)  # twice the header timeout
            ws.send("b")
            assert ws.recv(timeout=5) == "b"
    assert websockets
