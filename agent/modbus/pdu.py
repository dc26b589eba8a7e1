"""Modbus PDUs: one table keyed by function code (Modbus Application Protocol v1.1b3, section 6).

Each `Function` holds what the rest of the codec needs for its code: how to build the request
PDU, how long the normal response PDU is (computed from the request), and how to parse and
check that response. Framing (RTU, MBAP) wraps these PDUs and lives in `rtu.py` / `tcp.py`.

Parsers return the response's data as on the wire: for reads the data bytes (registers 2*count
bytes big-endian, bits ceil(count/8) bytes LSB first), for writes None after checking the echo.
"""
import struct

from agent.modbus.errors import DeviceError, FrameError, InvalidRequest

READ_COILS = 1
READ_DISCRETE_INPUTS = 2
READ_HOLDING_REGISTERS = 3
READ_INPUT_REGISTERS = 4
WRITE_SINGLE_COIL = 5
WRITE_SINGLE_REGISTER = 6
WRITE_MULTIPLE_COILS = 15
WRITE_MULTIPLE_REGISTERS = 16

READ_FUNCTIONS = (1, 2, 3, 4)
#: an exception response PDU is function code | 0x80 and the exception code
EXCEPTION_PDU_LENGTH = 2

_ADDR_COUNT = struct.Struct(">BHH")       # fc, address, count (reads, FC05/06 echo, FC15/16 answers)
_MULTI_HEAD = struct.Struct(">BHHB")      # fc, address, count, byte count (FC15/16 requests)
COIL_ON = 0xFF00
COIL_OFF = 0x0000


def bit_bytes(count):
    """Bytes needed for `count` bits (section 6.1: ceil(count / 8))."""
    return (count + 7) >> 3


def pack_bits(values):
    """Coil values -> bytes, first value in the LSB of the first byte (section 6.11)."""
    out = bytearray(bit_bytes(len(values)))
    for i, v in enumerate(values):
        if v:
            out[i >> 3] |= 1 << (i & 7)
    return bytes(out)


def unpack_bits(data, count):
    """Bytes -> list of `count` bools (inverse of `pack_bits`)."""
    return [bool(data[i >> 3] >> (i & 7) & 1) for i in range(count)]


def _check_range(name, value, low, high):
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidRequest(f"{name} must be an integer in {low}..{high}, not {value!r}")


def check_address(address, count):
    _check_range("address", address, 0, 0xFFFF)
    if address + count > 0x10000:
        raise InvalidRequest(f"address {address} + count {count} runs past register 65535")


class Function:
    """One function code's request builder, expected response length and response parser."""

    def __init__(self, code, name, max_count, build, response_length, parse):
        self.code = code
        self.name = name
        #: spec limit on the quantity (section 6.x "Quantity of ...")
        self.max_count = max_count
        self._build = build
        self._response_length = response_length
        self._parse = parse

    def build(self, address, payload):
        """Request PDU; `payload` is the count (reads), a value (05/06) or a list of values (15/16)."""
        return self._build(self, address, payload)

    def response_length(self, count):
        """Length of the normal response PDU for a request of `count` items."""
        return self._response_length(count)

    def parse(self, pdu, address, count, value=None):
        """Check a response PDU (exception bit, function code, byte count / echo) and return its data.

        Raises DeviceError for an exception response, FrameError for anything malformed.
        """
        if not pdu:
            raise FrameError("empty PDU", expected=f"function code {self.code}", got=bytes(pdu))
        fc = pdu[0]
        if fc == self.code | 0x80:
            raise_exception(pdu)
        if fc != self.code:
            raise FrameError("unexpected function code", expected=f"{self.code:02d}",
                             got=bytes(pdu))
        return self._parse(self, pdu, address, count, value)

    def __repr__(self):
        return f"<Function {self.code:02d} {self.name}>"


def raise_exception(pdu):
    """Exception response PDU (fc | 0x80, code) -> DeviceError (section 7)."""
    if len(pdu) != EXCEPTION_PDU_LENGTH:
        raise FrameError("malformed exception response", expected="2-byte PDU", got=bytes(pdu))
    raise DeviceError(pdu[1], function=pdu[0] & 0x7F)


# --- reads (01, 02, 03, 04) ---------------------------------------------------------------

def _build_read(fn, address, count):
    _check_range("count", count, 1, fn.max_count)
    check_address(address, count)
    return _ADDR_COUNT.pack(fn.code, address, count)


def _bits_length(count):
    return 2 + bit_bytes(count)


def _registers_length(count):
    return 2 + 2 * count


def _parse_read(fn, pdu, address, count, value):
    expected = fn.response_length(count) - 2
    if len(pdu) < 2 or pdu[1] != expected or len(pdu) != 2 + expected:
        raise FrameError("wrong byte count", expected=f"byte count {expected}", got=bytes(pdu))
    return bytes(pdu[2:])


# --- single writes (05, 06): the response echoes the request --------------------------------

def _coil_word(value):
    if value is True or value == 1 or value == COIL_ON:
        return COIL_ON
    if value is False or value == 0:
        return COIL_OFF
    raise InvalidRequest(f"coil value must be true/false, not {value!r}")


def _build_write_coil(fn, address, value):
    check_address(address, 1)
    return _ADDR_COUNT.pack(fn.code, address, _coil_word(value))


def _build_write_register(fn, address, value):
    check_address(address, 1)
    _check_range("register value", value, 0, 0xFFFF)
    return _ADDR_COUNT.pack(fn.code, address, value)


def _echo_length(count):
    return 5


def _parse_echo(fn, pdu, address, count, value):
    if value is not None:
        word = _coil_word(value) if fn.code == WRITE_SINGLE_COIL else value
        expected = _ADDR_COUNT.pack(fn.code, address, word)
        if bytes(pdu) != expected:
            raise FrameError("response does not echo the request", expected=expected.hex(" "),
                             got=bytes(pdu))
    elif len(pdu) != 5:
        raise FrameError("wrong response length", expected="5-byte PDU", got=bytes(pdu))
    return None


# --- multiple writes (15, 16): the response repeats address and quantity --------------------

def _build_write_coils(fn, address, values):
    values = list(values)
    _check_range("coil count", len(values), 1, fn.max_count)
    check_address(address, len(values))
    data = pack_bits(values)
    return _MULTI_HEAD.pack(fn.code, address, len(values), len(data)) + data


def _build_write_registers(fn, address, values):
    values = list(values)
    _check_range("register count", len(values), 1, fn.max_count)
    check_address(address, len(values))
    for v in values:
        _check_range("register value", v, 0, 0xFFFF)
    return (_MULTI_HEAD.pack(fn.code, address, len(values), 2 * len(values))
            + struct.pack(">%dH" % len(values), *values))


def _parse_multi(fn, pdu, address, count, value):
    expected = _ADDR_COUNT.pack(fn.code, address, count)
    if bytes(pdu) != expected:
        raise FrameError("response does not repeat address and quantity",
                         expected=expected.hex(" "), got=bytes(pdu))
    return None


FUNCTIONS = {
    f.code: f for f in (
        Function(1, "read coils", 2000, _build_read, _bits_length, _parse_read),
        Function(2, "read discrete inputs", 2000, _build_read, _bits_length, _parse_read),
        Function(3, "read holding registers", 125, _build_read, _registers_length, _parse_read),
        Function(4, "read input registers", 125, _build_read, _registers_length, _parse_read),
        Function(5, "write single coil", 1, _build_write_coil, _echo_length, _parse_echo),
        Function(6, "write single register", 1, _build_write_register, _echo_length, _parse_echo),
        Function(15, "write multiple coils", 1968, _build_write_coils, _echo_length, _parse_multi),
        Function(16, "write multiple registers", 123, _build_write_registers, _echo_length, _parse_multi),
    )
}


def function(code):
    """The table entry for `code`; InvalidRequest for a code the codec does not speak."""
    try:
        return FUNCTIONS[code]
    except (KeyError, TypeError):
        raise InvalidRequest(f"unsupported function code {code!r}") from None


def response_pdu_length(pdu):
    """Length of the response PDU whose first bytes are `pdu` (at least 2 needed), or None if
    those bytes do not start a response this codec knows. Used to cut frames out of an RTU
    byte stream, where nothing but the function code tells the length."""
    fc = pdu[0]
    if fc & 0x80:
        return EXCEPTION_PDU_LENGTH if (fc & 0x7F) in FUNCTIONS else None
    if fc in (1, 2, 3, 4):
        return 2 + pdu[1]
    if fc in (5, 6, 15, 16):
        return 5
    return None
