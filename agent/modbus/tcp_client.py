"""Modbus TCP client: MBAP frames on a socket, one connection, one request in flight.

Hot path (`read`): one `struct` pack, one `sendall`, one `recv` that normally holds the whole
answer, one unpack to check it; no timeout syscalls unless the answer comes in pieces. The
robustness rules it follows are listed in `agent.modbus.client`.
"""
import socket
import time

from agent.modbus import tcp
from agent.modbus.base import TCP_ALLOWANCE, Client
from agent.modbus.errors import ConnectionLost, FrameError, ModbusTimeout
from agent.modbus.keys import CONNECT_TIMEOUT, LINK_KEYS, SOCKET_KEYS, timeout_key
from agent.modbus.links import RECV_SIZE, open_tcp

_monotonic = time.monotonic
#: a reply whose transaction id is at most this far behind the current one is a stale answer
_STALE_WINDOW = 64


class _OutOfSync(FrameError):
    """TCP stream no longer at a frame boundary: close, reopen, resend once."""


class TcpClient(Client):
    """Modbus TCP client (MBAP framing), one connection, one request in flight."""

    close_after_timeouts = 2

    TYPE = "tcp"
    KEYS = SOCKET_KEYS + (timeout_key(1.0), CONNECT_TIMEOUT) + LINK_KEYS

    @classmethod
    def from_settings(cls, settings):
        return cls._on_socket(settings)

    @classmethod
    def bus_time(cls, settings, reads):
        """MBAP frames; the wire time is nothing next to TCP_ALLOWANCE and the pause."""
        return cls._bus_time(reads, tcp.READ_REQUEST_LENGTH, tcp.read_response_length, 0.0,
                             TCP_ALLOWANCE + settings.pause)

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
        adu = self._transact(tcp.build_adu(tid, unit, request_pdu), tid, tcp.response_length(fn, count))
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
            buf = sock.recv(RECV_SIZE)
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
            chunk = sock.recv(RECV_SIZE)
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
