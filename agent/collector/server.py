"""The built-in HTTP/1.1 server of modbus-collector (stdlib only).

One I/O thread per process reads request heads and bodies from every connection with a selector;
only a COMPLETE request (head and whole body in memory) goes to a small pool of threads that run
the WSGI app and write the answer (POSTs and other methods have a pool each, so clients that
stop reading a long answer cannot take the agents' threads). Why (issue 10): with a thread per
connection, 200 clients sending their head one byte every 10 s held all 200 threads, and agents
got 503 for as long as that lasted. Here a slow client holds a socket and a buffer, never a thread, and:

  * the request head must be complete within `head_timeout` (408), the body within
    `body_timeout` of the head (400), whatever the client's pace (totals, not per read);
  * at most `max_connections` connections per process and `max_connections_per_address` per client
    address. When a cap is reached, a connection that has not completed its request is closed
    to make room (partial heads first, then connections that never sent a byte, then idle
    keep-alives, then bodies still arriving; the longest-waiting first within each; never one
    the app is serving); only when every connection is busy in the app does the newcomer get
    503 + Retry-After. So slow clients cannot keep a fast one out: the newcomer is the youngest
    connection, and its request is complete within one round trip, long before every older
    waiting connection has been closed ahead of it (even when attackers reconnect as fast as
    they are dropped).

Framing (RFC 9112: the head's syntax, Content-Length/Transfer-Encoding rules, chunked decoding)
is agent/collector/http1.py, pure; running the app on an app thread and sending its answer is
agent/collector/handler.py. This module holds the connections, the selector, the deadlines, the
caps and eviction. A request the framing refuses is answered and its connection closed, so no
byte of a refused body is ever read as a request.
"""
import collections
import logging
import selectors
import socket
import threading
import time

from agent.collector import handler
from agent.collector.http1 import Chunked, Refuse, body_framing, error_answer, parse_head, take_head

log = logging.getLogger("modbus.collector")

DRAIN_MAX = 64 << 20         # unread body (answered 413/401 early) read and dropped before closing
IDLE_TIMEOUT = 60.0          # keep-alive connection without a new request
LINGER_TIMEOUT = 2.0         # after `Connection: close`, wait this long for the client's FIN
THREADS = 16                 # app threads per process for POSTs, and as many for other methods
READ_SIZE = 1 << 16
# Connections accepted per turn of the loop. Reads come first in every turn, so a newcomer's
# request is read in the next turn; until then only the newcomers after it in the same turn
# can push it out, and they are far fewer than any cap.
ACCEPT_BATCH = 8

HEAD, BODY, BUSY, LINGER = "head", "body", "busy", "linger"

BUSY_ANSWER = error_answer(503, "too many connections", "max_connections", [("Retry-After", "5")])


class _Conn:
    """One client connection, owned by the I/O thread except while BUSY (then by one app thread)."""
    __slots__ = ("sock", "addr", "ip", "buf", "state", "since", "deadline", "head", "framing", "need",
                 "chunked", "body", "unread", "requests", "close_connection", "request_version", "server",
                 "linger_left", "expect", "scan")

    def __init__(self, sock, addr, server, now):
        self.sock, self.addr, self.ip, self.server = sock, addr, addr[0], server
        self.buf = bytearray()
        self.requests = 0
        self.head = None
        self.linger_left = 0
        self.wait_head(now, server.head_timeout)

    def wait_head(self, now, timeout):
        self.state, self.since, self.deadline = HEAD, now, now + timeout
        self.head = self.chunked = self.body = None
        self.unread = self.scan = 0
        self.expect = False
        self.close_connection = False
        self.request_version = "HTTP/1.1"

    def start_body(self, head, now, body_timeout, max_body_bytes):
        """The head is in: how its body arrives (RFC 9112 §6, http1.body_framing); Refuse when
        the request cannot be taken (the connection then closes). True: send 100 Continue."""
        self.head = head
        self.request_version = "HTTP/1.%d" % head.version[1]
        self.state, self.since = BODY, now
        self.deadline = now + body_timeout
        try:
            kind, n = body_framing(head)
        except Refuse:
            self.close_connection = True
            raise
        self.need, self.framing = 0, kind
        if kind == "chunked":
            self.chunked = Chunked(max_body_bytes)
        elif n > max_body_bytes:
            # Not read: the app answers 413 from Content-Length; then the connection closes
            # (the rest is drained, so the client sees the answer rather than a reset).
            self.unread = n
            self.need = 0
        else:
            self.need = n
        expect = ",".join(head.values("expect")).lower()
        if expect and expect != "100-continue":
            self.close_connection = True
            raise Refuse(417, "unsupported Expect %r" % expect[:40], "Expect")
        self.expect = bool(expect) and head.version >= (1, 1)
        return self.expect and not self.unread and (kind == "chunked" or n) and len(self.buf) < max(n or 0, 1)

    def rank(self):
        """Eviction order: lower goes first. A lingering close; a partial head (slow on purpose
        or broken: real clients send the head in one go); a connection that never sent a byte;
        an idle keep-alive (a real agent between posts); a body still arriving (an upload over
        a slow link)."""
        if self.state == LINGER:
            return 0
        if self.state == HEAD:
            return 1 if self.buf else 2 if not self.requests else 3
        return 4



def _victim(conns, per_ip, ip):
    """The connection to close for a newcomer (see the module doc), None if all are busy.
    `ip`: the address whose cap is reached, None for the global cap; then among equals the one
    of the address with the most connections."""
    best, best_key = None, None
    for c in conns.values():
        if c.state == BUSY or (ip is not None and c.ip != ip):
            continue
        key = (c.rank(), -per_ip[c.ip], c.since)
        if best is None or key < best_key:
            best, best_key = c, key
    return best


def _family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class Server:
    """The built-in server; `serve_forever`/`shutdown`/`server_close` as socketserver's.

    The listening socket is created (and bound) here, so a prefork parent can make one Server and
    let each forked worker call serve_forever on it (selector, threads and app are per process)."""

    def __init__(self, address, app=None, max_connections=200, max_connections_per_address=50,
                 head_timeout=10.0, body_timeout=60.0, max_body_bytes=8 << 20, threads=THREADS):
        host, port = address
        self.max_connections = max_connections
        self.max_per_address = max_connections_per_address
        self.keepalive_min_free = max(2, -(-max_connections // 10))
        self.head_timeout, self.body_timeout = float(head_timeout), float(body_timeout)
        self.max_body_bytes = max_body_bytes
        self.threads = threads
        self.app = app
        self.socket = socket.socket(_family(host), socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((host, port))
            self.socket.listen(128)
        except BaseException:
            self.socket.close()
            raise
        self.socket.setblocking(False)  # prefork workers race for accept(); losers must not block
        self.server_address = self.socket.getsockname()[:2]
        self._server_name = host
        self._conns = {}        # socket fd -> _Conn (every open connection of this process)
        self._per_ip = collections.Counter()
        self._returned = collections.deque()  # (conn, keep) handed back by app threads
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self._sel = self._wake_r = self._wake_w = self._pool = self._read_pool = None
        self._accept_paused = 0.0  # after EMFILE & co: the listener is out of the selector until then
        self.stats = collections.Counter()   # head_timeout, body_timeout, evicted, refused, ...
        self._stats_logged = time.monotonic()

    # --- socketserver-like surface -------------------------------------------------------------

    def set_app(self, app):
        self.app = app

    def get_app(self):
        return self.app

    def slots_low(self):
        return self.max_connections - len(self._conns) < self.keepalive_min_free

    def serve_forever(self, poll_interval=0.5):
        self._stop.clear()
        self._stopped.clear()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # Two pools: an agent's POST is answered with a few bytes that fit any socket buffer, but
        # a GET (an export) can block on a client that stops reading, up to body_timeout per
        # 64 KB. Stalled readers can then take every read thread, never the agents' ones.
        self._pool = handler.Pool(self.threads, self._serve)
        self._read_pool = handler.Pool(self.threads, self._serve)
        self._sel.register(self.socket, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, self._wake_r)
        tick = min(poll_interval, 0.25)
        next_sweep = 0.0
        try:
            while not self._stop.is_set():
                accept = False
                for key, _ in self._sel.select(tick):
                    if key.data is None:
                        accept = True
                    elif key.data is self._wake_r:
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except (BlockingIOError, InterruptedError):
                            pass
                    else:
                        self._readable(key.data)
                self._take_back()
                now = time.monotonic()
                if accept:  # after the reads: a request that is already here is not evicted unread
                    self._accept()
                if self._accept_paused and now >= self._accept_paused:
                    self._accept_paused = 0.0
                    self._sel.register(self.socket, selectors.EVENT_READ, None)
                if now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + 0.1
        finally:
            self._close_all()
            self._stopped.set()

    def shutdown(self):
        self._stop.set()
        self._wake()
        self._stopped.wait()

    def server_close(self):
        self.socket.close()

    # --- the I/O thread ------------------------------------------------------------------------

    def _wake(self):
        try:
            if self._wake_w is not None:
                self._wake_w.send(b"x")
        except OSError:
            pass

    def _accept(self):
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # EMFILE and the like: leave it in the backlog and stop watching the listener for a
                # moment (it stays readable: the loop would spin), say so (rarely)
                self.stats["accept_error"] += 1
                if self.stats["accept_error"] in (1, 100, 10000):
                    log.warning("accept failed: %s (%d times; lower max_connections or raise the open "
                                "files limit)", e, self.stats["accept_error"])
                self._sel.unregister(self.socket)
                self._accept_paused = time.monotonic() + 0.1
                return
            now = time.monotonic()  # distinct per connection: among equals the older goes first
            ip = addr[0]
            full = None
            if self._per_ip[ip] >= self.max_per_address:
                full = ip
            elif len(self._conns) >= self.max_connections:
                full = ""
            if full is not None:
                victim = _victim(self._conns, self._per_ip, full or None)
                if victim is None:
                    self.stats["refused"] += 1
                    log.debug("%s: 503, every connection%s is busy", ip, " of this address" if full else "")
                    # A lingering close (its request may be arriving: closing on it would reset
                    # the 503 away). One over the cap for a moment, and the first to go for the next.
                    c = self._add(sock, addr, now)
                    self._send_quietly(c, BUSY_ANSWER)
                    self._linger(c, 1 << 20)
                    continue
                self.stats["evicted"] += 1
                log.debug("%s: closed a %s connection of %s (waiting %.1f s) to make room", ip, victim.state,
                          victim.ip, now - victim.since)
                if victim.state != HEAD or victim.buf:
                    self._send_quietly(victim, BUSY_ANSWER)
                self._close(victim)
            self._add(sock, addr, now)

    def _add(self, sock, addr, now):
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        c = _Conn(sock, addr, self, now)
        self._conns[sock.fileno()] = c
        self._per_ip[c.ip] += 1
        self._sel.register(sock, selectors.EVENT_READ, c)
        return c

    def _readable(self, c):
        try:
            data = c.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            if c.state == BODY:
                log.info("%s %s from %s: client closed the connection with the body incomplete",
                         c.head.method, c.head.target[:100], c.ip)
            self._close(c)
            return
        if c.state == LINGER:
            c.linger_left -= len(data)
            if c.linger_left <= 0:
                self._close(c)
            return
        if c.state == HEAD and not c.buf and c.requests:  # a keep-alive connection's next request
            c.since = time.monotonic()
            c.deadline = c.since + self.head_timeout
        c.buf += data
        self._advance(c)

    def _advance(self, c):
        try:
            if c.state == HEAD:
                scan, c.scan = c.scan, len(c.buf)
                raw = take_head(c.buf, scan)
                if raw is None:
                    return
                self._start_body(c, parse_head(raw))
            if c.state == BODY:
                if c.chunked is not None:
                    if not c.chunked.feed(c.buf):
                        return
                    c.body = c.chunked.body()
                elif c.need:
                    if len(c.buf) < c.need:
                        return
                    c.body = bytes(c.buf[:c.need])
                    del c.buf[:c.need]
                else:
                    c.body = b""
                self._dispatch(c)
        except Refuse as e:
            self._refuse(c, e)

    def _start_body(self, c, head):
        if c.start_body(head, time.monotonic(), self.body_timeout, self.max_body_bytes):
            # curl waits a second for this before sending a body (always when chunked)
            self._send_quietly(c, b"HTTP/1.1 100 Continue\r\n\r\n")

    def _dispatch(self, c):
        c.state = BUSY
        self._sel.unregister(c.sock)
        (self._pool if c.head.method == "POST" else self._read_pool).submit(c)

    def _refuse(self, c, e):
        self.stats["refused_%d" % e.status] += 1
        log.info("%s from %s: %d %s (where %s)", ("%s %s" % (c.head.method, c.head.target[:100]))
                 if c.head else "request", c.ip, e.status, e.error, e.where)
        self._send_quietly(c, error_answer(e.status, e.error, e.where, e.headers))
        self._linger(c, DRAIN_MAX)

    def _send_quietly(self, c, data):
        try:
            c.sock.send(data)  # small, into an empty socket buffer: never blocks for long
        except OSError:
            pass

    def _linger(self, c, budget, timeout=LINGER_TIMEOUT):
        """Stop sending, read and drop what the client still sends (up to `budget` bytes or
        `timeout`), then close: closing with unread data makes the kernel send RST, which can
        destroy the answer before the client has read it."""
        try:
            c.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(c)
            return
        c.buf.clear()
        c.state, c.since, c.deadline = LINGER, time.monotonic(), time.monotonic() + timeout
        c.linger_left = budget

    def _close(self, c):
        fd = c.sock.fileno()
        if self._conns.pop(fd, None) is not None:
            self._per_ip[c.ip] -= 1
            if not self._per_ip[c.ip]:
                del self._per_ip[c.ip]
            if c.state != BUSY:
                try:
                    self._sel.unregister(c.sock)
                except (KeyError, ValueError):
                    pass
        c.sock.close()

    def _sweep(self, now):
        for c in [c for c in self._conns.values() if c.state != BUSY and now >= c.deadline]:
            if c.state == HEAD and c.buf:
                self.stats["head_timeout"] += 1
                log.debug("%s: 408, request head not complete within head_timeout %gs (%d bytes)",
                          c.ip, self.head_timeout, len(c.buf))
                self._send_quietly(c, error_answer(408, "request head not complete within head_timeout %gs"
                                                   % self.head_timeout, "head"))
                self._linger(c, DRAIN_MAX)
            elif c.state == BODY:
                self.stats["body_timeout"] += 1
                got = c.chunked.size if c.chunked is not None else len(c.buf)
                what = ("chunked body not complete (%d bytes)" % got if c.chunked is not None else
                        "body shorter than Content-Length (%d of %d bytes)" % (got, c.need))
                self._refuse(c, Refuse(400, "%s within body_timeout %gs" % (what, self.body_timeout), "body"))
            else:  # idle keep-alive, never-used connection, or the end of a lingering close
                self._close(c)
        if now - self._stats_logged >= 60:
            self._stats_logged = now
            shown = {k: v for k, v in self.stats.items() if v}
            if shown:
                log.info("connections closed or refused in the last minute: %s (open now: %d)",
                         ", ".join("%s %d" % kv for kv in sorted(shown.items())), len(self._conns))
                self.stats.clear()

    def _take_back(self):
        while self._returned:
            c, keep = self._returned.popleft()
            if self._stop.is_set():
                self._close(c)
                continue
            try:
                c.sock.setblocking(False)
            except OSError:
                self._close(c)
                continue
            now = time.monotonic()
            if keep:
                c.requests += 1
                c.wait_head(now, IDLE_TIMEOUT)
                self._sel.register(c.sock, selectors.EVENT_READ, c)
                if c.buf:  # a pipelined request already here
                    c.deadline = now + self.head_timeout
                    self._advance(c)
            elif c.unread or c.buf:
                # Body left unread (413 from Content-Length): drain it, or the client may get a
                # reset instead of the answer. A client that waits for 100-continue sends none.
                self._sel.register(c.sock, selectors.EVENT_READ, c)
                c.state = LINGER
                self._linger(c, DRAIN_MAX if c.unread <= DRAIN_MAX else 0,
                             self.body_timeout if c.unread and not c.expect else LINGER_TIMEOUT)
            else:
                self._close(c)  # still BUSY to _close: it is not registered

    def _close_all(self):
        for c in list(self._conns.values()):
            if c.state != BUSY:
                self._close(c)
        self._pool.stop()
        self._read_pool.stop()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()
        self._wake_w = None

    # --- app threads ---------------------------------------------------------------------------

    def _serve(self, c):
        keep = False
        try:
            keep = handler.serve(c, self.app, self.body_timeout, self._server_name, self.server_address[1])
        finally:
            if self._stop.is_set():
                c.sock.close()
            else:
                self._returned.append((c, keep))
                self._wake()


def make_server(host, port, app, max_connections=None, **options):
    """Server on (host, port) running `app`. Limits not given come from the app's config when it
    has one (CollectorApp.cfg), else from the collector's built-in defaults."""
    return Server((host, port), app, **server_options(getattr(app, "cfg", None),
                                                      max_connections=max_connections, **options))


def server_options(cfg, **given):
    """Server keyword arguments from a collector Config (None: defaults), `given` winning."""
    from agent.collector.config import DEFAULTS

    opts = {}
    for key in ("max_connections", "max_connections_per_address", "head_timeout", "body_timeout",
                "max_body_bytes"):
        opts[key] = getattr(cfg, key, DEFAULTS[key]) if cfg is not None else DEFAULTS[key]
    opts.update((k, v) for k, v in given.items() if v is not None)
    return opts
