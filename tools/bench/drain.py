#!/usr/bin/env python3
"""Drain benchmark: records/s uploaded from a full spool to a collector over loopback.

    .venv/bin/python tools/bench/drain.py [--records N] [--server collector|sink|both]

The spool is filled with N realistic meter records (a day of backlog for 20 devices at 10 s is
172 800), then Uploader.drain() empties it in batches of 500 (batch_max_kb 256), gzip on and off.
Peers, each in its own process so they do not share the agent's GIL:
  collector  the real collector (agent/collector, SQLite file, its keep-alive server)
  sink       a stdlib http.server that parses and deduplicates by seq in memory (an upper bound
             for the agent side: what the agent can push when the collector is not the limit)
Also prints gzip level 1/6/9 on one 500-record body (time and ratio): the agent uses level 1.
"""
import argparse
import gzip
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, ROOT)

from agent.record import data_record  # noqa: E402
from agent.spool import Spool  # noqa: E402
from agent.upload import Uploader  # noqa: E402

AGENT = "site7-rut200"


def values(i):
    """A three-phase meter whose readings move (identical records would flatter gzip)."""
    k = (i * 7919) % 1000
    return {"voltage_l1": 229.0 + k % 31 / 10, "voltage_l2": 230.0 + k % 17 / 10, "voltage_l3": 231.0 - k % 23 / 10,
            "current_l1": round(4.0 + k / 997, 3), "current_l2": round(3.5 + k / 991, 3), "current_l3": round(4.1 + k / 983, 3),
            "power": round(2700.0 + k * 1.37, 1), "energy": round(1234567.8 + i * 0.21, 2),
            "frequency": 49.95 + k % 11 / 100, "pf": round(0.9 + k % 97 / 1000, 3)}

SINK = textwrap.dedent("""
    import gzip, json, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    seen = set()
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True
        def log_message(self, *a):
            pass
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            recs = json.loads(body)["records"]
            dups = 0
            for r in recs:
                if r["seq"] in seen:
                    dups += 1
                seen.add(r["seq"])
            out = json.dumps({"stored": len(recs) - dups, "duplicates": dups, "max_seq": max(seen)}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError("server exited: %s" % proc.returncode)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not listen on %d" % port)


def start(kind, tmp):
    port = free_port()
    if kind == "sink":
        cmd = [sys.executable, "-c", SINK, str(port)]
    else:
        cmd = [sys.executable, "-m", "agent.collector.cli", "--listen", "127.0.0.1:%d" % port,
               "--db", "sqlite:///%s" % os.path.join(tmp, "collector-%d.db" % port), "--log-level", "WARNING"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, p)
    return p, "http://127.0.0.1:%d/api/v1/batches" % port


def fill(d, n):
    sp = Spool(d, AGENT, max_bytes=1 << 30, fsync="interval")
    t = 1795000000.0
    for i in range(n):
        sp.append(data_record(AGENT, t + i * 0.5, "meter%d" % (i % 20), 1 + i % 20, values(i)))
    return sp


def run(kind, n, use_gzip, tmp, reopen):
    p, url = start(kind, tmp)
    d = tempfile.mkdtemp(prefix="drain-", dir=tmp)
    try:
        sp = fill(d, n)
        if reopen:
            # After a restart every line is JSON-checked once before it is sent (corrupt lines are
            # skipped there, not sent to poison a batch): the slower, usual catch-up case.
            sp.close()
            sp = Spool(d, AGENT, max_bytes=1 << 30, fsync="interval")
        up = Uploader(url, AGENT, batch_max_records=500, batch_max_kb=256, gzip=use_gzip, timeout=30.0)
        c0, t0 = time.process_time(), time.perf_counter()
        res = up.drain(sp, time.monotonic() + 600)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        st = up.state()
        assert res["status"] == "empty" and res["sent"] == n, (res, st)
        sp.close()
        return n / dt, cpu / n * 1e6, st["bytes_sent_total"] / n, st["duplicates_total"]
    finally:
        p.terminate()
        p.wait(10)
        shutil.rmtree(d, ignore_errors=True)


def gzip_levels():
    sp_dir = tempfile.mkdtemp(prefix="gz-")
    try:
        sp = fill(sp_dir, 500)
        b = sp.peek(500, 1 << 20)
        body = b'{"agent":"%s","records":[' % AGENT.encode() + b",".join(b.lines) + b"]}"
        sp.close()
    finally:
        shutil.rmtree(sp_dir, ignore_errors=True)
    rows = []
    for level in (1, 6, 9):
        reps = 20
        t0 = time.perf_counter()
        for _ in range(reps):
            z = gzip.compress(body, level)
        rows.append((level, (time.perf_counter() - t0) / reps * 1000, len(body) / len(z), len(body)))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=172800)
    ap.add_argument("--server", choices=("collector", "sink", "both"), default="both")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-drain-", dir=".")
    try:
        print("drain benchmark: Python %s, %d records, batches of 500, loopback" % (sys.version.split()[0], args.records))
        print("  %-10s %-5s %-10s %10s %16s %14s %5s" % (
            "peer", "gzip", "spool", "records/s", "agent CPU us/rec", "wire bytes/rec", "dups"))
        kinds = ("collector", "sink") if args.server == "both" else (args.server,)
        for kind in kinds:
            for use_gzip, reopen in ((True, True), (True, False), (False, True)):
                rate, cpu, wire, dups = run(kind, args.records, use_gzip, tmp, reopen)
                print("  %-10s %-5s %-10s %10.0f %16.1f %14.1f %5d" % (
                    kind, "on" if use_gzip else "off", "reopened" if reopen else "live", rate, cpu, wire, dups))
        print("\ngzip of one 500-record body:")
        for level, ms, ratio, size in gzip_levels():
            print("  level %d: %6.2f ms for %d bytes, ratio %.1f" % (level, ms, size, ratio))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
