"""Deployment artefacts against a live server: a real `harken serve` process (started through the image's
entrypoint with the image's serve.yaml, a tiny model made here, on a free loopback port), its /metrics
scrape checked against every metric the dashboard, the alert rules, the adapter rules and the HPAs use,
the image's HEALTHCHECK script, the JSON logs, and a real Prometheus (the shipped prometheus.yml and
alert rules, pointed at the live server) that scrapes it while we send speech."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
import yaml
from test_deploy import (
    DOCKER,
    EXTERNAL_METRICS,
    PROM,
    alert_rules,
    allowed_sample_names,
    dashboard_queries,
    free_port,
    harken_metric_names_used,
    metric_names,
    module,
    run,
    substitute_grafana,
    tool,
)

TINY = ["model.encoder.d_model=48", "model.encoder.num_layers=2", "model.encoder.num_heads=2",
        "model.encoder.ff_dim=96", "model.encoder.conv_kernel=7", "model.encoder.subsampling_channels=16"]


@pytest.fixture(scope="module")
def tiny_model(tiny_corpus, tmp_path_factory):
    """An untrained tiny Conformer-CTC checkpoint with the corpus's character vocabulary."""

    from conftest import write_tiny_checkpoint

    from harken.data.manifest import read_manifest

    corpus, _ = tiny_corpus
    path = write_tiny_checkpoint(corpus, tmp_path_factory.mktemp("deploy-model") / "tiny.pt", TINY)
    audio = [r.audio for r in read_manifest(corpus / "test_seen.jsonl")]
    return path, audio


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def live_server(tiny_model, tmp_path_factory):
    """`harken serve` as the container runs it: entrypoint.sh + the image's serve.yaml (loopback here)."""
    ckpt, audio = tiny_model
    tmp = tmp_path_factory.mktemp("deploy-serve")
    port = free_port()
    log = open(tmp / "serve.log", "w+")
    cmd = ["sh", str(DOCKER / "entrypoint.sh"), sys.executable, "-m", "harken.serve.cli",
           "--model", str(ckpt), "--config", str(DOCKER / "serve.yaml"),
           "host=127.0.0.1", f"port={port}", "grpc_port=0", f"store.url={tmp / 'requests.sqlite'}"]
    env = {k: v for k, v in os.environ.items() if "THREADS" not in k}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"harken serve exited with {proc.returncode}:\n{log.read()[-3000:]}")
        try:
            if _get(url + "/readyz", 2)[0] == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            log.seek(0)
            pytest.fail(f"harken serve was not ready in 120 s:\n{log.read()[-3000:]}")
        time.sleep(0.3)
    yield {"url": url, "port": port, "audio": audio, "log": tmp / "serve.log", "proc": proc}
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    log.close()


def transcribe(url: str, path: str | bytes, filename: str = "a.wav") -> int:
    httpx = module("httpx", "httpx")
    data = path if isinstance(path, bytes) else open(path, "rb").read()
    r = httpx.post(url + "/v1/transcribe", files={"file": (filename, data, "audio/wav")}, timeout=60)
    return r.status_code


def test_every_metric_used_is_in_a_live_scrape(live_server):
    status, body = _get(live_server["url"] + "/metrics")
    assert status == 200
    allowed = allowed_sample_names(body.decode())
    assert len([n for n in allowed if n.startswith("harken_")]) >= 40
    used = harken_metric_names_used()
    assert len(used) >= 25
    missing = {n: where for n, where in used.items() if n not in EXTERNAL_METRICS and n not in allowed}
    assert not missing, "used but not exported by harken serve: " + "; ".join(
        f"{n} ({', '.join(sorted(set(w)))})" for n, w in sorted(missing.items()))
    # and every harken metric family the server exports is on the dashboard
    families = {n.removesuffix(s) for n in allowed for s in ("_bucket", "_sum", "_count") if n.endswith(s)} | {
        n for n, k in allowed.items() if k != "histogram"}
    on_board = {n.removesuffix(s) for _, e in dashboard_queries() for n in
                metric_names(substitute_grafana(e))
                for s in ("_bucket", "_sum", "_count", "") if n.endswith(s)}
    assert {f for f in families if f.startswith("harken_")} - on_board == set()


def test_image_healthcheck_passes_against_the_live_server(live_server):
    env = dict(os.environ, HARKEN_PORT=str(live_server["port"]))
    r = run([sys.executable, str(DOCKER / "healthcheck.py")], env=env)
    assert r.returncode == 0, r.stderr


def test_the_image_config_logs_json(live_server):
    lines = [ln for ln in live_server["log"].read_text().splitlines() if ln.strip()]
    assert lines
    recs = [json.loads(ln) for ln in lines[:5]]
    assert all({"time", "level", "logger", "message"} <= set(r) for r in recs)
    assert any("serve config" in r["message"] for r in recs)


def _prom_query(base: str, q: str) -> dict:
    status, body = _get(f"{base}/api/v1/query?{urllib.parse.urlencode({'query': q})}")
    out = json.loads(body)
    assert status == 200 and out["status"] == "success", (q, out)
    return out["data"]


def _scalar(base: str, q: str) -> float | None:
    res = _prom_query(base, q)["result"]
    return float(res[0]["value"][1]) if res else None


def wait_for(base: str, q: str, at_least: float, timeout: float = 30.0) -> float:
    """Poll a Prometheus instant query until its (single) value reaches at_least."""
    deadline = time.monotonic() + timeout
    while True:
        v = _scalar(base, q)
        if v is not None and v >= at_least:
            return v
        if time.monotonic() > deadline:
            pytest.fail(f"Prometheus: {q} = {v} after {timeout:.0f} s (want >= {at_least})")
        time.sleep(0.3)


def test_real_prometheus_scrapes_the_live_server(live_server, tmp_path):
    promtool = tool("promtool", apt_pkg="prometheus")
    prometheus = tool("prometheus", apt_pkg="prometheus")
    pport = free_port()
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(PROM / r) for r in cfg["rule_files"]]
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    jobs["harken"]["static_configs"] = [{"targets": [f"127.0.0.1:{live_server['port']}"]}]
    jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{pport}"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    r = run([promtool, "check", "config", str(tmp_path / "prometheus.yml")])
    assert r.returncode == 0, r.stdout + r.stderr
    log = open(tmp_path / "prometheus.log", "w+")
    proc = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{pport}"],
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{pport}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if _get(base + "/-/ready", 2)[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"prometheus did not start:\n{log.read()[-3000:]}")
            time.sleep(0.2)
        # traffic in two waves (so rate() sees an increase between scrapes): speech from the corpus, then
        # more speech and one corrupt upload
        url = live_server["url"]
        before = _scalar(base, 'sum(harken_requests_total{job="harken"})') or 0.0
        assert transcribe(url, str(live_server["audio"][0])) == 200
        wait_for(base, 'sum(harken_request_duration_seconds_count{job="harken", endpoint="rest"})', 1)
        codes = [transcribe(url, str(a)) for a in live_server["audio"][1:4]]
        assert codes == [200] * 3, codes
        assert transcribe(url, b"RIFF\x00\x00garbage" * 10) in (400, 415, 422)
        wait_for(base, 'sum(harken_request_duration_seconds_count{job="harken", endpoint="rest"})', 4)
        total = wait_for(base, 'sum(harken_requests_total{job="harken"})', before + 5)
        assert total >= before + 5
        ok = _scalar(base, 'sum(harken_requests_total{job="harken", endpoint="rest", status_class="2xx"})')
        assert ok is not None and ok >= 4
        assert (_scalar(base, 'sum(harken_requests_total{job="harken", status_class="4xx"})') or 0) >= 1
        p50 = _scalar(base, 'histogram_quantile(0.5, sum by (le) '
                            '(rate(harken_request_duration_seconds_bucket{job="harken", endpoint="rest"}[1m])))')
        assert p50 is not None and math.isfinite(p50) and 0 < p50 < 60, p50
        assert _scalar(base, 'up{job="harken"}') == 1.0
        assert (_scalar(base, 'sum(harken_audio_seconds_total{job="harken"})') or 0) > 1.0
        # the alert rules are loaded, evaluate without errors, and none fires on a healthy server
        time.sleep(1.5)
        status, body = _get(base + "/api/v1/rules")
        rules = [r for g in json.loads(body)["data"]["groups"] for r in g["rules"]]
        assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
        assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
        assert not [r["name"] for r in rules if r["state"] != "inactive"]
        # every dashboard query is accepted by Prometheus itself, and the core panels have data
        empty = []
        for title, e in dashboard_queries():
            data = _prom_query(base, substitute_grafana(e).replace("[1m]", "[30s]"))
            if not data["result"] and "DCGM" not in e and title.startswith(("Requests", "Latency", "Audio", "RTF")):
                empty.append(title)
        assert not empty, f"dashboard panels without data after traffic: {empty}"
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
