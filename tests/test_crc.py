"""CRC-16/MODBUS: spec vectors, independent implementations, both host byte orders."""
import sys
from array import array

from hypothesis import given, settings
from hypothesis import strategies as st
from pymodbus.framer.rtu import FramerRTU
from umodbus.client.serial.redundancy_check import get_crc

from agent.modbus import crc

# (frame without CRC, CRC bytes as on the wire)
VECTORS = [
    # Modbus over Serial Line v1.02 / common reference frames
    ("01 03 00 00 00 0a", "c5 cd"),
    ("02 07", "41 12"),                       # umodbus's doctest (minimalmodbus)
    ("01 04 02 ff ff", "b8 80"),
    ("11 03 00 6b 00 03", "76 87"),           # MODBUS Application Protocol example request, unit 17
    ("01 05 00 ac ff 00", "4c 1b"),
    ("01 06 00 01 00 03", "98 0b"),
    ("01 10 00 01 00 02 04 00 0a 01 02", "92 30"),
    ("", "ff ff"),                            # init value, nothing folded in
]


def test_spec_vectors():
    for frame, wire in VECTORS:
        data = bytes.fromhex(frame)
        assert crc.crc16_bytes(data) == bytes.fromhex(wire), frame
        assert crc.check(data + bytes.fromhex(wire))


def test_catalogue_check_value():
    # reveng CRC catalogue, CRC-16/MODBUS: check = 0x4B37 for "123456789"
    assert crc.crc16(b"123456789") == 0x4B37


def test_residue_and_corruption():
    adu = crc.append_crc(bytes.fromhex("01 03 02 00 2a"))
    assert crc.check(adu)
    for i in range(len(adu)):
        for bit in range(8):
            bad = bytearray(adu)
            bad[i] ^= 1 << bit
            assert not crc.check(bad)  # every single-bit error is caught


def test_word_table_matches_two_byte_steps():
    t16 = crc.word_table("little")
    assert isinstance(t16, array) and t16.itemsize == 2 and len(t16) == 65536
    for x in (0, 1, 0xFF, 0x100, 0x1234, 0xFFFF, 0xA001):
        reg = 0
        for b in (x & 0xFF, x >> 8):
            reg = (reg >> 8) ^ crc.TABLE8[(reg ^ b) & 0xFF]
        assert t16[x] == reg


def test_big_endian_host_simulated():
    """The big-endian path (MIPS routers): table built for the swapped register, words read in
    big-endian order. On this host it is the non-native path and reads words with byteswap."""
    other = "big" if sys.byteorder == "little" else "little"
    crc_other = crc.make_crc16(other)
    for frame, wire in VECTORS:
        data = bytes.fromhex(frame)
        value = crc_other(data)
        assert bytes((value & 0xFF, value >> 8)) == bytes.fromhex(wire), frame
    assert crc_other(b"123456789") == 0x4B37

CRC_BIG = crc.make_crc16("big")
CRC_LITTLE = crc.make_crc16("little")
CRC_COMPACT = crc.make_crc16(compact=True)
CRC_COMPACT_OTHER = crc.make_crc16("big" if sys.byteorder == "little" else "little", compact=True)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_against_pymodbus_umodbus_and_bytewise(data):
    expected = crc.crc16_bytewise(data)
    assert crc.crc16(data) == expected
    assert CRC_BIG(data) == expected
    assert CRC_LITTLE(data) == expected
    assert CRC_COMPACT(data) == CRC_COMPACT_OTHER(data) == expected
    assert crc.crc16_bytes(data) == get_crc(data)                       # umodbus: wire bytes
    assert FramerRTU.compute_CRC(data) == int.from_bytes(crc.crc16_bytes(data), "big")  # pymodbus


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=64))
def test_accepts_bytes_like(data):
    assert crc.crc16(bytearray(data)) == crc.crc16(memoryview(data)) == crc.crc16(data)
