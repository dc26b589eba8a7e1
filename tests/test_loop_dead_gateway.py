"""Units behind one dead gateway share the news (review of issue 9's one-back-off fix).

A gateway that is off drops SYNs: every connect waits its whole `connect_timeout`. When the loop's
clients stopped refusing requests inside their reconnect back-off (so a dead device's probes
really go out), each of ten units on that gateway waited out its own connect in the same sweep:
10 x 1 s froze the loop, and a healthy device on another connection lost 9 of 20 readings. Now
a failed connect holds the link down for the rest of the sweep (half the shortest interval there),
so one sweep costs one connect timeout.

Real peers: a loopback listener whose accept queue is full (connects hang, as to a switched-off
gateway) and umodbus's TCP server for the healthy device; the real Loop, stepped in real time.
"""
import socket
import time

import pytest

from agent.config import load_config
from agent.loop import Loop
from tests.test_loop_backoff import RestartableUmodbus, step_until

UNITS = 10
CONNECT_TIMEOUT = 0.5


@pytest.fixture
def black_hole(free_port):
    """A port whose connects hang: listen(0) and an accept queue filled by connects never accepted."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", free_port))
    srv.listen(0)
    fill = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        try:
            c.connect(("127.0.0.1", free_port))
        except BlockingIOError:
            pass
        fill.append(c)
    probe = socket.socket()
    probe.settimeout(0.3)
    try:
        probe.connect(("127.0.0.1", free_port))
        hangs = False
    except (socket.timeout, OSError):
        hangs = True
    finally:
        probe.close()
    if not hangs:
        pytest.skip("this kernel accepts connects beyond a full accept queue: cannot emulate a dead gateway")
    yield free_port
    for c in fill:
        c.close()
    srv.close()


@pytest.fixture
def healthy():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = RestartableUmodbus(port)
    server.start()
    yield server
    server.stop()


def test_one_sweep_behind_a_dead_gateway_costs_one_connect_timeout(tmp_path, black_hole, healthy):
    units = "".join("""
[device:m%d]
connection = gw
unit = %d

[points:m%d]
v = holding 0 uint16
""" % (i, i, i) for i in range(1, UNITS + 1))
    ini = tmp_path / "agent.ini"
    ini.write_text("""[agent]
id = gateway-test
interval = 1s
spool_dir = %(tmp)s/spool
status_file = %(tmp)s/status.json
health_interval = 1h
summary_interval = 1h
dead_after = 3
dead_backoff_max = 8s

[connection:gw]
type = tcp
host = 127.0.0.1
port = %(gw)d
timeout = 200ms
connect_timeout = %(ct)gs

[connection:plc]
type = tcp
host = 127.0.0.1
port = %(plc)d
timeout = 200ms

[device:healthy]
connection = plc
unit = 1

[points:healthy]
v = holding 0 uint16
%(units)s""" % {"tmp": tmp_path, "gw": black_hole, "plc": healthy.port, "ct": CONNECT_TIMEOUT, "units": units})
    loop = Loop(load_config(str(ini)))
    ok = loop.states[0].health
    gw = loop.states[1:]
    try:
        step_until(loop, lambda: ok.polls_ok >= 1, 3, "the healthy device's first poll")
        t0 = time.monotonic()
        step_until(loop, lambda: all(st.health.polls_failed >= 1 for st in gw), 3 * CONNECT_TIMEOUT + 1,
                   "one failed poll of every unit behind the gateway")
        first_sweep = time.monotonic() - t0
        start_ok = ok.polls_ok
        t1 = time.monotonic()
        end = t1 + 6
        while time.monotonic() < end:
            loop.step()
        polled = ok.polls_ok - start_ok
        slots = int(time.monotonic() - t1)
    finally:
        loop.shutdown()
    # before: 10 units x 0.5 s of connect in the one sweep (5 s); now one connect timeout
    assert first_sweep < 2.5 * CONNECT_TIMEOUT, "the sweep took %.2fs" % first_sweep
    timeouts = sum(st.health.connection_errors for st in gw)
    assert timeouts >= UNITS
    # the healthy device keeps its cadence (a slot may be late by one connect timeout at most)
    assert polled >= slots - 1, "healthy polled %d times in %d slots" % (polled, slots)
