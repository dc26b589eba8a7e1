"""Late answers on RTU (no transaction id) and half-open links on RTU over TCP.

A scripted fake device on a real pty pair (the `pty_pair` fixture, pyserial on the client side)
answers the first request too late, then the second one; each case ends with a good request
whose value is checked. The fake is driven by the request's register address.
"""
import struct

import pytest

from agent.modbus.client import RtuClient, RtuOverTcpClient
from agent.modbus.errors import FrameError, ModbusTimeout
from tests import modbus_peers as peers
from tests.modbus_peers import rtu

TIMEOUT = 0.2
#: generous, so a loaded test host still sees the late answer inside the window
LATE_WINDOW = 0.5


def regs(*values):
    return struct.pack(">%dH" % len(values), *values)


def answer(unit, *values):
    """FC03 response ADU holding `values`."""
    return rtu(unit, bytes((3, 2 * len(values))) + regs(*values))


class LateDevice:
    """FC03 device: address 0 is answered late or wrongly (how: `mode`), every other address
    at once with the registers [address, address + 1, ...]."""

    def __init__(self, mode):
        self.mode = mode
        self.held = None        # a late answer sent just before the next request's answer
        self.requests = []

    def __call__(self, request):
        unit, fc, address, count = struct.unpack_from(">BBHH", request)
        self.requests.append(address)
        values = [(address + i) & 0xFFFF for i in range(count)]
        if address == 0:
            late = answer(unit, *(111 + i for i in range(count)))
            if self.mode == "after_next_request":
                self.held = late            # still busy: answers when the next request comes
                return []
            if self.mode == "after_timeout":
                return [TIMEOUT + 0.05, late]   # just after the client gave up
            if self.mode == "silent":
                return []
            if self.mode == "other_count":
                return [answer(unit, *values[:-1])]  # always a register short
        out = [self.held] if self.held else []
        self.held = None
        return out + [answer(unit, *values)]


@pytest.fixture
def late_pty(pty_pair):
    servers = []

    def start(mode, **kwargs):
        device = LateDevice(mode)
        server = peers.PtyServer(device, pty=pty_pair)
        client = RtuClient(server.path, baudrate=115200, timeout=TIMEOUT, backoff_min=0.01, **kwargs)
        servers.append((server, client))
        return device, client

    yield start
    for server, client in servers:
        client.close()
        server.stop()


def test_late_answer_of_another_count_is_skipped(late_pty):
    # the late answer (3 registers) reaches the line after our next request (2 registers) went
    # out: same unit and function code, so only its byte count tells it is not ours
    device, client = late_pty("after_next_request")
    with pytest.raises(ModbusTimeout):
        client.read(1, 3, 0, 3)
    assert client.read(1, 3, 100, 2) == regs(100, 101)
    assert client.stats["stale_discarded"] == 1
    assert client.stats["crc_errors"] == client.stats["frame_errors"] == 0
    assert client.read(1, 3, 200, 2) == regs(200, 201)
    assert device.requests == [0, 100, 200]


def test_late_answer_of_the_same_shape_right_before_ours_is_skipped(late_pty):
    # a device still busy with the timed-out read answers it when the next request arrives,
    # then answers that one: same unit, function and byte count. The first read after a
    # failure listens one window past its answer and takes the second whole answer.
    device, client = late_pty("after_next_request")
    with pytest.raises(ModbusTimeout):
        client.read(1, 3, 0, 2)
    assert client.read(1, 3, 100, 2) == regs(100, 101)
    assert client.stats["stale_discarded"] == 1
    assert client.stats["crc_errors"] == client.stats["frame_errors"] == 0
    assert client.read(1, 3, 200, 2) == regs(200, 201)
    assert device.requests == [0, 100, 200]


def test_late_answer_of_the_same_shape_is_dropped_before_the_next_request(late_pty):
    # the late answer has the same unit, function and byte count as the next answer: nothing
    # in it tells it apart, so it must not be on the line when the next request goes out
    device, client = late_pty("after_timeout", late_window=LATE_WINDOW)
    with pytest.raises(ModbusTimeout):
        client.read(1, 3, 0, 2)
    # sent at once: the client first waits out the late-answer window
    assert client.read(1, 3, 100, 2) == regs(100, 101)
    assert client.stats["stale_discarded"] == 1
    assert client.read(1, 3, 200, 2) == regs(200, 201)
    assert device.requests == [0, 100, 200]
    assert client.stats["timeouts"] == 1


class EchoTwiceDevice:
    """FC03 device: address 0 is never answered (a dead request); any other address is answered
    twice in one burst, first with [address, ...], then with [9000 + address, ...]. The second
    copy is what `_second_answer` would take for the real answer if it listened."""

    def __init__(self):
        self.requests = []

    def __call__(self, request):
        unit, fc, address, count = struct.unpack_from(">BBHH", request)
        self.requests.append((unit, address))
        if address == 0:
            return []
        first = answer(unit, *((address + i) & 0xFFFF for i in range(count)))
        second = answer(unit, *((9000 + address + i) & 0xFFFF for i in range(count)))
        return [first + second]


@pytest.mark.parametrize("failed, unit, count", [
    ((5, 2), 1, 2),     # another unit (a dead one on the same bus), same shape
    ((1, 3), 1, 2),     # the same unit, another answer length
], ids=["other-unit", "other-shape"])
def test_no_second_listen_for_a_request_a_late_answer_cannot_match(pty_pair, failed, unit, count):
    # after a failure, only the same question asked again listens one more window behind its
    # answer; any other request takes its answer at once. Shown by logic, not time: the second
    # whole answer right behind the first is not consumed (it would be, and counted as stale,
    # if the client listened).
    device = EchoTwiceDevice()
    server = peers.PtyServer(device, pty=pty_pair)
    client = RtuClient(server.path, baudrate=115200, timeout=TIMEOUT, backoff_min=0.01)
    try:
        with pytest.raises(ModbusTimeout):
            client.read(failed[0], 3, 0, failed[1])
        assert client.read(unit, 3, 100, count) == regs(*range(100, 100 + count))
        assert client.stats["stale_discarded"] == 0
        # the unconsumed copy is dropped before the next request, not read as its answer
        assert client.read(unit, 3, 200, count) == regs(*range(200, 200 + count))
        assert device.requests == [(failed[0], 0), (unit, 100), (unit, 200)]
    finally:
        client.close()
        server.stop()


def test_second_listen_for_the_failed_request_asked_again(pty_pair):
    # the control: the same unit, function and length right after the failure does listen,
    # and the second whole answer wins (the first is taken for the late one)
    device = EchoTwiceDevice()
    server = peers.PtyServer(device, pty=pty_pair)
    client = RtuClient(server.path, baudrate=115200, timeout=TIMEOUT, backoff_min=0.01)
    try:
        with pytest.raises(ModbusTimeout):
            client.read(1, 3, 0, 2)
        assert client.read(1, 3, 100, 2) == regs(9100, 9101)
        assert client.stats["stale_discarded"] == 1
        assert device.requests == [(1, 0), (1, 100)]
    finally:
        client.close()
        server.stop()


def test_late_window_default_after_a_timeout_only(late_pty):
    # default window: a share of the timeout within bounds, plus the answer's time on the line
    _device, client = late_pty("silent")
    assert 0.05 <= client._late_window(9) <= 0.25 + client._silence + client._char_time * 9
    assert client.read(1, 3, 100, 2) == regs(100, 101)
    assert client._late_until == 0.0            # a good answer opens no window
    with pytest.raises(ModbusTimeout):
        client.read(1, 3, 0, 2)
    assert client._late_until > 0.0
    assert client.read(1, 3, 200, 2) == regs(200, 201)
    assert client._late_until == 0.0


def test_device_answering_another_count_says_so(late_pty):
    # a device that always answers one register short: after the timeout, the error names the
    # byte count that came instead of a bare timeout
    _device, client = late_pty("other_count")
    with pytest.raises(FrameError, match="only one with byte count 2") as info:
        client.read(1, 3, 0, 2)
    assert "expected byte count 4" in str(info.value)
    assert "got 01 03 02 00 00" in str(info.value)
    assert client.read(1, 3, 300, 2) == regs(300, 301)


# === RTU over TCP: half-open link ===========================================================

def test_rtu_over_tcp_two_timeouts_reopen_the_connection():
    silent = peers.SilentServer()
    server = None
    client = RtuOverTcpClient("127.0.0.1", silent.port, timeout=TIMEOUT, backoff_min=0.01)
    try:
        for _ in range(2):
            with pytest.raises(ModbusTimeout):
                client.read(1, 3, 100, 2)
        # the old connection is still open but silent (half-open); a good device now sits
        # behind the same address
        silent.stop_listening()
        server = peers.SocketServer(LateDevice("none"), port=silent.port)
        assert client.read(1, 3, 100, 2) == regs(100, 101)
        assert client.read(1, 3, 200, 2) == regs(200, 201)
        assert len(silent.conns) == 1 and server.connections == 1
        assert client.stats["timeouts"] == 2 and client.stats["reconnects"] == 1
    finally:
        client.close()
        silent.stop()
        if server:
            server.stop()


def test_rtu_over_tcp_one_timeout_keeps_the_connection():
    server = peers.SocketServer(LateDevice("after_timeout"))
    client = RtuOverTcpClient("127.0.0.1", server.port, timeout=TIMEOUT, backoff_min=0.01,
                              late_window=LATE_WINDOW)
    try:
        with pytest.raises(ModbusTimeout):
            client.read(1, 3, 0, 2)
        assert client.read(1, 3, 100, 2) == regs(100, 101)
        with pytest.raises(ModbusTimeout):
            client.read(1, 3, 0, 2)      # not in a row: the good answer between reset the count
        assert client.read(1, 3, 200, 2) == regs(200, 201)
        assert server.connections == 1 and client.stats["reconnects"] == 0
    finally:
        client.close()
        server.stop()
