"""r4: a value JSON cannot carry must never stop the loop (procd would restart the agent into the
same reading, forever). The decoders report an overflow as None; should anything else slip
through, Loop.append spools an error record (kind "agent") instead and polling goes on.
Real peers: the simulator on 127.0.0.1, a real spool directory."""
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import load_config
from agent.loop import Loop
from agent.record import data_record

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))
import simulator  # noqa: E402


class HugeMeter(simulator.Device):
    """holding 0..3: float64 1e308 (finite; times 10 it is not)."""

    kind = "huge"

    def __init__(self, seed=0):
        super().__init__(seed)
        for i, w in enumerate(struct.unpack(">4H", struct.pack(">d", 1e308))):
            self.holding[i] = w
        self.holding[4] = 2301


@pytest.fixture
def sim():
    s = simulator.Simulator({1: HugeMeter()}, tcp=0)
    s.start()
    yield s
    s.stop()


def write_ini(tmp_path, port):
    ini = tmp_path / "agent.ini"
    ini.write_text("""[agent]
id = append-test
interval = 50ms
spool_dir = %(tmp)s/spool
status_file = %(tmp)s/status.json
health_interval = 1h
summary_interval = 1h

[connection:sim]
type = tcp
host = 127.0.0.1
port = %(port)d
timeout = 500ms

[device:meter]
connection = sim
unit = 1

[points:meter]
energy = holding 0 float64 scale=10
voltage = holding 4 uint16 scale=0.1
""" % {"tmp": tmp_path, "port": port})
    return ini


def spooled(loop):
    b = loop.spool.peek(10000, 1 << 24)
    return [json.loads(x) for x in b.lines] if b else []


def polls(loop):
    h = loop.states[0].health
    return h.polls_ok + h.polls_failed


def test_overflowing_value_is_null_and_the_loop_keeps_polling(tmp_path, sim):
    loop = Loop(load_config(str(write_ini(tmp_path, sim.tcp_port))))
    loop.states[0].device.poll = _stop_after(loop, loop.states[0].device.poll, 3)
    assert loop.run() == 0
    recs = [r for r in spooled_after(tmp_path) if r.get("device") == "meter"]
    assert len(recs) == 3
    assert all(r["values"] == {"energy": None, "voltage": 230.1} for r in recs)


def _stop_after(loop, poll, n):
    count = [0]

    def wrapped(client):
        count[0] += 1
        if count[0] >= n:
            loop.stop_requested = True
        return poll(client)
    return wrapped


def spooled_after(tmp_path):
    from agent.spool import Spool

    sp = Spool(tmp_path / "spool", "append-test")
    try:
        b = sp.peek(10000, 1 << 24)
        return [json.loads(x) for x in b.lines] if b else []
    finally:
        sp.close()


def test_unencodable_record_becomes_an_agent_error_record(tmp_path, sim):
    loop = Loop(load_config(str(write_ini(tmp_path, sim.tcp_port))))
    try:
        t = 1_795_000_000.0
        loop.append(data_record("append-test", t, "meter", 1, {"energy": float("inf"), "voltage": 230.1}))
        loop.append(data_record("append-test", t + 1, "meter", 1, {"raw": b"\x01\x02"}))
        loop.append(data_record("append-test", t + 2, "meter", 1, {"voltage": 230.2}))
        recs = spooled(loop)
    finally:
        loop.shutdown()
    assert [r["status"] for r in recs] == ["error", "error", "ok"]
    for r, ts in zip(recs, ("2026-11-18T11:06:40.000Z", "2026-11-18T11:06:41.000Z")):
        assert r["error"]["kind"] == "agent" and r["device"] == "meter" and r["unit"] == 1
        assert r["ts"] == ts                            # the reading's time, not the append's
    assert "energy=inf" in recs[0]["error"]["message"]
    assert "raw=" in recs[1]["error"]["message"]
    assert [r["seq"] for r in recs] == list(range(recs[0]["seq"], recs[0]["seq"] + 3))   # no seq lost
    assert loop.append_errors == 2


def test_run_survives_a_value_the_decoder_let_through(tmp_path, sim):
    """The reviewer's reproduction: the poll hands over an infinity; before the fix run()
    returned 1 at the first poll."""
    loop = Loop(load_config(str(write_ini(tmp_path, sim.tcp_port))))
    real = loop.states[0].device.poll

    def leaky(client):
        values = real(client)
        values["energy"] = 1e308 * 10
        return values
    loop.states[0].device.poll = _stop_after(loop, leaky, 3)
    assert loop.run() == 0
    recs = [r for r in spooled_after(tmp_path) if r.get("device") == "meter"]
    assert [r["status"] for r in recs] == ["error"] * 3
    assert all(r["error"]["kind"] == "agent" for r in recs)


def test_poll_json_prints_null_for_an_overflowing_value(tmp_path, sim):
    ini = write_ini(tmp_path, sim.tcp_port)
    r = subprocess.run([sys.executable, "-m", "agent", "poll", "--json", "-c", str(ini)], cwd=str(ROOT),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["values"] == {"energy": None, "voltage": 230.1}
