#!/usr/bin/env python3
"""History benchmark: series of one point from the rollups (agent/collector/series.py) side by
side with the same answer computed from the raw records (json_extract / ->>, the Grafana query
the schema documented before rollups), on SQLite and PostgreSQL; ingest with rollups on vs off;
bytes on disk per record and per rollup row.

    .venv/bin/python tools/bench/history.py [--days 30] [--devices 20] [--points 10] [--interval 10]
                                            [--dialects sqlite,postgres] [--rounds 50]

The database: --days of --devices devices x --points points every --interval seconds (30 days:
5.2 million records), written straight into `records` (multi-row INSERTs / COPY), then rolled
up by the collector's own backfill (rollup.backfill, whose rate is shown: what an upgrade of
such a database costs). Queries: a --days series at a 1-hour step and a 1-day series at a
1-minute step, each timed --rounds times from the rollups (query_series, the API's path, answer
as Python objects) and fewer times from raw (count/min/max/avg by bucket in SQL; checked equal
to the rollups' answer): p50/p99 and the ratio. Ingest: batches of 500 records (5 devices of an
agent, 100 polls each) parsed, validated and stored as the app does after the socket, into a
fresh database per mode: rollups off, sync (in the batch's transaction) and async (queued; the
job, which gives way to a burst of batches in the app, timed after it: the rate with it is
the sustained one), interleaved rounds, best of each.

PostgreSQL: a throw-away server like the tests' (Debian's postgresql package, fsync=off, which
flatters both ingest columns alike, not the queries). SQLite: a file in a temp dir, WAL,
synchronous=FULL as the collector runs it. The machine may be shared: figures are under load.
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from agent.collector import rollup  # noqa: E402
from agent.collector.jsonbody import parse_batch  # noqa: E402
from agent.collector.series import query_series  # noqa: E402
from agent.collector.sqlite import insert_sql  # noqa: E402
from agent.collector.store import ROW_COLUMNS, open_store  # noqa: E402
from agent.collector.validate import batch_rows  # noqa: E402
from agent.wire import utc_timestamp  # noqa: E402

T_END = 1_795_000_000.0 - 1_795_000_000.0 % 86400  # 2026-11-18T00:00Z: the history ends here
POINTS = ["voltage_l1", "voltage_l2", "voltage_l3", "current_l1", "current_l2", "current_l3",
          "power_kw", "energy_kwh", "frequency", "pf", "temp_c", "humidity"]


def start_postgres():
    """(url, stop) of a throw-away PostgreSQL server, started as the tests start theirs."""
    from tests.test_collector_store import pg_server

    gen = pg_server.__wrapped__()
    host, port = next(gen)
    import psycopg

    with psycopg.connect(host=host, port=port, user="postgres", dbname="postgres", autocommit=True) as c:
        c.execute("CREATE DATABASE history")
        for mode in ("off", "sync", "async"):
            c.execute("CREATE DATABASE ingest_%s" % mode)

    def url(name):
        return "postgresql://postgres@/%s?host=%s&port=%d" % (name, host, port)

    def stop():
        for _ in gen:
            pass
    return url, stop


def agents_devices(devices):
    """[(agent, device)]: devices spread over agents of 5 devices each (a site's router)."""
    return [("site%d" % (d // 5), "meter%02d" % d) for d in range(devices)]


def value_text(d, p, i):
    # cheap, varied, reproducible: a slow ramp plus a jitter, 2 decimals
    return "%.2f" % (100.0 * (p + 1) + (i * (d + 3) * (p + 7)) % 997 / 10.0)


def generate(days, devices, points, interval):
    """Yields batches of ROW_COLUMNS tuples in (ts) order, payload the agent's compact JSON."""
    names = POINTS[:points]
    steps = int(days * 86400 // interval)
    t0 = T_END - steps * interval
    pairs = agents_devices(devices)
    seqs = {a: 0 for a, _ in pairs}
    batch = []
    for i in range(steps):
        t = t0 + i * interval
        ts = utc_timestamp(t)
        for d, (agent, device) in enumerate(pairs):
            seq = seqs[agent]
            seqs[agent] = seq + 1
            vals = ",".join('"%s":%s' % (n, value_text(d, p, i)) for p, n in enumerate(names))
            payload = ('{"agent":"%s","seq":%d,"ts":"%s","device":"%s","unit":%d,"values":{%s},"status":"ok"}'
                       % (agent, seq, ts, device, d % 5 + 1, vals))
            batch.append((agent, seq, ts, "data", device, d % 5 + 1, "ok", payload, None, t + 1.0))
        if len(batch) >= 20000:
            yield batch
            batch = []
    if batch:
        yield batch


def fill(store, args):
    """Raw records straight into the table; returns (records, seconds)."""
    n, t = 0, time.perf_counter()
    if store.dialect == "sqlite":
        import sqlite3

        conn = sqlite3.connect(store.path, isolation_level=None)
        conn.execute("PRAGMA synchronous = OFF")
        per = 99
        sql = insert_sql(per)
        for batch in generate(args.days, args.devices, args.points, args.interval):
            conn.execute("BEGIN")
            for i in range(0, len(batch), per):
                part = batch[i:i + per]
                conn.execute(sql if len(part) == per else insert_sql(len(part)), [x for r in part for x in r])
            conn.execute("COMMIT")
            n += len(batch)
        conn.close()
    else:
        conn = store._connect(autocommit=False)
        with conn.cursor() as cur:
            for batch in generate(args.days, args.devices, args.points, args.interval):
                with cur.copy("COPY records (%s) FROM STDIN" % ", ".join(ROW_COLUMNS)) as cp:
                    for r in batch:
                        cp.write_row(r)
                conn.commit()
                n += len(batch)
            cur.execute("ANALYZE")
        conn.commit()
        conn.close()
    return n, time.perf_counter() - t


def build_rollups(store):
    with store._write() as cur:
        cur.execute("UPDATE rollup_state SET done = 0, agent = NULL, seq = NULL WHERE name = 'backfill'")
    t = time.perf_counter()
    n = rollup.backfill(store, chunk=20000)
    secs = time.perf_counter() - t
    if store.dialect == "postgres":
        with store._conn().cursor() as cur:
            cur.execute("VACUUM ANALYZE rollup_1m")
            cur.execute("VACUUM ANALYZE rollup_1h")
    return n, secs


def raw_series(store, agent, device, point, since, until, step):
    """The answer from raw records: {bucket start text: (count, min, max, avg)}."""
    width = {60: 16, 3600: 13}[step]
    if store.dialect == "sqlite":
        sql = ("SELECT substr(ts, 1, %d) AS b, COUNT(v), MIN(v), MAX(v), AVG(v) FROM "
               "(SELECT ts, json_extract(payload, '$.values.%s') AS v FROM records WHERE agent = ? "
               "AND device = ? AND kind = 'data' AND status IN ('ok', 'partial') AND ts >= ? AND ts < ?) "
               "GROUP BY b ORDER BY b" % (width, point))
    else:
        sql = ("SELECT left(ts, %d) AS b, COUNT(v), MIN(v), MAX(v), AVG(v) FROM "
               "(SELECT ts, (payload->'values'->>'%s')::float AS v FROM records WHERE agent = %%s "
               "AND device = %%s AND kind = 'data' AND status IN ('ok', 'partial') AND ts >= %%s AND ts < %%s) x "
               "GROUP BY b ORDER BY b" % (width, point))
    with store._read() as cur:
        cur.execute(sql, (agent, device, since, until))
        return cur.fetchall()


def same(rollup_answer, raw_rows, step):
    pad = {60: ":00.000Z", 3600: ":00:00.000Z"}[step]
    got = [(b["t"], b["count"], b["min"], b["max"], round(b["avg"], 6)) for b in rollup_answer["buckets"]]
    want = [(b + pad, n, lo, hi, round(avg, 6)) for b, n, lo, hi, avg in raw_rows]
    return got == want


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def timed(fn, rounds):
    out, ts = None, []
    for i in range(rounds):
        t = time.perf_counter()
        out = fn(i)
        ts.append(time.perf_counter() - t)
    return out, ts


def sizes(store):
    """{object: bytes} for records (with its indexes), rollup_1m, rollup_1h (with theirs)."""
    out = {}
    with store._read() as cur:
        if store.dialect == "sqlite":
            cur.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name")
            per = dict(cur.fetchall())
            cur.execute("SELECT name, tbl_name FROM sqlite_master WHERE type IN ('table', 'index')")
            owner = dict(cur.fetchall())
            for name, b in per.items():
                t = owner.get(name, name)
                if t.startswith("sqlite_autoindex_"):
                    t = t[len("sqlite_autoindex_"):].rsplit("_", 1)[0]
                out[t] = out.get(t, 0) + b
        else:
            for t in ("records", "rollup_1m", "rollup_1h", "rollup_series"):
                cur.execute("SELECT pg_total_relation_size(%s)", (t,))
                out[t] = cur.fetchone()[0]
        for t in ("records", "rollup_1m", "rollup_1h"):
            cur.execute("SELECT COUNT(*) FROM %s" % t)
            out[t + "_rows"] = cur.fetchone()[0]
    return out


def disk_total(store, tmp):
    if store.dialect == "sqlite":
        return sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp) if f.startswith("history.db"))
    with store._read() as cur:
        cur.execute("SELECT pg_database_size(current_database())")
        return cur.fetchone()[0]


def ingest_batches(agent, n_batches, seq0=0, t0=T_END + 86400):
    """Bodies of 500 records: 5 devices x 100 polls at 10 s, 10 values each (as the agent sends)."""
    from agent.record import data_record, encode

    out = []
    seq = seq0
    for b in range(n_batches):
        lines = []
        for i in range(100):
            t = t0 + (b * 100 + i) * 10.0
            for d in range(5):
                rec = data_record(agent, t, "meter%d" % d, d + 1,
                                  {n: float(value_text(d, p, b * 100 + i)) for p, n in enumerate(POINTS[:10])})
                rec["seq"] = seq
                seq += 1
                lines.append(encode(rec).rstrip(b"\n"))
        out.append(b'{"agent":"%s","records":[%s]}' % (agent.encode(), b",".join(lines)))
    return out


MODES = ("off", "sync", "async")


def ingest_rate(make_store, rounds, n_batches):
    """{mode: [rec/s store only, rec/s parse+validate+store, seconds of rollup job, rec/s
    parse+validate+store+job]}: best of interleaved rounds. async: the batches are stored with
    the queueing hook; the job is then timed on its own (in the app it gives way to a burst,
    rollup.job_due, and does this work once the burst is over)."""
    stores = {m: rollup.attach(make_store(m), m) for m in MODES}
    best = {m: [0.0, 0.0, None, 0.0] for m in MODES}
    try:
        for r in range(rounds):
            for mode in MODES:
                agent = "bench%d" % r
                bodies = ingest_batches(agent, n_batches)
                s = stores[mode]
                t_parse = t_store = 0.0
                n = 0
                for body in bodies:
                    t = time.perf_counter()
                    rows = batch_rows(parse_batch(body.decode()), time.time(), 100000, 8)[1]
                    t1 = time.perf_counter()
                    s.ingest(agent, rows, time.time())
                    t2 = time.perf_counter()
                    t_parse += t1 - t
                    t_store += t2 - t1
                    n += len(rows)
                if mode == "async":  # the job's work, which it does once the burst is over
                    t = time.perf_counter()
                    rollup.drain(s)
                    lag = time.perf_counter() - t
                    best[mode][2] = lag if best[mode][2] is None else min(best[mode][2], lag)
                best[mode][0] = max(best[mode][0], n / t_store)
                best[mode][1] = max(best[mode][1], n / (t_parse + t_store))
                if mode == "async":  # sustained: until the rollups have caught up
                    best[mode][3] = max(best[mode][3], n / (t_parse + t_store + lag))
    finally:
        for s in stores.values():
            s.close()
    return best


def run_dialect(dialect, args, pg):
    tmp = tempfile.mkdtemp(prefix="history-")
    try:
        url = "sqlite:///%s" % os.path.join(tmp, "history.db") if dialect == "sqlite" else pg("history")
        store = open_store(url)
        n, secs = fill(store, args)
        print("%s: %d records written in %.0f s (%.0f/s)" % (dialect, n, secs, n / secs), flush=True)
        bn, bsecs = build_rollups(store)
        print("%s: backfill rolled up %d records in %.0f s (%.0f records/s)" % (dialect, bn, bsecs, bn / bsecs),
              flush=True)
        if dialect == "postgres":
            with store._conn().cursor() as cur:
                cur.execute("VACUUM ANALYZE records")
        pairs = agents_devices(args.devices)
        names = POINTS[:args.points]
        end = utc_timestamp(T_END)
        results = {}
        for label, span, step, raw_rounds in (("%gd @ 1h" % args.days, args.days * 86400, 3600, args.raw_rounds),
                                              ("%gd @ 1m" % min(1, args.days), min(1, args.days) * 86400, 60,
                                               args.raw_rounds * 2)):
            since = utc_timestamp(T_END - span)

            def pick(i):
                agent, device = pairs[i % len(pairs)]
                return agent, device, names[(i // len(pairs)) % len(names)]

            ans, t_roll = timed(lambda i, a=since, s=step: query_series(store, *pick(i), a, end, s), args.rounds)
            raw, t_raw = timed(lambda i, a=since, s=step: raw_series(store, *pick(i), a, end, s), raw_rounds)
            check = same(query_series(store, *pick(raw_rounds - 1), since, end, step), raw, step)
            results[label] = (t_roll, t_raw, check, len(ans["buckets"]))
        sz = sizes(store)
        total = disk_total(store, tmp)
        store.close()

        def make_store(mode):
            if dialect == "sqlite":
                return open_store("sqlite:///%s" % os.path.join(tmp, "ingest_%s.db" % mode))
            return open_store(pg("ingest_" + mode))
        rate = ingest_rate(make_store, args.ingest_rounds, args.ingest_batches)
        return {"records": n, "results": results, "sizes": sz, "disk": total, "rate": rate,
                "backfill": bn / bsecs}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(dialect, r):
    print()
    print("== %s: %d records, %.2f GB on disk" % (dialect, r["records"], r["disk"] / 1e9))
    print("%-12s %10s %10s %10s %10s %9s %8s  %s" % ("query", "rollup p50", "rollup p99", "raw p50", "raw p99",
                                                   "p50 ratio", "buckets", "same answer"))
    for label, (t_roll, t_raw, check, nb) in r["results"].items():
        p50r, p50w = statistics.median(t_roll), statistics.median(t_raw)
        print("%-12s %8.1fms %8.1fms %8.0fms %8.0fms %8.0fx %8d  %s" % (
            label, p50r * 1e3, pct(t_roll, 0.99) * 1e3, p50w * 1e3, pct(t_raw, 0.99) * 1e3, p50w / p50r, nb,
            "yes" if check else "NO"))
    s = r["sizes"]
    print("bytes on disk: records %.0f per record (table and indexes, %d rows); rollup_1m %.0f per row "
          "(%d rows); rollup_1h %.0f per row (%d rows)" % (
              s["records"] / max(1, s["records_rows"]), s["records_rows"], s["rollup_1m"] / max(1, s["rollup_1m_rows"]),
              s["rollup_1m_rows"], s["rollup_1h"] / max(1, s["rollup_1h_rows"]), s["rollup_1h_rows"]))
    print("rollups take %.1f%% of the records' bytes" % (100.0 * (s["rollup_1m"] + s["rollup_1h"]) / s["records"]))
    rate = r["rate"]
    off = rate["off"]
    print("ingest, batches of 500 records (5 devices x 10 points x 100 polls), best of rounds:")
    print("  %-6s %16s %10s %26s %10s" % ("mode", "store rec/s", "vs off", "parse+validate+store rec/s",
                                          "vs off"))
    for mode in MODES:
        x = rate[mode]
        print("  %-6s %16.0f %9.1f%% %26.0f %9.1f%%%s" % (
            mode, x[0], 100 * (x[0] / off[0] - 1), x[1], 100 * (x[1] / off[1] - 1),
            "   (then the job: %.2f s; with it %.0f rec/s, %.1f%%)"
            % (x[2], x[3], 100 * (x[3] / off[1] - 1)) if x[2] is not None else ""))
    print("backfill: %.0f records/s" % r["backfill"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=float, default=30)
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--points", type=int, default=10)
    ap.add_argument("--interval", type=float, default=10.0)
    ap.add_argument("--dialects", default="sqlite,postgres")
    ap.add_argument("--rounds", type=int, default=50, help="timed rollup queries per series")
    ap.add_argument("--raw-rounds", type=int, default=5, help="timed raw queries (x2 for the 1-day one)")
    ap.add_argument("--ingest-rounds", type=int, default=3)
    ap.add_argument("--ingest-batches", type=int, default=20)
    args = ap.parse_args()
    if args.points > len(POINTS):
        ap.error("--points at most %d" % len(POINTS))
    pg, stop = None, None
    out = {}
    try:
        for dialect in args.dialects.split(","):
            if dialect == "postgres" and pg is None:
                pg, stop = start_postgres()
            out[dialect] = run_dialect(dialect, args, pg)
    finally:
        if stop is not None:
            stop()
    for dialect, r in out.items():
        report(dialect, r)


if __name__ == "__main__":
    main()
