#!/usr/bin/env python3
"""Slowloris benchmark: a real agent's posts while N connections send their request head one byte
every few seconds, side by side for the built-in server and waitress, in one run.

    .venv/bin/python tools/bench/slowloris.py [--attackers 200] [--interval 10] [--duration 40]
                                              [--servers builtin,waitress,waitress-tuned]
                                              [--root DIR]

Each contender is a fresh collector process on loopback (SQLite in a temp dir). The attacker is
a separate process holding --attackers connections, all from 127.0.0.1 like the agent: each
sends `POST /api/v1/batches HTTP/1.1\\r\\n` and then one byte of a header every --interval
seconds, and reconnects as soon as the server drops it (a real slowloris does). Once the attack
is established (one interval), the agent (requests.Session, keep-alive, as agent.upload does)
posts a real 100-record batch every --post-every seconds for --duration seconds, timeout 10 s.
The table: posts, 200s, 503s, other failures (timeouts, resets), post latency p50/p99/max, and
the server's CPU seconds (with its worker processes) and RSS (of the first process) at the end. --root runs the built-in server from another
checkout (e.g. a worktree of an older commit) for a before/after figure.

Contenders: builtin = `modbus-collector` (defaults: max_connections 200, 50 per address,
head_timeout 10 s); waitress = `waitress-serve --call agent.collector:make_app` with waitress'
defaults (connection_limit 100, channel_timeout 120 s, 4 threads); waitress-tuned = the same with
--connection-limit=1000 --channel-timeout=5 --threads=8 (what an operator would try).
"""
import argparse
import http.client
import json
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import proc as procinfo  # noqa: E402

PY = sys.executable
ATTACK_HEAD = b"POST /api/v1/batches HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_cpu(pid):
    """CPU seconds of a process and its children (the --workers processes)."""
    total = procinfo.cpu_seconds(pid)
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            total += sum(procinfo.cpu_seconds(int(c)) for c in f.read().split())
    except OSError:
        pass
    return total


def batch_body(agent, seq0, n=100):
    recs = [{"agent": agent, "seq": seq0 + i, "ts": "2026-12-01T10:00:%02d.000Z" % (i % 60), "device": "meter1",
             "unit": 1, "values": {"voltage_l1": 230.1, "current_l1": 5.25, "energy_kwh": 123456.7 + i},
             "status": "ok"} for i in range(n)]
    return json.dumps({"agent": agent, "records": recs}, separators=(",", ":")).encode()


def start(kind, port, tmp, root, workers=1):
    env = dict(os.environ, PYTHONPATH=root)
    db = "sqlite:///%s" % os.path.join(tmp, "c.db")
    if kind == "builtin":
        cmd = [PY, "-m", "agent.collector.cli", "--listen", "127.0.0.1:%d" % port, "--db", db,
               "--log-level", "WARNING", "--workers", str(workers)]
    else:
        ini = os.path.join(tmp, "c.ini")
        with open(ini, "w") as f:
            f.write("[collector]\ndb = %s\nlog_level = WARNING\n" % db)
        env["MODBUS_COLLECTOR_CONFIG"] = ini
        cmd = [PY, "-m", "waitress", "--listen=127.0.0.1:%d" % port]
        if kind == "waitress-tuned":
            cmd += ["--connection-limit=1000", "--channel-timeout=5", "--threads=8"]
        cmd += ["--call", "agent.collector:make_app"]
    with open(os.path.join(tmp, "server.log"), "wb") as log:  # the child keeps its own copy
        p = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while True:
        if p.poll() is not None:
            raise RuntimeError("%s exited with %s (see %s/server.log)" % (kind, p.returncode, tmp))
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            c.getresponse().read()
            c.close()
            return p
        except OSError:
            if time.monotonic() > deadline:
                p.kill()
                raise
            time.sleep(0.1)


def attack(port, n, interval, until):
    """The attacker process: n slow connections, reconnecting whenever one is dropped."""
    sel = selectors.DefaultSelector()
    conns = {}  # sock -> next send time
    stats = {"connects": 0, "dropped": 0, "refused": 0}

    def connect():
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        conns[s] = [time.monotonic(), 0]  # [next byte at, bytes of the head sent]: starts at once
        sel.register(s, selectors.EVENT_READ)
        stats["connects"] += 1

    for _ in range(n):
        connect()
    lost = 0
    while time.monotonic() < until:
        for _ in range(lost):  # reconnect what was dropped, at most once per tick (no busy loop)
            connect()
        lost = 0
        time.sleep(0.05)
        for key, _ in sel.select(0.2):
            s = key.fileobj
            try:
                s.recv(4096)
            except OSError:
                pass
            # any answer (408, 503) or EOF: the server is done with this one
            sel.unregister(s)
            s.close()
            del conns[s]
            stats["dropped"] += 1
            lost += 1
        now = time.monotonic()
        for s, st in list(conns.items()):
            if now >= st[0]:
                piece = ATTACK_HEAD if st[1] == 0 else b"a"
                try:
                    s.send(piece)
                    st[1] += len(piece)
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    sel.unregister(s)
                    s.close()
                    del conns[s]
                    stats["refused"] += 1
                    lost += 1
                    continue
                st[0] = now + interval
    print(json.dumps(stats), flush=True)


def agent_posts(port, duration, every):
    import requests

    url = "http://127.0.0.1:%d/api/v1/batches" % port
    lat, codes = [], {}
    seq = 0
    end = time.monotonic() + duration
    with requests.Session() as s:
        while time.monotonic() < end:
            t0 = time.monotonic()
            try:
                r = s.post(url, data=batch_body("bench", seq), headers={"Content-Type": "application/json"},
                           timeout=10)
                code = r.status_code
                if code == 200:
                    seq += 100
            except requests.RequestException as e:
                code = type(e).__name__
            dt = time.monotonic() - t0
            lat.append(dt)
            codes[code] = codes.get(code, 0) + 1
            time.sleep(max(0.0, every - dt))
    return lat, codes


def pct(values, q):
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))] if v else float("nan")


def run_one(kind, args):
    tmp = tempfile.mkdtemp(prefix="slowloris-")
    port = free_port()
    root = args.root if kind == "builtin" else ROOT
    server = start(kind, port, tmp, root, args.workers)
    try:
        cpu0 = tree_cpu(server.pid)
        until = time.monotonic() + args.interval + 1 + args.duration + 2
        attacker = subprocess.Popen([PY, os.path.abspath(__file__), "--attack-port", str(port),
                                     "--attackers", str(args.attackers), "--interval", str(args.interval),
                                     "--attack-until", str(until - time.monotonic())],
                                    stdout=subprocess.PIPE, text=True)
        time.sleep(args.interval + 1)  # every attacker connected and into its head
        lat, codes = agent_posts(port, args.duration, args.post_every)
        out = attacker.communicate(timeout=args.duration + args.interval + 30)[0]
        astats = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
        cpu = tree_cpu(server.pid) - cpu0
        rss = procinfo.rss_kb(server.pid)
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"kind": kind, "posts": len(lat), "ok": codes.get(200, 0), "503": codes.get(503, 0),
            "failed": len(lat) - codes.get(200, 0) - codes.get(503, 0), "codes": codes,
            "p50": pct(lat, 0.5), "p99": pct(lat, 0.99), "max": max(lat) if lat else float("nan"),
            "cpu": cpu, "rss": rss, "attack": astats}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attackers", type=int, default=200)
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between an attacker's bytes")
    ap.add_argument("--duration", type=float, default=40.0, help="seconds of agent posts under attack")
    ap.add_argument("--post-every", type=float, default=1.0)
    ap.add_argument("--servers", default="builtin,waitress,waitress-tuned")
    ap.add_argument("--workers", type=int, default=1, help="modbus-collector --workers (builtin only)")
    ap.add_argument("--root", default=ROOT, help="checkout whose built-in server is measured")
    ap.add_argument("--attack-port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--attack-until", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.attack_port:
        return attack(args.attack_port, args.attackers, args.interval, time.monotonic() + args.attack_until)
    print("slowloris: %d connections from 127.0.0.1, one head byte every %gs; the agent posts a 100-record batch "
          "every %gs for %gs (timeout 10 s)" % (args.attackers, args.interval, args.post_every, args.duration))
    if args.root != ROOT:
        print("builtin measured from %s" % args.root)
    rows = []
    for kind in args.servers.split(","):
        try:
            import waitress  # noqa: F401
        except ImportError:
            if kind.startswith("waitress"):
                print("%s: skipped (waitress not installed)" % kind)
                continue
        r = run_one(kind, args)
        rows.append(r)
        print("  %-15s done: %s" % (kind, r["codes"]), flush=True)
    print()
    print("%-15s %6s %6s %6s %7s %8s %8s %8s %7s %8s %9s" % ("server", "posts", "200", "503", "failed", "p50 ms",
                                                          "p99 ms", "max ms", "cpu s", "rss MB", "att.conn"))
    for r in rows:
        print("%-15s %6d %6d %6d %7d %8.1f %8.1f %8.1f %7.2f %8.1f %9s" % (
            r["kind"], r["posts"], r["ok"], r["503"], r["failed"], r["p50"] * 1000, r["p99"] * 1000,
            r["max"] * 1000, r["cpu"], r["rss"] / 1024.0, r["attack"].get("connects", "?")))
    base = next((r for r in rows if r["kind"] == "builtin"), None)
    if base and base["p99"] > 0:
        for r in rows:
            if r is not base:
                print("p99 %s / builtin: %.1fx; posts refused or failed: builtin %d of %d, %s %d of %d" % (
                    r["kind"], r["p99"] / base["p99"], base["posts"] - base["ok"], base["posts"], r["kind"],
                    r["posts"] - r["ok"], r["posts"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
