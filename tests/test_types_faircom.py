"""Every data type of the FairCom Edge Modbus connector's list is expressible as a point, checked
against a pymodbus TCP server holding known values: each integer size signed and unsigned in
each byte order, float32/float64 in every order, strings, bit booleans (plain and inverted
bitBooleanZeroValue), bit strings (two labels, one empty), bit fields signed/unsigned, in
little-endian byte order (bitLittleEndian) and reversed (bitReverseOrder), integer + fraction
over adjacent registers (appendAdjacentRegisters, ...Reversed, modbusDecimalDigits), coils and
discrete inputs, and an overlapping raw word. The register words are computed here with struct
and the byte-order letters (and for big/little words by pymodbus' own convert_to_registers),
not with the agent's codec; the agent reads them with Device.poll over a real socket.

Also: the inverse (agent.types.encode) reads back as written for every type and order.
"""
import asyncio
import struct

import pytest
from pymodbus.client.mixin import ModbusClientMixin as M

from agent.config import Problems, parse_point
from agent.device import Device, Request
from agent.modbus.tcp_client import TcpClient
from agent.types import ORDERS_32, ORDERS_64, encode
from tests import modbus_peers as peers


def wire(natural, order):
    """Natural bytes (most significant first) laid out in a byte-order spelling: letter A is
    the most significant byte, the letters give the wire positions."""
    return bytes(natural[ord(c) - 65] for c in order)


def words(data):
    return list(struct.unpack(">%dH" % (len(data) // 2), data))


# (point text without address, registers (list), expected value)
CASES = []


def add(text, regs, value):
    CASES.append((text, list(regs), value))


for code, tname, v in (("b", "int8", -5), ("B", "uint8", 250)):
    add("%s high" % tname, [(struct.pack(">" + code, v)[0] << 8) | 0x11], v)
    add("%s low" % tname, [0x2200 | struct.pack(">" + code, v)[0]], v)
for code, tname, v in (("h", "int16", -1234), ("H", "uint16", 54321)):
    for order in ("AB", "BA"):
        add("%s %s" % (tname, order), words(wire(struct.pack(">" + code, v), order)), v)
for code, tname, v in (("i", "int32", -123456789), ("I", "uint32", 3123456789)):
    for order in ORDERS_32:
        add("%s %s" % (tname, order), words(wire(struct.pack(">" + code, v), order)), v)
for code, tname, v in (("q", "int64", -1234567890123456789), ("Q", "uint64", 17234567890123456789)):
    for order in ORDERS_64:
        add("%s %s" % (tname, order), words(wire(struct.pack(">" + code, v), order)), v)
for order in ORDERS_32:
    add("float32 %s" % order, words(wire(struct.pack(">f", 230.1), order)), 230.1)
for order in ORDERS_64:
    add("float64 %s" % order, words(wire(struct.pack(">d", -1.0e-7), order)), -1.0e-7)
# pymodbus' own encoder for the orders it knows (big and little word order)
add("float32 ABCD", M.convert_to_registers(49.95, M.DATATYPE.FLOAT32), 49.95)
add("float32 CDAB", M.convert_to_registers(49.95, M.DATATYPE.FLOAT32, word_order="little"), 49.95)
add("int32 CDAB", M.convert_to_registers(-70000, M.DATATYPE.INT32, word_order="little"), -70000)
add("uint64 ABCDEFGH", M.convert_to_registers(2 ** 60 + 7, M.DATATYPE.UINT64), 2 ** 60 + 7)
add("string 4", words(b"AB-7\0\0\0\0"), "AB-7")
add("string 2 swap=yes", words(b"BA7-"), "AB-7")
# bits of a register
add("bit 3", [0b1000], True)
add("bit 3 invert=yes", [0b1000], False)                       # bitBooleanZeroValue
add("bit 3 invert=yes", [0], True)
add('bit 2 enum=0:"door open",1:""', [0b100], "")              # bitString, one label empty
add('bit 2 enum=0:"door open",1:""', [0], "door open")
add("bits 4-7", [0x00A0], 10)
add("bits 4-7 signed=yes", [0x00A0], -6)
add("bits 0-11 BA", [0x3412], 0x234)                            # bitLittleEndian: 9+ bits
add("bits 0-11 BA signed=yes", [0x34F8], 0x834 - 0x1000)     # 0xF834 in the swapped register
add("bits 4-7 reverse=yes", [0x0010], 8)                        # bitReverseOrder
add("bits 0-9 reverse=yes signed=yes", [0x0001], -512)
add("append decimals=2", [12, 34], 12.34)                       # appendAdjacentRegisters
add("append_reversed decimals=2", [34, 12], 12.34)
add("append decimals=3 signed=yes", [0xFFF4, 5], -12.005)
add("append decimals=2", [12, 100], None)                       # fraction too large: no reading
add("append decimals=1 scale=10", [12, 3], 123.0)


@pytest.fixture(scope="module")
def server():
    s = peers.PymodbusServer("tcp")
    yield s
    s.stop()


def put(server, function, address, values):
    asyncio.run_coroutine_threadsafe(server.server.context.async_setValues(1, function, address, values),
                                     server.loop).result(2)


def point(text, address, name="x"):
    problems = Problems()
    p = parse_point(name, text.replace("@", str(address)), 0, "ABCD", "t.ini", 1, "points:d", problems)
    assert p is not None, problems.errors
    return p


def test_every_faircom_type_reads_its_known_value_from_pymodbus(server):
    points, expect, address = [], {}, 0
    for i, (text, regs, value) in enumerate(CASES):
        put(server, 16, address, regs)
        name = "p%02d" % i
        points.append(point("holding @ " + text, address, name))
        expect[name] = (text, value)
        address += len(regs)
    # a raw status word and one of its bits on the same register (overlap=yes on the word)
    put(server, 16, address, [0x8001])
    points += [point("holding @ uint16 overlap=yes", address, "word"), point("holding @ bit 15", address, "b15")]
    expect.update(word=("uint16 overlap", 0x8001), b15=("bit 15", True))
    put(server, 15, 50, [True, False])
    points += [point("coil 50 bool", 0, "c50"), point("coil 51 bool invert=yes", 0, "c51")]
    expect.update(c50=("coil", True), c51=("coil invert", True))
    client = TcpClient("127.0.0.1", server.port, timeout=2.0)
    try:
        dev = Device("d", None, points=points, max_gap=0)
        got = dev.poll(client)
    finally:
        client.close()
    wrong = {n: (text, want, got.get(n)) for n, (text, want) in expect.items()
             if got.get(n) != want or type(got.get(n)) is not type(want)}
    assert not wrong, wrong


INVERSE = [
    ("int16 BA", "-1234"), ("uint32 DCBA", "3123456789"), ("int64 FEHGBADC", "-5"),
    ("float32 BADC", "230.1"), ("float64 CDABGHEF", "-1e-07"), ("uint16 scale=0.1", "22.5"),
    ("int32 divisor=1000 offset=-40", "-39.999"), ("bits 4-7 reverse=yes signed=yes", "-3"),
    ("bits 0-11 BA", "1500"), ("bit 5 invert=yes", "True"), ("append_reversed decimals=2 signed=yes", "-7.05"),
    ("string 3 swap=yes", "ab c"), ("uint8 high", "200"), ("int8 low", "-100"),
    ("uint16 enum=0:off,1:\"on hold\"", "on hold"),
]


@pytest.mark.parametrize("text, value", INVERSE)
def test_the_inverse_reads_back_as_written(text, value):
    p = point("holding 0 " + text, 0)
    wv = encode(p, value)
    regs = wv.registers if wv.modify is None else [wv.modify(0xFFFF if "invert" in text else 0)]
    data = struct.pack(">%dH" % len(regs), *regs)
    got = Request(p.table, p.address, p.count, [p]).decoder.decode(data, {})["x"]
    assert str(got) == value


def test_other_bits_of_the_register_survive_a_field_write():
    p = point("holding 0 bits 4-7", 0)
    assert encode(p, "5").modify(0xF00F) == 0xF05F
    p = point("holding 0 bits 0-11 BA", 0)     # the field's bits are in the byte-swapped register
    assert encode(p, "0").modify(0xFFFF) == 0x00F0   # logical 0xFFFF -> 0xF000, on the wire 0x00F0
