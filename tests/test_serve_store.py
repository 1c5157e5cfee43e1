"""The recognition log on SQLite and on a real PostgreSQL 15 server that the test starts itself
(initdb + pg_ctl on a free loopback port in a temp dir): records, paging, per-key visibility,
audio retention under a size cap, and write failures that are counted, never raised."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time

import httpx
import pytest

from harken.serve.metrics import Metrics
from harken.serve.store import Record, Store, StoreError
from harken.serve.testing import LiveServer, free_port
from tests.test_serve import clips, engine, make_cfg, model_path  # noqa: F401  (fixtures)

PG_DIRS = ("/usr/lib/postgresql/15/bin", "/usr/local/bin", "/usr/lib/postgresql/16/bin", "/usr/bin")


def _pg_bin(name: str) -> str | None:
    for d in PG_DIRS:
        p = os.path.join(d, name)
        if os.path.exists(p):
            return p
    return shutil.which(name)


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL server: yields (url, stop, start)."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) are not installed: apt-get install postgresql")
    pytest.importorskip("psycopg")
    base = tempfile.mkdtemp(prefix="harken-pg-", dir="/tmp")
    data = os.path.join(base, "data")
    as_user: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(base, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    r = subprocess.run(as_user + [initdb, "-D", data, "-A", "trust", "-U", "harken", "--no-sync"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"

    def start():
        r = subprocess.run(as_user + [pg_ctl, "-D", data, "-o", opts, "-l", os.path.join(base, "log"), "-w", "start"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr

    def stop():
        subprocess.run(as_user + [pg_ctl, "-D", data, "-m", "fast", "-w", "stop"], capture_output=True)

    start()
    try:
        yield f"postgresql://harken@127.0.0.1:{port}/postgres", stop, start
    finally:
        stop()
        shutil.rmtree(base, ignore_errors=True)


def _url(kind, tmp_path, postgres_fixture):
    return str(tmp_path / "log.sqlite") if kind == "sqlite" else postgres_fixture[0]


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "log.sqlite")
    url = request.getfixturevalue("postgres")[0]
    import psycopg

    with psycopg.connect(url, autocommit=True) as c:  # a clean schema for each test
        c.execute("DROP TABLE IF EXISTS requests")
        c.execute("DROP TABLE IF EXISTS audio")
    return url


def test_records_paging_and_visibility(store_url):
    m = Metrics(model="m")
    s = Store(store_url, m)
    try:
        for i in range(7):
            s.log(Record(id=f"r{i}", endpoint="rest", status=200, key_id="a" if i % 2 else "b", audio_seconds=1.5,
                         model_id="sha256:x", options={"decoding": "greedy"}, text=f"text {i}", latency=0.1))
        assert s.flush()
        got = s.get("r3")
        assert got["text"] == "text 3" and got["key_id"] == "a" and got["options"] == {"decoding": "greedy"}
        assert got["audio_bytes"] == 0 and s.get("nope") is None
        seen, cur = [], None
        while True:
            page, cur = s.list(limit=3, cursor=cur)
            seen += [r["id"] for r in page]
            if cur is None:
                break
        assert seen == [f"r{i}" for i in range(6, -1, -1)]  # newest first, every record once
        assert [r["id"] for r in s.list(limit=50, key_id="a")[0]] == ["r5", "r3", "r1"]
        assert s.failures == 0
    finally:
        s.close()


def test_audio_retention_keeps_the_newest_under_the_cap(store_url):
    s = Store(store_url, None, retain_audio=True, audio_max_bytes=2500)
    try:
        for i in range(5):
            s.log(Record(id=f"a{i}", endpoint="rest", status=200, audio=bytes([i]) * 1000, audio_type="audio/wav"))
        assert s.flush()
        assert s.audio_total() <= 2500
        assert s.get_audio("a0") is None and s.get_audio("a1") is None
        assert s.get_audio("a4") == (bytes([4]) * 1000, "audio/wav") and s.get_audio("a3") is not None
    finally:
        s.close()


def test_concurrent_writers_on_sqlite(tmp_path):
    """Many request threads logging at once: one writer, WAL, no 'database is locked'."""
    import threading

    s = Store(str(tmp_path / "log.sqlite"), None)
    s2 = Store(str(tmp_path / "log.sqlite"), None)  # a second process-like writer on the same file
    try:
        def burst(st, k):
            for i in range(50):
                st.log(Record(id=f"{k}-{i}", endpoint="rest", status=200))

        ts = [threading.Thread(target=burst, args=(s if k % 2 else s2, k)) for k in range(6)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert s.flush() and s2.flush()
        assert s.failures == s2.failures == 0
        assert len(s.list(limit=500)[0]) == 300
    finally:
        s.close()
        s2.close()


def test_postgres_outage_is_counted_and_transcriptions_go_on(postgres, engine, clips, tmp_path):  # noqa: F811
    url, stop, start = postgres
    cfg = make_cfg(tmp_path, f"store.url={url}")
    _, data, _ = clips[0]
    with LiveServer(cfg, engine) as srv:
        r = httpx.post(srv.url + "/v1/transcribe", files={"file": ("a.wav", data)}, timeout=60)
        assert r.status_code == 200
        assert srv.state.store.flush()
        rid = r.headers["x-request-id"]
        rec = httpx.get(srv.url + f"/v1/requests/{rid}").json()
        assert rec["text"] == r.json()["text"] and rec["endpoint"] == "rest" and rec["status"] == 200
        stop()
        try:
            r = httpx.post(srv.url + "/v1/transcribe", files={"file": ("a.wav", data)}, timeout=60)
            assert r.status_code == 200 and r.json()["text"]
            assert srv.state.store.flush(30)
            assert srv.state.store.failures >= 1
            assert 'harken_db_write_failures_total{backend="postgres"}' in httpx.get(srv.url + "/metrics").text
            listing = httpx.get(srv.url + "/v1/requests")
            assert listing.status_code == 503 and "retry-after" in listing.headers
        finally:
            start()
        time.sleep(0.2)
        r = httpx.post(srv.url + "/v1/transcribe", files={"file": ("a.wav", data)}, timeout=60)
        assert srv.state.store.flush()
        assert httpx.get(srv.url + f"/v1/requests/{r.headers['x-request-id']}").status_code == 200  # reconnected


def test_bad_store_url_is_one_clear_error(tmp_path):
    with pytest.raises(StoreError, match="cannot"):
        Store(str(tmp_path / "no" / "such" / "dir" / "log.sqlite"), None)
    with pytest.raises(StoreError, match="cannot connect"):
        Store(f"postgresql://harken@127.0.0.1:{free_port()}/postgres", None)
