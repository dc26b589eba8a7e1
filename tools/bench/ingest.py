#!/usr/bin/env python3
"""Ingest benchmark: records/s into the collector over loopback, side by side with a FastAPI +
uvicorn reference (tools/bench/ref/) and with direct SQLite inserts of the same rows.

    .venv/bin/python tools/bench/ingest.py [--records 20000] [--clients 4] [--sizes 1,100,1000]
                                           [--rounds 3] [--workers 1]

All three store the same rows (payload = the record's JSON text, as the collector keeps it) into
the same schema with WAL + synchronous=FULL, one transaction per batch. The client is a separate
process (keep-alive HTTP/1.1, pre-encoded bodies, --clients connections in parallel). --workers
gives both servers the same number of processes (modbus-collector --workers, uvicorn --workers).
The machine may be shared: each contender's best of --rounds interleaved rounds counts, and next
to the wall-clock rate the table shows records per CPU-second of the server's processes, which
does not depend on what else runs. Needs fastapi, uvicorn (+httptools, uvloop) in the venv for
the reference; without them that column is skipped.
"""
import argparse
import http.client
import itertools
import json
import multiprocessing
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from agent.collector.schema import VERSION, statements  # noqa: E402
from agent.collector.sqlite import ROWS_PER_INSERT, insert_sql  # noqa: E402
from agent.record import data_record, encode  # noqa: E402

PY = sys.executable


def make_records(agent, n, seq0=0):
    """n realistic records: a meter with 8 values, one reading per second per device."""
    out = []
    t0 = 1_795_000_000.0
    for i in range(n):
        rec = data_record(agent, t0 + i, "meter%d" % (i % 4), 1 + i % 4, {
            "voltage_l1": 230.1 + i % 7 * 0.1, "voltage_l2": 229.8, "voltage_l3": 231.0,
            "current_l1": 5.25, "current_l2": 4.75, "current_l3": 5.0,
            "energy_kwh": 123456.7 + i * 0.01, "frequency": 50.01})
        rec["seq"] = seq0 + i
        out.append(encode(rec).rstrip(b"\n"))
    return out


def bodies(agent, lines, size):
    head = b'{"agent":' + json.dumps(agent).encode() + b',"records":['
    return [head + b",".join(lines[i:i + size]) + b"]}" for i in range(0, len(lines), size)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(port, proc, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited with %s" % proc.returncode)
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            c.getresponse().read()
            c.close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server on port %d did not come up" % port)


def _client(port, chunks, q):
    """One client process: `chunks` is a list per connection; posts them keep-alive, in parallel."""
    errors = []

    def run(bodies_):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        hdr = {"Content-Type": "application/json"}
        for b in bodies_:
            conn.request("POST", "/api/v1/batches", body=b, headers=hdr)
            r = conn.getresponse()
            data = r.read()
            if r.status != 200:
                errors.append((r.status, data[:200]))
                return
        conn.close()

    threads = [threading.Thread(target=run, args=(c,)) for c in chunks]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    q.put((time.perf_counter() - t0, errors))


def tree_cpu(pid):
    """CPU seconds (user + system) used so far by a process and all its descendants (Linux)."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            with open("/proc/%d/stat" % p) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for t in os.listdir("/proc/%d/task" % p):
                with open("/proc/%d/task/%s/children" % (p, t)) as f:
                    stack.extend(int(c) for c in f.read().split())
        except (OSError, IndexError, ValueError):
            pass
    return total


def http_rate(port, lines_per_client, size, server_pid):
    """(records/s, records per server CPU-second) posting every client's lines in batches of
    `size`, all clients at once. The second figure does not depend on what else the machine runs."""
    chunks = [bodies("bench%d" % k, lines, size) for k, lines in enumerate(lines_per_client)]
    q = multiprocessing.get_context("fork").Queue()
    p = multiprocessing.get_context("fork").Process(target=_client, args=(port, chunks, q))
    cpu0 = tree_cpu(server_pid)
    p.start()
    elapsed, errors = q.get()
    cpu = tree_cpu(server_pid) - cpu0
    p.join()
    if errors:
        raise RuntimeError("server answered %s" % (errors[:3],))
    n = sum(len(x) for x in lines_per_client)
    return n / elapsed, n / max(cpu, 1e-9)


def direct_rate(path, lines_per_client, size):
    """The practical limit: the same rows, already built, inserted in one process with the
    collector's statements, one transaction per batch."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    for v in range(1, VERSION + 1):
        for s in statements("sqlite", v):
            conn.execute(s)
    # The collector's own statements (multi-row INSERTs of ROWS_PER_INSERT rows, faster than
    # executemany even in one thread): the ratio then measures what the collector adds, not a
    # difference in SQL.
    sqls = {}
    batches = []
    now = time.time()
    for lines in lines_per_client:
        # the collector's rows: payload is the record's JSON text as sent
        rows = []
        for line in lines:
            r = json.loads(line)
            rows.append((r["agent"], r["seq"], r["ts"], "data", r["device"], r["unit"], r["status"],
                         line.decode(), None, now))
        batches.extend(rows[i:i + size] for i in range(0, len(rows), size))
    n = sum(len(b) for b in batches)
    t0 = time.perf_counter()
    c0 = time.process_time()
    for b in batches:
        conn.execute("BEGIN IMMEDIATE")
        for i in range(0, len(b), ROWS_PER_INSERT):
            part = b[i:i + ROWS_PER_INSERT]
            sql = sqls.get(len(part)) or sqls.setdefault(len(part), insert_sql(len(part)))
            conn.execute(sql, list(itertools.chain.from_iterable(part)))
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    conn.close()
    return n / elapsed, n / max(cpu, 1e-9)


def start(kind, port, db, log, workers=1):
    env = dict(os.environ, PYTHONPATH=ROOT)
    if kind == "collector":
        cmd = [PY, "-m", "agent.collector.cli", "--listen", "127.0.0.1:%d" % port, "--db", "sqlite:///" + db,
               "--log-level", "WARNING", "--workers", str(workers)]
    else:
        env["REF_DB"] = db
        cmd = [PY, "-m", "uvicorn", "--app-dir", os.path.join(ROOT, "tools", "bench", "ref"),
               "fastapi_app:app", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
               "--no-access-log", "--workers", str(workers)]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, cwd=os.path.dirname(db))
    try:
        if kind == "fastapi":
            # the reference has no /health: wait for the port instead
            deadline = time.monotonic() + 20
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("uvicorn did not start; see %s" % log.name) from None
                    time.sleep(0.1)
        else:
            wait_up(port, proc)
    except Exception:
        proc.kill()
        raise
    return proc


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=20000, help="records per batch size and server")
    ap.add_argument("--clients", type=int, default=4, help="parallel keep-alive connections (agents)")
    ap.add_argument("--sizes", default="1,100,1000")
    ap.add_argument("--workers", type=int, default=1,
                    help="server processes, the same for the collector (--workers) and uvicorn (--workers)")
    ap.add_argument("--small", type=int, default=3000, help="records for batch size 1 (one request each)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds per batch size, contenders interleaved; the best round of each counts "
                         "(the machine is shared: the best round is the least disturbed one)")
    args = ap.parse_args()
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
        have_ref = True
    except ImportError:
        have_ref = False
        print("fastapi/uvicorn not installed: reference column skipped (.venv/bin/pip install fastapi uvicorn)")
    tmp = tempfile.mkdtemp(prefix="bench-ingest-")
    results = []
    try:
        for size in [int(x) for x in args.sizes.split(",")]:
            n = args.small if size == 1 else args.records
            per = max(size, n // args.clients)
            lines = [make_records("bench%d" % k, per) for k in range(args.clients)]
            row = {"size": size, "records": per * args.clients}
            kinds = ("collector", "fastapi") if have_ref else ("collector",)
            for _ in range(args.rounds):
                for kind in kinds:
                    d = tempfile.mkdtemp(dir=tmp)
                    db = os.path.join(d, "bench.db")
                    port = free_port()
                    with open(os.path.join(d, "server.log"), "w") as log:
                        proc = start(kind, port, db, log, args.workers)
                        try:
                            rate, per_cpu = http_rate(port, lines, size, proc.pid)
                            row[kind] = max(row.get(kind, 0.0), rate)
                            row[kind + "_cpu"] = max(row.get(kind + "_cpu", 0.0), per_cpu)
                        finally:
                            stop(proc)
                    shutil.rmtree(d, ignore_errors=True)
                d = tempfile.mkdtemp(dir=tmp)
                rate, per_cpu = direct_rate(os.path.join(d, "direct.db"), lines, size)
                row["direct"] = max(row.get("direct", 0.0), rate)
                row["direct_cpu"] = max(row.get("direct_cpu", 0.0), per_cpu)
                shutil.rmtree(d, ignore_errors=True)
            results.append(row)
            print_row(row, header=len(results) == 1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ok = True
    for r in results:
        if "fastapi" in r and r["collector"] < 1.3 * r["fastapi"]:
            ok = False
        if r["size"] == 1000 and r["collector"] < 0.5 * r["direct"]:
            ok = False
    print("targets (>= 1.3x FastAPI at every size, >= 0.5x direct SQLite at 1000): %s"
          % ("met" if ok else "NOT met"))
    return 0


def print_row(r, header=False):
    if header:
        print("records/s over loopback (wall clock), and in brackets records per CPU-second of the server")
        print("%6s %8s %20s %20s %20s %9s %9s" % ("batch", "records", "collector", "fastapi+uvicorn",
                                                 "direct sqlite", "x fastapi", "x direct"))
    fa = r.get("fastapi")

    def cell(k):
        return "%9.0f (%8.0f)" % (r[k], r[k + "_cpu"]) if r.get(k) else "%20s" % "-"

    print("%6d %8d %20s %20s %20s %9s %9.2f" % (
        r["size"], r["records"], cell("collector"), cell("fastapi"), cell("direct"),
        "%.2f" % (r["collector"] / fa) if fa else "-", r["collector"] / r["direct"]), flush=True)


if __name__ == "__main__":
    sys.exit(main())
