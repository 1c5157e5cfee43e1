"""gRPC of `harken serve` on a live loopback server: unary Recognize (file and raw PCM) equals the
engine, bidirectional StreamingRecognize carries the WebSocket protocol's messages and results,
errors map to gRPC status codes, grpc.health.v1 and reflection answer, and the committed
generated modules match the shipped .proto."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")
pytest.importorskip("grpc_health")
pytest.importorskip("grpc_reflection")
pytest.importorskip("fastapi")

sys.path.insert(0, str(Path(__file__).parent))
from test_serve_stream import finals, from_pcm16, metric, pcm16, reference, serve_model_path, speech  # noqa: E402

KEY = "grpc-test-secret"
MD = (("authorization", f"Bearer {KEY}"),)


@pytest.fixture(scope="module")
def served(tiny_corpus, tmp_path_factory):
    from harken.runtime import Engine
    from harken.runtime.streaming import StreamingModel
    from harken.serve.config import ApiKey, ServeConfig, hash_key
    from harken.serve.testing import LiveServer, free_port

    engine = Engine.load(serve_model_path(tiny_corpus, tmp_path_factory), num_threads=1)
    sm = StreamingModel.from_engine(engine)
    cfg = ServeConfig()
    cfg.grpc_port = free_port()
    cfg.limits.stream_idle_timeout_s = 2.0
    cfg.auth.api_keys = [ApiKey(id="grpc-tester", sha256=hash_key(KEY))]
    cfg.store.url = str(tmp_path_factory.mktemp("grpc_store") / "requests.sqlite")
    with LiveServer(cfg, engine, sm) as srv:
        with grpc.insecure_channel(f"127.0.0.1:{cfg.grpc_port}") as ch:
            grpc.channel_ready_future(ch).result(timeout=15)
            yield srv, engine, sm, ch


@pytest.fixture(scope="module")
def pb():
    from harken.serve.proto import harken_asr_pb2, harken_asr_pb2_grpc

    return harken_asr_pb2, harken_asr_pb2_grpc


def test_unary_recognize_file_equals_engine(served, pb, tiny_corpus):
    from harken.data.manifest import read_manifest

    srv, engine, _, ch = served
    pb2, pbg = pb
    corpus, _ = tiny_corpus
    rec = read_manifest(corpus / "test_seen.jsonl")[0]
    data = Path(rec.audio).read_bytes()
    stub = pbg.RecognizerStub(ch)
    r = stub.Recognize(pb2.RecognizeRequest(config=pb2.RecognitionConfig(word_timestamps=True), audio=data),
                       metadata=MD, timeout=30)
    from harken.runtime.options import DecodeOptions

    ref = engine.transcribe(rec.audio, DecodeOptions(word_timestamps=True))
    assert r.text == ref.text and r.text
    assert r.duration == pytest.approx(rec.duration, abs=0.02)
    assert [w.word for w in r.words] == [w.word for w in ref.words]
    assert all(0 <= w.start <= w.end <= r.duration + 0.05 for w in r.words)
    assert r.request_id and r.model == srv.state.model_name
    assert len(r.segments) == 1 and r.segments[0].text == r.text and len(r.segments[0].words) == len(r.words)
    srv.state.store.flush()
    got = srv.state.store.get(r.request_id)
    assert got["endpoint"] == "grpc_unary" and got["status"] == 200 and got["text"] == r.text


def test_unary_recognize_raw_pcm_resampled(served, pb, tiny_corpus):
    import soxr

    from harken.serve.audio_in import pcm_to_wave

    _, engine, _, ch = served
    pb2, pbg = pb
    w = soxr.resample(speech(tiny_corpus, n=1), 16000, 8000).astype(np.float32)
    data = pcm16(w)
    r = pbg.RecognizerStub(ch).Recognize(
        pb2.RecognizeRequest(config=pb2.RecognitionConfig(encoding="pcm_s16le", sample_rate=8000), audio=data),
        metadata=MD, timeout=30)
    ref = engine.transcribe(pcm_to_wave(data, "pcm_s16le", 8000, 1, 16000, 3600.0))
    assert r.text == ref.text
    assert not r.words  # word_timestamps off


def test_unary_errors_map_to_status_codes(served, pb):
    _, _, _, ch = served
    pb2, pbg = pb
    stub = pbg.RecognizerStub(ch)
    wav = pcm16(np.zeros(16000, np.float32))
    cases = [
        (pb2.RecognizeRequest(config=pb2.RecognitionConfig(encoding="pcm_s16le", sample_rate=16000), audio=wav),
         (), grpc.StatusCode.UNAUTHENTICATED),
        (pb2.RecognizeRequest(audio=b"this is not audio at all" * 10), MD, grpc.StatusCode.INVALID_ARGUMENT),
        (pb2.RecognizeRequest(audio=b""), MD, grpc.StatusCode.INVALID_ARGUMENT),
        (pb2.RecognizeRequest(config=pb2.RecognitionConfig(decoding="psychic"), audio=wav), MD,
         grpc.StatusCode.INVALID_ARGUMENT),
        (pb2.RecognizeRequest(config=pb2.RecognitionConfig(encoding="pcm_s16le", sample_rate=16000), audio=b"\x00"),
         MD, grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for req, md, code in cases:
        with pytest.raises(grpc.RpcError) as e:
            stub.Recognize(req, metadata=md, timeout=30)
        assert e.value.code() == code, e.value.details()
        assert e.value.details()


def _requests(pb2, data: bytes, frame=3200, rate=16000, **cfg):
    yield pb2.StreamingRecognizeRequest(config=pb2.StreamingConfig(version=1, sample_rate=rate, encoding="pcm_s16le",
                                                                   **cfg))
    for i in range(0, len(data), frame):
        yield pb2.StreamingRecognizeRequest(audio=data[i: i + frame])
    yield pb2.StreamingRecognizeRequest(stop=True)


def _as_dicts(results):
    from google.protobuf.json_format import MessageToDict

    return [MessageToDict(r, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
            for r in results]


def test_streaming_recognize_same_results_as_websocket_protocol(served, pb, tiny_corpus):
    srv, _, sm, ch = served
    pb2, pbg = pb
    data = pcm16(speech(tiny_corpus, n=2))
    ref = reference(sm, from_pcm16(data))
    out = list(pbg.RecognizerStub(ch).StreamingRecognize(_requests(pb2, data, word_timestamps=True), metadata=MD,
                                                         timeout=60))
    msgs = _as_dicts(out)
    assert msgs[0]["type"] == "ready" and msgs[0]["version"] == 1 and msgs[0]["chunk_ms"] == pytest.approx(320.0)
    assert msgs[-1]["type"] == "end" and msgs[-1]["segments"] == len(ref)
    assert any(m["type"] == "partial" for m in msgs)
    got = finals(msgs)
    assert [f["text"] for f in got] == [r.text for r in ref]
    for f, r in zip(got, ref):
        assert f["is_final"] and f["start"] == pytest.approx(r.start, abs=1e-3)
        assert [w["word"] for w in f["words"]] == [w.word for w in r.words]
    # the WebSocket route of the same server gives the same finals
    from test_serve_stream import stream

    ws_msgs, _ = stream(srv, data, key=KEY, word_timestamps=True)
    assert [f["text"] for f in finals(ws_msgs)] == [f["text"] for f in got]
    deadline = time.monotonic() + 10
    while metric(srv, "harken_streams_active", protocol="grpc") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(srv, "harken_streams_active", protocol="grpc") == 0


def test_streaming_errors_end_the_call_with_a_status(served, pb):
    _, _, _, ch = served
    pb2, pbg = pb
    stub = pbg.RecognizerStub(ch)

    def collect(reqs, md=MD):
        got = []
        with pytest.raises(grpc.RpcError) as e:
            for r in stub.StreamingRecognize(iter(reqs), metadata=md, timeout=30):
                got.append(r)
        return got, e.value

    got, err = collect([pb2.StreamingRecognizeRequest(audio=b"\x00\x00" * 100)])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert got[-1].type == "error" and got[-1].code == "audio_before_start"
    got, err = collect([pb2.StreamingRecognizeRequest(config=pb2.StreamingConfig(sample_rate=16000))], md=())
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and got[-1].code == "unauthorized"
    got, err = collect([pb2.StreamingRecognizeRequest(config=pb2.StreamingConfig(encoding="mp3"))])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and got[-1].code == "unsupported_encoding"
    got, err = collect([pb2.StreamingRecognizeRequest(config=pb2.StreamingConfig(sample_rate=16000)),
                        pb2.StreamingRecognizeRequest(audio=b"\x00" * (1024 * 1024 + 10))])
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and got[-1].code == "too_large"
    # the api key may also come in the config; closing the sending side ends the stream like stop
    reqs = [pb2.StreamingRecognizeRequest(config=pb2.StreamingConfig(sample_rate=16000, api_key=KEY,
                                                                     interim_results=False)),
            pb2.StreamingRecognizeRequest(audio=b"\x00\x00" * 16000)]
    out = list(stub.StreamingRecognize(iter(reqs), timeout=30))
    types = [r.type for r in out]
    assert types[0] == "ready" and types[-1] == "end" and "partial" not in types and "error" not in types


def test_health_and_reflection(served):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    _, _, _, ch = served
    h = health_pb2_grpc.HealthStub(ch)
    for name in ("", "harken.asr.v1.Recognizer"):
        assert h.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as e:
        h.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    stub = reflection_pb2_grpc.ServerReflectionStub(ch)
    reqs = [reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="harken.asr.v1.Recognizer")]
    resp = list(stub.ServerReflectionInfo(iter(reqs), timeout=10))
    names = {s.name for s in resp[0].list_services_response.service}
    assert {"harken.asr.v1.Recognizer", "grpc.health.v1.Health"} <= names
    from google.protobuf import descriptor_pb2

    fd = descriptor_pb2.FileDescriptorProto.FromString(resp[1].file_descriptor_response.file_descriptor_proto[0])
    assert fd.package == "harken.asr.v1" and "Recognizer" in [s.name for s in fd.service]


def test_committed_generated_code_matches_the_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    from harken.serve.proto import PROTO, generate

    for p in generate(tmp_path):
        committed = PROTO.parent / p.name
        assert committed.read_text() == p.read_text(), f"{committed} is stale: run `python -m harken.serve.proto`"


def test_example_client(served, tiny_corpus, tmp_path):
    import subprocess

    from harken.audio import save_wav

    srv, engine, sm, _ = served
    wave = speech(tiny_corpus, n=1)
    wav = tmp_path / "a.wav"
    save_wav(wav, wave, 16000)
    script = Path(__file__).parents[1] / "examples" / "grpc_client.py"
    addr = f"127.0.0.1:{srv.cfg.grpc_port}"
    env = {**__import__("os").environ, "HARKEN_API_KEY": KEY}

    def run(*args):
        return subprocess.run([sys.executable, str(script), *args, "--server", addr], capture_output=True, text=True,
                              timeout=120, env=env)

    r = run(str(wav))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == engine.transcribe(str(wav)).text
    r = run(str(wav), "--stream")
    assert r.returncode == 0, r.stderr
    texts = [line.split("] ", 1)[1] for line in r.stdout.splitlines() if line.startswith("[")]
    import soundfile as sf

    sent = sf.read(str(wav), dtype="int16")[0].astype(np.float32) / 32768.0  # what the client sends
    assert texts == [f.text for f in reference(sm, sent)]


def test_streaming_admission_and_cancelled_clients(served, pb, tiny_corpus):
    srv, _, _, ch = served
    pb2, pbg = pb
    stub = pbg.RecognizerStub(ch)
    with pytest.raises(grpc.RpcError) as e:  # a bad key in the metadata: refused before any message
        list(stub.StreamingRecognize(iter([pb2.StreamingRecognizeRequest(config=pb2.StreamingConfig())]),
                                     metadata=(("authorization", "Bearer wrong"),), timeout=10))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    data = pcm16(speech(tiny_corpus, n=1))

    def slow():
        yield pb2.StreamingRecognizeRequest(config=pb2.StreamingConfig(sample_rate=16000))
        for i in range(0, len(data), 3200):
            yield pb2.StreamingRecognizeRequest(audio=data[i: i + 3200])
            time.sleep(0.01)
        time.sleep(30)  # never stops: the client cancels

    for _ in range(5):  # clients that cancel in the middle of their stream
        call = stub.StreamingRecognize(slow(), metadata=MD)
        assert next(call).type == "ready"
        time.sleep(0.2)
        call.cancel()
    deadline = time.monotonic() + 15
    while metric(srv, "harken_streams_active", protocol="grpc") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(srv, "harken_streams_active", protocol="grpc") == 0
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING
