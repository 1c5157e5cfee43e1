"""``harken serve``: REST, OpenAI-compatible and streaming recognition over HTTP (FastAPI on
uvicorn), cross-request batching, Prometheus metrics and a recognition log. See docs/serving.md."""

from harken.serve.config import ServeConfig, load_serve_config

__all__ = ["ServeConfig", "load_serve_config", "create_app"]


def __getattr__(name):
    if name == "create_app":
        from harken.serve.app import create_app

        return create_app
    raise AttributeError(name)
