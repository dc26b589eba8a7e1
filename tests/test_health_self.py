"""Self-monitoring and identification in health records: the agent's own CPU time, RSS, load,
spool disk free and uptime (read from /proc), the device identification (FC 43 / MEI 14, asked
once), end to end from a loop polling the simulator to the collector's agents API and page."""
import io
import json
import sys
import time
from pathlib import Path

import pytest

from agent.collector import make_app
from agent.config import load_config
from agent.health import SelfMonitor
from agent.loop import Loop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import simulator


def test_self_monitor_reads_the_process(tmp_path):
    m = SelfMonitor(str(tmp_path))
    # burn 0.1 s of CPU: /proc counts in 10 ms ticks, so 0.05 s could read as 40 ms (seen under
    # Python 3.9 in CI: cpu_ms_per_poll 4.0 for 10 polls)
    end = time.process_time() + 0.1
    while time.process_time() < end:
        pass
    s = m.snapshot(polls=10)
    assert s["cpu_s"] >= 0.05 and s["cpu_pct"] > 0 and s["cpu_ms_per_poll"] >= 5
    assert 1000 < s["rss_kb"] < 10 << 20                    # kB, from /proc/self/statm
    assert len(s["load"]) == 3 and s["spool_free_mb"] > 0
    # this process's age, not the monitor's: the test process started before it
    assert s["uptime_s"] > 0.05 and s["system_uptime_s"] >= s["uptime_s"]
    s2 = m.snapshot(polls=10)
    assert s2["cpu_ms_per_poll"] is None                    # no poll since the last snapshot
    assert json.dumps(s2)


def test_without_proc_the_figures_are_null_not_errors(tmp_path):
    m = SelfMonitor(str(tmp_path / "missing"), proc=str(tmp_path / "noproc"))
    s = m.snapshot()
    assert s["rss_kb"] is None and s["spool_free_mb"] is None and s["system_uptime_s"] is None
    assert s["uptime_s"] >= 0


@pytest.fixture(scope="module")
def sim():
    s = simulator.Simulator({1: simulator.EnergyMeter(seed=1), 2: simulator.Plc(seed=2)}, tcp=0)
    s.start()
    yield s
    s.stop()


CONFIG = """[agent]
id = self1
spool_dir = {spool}
health_interval = 200ms
summary_interval = 1h

[connection:sim]
type = tcp
host = 127.0.0.1
port = {port}
timeout = 300ms

[device:meter]
connection = sim
unit = 1
interval = 100ms
identify = yes

[points:meter]
voltage = input 0 float32 CDAB

[device:plc]
connection = sim
unit = 2
interval = 100ms
identify = yes

[points:plc]
counter = holding 3 uint16

[device:quiet]
connection = sim
unit = 2
interval = 100ms

[points:quiet]
level = holding 4 int16
"""


def _spooled(spool):
    out = []
    for f in sorted(Path(spool).glob("seg-*.jsonl")):
        out += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return out


def test_health_records_carry_self_monitoring_and_identity(tmp_path, sim):
    ini = tmp_path / "agent.ini"
    ini.write_text(CONFIG.format(spool=tmp_path / "spool", port=sim.tcp_port))
    loop = Loop(load_config(str(ini)))
    try:
        end = time.monotonic() + 0.8
        while time.monotonic() < end:
            loop.step()
        identify_requests = sim.stats(1)["requests"] - loop.states[0].health.polls_ok
        end = time.monotonic() + 0.4
        while time.monotonic() < end:
            loop.step()
        # asked once (basic + regular, 2 objects per answer: 6 answers), not every cycle
        assert sim.stats(1)["requests"] - loop.states[0].health.polls_ok == identify_requests == 6
        # the link goes down and comes back: identified once more (it may be another device)
        sim.set_down(0.4)
        end = time.monotonic() + 5
        while time.monotonic() < end and not (loop.states[0].health.connection_errors
                                               and loop.states[0].health.consecutive_failures == 0):
            loop.step()
        end = time.monotonic() + 0.4
        while time.monotonic() < end:
            loop.step()
        assert loop.states[0].health.connection_errors >= 1
        assert sim.stats(1)["requests"] - loop.states[0].health.polls_ok == 12
    finally:
        loop.shutdown()
    health = [r for r in _spooled(tmp_path / "spool") if r.get("kind") == "health"]
    by_device = {}
    for r in health:
        by_device.setdefault(r["device"], []).append(r["health"])
    meter = by_device["meter"][-1]
    assert meter["identity"]["objects"]["vendor_name"] == "Simulated Meters Ltd"
    assert meter["identity"]["objects"]["revision"] == "1.4.2"
    assert meter["identity"]["conformity"] == 0x82
    assert by_device["plc"][-1]["identity"]["code"] == 1          # ILLEGAL FUNCTION: not spoken
    assert "identity" not in by_device["quiet"][-1]                # identify = no (the default)
    own = meter["agent"]
    assert set(own) == {"cpu_s", "cpu_pct", "cpu_ms_per_poll", "rss_kb", "load", "spool_free_mb",
                        "uptime_s", "system_uptime_s"}
    assert own["rss_kb"] > 1000 and own["spool_free_mb"] > 0 and own["cpu_s"] > 0
    # the spool's backlog (the collector's backlog alert rule reads spool.oldest_age)
    backlog = meter["spool"]
    assert backlog["records"] >= 1 and backlog["bytes"] > 0 and backlog["oldest_age"] >= 0
    assert set(backlog["outputs"]) == {"http"} and backlog["outputs"]["http"]["records"] == backlog["records"]
    # one snapshot per round: the devices' records of one round carry the same figures
    assert by_device["plc"][-1]["agent"] == own or len(health) > 3

    # the collector shows them per agent
    app = make_app(None, db="sqlite:///%s" % (tmp_path / "c.db"))
    records = _spooled(tmp_path / "spool")
    body = json.dumps({"agent": "self1", "records": records}).encode()
    assert _call(app, "POST", "/api/v1/batches", body)[0] == 200
    status, out = _call(app, "GET", "/api/v1/agents")
    agent = json.loads(out)["agents"][0]
    assert agent["self"]["rss_kb"] > 1000 and agent["self_ts"]
    status, page = _call(app, "GET", "/")
    assert status == 200
    assert b"rss " in page and b"spool free" in page and b"cpu " in page


def _call(app, method, path, body=b""):
    env = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": "", "SCRIPT_NAME": "",
           "SERVER_NAME": "test", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
           "REMOTE_ADDR": "127.0.0.1", "wsgi.version": (1, 0), "wsgi.url_scheme": "http",
           "wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr, "wsgi.multithread": False,
           "wsgi.multiprocess": False, "wsgi.run_once": False, "CONTENT_LENGTH": str(len(body)),
           "CONTENT_TYPE": "application/json"}
    got = {}

    def start_response(status, headers, exc_info=None):
        got["status"] = int(status[:3])

    out = b"".join(app(env, start_response))
    return got["status"], out


def test_page_cell_without_figures():
    from agent.collector.page import self_cell

    assert self_cell(None) == "<small>-</small>"
    assert self_cell({"cpu_pct": "x", "load": ["<b>"]}) == "<small>-</small>"
    assert self_cell({"rss_kb": 2048, "uptime_s": 90061}) == "rss 2.0 MB, up 25h"
