"""RTU ADU framing: unit id, PDU, CRC (Modbus over Serial Line v1.02, section 2.5.1).

Pure functions: bytes in, bytes out. The serial timing (3.5-character silence) and reading
from the line are the transport's job (`client.py`). The same frames travel on a TCP socket
for RTU-over-TCP gateways.
"""
import struct

from agent.modbus import pdu as _pdu
from agent.modbus.crc import crc16
from agent.modbus.errors import CRCError, DeviceError, FrameError

#: unit id, function code | 0x80, exception code, CRC
EXCEPTION_ADU_LENGTH = 5
#: unit id + CRC around the PDU
OVERHEAD = 3
MAX_ADU_LENGTH = 256

_READ = struct.Struct(">BBHH")


def build_adu(unit, pdu):
    """Unit id + PDU + CRC (low byte first)."""
    frame = bytes((unit,)) + pdu
    crc = crc16(frame)
    return frame + bytes((crc & 0xFF, crc >> 8))


def build_read(unit, function, address, count):
    """Read request ADU (FC 01-04); arguments already validated by the caller."""
    frame = _READ.pack(unit, function, address, count)
    crc = crc16(frame)
    return frame + bytes((crc & 0xFF, crc >> 8))


def read_response_length(function, count):
    """Length of the normal RTU response to a read of `count` items."""
    return 5 + (2 * count if function >= 3 else (count + 7) >> 3)


def frame_length(head):
    """Total ADU length of a response that starts with `head` (>= 3 bytes), or None when the
    bytes do not look like the start of a response (unknown function code)."""
    n = _pdu.response_pdu_length(head[1:3])
    return None if n is None else n + OVERHEAD


def _check_frame(adu, unit, function, expected_length):
    """Checks common to every response, in the fixed order: length, CRC, unit, exception bit,
    function code. Returns normally only for a normal response of the right function."""
    n = len(adu)
    if n != expected_length and n != EXCEPTION_ADU_LENGTH:
        raise FrameError("wrong response length", expected=f"{expected_length} bytes", got=bytes(adu))
    if crc16(adu):
        want = crc16(adu[:-2])
        raise CRCError("CRC mismatch (received %s)" % bytes(adu[-2:]).hex(" "),
                       expected="CRC %02x %02x" % (want & 0xFF, want >> 8), got=bytes(adu))
    if adu[0] != unit:
        raise FrameError("response from the wrong unit", expected=f"unit {unit}", got=bytes(adu))
    fc = adu[1]
    if fc == function | 0x80:
        if n != EXCEPTION_ADU_LENGTH:
            raise FrameError("malformed exception response", expected="5 bytes", got=bytes(adu))
        raise DeviceError(adu[2], unit=unit, function=function)
    if fc != function:
        raise FrameError("unexpected function code", expected=f"{function:02d}", got=bytes(adu))


def decode_read(adu, unit, function, count):
    """Check a read response (FC 01-04) and return its data bytes."""
    expected = read_response_length(function, count)
    _check_frame(adu, unit, function, expected)
    if len(adu) != expected or adu[2] != expected - 5:
        raise FrameError("wrong byte count", expected=f"byte count {expected - 5}", got=bytes(adu))
    return adu[3:-2]


def decode_response(adu, unit, fn, address, count, value=None):
    """Check any response against its request's `pdu.Function` and return the parsed data."""
    expected = fn.response_length(count) + OVERHEAD
    _check_frame(adu, unit, fn.code, expected)
    return fn.parse(adu[1:-2], address, count, value)
