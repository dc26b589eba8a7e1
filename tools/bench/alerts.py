#!/usr/bin/env python3
"""Alerts benchmark: what 100 alert rules cost ingest, and how long a crossing takes to reach a
webhook.

    .venv/bin/python tools/bench/alerts.py [--records 20000] [--clients 4] [--sizes 100,1000]
                                           [--rounds 3] [--crossings 200]

1. Ingest rate (records/s over loopback, and records per server CPU-second) of the same
   collector and the same batches (tools/bench/ingest.py's: 4 agents, 4 meters of 8 values each),
   with three configs, interleaved, best of --rounds each:
     none      no rules
     elsewhere the 100 rules below for other agents (site*): what rules cost that watch nothing here
     quiet     100 rules that watch every record: 96 thresholds over the 8 points (12 limits
               each, none crossed), an error rule, a silent rule, a gap rule, a backlog rule
     firing    the same 100 with 4 of the thresholds crossed on every device: 64 series
               firing, their state rows rewritten at every batch
   Each collector first gets one warm-up batch per agent (earlier ts): in the firing config its
   series fire and their messages are sent before the measured part, which is then ingest
   with alerts firing, not the one-off sending of 64 webhooks.
   Target: quiet and firing at most 10% below none.
2. Latency from a crossing to the webhook: one-record batches, alternately crossing and
   clearing a `for = 0` threshold, posted to a collector (SQLite, fsync on) whose notifier is a
   real HTTP receiver on loopback; time from the POST to the message's arrival, p50/p99, for
   firing and resolved messages alike.
"""
import argparse
import http.client
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools", "bench"))

from ingest import free_port, http_rate, make_records, stop, wait_up  # noqa: E402

from agent.record import data_record, encode  # noqa: E402
from tests.webhook import Receiver  # noqa: E402

PY = sys.executable
POINTS = ("voltage_l1", "voltage_l2", "voltage_l3", "current_l1", "current_l2", "current_l3", "energy_kwh",
          "frequency")


def rules_ini(firing, url, agents="bench*"):
    """100 rules that apply to every bench record; `firing`: 4 of them crossed all the time;
    `agents`: the agent glob of all of them (another fleet's: no bench record is watched)."""
    out = ["[collector]", "log_level = WARNING", "", "[notify:bench]", "url = %s" % url, ""]
    n = 0
    for p in POINTS:
        for k in range(12):
            crossed = firing and p == "voltage_l2" and k < 4
            out += ["[alert:t%d]" % n, "agent = %s" % agents, "device = meter*", "point = %s" % p,
                    "below = %d" % (1000 + k) if crossed else "above = %d" % (10 ** 7 + k),
                    "for = %ds" % (k * 10), ""]
            n += 1
    out += ["[alert:err]", "kind = error", "for = 1m", "agent = %s" % agents, "",
            "[alert:quiet]", "kind = silent", "for = 10m", "agent = %s" % agents, "",
            "[alert:drops]", "kind = gap", "agent = %s" % agents, "",
            "[alert:behind]", "kind = backlog", "older_than = 1h", "agent = %s" % agents, ""]
    assert n + 4 == 100
    return "\n".join(out)


def start(port, db, ini, log):
    cmd = [PY, "-m", "agent.collector.cli", "--listen", "127.0.0.1:%d" % port, "--db", "sqlite:///" + db]
    if ini:
        cmd += ["-c", ini]
    else:
        cmd += ["--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=ROOT), stdout=log, stderr=log,
                            cwd=os.path.dirname(db))
    try:
        wait_up(port, proc)
    except Exception:
        proc.kill()
        raise
    return proc


def warm_up(port, clients, hook, firing):
    """One batch per agent just before the measured records (earlier ts, seqs after theirs): in
    the firing config its 64 series fire and their 16 messages go out now, so the measured part
    is ingest with alerts firing (the steady state), not the one-off sending of 16 webhooks."""
    n = len(hook.got)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for k in range(clients):
        agent = "bench%d" % k
        recs = []
        for i in range(60):
            rec = data_record(agent, 1_795_000_000.0 - 100 + i, "meter%d" % (i % 4), 1 + i % 4,
                              {p: 230.0 for p in POINTS})
            rec["seq"] = 10 ** 9 + i
            recs.append(rec)
        conn.request("POST", "/api/v1/batches", body=encode({"agent": agent, "records": recs}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200, resp.status
    conn.close()
    if firing:
        hook.wait_for(n + 16 * clients, timeout=60)   # 4 thresholds x 4 meters x agent


def ingest_rates(args, tmp, hook):
    configs = {"none": None}
    for name, firing, agents in (("elsewhere", False, "site*"), ("quiet", False, "bench*"), ("firing", True, "bench*")):
        path = os.path.join(tmp, name + ".ini")
        with open(path, "w") as f:
            f.write(rules_ini(firing, hook.url(), agents))
        configs[name] = path
    print("ingest, records/s over loopback (wall clock) and in brackets per server CPU-second; best of %d"
          % args.rounds)
    print("%6s %8s %20s %20s %20s %20s %9s %6s %6s" % (
        "batch", "records", "no rules", "100, other agents", "100 rules, quiet", "100 rules, 4 firing",
        "elsewhere", "quiet", "firing"))
    ok = True
    for size in [int(x) for x in args.sizes.split(",")]:
        per = max(size, args.records // args.clients)
        lines = [make_records("bench%d" % k, per) for k in range(args.clients)]
        best = {}
        for _ in range(args.rounds):
            for name, ini in configs.items():
                d = tempfile.mkdtemp(dir=tmp)
                port = free_port()
                with open(os.path.join(d, "server.log"), "w") as log:
                    proc = start(port, os.path.join(d, "bench.db"), ini, log)
                    try:
                        warm_up(port, args.clients, hook, name == "firing")
                        rate, per_cpu = http_rate(port, lines, size, proc.pid)
                    finally:
                        stop(proc)
                r = best.setdefault(name, [0.0, 0.0])
                r[0], r[1] = max(r[0], rate), max(r[1], per_cpu)
                shutil.rmtree(d, ignore_errors=True)
        ratios = [best[k][1] / best["none"][1] for k in ("elsewhere", "quiet", "firing")]
        ok = ok and min(ratios) >= 0.9
        print("%6d %8d %20s %20s %20s %20s %9.2f %6.2f %6.2f" % (
            size, per * args.clients,
            *("%9.0f (%8.0f)" % tuple(best[k]) for k in ("none", "elsewhere", "quiet", "firing")),
            *ratios), flush=True)
    print("(ratios: records per server CPU-second, with rules / without; target >= 0.90: %s)"
          % ("met" if ok else "NOT met"))


def latency(args, tmp, hook):
    path = os.path.join(tmp, "latency.ini")
    with open(path, "w") as f:
        f.write("[collector]\nlog_level = WARNING\n[alert:lat]\npoint = v\nabove = 100\nfor = 0\n"
                "[notify:bench]\nurl = %s\n" % hook.url())
    d = tempfile.mkdtemp(dir=tmp)
    port = free_port()
    with open(os.path.join(d, "server.log"), "w") as log:
        proc = start(port, os.path.join(d, "lat.db"), path, log)
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            waits = {"firing": [], "resolved": []}
            t = time.time()
            for i in range(args.crossings):
                rec = data_record("lat", t + i, "m1", 1, {"v": 200 if i % 2 == 0 else 50})
                rec["seq"] = i
                body = encode({"agent": "lat", "records": [rec]})
                n = len(hook.got)
                t0 = time.monotonic()
                conn.request("POST", "/api/v1/batches", body=body, headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                assert resp.status == 200, resp.status
                hook.wait_for(n + 1, timeout=30)
                got = hook.got[n]
                waits[got["body"]["state"]].append(got["t"] - t0)
            conn.close()
        finally:
            stop(proc)
    every = sorted(waits["firing"] + waits["resolved"])

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] * 1000

    print("\ncrossing -> webhook, %d messages (one-record batches, SQLite with fsync, webhook on loopback)"
          % len(every))
    print("%10s %8s %8s %8s %8s" % ("", "p50 ms", "p90 ms", "p99 ms", "max ms"))
    for name, xs in (("firing", sorted(waits["firing"])), ("resolved", sorted(waits["resolved"])), ("all", every)):
        print("%10s %8.1f %8.1f %8.1f %8.1f" % (name, pct(xs, 0.5), pct(xs, 0.9), pct(xs, 0.99), xs[-1] * 1000))
    print("(mean %.1f ms)" % (statistics.mean(every) * 1000))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=20000, help="records per batch size and config")
    ap.add_argument("--clients", type=int, default=4, help="parallel keep-alive connections (agents)")
    ap.add_argument("--sizes", default="100,1000")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--crossings", type=int, default=200)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-alerts-")
    hook = Receiver()
    try:
        ingest_rates(args, tmp, hook)
        latency(args, tmp, hook)
    finally:
        hook.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
