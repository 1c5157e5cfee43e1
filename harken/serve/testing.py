"""Run a harken server in a background thread on a free loopback port (tests, benchmarks).

    with LiveServer(cfg, engine) as srv:
        httpx.get(srv.url + "/healthz")
        srv.state            # the ServerState (metrics, batcher, store)
"""

from __future__ import annotations

import socket
import threading
import time

__all__ = ["LiveServer", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, cfg, engine, streaming_model=None, startup_timeout: float = 30.0):
        import uvicorn

        from harken.serve.app import create_app
        from harken.serve.middleware import HeaderTimeoutH11Protocol

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        cfg.host, cfg.port = "127.0.0.1", self.port
        self.cfg = cfg
        self.app = create_app(cfg, engine, streaming_model)
        self.state = self.app.state.harken
        proto = type("HarkenH11", (HeaderTimeoutH11Protocol,), {"header_timeout": cfg.limits.header_timeout_s})
        ucfg = uvicorn.Config(self.app, http=proto, lifespan="on", log_config=None, access_log=False,
                              timeout_keep_alive=5, timeout_graceful_shutdown=5, log_level="warning",
                              ws_max_size=cfg.limits.max_stream_frame_bytes + (64 << 10))
        self.server = uvicorn.Server(ucfg)
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                        name="harken-live-server")
        self._startup_timeout = startup_timeout

    def start(self) -> "LiveServer":
        self._thread.start()
        end = time.monotonic() + self._startup_timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > end:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(15)
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> "LiveServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class ServerProcess:
    """``python -m harken.serve.cli --model MODEL [overrides]`` as a child process on a free
    loopback port; waits until /healthz answers."""

    def __init__(self, model, overrides=(), env=None, startup_timeout: float = 90.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [str(model), *overrides]
        self.env = env
        self.startup_timeout = startup_timeout
        self.proc = None

    def start(self) -> "ServerProcess":
        import os
        import subprocess
        import sys
        import tempfile

        import httpx

        self.log = tempfile.NamedTemporaryFile("w+", prefix="harken-serve-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "harken.serve.cli", "--model", self.args[0], "host=127.0.0.1",
               f"port={self.port}", "grpc_port=0", *self.args[1:]]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env or os.environ.copy())
        end = time.monotonic() + self.startup_timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"harken serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"harken serve did not start:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()

    def stop(self, timeout: float = 20.0) -> int | None:
        import signal
        import subprocess

        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
