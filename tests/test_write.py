"""`modbus-agent write` (agent/write.py cmd_write, the inverse transform agent/types.encode):
over a real pty against the simulator's RTU device (tools/simulator.py) and over TCP against a
pymodbus server; what the registers hold afterwards is read from the server's own store, and
the frame shown is checked against a CRC computed by umodbus (not the agent's codec).
"""
import io
import struct
import sys

import pytest
from umodbus.client.serial.redundancy_check import add_crc

from agent import cli
from tests import modbus_peers as peers
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import simulator as S

PLC_POINTS = """
setpoint  = holding 1 int16 scale=0.1 unit=degC
sp_float  = holding 5 float32 CDAB
counter32 = holding 7 uint32
mode      = holding 9 bits 4-7 enum=0:off,1:"on hold",2:run
flag      = holding 9 bit 0 invert=yes
level     = holding 10 append decimals=2 signed=yes
name      = holding 12 string 3
pump      = coil 5 bool
temp_in   = input 2 uint16
"""


def config(tmp_path, conn, points=PLC_POINTS, writable="yes", unit=2):
    ini = tmp_path / "agent.ini"
    ini.write_text("""[agent]
id = w1
spool_dir = %(tmp)s/spool

%(conn)s

[device:plc]
connection = link
unit = %(unit)d
writable = %(writable)s

[points:plc]
%(points)s
""" % {"tmp": tmp_path, "conn": conn, "points": points, "writable": writable, "unit": unit})
    return str(ini)


@pytest.fixture(scope="module")
def sim():
    s = S.Simulator({2: S.Plc(seed=2)}, tcp=None, rtu=True)
    s.start()
    yield s
    s.stop()


@pytest.fixture
def rtu_ini(tmp_path, sim):
    return config(tmp_path, "[connection:link]\ntype = rtu\nport = %s\nbaud = 19200\ntimeout = 500ms"
                  % sim.rtu_path)


def run(monkeypatch, capsys, argv, answer="y\n"):
    monkeypatch.setattr(sys, "stdin", io.StringIO(answer))
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_write_a_scaled_point_over_rtu_shows_the_frame_asks_and_reads_back(rtu_ini, sim, monkeypatch, capsys):
    rc, out, err = run(monkeypatch, capsys, ["write", "-c", rtu_ini, "plc", "setpoint", "22.5"])
    assert rc == 0, err
    # 22.5 / 0.1 = 225 = 0x00e1, FC 06 to holding 1 of unit 2; CRC by umodbus
    frame = add_crc(bytes.fromhex("02 06 00 01 00 e1"))
    assert "RTU frame %s" % frame.hex(" ") in out
    assert "send it? [y/N]" in out
    assert "read back: setpoint = 22.5 degC" in out
    assert sim.devices[2].holding[1] == 225


def test_the_answer_no_sends_nothing(rtu_ini, sim, monkeypatch, capsys):
    sim.devices[2].holding[7] = 0
    rc, out, _ = run(monkeypatch, capsys, ["write", "-c", rtu_ini, "plc", "counter32", "70000"], answer="n\n")
    assert rc == 1 and "not sent" in out
    assert sim.devices[2].holding[7] == 0 and sim.devices[2].holding[8] == 0


def test_multi_register_bit_field_and_coil_writes_over_rtu(rtu_ini, sim, monkeypatch, capsys):
    dev = sim.devices[2]
    dev.holding[9] = 0xA00F      # other bits of the register must survive a bits/bit write
    for argv, check in (
            (["plc", "counter32", "70000"], lambda: (dev.holding[7], dev.holding[8]) == (1, 4464)),
            (["plc", "sp_float", "21.5"], lambda: struct.pack(">HH", dev.holding[6], dev.holding[5])
             == struct.pack(">f", 21.5)),
            (["plc", "mode", "on hold"], lambda: dev.holding[9] == 0xA01F),
            (["plc", "flag", "true"], lambda: dev.holding[9] == 0xA01E),     # invert: true is bit 0 = 0
            (["plc", "level", "-12.34"], lambda: (dev.holding[10], dev.holding[11]) == (0xFFF4, 34)),
            (["plc", "name", "AB"], lambda: (dev.holding[12], dev.holding[13]) == (0x4142, 0)),
            (["plc", "pump", "on"], lambda: dev.coils[5] == 1)):
        rc, out, err = run(monkeypatch, capsys, ["write", "-c", rtu_ini, "--yes"] + argv)
        assert rc == 0, (argv, out, err)
        assert check(), (argv, out)
        assert "read back: %s = " % argv[1] in out
    assert "fc 16 holding 7: 0x0001 0x1170" in run(monkeypatch, capsys, ["write", "-c", rtu_ini, "--yes", "plc",
                                                                        "counter32", "70000"])[1]


@pytest.mark.parametrize("point, value, why", [
    ("setpoint", "22.55", "225.5 in the register's units: scale=0.1) is not a whole number"),
    ("setpoint", "4000", "does not fit: a int16 holds -32768..32767"),
    ("sp_float", "0.1000000001", "would read back as 0.1: a float32 cannot hold it exactly"),
    ("sp_float", "1e39", "does not fit a float32"),
    ("counter32", "-1", "does not fit: a uint32 holds 0..4294967295"),
    ("mode", "later", "is not a number nor one of the labels"),
    ("mode", "16", "does not fit: a 4-bit field holds 0..15"),
    ("level", "1.234", "more than 2 decimal(s)"),
    ("level", "-0.5", "-0 is 0"),
    ("name", "ABCDEFG", "7 characters do not fit: string 3 holds at most 6"),
    ("pump", "maybe", "is not a boolean"),
    ("temp_in", "5", "read-only"),
    ("nosuch", "5", "has no point 'nosuch'"),
])
def test_values_that_do_not_fit_are_refused_saying_why(rtu_ini, sim, monkeypatch, capsys, point, value, why):
    before = dict(sim.devices[2].holding)
    rc, out, err = run(monkeypatch, capsys, ["write", "-c", rtu_ini, "--yes", "plc", point, value])
    assert rc == 2
    assert why in err, err
    assert sim.devices[2].holding == before


def test_a_device_without_writable_yes_is_refused_naming_the_key(tmp_path, sim, monkeypatch, capsys):
    ini = config(tmp_path, "[connection:link]\ntype = rtu\nport = %s" % sim.rtu_path, writable="no")
    rc, _, err = run(monkeypatch, capsys, ["write", "-c", ini, "--yes", "plc", "setpoint", "20"])
    assert rc == 2
    assert "agent.ini:12: [device:plc] writable" in err and "writable = yes" in err


@pytest.fixture(scope="module")
def pymodbus_tcp():
    server = peers.PymodbusServer("tcp")
    yield server
    server.stop()


def test_raw_and_typed_writes_over_tcp_against_pymodbus(tmp_path, pymodbus_tcp, monkeypatch, capsys):
    ini = config(tmp_path, "[connection:link]\ntype = tcp\nhost = 127.0.0.1\nport = %d\ntimeout = 1s"
                 % pymodbus_tcp.port, unit=1, points="""
big  = holding 20 int64 HGFEDCBA
f64  = holding 24 float64 GHEFCDAB
word = holding 30 uint16 BA
""")
    rc, out, err = run(monkeypatch, capsys, ["write", "-c", ini, "--yes", "plc", "--raw", "holding", "40",
                                             "1", "0x2345", "-1"])
    assert rc == 0, err
    assert "TCP frame 00 00 00 00 00 0d 01 10 00 28 00 03 06 00 01 23 45 ff ff" in out
    assert pymodbus_tcp.get(3, 40, 3) == [1, 0x2345, 0xFFFF]
    rc, out, err = run(monkeypatch, capsys, ["write", "-c", ini, "--yes", "plc", "--raw", "coil", "7", "1", "0", "1"])
    assert rc == 0, err
    assert pymodbus_tcp.get(1, 7, 3) == [True, False, True]
    for point, value, regs in (
            ("big", "-2", struct.unpack(">4H", struct.pack("<q", -2))),
            ("f64", "230.125", struct.unpack(">4H", bytes(struct.pack(">d", 230.125)[i] for i in (6, 7, 4, 5, 2, 3, 0, 1)))),
            ("word", "258", (0x0201,))):
        rc, out, err = run(monkeypatch, capsys, ["write", "-c", ini, "--yes", "plc", point, value])
        assert rc == 0, (point, err)
        addr = {"big": 20, "f64": 24, "word": 30}[point]
        assert tuple(pymodbus_tcp.get(3, addr, len(regs))) == tuple(regs), point
        assert "read back: %s = %s" % (point, value) in out
    rc, _, err = run(monkeypatch, capsys, ["write", "-c", ini, "--yes", "plc", "--raw", "input", "1", "5"])
    assert rc == 2 and "read-only" in err

