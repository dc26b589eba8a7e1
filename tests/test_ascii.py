"""Modbus ASCII: the framing against spec vectors and properties, our client against pymodbus'
ASCII framer (serial server on a real pty, and on TCP), pymodbus' ASCII client as the master
against our simulator, and the faults of a real line (LRC errors, truncation, noise, a gap
longer than the inter-character timeout)."""
import os
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.modbus import ascii as A
from agent.modbus import pdu as P
from agent.modbus.ascii_client import AsciiClient, AsciiOverTcpClient
from agent.modbus.errors import CRCError, DeviceError, FrameError, ModbusError, ModbusTimeout
from agent.modbus.transport import TRANSPORTS
from tests import modbus_peers as peers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import simulator as simmod

TIMEOUT = 1.0
#: a Linux pty refuses any framing but 8N1 once it has been set (EINVAL from tcsetattr), so the
#: tests on ptys use 8N1; the 7E1 default is checked in the config test
LINE = {"parity": "N", "bytesize": 8}


# --- framing: spec vectors -------------------------------------------------------------------

def test_lrc_spec_vector():
    # Modicon PI-MBUS-300 / Serial Line v1.02 example: read holding 40108.. of slave 17
    assert A.lrc(bytes.fromhex("1103006B0003")) == 0x7E
    assert A.build_adu(0x11, bytes.fromhex("03006B0003")) == b":1103006B00037E\r\n"


def test_frame_vectors():
    assert A.build_adu(1, bytes.fromhex("0300000001")) == b":010300000001FB\r\n"
    # the answer of 2 registers 0x1234 0x5678
    frame = b":01030412345678" + b"%02X" % A.lrc(bytes.fromhex("01030412345678")) + b"\r\n"
    assert A.decode_read(frame, 1, 3, 2) == bytes.fromhex("12345678")
    # lower-case hex is read too
    assert A.decode_read(frame.lower(), 1, 3, 2) == bytes.fromhex("12345678")
    # exception answer: fc | 0x80, code 2
    exc = A.build_adu(1, b"\x83\x02")
    with pytest.raises(DeviceError) as e:
        A.decode_read(exc, 1, 3, 2)
    assert e.value.code == 2


@pytest.mark.parametrize("frame, error, words", [
    (b"010300000001FB\r\n", FrameError, "start with ':'"),
    (b":010300000001FB", FrameError, "CR LF"),
    (b":010300000001F\r\n", FrameError, "hex pairs"),
    (b":01030000000GFB\r\n", FrameError, "hex pairs"),
    (b":01FE\r\n", FrameError, "too short"),
    (b":010300000001FC\r\n", CRCError, "LRC mismatch"),
])
def test_decoder_errors_name_what_and_dump(frame, error, words):
    with pytest.raises(error) as e:
        A.decode_frame(frame)
    text = str(e.value)
    assert words in text
    assert frame[:4].hex(" ") in text      # the hex dump of what arrived


def test_wrong_unit_and_byte_count():
    good = A.build_adu(2, bytes.fromhex("0302002a"))
    with pytest.raises(FrameError, match="wrong unit"):
        A.decode_read(good, 1, 3, 1)
    with pytest.raises(FrameError, match="byte count"):
        A.decode_read(good, 2, 3, 2)


@settings(max_examples=300, deadline=None)
@given(unit=st.integers(0, 255), pdu=st.binary(min_size=1, max_size=253))
def test_round_trip(unit, pdu):
    frame = A.build_adu(unit, pdu)
    assert len(frame) <= A.MAX_CHARS
    assert A.decode_frame(frame) == (unit, pdu)


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=80), fc=st.sampled_from([1, 2, 3, 4, 5, 6, 15, 16, 43]))
def test_random_bytes_raise_only_codec_errors(data, fc):
    for frame in (data, b":" + data + b"\r\n", b":" + data.hex().encode() + b"\r\n",
                  A.build_adu(1, bytes((fc,)) + data)):
        try:
            if fc in P.READ_FUNCTIONS:
                A.decode_read(frame, 1, fc, 3)
            else:
                A.decode_response(frame, 1, P.FUNCTIONS[fc], 0, 2, None)
        except ModbusError:
            pass


def test_transports_registered_with_keys():
    for name in ("ascii", "ascii-over-tcp"):
        t = TRANSPORTS[name]
        assert t.serial
        assert t.keys["char_timeout"].default == 1.0
        assert (t.keys["bytesize"].default, t.keys["parity"].default) == (7, "E")


# --- against pymodbus' ASCII framer ------------------------------------------------------------

LONG = "x" * 70    # four of these do not fit one answer: pymodbus sets "more follows"
IDENTITY = {0: "pymodbus vendor", 1: "PM-1", 2: "3.16", 3: LONG, 4: LONG + "4", 5: LONG + "5",
            6: LONG + "6"}


@pytest.fixture(scope="module")
def pymodbus_ascii_serial():
    bridge = peers.PtyBridge()
    server = peers.PymodbusServer("serial", serial_path=bridge.peer_path, framer="ascii",
                                  identity=IDENTITY)
    yield server, bridge.path
    server.stop()
    bridge.stop()


@pytest.fixture(scope="module")
def pymodbus_ascii_tcp():
    server = peers.PymodbusServer("tcp", framer="ascii", identity=IDENTITY)
    yield server
    server.stop()


def _exercise(client, server):
    coils, discrete, holding, inputs = peers.initial_data()
    assert P.unpack_bits(client.read(1, 1, 3, 10), 10) == coils[3:13]
    assert P.unpack_bits(client.read(1, 2, 0, 7), 7) == discrete[0:7]
    data = client.read(1, 3, 10, 125)
    assert [int.from_bytes(data[i:i + 2], "big") for i in range(0, 250, 2)] == holding[10:135]
    data = client.read(1, 4, 0, 3)
    assert [int.from_bytes(data[i:i + 2], "big") for i in range(0, 6, 2)] == inputs[0:3]
    client.write_register(1, 150, 0xBEEF)
    client.write_registers(1, 151, [1, 2, 3])
    assert server.get(3, 150, 4) == [0xBEEF, 1, 2, 3]
    client.write_coil(1, 100, True)
    client.write_coils(1, 101, [True, False, True])
    assert [bool(v) for v in server.get(1, 100, 4)] == [True, True, False, True]
    with pytest.raises(DeviceError) as e:
        client.read(1, 3, 500, 2)      # outside what the server holds
    assert e.value.code == 2


def test_client_against_pymodbus_ascii_serial(pymodbus_ascii_serial):
    server, path = pymodbus_ascii_serial
    client = AsciiClient(path, baudrate=38400, timeout=TIMEOUT, **LINE)
    try:
        _exercise(client, server)
        ident = client.identify(1)
    finally:
        client.close()
    # basic and regular, the long regular objects over more than one answer ("more follows")
    assert ident["objects"]["vendor_name"] == "pymodbus vendor"
    assert ident["objects"]["product_code"] == "PM-1"
    assert ident["objects"]["revision"] == "3.16"
    assert ident["objects"]["user_application_name"] == LONG + "6"
    assert len(ident["objects"]) == 7


def test_client_against_pymodbus_ascii_tcp(pymodbus_ascii_tcp):
    client = AsciiOverTcpClient("127.0.0.1", pymodbus_ascii_tcp.port, timeout=TIMEOUT)
    try:
        _exercise(client, pymodbus_ascii_tcp)
        more = client.read_device_identification(1, P.READ_REGULAR)
        assert more.more and more.next_id > 0    # pymodbus split the stream
        assert client.identify(1)["objects"]["model_name"] == LONG + "5"
    finally:
        client.close()


# --- pymodbus' ASCII client as the master, our simulator as the slave -------------------------

@pytest.fixture(scope="module")
def sim():
    s = simmod.Simulator({1: simmod.EnergyMeter(seed=1), 2: simmod.Plc(seed=2)}, tcp=None,
                         ascii=True, ascii_tcp=0).start()
    yield s
    s.stop()


def test_pymodbus_master_against_simulator(sim):
    from pymodbus import FramerType
    from pymodbus.client import ModbusSerialClient

    c = ModbusSerialClient(sim.ascii_path, framer=FramerType.ASCII, baudrate=9600, timeout=1,
                           retries=0)
    assert c.connect()
    try:
        r = c.read_input_registers(0, count=4, device_id=1)
        assert not r.isError()
        volts = c.convert_from_registers(list(reversed(r.registers[0:2])), c.DATATYPE.FLOAT32)
        assert 220 < volts < 240
        assert not c.write_register(7, 4321, device_id=2).isError()
        assert c.read_holding_registers(7, count=1, device_id=2).registers == [4321]
        bad = c.read_holding_registers(900, count=1, device_id=2)
        assert bad.isError() and bad.exception_code == 2
        ident = c.read_device_information(read_code=1, object_id=0, device_id=1)
        assert ident.information[0] == b"Simulated Meters Ltd"
    finally:
        c.close()


@pytest.fixture
def ascii_client(sim):
    c = AsciiClient(sim.ascii_path, timeout=0.3, **LINE)
    yield c
    c.close()


def test_faults_lrc_truncation_noise(sim, ascii_client):
    c = ascii_client
    assert len(c.read(1, 4, 0, 2)) == 4
    sim.set_fault(1, "crc", count=1)
    with pytest.raises(CRCError, match="LRC mismatch") as e:
        c.read(1, 4, 0, 2)
    assert "unit 1 fc 04 address 0 count 2" in str(e.value) and "3a 30 31" in str(e.value)
    sim.set_fault(1, "truncate", count=1)
    with pytest.raises(FrameError, match="truncated"):
        c.read(1, 4, 0, 2)
    sim.set_fault(1, "garbage", count=1)       # noise before and after the frame
    assert len(c.read(1, 4, 0, 2)) == 4
    sim.set_fault(1, "silence", count=1)
    with pytest.raises(ModbusTimeout):
        c.read(1, 4, 0, 2)
    assert len(c.read(1, 4, 0, 2)) == 4         # and back to normal
    assert c.stats["crc_errors"] == 1 and c.stats["frame_errors"] == 1
    assert c.stats["timeouts"] == 1
    sim.set_fault(1, "fuzz", count=6)
    for _ in range(6):
        try:
            c.read(1, 4, 0, 2)
        except ModbusError:
            pass
    sim.clear_fault()
    assert len(c.read(1, 4, 0, 2)) == 4


def test_simulator_ascii_over_tcp(sim):
    c = AsciiOverTcpClient("127.0.0.1", sim.ascii_tcp_port, timeout=TIMEOUT)
    try:
        assert len(c.read(2, 1, 0, 16)) == 2
        assert c.identify(1)["objects"]["model_name"] == "SM3P-100A"
        with pytest.raises(DeviceError) as e:
            c.identify(2)
        assert e.value.code == 1
    finally:
        c.close()


# --- crafted answers on a raw pty: stale frames, a ':' that restarts, the inter-char timeout ---

class RawAscii:
    """Answers each request frame with what `handler(frame)` returns: a list of bytes (written)
    and floats (pauses), on the master side of a pty."""

    def __init__(self, pty, handler):
        self.master, self.path = pty
        self.handler = handler
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        import select
        buf = b""
        while not self.stop_event.is_set():
            if not select.select([self.master], [], [], 0.02)[0]:
                continue
            try:
                buf += os.read(self.master, 512)
            except OSError:
                continue
            while b"\n" in buf:
                frame, buf = buf.split(b"\n", 1)
                for action in self.handler(frame + b"\n"):
                    if isinstance(action, float):
                        time.sleep(action)
                    else:
                        os.write(self.master, action)

    def stop(self):
        self.stop_event.set()
        self.thread.join(2)


def test_stale_frame_and_restart_and_char_timeout(pty_pair):
    answer = A.build_adu(1, bytes.fromhex("0302002a"))
    plan = []

    def handler(frame):
        return plan.pop(0) if plan else []

    server = RawAscii(pty_pair, handler)
    c = AsciiClient(pty_pair[1], timeout=0.5, char_timeout=0.15, **LINE)
    try:
        # a late answer of another unit first, then a ':' that restarts a broken frame, then ours
        plan.append([A.build_adu(9, bytes.fromhex("0302ffff")), b":0103", answer])
        assert c.read(1, 3, 0, 1) == b"\x00\x2a"
        assert c.stats["stale_discarded"] == 1
        # half a frame, then a gap longer than char_timeout, then the rest: the frame is broken
        plan.append([answer[:7], 0.3, answer[7:]])
        # (the whole answer is there 0.3 s in, well within the 0.5 s timeout: only the
        # inter-character rule refuses it)
        with pytest.raises(FrameError, match="inter-character timeout") as e:
            c.read(1, 3, 0, 1)
        assert "3a 30 31" in str(e.value)
        time.sleep(0.2)
        plan.append([answer])
        assert c.read(1, 3, 0, 1) == b"\x00\x2a"
    finally:
        c.close()
        server.stop()


def test_config_check(tmp_path):
    from agent.config import check_config

    ini = tmp_path / "a.ini"
    ini.write_text("[agent]\nid = a1\nspool_dir = %s\n\n[connection:bus]\ntype = ascii\n"
                   "port = /dev/ttyS9\nchar_timeout = 0\n\n[device:m]\nconnection = bus\n"
                   "unit = 1\n\n[points:m]\nv = holding 0 uint16\n" % (tmp_path / "spool"))
    cfg, errors, _ = check_config(str(ini))
    assert any("[connection:bus] char_timeout" in e and ":8:" in e for e in errors), errors
    ini.write_text(ini.read_text().replace("char_timeout = 0", "char_timeout = 300ms"))
    cfg, errors, _ = check_config(str(ini))
    assert not errors
    conn = cfg.connections["bus"]
    assert conn.describe() == "ascii /dev/ttyS9 9600 7E1"
    client = conn.open()
    assert isinstance(client, AsciiClient) and client.char_timeout == 0.3
