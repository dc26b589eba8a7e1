#!/usr/bin/env python3
"""Spool benchmark: append rate per fsync mode, read (peek+ack) rate, and flash writes per record.

    .venv/bin/python tools/bench/spool.py [--dir DIR] [--records N] [--cycles C]

Append rate: records/s appended in a tight loop (tick() every 20 appends, like a 20-device cycle).
Flash: a simulated site of 20 devices polled every 1 s (simulated clocks, so fsync_interval means
what it says), offline (backlog grows) and online (everything uploaded after every cycle), counting
the bytes the kernel was asked to write to storage (/proc/self/io write_bytes: page-granular, so a
4 kB page rewritten by each fsync counts 4 kB each time, which is what a flash block sees) and the
number of fsync calls. Run it on the filesystem you care about (--dir); tmpfs writes nothing.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
import tracemalloc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from agent.record import data_record
from agent.spool import Spool

AGENT = "site7-rut200"
VALUES = {"voltage_l1": 230.1, "voltage_l2": 229.8, "voltage_l3": 231.0, "current_l1": 4.25,
          "current_l2": 3.9, "current_l3": 4.01, "power": 2741.5, "energy": 1234567.8,
          "frequency": 50.01, "pf": 0.97}


def make_record(t, i):
    return data_record(AGENT, t, "meter%d" % (i % 20), 1 + i % 20, VALUES)


def write_bytes():
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class FsyncCounter:
    """Count fsync/fdatasync calls made by the spool."""

    def __init__(self):
        self.n = 0
        self._fsync, self._fdatasync = os.fsync, os.fdatasync

    def __enter__(self):
        def fs(fd):
            self.n += 1
            return self._fsync(fd)

        def fds(fd):
            self.n += 1
            return self._fdatasync(fd)

        os.fsync, os.fdatasync = fs, fds
        return self

    def __exit__(self, *exc):
        os.fsync, os.fdatasync = self._fsync, self._fdatasync


def bench_append(base, mode, n):
    d = tempfile.mkdtemp(prefix="spool-%s-" % mode, dir=base)
    sp = Spool(d, AGENT, max_bytes=1 << 30, fsync=mode, fsync_interval=5.0)
    recs = [make_record(1795000000.0 + i, i) for i in range(min(n, 1000))]
    t0 = time.perf_counter()
    for i in range(n):
        r = recs[i % len(recs)]
        sp.append(r)
        if i % 20 == 19:
            sp.tick()
    dt = time.perf_counter() - t0
    nbytes = sp.bytes_written
    # Reading it back: peek + ack in upload-sized batches.
    t1 = time.perf_counter()
    got = 0
    while True:
        b = sp.peek(500, 256 << 10)
        if b is None:
            break
        got += b.count
        sp.ack(b)
    dr = time.perf_counter() - t1
    sp.close()
    shutil.rmtree(d)
    assert got == n, (got, n)
    return n / dt, nbytes / n, got / dr


def bench_flash(base, mode, cycles, online, devices=20):
    d = tempfile.mkdtemp(prefix="flash-%s-" % mode, dir=base)
    sim = [1795000000.0]
    mono = [1000.0]
    sp = Spool(d, AGENT, max_bytes=1 << 30, fsync=mode, fsync_interval=5.0,
               clock=lambda: sim[0], monotonic=lambda: mono[0])
    os.sync()
    w0 = write_bytes()
    with FsyncCounter() as fc:
        for _c in range(cycles):
            for i in range(devices):
                sp.append(make_record(sim[0], i))
            if online:
                while True:
                    b = sp.peek(500, 256 << 10)
                    if b is None:
                        break
                    sp.ack(b)
            sp.tick(sim[0])
            sim[0] += 1.0
            mono[0] += 1.0
        sp.close()
        fsyncs = fc.n
    os.sync()
    w1 = write_bytes()
    n = cycles * devices
    logical = sp.bytes_written / n
    shutil.rmtree(d)
    wb = (w1 - w0) / n if w0 is not None and w1 is not None else None
    return logical, wb, fsyncs / cycles


def bench_full(base, max_mb=16):
    """A spool at its default bound (16 MB: a day of backlog for a small site), reopened after a
    restart: open time (scans every segment), drain time in upload batches (every line from an
    earlier run is JSON-checked once), and the Python memory peak while opening and draining a
    copy of it under tracemalloc (memory must not grow with the backlog)."""
    d = tempfile.mkdtemp(prefix="full-", dir=base)
    sp = Spool(d, AGENT, max_bytes=max_mb << 20, fsync="never")
    i = 0
    while sp.stats()["dropped"] == 0:
        sp.append(make_record(1795000000.0 + i, i))
        i += 1
    sp.close()
    copy = d + "-copy"
    shutil.copytree(d, copy)

    def drain(sp):
        while True:
            b = sp.peek(500, 256 << 10)
            if b is None:
                return
            sp.ack(b)

    t0 = time.perf_counter()
    sp = Spool(d, AGENT, max_bytes=max_mb << 20, fsync="never")
    t_open = time.perf_counter() - t0
    st = sp.stats()
    t0 = time.perf_counter()
    drain(sp)
    t_drain = time.perf_counter() - t0
    sp.close()
    tracemalloc.start()
    sp = Spool(copy, AGENT, max_bytes=max_mb << 20, fsync="never")
    _, peak_open = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    drain(sp)
    _, peak_drain = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    sp.close()
    shutil.rmtree(d)
    shutil.rmtree(copy)
    return st["records"], st["bytes"], st["segments"], t_open, peak_open, t_drain, peak_drain


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="where to put the spools (default: a temp dir in the cwd's filesystem)")
    ap.add_argument("--records", type=int, default=200000, help="records for the append rate (interval/never)")
    ap.add_argument("--cycles", type=int, default=1800, help="simulated 1 s cycles of 20 devices for the flash figures")
    args = ap.parse_args()
    base = args.dir or tempfile.mkdtemp(prefix="bench-spool-", dir=".")
    own = args.dir is None
    try:
        print("spool benchmark: Python %s, record %d bytes, dir %s" % (
            sys.version.split()[0], len(make_record(1795000000.0, 0).__repr__()), os.path.abspath(base)))
        print("\nappend rate (tight loop, tick every 20 appends) and read-back rate (peek 500 + ack):")
        print("  %-9s %10s %12s %12s %14s" % ("fsync", "records", "append/s", "bytes/rec", "peek+ack/s"))
        for mode, n in (("never", args.records), ("interval", args.records), ("always", max(1000, args.records // 100))):
            rate, bpr, rrate = bench_append(base, mode, n)
            print("  %-9s %10d %12.0f %12.1f %14.0f" % (mode, n, rate, bpr, rrate))
        print("\nflash: 20 devices x 1 s cycle, simulated clocks, fsync_interval 5 s")
        print("  %-9s %-8s %8s %14s %18s %14s" % ("fsync", "upload", "records", "line bytes/rec", "storage bytes/rec", "fsyncs/cycle"))
        for mode in ("never", "interval", "always"):
            for online in (False, True):
                cycles = args.cycles if mode != "always" else max(50, args.cycles // 10)
                logical, wb, fpc = bench_flash(base, mode, cycles, online)
                print("  %-9s %-8s %8d %14.1f %18s %14.2f" % (
                    mode, "online" if online else "offline", cycles * 20, logical,
                    "%.1f" % wb if wb is not None else "n/a", fpc))
        n, nbytes, segs, t_open, peak_open, t_drain, peak_drain = bench_full(base)
        print("\nfull spool (16 MB bound, %d records in %d segments, %.1f MB) after a restart:" % (
            n, segs, nbytes / 1e6))
        print("  open (scan) %.2f s, Python memory peak %.0f kB; read+ack all in batches of 500: %.2f s"
              " (%.0f records/s), memory peak %.0f kB" % (t_open, peak_open / 1024, t_drain, n / t_drain,
                                                          peak_drain / 1024))
    finally:
        if own:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
