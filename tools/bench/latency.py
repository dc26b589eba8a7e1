#!/usr/bin/env python3
"""Delivery latency: a record taken (its ts, the poll's start) -> stored at the collector (its
`received`), p50/p99, at polling intervals of 100 ms, 200 ms, 1 s and 10 s, with a local
collector and with one behind a 150 ms link (tools/faultproxy.py "delay": 150 ms per request,
150 ms more when a connection opens).

    .venv/bin/python tools/bench/latency.py [--seconds 15] [--slow-seconds 25] [--delay 0.15]

Real processes: the agent (`python -m agent run`, one TCP device: the simulator's meter, one
float32 point), the collector (`agent.collector.cli`, SQLite file); the simulator and the proxy
run as threads of this process. Each row runs the agent for --seconds (--slow-seconds for the
10 s interval: a few records), then SIGTERM. Columns: records stored; latency p50/p99/max;
"first" = the first record stored, seconds after the agent was started (its Python start-up
included); missed = poll slots the agent's schedule counted as missed (an upload made a poll
late); forced = the starvation rule's "polls wait for one upload" warnings; left = records
still in the spool at SIGTERM (not in the latency figures).
"""
import argparse
import datetime
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, HERE)

from drain import free_port, wait_port  # noqa: E402
from faultproxy import FaultProxy  # noqa: E402
from simulator import EnergyMeter, Simulator  # noqa: E402

AGENT = "latency-bench"
INI = """[agent]
id = %(agent)s
interval = %(interval)s
spool_dir = %(tmp)s/spool
status_file = %(tmp)s/status.json
health_interval = 1h
summary_interval = 1h

[connection:sim]
type = tcp
host = 127.0.0.1
port = %(port)d
timeout = 500ms

[device:meter]
connection = sim
unit = 1

[points:meter]
voltage_l1 = input 0 float32 CDAB

[upload]
url = %(url)s
timeout = 5s
backoff_max = 2s
"""


def epoch(ts):
    return datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc).timestamp()


def pct(values, p):
    v = sorted(values)
    return v[min(len(v) - 1, int(p / 100.0 * len(v)))]


def row(interval, delay, seconds, sim_port, tmp):
    d = tempfile.mkdtemp(prefix="row-", dir=tmp)
    db = os.path.join(d, "collector.db")
    port = free_port()
    coll = subprocess.Popen([sys.executable, "-m", "agent.collector.cli", "--listen", "127.0.0.1:%d" % port,
                             "--db", "sqlite:///%s" % db, "--log-level", "WARNING"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proxy = None
    try:
        wait_port(port, coll)
        if delay:
            proxy = FaultProxy(port).start()
            proxy.set_fault("delay", seconds=delay)
            port = proxy.port
        ini = os.path.join(d, "agent.ini")
        with open(ini, "w") as f:
            f.write(INI % {"agent": AGENT, "interval": interval, "tmp": d, "port": sim_port,
                           "url": "http://127.0.0.1:%d/api/v1/batches" % port})
        env = dict(os.environ, PYTHONPATH=os.path.abspath(ROOT))
        log = os.path.join(d, "agent.log")
        started = time.time()
        with open(log, "wb") as lf:
            agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", ini], cwd=ROOT, env=env,
                                     stdout=lf, stderr=lf)
        time.sleep(seconds)
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)
        with open(os.path.join(d, "status.json")) as f:
            status = json.load(f)
        with open(log, errors="replace") as f:
            forced = sum("polls wait for one upload" in line for line in f)
    finally:
        if proxy is not None:
            proxy.stop()
        coll.terminate()
        coll.wait(10)
    con = sqlite3.connect(db)
    rows = con.execute("SELECT ts, received FROM records WHERE agent = ? AND kind = 'data'", (AGENT,)).fetchall()
    con.close()
    shutil.rmtree(d, ignore_errors=True)
    lat = [received - epoch(ts) for ts, received in rows]
    first = min(r for _, r in rows) - started if rows else None
    return {"records": len(lat), "lat": lat, "first": first, "forced": forced,
            "missed": status["devices"]["meter"].get("missed_cycles", 0),
            "left": (status.get("spool") or {}).get("records")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=15.0, help="per row (100 ms, 200 ms, 1 s)")
    ap.add_argument("--slow-seconds", type=float, default=25.0, help="the 10 s interval's row")
    ap.add_argument("--delay", type=float, default=0.15, help="the slow link's round trip (s)")
    ap.add_argument("--intervals", default="100ms,200ms,1s,10s")
    args = ap.parse_args()
    sim = Simulator({1: EnergyMeter(seed=1)}, tcp=0)
    sim.start()
    tmp = tempfile.mkdtemp(prefix="bench-latency-", dir=".")
    try:
        print("delivery latency (record ts -> stored at the collector): Python %s, one TCP device, "
              "real agent and collector processes, loopback" % sys.version.split()[0])
        print("| interval | collector | records | p50 | p99 | max | first stored after start | missed polls "
              "| forced uploads | left at stop |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for interval in args.intervals.split(","):
            seconds = args.slow_seconds if interval.endswith("s") and not interval.endswith("ms") and \
                float(interval[:-1]) >= 5 else args.seconds
            for delay in (0.0, args.delay):
                r = row(interval, delay, seconds, sim.tcp_port, tmp)
                where = "local" if not delay else "behind %d ms" % round(delay * 1000)
                if r["lat"]:
                    cells = ["%.0f ms" % (pct(r["lat"], p) * 1000) for p in (50, 99, 100)]
                    first = "%.2f s" % r["first"]
                else:
                    cells, first = ["-"] * 3, "-"
                print("| %s | %s | %d | %s | %s | %d | %d | %s |" % (
                    interval, where, r["records"], " | ".join(cells), first, r["missed"], r["forced"],
                    r["left"]), flush=True)
    finally:
        sim.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
