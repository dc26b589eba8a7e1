"""A dead device's probe really goes out (issue 9): one back-off per device/connection pair.

The device's schedule (agent.schedule) owns the only back-off; the loop's Modbus client never
refuses a request inside its own reconnect back-off. Before, with `interval = 1s`,
`dead_after = 3` and both back-off maxima at 4 s, the client refused the schedule's probes
("backing off after 2 failed attempt(s), next try in 0.0 s") and a server that came back was
noticed after 7 s instead of 4 s + one interval.

Real peer: umodbus's Modbus TCP server on a fixed loopback port, stopped (listener and open
connections closed) and started again on the same port; the real Loop, stepped in real time.
"""
import json
import logging
import socket
import socketserver
import threading
import time

import pytest
from umodbus.server.tcp import RequestHandler, get_server

from agent.config import load_config
from agent.loop import Loop
from tests.modbus_peers import UmodbusStore

INTERVAL = 0.5
BACKOFF_MAX = 2.0


class RestartableUmodbus:
    """umodbus TCP server on `port`; stop() closes the listener and every open connection
    (a device that was switched off), start() listens again on the same port."""

    def __init__(self, port):
        self.port = port
        self.server = None

    def start(self):
        conns = []

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True

            def get_request(self):
                conn, addr = super().get_request()
                conns.append(conn)
                return conn, addr

        self.conns = conns
        self.server = get_server(Server, ("127.0.0.1", self.port), RequestHandler)
        self.store = UmodbusStore()
        self.store.install(self.server)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()

    def stop(self):
        if self.server is None:
            return
        self.server.shutdown()
        self.server.server_close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
                c.close()
            except OSError:
                pass
        self.thread.join(2)
        self.server = None


@pytest.fixture
def device(free_port):
    server = RestartableUmodbus(free_port)
    server.start()
    yield server
    server.stop()


def make_loop(tmp_path, port):
    ini = tmp_path / "agent.ini"
    ini.write_text("""[agent]
id = backoff-test
interval = %(interval)gs
spool_dir = %(tmp)s/spool
status_file = %(tmp)s/status.json
health_interval = 1h
summary_interval = 1h
dead_after = 3
dead_backoff_max = %(max)gs

[connection:link]
type = tcp
host = 127.0.0.1
port = %(port)d
timeout = 200ms
backoff_max = %(max)gs

[device:meter]
connection = link
unit = 1

[points:meter]
v = holding 0 uint16
""" % {"tmp": tmp_path, "port": port, "interval": INTERVAL, "max": BACKOFF_MAX})
    return Loop(load_config(str(ini)))


def step_until(loop, pred, limit, what):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if pred():
            return
        loop.step()
    raise AssertionError("not within %gs: %s" % (limit, what))


def test_every_probe_goes_out_and_a_device_that_comes_back_is_noticed_within_backoff_max(tmp_path, device, caplog):
    caplog.set_level(logging.DEBUG, logger="agent")
    loop = make_loop(tmp_path, device.port)
    st = loop.states[0]
    h, sched = st.health, st.schedule
    try:
        step_until(loop, lambda: h.polls_ok >= 2, 5, "two good polls")
        device.stop()
        # dead after 3 failures, then probes 0.5, 1, 2, 2 s apart: wait for a failed probe at
        # the cap, then bring the device back right after it (the worst moment)
        step_until(loop, lambda: sched.dead and sched.backoff >= BACKOFF_MAX and h.polls_failed >= 6, 15,
                   "backed off to the cap")
        device.start()
        back = time.monotonic()
        failed_before = h.polls_failed
        step_until(loop, lambda: h.polls_ok >= 3, BACKOFF_MAX + INTERVAL + 2, "the device noticed again")
        noticed = time.monotonic() - back
        batch = loop.spool.peek(10000, 1 << 24)
        recs = [json.loads(line) for line in batch.lines]
    finally:
        loop.shutdown()
    errors = [r["error"]["message"] for r in recs if r.get("status") == "error"]
    assert len(errors) == failed_before == h.polls_failed
    # every poll the schedule decided on really tried to connect: none refused by the client
    assert not [m for m in errors if "backing off" in m], errors
    assert all("connect to 127.0.0.1:%d failed" % device.port in m for m in errors), errors
    assert h.connection_errors == h.polls_failed
    # at most dead_backoff_max + one interval (+ a little for the connect and the step)
    assert noticed <= BACKOFF_MAX + INTERVAL + 0.3, "noticed %.2fs after it came back" % noticed
    warned = [r.getMessage() for r in caplog.records if "no answer" in r.getMessage()]
    assert len(warned) == 1 and "no answer 3 times in a row" in warned[0] and "up to 2s" in warned[0]
    assert not sched.dead and not h.dead


def test_the_connection_backoff_max_caps_the_probe_wait_after_a_lost_connection(tmp_path, free_port):
    """dead_backoff_max 60 s, but the connection's backoff_max is 1 s: after lost connections
    the schedule's one back-off stops at 1 s (the connection's promise), not at 60 s."""
    ini = tmp_path / "agent.ini"
    ini.write_text("""[agent]
id = backoff-test
interval = 250ms
spool_dir = %(tmp)s/spool
status_file = %(tmp)s/status.json
health_interval = 1h
summary_interval = 1h
dead_after = 2
dead_backoff_max = 60s

[connection:link]
type = tcp
host = 127.0.0.1
port = %(port)d
timeout = 200ms
backoff_max = 1s

[device:meter]
connection = link
unit = 1

[points:meter]
v = holding 0 uint16
""" % {"tmp": tmp_path, "port": free_port})
    loop = Loop(load_config(str(ini)))
    sched = loop.states[0].schedule
    try:
        step_until(loop, lambda: loop.states[0].health.polls_failed >= 7, 10, "seven failed polls")
    finally:
        loop.shutdown()
    assert sched.dead and sched.backoff == 1.0 and sched.backoff_limit == 1.0
