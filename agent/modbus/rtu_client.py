"""RTU clients: RTU frames over a byte link (`links`), with the late-answer logic RTU needs.

    RtuClient          RTU on a serial line (pyserial), with 3.5-character silence and RS-485 echo
    RtuOverTcpClient   RTU frames on a socket, as serial-to-Ethernet gateways speak

The robustness rules they follow are listed in `agent.modbus.client`; how a late answer is
told from ours is in `_RtuBase`.
"""
import time

from agent.modbus import pdu as _pdu
from agent.modbus import rtu
from agent.modbus.base import RTU_TURNAROUND, TCP_ALLOWANCE, Client
from agent.modbus.errors import ConnectionLost, FrameError, InvalidRequest, ModbusTimeout
from agent.modbus.keys import (
    CONNECT_TIMEOUT,
    LINK_KEYS,
    SERIAL_LINE_KEYS,
    SERIAL_PORT,
    SOCKET_KEYS,
    Key,
    timeout_key,
)
from agent.modbus.links import RECV_SIZE, SerialLink, SocketLink, open_serial, open_tcp

_monotonic = time.monotonic

#: wait after an RTU broadcast before the next request (Serial Line v1.02 2.4.1: 100-200 ms)
BROADCAST_TURNAROUND = 0.1
#: RTU late-answer window after a timeout: this share of the timeout, kept within the bounds
#: below, plus the time the timed-out answer takes on the line (see `_RtuBase`)
LATE_WINDOW_SHARE = 0.25
LATE_WINDOW_MIN = 0.05      # USB-serial latency timers (FTDI: 16 ms) and gateways add this much
LATE_WINDOW_MAX = 0.25
#: the line counts as quiet after this long without a byte (plus the 3.5-character silence)
LATE_QUIET = 0.02
_READ_CODES = _pdu.READ_FUNCTIONS
_EXCEPTION_BIT = _pdu.EXCEPTION_BIT


class _RtuBase(Client):
    """RTU framing over a byte link; subclasses provide the link.

    RTU frames carry no transaction id, so a late answer to an earlier request can only be
    told from ours by its shape (unit, function code, length) or by when it arrives:
    - a frame of another unit or function, or a read answer whose byte count is not the one
      we asked for, is cut by its own length and, when its CRC holds, discarded as stale;
    - input that arrived before a request is dropped unread;
    - after a timeout (or a truncated answer) the next request first waits out a late-answer
      window, `late_window` seconds after the failure (default: a quarter of the timeout,
      0.05..0.25 s, plus the time the missing answer takes on the line), dropping whatever
      arrives, and extended while bytes keep coming until the line is quiet (bounded by the
      timeout).
    - the request right after such a failure, when it asks the failed one's question again
      (same unit, function code and answer length), listens one more window after its answer:
      a second whole answer of the same shape right behind it means the first was the late
      answer (a device still busy answers the old request when the new one arrives). A
      request to another unit, or of another shape, skips that window: a late answer of the
      failed request could never be taken for its answer.
    Blind spot: a late answer with the same unit, function code and byte count as the next
    answer (the same read again, or another read of the same size) that arrives after the
    next request went out, and more than a window before the real answer (or with no real
    answer behind it), is indistinguishable from the answer and is taken as it. A `timeout`
    that covers the device's slowest answer avoids it.
    """

    rs485_echo = False
    #: silence before a request (3.5 characters on a serial line; 0 on a socket)
    _silence = 0.0
    #: time to move one character (0 on a socket)
    _char_time = 0.0

    SERIAL = True
    #: bus-time allowance per request on top of the serial time (the gateway's socket)
    LINK_ALLOWANCE = 0.0

    @classmethod
    def bus_time(cls, settings, reads):
        """Serial time on the bus: request and response at the line's character time, each
        framed by the 3.5-character silence, plus RTU_TURNAROUND and the pause."""
        line = (settings.baud, settings.bytesize, settings.parity, settings.stopbits)
        per_request = 2 * rtu.frame_gap(*line) + RTU_TURNAROUND + cls.LINK_ALLOWANCE + settings.pause
        return cls._bus_time(reads, rtu.READ_REQUEST_LENGTH, rtu.read_response_length,
                             rtu.char_time(*line), per_request)

    def __init__(self, timeout, pause, backoff_min, backoff_max, late_window=None):
        super().__init__(timeout, pause, backoff_min, backoff_max)
        self._link = None
        #: seconds after a timeout in which a late answer is expected (None: from the timeout)
        self.late_window = late_window
        self._late_until = 0.0      # monotonic end of the pending late-answer window (0: none)
        #: (unit, function, expected length) of the request that just failed, None otherwise
        self._failed = None
        self._rest = b""            # bytes read past the last answer

    def _close(self):
        link, self._link = self._link, None
        if link is not None:
            link.close()

    def _read(self, unit, function, address, count):
        if unit == 0:
            raise InvalidRequest("unit 0 is the RTU broadcast address: no device answers a read")
        adu = self._transact(rtu.build_read(unit, function, address, count), unit, function,
                             rtu.read_response_length(function, count))
        return rtu.decode_read(adu, unit, function, count)

    def _exchange_pdu(self, unit, fn, request_pdu, address, count, value):
        if unit == 0:
            self._broadcast(rtu.build_adu(0, request_pdu))
            return None
        adu = self._transact(rtu.build_adu(unit, request_pdu), unit, fn.code,
                             rtu.response_length(fn, count))
        return rtu.decode_response(adu, unit, fn, address, count, value)

    def _transact(self, request, unit, function, expected):
        if self._link is None:
            self._open()
        # the exchange after a failed one: a late answer may still be on its way (see below).
        # Waiting it out protects any request (the failed device may still be sending: a
        # collision); listening past our answer only pays off when the late answer could be
        # taken for ours, i.e. for the same question again.
        failed, self._failed = self._failed, None
        repeat = failed == (unit, function, expected) and function in _READ_CODES
        try:
            try:
                if self._late_until:
                    self._drop_late_answer()
                gap = max(self.pause, self._silence)
                if gap:
                    self._wait_gap(gap)
                self._link.drop_input()  # stale bytes (late answers, noise) must not be read as the answer
            except ConnectionLost:
                # the peer closed the idle link (gateways do); nothing was sent yet: reopen once
                self._close()
                self._open()
                self._link.drop_input()
            self._link.write(request)
            deadline = _monotonic() + self.timeout + self._char_time * (
                (expected or rtu.MAX_ADU_LENGTH) + len(request))
            if self.rs485_echo:
                echo = self._read_exact(len(request), deadline, b"", what="RS-485 echo")
                if echo != request:
                    raise FrameError("RS-485 echo does not match the request",
                                     expected=request.hex(" "), got=echo)
            adu = self._receive(unit, function, expected, deadline)
            if repeat and len(adu) == expected:
                adu = self._second_answer(adu, unit, function, expected)
        except ConnectionLost:
            self._lost()
            raise
        except (ModbusTimeout, FrameError) as e:
            # no (whole) answer: the rest of it may still come; keep it from the next request
            self._late_until = _monotonic() + self._late_window(expected)
            self._failed = (unit, function, expected)
            if isinstance(e, ModbusTimeout):
                self._timed_out()
            raise
        finally:
            self._last_end = _monotonic()
        self._failures = 0
        self._timeouts = 0
        return adu

    def _late_window(self, expected):
        if self.late_window is not None:
            return float(self.late_window)
        share = min(max(self.timeout * LATE_WINDOW_SHARE, LATE_WINDOW_MIN), LATE_WINDOW_MAX)
        return share + self._silence + self._char_time * (expected or rtu.MAX_ADU_LENGTH)

    def _second_answer(self, adu, unit, function, expected):
        """The failed read asked again: a device still busy with the failed request may
        answer it only when our request arrives, and ours right behind. Listen one more
        late-answer window; a second whole answer of the same shape means the first was the
        late one. (Only here: it costs that window once per failure, and only for a request
        whose answer a late one could be taken for.)"""
        if rtu.crc16(adu):
            return adu      # the codec reports it
        more = self._rest
        if len(more) < expected:
            more += self._read_upto(expected - len(more), _monotonic() + self._late_window(expected))
        if len(more) >= expected and more[0] == unit and more[1] == function \
                and rtu.crc16(more[:expected]) == 0:
            self.stats["stale_discarded"] += 1
            return more[:expected]
        return adu

    def _drop_late_answer(self):
        """Wait until the late-answer window ends and the line is quiet, dropping what arrives."""
        link = self._link
        until, self._late_until = self._late_until, 0.0
        limit = until + self.timeout    # a busy line (another master) cannot hold us longer
        quiet = LATE_QUIET + self._silence
        dropped = False
        while True:
            now = _monotonic()
            remaining = min(until, limit) - now
            if remaining <= 0:
                break
            if link.read_some(RECV_SIZE, remaining):
                dropped = True
                self._last_end = now = _monotonic()  # the 3.5-character silence counts from here
                until = max(until, now + quiet)
        if dropped:
            self.stats["stale_discarded"] += 1

    def _broadcast(self, request):
        """Unit 0 (Serial Line 2.1): every device executes the write, none answers. The next
        request waits the turnaround delay so the devices are done."""
        if self._link is None:
            self._open()
        try:
            gap = max(self.pause, self._silence)
            if gap:
                self._wait_gap(gap)
            self._link.drop_input()
            self._link.write(request)
        except ConnectionLost:
            self._lost()
            raise
        finally:
            self._last_end = _monotonic() + BROADCAST_TURNAROUND

    def _receive(self, unit, function, expected, deadline):
        """The response frame for (unit, function).

        Complete frames for other requests (a late answer, another master's traffic, a read
        answer of this unit and function with another byte count) are skipped; bytes that start
        no valid frame (line noise, a bias glitch before the answer) are skipped one at a time
        until a frame starts. Either way the wait ends at `deadline`.
        """
        buf = b""
        skipped = b""       # noise bytes dropped while hunting for a frame start
        stale = None        # the last complete frame that answered something else
        byte_count = expected - rtu.OVERHEAD - 2 if function in _READ_CODES else None
        while True:
            if len(buf) < rtu.EXCEPTION_ADU_LENGTH:
                try:
                    buf += self._read_exact(rtu.EXCEPTION_ADU_LENGTH - len(buf), deadline, buf)
                except (ModbusTimeout, FrameError) as e:
                    if skipped:
                        got = e.got if isinstance(e.got, bytes) else buf
                        raise FrameError("unexpected bytes instead of a response",
                                         expected=f"unit {unit} fc {function:02d}",
                                         got=skipped + got) from None
                    if stale is not None and not buf:
                        if stale[0] == unit and stale[1] == function:
                            raise FrameError(
                                "no answer of the expected size, only one with byte count %d "
                                "(a late answer to an earlier read, or the device answers "
                                "another count)" % stale[2],
                                expected=f"byte count {byte_count}", got=stale) from None
                        raise FrameError("no answer, only a frame for another request",
                                         expected=f"unit {unit} fc {function:02d}", got=stale) from None
                    raise
            if buf[0] == unit and (buf[1] == function or buf[1] == function | _EXCEPTION_BIT):
                if buf[1] & _EXCEPTION_BIT:
                    n = rtu.EXCEPTION_ADU_LENGTH
                else:
                    n = expected
                    if byte_count is not None and buf[2] != byte_count:
                        # a read answer of another size: a late answer to an earlier read of
                        # this unit if it is a whole frame by its own byte count
                        buf, whole = self._whole_frame(buf, buf[2] + rtu.OVERHEAD + 2, deadline)
                        if whole:
                            stale, buf = buf[:whole], buf[whole:]
                            continue
                if n is None:
                    buf, n = self._variable_length(buf, deadline)
                if len(buf) < n:
                    buf += self._read_exact(n - len(buf), deadline, buf)
                # ours by its header; the codec checks length, CRC and the rest
                self._rest = buf[n:]
                return buf[:n]
            # not ours: cut a whole frame by its own length if it is one
            n = rtu.frame_length(buf)
            if n is not None and n <= rtu.MAX_ADU_LENGTH:
                buf, whole = self._whole_frame(buf, n, deadline)
                if whole:
                    stale, buf = buf[:whole], buf[whole:]
                    continue
            skipped += buf[:1]
            buf = buf[1:]

    def _variable_length(self, buf, deadline):
        """(buf, ADU length) of an answer whose PDU tells its own length as it goes (FC 43: its
        objects one after the other, pdu.identification_length), reading as far as needed."""
        while True:
            n = _pdu.identification_length(buf[1:]) + rtu.OVERHEAD
            if n > rtu.MAX_ADU_LENGTH:
                raise FrameError("answer longer than an RTU frame by its object lengths",
                                 expected=f"at most {rtu.MAX_ADU_LENGTH} bytes", got=buf)
            if len(buf) >= n:
                return buf, n
            buf += self._read_exact(n - len(buf), deadline, buf)

    def _whole_frame(self, buf, n, deadline):
        """(buf, n) when the first `n` bytes of `buf` are a frame whose CRC holds, counted as
        stale; else (buf, 0). A real frame arrives in one burst, so more bytes are waited for
        only as long as they take on the line."""
        if len(buf) < n:
            burst = min(deadline, _monotonic() + 0.02 + 2 * self._char_time * n)
            buf += self._read_upto(n - len(buf), burst)
        if len(buf) >= n and rtu.crc16(buf[:n]) == 0:
            self.stats["stale_discarded"] += 1
            return buf, n
        return buf, 0

    def _read_upto(self, n, deadline):
        """Up to `n` bytes, whatever arrives before `deadline`."""
        link = self._link
        buf = b""
        while len(buf) < n:
            remaining = deadline - _monotonic()
            chunk = link.read_some(n - len(buf), remaining) if remaining > 0 else b""
            if not chunk:
                break
            buf += chunk
        return buf

    def _read_exact(self, n, deadline, prefix, what="response"):
        """`n` bytes before `deadline`; FrameError when only some came (after `prefix`, the
        bytes of this frame read before), ModbusTimeout when none did."""
        buf = self._read_upto(n, deadline)
        if len(buf) < n:
            got = prefix + buf
            if got:
                raise FrameError(f"truncated {what}", expected=f"{len(prefix) + n} bytes", got=got)
            raise ModbusTimeout(f"no {what} within {self.timeout:g} s")
        return buf


class RtuClient(_RtuBase):
    """RTU master on a serial port (pyserial)."""

    TYPE = "rtu"
    KEYS = ((SERIAL_PORT, timeout_key(0.5)) + LINK_KEYS + SERIAL_LINE_KEYS
            + (Key("rs485_echo", "bool", False),))

    @classmethod
    def from_settings(cls, s):
        return cls(s.port, baudrate=s.baud, parity=s.parity, bytesize=s.bytesize,
                   stopbits=s.stopbits, timeout=s.timeout, pause=s.pause,
                   rs485_echo=s.rs485_echo, backoff_max=s.backoff_max)

    @classmethod
    def describe(cls, s):
        return "rtu %s %d %d%s%d" % (s.port, s.baud, s.bytesize, s.parity, s.stopbits)

    def __init__(self, port, baudrate=9600, parity="N", bytesize=8, stopbits=1, timeout=0.5,
                 pause=0.0, rs485_echo=False, backoff_max=60.0, backoff_min=0.5, late_window=None):
        super().__init__(timeout, pause, backoff_min, backoff_max, late_window)
        self.port = port
        self.baudrate = int(baudrate)
        self.parity = str(parity).upper()[:1]
        self.bytesize = int(bytesize)
        self.stopbits = stopbits
        self.rs485_echo = bool(rs485_echo)
        line = (self.baudrate, self.bytesize, self.parity, float(stopbits))
        self._char_time = rtu.char_time(*line)
        self._silence = rtu.frame_gap(*line)

    def _where(self):
        return self.port

    def _connect(self):
        port = open_serial(self.port, self.baudrate, self.parity, self.bytesize, self.stopbits)
        self._link = SerialLink(port, self.port)


class RtuOverTcpClient(_RtuBase):
    """RTU frames on a TCP socket (serial-to-Ethernet gateways in transparent mode)."""

    close_after_timeouts = 2

    TYPE = "rtu-over-tcp"
    KEYS = SOCKET_KEYS + (timeout_key(1.0), CONNECT_TIMEOUT) + LINK_KEYS + SERIAL_LINE_KEYS
    LINK_ALLOWANCE = TCP_ALLOWANCE

    @classmethod
    def from_settings(cls, settings):
        return cls._on_socket(settings)

    def __init__(self, host, port=502, timeout=1.0, connect_timeout=None, pause=0.0,
                 backoff_max=60.0, backoff_min=0.5, late_window=None):
        super().__init__(timeout, pause, backoff_min, backoff_max, late_window)
        self.host = host
        self.port = int(port)
        self.connect_timeout = float(connect_timeout) if connect_timeout else self.timeout

    def _where(self):
        return f"{self.host}:{self.port}"

    def _connect(self):
        sock = open_tcp(self.host, self.port, self.connect_timeout)
        sock.settimeout(None)  # blocking; select() bounds every wait
        self._link = SocketLink(sock, self._where())
