"""Modbus ASCII clients: ASCII frames (`ascii.py`) over a byte link (`links.py`).

    AsciiClient          Modbus ASCII on a serial line (pyserial); 7E1 by default, as the spec says
    AsciiOverTcpClient   ASCII frames on a socket (serial-to-Ethernet gateways in transparent mode)

Reading an answer (Serial Line v1.02, 2.5.2.1): characters before a ':' are noise and skipped; a
':' starts a frame and a second ':' restarts it (what came before is dropped); CR LF ends it.
Within a frame no gap between characters may exceed the inter-character timeout (`char_timeout`,
1 s by default: the spec's "up to one second"): a longer one ends the frame as truncated
(FrameError). One deadline per request bounds everything: `timeout` for the answer to start, plus
the time its characters take on the line, so a peer that dribbles cannot stretch a request.

An ASCII frame carries no transaction id either, but it is self-delimiting: a whole frame of
another unit or function (a late answer, another master) is skipped as stale, and input waiting
before a request is dropped unread. Blind spot as for RTU (`rtu_client._RtuBase`): a late answer
of the same unit and function arriving after the next request went out is taken as its answer.
"""
import time

from agent.modbus import ascii as _ascii
from agent.modbus import pdu as _pdu
from agent.modbus.base import RTU_TURNAROUND, TCP_ALLOWANCE, Client
from agent.modbus.errors import ConnectionLost, CRCError, FrameError, InvalidRequest, ModbusTimeout
from agent.modbus.keys import (
    CONNECT_TIMEOUT,
    LINK_KEYS,
    SERIAL_PORT,
    SOCKET_KEYS,
    Key,
    timeout_key,
)
from agent.modbus.links import RECV_SIZE, SerialLink, SocketLink, open_serial, open_tcp
from agent.modbus.rtu import char_time

_monotonic = time.monotonic
_COLON = 0x3A
_LF = 0x0A

#: the serial line of an ASCII bus: 7 data bits, even parity by default (Serial Line 2.5.2)
ASCII_LINE_KEYS = (Key("baud", "int", 9600, positive=True),
                   Key("parity", "choice", "E", choices=("N", "E", "O")),
                   Key("bytesize", "int", 7, bounds=(7, 8)),
                   Key("stopbits", "int", 1, bounds=(1, 2)))
CHAR_TIMEOUT_KEY = Key("char_timeout", "duration", _ascii.CHAR_TIMEOUT, positive=True)


class _AsciiBase(Client):
    """ASCII framing over a byte link; subclasses provide the link."""

    SERIAL = True
    #: bus-time allowance per request on top of the serial time (the gateway's socket)
    LINK_ALLOWANCE = 0.0
    _char_time = 0.0

    @classmethod
    def bus_time(cls, settings, reads):
        """Serial time: two characters per byte plus ':' CR LF, at the line's character time,
        plus RTU_TURNAROUND and the pause (ASCII needs no silence between frames)."""
        t = char_time(settings.baud, settings.bytesize, settings.parity, settings.stopbits)
        return cls._bus_time(reads, _ascii.READ_REQUEST_CHARS, _ascii.read_response_chars, t,
                             RTU_TURNAROUND + cls.LINK_ALLOWANCE + settings.pause)

    @classmethod
    def describe(cls, s):
        return "%s %s %d %d%s%d" % (cls.TYPE, cls._where_of(s), s.baud, s.bytesize, s.parity,
                                    s.stopbits)

    def __init__(self, timeout, pause, backoff_min, backoff_max, char_timeout):
        super().__init__(timeout, pause, backoff_min, backoff_max)
        self.char_timeout = float(char_timeout)
        self._link = None

    def _close(self):
        link, self._link = self._link, None
        if link is not None:
            link.close()

    def _read(self, unit, function, address, count):
        if unit == 0:
            raise InvalidRequest("unit 0 is the broadcast address: no device answers a read")
        request = _ascii.build_adu(unit, _pdu.FUNCTIONS[function].build(address, count))
        frame = self._transact(request, unit, function,
                               _ascii.read_response_chars(function, count))
        return _ascii.decode_read(frame, unit, function, count)

    def _exchange_pdu(self, unit, fn, request_pdu, address, count, value):
        request = _ascii.build_adu(unit, request_pdu)
        if unit == 0:
            self._transact(request, 0, fn.code, 0)
            return None
        frame = self._transact(request, unit, fn.code, _ascii.response_chars(fn, count))
        return _ascii.decode_response(frame, unit, fn, address, count, value)

    def _transact(self, request, unit, function, expected):
        """Send `request`; return the answer frame of (unit, function) (unit 0: none)."""
        if self._link is None:
            self._open()
        try:
            try:
                if self.pause:
                    self._wait_gap(self.pause)
                self._link.drop_input()     # late answers and noise must not be read as ours
            except ConnectionLost:
                self._close()               # the peer closed the idle link: reopen once
                self._open()
                self._link.drop_input()
            self._link.write(request)
            if unit == 0:
                return None
            chars = expected or _ascii.MAX_CHARS
            deadline = _monotonic() + self.timeout + self._char_time * (chars + len(request))
            frame = self._receive(unit, function, deadline)
        except ConnectionLost:
            self._lost()
            raise
        except ModbusTimeout:
            self._timed_out()
            raise
        finally:
            self._last_end = _monotonic()
        self._failures = 0
        self._timeouts = 0
        return frame

    def _receive(self, unit, function, deadline):
        """The next whole frame of `unit` answering `function` (or its exception), before
        `deadline`; whole frames of others are skipped as stale, noise outside frames too."""
        link = self._link
        buf = b""           # the frame being read, from its ':'
        noise = b""         # characters outside any frame
        stale = None
        last = None         # monotonic time of the frame's last character
        while True:
            now = _monotonic()
            wait = deadline - now
            if last is not None:
                wait = min(wait, last + self.char_timeout - now)
            chunk = link.read_some(RECV_SIZE, wait) if wait > 0 else b""
            if not chunk:
                if buf and last is not None and _monotonic() - last >= self.char_timeout \
                        and _monotonic() < deadline:
                    raise FrameError("truncated response: no character for %g s (inter-character "
                                     "timeout)" % self.char_timeout, expected="... 0d 0a", got=buf)
                if buf:
                    raise FrameError("truncated response", expected="... 0d 0a", got=buf)
                if noise:
                    raise FrameError("unexpected characters instead of a response",
                                     expected=f"':' starting unit {unit} fc {function:02d}",
                                     got=noise)
                if stale is not None:
                    raise FrameError("no answer, only a frame for another request",
                                     expected=f"unit {unit} fc {function:02d}", got=stale)
                raise ModbusTimeout(f"no response within {self.timeout:g} s")
            last = _monotonic()
            for c in chunk:
                if c == _COLON:
                    if buf:
                        noise += buf        # a ':' restarts the frame (2.5.2.1)
                    buf = b":"
                elif not buf:
                    noise += bytes((c,))
                else:
                    buf += bytes((c,))
                    if c == _LF:
                        frame, buf = buf, b""
                        if self._ours(frame, unit, function):
                            return frame
                        stale = frame
                    elif len(buf) > _ascii.MAX_CHARS:
                        raise FrameError("ASCII frame longer than 513 characters",
                                         expected="CR LF", got=buf)
            if not buf:
                last = None         # between frames the answer's deadline alone applies

    def _ours(self, frame, unit, function):
        """Whether `frame` is the answer to (unit, function) by its header; a frame of others
        that checks out (LRC) is counted stale. A frame that does not decode is taken as ours,
        for the codec to report."""
        try:
            got_unit, pdu = _ascii.decode_frame(frame)
        except (FrameError, CRCError):
            return True
        if got_unit == unit and pdu and pdu[0] & 0x7F == function:
            return True
        self.stats["stale_discarded"] += 1
        return False


class AsciiClient(_AsciiBase):
    """Modbus ASCII master on a serial port (pyserial)."""

    TYPE = "ascii"
    KEYS = (SERIAL_PORT, timeout_key(1.0)) + LINK_KEYS + ASCII_LINE_KEYS + (CHAR_TIMEOUT_KEY,)

    @classmethod
    def from_settings(cls, s):
        return cls(s.port, baudrate=s.baud, parity=s.parity, bytesize=s.bytesize,
                   stopbits=s.stopbits, timeout=s.timeout, pause=s.pause,
                   backoff_max=s.backoff_max, char_timeout=s.char_timeout)

    @staticmethod
    def _where_of(s):
        return s.port

    def __init__(self, port, baudrate=9600, parity="E", bytesize=7, stopbits=1, timeout=1.0,
                 pause=0.0, backoff_max=60.0, backoff_min=0.5, char_timeout=_ascii.CHAR_TIMEOUT):
        super().__init__(timeout, pause, backoff_min, backoff_max, char_timeout)
        self.port = port
        self.baudrate = int(baudrate)
        self.parity = str(parity).upper()[:1]
        self.bytesize = int(bytesize)
        self.stopbits = stopbits
        self._char_time = char_time(self.baudrate, self.bytesize, self.parity, float(stopbits))

    def _where(self):
        return self.port

    def _connect(self):
        port = open_serial(self.port, self.baudrate, self.parity, self.bytesize, self.stopbits)
        self._link = SerialLink(port, self.port)


class AsciiOverTcpClient(_AsciiBase):
    """ASCII frames on a TCP socket (serial-to-Ethernet gateways in transparent mode)."""

    close_after_timeouts = 2

    TYPE = "ascii-over-tcp"
    KEYS = (SOCKET_KEYS + (timeout_key(1.0), CONNECT_TIMEOUT) + LINK_KEYS + ASCII_LINE_KEYS
            + (CHAR_TIMEOUT_KEY,))
    LINK_ALLOWANCE = TCP_ALLOWANCE

    @classmethod
    def from_settings(cls, s):
        return cls(s.host, port=s.port, timeout=s.timeout, connect_timeout=s.connect_timeout,
                   pause=s.pause, backoff_max=s.backoff_max, char_timeout=s.char_timeout)

    @staticmethod
    def _where_of(s):
        return "%s:%s" % (s.host, s.port)

    def __init__(self, host, port=502, timeout=1.0, connect_timeout=None, pause=0.0,
                 backoff_max=60.0, backoff_min=0.5, char_timeout=_ascii.CHAR_TIMEOUT):
        super().__init__(timeout, pause, backoff_min, backoff_max, char_timeout)
        self.host = host
        self.port = int(port)
        self.connect_timeout = float(connect_timeout) if connect_timeout else self.timeout

    def _where(self):
        return f"{self.host}:{self.port}"

    def _connect(self):
        sock = open_tcp(self.host, self.port, self.connect_timeout)
        sock.settimeout(None)  # blocking; select() bounds every wait
        self._link = SocketLink(sock, self._where())
