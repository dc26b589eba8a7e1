"""Rollups and series queries (agent/collector/rollup.py, series.py), on real SQLite files and a
real PostgreSQL server (one per module, a database per dialect): buckets against a brute-force
computation from the raw records for batches in any order, repeated and overlapping; late data;
the backfill of a database from before migration 5, stopped and resumed; retention per level;
GET /api/v1/series answers and errors."""
import calendar
import json
import math
import os
import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.collector import make_app, rollup
from agent.collector import store as store_mod
from agent.collector.config import ConfigError, load_config
from agent.collector.series import level_for, points, query_series
from agent.collector.store import open_store
from agent.wire import utc_timestamp
from tests.test_collector_api import Client
from tests.test_collector_store import pg_server, pg_url, rows_of  # noqa: F401 -- fixtures

T0 = 1_795_000_000.0  # 2026-11-18T11:06:40Z
_agents = iter(range(10 ** 9))


def new_agent():
    return "a%d-%d" % (os.getpid(), next(_agents))


def _pg_database(pg_server, name):  # noqa: F811
    import psycopg

    host, port = pg_server
    with psycopg.connect(host=host, port=port, user="postgres", dbname="postgres", autocommit=True) as c:
        c.execute("DROP DATABASE IF EXISTS %s" % name)
        c.execute("CREATE DATABASE %s" % name)
    return "postgresql://postgres@/%s?host=%s&port=%d" % (name, host, port)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url_factory(request, tmp_path_factory):
    """fresh() -> URL of a new empty database of the dialect."""
    counter = [0]

    def fresh():
        counter[0] += 1
        if request.param == "sqlite":
            return "sqlite:///%s" % (tmp_path_factory.mktemp("series") / "c.db")
        return _pg_database(request.getfixturevalue("pg_server"), "s%d_%d" % (os.getpid(), counter[0]))
    fresh.dialect = request.param
    return fresh


@pytest.fixture(scope="module")
def shared(url_factory):
    """{mode: store with that rollup hook} for the module's tests (each test its own agents)."""
    stores = {m: rollup.attach(open_store(url_factory()), m) for m in ("sync", "async")}
    yield stores
    for s in stores.values():
        s.close()


# --- records and the brute force ----------------------------------------------------------------

def reading(agent, seq, t, values, device="m1", status="ok", buffered=None, clock=None):
    rec = {"agent": agent, "seq": seq, "ts": utc_timestamp(t), "device": device, "unit": 1,
           "values": values, "status": status}
    if status == "partial":
        rec["errors"] = [{"kind": "exception", "message": "refused", "points": ["gone"]}]
    if status == "error":
        rec.pop("values")
        rec["error"] = {"kind": "timeout", "message": "no answer"}
    if buffered:
        rec["samples"] = [{"ts": utc_timestamp(st_), "values": v} for st_, v in buffered]
        rec["ts"], rec["values"] = rec["samples"][-1]["ts"], rec["samples"][-1]["values"]
    if clock:
        rec["clock"] = clock
    return rec


def brute(records):
    """{(level, device, point, bucket t): [n, sum, min, max, last]} from the records themselves
    (each (agent, seq) once, the first stored), written independently of rollup.py."""
    seen, out = set(), {}
    for rec in records:
        if rec["seq"] in seen:
            continue
        seen.add(rec["seq"])
        if rec["status"] == "error" or rec.get("clock") == "unsynced":
            continue
        pairs = [(s["ts"], s["values"]) for s in rec["samples"]] if "samples" in rec else [(rec["ts"], rec["values"])]
        for ts, values in pairs:
            secs = calendar.timegm(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S"))
            ms = secs * 1000 + int(ts[20:23])
            for p, v in values.items():
                if type(v) not in (int, float):
                    continue
                for level, size in (("1m", 60), ("1h", 3600)):
                    key = (level, rec["device"], p, secs // size * size)
                    a = out.setdefault(key, [0, 0.0, v, v, None, None])
                    a[0] += 1
                    a[1] += v
                    a[2], a[3] = min(a[2], v), max(a[3], v)
                    if a[5] is None or (ms, v) > (a[5], a[4]):
                        a[4], a[5] = v, ms
    return {k: a[:5] for k, a in out.items()}


def stored(store, agent):
    out = {}
    with store._read() as cur:
        for level in ("1m", "1h"):
            cur.execute(store._sql("SELECT s.device, s.point, r.t, r.n, r.sum, r.min, r.max, r.last "
                                   "FROM rollup_%s r JOIN rollup_series s ON s.id = r.sid WHERE s.agent = ?"
                                   % level), (agent,))
            for d, p, t, n, sm, lo, hi, last in cur.fetchall():
                out[(level, d, p, t)] = [n, sm, lo, hi, last]
    return out


def assert_same(got, want):
    assert sorted(got) == sorted(want)
    for k, (n, sm, lo, hi, last) in want.items():
        g = got[k]
        assert g[0] == n, k
        assert math.isclose(g[1], sm, rel_tol=1e-9, abs_tol=1e-9), (k, g, sm)
        assert (g[2], g[3], g[4]) == (lo, hi, last), (k, g)


def ingest_all(store, agent, batches, received=T0 + 5000):
    for b in batches:
        store.ingest(agent, rows_of(agent, b, received), received)


# --- properties ---------------------------------------------------------------------------------

_value = st.one_of(st.integers(-10 ** 6, 10 ** 6), st.floats(-1e6, 1e6, allow_nan=False, width=32),
                   st.booleans(), st.sampled_from(["on", "off"]))
_values = st.dictionaries(st.sampled_from(["p1", "p2", "p3"]), _value, min_size=1, max_size=3)
# offsets in ms over ~3 hours, few distinct seconds so that buckets and equal ts both happen
_offset = st.integers(0, 3 * 3600 * 1000).map(lambda ms: ms - ms % 7000 if ms % 3 else ms)


@st.composite
def histories(draw):
    n = draw(st.integers(1, 24))
    recs = []
    for seq in draw(st.permutations(range(n))):
        t = T0 + draw(_offset) / 1000.0
        kind = draw(st.sampled_from(["ok", "ok", "ok", "partial", "error", "buffered", "unsynced"]))
        if kind == "buffered":
            k = draw(st.integers(1, 4))
            offs = sorted(draw(st.lists(_offset, min_size=k, max_size=k)))
            recs.append(reading(None, seq, 0, None, device=draw(st.sampled_from(["m1", "m2"])),
                                buffered=[(T0 + o / 1000.0, draw(_values)) for o in offs]))
        else:
            recs.append(reading(None, seq, t, draw(_values), device=draw(st.sampled_from(["m1", "m2"])),
                                status="ok" if kind in ("ok", "unsynced") else kind,
                                clock="unsynced" if kind == "unsynced" else None))
    # arrival: batches of any size, in any order, some posted again, some overlapping
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=5)))
    parts = [recs[a:b] for a, b in zip([0] + cuts, cuts + [n]) if recs[a:b]]
    parts = draw(st.permutations(parts))
    extra = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(1, n)), max_size=3))
    parts = list(parts) + [recs[i:i + k] for i, k in extra]
    return recs, parts


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(h=histories())
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_buckets_equal_brute_force_for_any_arrival_order_and_repeats(shared, mode, h):
    recs, parts = h
    agent = new_agent()
    for r in recs:
        r["agent"] = agent
    shared = shared[mode]
    if mode == "async":  # the job runs now and then: between some batches, and at the end
        for i, part in enumerate(parts):
            ingest_all(shared, agent, [part])
            if i % 2:
                rollup.drain(shared)
        rollup.drain(shared)
        assert rollup.queued(shared) == (0, 0)
    else:
        ingest_all(shared, agent, parts)
    assert_same(stored(shared, agent), brute(recs))
    # the 1-minute buckets read through the API's rollup path equal the raw path's (step 60 vs
    # a raw step would differ in size, so compare 60 s from rollups with 60 s forced raw)
    since, until = utc_timestamp(T0 - 60), utc_timestamp(T0 + 4 * 3600)
    for device in ("m1", "m2"):
        for p in points(shared, agent, device):
            got = query_series(shared, agent, device, p, since, until, 60)
            assert got["level"] == "1m"
            raw = _raw_series(shared, agent, device, p, since, until, 60)
            assert [b["t"] for b in got["buckets"]] == [b["t"] for b in raw]
            for a, b in zip(got["buckets"], raw):
                assert (a["count"], a["min"], a["max"], a["last"]) == (b["count"], b["min"], b["max"], b["last"])
                assert math.isclose(a["avg"], b["avg"], rel_tol=1e-9, abs_tol=1e-9)


def _raw_series(store, agent, device, point, since, until, step):
    from agent.collector import series

    lo = int(series.epoch(since))
    lo -= lo % step
    hi = -(-int(series.epoch(until)) // step) * step
    acc = series._from_raw(store, agent, device, point, lo, hi, step)
    return [series._bucket_dict(t, acc[t], None) for t in sorted(acc)]


# --- late data, idempotency over HTTP -----------------------------------------------------------

def test_a_day_old_backlog_merges_into_its_buckets_and_a_repost_counts_once(url_factory):
    app = make_app(None, db=url_factory(), clock=lambda: T0 + 86400)
    c = Client(app)
    try:
        agent = "site1"
        minute = T0 - T0 % 60
        newer = [reading(agent, 100, minute + 50, {"v": 5.0}), reading(agent, 101, minute + 3660, {"v": 7})]
        body = json.dumps({"agent": agent, "records": newer}).encode()
        assert c.post(body).status == 200
        # the backlog: older seqs, an earlier sample of the same minute arriving a day later
        late = [reading(agent, 10, minute + 10, {"v": 9.0}), reading(agent, 11, minute + 55, {"v": 1})]
        late_body = json.dumps({"agent": agent, "records": late}).encode()
        for _ in range(3):  # posted again and again: stored once, counted once
            assert c.post(late_body).status == 200
        assert c.post(body).status == 200
        deadline = time.monotonic() + 5
        while rollup.queued(app.store) != (0, 0):  # the app's job, once the batches stop
            assert time.monotonic() < deadline, rollup.queued(app.store)
            time.sleep(0.02)
        got = query_series(app.store, agent, "m1", "v", utc_timestamp(minute), utc_timestamp(minute + 60), 60)
        assert got["buckets"] == [{"t": utc_timestamp(minute), "count": 3, "min": 1.0, "max": 9.0,
                                   "avg": 5.0, "last": 1.0}]
        hour = query_series(app.store, agent, "m1", "v", utc_timestamp(minute - 7200),
                            utc_timestamp(minute + 7200), 3600)
        assert hour["level"] == "1h" and sum(b["count"] for b in hour["buckets"]) == 4
        assert_same(stored(app.store, agent), brute(newer + late))
    finally:
        app.close()


# --- backfill -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["sync", "async"])
def test_backfill_of_an_old_database_resumes_where_it_stopped(url_factory, monkeypatch, mode):
    url = url_factory()
    monkeypatch.setattr(store_mod, "VERSION", 4)  # a database from before the rollups
    old = open_store(url)
    agents = ["old-a", "old-b"]
    rng = random.Random(7)
    recs = {a: [reading(a, 2 * s, T0 + rng.randrange(0, 7200), {"v": rng.randrange(100), "w": rng.random()},
                        device=rng.choice(["m1", "m2"])) for s in range(0, 300)] for a in agents}
    for a in agents:
        ingest_all(old, a, [recs[a][i:i + 50] for i in range(0, 300, 50)])
    old.close()
    monkeypatch.undo()

    s = rollup.attach(open_store(url), mode)  # migration 5: tables, backfill pending
    try:
        assert not rollup.backfill_done(s) and not rollup.up_to_date(s)
        assert rollup.backfill(s, chunk=70, limit=3) == 210  # stopped part-way through old-a
        # meanwhile batches arrive: new records above and below the cursor, and a re-post
        for a in agents:
            # old-a's cursor is at seq 418: 101 is behind it, 501 ahead (the backfill skips it)
            more = [reading(a, s_, T0 + 100 + s_, {"v": s_}) for s_ in (501, 1001)]
            below = [reading(a, 101, T0 + 30, {"v": 3})]
            ingest_all(s, a, [more, below, recs[a][:40]])
            recs[a] += more + below
        s.close()
        s = rollup.attach(open_store(url), mode)  # a restart: the cursor and the queue are kept
        if mode == "async":
            assert rollup.queued(s) == (4, 6)  # per agent 2 batches with new records (the re-post: none)
            rollup.drain(s)  # the job before the backfill has finished
        # what is left: old-a's 90 old seqs past 418 plus 501 and 1001, old-b's 303 (101 included)
        assert rollup.backfill(s, chunk=70) == 90 + 2 + 303
        assert rollup.backfill_done(s) and rollup.up_to_date(s)
        for a in agents:
            assert_same(stored(s, a), brute(recs[a]))
        with s._read() as cur:
            cur.execute("SELECT COUNT(*) FROM rollup_pending")
            assert cur.fetchone()[0] == 0
        # after it: the hook alone, no marks
        ingest_all(s, "old-a", [[reading("old-a", 2000, T0, {"v": 1})]])
        recs["old-a"].append(reading("old-a", 2000, T0, {"v": 1}))
        rollup.drain(s)
        assert_same(stored(s, "old-a"), brute(recs["old-a"]))
        with s._read() as cur:
            cur.execute("SELECT COUNT(*) FROM rollup_pending")
            assert cur.fetchone()[0] == 0
    finally:
        s.close()


def test_a_new_database_needs_no_backfill(shared):
    assert rollup.backfill_done(shared["sync"])
    assert rollup.backfill_step(shared["sync"]) == 0


def test_the_rollup_job_resumes_after_a_stop_and_two_jobs_count_each_batch_once(url_factory):
    """async: queued batches survive a restart; two collector processes' jobs (two stores here)
    draining the same queue at once roll each batch up exactly once."""
    import threading

    url = url_factory()
    s = rollup.attach(open_store(url), "async")
    agent = new_agent()
    recs = [reading(agent, i, T0 + 7 * i, {"v": i % 13, "w": float(i)}, device="m%d" % (i % 3))
            for i in range(1200)]
    ingest_all(s, agent, [recs[i:i + 40] for i in range(0, 1200, 40)])
    assert rollup.queued(s) == (30, 1200)
    assert rollup.drain_step(s, max_records=100) == (80, 2)  # then stopped
    s.close()
    a, b = rollup.attach(open_store(url), "async"), rollup.attach(open_store(url), "async")
    try:
        assert rollup.queued(a) == (28, 1120)
        ths = [threading.Thread(target=rollup.drain, args=(x,), kwargs={"max_records": 120}) for x in (a, b)]
        for th in ths:
            th.start()
        for th in ths:
            th.join(60)
        assert rollup.queued(a) == (0, 0)
        assert_same(stored(a, agent), brute(recs))
    finally:
        a.close()
        b.close()


def test_seq_ranges_round_trip():
    for seqs in ([], [5], [1, 2, 3, 7, 9, 10], [-9, -8, -3, 0, 1]):
        text = rollup.seq_ranges(seqs)
        assert [x for lo, hi in rollup.parse_ranges(text) for x in range(lo, hi + 1)] == seqs
    assert rollup.seq_ranges(range(100, 600)) == "100:599"


# --- retention per level ------------------------------------------------------------------------

def test_retention_per_level_deletes_old_buckets_only(url_factory):
    s = rollup.attach(open_store(url_factory()))
    try:
        agent = new_agent()
        day = 86400
        recs = [reading(agent, i, T0 - k * day, {"v": i}) for i, k in enumerate((40, 20, 5, 0))]
        ingest_all(s, agent, [recs])
        got = rollup.retention_once(s, {"1m": 10, "1h": 30}, T0, chunk=1)
        assert got == {"1m": 2, "1h": 1}
        left = stored(s, agent)
        assert sorted((lvl, t) for lvl, _d, _p, t in left) == sorted(
            [("1m", (T0 - k * day) // 60 * 60) for k in (5, 0)] + [("1h", (T0 - k * day) // 3600 * 3600)
                                                                 for k in (20, 5, 0)])
        assert len(list(s.records(agent=agent))) == 4  # raw records are retention_days' business
        assert rollup.retention_once(s, {"1m": 0, "1h": 0}, T0, chunk=100) == {}
    finally:
        s.close()


def test_retention_keys_are_parsed_and_checked(tmp_path):
    ini = tmp_path / "c.ini"
    ini.write_text("[collector]\nretention_days = 30\nretention_1m_days = 90\nretention_1h_days = 0\n")
    cfg = load_config(str(ini))
    assert (cfg.retention_days, cfg.retention_1m_days, cfg.retention_1h_days) == (30.0, 90.0, 0.0)
    ini.write_text("[collector]\nretention_1h_days = -1\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(ini))
    assert "c.ini:2: [collector] retention_1h_days: must be 0" in str(e.value)


# --- the API ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def api(url_factory):
    app = make_app(None, db=url_factory(), clock=lambda: T0 + 7200, read_token="r" * 20)
    recs = [reading("s1", i, T0 + 10 * i, {"v": i, "on": i % 2 == 0}) for i in range(400)]
    ingest_all(app.store, "s1", [recs])
    rollup.drain(app.store)
    yield Client(app)
    app.close()


AUTH = {"Authorization": "Bearer " + "r" * 20}


def test_series_json_chooses_the_coarsest_table_for_the_step(api):
    base = "agent=s1&device=m1&point=v&since=%s&until=%s" % (utc_timestamp(T0 - T0 % 3600),
                                                          utc_timestamp(T0 + 4000))
    for step, level, n in (("3600", "1h", 2), ("2h", "1h", 2), ("120", "1m", 34), ("1m", "1m", 68),
                           ("30", "raw", 134), ("90", "raw", 45)):
        r = api.get("/api/v1/series", base + "&step=" + step, headers=AUTH)
        assert r.status == 200, r.body
        doc = json.loads(r.body)
        assert (doc["level"], len(doc["buckets"])) == (level, n), (step, doc["level"], len(doc["buckets"]))
        assert sum(b["count"] for b in doc["buckets"]) == 400
        assert doc["buckets"][-1]["last"] == 399
        assert doc.get("complete") is (None if level == "raw" else True)
    r = api.get("/api/v1/series", base + "&step=1h&agg=max", headers=AUTH)
    assert json.loads(r.body)["buckets"][0] == {"t": utc_timestamp(T0 - T0 % 3600), "max": 319.0}
    assert level_for(86400) == "1h" and level_for(300) == "1m" and level_for(59) == "raw"


def test_series_csv(api):
    r = api.get("/api/v1/series", "agent=s1&device=m1&point=v&since=%d&until=%d&step=1h&format=csv"
                % (T0 - T0 % 3600, T0 + 4000), headers=AUTH)
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/csv")
    lines = r.body.decode().splitlines()
    assert lines[0] == "t,count,min,max,avg,last"
    assert lines[1] == "%s,320,0.0,319.0,159.5,319.0" % utc_timestamp(T0 - T0 % 3600)
    assert len(lines) == 3


@pytest.mark.parametrize("qs, where", [
    ("device=m1&point=v", "agent"),
    ("agent=s1&point=v", "device"),
    ("agent=s1&device=m1", "point"),
    ("agent=s1&device=m1&point=v&step=0", "step"),
    ("agent=s1&device=m1&point=v&step=1.5", "step"),
    ("agent=s1&device=m1&point=v&step=soon", "step"),
    ("agent=s1&device=m1&point=v&since=2026-11-18&until=2027-11-18&step=1", "step"),
    ("agent=s1&device=m1&point=v&agg=median", "agg"),
    ("agent=s1&device=m1&point=v&format=xml", "format"),
    ("agent=s1&device=m1&point=v&since=yesterday", "since"),
    ("agent=s1&device=m1&point=v&since=2026-11-19&until=2026-11-18", "since"),
    ("agent=s1&device=m1&point=v&colour=red", "colour"),
])
def test_series_errors_are_4xx_json_naming_the_parameter(api, qs, where):
    r = api.get("/api/v1/series", qs, headers=AUTH)
    assert r.status == 400, (qs, r.body)
    assert r.headers["Content-Type"] == "application/json"
    doc = json.loads(r.body)
    assert doc["where"] == where and doc["error"]


def test_series_needs_the_read_token_and_unknown_points_are_empty(api):
    assert api.get("/api/v1/series", "agent=s1&device=m1&point=v").status == 401
    r = api.get("/api/v1/series", "agent=s1&device=m1&point=on&step=60", headers=AUTH)  # a bool: not rolled up
    assert r.status == 200 and json.loads(r.body)["buckets"] == []
    r = api.get("/api/v1/series", "agent=nobody&device=m1&point=v&step=60", headers=AUTH)
    assert r.status == 200 and json.loads(r.body)["buckets"] == []


def _race_on_one_seq(url, a, b, agent, recs):
    """Store A (another collector process) stores recs[1] and holds its transaction open while
    store B's batch of all recs checks for existing seqs, inserts and waits on A's row lock;
    then A commits. Returns B's answer."""
    import threading

    import psycopg

    rows_a = rows_of(agent, recs[1:2])
    rows_b = rows_of(agent, recs)
    done = []
    with a._write() as cur:
        a._ingest_tx(cur, agent, rows_a, T0 + 5000)
        th = threading.Thread(target=lambda: done.append(b.ingest(agent, rows_b, T0 + 5000)))
        th.start()
        with psycopg.connect(url, autocommit=True) as watch:
            deadline = time.monotonic() + 10
            while not watch.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                    "AND application_name = 'modbus-collector'").fetchone()[0]:
                assert time.monotonic() < deadline, "B never waited on A's row"
                time.sleep(0.01)
    th.join(10)
    return done


@pytest.mark.postgres
def test_a_record_another_process_stores_first_counts_once_in_the_device_summary(pg_url):  # noqa: F811
    """PostgreSQL, two collector processes, overlapping batches of one agent: the device's
    record counter counted the record the other process stored first a second time (fails on
    main: 4 records for 3)."""
    a, b = open_store(pg_url), open_store(pg_url)
    try:
        recs = [reading("race", i, T0 + i, {"v": 10 * i}) for i in (1, 2, 3)]
        assert _race_on_one_seq(pg_url, a, b, "race", recs) == [(2, 1, 3)]
        (dev,) = [d for d in a.devices() if d["agent"] == "race"]
        assert dev["records"] == 3
    finally:
        a.close()
        b.close()


@pytest.mark.postgres
def test_a_record_another_process_stores_first_is_not_rolled_up_twice(url_factory):
    """The same race: the rollups count only what each batch stored (A's hook counted seq 2)."""
    if url_factory.dialect != "postgres":
        pytest.skip("one writer in SQLite: no concurrent insert to race with")
    url = url_factory()
    a, b = rollup.attach(open_store(url)), rollup.attach(open_store(url))
    try:
        agent = new_agent()
        recs = [reading(agent, i, T0 + i, {"v": 10 * i}) for i in (1, 2, 3)]
        assert _race_on_one_seq(url, a, b, agent, recs) == [(2, 1, 3)]
        assert_same(stored(a, agent), brute(recs))
    finally:
        a.close()
        b.close()


def test_the_documented_grafana_queries_run_and_agree_with_the_api(url_factory):
    """series.GRAFANA_* (README, schema.py) with Grafana's macros expanded as Grafana does."""
    from agent.collector import series

    s = rollup.attach(open_store(url_factory()))
    try:
        hour = int(T0 - T0 % 3600)
        recs = [reading("site7", i, hour + 30 * i, {"voltage_l1": 230 + i % 5}, device="meter1")
                for i in range(240)]  # 2 hours
        ingest_all(s, "site7", [recs])
        frm, to = hour * 1000, (hour + 7200) * 1000
        if url_factory.dialect == "sqlite":
            sql = series.GRAFANA_SQLITE.replace("$__from", str(frm)).replace("$__to", str(to))
            step = 3600
        else:
            sql = (series.GRAFANA_POSTGRES.replace("$__interval_ms", "600000")
                   .replace("$__unixEpochFilter(r.t)", "r.t >= %d AND r.t <= %d" % (frm // 1000, to // 1000)))
            step = 600
        with s._read() as cur:
            cur.execute(sql)
            got = [(int(t), float(avg), mn, mx) for t, avg, mn, mx in cur.fetchall()]
        want = query_series(s, "site7", "meter1", "voltage_l1", utc_timestamp(hour), utc_timestamp(hour + 7200), step)
        assert len(got) == 7200 // step
        assert got == [(int(series.epoch(b["t"])), b["avg"], b["min"], b["max"]) for b in want["buckets"]]
    finally:
        s.close()


def test_with_rollups_off_series_come_from_the_raw_records(tmp_path):
    app = make_app(None, db="sqlite:///%s" % (tmp_path / "off.db"), rollups="off")
    try:
        ingest_all(app.store, "s1", [[reading("s1", i, T0 + 10 * i, {"v": i}) for i in range(30)]])
        assert stored(app.store, "s1") == {} and rollup.queued(app.store) == (0, 0)
        got = query_series(app.store, "s1", "m1", "v", utc_timestamp(T0 - 3600), utc_timestamp(T0 + 3600), 3600)
        assert got["level"] == "raw" and [b["count"] for b in got["buckets"]] == [30]
    finally:
        app.close()
    with pytest.raises(ConfigError) as e:
        load_config(None, rollups="later")
    assert "rollups: expected async, sync or off" in str(e.value)


def test_a_raw_step_counts_the_samples_of_a_buffer_longer_than_an_hour(shared):
    """buffer = 120 at a 60 s interval: one record of two hours, its ts the newest sample's. A
    raw-step query over its first half hour must see its samples (as the 1-minute rollup does),
    and the records after it add nothing before until."""
    store, agent = shared["sync"], new_agent()
    t0 = T0 - T0 % 3600
    long_buf = reading(agent, 1, 0, {}, buffered=[(t0 + 60 * i, {"v": float(i)}) for i in range(120)])
    after = [reading(agent, 2 + i, t0 + 7200 + 60 * i, {"v": 1000.0}) for i in range(3)]
    ingest_all(store, agent, [[long_buf] + after])
    since, until = utc_timestamp(t0), utc_timestamp(t0 + 1800)
    by_minute = query_series(store, agent, "m1", "v", since, until, 60)
    assert by_minute["level"] == "1m" and len(by_minute["buckets"]) == 30
    raw = query_series(store, agent, "m1", "v", since, until, 30)
    assert raw["level"] == "raw"
    assert [(b["count"], b["min"]) for b in raw["buckets"]] == [(1, float(i)) for i in range(30)]
    assert raw["buckets"][0]["t"] == since


def test_a_bucket_whose_sum_overflows_answers_valid_json_csv_and_influx(url_factory):
    """Two float64 readings of 1.7e308 in one minute: the bucket's sum is inf. The answer was a
    500 (json refuses inf) and CSV said avg=inf; the average is unknown: null / empty / left out."""
    app = make_app(None, db=url_factory(), clock=lambda: T0 + 60, rollups="sync")
    try:
        c = Client(app)
        recs = [reading("big", i, T0 - 10 + i, {"v": v}) for i, v in enumerate((1.7e308, 1.7e308, -1.7e308))]
        assert c.post(json.dumps({"agent": "big", "records": recs}).encode()).status == 200
        qs = "agent=big&device=m1&point=v&step=60"
        r = c.get("/api/v1/series", qs)
        assert r.status == 200, r.body

        def refuse(name):
            raise AssertionError("not JSON: %s" % name)

        (b,) = json.loads(r.body, parse_constant=refuse)["buckets"]
        assert (b["count"], b["min"], b["max"], b["avg"], b["last"]) == (3, -1.7e308, 1.7e308, None, -1.7e308)
        lines = c.get("/api/v1/series", qs + "&format=csv").body.decode().splitlines()
        assert lines[1].split(",")[1:] == ["3", "-1.7e+308", "1.7e+308", "", "-1.7e+308"]
        text = c.get("/api/v1/series", qs + "&format=influx").body.decode()
        assert "avg=" not in text and "inf" not in text and "count=3i" in text
    finally:
        app.close()
