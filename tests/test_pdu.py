"""PDU table and RTU / MBAP framing: the spec's examples, limits, and the fixed check order."""
import pytest

from agent.modbus import pdu, rtu, tcp
from agent.modbus.errors import CRCError, DeviceError, FrameError, InvalidRequest

# MODBUS Application Protocol v1.1b3, section 6: (function, address, payload, count,
# request PDU, response PDU, parsed data)
SPEC = [
    (1, 19, 19, 19, "01 00 13 00 13", "01 03 cd 6b 05", "cd 6b 05"),                 # 6.1
    (2, 196, 22, 22, "02 00 c4 00 16", "02 03 ac db 35", "ac db 35"),                # 6.2
    (3, 107, 3, 3, "03 00 6b 00 03", "03 06 02 2b 00 00 00 64", "02 2b 00 00 00 64"),  # 6.3
    (4, 8, 1, 1, "04 00 08 00 01", "04 02 00 0a", "00 0a"),                          # 6.4
    (5, 172, True, 1, "05 00 ac ff 00", "05 00 ac ff 00", None),                     # 6.5
    (6, 1, 3, 1, "06 00 01 00 03", "06 00 01 00 03", None),                          # 6.6
    (15, 19, [1, 0, 1, 1, 0, 0, 1, 1, 1, 0], 10,
     "0f 00 13 00 0a 02 cd 01", "0f 00 13 00 0a", None),                             # 6.11
    (16, 1, [0x000A, 0x0102], 2, "10 00 01 00 02 04 00 0a 01 02", "10 00 01 00 02", None),  # 6.12
]


@pytest.mark.parametrize("case", SPEC, ids=[str(c[0]) for c in SPEC])
def test_spec_examples(case):
    code, address, payload, count, request, response, data = case
    fn = pdu.function(code)
    assert fn.build(address, payload) == bytes.fromhex(request)
    assert fn.response_length(count) == len(bytes.fromhex(response))
    value = payload if code in (5, 6) else None
    parsed = fn.parse(bytes.fromhex(response), address, count, value)
    assert parsed == (None if data is None else bytes.fromhex(data))
    assert pdu.response_pdu_length(bytes.fromhex(response)) == len(bytes.fromhex(response))


def test_exception_response_spec_example():
    # 7: read coils at an address that does not exist -> 81 02
    with pytest.raises(DeviceError) as info:
        pdu.function(1).parse(bytes.fromhex("81 02"), 1185, 1)
    assert info.value.code == 2 and info.value.function == 1
    assert pdu.response_pdu_length(b"\x81\x02") == 2


@pytest.mark.parametrize("code", range(1, 12))
def test_exception_codes(code):
    err = DeviceError(code, unit=3, function=4, address=100, count=2)
    assert err.code == code and err.retryable == (code in (5, 6))
    with pytest.raises(DeviceError) as info:
        pdu.function(4).parse(bytes((0x84, code)), 100, 2)
    assert info.value.code == code


def test_bits_pack_lsb_first():
    # 6.11: coils 20..29 = 1 0 1 1 0 0 1 1 | 1 0 -> CD 01
    values = [1, 0, 1, 1, 0, 0, 1, 1, 1, 0]
    assert pdu.pack_bits(values) == b"\xcd\x01"
    assert pdu.unpack_bits(b"\xcd\x01", 10) == [bool(v) for v in values]


@pytest.mark.parametrize("code,address,payload", [
    (3, 0, 0), (3, 0, 126), (4, 0, 126), (1, 0, 2001), (2, 0, 0), (3, -1, 1), (3, 65536, 1),
    (3, 65530, 10), (6, 0, 65536), (6, 0, -1), (5, 0, 2), (16, 0, []), (16, 0, [0] * 124),
    (15, 0, [1] * 1969), (16, 0, [70000]), (3, 0, "7"), (3, 1.5, 1),
])
def test_invalid_requests(code, address, payload):
    with pytest.raises(InvalidRequest):
        pdu.function(code).build(address, payload)


def test_unsupported_function():
    with pytest.raises(InvalidRequest):
        pdu.function(7)
    assert pdu.response_pdu_length(b"\x07\x00") is None
    # FC 43's answer is of variable length: its first 2 bytes cannot tell it
    assert pdu.response_pdu_length(b"\x2b\x0e") is None


def test_write_echo_mismatch():
    with pytest.raises(FrameError, match="echo"):
        pdu.function(6).parse(bytes.fromhex("06 00 01 00 04"), 1, 1, 3)
    with pytest.raises(FrameError, match="repeat"):
        pdu.function(16).parse(bytes.fromhex("10 00 01 00 03"), 1, 2)


# --- RTU framing -------------------------------------------------------------------------------

def test_rtu_request_frames():
    assert rtu.build_read(1, 3, 0, 10) == bytes.fromhex("01 03 00 00 00 0a c5 cd")
    assert rtu.build_adu(0x11, bytes.fromhex("03 00 6b 00 03")) == bytes.fromhex("11 03 00 6b 00 03 76 87")
    assert rtu.read_response_length(3, 125) == 255
    assert rtu.read_response_length(1, 9) == 7


def test_rtu_decode_read():
    adu = rtu.build_adu(1, bytes.fromhex("03 04 00 01 00 02"))
    assert rtu.decode_read(adu, 1, 3, 2) == b"\x00\x01\x00\x02"
    assert rtu.frame_length(adu) == len(adu)


def test_rtu_check_order():
    """Length, CRC, unit, exception bit, function code, byte count: the first failing check
    names the problem even when later ones would fail too."""
    good = rtu.build_adu(1, bytes.fromhex("03 04 00 01 00 02"))
    with pytest.raises(FrameError, match="wrong response length"):
        rtu.decode_read(good + b"\x00", 1, 3, 2)
    with pytest.raises(CRCError):  # bad CRC and wrong unit: CRC comes first
        rtu.decode_read(bytes((2,)) + good[1:], 1, 3, 2)
    with pytest.raises(FrameError, match="wrong unit"):
        rtu.decode_read(rtu.build_adu(2, bytes.fromhex("04 04 00 01 00 02")), 1, 3, 2)
    with pytest.raises(DeviceError):
        rtu.decode_read(rtu.build_adu(1, b"\x83\x06"), 1, 3, 2)
    with pytest.raises(FrameError, match="function code"):
        rtu.decode_read(rtu.build_adu(1, bytes.fromhex("04 04 00 01 00 02")), 1, 3, 2)
    with pytest.raises(FrameError, match="byte count"):
        rtu.decode_read(rtu.build_adu(1, bytes.fromhex("03 03 00 01 00 02")), 1, 3, 2)


def test_rtu_decode_write():
    fn = pdu.function(16)
    adu = rtu.build_adu(1, bytes.fromhex("10 00 01 00 02"))
    assert rtu.decode_response(adu, 1, fn, 1, 2) is None
    with pytest.raises(DeviceError) as info:
        rtu.decode_response(rtu.build_adu(1, b"\x90\x04"), 1, fn, 1, 2)
    assert info.value.code == 4


# --- MBAP framing ------------------------------------------------------------------------------

def test_mbap_request_frame():
    # Modbus Messaging on TCP/IP: MBAP tid, protocol 0, length = unit + PDU
    assert tcp.build_read(0x1501, 0xFF, 3, 107, 3) == bytes.fromhex("15 01 00 00 00 06 ff 03 00 6b 00 03")
    assert tcp.build_adu(2, 1, bytes.fromhex("06 00 01 00 03")) == bytes.fromhex("00 02 00 00 00 06 01 06 00 01 00 03")
    assert tcp.parse_header(bytes.fromhex("15 01 00 00 00 09 ff")) == (0x1501, 9, 0xFF)


def test_mbap_decode_read_and_check_order():
    good = bytes.fromhex("00 05 00 00 00 07 01 03 04 00 01 00 02")
    assert tcp.decode_read(good, 5, 1, 3, 2) == b"\x00\x01\x00\x02"
    with pytest.raises(FrameError, match="wrong response length"):
        tcp.decode_read(good + b"\x00", 5, 1, 3, 2)
    with pytest.raises(FrameError, match="transaction id"):
        tcp.decode_read(good, 6, 2, 3, 2)  # wrong tid and unit: tid comes first
    with pytest.raises(FrameError, match="protocol id"):
        tcp.decode_read(good[:2] + b"\x00\x01" + good[4:], 5, 1, 3, 2)
    with pytest.raises(FrameError, match="MBAP length"):
        tcp.decode_read(good[:4] + b"\x00\x08" + good[6:], 5, 1, 3, 2)
    with pytest.raises(FrameError, match="wrong unit"):
        tcp.decode_read(good, 5, 2, 3, 2)
    with pytest.raises(DeviceError):
        tcp.decode_read(bytes.fromhex("00 05 00 00 00 03 01 83 02"), 5, 1, 3, 2)
    with pytest.raises(FrameError, match="function code"):
        tcp.decode_read(good[:7] + b"\x04" + good[8:], 5, 1, 3, 2)
    with pytest.raises(FrameError, match="byte count"):
        tcp.decode_read(good[:8] + b"\x05" + good[9:], 5, 1, 3, 2)


@pytest.mark.parametrize("header", ["00 01 00 01 00 06 01", "00 01 00 00 00 01 01", "00 01 00 00 01 00 01"])
def test_mbap_out_of_sync_header(header):
    with pytest.raises(FrameError, match="out of sync"):
        tcp.parse_header(bytes.fromhex(header))
