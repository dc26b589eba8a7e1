"""One exception tree for the codec and transports, split by who detected the problem.

    ModbusError
    ├── DeviceError            the device answered with an exception response (it detected it)
    └── AgentError             we detected it
        ├── ModbusTimeout      no (complete) answer in time
        ├── CRCError           RTU frame whose CRC does not match
        ├── FrameError         malformed or unexpected frame: length, unit, function, byte count, MBAP
        └── ConnectionLost     the link failed: refused, reset, closed, serial port gone

Every message names unit id, function code, address and count when known, and shows
expected vs got with a hex dump of what arrived.
"""

# Modbus Application Protocol v1.1b3, section 7: exception codes.
EXCEPTION_NAMES = {
    1: "ILLEGAL FUNCTION",
    2: "ILLEGAL DATA ADDRESS",
    3: "ILLEGAL DATA VALUE",
    4: "SERVER DEVICE FAILURE",
    5: "ACKNOWLEDGE",
    6: "SERVER DEVICE BUSY",
    8: "MEMORY PARITY ERROR",
    10: "GATEWAY PATH UNAVAILABLE",
    11: "GATEWAY TARGET DEVICE FAILED TO RESPOND",
}


def hexdump(data, limit=64):
    """`01 03 02 00 2a` style dump, cut after `limit` bytes with the total length."""
    data = bytes(data)
    text = data[:limit].hex(" ")
    if len(data) > limit:
        text += f" ... ({len(data)} bytes)"
    return text or "(nothing)"


class ModbusError(Exception):
    """Base of every codec/transport error. Keeps the request context for logs."""

    kind = "modbus"
    #: whether the same request may succeed if sent again soon
    retryable = False

    def __init__(self, message, *, unit=None, function=None, address=None, count=None,
                 expected=None, got=None):
        self.message = message
        self.unit = unit
        self.function = function
        self.address = address
        self.count = count
        self.expected = expected
        self.got = got
        super().__init__(self.describe())

    def context(self):
        parts = []
        if self.unit is not None:
            parts.append(f"unit {self.unit}")
        if self.function is not None:
            parts.append(f"fc {self.function:02d}")
        if self.address is not None:
            parts.append(f"address {self.address}")
        if self.count is not None:
            parts.append(f"count {self.count}")
        return " ".join(parts)

    def describe(self):
        text = self.message
        ctx = self.context()
        if ctx:
            text = f"{ctx}: {text}"
        if self.expected is not None:
            text += f"; expected {self.expected}"
        if self.got is not None:
            got = self.got
            text += f"; got {hexdump(got) if isinstance(got, (bytes, bytearray, memoryview)) else got}"
        return text

    def with_context(self, *, unit=None, function=None, address=None, count=None):
        """Fill in request context a lower layer did not know; returns self for `raise`."""
        if self.unit is None:
            self.unit = unit
        if self.function is None:
            self.function = function
        if self.address is None:
            self.address = address
        if self.count is None:
            self.count = count
        self.args = (self.describe(),)
        return self

    def as_record(self):
        """The `error` object of a failed-read record."""
        out = {"kind": self.kind, "message": self.describe()}
        code = getattr(self, "code", None)
        if code is not None:
            out["code"] = code
        return out


class DeviceError(ModbusError):
    """The device answered with an exception response (function code | 0x80)."""

    kind = "exception"

    def __init__(self, code, **context):
        self.code = code
        self.name = EXCEPTION_NAMES.get(code, "UNKNOWN EXCEPTION")
        # 5 ACKNOWLEDGE and 6 BUSY mean "ask again later".
        self.retryable = code in (5, 6)
        super().__init__(f"exception code {code} {self.name}", **context)


class AgentError(ModbusError):
    """We (the agent) detected the problem, not the device."""

    kind = "agent"


class ModbusTimeout(AgentError):
    kind = "timeout"
    retryable = True


class CRCError(AgentError):
    kind = "crc"
    retryable = True


class FrameError(AgentError):
    kind = "frame"
    retryable = True


class ConnectionLost(AgentError):
    kind = "connection"
    retryable = True


class InvalidRequest(AgentError, ValueError):
    """The caller asked for something the protocol cannot express (count 0 or above the
    spec limit, address past 65535, unsupported function code). Nothing was sent."""

    kind = "agent"
