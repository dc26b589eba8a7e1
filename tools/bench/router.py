#!/usr/bin/env python3
"""The agent inside a RUT200's CPU and memory budget, enforced by the kernel.

    nice .venv/bin/python tools/bench/router.py                  # every scenario, today's tree vs --base
    nice .venv/bin/python tools/bench/router.py --scenario steady --duration 60
    nice .venv/bin/python tools/bench/router.py --ratio 40       # a router twice as slow as assumed

The router, simulated (see CALIBRATION below for the numbers and why):
  * CPU: the agent's process gets 1/RATIO of one core of this machine, as a CFS quota of
    1 ms per RATIO ms (cgroup v1 `cpu` or v2 `cpu.max`; 1 ms is the kernel's smallest quota, so
    this is the shortest period and the smoothest throttle there is). "CPU share" below is the
    agent's share of that whole simulated router CPU.
  * memory: a cgroup memory limit (default 48 MB) on the agent's process, interpreter included;
    the RSS figures are x86-64's, where every object is ~1.6x its size on 32-bit MIPS (the
    tracemalloc probe of tools/cross-test measures both), so the limit is conservative.
  * Without cgroups (no permission, no controller), a fallback: RLIMIT_AS for memory and a
    governor that SIGSTOPs/SIGCONTs the agent to hold its CPU share; labelled as such.
Peers run natively and outside the budget: tools/simulator.py (20 `generic` units on Modbus TCP,
4 energy meters on a pty at 9600 baud), the real collector (SQLite). The agent runs from a
compiled copy of `agent/` (as installed on a router), once per tree: `--base REV` (default the
round's base) and the working tree, side by side in one run.

Scenarios:
  steady   20 devices x 50 points at 1 s (TCP) + 4 RTU meters, collector up: poll start jitter
           p50/p99, missed cycles, CPU share, RSS, delivery latency p50/p99
  backlog  the same, starting with an hour's records already in the spool (the collector was
           down for an hour): cadence during the catch-up and how long it takes
  startup  process start to first poll and to first upload, and the costliest imports
           (-X importtime, unbudgeted: the import tree is the same, its cost scales)
  memory   RSS with 1,000 points, and the largest site that fits in the memory limit
  cost     router CPU per poll and per point (the constants of agent/cpucost.py, for `check`)
"""
import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "tools" / "bench"))
sys.path.insert(0, str(ROOT / "tools"))
from proc import cpu_seconds  # noqa: E402

BASE_REV = "7f113aa"   # main when issue 16 was measured (the round's base)

CALIBRATION = """\
Calibration (x86 core of this machine -> MT7628, 580 MHz MIPS 24KEc, no FPU):
  * CoreMark: this VM's core scored {x86_coremark} (gcc 12 -O2, measured under the other
    engineers' load; run tools/bench/router.py --coremark PATH/coremark.exe to re-measure). A
    24KEc at 580 MHz is taken as ~1,050 (about 1.8 CoreMark/MHz, the class of single-issue
    in-order 32-bit cores: the Raspberry Pi 1's ARM1176 at 700 MHz scores 1,357 in
    fm4dd/sbc-benchmarks). CoreMark ratio: ~{cm_ratio:.0f}x.
  * CPython suffers more than CoreMark on such a core: CoreMark fits in L1, the interpreter's
    working set does not (32 KiB D-cache, DDR2); and OpenWrt's mipsel_24kc is soft-float, so
    every float (float32 points, scale=, decimals=, JSON repr) runs as library calls. x2 for that.
  * Assumed ratio: {ratio:g}x, i.e. the whole router CPU = {share:.1f}% of one core here.
    --ratio {ratio2:g} shows a router twice as bad."""

DEFAULT_RATIO = 20.0
X86_COREMARK = 9490   # measured on this VM (2 shared cores, load ~4): see CALIBRATION

METER_POINTS = """\
voltage_l1    = input 0 float32 CDAB unit=V decimals=1
voltage_l2    = input 2 float32 CDAB unit=V decimals=1
voltage_l3    = input 4 float32 CDAB unit=V decimals=1
current_l1    = input 6 float32 CDAB unit=A decimals=2
current_l2    = input 8 float32 CDAB unit=A decimals=2
current_l3    = input 10 float32 CDAB unit=A decimals=2
power_total   = input 18 float32 CDAB unit=W decimals=0
power_factor  = input 20 float32 CDAB decimals=3
frequency     = input 22 float32 CDAB unit=Hz decimals=2
energy_import = input 24 float32 CDAB unit=kWh decimals=3
"""


def generic_points(n):
    """n points on a `generic` unit: a mix like a PLC's (uint16, scaled int16, uint32)."""
    out, reg = [], 0
    for i in range(n):
        kind = i % 3
        if kind == 0:
            out.append("p%d = holding %d uint16" % (i, reg))
            reg += 1
        elif kind == 1:
            out.append("p%d = holding %d int16 scale=0.1" % (i, reg))
            reg += 1
        else:
            out.append("p%d = holding %d uint32" % (i, reg))
            reg += 2
    return out, reg


# ------------------------------------------------------------------------------ the budget


class Budget:
    """A CPU share of one core and a memory limit for one process tree."""

    def __init__(self, ratio, mem_mb, name):
        self.ratio, self.mem_mb, self.name = ratio, mem_mb, name
        self.share = 1.0 / ratio
        self.period_us = int(round(1000 * ratio))     # quota 1 ms (the kernel's minimum)
        self.quota_us = 1000
        self.dirs = []
        self.kind, self.why = None, ""
        self._gov = None
        self._setup()

    def _setup(self):
        v1cpu, v1mem = Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup/memory")
        v2 = Path("/sys/fs/cgroup")
        errors = []
        if (v1cpu / "cpu.cfs_quota_us").exists() and (v1mem / "memory.limit_in_bytes").exists():
            try:
                c, m = v1cpu / self.name, v1mem / self.name
                c.mkdir(exist_ok=True)
                self.dirs.append(c)
                m.mkdir(exist_ok=True)
                self.dirs.append(m)
                (c / "cpu.cfs_period_us").write_text(str(self.period_us))
                (c / "cpu.cfs_quota_us").write_text(str(self.quota_us))
                (m / "memory.limit_in_bytes").write_text(str(self.mem_mb << 20))
                if (m / "memory.memsw.limit_in_bytes").exists():
                    (m / "memory.memsw.limit_in_bytes").write_text(str(self.mem_mb << 20))
                self.procs = [c / "cgroup.procs", m / "cgroup.procs"]
                self.kind = "cgroup v1 (cpu.cfs_quota_us %d / cfs_period_us %d, memory.limit_in_bytes %d MB)" % (
                    self.quota_us, self.period_us, self.mem_mb)
                self.cpu_dir, self.mem_dir = c, m
                return
            except OSError as e:
                errors.append("cgroup v1: %s" % e)
                self.close()
        ctl = v2 / "cgroup.controllers"
        if ctl.exists() and {"cpu", "memory"} <= set(ctl.read_text().split()):
            try:
                d = v2 / self.name
                d.mkdir(exist_ok=True)
                self.dirs.append(d)
                (d / "cpu.max").write_text("%d %d" % (self.quota_us, self.period_us))
                (d / "memory.max").write_text(str(self.mem_mb << 20))
                self.procs = [d / "cgroup.procs"]
                self.kind = "cgroup v2 (cpu.max %d %d, memory.max %d MB)" % (self.quota_us, self.period_us, self.mem_mb)
                self.cpu_dir = self.mem_dir = d
                return
            except OSError as e:
                errors.append("cgroup v2: %s" % e)
                self.close()
        else:
            errors.append("no cgroup v2 with the cpu and memory controllers")
        self.why = "; ".join(errors)
        self.kind = ("FALLBACK (no usable cgroup: %s): RLIMIT_AS %d MB + a SIGSTOP/SIGCONT governor "
                     "holding %.1f%% of a core" % (self.why, self.mem_mb, 100 * self.share))
        self.procs = []

    def preexec(self):
        """In the child, before exec: join the cgroups (or set RLIMIT_AS)."""
        pid = str(os.getpid())
        for p in self.procs:
            with open(p, "w") as f:
                f.write(pid)
        if not self.procs:
            import resource

            lim = self.mem_mb << 20
            resource.setrlimit(resource.RLIMIT_AS, (lim, lim))

    def watch(self, pid):
        """The fallback's governor: every 10 ms, stop the process while it is ahead of its share."""
        if self.procs:
            return
        stop = threading.Event()

        def run():
            t0, c0 = time.monotonic(), cpu_seconds(pid)
            while not stop.is_set():
                try:
                    used = cpu_seconds(pid) - c0
                except OSError:
                    return
                ahead = used - self.share * (time.monotonic() - t0)
                if ahead > 0:
                    os.kill(pid, signal.SIGSTOP)
                    time.sleep(ahead / self.share)
                    try:
                        os.kill(pid, signal.SIGCONT)
                    except OSError:
                        return
                time.sleep(0.01)

        self._gov = stop
        threading.Thread(target=run, daemon=True).start()

    def unwatch(self):
        if self._gov:
            self._gov.set()
            self._gov = None

    def stats(self):
        out = {}
        try:
            if (self.cpu_dir / "cpu.stat").exists():
                for line in (self.cpu_dir / "cpu.stat").read_text().splitlines():
                    k, v = line.split()
                    out[k] = int(v)
            m = self.mem_dir
            if (m / "memory.max_usage_in_bytes").exists():
                out["mem_max_bytes"] = int((m / "memory.max_usage_in_bytes").read_text())
                out["mem_failcnt"] = int((m / "memory.failcnt").read_text())
                for line in (m / "memory.oom_control").read_text().splitlines():
                    k, v = line.split()
                    if k == "oom_kill":
                        out["oom_kill"] = int(v)
            elif (m / "memory.peak").exists():
                out["mem_max_bytes"] = int((m / "memory.peak").read_text())
                for line in (m / "memory.events").read_text().splitlines():
                    k, v = line.split()
                    if k == "oom_kill":
                        out["oom_kill"] = int(v)
        except (AttributeError, OSError, ValueError):
            pass
        return out

    def reset(self):
        try:
            if (self.mem_dir / "memory.max_usage_in_bytes").exists():
                (self.mem_dir / "memory.max_usage_in_bytes").write_text("0")
        except (AttributeError, OSError):
            pass

    def close(self):
        self.unwatch()
        # an agent still in the cgroup (the bench was interrupted): it is ours, end it
        for d in self.dirs:
            try:
                pids = [int(x) for x in (d / "cgroup.procs").read_text().split()]
            except (OSError, ValueError):
                pids = []
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        for d in reversed(self.dirs):
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
        self.dirs = []


# ------------------------------------------------------------------------------ the site


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout, what, interval=0.05):
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise TimeoutError("timed out after %.0fs waiting for %s" % (timeout, what))
        time.sleep(interval)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class Peers:
    """The simulator (TCP + one pty) and the collector, native and unbudgeted."""

    def __init__(self, tmp, tcp_units, regs, meters):
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        ready = tmp / "sim.json"
        devs = ["--device", "generic:1-%d:%d" % (tcp_units, max(regs, 1))] if tcp_units else []
        if meters:
            devs += ["--device", "meter:%d-%d" % (tcp_units + 1, tcp_units + meters)]
        self.procs = [subprocess.Popen([sys.executable, str(ROOT / "tools" / "simulator.py"), "serve", "--tcp", "0",
                                        "--rtu", "--quiet", "--ready-file", str(ready)] + devs,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)]
        try:
            self._start(tmp, env, ready)
        except BaseException:
            self.stop()         # nothing left running when a peer does not come up
            raise

    def _start(self, tmp, env, ready):
        self.sim = wait_for(lambda: read_json(ready), 120, "the simulator")
        self.port = free_port()
        self.db = tmp / "collector.db"
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "agent.collector.cli", "--listen", "127.0.0.1:%d" % self.port,
             "--db", "sqlite:///%s" % self.db, "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=str(tmp)))
        wait_for(self.healthy, 120, "the collector")
        self.url = "http://127.0.0.1:%d/api/v1/batches" % self.port

    def healthy(self):
        import urllib.request

        try:
            with urllib.request.urlopen("http://127.0.0.1:%d/health" % self.port, timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def rows(self, agent):
        """(seq, kind, device, ts seconds, received seconds) of every stored record of `agent`."""
        con = sqlite3.connect(str(self.db), timeout=30)
        try:
            rows = con.execute("SELECT seq, kind, device, ts, received FROM records WHERE agent = ?",
                               (agent,)).fetchall()
        except sqlite3.OperationalError:
            rows = []
        finally:
            con.close()
        return [(s, k, d, parse_ts(t), r) for s, k, d, t, r in rows]

    def max_seq(self, agent):
        con = sqlite3.connect(str(self.db), timeout=30)
        try:
            r = con.execute("SELECT max(seq), count(*) FROM records WHERE agent = ?", (agent,)).fetchone()
        except sqlite3.OperationalError:
            r = (None, 0)
        finally:
            con.close()
        return (r[0] or 0), r[1]

    def stop(self):
        for p in reversed(self.procs):
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def parse_ts(text):
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def site_ini(tmp, agent, peers, tcp_units, points, meters, interval=1.0, upload=True, extra=()):
    lines = ["[agent]", "id = %s" % agent, "interval = %gs" % interval, "spool_dir = %s/spool-%s" % (tmp, agent),
             "status_file = %s/status-%s.json" % (tmp, agent), "fsync = interval", "fsync_interval = 5s",
             "summary_interval = 10m", "health_interval = 10m", "log_level = warning",
             "spool_max_mb = 128"] + list(extra) + [""]
    if upload:
        lines += ["[upload]", "url = %s" % peers.url, "gzip = yes", "batch_max_records = 500", "timeout = 10s",
                  "backoff_max = 5s", ""]
    if tcp_units:
        lines += ["[connection:plc]", "type = tcp", "host = 127.0.0.1", "port = %d" % peers.sim["tcp_port"],
                  "timeout = 2s", ""]
    if meters:
        lines += ["[connection:bus]", "type = rtu", "port = %s" % peers.sim["rtu_path"], "baud = 9600",
                  "timeout = 1s", ""]
    pts, _regs = generic_points(points)
    for u in range(1, tcp_units + 1):
        lines += ["[device:d%02d]" % u, "connection = plc", "unit = %d" % u, "", "[points:d%02d]" % u] + pts + [""]
    for k in range(meters):
        u = tcp_units + 1 + k
        lines += ["[device:m%02d]" % u, "connection = bus", "unit = %d" % u, "", "[points:m%02d]" % u,
                  METER_POINTS]
    path = Path(tmp) / ("%s.ini" % agent)
    path.write_text("\n".join(lines))
    return path


def tree_probe(lib, cwd):
    """Which agent/ a child with this PYTHONPATH imports, and the CRC table it builds there."""
    code = "import agent.modbus.crc as c; print(c.__file__)"
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(lib)), cwd=str(cwd),
                       capture_output=True, text=True, check=True)
    return r.stdout.strip()


def prepare_tree(spec, tmp):
    """A compiled copy of `agent/` (no collector), from a git revision or a directory."""
    lib = Path(tmp) / ("lib-" + spec.replace("/", "_"))
    if lib.exists():
        return lib
    lib.mkdir(parents=True)
    if Path(spec).is_dir():
        subprocess.run(["cp", "-r", str(Path(spec) / "agent"), str(lib)], check=True)
    else:
        arch = subprocess.run(["git", "-C", str(ROOT), "archive", spec, "agent"], capture_output=True, check=True)
        subprocess.run(["tar", "x", "-C", str(lib)], input=arch.stdout, check=True)
    subprocess.run(["rm", "-rf", str(lib / "agent" / "collector")], check=True)
    subprocess.run(["find", str(lib), "-name", "__pycache__", "-prune", "-exec", "rm", "-rf", "{}", "+"], check=True)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(lib)], check=True)
    return lib


def prefill(lib, ini, seconds, agent_devices):
    """An hour (`seconds`) of records in the agent's spool, as its polls would have written them."""
    code = r'''
import sys, time
from agent.config import load_config
from agent.loop import open_spool
from agent.record import data_record
cfg = load_config(sys.argv[1])
sp = open_spool(cfg)
now = time.time()
n = int(float(sys.argv[2]))
vals = {}
for d in cfg.devices:
    vals[d.name] = {p.name: (i % 7) * 1.5 if "scale" in repr(p) else i for i, p in enumerate(d.points)}
for k in range(n):
    t = now - n + k
    for d in cfg.devices:
        sp.append(data_record(cfg.agent.id, t, d.name, d.unit, dict(vals[d.name])))
sp.close()
print(n * len(cfg.devices))
'''
    env = dict(os.environ, PYTHONPATH=str(lib))
    r = subprocess.run([sys.executable, "-c", code, str(ini), str(seconds)], env=env, capture_output=True,
                       text=True, check=True, cwd=str(Path(ini).parent))
    return int(r.stdout.strip())


def pct(values, q):
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100.0 * (len(v) - 1))))]


def lateness(rows, interval, since, until):
    """Per-device poll start lateness (s) against its own slot grid, within [since, until].

    The grid's phase is not known (the schedule's origin is the loop's start, and the first poll
    of a device may be off it), so: centre each device's start times on their circular mean
    phase, take the 5th percentile as "on the slot" (the agent never polls before a slot), and
    count how far each start is behind it."""
    import math

    by_dev = {}
    for _s, kind, dev, ts, _r in rows:
        if kind == "data" and dev and since <= ts <= until:
            by_dev.setdefault(dev, []).append(ts)
    out = []
    for ts in by_dev.values():
        if len(ts) < 3:
            continue
        ang = [2 * math.pi * (t % interval) / interval for t in ts]
        phase = math.atan2(sum(map(math.sin, ang)), sum(map(math.cos, ang))) / (2 * math.pi) * interval
        d = [((t - phase + interval / 2) % interval) - interval / 2 for t in ts]
        on_slot = pct(d, 5)
        out += [max(0.0, x - on_slot) for x in d]
    return out


class Run:
    """One budgeted `modbus-agent run` of one tree."""

    def __init__(self, lib, ini, budget, log, importtime=False):
        self.ini = ini
        env = dict(os.environ, PYTHONPATH=str(lib), PYTHONDONTWRITEBYTECODE="1")
        argv = [sys.executable] + (["-X", "importtime"] if importtime else []) + ["-m", "agent", "run", "-c", str(ini)]
        self.t0 = time.time()
        self.m0 = time.monotonic()
        self.log = log
        with open(log, "wb") as f:
            # cwd: the INI's directory, never a source tree (`-m agent` puts the cwd first on sys.path)
            self.p = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=f, cwd=str(Path(ini).parent),
                                      preexec_fn=budget.preexec if budget else None)
        if budget:
            budget.watch(self.p.pid)
        self.budget = budget

    def cpu(self):
        try:
            return cpu_seconds(self.p.pid)
        except OSError:
            return float("nan")

    def status_mem(self):
        out = {}
        try:
            with open("/proc/%d/status" % self.p.pid) as f:
                for line in f:
                    if line.startswith(("VmRSS:", "VmHWM:")):
                        out[line.split(":")[0]] = int(line.split()[1])
        except OSError:
            pass
        return out

    def alive(self):
        return self.p.poll() is None

    def stop(self):
        if self.budget:
            self.budget.unwatch()
        if self.alive():
            self.p.send_signal(signal.SIGCONT)
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(60)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        return self.p.returncode


def missed(status):
    return sum(d.get("missed_cycles", 0) for d in (status or {}).get("devices", {}).values())


def measure_window(run, peers, agent, status_path, interval, seconds, ratio):
    """Steady window: CPU, RSS, missed cycles, jitter, delivery latency."""
    s0 = read_json(status_path)
    c0, w0 = run.cpu(), time.time()
    time.sleep(seconds)
    c1, w1 = run.cpu(), time.time()
    s1 = read_json(status_path)
    mem = run.status_mem()
    time.sleep(3.0)    # the window's last records reach the collector
    rows = peers.rows(agent)
    late = lateness(rows, interval, w0, w1)
    lat = [r - ts for _s, kind, _d, ts, r in rows if kind == "data" and w0 <= ts <= w1]
    return {
        "cpu_share": (c1 - c0) / (w1 - w0) * ratio,
        "missed": missed(s1) - missed(s0),
        "jitter_p50_ms": 1000 * pct(late, 50), "jitter_p99_ms": 1000 * pct(late, 99),
        "latency_p50_s": pct(lat, 50), "latency_p99_s": pct(lat, 99),
        "records": len(lat), "rss_mb": mem.get("VmRSS", 0) / 1024.0, "hwm_mb": mem.get("VmHWM", 0) / 1024.0,
    }


# ------------------------------------------------------------------------------ scenarios


def scenario_steady(a, trees, peers, tmp, backlog=False):
    results = {}
    for name, lib in trees:
        agent = "%s-%s" % ("backlog" if backlog else "steady", name)
        ini = site_ini(tmp, agent, peers, a.devices, a.points, a.meters)
        pre = prefill(lib, ini, a.backlog_minutes * 60, a.devices + a.meters) if backlog else 0
        budget = Budget(a.ratio, a.mem_mb, "modbus-router-bench-%d" % os.getpid())
        try:
            run = Run(lib, ini, budget, tmp / ("%s.log" % agent))
            status = tmp / ("status-%s.json" % agent)
            wait_for(lambda s=status, r=run: read_json(s) or not r.alive(), 120, "the agent's loop")
            res = {"backlog_records": pre}
            if backlog:
                last_pre = None
                # the prefilled records are the first `pre` seqs: caught up once the collector
                # holds that many records that are older than the start
                t_start = run.t0
                deadline = time.monotonic() + a.max_catchup
                c0 = run.cpu()
                s0 = read_json(status)
                while time.monotonic() < deadline and run.alive():
                    con = sqlite3.connect(str(peers.db), timeout=30)
                    try:
                        n_old = con.execute("SELECT count(*) FROM records WHERE agent = ? AND received > 0 AND ts < ?",
                                            (agent, datetime.fromtimestamp(t_start, timezone.utc).strftime(
                                                "%Y-%m-%dT%H:%M:%S.000Z"))).fetchone()[0]
                    except sqlite3.OperationalError:
                        n_old = 0
                    finally:
                        con.close()
                    last_pre = n_old
                    if n_old >= pre:
                        break
                    time.sleep(1.0)
                t_catch = time.time() - t_start
                rows = peers.rows(agent)
                late = lateness(rows, 1.0, t_start + 5, time.time())
                res.update({"caught_up": last_pre >= pre, "catchup_s": t_catch, "delivered_old": last_pre,
                            "catchup_cpu_share": (run.cpu() - c0) / max(t_catch, 1e-9) * a.ratio,
                            "catchup_missed": missed(read_json(status)) - missed(s0),
                            "catchup_jitter_p50_ms": 1000 * pct(late, 50),
                            "catchup_jitter_p99_ms": 1000 * pct(late, 99)})
            else:
                time.sleep(a.warmup)
            res.update(measure_window(run, peers, agent, status, 1.0, a.duration, a.ratio))
            res["budget"] = budget.stats()
            rc = run.stop()
            res["exit"] = rc
        finally:
            budget.close()
        results[name] = res
    return results


def scenario_startup(a, trees, peers, tmp):
    results = {}
    for name, lib in trees:
        agent = "startup-%s" % name
        ini = site_ini(tmp, agent, peers, a.devices, a.points, a.meters)
        budget = Budget(a.ratio, a.mem_mb, "modbus-router-bench-%d" % os.getpid())
        try:
            run = Run(lib, ini, budget, tmp / ("%s.log" % agent))
            first_poll = first_upload = None
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and (first_poll is None or first_upload is None):
                rows = peers.rows(agent)
                data = [r for r in rows if r[1] == "data"]
                if data and first_upload is None:
                    first_upload = min(r[4] for r in data) - run.t0
                    first_poll = min(r[3] for r in data) - run.t0
                time.sleep(0.05)
            res = {"first_poll_s": first_poll, "first_upload_s": first_upload,
                   "cpu_to_upload_s": run.cpu()}
            # what the start-up did to the cadence: cycles missed in the first 20 s
            time.sleep(max(0.0, 20.0 - (time.time() - run.t0)))
            res["missed_20s"] = missed(read_json(tmp / ("status-%s.json" % agent)))
            run.stop()
        finally:
            budget.close()
        # the import tree, unbudgeted (its self times scale with the CPU; the ranking holds)
        imp = Run(lib, ini, None, tmp / ("%s-importtime.log" % agent), importtime=True)
        time.sleep(0.5)
        wait_for(lambda s=tmp / ("status-%s.json" % agent), r=imp: read_json(s) or not r.alive(), 60, "importtime run")
        imp.stop()
        res["imports"] = top_imports(tmp / ("%s-importtime.log" % agent))
        results[name] = res
    return results


def top_imports(log, n=8):
    """[(cumulative us, module)] of the top-level imports that cost most, and the total."""
    rows = []
    for line in Path(log).read_text(errors="replace").splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        parts = line[len("import time:"):].split("|")
        try:
            self_us, cum_us = int(parts[0]), int(parts[1])
        except ValueError:
            continue
        mod = parts[2]
        depth = (len(mod) - len(mod.lstrip())) // 2
        rows.append((cum_us, self_us, depth, mod.strip()))
    total = sum(r[0] for r in rows if r[2] == 0)
    top = sorted((r for r in rows if r[2] <= 1), reverse=True)[:n]
    return {"total_ms": total / 1000.0, "top": [(c / 1000.0, m) for c, _s, _d, m in top]}


def scenario_memory(a, trees, peers_for, tmp):
    """RSS at 1,000 points, then growing sites until one no longer fits in the limit."""
    results = {}
    sizes = [1000] + [int(x) for x in a.memory_sizes.split(",")]
    for name, lib in trees:
        rows = []
        for npts in sizes:
            units = max(1, npts // 50)
            peers = peers_for(units)
            agent = "mem%d-%s" % (npts, name)
            ini = site_ini(tmp, agent, peers, units, 50, 0)
            budget = Budget(a.ratio, a.mem_mb, "modbus-router-bench-%d" % os.getpid())
            try:
                run = Run(lib, ini, budget, tmp / ("%s.log" % agent))
                status = tmp / ("status-%s.json" % agent)
                ok = True
                try:
                    wait_for(lambda s=status, r=run: read_json(s) or not r.alive(), 180, "the agent's loop")
                except TimeoutError:
                    ok = False
                t_end = time.monotonic() + a.memory_seconds
                while ok and time.monotonic() < t_end and run.alive():
                    time.sleep(0.5)
                mem = run.status_mem()
                st = read_json(status) or {}
                polls = sum(d.get("polls_ok", 0) for d in st.get("devices", {}).values())
                alive = run.alive()
                stats = budget.stats()
                rc = run.stop()
                tail = Path(tmp / ("%s.log" % agent)).read_text(errors="replace").strip().splitlines()[-1:]
                rows.append({"points": npts, "devices": units, "alive": alive, "exit": rc,
                             "rss_mb": mem.get("VmRSS", 0) / 1024.0, "hwm_mb": mem.get("VmHWM", 0) / 1024.0,
                             "cg_max_mb": stats.get("mem_max_bytes", 0) / 1048576.0,
                             "oom_kill": stats.get("oom_kill", 0), "polls_ok": polls, "tail": tail})
            finally:
                budget.close()
            if not alive:
                break
        results[name] = rows
    return results


def scenario_cost(a, trees, tmp):
    """Router CPU per poll and per point (agent/cpucost.py): 20 TCP devices at 1 s with few and
    with many points; share = polls/s * PER_POLL + points/s * PER_POINT, solved from the two."""
    lib = trees[-1][1]
    out = {}
    for npts in (a.cost_points_low, a.cost_points_high):
        _pts, regs = generic_points(npts)
        peers = Peers(tmp / ("cost%d" % npts), a.devices, regs, 0)
        try:
            agent = "cost%d" % npts
            ini = site_ini(tmp, agent, peers, a.devices, npts, 0)
            budget = Budget(a.ratio, a.mem_mb, "modbus-router-bench-%d" % os.getpid())
            try:
                run = Run(lib, ini, budget, tmp / ("%s.log" % agent))
                status = tmp / ("status-%s.json" % agent)
                wait_for(lambda s=status, r=run: read_json(s) or not r.alive(), 120, "the agent's loop")
                time.sleep(a.warmup)
                out[npts] = measure_window(run, peers, agent, status, 1.0, a.duration, a.ratio)
                run.stop()
            finally:
                budget.close()
        finally:
            peers.stop()
    lo, hi = out[a.cost_points_low], out[a.cost_points_high]
    polls = float(a.devices)     # per second
    per_point = (hi["cpu_share"] - lo["cpu_share"]) / (polls * (a.cost_points_high - a.cost_points_low))
    per_poll = (lo["cpu_share"] - polls * a.cost_points_low * per_point) / polls
    return {"runs": out, "per_poll_s": per_poll, "per_point_s": per_point}


# ------------------------------------------------------------------------------ printing


def table(title, header, rows):
    print("\n" + title)
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    print("| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")


def f(x, fmt="%.1f"):
    return "-" if x is None or x != x else fmt % x


def print_steady(res, title, backlog=False):
    header = ["tree", "jitter p50/p99 ms", "missed", "CPU share", "RSS MB (peak)", "delivery p50/p99 s",
              "records", "throttled"]
    if backlog:
        header[1:1] = ["backlog", "catch-up s", "catch-up jitter p50/p99 ms", "catch-up missed",
                       "catch-up CPU"]
    rows = []
    for name, r in res.items():
        b = r.get("budget", {})
        row = [name, "%s / %s" % (f(r["jitter_p50_ms"]), f(r["jitter_p99_ms"])), r["missed"],
               "%.0f%%" % (100 * r["cpu_share"]), "%s (%s)" % (f(r["rss_mb"]), f(r["hwm_mb"])),
               "%s / %s" % (f(r["latency_p50_s"], "%.2f"), f(r["latency_p99_s"], "%.2f")), r["records"],
               "%s of %s periods" % (b.get("nr_throttled", "-"), b.get("nr_periods", "-"))]
        if backlog:
            row[1:1] = [r["backlog_records"], ("%.0f" % r["catchup_s"]) + ("" if r["caught_up"] else
                                                                          " (not yet: %d)" % r["delivered_old"]),
                        "%s / %s" % (f(r["catchup_jitter_p50_ms"]), f(r["catchup_jitter_p99_ms"])),
                        r["catchup_missed"], "%.0f%%" % (100 * r["catchup_cpu_share"])]
        rows.append(row)
    table(title, header, rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", action="append", choices=["steady", "backlog", "startup", "memory", "cost"])
    ap.add_argument("--ratio", type=float, default=DEFAULT_RATIO, help="x86 core / router CPU speed ratio")
    ap.add_argument("--mem-mb", type=int, default=48)
    ap.add_argument("--base", default=BASE_REV, help="git revision to compare with ('' for none)")
    ap.add_argument("--tree", default=str(ROOT), help="the tree under test (a directory with agent/)")
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--points", type=int, default=50)
    ap.add_argument("--meters", type=int, default=4)
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--backlog-minutes", type=float, default=60.0)
    ap.add_argument("--max-catchup", type=float, default=900.0)
    ap.add_argument("--memory-sizes", default="2000,4000,8000")
    ap.add_argument("--memory-seconds", type=float, default=20.0)
    ap.add_argument("--cost-points-low", type=int, default=5)
    ap.add_argument("--cost-points-high", type=int, default=100)
    ap.add_argument("--coremark", help="a compiled CoreMark to measure this machine with first")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", type=Path, help="keep the run's files (logs, INIs, databases) in this directory")
    a = ap.parse_args(argv)
    # SIGTERM: unwind, so the finally blocks stop the peers and remove the cgroups
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    scen = a.scenario or ["steady", "backlog", "startup", "memory", "cost"]
    x86 = X86_COREMARK
    if a.coremark:
        out = subprocess.run([a.coremark, "0x0", "0x0", "0x66", "0", "7", "1", "2000"], capture_output=True,
                             text=True).stdout
        x86 = float(next(line.split(":")[1] for line in out.splitlines() if line.startswith("Iterations/Sec")))
    print(CALIBRATION.format(x86_coremark="%.0f" % x86, cm_ratio=x86 / 1050.0, ratio=a.ratio,
                             share=100.0 / a.ratio, ratio2=2 * a.ratio))
    probe = Budget(a.ratio, a.mem_mb, "modbus-router-bench-%d" % os.getpid())
    print("Budget: " + probe.kind)
    probe.close()
    print("Load while measuring: %s (2 cores shared with other work: figures are measured under load)" %
          " ".join(Path("/proc/loadavg").read_text().split()[:3]))
    out = {"ratio": a.ratio, "mem_mb": a.mem_mb, "x86_coremark": x86}
    with tempfile.TemporaryDirectory(prefix="bench-router-") as tmpd:
        tmp = Path(tmpd)
        if a.keep:
            tmp = a.keep.resolve()
            tmp.mkdir(parents=True, exist_ok=True)
        trees = []
        if a.base:
            trees.append(("base-" + a.base, prepare_tree(a.base, tmp)))
        trees.append(("this-tree", prepare_tree(a.tree, tmp)))
        for name, lib in trees:
            where = tree_probe(lib, tmp)
            assert where.startswith(str(lib)), "%s imports %s, not its copy" % (name, where)
            print("tree %s: %s" % (name, where.rsplit("/agent/", 1)[0]))
        _pts, regs = generic_points(a.points)
        peers = Peers(tmp, a.devices, regs, a.meters)
        extra = []
        try:
            if "steady" in scen:
                r = out["steady"] = scenario_steady(a, trees, peers, tmp)
                print_steady(r, "(1) %d devices x %d points at 1 s on TCP + %d RTU meters at 9600, collector up "
                             "(%.0f s after %.0f s warm-up; ratio %g)" % (a.devices, a.points, a.meters, a.duration,
                                                                          a.warmup, a.ratio))
            if "backlog" in scen:
                r = out["backlog"] = scenario_steady(a, trees, peers, tmp, backlog=True)
                print_steady(r, "(2) the same, starting with %.0f minutes of backlog in the spool "
                             "(the collector was down), then %.0f s steady" % (a.backlog_minutes, a.duration),
                             backlog=True)
            if "startup" in scen:
                r = out["startup"] = scenario_startup(a, trees, peers, tmp)
                table("(3) start-up under the budget: process start to first poll / first upload",
                      ["tree", "first poll s", "first upload s", "x86 CPU s to first upload",
                       "missed cycles in the first 20 s", "imports (x86, unbudgeted) ms"],
                      [[n, f(x["first_poll_s"], "%.2f"), f(x["first_upload_s"], "%.2f"),
                        f(x["cpu_to_upload_s"], "%.3f"), x["missed_20s"], f(x["imports"]["total_ms"])]
                       for n, x in r.items()])
                for n, x in r.items():
                    print("  costliest imports (%s, -X importtime cumulative ms, x86 unbudgeted): %s" % (
                        n, ", ".join("%s %.0f" % (m, c) for c, m in x["imports"]["top"])))
            if "memory" in scen:
                cache = {}

                def peers_for(units):
                    if units not in cache:
                        cache[units] = Peers(tmp / ("m%d" % units), units, regs, 0)
                        extra.append(cache[units])
                    return cache[units]

                r = out["memory"] = scenario_memory(a, trees, peers_for, tmp)
                rows = []
                for n, lst in r.items():
                    for x in lst:
                        rows.append([n, x["points"], x["devices"], "yes" if x["alive"] else "NO (exit %s)" % x["exit"],
                                     f(x["rss_mb"]), f(x["hwm_mb"]), f(x["cg_max_mb"]), x["oom_kill"], x["polls_ok"]])
                table("(4) memory: sites of N points (50 per device, 1 s) under the %d MB limit, %.0f s each" % (
                    a.mem_mb, a.memory_seconds),
                    ["tree", "points", "devices", "fits", "RSS MB", "peak RSS MB", "cgroup peak MB (incl. cache)",
                     "OOM kills", "polls ok"], rows)
            if "cost" in scen:
                r = out["cost"] = scenario_cost(a, trees, tmp)
                table("cost model for `check` (agent/cpucost.py): %d TCP devices at 1 s, router CPU" % a.devices,
                      ["points per device", "CPU share", "missed", "jitter p99 ms"],
                      [[n, "%.1f%%" % (100 * x["cpu_share"]), x["missed"], f(x["jitter_p99_ms"])]
                       for n, x in r["runs"].items()])
                print("  -> PER_POLL = %.4f s, PER_POINT = %.6f s of router CPU (ratio %g)" % (
                    r["per_poll_s"], r["per_point_s"], a.ratio))
        finally:
            peers.stop()
            for p in extra:
                p.stop()
    if a.json:
        a.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
