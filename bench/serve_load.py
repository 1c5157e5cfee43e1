"""Load test of ``harken serve`` on loopback: throughput (requests/s and audio-seconds/s) and
p50/p95/p99 latency for 5 s clips at several concurrency levels, optionally batching on vs off.

Bounded: each level runs at most ``--seconds`` and ``--max-requests``; only loopback targets are
accepted. Two ways to run it:

    # against a server you started (harken serve --model M port=8000)
    python bench/serve_load.py --url http://127.0.0.1:8000 --concurrency 1,4,16,64 --seconds 20

    # start the servers itself, batching on and off, same model (the issue's table)
    python bench/serve_load.py --model exp/demo/best.pt --compare-batching --seconds 20 --json out.json

Each level reports: requests, status counts, req/s, audio s/s (RTFx of the whole server), latency
percentiles (ms), and the mean batch size the server formed (from /metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import time
from urllib.parse import urlparse

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def clip_bytes(path: str | None, seconds: float = 5.0) -> tuple[bytes, float]:
    """The test clip as WAV bytes: ``path``, else utterances of data/corpus concatenated to
    ``seconds``, else a synthetic voiced signal."""
    import soundfile as sf

    from harken.audio import load_audio

    if path:
        w = load_audio(path)
    else:
        w = None
        man = "data/corpus/test_seen.jsonl"
        if os.path.exists(man):
            from harken.data.manifest import read_manifest

            parts, n = [], 0
            for r in read_manifest(man):
                x = load_audio(r.audio)
                parts.append(x)
                n += len(x)
                if n >= seconds * 16000:
                    break
            w = np.concatenate(parts)[: int(seconds * 16000)]
        if w is None:
            t = np.arange(int(seconds * 16000)) / 16000
            env = 0.5 * (1 + np.sin(2 * np.pi * 3 * t))
            w = (0.2 * env * np.sin(2 * np.pi * 180 * t) * np.sin(2 * np.pi * 900 * t)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, w, 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue(), len(w) / 16000


def _metric_sum(text: str, name: str) -> float:
    tot = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (len(line) == len(name) or line[len(name)] in " {"):
            try:
                tot += float(line.rsplit(" ", 1)[1])
            except ValueError:
                pass
    return tot


async def run_level(url: str, data: bytes, audio_s: float, concurrency: int, seconds: float, max_requests: int,
                    route: str = "rest", api_key: str | None = None, timeout: float = 120.0) -> dict:
    import httpx

    path = "/v1/transcribe" if route == "rest" else "/v1/audio/transcriptions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    lat: list[float] = []
    codes: dict[str, int] = {}
    issued = 0
    end = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, limits=limits) as c:
        m0 = (await c.get("/metrics")).text

        async def worker():
            nonlocal issued
            while time.monotonic() < end and issued < max_requests:
                issued += 1
                t0 = time.perf_counter()
                try:
                    fields = {"model": "harken"} if route == "openai" else {}
                    r = await c.post(path, files={"file": ("clip.wav", data, "audio/wav")}, data=fields)
                    code = str(r.status_code)
                except httpx.HTTPError as e:
                    code = type(e).__name__
                dt = time.perf_counter() - t0
                codes[code] = codes.get(code, 0) + 1
                if code == "200":
                    lat.append(dt)

        t_start = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - t_start
        m1 = (await c.get("/metrics")).text
    bs = _metric_sum(m1, "harken_batch_size_sum") - _metric_sum(m0, "harken_batch_size_sum")
    bc = _metric_sum(m1, "harken_batch_size_count") - _metric_sum(m0, "harken_batch_size_count")
    ok = len(lat)
    q = np.percentile(lat, [50, 95, 99]) * 1000 if lat else [float("nan")] * 3
    return {"concurrency": concurrency, "requests": sum(codes.values()), "status": codes, "wall_s": round(wall, 2),
            "req_per_s": round(ok / wall, 2), "audio_s_per_s": round(ok * audio_s / wall, 2),
            "p50_ms": round(float(q[0]), 1), "p95_ms": round(float(q[1]), 1), "p99_ms": round(float(q[2]), 1),
            "mean_batch": round(bs / bc, 2) if bc else None}


def run_matrix(url: str, data: bytes, audio_s: float, levels: list[int], seconds: float, max_requests: int,
               route: str, api_key: str | None, label: str = "") -> list[dict]:
    out = []
    for n in levels:
        r = asyncio.run(run_level(url, data, audio_s, n, seconds, max_requests, route, api_key))
        r["batching"] = label
        print(json.dumps(r), flush=True)
        out.append(r)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server (loopback only)")
    p.add_argument("--model", help="start servers for this model instead (with --compare-batching: on and off)")
    p.add_argument("--compare-batching", action="store_true")
    p.add_argument("--clip", help="audio file to send (default: 5 s of data/corpus speech)")
    p.add_argument("--clip-seconds", type=float, default=5.0)
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--seconds", type=float, default=15.0, help="per level (bounded)")
    p.add_argument("--max-requests", type=int, default=2000, help="per level (bounded)")
    p.add_argument("--route", choices=("rest", "openai"), default="rest")
    p.add_argument("--api-key")
    p.add_argument("--json", help="write the results here")
    p.add_argument("overrides", nargs="*", help="serve config overrides for --model servers")
    a = p.parse_args(argv)
    levels = [int(x) for x in a.concurrency.split(",") if x]
    a.seconds = min(a.seconds, 300.0)
    data, audio_s = clip_bytes(a.clip, a.clip_seconds)
    results = []
    if a.url:
        host = urlparse(a.url).hostname
        if host not in LOOPBACK and not (host or "").startswith("127."):
            print(f"serve_load: {a.url}: only loopback targets are allowed", file=sys.stderr)
            return 2
        results = run_matrix(a.url, data, audio_s, levels, a.seconds, a.max_requests, a.route, a.api_key)
    elif a.model:
        from harken.serve.testing import ServerProcess

        modes = [("on", ["batching.enabled=true"]), ("off", ["batching.enabled=false"])] if a.compare_batching \
            else [("", [])]
        for label, ov in modes:
            over = ["store.url=null", "limits.rate_limit_per_minute=0", *ov, *a.overrides]
            with ServerProcess(a.model, over) as srv:
                results += run_matrix(srv.url, data, audio_s, levels, a.seconds, a.max_requests, a.route, None,
                                      label)
    else:
        p.error("give --url or --model")
    if a.json:
        from bench.common import machine

        with open(a.json, "w") as f:
            json.dump({"clip_seconds": audio_s, "route": a.route, "machine": machine(), "results": results}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
