"""The image install recipe (deploy/docker/install.sh, what both Dockerfiles RUN) exercised without
Docker: a fresh venv, the CPU flavor, torch 2.13.0+cpu from this machine's local wheel (pip find-links),
the pinned requirements, harken from this checkout; then the installed `harken serve` is started the
way the image starts it (entrypoint.sh + the image's serve.yaml) and the image's HEALTHCHECK passes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_deploy import DOCKER, ROOT, free_port, run


@pytest.mark.slow
def test_install_script_builds_a_working_cpu_environment(tmp_path):
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    env["PYTHON"] = sys.executable  # the same interpreter version the images pin (3.11)
    env.pop("HARKEN_TORCH_INDEX", None)  # no PyTorch index here: torch==2.13.0+cpu from the local wheel
    t0 = time.monotonic()
    r = run(["nice", "-n", "10", "sh", str(DOCKER / "install.sh"), str(venv), str(ROOT), "cpu"],
            env=env, timeout=900, cwd=tmp_path)
    took = time.monotonic() - t0
    assert r.returncode == 0, f"install.sh failed after {took:.0f} s:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    assert "install.sh: cpu install in" in r.stdout
    py = venv / "bin" / "python"
    r = run([str(py), "-c", "import harken, torch, onnxruntime, fastapi, uvicorn, prometheus_client; "
             "print(harken.__file__); print(torch.__version__); print(onnxruntime.__version__)"], env=env,
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    where, torch_v, ort_v = r.stdout.split()
    assert Path(where).is_relative_to(venv), "harken must be installed into the venv, not imported from the checkout"
    assert torch_v == "2.13.0+cpu" and ort_v == "1.32.0"
    r = run([str(py), "-m", "pip", "check"], env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr

    # the image's start path with the installed environment: entrypoint + `harken serve` + serve.yaml
    from harken.config import load_config, to_dict
    from harken.text.tokenizer import CharTokenizer
    from harken.train.checkpoint import atomic_save
    from harken.train.trainer import build_model

    cfg = load_config(None, ["model.encoder.d_model=32", "model.encoder.num_layers=1", "model.encoder.num_heads=2",
                             "model.encoder.ff_dim=64", "model.encoder.subsampling_channels=8"])
    tok = CharTokenizer.build(["hello world"])
    model = build_model(cfg, tok.vocab_size)
    atomic_save({"config": to_dict(cfg), "model": model.state_dict(), "tokenizer": tok.to_dict()},
                tmp_path / "model.pt")
    port = free_port()
    senv = dict(env, PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    log = open(tmp_path / "serve.log", "w+")
    cmd = ["sh", str(DOCKER / "entrypoint.sh"), "harken", "serve", "--model", str(tmp_path / "model.pt"),
           "--config", str(DOCKER / "serve.yaml"), "host=127.0.0.1", f"port={port}", "grpc_port=0",
           f"store.url={tmp_path / 'requests.sqlite'}"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=senv, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while True:
            hc = run([str(py), str(DOCKER / "healthcheck.py")], env=dict(senv, HARKEN_PORT=str(port)))
            if hc.returncode == 0:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"the installed harken serve did not become healthy:\n{log.read()[-3000:]}")
            time.sleep(0.5)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
