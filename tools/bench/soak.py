#!/usr/bin/env python3
"""Soak: 20 simulated devices x 50 points polled every second while the collector flaps;
prints the agent's RSS growth after warm-up and its CPU time per poll cycle.

    .venv/bin/python tools/bench/soak.py                    # 30 min (issue 6), collector 60 s up / 20 s down
    .venv/bin/python tools/bench/soak.py --duration 60 --warmup 20 --up 10 --down 5

Peers: tools/simulator.py in this process (20 `generic` units, 50 holding registers each, one
Modbus TCP port; 2 agent connections of 10 devices, as two gateways would be); the real
collector process (SQLite), stopped and restarted on cue; `python -m agent run` as its own
process, measured through /proc/PID (VmRSS; utime+stime). A cycle = one poll of every device.
Target (issue 6): RSS grows by no more than 1 MB after warm-up (steady growth; the single-sample
peaks while a backlog drains are printed too). samples.csv in the run directory has the curve.
The CI test (tests/test_e2e_soak.py) runs a short version; FULL=1 runs this length.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOOLS))
sys.path.insert(0, str(TOOLS.parent))
sys.path.insert(0, str(TOOLS / "bench"))

from demo import Site, wait_for  # noqa: E402
from proc import cpu_seconds, rss_kb  # noqa: E402
from simulator import Generic, Simulator  # noqa: E402


def agent_ini(run, tcp_port, collector_port, devices, points, interval):
    lines = ["[agent]", "id = soak", "interval = %gs" % interval, "spool_dir = %s" % (run / "spool"),
             "status_file = %s" % (run / "status.json"), "fsync = interval", "fsync_interval = 5s",
             "summary_interval = 5m", "health_interval = 5m", "log_level = warning", ""]
    for g in (1, 2):
        lines += ["[connection:gw%d]" % g, "type = tcp", "host = 127.0.0.1", "port = %d" % tcp_port,
                  "timeout = 1s", ""]
    for i in range(devices):
        name = "dev%02d" % i
        lines += ["[device:%s]" % name, "connection = gw%d" % (1 + i % 2), "unit = %d" % (10 + i), ""]
        lines.append("[points:%s]" % name)
        for a in range(points):
            kind = "int16" if a % 2 else "uint16"
            extra = " scale=0.1 unit=V" if a % 5 == 0 else ""
            lines.append("p%02d = holding %d %s%s" % (a, a, kind, extra))
        lines.append("")
    lines += ["[upload]", "url = http://127.0.0.1:%d/api/v1/batches" % collector_port,
              "batch_max_records = 500", "backoff_max = 5s", "timeout = 5s", ""]
    path = run / "agent.ini"
    path.write_text("\n".join(lines))
    return path


def audit(site, agent):
    """Stop the agent; every seq it generated must be at the collector or still in its spool."""
    rc = site.procs.pop("agent").stop(timeout=30)
    spool = site.run / "spool"
    cursor = json.loads((spool / "cursor.json").read_text())
    in_spool = set()
    for seg in spool.glob("seg-*.jsonl"):
        for line in seg.read_bytes().splitlines():
            try:
                in_spool.add(json.loads(line)["seq"])
            except (ValueError, KeyError, TypeError):
                pass
    if "collector" not in site.procs:
        site.start_collector(port=site.collector_port)
    stored = [r["seq"] for r in site.records(agent="soak")]
    generated = set(range(cursor.get("origin_seq", 1), cursor["next_seq"]))
    lost = generated - set(stored) - in_spool
    return {"agent_exit": rc, "generated": len(generated), "stored": len(stored),
            "stored_twice": len(stored) - len(set(stored)), "lost": len(lost)}


def run(duration=1800.0, warmup=300.0, up=60.0, down=20.0, devices=20, points=50, interval=1.0,
        run_dir=None, log=print):
    """Returns a dict of figures; see the module docstring."""
    tmp = None
    if run_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="soak-")
        run_dir = tmp.name
    sim = Simulator({10 + i: Generic(seed=i, registers=points) for i in range(devices)}, tcp=0).start()
    site = Site(run_dir)
    try:
        site.use_simulator(sim)
        site.start_collector()
        ini = agent_ini(site.run, sim.tcp_port, site.collector_port, devices, points, interval)
        agent = site.start_agent_with(ini, "agent")
        pid = agent.pid
        status = site.run / "status.json"
        wait_for(lambda: status.exists() or not agent.alive(), 30, "the agent's loop")
        t0 = time.monotonic()
        samples = []            # (t, rss_kb, cpu_s)
        flaps = 0
        collector_up, next_flip = True, t0 + up
        while True:
            now = time.monotonic()
            if now - t0 >= duration:
                break
            if not agent.alive():
                raise RuntimeError("the agent died:\n" + agent.tail())
            samples.append((now - t0, rss_kb(pid), cpu_seconds(pid)))
            if now >= next_flip:
                if collector_up:
                    site.procs.pop("collector").stop()
                    next_flip = now + down
                    flaps += 1
                else:
                    site.start_collector(port=site.collector_port)
                    next_flip = now + up
                collector_up = not collector_up
            time.sleep(min(1.0, max(0.05, t0 + duration - time.monotonic())))
        st = json.loads(status.read_text())
        polls_ok = sum(d.get("polls_ok", d.get("ok", 0)) or 0 for d in st.get("devices", {}).values())
        warm = [s for s in samples if s[0] >= warmup] or samples[-1:]
        first, last = warm[0], warm[-1]
        cycles = max(1.0, (last[0] - first[0]) / interval)
        with open(site.run / "samples.csv", "w") as f:   # the curve, to tell a plateau from a leak
            f.write("t_s,rss_kb,cpu_s\n")
            f.writelines("%.1f,%d,%.2f\n" % smp for smp in samples)
        q = [warm[min(len(warm) - 1, int(k * (len(warm) - 1) / 4))][1] for k in range(5)]
        # Steady growth: median of the last 5 minutes (or fifth) against the first minute (or
        # fifth) after warm-up; single-sample peaks while a backlog drains after an outage are
        # the allocator's high-water mark, not growth, and are reported apart (max growth).
        span = max(1, min(len(warm) // 5, int(300 / interval)))
        head = sorted(x[1] for x in warm[:max(1, min(len(warm) // 5, int(60 / interval)))])
        tail = sorted(x[1] for x in warm[-span:])
        steady = tail[len(tail) // 2] - head[len(head) // 2]
        res = {
            "duration_s": round(samples[-1][0], 1), "warmup_s": warmup, "devices": devices, "points": points,
            "interval_s": interval, "collector_flaps": flaps,
            "rss_kb_at_warmup": first[1], "rss_kb_end": last[1], "rss_kb_max_after_warmup": max(s[1] for s in warm),
            "rss_growth_kb": last[1] - first[1],
            "rss_steady_growth_kb": steady,
            "rss_max_growth_kb": max(s[1] for s in warm) - first[1],
            "rss_kb_quartiles": q,   # after warm-up: start, 25%, 50%, 75%, end
            "cpu_ms_per_cycle": round(1000.0 * (last[2] - first[2]) / cycles, 2),
            "cpu_percent": round(100.0 * (last[2] - first[2]) / max(1e-9, last[0] - first[0]), 1),
            "polls_ok": polls_ok, "spool_backlog": (st.get("spool") or {}).get("records"),
        }
        res.update(audit(site, agent))
        log("soak: " + json.dumps(res))
        return res
    finally:
        site.stop()
        sim.stop()
        if tmp is not None:
            tmp.cleanup()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=1800.0)
    p.add_argument("--warmup", type=float, default=300.0,
                   help="seconds before measuring (a few collector outages: the first catch-ups set the high-water mark)")
    p.add_argument("--up", type=float, default=60.0, help="seconds the collector stays up")
    p.add_argument("--down", type=float, default=20.0, help="seconds the collector stays down")
    p.add_argument("--devices", type=int, default=20)
    p.add_argument("--points", type=int, default=50)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--run-dir", default=None, help="keep the files here (default: a temporary directory)")
    a = p.parse_args(argv)
    res = run(a.duration, a.warmup, a.up, a.down, a.devices, a.points, a.interval, a.run_dir)
    ok = res["rss_steady_growth_kb"] <= 1024 and res["lost"] == 0 and res["stored_twice"] == 0
    print("RSS steady growth after warm-up: %d kB %s 1 MB (end-start %d kB, highest peak %d kB); "
          "CPU %.2f ms per cycle of %d devices x %d points; lost %d, stored twice %d"
          % (res["rss_steady_growth_kb"], "<=" if res["rss_steady_growth_kb"] <= 1024 else ">", res["rss_growth_kb"],
             res["rss_max_growth_kb"], res["cpu_ms_per_cycle"], a.devices, a.points, res["lost"], res["stored_twice"]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
