"""Modbus PDUs: one table keyed by function code (Modbus Application Protocol v1.1b3, section 6).

Each `Function` holds what the rest of the codec needs for its code: how to build the request
PDU, how long the normal response PDU is (computed from the request), and how to parse and
check that response. Framing (RTU, MBAP) wraps these PDUs and lives in `rtu.py` / `tcp.py`.

This module is the one source of the protocol's numbers: the read limits (`MAX_REGISTERS`,
`MAX_BITS`, `READ_MAX`), which codes are reads (`READ_FUNCTIONS`), the data length of a read
answer (`read_data_length`), and the function-code / exception-response check every response
gets (`check_function`). The framings, the clients, the planner and the config import them.

Parsers return the response's data as on the wire: for reads the data bytes (registers 2*count
bytes big-endian, bits ceil(count/8) bytes LSB first), for writes None after checking the echo,
for FC 43 / MEI 14 (read device identification, section 6.21) an `Identification` of one answer.
Its answer is the one of variable length: `response_length` is None and the framings find its
end from the bytes themselves (`identification_length`).
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
#: FC 43, MEI type 14: read device identification (section 6.21)
ENCAPSULATED_INTERFACE = 43
MEI_DEVICE_IDENTIFICATION = 0x0E
#: read device id codes: 1 basic, 2 regular, 3 extended (stream access), 4 one specific object
READ_BASIC, READ_REGULAR, READ_EXTENDED, READ_SPECIFIC = 1, 2, 3, 4
#: the objects of the basic (0-2) and regular (3-6) categories, by object id (table 6.21)
OBJECT_NAMES = {0: "vendor_name", 1: "product_code", 2: "revision", 3: "vendor_url",
                4: "product_name", 5: "model_name", 6: "user_application_name"}
#: "more follows": 0xFF when the objects did not fit in one answer (ask again from next id)
MORE_FOLLOWS = 0xFF
#: fc, MEI type, read code, conformity level, more follows, next object id, number of objects
IDENT_HEAD_LENGTH = 7

#: the reads (FC 01-04); their answers carry a byte count and data (sections 6.1-6.4)
READ_FUNCTIONS = frozenset((READ_COILS, READ_DISCRETE_INPUTS, READ_HOLDING_REGISTERS,
                            READ_INPUT_REGISTERS))
#: spec quantity limits per read: registers for FC 03/04, bits for FC 01/02
MAX_REGISTERS = 125
MAX_BITS = 2000
#: an exception response PDU is function code | 0x80 and the exception code (section 7)
EXCEPTION_BIT = 0x80
EXCEPTION_PDU_LENGTH = 2
#: the normal answer to a write (05, 06, 15, 16): function code, address, value or quantity
WRITE_RESPONSE_LENGTH = 5

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


def read_length(framing):
    """The length of the normal answer to a read, as a function (function, count) -> bytes,
    for `framing` bytes around the data: 2 data bytes per register, ceil(count / 8) for bits
    (`function` one of FC 01-04, already checked). The one formula; each framing gets its own
    function so its hot path pays one call (rtu/tcp `read_response_length`)."""
    registers = READ_HOLDING_REGISTERS

    def length(function, count):
        return framing + (count << 1 if function >= registers else (count + 7) >> 3)
    return length


#: data bytes in the normal answer to a read of `count` items: read_data_length(function, count)
read_data_length = read_length(0)


def check_function(frame, at, function, exception_length, unit=None):
    """The function-code check every response gets, the one place it is made: `frame[at]`
    must be `function`. `function | 0x80` is an exception response and raises DeviceError
    (FrameError when `frame`, the PDU or the ADU that holds it, is not `exception_length`
    bytes long); any other code raises FrameError. Returns normally for a normal response."""
    fc = frame[at]
    if fc == function:
        return
    if fc == function | EXCEPTION_BIT:
        if len(frame) != exception_length:
            raise FrameError("malformed exception response", expected=f"{exception_length} bytes",
                             got=bytes(frame))
        raise DeviceError(frame[at + 1], unit=unit, function=function)
    raise FrameError("unexpected function code", expected=f"{function:02d}", got=bytes(frame))


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
        check_function(pdu, 0, self.code, EXCEPTION_PDU_LENGTH)
        return self._parse(self, pdu, address, count, value)

    def __repr__(self):
        return f"<Function {self.code:02d} {self.name}>"


# --- reads (01, 02, 03, 04) ---------------------------------------------------------------

def _build_read(fn, address, count):
    _check_range("count", count, 1, fn.max_count)
    check_address(address, count)
    return _ADDR_COUNT.pack(fn.code, address, count)


def _bits_length(count):
    return 2 + read_data_length(READ_COILS, count)


def _registers_length(count):
    return 2 + read_data_length(READ_HOLDING_REGISTERS, count)


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
    return WRITE_RESPONSE_LENGTH


def _parse_echo(fn, pdu, address, count, value):
    if value is not None:
        word = _coil_word(value) if fn.code == WRITE_SINGLE_COIL else value
        expected = _ADDR_COUNT.pack(fn.code, address, word)
        if bytes(pdu) != expected:
            raise FrameError("response does not echo the request", expected=expected.hex(" "),
                             got=bytes(pdu))
    elif len(pdu) != WRITE_RESPONSE_LENGTH:
        raise FrameError("wrong response length", expected=f"{WRITE_RESPONSE_LENGTH}-byte PDU",
                         got=bytes(pdu))
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


# --- read device identification (43 / MEI 14) -----------------------------------------------

class Identification:
    """One FC 43 / MEI 14 answer: `read_code`, `conformity` (the level the device claims:
    0x01 basic, 0x02 regular, 0x03 extended; +0x80 when it also answers single objects),
    `more` (the objects continue in another answer, from `next_id`) and `objects`
    [(object id, bytes)] in the order sent."""

    __slots__ = ("conformity", "more", "next_id", "objects", "read_code")

    def __init__(self, read_code, conformity, more, next_id, objects):
        self.read_code = read_code
        self.conformity = conformity
        self.more = more
        self.next_id = next_id
        self.objects = objects

    def __repr__(self):
        return "<Identification code %d conformity %#04x more %s next %d: %r>" % (
            self.read_code, self.conformity, self.more, self.next_id, self.objects)


def identification_length(pdu):
    """The length of the FC 43 / MEI 14 answer PDU that starts with `pdu`, as far as its bytes
    tell: fewer bytes than returned means read at least that many and ask again; a value equal
    to len(pdu) means the answer is complete. (Its objects carry their own lengths, one after
    the other; nothing else tells where the answer ends.)"""
    n = IDENT_HEAD_LENGTH
    if len(pdu) < n:
        return n
    for _ in range(pdu[6]):
        if len(pdu) < n + 2:
            return n + 2
        n += 2 + pdu[n + 1]
    return n


def _build_identify(fn, object_id, read_code):
    _check_range("read device id code", read_code, 1, 4)
    _check_range("object id", object_id, 0, 0xFF)
    return bytes((fn.code, MEI_DEVICE_IDENTIFICATION, read_code, object_id))


def _identify_length(count):
    return None     # variable: identification_length()


def _parse_identify(fn, pdu, object_id, count, read_code):
    pdu = bytes(pdu)
    if len(pdu) < IDENT_HEAD_LENGTH:
        raise FrameError("short device identification answer",
                         expected=f"at least {IDENT_HEAD_LENGTH} bytes", got=pdu)
    if pdu[1] != MEI_DEVICE_IDENTIFICATION:
        raise FrameError("wrong MEI type", expected="MEI type 14 (0e)", got=pdu)
    if read_code is not None and pdu[2] != read_code:
        raise FrameError("answer for another read device id code",
                         expected=f"read device id code {read_code}", got=pdu)
    if pdu[4] not in (0, MORE_FOLLOWS):
        raise FrameError("bad 'more follows' byte", expected="00 or ff", got=pdu)
    n = identification_length(pdu)
    if n != len(pdu):
        raise FrameError("device identification objects do not add up to the answer",
                         expected=f"{n} bytes by the object lengths", got=pdu)
    objects = []
    at = IDENT_HEAD_LENGTH
    for _ in range(pdu[6]):
        size = pdu[at + 1]
        objects.append((pdu[at], pdu[at + 2:at + 2 + size]))
        at += 2 + size
    return Identification(pdu[2], pdu[3], pdu[4] == MORE_FOLLOWS, pdu[5], objects)


def object_text(object_id, value):
    """An identification object as text: its name (OBJECT_NAMES, else "object_0x80") and its
    bytes as ASCII (the spec's type), other bytes escaped so a log line stays one line."""
    name = OBJECT_NAMES.get(object_id, "object_%#04x" % object_id)
    return name, bytes(value).decode("ascii", "backslashreplace")


FUNCTIONS = {
    f.code: f for f in (
        Function(1, "read coils", MAX_BITS, _build_read, _bits_length, _parse_read),
        Function(2, "read discrete inputs", MAX_BITS, _build_read, _bits_length, _parse_read),
        Function(3, "read holding registers", MAX_REGISTERS, _build_read, _registers_length, _parse_read),
        Function(4, "read input registers", MAX_REGISTERS, _build_read, _registers_length, _parse_read),
        Function(5, "write single coil", 1, _build_write_coil, _echo_length, _parse_echo),
        Function(6, "write single register", 1, _build_write_register, _echo_length, _parse_echo),
        Function(15, "write multiple coils", 1968, _build_write_coils, _echo_length, _parse_multi),
        Function(16, "write multiple registers", 123, _build_write_registers, _echo_length, _parse_multi),
        Function(43, "read device identification", 1, _build_identify, _identify_length,
                 _parse_identify),
    )
}
#: read function code -> its quantity limit (the clients' fast argument check)
READ_MAX = {code: FUNCTIONS[code].max_count for code in sorted(READ_FUNCTIONS)}


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
    if fc & EXCEPTION_BIT:
        return EXCEPTION_PDU_LENGTH if (fc & ~EXCEPTION_BIT) in FUNCTIONS else None
    if fc in READ_FUNCTIONS:
        return 2 + pdu[1]
    if fc == ENCAPSULATED_INTERFACE:
        return None     # variable and longer than 2 bytes tell (identification_length)
    return WRITE_RESPONSE_LENGTH if fc in FUNCTIONS else None
