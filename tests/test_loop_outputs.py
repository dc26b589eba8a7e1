"""The loop with more than one output (agent.output): each is driven in the gaps between polls,
each reads and acknowledges through its own spool cursor, one that is down for a long time
neither stops nor slows the other and gets its backlog when it comes back, and the starvation
rule holds per output. Real peers: the simulator on 127.0.0.1, the real collector behind the
HTTP uploader, a real spool directory; the second output is a small real one that appends the
spool's lines to a file."""
import json
import sys
import threading
import time
from pathlib import Path

import pytest

from agent import output
from agent.config import load_config
from agent.loop import Loop

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))
import simulator  # noqa: E402


class FileOutput(output.Output):
    """Appends every record to a file, acknowledging each batch once it is written. `down_until`
    (time.monotonic()): backing off until then, reading nothing. `need`: the request time it
    claims (a gap shorter than that never starts a batch)."""

    label = None

    def __init__(self, name, path, need=0.001):
        self.name = name
        self.path = path
        self.need = need
        self.down_until = 0.0
        self.calls = 0
        self.closed = False

    def request_time(self):
        return self.need

    def retry_at(self):
        return self.down_until if self.down_until > time.monotonic() else None

    def state(self):
        return {"sent_total": len(self.seqs())}

    def close(self):
        self.closed = True

    def fill_gap(self, spool, until, slice_end=None, stop=None):
        self.calls += 1
        res = {"status": output.EMPTY, "batches": 0}
        if time.monotonic() < self.down_until:
            res["status"] = output.BACKOFF
            return res
        while True:
            now = time.monotonic()
            if stop is not None and stop():
                res["status"] = output.STOPPED
                break
            if until - now < self.need:
                res["status"] = output.DEADLINE
                break
            if res["batches"] and slice_end is not None and now >= slice_end:
                res["status"] = output.SLICE
                break
            batch = spool.peek(50, 1 << 20, output=self.name)
            if batch is None:
                break
            with open(self.path, "ab") as f:
                f.write(b"".join(line.rstrip(b"\n") + b"\n" for line in batch.lines))
            spool.ack(batch)
            res["batches"] += 1
        return res

    def seqs(self):
        try:
            with open(self.path, "rb") as f:
                return [json.loads(line)["seq"] for line in f]
        except FileNotFoundError:
            return []


@pytest.fixture
def sim():
    s = simulator.Simulator({1: simulator.EnergyMeter(seed=1)}, tcp=0)
    s.start()
    yield s
    s.stop()


@pytest.fixture
def collector_url(tmp_path):
    from agent.collector import make_app
    from agent.collector.cli import make_server

    server = make_server("127.0.0.1", 0, make_app(None, db="sqlite:///%s" % (tmp_path / "c.db")))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield "http://127.0.0.1:%d/api/v1/batches" % server.server_address[1]
    server.shutdown()
    server.server_close()


def make_loop(tmp_path, port, url, outputs, interval="100ms"):
    ini = tmp_path / "agent.ini"
    ini.write_text("""[agent]
id = outputs-test
interval = %(interval)s
spool_dir = %(tmp)s/spool
status_file = %(tmp)s/status.json
health_interval = 1h
summary_interval = 1h

[upload]
url = %(url)s
timeout = 1s

[connection:sim]
type = tcp
host = 127.0.0.1
port = %(port)d
timeout = 200ms

[device:meter]
connection = sim
unit = 1

[points:meter]
voltage_l1 = input 0 float32 CDAB
""" % {"tmp": tmp_path, "port": port, "url": url, "interval": interval})
    return Loop(load_config(str(ini)), outputs=outputs)


def run_for(loop, seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        loop.step()


def test_an_output_down_for_long_does_not_hold_the_other_and_gets_its_backlog_back(tmp_path, sim, collector_url):
    archive = FileOutput("archive", str(tmp_path / "archive.jsonl"))
    archive.down_until = time.monotonic() + 1.5
    loop = make_loop(tmp_path, sim.tcp_port, collector_url, [archive])
    try:
        assert [out.name for out in loop.outputs] == ["http", "archive"]
        assert loop.spool.outputs == ("http", "archive")
        run_for(loop, 1.2)
        # archive down: http keeps up, the spool holds what archive has not had
        appended = loop.appended
        assert appended >= 5
        st = loop.spool.stats()
        assert loop.uploader.state()["sent_total"] >= appended - 2
        assert archive.seqs() == []
        assert st["outputs"]["archive"]["records"] == appended
        assert st["outputs"]["http"]["records"] <= 2
        run_for(loop, 1.0)        # archive back: the whole backlog, in order
        loop.upload_until(loop.mono() + 5)
        seqs = archive.seqs()
        assert seqs == list(range(seqs[0], seqs[0] + loop.appended)) and len(seqs) == loop.appended
        st = loop.spool.stats()
        assert st["outputs"]["archive"]["records"] == 0 and st["outputs"]["http"]["records"] == 0
        assert st["records"] == 0
        assert loop.uploader.state()["sent_total"] == loop.appended
        loop.summary()
        assert "; upload last_ok=" in loop.last_summary and "; archive sent_total=%d" % len(seqs) in loop.last_summary
        assert loop.status()["upload"]["sent_total"] == loop.appended
    finally:
        loop.shutdown()
    assert archive.closed


def test_the_starvation_rule_holds_per_output(tmp_path, sim, collector_url):
    """An output whose requests take longer than every gap gets one request's time forced
    every `starve_after`; the HTTP uploader, which fits the gaps, is never forced."""
    slow = FileOutput("slow", str(tmp_path / "slow.jsonl"), need=5.0)
    loop = make_loop(tmp_path, sim.tcp_port, collector_url, [slow])
    loop.starve_after = 0.4
    try:
        run_for(loop, 2.0)
        forced = loop.gaps.turns["slow"].forced
        http_forced = loop.gaps.turns["http"].forced
        loop.summary()
        text = loop.last_summary
    finally:
        loop.shutdown()
    assert forced >= 2 and http_forced == 0
    assert slow.seqs(), "the forced requests sent nothing"
    assert "slow delayed polls %d time(s)" % forced in text and "upload delayed" not in text


def test_a_backing_off_output_wakes_the_loop_when_its_back_off_ends(tmp_path, sim, collector_url):
    """No device due for a long time: the loop sleeps until the first output's retry_at."""
    archive = FileOutput("archive", str(tmp_path / "archive.jsonl"))
    loop = make_loop(tmp_path, sim.tcp_port, collector_url, [archive], interval="1h")
    try:
        loop.step()                                    # the first poll
        archive.down_until = time.monotonic() + 0.3
        t0 = time.monotonic()
        loop.step()                                    # the gap: archive backs off, the loop sleeps
        took = time.monotonic() - t0
        loop.step()
        seqs = archive.seqs()
    finally:
        loop.shutdown()
    assert 0.25 <= took < 2.0, "slept %.2fs: not until the back-off ended" % took
    assert seqs == [seqs[0]] and len(seqs) == 1
