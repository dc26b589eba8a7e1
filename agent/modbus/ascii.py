"""Modbus ASCII framing (Modbus over Serial Line v1.02, section 2.5.2 and 6.2.1).

A frame is ':' (0x3A), the unit id and the PDU as hex pairs, the LRC as one hex pair, CR LF:

    :0103000A0001F1\\r\\n      unit 1, fc 03, address 10, count 1, LRC f1

LRC: the two's complement of the 8-bit sum of the frame's bytes (unit id and PDU, before the
hex encoding). Hex digits are sent upper case (the spec's "0-9, A-F") and read in either case.
Pure functions, bytes in and out; reading a frame off the line (the ':' that restarts a frame,
the inter-character timeout) is the client's job (`ascii_client.py`). A bad LRC is a
`CRCError` (the same "the line corrupted it" kind as RTU's CRC, counted with it), everything
else malformed a `FrameError`, both with a dump of the characters that arrived.
"""
import binascii

from agent.modbus import pdu as _pdu
from agent.modbus.errors import CRCError, FrameError

START = b":"
END = b"\r\n"
#: unit id + function code + LRC: the shortest frame's bytes (an exception answer has one more)
MIN_BYTES = 3
#: ':' + 2 x (unit + 253-byte PDU + LRC) + CR LF (2.5.2.1: "up to 513 characters")
MAX_CHARS = 1 + 2 * (1 + 253 + 1) + 2
#: a read request: ':' + 2 x (unit, fc, address 2, count 2, LRC) + CR LF
READ_REQUEST_CHARS = 1 + 2 * 7 + 2
#: the inter-character timeout's default (2.5.2.1: "intervals of up to one second can elapse
#: between characters within the message")
CHAR_TIMEOUT = 1.0
_HEX = frozenset(b"0123456789ABCDEFabcdef")


def lrc(data):
    """LRC of `data` (unit id + PDU): two's complement of the byte sum, mod 256 (6.2.1)."""
    return -sum(data) & 0xFF


def build_adu(unit, pdu):
    """The ASCII frame of `pdu` for `unit`, as bytes ready for the line."""
    body = bytes((unit,)) + bytes(pdu)
    return START + binascii.hexlify(body + bytes((lrc(body),))).upper() + END


def read_response_chars(function, count):
    """Characters in the normal answer to a read (FC 01-04) of `count`: ':', unit, fc, byte
    count, the data, LRC as hex pairs, CR LF."""
    return 2 * _pdu.read_data_length(function, count) + 1 + 2 * 4 + 2


def response_chars(fn, count):
    """Characters in the normal answer to a request of `fn` (a `pdu.Function`), None when the
    answer's length is variable (FC 43)."""
    n = fn.response_length(count)
    return None if n is None else 1 + 2 * (1 + n + 1) + 2


def decode_frame(frame):
    """One frame as read off the line (':' to CR LF) -> (unit, PDU bytes).

    Checks, in order: the ':' and CR LF, hex pairs only, at least unit + function + LRC, LRC."""
    frame = bytes(frame)
    if not frame.startswith(START):
        raise FrameError("ASCII frame does not start with ':'", expected="3a (':')", got=frame)
    if not frame.endswith(END):
        raise FrameError("ASCII frame does not end with CR LF", expected="... 0d 0a", got=frame)
    text = frame[1:-2]
    if len(text) % 2 or not _HEX.issuperset(text):
        raise FrameError("ASCII frame holds characters other than hex pairs",
                         expected="an even number of 0-9 A-F", got=frame)
    if len(text) < 2 * MIN_BYTES:
        raise FrameError("ASCII frame too short", expected=f"at least {2 * MIN_BYTES} hex digits",
                         got=frame)
    body = binascii.unhexlify(text)
    if lrc(body[:-1]) != body[-1]:
        raise CRCError("LRC mismatch (received %02X)" % body[-1],
                       expected="LRC %02X" % lrc(body[:-1]), got=frame)
    return body[0], body[1:-1]


def _check(frame, unit, function):
    """(PDU) of a frame for `unit` answering `function`; DeviceError for an exception answer."""
    got_unit, pdu = decode_frame(frame)
    if got_unit != unit:
        raise FrameError("response from the wrong unit", expected=f"unit {unit}", got=bytes(frame))
    # the exception check on the PDU: a 2-byte PDU (fc | 0x80, code) is the exception answer
    try:
        _pdu.check_function(pdu, 0, function, _pdu.EXCEPTION_PDU_LENGTH, unit)
    except FrameError as e:
        raise FrameError(e.message, expected=e.expected, got=bytes(frame)) from None
    return pdu


def decode_read(frame, unit, function, count):
    """Check a read answer (FC 01-04) frame and return its data bytes."""
    pdu = _check(frame, unit, function)
    expected = _pdu.read_data_length(function, count)
    if len(pdu) != 2 + expected or pdu[1] != expected:
        raise FrameError("wrong byte count", expected=f"byte count {expected}", got=bytes(frame))
    return pdu[2:]


def decode_response(frame, unit, fn, address, count, value=None):
    """Check any answer frame against its request's `pdu.Function`; the parsed data."""
    pdu = _check(frame, unit, fn.code)
    try:
        return fn.parse(pdu, address, count, value)
    except FrameError as e:
        raise FrameError(e.message, expected=e.expected, got=bytes(frame)) from None
