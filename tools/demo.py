#!/usr/bin/env python3
"""The one-command demo: a simulated site -> the agent -> a collector, values shown as they arrive.

    tools/demo                      run until Ctrl-C
    tools/demo --duration 30        run 30 s unattended, exit 0 if values arrived
    tools/demo --fresh              start from an empty run directory (removes ./demo-run first)

Everything the run writes stays in the run directory (default ./demo-run): the agent's config,
spool and status file, the collector's SQLite database, and one log per process. A second run
reuses them: the agent carries on with its sequence numbers, the collector keeps its data.
Ctrl-C stops the agent (it flushes its spool), then the collector, then the simulator.

This module is also the harness the end-to-end tests use (`Site`, `rewrite_ini`, `Proc`).
"""
import argparse
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"

# ------------------------------------------------------------------------------ helpers


def rewrite_ini(text, changes):
    """Set `key = value` in `[section]` of INI text, keeping comments and order.

    `changes`: {(section, key): value}; value None removes the key. A key missing from its
    section is added at the end of the section, a missing section at the end of the file."""
    pending = {}
    for (section, key), value in changes.items():
        pending.setdefault(section, {})[key] = value
    out, section = [], None
    header = re.compile(r"^\s*\[([^\]]+)\]")
    keyline = re.compile(r"^\s*([^=;#\s][^=]*?)\s*=")

    def flush(sec):
        for key, value in pending.pop(sec, {}).items():
            if value is not None:
                # keep the blank lines that separate sections after the new key
                blank = []
                while out and not out[-1].strip():
                    blank.append(out.pop())
                out.append("%s = %s" % (key, value))
                out.extend(blank)

    for line in text.splitlines():
        m = header.match(line)
        if m:
            flush(section)
            section = m.group(1).strip()
            out.append(line)
            continue
        m = keyline.match(line)
        if m and section in pending and m.group(1) in pending[section]:
            value = pending[section].pop(m.group(1))
            if value is not None:
                out.append("%s = %s" % (m.group(1), value))
            continue
        out.append(line)
    flush(section)
    for sec in list(pending):
        items = [(k, v) for k, v in pending.pop(sec).items() if v is not None]
        if items:
            out.append("")
            out.append("[%s]" % sec)
            out.extend("%s = %s" % kv for kv in items)
    return "\n".join(out) + "\n"


def utc_now():
    """The collector's timestamp format: '2026-11-21T10:30:45.123Z'."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % (int(t * 1000) % 1000)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_setpriv = []   # [argv prefix] once looked up


def _pdeathsig_prefix():
    """Make a child get SIGTERM when the demo dies, even by SIGKILL, so nothing is left running
    (Linux PR_SET_PDEATHSIG). util-linux's `setpriv` sets it and execs the command (same pid);
    without it, a preexec_fn does, but only while this process has a single thread (a
    preexec_fn after fork in a threaded process can deadlock). -> (argv prefix, preexec_fn)"""
    if not _setpriv:
        exe = shutil.which("setpriv")
        out = ""
        if exe:
            try:
                out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=5).stdout
            except (OSError, subprocess.SubprocessError):
                pass
        _setpriv.append([exe, "--pdeathsig", "TERM", "--"] if "--pdeathsig" in out else [])
    if _setpriv[0]:
        return list(_setpriv[0]), None
    if threading.active_count() == 1:
        prctl = ctypes.CDLL(None, use_errno=True).prctl

        def preexec():
            prctl(1, signal.SIGTERM, 0, 0, 0)

        return [], preexec
    return [], None


class Proc:
    """A child process with its output in a log file, in its own session (so a Ctrl-C at the
    terminal reaches only the demo, which stops the children in order)."""

    def __init__(self, name, argv, log_path, env=None, cwd=None):
        self.name, self.argv, self.log_path = name, argv, Path(log_path)
        prefix, preexec = _pdeathsig_prefix()
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.p = subprocess.Popen(prefix + list(argv), stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=env, cwd=cwd, start_new_session=True,
                                      preexec_fn=preexec)

    @property
    def pid(self):
        return self.p.pid

    def alive(self):
        return self.p.poll() is None

    def stop(self, timeout=10.0):
        """SIGTERM, wait, then SIGKILL. Returns the exit code."""
        if self.alive():
            try:
                self.p.send_signal(signal.SIGTERM)
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        return self.p.returncode

    def kill(self):
        """SIGKILL, no chance to flush anything (the crash tests)."""
        if self.alive():
            self.p.kill()
        self.p.wait()
        return self.p.returncode

    def tail(self, n=20):
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


def http_json(url, timeout=5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def wait_for(pred, timeout, what, interval=0.05):
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise TimeoutError("timed out after %.0fs waiting for %s" % (timeout, what))
        time.sleep(interval)


# ------------------------------------------------------------------------------ the site


class Site:
    """Simulator + collector + agent as separate processes, files in `run_dir`.

    Tests pass `simulator=` an in-process tools.simulator.Simulator (already started) to inject
    faults through its API; the demo runs the simulator as a process too."""

    def __init__(self, run_dir, template=ROOT / "conf" / "demo.ini", python=sys.executable):
        self.run = Path(run_dir).resolve()
        self.run.mkdir(parents=True, exist_ok=True)
        self.template = Path(template)
        self.python = python
        self.procs = {}
        self.sim_info = None
        self.collector_port = None
        self.agent_ini = self.run / "agent.ini"
        self.env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                        PYTHONUNBUFFERED="1")

    # -- processes

    def start_simulator(self, devices=("meter:1", "plc:2")):
        ready = self.run / "simulator.json"
        if ready.exists():
            ready.unlink()
        argv = [self.python, str(TOOLS / "simulator.py"), "serve", "--tcp", "0", "--rtu", "--control", "0",
                "--ready-file", str(ready)]
        for d in devices:
            argv += ["--device", d]
        proc = self.procs["simulator"] = Proc("simulator", argv, self.run / "simulator.log", env=self.env)
        wait_for(lambda: ready.exists() or not proc.alive(), 30, "the simulator")
        if not proc.alive():
            raise RuntimeError("simulator failed to start:\n" + proc.tail())
        self.sim_info = json.loads(ready.read_text())
        return self.sim_info

    def use_simulator(self, sim):
        """An in-process simulator (tests)."""
        self.sim_info = {"tcp_port": sim.tcp_port, "rtu_path": sim.rtu_path, "host": sim.host}

    def start_collector(self, port=None, db=None):
        self.collector_port = port or self.collector_port or free_port()
        db = db or "sqlite:///" + str(self.run / "collector.db")
        argv = [self.python, "-m", "agent.collector.cli", "--listen", "127.0.0.1:%d" % self.collector_port,
                "--db", db]
        proc = self.procs["collector"] = Proc("collector", argv, self.run / "collector.log", env=self.env,
                                              cwd=str(self.run))
        wait_for(lambda: self.collector_healthy() or not proc.alive(), 30, "the collector")
        if not proc.alive():
            raise RuntimeError("collector failed to start:\n" + proc.tail())
        return self.collector_port

    def collector_healthy(self):
        try:
            with urllib.request.urlopen(self.collector_url("/health"), timeout=1.0) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def collector_url(self, path="/"):
        return "http://127.0.0.1:%d%s" % (self.collector_port, path)

    def write_agent_ini(self, upload_port=None, changes=None):
        """The template with this run's ports and paths; `changes` {(section, key): value} on top."""
        info = self.sim_info
        ch = {
            ("agent", "spool_dir"): str(self.run / "spool"),
            ("agent", "status_file"): str(self.run / "status.json"),
            ("connection:plc", "host"): info.get("host", "127.0.0.1"),
            ("connection:plc", "port"): str(info["tcp_port"]),
            ("connection:bus1", "port"): info["rtu_path"],
            ("upload", "url"): "http://127.0.0.1:%d/api/v1/batches" % (upload_port or self.collector_port),
        }
        ch.update(changes or {})
        self.agent_ini.write_text(rewrite_ini(self.template.read_text(), ch))
        return self.agent_ini

    def agent_cmd(self, *args):
        return [self.python, "-m", "agent"] + list(args)

    def check_agent(self):
        return subprocess.run(self.agent_cmd("check", "-c", str(self.agent_ini)), capture_output=True,
                              text=True, env=self.env, timeout=60)

    def start_agent(self, log_level=None):
        return self.start_agent_with(self.agent_ini, "agent", log_level)

    def start_agent_with(self, ini, name, log_level=None):
        """`modbus-agent run -c ini` as process `name` (log in run/<name>.log)."""
        argv = self.agent_cmd("run", "-c", str(ini))
        if log_level:
            argv += ["--log-level", log_level]
        self.procs[name] = Proc(name, argv, self.run / ("%s.log" % name), env=self.env)
        return self.procs[name]

    def stop(self):
        """Agent first (it flushes its spool), then the collector, then the simulator."""
        codes = {}
        for name in ["agent"] + [n for n in self.procs if n not in ("agent", "collector", "simulator")] + [
                "collector", "simulator"]:
            proc = self.procs.pop(name, None)
            if proc is not None:
                codes[name] = proc.stop()
        for proc in self.procs.values():
            proc.stop()
        self.procs.clear()
        return codes

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- what arrived

    def records(self, agent=None, since=None, limit=None):
        """Records stored at the collector, as JSON objects, through GET /api/v1/records."""
        q = {"format": "jsonl"}
        if agent:
            q["agent"] = agent
        if since:
            q["since"] = since
        if limit:
            q["limit"] = str(limit)
        with urllib.request.urlopen(self.collector_url("/api/v1/records?" + urllib.parse.urlencode(q)),
                                    timeout=10) as r:
            return [json.loads(line) for line in r.read().splitlines() if line.strip()]


# ------------------------------------------------------------------------------ printing


def format_record(rec):
    """One line per record for the terminal."""
    ts = str(rec.get("ts", ""))[11:23]
    kind = rec.get("kind", "data")
    who = "%s/%s" % (rec.get("device") or "-", rec.get("unit") if rec.get("unit") is not None else "-")
    if kind == "gap":
        return "%s  #%s  GAP: %s records dropped (seq %s-%s, %s)" % (
            ts, rec.get("seq"), rec.get("dropped"), rec.get("first_seq"), rec.get("last_seq"), rec.get("reason"))
    if kind == "health":
        return "%s  #%s  %-10s health %s" % (ts, rec.get("seq"), who, json.dumps(rec.get("health"))[:100])
    if rec.get("status") == "error":
        err = rec.get("error") or {}
        return "%s  #%s  %-10s ERROR %s: %s" % (ts, rec.get("seq"), who, err.get("kind"), err.get("message"))
    values = rec.get("values") or {}
    shown = " ".join("%s=%s" % (k, _short(v)) for k, v in values.items())
    return "%s  #%s  %-10s %s" % (ts, rec.get("seq"), who, shown)


def _short(v):
    if isinstance(v, float):
        return repr(round(v, 6))
    if isinstance(v, bool):
        return "1" if v else "0"
    return str(v)


# ------------------------------------------------------------------------------ main


def parse_args(argv):
    p = argparse.ArgumentParser(prog="tools/demo", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:12]))
    p.add_argument("--duration", type=float, default=None, metavar="SECONDS",
                   help="stop after this many seconds (default: until Ctrl-C)")
    p.add_argument("--run-dir", default="demo-run", metavar="DIR", help="where everything is written (default ./demo-run)")
    p.add_argument("--port", type=int, default=None, help="collector port (default 8080, or a free one if taken)")
    p.add_argument("--fresh", action="store_true", help="remove the run directory first")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    run = Path(args.run_dir)
    if args.fresh and run.exists():
        shutil.rmtree(run)
    port = args.port
    if port is None:
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 8080))
            port = 8080
        except OSError:
            port = free_port()

    stopping = []

    def on_signal(signum, frame):
        stopping.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    site = Site(run)
    print("demo: run directory %s (kept after the demo; --fresh starts over)" % site.run, flush=True)
    # Only what arrives from now on: earlier runs' records are in the collector already.
    seen, last_ts, arrived = set(), utc_now(), 0
    rc = 0
    try:
        info = site.start_simulator()
        print("demo: simulator: PLC on Modbus TCP 127.0.0.1:%d, meter on RTU %s (control port %d)"
              % (info["tcp_port"], info["rtu_path"], info["control_port"]), flush=True)
        site.start_collector(port)
        print("demo: collector on %s, database %s" % (site.collector_url(""), site.run / "collector.db"), flush=True)
        site.write_agent_ini()
        chk = site.check_agent()
        if chk.returncode != 0:
            print("demo: the agent rejected %s:\n%s%s" % (site.agent_ini, chk.stdout, chk.stderr), file=sys.stderr)
            return 1
        print("demo: the polling plan (modbus-agent check -c %s):" % site.agent_ini, flush=True)
        for line in chk.stdout.splitlines():
            print("   " + line, flush=True)
        site.start_agent()
        # commands the user can paste into another terminal (the venv need not be active)
        exe = Path(sys.executable)
        agent_cmd = str(exe.parent / "modbus-agent") if (exe.parent / "modbus-agent").exists() else (
            "%s -m agent" % exe)
        print("demo: agent running: %s run -c %s" % (agent_cmd, site.agent_ini), flush=True)
        print("", flush=True)
        print("   status page:  %s" % site.collector_url("/"), flush=True)
        print("   agent status: %s status -c %s" % (agent_cmd, site.agent_ini), flush=True)
        print("   faults:       %s %s ctl 127.0.0.1:%d fault 1 silence --duration 10"
              % (exe, TOOLS / "simulator.py", info["control_port"]), flush=True)
        print("   logs:         %s/{agent,collector,simulator}.log" % site.run, flush=True)
        print("\nvalues as they arrive at the collector (Ctrl-C stops; earlier runs' data stays in the "
              "collector and is not repeated here):", flush=True)
        end = None if args.duration is None else time.monotonic() + args.duration
        while end is None or time.monotonic() < end:
            for name, proc in site.procs.items():
                if not proc.alive():
                    print("demo: the %s exited (code %s); last lines of its log:\n%s"
                          % (name, proc.p.returncode, proc.tail()), file=sys.stderr)
                    return 1
            try:
                recs = site.records(agent="demo-site", since=last_ts)
            except (OSError, ValueError) as e:
                print("demo: cannot query the collector: %s" % e, file=sys.stderr)
                recs = []
            for rec in recs:
                key = rec.get("seq")
                if key in seen:
                    continue
                seen.add(key)
                arrived += 1
                print(format_record(rec), flush=True)
            if recs:
                # next time ask from the newest timestamp on; remember only the seqs at it
                last_ts = max(r.get("ts") or "" for r in recs)
                seen = {r.get("seq") for r in recs if r.get("ts") == last_ts}
            time.sleep(1.0)
        if arrived == 0:
            print("demo: no values arrived at the collector in %.0fs" % args.duration, file=sys.stderr)
            rc = 1
    except KeyboardInterrupt:
        print("\ndemo: stopping", flush=True)
        rc = 0
    except (RuntimeError, TimeoutError) as e:
        print("demo: %s" % e, file=sys.stderr)
        rc = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not orphan children
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        codes = site.stop()
        print("demo: stopped (%s); %d records arrived; files kept in %s"
              % (", ".join("%s exit %s" % kv for kv in codes.items()), arrived, site.run), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
