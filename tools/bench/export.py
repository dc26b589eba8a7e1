#!/usr/bin/env python3
"""Export benchmark: rows/s of a full records export, keyset-paged (the collector's way since
exports stopped holding one read transaction for their whole length) side by side with one
statement streamed to the end (the old way, which pins the WAL while a client reads slowly).

    .venv/bin/python tools/bench/export.py [--records 100000] [--rounds 3] [--db URL]

Both read the same rows in the same (ts, agent, seq) order from the same database: SQLite in a
temporary file by default, or --db postgresql://... (an empty database: the bench fills it). The
machine may be shared: each contender's best of --rounds interleaved rounds counts.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from agent.collector.jsonbody import parse_batch  # noqa: E402
from agent.collector.store import ROW_COLUMNS, open_store  # noqa: E402
from agent.collector.validate import batch_rows  # noqa: E402
from agent.record import data_record, encode  # noqa: E402


def fill(store, n, agents=4):
    t0 = 1_795_000_000.0
    for a in range(agents):
        agent = "site%d" % a
        for start in range(0, n // agents, 1000):
            recs = []
            for i in range(start, min(start + 1000, n // agents)):
                rec = data_record(agent, t0 + i, "meter%d" % (i % 4), 1, {
                    "voltage_l1": 230.1, "current_l1": 5.25, "energy_kwh": 123456.7 + i * 0.01})
                rec["seq"] = i
                recs.append(rec)
            body = encode({"agent": agent, "records": recs}).decode()
            store.ingest(agent, batch_rows(parse_batch(body), t0, 100000, 8)[1], t0)


def one_statement(store):
    """The reference: the whole export as one statement, fetched 500 rows at a time."""
    sql = store._sql("SELECT %s FROM records ORDER BY ts, agent, seq" % ", ".join(
        c if c != "payload" else store._payload_text for c in ROW_COLUMNS))
    if store.dialect == "postgres":
        conn = store._connect(autocommit=False)
        with conn.cursor(name="bench_export") as cur:
            cur.execute(sql)
            while True:
                rows = cur.fetchmany(500)
                if not rows:
                    break
                yield from rows
        conn.close()
        return
    conn = store._connect()
    cur = conn.execute(sql)
    while True:
        rows = cur.fetchmany(500)
        if not rows:
            break
        yield from rows
    conn.close()


def timed(rows):
    t = time.perf_counter()
    n = sum(1 for _ in rows)
    return n, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=100000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--db", help="postgresql://... (empty database); default: SQLite in a temp dir")
    args = ap.parse_args()
    tmp = None
    if args.db:
        url = args.db
    else:
        tmp = tempfile.mkdtemp(prefix="bench-export-")
        url = "sqlite:///%s" % os.path.join(tmp, "x.db")
    store = open_store(url)
    try:
        fill(store, args.records)
        best = {"keyset pages": 0.0, "one statement": 0.0}
        for _ in range(args.rounds):
            for name, rows in (("keyset pages", lambda: store.records()), ("one statement", lambda: one_statement(store))):
                n, dt = timed(rows())
                assert n == args.records, (name, n)
                best[name] = max(best[name], n / dt)
        print("full export of %d records (%s), rows/s, best of %d" % (args.records, store.dialect, args.rounds))
        for name, rate in best.items():
            print("  %-14s %10.0f" % (name, rate))
        print("  ratio keyset / one statement: %.2f" % (best["keyset pages"] / best["one statement"]))
    finally:
        store.close()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
