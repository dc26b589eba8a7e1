"""RTU ADU framing and serial-line timing (Modbus over Serial Line v1.02, sections 2.5.1, 2.5.1.1).

Framing: unit id, PDU, CRC. Pure functions: bytes in, bytes out. The same frames travel on a
TCP socket for RTU-over-TCP gateways.

Timing: the character time and the 3.5-character silence between frames are computed here,
the one place; waiting them out and reading from the line are the transport's job
(`rtu_client.py`), and the bus-time estimate (`transport.py`) uses the same numbers.
"""
import struct

from agent.modbus import pdu as _pdu
from agent.modbus.crc import crc16
from agent.modbus.errors import CRCError, FrameError

#: unit id + CRC around the PDU
OVERHEAD = 3
#: unit id, function code | 0x80, exception code, CRC
EXCEPTION_ADU_LENGTH = OVERHEAD + _pdu.EXCEPTION_PDU_LENGTH
MAX_ADU_LENGTH = 256

_READ = struct.Struct(">BBHH")
#: a read request ADU: unit, function, address, count, CRC
READ_REQUEST_LENGTH = _READ.size + 2

#: above this baud rate the silent interval is fixed (2.5.1.1: "for baud rates greater than
#: 19200 Bps, fixed values ... 1.750 ms for the interframe delay (t3.5)")
FIXED_TIMING_BAUD = 19200
FIXED_SILENCE = 0.00175


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


#: read_response_length(function, count): length of the normal RTU response to a read
read_response_length = _pdu.read_length(OVERHEAD + 2)


def response_length(fn, count):
    """Length of the normal RTU response to a request of `fn` (a `pdu.Function`) for `count`."""
    n = fn.response_length(count)
    return None if n is None else n + OVERHEAD   # None: variable (FC 43)


def frame_length(head):
    """Total ADU length of a response that starts with `head` (>= 3 bytes), or None when the
    bytes do not look like the start of a response (unknown function code)."""
    n = _pdu.response_pdu_length(head[1:3])
    return None if n is None else n + OVERHEAD


def _check_frame(adu, unit, function, expected_length):
    """Checks common to every response, in the fixed order: length, CRC, unit, exception bit,
    function code. Returns normally only for a normal response of the right function."""
    n = len(adu)
    if expected_length is not None and n != expected_length and n != EXCEPTION_ADU_LENGTH:
        raise FrameError("wrong response length", expected=f"{expected_length} bytes", got=bytes(adu))
    if crc16(adu):
        want = crc16(adu[:-2])
        raise CRCError("CRC mismatch (received %s)" % bytes(adu[-2:]).hex(" "),
                       expected="CRC %02x %02x" % (want & 0xFF, want >> 8), got=bytes(adu))
    if adu[0] != unit:
        raise FrameError("response from the wrong unit", expected=f"unit {unit}", got=bytes(adu))
    _pdu.check_function(adu, 1, function, EXCEPTION_ADU_LENGTH, unit)


def decode_read(adu, unit, function, count):
    """Check a read response (FC 01-04) and return its data bytes."""
    expected = read_response_length(function, count)
    _check_frame(adu, unit, function, expected)
    if len(adu) != expected or adu[2] != expected - 5:
        raise FrameError("wrong byte count", expected=f"byte count {expected - 5}", got=bytes(adu))
    return adu[3:-2]


def decode_response(adu, unit, fn, address, count, value=None):
    """Check any response against its request's `pdu.Function` and return the parsed data."""
    expected = response_length(fn, count)
    _check_frame(adu, unit, fn.code, expected)
    return fn.parse(adu[1:-2], address, count, value)


# --- timing (2.5.1.1) ------------------------------------------------------------------------

def char_bits(bytesize=8, parity="N", stopbits=1):
    """Bits per character on the line: start bit, data bits, parity bit if any, stop bits."""
    return 1 + bytesize + (parity != "N") + stopbits


def char_time(baud, bytesize=8, parity="N", stopbits=1):
    """Seconds to move one character."""
    return char_bits(bytesize, parity, stopbits) / float(baud)


def silent_interval(baudrate, bits_per_char=11):
    """The silence that frames a message: 3.5 character times, fixed at 1.75 ms above 19200 baud."""
    if baudrate > FIXED_TIMING_BAUD:
        return FIXED_SILENCE
    return 3.5 * bits_per_char / baudrate


def frame_gap(baud, bytesize=8, parity="N", stopbits=1):
    """`silent_interval` of a line given by its settings."""
    return silent_interval(baud, char_bits(bytesize, parity, stopbits))
