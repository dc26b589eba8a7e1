"""A slow bad device cannot take the healthy ones' cadence (issue 10).

The hostile device sends one byte just before its connection's timeout, then a bad header just
before the next one. Before: 1.8 s per poll on a 0.5 s timeout (two timeouts, a reconnect and a
resend), and a healthy device on another connection missed cycles. Now a request has one
deadline, so a poll of it costs about its timeout, and the dead-device budget
(Loop.probe_in_the_way) counts what its polls really took.

Real peers on 127.0.0.1: umodbus's Modbus TCP server (healthy), a raw socket server (hostile);
the real Loop stepped in real time for 8 s. The bound on the cost is a generous functional one.
"""
import time

import pytest

from agent.config import load_config
from agent.loop import Loop
from tests import modbus_peers as peers

TIMEOUT = 0.5


def dribbler(request):
    return [0.9 * TIMEOUT, request[:1], 0.9 * TIMEOUT, b"\xff\xff\xff\xff\xff\xff\xff"]


@pytest.fixture
def peers_pair():
    healthy = peers.UmodbusTcp()
    hostile = peers.SocketServer(dribbler, framing="mbap")
    yield healthy, hostile
    hostile.stop()
    healthy.stop()


def test_a_dribbling_device_costs_its_timeout_and_the_healthy_one_misses_no_cycle(tmp_path, peers_pair):
    healthy, hostile = peers_pair
    ini = tmp_path / "agent.ini"
    # the hostile device comes first in the config: on the first slot it is polled first
    ini.write_text("""[agent]
id = hostile-test
interval = 1s
spool_dir = %(tmp)s/spool
status_file = %(tmp)s/status.json
health_interval = 1h
summary_interval = 1h
dead_after = 3
dead_backoff_max = 2s

[connection:bad]
type = tcp
host = 127.0.0.1
port = %(bad)d
timeout = %(timeout)gs

[connection:good]
type = tcp
host = 127.0.0.1
port = %(good)d
timeout = %(timeout)gs

[device:slow]
connection = bad
unit = 1

[points:slow]
x = holding 0 uint16

[device:meter]
connection = good
unit = 1

[points:meter]
v = holding 0 uint16
""" % {"tmp": tmp_path, "bad": hostile.port, "good": healthy.port, "timeout": TIMEOUT})
    loop = Loop(load_config(str(ini)))
    slow, meter = loop.states
    costs = []
    try:
        end = time.monotonic() + 8.0
        seen = 0
        while time.monotonic() < end:
            loop.step()
            if slow.health.polls_failed != seen:
                seen = slow.health.polls_failed
                costs.append(slow.health.last_duration)
    finally:
        loop.shutdown()
    assert len(costs) >= 4 and slow.schedule.dead                   # polled, failed, probed
    assert slow.health.polls_ok == 0 and slow.health.frame_errors + slow.health.timeouts == len(costs)
    assert max(costs) < TIMEOUT + 0.3, "a poll of the hostile device cost %s" % costs
    assert meter.health.missed_cycles == 0 and meter.health.polls_failed == 0
    assert meter.health.polls_ok >= 7


def test_the_probe_budget_counts_what_the_dead_device_s_polls_really_took(tmp_path):
    """A probe waits for a later slot when it would make a live device late: its cost is the
    connection's timeout, or what the device's failed polls really took when that was more
    (a resend, a busy retry, several requests before the silent one)."""
    ini = tmp_path / "agent.ini"
    ini.write_text("""[agent]
id = budget-test
interval = 1s
spool_dir = %(tmp)s/spool
status_file = %(tmp)s/status.json
dead_after = 1

[connection:link]
type = tcp
host = 127.0.0.1
port = 1
timeout = 500ms

[device:slow]
connection = link
unit = 1

[points:slow]
x = holding 0 uint16

[device:meter]
connection = link
unit = 2

[points:meter]
v = holding 0 uint16
""" % {"tmp": tmp_path})
    loop = Loop(load_config(str(ini)))
    try:
        slow, meter = loop.states
        now = loop.mono()
        slow.schedule.done(now, False)                  # dead after one failure
        assert slow.schedule.dead
        meter.schedule.start = now + 0.7                # the live device is due in 0.7 s
        meter.schedule.k = 0
        slow.schedule.start = now - slow.schedule.k * slow.schedule.interval   # the probe is due now
        slow.schedule.k = slow.schedule.k
        probe_at = now
        assert slow.schedule.due == pytest.approx(now) and meter.schedule.due == pytest.approx(now + 0.7)
        assert not loop.probe_in_the_way(slow, probe_at)               # 0.5 s timeout fits in 0.7 s
        slow.health.last_duration = 0.9                               # but its polls took 0.9 s
        assert loop.probe_in_the_way(slow, probe_at)
    finally:
        loop.shutdown()
