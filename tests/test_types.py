"""Types, byte orders and scaling (agent/types.py), checked against struct-packed reference bytes.

The reference puts the value's big-endian bytes A, B, C, ... on the wire in the order the order
name spells: 'CDAB' sends C D A B. It is written here independently of the decoder's own tables.
"""
import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import Problems, parse_point
from agent.device import Device, Request
from agent.types import ORDERS_32, ORDERS_64, make_transform, order_for, permutation

CODES = {"int16": ">h", "uint16": ">H", "int32": ">i", "uint32": ">I", "float32": ">f",
         "int64": ">q", "uint64": ">Q", "float64": ">d"}


def wire(value, type_name, order):
    natural = struct.pack(CODES[type_name], value)
    return bytes(natural[ord(letter) - 65] for letter in order)


def point(text, name="p", base=0, byte_order="ABCD"):
    problems = Problems()
    p = parse_point(name, text, base, byte_order, "test.ini", 1, "points:d", problems)
    assert not problems.errors, problems.errors
    return p


def decode_one(text, data, **kw):
    p = point(text, **kw)
    r = Request(p.table, p.address, p.count, [p])
    assert r.nbytes == len(data)
    return r.decoder.decode(data, {})["p"]


SAMPLES = {
    "int16": [-32768, -1, 0, 12345, 32767],
    "uint16": [0, 1, 40000, 65535],
    "int32": [-2147483648, -123456, 0, 7, 2147483647],
    "uint32": [0, 305419896, 4294967295],
    "float32": [0.0, -1.5, 230.25, 3.0e38],
    "int64": [-(2 ** 63), -5, 0, 2 ** 63 - 1],
    "uint64": [0, 1, 2 ** 64 - 1, 0x0102030405060708],
    "float64": [0.0, -2.5, 1.0e300, 123456.789],
}


def orders_of(type_name):
    return {"int16": ("AB", "BA"), "uint16": ("AB", "BA")}.get(
        type_name, ORDERS_32 if type_name.endswith("32") else ORDERS_64)


@pytest.mark.parametrize("type_name", sorted(SAMPLES))
def test_every_type_in_every_order(type_name):
    for order in orders_of(type_name):
        for value in SAMPLES[type_name]:
            got = decode_one("holding 0 %s %s" % (type_name, order), wire(value, type_name, order))
            assert got == value, (type_name, order, value, got)


@settings(deadline=None, max_examples=80)
@given(st.sampled_from(ORDERS_64), st.integers(0, 2 ** 64 - 1))
def test_uint64_orders_roundtrip(order, value):
    assert decode_one("holding 7 uint64 %s" % order, wire(value, "uint64", order)) == value


@settings(deadline=None, max_examples=80)
@given(st.sampled_from(ORDERS_32), st.floats(width=32, allow_nan=False, allow_infinity=False))
def test_float32_orders_convert_back_to_the_same_float32(order, value):
    got = decode_one("holding 0 float32 %s" % order, wire(value, "float32", order))
    assert struct.pack(">f", got) == struct.pack(">f", value)


def test_float32_is_reported_with_its_own_precision():
    # 230.1 is 230.10000610351562 once widened to a double: noise that would be spooled
    assert decode_one("input 0 float32", struct.pack(">f", 230.1)) == 230.1


@pytest.mark.parametrize("type_name", ["float32", "float64"])
@pytest.mark.parametrize("special", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_decode_to_none(type_name, special):
    data = struct.pack(CODES[type_name], special)
    assert decode_one("holding 0 %s" % type_name, data) is None
    assert decode_one("holding 0 %s scale=10" % type_name, data) is None


def test_device_byte_order_is_the_default_and_carries_to_16_and_64_bit():
    assert decode_one("holding 0 int32", wire(-7, "int32", "CDAB"), byte_order="CDAB") == -7
    assert decode_one("holding 0 int16", wire(-7, "int16", "AB"), byte_order="CDAB") == -7
    assert decode_one("holding 0 int16", wire(-7, "int16", "BA"), byte_order="DCBA") == -7
    assert decode_one("holding 0 uint64", wire(9, "uint64", "GHEFCDAB"), byte_order="CDAB") == 9
    # the point's own order wins over the device's
    assert decode_one("holding 0 int32 ABCD", wire(-7, "int32", "ABCD"), byte_order="CDAB") == -7


def test_order_helpers():
    assert permutation("CDAB") == (2, 3, 0, 1)
    assert order_for("float64", "CDAB") == "GHEFCDAB"
    assert order_for("int16", "BADC") == "BA"
    with pytest.raises(ValueError, match="64-bit"):
        order_for("int64", "ABDC")


def test_scaling_offset_divisor_decimals():
    raw = struct.pack(">h", 2301)
    assert decode_one("holding 0 int16 scale=0.1", raw) == 230.1           # not 230.10000000000002
    assert decode_one("holding 0 int16 scale=0.01", raw) == 23.01
    assert decode_one("holding 0 int16 scale=2", raw) == 4602.0
    assert decode_one("holding 0 int16 divisor=1000", raw) == 2.301
    assert decode_one("holding 0 int16 divisor=10 offset=-40", raw) == pytest.approx(190.1)
    assert decode_one("holding 0 int16 scale=0.0001 decimals=2", raw) == 0.23
    assert decode_one("holding 0 float32 scale=1000 decimals=0", struct.pack(">f", 1.2346)) == 1235.0
    assert decode_one("holding 0 uint16", raw) == 2301 and isinstance(decode_one("holding 0 uint16", raw), int)


def test_bits_bit_and_bytes_of_one_register():
    reg = struct.pack(">H", 0b1010_0101_1111_0110)
    assert decode_one("holding 3 bits 0-3", reg) == 0b0110
    assert decode_one("holding 3 bits 4-7", reg) == 0b1111
    assert decode_one("holding 3 bits 4-7 signed=yes", reg) == -1
    assert decode_one("holding 3 bits 12-15 signed=yes", reg) == -6
    assert decode_one("holding 3 bit 15", reg) is True
    assert decode_one("holding 3 bit 0", reg) is False
    assert decode_one("holding 3 int8 high", reg) == struct.unpack("b", b"\xa5")[0]
    assert decode_one("holding 3 uint8 low", reg) == 0xF6
    assert decode_one("holding 3 int8l", reg) == struct.unpack("b", b"\xf6")[0]


def test_strings_with_and_without_byte_swap():
    assert decode_one("holding 0 string 4", b"SDM630\0\0") == "SDM630"
    assert decode_one("holding 0 string 3 swap=yes", b"DS6M03") == "SDM630"
    assert decode_one("holding 0 string 2", b"AB  ") == "AB"


def test_enum_labels_and_unknown_values():
    assert decode_one("holding 0 uint16 enum=0:off,1:on", b"\x00\x01") == "on"
    assert decode_one("holding 0 uint16 enum=0:off,1:on", b"\x00\x07") == 7
    assert decode_one("holding 0 int16 enum=-1:reverse,0:ok", b"\xff\xff") == "reverse"


def test_coils_and_discrete_inputs():
    pts = [point("coil %d bool" % a, name="c%d" % a) for a in (0, 1, 7, 8, 12)]
    r = Request("coil", 0, 13, pts)
    # bits LSB first: byte 0 = coils 0-7, byte 1 = coils 8-12
    out = r.decoder.decode(bytes([0b1000_0010, 0b0001_0001]), {})
    assert out == {"c0": False, "c1": True, "c7": True, "c8": True, "c12": True}
    p = point("discrete 5 bool enum=0:closed,1:open", name="door")
    assert Request("discrete", 5, 1, [p]).decoder.decode(b"\x01", {}) == {"door": "open"}


def test_one_block_of_mixed_types_and_orders():
    """All orders in one request: the decoder unpacks it with a handful of struct calls."""
    lines, blob, expect, addr = [], b"", {}, 0
    for type_name in ("uint16", "int32", "float32", "uint64", "float64"):
        for order in orders_of(type_name):
            value = SAMPLES[type_name][1]
            name = "%s_%s" % (type_name, order)
            lines.append((name, "holding %d %s %s" % (addr, type_name, order)))
            data = wire(value, type_name, order)
            blob += data
            addr += len(data) // 2
            expect[name] = value
    lines.append(("flags_lo", "holding %d bits 0-7" % addr))
    lines.append(("flags_hi", "holding %d uint8 high" % addr))
    blob += b"\x12\x34"
    expect.update(flags_lo=0x34, flags_hi=0x12)
    pts = [point(text, name=name) for name, text in lines]
    dev = Device("d", connection=None, points=pts)
    assert len(dev.requests) == 1 and dev.requests[0].count == len(blob) // 2

    class Client:
        def read(self, unit, function, address, count):
            assert (unit, function, address, count) == (1, 3, 0, len(blob) // 2)
            return blob

    assert dev.poll(Client()) == expect


def test_poll_raises_with_context_on_short_data():
    from agent.modbus.errors import FrameError

    dev = Device("d", connection=None, unit=9, points=[point("holding 10 uint32")])

    class Client:
        def read(self, unit, function, address, count):
            return b"\x00\x01"

    with pytest.raises(FrameError) as info:
        dev.poll(Client())
    e = info.value
    assert (e.unit, e.function, e.address, e.count) == (9, 3, 10, 2)
    assert "4 data bytes" in str(e)


def test_transform_is_none_when_nothing_to_do():
    assert make_transform("int") is None
    assert make_transform("int", scale=1.0, offset=0.0) is None
    assert make_transform("float")(float("nan")) is None
