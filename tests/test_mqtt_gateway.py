"""[mqtt] and [gateway] in one loop: a broker that is slow or stalled must not keep the gateway's
clients waiting. The MQTT output only waits in select for the broker (a CONNACK, PUBACKs); it
hands the gap back every agent.mqtt.output.WAIT_SLICE so the loop serves its services between
slices (agent.loop.upload_until), instead of holding a SCADA request for the whole gap.

The brokers here are small hostile peers on loopback: one accepts and never answers (a connect
that waits for its CONNACK), one answers CONNECT with CONNACK and never acknowledges a publish.
"""
import socket
import struct
import threading
import time

import pytest

pytest.importorskip("paho.mqtt")

from agent.config import load_config
from agent.loop import Loop
from agent.record import data_record

INI = """[agent]
id = gw-mqtt
spool_dir = %(d)s/spool
status_file = %(d)s/st.json

[connection:c]
type = tcp
host = 127.0.0.1
port = 9

[device:d]
connection = c
unit = 4
interval = 3s

[points:d]
a = holding 0 uint16

[gateway]
listen = 127.0.0.1:0

[mqtt]
url = mqtt://127.0.0.1:%(port)d
protocol = 3.1.1
connect_timeout = 10s
keepalive = 60s
status_topic = off
"""


class Broker:
    """Accepts MQTT connections; `connack`: answer CONNECT with CONNACK (3.1.1, accepted) and
    then read everything, acknowledging nothing. Otherwise never answer at all."""

    def __init__(self, connack):
        self.connack = connack
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.published = 0
        self.done = threading.Event()
        self.conns = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.done.is_set():
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            c.settimeout(0.2)
            self.conns.append(c)
            if self.connack:
                threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        answered = False
        while not self.done.is_set():
            try:
                data = c.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if not data:
                return
            if not answered:
                c.sendall(b"\x20\x02\x00\x00")
                answered = True
            self.published += data.count(b"\x32")   # roughly: PUBLISH qos 1 headers seen

    def close(self):
        self.done.set()
        self.thread.join(5)
        for c in self.conns:
            c.close()
        self.sock.close()


def _latencies(port, n=4, pause=0.3):
    """Seconds each of `n` gateway reads waited for its answer (unit 4: 0B, nothing read yet)."""
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        for tid in range(1, n + 1):
            t0 = time.monotonic()
            s.sendall(struct.pack(">HHHBBHH", tid, 0, 6, 4, 3, 0, 1))
            ans = s.recv(100)
            out.append(time.monotonic() - t0)
            assert ans[:2] == struct.pack(">H", tid) and ans[7] == 0x83, ans.hex()
            time.sleep(pause)
    return out


@pytest.mark.parametrize("connack", [False, True], ids=["waiting-for-connack", "waiting-for-puback"])
def test_a_stalled_broker_does_not_hold_gateway_requests_for_the_gap(tmp_path, connack):
    broker = Broker(connack)
    ini = tmp_path / "agent.ini"
    ini.write_text(INI % {"d": tmp_path, "port": broker.port})
    loop = Loop(load_config(str(ini)))
    for i in range(5):       # records for the output to publish (and wait for their PUBACKs)
        loop.append(data_record("gw-mqtt", time.time(), "d", 4, {"a": i}))
    stop = threading.Event()

    def run():
        while not stop.is_set():
            loop.step()

    t = threading.Thread(target=run)
    try:
        loop.step()                        # the first poll (connection refused at once)
        t.start()
        time.sleep(0.3)                    # inside the 3 s gap: the output is waiting for the broker
        waited = _latencies(loop.services[0].address[1])
        out = loop._configured["mqtt"]
        if connack:
            assert out._st["connected"], out._st   # CONNACK in: the output waits for PUBACKs
        # before the fix: each request waited until the output gave up the gap (up to ~2.7 s)
        assert max(waited) < 0.5, waited
    finally:
        stop.set()
        loop.stop_requested = True
        socket.create_connection(("127.0.0.1", loop.services[0].address[1]), timeout=2).close()
        t.join(10)
        loop.shutdown()
        broker.close()


def test_removing_the_gateway_by_sighup_says_so_and_leaves_the_mqtt_output_alone(tmp_path):
    """Adding [gateway] logs where it listens; removing it must say the port is closed (an
    operator tailing logread sees why SCADA lost it), and the [mqtt] output is not rebuilt.
    (A reload sets the agent's logging up from the file: its log_file is read here.)"""
    broker = Broker(connack=True)
    ini = tmp_path / "agent.ini"
    logf = tmp_path / "agent.log"
    text = (INI % {"d": tmp_path, "port": broker.port}).replace(
        "status_file", "log_file = %s\nstatus_file" % logf, 1)
    ini.write_text(text)
    loop = Loop(load_config(str(ini)))
    try:
        port = loop.services[0].address[1]
        out = loop._configured["mqtt"]
        ini.write_text(text.replace("[gateway]\nlisten = 127.0.0.1:0\n", ""))
        loop.reload()
        assert loop.services == [] and loop._configured["mqtt"] is out
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        lines = logf.read_text().splitlines()
        assert any("gateway stopped" in m and "127.0.0.1:%d closed" % port in m for m in lines), lines
    finally:
        loop.shutdown()
        broker.close()
