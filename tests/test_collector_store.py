"""The collector's storage, one suite for both backends: SQLite files in tmp_path and a real
PostgreSQL server started here (Debian's postgresql package; skipped with the reason if absent)."""
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import pytest

from agent.collector import make_app
from agent.collector.jsonbody import parse_batch
from agent.collector.schema import VERSION, concurrent_indexes, statements
from agent.collector.store import open_store
from agent.collector.validate import batch_rows
from agent.record import encode, error_record, gap_record, health_record, utc_timestamp

T0 = 1_795_000_000.0  # 2026-11-18


# --- a real PostgreSQL server -------------------------------------------------------------------

def _pg_bin():
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(found[-1]) if found else None


@pytest.fixture(scope="session")
def pg_server():
    """(socket dir, port) of a throw-away PostgreSQL cluster, run as an unprivileged user."""
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL not installed (apt-get install postgresql): no initdb under /usr/lib/postgresql")
    try:
        import psycopg
    except ImportError:
        pytest.skip("psycopg not installed")
    tmp = tempfile.mkdtemp(prefix="collector-pg-")
    run_as = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(tmp, pw.pw_uid, pw.pw_gid)
        run_as = ["setpriv", "--reuid=%d" % pw.pw_uid, "--regid=%d" % pw.pw_gid, "--clear-groups", "--"]
    data = os.path.join(tmp, "data")
    r = subprocess.run(run_as + [os.path.join(bindir, "initdb"), "-D", data, "-A", "trust", "-U", "postgres",
                                 "--no-sync", "-E", "UTF8", "--locale=C"],
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip("initdb failed: %s" % (r.stderr.strip()[-300:]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(os.path.join(tmp, "server.log"), "w")  # noqa: SIM115 -- open while the server runs
    proc = subprocess.Popen(run_as + [os.path.join(bindir, "postgres"), "-D", data, "-p", str(port),
                                      "-k", tmp, "-c", "listen_addresses=", "-c", "fsync=off",
                                      "-c", "max_connections=60"],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            psycopg.connect(host=tmp, port=port, user="postgres", dbname="postgres", connect_timeout=2).close()
            break
        except psycopg.OperationalError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                log.close()
                with open(os.path.join(tmp, "server.log")) as f:
                    text = f.read()[-500:]
                shutil.rmtree(tmp, ignore_errors=True)
                pytest.skip("PostgreSQL did not start: %s" % text)
            time.sleep(0.2)
    yield tmp, port
    proc.send_signal(signal.SIGINT)  # fast shutdown
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
    shutil.rmtree(tmp, ignore_errors=True)


_db_counter = [0]


@pytest.fixture
def pg_url(pg_server):
    """A fresh, empty database on the session's server."""
    import psycopg

    host, port = pg_server
    _db_counter[0] += 1
    name = "t%d_%d" % (os.getpid(), _db_counter[0])
    with psycopg.connect(host=host, port=port, user="postgres", dbname="postgres", autocommit=True) as c:
        c.execute("CREATE DATABASE %s" % name)
    return "postgresql://postgres@/%s?host=%s&port=%d" % (name, host, port)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return "sqlite:///%s" % (tmp_path / "c.db")
    return request.getfixturevalue("pg_url")


@pytest.fixture
def store(db_url):
    s = open_store(db_url)
    yield s
    s.close()


# --- helpers ------------------------------------------------------------------------------------

def data(agent, seq, device="meter1", t=None, **values):
    rec = {"agent": agent, "seq": seq, "ts": utc_timestamp(T0 + seq if t is None else t), "device": device,
           "unit": 1, "values": values or {"v": float(seq)}, "status": "ok"}
    return rec


def rows_of(agent, records, received=T0 + 5000):
    body = encode({"agent": agent, "records": records}).decode()
    return batch_rows(parse_batch(body), received, 100000, 8)[1]


def ingest(store, agent, records):
    return store.ingest(agent, rows_of(agent, records), T0 + 5000)


def stored_seqs(store, agent=None):
    return [r[1] for r in store.records(agent=agent)]


# --- the suite ----------------------------------------------------------------------------------

def test_migrations_are_applied_once_and_reopening_keeps_data(db_url):
    s = open_store(db_url)
    assert s.ping() == VERSION
    assert ingest(s, "a", [data("a", 1)]) == (1, 0, 1)
    s.close()
    s2 = open_store(db_url)  # a restart: migrate() finds the current version and does nothing
    assert s2.migrate() == VERSION
    assert stored_seqs(s2) == [1]
    s2.close()


def _indexes(store):
    with store._read() as cur:
        if store.dialect == "sqlite":
            cur.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'records'")
        else:
            cur.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'records'")
        return {r[0] for r in cur.fetchall()}


def _version_1_store(db_url):
    """A store on a database as a collector of schema version 1 left it (no index on `received`)."""
    old = open_store(db_url, migrate=False)
    with old._write() as cur:  # exactly what migrate() did at version 1
        cur.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for stmt in statements(old.dialect, 1):
            cur.execute(stmt)
        cur.execute("INSERT INTO schema_version (version) VALUES (1)")
    return old


def test_a_version_1_database_is_migrated_and_keeps_its_data(db_url):
    """A database written by a collector of schema version 1 (no index on `received`); on
    PostgreSQL migration 2 builds it CONCURRENTLY, outside the migration transaction."""
    old = _version_1_store(db_url)
    assert ingest(old, "a", [data("a", 1), data("a", 2)]) == (2, 0, 2)
    assert "records_received" not in _indexes(old)
    old.close()
    s = open_store(db_url)
    assert VERSION >= 2 and s.ping() == VERSION
    assert "records_received" in _indexes(s)
    assert stored_seqs(s) == [1, 2]
    assert ingest(s, "a", [data("a", 2), data("a", 3)]) == (1, 1, 3)
    s.close()


def test_migration_3_takes_old_legacy_hash_seqs_out_of_an_agents_max_seq(db_url):
    """A database of schema 2 where a /receive-data post with agent a's token stored a legacy row
    under a positive 63-bit hash seq (the old identity) and pushed a's max_seq to it: after the
    upgrade a's max_seq is its own highest seq again, and a legacy-only agent's is -1 (review2)."""
    old = _version_1_store(db_url)
    old.close()
    old = open_store(db_url, migrate=False)
    with old._write() as cur:   # migration 2, as a schema-2 collector left it
        for stmt in statements(old.dialect, 2):
            cur.execute(stmt)
        for name, spec in ([] if old.dialect == "sqlite" else concurrent_indexes(2)):
            cur.execute("CREATE INDEX %s %s" % (name, spec))
        cur.execute("UPDATE schema_version SET version = 2")
    assert ingest(old, "a", [data("a", 1), data("a", 2)]) == (2, 0, 2)
    hashed = 7_000_000_000_000_000_001
    payload = '{"device":"RUT200_1","ts":"2027-01-15T08:00:00.000Z","values":{"r0":1},"status":"ok"}'
    with old._write() as cur:
        for agent, seq in (("a", hashed), ("legacy", hashed + 1)):
            cur.execute(old._sql("INSERT INTO records (agent, seq, ts, kind, device, unit, status, payload, clock, "
                                 "received) VALUES (?, ?, '2027-01-15T08:00:00.000Z', 'data', 'RUT200_1', NULL, "
                                 "'ok', ?, NULL, 1.0)"), (agent, seq, payload))
        cur.execute(old._sql("UPDATE agents SET max_seq = ? WHERE agent = 'a'"), (hashed,))
        cur.execute(old._sql("INSERT INTO agents (agent, max_seq, records, first_seen, last_seen) "
                             "VALUES ('legacy', ?, 1, 1.0, 1.0)"), (hashed + 1,))
    old.close()
    s = open_store(db_url)
    try:
        assert s.ping() == VERSION >= 3
        with s._read() as cur:
            cur.execute("SELECT agent, max_seq FROM agents ORDER BY agent")
            assert [tuple(r) for r in cur.fetchall()] == [("a", 2), ("legacy", -1)]
        assert ingest(s, "a", [data("a", 3)]) == (1, 0, 3)
    finally:
        s.close()


def test_a_batch_sent_twice_is_stored_once(store):
    recs = [data("a", i) for i in range(10)]
    assert ingest(store, "a", recs) == (10, 0, 9)
    assert ingest(store, "a", recs) == (0, 10, 9)
    # a retry that overlaps: half old, half new
    assert ingest(store, "a", [data("a", i) for i in range(5, 15)]) == (5, 5, 14)
    assert stored_seqs(store, "a") == list(range(15))


def test_a_batch_longer_than_one_insert_statement_counts_what_was_new(store):
    """SQLite writes a batch as several multi-row INSERTs (ROWS_PER_INSERT rows each): a batch
    that overlaps stored records across those boundaries stores each record once, and the
    counts hold even when another process stored some of them after the duplicate check
    (the INSERT's ON CONFLICT then skips them)."""
    from agent.collector.sqlite import ROWS_PER_INSERT

    n = 2 * ROWS_PER_INSERT + 7
    every3 = range(0, n, 3)
    assert ingest(store, "a", [data("a", i) for i in every3]) == (len(every3), 0, max(every3))
    assert ingest(store, "a", [data("a", i) for i in range(n)]) == (n - len(every3), len(every3), n - 1)
    assert stored_seqs(store, "a") == list(range(n))
    # the race: rows the duplicate check did not see are skipped by the INSERT itself
    late = rows_of("a", [data("a", i) for i in range(n, 2 * n)])
    with store._write() as cur:
        assert store._insert(cur, late[::2]) == len(late[::2])
        assert store._insert(cur, late) == len(late) - len(late[::2])
    assert stored_seqs(store, "a") == list(range(2 * n))
    assert [json.loads(r[7])["seq"] for r in store.records(agent="a")] == list(range(2 * n))


def test_same_seq_twice_in_one_batch_and_other_agents_are_independent(store):
    assert ingest(store, "a", [data("a", 3), data("a", 3, v=99.0)]) == (1, 1, 3)
    assert ingest(store, "b", [data("b", 3)]) == (1, 0, 3)
    assert [json.loads(r[7])["values"] for r in store.records(agent="a")] == [{"v": 3.0}]
    assert stored_seqs(store) == [3, 3]


def test_max_seq_is_the_highest_held_even_when_an_older_batch_arrives_late(store):
    ingest(store, "a", [data("a", 100)])
    assert ingest(store, "a", [data("a", 7)]) == (1, 0, 100)
    assert store.ingest("a", [], T0)[2] == 100
    assert store.ingest("nobody", [], T0) == (0, 0, None)


def test_records_come_back_as_sent(store):
    sent = [data("a", 1, voltage=230.1, name="x\u00e9"),
            error_record("a", T0 + 2, "plc", 3, {"kind": "timeout", "message": "no answer in 1.0 s"}),
            gap_record("a", T0 + 3, 5, 10, 14, utc_timestamp(T0), utc_timestamp(T0 + 1), "spool full"),
            health_record("a", T0 + 4, "plc", 3, {"requests": 10, "timeouts": 1})]
    for i, r in enumerate(sent[1:], 2):
        r["seq"] = i
    sent[0]["clock"] = "unsynced"
    ingest(store, "a", sent)
    got = [json.loads(r[7] if isinstance(r[7], str) else json.dumps(r[7])) for r in store.records(agent="a")]
    assert got == sent
    kinds = [(r[3], r[4], r[6]) for r in store.records(agent="a")]
    assert kinds == [("data", "meter1", "ok"), ("data", "plc", "error"), ("gap", None, None), ("health", "plc", None)]
    assert [r[8] for r in store.records(agent="a")] == ["unsynced", None, None, None]


def test_device_summary_keeps_the_newest_values_and_counts_errors(store):
    ingest(store, "a", [data("a", 1, v=1.0), data("a", 2, v=2.0)])
    # a late batch with an older reading must not replace the newest values
    ingest(store, "a", [data("a", 0, v=0.5)])
    err = error_record("a", T0 + 3, "meter1", 1, {"kind": "crc", "message": "bad CRC"})
    err["seq"] = 3
    hl = health_record("a", T0 + 4, "meter1", 1, {"timeouts": 2})
    hl["seq"] = 4
    gap = gap_record("a", T0 + 5, 7, 100, 106, None, None, "age bound")
    gap["seq"] = 5
    ingest(store, "a", [err, hl, gap])
    (d,) = store.devices()
    assert (d["agent"], d["device"], d["unit"]) == ("a", "meter1", 1)
    assert json.loads(d["last_values"]) == {"v": 2.0}
    assert d["values_ts"] == utc_timestamp(T0 + 2)
    assert json.loads(d["last_error"])["kind"] == "crc"
    assert d["last_status"] == "error" and d["last_ts"] == utc_timestamp(T0 + 3)
    assert json.loads(d["health"]) == {"timeouts": 2}
    assert (d["records"], d["errors"]) == (5, 1)
    (a,) = store.agents()
    assert (a["agent"], a["max_seq"], a["records"], a["gaps"], a["dropped"]) == ("a", 5, 6, 1, 7)


def test_duplicates_do_not_count_twice_in_the_summary(store):
    recs = [data("a", i) for i in range(4)]
    ingest(store, "a", recs)
    ingest(store, "a", recs)
    assert store.devices()[0]["records"] == 4
    assert store.agents()[0]["records"] == 4


def test_record_queries_filter_and_order(store):
    ingest(store, "a", [data("a", i, device="m%d" % (i % 2)) for i in range(10)])
    ingest(store, "b", [data("b", i) for i in range(3)])
    assert len(list(store.records())) == 13
    assert stored_seqs(store, "a") == list(range(10))
    assert [r[1] for r in store.records(agent="a", device="m1")] == [1, 3, 5, 7, 9]
    since, until = utc_timestamp(T0 + 2), utc_timestamp(T0 + 5)
    assert [r[1] for r in store.records(agent="a", since=since, until=until)] == [2, 3, 4]
    assert [r[1] for r in store.records(agent="a", limit=3)] == [0, 1, 2]
    assert list(store.records(kind="gap")) == []
    assert [p for p in store.series("a", "m0", utc_timestamp(T0 + 4))][0][0] == utc_timestamp(T0 + 4)


def test_a_stream_closed_early_releases_the_database(store):
    ingest(store, "a", [data("a", i) for i in range(2000)])
    rows = store.records(agent="a")
    assert next(rows)[1] == 0
    rows.close()  # a client hung up mid-export
    assert ingest(store, "a", [data("a", 5000)]) == (1, 0, 5000)


def test_a_failing_batch_stores_nothing(store):
    ingest(store, "a", [data("a", 1)])
    rows = rows_of("a", [data("a", i) for i in range(2, 6)])
    rows[-1] = rows[-1][:7] + (None,) + rows[-1][8:]  # payload NOT NULL: the database refuses row 4
    with pytest.raises(Exception):  # noqa: B017 -- the driver's integrity error, whichever it is
        store.ingest("a", rows, T0)
    assert stored_seqs(store) == [1]
    assert store.agents()[0]["max_seq"] == 1
    assert store.devices()[0]["records"] == 1
    assert ingest(store, "a", [data("a", 2)]) == (1, 0, 2)  # and the store still works


def test_concurrent_posts_of_the_same_batch_store_each_record_once(store):
    recs = [data("a", i) for i in range(200)]
    results = []

    def post():
        results.append(ingest(store, "a", recs))

    threads = [threading.Thread(target=post) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r[0] for r in results) == 200
    assert sum(r[1] for r in results) == 600
    assert stored_seqs(store, "a") == list(range(200))


def test_retention_deletes_by_received_time_in_chunks(store):
    received_old = T0 - 40 * 86400
    store.ingest("a", rows_of("a", [data("a", i) for i in range(25)], received_old), received_old)
    # Taken while the agent's clock was unset (ts years back), received now: must be kept.
    unsynced = [dict(data("a", 100 + i, t=1_000_000_000.0 + i), clock="unsynced") for i in range(5)]
    assert ingest(store, "a", unsynced) == (5, 0, 104)
    cutoff = T0 - 30 * 86400
    assert store.delete_older(cutoff, 10) == 10
    assert store.delete_older(cutoff, 10) == 10
    assert store.delete_older(cutoff, 10) == 5
    assert store.delete_older(cutoff, 10) == 0
    assert stored_seqs(store) == [100, 101, 102, 103, 104]
    assert {r[8] for r in store.records()} == {"unsynced"}


def _pg_index(store, name):
    """(valid, unique) of index `name`, None when there is none."""
    with store._read() as cur:
        cur.execute("SELECT indisvalid, indisunique FROM pg_index WHERE indexrelid = to_regclass(%s)",
                    (name,))
        row = cur.fetchone()
    return None if row is None else tuple(row)


@pytest.mark.postgres
def test_an_invalid_index_left_by_a_failed_concurrent_build_is_rebuilt(pg_url):
    """A CREATE INDEX CONCURRENTLY that fails midway leaves an INVALID index of that name (which
    IF NOT EXISTS alone would keep): the migration drops it and builds it again."""
    import psycopg

    old = _version_1_store(pg_url)
    assert ingest(old, "a", [data("a", 1), data("a", 2)]) == (2, 0, 2)  # same `received` twice
    # fails after the catalog entry exists
    with psycopg.connect(pg_url, autocommit=True) as c, pytest.raises(psycopg.errors.UniqueViolation):
        c.execute("CREATE UNIQUE INDEX CONCURRENTLY records_received ON records (received)")
    assert _pg_index(old, "records_received") == (False, True)
    old.close()
    s = open_store(pg_url)
    assert s.ping() == VERSION
    assert _pg_index(s, "records_received") == (True, False)
    assert stored_seqs(s) == [1, 2]
    s.close()


@pytest.mark.postgres
def test_ingest_goes_on_while_migration_2_waits_to_build_its_index(pg_url):
    """Migration 2 must not take a SHARE lock on `records` (a plain CREATE INDEX does, and every
    other collector's ingest queues behind it for the whole build). Staged without timing: an
    open transaction that wrote to `records` holds the index build back; meanwhile another
    collector ingests (a plain CREATE INDEX would make it wait; lock_timeout turns that into an
    error instead of a hung test)."""
    import psycopg

    old = _version_1_store(pg_url)
    assert ingest(old, "a", [data("a", 1)]) == (1, 0, 1)
    old.close()
    writer = psycopg.connect(pg_url)  # a transaction of some other collector, still open
    writer.execute("LOCK TABLE records IN ROW EXCLUSIVE MODE")
    migrated, errors = [], []

    def start():
        try:
            migrated.append(open_store(pg_url))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=start)
    t.start()
    other = None
    try:
        with psycopg.connect(pg_url, autocommit=True) as watch:
            for _ in range(600):  # bounded: until the index build waits on the open transaction
                waiting = watch.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND query ILIKE 'CREATE INDEX%' AND wait_event_type = 'Lock'").fetchone()[0]
                if waiting or errors:
                    break
                time.sleep(0.05)
        assert waiting and not errors, errors
        other = open_store(pg_url, migrate=False)
        other._conn().execute("SET lock_timeout = '20s'")
        assert ingest(other, "b", [data("b", 1), data("b", 2)]) == (2, 0, 2)
    finally:
        writer.commit()
        writer.close()
        t.join(60)
    assert not errors, errors
    s = migrated[0]
    assert s.ping() == VERSION and _pg_index(s, "records_received") == (True, False)
    assert stored_seqs(s, "b") == [1, 2]
    s.close()
    other.close()


@pytest.mark.postgres
def test_two_collector_processes_share_one_postgres_database(pg_url):
    """Two stores = two collectors behind a load balancer: migrations once, idempotence in the database."""
    stores = []
    errors = []

    def start():
        try:
            stores.append(open_store(pg_url))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(stores) == 3
    recs = [data("a", i) for i in range(50)]
    assert ingest(stores[0], "a", recs[:30]) == (30, 0, 29)
    assert ingest(stores[1], "a", recs) == (20, 30, 49)
    assert stored_seqs(stores[2], "a") == list(range(50))
    for s in stores:
        s.close()


@pytest.mark.postgres
def test_overlapping_batches_on_two_workers_do_not_deadlock(pg_url):
    """Two collector processes (two stores) each get a batch of one agent at the same moment,
    overlapping in seq, devices first seen in opposite order. Rows are locked in one order
    (records by seq, devices by name), so neither waits for the other in a cycle; a deadlock
    would be a 503 and a retry for the agent, not a loss, but it costs a second each."""
    rounds = 25  # without the fix, 5 runs out of 5 deadlocked within these rounds
    stores = [open_store(pg_url), open_store(pg_url)]
    errors = []
    try:
        for rnd in range(rounds):
            base = rnd * 1000
            a = [data("a", base + i, device="d%02d" % (i % 50)) for i in range(200)]
            b = [data("a", base + i, device="d%02d" % (i % 50)) for i in range(100, 300)][::-1]
            barrier = threading.Barrier(2)

            def post(store, recs, barrier=barrier):
                try:
                    barrier.wait(10)
                    ingest(store, "a", recs)
                except Exception as e:
                    errors.append(e)

            threads = [threading.Thread(target=post, args=(st, recs)) for st, recs in zip(stores, (a, b))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not errors, errors
        assert stored_seqs(stores[0], "a") == [r * 1000 + i for r in range(rounds) for i in range(300)]
    finally:
        for st in stores:
            st.close()


@pytest.mark.postgres
def test_the_app_over_postgres(pg_url):
    """The WSGI app end to end on PostgreSQL: post, duplicate, query, health."""
    import io
    import sys
    from wsgiref.validate import validator

    app = make_app(None, db=pg_url)
    try:
        def call(method, path, body=b"", qs=""):
            env = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": qs, "SCRIPT_NAME": "",
                   "SERVER_NAME": "t", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
                   "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body),
                   "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": False,
                   "wsgi.run_once": False, "CONTENT_LENGTH": str(len(body)), "CONTENT_TYPE": "application/json"}
            out = {}
            it = validator(app)(env, lambda s, h, e=None: out.update(status=s))
            try:
                return b"".join(it), out["status"]
            finally:
                it.close()

        body = encode({"agent": "a", "records": [data("a", i) for i in range(3)]})
        b, st = call("POST", "/api/v1/batches", body)
        assert st.startswith("200") and json.loads(b) == {"stored": 3, "duplicates": 0, "max_seq": 2}
        b, st = call("POST", "/api/v1/batches", body)
        assert json.loads(b) == {"stored": 0, "duplicates": 3, "max_seq": 2}
        b, st = call("GET", "/api/v1/records", qs="format=jsonl")
        assert [json.loads(x)["seq"] for x in b.splitlines()] == [0, 1, 2]
        b, st = call("GET", "/health")
        assert st.startswith("200") and json.loads(b)["db"] == "ok"
        b, st = call("GET", "/api/v1/devices")
        assert json.loads(b)["devices"][0]["values"] == {"v": 2.0}
    finally:
        app.close()


def test_group_commit_isolates_a_failing_batch(tmp_path):
    """Batches queued behind a writer go out in one transaction; one bad batch is rolled back
    to its savepoint and the others still commit."""
    from agent.collector.sqlite import _Job

    s = open_store("sqlite:///%s" % (tmp_path / "g.db"))
    good1 = _Job("a", rows_of("a", [data("a", 1), data("a", 2)]), T0)
    bad_rows = rows_of("b", [data("b", 1), data("b", 2)])
    bad_rows[1] = bad_rows[1][:7] + (None,) + bad_rows[1][8:]
    bad = _Job("b", bad_rows, T0)
    good2 = _Job("c", rows_of("c", [data("c", 7)]), T0)
    with s._write_lock:
        s._write_group([good1, bad, good2])
    assert all(j.done for j in (good1, bad, good2))
    assert good1.result == (2, 0, 2) and good2.result == (1, 0, 7)
    assert bad.result is None and bad.error is not None
    assert [(r[0], r[1]) for r in s.records()] == [("a", 1), ("a", 2), ("c", 7)]
    assert sorted(a["agent"] for a in s.agents()) == ["a", "c"]
    s.close()


def test_many_threads_posting_at_once_store_everything_once(store):
    results, errors = [], []

    def agent(k):
        try:
            for b in range(10):
                recs = [data("g%d" % k, b * 5 + i) for i in range(5)]
                results.append(ingest(store, "g%d" % k, recs))
                results.append(ingest(store, "g%d" % k, recs[2:]))  # a retry, partly
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=agent, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(r[0] for r in results) == 300 and sum(r[1] for r in results) == 180
    assert sorted(a["max_seq"] for a in store.agents()) == [49] * 6


@pytest.mark.postgres
def test_database_outage_is_503_not_500(pg_server, pg_url, caplog):
    """The database goes away under a running collector: /health and POST answer 503 (the agent
    backs off and retries), never 500; the log line names the agent."""
    import logging

    import psycopg

    caplog.set_level(logging.INFO, logger="modbus.collector")

    app = make_app(None, db=pg_url)
    try:
        from wsgiref.validate import validator

        def call(method, path, body=b""):
            import io
            import sys

            env = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": "", "SCRIPT_NAME": "",
                   "SERVER_NAME": "t", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
                   "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body),
                   "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": False,
                   "wsgi.run_once": False, "CONTENT_LENGTH": str(len(body)), "CONTENT_TYPE": "application/json"}
            out = {}
            it = validator(app)(env, lambda s, h, e=None: out.update(status=s, headers=dict(h)))
            try:
                return int(out["status"][:3]), json.loads(b"".join(it)), out["headers"]
            finally:
                it.close()

        body = encode({"agent": "a", "records": [data("a", 1)]})
        assert call("POST", "/api/v1/batches", body)[0] == 200
        host, port = pg_server
        name = pg_url.split("/")[3].split("?")[0]
        with psycopg.connect(host=host, port=port, user="postgres", dbname="postgres", autocommit=True) as c:
            c.execute("DROP DATABASE %s WITH (FORCE)" % name)
        status, answer, _ = call("GET", "/health")
        assert status == 503 and answer["status"] == "error"
        status, answer, headers = call("POST", "/api/v1/batches", encode({"agent": "a", "records": [data("a", 2)]}))
        assert (status, answer["where"], headers.get("Retry-After")) == (503, "storage", "5")
        assert any("database error" in m and "agent 'a'" in m for m in caplog.messages), caplog.messages
    finally:
        app.close()
