"""Modbus clients: the transports that move the codec's frames.

    TcpClient          Modbus TCP (MBAP) on a socket
    RtuClient          RTU on a serial line (pyserial), with 3.5-character silence and RS-485 echo
    RtuOverTcpClient   RTU frames on a socket, as serial-to-Ethernet gateways speak

All three connect lazily, raise only `agent.modbus.errors` types with unit, function code,
address and count filled in, and keep counters in `.stats` (uploaded as device health).

Robustness rules (each answers a known field problem):
- a stale reply (older transaction id, a late RTU answer to an earlier request) is discarded
  and reading goes on; it is never returned as the answer;
- a TCP stream that is out of sync (bad MBAP header, unknown transaction id) is closed and
  reopened, and the request sent once more on the fresh connection;
- after a lost connection, reconnects back off exponentially (one attempt per step, up to
  `backoff_max`); inside the window the call fails at once without touching the network
  (the agent's loop shortens that to `down_hold`: its device schedule owns the back-off);
  a connection the peer closed while idle is reopened once at once (gateways do that);
- one deadline per request (`timeout` from the send, covering every read and the resend after
  an out-of-sync stream), so a peer that dribbles bytes cannot stretch a request; a truncated
  TCP answer closes the link (its rest must not be read as the next answer);
- two timeouts in a row on a socket (Modbus TCP, RTU over TCP) close the connection (a
  half-open link only shows as silence); the next call opens a fresh one;
- RTU: a read answer of this unit and function with another byte count is a late answer and
  skipped; after a timeout the next request waits out a late-answer window first (see
  `_RtuBase` for it and for the blind spot that remains);
- RTU: the exception-sized prefix (5 bytes) is read first, so an exception reply never costs
  a timeout; stale input is dropped before sending; `pause` and the 3.5-character silence are
  kept between exchanges; noise before the answer is skipped byte by byte until a frame starts;
  with `rs485_echo` our own request, echoed by the adapter, is read and checked first;
  unit 0 is broadcast: writes get no answer, reads are refused.

Hot path (TCP read): one `struct` pack, one `sendall`, one `recv` that normally holds the
whole answer, one unpack to check it; no timeout syscalls unless the answer comes in pieces.
"""
import os
import select
import socket
import time

from agent.modbus import pdu as _pdu
from agent.modbus import rtu, tcp
from agent.modbus.errors import (
    ConnectionLost,
    CRCError,
    DeviceError,
    FrameError,
    InvalidRequest,
    ModbusError,
    ModbusTimeout,
)

try:
    import termios
    # pyserial lets termios.error (not an OSError) through from tcflush/tcdrain
    _SERIAL_ERRORS = (OSError, ValueError, termios.error)
except ImportError:  # pragma: no cover - not a POSIX host
    _SERIAL_ERRORS = (OSError, ValueError)

_monotonic = time.monotonic

STAT_KEYS = ("requests", "timeouts", "crc_errors", "frame_errors", "exceptions", "reconnects",
             "stale_discarded", "connection_errors", "resyncs")
_STAT_FOR = {
    ModbusTimeout: "timeouts",
    CRCError: "crc_errors",
    FrameError: "frame_errors",
    DeviceError: "exceptions",
    ConnectionLost: "connection_errors",
    InvalidRequest: None,
}
#: spec quantity limits of the reads, for the fast argument check in `read`
_READ_MAX = {1: 2000, 2: 2000, 3: 125, 4: 125}
#: a reply whose transaction id is at most this far behind the current one is a stale answer
_STALE_WINDOW = 64
_RECV_SIZE = 4096
#: wait after an RTU broadcast before the next request (Serial Line v1.02 2.4.1: 100-200 ms)
BROADCAST_TURNAROUND = 0.1
#: RTU late-answer window after a timeout: this share of the timeout, kept within the bounds
#: below, plus the time the timed-out answer takes on the line (see `_RtuBase`)
LATE_WINDOW_SHARE = 0.25
LATE_WINDOW_MIN = 0.05      # USB-serial latency timers (FTDI: 16 ms) and gateways add this much
LATE_WINDOW_MAX = 0.25
#: the line counts as quiet after this long without a byte (plus the 3.5-character silence)
LATE_QUIET = 0.02
_READ_CODES = frozenset((1, 2, 3, 4))



def _check_unit(unit):
    if not isinstance(unit, int) or not 0 <= unit <= 255:
        raise InvalidRequest(f"unit id must be 0..255, not {unit!r}")


def open_tcp(host, port, connect_timeout):
    """A TCP connection to a device or gateway, Nagle off (requests are small and answered at
    once); ConnectionLost naming host:port when it cannot be made."""
    try:
        sock = socket.create_connection((host, port), connect_timeout)
    except socket.timeout:
        raise ConnectionLost(f"connect to {host}:{port} timed out after {connect_timeout:g} s") from None
    except OSError as e:
        raise ConnectionLost(f"connect to {host}:{port} failed: {e.strerror or e}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock

class _OutOfSync(FrameError):
    """TCP stream no longer at a frame boundary: close, reopen, resend once."""


class _Client:
    """Request building, validation, stats, back-off; subclasses move the bytes."""

    #: consecutive timeouts after which the link is closed, to be reopened by the next call.
    #: On a socket a half-open link (gateway rebooted, NAT entry or Wi-Fi gone, no FIN) only
    #: shows as silence, and TCP itself gives up only after many minutes. None: never (a serial
    #: port, where reopening proves nothing).
    close_after_timeouts = None

    #: How long after a failed connect the next call fails at once, without touching the network.
    #: None (a script, `poll`, `probe`: no schedule of its own): the whole reconnect back-off
    #: window. The agent's loop sets a short hold instead (agent.loop.LINK_DOWN_HOLD): its device
    #: schedule (agent.schedule.DeviceSchedule) owns the only back-off of each device/connection
    #: pair and decides when a request goes out; two back-offs stacked refused the very probes the
    #: schedule had chosen ("backing off ..., next try in 0.0 s"). No hold at all made every
    #: device behind one dead gateway wait out its own connect timeout in the same sweep (ten
    #: units x 1 s froze the loop for 10 s): within the hold they learn the link is down at once.
    down_hold = None

    def __init__(self, timeout, pause, backoff_min, backoff_max):
        self.timeout = float(timeout)
        self.pause = float(pause or 0.0)
        self.backoff_min = float(backoff_min)
        self.backoff_max = float(backoff_max)
        self.stats = dict.fromkeys(STAT_KEYS, 0)
        self._failures = 0          # consecutive connection failures (drives the back-off)
        self._down_until = 0.0      # monotonic time before which we do not reconnect
        self._lost_at = 0.0         # monotonic time the link last failed
        self._connected_once = False
        self._last_end = 0.0        # monotonic end of the last exchange (pause, RTU silence)
        self._timeouts = 0          # consecutive timeouts (a half-open link shows as these)

    # --- public API ------------------------------------------------------------------------

    def read(self, unit, function, address, count):
        """FC 01-04: the response's data bytes as on the wire."""
        try:
            ok = (function in _READ_MAX and 0 < count <= _READ_MAX[function]
                  and address >= 0 and address + count <= 0x10000 and 0 <= unit <= 255)
        except TypeError:
            ok = False
        if not ok:
            self._invalid(unit, function, address, count)
        self.stats["requests"] += 1
        try:
            return self._read(unit, function, address, count)
        except ModbusError as e:
            self._count_failure(e, unit, function, address, count)
            raise

    def write_coil(self, unit, address, value):
        """FC 05."""
        return self._request(unit, _pdu.WRITE_SINGLE_COIL, address, value, 1, value)

    def write_register(self, unit, address, value):
        """FC 06."""
        return self._request(unit, _pdu.WRITE_SINGLE_REGISTER, address, value, 1, value)

    def write_coils(self, unit, address, values):
        """FC 15."""
        values = list(values)
        return self._request(unit, _pdu.WRITE_MULTIPLE_COILS, address, values, len(values))

    def write_registers(self, unit, address, values):
        """FC 16."""
        values = list(values)
        return self._request(unit, _pdu.WRITE_MULTIPLE_REGISTERS, address, values, len(values))

    def close(self):
        self._close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- shared machinery ----------------------------------------------------------------

    def _count_failure(self, e, unit, function, address, count):
        """Count a failed exchange in `stats` and give its error the request's context."""
        key = _STAT_FOR.get(type(e), "frame_errors")
        if key:
            self.stats[key] += 1
        e.with_context(unit=unit, function=function, address=address, count=count)

    def _invalid(self, unit, function, address, count):
        try:
            if function not in _READ_MAX:
                raise InvalidRequest(f"function code {function!r} is not a read (01-04)")
            _check_unit(unit)
            _pdu.function(function).build(address, count)
            raise InvalidRequest("invalid request")  # pragma: no cover - build raised
        except InvalidRequest as e:
            raise e.with_context(unit=unit, function=function, address=address, count=count) from None

    def _request(self, unit, code, address, payload, count, value=None):
        fn = _pdu.FUNCTIONS[code]
        try:
            _check_unit(unit)
            request_pdu = fn.build(address, payload)
        except InvalidRequest as e:
            raise e.with_context(unit=unit, function=code, address=address, count=count) from None
        self.stats["requests"] += 1
        try:
            return self._exchange_pdu(unit, fn, request_pdu, address, count, value)
        except ModbusError as e:
            self._count_failure(e, unit, code, address, count)
            raise

    def _open(self, connect_timeout=None):
        """Connect (lazily), honouring the back-off window (or only `down_hold` of it)."""
        now = _monotonic()
        if now < self._down_until:
            if self.down_hold is None:
                raise ConnectionLost("%s: backing off after %d failed attempt(s), next try in %.1f s"
                                     % (self._where(), self._failures, self._down_until - now))
            if now - self._lost_at < self.down_hold:
                raise ConnectionLost("%s: link down: a connect failed %.2f s ago"
                                     % (self._where(), now - self._lost_at))
        try:
            if connect_timeout is None:
                self._connect()
            else:
                self._connect(connect_timeout)
        except ConnectionLost:
            self._lost()
            raise
        if self._connected_once:
            self.stats["reconnects"] += 1
        self._connected_once = True

    def _lost(self):
        """The link failed: close it and open the next back-off window."""
        self._close()
        self._failures += 1
        delay = min(self.backoff_min * (2 ** min(self._failures - 1, 30)), self.backoff_max)
        self._lost_at = _monotonic()
        self._down_until = self._lost_at + delay

    def _timed_out(self):
        """Count a timeout; close the link after `close_after_timeouts` in a row."""
        self._timeouts += 1
        if self.close_after_timeouts and self._timeouts >= self.close_after_timeouts:
            # maybe a half-open link: the next call opens a fresh one (and needs as many
            # timeouts again before it is dropped, so a dead device is not a reconnect storm)
            self._timeouts = 0
            self._close()

    def _wait_gap(self, gap):
        wait = self._last_end + gap - _monotonic()
        if wait > 0:
            time.sleep(wait)


# === Modbus TCP ===============================================================================

class TcpClient(_Client):
    """Modbus TCP client (MBAP framing), one connection, one request in flight."""

    close_after_timeouts = 2

    def __init__(self, host, port=502, timeout=1.0, connect_timeout=None, pause=0.0,
                 backoff_max=60.0, backoff_min=0.5):
        super().__init__(timeout, pause, backoff_min, backoff_max)
        self.host = host
        self.port = int(port)
        self.connect_timeout = float(connect_timeout) if connect_timeout else self.timeout
        self._sock = None
        self._tid = 0

    def _where(self):
        return f"{self.host}:{self.port}"

    def _connect(self, connect_timeout=None):
        sock = open_tcp(self.host, self.port, connect_timeout or self.connect_timeout)
        sock.settimeout(self.timeout)
        self._sock = sock

    def _close(self):
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _read(self, unit, function, address, count):
        tid = self._tid = (self._tid + 1) & 0xFFFF
        adu = self._transact(tcp.build_read(tid, unit, function, address, count), tid,
                             tcp.read_response_length(function, count))
        return tcp.decode_read(adu, tid, unit, function, count)

    def _exchange_pdu(self, unit, fn, request_pdu, address, count, value):
        tid = self._tid = (self._tid + 1) & 0xFFFF
        adu = self._transact(tcp.build_adu(tid, unit, request_pdu), tid, fn.response_length(count) + 7)
        return tcp.decode_response(adu, tid, unit, fn, address, count, value)

    def _transact(self, request, tid, expected):
        """Send one request ADU, return the ADU that carries `tid` (checked further by the codec).

        One deadline per request: `timeout` from the moment it is sent, whatever the peer does
        (a byte just before the timeout, then garbage, cannot stretch it: every read waits only
        for what is left). The documented retries run inside the same deadline: the resend
        after an out-of-sync stream, on a fresh connection, gets the time that is left (none
        left: the frame error is raised), and so does the reconnect it needs. Only a first
        connect of the link, before the request is sent, has its own `connect_timeout`. So a
        request costs at most connect_timeout + timeout."""
        if self.pause:
            self._wait_gap(self.pause)
        fresh = self._sock is None
        if fresh:
            self._open()
        deadline = _monotonic() + self.timeout
        attempt = 0
        while True:
            attempt += 1
            got = []
            try:
                try:
                    self._sock.sendall(request)
                except OSError as e:
                    raise ConnectionLost(f"send to {self._where()} failed: {e.strerror or e}") from None
                adu = self._receive(tid, expected, got, deadline, attempt > 1)
                break
            except ConnectionLost:
                self._close()
                if attempt == 1 and not fresh and not got:
                    # the peer closed the idle connection before our request: reopen once now
                    fresh = True
                    self._reopen(deadline)
                    continue
                self._lost()
                raise
            except _OutOfSync:
                self._close()
                self.stats["resyncs"] += 1
                if attempt == 1 and deadline - _monotonic() > 0:
                    fresh = True
                    self._reopen(deadline)
                    continue
                raise
            except ModbusTimeout:
                self._timed_out()
                if self.pause:
                    self._last_end = _monotonic()
                raise
            except FrameError:
                # a truncated answer: its rest may still come and would be read as the start
                # of the next answer; a fresh connection starts at a frame boundary
                self._close()
                raise
        self._failures = 0
        self._timeouts = 0
        if self.pause:
            self._last_end = _monotonic()
        return adu

    def _reopen(self, deadline):
        """Reconnect for a resend inside the request's deadline (connect_timeout at most)."""
        left = deadline - _monotonic()
        if left <= 0:
            raise ModbusTimeout(f"no response within {self.timeout:g} s")
        self._open(min(self.connect_timeout, left))

    def _receive(self, tid, expected, got, deadline, resend=False):
        """Read frames until the one with `tid`; older ones are stale and skipped. Every read
        waits only until `deadline` (the request's)."""
        sock = self._sock
        if resend:
            # a resend has only what is left of the request's time, not a fresh timeout
            sock.settimeout(max(deadline - _monotonic(), 1e-3))
        try:
            buf = sock.recv(_RECV_SIZE)
        except socket.timeout:
            raise ModbusTimeout(f"no response within {self.timeout:g} s") from None
        except OSError as e:
            raise ConnectionLost(f"receive from {self._where()} failed: {e.strerror or e}") from None
        finally:
            if resend and self._sock is sock:
                sock.settimeout(self.timeout)
        if not buf:
            raise ConnectionLost(f"{self._where()} closed the connection")
        if len(buf) == expected and buf[0] << 8 | buf[1] == tid and not buf[2] and not buf[3]:
            return buf  # the usual case: the whole answer in one piece (the codec checks the rest)
        got.append(1)
        # answer in pieces, stale answers before it, or garbage: the rest within the deadline
        try:
            while True:
                while len(buf) < 7:
                    buf += self._recv(sock, deadline, buf, expected)
                rtid, length, _unit = self._header(buf)
                total = 6 + length
                while len(buf) < total:
                    buf += self._recv(sock, deadline, buf, total)
                if len(buf) == total:
                    adu, buf = buf, b""
                else:
                    # bytes past this frame: another frame or trailing garbage; anything left
                    # over when ours is found is dropped with the buffer
                    adu, buf = buf[:total], buf[total:]
                if rtid == tid:
                    return adu
                if 0 < (tid - rtid) & 0xFFFF <= _STALE_WINDOW:
                    self.stats["stale_discarded"] += 1
                    continue
                raise _OutOfSync("unknown transaction id (stream out of sync)",
                                 expected=f"transaction id {tid}", got=adu)
        finally:
            if self._sock is sock:
                sock.settimeout(self.timeout)

    @staticmethod
    def _header(buf):
        try:
            return tcp.parse_header(buf)
        except FrameError as e:
            raise _OutOfSync(e.message, expected=e.expected, got=buf) from None

    def _recv(self, sock, deadline, buf, expected):
        remaining = deadline - _monotonic()
        if remaining <= 0:
            if buf:
                raise FrameError("truncated response", expected=f"{expected} bytes", got=buf)
            raise ModbusTimeout(f"no response within {self.timeout:g} s")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(_RECV_SIZE)
        except socket.timeout:
            if buf:
                raise FrameError("truncated response", expected=f"{expected} bytes", got=buf) from None
            raise ModbusTimeout(f"no response within {self.timeout:g} s") from None
        except OSError as e:
            raise ConnectionLost(f"receive from {self._where()} failed: {e.strerror or e}",
                                 got=buf or None) from None
        if not chunk:
            raise ConnectionLost(f"{self._where()} closed the connection", got=buf or None)
        return chunk


# === RTU (serial and over TCP) ================================================================

class _RtuBase(_Client):
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
                             fn.response_length(count) + rtu.OVERHEAD)
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
            deadline = _monotonic() + self.timeout + self._char_time * (expected + len(request))
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
        return share + self._silence + self._char_time * expected

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
            if link.read_some(_RECV_SIZE, remaining):
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
            if buf[0] == unit and (buf[1] == function or buf[1] == function | 0x80):
                if buf[1] & 0x80:
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
        link = self._link
        buf = b""
        while len(buf) < n:
            remaining = deadline - _monotonic()
            chunk = link.read_some(n - len(buf), remaining) if remaining > 0 else b""
            if not chunk:
                got = prefix + buf
                if got:
                    raise FrameError(f"truncated {what}", expected=f"{len(prefix) + n} bytes", got=got)
                raise ModbusTimeout(f"no {what} within {self.timeout:g} s")
            buf += chunk
        return buf


class _FdLink:
    """Byte link on a file descriptor: select() for the timeout, then one read."""

    def __init__(self, fd, where):
        self.fd = fd
        self.where = where

    def read_some(self, n, timeout):
        try:
            ready = select.select((self.fd,), (), (), timeout)[0]
            if not ready:
                return b""
            data = self._read(n)
        except OSError as e:
            raise ConnectionLost(f"{self.where}: read failed: {e.strerror or e}") from None
        if not data:
            raise ConnectionLost(f"{self.where}: closed (read returned nothing)")
        return data

    def drop_input(self):
        try:
            while select.select((self.fd,), (), (), 0)[0]:
                if not self._read(_RECV_SIZE):
                    raise ConnectionLost(f"{self.where}: closed")
        except OSError as e:
            raise ConnectionLost(f"{self.where}: read failed: {e.strerror or e}") from None


class _SerialLink(_FdLink):
    def __init__(self, serial_port, where):
        super().__init__(serial_port.fileno(), where)
        self.port = serial_port

    def _read(self, n):
        return os.read(self.fd, n)

    def write(self, data):
        try:
            self.port.write(data)
            self.port.flush()  # tcdrain: the answer's timeout starts when the request is out
        except _SERIAL_ERRORS as e:
            raise ConnectionLost(f"{self.where}: write failed: {e}") from None

    def drop_input(self):
        try:
            self.port.reset_input_buffer()
        except _SERIAL_ERRORS as e:
            raise ConnectionLost(f"{self.where}: {e}") from None
        super().drop_input()

    def close(self):
        try:
            self.port.close()
        except _SERIAL_ERRORS:
            pass


class _SocketLink(_FdLink):
    def __init__(self, sock, where):
        super().__init__(sock.fileno(), where)
        self.sock = sock

    def _read(self, n):
        return self.sock.recv(n)

    def write(self, data):
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise ConnectionLost(f"{self.where}: send failed: {e.strerror or e}") from None

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def silent_interval(baudrate, bits_per_char=11):
    """3.5 character times, fixed at 1.75 ms above 19200 baud (Serial Line v1.02, 2.5.1.1)."""
    if baudrate > 19200:
        return 0.00175
    return 3.5 * bits_per_char / baudrate


class RtuClient(_RtuBase):
    """RTU master on a serial port (pyserial)."""

    def __init__(self, port, baudrate=9600, parity="N", bytesize=8, stopbits=1, timeout=0.5,
                 pause=0.0, rs485_echo=False, backoff_max=60.0, backoff_min=0.5, late_window=None):
        super().__init__(timeout, pause, backoff_min, backoff_max, late_window)
        self.port = port
        self.baudrate = int(baudrate)
        self.parity = str(parity).upper()[:1]
        self.bytesize = int(bytesize)
        self.stopbits = stopbits
        self.rs485_echo = bool(rs485_echo)
        bits = 1 + self.bytesize + (self.parity != "N") + float(stopbits)
        self._char_time = bits / self.baudrate
        self._silence = silent_interval(self.baudrate, bits)

    def _where(self):
        return self.port

    def _connect(self):
        try:
            import serial  # pyserial; imported here so TCP-only agents never load it
            port = serial.Serial(self.port, baudrate=self.baudrate, parity=self.parity,
                                 bytesize=self.bytesize, stopbits=self.stopbits, timeout=0,
                                 exclusive=True)
        except ImportError:
            raise ConnectionLost("pyserial is not installed") from None
        except _SERIAL_ERRORS as e:
            raise ConnectionLost(f"open {self.port} failed: {e}") from None
        self._link = _SerialLink(port, self.port)


class RtuOverTcpClient(_RtuBase):
    """RTU frames on a TCP socket (serial-to-Ethernet gateways in transparent mode)."""

    close_after_timeouts = 2

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
        self._link = _SocketLink(sock, self._where())
