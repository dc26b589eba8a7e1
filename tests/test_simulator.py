"""The device simulator (tools/simulator.py): values, transports and every fault kind, checked
with umodbus's client functions and raw bytes (never the agent's codec: the simulator is the
agent's independent peer, so it is checked against a third party)."""
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest
import serial
from umodbus.client import tcp as utcp
from umodbus.client.serial import rtu as urtu
from umodbus.client.serial.redundancy_check import CRCError, get_crc
from umodbus.exceptions import IllegalDataAddressError, ServerDeviceBusyError

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import simulator as S


def cdab(lo, hi):
    return struct.unpack(">f", struct.pack(">HH", hi, lo))[0]


@pytest.fixture
def sim():
    s = S.Simulator({1: S.EnergyMeter(seed=1), 2: S.Plc(seed=2)}, tcp=0, rtu=True, rtu_tcp=0, control=0)
    s.start()
    yield s
    s.stop()


def connect(port, timeout=2.0):
    c = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    c.settimeout(timeout)
    return c


def recv_some(sock, timeout):
    """Everything that arrives within `timeout` (b'' on silence or EOF)."""
    sock.settimeout(timeout)
    out = b""
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return out
            out += chunk
    except socket.timeout:
        return out


def meter_values(regs):
    return dict(zip(S.EnergyMeter.NAMES, (cdab(regs[i], regs[i + 1]) for i in range(0, 26, 2))))


def test_meter_values_are_realistic_and_energy_only_increases(sim):
    with connect(sim.tcp_port) as c:
        energies = []
        for _ in range(5):
            v = meter_values(utcp.send_message(utcp.read_input_registers(1, 0, 26), c))
            for k in (1, 2, 3):
                assert 220 < v["voltage_l%d" % k] < 240
                assert v["current_l%d" % k] >= 0
                p = v["voltage_l%d" % k] * v["current_l%d" % k] * v["power_factor"]
                assert v["power_l%d" % k] == pytest.approx(p, rel=1e-4)
            assert v["power_total"] == pytest.approx(v["power_l1"] + v["power_l2"] + v["power_l3"], rel=1e-4)
            assert 49.9 < v["frequency"] < 50.1
            energies.append(v["energy_import"])
            time.sleep(0.02)
    assert energies == sorted(energies)
    assert sim.devices[1].energy > 12345.6


def test_plc_reads_and_writes_every_function_code(sim):
    with connect(sim.tcp_port) as c:
        assert utcp.send_message(utcp.read_coils(2, 0, 1), c) == [1]
        utcp.send_message(utcp.write_single_coil(2, 5, 1), c)
        utcp.send_message(utcp.write_multiple_coils(2, 8, [1, 0, 1]), c)
        assert utcp.send_message(utcp.read_coils(2, 5, 6), c) == [1, 0, 0, 1, 0, 1]
        utcp.send_message(utcp.write_single_register(2, 1, 250), c)
        utcp.send_message(utcp.write_multiple_registers(2, 10, [1, 2, 0xFFFE]), c)
        regs = utcp.send_message(utcp.read_holding_registers(2, 0, 13), c)
        assert regs[1] == 250 and regs[10:13] == [1, 2, 0xFFFE]
        assert 0 <= regs[4] <= 50 or 0xFFFF - 50 <= regs[4] <= 0xFFFF  # int16 level, two's complement
        assert len(utcp.send_message(utcp.read_discrete_inputs(2, 0, 8), c)) == 8
        with pytest.raises(IllegalDataAddressError):
            utcp.send_message(utcp.read_holding_registers(2, 15, 10), c)


def test_rtu_on_pty_and_rtu_over_tcp(sim):
    assert sim.rtu_path.startswith("/dev/")
    with serial.Serial(sim.rtu_path, timeout=1) as port:
        regs = urtu.send_message(urtu.read_input_registers(1, 0, 2), port)
        assert 220 < cdab(*regs) < 240
        assert urtu.send_message(urtu.read_coils(2, 0, 1), port) == [1]
    with connect(sim.rtu_tcp_port) as c:
        req = urtu.read_holding_registers(2, 1, 1)
        c.sendall(req)
        resp = recv_some(c, 0.3)
        assert resp[:3] == b"\x02\x03\x02" and get_crc(resp[:-2]) == resp[-2:]


def test_unknown_unit_is_silent_on_rtu(sim):
    with serial.Serial(sim.rtu_path, timeout=0.3) as port:
        port.write(urtu.read_holding_registers(9, 0, 1))
        assert port.read(5) == b""
        # a frame with a bad CRC is ignored too, and the next good one is answered
        port.write(b"\x02\x03\x00\x00\x00\x01\x00\x00")
        assert port.read(5) == b""
        assert urtu.send_message(urtu.read_holding_registers(2, 1, 1), port) == [220]


def test_silence_delay_and_count(sim):
    with connect(sim.tcp_port) as c:
        sim.set_fault(2, "silence", count=1)
        c.sendall(utcp.read_holding_registers(2, 1, 1))
        assert recv_some(c, 0.3) == b""
        sim.set_fault(2, "delay", seconds=0.4, count=1)
        c.sendall(utcp.read_holding_registers(2, 1, 1))
        assert recv_some(c, 0.1) == b""        # not yet ...
        late = recv_some(c, 1.0)               # ... but it does come, late
        assert late[7:] == b"\x03\x02\x00\xdc"
        assert utcp.send_message(utcp.read_holding_registers(2, 1, 1), c) == [220]
    st = sim.stats(2)
    assert st["silence"] == 1 and st["delay"] == 1


def test_exception_crc_truncate_garbage_on_rtu(sim):
    with serial.Serial(sim.rtu_path, timeout=0.3) as port:
        sim.set_fault(2, "exception", code=6, count=1)
        with pytest.raises(ServerDeviceBusyError):
            urtu.send_message(urtu.read_holding_registers(2, 1, 1), port)
        sim.set_fault(2, "crc", count=1)
        with pytest.raises(CRCError):
            urtu.send_message(urtu.read_holding_registers(2, 1, 1), port)
        sim.set_fault(2, "truncate", count=1)
        port.write(urtu.read_holding_registers(2, 1, 1))
        assert len(port.read(7)) == 3          # half of the 7-byte answer, then nothing
        sim.set_fault(2, "garbage", count=1)
        port.write(urtu.read_holding_registers(2, 1, 1))
        assert port.read(11)[7:] == b"\xde\xad\xbe\xef"
        assert urtu.send_message(urtu.read_holding_registers(2, 1, 1), port) == [220]


def test_crc_fault_on_tcp_breaks_the_protocol_id(sim):
    with connect(sim.tcp_port) as c:
        sim.set_fault(1, "crc", count=1)
        c.sendall(utcp.read_input_registers(1, 0, 2))
        resp = recv_some(c, 0.3)
        assert resp[2:4] != b"\x00\x00"


def test_drop_and_reset_close_the_connection(sim):
    with connect(sim.tcp_port) as c:
        sim.set_fault(2, "drop", count=1)
        c.sendall(utcp.read_holding_registers(2, 1, 1))
        assert recv_some(c, 1.0) == b""        # EOF
    with connect(sim.tcp_port) as c:
        sim.set_fault(2, "reset", count=1)
        c.sendall(utcp.read_holding_registers(2, 1, 1))
        with pytest.raises(ConnectionResetError):
            c.settimeout(1.0)
            c.recv(100)
            c.recv(100)
    with connect(sim.tcp_port) as c:
        assert utcp.send_message(utcp.read_holding_registers(2, 1, 1), c) == [220]


def test_gone_unit_comes_back_and_others_are_unaffected(sim):
    sim.set_fault(1, "gone", duration=0.5)
    with serial.Serial(sim.rtu_path, timeout=0.2) as port:
        port.write(urtu.read_input_registers(1, 0, 2))
        assert port.read(9) == b""
        assert urtu.send_message(urtu.read_holding_registers(2, 1, 1), port) == [220]
        time.sleep(0.5)
        assert len(urtu.send_message(urtu.read_input_registers(1, 0, 2), port)) == 2


def test_fault_on_every_unit_and_clear(sim):
    sim.set_fault(None, "exception", code=2)
    with connect(sim.tcp_port) as c:
        for unit in (1, 2):
            with pytest.raises(IllegalDataAddressError):
                utcp.send_message(utcp.read_holding_registers(unit, 1, 1), c)
        sim.clear_fault()
        assert utcp.send_message(utcp.read_holding_registers(2, 1, 1), c) == [220]
    with pytest.raises(ValueError, match="unknown fault kind"):
        sim.set_fault(1, "meltdown")


def test_down_refuses_connections_then_comes_back(sim):
    c = connect(sim.tcp_port)
    sim.set_down(0.5)
    try:
        # the open connection is closed (FIN; or RST when it was still in the listen backlog)
        assert recv_some(c, 1.0) == b""
    except ConnectionResetError:
        pass
    c.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", sim.tcp_port), timeout=1).close()
    time.sleep(0.8)
    with connect(sim.tcp_port) as c:
        assert utcp.send_message(utcp.read_holding_registers(2, 1, 1), c) == [220]


def test_control_port(sim):
    addr = "127.0.0.1:%d" % sim.control_port
    assert S.ctl(addr, {"cmd": "fault", "unit": 2, "kind": "exception", "code": 6, "count": 1}) == {"ok": True}
    with connect(sim.tcp_port) as c, pytest.raises(ServerDeviceBusyError):
        utcp.send_message(utcp.read_holding_registers(2, 1, 1), c)
    assert S.ctl(addr, {"cmd": "stats"})["stats"]["2"]["exception"] == 1
    bad = S.ctl(addr, {"cmd": "fault", "unit": 2, "kind": "nope"})
    assert bad["ok"] is False and "unknown fault kind" in bad["error"]


def test_command_line_serve_and_ctl(tmp_path):
    ready = tmp_path / "ready.json"
    script = str(ROOT / "tools" / "simulator.py")
    p = subprocess.Popen([sys.executable, script, "--tcp", "0", "--rtu", "--control", "0",
                          "--device", "meter:1", "--device", "generic:10-12:20", "--ready-file", str(ready)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(100):
            if ready.exists():
                break
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        assert info["units"] == {"1": "meter", "10": "generic", "11": "generic", "12": "generic"}
        assert os.path.exists(info["rtu_path"])
        out = subprocess.run([sys.executable, script, "ctl", "127.0.0.1:%d" % info["control_port"],
                              "fault", "11", "silence", "--count", "1"], capture_output=True, text=True)
        assert out.returncode == 0 and json.loads(out.stdout) == {"ok": True}
        with connect(info["tcp_port"]) as c:
            c.sendall(utcp.read_holding_registers(11, 0, 20))
            assert recv_some(c, 0.3) == b""
            regs = utcp.send_message(utcp.read_holding_registers(12, 0, 20), c)
            assert all((regs[i + 1] - regs[i]) % 65536 == 1 for i in range(19))
    finally:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=10)
    assert p.returncode == 0
    assert "Modbus RTU on /dev/" in out and "Modbus TCP on 127.0.0.1:" in out


def test_bad_device_spec_exits_2():
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "simulator.py"), "--device", "toaster:1"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "toaster:1" in r.stderr


def test_fuzz_fault_sends_random_frames(sim):
    sim.set_fault(2, "fuzz", count=20)
    answers = []
    with connect(sim.tcp_port) as c:
        for _ in range(20):
            c.sendall(utcp.read_holding_registers(2, 1, 1))
            answers.append(recv_some(c, 0.05))
    framed = [a for a in answers if len(a) >= 8 and a[2:4] == b"\x00\x00" and struct.unpack(">H", a[4:6])[0] == len(a) - 6]
    assert len(set(answers)) > 10 and framed  # varied, and some of them well framed
