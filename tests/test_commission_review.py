"""Review of issue 15 (commissioning) from the installer's side: defects found by trying
`write`, `check` and `scan` as a site would, each pinned here against real peers (the
simulator's PLC over a real pty, RTU and ASCII)."""
import io
import struct
import sys

import pytest
from pymodbus.framer import FramerAscii
from umodbus.client.serial.redundancy_check import add_crc

from agent import cli
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import simulator as S


@pytest.fixture(scope="module")
def sim():
    s = S.Simulator({2: S.Plc(seed=2)}, tcp=None, rtu=True, ascii=True)
    s.start()
    yield s
    s.stop()


def write_ini(tmp_path, conn, points, extra=""):
    ini = tmp_path / "agent.ini"
    ini.write_text("""[agent]
id = rev15
spool_dir = %s/spool

%s

[device:plc]
connection = link
unit = 2
writable = yes

[points:plc]
%s
%s""" % (tmp_path, conn, points, extra))
    return str(ini)


def run(monkeypatch, capsys, argv, answer="y\n"):
    monkeypatch.setattr(sys, "stdin", io.StringIO(answer))
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def rtu_conn(sim):
    return "[connection:link]\ntype = rtu\nport = %s\ntimeout = 500ms" % sim.rtu_path


# --- write: more values than one request carries -------------------------------------------

def test_raw_write_of_more_registers_than_fc16_carries_is_refused_before_anything_is_shown(
        tmp_path, sim, monkeypatch, capsys):
    """Was a traceback (InvalidRequest from the codec) after the plan line was printed."""
    ini = write_ini(tmp_path, rtu_conn(sim), "sp = holding 1 int16")
    before = sim.devices[2].holding[5]
    rc, out, err = run(monkeypatch, capsys, ["write", "-c", ini, "plc", "--raw", "holding", "5"]
                       + [str(v) for v in range(1, 125)] + ["--yes"])
    assert rc == 2
    assert out == ""
    assert "at most 123" in err and "not 124" in err and "fc 16" in err
    assert sim.devices[2].holding[5] == before      # nothing sent


def test_raw_write_of_more_coils_than_fc15_carries_is_refused(tmp_path, sim, monkeypatch, capsys):
    ini = write_ini(tmp_path, rtu_conn(sim), "sp = holding 1 int16")
    rc, out, err = run(monkeypatch, capsys, ["write", "-c", ini, "plc", "--raw", "coil", "0"]
                       + ["1"] * 1969 + ["--yes"])
    assert rc == 2 and out == ""
    assert "at most 1968" in err and "not 1969" in err


def test_a_string_point_longer_than_one_fc16_write_is_refused_not_a_traceback(
        tmp_path, sim, monkeypatch, capsys):
    ini = write_ini(tmp_path, rtu_conn(sim), "label = holding 0 string 124")
    rc, out, err = run(monkeypatch, capsys, ["write", "-c", ini, "plc", "label", "abc", "--yes"])
    assert rc == 2 and out == ""
    assert "label is 124 registers" in err and "at most 123" in err


def test_raw_write_of_123_registers_still_goes_out_as_one_fc16(tmp_path, sim, monkeypatch, capsys):
    ini = write_ini(tmp_path, "[connection:link]\ntype = rtu\nport = %s\ntimeout = 1s" % sim.rtu_path,
                    "sp = holding 1 int16")
    rc, out, err = run(monkeypatch, capsys, ["write", "-c", ini, "plc", "--raw", "holding", "0"]
                       + ["7"] * 123 + ["--yes"])
    # the simulated PLC holds 20 registers: it refuses with exception 2, after the frame went out
    assert "fc 16 holding 0" in out and "RTU frame 02 10 00 00 00 7b f6" in out
    assert rc == 1 and "exception code 2" in err


# --- write over ASCII shows the ASCII frame -------------------------------------------------

def test_write_over_ascii_shows_the_ascii_frame_with_its_lrc(tmp_path, sim, monkeypatch, capsys):
    """Was only the PDU ("framed by the ascii transport"): the issue asks for the frame."""
    conn = ("[connection:link]\ntype = ascii\nport = %s\nbaud = 9600\nparity = N\nbytesize = 8\n"
            "timeout = 500ms" % sim.ascii_path)
    ini = write_ini(tmp_path, conn, "setpoint = holding 1 int16 scale=0.1")
    rc, out, err = run(monkeypatch, capsys, ["write", "-c", ini, "plc", "setpoint", "23.5", "--yes"])
    assert rc == 0, err
    body = bytes.fromhex("02 06 00 01 00 eb")
    expected = ":%s%02X" % (body.hex().upper(), FramerAscii.compute_LRC(body))   # pymodbus' LRC
    assert "ASCII frame %s CR LF" % expected in out
    assert "read back: setpoint = 23.5" in out
    assert sim.devices[2].holding[1] == 235
    # RTU framing unchanged (the CRC by umodbus)
    ini = write_ini(tmp_path, rtu_conn(sim), "setpoint = holding 1 int16 scale=0.1")
    rc, out, err = run(monkeypatch, capsys, ["write", "-c", ini, "plc", "setpoint", "22.0", "--yes"])
    assert rc == 0, err
    assert "RTU frame %s" % add_crc(bytes.fromhex("02 06 00 01 00 dc")).hex(" ") in out
    assert struct.pack(">h", sim.devices[2].holding[1]) == b"\x00\xdc"


# --- check: two connections on one serial port ----------------------------------------------

def _two_port_ini(tmp_path, port_a, port_b, second_used=True):
    ini = tmp_path / "ports.ini"
    ini.write_text("""[agent]
id = rev15
spool_dir = %s/spool

[connection:bus]
type = rtu
port = %s
baud = 9600

[connection:bus_19200n]
type = rtu
port = %s
baud = 19200

[device:meter]
connection = bus
unit = 3

[points:meter]
reg0 = input 0 uint16

[device:plc]
connection = %s
unit = 7

[points:plc]
reg0 = holding 0 uint16
""" % (tmp_path, port_a, port_b, "bus_19200n" if second_used else "bus"))
    return ini


def test_check_refuses_two_used_connections_on_one_serial_port(tmp_path, sim, capsys):
    """What `scan` pastes for a device found at another rate: check said OK, then every poll of
    the second connection failed ("Could not exclusively lock port")."""
    from agent.config import check_config

    link = tmp_path / "ttyUSB0"
    link.symlink_to(sim.rtu_path)           # /dev/serial/by-id/... names the same port
    ini = _two_port_ini(tmp_path, sim.rtu_path, link)
    _cfg, errors, _ = check_config(str(ini))
    assert [str(e) for e in errors] == [
        "%s:12: [connection:bus_19200n] port: %s is also the port of [connection:bus] (line 7): "
        "one serial port is one bus, opened once, so one of them could never be polled; put the "
        "devices of that port in one connection, at one line setting" % (ini, link)]
    # the same through the command line
    rc = cli.main(["check", "-c", str(ini)])
    assert rc == 2 and "[connection:bus_19200n] port:" in capsys.readouterr().err


def test_check_accepts_one_port_per_connection_and_an_unused_duplicate(tmp_path, sim):
    from agent.config import check_config

    _cfg, errors, _ = check_config(str(_two_port_ini(tmp_path, sim.rtu_path, sim.ascii_path)))
    assert not errors, errors
    # the pasted connection kept but unused (devices moved to one rate): a warning only
    _cfg, errors, warnings = check_config(str(_two_port_ini(tmp_path, sim.rtu_path, sim.rtu_path,
                                                            second_used=False)))
    assert not errors, errors
    assert any("no device uses this connection" in str(w) for w in warnings)


# --- write: numbers no register holds --------------------------------------------------------

HUGE_POINTS = """setpoint = holding 1 int16 scale=0.1
counter = holding 3 uint16
f32 = holding 11 float32
"""


@pytest.mark.timeout(20)
@pytest.mark.parametrize("point, text, says", [
    # was minutes of CPU (Fraction(Decimal("1e999999999")) is a billion-digit integer)
    ("setpoint", "1e999999999", "'1e999999999' is not a number a register can hold"),
    ("setpoint", "1e-999999999", "is not a number a register can hold"),
    # were tracebacks: OverflowError from float() of the exact value, for the message
    ("setpoint", "1" * 60 + ".5", "1.11111e+60 in the register's units: scale=0.1) does not fit"),
    ("counter", "1" * 60 + ".5", "1.11111e+59 is not a whole number"),
    ("f32", "1" * 60 + ".5", "1.11111e+59"),
    # was a 301-digit number in the message
    ("f32", "1e300", "1e+300 does not fit a float32"),
    ("counter", "1.5e40", "1.5e+40 does not fit: a uint16 holds 0..65535"),
    ("counter", "9" * 101, "(101 characters)"),
])
def test_write_refuses_numbers_beyond_any_register_quickly_and_says_so(
        tmp_path, sim, monkeypatch, capsys, point, text, says):
    ini = write_ini(tmp_path, rtu_conn(sim), HUGE_POINTS)
    rc, out, err = run(monkeypatch, capsys, ["write", "-c", ini, "plc", point, text, "--yes"])
    assert rc == 2 and out == ""
    assert err.startswith("plc.%s: refused: " % point) and says in err, err
    assert len(err) < 300, err
    assert "Traceback" not in err


# --- check: one reason per problem -----------------------------------------------------------

def test_append_with_decimals_out_of_range_is_one_error_not_also_missing(tmp_path):
    from agent.config import check_config

    ini = write_ini(tmp_path, "[connection:link]\ntype = tcp\nhost = 127.0.0.1",
                    "a = holding 3 append decimals=6\nb = holding 5 append")
    _cfg, errors, _ = check_config(ini)
    msgs = [str(e) for e in errors]
    assert msgs == [
        "%s:15: [points:plc] a: decimals: must be 1..5 for append (the fraction register holds "
        "0..65535)" % ini,
        "%s:16: [points:plc] b: append needs decimals=N (the digits of the fraction register, 1..5)"
        % ini], msgs
