"""End to end: simulator -> agent (a real `python -m agent run` process) -> fault proxy ->
collector (a real `modbus-collector` process, SQLite), and the audit of zero loss and zero
duplicates after each fault of issue 6.

The audit, after every scenario:
  * the agent is stopped, then a device-less agent on the same spool drains the backlog, so
    every record the agent ever generated (seq origin_seq .. next_seq-1 of its spool) has had its chance;
  * every generated seq is stored at the collector, except seqs covered by a gap record (a
    bound forced the drop; the gap must account for each one) or explicitly destroyed by the
    test (a corrupted line, a torn line);
  * nothing is stored twice and no seq the agent never generated is stored;
  * no seq went over the wire with two different contents (the proxy saw every send: a reused
    seq would be silently discarded by the idempotent collector, i.e. lost), and what the
    collector holds is what the agent sent.

Shortened in CI; FULL=1 runs the long versions (20 SIGKILLs, longer outages).
"""
import hashlib
import json
import os
import random
import statistics
import sys
import time

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
from demo import Site, wait_for
from faultproxy import FaultProxy
from simulator import EnergyMeter, Generic, Plc, Simulator

FULL = os.environ.get("FULL") == "1"
AGENT = "demo-site"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300 if FULL else 120)]

# Fast cadence so a few seconds hold plenty of records; small batches so several are in flight.
# (Not faster: the loop uploads only in gaps of at least upload.MIN_REQUEST_TIME between polls.)
FAST = {
    ("device:meter1", "interval"): "500ms",
    ("device:plc1", "interval"): "500ms",
    ("connection:bus1", "baud"): "115200",
    ("agent", "fsync_interval"): "1s",
    ("agent", "health_interval"): "3s",
    ("agent", "summary_interval"): "10s",
    ("upload", "batch_max_records"): "20",
    ("upload", "backoff_max"): "1s",
    ("upload", "timeout"): "3s",
}


def fingerprint(rec):
    return hashlib.sha1(json.dumps(rec, sort_keys=True).encode()).hexdigest()


class E2E:
    """One site for one scenario: in-process simulator and proxy, collector and agent processes."""

    def __init__(self, tmp_path, changes=None, devices=None):
        self.sim = Simulator(devices or {1: EnergyMeter(seed=1), 2: Plc(seed=2)}, tcp=0, rtu=True).start()
        self.site = Site(tmp_path / "run")
        self.site.use_simulator(self.sim)
        self.site.start_collector()
        self.proxy = FaultProxy(self.site.collector_port).start()
        ch = dict(FAST)
        ch.update(changes or {})
        self.changes = ch
        self.site.write_agent_ini(upload_port=self.proxy.port, changes=ch)
        self.spool_dir = self.site.run / "spool"

    def close(self):
        self.site.stop()
        self.proxy.stop()
        self.sim.stop()
        # pytest shows this only when the test failed: the processes' own account
        for name in ("agent", "drain", "collector"):
            log = self.site.run / ("%s.log" % name)
            if log.exists():
                print("---- %s (last lines)\n%s" % (log, "\n".join(log.read_text(errors="replace").splitlines()[-25:])))

    # -- processes

    def start_agent(self, wait=True):
        """Start the agent; with `wait`, return once its loop runs (it writes its status file
        first thing), so a SIGTERM from then on is the agent's to handle."""
        status = self.site.run / "status.json"
        if status.exists():
            status.unlink()
        proc = self.site.start_agent()
        if wait:
            wait_for(lambda: status.exists() or not proc.alive(), 30, "the agent's loop")
            assert proc.alive(), proc.tail()
        return proc

    def stop_agent(self):
        proc = self.site.procs.pop("agent")
        rc = proc.stop(timeout=20)
        assert rc == 0, "agent exit %s:\n%s" % (rc, proc.tail())

    def kill_agent(self):
        self.site.procs.pop("agent").kill()

    def restart_collector(self):
        self.site.start_collector(port=self.site.collector_port)

    # -- what is where

    def stored(self):
        return self.site.records(agent=AGENT)

    def wait_stored(self, n, timeout=30):
        return wait_for(lambda: len(self.stored()) >= n, timeout, "%d records at the collector" % n, 0.2)

    def spool_next_seq(self, key="next_seq"):
        from agent.spool import Spool

        sp = Spool(str(self.spool_dir), AGENT)
        try:
            return sp.stats()[key]
        finally:
            sp.close()

    def drain(self, timeout=60):
        """The agent is stopped; run it without devices on the same spool until every record it
        generated reached the collector. Returns next_seq (records generated = next_seq - 1)."""
        n = self.spool_next_seq()
        a = self.site.run
        ini = a / "drain.ini"
        ini.write_text("\n".join([
            "[agent]", "id = %s" % AGENT, "spool_dir = %s" % self.spool_dir, "status_file = %s" % (a / "drain.json"),
            "spool_max_mb = %s" % self.changes.get(("agent", "spool_max_mb"), "16"),
            "[upload]", "url = http://127.0.0.1:%d/api/v1/batches" % self.proxy.port,
            "batch_max_records = 500", "backoff_max = 1s", ""]))
        status = a / "drain.json"
        if status.exists():
            status.unlink()
        proc = self.site.start_agent_with(ini, "drain")
        try:
            # (the status file also says the loop is up: SIGTERM is handled from then on)
            wait_for(lambda: (status.exists() and max([r["seq"] for r in self.stored()] or [0]) >= n - 1)
                     or not proc.alive(), timeout, "the backlog to drain (seq %d)" % (n - 1), 0.3)
            assert proc.alive(), proc.tail()
        finally:
            rc = self.site.procs.pop("drain").stop(timeout=20)
        assert rc == 0, proc.tail()
        return self.spool_next_seq()

    # -- the audit

    def audit(self, allowed_missing=(), expect_gaps=False):
        next_seq = self.drain()
        recs = self.stored()
        seqs = [r["seq"] for r in recs]
        assert len(seqs) == len(set(seqs)), "the collector holds a seq twice"
        # a spool without state starts far above 1 (the clock in ms, the seq lease): the first
        # seq it handed out is kept in its cursor
        generated = set(range(self.spool_next_seq("origin_seq"), next_seq))
        stored = set(seqs)
        assert stored <= generated, "seqs the agent never generated: %s" % sorted(stored - generated)[:10]
        gaps = [r for r in recs if r.get("kind") == "gap"]
        covered = set()
        for g in gaps:
            assert g["first_seq"] <= g["last_seq"] < g["seq"]
            covered.update(range(g["first_seq"], g["last_seq"] + 1))
        missing = generated - stored
        unexplained = missing - covered - set(allowed_missing)
        assert not unexplained, "lost without a gap record: %s" % sorted(unexplained)[:20]
        dropped = sum(g["dropped"] for g in gaps)
        # Exact: each lost record is accounted for once (a gap record that is itself dropped is
        # counted in a later one), so the stored gaps add up to exactly what is missing.
        assert dropped == len(missing - set(allowed_missing)), "gap records account for %d, %d missing" % (
            dropped, len(missing - set(allowed_missing)))
        if expect_gaps:
            assert gaps, "the bound was hit but no gap record arrived"
        else:
            assert not gaps, "unexpected gap records: %s" % gaps
        assert self.proxy.conflicts() == [], "seqs sent with different contents: %s" % self.proxy.conflicts()[:5]
        for r in recs:
            assert fingerprint(r) in self.proxy.seen[(AGENT, r["seq"])], "stored differs from sent: %s" % r
        summary = {"generated": len(generated), "stored": len(stored), "missing": len(missing),
                   "gaps": len(gaps), "dropped": dropped, "resent": self.proxy.resent(),
                   "proxy_faults": dict(self.proxy.faults_applied)}
        print("audit:", json.dumps(summary))
        return summary


@pytest.fixture
def e2e(tmp_path, request):
    made = []

    def make(**kw):
        made.append(E2E(tmp_path, **kw))
        return made[-1]

    yield make
    for e in made:
        e.close()


def test_collector_down_a_while_and_back(e2e):
    e = e2e()
    e.start_agent()
    e.wait_stored(5)
    e.site.procs.pop("collector").stop()
    time.sleep(30 if FULL else 4)           # readings pile up in the spool meanwhile
    e.restart_collector()
    before = len(e.stored())
    e.wait_stored(before + 10)
    e.stop_agent()
    s = e.audit()
    assert s["missing"] == 0


def test_collector_killed_mid_batch(e2e):
    e = e2e(changes={("upload", "batch_max_records"): "200"})
    e.start_agent()
    e.wait_stored(5)
    kills = 12 if FULL else 3
    for i in range(kills):
        # Build a backlog (503s), then SIGKILL the collector 0, 3 or 15 ms after a batch has
        # reached it: before, during or after its transaction. Either way the records must end
        # up stored exactly once (resent when no answer came back).
        e.proxy.set_fault("error", duration=1.0)
        time.sleep(1.2)
        collector = e.site.procs.pop("collector")
        delay = (0.0, 0.003, 0.015)[i % 3]
        e.proxy.on_forward = lambda c=collector, d=delay: (time.sleep(d), c.kill())
        wait_for(collector.p.poll, 20, "a batch to reach the collector")
        e.restart_collector()
    before = len(e.stored())
    e.wait_stored(before + 10)
    e.stop_agent()
    s = e.audit()
    assert s["missing"] == 0
    assert s["resent"] > 0      # at least the immediate kills left batches unacknowledged
    import sqlite3

    with sqlite3.connect(str(e.site.run / "collector.db")) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_connections_reset_mid_request(e2e):
    e = e2e()
    e.start_agent()
    e.wait_stored(5)
    for kind, count in (("reset_before", 2), ("reset_mid", 2), ("reset_after", 3), ("error", 2)):
        e.proxy.set_fault(kind, count=count)
        wait_for(lambda: not e.proxy.fault_active(), 30, "the %s faults to be used" % kind, 0.1)
    before = len(e.stored())
    e.wait_stored(before + 5)
    e.stop_agent()
    s = e.audit()
    assert s["missing"] == 0
    assert s["proxy_faults"] == {"reset_before": 2, "reset_mid": 2, "reset_after": 3, "error": 2}
    assert s["resent"] > 0      # reset_after: stored but not acknowledged, so sent again


def test_agent_sigkill_at_random_moments(e2e):
    """SIGKILL at random moments, a third of them at moments picked to hurt: right after a
    batch reached the collector (stored, not yet acknowledged) and in the middle of a poll."""
    e = e2e()
    rng = random.Random(int(os.environ.get("SEED", "0")) or None)
    kills = 20 if FULL else 6
    moments = {"random": 0, "after_send": 0, "mid_poll": 0}
    for i in range(kills):
        moment = ("random", "after_send", "mid_poll")[i % 3]
        if moment == "random":
            agent = e.start_agent(wait=False)       # sometimes it dies while still starting
            time.sleep(rng.uniform(0.3, 1.5))
        elif moment == "after_send":
            agent = e.start_agent()
            e.proxy.on_forward = agent.p.kill
            wait_for(agent.p.poll, 30, "a batch to reach the collector")
        else:
            agent = e.start_agent()
            served = e.sim.stats(2).get("delay", 0)
            e.sim.set_fault(2, "delay", seconds=0.25, count=1)
            wait_for(lambda s=served: e.sim.stats(2).get("delay", 0) > s, 30, "a poll to start")
            time.sleep(rng.uniform(0.0, 0.2))
        e.kill_agent()
        e.proxy.on_forward = None
        moments[moment] += 1
    e.start_agent()
    e.wait_stored(10)
    e.stop_agent()
    s = e.audit()
    print("kills:", moments)
    assert s["missing"] == 0
    assert s["generated"] > kills
    assert s["resent"] > 0      # the after-send kills: the batch went again after the restart


def test_spool_bound_hit_gap_accounts_for_every_drop(e2e):
    e = e2e(changes={("agent", "spool_max_mb"): "0.006", ("agent", "spool_segment_kb"): "4"})
    e.start_agent()
    e.wait_stored(5)
    e.proxy.set_fault("error", duration=30 if FULL else 8)    # the collector answers 503
    wait_for(lambda: not e.proxy.fault_active(), 60, "the outage to end", 0.2)
    time.sleep(2)
    e.stop_agent()
    s = e.audit(expect_gaps=True)
    assert s["missing"] > 0 and s["dropped"] >= s["missing"]


def test_torn_and_corrupt_spool_file_at_start(e2e):
    e = e2e()
    e.proxy.set_fault("error")              # keep everything in the spool
    e.start_agent()
    wait_for(lambda: e.proxy.requests >= 3, 30, "upload attempts")
    time.sleep(1.0)
    e.stop_agent()
    e.proxy.clear_fault()
    origin = e.spool_next_seq("origin_seq")     # seqs origin..last are spooled (one is corrupted below)
    segs = sorted(e.spool_dir.glob("seg-*.jsonl"))
    assert segs
    lines = segs[-1].read_bytes().split(b"\n")
    assert len(lines) > 6
    # Corrupt one line in the middle (same length, so the others stay where they are) ...
    victim = json.loads(lines[3])["seq"]
    lines[3] = b"#" * len(lines[3])
    last = json.loads(lines[-2])["seq"]
    # ... and leave a torn last line, as a power cut during the write would.
    torn = b'{"agent":"%s","seq":%d,"ts":"2026-11-2' % (AGENT.encode(), last + 1)
    segs[-1].write_bytes(b"\n".join(lines) + torn)
    e.start_agent()
    e.wait_stored(last - origin + 1 + 5)
    e.stop_agent()
    s = e.audit(expect_gaps=True)
    # Only the corrupted line is gone, and a gap record (reason "corrupt") says so. The torn line
    # was never complete, so never uploaded: its seq is given to the first record after the
    # restart, which arrives whole.
    assert s["missing"] == 1
    assert [(g["reason"], g["dropped"], g["first_seq"], g["last_seq"]) for g in e.stored()
            if g.get("kind") == "gap"] == [("corrupt", 1, victim, victim)]
    reused = [r for r in e.stored() if r["seq"] == last + 1]
    assert reused and len(reused[0]["ts"]) == 24 and reused[0]["ts"] > min(r["ts"] for r in e.stored())
    setaside = (e.spool_dir / "setaside.log").read_bytes()
    assert torn in setaside and b"#" * 20 in setaside


def test_dead_device_does_not_disturb_the_others(e2e):
    """One device on the RTU bus times out on every request; the meter on the same bus and the
    PLC on TCP keep their 1 s cadence. Prints the healthy devices' start-time jitter."""
    timeout = 0.3
    e = e2e(devices={1: EnergyMeter(seed=1), 2: Plc(seed=2), 3: Plc(seed=3)}, changes={
        ("device:meter1", "interval"): "1s", ("device:plc1", "interval"): "1s",
        ("connection:bus1", "timeout"): "%dms" % (timeout * 1000),
        ("device:dead1", "connection"): "bus1", ("device:dead1", "unit"): "3",
        ("device:dead1", "interval"): "1s", ("points:dead1", "x"): "holding 0 uint16"})
    e.sim.set_fault(3, "silence")
    e.start_agent()
    duration = 120 if FULL else 8
    time.sleep(duration)
    e.stop_agent()
    recs = e.stored()
    jitter = []
    for dev in ("meter1", "plc1"):
        ts = sorted(_epoch(r["ts"]) for r in recs if r.get("device") == dev and r.get("status") == "ok")
        assert len(ts) >= duration - 2, "%s: %d readings in %ds" % (dev, len(ts), duration)
        t0 = ts[0]
        jitter += [abs((t - t0) - round(t - t0)) for t in ts]
    jitter.sort()
    p50 = statistics.median(jitter)
    p99 = jitter[min(len(jitter) - 1, int(0.99 * len(jitter)))]
    dead = [r for r in recs if r.get("device") == "dead1" and r.get("kind", "data") == "data"]
    print("dead device: healthy start-time jitter p50 %.1f ms, p99 %.1f ms (timeout budget %d ms); "
          "dead device: %d error records, %d requests in %d s"
          % (p50 * 1000, p99 * 1000, timeout * 1000, len(dead), e.sim.stats(3).get("requests", 0), duration))
    assert dead and all(r["status"] == "error" and r["error"]["kind"] == "timeout" for r in dead)
    assert p99 <= timeout, "a healthy device was delayed by more than the dead one's timeout"
    assert e.sim.stats(3)["requests"] < duration  # probed with back-off, not every cycle
    e.audit()


def _epoch(ts):
    import calendar

    return calendar.timegm(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")) + int(ts[20:23]) / 1000.0


def test_device_faults_are_recorded_and_the_agent_recovers(e2e):
    """The simulator breaks one answer at a time (RTU meter, TCP PLC); the agent records the
    error with the right kind, and the next cycle reads the device again. Busy (exception 6)
    is retried once, so a single busy answer costs no reading at all."""
    e = e2e(changes={("connection:bus1", "timeout"): "300ms", ("connection:plc", "timeout"): "300ms"})
    e.start_agent()
    e.wait_stored(4)
    # (TCP: the client reopens a broken connection and sends the request once more, so a single
    # broken answer is absorbed; count=3 outlasts that resend.)
    cases = [
        (1, "meter1", "crc", {}, {"crc"}),
        (1, "meter1", "truncate", {}, {"timeout", "frame"}),
        (1, "meter1", "silence", {}, {"timeout"}),
        (1, "meter1", "exception", {"code": 2}, {"exception"}),
        (1, "meter1", "delay", {"seconds": 0.6}, {"timeout"}),
        (2, "plc1", "drop", {"count": 3}, {"connection"}),
        (2, "plc1", "reset", {"count": 3}, {"connection"}),
        (2, "plc1", "crc", {"count": 3}, {"frame", "connection"}),
        (2, "plc1", "delay", {"seconds": 0.6}, {"timeout"}),
    ]
    for unit, device, kind, params, kinds in cases:
        seen = {r["seq"] for r in e.stored()}
        e.sim.set_fault(unit, kind, **dict({"count": 1}, **params))

        def new_for(dev, seen=seen):
            return [r for r in e.stored() if r["seq"] not in seen and r.get("device") == dev
                    and r.get("kind", "data") == "data"]

        wait_for(lambda dev=device: any(r["status"] == "error" for r in new_for(dev)), 30,
                 "an error record for %s %s" % (device, kind), 0.2)
        err = next(r for r in new_for(device) if r["status"] == "error")
        assert err["error"]["kind"] in kinds, (kind, err)
        assert err["unit"] == unit
        # ... and the device is read again afterwards
        wait_for(lambda dev=device, s=err["seq"]: any(r["status"] == "ok" and r["seq"] > s for r in new_for(dev)),
                 30, "%s to recover after %s" % (device, kind), 0.2)
    # One busy answer: retried after the pause, no error record.
    seen = {r["seq"] for r in e.stored()}
    busy_before = e.sim.stats(2).get("exception", 0)
    e.sim.set_fault(2, "exception", code=6, count=1)
    wait_for(lambda: e.sim.stats(2).get("exception", 0) > busy_before, 30, "the busy answer")
    time.sleep(2.0)
    assert not [r for r in e.stored() if r["seq"] not in seen and r.get("device") == "plc1"
                and r.get("status") == "error"]
    e.stop_agent()
    e.audit()


@pytest.fixture
def small_fs(tmp_path):
    """A 16 kB tmpfs (the router's spool partition, full in seconds); skips without mount rights."""
    import subprocess

    mnt = tmp_path / "spoolfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k,mode=0755", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root/CAP_SYS_ADMIN): %s" % r.stderr.strip())
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_spool_filesystem_full(e2e, small_fs):
    """The spool's filesystem fills up while the collector is away: the oldest records go, a
    gap record accounts for every one of them, nothing else is lost, and the agent keeps going."""
    e = e2e(devices={1: EnergyMeter(seed=1), 2: Plc(seed=2), 3: Generic(seed=3, registers=60)}, changes={
        ("agent", "spool_dir"): str(small_fs / "spool"), ("agent", "spool_segment_kb"): "4",
        ("device:bulk", "connection"): "plc", ("device:bulk", "unit"): "3",
        ("device:bulk", "interval"): "500ms",
        **{("points:bulk", "r%02d" % a): "holding %d uint16" % a for a in range(60)}})
    e.spool_dir = small_fs / "spool"
    e.start_agent()
    e.wait_stored(5)
    e.proxy.set_fault("error", duration=30 if FULL else 9)
    wait_for(lambda: not e.proxy.fault_active(), 60, "the outage to end", 0.2)
    time.sleep(2)
    e.stop_agent()
    s = e.audit(expect_gaps=True)
    reasons = {g["reason"] for g in e.stored() if g.get("kind") == "gap"}
    print("gap reasons:", reasons)
    assert any("disk full" in r or "No space" in r for r in reasons), reasons
    assert s["missing"] > 0


def test_unit_that_disappears_and_comes_back(e2e):
    """The meter vanishes from the bus: after dead_after failures it is only probed, with back-off
    capped at dead_backoff_max; when it is back, readings resume and the PLC never noticed."""
    e = e2e(changes={("agent", "dead_after"): "2", ("agent", "dead_backoff_max"): "2s",
                     ("connection:bus1", "timeout"): "300ms"})
    e.start_agent()
    e.wait_stored(4)
    e.sim.set_fault(1, "gone", duration=5)
    gone_at = time.time()
    time.sleep(5)
    back = wait_for(lambda: [r for r in e.stored() if r.get("device") == "meter1" and r.get("status") == "ok"
                             and _epoch(r["ts"]) > gone_at + 5], 30, "the meter's readings to resume", 0.2)
    e.stop_agent()
    recs = e.stored()
    errors = [r for r in recs if r.get("device") == "meter1" and r.get("status") == "error"]
    plc_gone = [r for r in recs if r.get("device") == "plc1" and r.get("kind", "data") == "data"
                and gone_at <= _epoch(r["ts"]) <= gone_at + 5]
    print("meter gone 5 s: %d error records, %d probes, back after %.1f s; plc readings meanwhile: %d"
          % (len(errors), e.sim.stats(1).get("gone", 0), _epoch(back[0]["ts"]) - gone_at, len(plc_gone)))
    assert errors and all(r["error"]["kind"] == "timeout" for r in errors)
    assert e.sim.stats(1)["gone"] < 10          # 5 s at 500 ms would be 10 polls: probed less often
    assert all(r["status"] == "ok" for r in plc_gone) and len(plc_gone) >= 8
    e.audit()


def test_fuzzed_answers_never_crash_the_agent(e2e):
    """Random bytes and random PDUs in valid frames, on RTU and TCP, in bursts: the agent keeps
    running, records each failure as a wire error (never an internal one), reads the devices
    again between bursts, and loses nothing."""
    e = e2e(changes={("connection:bus1", "timeout"): "300ms", ("connection:plc", "timeout"): "300ms",
                     ("agent", "dead_backoff_max"): "1s"})
    agent = e.start_agent()
    e.wait_stored(4)
    fuzzed_before = {u: e.sim.stats(u).get("fuzz", 0) for u in (1, 2)}
    end = time.monotonic() + (60 if FULL else 8)
    while time.monotonic() < end:
        for unit in (1, 2):
            e.sim.set_fault(unit, "fuzz", count=2)
        time.sleep(1.5)
        assert agent.alive(), agent.tail()
    e.sim.clear_fault()
    cleared = time.time()
    start = len(e.stored())
    e.wait_stored(start + 6)
    e.stop_agent()
    recs = [r for r in e.stored() if r.get("kind", "data") == "data"]
    errors = [r for r in recs if r["status"] == "error"]
    kinds = {r["error"]["kind"] for r in errors}
    fuzzed = sum(e.sim.stats(u).get("fuzz", 0) - fuzzed_before[u] for u in (1, 2))
    print("fuzz: %d fuzzed answers, %d error records, kinds %s" % (fuzzed, len(errors), sorted(kinds)))
    assert fuzzed >= 8 and errors
    assert kinds <= {"timeout", "crc", "frame", "connection", "exception"}, kinds
    for dev in ("meter1", "plc1"):   # read again once the fuzzing stopped
        assert any(r["device"] == dev and r["status"] == "ok" and _epoch(r["ts"]) > cleared for r in recs), dev
    e.audit()
