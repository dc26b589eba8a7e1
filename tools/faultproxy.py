"""An HTTP proxy between the agent and the collector that records every record it carries and
breaks the link on cue: the end-to-end tests' witness and saboteur.

    proxy = FaultProxy(upstream_port).start()       # agent's [upload] url -> proxy.port
    proxy.set_fault("reset_after", count=3)         # the collector stores, the agent never hears
    proxy.seen                                      # {(agent, seq): {sha1 of the record, ...}}

Faults (each for `count` requests and/or `duration` seconds, or until cleared):
  reset_before  read the request, then reset the connection without forwarding it
  reset_mid     read half of the body, then reset (the collector never sees it)
  reset_after   forward it (the collector stores and commits), then reset instead of answering:
                the agent must send the batch again and the collector must store it once
  error         answer 503 without forwarding
  slow          wait `seconds` before forwarding
  delay         a slow link: `seconds` of round trip on every request (before forwarding) and
                one more when a connection opens (the TCP handshake); meant to stay on
                (no count, no duration), e.g. set_fault("delay", seconds=0.15)
When the collector is down the proxy resets the agent's connection, as a refused connect would.

Recording is what makes "zero duplicates" checkable: the collector stores (agent, seq) once
whatever it is sent, so a seq the agent reused for a different record would silently replace
nothing and be lost. `conflicts()` lists every seq seen with two different contents.
"""
import gzip
import hashlib
import http.client
import json
import select
import socket
import struct
import threading
import time


class FaultProxy:
    def __init__(self, upstream_port, upstream_host="127.0.0.1", host="127.0.0.1", port=0):
        self.upstream = (upstream_host, upstream_port)
        self.host, self.port = host, port
        self.seen = {}          # (agent, seq) -> set of content hashes
        self.requests = 0
        self.sends = {}         # (agent, seq) -> how many times it was sent
        self.on_forward = None  # called once with no argument after a request reached the collector
        self.faults_applied = {}
        self._fault = None      # [kind, remaining, until, seconds]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock = None
        self._threads = []
        self._conns = set()

    # -- lifecycle

    def start(self):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, self.port))
        s.listen(16)
        self._sock = s
        self.port = s.getsockname()[1]
        self._spawn(self._accept_loop)
        return self

    def stop(self):
        self._stop.set()
        _close(self._sock)
        with self._lock:
            for c in list(self._conns):
                _close(c)
        for t in self._threads:
            t.join(timeout=2)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _spawn(self, fn, *args):
        self._threads = [t for t in self._threads if t.is_alive()]
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        self._threads.append(t)

    # -- faults

    def set_fault(self, kind, count=None, duration=None, seconds=1.0):
        if kind not in ("reset_before", "reset_mid", "reset_after", "error", "slow", "delay"):
            raise ValueError("unknown proxy fault %r" % kind)
        with self._lock:
            self._fault = [kind, count, None if duration is None else time.monotonic() + duration, seconds]

    def clear_fault(self):
        with self._lock:
            self._fault = None

    def fault_active(self):
        """True while a fault set with set_fault has requests or time left."""
        with self._lock:
            f = self._fault
            if f is not None and f[2] is not None and time.monotonic() >= f[2]:
                self._fault = f = None
            return f is not None

    def _take_fault(self):
        with self._lock:
            f = self._fault
            if f is None:
                return None, 0
            kind, remaining, until, seconds = f
            if until is not None and time.monotonic() >= until:
                self._fault = None
                return None, 0
            if remaining is not None:
                f[1] -= 1
                if f[1] <= 0:
                    self._fault = None
            self.faults_applied[kind] = self.faults_applied.get(kind, 0) + 1
            return kind, seconds

    # -- the audit

    def conflicts(self):
        """(agent, seq) keys that were sent with more than one content."""
        with self._lock:
            return sorted(k for k, v in self.seen.items() if len(v) > 1)

    def resent(self):
        """How many record sends were repeats: the agent retrying a batch it had no answer for
        (counted when the request reached the proxy, whether or not the collector got it)."""
        with self._lock:
            return sum(n - 1 for n in self.sends.values())

    def _record(self, headers, body):
        try:
            if headers.get("content-encoding", "").lower() == "gzip":
                body = gzip.decompress(body)
            doc = json.loads(body)
            records = doc["records"]
        except (OSError, ValueError, KeyError, TypeError, EOFError):
            return
        with self._lock:
            for rec in records:
                if isinstance(rec, dict) and "seq" in rec:
                    h = hashlib.sha1(json.dumps(rec, sort_keys=True).encode()).hexdigest()
                    key = (rec.get("agent"), rec["seq"])
                    self.seen.setdefault(key, set()).add(h)
                    self.sends[key] = self.sends.get(key, 0) + 1

    # -- the proxy

    def _accept_loop(self):
        while not self._stop.is_set():
            try:
                r, _, _ = select.select([self._sock], [], [], 0.1)
                if not r:
                    continue
                conn, _ = self._sock.accept()
            except (OSError, ValueError):
                return
            with self._lock:
                self._conns.add(conn)
            self._spawn(self._serve, conn)

    def _link_delay(self):
        """The round trip a standing "delay" fault adds (0 without one); counts nothing."""
        with self._lock:
            f = self._fault
            if f is None or f[0] != "delay" or (f[2] is not None and time.monotonic() >= f[2]):
                return 0.0
            return f[3]

    def _serve(self, conn):
        f = conn.makefile("rb")
        try:
            handshake = self._link_delay()
            if handshake:
                self._stop.wait(handshake)
            while not self._stop.is_set():
                line = f.readline(65537)
                if not line:
                    return
                method, path, _ = line.decode("latin-1").split(" ", 2)
                headers, raw_headers = {}, []
                while True:
                    h = f.readline(65537)
                    if h in (b"\r\n", b"\n", b""):
                        break
                    name, _, value = h.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                    raw_headers.append((name.strip(), value.strip()))
                n = int(headers.get("content-length") or 0)
                with self._lock:
                    self.requests += 1
                kind, seconds = self._take_fault()
                if kind == "reset_mid":
                    f.read(n // 2)
                    _reset(conn, f)
                    return
                body = f.read(n) if n else b""
                if kind == "reset_before":
                    _reset(conn, f)
                    return
                if kind == "error":
                    msg = b'{"error": "injected by faultproxy", "where": "proxy"}'
                    conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(msg), msg))
                    continue
                if kind in ("slow", "delay"):
                    self._stop.wait(seconds)
                self._record(headers, body)
                try:
                    status, reason, rheaders, rbody = self._forward(method, path, raw_headers, body)
                except OSError:
                    _reset(conn, f)  # collector down: the agent sees a broken connection
                    return
                if kind == "reset_after":
                    _reset(conn, f)
                    return
                out = ["HTTP/1.1 %d %s" % (status, reason)]
                for k, v in rheaders:
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        out.append("%s: %s" % (k, v))
                out.append("Content-Length: %d" % len(rbody))
                conn.sendall(("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + rbody)
        except (OSError, ValueError):
            return
        finally:
            with self._lock:
                self._conns.discard(conn)
            try:
                f.close()
            except OSError:
                pass
            _close(conn)

    def _forward(self, method, path, raw_headers, body):
        c = http.client.HTTPConnection(*self.upstream, timeout=30)
        try:
            c.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for k, v in raw_headers:
                if k.lower() not in ("connection", "keep-alive"):
                    c.putheader(k, v)
            c.putheader("Connection", "close")
            c.endheaders(body)
            with self._lock:
                hook, self.on_forward = self.on_forward, None
            if hook is not None:
                hook()  # e.g. kill the collector while it holds the batch
            r = c.getresponse()
            return r.status, r.reason, r.getheaders(), r.read()
        finally:
            c.close()


def _reset(conn, f=None):
    """Close with linger 0: the peer gets a RST. The makefile must go first or the socket's
    descriptor stays open behind it."""
    if f is not None:
        try:
            f.close()
        except OSError:
            pass
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    _close(conn)


def _close(s):
    if s is None:
        return
    try:
        s.close()
    except OSError:
        pass
