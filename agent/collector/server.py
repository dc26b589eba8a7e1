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

Framing follows RFC 9112 §6: Content-Length is plain digits, given once; `Transfer-Encoding:
chunked` bodies are decoded (size capped by max_body_bytes while they arrive); both at once, an
HTTP/1.0 Transfer-Encoding, any other coding, or a malformed chunk is 400 (or 501) and the
connection is closed, so no byte of a refused body is ever read as a request.
"""
import collections
import io
import json
import logging
import queue
import re
import selectors
import socket
import sys
import threading
import time
import traceback
from urllib.parse import unquote
from wsgiref.handlers import SimpleHandler

from agent import __version__

log = logging.getLogger("modbus.collector")

MAX_HEAD = 64 << 10          # request line + headers
MAX_CHUNK_LINE = 4096        # a chunk-size line with its extensions
MAX_TRAILERS = 8 << 10
DRAIN_MAX = 64 << 20         # unread body (answered 413/401 early) read and dropped before closing
IDLE_TIMEOUT = 60.0          # keep-alive connection without a new request
LINGER_TIMEOUT = 2.0         # after `Connection: close`, wait this long for the client's FIN
THREADS = 16                 # app threads per process for POSTs, and as many for other methods
READ_SIZE = 1 << 16
# Connections accepted per turn of the loop. Reads come first in every turn, so a newcomer's
# request is read in the next turn; until then only the newcomers after it in the same turn
# can push it out, and they are far fewer than any cap.
ACCEPT_BATCH = 8

_HEAD_END = re.compile(rb"\r?\n\r?\n")
# all used with fullmatch
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_DIGITS = re.compile(rb"[0-9]{1,18}")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?")
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
_CTL_IN_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")   # HTAB is allowed in field values
_CTL_IN_TARGET = re.compile(rb"[\x00-\x20\x7f]")

HEAD, BODY, BUSY, LINGER = "head", "body", "busy", "linger"
_REASONS = {100: "Continue", 400: "Bad Request", 408: "Request Timeout", 413: "Payload Too Large",
            414: "URI Too Long", 417: "Expectation Failed", 431: "Request Header Fields Too Large",
            501: "Not Implemented", 503: "Service Unavailable", 505: "HTTP Version Not Supported"}


class Refuse(Exception):
    """The server refuses the request before the app sees it; the connection closes after the answer."""

    def __init__(self, status, error, where, headers=()):
        super().__init__(error)
        self.status, self.error, self.where, self.headers = status, error, where, list(headers)


def error_answer(status, error, where, headers=()):
    """The bytes of a JSON error answer with `Connection: close` (the app's {"error", "where"} shape)."""
    body = (json.dumps({"error": error, "where": where}, ensure_ascii=True) + "\n").encode("ascii")
    lines = ["HTTP/1.1 %d %s" % (status, _REASONS.get(status, "Error")), "Content-Type: application/json",
             "Content-Length: %d" % len(body), "Connection: close"]
    lines += ["%s: %s" % h for h in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


BUSY_ANSWER = error_answer(503, "too many connections", "max_connections", [("Retry-After", "5")])


class Head:
    """A parsed request head: method, target, version (1, x), headers as [(lower-case name, value)]."""
    __slots__ = ("method", "target", "version", "headers")

    def __init__(self, method, target, version, headers):
        self.method, self.target, self.version, self.headers = method, target, version, headers

    def values(self, name):
        return [v for k, v in self.headers if k == name]


def parse_head(data):
    """The head's bytes (up to, without, the empty line) -> Head, or Refuse. Strict where leniency
    lets two parsers disagree about where a request ends (RFC 9112 §2.2, §5): CRLF line ends only,
    no whitespace before the colon, no obs-fold, no control characters."""
    if b"\n" in data.replace(b"\r\n", b"") or b"\r" in data.replace(b"\r\n", b""):
        raise Refuse(400, "line endings in the request head must be CRLF", "head")
    lines = data.split(b"\r\n")
    while lines and lines[0] == b"":  # RFC 9112 §2.2: empty lines before the request line are ignored
        lines.pop(0)
    if not lines:
        raise Refuse(400, "empty request", "request line")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise Refuse(400, "malformed request line %r" % lines[0][:100].decode("latin-1"), "request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise Refuse(400, "malformed method", "request line")
    m = _VERSION.fullmatch(version)
    if not m:
        raise Refuse(400, "malformed HTTP version %r" % version[:20].decode("latin-1"), "request line")
    if m.group(1) != b"1":
        raise Refuse(505, "only HTTP/1.x is supported", "request line")
    if _CTL_IN_TARGET.search(target):
        raise Refuse(400, "control character or space in the request target", "request line")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            if line[:1] in (b" ", b"\t"):
                raise Refuse(400, "obsolete line folding in the request head", "head")
            raise Refuse(400, "malformed header line %r" % line[:60].decode("latin-1"), "head")
        value = value.strip(b" \t")
        if _CTL_IN_VALUE.search(value):
            raise Refuse(400, "control character in header %s" % name.decode("ascii"), name.decode("ascii"))
        headers.append((name.decode("ascii").lower(), value.decode("latin-1")))
    return Head(method.decode("ascii"), target.decode("latin-1"), (1, int(m.group(2))), headers)


def body_framing(head):
    """('length', n), ('chunked', None) or ('none', 0) for a request head, or Refuse
    (RFC 9112 §6.1, §6.3): anything ambiguous is 400 and closes the connection."""
    te = head.values("transfer-encoding")
    cl = head.values("content-length")
    if te:
        if head.version < (1, 1):
            raise Refuse(400, "Transfer-Encoding in an HTTP/1.0 request", "Transfer-Encoding")
        if cl:
            raise Refuse(400, "both Content-Length and Transfer-Encoding: ambiguous framing", "Transfer-Encoding")
        codings = [c.strip().lower() for c in ",".join(te).split(",")]
        if codings[-1:] != ["chunked"]:
            raise Refuse(400, "Transfer-Encoding %r does not end with chunked" % ",".join(te)[:60],
                         "Transfer-Encoding")
        if len(codings) > 1:
            raise Refuse(501, "unsupported Transfer-Encoding %r (only chunked)" % ",".join(te)[:60],
                         "Transfer-Encoding")
        return "chunked", None
    if cl:
        if len(cl) > 1:
            raise Refuse(400, "Content-Length given %d times" % len(cl), "Content-Length")
        raw = cl[0].encode("latin-1")
        if not _DIGITS.fullmatch(raw):
            raise Refuse(400, "Content-Length must be plain digits, got %r" % cl[0][:40], "Content-Length")
        return "length", int(raw)
    return "none", 0


class Chunked:
    """Incremental decoder of a chunked body (RFC 9112 §7.1) with a cap on the decoded size."""

    def __init__(self, cap):
        self.cap = cap
        self.parts = []
        self.size = 0
        self._state = "size"
        self._left = 0
        self._trailer = 0

    def feed(self, buf):
        """Consume what it can of `buf` (a bytearray, consumed in place); True once the last chunk
        and the trailers are in. Refuse on bad framing (400) or beyond the cap (413)."""
        while True:
            if self._state == "data":
                if not buf:
                    return False
                take = min(self._left, len(buf))
                self.parts.append(bytes(buf[:take]))
                del buf[:take]
                self._left -= take
                if self._left:
                    return False
                self._state = "crlf"
            if self._state == "crlf":
                if len(buf) < 2:
                    return False
                if buf[:2] != b"\r\n":
                    raise Refuse(400, "chunk data not followed by CRLF", "body: chunk framing")
                del buf[:2]
                self._state = "size"
            i = buf.find(b"\r\n")
            limit = MAX_CHUNK_LINE if self._state == "size" else MAX_TRAILERS - self._trailer
            if i < 0:
                if len(buf) > limit:
                    raise Refuse(400, "chunk-size line or trailers too long", "body: chunk framing")
                if b"\n" in buf:
                    raise Refuse(400, "chunk framing line not ended by CRLF", "body: chunk framing")
                return False
            if i > limit:
                raise Refuse(400, "chunk-size line or trailers too long", "body: chunk framing")
            line = bytes(buf[:i])
            del buf[:i + 2]
            if self._state == "size":
                m = _CHUNK_SIZE.fullmatch(line)
                if not m:
                    raise Refuse(400, "malformed chunk size %r" % line[:40].decode("latin-1"),
                                 "body: chunk framing")
                n = int(m.group(1), 16)
                if self.size + n > self.cap:
                    raise Refuse(413, "body exceeds max_body_bytes %d" % self.cap, "body")
                if n == 0:
                    self._state = "trailer"
                else:
                    self._state, self._left = "data", n
                    self.size += n
            else:  # trailer section: fields ignored (never merged into the head), up to the empty line
                if not line:
                    return True
                if b"\n" in line or b"\r" in line or b":" not in line:
                    raise Refuse(400, "malformed trailer field", "body: chunk framing")
                self._trailer += len(line) + 2
                if self._trailer > MAX_TRAILERS:
                    raise Refuse(400, "trailers too long", "body: chunk framing")

    def body(self):
        return b"".join(self.parts)


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


class _Out:
    """wsgiref's stdout: buffers, sends with a total deadline per flush (socket timeout), and turns
    any send failure into ConnectionAbortedError, which wsgiref takes as 'client went away'."""

    def __init__(self, sock):
        self.sock = sock
        self.parts, self.n = [], 0
        self.failed = None

    def write(self, data):
        self.parts.append(data)
        self.n += len(data)
        if self.n >= READ_SIZE:
            self.flush()
        return len(data)

    def flush(self):
        if not self.parts or self.failed:
            return
        data = b"".join(self.parts)
        self.parts, self.n = [], 0
        try:
            self.sock.sendall(data)
        except OSError as e:
            self.failed = e
            raise ConnectionAbortedError(str(e)) from None


class _Handler(SimpleHandler):
    http_version = "1.1"
    server_software = "modbus-collector/%s" % __version__
    os_environ = {}  # wsgiref copies the server process's environment into every request: not here
    error_status = "500 Internal Server Error"
    error_headers = [("Content-Type", "application/json"), ("Content-Length", "44")]
    error_body = b'{"error":"internal error","where":"server"}\n'
    _keep = False

    def cleanup_headers(self):
        # Decided here, before the headers go out, so the client is told `Connection: close`.
        # Keep the connection when the response has a length, the client did not ask to close,
        # the whole body was read, and the server has slots to spare. When free slots run low,
        # connections close after their answer so the slots turn over: agents that post more
        # often than the idle timeout would otherwise keep theirs forever.
        super().cleanup_headers()
        c = self.request_handler
        self._keep = ("Content-Length" in self.headers and c.request_version == "HTTP/1.1"
                      and not c.close_connection and not c.unread
                      and "close" not in self.environ.get("HTTP_CONNECTION", "").lower()
                      and not c.server.slots_low())
        if not self._keep and "Connection" not in self.headers:
            self.headers["Connection"] = "close"

    def close(self):
        c = self.request_handler
        if not self._keep:
            c.close_connection = True
        if self.status and log.isEnabledFor(logging.DEBUG):
            log.debug('%s "%s %s" %s %d', c.ip, c.head.method, c.head.target[:200], self.status.split(" ", 1)[0],
                      self.bytes_sent)
        super().close()

    def log_exception(self, exc_info):
        from agent.collector.config import redact

        env = self.environ or {}
        log.error("%s %s from %s: the application failed:\n%s", env.get("REQUEST_METHOD"),
                  env.get("PATH_INFO"), env.get("REMOTE_ADDR"),
                  redact("".join(traceback.format_exception(*exc_info))).rstrip())
        self.request_handler.close_connection = True


class _Pool:
    """App threads, started when needed, up to `size`; they wait on one queue."""

    def __init__(self, size, work):
        self.size, self._work = size, work
        self._q = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0

    def submit(self, item):
        with self._lock:
            start = self._idle == 0 and self._threads < self.size
            if start:
                self._threads += 1
            else:
                self._idle -= 1  # this item is one idle thread's now
        self._q.put(item)
        if start:
            threading.Thread(target=self._run, name="collector-app", daemon=True).start()

    def _run(self):
        while True:
            item = self._q.get()
            if item is None:
                return
            try:
                self._work(item)
            finally:
                with self._lock:
                    self._idle += 1

    def stop(self):
        with self._lock:
            n = self._threads
            self._threads = 0
        for _ in range(n):
            self._q.put(None)


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
        self._pool = _Pool(self.threads, self._serve)
        self._read_pool = _Pool(self.threads, self._serve)
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
                victim = self._victim(full or None)
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

    def _victim(self, ip):
        """The connection to close for a newcomer (see the module doc), None if all are busy.
        For the global cap, among equals the one of the address with the most connections."""
        best, best_key = None, None
        for c in self._conns.values():
            if c.state == BUSY or (ip is not None and c.ip != ip):
                continue
            key = (c.rank(), -self._per_ip[c.ip], c.since)
            if best is None or key < best_key:
                best, best_key = c, key
        return best

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
                m = _HEAD_END.search(c.buf, max(0, c.scan - 3), MAX_HEAD + 4)
                c.scan = len(c.buf)  # a head arriving byte by byte is scanned once, not once per byte
                if m is None:
                    if len(c.buf) > MAX_HEAD:
                        nl = c.buf.find(b"\n")
                        if nl < 0 or nl > MAX_HEAD:
                            raise Refuse(414, "request line longer than %d bytes" % MAX_HEAD, "request line")
                        raise Refuse(431, "request head longer than %d bytes" % MAX_HEAD, "head")
                    return
                raw = bytes(c.buf[:m.start()])
                del c.buf[:m.end()]
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
        c.head = head
        c.request_version = "HTTP/1.%d" % head.version[1]
        c.state, c.since = BODY, time.monotonic()
        c.deadline = c.since + self.body_timeout
        try:
            kind, n = body_framing(head)
        except Refuse:
            c.close_connection = True
            raise
        c.need, c.framing = 0, kind
        if kind == "chunked":
            c.chunked = Chunked(self.max_body_bytes)
        elif n > self.max_body_bytes:
            # Not read: the app answers 413 from Content-Length; then the connection closes
            # (the rest is drained, so the client sees the answer rather than a reset).
            c.unread = n
            c.need = 0
        else:
            c.need = n
        expect = ",".join(head.values("expect")).lower()
        if expect and expect != "100-continue":
            c.close_connection = True
            raise Refuse(417, "unsupported Expect %r" % expect[:40], "Expect")
        c.expect = bool(expect) and head.version >= (1, 1)
        if c.expect and not c.unread and (kind == "chunked" or n) and len(c.buf) < max(n or 0, 1):
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

    def environ(self, c):
        head = c.head
        path, _, query = head.target.partition("?")
        if path.startswith(("http://", "https://")):  # absolute-form (RFC 9112 §3.2.2)
            path = "/" + path.split("/", 3)[3] if path.count("/") >= 3 else "/"
        env = {"REQUEST_METHOD": head.method, "SCRIPT_NAME": "", "PATH_INFO": unquote(path, "iso-8859-1"),
               "QUERY_STRING": query, "SERVER_NAME": self._server_name, "SERVER_PORT": str(self.server_address[1]),
               "SERVER_PROTOCOL": c.request_version, "SERVER_SOFTWARE": "modbus-collector/%s" % __version__,
               "GATEWAY_INTERFACE": "CGI/1.1", "REMOTE_ADDR": c.ip, "REMOTE_PORT": str(c.addr[1]),
               "CONTENT_TYPE": "text/plain"}
        if c.unread:
            env["CONTENT_LENGTH"] = str(c.unread)
        elif c.framing != "none":
            env["CONTENT_LENGTH"] = str(len(c.body))
        for k, v in head.headers:
            if "_" in k:  # X_Token would alias X-Token (and Content_Length the length): dropped
                continue
            if k == "content-type":
                env["CONTENT_TYPE"] = v
                continue
            if k in ("content-length", "transfer-encoding"):  # the server's business, done above
                continue
            key = "HTTP_" + k.replace("-", "_").upper()
            env[key] = env[key] + "," + v if key in env else v
        return env

    def _serve(self, c):
        keep = False
        try:
            c.sock.settimeout(self.body_timeout)  # per flush of the answer: a stalled reader goes
            out = _Out(c.sock)
            handler = _Handler(io.BytesIO(c.body or b""), out, sys.stderr, self.environ(c),
                               multithread=True, multiprocess=False)
            handler.request_handler = c
            handler.run(self.app)
            if out.failed is None:
                out.flush()
            if out.failed is not None:
                log.info("%s %s from %s: answer not delivered (%s); connection closed", c.head.method,
                         c.head.target[:100], c.ip, out.failed)
                c.close_connection = True
            keep = not c.close_connection
        except Exception:
            log.error("%s: request failed:\n%s", c.ip, traceback.format_exc().rstrip())
        finally:
            c.body = None
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
