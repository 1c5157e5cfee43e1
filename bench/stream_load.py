"""Streaming load test of ``harken serve``: N concurrent real-time WebSocket streams (``/v1/stream``)
on loopback, partial and final latency percentiles per level, and the most streams that held.

    python bench/stream_load.py --model exp/demo/best.pt --streams 8,32
    python bench/stream_load.py --model exp/demo/best.pt --find-max --max-p95-ms 300
    python bench/stream_load.py --url http://127.0.0.1:8000 --streams 4 --clip speech.wav

The script starts ``harken serve --model PATH`` itself on a free loopback port (``--url``: a running
server, loopback only). A model that cannot stream (not a causal chunked encoder) is refused by the
server with ``streaming_unavailable``; the script says so and exits 2. The streaming chunk size is
the model's own (``model.encoder.chunk_size``): neither the ``start`` message nor the serve config
take one.

Each stream sends the clip (``--clip``, default: utterances of ``--manifest`` concatenated to
``--clip-seconds``) as 16 kHz pcm_s16le frames of ``--frame-ms`` (100 ms) at real time, one frame
every 100 ms, then ``stop``. Stream starts are staggered evenly over ``--stagger-s`` (1 s).

Measured per stream, client side (monotonic clock):

* partial latency: for each ``partial`` received before ``stop`` was sent, now minus the send time
  of the frame holding the partial's ``end`` (the end of the audio it covers, frame index
  ``ceil(end / frame) - 1``). The chunk a partial covers is complete once that frame has arrived, so
  this is "last audio needed sent -> partial received" (it includes loopback transport and event
  loop delays on both sides, and is an upper bound by under one frame when a chunk ends mid-frame).
* final latency: ``stop`` sent -> the last ``final`` received (the ``end`` message when no final
  came after stop, e.g. when endpointing had already finalised everything).

Per level: p50/p95 of both, errors (connect failures, ``error`` messages, non-1000 closes,
timeouts), and from ``/metrics`` the server's mean stream-step batch size
(``harken_batch_size{kind="stream_step"}``) and its own mean partial latency over the level.
Bounded: a level lasts at most ``--level-timeout`` seconds (the clip is cut to fit), ``--find-max``
stops at ``--max-streams``. Prints a markdown table and ``RESULT {json}`` lines (bench/common.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from urllib.parse import urlparse

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
RATE = 16000


class StreamingUnavailable(Exception):
    pass


def load_clip(path: str | None, manifest: str, seconds: float) -> np.ndarray:
    """16 kHz float32 mono: ``path``, else utterances of ``manifest`` concatenated to ``seconds``
    (with 0.3 s pauses), else a synthetic voiced signal."""
    from harken.audio import load_audio

    if path:
        return load_audio(path)[: int(seconds * RATE)]
    if manifest and os.path.exists(manifest):
        from harken.data.manifest import read_manifest

        parts, n = [], 0
        gap = np.zeros(int(0.3 * RATE), np.float32)
        for r in read_manifest(manifest):
            x = load_audio(r.audio)
            parts += [x, gap]
            n += len(x) + len(gap)
            if n >= seconds * RATE:
                break
        if parts:
            return np.concatenate(parts)[: int(seconds * RATE)]
    t = np.arange(int(seconds * RATE)) / RATE
    env = 0.5 * (1 + np.sin(2 * np.pi * 3 * t))
    return (0.2 * env * np.sin(2 * np.pi * 180 * t) * np.sin(2 * np.pi * 900 * t)).astype(np.float32)


def metric_sum(text: str, name: str, label: str = "") -> float:
    """Sum of the samples of ``name`` (exact name, optionally only lines containing ``label``)."""
    tot = 0.0
    for line in text.splitlines():
        if line.startswith(name) and len(line) > len(name) and line[len(name)] in " {" and label in line:
            try:
                tot += float(line.rsplit(" ", 1)[1])
            except ValueError:
                pass
    return tot


def pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)) * 1000, 1) if xs else None


def ws_url(http_url: str) -> str:
    u = urlparse(http_url)
    return f"{'wss' if u.scheme == 'https' else 'ws'}://{u.netloc}/v1/stream"


async def probe(url: str) -> dict:
    """Open one stream and stop it at once; raise StreamingUnavailable when the server refuses to
    stream this model. Returns the ready message."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    try:
        async with connect(ws_url(url), max_size=None, open_timeout=10) as ws:
            await ws.send(json.dumps({"type": "start", "version": 1, "sample_rate": RATE, "encoding": "pcm_s16le",
                                      "interim_results": True}))
            ready = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if ready.get("type") != "ready":
                raise StreamingUnavailable(f"{ready.get('code')}: {ready.get('message')}")
            await ws.send(json.dumps({"type": "stop"}))
            async for _ in ws:
                pass
            return ready
    except InvalidStatus as e:
        body = e.response.body.decode("utf-8", "replace") if e.response.body else ""
        try:
            err = json.loads(body)["error"]
            msg = f"{err.get('code')}: {err.get('message')}"
        except (ValueError, KeyError, TypeError):
            msg = body[:300]
        raise StreamingUnavailable(f"HTTP {e.response.status_code} {msg}") from None


async def one_stream(url: str, pcm: bytes, frame_bytes: int, frame_s: float, delay: float, deadline: float,
                     out: dict) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    await asyncio.sleep(delay)
    sends: list[float] = []
    partial_lat: list[float] = []
    t_stop = None
    t_last_final = t_end = None
    error = None
    try:
        async with connect(ws_url(url), max_size=None, open_timeout=10) as ws:
            await ws.send(json.dumps({"type": "start", "version": 1, "sample_rate": RATE, "encoding": "pcm_s16le",
                                      "interim_results": True}))
            ready = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if ready.get("type") != "ready":
                raise RuntimeError(f"error {ready.get('code')}")

            async def sender():
                nonlocal t_stop
                t0 = time.monotonic()
                for i, off in enumerate(range(0, len(pcm), frame_bytes)):
                    await asyncio.sleep(max(0.0, t0 + i * frame_s - time.monotonic()))
                    sends.append(time.monotonic())
                    await ws.send(pcm[off: off + frame_bytes])
                await asyncio.sleep(max(0.0, t0 + len(sends) * frame_s - time.monotonic()))
                t_stop = time.monotonic()
                await ws.send(json.dumps({"type": "stop"}))

            async def receiver():
                nonlocal t_last_final, t_end, error
                async for raw in ws:
                    now = time.monotonic()
                    m = json.loads(raw)
                    typ = m.get("type")
                    if typ == "partial" and t_stop is None:
                        idx = min(len(sends) - 1, max(0, math.ceil(float(m["end"]) / frame_s - 1e-6) - 1))
                        if 0 <= idx < len(sends):
                            partial_lat.append(now - sends[idx])
                    elif typ == "final" and t_stop is not None:
                        t_last_final = now
                    elif typ == "end":
                        t_end = now
                    elif typ == "error":
                        error = f"error {m.get('code')}"

            rx = asyncio.ensure_future(receiver())
            tx = asyncio.ensure_future(sender())
            try:
                await asyncio.wait_for(asyncio.gather(tx, rx), max(1.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                error = error or "timeout"
            code = ws.close_code
            if error is None and code not in (None, 1000):
                error = f"close {code}"
    except InvalidStatus as e:
        error = f"http {e.response.status_code}"
    except (ConnectionClosed, OSError, RuntimeError, asyncio.TimeoutError) as e:
        error = error or (str(e)[:60] if isinstance(e, RuntimeError) else type(e).__name__)
    if error is None and t_end is None:
        error = "no end"
    out["partial"] += partial_lat
    if error is None and t_stop is not None:
        out["final"].append((t_last_final or t_end) - t_stop)
    if error:
        out["errors"][error] = out["errors"].get(error, 0) + 1


async def run_level(url: str, wave: np.ndarray, streams: int, frame_ms: float, stagger_s: float,
                    level_timeout: float) -> dict:
    import httpx

    frame_s = frame_ms / 1000.0
    frame_bytes = int(RATE * frame_s) * 2
    # the clip must fit the level's time budget: stagger + audio + a few seconds for the finals
    max_audio = max(1.0, level_timeout - stagger_s - 5.0)
    wave = wave[: int(max_audio * RATE)]
    pcm = np.clip(np.round(wave * 32768.0), -32768, 32767).astype("<i2").tobytes()
    out: dict = {"partial": [], "final": [], "errors": {}}
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        m0 = (await c.get("/metrics")).text
        t_start = time.monotonic()
        deadline = t_start + level_timeout
        await asyncio.gather(*[one_stream(url, pcm, frame_bytes, frame_s, k * stagger_s / max(1, streams),
                                          deadline, out) for k in range(streams)])
        wall = time.monotonic() - t_start
        m1 = (await c.get("/metrics")).text
        for _ in range(50):  # let the server release the streams before the next level
            if metric_sum(m1, "harken_streams_active") <= 0:
                break
            await asyncio.sleep(0.1)
            m1 = (await c.get("/metrics")).text

    def diff(name, label=""):
        return metric_sum(m1, name, label) - metric_sum(m0, name, label)

    bs, bc = diff("harken_batch_size_sum", 'kind="stream_step"'), diff("harken_batch_size_count", 'kind="stream_step"')
    ps, pc = diff("harken_stream_partial_latency_seconds_sum"), diff("harken_stream_partial_latency_seconds_count")
    fs, fc = diff("harken_stream_final_latency_seconds_sum"), diff("harken_stream_final_latency_seconds_count")
    n_err = sum(out["errors"].values())
    return {"streams": streams, "audio_s": round(len(wave) / RATE, 2), "wall_s": round(wall, 2),
            "ok": streams - n_err, "errors": n_err, "error_kinds": out["errors"], "partials": len(out["partial"]),
            "partial_p50_ms": pct(out["partial"], 50), "partial_p95_ms": pct(out["partial"], 95),
            "final_p50_ms": pct(out["final"], 50), "final_p95_ms": pct(out["final"], 95),
            "mean_stream_batch": round(bs / bc, 2) if bc else None, "steps": int(bc),
            "server_partial_mean_ms": round(1000 * ps / pc, 1) if pc else None,
            "server_final_mean_ms": round(1000 * fs / fc, 1) if fc else None}


def table(rows: list[dict]) -> str:
    cols = ["streams", "ok", "errors", "partial_p50_ms", "partial_p95_ms", "final_p50_ms", "final_p95_ms",
            "mean_stream_batch", "server_partial_mean_ms"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("-" if r.get(k) is None else str(r.get(k)) for k in cols) + " |")
    return "\n".join(lines)


def find_max_levels(cap: int):
    n = 8
    yield n
    n = 16
    while n <= cap:
        yield n
        n = 32 if n == 16 else n + 16


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="start `harken serve` for this model (a .pt checkpoint or streaming ONNX)")
    p.add_argument("--url", help="a running server instead (loopback only)")
    p.add_argument("--streams", default="8,32", help="comma-separated concurrency levels, run one at a time")
    p.add_argument("--find-max", action="store_true", help="8, 16, 32, 48, 64, ... until partial p95 > "
                   "--max-p95-ms or errors; report the most that held")
    p.add_argument("--max-p95-ms", type=float, default=300.0)
    p.add_argument("--max-streams", type=int, default=256, help="upper bound for --find-max (and the server's "
                   "limits.max_streams)")
    p.add_argument("--clip", help="audio file each stream sends (default: --manifest utterances)")
    p.add_argument("--manifest", default="data/demo/test_unseen.jsonl")
    p.add_argument("--clip-seconds", type=float, default=10.0)
    p.add_argument("--frame-ms", type=float, default=100.0)
    p.add_argument("--stagger-s", type=float, default=1.0, help="stream starts spread over this many seconds")
    p.add_argument("--level-timeout", type=float, default=30.0, help="seconds per level at most (bounded)")
    p.add_argument("--json", help="write all results here")
    p.add_argument("overrides", nargs="*", help="serve config overrides for the started server")
    a = p.parse_args(argv)
    a.level_timeout = min(max(a.level_timeout, 5.0), 120.0)
    a.max_streams = max(1, min(a.max_streams, 1024))
    if a.find_max:
        levels = list(find_max_levels(a.max_streams))
    else:
        levels = [int(x) for x in a.streams.split(",") if x.strip()]
        if not levels or min(levels) < 1 or max(levels) > 1024:
            p.error("--streams: levels between 1 and 1024")
    wave = load_clip(a.clip, a.manifest, a.clip_seconds)

    srv = None
    if a.url:
        host = urlparse(a.url).hostname or ""
        if host not in LOOPBACK and not host.startswith("127."):
            print(f"stream_load: {a.url}: only loopback targets are allowed", file=sys.stderr)
            return 2
        url = a.url.rstrip("/")
    elif a.model:
        from harken.serve.testing import ServerProcess

        over = ["store.url=null", "limits.rate_limit_per_minute=0",
                f"limits.max_streams={max(max(levels), a.max_streams) + 8}", *a.overrides]
        srv = ServerProcess(a.model, over)
        try:
            srv.start()
        except RuntimeError as e:
            print(f"stream_load: {a.model}: the server did not start: {str(e)[-800:]}", file=sys.stderr)
            return 2
        url = srv.url
    else:
        p.error("give --model or --url")

    rows: list[dict] = []
    try:
        try:
            ready = asyncio.run(probe(url))
        except StreamingUnavailable as e:
            print(f"stream_load: {a.model or url}: the server refuses to stream this model ({e}); streaming "
                  "needs a causal chunked encoder (model.encoder.causal=true, chunk_size>0) or a streaming ONNX "
                  "export", file=sys.stderr)
            return 2
        print(f"# streaming: model {ready.get('model')}, chunk {ready.get('chunk_ms')} ms, clip "
              f"{min(len(wave) / RATE, a.level_timeout - a.stagger_s - 5):.1f} s, frames of {a.frame_ms:g} ms "
              "in real time", flush=True)
        from bench.common import emit

        best = None
        for n in levels:
            r = asyncio.run(run_level(url, wave, n, a.frame_ms, a.stagger_s, a.level_timeout))
            r["chunk_ms"] = ready.get("chunk_ms")
            held = r["errors"] == 0 and r["partial_p95_ms"] is not None and r["partial_p95_ms"] <= a.max_p95_ms
            r["held"] = held
            rows.append(r)
            emit("stream_load", r)
            sys.stdout.flush()
            if a.find_max:
                if not held:
                    break
                best = n
        print()
        print(table(rows))
        if a.find_max:
            summary = {"find_max": True, "max_streams_held": best, "max_p95_ms": a.max_p95_ms,
                       "chunk_ms": ready.get("chunk_ms"), "cap": a.max_streams}
            print(f"\nmost streams that held (partial p95 <= {a.max_p95_ms:g} ms, no errors): {best}"
                  + (" (the cap was reached)" if best == levels[-1] else ""))
            emit("stream_load_max", summary)
        if a.json:
            from bench.common import machine

            with open(a.json, "w") as f:
                json.dump({"machine": machine(), "model": a.model, "results": rows}, f, indent=2)
    finally:
        if srv is not None:
            srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
