"""Every function code, read and written, against two independent servers (umodbus, pymodbus)
on every transport: Modbus TCP, RTU on a real pty pair opened with pyserial, RTU-over-TCP.
Values are compared with what the server holds."""
import struct

import pytest

from agent.modbus.client import RtuClient, RtuOverTcpClient, TcpClient
from agent.modbus.errors import DeviceError
from agent.modbus.pdu import unpack_bits
from tests import modbus_peers as peers

TIMEOUT = 1.0  # generous: servers share 2 busy cores under xdist; only failures wait this long


class Peer:
    """A running server + a client facing it + a view of what the server holds."""

    def __init__(self, client, holds, stop):
        self.client = client
        self.holds = holds
        self._stop = stop

    def close(self):
        self.client.close()
        self._stop()


def _umodbus_holds(store):
    def holds(function, address, count):
        table = {1: store.coils, 2: store.discrete, 3: store.holding, 4: store.inputs}[function]
        return [int(v) for v in table[address:address + count]]
    return holds


def _pymodbus_holds(server):
    return lambda function, address, count: [int(v) for v in server.get(function, address, count)]


def make_peer(name):
    if name == "umodbus-tcp":
        s = peers.UmodbusTcp()
        return Peer(TcpClient("127.0.0.1", s.port, timeout=TIMEOUT), _umodbus_holds(s.store), s.stop)
    if name == "pymodbus-tcp":
        s = peers.PymodbusServer("tcp")
        return Peer(TcpClient("127.0.0.1", s.port, timeout=TIMEOUT), _pymodbus_holds(s), s.stop)
    if name == "umodbus-rtu-pty":
        app = peers.UmodbusRtuApp()
        s = peers.PtyServer(peers.umodbus_rtu_handler(app))
        return Peer(RtuClient(s.path, baudrate=38400, timeout=TIMEOUT), _umodbus_holds(app.store), s.stop)
    if name == "pymodbus-rtu-pty":
        bridge = peers.PtyBridge()
        s = peers.PymodbusServer("serial", serial_path=bridge.peer_path)

        def stop():
            s.stop()
            bridge.stop()
        return Peer(RtuClient(bridge.path, baudrate=38400, timeout=TIMEOUT), _pymodbus_holds(s), stop)
    if name == "umodbus-rtu-over-tcp":
        app = peers.UmodbusRtuApp()
        s = peers.SocketServer(peers.umodbus_rtu_handler(app))
        return Peer(RtuOverTcpClient("127.0.0.1", s.port, timeout=TIMEOUT), _umodbus_holds(app.store), s.stop)
    if name == "pymodbus-rtu-over-tcp":
        s = peers.PymodbusServer("rtu-over-tcp")
        return Peer(RtuOverTcpClient("127.0.0.1", s.port, timeout=TIMEOUT), _pymodbus_holds(s), s.stop)
    raise ValueError(name)


PEERS = ["umodbus-tcp", "pymodbus-tcp", "umodbus-rtu-pty", "pymodbus-rtu-pty",
         "umodbus-rtu-over-tcp", "pymodbus-rtu-over-tcp"]


@pytest.fixture(params=PEERS)
def peer(request):
    p = make_peer(request.param)
    yield p
    p.close()


def registers(data):
    return list(struct.unpack(">%dH" % (len(data) // 2), data))


def bits(data, count):
    return [int(b) for b in unpack_bits(data, count)]


READS = [(0, 1), (7, 13), (0, 125), (60, 77), (199, 1)]
BIT_READS = [(0, 1), (3, 8), (5, 9), (0, 200), (17, 123)]


def test_read_registers(peer):
    initial = peers.initial_data()
    for function in (3, 4):
        for address, count in READS:
            data = peer.client.read(1, function, address, count)
            assert isinstance(data, bytes) and len(data) == 2 * count
            assert registers(data) == peer.holds(function, address, count)
            assert registers(data) == initial[function - 1][address:address + count]


def test_read_bits(peer):
    initial = peers.initial_data()
    for function in (1, 2):
        for address, count in BIT_READS:
            data = peer.client.read(1, function, address, count)
            assert len(data) == (count + 7) // 8
            expected = [int(v) for v in initial[function - 1][address:address + count]]
            assert bits(data, count) == peer.holds(function, address, count) == expected
            # padding bits of the last byte are zero (spec 6.1)
            if count % 8:
                assert data[-1] >> (count % 8) == 0


def test_write_single_coil_and_register(peer):
    c = peer.client
    c.write_coil(1, 10, True)
    c.write_coil(1, 12, False)
    c.write_register(1, 20, 0xBEEF)
    c.write_register(1, 21, 0)
    assert peer.holds(1, 10, 3) == [1, 0, 0]
    assert peer.holds(3, 20, 2) == [0xBEEF, 0]
    assert bits(c.read(1, 1, 10, 3), 3) == [1, 0, 0]
    assert registers(c.read(1, 3, 20, 2)) == [0xBEEF, 0]


def test_write_multiple(peer):
    c = peer.client
    pattern = [(i * 7) % 3 == 1 for i in range(37)]
    c.write_coils(1, 40, pattern)
    values = [(i * 4099) & 0xFFFF for i in range(123)]
    c.write_registers(1, 50, values)
    assert peer.holds(1, 40, 37) == [int(v) for v in pattern]
    assert peer.holds(3, 50, 123) == values
    assert bits(c.read(1, 1, 40, 37), 37) == [int(v) for v in pattern]
    assert registers(c.read(1, 3, 50, 123)) == values


def test_exception_reply_then_good_request(peer):
    c = peer.client
    with pytest.raises(DeviceError) as info:
        c.read(1, 3, 190, 20)  # runs past the server's 200 registers
    err = info.value
    assert err.code == 2 and not err.retryable
    assert (err.unit, err.function, err.address, err.count) == (1, 3, 190, 20)
    assert "ILLEGAL DATA ADDRESS" in str(err) and "unit 1 fc 03 address 190 count 20" in str(err)
    assert registers(c.read(1, 3, 0, 2)) == peer.holds(3, 0, 2)
    assert c.stats["exceptions"] == 1 and c.stats["requests"] == 2
