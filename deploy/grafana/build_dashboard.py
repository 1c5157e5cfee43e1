#!/usr/bin/env python3
"""Build the Grafana dashboard deploy/grafana/dashboards/harken.json (an ASR service: traffic, latency,
batching, speed, streaming, failures, GPU). The JSON is committed; this script is its source.

    python deploy/grafana/build_dashboard.py           # rewrite the JSON
    python deploy/grafana/build_dashboard.py --check   # exit 1 if the JSON is out of date

Every panel names the provisioned datasource by its fixed uid (provisioning/datasources/prometheus.yaml);
tests/test_deploy.py parses every query and checks every metric against a live harken /metrics scrape.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "harken.json"
DS = {"type": "prometheus", "uid": "harken-prometheus"}
SEL = 'job="$job", instance=~"$instance"'
RI = "$__rate_interval"
ERR = 'status_class=~"4xx|5xx"'
S5XX = 'status_class="5xx"'


def rate(metric: str, extra: str = "") -> str:
    sel = SEL + (", " + extra if extra else "")
    return f"rate({metric}{{{sel}}}[{RI}])"


def ratio(num: str, den: str, by: str = "", num_extra: str = "") -> str:
    """sum(rate(num)) / sum(rate(den)), safe against an idle denominator."""
    agg = f"sum by ({by}) " if by else "sum"
    return f"{agg}({rate(num, num_extra)}) / clamp_min({agg}({rate(den)}), 1e-9)"


def quantiles(hist: str, by: str = "", extra: str = "", qs=(0.5, 0.95, 0.99)) -> list[tuple[str, str]]:
    group = "le" + (", " + by if by else "")
    legend = ("{{" + by + "}} " if by else "")
    return [(f"histogram_quantile({q}, sum by ({group}) ({rate(hist + '_bucket', extra)}))",
             f"{legend}p{int(q * 100)}") for q in qs]


class Board:
    def __init__(self):
        self.panels: list[dict] = []
        self.y = 0
        self.x = 0
        self.row_h = 0
        self.next_id = 1

    def row(self, title: str, collapsed: bool = False):
        self._newline()
        self.panels.append({"type": "row", "title": title, "id": self._id(), "collapsed": collapsed,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def panel(self, title: str, targets: list[tuple[str, str]], unit: str = "short", kind: str = "timeseries",
              w: int = 8, h: int = 8, description: str = "", stack: bool = False):
        if self.x + w > 24:
            self._newline()
        refs = "ABCDEFGHIJ"
        p = {
            "type": kind, "title": title, "id": self._id(), "datasource": DS, "description": description,
            "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}} if kind == "timeseries" else {},
            "targets": [{"refId": refs[i], "datasource": DS, "expr": e, "legendFormat": lg, "range": True}
                        for i, (e, lg) in enumerate(targets)],
        }
        if kind == "timeseries":
            p["fieldConfig"]["defaults"]["custom"] = {"stacking": {"mode": "normal" if stack else "none"},
                                                      "fillOpacity": 10 if stack else 0}
        self.panels.append(p)
        self.x += w
        self.row_h = max(self.row_h, h)

    def _newline(self):
        self.y += self.row_h
        self.x = 0
        self.row_h = 0

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


def build() -> dict:
    b = Board()
    b.row("Traffic")
    b.panel("Requests/s by endpoint", [(f"sum by (endpoint) ({rate('harken_requests_total')})", "{{endpoint}}")],
            unit="reqps", stack=True)
    b.panel("Errors/s by endpoint", [(f"sum by (endpoint, status_class) ({rate('harken_requests_total', ERR)})",
                                     "{{endpoint}} {{status_class}}")], unit="reqps", stack=True)
    b.panel("5xx ratio", [(ratio("harken_requests_total", "harken_requests_total", num_extra=S5XX),
                           "5xx / all")], unit="percentunit", kind="stat", w=4)
    b.panel("In-flight requests", [(f"sum by (endpoint) (harken_inflight_requests{{{SEL}}})", "{{endpoint}}")], w=4)
    b.panel("Latency by endpoint (p50 / p95 / p99)", quantiles("harken_request_duration_seconds", "endpoint"),
            unit="s", w=12, description="End-to-end request latency; ws and grpc_stream last as long as the stream.")
    b.panel("Audio duration per request (p50 / p95)",
            quantiles("harken_audio_duration_seconds", "endpoint", qs=(0.5, 0.95)), unit="s", w=12)

    b.row("Batching")
    b.panel("Queue depth", [(f"sum by (instance) (harken_queue_depth{{{SEL}}})", "{{instance}}")],
            description="Items waiting in the batch queue: the HPA signal (deploy/k8s/base/hpa.yaml).")
    b.panel("Queue wait (p50 / p95 / p99)", quantiles("harken_queue_wait_seconds"), unit="s")
    b.panel("Batch compute (p50 / p95) by kind", quantiles("harken_batch_compute_seconds", "kind", qs=(0.5, 0.95)),
            unit="s")
    b.panel("Batch size (mean, p95)", [
        (ratio("harken_batch_size_sum", "harken_batch_size_count", by="kind"),
         "{{kind}} mean"),
        *quantiles("harken_batch_size", "kind", qs=(0.95,))], w=12)
    b.panel("Padding ratio (mean, p95)", [
        (ratio("harken_batch_padding_ratio_sum", "harken_batch_padding_ratio_count"),
         "mean"),
        *quantiles("harken_batch_padding_ratio", qs=(0.95,))], unit="percentunit", w=12,
        description="Padded samples wasted / total per batch.")

    b.row("Speed")
    b.panel("Real-time factor (p50 / p90 / p99)", quantiles("harken_rtf", qs=(0.5, 0.9, 0.99)),
            description="Compute seconds per audio second per request; a stream cannot keep up at 1.")
    b.panel("Audio seconds transcribed per second", [
        (f"sum by (endpoint) ({rate('harken_audio_seconds_total')})", "{{endpoint}}")], stack=True,
        description="Audio hours per hour = this value.")
    b.panel("RTFx (audio seconds / compute second)", [
        (ratio("harken_audio_seconds_total", "harken_batch_compute_seconds_sum"),
         "RTFx")], description="rate(audio seconds) / rate(batch compute seconds).")

    b.row("Streaming")
    b.panel("Active streams by protocol", [(f"sum by (protocol) (harken_streams_active{{{SEL}}})", "{{protocol}}")],
            stack=True)
    b.panel("Partial latency (p50 / p95 / p99)", quantiles("harken_stream_partial_latency_seconds"), unit="s",
            description="Audio chunk received -> its partial result sent.")
    b.panel("Final latency (p50 / p95 / p99)", quantiles("harken_stream_final_latency_seconds"), unit="s",
            description="End of speech (or stop) -> final result sent.")

    b.row("Failures")
    b.panel("Rejections/s by reason", [(f"sum by (reason) ({rate('harken_rejected_total')})", "{{reason}}")],
            unit="reqps", stack=True)
    b.panel("Decode failures/s by format", [(f"sum by (format) ({rate('harken_decode_failures_total')})",
                                             "{{format}}")], unit="reqps", stack=True)
    b.panel("Store write failures/s and write p95", [
        (f"sum by (backend) ({rate('harken_db_write_failures_total')})", "{{backend}} failures/s"),
        *quantiles("harken_db_write_seconds", "backend", qs=(0.95,))])
    b.panel("Model loaded", [(f"min by (instance, model) (harken_model_loaded{{{SEL}}})", "{{instance}} {{model}}")],
            kind="stat", w=12)
    b.panel("Build and model", [(f"max by (instance, model, version, backend, provider) (harken_build_info{{{SEL}}})",
                                 "{{instance}} {{model}} {{version}} {{backend}} {{provider}}")], kind="table", w=12)

    b.row("GPU (dcgm-exporter, GPU hosts)")
    b.panel("GPU utilization", [("avg by (Hostname, gpu) (DCGM_FI_DEV_GPU_UTIL)", "{{Hostname}} GPU {{gpu}}")],
            unit="percent", w=6)
    b.panel("GPU memory used", [("sum by (Hostname, gpu) (DCGM_FI_DEV_FB_USED) * 1024 * 1024",
                                 "{{Hostname}} GPU {{gpu}}")], unit="bytes", w=6)
    b.panel("GPU power", [("sum by (Hostname, gpu) (DCGM_FI_DEV_POWER_USAGE)", "{{Hostname}} GPU {{gpu}}")],
            unit="watt", w=6)
    b.panel("GPU temperature", [("max by (Hostname, gpu) (DCGM_FI_DEV_GPU_TEMP)", "{{Hostname}} GPU {{gpu}}")],
            unit="celsius", w=6)

    def var(name, query, multi):
        return {"name": name, "label": name, "type": "query", "datasource": DS,
                "query": {"query": query, "refId": f"{name}-var"}, "definition": query, "refresh": 2,
                "includeAll": multi, "multi": multi, "allValue": ".*" if multi else None, "sort": 1,
                "current": {}, "options": [], "hide": 0}

    return {
        "uid": "harken-asr",
        "title": "harken ASR service",
        "description": "harken serve: traffic, latency, batching, real-time factor, streams, failures, GPUs.",
        "tags": ["harken", "asr"],
        "editable": False,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "browser",
        "templating": {"list": [
            var("job", "label_values(harken_build_info, job)", False),
            var("instance", 'label_values(harken_build_info{job="$job"}, instance)', True),
        ]},
        "annotations": {"list": []},
        "links": [],
        "panels": b.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="do not write; fail if the JSON is out of date")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python deploy/grafana/build_dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
