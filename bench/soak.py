"""Soak test of ``harken serve`` on loopback: minutes of mixed traffic (REST, OpenAI route, WebSocket
streams, 5% bad inputs) from a few concurrent workers, the server's RSS over time, and a zero-5xx check.

    python bench/soak.py --model exp/demo/best.pt --minutes 10
    python bench/soak.py --model exp/demo/best.pt --minutes 30 --workers 6 --bad-fraction 0.05 --json soak.json

One server is started for ``--model`` (``harken serve``, a free loopback port, the recognition log
in a temporary SQLite file). Each worker loops until the time is up, choosing a route per request by
``--mix`` (default rest 0.4, openai 0.3, ws 0.3):

* ``rest``: multipart POST /v1/transcribe of the clip (``--clip``, default ``--clip-seconds`` of
  ``--manifest`` utterances);
* ``openai``: POST /v1/audio/transcriptions (``response_format`` json or verbose_json);
* ``ws``: one /v1/stream session sending the clip as 100 ms pcm_s16le frames at ``--ws-speed`` x
  real time, then stop; its status class is 2xx for an ``end``, else the HTTP-like status of the
  ``error`` code (harken.serve.stream.ERROR_CODES) or of the refused handshake.

A fraction ``--bad-fraction`` of requests carry a bad input instead: random bytes, a truncated WAV
(header promising more data than present, cut mid-sample), an empty body; for ws, a start message
that is not JSON. Bad inputs should get 4xx; a 2xx for one is counted as ``bad_accepted``.
When the model cannot stream, ws is dropped from the mix (reported).

The server's RSS (``VmRSS`` of /proc/<pid>/status) is sampled at the start and every
``--sample-s`` (30 s). The report: requests by route and status class, transport errors, the
zero-5xx check (and that the server is still alive), RSS start/end/max/growth, and the server's
own ``harken_requests_total`` 5xx count. Exit 1 when the check fails. Bounded: at most 120 minutes
and ``--max-requests``; loopback only. Prints a markdown table and ``RESULT {json}`` lines.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.stream_load import RATE, load_clip, metric_sum, ws_url  # noqa: E402

ROUTES = ("rest", "openai", "ws")


def wav_bytes(wave: np.ndarray) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wave, RATE, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def bad_input(rng: random.Random, good_wav: bytes) -> tuple[str, bytes]:
    kind = rng.choice(("random_bytes", "truncated_wav", "empty"))
    if kind == "random_bytes":
        return kind, rng.randbytes(rng.randint(16, 65536))
    if kind == "truncated_wav":
        return kind, good_wav[: rng.randint(44, max(45, len(good_wav) // 3)) | 1]  # odd: mid-sample
    return kind, b""


def rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Tally:
    def __init__(self):
        self.counts: dict[str, dict[str, int]] = {r: {} for r in ROUTES}
        self.bad_sent = 0
        self.bad_accepted = 0
        self.transport: dict[str, int] = {}
        self.latency: dict[str, list[float]] = {r: [] for r in ROUTES}
        self.codes: dict[str, dict[str, int]] = {r: {} for r in ROUTES}
        self.bad_kinds: dict[str, dict[str, int]] = {}  # kind -> status -> count
        self.total = 0

    def add(self, route: str, status: int | None, bad: str | None, dt: float, transport: str | None = None):
        self.total += 1
        cls = f"{status // 100}xx" if status else "transport_error"
        self.counts[route][cls] = self.counts[route].get(cls, 0) + 1
        code = str(status) if status else (transport or "?")
        self.codes[route][code] = self.codes[route].get(code, 0) + 1
        if transport:
            self.transport[transport] = self.transport.get(transport, 0) + 1
        if bad:
            self.bad_sent += 1
            k = self.bad_kinds.setdefault(f"{route}:{bad}", {})
            k[code] = k.get(code, 0) + 1
            if status and 200 <= status < 300:
                self.bad_accepted += 1
        elif status == 200:
            self.latency[route].append(dt)


async def do_http(c, route: str, data: bytes, rng: random.Random) -> int:
    if route == "rest":
        r = await c.post("/v1/transcribe", files={"file": ("clip.wav", data, "audio/wav")})
    else:
        fields = {"model": "harken", "response_format": rng.choice(("json", "verbose_json"))}
        r = await c.post("/v1/audio/transcriptions", files={"file": ("clip.wav", data, "audio/wav")}, data=fields)
    await r.aread()
    return r.status_code


async def do_ws(url: str, pcm: bytes, speed: float, bad: bool) -> int:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    from harken.serve.stream import ERROR_CODES

    frame_s = 0.1
    frame_bytes = int(RATE * frame_s) * 2
    try:
        async with connect(ws_url(url), max_size=None, open_timeout=10) as ws:
            if bad:
                await ws.send("{not json")
            else:
                await ws.send(json.dumps({"type": "start", "version": 1, "sample_rate": RATE,
                                          "encoding": "pcm_s16le", "interim_results": True}))
                t0 = time.monotonic()
                for i, off in enumerate(range(0, len(pcm), frame_bytes)):
                    await asyncio.sleep(max(0.0, t0 + i * frame_s / speed - time.monotonic()))
                    await ws.send(pcm[off: off + frame_bytes])
                await ws.send(json.dumps({"type": "stop"}))
            status = None
            async for raw in ws:
                m = json.loads(raw)
                if m.get("type") == "end":
                    status = 200
                elif m.get("type") == "error":
                    status = ERROR_CODES.get(m.get("code"), (0, "", 500, None))[2]
            if status is None:
                code = ws.close_code
                status = 200 if code == 1000 else 500 if code in (1011, None) else 400
            return status
    except InvalidStatus as e:
        return e.response.status_code
    except ConnectionClosed as e:
        code = e.rcvd.code if e.rcvd is not None else None
        return 500 if code in (None, 1006, 1011) else 400


async def soak(url: str, pid: int, wave: np.ndarray, a, mix: dict[str, float]) -> dict:
    import httpx

    good_wav = wav_bytes(wave)
    pcm = np.clip(np.round(wave * 32768.0), -32768, 32767).astype("<i2").tobytes()
    tally = Tally()
    rss: list[tuple[float, int]] = []
    t_start = time.monotonic()
    end = t_start + a.minutes * 60.0
    stop = asyncio.Event()
    routes, weights = list(mix), list(mix.values())

    async def sampler():
        while True:
            v = rss_kb(pid)
            if v is not None:
                rss.append((round(time.monotonic() - t_start, 1), v))
            try:
                await asyncio.wait_for(stop.wait(), a.sample_s)
                return
            except asyncio.TimeoutError:
                pass

    async def worker(k: int, c):
        rng = random.Random(a.seed * 1000 + k)
        while time.monotonic() < end and tally.total < a.max_requests:
            route = rng.choices(routes, weights)[0]
            bad = "bad_json" if rng.random() < a.bad_fraction else None
            data = good_wav
            if bad and route != "ws":
                bad, data = bad_input(rng, good_wav)
            t0 = time.perf_counter()
            status, transport = None, None
            try:
                if route == "ws":
                    status = await asyncio.wait_for(do_ws(url, pcm, a.ws_speed, bad), a.timeout)
                else:
                    status = await do_http(c, route, data, rng)
            except asyncio.TimeoutError:
                transport = "timeout"
            except (httpx.HTTPError, OSError) as e:
                transport = type(e).__name__
            tally.add(route, status, bad, time.perf_counter() - t0, transport)
            if a.think_ms > 0:
                await asyncio.sleep(rng.uniform(0, 2 * a.think_ms) / 1000.0)

    limits = httpx.Limits(max_connections=a.workers + 4, max_keepalive_connections=a.workers + 4)
    async with httpx.AsyncClient(base_url=url, timeout=a.timeout, limits=limits) as c:
        samp = asyncio.ensure_future(sampler())
        await asyncio.gather(*[worker(k, c) for k in range(a.workers)])
        wall = time.monotonic() - t_start
        await asyncio.sleep(0.5)  # let the server account the last streams
        try:
            mtext = (await c.get("/metrics")).text
            alive = (await c.get("/healthz")).status_code == 200
        except httpx.HTTPError:
            mtext, alive = "", False
        v = rss_kb(pid)
        if v is not None:
            rss.append((round(time.monotonic() - t_start, 1), v))
        stop.set()
        await samp
    server_5xx = metric_sum(mtext, "harken_requests_total", 'status_class="5xx"')
    n5 = sum(d.get("5xx", 0) for d in tally.counts.values())
    vals = [x for _, x in rss]
    lat = {r: {"p50_ms": round(float(np.percentile(v, 50)) * 1000, 1),
               "p95_ms": round(float(np.percentile(v, 95)) * 1000, 1)} for r, v in tally.latency.items() if v}
    return {"minutes": a.minutes, "wall_s": round(wall, 1), "workers": a.workers, "requests": tally.total,
            "by_route": tally.counts, "status_codes": tally.codes, "bad_by_kind": tally.bad_kinds,
            "latency_ok": lat, "bad_sent": tally.bad_sent,
            "bad_accepted": tally.bad_accepted, "transport_errors": tally.transport,
            "client_5xx": n5, "server_5xx": int(server_5xx), "server_alive": alive,
            "zero_5xx": n5 == 0 and server_5xx == 0 and not tally.transport and alive,
            "rss_mb_start": round(vals[0] / 1024, 1) if vals else None,
            "rss_mb_end": round(vals[-1] / 1024, 1) if vals else None,
            "rss_mb_max": round(max(vals) / 1024, 1) if vals else None,
            "rss_samples": [[t, round(x / 1024, 1)] for t, x in rss]}


def parse_mix(s: str) -> dict[str, float]:
    mix = {}
    for part in s.split(","):
        name, _, w = part.partition("=")
        name = name.strip()
        if name not in ROUTES:
            raise ValueError(f"--mix: unknown route {name!r} (use {', '.join(ROUTES)})")
        try:
            mix[name] = float(w)
        except ValueError:
            raise ValueError(f"--mix: {part!r} is not route=weight") from None
    if not any(v > 0 for v in mix.values()):
        raise ValueError("--mix: at least one route needs a positive weight")
    return mix


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the model `harken serve` loads")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--workers", type=int, default=4, help="concurrent clients")
    p.add_argument("--mix", default="rest=0.4,openai=0.3,ws=0.3")
    p.add_argument("--bad-fraction", type=float, default=0.05)
    p.add_argument("--clip")
    p.add_argument("--manifest", default="data/demo/test_unseen.jsonl")
    p.add_argument("--clip-seconds", type=float, default=4.0)
    p.add_argument("--ws-speed", type=float, default=1.0, help="stream frames at this multiple of real time")
    p.add_argument("--sample-s", type=float, default=30.0, help="RSS sampling period")
    p.add_argument("--timeout", type=float, default=60.0, help="per request")
    p.add_argument("--max-requests", type=int, default=100000)
    p.add_argument("--think-ms", type=float, default=0.0, help="mean pause between a worker's requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    p.add_argument("overrides", nargs="*", help="serve config overrides")
    a = p.parse_args(argv)
    a.minutes = min(max(a.minutes, 0.05), 120.0)
    a.workers = max(1, min(a.workers, 64))
    a.bad_fraction = min(max(a.bad_fraction, 0.0), 1.0)
    a.ws_speed = min(max(a.ws_speed, 0.1), 20.0)
    try:
        mix = parse_mix(a.mix)
    except ValueError as e:
        p.error(str(e))
    wave = load_clip(a.clip, a.manifest, a.clip_seconds)

    from bench.common import emit
    from bench.stream_load import StreamingUnavailable, probe
    from harken.serve.testing import ServerProcess

    tmp = tempfile.mkdtemp(prefix="harken-soak-")
    over = [f"store.url={os.path.join(tmp, 'requests.sqlite')}", "limits.rate_limit_per_minute=0", *a.overrides]
    srv = ServerProcess(a.model, over)
    try:
        srv.start()
    except RuntimeError as e:
        print(f"soak: {a.model}: the server did not start: {str(e)[-800:]}", file=sys.stderr)
        return 2
    note = ""
    try:
        if mix.get("ws", 0) > 0:
            try:
                asyncio.run(probe(srv.url))
            except StreamingUnavailable as e:
                note = f"ws dropped from the mix: the server does not stream this model ({e})"
                print(f"# {note}", flush=True)
                mix.pop("ws")
                if not mix:
                    print("soak: nothing left to send", file=sys.stderr)
                    return 2
        print(f"# soak: {a.minutes:g} min, {a.workers} workers, mix {mix}, bad {a.bad_fraction:.0%}, clip "
              f"{len(wave) / RATE:.1f} s, server pid {srv.proc.pid}", flush=True)
        r = asyncio.run(soak(srv.url, srv.proc.pid, wave, a, mix))
        r["note"] = note
        if srv.proc.poll() is not None:
            r["server_alive"] = r["zero_5xx"] = False
    finally:
        code = srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    r["server_exit"] = code

    cls = ("2xx", "4xx", "5xx", "transport_error")
    print("\n| route | " + " | ".join(cls) + " | ok p50 ms | ok p95 ms |")
    print("|---|" + "---|" * (len(cls) + 2))
    for route, d in r["by_route"].items():
        lat = r["latency_ok"].get(route, {})
        print(f"| {route} | " + " | ".join(str(d.get(k, 0)) for k in cls)
              + f" | {lat.get('p50_ms', '-')} | {lat.get('p95_ms', '-')} |")
    print(f"\nrequests {r['requests']} in {r['wall_s']} s; bad inputs {r['bad_sent']} (accepted: {r['bad_accepted']}); "
          f"transport errors {r['transport_errors'] or 0}; server 5xx {r['server_5xx']}")
    print(f"RSS MB start {r['rss_mb_start']}, end {r['rss_mb_end']}, max {r['rss_mb_max']} "
          f"({len(r['rss_samples'])} samples)")
    print(f"status codes: {r['status_codes']}; bad inputs by kind: {r['bad_by_kind']}")
    print(f"zero-5xx check: {'PASS' if r['zero_5xx'] else 'FAIL'}")
    emit("soak", r)
    if a.json:
        from bench.common import machine

        with open(a.json, "w") as f:
            json.dump({"machine": machine(), "model": a.model, **r}, f, indent=2)
    return 0 if r["zero_5xx"] else 1


if __name__ == "__main__":
    sys.exit(main())
