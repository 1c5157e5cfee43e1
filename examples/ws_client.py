"""Stream an audio file to `harken serve` over the WebSocket /v1/stream (protocol v1).

    python examples/ws_client.py speech.wav --realtime
    python examples/ws_client.py speech.wav --url ws://127.0.0.1:8000/v1/stream --key KEY --words

The file is read at its own sample rate (the server resamples), sent as 16-bit PCM pieces of
--chunk-ms, then {"type": "stop"}; partial results are shown on one line, finals printed with
their times. Needs the `websockets` package.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect


def read_audio(path: str) -> tuple[np.ndarray, int]:
    try:
        import soundfile as sf

        x, rate = sf.read(path, dtype="float32", always_2d=True)
        return x.mean(axis=1), int(rate)
    except Exception:  # other containers: harken's loader (ffmpeg) at 16 kHz
        from harken.audio import load_audio

        return load_audio(path), 16000


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("audio")
    p.add_argument("--url", default="ws://127.0.0.1:8000/v1/stream")
    p.add_argument("--key", default=os.environ.get("HARKEN_API_KEY"))
    p.add_argument("--chunk-ms", type=float, default=100.0)
    p.add_argument("--realtime", action="store_true", help="send at the audio's own pace")
    p.add_argument("--words", action="store_true", help="word times in finals")
    a = p.parse_args(argv)
    wave, rate = read_audio(a.audio)
    pcm = np.clip(np.round(wave * 32768.0), -32768, 32767).astype("<i2").tobytes()  # 16-bit files pass unchanged
    headers = {"Authorization": f"Bearer {a.key}"} if a.key else None
    status = 0
    with connect(a.url, additional_headers=headers, max_size=None) as ws:
        ws.send(json.dumps({"type": "start", "version": 1, "sample_rate": rate, "encoding": "pcm_s16le",
                            "interim_results": True, "word_timestamps": a.words}))
        step = int(rate * a.chunk_ms / 1000) * 2
        t0 = time.monotonic()
        ready = json.loads(ws.recv())
        if ready["type"] != "ready":
            print(f"error {ready.get('code')}: {ready.get('message')}", file=sys.stderr)
            return 1
        print(f"[ready: session {ready['session_id']}, chunks of {ready['chunk_ms']} ms]", file=sys.stderr)
        for i in range(0, len(pcm), step):
            if a.realtime:
                time.sleep(max(0.0, t0 + (i / 2) / rate - time.monotonic()))
            ws.send(pcm[i: i + step])
            while True:  # show what has arrived so far without blocking
                try:
                    m = json.loads(ws.recv(timeout=0))
                except TimeoutError:
                    break
                status |= show(m)
        ws.send(json.dumps({"type": "stop"}))
        try:
            while True:
                status |= show(json.loads(ws.recv()))
        except ConnectionClosed:
            pass
    return status


def show(m: dict) -> int:
    t = m.get("type")
    if t == "partial":
        print(f"\r  ... {m['text']}", end="", file=sys.stderr, flush=True)
    elif t == "final":
        print("\r", end="", file=sys.stderr)
        print(f"[{m['start']:7.2f} - {m['end']:7.2f}] {m['text']}")
        for w in m.get("words", []):
            print(f"      {w['start']:7.2f} {w['end']:7.2f}  {w['word']}")
    elif t == "end":
        print(f"[end: {m['audio_seconds']:.2f} s of audio, {m['segments']} segment(s)]", file=sys.stderr)
    elif t == "error":
        print(f"error {m['code']}: {m['message']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
