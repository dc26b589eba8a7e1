#!/usr/bin/env python3
"""The Modbus TCP gateway under load: answers/s with 1 and 20 clients, answer latency p50/p99,
and the healthy devices' poll start jitter without the gateway, with it idle, and under load
(target: jitter p99 within 5 ms of the no-gateway figure).

    .venv/bin/python tools/bench/gateway.py [--seconds 10] [--interval 100ms] [--clients 1,20] [--paced 0.01]
                                            [--rounds 1]

Real processes: the agent (`python -m agent run`) polls the simulator's energy meter and PLC
(tools/simulator.py, a thread of this process) over RTU on a pty at 19200 baud, and serves them
on its [gateway] port; each client is a process of its own doing closed-loop FC 04 reads of the
meter's whole block (26 registers) with a minimal raw-socket Modbus TCP client, so the figures
are the agent's, not a client library's: flat out (throughput), and in the last row paced, each
client reading every --paced seconds (a busy SCADA: 20 x 100 reads/s). Clients run at nice 19. Jitter: how late each record's ts (the poll's start)
is against the device's slot grid (its median phase), from the spooled records of each run;
the agent's RSS at the end of each run.
Each row is a fresh agent run of --seconds. On a shared machine the figures are "measured under
load"; the ratios in one run are what to compare.
"""
import argparse
import json
import multiprocessing
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

from simulator import EnergyMeter, Plc, Simulator  # noqa: E402

INI = """[agent]
id = gateway-bench
interval = %(interval)s
spool_dir = %(tmp)s/spool
status_file = %(tmp)s/status.json
health_interval = 1h
summary_interval = 1h
%(gateway)s
[connection:bus]
type = rtu
port = %(pty)s
baud = 19200
timeout = 300ms

[device:meter]
connection = bus
unit = 1

[points:meter]
voltage_l1 = input 0 float32 CDAB
current_l1 = input 6 float32 CDAB
power_total = input 18 float32 CDAB
energy_import = input 24 float32 CDAB

[device:plc]
connection = bus
unit = 2

[points:plc]
temperature = holding 0 int16 scale=0.1
counter = holding 3 uint16
running = coil 0 bool
"""

GATEWAY = """
[gateway]
listen = 127.0.0.1:0
max_clients = 64
"""


def percentile(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100.0 * (len(s) - 1))))] if s else float("nan")


def client(port, seconds, out, period=0.0):
    """Closed loop: one FC 04 read of 26 registers, wait for its answer, again (every `period`
    seconds when set, as a SCADA polls). At nice 19: on site the clients are other machines;
    here they share the agent's two cores, and must not take its turn at a poll."""
    os.nice(19)
    req = struct.pack(">HHHBBHH", 1, 0, 6, 1, 4, 0, 26)
    want = 7 + 2 + 52
    lat, bad = [], 0
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    end = time.monotonic() + seconds
    slot = time.monotonic()
    try:
        while time.monotonic() < end:
            if period:
                slot += period
                pause = slot - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
            t = time.perf_counter()
            s.sendall(req)
            buf = b""
            while len(buf) < 9:
                chunk = s.recv(512)
                if not chunk:
                    raise ConnectionError("closed")
                buf += chunk
                if len(buf) >= 9 and buf[7] & 0x80:
                    break
            if buf[7] & 0x80:
                bad += 1
                continue
            while len(buf) < want:
                buf += s.recv(512)
            lat.append(time.perf_counter() - t)
    finally:
        s.close()
    out.put((lat, bad))


def rss_mb(pid):
    """The agent's resident memory now (VmRSS), MB."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def start_jitter_ms(ts, interval):
    """Lateness of each poll start against the slot grid (its median phase), in ms."""
    if not ts:
        return []
    phases = [(t - ts[0]) % interval for t in ts]
    ref = sorted(phases)[len(phases) // 2]
    out = []
    for p in phases:
        d = (p - ref) % interval
        if d > interval - 0.02:
            d -= interval
        out.append(d * 1000.0)
    return out


def record_times(spool_dir, device):
    from agent.status import _parse_utc

    ts = []
    for name in sorted(os.listdir(spool_dir)):
        if name.startswith("seg-") and name.endswith(".jsonl"):
            with open(os.path.join(spool_dir, name), "rb") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    if rec.get("device") == device and rec.get("status") == "ok":
                        ts.append(_parse_utc(rec["ts"]))
    return ts


def run(sim, seconds, interval, gateway, clients, period=0.0):
    tmp = tempfile.mkdtemp(prefix="gw-bench-")
    try:
        ini = os.path.join(tmp, "agent.ini")
        with open(ini, "w") as f:
            f.write(INI % {"interval": interval, "tmp": tmp, "pty": sim.rtu_path,
                           "gateway": GATEWAY if gateway else ""})
        env = dict(os.environ, PYTHONPATH=ROOT)
        with open(os.path.join(tmp, "log"), "w") as logf:
            proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", ini], cwd=ROOT, env=env,
                                    stdout=subprocess.DEVNULL, stderr=logf)
        port = None
        end = time.monotonic() + 20
        while time.monotonic() < end:
            try:
                with open(os.path.join(tmp, "status.json")) as f:
                    st = json.load(f)
            except (OSError, ValueError):
                time.sleep(0.05)
                continue
            gw = st.get("services", {}).get("gateway")
            if not gateway or (gw and gw.get("listening")):
                port = gw and int(gw["listen"].rsplit(":", 1)[1])
                break
            time.sleep(0.05)
        time.sleep(1.0)     # the first polls, and a cached reading to serve
        t0 = time.time()
        q = multiprocessing.Queue()
        procs = [multiprocessing.Process(target=client, args=(port, seconds, q, period)) for _ in range(clients)]
        for p in procs:
            p.start()
        if not procs:
            time.sleep(seconds)
        lat, bad = [], 0
        for _ in procs:
            got = q.get(timeout=seconds + 30)
            lat += got[0]
            bad += got[1]
        for p in procs:
            p.join()
        t1 = time.time()
        rss = rss_mb(proc.pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        secs = float(interval.rstrip("ms")) / (1000.0 if interval.endswith("ms") else 1.0)
        ts = [t for t in record_times(os.path.join(tmp, "spool"), "meter") if t0 <= t <= t1]
        jitter = start_jitter_ms(ts, secs)
        return {"answers": len(lat), "bad": bad, "rate": len(lat) / seconds if clients else 0.0,
                "p50": 1000 * percentile(lat, 50), "p99": 1000 * percentile(lat, 99),
                "polls": len(ts), "j50": percentile(jitter, 50), "j99": percentile(jitter, 99),
                "jmax": max(jitter) if jitter else float("nan"), "rss": rss}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--interval", default="100ms")
    ap.add_argument("--clients", default="1,20")
    ap.add_argument("--paced", type=float, default=0.01, help="the last row's clients read every PACED s")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every row this many times, interleaved, and print each figure's median "
                         "(a noisy machine: 3 or more)")
    args = ap.parse_args()
    counts = [int(x) for x in args.clients.split(",")]
    plan = [("no [gateway]", False, 0, 0.0), ("gateway, idle", True, 0, 0.0)]
    plan += [("%d client%s, flat out" % (n, "s" if n > 1 else ""), True, n, 0.0) for n in counts]
    plan.append(("%d x %g/s (SCADA)" % (max(counts), 1.0 / args.paced), True, max(counts), args.paced))
    sim = Simulator({1: EnergyMeter(seed=1), 2: Plc(seed=2)}, tcp=None, rtu=True).start()
    runs = {name: [] for name, _g, _n, _p in plan}
    try:
        for _ in range(args.rounds):
            for name, gateway, n, period in plan:
                runs[name].append(run(sim, args.seconds, args.interval, gateway, n, period))
    finally:
        sim.stop()
    rows = [(name, {k: percentile([r[k] for r in runs[name]], 50) for k in runs[name][0]})
            for name, _g, _n, _p in plan]
    print("gateway bench: meter + plc on RTU 19200 baud (pty), interval %s, %gs per row%s; "
          "clients: closed-loop FC 04 x 26 registers" % (
              args.interval, args.seconds, ", median of %d rounds" % args.rounds if args.rounds > 1 else ""))
    head = ("", "answers/s", "lat p50 ms", "lat p99 ms", "exc", "polls", "jitter p50 ms", "jitter p99 ms",
            "jitter max ms", "p99 vs no gateway", "RSS MB")
    print("%-20s %10s %10s %10s %5s %6s %13s %13s %13s %17s %7s" % head)
    base = rows[0][1]["j99"]
    for name, r in rows:
        rate = "%.0f" % r["rate"] if r["answers"] else "-"
        lat50 = "%.2f" % r["p50"] if r["answers"] else "-"
        lat99 = "%.2f" % r["p99"] if r["answers"] else "-"
        print("%-20s %10s %10s %10s %5d %6d %13.2f %13.2f %13.2f %+14.2f ms %7.1f" % (
            name, rate, lat50, lat99, r["bad"], r["polls"], r["j50"], r["j99"], r["jmax"], r["j99"] - base,
            r["rss"]))
    worst = max(r["j99"] for _n, r in rows) - base
    print("target: jitter p99 within 5 ms of the no-gateway figure: %s (%+.2f ms)" % (
        "met" if worst <= 5.0 else "NOT met", worst))


if __name__ == "__main__":
    main()
