"""The typed configuration of ``harken serve``: YAML file plus dotted ``key=value`` overrides,
validated here, saved in the startup log.

    cfg = load_serve_config("configs/serve.yaml", ["port=9000", "batching.max_batch_size=16"])

Every section is a dataclass; unknown keys are errors that list the valid ones (``harken.config``).
API keys are stored as SHA-256 hex digests (``harken serve --hash-key -`` reads a secret from stdin
and prints the config entry), never in clear.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from harken.config import ConfigError, apply_overrides, from_dict, to_dict
from harken.decode.rescore import DEFAULT_RESCORE_NBEST, DEFAULT_RESCORE_WEIGHT

__all__ = ["ServeConfig", "BatchingConfig", "LimitsConfig", "AuthConfig", "ApiKey", "StoreConfig",
           "load_serve_config", "hash_key", "ConfigError"]


@dataclass
class BatchingConfig:
    enabled: bool = True  # false: every request is its own batch (max_batch_size 1, no wait)
    max_batch_size: int = 16  # items per engine.infer_batch call
    max_wait_ms: float = 10.0  # how long the oldest queued item may wait for companions
    max_batch_seconds: float = 240.0  # padded-audio budget per batch: items x longest item, in seconds
    max_queue: int = 256  # items (VAD segments) waiting; more -> 503 + Retry-After
    workers: int = 1  # inference threads (x intra-op threads must fit the CPU quota)
    segment_seconds: float = 20.0  # long uploads are cut by VAD into pieces of at most this
    decode_workers: int = 2  # threads that decode uploads (the decoder itself runs in a child process)
    max_stream_batch: int = 64  # streaming sessions stepped together in one forward
    worker_nice: int = 5  # inference/decode threads run this much nicer than the event loop (0 = same)


@dataclass
class LimitsConfig:
    max_upload_bytes: int = 100 * 1024 * 1024  # 413 above
    max_audio_seconds: float = 3 * 3600.0  # decoded duration; 413 above
    decode_timeout_s: float = 60.0  # 422 when decoding takes longer
    request_timeout_s: float = 300.0  # 504 when a transcription takes longer (queue + compute)
    header_timeout_s: float = 10.0  # a connection must deliver complete request headers within this
    body_idle_timeout_s: float = 15.0  # 408 when the request body stalls this long
    body_timeout_s: float = 300.0  # 408 when the whole body takes longer than this
    max_streams: int = 64  # concurrent WebSocket/gRPC streams; more -> 503 + Retry-After
    stream_idle_timeout_s: float = 30.0
    max_stream_seconds: float = 3600.0
    max_stream_frame_bytes: int = 1 << 20  # one WebSocket binary frame / gRPC audio message
    rate_limit_per_minute: float = 0.0  # requests per minute per API key (or client when auth is off); 0 = off
    rate_limit_burst: int = 10
    retry_after_s: int = 1  # Retry-After on 503 queue-full
    drain_grace_s: float = 0.0  # after SIGTERM: seconds /readyz says 503 before the listener closes
    drain_timeout_s: float = 60.0  # then: how long in-flight requests and streams may take to finish


@dataclass
class ApiKey:
    id: str  # a name for logs and the recognition log ("team-a"); never the key itself
    sha256: str  # hex digest of the secret (harken serve --hash-key -)
    admin: bool = False  # may read every key's records in GET /v1/requests


@dataclass
class AuthConfig:
    api_keys: list[ApiKey] = field(default_factory=list)  # empty = no auth


@dataclass
class StoreConfig:
    url: str | None = "harken-requests.sqlite"  # sqlite file path | sqlite:///path | postgresql://...; null = off
    retain_audio: bool = False  # keep uploaded audio with each record
    audio_max_bytes: int = 1024 * 1024 * 1024  # total retained audio; oldest deleted first
    busy_timeout_ms: int = 5000  # sqlite


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int = 50051  # 0 = off
    backend: str = "auto"  # auto | torch | onnx
    num_threads: int = 0  # intra-op threads per inference worker; 0 = from the CPU quota / workers
    model_name: str = ""  # the id in /v1/models and metrics; "" = the model file's stem
    language: str = "english"  # what verbose_json reports when the request names no language
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    cors_origins: list[str] = field(default_factory=list)  # empty = CORS off; ["*"] = any origin
    lm: str | None = None  # server-side ARPA for decoding=beam_lm
    lm_weight: float = 0.5
    word_bonus: float = 0.0
    beam_size: int = 8
    # second pass for decoding=beam / beam_lm requests: Whisper's decoder rescores the n-best
    # (harken.decode.rescore); a CTranslate2 Whisper dir, pkg:PACKAGE/DIR or "auto" (a Whisper-CTC model's)
    rescore: str | None = None
    rescore_weight: float = DEFAULT_RESCORE_WEIGHT
    rescore_nbest: int = DEFAULT_RESCORE_NBEST
    log_json: bool = False
    log_level: str = "info"

    def validate(self) -> "ServeConfig":
        def bad(key, msg):
            raise ConfigError(f"serve config: {key}: {msg}")

        if not (0 < self.port < 65536):
            bad("port", f"{self.port} is not a TCP port (1-65535)")
        if not (0 <= self.grpc_port < 65536):
            bad("grpc_port", f"{self.grpc_port} is not a TCP port (0 = off)")
        if self.backend not in ("auto", "torch", "onnx"):
            bad("backend", f"{self.backend!r} is not one of auto, torch, onnx")
        if self.log_level not in ("debug", "info", "warning", "error"):
            bad("log_level", f"{self.log_level!r} is not one of debug, info, warning, error")
        b = self.batching
        for k in ("max_batch_size", "max_queue", "workers", "decode_workers", "max_stream_batch"):
            if getattr(b, k) < 1:
                bad(f"batching.{k}", f"must be >= 1 (got {getattr(b, k)})")
        if b.max_wait_ms < 0 or b.max_batch_seconds <= 0 or b.segment_seconds <= 1:
            bad("batching", "max_wait_ms >= 0, max_batch_seconds > 0 and segment_seconds > 1 are required")
        for k, v in vars(self.limits).items():
            if isinstance(v, (int, float)) and v < 0:
                bad(f"limits.{k}", f"must be >= 0 (got {v})")
        ids = [k.id for k in self.auth.api_keys]
        if len(set(ids)) != len(ids):
            bad("auth.api_keys", "key ids must be unique")
        for k in self.auth.api_keys:
            if not re.fullmatch(r"[0-9a-f]{64}", k.sha256.lower()):
                bad(f"auth.api_keys[{k.id}].sha256", "must be a SHA-256 hex digest (harken serve --hash-key -)")
        if self.lm is not None and not Path(self.lm).is_file():
            bad("lm", f"{self.lm}: no such ARPA file")
        if self.rescore and self.rescore != "auto" and not self.rescore.startswith("pkg:") \
                and not Path(self.rescore).is_dir():
            bad("rescore", f"{self.rescore}: no such Whisper directory")
        if self.rescore_nbest < 2:
            bad("rescore_nbest", f"must be >= 2 (got {self.rescore_nbest})")
        if self.store.url is not None and self.store.url.startswith(("postgres://", "postgresql://")):
            pass
        elif self.store.url is not None and "://" in self.store.url and not self.store.url.startswith("sqlite:///"):
            bad("store.url", f"{self.store.url!r}: expected a SQLite path, sqlite:///path or postgresql://...")
        return self

    def to_dict(self, redact: bool = True) -> dict:
        d = to_dict(self)
        if redact:  # digests are not secrets, but they do not belong in logs either
            for k in d["auth"]["api_keys"]:
                k["sha256"] = k["sha256"][:8] + "..."
            if d["store"]["url"] and "@" in d["store"]["url"]:
                d["store"]["url"] = re.sub(r"//[^@/]*@", "//***@", d["store"]["url"])
        return d


def hash_key(secret: str) -> str:
    """The SHA-256 hex digest stored in ``auth.api_keys[].sha256`` for an API key ``secret``."""
    return hashlib.sha256(secret.strip().encode("utf-8")).hexdigest()


def _merge(a: dict, b: dict) -> dict:
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(a.get(k), dict):
            _merge(a[k], v)
        else:
            a[k] = v
    return a


def load_serve_config(path: str | None = None, overrides: list[str] | None = None) -> ServeConfig:
    """Defaults, then the YAML file ``path`` (a mapping; a top-level ``serve:`` section is also
    accepted), then ``key.path=value`` overrides; validated."""
    d: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"serve config file not found: {path}")
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        if set(d) == {"serve"} and isinstance(d["serve"], dict):
            d = d["serve"]
    base = to_dict(ServeConfig())
    base["auth"]["api_keys"] = []
    d = _merge(base, d)
    apply_overrides(d, overrides or [])
    return from_dict(ServeConfig, d, where=path or "serve config").validate()
