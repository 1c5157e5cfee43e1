"""The recognition log: one record per request, written by one background thread so that neither
the event loop nor a transcription ever waits on (or fails because of) the database.

    store = open_store("harken-requests.sqlite", metrics)        # SQLite, WAL, busy timeout
    store = open_store("postgresql://user@127.0.0.1:5432/harken")  # PostgreSQL (psycopg 3)
    store.log(record)            # non-blocking; a failed write is counted, never raised
    store.get(id); store.list(limit=50, cursor=None, key_id=None)   # blocking: call off the loop

Uploaded audio can be kept with its record (``retain_audio``) under a total size cap; the oldest
audio is deleted first.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Record", "Store", "open_store", "StoreError"]

log = logging.getLogger("harken.serve")

FIELDS = ("id", "created", "endpoint", "key_id", "audio_seconds", "model_id", "options", "text", "latency",
          "status", "error")


class StoreError(RuntimeError):
    pass


@dataclass
class Record:
    id: str
    endpoint: str
    status: int
    created: float = field(default_factory=time.time)  # unix seconds
    key_id: str | None = None
    audio_seconds: float = 0.0
    model_id: str = ""
    options: dict = field(default_factory=dict)
    text: str = ""
    latency: float = 0.0  # seconds
    error: str | None = None
    audio: bytes | None = field(default=None, repr=False)  # kept only with retain_audio
    audio_type: str = ""

    def public(self) -> dict:
        d = asdict(self)
        d.pop("audio")
        d.pop("audio_type")
        return d


_SCHEMA = {
    "sqlite": [
        """CREATE TABLE IF NOT EXISTS requests (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, created REAL NOT NULL,
            endpoint TEXT NOT NULL, key_id TEXT, audio_seconds REAL, model_id TEXT, options TEXT, text TEXT,
            latency REAL, status INTEGER NOT NULL, error TEXT)""",
        "CREATE INDEX IF NOT EXISTS requests_key ON requests (key_id, seq)",
        """CREATE TABLE IF NOT EXISTS audio (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT UNIQUE NOT NULL, created REAL NOT NULL,
            size INTEGER NOT NULL, content_type TEXT, data BLOB NOT NULL)""",
    ],
    "postgres": [
        """CREATE TABLE IF NOT EXISTS requests (
            seq BIGSERIAL PRIMARY KEY, id TEXT UNIQUE NOT NULL, created DOUBLE PRECISION NOT NULL,
            endpoint TEXT NOT NULL, key_id TEXT, audio_seconds DOUBLE PRECISION, model_id TEXT, options TEXT,
            text TEXT, latency DOUBLE PRECISION, status INTEGER NOT NULL, error TEXT)""",
        "CREATE INDEX IF NOT EXISTS requests_key ON requests (key_id, seq)",
        """CREATE TABLE IF NOT EXISTS audio (
            seq BIGSERIAL PRIMARY KEY, request_id TEXT UNIQUE NOT NULL, created DOUBLE PRECISION NOT NULL,
            size BIGINT NOT NULL, content_type TEXT, data BYTEA NOT NULL)""",
    ],
}


class Store:
    """A SQL recognition log (``backend`` "sqlite" or "postgres") with one writer thread."""

    def __init__(self, url: str, metrics=None, retain_audio: bool = False, audio_max_bytes: int = 1 << 30,
                 busy_timeout_ms: int = 5000, queue_size: int = 10000):
        self.url = url
        self.backend = "postgres" if url.startswith(("postgres://", "postgresql://")) else "sqlite"
        self.path = url[len("sqlite:///"):] if url.startswith("sqlite:///") else url
        self.metrics = metrics
        self.retain_audio = retain_audio
        self.audio_max_bytes = int(audio_max_bytes)
        self.busy_timeout_ms = int(busy_timeout_ms)
        self.ph = "%s" if self.backend == "postgres" else "?"
        self._local = threading.local()
        self._q: queue.Queue = queue.Queue(maxsize=queue_size)
        self.failures = 0
        self.written = 0
        conn = self._conn()  # fail fast at startup on a bad URL / unwritable path
        self._migrate(conn)
        self._writer = threading.Thread(target=self._write_loop, name="harken-store", daemon=True)
        self._writer.start()

    # ------------------------------------------------------------------ connections
    def _connect(self):
        if self.backend == "postgres":
            try:
                import psycopg
            except ImportError:
                raise StoreError("store.url is PostgreSQL but psycopg is not installed (pip install 'psycopg[binary]')")
            try:
                return psycopg.connect(self.url, autocommit=True, connect_timeout=10)
            except psycopg.Error as e:
                raise StoreError(f"cannot connect to the recognition log database: {str(e).strip()}") from None
        try:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_ms / 1000.0, isolation_level=None,
                                   check_same_thread=True)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA busy_timeout={self.busy_timeout_ms}")
            conn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as e:
            raise StoreError(f"{self.path}: cannot open the recognition log ({e})") from None
        return conn

    def _conn(self):
        c = getattr(self._local, "conn", None)
        if c is None:
            c = self._local.conn = self._connect()
        return c

    def _reset_conn(self) -> None:
        c = getattr(self._local, "conn", None)
        self._local.conn = None
        if c is not None:
            try:
                c.close()
            except Exception:
                pass

    def _migrate(self, conn) -> None:
        for stmt in _SCHEMA[self.backend]:
            conn.execute(stmt)

    def _q_(self, sql: str) -> str:
        return sql.replace("?", self.ph)

    # ------------------------------------------------------------------ writing
    def log(self, rec: Record) -> None:
        """Queue one record; never raises (a full queue counts as a failed write)."""
        try:
            self._q.put_nowait(rec)
        except queue.Full:
            self._failed("the write queue is full")

    def _failed(self, why: str) -> None:
        self.failures += 1
        if self.metrics is not None:
            self.metrics.db_write_failures.labels(backend=self.backend).inc()
        log.warning("recognition log write failed: %s", why)

    def _write_loop(self) -> None:
        while True:
            rec = self._q.get()
            try:
                if rec is None:
                    return
                t0 = time.perf_counter()
                try:
                    self._write(rec)
                    self.written += 1
                except Exception as e:  # a store failure never fails a transcription
                    self._reset_conn()
                    self._failed(f"{type(e).__name__}: {e}")
                else:
                    if self.metrics is not None:
                        self.metrics.db_write_seconds.labels(backend=self.backend).observe(time.perf_counter() - t0)
            finally:
                self._q.task_done()

    def _write(self, rec: Record) -> None:
        conn = self._conn()
        vals = (rec.id, rec.created, rec.endpoint, rec.key_id, float(rec.audio_seconds), rec.model_id,
                json.dumps(rec.options, sort_keys=True, default=str), rec.text, float(rec.latency), int(rec.status),
                rec.error)
        conn.execute(self._q_(f"INSERT INTO requests ({', '.join(FIELDS)}) VALUES ({', '.join('?' * len(FIELDS))})"),
                     vals)
        if self.retain_audio and rec.audio and len(rec.audio) <= self.audio_max_bytes:
            conn.execute(self._q_("INSERT INTO audio (request_id, created, size, content_type, data) "
                                  "VALUES (?, ?, ?, ?, ?)"),
                         (rec.id, rec.created, len(rec.audio), rec.audio_type, rec.audio))
            self._trim_audio(conn)

    def _trim_audio(self, conn) -> None:
        total = conn.execute("SELECT COALESCE(SUM(size), 0) FROM audio").fetchone()[0]
        while total > self.audio_max_bytes:
            row = conn.execute("SELECT seq, size FROM audio ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                break
            conn.execute(self._q_("DELETE FROM audio WHERE seq = ?"), (row[0],))
            total -= int(row[1])

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued record is written (tests, shutdown)."""
        end = time.monotonic() + timeout
        while self._q.unfinished_tasks and time.monotonic() < end:
            time.sleep(0.01)
        return not self._q.unfinished_tasks

    def close(self, timeout: float = 10.0) -> None:
        self.flush(timeout)
        try:
            self._q.put(None, timeout=1.0)
        except queue.Full:
            pass
        self._writer.join(timeout)
        self._reset_conn()

    # ------------------------------------------------------------------ reading (blocking)
    def _row(self, row) -> dict:
        d = dict(zip(("seq",) + FIELDS, row))
        try:
            d["options"] = json.loads(d["options"] or "{}")
        except ValueError:
            d["options"] = {}
        return d

    def get(self, rid: str) -> dict | None:
        try:
            conn = self._conn()
            sql = self._q_(f"SELECT seq, {', '.join(FIELDS)} FROM requests WHERE id = ?")
            row = conn.execute(sql, (rid,)).fetchone()
            if row is None:
                return None
            d = self._row(row)
            a = conn.execute(self._q_("SELECT size, content_type FROM audio WHERE request_id = ?"), (rid,)).fetchone()
        except Exception as e:
            self._reset_conn()
            raise StoreError(f"recognition log read failed ({type(e).__name__}: {e})") from None
        d["audio_bytes"] = int(a[0]) if a else 0
        d.pop("seq")
        return d

    def get_audio(self, rid: str) -> tuple[bytes, str] | None:
        try:
            row = self._conn().execute(self._q_("SELECT data, content_type FROM audio WHERE request_id = ?"),
                                       (rid,)).fetchone()
        except Exception as e:
            self._reset_conn()
            raise StoreError(f"recognition log read failed ({type(e).__name__}: {e})") from None
        return (bytes(row[0]), row[1] or "application/octet-stream") if row else None

    def list(self, limit: int = 50, cursor: int | None = None, key_id: str | None = None) -> tuple[list[dict], Any]:
        """Newest first; ``cursor`` from the previous page. Returns (records, next_cursor or None)."""
        where, args = [], []
        if cursor is not None:
            where.append("seq < ?")
            args.append(int(cursor))
        if key_id is not None:
            where.append("key_id = ?")
            args.append(key_id)
        sql = f"SELECT seq, {', '.join(FIELDS)} FROM requests"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(int(limit) + 1)
        try:
            rows = self._conn().execute(self._q_(sql), tuple(args)).fetchall()
        except Exception as e:
            self._reset_conn()
            raise StoreError(f"recognition log read failed ({type(e).__name__}: {e})") from None
        recs = [self._row(r) for r in rows[:limit]]
        nxt = recs[-1]["seq"] if len(rows) > limit and recs else None
        for r in recs:
            r.pop("seq")
        return recs, nxt

    def audio_total(self) -> int:
        return int(self._conn().execute("SELECT COALESCE(SUM(size), 0) FROM audio").fetchone()[0])


def open_store(url: str | None, metrics=None, **kw) -> Store | None:
    if not url:
        return None
    return Store(url, metrics, **kw)
