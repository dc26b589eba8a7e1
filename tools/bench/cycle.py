#!/usr/bin/env python3
"""CPU time per poll cycle and steady RSS of `modbus-agent run`: 20 devices x 50 points.

    .venv/bin/python tools/bench/cycle.py                       # 30 s measured after 10 s warm-up
    .venv/bin/python tools/bench/cycle.py --duration 120 --interval 1 --no-upload

Peers, each in its own process so only the agent is measured:
  - tools/simulator.py: 20 `generic` units with 50 holding registers on one Modbus TCP port;
  - the real collector (`python -m agent.collector.cli`, SQLite in a temp dir) unless --no-upload;
  - `modbus-agent run` polling every device each `--interval`, one request per device
    (50 uint16 points planned into one FC 03 read), spooling (fsync = interval) and uploading.
Baseline: a bare interpreter that has imported requests (what any HTTP uploader costs).
CPU comes from /proc/PID/stat (utime+stime), RSS from /proc/PID/status (VmRSS), cycles from the
agent's status file (polls ok of all devices / 20). Target (issue 4): steady RSS <= 4 MB above
the baseline.
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

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from proc import cpu_seconds, rss_kb  # noqa: E402


def wait_file(path, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            time.sleep(0.05)
    raise SystemExit("bench: %s did not appear" % path)


def baseline_rss(python, env):
    p = subprocess.Popen([python, "-c", "import requests, sys, time; print('ready', flush=True); time.sleep(60)"],
                         stdout=subprocess.PIPE, env=env)
    try:
        p.stdout.readline()
        time.sleep(0.3)
        return rss_kb(p.pid)
    finally:
        p.kill()
        p.wait()


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(tmp, sim_port, url, devices, points, interval):
    lines = ["[agent]", "id = bench", "interval = %gs" % interval, "spool_dir = %s/spool" % tmp,
             "status_file = %s/status.json" % tmp, "fsync = interval", "fsync_interval = 5s",
             "summary_interval = 1m", "health_interval = 1m", "log_level = warning", ""]
    if url:
        lines += ["[upload]", "url = %s" % url, "gzip = yes", ""]
    lines += ["[connection:sim]", "type = tcp", "host = 127.0.0.1", "port = %d" % sim_port, "timeout = 1s", ""]
    for u in range(1, devices + 1):
        lines += ["[device:d%02d]" % u, "connection = sim", "unit = %d" % u, "", "[points:d%02d]" % u]
        lines += ["r%d = holding %d uint16" % (a, a) for a in range(points)]
        lines.append("")
    path = os.path.join(tmp, "agent.ini")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def polls_ok(status):
    return sum(d.get("polls_ok", 0) for d in status.get("devices", {}).values())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=20)
    p.add_argument("--points", type=int, default=50)
    p.add_argument("--interval", type=float, default=1.0, help="poll interval, seconds")
    p.add_argument("--warmup", type=float, default=10.0)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--no-upload", action="store_true", help="spool only, no collector")
    args = p.parse_args(argv)
    py = sys.executable
    procs = []
    with tempfile.TemporaryDirectory(prefix="bench-cycle-") as tmp:
        # The agent as installed on the router: a copy of the package with its bytecode compiled
        # (on first start or by compileall at install). Importing from source with
        # PYTHONDONTWRITEBYTECODE would compile at every start and inflate RSS by megabytes.
        lib = os.path.join(tmp, "lib")
        shutil.copytree(os.path.join(ROOT, "agent"), os.path.join(lib, "agent"),
                        ignore=shutil.ignore_patterns("__pycache__", "collector"))
        subprocess.run([py, "-m", "compileall", "-q", lib], check=True)
        env = dict(os.environ, PYTHONPATH=ROOT)
        agent_env = dict(os.environ, PYTHONPATH=lib, PYTHONDONTWRITEBYTECODE="1")
        try:
            ready = os.path.join(tmp, "sim.json")
            procs.append(subprocess.Popen(
                [py, os.path.join(ROOT, "tools", "simulator.py"), "serve", "--tcp", "0", "--quiet",
                 "--device", "generic:1-%d:%d" % (args.devices, args.points), "--ready-file", ready],
                stdout=subprocess.DEVNULL, env=env))
            sim_port = wait_file(ready)["tcp_port"]
            url = None
            if not args.no_upload:
                cport = free_port()
                procs.append(subprocess.Popen(
                    [py, "-m", "agent.collector.cli", "--listen", "127.0.0.1:%d" % cport,
                     "--db", "sqlite:///%s/collector.db" % tmp, "--log-level", "warning"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tmp))
                url = "http://127.0.0.1:%d/api/v1/batches" % cport
            cfg = config(tmp, sim_port, url, args.devices, args.points, args.interval)
            with open(os.path.join(tmp, "agent.log"), "wb") as log:
                agent = subprocess.Popen([py, "-m", "agent", "run", "-c", cfg], env=agent_env, stderr=log)
            procs.append(agent)
            status_path = os.path.join(tmp, "status.json")
            wait_file(status_path)
            time.sleep(args.warmup)
            # measure between two status-file writes so polls and CPU cover the same span
            s0 = wait_new_status(status_path)
            c0, r0 = cpu_seconds(agent.pid), rss_kb(agent.pid)
            time.sleep(args.duration)
            s1 = wait_new_status(status_path)
            c1, r1 = cpu_seconds(agent.pid), rss_kb(agent.pid)
            polls = polls_ok(s1) - polls_ok(s0)
            span = s1["written_at"] - s0["written_at"]
            spool = s1.get("spool", {})
            upload = s1.get("upload") or {}
            failed = sum(d.get("polls_failed", 0) for d in s1["devices"].values())
            missed = sum(d.get("missed_cycles", 0) for d in s1["devices"].values())
        finally:
            for proc in reversed(procs):
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        base = baseline_rss(py, agent_env)
    cycles = polls / float(args.devices)
    cpu = c1 - c0
    print("agent run: %d devices x %d points every %gs, upload %s, %.0fs measured after %.0fs warm-up" % (
        args.devices, args.points, args.interval, "off" if args.no_upload else "to the real collector (SQLite)",
        span, args.warmup))
    print("  cycles %.0f (polls %d, failed %d, missed %d), spool backlog %s records, uploaded %s" % (
        cycles, polls, failed, missed, spool.get("records"), upload.get("sent_total", "-")))
    if cycles:
        print("  CPU per cycle (20 polls + records + spool + upload): %.2f ms; per device poll %.3f ms; "
              "CPU load %.1f%% of one core" % (1000.0 * cpu / cycles, 1000.0 * cpu / polls, 100.0 * cpu / span))
    print("  RSS: agent %.1f MB steady (growth over the run %+d kB); bare python+requests %.1f MB; "
          "difference %.1f MB (target <= 4 MB)" % (r1 / 1024.0, r1 - r0, base / 1024.0, (r1 - base) / 1024.0))
    print("  python %s" % sys.version.split()[0])
    return 0


def wait_new_status(path, timeout=15.0):
    """The next status file the agent writes (it rewrites it every few seconds)."""
    first = wait_file(path)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = wait_file(path)
        if st.get("written_at") != first.get("written_at"):
            return st
        time.sleep(0.02)
    return first


if __name__ == "__main__":
    sys.exit(main())
