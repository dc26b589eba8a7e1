#!/usr/bin/env python3
"""The steps of tools/cross-test for one architecture (host side; see tools/cross-test).

The target's interpreter is `<root>.python3`, a host script that runs the root's python3 under
qemu-user with argv[0] set to itself, so `sys.executable` inside the target starts the target
again. The simulator and the collector run natively on 127.0.0.1; only the agent is emulated.

    python tools/crosstest.py --arch mipsel --root ~/.cache/modbus-agent/cross/bookworm-mipsel [--short]

Prints one line per step ("PASS"/"FAIL" with timings) and exits 1 if any step failed.
"""
import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from demo import Proc, free_port, rewrite_ini, wait_for  # noqa: E402

AGENT = "cross-site"

# The tests that need no peer process outside the target (they start their own collector,
# pty or HTTP server in-process, or `sys.executable`, which stays emulated).
SHORT_TESTS = ["tests/test_pdu.py", "tests/test_codec_properties.py", "tests/test_types.py",
               "tests/test_types_overflow.py", "tests/test_spool.py"]
FULL_TESTS = SHORT_TESTS + [
    "tests/test_crc.py", "tests/test_wire.py", "tests/test_types_exact.py",
    "tests/test_config.py", "tests/test_config_limits.py", "tests/test_config_values.py",
    "tests/test_config_review.py", "tests/test_profiles.py", "tests/test_plan.py", "tests/test_schedule.py",
    "tests/test_spool_seq.py", "tests/test_spool_outputs.py", "tests/test_spool_failures.py",
    "tests/test_upload.py", "tests/test_upload_quarantine.py", "tests/test_upload_deadline.py",
]
# Tests whose assertion reads the process's RSS (VmHWM): under qemu-user that is the emulator's,
# whose translated-code cache grows the first time a new code path runs (reading a hostile
# answer: +2.1 to +2.3 MB of VmHWM in any of the three modes, depending on which ran first,
# while the guest's heap peak, by tracemalloc, grows 294 kB, as on x86). Left out here, and
# said so; tools/cross-test is not where RSS is measured.
QEMU_RSS_TESTS = [
    "tests/test_upload_deadline.py::test_a_huge_or_endless_answer_is_an_error_naming_its_size_and_memory_stays_flat"
    "[%s]" % mode for mode in ("huge", "chunked", "gzip")
]
NEEDS_PEERS = {"tests/test_crc.py", "tests/test_types_exact.py", "tests/test_profiles.py"}

# Run inside the target: what the big-endian and 32-bit questions need, printed as JSON.
PROBE = r'''
import json, struct, sys, tracemalloc
tracemalloc.start()
from agent.modbus import crc
out = {"python": sys.version.split()[0], "byteorder": sys.byteorder, "pointer_bits": struct.calcsize("P") * 8}
a = tracemalloc.get_traced_memory()[0]
crc.crc16(b"\x01\x03\x00\x00\x00\x0a")      # the agent's own table, built at the first CRC
out["crc_agent_table_bytes"] = tracemalloc.get_traced_memory()[0] - a
tracemalloc.stop()
# The CRC's word path against the byte loop (the spec's algorithm) on frames of every parity
def byte_crc(data):
    c = 0xFFFF
    for b in data:
        c ^= b
        for _ in range(8):
            c = (c >> 1) ^ 0xA001 if c & 1 else c >> 1
    return c
frames = [bytes(range(n % 256)) * (1 + n // 256) for n in range(0, 300, 7)] + [b"\x01\x03\x00\x00\x00\x0a"]
bad = [f.hex() for f in frames if crc.crc16(f) != byte_crc(f)]
out["crc_word_path_mismatches"] = len(bad)
out["crc_known"] = "%04x" % crc.crc16(b"\x01\x03\x00\x00\x00\x0a")  # spec example: c5cd
# Sizes of the word table as the agent builds it (list) and as the compact array
tracemalloc.start()
a = tracemalloc.take_snapshot()
t = crc.word_table(as_list=True)
out["crc_table_list_bytes"] = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(a, "filename"))
del t
a = tracemalloc.take_snapshot()
t = crc.word_table(as_list=False)
out["crc_table_array_bytes"] = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(a, "filename"))
del t
# Per-point objects: a config of N float32 points loaded (parsed, planned, compiled)
from agent.config import load_config
def site(n):
    lines = ["[agent]", "id = probe", "spool_dir = /tmp/probe-spool", "[connection:c]", "type = tcp",
             "host = 127.0.0.1", "port = 5020", "[device:d]", "connection = c", "unit = 1", "interval = 1s",
             "[points:d]"]
    lines += ["p%d = holding %d float32 ABCD" % (i, 2 * i) for i in range(n)]
    return "\n".join(lines) + "\n"
def cost(n):
    text = site(n)
    tracemalloc.reset_peak()
    a = tracemalloc.take_snapshot()
    cfg = load_config("probe.ini", text=text)
    b = tracemalloc.take_snapshot()
    held = sum(s.size_diff for s in b.compare_to(a, "filename"))
    return cfg, held
cost(10)
_, small = cost(10)
cfg, big = cost(1010)
out["per_point_bytes"] = round((big - small) / 1000)
out["tracemalloc_note"] = "Python heap only, inside the emulated interpreter (not RSS)"
print(json.dumps(out))
'''


def target_env(root, peers):
    path = [str(ROOT)]
    if peers and peers.is_dir():
        path.append(str(peers))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), PYTHONUNBUFFERED="1",
               # the worktree's bytecode for the target goes beside the root, not into the tree
               PYTHONPYCACHEPREFIX=str(Path(str(root) + ".pycache")))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


class Steps:
    def __init__(self, arch):
        self.arch, self.failed, self.rows = arch, [], []

    def run(self, name, fn):
        t0 = time.monotonic()
        try:
            detail = fn() or ""
            ok = True
        except Exception as e:  # a failed step is reported; the next one runs
            detail, ok = "%s: %s" % (type(e).__name__, e), False
        dt = time.monotonic() - t0
        self.rows.append((name, ok, dt, detail))
        print("cross-test %s: %s %s (%.0f s)%s" % (self.arch, "PASS" if ok else "FAIL", name, dt,
                                                   (": " + detail) if detail else ""), flush=True)
        if not ok:
            self.failed.append(name)
        return ok


def pytest_step(py, env, files, short):
    # Hypothesis' default 200 ms deadline is an x86 figure: under emulation every example is
    # 10-50x slower, so the deadline is off (the examples and their assertions are unchanged).
    args = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "crossplugin", "-o", "timeout=900",
            "-rfE"] + (["-x"] if short else []) + files
    for t in QEMU_RSS_TESTS:
        if t.split("::")[0] in files:
            args += ["--deselect", t]
    env = dict(env, PYTHONPATH=env["PYTHONPATH"] + os.pathsep + str(ROOT / "tools" / "crosstest_plugin"))
    r = subprocess.run(args, cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=3000)
    tail = [line.strip("= ") for line in r.stdout.splitlines() if " passed" in line or " failed" in line][-1:] \
        or ["(no summary line)"]
    left = sorted({t.split("::")[1].split("[")[0] for t in QEMU_RSS_TESTS if t.split("::")[0] in files})
    if left:
        tail[0] += "; left out (they assert the RSS, the emulator's under qemu): %s" % ", ".join(left)
    if r.returncode != 0:
        print(r.stdout[-6000:], r.stderr[-3000:], sep="\n")
        raise AssertionError("pytest exit %d: %s" % (r.returncode, tail[0]))
    return tail[0]


def probe_step(py, env, result):
    r = subprocess.run([py, "-c", PROBE], cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise AssertionError(r.stderr[-2000:])
    d = json.loads(r.stdout.strip().splitlines()[-1])
    result.update(d)
    assert d["crc_word_path_mismatches"] == 0, "the CRC's word path differs from the byte loop"
    assert d["crc_known"] == "cdc5", "CRC of 01 03 00 00 00 0a: %s" % d["crc_known"]
    return "%s-endian, %d-bit, python %s; CRC word table %.0f KiB as the agent builds it here " \
        "(list %.0f KiB / array %.0f KiB); " \
        "%d bytes per configured point (tracemalloc, heap only)" % (
            d["byteorder"], d["pointer_bits"], d["python"], d["crc_agent_table_bytes"] / 1024,
            d["crc_table_list_bytes"] / 1024,
            d["crc_table_array_bytes"] / 1024, d["per_point_bytes"])


class Site:
    """A native simulator + collector, the agent's INI; the agent itself is run emulated."""

    def __init__(self, run, py, env):
        self.run, self.py, self.env = run, py, env
        run.mkdir(parents=True, exist_ok=True)
        self.procs = {}
        native_env = dict(os.environ, PYTHONPATH=str(ROOT))
        ready = run / "simulator.json"
        self.procs["simulator"] = Proc("simulator", [sys.executable, str(ROOT / "tools" / "simulator.py"), "serve",
                                                     "--tcp", "0", "--rtu", "--ready-file", str(ready), "--quiet"],
                                       run / "simulator.log", env=native_env)
        wait_for(lambda: ready.exists(), 30, "the simulator")
        self.sim = json.loads(ready.read_text())
        self.port = free_port()
        self.procs["collector"] = Proc("collector", [sys.executable, "-m", "agent.collector.cli", "--listen",
                                                     "127.0.0.1:%d" % self.port, "--db",
                                                     "sqlite:///" + str(run / "collector.db")],
                                       run / "collector.log", env=native_env, cwd=str(run))
        wait_for(self.healthy, 30, "the collector")
        self.ini = run / "agent.ini"
        self.ini.write_text(rewrite_ini((ROOT / "conf" / "demo.ini").read_text(), {
            ("agent", "id"): AGENT,
            ("agent", "spool_dir"): str(run / "spool"),
            ("agent", "status_file"): str(run / "status.json"),
            ("agent", "fsync_interval"): "1s",
            ("agent", "health_interval"): "10s",
            ("connection:plc", "port"): str(self.sim["tcp_port"]),
            ("connection:bus1", "port"): self.sim["rtu_path"],
            ("upload", "url"): "http://127.0.0.1:%d/api/v1/batches" % self.port,
            ("upload", "batch_max_records"): "50",
        }))

    def healthy(self):
        try:
            with urllib.request.urlopen("http://127.0.0.1:%d/health" % self.port, timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def agent(self, *args, timeout=600):
        r = subprocess.run([self.py, "-m", "agent"] + list(args), cwd=str(ROOT), env=self.env,
                           capture_output=True, text=True, timeout=timeout)
        return r

    def stored(self):
        url = "http://127.0.0.1:%d/api/v1/records?format=jsonl&agent=%s" % (self.port, AGENT)
        with urllib.request.urlopen(url, timeout=30) as r:
            return [json.loads(line) for line in r.read().splitlines() if line.strip()]

    def stop(self):
        for name in ("agent", "collector", "simulator"):
            p = self.procs.pop(name, None)
            if p is not None:
                p.stop(timeout=30)


def check_step(site):
    r = site.agent("check", "-c", str(site.ini))
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.strip().splitlines()[0]


def poll_step(site):
    r = site.agent("poll", "-c", str(site.ini))
    assert r.returncode == 0, r.stdout + r.stderr
    # the simulator's meter: ~230 V; the PLC's coils are booleans
    assert "voltage_l1" in r.stdout and "temperature" in r.stdout, r.stdout
    return "%d lines, e.g. %s" % (len(r.stdout.splitlines()),
                                  next((x.strip() for x in r.stdout.splitlines() if "voltage_l1" in x), ""))


def spool_seq(spool_dir, key):
    from agent.spool import Spool

    sp = Spool(str(spool_dir), AGENT)
    try:
        return sp.stats()[key]
    finally:
        sp.close()


def run_step(site, seconds):
    """`run` for `seconds`, SIGTERM, then the audit: every seq the spool generated is stored
    once at the collector (none missing without a gap record, none twice, none unknown)."""
    status = site.run / "status.json"
    p = site.procs["agent"] = Proc("agent", [site.py, "-m", "agent", "run", "-c", str(site.ini)],
                                   site.run / "agent.log", env=site.env, cwd=str(ROOT))
    t_start = time.monotonic()
    wait_for(lambda: status.exists() or not p.alive(), 300, "the emulated agent's loop")
    assert p.alive(), p.tail()
    t_up = time.monotonic() - t_start
    wait_for(lambda: site.stored() or not p.alive(), 120, "the first upload", 0.5)
    t_first = time.monotonic() - t_start
    time.sleep(max(0.0, seconds - (time.monotonic() - t_start)))
    # give the last batch its chance, then stop (the agent flushes; SIGTERM must exit 0)
    rc = site.procs.pop("agent").stop(timeout=60)
    assert rc == 0, "agent exit %s:\n%s" % (rc, p.tail())
    next_seq = spool_seq(site.run / "spool", "next_seq")
    origin = spool_seq(site.run / "spool", "origin_seq")
    # what the stop left in the spool: one device-less agent run drains it (emulated as well)
    drain = site.run / "drain.ini"
    drain.write_text("\n".join(["[agent]", "id = %s" % AGENT, "spool_dir = %s" % (site.run / "spool"),
                                "status_file = %s" % (site.run / "drain.json"),
                                "[upload]", "url = http://127.0.0.1:%d/api/v1/batches" % site.port, ""]))
    d = site.procs["agent"] = Proc("drain", [site.py, "-m", "agent", "run", "-c", str(drain)],
                                   site.run / "drain.log", env=site.env, cwd=str(ROOT))
    try:
        wait_for(lambda: max([r["seq"] for r in site.stored()] or [0]) >= next_seq - 1 or not d.alive(),
                 300, "the backlog to drain", 1.0)
    finally:
        site.procs.pop("agent").stop(timeout=60)
    recs = site.stored()
    seqs = [r["seq"] for r in recs]
    assert len(seqs) == len(set(seqs)), "the collector holds a seq twice"
    generated = set(range(origin, next_seq))
    stored = set(seqs)
    assert stored <= generated, "seqs never generated: %s" % sorted(stored - generated)[:10]
    covered = set()
    for g in (r for r in recs if r.get("kind") == "gap"):
        covered.update(range(g["first_seq"], g["last_seq"] + 1))
    lost = generated - stored - covered
    assert not lost, "lost without a gap record: %s" % sorted(lost)[:20]
    data = [r for r in recs if r.get("device") and r.get("status") == "ok"]
    assert data, "no ok data record arrived"
    return "loop up %.1f s, first upload %.1f s after start; audit: %d generated, %d stored, 0 lost, " \
        "0 duplicates (%d ok data records)" % (t_up, t_first, len(generated), len(stored), len(data))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", required=True)
    ap.add_argument("--root", required=True, type=Path)
    ap.add_argument("--short", action="store_true")
    ap.add_argument("--seconds", type=float,
                    default=float(os.environ.get("CROSS_RUN_SECONDS") or 0) or None)
    ap.add_argument("--json", type=Path, help="write the step results here")
    a = ap.parse_args(argv)
    seconds = a.seconds or (20.0 if a.short else 60.0)
    py = str(a.root) + ".python3"
    peers = a.root.parent / "peers"
    env = target_env(a.root, None if a.short else peers)
    steps = Steps(a.arch)
    t0 = time.monotonic()
    files = SHORT_TESTS if a.short else FULL_TESTS
    if not (peers / ".done").exists() or a.short:
        files = [f for f in files if f not in NEEDS_PEERS]
        if not a.short:
            print("cross-test %s: umodbus/pymodbus not installed for the target: left out %s" % (
                a.arch, " ".join(sorted(NEEDS_PEERS))))
    probe = {}
    steps.run("probe (byte order, CRC word path, 32/64-bit sizes)", lambda: probe_step(py, env, probe))
    steps.run("pytest %d files" % len(files), lambda: pytest_step(py, env, files, a.short))
    import tempfile

    with tempfile.TemporaryDirectory(prefix="cross-%s-" % a.arch) as tmp:
        site = None
        try:
            site = Site(Path(tmp), py, env)
            steps.run("modbus-agent check (simulator on loopback)", lambda: check_step(site))
            steps.run("modbus-agent poll", lambda: poll_step(site))
            steps.run("modbus-agent run %.0f s + seq audit" % seconds, lambda: run_step(site, seconds))
        except Exception as e:
            steps.failed.append("site: %s" % e)
            print("cross-test %s: FAIL site: %s" % (a.arch, e))
            if site:
                for n in ("agent", "drain", "collector", "simulator"):
                    log = Path(tmp) / ("%s.log" % n)
                    if log.exists():
                        print("---- %s\n%s" % (n, "\n".join(log.read_text(errors="replace").splitlines()[-20:])))
        finally:
            if site:
                if steps.failed:
                    for n in ("agent", "drain"):
                        log = Path(tmp) / ("%s.log" % n)
                        if log.exists():
                            print("---- %s\n%s" % (n, "\n".join(log.read_text(errors="replace").splitlines()[-20:])))
                site.stop()
    total = time.monotonic() - t0
    print("cross-test %s: %s in %.0f s (%s)" % (a.arch, "FAILED: " + ", ".join(steps.failed) if steps.failed
                                                 else "all passed", total,
                                                 "short form" if a.short else "full"))
    if a.json:
        a.json.write_text(json.dumps({"arch": a.arch, "probe": probe, "total_s": total,
                                      "steps": [{"name": n, "ok": ok, "seconds": round(dt, 1), "detail": det}
                                                for n, ok, dt, det in steps.rows]}, indent=1))
    return 1 if steps.failed else 0


if __name__ == "__main__":
    sys.exit(main())
