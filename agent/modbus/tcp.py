"""Modbus TCP framing: MBAP header + PDU (Modbus Messaging on TCP/IP v1.0b, section 3.1.3).

MBAP: transaction id (2), protocol id (2, always 0), length (2: unit id + PDU), unit id (1).
Pure functions; the socket handling is in `tcp_client.py`.
"""
import struct

from agent.modbus import pdu as _pdu
from agent.modbus.errors import FrameError

MBAP = struct.Struct(">HHHB")
MBAP_LENGTH = 7
#: MBAP + exception PDU (fc | 0x80, code)
EXCEPTION_ADU_LENGTH = MBAP_LENGTH + _pdu.EXCEPTION_PDU_LENGTH
#: largest legal length field: unit id + 253-byte PDU
MAX_LENGTH_FIELD = 254

_READ = struct.Struct(">HHHBBHH")
_READ_HEAD = struct.Struct(">HHHBBB")
#: a read request ADU: MBAP, function, address, count
READ_REQUEST_LENGTH = _READ.size


def build_adu(tid, unit, pdu):
    """MBAP header + PDU."""
    return MBAP.pack(tid, 0, len(pdu) + 1, unit) + pdu


def build_read(tid, unit, function, address, count):
    """Read request ADU (FC 01-04) in one pack; arguments already validated by the caller."""
    return _READ.pack(tid, 0, 6, unit, function, address, count)


def parse_header(head):
    """(transaction id, length field, unit) of an MBAP header, or FrameError when it cannot be
    one (protocol id not 0, length out of range): the stream is then out of sync."""
    tid, pid, length, unit = MBAP.unpack_from(head)
    if pid != 0 or not 2 <= length <= MAX_LENGTH_FIELD:
        raise FrameError("bad MBAP header (stream out of sync)",
                         expected="protocol id 0, length 2..254", got=bytes(head[:MBAP_LENGTH]))
    return tid, length, unit


#: read_response_length(function, count): length of the normal TCP response to a read
read_response_length = _pdu.read_length(MBAP_LENGTH + 2)


def response_length(fn, count):
    """Length of the normal TCP response to a request of `fn` (a `pdu.Function`) for `count`."""
    n = fn.response_length(count)
    return None if n is None else n + MBAP_LENGTH   # None: variable (FC 43)


def _check_frame(adu, tid, unit, function, expected_length):
    """Fixed order: length, transaction id, protocol id, length field, unit, exception bit,
    function code. Returns normally only for a normal response of the right function."""
    n = len(adu)
    if expected_length is not None and n != expected_length and n != EXCEPTION_ADU_LENGTH:
        raise FrameError("wrong response length", expected=f"{expected_length} bytes", got=bytes(adu))
    got_tid, pid, length, got_unit = MBAP.unpack_from(adu)
    if got_tid != tid:
        raise FrameError("wrong transaction id", expected=f"transaction id {tid}", got=bytes(adu))
    if pid != 0:
        raise FrameError("wrong protocol id", expected="protocol id 0", got=bytes(adu))
    if length != n - 6:
        raise FrameError("MBAP length does not match the frame", expected=f"length {n - 6}",
                         got=bytes(adu))
    if got_unit != unit:
        raise FrameError("response from the wrong unit", expected=f"unit {unit}", got=bytes(adu))
    _pdu.check_function(adu, MBAP_LENGTH, function, EXCEPTION_ADU_LENGTH, unit)


def decode_read(adu, tid, unit, function, count):
    """Check a read response (FC 01-04) and return its data bytes."""
    expected = read_response_length(function, count)
    # fast path: one unpack covers the checks of a well-formed answer
    if len(adu) == expected:
        got_tid, pid, length, got_unit, fc, nbytes = _READ_HEAD.unpack_from(adu)
        if (got_tid == tid and pid == 0 and length == expected - 6 and got_unit == unit
                and fc == function and nbytes == expected - 9):
            return adu[9:]
    _check_frame(adu, tid, unit, function, expected)
    # every other check passed, so only the byte count (or a short frame) can be wrong
    raise FrameError("wrong byte count", expected=f"byte count {expected - 9}", got=bytes(adu))


def decode_response(adu, tid, unit, fn, address, count, value=None):
    """Check any response against its request's `pdu.Function` and return the parsed data."""
    expected = response_length(fn, count)
    _check_frame(adu, tid, unit, fn.code, expected)
    return fn.parse(adu[7:], address, count, value)
