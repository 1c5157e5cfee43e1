"""``harken serve --model PATH [--config serve.yaml] [key=value ...] [--debug]``.

Loads the serve config (YAML + dotted overrides), logs it (keys redacted), loads and warms the
engine, and runs uvicorn with the header-timeout protocol and a graceful drain on SIGTERM:
``/readyz`` turns 503 at once, the listener stays open ``limits.drain_grace_s`` seconds (so a load
balancer stops sending), then closes; in-flight requests and streams get ``limits.drain_timeout_s``
to finish before the process exits. A second SIGTERM/SIGINT exits at once.

``harken serve --hash-key -`` reads an API key from stdin and prints its ``auth.api_keys`` entry.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time

__all__ = ["main", "build_parser", "cpu_quota", "serve"]

log = logging.getLogger("harken.serve")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harken serve", description="Serve a harken model over HTTP "
                                "(REST, OpenAI-compatible, streaming) with batching, metrics and a recognition log.")
    p.add_argument("--model", help="a harken checkpoint (.pt) or exported ONNX (.onnx)")
    p.add_argument("--config", help="serve config YAML (see configs/serve.yaml)")
    p.add_argument("--debug", action="store_true", help="debug logging and tracebacks")
    p.add_argument("--hash-key", metavar="-", help="read an API key from stdin ('-') and print its config entry")
    p.add_argument("--key-id", default="default", help="with --hash-key: the id to print")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. port=9000 batching.max_batch_size=8")
    return p


def cpu_quota() -> int:
    """CPUs this process may use: the affinity mask, capped by a cgroup v2/v1 CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            q, per = f.read().split()[:2]
            if q != "max":
                n = min(n, max(1, int(int(q) / int(per))))
    except (OSError, ValueError):
        try:
            with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
                q = int(f.read())
            with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
                per = int(f.read())
            if q > 0:
                n = min(n, max(1, q // per))
        except (OSError, ValueError):
            pass
    return max(1, n)


class _JsonFormatter(logging.Formatter):
    def format(self, record):
        d = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)), "level": record.levelname,
             "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        return json.dumps(d, ensure_ascii=False)


def _setup_logging(cfg, debug: bool) -> None:
    h = logging.StreamHandler(sys.stderr)
    plain = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    h.setFormatter(_JsonFormatter() if cfg.log_json else plain)
    root = logging.getLogger()
    root.handlers[:] = [h]
    root.setLevel(logging.DEBUG if debug else getattr(logging, cfg.log_level.upper()))
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True


def _streaming_model(engine):
    """The shared StreamingModel for the WebSocket/gRPC routes, when the model streams."""
    try:
        from harken.runtime import streaming
    except ImportError:
        return None
    sm = getattr(streaming, "StreamingModel", None)
    if sm is None:
        return None
    for ctor in ("from_engine", "load"):
        fn = getattr(sm, ctor, None)
        if fn is None:
            continue
        try:
            return fn(engine) if ctor == "from_engine" else fn(engine.path)
        except Exception as e:  # noqa: BLE001 - not every model streams
            log.info("streaming is off for this model (%s)", e)
            return None
    return None


def load_engine(model: str, cfg):
    """(engine, streaming model or None). A streaming ONNX export serves the offline routes through
    :class:`harken.serve.streaming_engine.StreamingOfflineEngine` over the same streaming model."""
    from harken.runtime import Engine
    from harken.serve.streaming_engine import StreamingOfflineEngine, is_streaming_onnx

    threads = cfg.num_threads or max(1, cpu_quota() // max(1, cfg.batching.workers))
    if is_streaming_onnx(model):
        from harken.runtime.streaming import StreamingModel

        sm = StreamingModel.from_onnx(model, num_threads=threads)
        return StreamingOfflineEngine(sm, path=model), sm
    engine = Engine.load(model, backend=cfg.backend, num_threads=threads, warmup=True)
    if cfg.rescore:  # load the rescorer now: a bad reference fails the start, not a request
        from harken.runtime.options import DecodeOptions

        engine.rescorer(DecodeOptions(method="beam", rescore=cfg.rescore))
    return engine, _streaming_model(engine)


def serve(cfg, engine, streaming_model=None, sockets=None) -> int:
    """Run the server until SIGTERM/SIGINT (blocking)."""
    import uvicorn

    from harken.serve.app import create_app
    from harken.serve.middleware import HeaderTimeoutH11Protocol

    app = create_app(cfg, engine, streaming_model)
    st = app.state.harken
    proto = type("HarkenH11", (HeaderTimeoutH11Protocol,), {"header_timeout": cfg.limits.header_timeout_s})
    ucfg = uvicorn.Config(app, host=cfg.host, port=cfg.port, http=proto, ws="auto", lifespan="on",
                          log_config=None, access_log=cfg.log_level == "debug", timeout_keep_alive=5,
                          timeout_graceful_shutdown=int(cfg.limits.drain_timeout_s) or None,
                          limit_max_requests=None, server_header=False,
                          ws_max_size=cfg.limits.max_stream_frame_bytes + (64 << 10))

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            first = not st.draining
            st.draining = True
            if not first:
                self._exit(sig, drain_streams=False)
                self.force_exit = True  # a second signal: stop waiting for in-flight work
                return
            log.info("draining: /readyz is 503; closing the listener in %.1f s", cfg.limits.drain_grace_s)
            # off the event loop's thread: _exit waits for the streams' drain, which runs on the loop
            t = threading.Timer(max(0.0, cfg.limits.drain_grace_s), self._exit, args=(sig,))
            t.daemon = True
            t.start()

        def _exit(self, sig, drain_streams: bool = True):
            # uvicorn closes open WebSockets (1012) as soon as shutdown starts: let live streams
            # send their last finals and a clean `draining` close first (bounded by the drain timeout)
            loop = getattr(st, "loop", None)
            if drain_streams and loop is not None and loop.is_running():
                try:
                    import asyncio

                    from harken.serve.stream import drain

                    fut = asyncio.run_coroutine_threadsafe(drain(st, cfg.limits.drain_timeout_s), loop)
                    fut.result(timeout=cfg.limits.drain_timeout_s + 5.0)
                except Exception as e:  # noqa: BLE001 - shutting down regardless
                    log.warning("stream drain did not finish cleanly: %s", e)
            uvicorn.Server.handle_exit(self, sig, None)
            # a drained shutdown is a clean exit (status 0), not a death by the signal
            self._captured_signals.clear()

    server = _Server(ucfg)
    log.info("harken serve on http://%s:%d (model %s, backend %s)", cfg.host, cfg.port, st.model_name,
             getattr(engine, "backend_name", "?"))
    server.run(sockets=sockets)
    return 0


def main(argv: list[str] | None = None) -> int:
    from harken.config import ConfigError

    args = build_parser().parse_args(argv)
    if args.hash_key is not None:
        from harken.serve.config import hash_key

        secret = sys.stdin.readline() if args.hash_key == "-" else args.hash_key
        if not secret.strip():
            print("harken serve: --hash-key: no key on stdin", file=sys.stderr)
            return 2
        print(json.dumps({"auth": {"api_keys": [{"id": args.key_id, "sha256": hash_key(secret)}]}}))
        return 0
    from harken.serve.config import load_serve_config

    try:
        cfg = load_serve_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"harken serve: {e}", file=sys.stderr)
        return 2
    if not args.model:
        print("harken serve: --model PATH is required (a .pt checkpoint or an .onnx export)", file=sys.stderr)
        return 2
    if not os.path.isfile(args.model):
        print(f"harken serve: {args.model}: no such model file", file=sys.stderr)
        return 2
    _setup_logging(cfg, args.debug)
    log.info("serve config: %s", json.dumps(cfg.to_dict(redact=True), sort_keys=True))
    try:
        engine, streaming_model = load_engine(args.model, cfg)
    except (FileNotFoundError, ValueError) as e:
        if args.debug:
            raise
        print(f"harken serve: {e}", file=sys.stderr)
        return 2
    try:
        from harken.serve.store import StoreError

        return serve(cfg, engine, streaming_model)
    except StoreError as e:
        print(f"harken serve: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # address in use, permission denied
        if args.debug:
            raise
        print(f"harken serve: cannot listen on {cfg.host}:{cfg.port} ({e.strerror or e})", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
