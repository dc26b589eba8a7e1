"""`modbus-agent scan` and `probe`'s identification: over a real pty with two simulated RS-485
devices at different unit ids and baud rates (RTU and ASCII), over TCP, Ctrl-C, and the pasted
sections passing `check`; FC 43 / MEI 14 in the codec against pymodbus (TCP, RTU on a pty)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import cli
from agent.config import check_config
from agent.modbus import pdu as P
from agent.modbus.client import RtuClient, TcpClient
from agent.modbus.errors import FrameError
from agent.scan import parse_units, scan_sections
from tests import modbus_peers as peers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import simulator  # noqa: E402


@pytest.fixture(scope="module")
def site():
    """A meter at unit 3 that answers only at 9600 baud and a PLC at unit 7 only at 19200, on
    one RTU pty, one ASCII pty and Modbus TCP."""
    meter, plc = simulator.EnergyMeter(seed=3), simulator.Plc(seed=7)
    meter.baud, plc.baud = 9600, 19200
    sim = simulator.Simulator({3: meter, 7: plc}, tcp=0, rtu=True, ascii=True)
    sim.start()
    yield sim
    sim.stop()


def _ini(tmp_path, sim):
    path = tmp_path / "site.ini"
    path.write_text(f"""[agent]
id = scan1
spool_dir = {tmp_path}/spool

[connection:bus]
type = rtu
port = {sim.rtu_path}
baud = 9600

[connection:old]
type = ascii
port = {sim.ascii_path}
baud = 9600
parity = N
bytesize = 8

[connection:lan]
type = tcp
host = 127.0.0.1
port = {sim.tcp_port}
""")
    return path


def _scan(capsys, ini, *args):
    rc = cli.main(["scan", "-c", str(ini)] + list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("connection", ["bus", "old"])
def test_scan_serial_finds_both_devices_at_their_baud_rates(tmp_path, site, capsys, connection):
    ini = _ini(tmp_path, site)
    rc, out, err = _scan(capsys, ini, "--connection", connection, "--units", "2-8",
                         "--bauds", "9600,19200", "--timeout", "80ms", "--pause", "5ms")
    assert rc == 0, out + err
    found = [line for line in out.splitlines() if line.startswith("  unit")]
    assert len(found) == 2, out
    assert "unit   3 at" in found[0] and " 9600 " in found[0] and "data (input 0 = 0x" in found[0]
    assert "Simulated Meters Ltd / SM-3P-CDAB / 1.4.2" in found[0]
    assert "unit   7 at" in found[1] and " 19200 " in found[1] and "data (holding 0 = 0x" in found[1]
    assert "no identification (exception 1 ILLEGAL FUNCTION)" in found[1]
    assert "scanning" in err and "unit 8 7/7" in err             # progress as it goes
    # the sections paste into the file and pass `check`
    pasted = out.split("; ready to paste into %s:\n" % ini, 1)[1]
    assert "[connection:%s_19200n]" % connection in pasted and "identify = yes" in pasted
    # (the pasted connection is the same port at another rate: point it elsewhere for check,
    # the agent would refuse to open one port twice)
    ini.write_text(ini.read_text() + "\n" + pasted.replace(
        "port = %s\nbaud = 19200" % (site.rtu_path if connection == "bus" else site.ascii_path),
        "port = /dev/ttyS7\nbaud = 19200"))
    cfg, errors, _ = check_config(str(ini))
    assert not errors, errors
    assert {d.unit for d in cfg.devices} == {3, 7}
    assert [d.identify for d in cfg.devices if d.unit == 3] == [True]


def test_scan_tcp(tmp_path, site, capsys):
    ini = _ini(tmp_path, site)
    rc, out, err = _scan(capsys, ini, "--connection", "lan", "--units", "1-8", "--timeout", "100ms",
                         "--pause", "0")
    assert rc == 0
    found = [line for line in out.splitlines() if line.startswith("  unit")]
    assert [line.split()[1] for line in found] == ["3", "7"]          # no baud rate over TCP
    assert "[device:sm_3p_cdab_3]" in out and "[device:unit7]" in out
    rc, _, err = _scan(capsys, ini, "--connection", "lan", "--bauds", "9600")
    assert rc == 2 and "only a serial port" in err


def test_scan_usage_errors(tmp_path, site, capsys):
    ini = _ini(tmp_path, site)
    assert _scan(capsys, ini, "--connection", "nope")[0] == 2
    rc, _, err = _scan(capsys, ini, "--connection", "bus", "--units", "0-3")
    assert rc == 2 and "outside 1..247" in err
    rc, _, err = _scan(capsys, ini, "--connection", "bus", "--parities", "X")
    assert rc == 2 and "--parities" in err
    with pytest.raises(ValueError, match="--units"):
        parse_units("1-x")
    assert parse_units("1,3,5-7") == [1, 3, 5, 6, 7]


def test_scan_ctrl_c_prints_what_was_found(tmp_path, site):
    ini = _ini(tmp_path, site)
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "agent", "scan", "-c", str(ini), "--connection",
                             "bus", "--units", "3-247", "--timeout", "100ms", "--pause", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        first = ""
        deadline = time.monotonic() + 15
        while "unit   3" not in first and time.monotonic() < deadline:
            first += proc.stdout.readline()
        assert "unit   3" in first
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 130
    assert "interrupted after" in out and "1 device(s) answered" in out
    assert "[device:sm_3p_cdab_3]" in out


def test_probe_shows_identification(tmp_path, site, capsys):
    ini = _ini(tmp_path, site)
    ini.write_text(ini.read_text() + "\n[device:m]\nconnection = lan\nunit = 3\n\n[points:m]\n"
                   "v = input 0 float32 CDAB\n")
    rc = cli.main(["probe", "-c", str(ini), "--device", "m", "--address", "0", "--table", "input",
                   "--expect", "200..260"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "m (unit 3) identification: Simulated Meters Ltd / SM-3P-CDAB / 1.4.2 / SM3P-100A" in out


def test_sections_name_duplicates_apart():
    from agent.config.schema import Connection
    from agent.scan import ScanHit

    hits = [ScanHit(1, None, "exception", code=2), ScanHit(1, None, "data", table="holding", data=b"\0\1")]
    text = "\n".join(scan_sections(Connection("c", "tcp", host="h"), hits))
    assert "[device:unit1]" in text and "[device:unit1_2]" in text and "exception 2" in text


# --- FC 43 / MEI 14 in the codec, against pymodbus ------------------------------------------

IDENTITY = {0: "Acme", 1: "AC-1", 2: "2.0", 4: "y" * 120, 5: "z" * 120, 0x81: "private"}


def test_identification_length_and_errors():
    answer = bytes([43, 14, 1, 0x81, 0, 0, 2, 0, 2]) + b"ab" + bytes([1, 1]) + b"c"
    for n in range(len(answer)):
        assert P.identification_length(answer[:n]) > n        # more bytes needed
    assert P.identification_length(answer) == len(answer)
    fn = P.function(43)
    ident = fn.parse(answer, 0, None, 1)
    assert ident.objects == [(0, b"ab"), (1, b"c")] and not ident.more
    with pytest.raises(FrameError, match="add up"):
        fn.parse(answer + b"x", 0, None, 1)
    with pytest.raises(FrameError, match="MEI type"):
        fn.parse(bytes([43, 13]) + answer[2:], 0, None, 1)
    with pytest.raises(FrameError, match="more follows"):
        fn.parse(answer[:4] + b"\x01" + answer[5:], 0, None, 1)
    assert fn.build(0, 1) == bytes([43, 14, 1, 0])


@pytest.mark.parametrize("kind", ["tcp", "serial"])
def test_identify_against_pymodbus(kind):
    bridge = peers.PtyBridge() if kind == "serial" else None
    server = peers.PymodbusServer(kind, serial_path=bridge and bridge.peer_path, identity=IDENTITY)
    client = (TcpClient("127.0.0.1", server.port, timeout=1.0) if kind == "tcp"
              else RtuClient(bridge.path, baudrate=38400, timeout=1.0))
    try:
        first = client.read_device_identification(1, P.READ_REGULAR)
        assert first.more           # 2 x 120 characters do not fit one answer
        ident = client.identify(1)
        assert ident["objects"]["vendor_name"] == "Acme"
        assert ident["objects"]["model_name"] == "z" * 120
        assert ident["objects"]["product_name"] == "y" * 120
        one = client.read_device_identification(1, P.READ_SPECIFIC, 0x81)
        assert one.objects == [(0x81, b"private")]
        assert client.read(1, 3, 0, 2)           # the link is still in step
    finally:
        client.close()
        server.stop()
        if bridge:
            bridge.stop()


@pytest.mark.parametrize("transport", ["rtu", "tcp"])
def test_identification_under_faults_raises_only_codec_errors(site, transport):
    """The variable-length answer's reading (RTU: by the objects' lengths) against truncated,
    corrupted and random answers: codec errors only, and the next request works."""
    from agent.modbus.errors import ModbusError

    client = (RtuClient(site.rtu_path, baudrate=9600, timeout=0.15) if transport == "rtu"
              else TcpClient("127.0.0.1", site.tcp_port, timeout=0.2))
    try:
        for kind, count in (("truncate", 1), ("crc", 1), ("garbage", 1), ("fuzz", 4)):
            site.set_fault(3, kind, count=count)
            for _ in range(count):
                try:
                    client.read_device_identification(3, P.READ_BASIC)
                except ModbusError:
                    pass
        site.clear_fault()
        assert client.identify(3)["objects"]["product_code"] == "SM-3P-CDAB"
    finally:
        site.clear_fault()
        client.close()
