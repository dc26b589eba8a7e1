"""The run loop against real peers: `modbus-agent run` as a subprocess, the device simulator
(tools/simulator.py, umodbus PDUs) on 127.0.0.1 TCP, and a real HTTP server playing the collector.

Timing is only ever waited for (bounded), never asserted: assertions are about what arrived,
in which order, with which seq, and what the agent's own counters say.
"""
import gzip
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.polling import moved

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))
import simulator  # noqa: E402  (tools/simulator.py: the device peer)

AGENT_ID = "loop-test"


# ---------------------------------------------------------------------------- peers

class Collector:
    """The real collector (agent.collector.make_app, SQLite in tmp) on a real socket, behind a
    small WSGI tap that remembers every record it acknowledged by seq, and every seq that came
    back with different content (a reused seq). `lose_ack_every = n`: every n-th POST is stored
    by the collector but answered 500, as when the answer is lost on the way back."""

    def __init__(self, db_path):
        from agent.collector import make_app
        from agent.collector.cli import make_server

        self.records = {}        # seq -> record dict
        self.reused = []         # (seq, first, second): same seq, different record
        self.posts = 0
        self.lost_acks = 0
        self.lose_ack_every = 0
        self.lock = threading.Lock()
        self.app = make_app(None, db="sqlite:///%s" % db_path)
        self.server = make_server("127.0.0.1", 0, self.tap)
        self.url = "http://127.0.0.1:%d/api/v1/batches" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def tap(self, environ, start_response):
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        environ["wsgi.input"] = io.BytesIO(body)
        answer = {}

        def capture(status, headers, exc_info=None):
            answer["status"], answer["headers"] = status, headers
            return lambda data: None

        out = b"".join(self.app(environ, capture))
        if environ["REQUEST_METHOD"] == "POST" and answer["status"].startswith("200"):
            if environ.get("HTTP_CONTENT_ENCODING") == "gzip":
                body = gzip.decompress(body)
            doc = json.loads(body)
            with self.lock:
                self.posts += 1
                self.remember(doc["agent"], doc["records"])
                if self.lose_ack_every and self.posts % self.lose_ack_every == 0:
                    self.lost_acks += 1
                    answer["status"], out = "500 Internal Server Error", b'{"error": "lost ack (test)"}'
                    answer["headers"] = [("Content-Type", "application/json")]
        headers = [(k, v) for k, v in answer["headers"] if k.lower() != "content-length"]
        start_response(answer["status"], headers + [("Content-Length", str(len(out)))])
        return [out]

    def remember(self, agent, records):
        for rec in records:
            assert rec["agent"] == agent
            old = self.records.get(rec["seq"])
            if old is None:
                self.records[rec["seq"]] = rec
            elif old != rec:
                self.reused.append((rec["seq"], old, rec))

    def snapshot(self):
        with self.lock:
            return dict(self.records)

    def of(self, device, kind=None):
        recs = [r for _, r in sorted(self.snapshot().items()) if r.get("device") == device]
        if kind == "data":
            return [r for r in recs if "kind" not in r and r.get("status") == "ok"]
        if kind is not None:
            return [r for r in recs if r.get("kind") == kind or r.get("status") == kind]
        return recs

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def collector(tmp_path):
    c = Collector(tmp_path / "collector.db")
    yield c
    c.close()


@pytest.fixture
def site():
    """Meter on unit 1, PLC on unit 2, generic on unit 3: on one Modbus TCP port and on RTU over
    a pseudo-terminal (the same units on both)."""
    sim = simulator.Simulator({1: simulator.EnergyMeter(seed=1), 2: simulator.Plc(seed=2),
                               3: simulator.Generic(seed=3, registers=10)}, tcp=0, rtu=True)
    sim.start()
    yield sim
    sim.stop()


# ---------------------------------------------------------------------------- helpers

def write_config(path, tmp, sim_port, url, devices, upload=True, **agent):
    keys = {"interval": "200ms", "fsync": "interval", "fsync_interval": "500ms", "summary_interval": "1s",
            "health_interval": "1s", "dead_after": "2", "dead_backoff_max": "1600ms", "log_level": "debug"}
    keys.update(agent)
    text = """[agent]
id = %(id)s
spool_dir = %(tmp)s/spool
status_file = %(tmp)s/status.json
%(extra)s
[connection:sim]
type = tcp
host = 127.0.0.1
port = %(port)d
timeout = 150ms
""" % {"id": AGENT_ID, "tmp": tmp, "port": sim_port, "extra": "".join("%s = %s\n" % kv for kv in keys.items())}
    if upload:
        text += """
[upload]
url = %s
timeout = 1s
backoff_max = 1s
batch_max_records = 200
""" % url
    text += devices
    Path(path).write_text(text)
    return path


METER = """
[device:meter]
connection = sim
unit = 1
interval = 500ms

[points:meter]
voltage_l1 = input 0 float32 CDAB unit=V
energy_import = input 24 float32 CDAB unit=kWh
"""

PLC_ON_CHANGE = """
[device:plc]
connection = sim
unit = 2
interval = 500ms
mode = on_change
heartbeat = 2s

[points:plc]
setpoint = holding 1 int16 scale=0.1 deadband=0.5
"""


def start_agent(cfg, log_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    with open(log_path, "ab") as logf:   # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(cfg)], cwd=str(ROOT),
                                stdout=logf, stderr=logf, env=env)


def wait_for(pred, timeout, what, proc=None, log_path=None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.05)
    tail = Path(log_path).read_text()[-3000:] if log_path and Path(log_path).exists() else ""
    raise AssertionError("gave up waiting for %s (agent rc=%s)\n%s" % (
        what, proc.poll() if proc else None, tail))


def status(tmp):
    try:
        return json.loads((Path(tmp) / "status.json").read_text())
    except (OSError, ValueError):
        return None


def device_status(tmp, name):
    st = status(tmp)
    return (st or {}).get("devices", {}).get(name)


def stop(proc, sig=signal.SIGTERM, timeout=15):
    proc.send_signal(sig)
    return proc.wait(timeout=timeout)


def pending_in_spool(spool_dir):
    """Records still in the spool (not acknowledged): opened the way the agent opens it."""
    from agent.spool import Spool

    sp = Spool(str(spool_dir), AGENT_ID)
    try:
        batch = sp.peek(10 ** 6, 1 << 30)
        lines = batch.lines if batch is not None else []
        return [json.loads(line) for line in lines], sp.stats()
    finally:
        sp.close()


def spooled(spool_dir, device):
    """Data records of `device` in the spool's segment files, read while the agent runs."""
    out = []
    for seg in sorted(Path(spool_dir).glob("seg-*.jsonl")):
        for line in seg.read_bytes().splitlines():
            if b'"device":"%s"' % device.encode() in line and b'"status":"ok"' in line:
                out.append(line)
    return out


def percentile(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100.0 * (len(s) - 1))))] if s else float("nan")


def start_jitter_ms(records, interval):
    """Lateness of each cycle's start against the device's slot grid, in ms. The grid's phase is
    the median phase (most cycles are on time), not the first record, which may have been late;
    a cycle may be up to one interval late, and a few ms early against the median."""
    from agent.status import _parse_utc

    ts = [_parse_utc(r["ts"]) for r in records]
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


# ---------------------------------------------------------------------------- pure parts

def test_moved_applies_deadbands_to_numbers_and_equality_to_the_rest():
    bands = {"v": 0.5, "s": 0.0}
    assert moved(None, {"v": 1.0}, bands)                      # first cycle after start
    assert not moved({"v": 230.0, "s": "on"}, {"v": 230.4, "s": "on"}, bands)
    assert not moved({"v": 230.0}, {"v": 230.5}, bands)       # within the band (not beyond)
    assert moved({"v": 230.0}, {"v": 230.6}, bands)
    assert moved({"v": 230.0}, {"v": 229.4}, bands)
    assert moved({"v": 230.0, "s": "on"}, {"v": 230.0, "s": "off"}, bands)
    assert moved({"v": 1.0}, {"v": None}, bands)               # NaN decoded to None is news
    assert moved({"v": 1.0}, {"v": 1.0, "x": 2}, bands)        # a point appeared
    assert moved({"n": 3}, {"n": 4}, {})                       # no deadband: any change


# ---------------------------------------------------------------------------- the run

def test_run_polls_spools_uploads_and_stops_cleanly_on_sigterm(tmp_path, site, collector):
    rtu = """
[connection:bus]
type = rtu
port = %s
baud = 19200
timeout = 300ms

[device:meter_rtu]
connection = bus
unit = 1
interval = 500ms

[points:meter_rtu]
voltage_l1 = input 0 float32 CDAB unit=V
frequency = input 22 float32 CDAB unit=Hz
""" % site.rtu_path
    cfg = write_config(tmp_path / "agent.ini", tmp_path, site.tcp_port, collector.url,
                       METER + PLC_ON_CHANGE + rtu)
    log_path = tmp_path / "agent.log"
    proc = start_agent(cfg, log_path)
    try:
        wait_for(lambda: len(collector.of("meter", "data")) >= 8, 20, "8 meter records at the collector",
                 proc, log_path)
        rtu_data = collector.of("meter_rtu", "data")
        assert rtu_data and 45 < rtu_data[-1]["values"]["frequency"] < 55   # a mains frequency, decoded
        # exception 6 (busy) once: retried after the pause, the cycle still succeeds
        site.set_fault(1, "exception", code=6, count=1)
        wait_for(lambda: (device_status(tmp_path, "meter") or {}).get("busy_retries"), 15,
                 "the busy retry in the status file", proc, log_path)
        wait_for(lambda: collector.of("plc", "health") and collector.of("meter", "health"), 15,
                 "health records of both devices", proc, log_path)
        # `status` reads the status file of the running agent
        r = subprocess.run([sys.executable, "-m", "agent", "status", "-c", str(cfg)], cwd=str(ROOT),
                           capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert r.returncode == 0, r.stderr
        assert "meter" in r.stdout and "plc" in r.stdout and "spool:" in r.stdout
        rc = stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = log_path.read_text()
    assert rc == 0, log[-3000:]
    assert "Traceback" not in log
    # one line per event: time, level, component, device and unit where it is about a device
    assert any(" loop meter unit=1: " in line for line in log.splitlines())
    assert "summary: meter ok=" in log

    meter = collector.of("meter", "data")
    assert all(set(r["values"]) == {"voltage_l1", "energy_import"} for r in meter)
    assert [r["ts"] for r in meter] == sorted(r["ts"] for r in meter)
    st = status(tmp_path)
    assert st["state"] == "stopped"
    m, p = st["devices"]["meter"], st["devices"]["plc"]
    assert m["busy_retries"] >= 1 and m["polls_failed"] == 0     # busy retried, not a failure
    # on_change: the setpoint never moves, so only the first reading and heartbeats were sent
    plc_data = collector.of("plc", "data") + [r for r in pending_in_spool(tmp_path / "spool")[0]
                                              if r.get("device") == "plc" and r.get("status") == "ok"]
    assert 1 <= len(plc_data) < p["polls_ok"] / 3
    assert "clock" not in meter[0]   # the host clock is set

    # SIGTERM flushed the spool: every seq handed out is at the collector or still spooled
    pending, stats = pending_in_spool(tmp_path / "spool")
    seqs = set(collector.snapshot()) | {r["seq"] for r in pending}
    assert seqs == set(range(stats["origin_seq"], stats["next_seq"]))
    assert not collector.reused

    r = subprocess.run([sys.executable, "-m", "agent", "status", "-c", str(cfg)], cwd=str(ROOT),
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 1 and "STOPPED" in r.stdout


def test_sighup_with_a_broken_file_keeps_running_then_a_good_one_applies(tmp_path, site, collector):
    cfg = write_config(tmp_path / "agent.ini", tmp_path, site.tcp_port, collector.url, METER)
    log_path = tmp_path / "agent.log"
    proc = start_agent(cfg, log_path)
    try:
        wait_for(lambda: len(collector.of("meter", "data")) >= 3, 20, "meter records", proc, log_path)
        good = cfg.read_text()
        cfg.write_text(good.replace("interval = 200ms\n", "interval = soon\n", 1)
                       + "\n[device:broken]\nconnection = nowhere\nbogus_key = 1\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "still running the previous config" in log_path.read_text(), 15,
                 "the reload error", proc, log_path)
        before = len(collector.of("meter", "data"))
        wait_for(lambda: len(collector.of("meter", "data")) >= before + 3, 15,
                 "meter records after the failed reload", proc, log_path)
        # a good file with one more device: applied without a restart
        cfg.write_text(good + """
[device:counter]
connection = sim
unit = 3
interval = 500ms

[points:counter]
r0 = holding 0 uint16
""")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: collector.of("counter", "data"), 15, "records of the added device", proc, log_path)
        assert proc.poll() is None
        rc = stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = log_path.read_text()
    assert rc == 0
    errors = [line for line in log.splitlines() if " ERROR loop: reload: " in line]
    # every problem, each saying where: file:line: [section] key
    assert any("agent.ini:" in e and "[agent] interval" in e for e in errors), errors
    assert any("[device:broken]" in e for e in errors), errors
    assert "reloaded: 2 device(s)" in log


def test_dead_devices_do_not_disturb_a_healthy_device_on_the_same_connection(tmp_path, site, collector):
    """Unit 4 does not exist on the simulator's bus (silence: every request times out), `gone` is
    on a closed port, `mute` on a port that accepts and never answers; the meter shares its
    connection with the silent one."""
    import socket

    with socket.socket() as s:     # a port that was free a moment ago and nobody listens on
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    blackhole = socket.socket()    # listens, so connects succeed, but nothing is ever read or sent
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(8)
    devices = """
[device:silent]
connection = sim
unit = 4
interval = 200ms

[points:silent]
x = holding 0 uint16

[connection:closed]
type = tcp
host = 127.0.0.1
port = %d
timeout = 150ms
backoff_max = 1s

[device:gone]
connection = closed
unit = 1
interval = 200ms

[points:gone]
x = holding 0 uint16

[connection:blackhole]
type = tcp
host = 127.0.0.1
port = %d
timeout = 150ms

[device:mute]
connection = blackhole
unit = 1
interval = 200ms

[points:mute]
x = input 0 uint16
""" % (closed_port, blackhole.getsockname()[1])
    # no [upload]: this is about polling cadence, so nothing else shares the loop's time
    # the dead devices come first in the file, so on a shared slot they are polled before the meter:
    # the meter then starts late by at most one timeout, and only on the slots they are probed in
    cfg = write_config(tmp_path / "agent.ini", tmp_path, site.tcp_port, None,
                       devices + METER.replace("500ms", "200ms"), upload=False)
    log_path = tmp_path / "agent.log"
    proc = start_agent(cfg, log_path)
    try:
        wait_for(lambda: len(spooled(tmp_path / "spool", "meter")) >= 30, 30, "30 meter cycles", proc, log_path)
        rc = stop(proc)
    finally:
        blackhole.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0
    st = status(tmp_path)["devices"]
    meter, silent, gone, mute = st["meter"], st["silent"], st["gone"], st["mute"]
    records = [r for r in pending_in_spool(tmp_path / "spool")[0] if "kind" not in r]
    jitter = start_jitter_ms([r for r in records if r["device"] == "meter"], 0.2)
    print("\nhealthy meter start-time lateness with three dead devices (timeout 150 ms): p50 %.1f ms, "
          "p99 %.1f ms, max %.1f ms over %d cycles; missed %d; probes: silent %d, gone %d, mute %d" % (
              percentile(jitter, 50), percentile(jitter, 99), max(jitter), len(jitter),
              meter["missed_cycles"], silent["polls_failed"], gone["polls_failed"], mute["polls_failed"]))
    assert meter["polls_failed"] == 0 and meter["skipped_cycles"] == 0
    assert silent["dead"] and gone["dead"] and mute["dead"]
    assert mute["polls_ok"] == 0 and mute["timeouts"] == mute["polls_failed"] < meter["polls_ok"] / 3
    assert silent["polls_ok"] == 0 and silent["timeouts"] == silent["polls_failed"]
    assert gone["connection_errors"] == gone["polls_failed"]
    # back-off: the dead ones were probed far less often than the healthy one was polled
    assert silent["polls_failed"] < meter["polls_ok"] / 3
    assert gone["polls_failed"] < meter["polls_ok"] / 3
    # their failures are on record, with the device, unit and the reason
    errs = [r for r in records if r["device"] == "silent"]
    assert errs and all(r["status"] == "error" for r in errs)
    assert errs[0]["error"]["kind"] == "timeout" and errs[0]["unit"] == 4
    assert "unit 4 fc 03 address 0 count 1" in errs[0]["error"]["message"]


def test_sigkill_at_random_moments_never_skips_or_reuses_a_seq(tmp_path, site, collector):
    # 300 ms leaves a gap long enough for an upload request after both polls
    devices = (METER + PLC_ON_CHANGE.replace("mode = on_change", "mode = on_schedule")).replace("500ms", "300ms")
    cfg = write_config(tmp_path / "agent.ini", tmp_path, site.tcp_port, collector.url, devices,
                       health_interval="300ms")
    log_path = tmp_path / "agent.log"
    collector.lose_ack_every = 3    # stored but answered 500: the batch comes again
    rng = random.Random(int(os.environ.get("LOOP_KILL_SEED", "4")))
    kills = int(os.environ.get("LOOP_KILLS", "6"))
    for i in range(kills):
        proc = start_agent(cfg, log_path)
        try:
            # wait until this run has polled (its seqs are moving), then kill at a random moment
            first = max(collector.snapshot(), default=0)
            pid = proc.pid
            wait_for(lambda: (status(tmp_path) or {}).get("pid") == pid, 20,  # noqa: B023 (called at once)
                     "run %d started" % i, proc, log_path)
            time.sleep(rng.uniform(0.05, 1.5))
            proc.kill()
            proc.wait()
            assert proc.returncode == -signal.SIGKILL
            assert max(collector.snapshot(), default=0) >= first
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # last run: let it upload everything, then stop it properly
    proc = start_agent(cfg, log_path)
    try:
        wait_for(lambda: (status(tmp_path) or {}).get("pid") == proc.pid, 20, "last run", proc, log_path)
        time.sleep(0.5)
        rc = stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0
    pending, stats = pending_in_spool(tmp_path / "spool")
    at_server = collector.snapshot()
    assert not collector.reused, collector.reused[:3]
    # every seq ever handed out is at the server or still waiting in the spool: none skipped
    assert set(at_server) | {r["seq"] for r in pending} == set(range(stats["origin_seq"], stats["next_seq"]))
    assert len(at_server) >= kills   # the runs did produce and upload records
    assert collector.lost_acks
    print("\n%d SIGKILLs: %d records at the collector, %d still spooled, %d POSTs, %d acks lost" % (
        kills, len(at_server), len(pending), collector.posts, collector.lost_acks))


def test_sighup_with_an_unwritable_log_file_keeps_the_running_config(tmp_path, site, collector):
    """Review: a reload whose log_file cannot be opened raised out of the loop (exit 1), and procd
    restarted the agent into a file `run` refuses: the agent stayed down."""
    cfg = write_config(tmp_path / "agent.ini", tmp_path, site.tcp_port, collector.url, METER)
    log_path = tmp_path / "agent.log"
    proc = start_agent(cfg, log_path)
    try:
        wait_for(lambda: len(collector.of("meter", "data")) >= 3, 20, "meter records", proc, log_path)
        good = cfg.read_text()
        cfg.write_text(good.replace("[agent]\n", "[agent]\nlog_file = %s/no/such/dir/agent.log\n" % tmp_path, 1))
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "[agent] log:" in log_path.read_text(), 15, "the reload error", proc, log_path)
        before = len(collector.of("meter", "data"))
        wait_for(lambda: len(collector.of("meter", "data")) >= before + 3, 15,
                 "meter records after the refused reload", proc, log_path)
        assert proc.poll() is None
        rc = stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0
    assert "still running the previous config" in log_path.read_text()


def test_run_log_level_survives_a_sighup(tmp_path, site, collector):
    """Review: `run --log-level` was replaced by the file's log_level at the first reload."""
    cfg = write_config(tmp_path / "agent.ini", tmp_path, site.tcp_port, collector.url, METER, log_level="warning")
    log_path = tmp_path / "agent.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(cfg), "--log-level", "debug"],
                                cwd=str(ROOT), stdout=logf, stderr=logf, env=env)
    try:
        wait_for(lambda: len(collector.of("meter", "data")) >= 2, 20, "meter records", proc, log_path)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reloaded:" in log_path.read_text(), 15, "the reload", proc, log_path)
        mark = len(log_path.read_text())
        # the file says warning: an INFO summary after the reload means --log-level debug still holds
        wait_for(lambda: " INFO loop: summary" in log_path.read_text()[mark:], 10,
                 "INFO lines after the reload", proc, log_path)
        rc = stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0
