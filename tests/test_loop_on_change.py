"""`mode = on_change`: the heartbeat comes every `heartbeat`, the first one included (issue 9:
the first came one interval late, gaps 6.0, 5.0, 5.0 s for heartbeat 5 s at interval 1 s).

Real peer: umodbus's Modbus TCP server with values that never change; the real Loop.
"""
import json
import time
from datetime import datetime

import pytest

from agent.config import load_config
from agent.loop import Loop
from tests import modbus_peers as peers


@pytest.fixture
def umodbus():
    server = peers.UmodbusTcp()
    yield server
    server.stop()


def ts(rec):
    return datetime.strptime(rec["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()


def test_heartbeats_of_an_unchanging_device_are_one_heartbeat_apart_from_the_first(tmp_path, umodbus):
    ini = tmp_path / "agent.ini"
    ini.write_text("""[agent]
id = hb-test
interval = 100ms
spool_dir = %(tmp)s/spool
status_file = %(tmp)s/status.json
health_interval = 1h
summary_interval = 1h

[connection:link]
type = tcp
host = 127.0.0.1
port = %(port)d
timeout = 300ms

[device:meter]
connection = link
unit = 1
mode = on_change
heartbeat = 500ms

[points:meter]
v = holding 3 uint16
""" % {"tmp": tmp_path, "port": umodbus.port})
    loop = Loop(load_config(str(ini)))
    h = loop.states[0].health
    try:
        end = time.monotonic() + 10
        while h.polls_ok < 21 and time.monotonic() < end:
            loop.step()
        batch = loop.spool.peek(10000, 1 << 24)
        recs = [json.loads(line) for line in batch.lines if b'"device":"meter"' in line]
    finally:
        loop.shutdown()
    assert h.polls_ok == 21 and h.missed_cycles == 0
    # slots 0, 5, 10, 15, 20: the first reading, then one heartbeat every 5 slots
    assert len(recs) == 5, [r["ts"] for r in recs]
    gaps = [round(ts(b) - ts(a), 3) for a, b in zip(recs, recs[1:])]
    assert all(abs(g - 0.5) < 0.08 for g in gaps), gaps     # one interval late was 0.6
    assert all(r["values"] == {"v": umodbus.store.holding[3]} for r in recs)
