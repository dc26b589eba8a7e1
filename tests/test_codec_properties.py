"""Property tests: build -> parse round trips; every decoder fed random bytes raises only the
codec's own exception types (agent.modbus.errors)."""
import socket
import struct
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.modbus import pdu, rtu, tcp
from agent.modbus.client import RtuOverTcpClient, TcpClient
from agent.modbus.errors import DeviceError, ModbusError

SETTINGS = settings(max_examples=150, deadline=None)

units = st.integers(0, 255)
tids = st.integers(0, 0xFFFF)
read_codes = st.sampled_from([1, 2, 3, 4])


@st.composite
def read_requests(draw):
    code = draw(read_codes)
    count = draw(st.integers(1, pdu.FUNCTIONS[code].max_count))
    address = draw(st.integers(0, 0x10000 - count))
    return code, address, count


def response_data(code, count):
    n = 2 * count if code >= 3 else (count + 7) // 8
    return st.binary(min_size=n, max_size=n)


@SETTINGS
@given(read_requests(), units, tids, st.data())
def test_read_round_trip(req, unit, tid, data):
    code, address, count = req
    payload = data.draw(response_data(code, count))
    request_pdu = pdu.function(code).build(address, count)
    assert request_pdu == struct.pack(">BHH", code, address, count)
    response_pdu = bytes((code, len(payload))) + payload
    assert len(response_pdu) == pdu.function(code).response_length(count)
    assert pdu.function(code).parse(response_pdu, address, count) == payload
    assert rtu.decode_read(rtu.build_adu(unit, response_pdu), unit, code, count) == payload
    assert tcp.decode_read(tcp.build_adu(tid, unit, response_pdu), tid, unit, code, count) == payload
    assert rtu.build_read(unit, code, address, count) == rtu.build_adu(unit, request_pdu)
    assert tcp.build_read(tid, unit, code, address, count) == tcp.build_adu(tid, unit, request_pdu)


@SETTINGS
@given(st.lists(st.booleans(), min_size=1, max_size=1968), st.integers(0, 60000), units)
def test_write_coils_round_trip(values, address, unit):
    fn = pdu.function(15)
    request = fn.build(address, values)
    assert pdu.unpack_bits(request[6:], len(values)) == values
    assert request[5] == len(request) - 6
    echo = request[:5]
    assert rtu.decode_response(rtu.build_adu(unit, echo), unit, fn, address, len(values)) is None


@SETTINGS
@given(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=123), st.integers(0, 65000), units, tids)
def test_write_registers_round_trip(values, address, unit, tid):
    fn = pdu.function(16)
    request = fn.build(address, values)
    assert list(struct.unpack(">%dH" % len(values), request[6:])) == values
    assert tcp.decode_response(tcp.build_adu(tid, unit, request[:5]), tid, unit, fn, address, len(values)) is None


@SETTINGS
@given(st.sampled_from([5, 6]), st.integers(0, 0xFFFF), st.integers(0, 1), units)
def test_single_write_round_trip(code, address, value, unit):
    fn = pdu.function(code)
    request = fn.build(address, value)
    assert rtu.decode_response(rtu.build_adu(unit, request), unit, fn, address, 1, value) is None


@SETTINGS
@given(st.binary(max_size=300), units, tids, read_requests())
def test_random_bytes_raise_only_codec_errors(blob, unit, tid, req):
    code, address, count = req
    for decode in (
        lambda: rtu.decode_read(blob, unit, code, count),
        lambda: tcp.decode_read(blob, tid, unit, code, count),
        lambda: pdu.function(code).parse(blob, address, count),
        lambda: rtu.decode_response(blob, unit, pdu.function(16), address, min(count, 123)),
        lambda: tcp.decode_response(blob, tid, unit, pdu.function(5), address, 1, True),
        lambda: pdu.function(6).parse(blob, address, 1, 7),
        lambda: pdu.function(15).parse(blob, address, count),
    ):
        try:
            decode()
        except ModbusError:
            pass
    if len(blob) >= 7:
        try:
            tcp.parse_header(blob)
        except ModbusError:
            pass
    if len(blob) >= 3:
        n = rtu.frame_length(blob)
        assert n is None or 5 <= n <= 258


@SETTINGS
@given(st.binary(min_size=1, max_size=260), units, read_requests())
def test_valid_crc_random_pdu_raises_only_codec_errors(body, unit, req):
    # a frame whose CRC is right gets past the CRC check: the later checks must hold too
    code, _address, count = req
    adu = rtu.build_adu(unit, body)
    try:
        data = rtu.decode_read(adu, unit, code, count)
    except DeviceError as e:
        assert body[0] == code | 0x80 and e.code == body[1]
    except ModbusError:
        pass
    else:
        assert data == body[2:] and body[0] == code


@SETTINGS
@given(st.binary(max_size=32), st.integers(0, 40))
def test_unpack_bits_total(blob, count):
    if count <= 8 * len(blob):
        bits = pdu.unpack_bits(blob, count)
        assert len(bits) == count
        assert pdu.pack_bits(bits) == bytes(
            b & ((1 << min(8, count - 8 * i)) - 1) for i, b in enumerate(blob[:(count + 7) // 8]))


# --- the clients' stream readers, fed random byte streams --------------------------------------

class BytesLink:
    """An RTU byte link that plays back `data` in chunks, then goes silent."""

    def __init__(self, data, chunk):
        self.data = data
        self.chunk = chunk

    def read_some(self, n, timeout):
        out, self.data = self.data[:min(n, self.chunk)], self.data[min(n, self.chunk):]
        return out


class BytesSocket:
    """A socket that plays back `data` in chunks, then times out."""

    def __init__(self, data, chunk):
        self.data = data
        self.chunk = chunk

    def recv(self, n):
        if not self.data:
            raise socket.timeout()
        out, self.data = self.data[:min(n, self.chunk)], self.data[min(n, self.chunk):]
        return out

    def settimeout(self, t):
        pass

    def close(self):
        pass


@SETTINGS
@given(st.binary(max_size=300), st.integers(1, 300), read_requests(), st.booleans())
def test_rtu_stream_reader_random_bytes(blob, chunk, req, append_answer):
    code, address, count = req
    data = bytes(range(count * 2 if code >= 3 else (count + 7) // 8))[:250]
    answer = rtu.build_adu(1, bytes((code, len(data))) + data)
    client = RtuOverTcpClient("127.0.0.1")
    client._link = BytesLink(blob + answer if append_answer else blob, chunk)
    try:
        adu = client._receive(1, code, rtu.read_response_length(code, count), time.monotonic() + 5)
        got = rtu.decode_read(adu, 1, code, count)
    except ModbusError:
        return
    assert len(got) == len(data)
    if not blob:
        assert got == data


@SETTINGS
@given(st.binary(max_size=300), st.integers(1, 300), st.integers(1, 0xFFFF), st.booleans())
def test_tcp_stream_reader_random_bytes(blob, chunk, tid, append_answer):
    answer = tcp.build_adu(tid, 1, b"\x03\x04\x00\x01\x00\x02")
    client = TcpClient("127.0.0.1", timeout=5)
    client._sock = BytesSocket(blob + answer if append_answer else blob, chunk)
    try:
        adu = client._receive(tid, 13, [], time.monotonic() + 5)
        got = tcp.decode_read(adu, tid, 1, 3, 2)
    except ModbusError:
        return
    assert got == b"\x00\x01\x00\x02" or blob
