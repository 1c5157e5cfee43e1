"""A gRPC client for `harken serve` (service harken.asr.v1.Recognizer, default port 50051).

    python examples/grpc_client.py speech.wav                     # unary Recognize: the whole file
    python examples/grpc_client.py speech.wav --stream --realtime # StreamingRecognize, paced like a microphone
    python examples/grpc_client.py --health                       # grpc.health.v1 Check

Options: --server HOST:PORT (127.0.0.1:50051), --key KEY (or $HARKEN_API_KEY; sent as
`authorization: Bearer KEY` metadata), --words (word times), --chunk-ms N (streamed piece size).
The messages are described in harken/serve/proto/harken_asr.proto.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import grpc
import numpy as np

from harken.serve.proto import harken_asr_pb2 as pb
from harken.serve.proto import harken_asr_pb2_grpc as pb_grpc


def metadata(key: str | None):
    return (("authorization", f"Bearer {key}"),) if key else ()


def recognize(stub, path: str, key: str | None, words: bool) -> int:
    with open(path, "rb") as f:
        audio = f.read()
    r = stub.Recognize(pb.RecognizeRequest(config=pb.RecognitionConfig(word_timestamps=words), audio=audio),
                       metadata=metadata(key), timeout=600)
    print(r.text)
    for w in r.words:
        print(f"  {w.start:7.2f} {w.end:7.2f}  {w.word}")
    print(f"({r.duration:.2f} s of audio, request {r.request_id})", file=sys.stderr)
    return 0


def requests(wave: np.ndarray, chunk_ms: float, realtime: bool, words: bool, rate: int = 16000):
    pcm = np.clip(np.round(wave * 32768.0), -32768, 32767).astype("<i2").tobytes()  # 16-bit files pass unchanged
    yield pb.StreamingRecognizeRequest(config=pb.StreamingConfig(version=1, sample_rate=rate, encoding="pcm_s16le",
                                                                 interim_results=True, word_timestamps=words))
    step = int(rate * chunk_ms / 1000) * 2
    t0 = time.monotonic()
    for i in range(0, len(pcm), step):
        if realtime:  # pace the audio like a live source
            time.sleep(max(0.0, t0 + (i / 2) / rate - time.monotonic()))
        yield pb.StreamingRecognizeRequest(audio=pcm[i: i + step])
    yield pb.StreamingRecognizeRequest(stop=True)


def stream(stub, path: str, key: str | None, words: bool, chunk_ms: float, realtime: bool) -> int:
    from harken.audio import load_audio

    wave = load_audio(path, sample_rate=16000)  # before the call: a bad file is a plain error here
    try:
        for r in stub.StreamingRecognize(requests(wave, chunk_ms, realtime, words), metadata=metadata(key)):
            if r.type == "ready":
                print(f"[ready: session {r.session_id}, model {r.model}, chunks of {r.chunk_ms:g} ms]",
                      file=sys.stderr)
            elif r.type == "partial":
                print(f"\r  ... {r.text}", end="", file=sys.stderr, flush=True)
            elif r.type == "final":
                print("\r", end="", file=sys.stderr)
                print(f"[{r.start:7.2f} - {r.end:7.2f}] {r.text}")
                for w in r.words:
                    print(f"      {w.start:7.2f} {w.end:7.2f}  {w.word}")
            elif r.type == "end":
                print(f"[end: {r.audio_seconds:.2f} s of audio, {r.segments} segment(s)]", file=sys.stderr)
            elif r.type == "error":
                print(f"error {r.code}: {r.message}", file=sys.stderr)
    except grpc.RpcError as e:
        print(f"gRPC {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    return 0


def health(channel) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    r = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
    print(name)
    return 0 if name == "SERVING" else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("audio", nargs="?", help="an audio file")
    p.add_argument("--server", default="127.0.0.1:50051")
    p.add_argument("--key", default=os.environ.get("HARKEN_API_KEY"))
    p.add_argument("--stream", action="store_true", help="StreamingRecognize instead of Recognize")
    p.add_argument("--realtime", action="store_true", help="with --stream: send at the audio's own pace")
    p.add_argument("--chunk-ms", type=float, default=100.0)
    p.add_argument("--words", action="store_true", help="word times")
    p.add_argument("--health", action="store_true", help="only ask grpc.health.v1 whether the server serves")
    a = p.parse_args(argv)
    if not a.health and not a.audio:
        p.error("give an audio file (or --health)")
    with grpc.insecure_channel(a.server, options=[("grpc.max_send_message_length", 256 << 20)]) as ch:
        stub = pb_grpc.RecognizerStub(ch)
        try:
            if a.health:
                return health(ch)
            if a.stream:
                return stream(stub, a.audio, a.key, a.words, a.chunk_ms, a.realtime)
            return recognize(stub, a.audio, a.key, a.words)
        except grpc.RpcError as e:
            print(f"gRPC {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
        except (OSError, ValueError) as e:  # the audio file (harken's AudioError is a ValueError)
            print(f"error: {e}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
