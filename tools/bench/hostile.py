#!/usr/bin/env python3
"""The agent against a misbehaving collector (issue 10): its polling cadence, its peak RSS and how
fast SIGTERM stops it, beside the same agent uploading to the real collector.

    .venv/bin/python tools/bench/hostile.py [--seconds 30]

Real processes: the agent (`python -m agent run`, one TCP device polled every 1 s, `[upload]
timeout` 10 s and backoff_max 300 s, the defaults), the collector (`agent.collector.cli`) for the
baseline; the simulator and the hostile server (tools/hostile_http.py) run as threads here.
Answers: dribble (the status line and headers one byte a second), huge (Content-Length 300 MB
of JSON whitespace), chunked (64 KiB chunks without a last one, up to 300 MB), gzip (62 KB
inflating to 64 MB). Columns: polls made of the slots in --seconds; peak RSS (VmHWM) and its
growth over the baseline; SIGTERM -> exit, sent at the end of the run and, for the dribble,
also in the middle of a dribbled answer (the worst case: within [upload] timeout + 1 s).
"""
import argparse
import json
import os
import shutil
import signal
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
from hostile_http import Hostile  # noqa: E402
from simulator import EnergyMeter, Simulator  # noqa: E402

INI = """[agent]
id = hostile-bench
interval = 1s
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
"""


def hwm(pid):
    """The process's peak RSS (kB)."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def agent(url, sim_port, tmp):
    d = tempfile.mkdtemp(prefix="agent-", dir=tmp)
    ini = os.path.join(d, "agent.ini")
    with open(ini, "w") as f:
        f.write(INI % {"tmp": d, "port": sim_port, "url": url})
    env = dict(os.environ, PYTHONPATH=os.path.abspath(ROOT))
    return subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", ini], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), d


def stop(proc):
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None
    return time.monotonic() - t


def run(url, seconds, sim_port, tmp):
    proc, d = agent(url, sim_port, tmp)
    time.sleep(seconds)
    peak = hwm(proc.pid)
    took = stop(proc)
    with open(os.path.join(d, "status.json")) as f:
        st = json.load(f)
    m = st["devices"]["meter"]
    return {"polls": m.get("polls_ok", 0), "missed": m.get("missed_cycles", 0), "peak": peak, "stop": took,
            "error": ((st.get("upload") or {}).get("last_error") or "")[:70]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0)
    args = ap.parse_args()
    sim = Simulator({1: EnergyMeter(seed=1)}, tcp=0)
    sim.start()
    tmp = tempfile.mkdtemp(prefix="bench-hostile-", dir=".")
    try:
        port = free_port()
        coll = subprocess.Popen([sys.executable, "-m", "agent.collector.cli", "--listen", "127.0.0.1:%d" % port,
                                 "--db", "sqlite:///%s" % os.path.join(tmp, "c.db"), "--log-level", "WARNING"],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(port, coll)
            base = run("http://127.0.0.1:%d/api/v1/batches" % port, args.seconds, sim.tcp_port, tmp)
        finally:
            coll.terminate()
            coll.wait(10)
        print("agent against a misbehaving collector: Python %s, 1 s polls, %g s per row, [upload] timeout 10 s"
              % (sys.version.split()[0], args.seconds))
        print("| answer | polls / slots | missed | peak RSS | vs real collector | SIGTERM -> exit | last error |")
        print("|---|---|---|---|---|---|---|")

        def line(name, r):
            grow = "%+d kB" % (r["peak"] - base["peak"]) if r["peak"] and base["peak"] else "-"
            print("| %s | %d / %d | %d | %s kB | %s | %s | %s |" % (
                name, r["polls"], int(args.seconds), r["missed"], r["peak"], grow,
                "%.2f s" % r["stop"] if r["stop"] is not None else "not within 30 s", r["error"]), flush=True)

        line("real collector", base)
        for mode, kw in (("dribble", dict(mode="dribble_head", every=1.0)), ("huge", dict(mode="huge", size=300_000_000)),
                         ("chunked", dict(mode="chunked", size=300_000_000)), ("gzip", dict(mode="gzip", size=64_000_000))):
            h = Hostile(duration=args.seconds + 60, **kw)
            try:
                line(mode, run(h.url, args.seconds, sim.tcp_port, tmp))
            finally:
                h.close()
        # SIGTERM in the middle of a dribbled answer: the request ends at its deadline
        h = Hostile("dribble_head", every=1.0, duration=120)
        try:
            proc, _ = agent(h.url, sim.tcp_port, tmp)
            if not h.answering.wait(20):
                raise RuntimeError("the agent never posted")
            time.sleep(1.0)
            took = stop(proc)
            print("\nSIGTERM 1 s into a dribbled answer: exit after %s (bound: [upload] timeout 10 s + 1 s)"
                  % ("%.2f s" % took if took is not None else "more than 30 s"))
        finally:
            h.close()
    finally:
        sim.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
