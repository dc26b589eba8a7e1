"""Wrong answers, each followed by a good request on the same link.

Raw fakes answer crafted bytes keyed by the request bytes: a socket server speaking MBAP, and an
RTU server on a real pty pair (pyserial on the client side) or on a socket (RTU-over-TCP).
The register address of each FC03 request selects the fault.
"""
import struct
import time

import pytest

from agent.modbus.client import RtuClient, RtuOverTcpClient, TcpClient
from agent.modbus.errors import ConnectionLost, CRCError, DeviceError, FrameError, ModbusError, ModbusTimeout
from tests import modbus_peers as peers
from tests.modbus_peers import mbap, rtu

TIMEOUT = 0.25
GOOD = b"\x00\x01\x00\x02"        # registers [1, 2]
OTHER = b"\x12\x34\x56\x78"

# fault selectors (register address of a 2-register FC03 read)
OK, EXCEPTION, TRUNCATED, GARBAGE, WRONG_UNIT, STALE, SILENCE, RESET, BAD_CRC, NOISE, \
    WRONG_FC, BYTE_COUNT, OUT_OF_SYNC, LATE, CLOSE_AFTER, LEADING_NOISE, TRICKY_NOISE = range(17)


def read_pdu(payload):
    return b"\x03" + bytes((len(payload),)) + payload


# === Modbus TCP ===============================================================================

def tcp_handler(request):
    tid, _pid, _length, unit = struct.unpack_from(">HHHB", request)
    fc, address, count = struct.unpack_from(">BHH", request, 7)
    good = mbap(tid, unit, read_pdu(GOOD))
    if address == OK:
        return [good]
    if address == EXCEPTION:
        return [mbap(tid, unit, b"\x83\x02")]
    if address == TRUNCATED:
        return [good[:10]]
    if address == GARBAGE:
        return [good + b"\xde\xad\xbe\xef"]
    if address == WRONG_UNIT:
        return [mbap(tid, unit + 1, read_pdu(GOOD))]
    if address == STALE:
        return [mbap((tid - 1) & 0xFFFF, unit, read_pdu(OTHER)), good]
    if address == SILENCE:
        return []
    if address == RESET:
        return ["reset"]
    if address == WRONG_FC:
        return [mbap(tid, unit, b"\x04\x04" + GOOD)]
    if address == BYTE_COUNT:
        return [mbap(tid, unit, b"\x03\x02" + GOOD)]
    if address == OUT_OF_SYNC:
        return [mbap(tid, unit, read_pdu(GOOD), pid=7)]
    if address == LATE:
        return [2 * TIMEOUT, good]
    if address == CLOSE_AFTER:
        return [good, "close"]
    raise AssertionError(address)


@pytest.fixture
def tcp_fake():
    server = peers.SocketServer(tcp_handler, framing="mbap")
    client = TcpClient("127.0.0.1", server.port, timeout=TIMEOUT, backoff_min=0.01, backoff_max=0.05)
    yield server, client
    client.close()
    server.stop()


def good_read(client):
    assert client.read(1, 3, OK, 2) == GOOD


TCP_FAULTS = [
    (EXCEPTION, DeviceError, "exception code 2 ILLEGAL DATA ADDRESS"),
    (TRUNCATED, FrameError, "truncated response"),
    (WRONG_UNIT, FrameError, "wrong unit"),
    (SILENCE, ModbusTimeout, "no response"),
    (RESET, ConnectionLost, ""),
    (WRONG_FC, FrameError, "unexpected function code"),
    (BYTE_COUNT, FrameError, "byte count"),
    (OUT_OF_SYNC, FrameError, "out of sync"),
]


@pytest.mark.parametrize("address,error,text", TCP_FAULTS, ids=[str(f[0]) for f in TCP_FAULTS])
def test_tcp_fault_then_good(tcp_fake, address, error, text):
    server, client = tcp_fake
    good_read(client)
    with pytest.raises(error) as info:
        client.read(1, 3, address, 2)
    err = info.value
    assert text in str(err)
    assert (err.unit, err.function, err.address, err.count) == (1, 3, address, 2)
    assert f"unit 1 fc 03 address {address} count 2" in str(err)
    if error is ConnectionLost:
        # inside the back-off window the client fails at once, then reconnects
        with pytest.raises(ConnectionLost, match="backing off"):
            client.read(1, 3, OK, 2)
        time.sleep(0.02)
    good_read(client)
    assert client.stats["requests"] >= 3


def test_tcp_error_shows_hexdump(tcp_fake):
    _server, client = tcp_fake
    with pytest.raises(FrameError) as info:
        client.read(1, 3, WRONG_UNIT, 2)
    # expected vs got, with the bytes that arrived
    assert "expected unit 1" in str(info.value)
    assert "00 00 00 07 02 03 04 00 01 00 02" in str(info.value)
    assert info.value.as_record()["kind"] == "frame"


def test_tcp_trailing_garbage(tcp_fake):
    _server, client = tcp_fake
    assert client.read(1, 3, GARBAGE, 2) == GOOD
    good_read(client)
    good_read(client)


def test_tcp_stale_transaction_id_is_skipped(tcp_fake):
    _server, client = tcp_fake
    assert client.read(1, 3, STALE, 2) == GOOD
    assert client.stats["stale_discarded"] == 1
    good_read(client)


def test_tcp_late_answer_is_discarded_not_returned(tcp_fake):
    _server, client = tcp_fake
    with pytest.raises(ModbusTimeout):
        client.read(1, 3, LATE, 2)
    time.sleep(3 * TIMEOUT)
    # the late answer (old transaction id) is first in the stream and is read past
    good_read(client)
    assert client.stats["stale_discarded"] == 1
    assert client.stats["timeouts"] == 1


def test_tcp_out_of_sync_reconnects(tcp_fake):
    server, client = tcp_fake
    good_read(client)
    assert server.connections == 1
    with pytest.raises(FrameError):
        client.read(1, 3, OUT_OF_SYNC, 2)
    # closed and reopened, request sent once more on the fresh connection, still bad
    assert server.connections == 2
    assert client.stats["resyncs"] == 2
    good_read(client)
    assert server.connections == 3


def test_tcp_idle_close_by_peer_is_reopened_at_once(tcp_fake):
    server, client = tcp_fake
    assert client.read(1, 3, CLOSE_AFTER, 2) == GOOD  # the server then closes the connection
    good_read(client)  # no error: reopened once, request resent
    assert server.connections == 2
    assert client.stats["reconnects"] == 1
    assert client.stats["connection_errors"] == 0


def test_tcp_reconnect_backoff_no_storm(free_port):
    # nothing listens on free_port: every attempt is refused
    client = TcpClient("127.0.0.1", free_port, timeout=TIMEOUT, backoff_min=10.0, backoff_max=60.0)
    with pytest.raises(ConnectionLost, match="failed"):
        client.read(1, 3, 0, 1)
    for _ in range(100):
        with pytest.raises(ConnectionLost, match="backing off after 1 failed"):
            client.read(1, 3, 0, 1)
    assert client.stats["connection_errors"] == 101
    assert client._failures == 1  # one network attempt in all


def test_tcp_backoff_grows_and_caps():
    client = TcpClient("127.0.0.1", 1, backoff_min=0.5, backoff_max=4.0)
    delays = []
    for _ in range(6):
        client._lost()
        delays.append(round(client._down_until - time.monotonic(), 1))
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


# === RTU: pty and RTU-over-TCP ===============================================================

def rtu_handler(request, echo=False):
    unit, fc, address, count = struct.unpack_from(">BBHH", request)
    prefix = [request] if echo else []
    good = rtu(unit, read_pdu(GOOD))
    if address == OK:
        return prefix + [good]
    if address == EXCEPTION:
        return prefix + [rtu(unit, b"\x83\x02")]
    if address == BAD_CRC:
        return prefix + [good[:-1] + bytes((good[-1] ^ 0x55,))]
    if address == TRUNCATED:
        return prefix + [good[:6]]
    if address == GARBAGE:
        return prefix + [good + b"\xde\xad\xbe"]
    if address == WRONG_UNIT:
        return prefix + [rtu(unit + 1, read_pdu(GOOD))]
    if address == STALE:
        # a late answer to an earlier request (other unit, FC04), then ours
        return prefix + [rtu(unit + 5, b"\x04\x02\x00\x07"), good]
    if address == SILENCE:
        return prefix
    if address == NOISE:
        return prefix + [b"\x01\x99\x99\x99\x99\x99\x99\x99\x99"]
    if address == WRONG_FC:
        return prefix + [rtu(unit, b"\x04\x04" + GOOD)]
    if address == BYTE_COUNT:
        return prefix + [rtu(unit, b"\x03\x02" + GOOD)]
    if address == RESET:
        return ["reset"]
    if address == LATE:
        return [2 * TIMEOUT] + prefix + [rtu(unit, read_pdu(OTHER))]
    if address == CLOSE_AFTER:
        return prefix + [good, "close"]
    if address == LEADING_NOISE:
        return prefix + [b"\x00\xff" + good]
    if address == TRICKY_NOISE:
        # noise that reads like the start of a long frame (FC01, 250 data bytes)
        return prefix + [b"\x00\x01\x01\xfa" + good]
    raise AssertionError(address)


def make_rtu(kind, handler, **kwargs):
    if kind == "pty":
        server = peers.PtyServer(handler)
        client = RtuClient(server.path, baudrate=115200, timeout=TIMEOUT, backoff_min=0.01, **kwargs)
    else:
        server = peers.SocketServer(handler)
        client = RtuOverTcpClient("127.0.0.1", server.port, timeout=TIMEOUT, backoff_min=0.01)
        client.rs485_echo = kwargs.get("rs485_echo", False)
    return server, client


@pytest.fixture(params=["pty", "tcp"])
def rtu_fake(request):
    server, client = make_rtu(request.param, rtu_handler)
    yield server, client
    client.close()
    server.stop()


RTU_FAULTS = [
    (EXCEPTION, DeviceError, "exception code 2", "exceptions"),
    (BAD_CRC, CRCError, "CRC mismatch", "crc_errors"),
    (TRUNCATED, FrameError, "truncated response", "frame_errors"),
    (WRONG_UNIT, FrameError, "only a frame for another request", "frame_errors"),
    (SILENCE, ModbusTimeout, "no response", "timeouts"),
    (NOISE, FrameError, "unexpected bytes", "frame_errors"),
    (WRONG_FC, FrameError, "only a frame for another request", "frame_errors"),
    (BYTE_COUNT, FrameError, "wrong byte count", "frame_errors"),
]


@pytest.mark.parametrize("address,error,text,stat", RTU_FAULTS, ids=[str(f[0]) for f in RTU_FAULTS])
def test_rtu_fault_then_good(rtu_fake, address, error, text, stat):
    _server, client = rtu_fake
    good_read(client)
    with pytest.raises(error) as info:
        client.read(1, 3, address, 2)
    assert text in str(info.value)
    assert f"unit 1 fc 03 address {address} count 2" in str(info.value)
    assert client.stats[stat] == 1
    good_read(client)
    good_read(client)


def test_rtu_exception_costs_no_timeout(rtu_fake):
    # an FC03 x 2 answer is 9 bytes; the exception is 5. Reading the 5-byte prefix first means
    # the DeviceError comes from those 5 bytes; waiting for 9 would end in a timeout instead.
    _server, client = rtu_fake
    client.timeout = 5.0
    with pytest.raises(DeviceError) as info:
        client.read(1, 3, EXCEPTION, 2)
    assert info.value.code == 2
    assert client.stats["timeouts"] == 0


@pytest.mark.parametrize("address", [LEADING_NOISE, TRICKY_NOISE])
def test_rtu_noise_before_the_answer_is_skipped(rtu_fake, address):
    _server, client = rtu_fake
    assert client.read(1, 3, address, 2) == GOOD
    good_read(client)
    assert client.stats["frame_errors"] == client.stats["crc_errors"] == 0


def test_rtu_trailing_garbage_dropped(rtu_fake):
    _server, client = rtu_fake
    assert client.read(1, 3, GARBAGE, 2) == GOOD
    good_read(client)


def test_rtu_late_answer_discarded(rtu_fake):
    _server, client = rtu_fake
    assert client.read(1, 3, STALE, 2) == GOOD
    assert client.stats["stale_discarded"] == 1
    with pytest.raises(ModbusTimeout):
        client.read(1, 3, LATE, 2)
    # the late answer (same unit, function and size as the next one: RTU cannot tell them
    # apart by content) sits in the input when the next request goes out: it is dropped
    time.sleep(3 * TIMEOUT)
    good_read(client)


@pytest.mark.parametrize("kind", ["pty", "tcp"])
def test_rtu_rs485_echo(kind):
    server, client = make_rtu(kind, lambda r: rtu_handler(r, echo=True), rs485_echo=True)
    try:
        good_read(client)
        with pytest.raises(DeviceError):
            client.read(1, 3, EXCEPTION, 2)
        good_read(client)
    finally:
        client.close()
        server.stop()


def test_rtu_echo_missing_is_a_frame_error():
    # adapter does not echo although configured to: the answer is not our request
    server, client = make_rtu("pty", rtu_handler, rs485_echo=True)
    try:
        with pytest.raises(FrameError, match="echo"):
            client.read(1, 3, OK, 2)
        assert isinstance(client.stats, dict) and client.stats["frame_errors"] == 1
    finally:
        client.close()
        server.stop()


def test_rtu_over_tcp_reset_then_good():
    server, client = make_rtu("tcp", rtu_handler)
    try:
        good_read(client)
        with pytest.raises(ConnectionLost):
            client.read(1, 3, RESET, 2)
        time.sleep(0.03)
        good_read(client)
        assert server.connections == 2
    finally:
        client.close()
        server.stop()


def test_rtu_over_tcp_idle_close_by_peer_is_reopened_at_once():
    server, client = make_rtu("tcp", rtu_handler)
    try:
        assert client.read(1, 3, CLOSE_AFTER, 2) == GOOD  # the gateway then closes the link
        time.sleep(0.05)
        good_read(client)
        assert server.connections == 2
        assert client.stats["connection_errors"] == 0 and client.stats["reconnects"] == 1
    finally:
        client.close()
        server.stop()


def test_serial_device_gone_is_connection_lost():
    # a USB adapter unplugged mid-session: the pty's other side disappears
    server, client = make_rtu("pty", rtu_handler)
    try:
        good_read(client)
        server.stop()
        with pytest.raises(ConnectionLost):
            client.read(1, 3, OK, 2)
        assert client.stats["connection_errors"] == 1
    finally:
        client.close()


def test_serial_port_missing_is_connection_lost(tmp_path):
    client = RtuClient(str(tmp_path / "ttyUSB9"), timeout=TIMEOUT)
    with pytest.raises(ConnectionLost, match="ttyUSB9") as info:
        client.read(1, 3, 0, 1)
    assert isinstance(info.value, ModbusError)
    with pytest.raises(ConnectionLost, match="backing off"):
        client.read(1, 3, 0, 1)
