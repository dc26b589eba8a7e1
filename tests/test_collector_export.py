"""The collector's read side: exports paged with short transactions (a stalled reader pins
nothing), query parameters checked, CSV cells that cannot run as formulas, exact numbers through
every read path, "partial" readings on the devices API and the status page.

Real peers: a real `modbus-collector` process on 127.0.0.1 (ingest load and a raw-socket reader
that stalls), real SQLite files, a real PostgreSQL server (tests/test_collector_store.py)."""
import csv
import io
import itertools
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import requests

from agent.collector import make_app
from agent.collector.store import open_store
from agent.record import encode, utc_timestamp
from tests.test_collector_api import Client  # in-process, through wsgiref.validate
from tests.test_collector_store import db_url, pg_server, pg_url, rows_of  # noqa: F401 -- fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T0 = 1_795_000_000.0  # 2026-11-18
BIG = 18000000000000000001  # a uint64 beyond 2^53 (and beyond int64)


def data(agent, seq, device="meter1", t=None, **values):
    return {"agent": agent, "seq": seq, "ts": utc_timestamp(T0 + seq if t is None else t), "device": device,
            "unit": 1, "values": values or {"v": float(seq)}, "status": "ok"}


def body(agent, records):
    return encode({"agent": agent, "records": records}).rstrip(b"\n")


def put(store, agent, records, received=T0 + 5000):
    """Store records directly, as the app does after validation (received: server time)."""
    return store.ingest(agent, rows_of(agent, records, received), received)


def keys(rows):
    return [(r[2], r[0], r[1]) for r in rows]  # ROW_COLUMNS: the export's order key (ts, agent, seq)


# --- a real collector process -------------------------------------------------------------------

class Collector:
    """`python -m agent.collector.cli` on 127.0.0.1:port, stopped with SIGTERM."""

    def __init__(self, tmp_path, port, db):
        self.url = "http://127.0.0.1:%d" % port
        self.port = port
        self.log = open(tmp_path / "collector.log", "w")  # noqa: SIM115 -- open while it runs
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent.collector.cli", "--listen", "127.0.0.1:%d" % port, "--db", db],
            cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT), stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert self.proc.poll() is None and time.monotonic() < deadline, "collector did not start"
            time.sleep(0.1)

    def post(self, agent, records, session=requests):
        r = session.post(self.url + "/api/v1/batches", data=body(agent, records), timeout=10,
                         headers={"Content-Type": "application/json"})
        assert r.status_code == 200, r.text
        return r.json()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


@pytest.fixture
def collector(tmp_path, free_port):
    started = []

    def start(db):
        c = Collector(tmp_path, free_port, db)
        started.append(c)
        return c
    yield start
    for c in started:
        c.stop()


def _http_body(raw):
    """A close-delimited HTTP/1.1 response -> (status, body), chunked transfer coding undone."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" not in head.lower():
        return status, rest
    out = []
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        n = int(size_line.split(b";")[0], 16)
        if n == 0:
            return status, b"".join(out)
        out.append(rest[:n])
        rest = rest[n + 2:]


# --- 1. a stalled reader pins nothing --------------------------------------------------------

def _filler(i):
    # ~1.2 KB a record: the export (~25 MB) is far more than the socket buffers on both ends hold
    return {"p%02d" % k: 1000.0 * i + k + 0.25 for k in range(40)}


def test_a_stalled_export_under_ingest_keeps_the_wal_small_and_the_export_complete(tmp_path, collector):
    """A client starts a full export, then reads it a few bytes at a time through a tiny receive
    buffer while agents post: the WAL stays bounded (the export holds no read transaction between
    pages, and journal_size_limit cuts the file back), and read to the end the export holds every
    record stored before it began, once each, in order."""
    db = tmp_path / "x.db"
    store = open_store("sqlite:///%s" % db)
    n = 20000
    for start in range(0, n, 2000):
        recs = [data("site", i, device="m%d" % (i % 3), **_filler(i)) for i in range(start, start + 2000)]
        put(store, "site", recs, T0)
    expected = keys(store.records())
    store.close()
    c = collector("sqlite:///%s" % db)

    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    reader.connect(("127.0.0.1", c.port))
    reader.sendall(b"GET /api/v1/records?format=jsonl HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    raw = [reader.recv(4096)]
    assert raw[0].startswith(b"HTTP/1.1 200")

    stop = threading.Event()
    posted = [0]

    def load():  # another agent posting as fast as it can, 200 records a batch
        seq = 0
        with requests.Session() as s:
            while not stop.is_set():
                c.post("load", [data("load", seq + i, device="d", t=T0 + 30000 + seq + i, **_filler(i))
                                for i in range(200)], session=s)
                seq += 200
                posted[0] = seq
    t = threading.Thread(target=load, daemon=True)
    t.start()
    wal = str(db) + "-wal"
    sizes = []
    try:
        deadline = time.monotonic() + 7
        while time.monotonic() < deadline:  # the stalled reader: 64 bytes every 0.1 s
            raw.append(reader.recv(64))
            sizes.append(os.path.getsize(wal) if os.path.exists(wal) else 0)
            time.sleep(0.1)
    finally:
        stop.set()
        t.join(15)
    assert posted[0] >= 2000, "the load did not get going: %d records posted" % posted[0]
    reader.settimeout(30)
    while True:  # now read the rest as fast as it comes
        chunk = reader.recv(1 << 20)
        if not chunk:
            break
        raw.append(chunk)
    reader.close()
    status, text = _http_body(b"".join(raw))
    assert status == 200
    got = [json.loads(line) for line in text.splitlines()]
    # While a read transaction stays open the WAL only grows (on today's main: hundreds of MB in
    # these 7 s); here it is reset after checkpoints and cut back to 16 MB (journal_size_limit).
    assert max(sizes) < 48 << 20, "WAL grew to %.1f MB: %s" % (max(sizes) / 1e6, sizes[::10])
    # every record stored before the export began, once, in (ts, agent, seq) order; none of those
    # that arrived while it ran (the export is bounded to what was received when it started)
    assert [(r["ts"], r["agent"], r["seq"]) for r in got] == expected
    assert got[123]["values"] == _filler(123)
    conn = sqlite3.connect(str(db))
    assert conn.execute("SELECT count(*) FROM records WHERE agent = 'load'").fetchone()[0] == posted[0]
    conn.close()


@pytest.fixture
def store(db_url):  # noqa: F811 -- db_url: SQLite file, or a fresh PostgreSQL database
    s = open_store(db_url)
    yield s
    s.close()


def _fill(store):
    """Three agents whose records share timestamps (ties on ts, broken by agent then seq); c's
    were received earlier than the others' (retention takes them first)."""
    for agent in ("b", "a", "c"):
        recs = [data(agent, seq, device="m%d" % (seq % 2), t=T0 + seq // 4) for seq in range(40)]
        put(store, agent, recs, T0 + (50 if agent == "c" else 100))


def test_pages_give_the_same_rows_as_one_query_whatever_the_page_size(store):
    _fill(store)
    everything = keys(store.records(page=10 ** 6))
    assert everything == sorted(everything) and len(everything) == len(set(everything)) == 120
    for page in (1, 3, 7, 40, 119, 120, 121):
        assert keys(store.records(page=page)) == everything, page
        assert keys(store.records(page=page, limit=50)) == everything[:50]
        assert keys(store.records(page=page, agent="a")) == [k for k in everything if k[1] == "a"]
        assert keys(store.records(page=page, agent="c", device="m1", since=utc_timestamp(T0 + 2))) == [
            k for k in everything if k[1] == "c" and k[2] % 2 == 1 and k[0] >= utc_timestamp(T0 + 2)]
    assert list(store.records(page=7, limit=0)) == []


@pytest.mark.parametrize("filters", [{}, {"agent": "a"}, {"device": "m1"}, {"agent": "a", "device": "m1"},
                                     {"agent": "a", "since": "2026-11-18T11:06:41.000Z"},
                                     {"since": "2026-11-18T11:06:41.000Z", "until": "2026-11-18T11:07:00.000Z"},
                                     {"kind": "data", "status": "ok"}])
def test_every_sqlite_page_query_starts_at_the_key_in_an_index_without_a_sort(tmp_path, filters):
    """Each page costs its own rows, not the export so far: the page after a key is an index
    range starting at that key (a `since` kept in the later pages' queries made SQLite start each
    range at `since`: quadratic), and never a sort of everything matching."""
    import contextlib

    s = open_store("sqlite:///%s" % (tmp_path / "p.db"))
    conn = s._conn()
    plans = []

    @contextlib.contextmanager
    def explaining_pager():
        def fetch(sql, args):
            plans.append(" ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, args)))
            return [("a", 1, "2026-11-18T11:06:45.000Z")] * args[-1]  # a full page: ask for the next
        yield fetch
    s._pager = explaining_pager
    try:
        list(itertools.islice(s.records(page=2, received_before=T0, **filters), 3))
    finally:
        s.close()
    first, following = plans
    assert "TEMP B-TREE" not in first + following, plans
    assert "(ts,agent,seq)>(?,?,?)" in following or "device=? AND ts>?" in following, plans


def test_rows_inserted_and_deleted_between_pages_do_not_break_the_export(store):
    """Each row that exists for the whole export comes once and in order; rows deleted (retention)
    before the export reaches them are not made up; new rows after the cursor may come, never twice."""
    _fill(store)
    before = keys(store.records())
    export = store.records(page=7)
    got = [next(export) for _ in range(30)]
    # ingest meanwhile: ts before the cursor, ties with it, and after it
    put(store, "a", [data("a", 100, t=T0), data("a", 101, t=T0 + 3), data("a", 102, t=T0 + 9)], T0 + 200)
    # retention meanwhile: agent c's records (received earliest) go, most of them ahead of the cursor
    assert store.delete_older(T0 + 75, 1000) == 40
    put(store, "c", [data("c", 7, t=T0 + 1)], T0 + 300)  # one back, behind the cursor
    got += list(export)
    got = keys(got)
    assert got == sorted(got) and len(got) == len(set(got))
    now = set(keys(store.records()))
    for k in before:  # present throughout (never deleted): in the export
        if k in now:
            assert k in got, k
    assert set(got) <= set(before) | now  # nothing made up
    assert (utc_timestamp(T0 + 9), "a", 102) in got  # inserted ahead of the cursor
    assert (utc_timestamp(T0 + 9), "c", 39) not in got  # deleted before the export got there


def test_received_before_bounds_the_export_to_what_was_stored(store):
    put(store, "a", [data("a", 1), data("a", 2)], T0 + 10)
    put(store, "a", [data("a", 3)], T0 + 20)
    assert [r[1] for r in store.records(received_before=T0 + 10)] == [1, 2]
    assert [r[1] for r in store.records(received_before=T0 + 20, page=1)] == [1, 2, 3]


def test_a_suspended_sqlite_export_holds_no_read_transaction(tmp_path):
    """Mid-export (a client that stopped reading), a checkpoint can copy the whole WAL back and
    truncate it: nothing holds an old snapshot. On today's main the export's open statement keeps
    its snapshot and the checkpoint reports itself busy."""
    s = open_store("sqlite:///%s" % (tmp_path / "s.db"))
    try:
        put(s, "a", [data("a", i) for i in range(3000)], T0)
        export = s.records()
        assert next(export)[1] == 0
        put(s, "a", [data("a", 5000 + i) for i in range(500)], T0 + 1)  # WAL grows
        other = sqlite3.connect(str(tmp_path / "s.db"))
        busy, log_frames, done = other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        other.close()
        assert busy == 0 and log_frames == done == 0  # truncated: nobody needed the old frames
        assert os.path.getsize(str(tmp_path / "s.db") + "-wal") == 0
        assert [r[1] for r in export] == list(range(1, 3000)) + list(range(5000, 5500))
    finally:
        s.close()


def test_the_wal_is_cut_back_once_a_long_reader_is_gone(tmp_path):
    """Any long reader (a backup, the sqlite3 shell, an old collector's export) lets the WAL grow
    under ingest; once it is gone the WAL is reset and cut back to journal_size_limit (16 MB). On
    today's main the file kept its largest size until the collector stopped."""
    path = str(tmp_path / "w.db")
    s = open_store("sqlite:///%s" % path)
    try:
        put(s, "a", [data("a", 0)], T0)
        reader = sqlite3.connect(path, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM records").fetchone()  # holds its snapshot
        b = 0
        while os.path.getsize(path + "-wal") < 24 << 20:
            assert b < 100, "the WAL does not grow: %d bytes" % os.path.getsize(path + "-wal")
            put(s, "a", [data("a", 1 + b * 1000 + i, **_filler(i)) for i in range(1000)], T0)
            b += 1
        grown = os.path.getsize(path + "-wal")
        reader.execute("COMMIT")
        reader.close()
        for b in range(3):  # a checkpoint after a commit, a reset on the next write, cut back
            put(s, "a", [data("a", 100000 + b)], T0)
        assert os.path.getsize(path + "-wal") <= 16 << 20, (grown, os.path.getsize(path + "-wal"))
    finally:
        s.close()


@pytest.mark.postgres
def test_a_suspended_postgres_export_holds_no_transaction(pg_url):  # noqa: F811
    """Between pages the export's connection is idle, not "idle in transaction": no snapshot that
    holds back vacuum. On today's main a server-side cursor keeps one for the whole export."""
    import psycopg

    s = open_store(pg_url)
    try:
        put(s, "a", [data("a", i) for i in range(3000)], T0)
        export = s.records()
        assert next(export)[1] == 0
        with psycopg.connect(pg_url, autocommit=True) as c:
            states = c.execute("SELECT state, backend_xmin IS NOT NULL FROM pg_stat_activity "
                               "WHERE application_name = 'modbus-collector' AND pid <> pg_backend_pid()"
                               ).fetchall()
        assert states and all(st == "idle" and not xmin for st, xmin in states), states
        assert [r[1] for r in export] == list(range(1, 3000))
    finally:
        s.close()


# --- 2. query parameters: 400 naming the parameter, never a 500 --------------------------------

@pytest.fixture
def app_client(db_url):  # noqa: F811
    app = make_app(None, db=db_url)
    yield Client(app)
    app.close()


@pytest.mark.parametrize("qs, where", [
    ("limit=99999999999999999999999", "limit"),  # was OverflowError: a 500 (after the 200 went out)
    ("limit=9223372036854775808", "limit"),  # 2^63: beyond a 64-bit LIMIT
    ("limit=%C2%B2", "limit"),  # '²': isdigit() but not int(): was a 500
    ("limit=%D9%A1", "limit"),  # Arabic-Indic one: int() reads it, the API says digits
    ("limit=1e3", "limit"), ("limit=+5", "limit"), ("limit= 5", "limit"),
    ("since=1e20", "since"), ("until=1e15", "until"),  # beyond year 9999: ts text order breaks
    ("since=nan", "since"), ("until=-inf", "until"),
    ("agent=%00", "agent"),  # PostgreSQL cannot take NUL in text: was a 503 "database unavailable"
    ("device=x%00y", "device"), ("device=" + "d" * 129, "device"),
    ("status=fine", "status"),
])
def test_bad_query_parameters_are_400_with_where(app_client, qs, where):
    r = app_client.get("/api/v1/records", qs)
    assert (r.status, r.json()["where"]) == (400, where), r.body[:200]


def test_good_query_parameters_at_their_limits(app_client):
    app_client.post(body("a", [data("a", i) for i in range(3)]))
    for qs, seqs in [("limit=9223372036854775807", [0, 1, 2]), ("limit=0", []), ("limit=0002", [0, 1]),
                     ("since=-5", [0, 1, 2]), ("until=253402300799", [0, 1, 2]), ("status=ok", [0, 1, 2]),
                     ("status=partial", []), ("agent=" + "a" * 128, [])]:
        r = app_client.get("/api/v1/records", qs)
        assert r.status == 200 and [x["seq"] for x in r.json()] == seqs, qs


# --- 3. CSV cells that a spreadsheet would run --------------------------------------------------

def test_csv_export_neutralises_formula_cells_but_not_numbers(app_client):
    evil = "=cmd|' /C calc'!A0"
    recs = [data("=agent", 0, device=evil, v=-5, s="=1+1"), data("=agent", 1, device="-5", v=-5.5),
            data("=agent", 2, device="@SUM(A1)", v=1), data("=agent", 3, device="+1-2", v=-1e-3),
            data("=agent", 4, device="\tx", v=0), data("=agent", 5, device="\r=x", v=0),
            data("=agent", 6, device="-x", v=0), data("=agent", 7, device="meter 1", v=0)]
    assert app_client.post(body("=agent", recs)).json()["stored"] == 8
    text = app_client.get("/api/v1/records", "format=csv").body.decode()
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0][:2] == ["agent", "seq"]
    cells = {int(r[1]): r for r in rows[1:]}
    assert [cells[i][4] for i in range(8)] == ["'" + evil, "-5", "'@SUM(A1)", "'+1-2", "'\tx", "'\r=x", "'-x",
                                               "meter 1"]
    assert {cells[i][0] for i in range(8)} == {"'=agent"}
    # numbers are numbers (seq, unit, received), and the values inside the payload are exact
    assert [json.loads(cells[i][7])["values"]["v"] for i in range(4)] == [-5, -5.5, 1, -1e-3]
    assert json.loads(cells[0][7])["values"]["s"] == "=1+1" and json.loads(cells[0][7])["device"] == evil
    assert cells[0][5] == "1" and float(cells[0][9]) > 0
    # the JSON exports are data, not spreadsheets: unchanged
    assert [r["device"] for r in app_client.get("/api/v1/records").json()][:1] == [evil]


# --- 4. exact numbers through every read path ---------------------------------------------------

EXACT = {"big": BIG, "int64_min": -(1 << 63), "below_int64": -(1 << 63) - 1, "f32": 16777215.0,
         "f32b": 123456.7890625, "tenth": 230.1, "tiny": 5e-324, "neg": -5}


def _exact_in(text, where):
    """The numbers' own digits are in the text (not a float's rounding of them)."""
    for needle in ("18000000000000000001", "-9223372036854775808", "-9223372036854775809", "123456.7890625"):
        assert needle in text, (where, needle)


def test_a_uint64_beyond_2_53_comes_back_exactly_from_every_read(tmp_path, collector, db_url):  # noqa: F811
    """Posted over HTTP to a real collector process (SQLite, and PostgreSQL's jsonb), then read as
    JSON, JSONL, CSV and the devices API: the same numbers, digit for digit."""
    c = collector(db_url if db_url.startswith("postgresql") else "sqlite:///%s" % (tmp_path / "x.db"))
    fast = data("a", 1, **EXACT)  # the agent's own compact form (the collector's fast path)
    general = dict(reversed(list(data("a", 2, **EXACT).items())))  # keys reordered: the general path
    assert c.post("a", [fast, general])["stored"] == 2
    js = requests.get(c.url + "/api/v1/records", timeout=10)
    _exact_in(js.text, "json")
    assert [r["values"] for r in js.json()] == [EXACT, EXACT]
    jl = requests.get(c.url + "/api/v1/records?format=jsonl", timeout=10)
    _exact_in(jl.text, "jsonl")
    assert [json.loads(x)["values"] for x in jl.text.splitlines()] == [EXACT, EXACT]
    cv = requests.get(c.url + "/api/v1/records?format=csv", timeout=10)
    rows = list(csv.reader(io.StringIO(cv.text)))
    _exact_in(rows[1][7], "csv")
    assert [json.loads(r[7])["values"] for r in rows[1:]] == [EXACT, EXACT]
    dev = requests.get(c.url + "/api/v1/devices", timeout=10)
    _exact_in(dev.text, "devices")
    assert dev.json()["devices"][0]["values"] == EXACT
    page = requests.get(c.url + "/", timeout=10).text
    assert "big=18000000000000000001" in page and "f32b=123456.7890625" in page and "tenth=230.1" in page
    # and in SQL, the way schema.py's Grafana queries read it: exact with the operators it names
    # (SQLite's json_extract and ->> give a REAL beyond 64 bits; PostgreSQL's ::float likewise)
    if db_url.startswith("postgresql"):
        import decimal

        import psycopg

        with psycopg.connect(db_url) as conn:
            got = conn.execute("SELECT (payload->'values'->>'big')::numeric FROM records").fetchall()
        assert got == [(decimal.Decimal(BIG),)] * 2
    else:
        conn = sqlite3.connect(str(tmp_path / "x.db"))
        got = conn.execute("SELECT payload -> '$.values.big' FROM records").fetchall()
        conn.close()
        assert got == [(str(BIG),)] * 2


# --- 5. "partial" readings on the read side (CONTRACTS §1) --------------------------------------

PARTIAL_ERRORS = [{"kind": "exception", "code": 2, "name": "ILLEGAL DATA ADDRESS", "function": 3, "address": 500,
                   "count": 1, "points": ["bad"],
                   "message": "unit 1 fc 03 holding 500+1: exception code 2 ILLEGAL DATA ADDRESS"}]


def raw_row(agent, seq, t, device, status="ok", values=None, received=None, **extra):
    """A stored row built by hand (not through validate, which is the ingest's own business):
    the record JSON in the agent's key order, CONTRACTS §1."""
    rec = {"agent": agent, "seq": seq, "ts": t if isinstance(t, str) else utc_timestamp(t), "device": device,
           "unit": 1}
    if values is not None:
        rec["values"] = values
    rec["status"] = status
    rec.update(extra)
    return (agent, seq, rec["ts"], "data", device, 1, status, json.dumps(rec, separators=(",", ":")), None,
            received or time.time())


def test_partial_readings_on_the_devices_api_the_page_and_the_records_filter(app_client):
    store = app_client.app.store
    now = time.time()
    rows = [raw_row("a", 1, now - 30, "meter1", values={"good": 4, "bad": 9}, received=now - 30),
            raw_row("a", 2, now - 20, "meter1", "partial", {"good": 5}, now - 20, errors=PARTIAL_ERRORS),
            raw_row("a", 3, now - 20, "plc", values={"x": 1}, received=now - 20),
            raw_row("a", 4, now - 10, "plc", "error", received=now - 10,
                    error={"kind": "timeout", "message": "no answer in 1.0 s"})]
    store.ingest("a", rows, now)
    devs = {d["device"]: d for d in app_client.get("/api/v1/devices").json()["devices"]}
    m = devs["meter1"]
    assert m["last_status"] == "partial" and m["values"] == {"good": 5}  # values of the partial record
    assert m["values_ts"] == m["last_ts"] == utc_timestamp(now - 20)
    assert m["last_error"]["kind"] == "partial" and m["last_error"]["points"] == ["bad"]
    assert m["last_error"]["errors"] == PARTIAL_ERRORS and "ILLEGAL DATA ADDRESS" in m["last_error"]["message"]
    assert (m["records"], m["errors"]) == (2, 1)
    assert devs["plc"]["last_status"] == "error" and devs["plc"]["values"] == {"x": 1}
    html = app_client.get("/").body.decode()
    row = html[html.index('data-device="meter1"'):]
    row = row[:row.index("</tr>")]
    assert '<td class="partial">partial' in row and "refused: bad (exception 2 ILLEGAL DATA ADDRESS)" in row
    assert "good=5" in row and ".partial{" in html
    plc = html[html.index('data-device="plc"'):]
    assert '<td class="err">error' in plc[:plc.index("</tr>")]
    assert [r["seq"] for r in app_client.get("/api/v1/records", "status=partial").json()] == [2]
    assert [r["seq"] for r in app_client.get("/api/v1/records", "status=ok").json()] == [1, 3]
    # the sparkline's series takes the partial readings' values too
    assert [ts for ts, _ in store.series("a", "meter1", utc_timestamp(now - 60))] == [
        utc_timestamp(now - 30), utc_timestamp(now - 20)]
    # a newer ok reading ends the partial state
    store.ingest("a", [raw_row("a", 5, now - 5, "meter1", values={"good": 6, "bad": 1}, received=now)], now)
    (m,) = [d for d in app_client.get("/api/v1/devices").json()["devices"] if d["device"] == "meter1"]
    assert m["last_status"] == "ok" and m["values"] == {"good": 6, "bad": 1}


# --- 6. a reading stamped in 2099 does not freeze a device's last values ------------------------

def test_a_stored_far_future_reading_does_not_freeze_the_last_values(app_client):
    """Stored before far-future stamps were refused at ingest (or by a collector without that
    check): the next batch takes over as "last", since the stored stamp is beyond its receive time
    plus the store's future skew. Within the skew, the newest ts still wins (a late older batch
    does not replace newer values)."""
    store = app_client.app.store
    now = time.time()
    store.ingest("a", [raw_row("a", 1, "2099-01-01T00:00:00.000Z", "meter1", values={"v": 1}, received=now - 60)],
                 now - 60)
    store.ingest("a", [raw_row("a", 2, now - 10, "meter1", values={"v": 2}, received=now - 10)], now - 10)
    (d,) = app_client.get("/api/v1/devices").json()["devices"]
    assert d["values"] == {"v": 2} and d["last_ts"] == d["values_ts"] == utc_timestamp(now - 10)
    store.ingest("a", [raw_row("a", 3, now - 100, "meter1", values={"v": 3}, received=now)], now)  # late, older
    (d,) = app_client.get("/api/v1/devices").json()["devices"]
    assert d["values"] == {"v": 2}
