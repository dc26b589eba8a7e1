"""The Modbus TCP gateway of cached readings, end to end: `modbus-agent run` as a subprocess polls
the simulator (tools/simulator.py, umodbus PDUs) on an RS-485 bus played by a pty and on Modbus
TCP; clients we did not write (pymodbus' ModbusTcpClient, Debian's mbpoll) read from the
agent's [gateway] listener.

Each test makes its own events (xdist may spread the module over workers, each with its agent).
"Byte for byte": the simulator runs in this process, so every answer PDU it sends is recorded;
an answer from the gateway must be one of the device's own answers (its bytes, or the slice of
them for a part of a block). One agent serves the module (module-scoped fixture).
"""
import inspect
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))
import simulator  # noqa: E402

pymodbus_client = pytest.importorskip("pymodbus.client")

MBPOLL = shutil.which("mbpoll") or "/usr/bin/mbpoll"
# the unit id keyword of pymodbus' client calls: device_id since 3.10, slave before
_UNIT_KW = ("device_id" if "device_id" in inspect.signature(pymodbus_client.ModbusTcpClient.read_coils).parameters
            else "slave")


def uid(n):
    return {_UNIT_KW: n}

MAX_CLIENTS = 24

CONFIG = """[agent]
id = gateway-test
spool_dir = %(tmp)s/spool
status_file = %(tmp)s/status.json
interval = 500ms
dead_after = 2
dead_backoff_max = 2s
summary_interval = 1h
health_interval = 1h

[gateway]
listen = 127.0.0.1:0
max_clients = %(max_clients)d
idle_timeout = 3s
max_age = 2s

[connection:bus]
type = rtu
port = %(pty)s
baud = 38400
timeout = 300ms

[connection:tcp]
type = tcp
host = 127.0.0.1
port = %(port)d
timeout = 300ms

[device:meter]
connection = bus
unit = 1

[points:meter]
voltage_l1 = input 0 float32 CDAB
current_l1 = input 6 float32 CDAB
power_total = input 18 float32 CDAB
energy_import = input 24 float32 CDAB

[device:plc]
connection = bus
unit = 2

[points:plc]
running = coil 0 bool
alarm = coil 1 bool
blinker = coil 2 bool
door = discrete 0 bool
temperature = holding 0 int16
counter = holding 3 uint16
level = holding 4 int16

[device:gen]
connection = bus
unit = 3
max_registers = 10

[points:gen]
%(gen)s

[device:meter_tcp]
connection = tcp
unit = 1
gateway_unit = 11

[points:meter_tcp]
voltage_l1 = input 0 float32 CDAB

[device:ghost]
connection = tcp
unit = 9

[points:ghost]
v = holding 0 uint16
"""


class Recorder:
    """Every answer PDU the simulated devices sent: (unit, request PDU) -> [answer PDU]."""

    def __init__(self, sim):
        self.lock = threading.Lock()
        self.answers = {}
        self._answer = sim.answer
        sim.answer = self.answer

    def answer(self, unit, pdu, baud=None):
        resp, fault = self._answer(unit, pdu, baud)
        if resp is not None:
            with self.lock:
                lst = self.answers.setdefault((unit, bytes(pdu)), [])
                lst.append(bytes(resp))
                del lst[:-200]
        return resp, fault

    def data(self, unit, fc, address, count):
        """The data bytes of every answer the device gave to this exact read."""
        with self.lock:
            return [r[2:] for r in self.answers.get((unit, struct.pack(">BHH", fc, address, count)), [])
                    if r[0] == fc]


class Agent:
    def __init__(self, tmp, sim):
        self.tmp = tmp
        # r50: the simulated device has no register 50 and refuses that block (exception 2)
        gen = "\n".join("r%d = holding %d uint16" % (a, a) for a in range(20)) + "\nr50 = holding 50 uint16"
        self.ini = tmp / "agent.ini"
        self.ini.write_text(CONFIG % {"tmp": tmp, "pty": sim.rtu_path, "port": sim.tcp_port, "gen": gen,
                                      "max_clients": MAX_CLIENTS})
        self.log = tmp / "agent.log"
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(self.ini)],
                                         cwd=str(ROOT), stdout=logf, stderr=logf, env=env)
        st = self.wait(lambda s: s.get("services", {}).get("gateway", {}).get("listening"), "the listener")
        self.port = int(st["services"]["gateway"]["listen"].rsplit(":", 1)[1])

    def status(self):
        try:
            return json.loads((self.tmp / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def wait(self, pred, what, timeout=15.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            st = self.status()
            if st and pred(st):
                return st
            assert self.proc.poll() is None, "agent exited:\n" + self.log.read_text()[-3000:]
            time.sleep(0.05)
        raise AssertionError("gave up waiting for %s\n%s" % (what, self.log.read_text()[-3000:]))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    sim = simulator.Simulator({1: simulator.EnergyMeter(seed=1), 2: simulator.Plc(seed=2),
                               3: simulator.Generic(seed=3, registers=20)}, tcp=0, rtu=True)
    sim.start()
    rec = Recorder(sim)
    agent = Agent(tmp_path_factory.mktemp("gateway"), sim)
    try:
        client = client_for(agent)
        # every device has given data once
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            oks = [not client.read_input_registers(0, count=2, **uid(u)).isError() for u in (1, 11)]
            if all(oks) and not client.read_holding_registers(0, count=10, **uid(3)).isError() \
                    and not client.read_coils(0, count=3, **uid(2)).isError():
                break
            time.sleep(0.05)
        client.close()
        yield sim, rec, agent
    finally:
        agent.stop()
        sim.stop()


_CLIENT_KW = inspect.signature(pymodbus_client.ModbusTcpClient.__init__).parameters
#: pymodbus hands a callback each packet as sent/received (3.8+)
TRACE = "trace_packet" in _CLIENT_KW


def client_for(agent, timeout=2.0, trace=None):
    kw = {"retries": 0} if "retries" in _CLIENT_KW else {}
    if trace is not None and TRACE:
        kw["trace_packet"] = trace
    c = pymodbus_client.ModbusTcpClient("127.0.0.1", port=agent.port, timeout=timeout, **kw)
    assert c.connect()
    return c


def registers(data):
    return list(struct.unpack(">%dH" % (len(data) // 2), data))


def bits(data, count):
    return [bool(data[i >> 3] >> (i & 7) & 1) for i in range(count)]


def raw_exchange(port, adu, timeout=2.0):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(adu)
        return read_adu(s)


def read_adu(s):
    buf = b""
    while len(buf) < 7 or len(buf) < 6 + struct.unpack(">H", buf[4:6])[0]:
        chunk = s.recv(300)
        if not chunk:
            raise ConnectionError("closed after %r" % buf)
        buf += chunk
    return buf


# ------------------------------------------------------------------------- reads, byte for byte

def test_pymodbus_reads_every_function_and_unit_byte_for_byte(site):
    sim, rec, agent = site
    packets = []

    def trace(sending, data):
        if not sending:
            packets.append(bytes(data))
        return data

    c = client_for(agent, trace=trace)
    try:
        # (call, unit, address, count, the planned block (fc, address, count) it lies in)
        cases = [("read_input_registers", 1, 0, 26, (4, 0, 26)),       # a whole block
                 ("read_input_registers", 1, 6, 2, (4, 0, 26)),        # part of it
                 ("read_input_registers", 11, 0, 2, (4, 0, 2)),        # the TCP meter, remapped
                 ("read_holding_registers", 2, 0, 5, (3, 0, 5)),
                 ("read_holding_registers", 2, 1, 1, (3, 0, 5)),       # a hole max_gap read through
                 ("read_holding_registers", 3, 0, 10, (3, 0, 10)),
                 ("read_holding_registers", 3, 10, 10, (3, 10, 10)),
                 ("read_coils", 2, 0, 3, (1, 0, 3)),
                 ("read_coils", 2, 1, 2, (1, 0, 3)),                   # bits moved down, repacked
                 ("read_discrete_inputs", 2, 0, 1, (2, 0, 1))]
        for call, unit, address, count, (fc, ba, bc) in cases:
            packets.clear()
            r = getattr(c, call)(address, count=count, **uid(unit))
            assert not r.isError(), (call, unit, address, count, r)
            dev_unit = 1 if unit == 11 else unit
            seen = rec.data(dev_unit, fc, ba, bc)
            assert seen, (call, unit)
            if fc >= 3:
                want = [registers(d)[address - ba:address - ba + count] for d in seen]
                assert r.registers in want, (call, unit, address, count)
                if (address, count) == (ba, bc) and TRACE:
                    # the answer on the wire carries the device's data bytes exactly
                    assert any(p.endswith(bytes((fc, len(d))) + d) for p in packets for d in seen)
            else:
                want = [bits(d, bc)[address - ba:address - ba + count] for d in seen]
                assert r.bits[:count] in want, (call, unit, address, count)
                assert not any(r.bits[count:]), "padding bits must be 0"
    finally:
        c.close()


def test_a_read_spanning_two_blocks_of_one_poll_is_assembled(site):
    sim, rec, agent = site
    c = client_for(agent)
    try:
        r = c.read_holding_registers(5, count=10, **uid(3))     # blocks 0+10 and 10+10
        assert not r.isError(), r
        first = [registers(d)[5:] for d in rec.data(3, 3, 0, 10)]
        second = [registers(d)[:5] for d in rec.data(3, 3, 10, 10)]
        assert r.registers[:5] in first and r.registers[5:] in second
    finally:
        c.close()


def mbpoll(agent, *args, values=()):
    return subprocess.run([MBPOLL, "-1", "-0", "-o", "2", "-p", str(agent.port)] + list(args) + ["127.0.0.1"]
                          + list(values), capture_output=True, text=True, timeout=20)


@pytest.mark.skipif(not os.path.exists(MBPOLL), reason="mbpoll is not installed (Debian package mbpoll)")
def test_mbpoll_reads_the_devices_own_bytes(site):
    sim, rec, agent = site
    # -v: libmodbus prints the frame it received, <00><01>...: compare it with the device's answer
    for unit, table, fc, address, count in [(1, "3", 4, 0, 26), (11, "3", 4, 0, 2), (2, "4", 3, 0, 5),
                                            (3, "4", 3, 10, 10)]:
        out = mbpoll(agent, "-v", "-a", str(unit), "-t", table, "-r", str(address), "-c", str(count))
        assert out.returncode == 0, out.stdout + out.stderr
        frames = [bytes(int(b, 16) for b in line.strip("<>").split("><"))
                  for line in out.stdout.splitlines() if line.startswith("<")]
        assert frames, out.stdout
        seen = rec.data(1 if unit == 11 else unit, fc, address, count)
        assert any(f[7:] == bytes((fc, len(d))) + d for f in frames for d in seen), (unit, frames)
    out = mbpoll(agent, "-a", "2", "-t", "0", "-r", "0", "-c", "3")
    assert out.returncode == 0 and "[0]:" in out.stdout and "[2]:" in out.stdout, out.stdout + out.stderr
    out = mbpoll(agent, "-a", "2", "-t", "1", "-r", "0", "-c", "1")
    assert out.returncode == 0 and "[0]:" in out.stdout, out.stdout + out.stderr


@pytest.mark.skipif(not os.path.exists(MBPOLL), reason="mbpoll is not installed (Debian package mbpoll)")
def test_mbpoll_gets_the_exceptions(site):
    sim, rec, agent = site
    out = mbpoll(agent, "-a", "2", "-t", "4", "-r", "0", values=["5"])  # a write
    assert out.returncode != 0 and "Illegal function" in out.stderr, out.stderr
    out = mbpoll(agent, "-a", "1", "-t", "3", "-r", "40", "-c", "2")     # no planned read there
    assert out.returncode != 0 and "Illegal data address" in out.stderr, out.stderr
    out = mbpoll(agent, "-a", "77", "-t", "3", "-r", "0")                # nobody under unit 77
    assert out.returncode != 0 and "Target device failed to respond" in out.stderr, out.stderr


# ------------------------------------------------------------------------- exceptions

def test_exceptions_for_writes_uncovered_unknown_and_dead(site):
    sim, rec, agent = site
    agent.wait(lambda s: s["devices"]["ghost"].get("dead"), "ghost to be dead")
    c = client_for(agent)
    try:
        for r in (c.write_coil(0, True, **uid(2)), c.write_register(1, 5, **uid(2)),
                  c.write_coils(0, [True, False], **uid(2)), c.write_registers(0, [1, 2], **uid(2)),
                  c.readwrite_registers(read_address=0, read_count=1, write_address=1, values=[3], **uid(2)),
                  c.mask_write_register(address=1, and_mask=0, or_mask=1, **uid(2))):
            assert r.isError() and r.exception_code == 1, r
        assert sim.devices[2].holding[1] == 220, "a write reached the device"
        r = c.read_input_registers(26, count=1, **uid(1))     # just past the meter's block
        assert r.isError() and r.exception_code == 2, r
        r = c.read_holding_registers(0, count=1, **uid(1))    # a table the meter is not read in
        assert r.isError() and r.exception_code == 2, r
        r = c.read_holding_registers(50, count=1, **uid(3))   # planned, refused by the device
        assert r.isError() and r.exception_code == 2, r
        r = c.read_holding_registers(0, count=1, **uid(42))   # no device under unit 42
        assert r.isError() and r.exception_code == 11, r
        r = c.read_holding_registers(0, count=1, **uid(9))    # configured, never answered, dead
        assert r.isError() and r.exception_code == 11, r
    finally:
        c.close()
    tid = 0x1234
    # quantity 0 and 126 registers, 2001 bits: 03; a read PDU of the wrong length: 03
    for pdu, code in ((struct.pack(">BHH", 3, 0, 0), 3), (struct.pack(">BHH", 3, 0, 126), 3),
                      (struct.pack(">BHH", 1, 0, 2001), 3), (struct.pack(">BH", 3, 0), 3),
                      (struct.pack(">BHH", 3, 65535, 2), 2), (bytes((8, 0, 0, 0x12, 0x34)), 1)):
        ans = raw_exchange(agent.port, struct.pack(">HHHB", tid, 0, len(pdu) + 1, 2) + pdu)
        assert ans == struct.pack(">HHHBBB", tid, 0, 3, 2, pdu[0] | 0x80, code), (pdu, ans)


def test_a_stale_reading_is_refused_then_served_again(site):
    sim, rec, agent = site
    c = client_for(agent)
    try:
        sim.set_fault(11 - 10, "gone", duration=3.5)     # the meter on both buses (unit 1) goes away
        deadline = time.monotonic() + 6
        r = None
        while time.monotonic() < deadline:
            r = c.read_input_registers(0, count=2, **uid(1))
            if r.isError():
                break
            time.sleep(0.05)
        assert r.isError() and r.exception_code == 11, r     # older than max_age (2 s): 0B
        # the plc on the same bus keeps being served all along
        assert not c.read_holding_registers(0, count=5, **uid(2)).isError()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            r = c.read_input_registers(0, count=2, **uid(1))
            if not r.isError():
                break
            time.sleep(0.1)
        assert not r.isError(), r
    finally:
        sim.clear_fault(1)
        c.close()


# ------------------------------------------------------------------------- many and hostile clients

def _reader(agent, n, errors, latencies):
    try:
        c = client_for(agent, timeout=3.0)
    except Exception as e:   # the thread reports, the test asserts
        errors.append("connect: %s" % e)
        return
    try:
        for i in range(n):
            t = time.monotonic()
            if i % 3 == 0:
                r = c.read_input_registers(0, count=26, **uid(1))
            elif i % 3 == 1:
                r = c.read_holding_registers(0, count=10, **uid(3))
            else:
                r = c.read_coils(0, count=3, **uid(2))
            latencies.append(time.monotonic() - t)
            if r.isError():
                errors.append(repr(r))
    except Exception as e:
        errors.append("%s: %s" % (type(e).__name__, e))
    finally:
        c.close()


def test_twenty_clients_at_once_while_the_rs485_meter_is_polled(site):
    sim, rec, agent = site
    before = agent.status()["devices"]["meter"]
    errors, latencies = [], []
    threads = [threading.Thread(target=_reader, args=(agent, 25, errors, latencies)) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:5]
    assert len(latencies) == 20 * 25
    # the meter kept being polled meanwhile, and answered
    after = agent.wait(lambda s: s["devices"]["meter"]["polls_ok"] > before["polls_ok"], "meter polls")
    assert after["devices"]["meter"]["consecutive_failures"] == 0


def test_the_sleep_wakes_for_a_request(site):
    """Between polls the loop sleeps in select() on the listener and its clients: a request is
    answered at once, not at the end of the gap (half an interval later on average)."""
    sim, rec, agent = site
    c = client_for(agent)
    try:
        lat = []
        for _ in range(30):
            t = time.monotonic()
            assert not c.read_holding_registers(0, count=5, **uid(2)).isError()
            lat.append(time.monotonic() - t)
            time.sleep(random.uniform(0, 0.05))
        assert sorted(lat)[len(lat) // 2] < 0.1, lat
    finally:
        c.close()


def test_fuzzed_bytes_never_crash_it_and_others_are_unaffected(site):
    sim, rec, agent = site
    rng = random.Random(12)
    stop = threading.Event()
    errors, latencies = [], []

    def good_client():
        while not stop.is_set():
            _reader(agent, 6, errors, latencies)

    good = threading.Thread(target=good_client)
    good.start()
    try:
        for i in range(120):
            with socket.create_connection(("127.0.0.1", agent.port), timeout=2) as s:
                if i % 2:
                    s.sendall(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 600))))
                else:   # well framed MBAP, random unit and PDU: an exception answer each
                    pdu = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 20)))
                    s.sendall(struct.pack(">HHHB", i, 0, len(pdu) + 1, rng.randrange(256)) + pdu)
                    ans = read_adu(s)
                    assert ans[:2] == struct.pack(">H", i) and len(ans) >= 9, ans
    finally:
        stop.set()
        good.join(30)
    assert not errors, errors[:5]
    assert latencies
    assert agent.proc.poll() is None


def test_a_request_dribbled_byte_by_byte_is_answered_and_others_are_not_held_up(site):
    sim, rec, agent = site
    adu = struct.pack(">HHHBBHH", 7, 0, 6, 2, 3, 0, 5)
    with socket.create_connection(("127.0.0.1", agent.port), timeout=3) as slow:
        c = client_for(agent)
        try:
            for b in adu[:-1]:
                slow.sendall(bytes((b,)))
                t = time.monotonic()
                assert not c.read_holding_registers(0, count=5, **uid(2)).isError()
                assert time.monotonic() - t < 1.0
                time.sleep(0.02)
        finally:
            c.close()
        slow.sendall(adu[-1:])
        ans = read_adu(slow)
        assert ans[:9] == struct.pack(">HHHBBB", 7, 0, 13, 2, 3, 10)


def test_a_client_that_never_reads_its_answers_is_dropped(site):
    sim, rec, agent = site
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(5)
    s.connect(("127.0.0.1", agent.port))
    req = struct.pack(">HHHBBHH", 1, 0, 6, 3, 3, 0, 10) * 400
    dropped = False
    deadline = time.monotonic() + 20
    c = client_for(agent)
    try:
        while time.monotonic() < deadline:
            try:
                s.sendall(req)
            except (BrokenPipeError, ConnectionResetError, socket.timeout):
                dropped = True
                break
            assert not c.read_coils(0, count=3, **uid(2)).isError()
    finally:
        s.close()
        c.close()
    assert dropped, "the gateway kept a client that reads nothing"


def test_more_than_max_clients_are_refused_and_idle_ones_dropped(site):
    sim, rec, agent = site
    held = []
    try:
        for i in range(MAX_CLIENTS):
            s = socket.create_connection(("127.0.0.1", agent.port), timeout=3)
            s.sendall(struct.pack(">HHHBBHH", i, 0, 6, 2, 1, 0, 3))
            assert read_adu(s)[7] == 1      # accepted and answered
            held.append(s)
        extra = socket.create_connection(("127.0.0.1", agent.port), timeout=3)
        try:
            extra.sendall(struct.pack(">HHHBBHH", 99, 0, 6, 2, 1, 0, 3))
            assert extra.recv(100) == b""   # accepted and closed at once
        except ConnectionResetError:
            pass
        finally:
            extra.close()
        # idle_timeout (3 s): the held clients are dropped, making room again
        held[0].settimeout(10)
        assert held[0].recv(100) == b""
    finally:
        for s in held:
            s.close()
    c = client_for(agent)
    assert not c.read_coils(0, count=3, **uid(2)).isError()
    c.close()


def test_answers_while_the_bus_is_saturated(site):
    """Every RTU unit answers 250 ms late: their four reads take a second per 500 ms interval,
    so the next poll is always due. The services are still served after each poll, within one
    poll (without that, a request would wait until the bus has a gap: never)."""
    sim, rec, agent = site
    c = client_for(agent, timeout=3.0)
    try:
        for unit in (1, 2, 3):
            sim.set_fault(unit, "delay", duration=4, seconds=0.25)
        time.sleep(1.0)
        worst, ok = 0.0, 0
        for _ in range(5):
            t = time.monotonic()
            r = c.read_input_registers(0, count=2, **uid(11))    # answered: data, or 0B if stale
            worst = max(worst, time.monotonic() - t)
            assert not r.isError() or r.exception_code == 11, r
            ok += not r.isError()
        assert worst < 1.5 and ok, (worst, ok)
    finally:
        for unit in (1, 2, 3):
            sim.clear_fault(unit)
        c.close()


def test_sighup_keeps_clients_and_cached_readings(site):
    sim, rec, agent = site
    c = client_for(agent)
    try:
        assert not c.read_holding_registers(0, count=5, **uid(2)).isError()
        reloads = agent.log.read_text().count("reloaded:")
        agent.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while agent.log.read_text().count("reloaded:") == reloads:
            assert time.monotonic() < deadline, "no reload"
            time.sleep(0.02)
        r = c.read_holding_registers(0, count=5, **uid(2))   # same connection, right after
        assert not r.isError(), r
    finally:
        c.close()


def _counted(gw):
    exc, dropped = gw.get("exceptions") or {}, gw.get("dropped") or {}
    return (all(exc.get(code, 0) >= 1 for code in ("01", "02", "0B"))
            and dropped.get("bad_frame", 0) >= 1 and dropped.get("idle", 0) >= 1)


def test_status_counts_clients_requests_exceptions_and_drops(site):
    """The counters as `status` shows them. Self-contained (xdist may run this module's tests in
    several workers, each with its own agent): it makes each kind of event itself."""
    sim, rec, agent = site
    c = client_for(agent)
    try:
        assert not c.read_coils(0, count=3, **uid(2)).isError()
        assert c.write_register(1, 5, **uid(2)).exception_code == 1
        assert c.read_input_registers(40, count=1, **uid(1)).exception_code == 2
        assert c.read_input_registers(0, count=1, **uid(99)).exception_code == 11
    finally:
        c.close()
    with socket.create_connection(("127.0.0.1", agent.port), timeout=3) as bad:
        bad.sendall(b"GET / HTTP/1.0\r\n\r\n")         # not Modbus TCP: dropped
        assert bad.recv(100) == b""
    idle = socket.create_connection(("127.0.0.1", agent.port), timeout=10)
    try:
        assert idle.recv(100) == b""                       # idle_timeout (3 s)
        # every counter this test moved (another test on this agent may have moved some already:
        # waiting for one of them alone can return a status file written before the others)
        st = agent.wait(lambda s: _counted(s["services"]["gateway"]), "the counters", timeout=12)
    finally:
        idle.close()
    gw = st["services"]["gateway"]
    assert gw["listening"] and gw["units"] == {"1": ["meter"], "2": ["plc"], "3": ["gen"],
                                                "9": ["ghost"], "11": ["meter_tcp"]}
    assert gw["requests"] >= 4 and gw["answered"] >= 1 and gw["clients_total"] >= 3
    assert gw["exceptions"]["01"] >= 1 and gw["exceptions"]["02"] >= 1 and gw["exceptions"]["0B"] >= 1
    assert gw["dropped"]["bad_frame"] >= 1 and gw["dropped"]["idle"] >= 1
    assert gw["clients"] == len(gw["peers"])
    from agent.status import format_status

    text = format_status(st)
    assert "gateway: listening on 127.0.0.1:%d" % agent.port in text and "exceptions 01:" in text
    assert agent.proc.poll() is None
