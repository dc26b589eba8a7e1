"""Client behaviour beyond single exchanges: pause, RTU silence and broadcast, argument checks,
half-open TCP links, stats."""
import struct
import time

import pytest

from agent.modbus.client import STAT_KEYS, RtuClient, RtuOverTcpClient, TcpClient
from agent.modbus.errors import InvalidRequest, ModbusError, ModbusTimeout
from agent.modbus.rtu import silent_interval
from tests import modbus_peers as peers
from tests.modbus_peers import mbap, rtu

TIMEOUT = 0.25
GOOD = b"\x00\x01\x00\x02"


class Recorder:
    """Answers FC03 x 2 with GOOD (address 6: silence) and records when each request arrived."""

    def __init__(self, framing):
        self.framing = framing
        self.arrivals = []
        self.requests = []

    def __call__(self, request):
        self.arrivals.append(time.monotonic())
        self.requests.append(request)
        if self.framing == "mbap":
            tid, _pid, _len, unit = struct.unpack_from(">HHHB", request)
            fc, address = struct.unpack_from(">BH", request, 7)
            return [] if address == 6 else [mbap(tid, unit, b"\x03\x04" + GOOD)]
        unit, fc, address = struct.unpack_from(">BBH", request)
        if unit == 0 or address == 6:
            return []
        if fc == 6:
            return [request]
        return [rtu(unit, b"\x03\x04" + GOOD)]


@pytest.fixture
def tcp_recorder():
    rec = Recorder("mbap")
    server = peers.SocketServer(rec, framing="mbap")
    yield rec, server
    server.stop()


@pytest.fixture
def pty_recorder():
    rec = Recorder("rtu")
    server = peers.PtyServer(rec)
    yield rec, server
    server.stop()


def test_pause_between_exchanges_tcp(tcp_recorder):
    rec, server = tcp_recorder
    client = TcpClient("127.0.0.1", server.port, timeout=TIMEOUT, pause=0.1)
    for _ in range(3):
        assert client.read(1, 3, 0, 2) == GOOD
    client.close()
    gaps = [b - a for a, b in zip(rec.arrivals, rec.arrivals[1:])]
    assert len(gaps) == 2 and min(gaps) >= 0.1  # a lower bound: sleeps never end early


def test_pause_between_exchanges_rtu(pty_recorder):
    rec, server = pty_recorder
    client = RtuClient(server.path, baudrate=115200, timeout=TIMEOUT, pause=0.1)
    for _ in range(3):
        assert client.read(1, 3, 0, 2) == GOOD
    client.close()
    gaps = [b - a for a, b in zip(rec.arrivals, rec.arrivals[1:])]
    assert len(gaps) == 2 and min(gaps) >= 0.1


def test_silent_interval():
    # 3.5 characters; fixed 1.75 ms above 19200 baud (Serial Line v1.02, 2.5.1.1)
    assert silent_interval(9600) == pytest.approx(3.5 * 11 / 9600)
    assert silent_interval(19200) == pytest.approx(3.5 * 11 / 19200)
    assert silent_interval(19201) == silent_interval(115200) == 0.00175
    assert RtuClient("/dev/null", baudrate=9600)._silence == pytest.approx(3.5 * 10 / 9600)   # 8N1
    assert RtuClient("/dev/null", baudrate=9600, parity="E")._silence == pytest.approx(3.5 * 11 / 9600)
    assert RtuClient("/dev/null", baudrate=38400)._silence == 0.00175
    assert RtuOverTcpClient("gw")._silence == 0.0  # the gateway keeps the serial timing


def test_rtu_broadcast_write(pty_recorder):
    rec, server = pty_recorder
    client = RtuClient(server.path, baudrate=115200, timeout=TIMEOUT)
    sent = time.monotonic()
    assert client.write_register(0, 5, 7) is None  # nobody answers a broadcast: no timeout
    assert client.read(1, 3, 0, 2) == GOOD
    assert rec.requests[0] == rtu(0, bytes.fromhex("06 00 05 00 07"))
    # the turnaround delay before the next request: measured from before the broadcast was sent
    # (the recorder thread may note the broadcast's arrival late under load, never the next one early)
    assert rec.arrivals[1] - sent >= 0.1
    with pytest.raises(InvalidRequest, match="broadcast"):
        client.read(0, 3, 0, 2)
    assert client.stats["timeouts"] == 0
    client.close()


@pytest.mark.parametrize("call,text", [
    (lambda c: c.read(1, 3, 0, 0), "count"),
    (lambda c: c.read(1, 3, 0, 126), "count"),
    (lambda c: c.read(1, 1, 0, 2001), "count"),
    (lambda c: c.read(1, 3, 65535, 2), "past"),
    (lambda c: c.read(1, 5, 0, 1), "not a read"),
    (lambda c: c.read(256, 3, 0, 1), "unit"),
    (lambda c: c.read(1, 3, "0", 1), "address"),
    (lambda c: c.write_register(1, 0, 70000), "register value"),
    (lambda c: c.write_registers(1, 0, []), "count"),
    (lambda c: c.write_coil(1, 0, 5), "coil value"),
    (lambda c: c.write_coils(1, 0, [True] * 1969), "count"),
])
def test_invalid_requests_send_nothing(tcp_recorder, call, text):
    rec, server = tcp_recorder
    client = TcpClient("127.0.0.1", server.port, timeout=TIMEOUT)
    with pytest.raises(InvalidRequest, match=text) as info:
        call(client)
    assert isinstance(info.value, ModbusError) and isinstance(info.value, ValueError)
    assert info.value.unit is not None and info.value.function is not None
    assert server.connections == 0 and rec.requests == []
    client.close()


def test_two_timeouts_in_a_row_reopen_the_connection(tcp_recorder):
    # a half-open link (peer gone without a FIN) only shows as silence: start afresh
    rec, server = tcp_recorder
    client = TcpClient("127.0.0.1", server.port, timeout=TIMEOUT)
    assert client.read(1, 3, 0, 2) == GOOD
    with pytest.raises(ModbusTimeout):
        client.read(1, 3, 6, 2)
    assert client.read(1, 3, 0, 2) == GOOD      # one timeout: same connection
    assert server.connections == 1
    for _ in range(2):
        with pytest.raises(ModbusTimeout):
            client.read(1, 3, 6, 2)
    assert client.read(1, 3, 0, 2) == GOOD
    assert server.connections == 2
    assert client.stats["timeouts"] == 3 and client.stats["reconnects"] == 1
    client.close()


def test_stats_keys_and_context_manager(tcp_recorder):
    _rec, server = tcp_recorder
    with TcpClient("127.0.0.1", server.port, timeout=TIMEOUT) as client:
        assert set(client.stats) == set(STAT_KEYS)
        assert {"requests", "timeouts", "crc_errors", "frame_errors", "exceptions", "reconnects",
                "stale_discarded"} <= set(client.stats)
        client.read(1, 3, 0, 2)
        assert client.stats["requests"] == 1
    assert client._sock is None
