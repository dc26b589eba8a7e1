"""The gateway's I/O: a non-blocking listening socket and its clients, served from the loop.

`Gateway.serve(until)` (agent.service) does one round of what is ready (select with no wait):
accept, read, answer (agent.gateway.answer, which does the MBAP framing with agent.modbus.tcp),
write. Nothing here blocks, and no new client is read from at or after `until`: the loop's
next poll starts on time, and what is still unread stays in the kernel, readable, and wakes the
loop's next select.

What keeps one client from hurting the loop or the others:
  - reads of at most RECV_CHUNK bytes per client per round; the input buffer holds at most one
    incomplete ADU (the MBAP length caps a request at 260 bytes);
  - a header that cannot be MBAP (protocol id not 0, length out of range): the stream is out of
    sync; the client is dropped (logged with its address and the bytes);
  - answers are queued and sent as the socket takes them; a client that does not read its
    answers is dropped once more than OUT_MAX bytes wait for it;
  - no request and nothing sent for idle_timeout: dropped (a half-open or forgotten connection
    must not hold one of the max_clients places);
  - more than max_clients: the new connection is accepted and closed at once (the client sees
    the close, not a hang in the listen backlog), logged once per LOG_EVERY.
A listen address that cannot be bound (in use, no permission) is logged and tried again every
BIND_RETRY; polling and the other outputs go on meanwhile.
"""
import select
import socket
import time

from agent import log as agentlog
from agent.config.load import gateway_unit
from agent.gateway.answer import OK, Target, respond, split_requests
from agent.modbus.errors import FrameError, hexdump
from agent.service import Service

RECV_CHUNK = 1024
OUT_MAX = 32 << 10
ACCEPT_BURST = 16
BIND_RETRY = 30.0
LOG_EVERY = 60.0
BACKLOG = 16
ACCEPT_PAUSE = 1.0

log = agentlog.get("gateway")


class _Client:
    __slots__ = ("sock", "peer", "inbuf", "outbuf", "last")

    def __init__(self, sock, peer, now):
        self.sock = sock
        self.peer = peer
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.last = now


def _peer_text(peer):
    try:
        host, port = peer[0], peer[1]
    except (TypeError, IndexError):
        return str(peer)
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


class Gateway(Service):
    """[gateway]: the Modbus TCP server of the cached readings. `settings`: GatewaySettings."""

    name = "gateway"

    def __init__(self, settings, states=(), clock=time.monotonic):
        self.settings = settings
        self.clock = clock
        self.units = {}            # gateway unit -> [Target]
        self.listener = None
        self.address = None        # (host, port) actually bound
        self.listen_error = None
        self._retry_at = 0.0
        self.clients = {}          # socket -> _Client
        self.accepted = 0
        self.refused = 0
        self.requests = 0
        self.answered = 0
        self.exceptions = {}       # exception code -> count
        self.dropped = {"idle": 0, "slow_reader": 0, "bad_frame": 0, "error": 0}
        self.last_error = None
        self._logged = {}          # what -> monotonic time last logged (rate limit)
        self._suppressed = {}
        self._accept_pause_until = 0.0
        self.watch(states)
        self._open()

    # -- the listening socket ----------------------------------------------------------------
    def _open(self):
        host, port = self.settings.listen
        sock = None
        try:
            info = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, kind, proto, _c, addr = info[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError as e:
            if sock is not None:
                sock.close()
            text = "cannot listen on %s: %s" % (self.listen_text(), e.strerror or e)
            if text != self.listen_error:
                log.error("%s (port below 1024 needs root; tried again every %gs)", text, BIND_RETRY)
            self.listen_error = text
            self._retry_at = self.clock() + BIND_RETRY
            return False
        self.listener = sock
        self.address = sock.getsockname()[:2]
        self.listen_error = None
        log.info("serving cached readings on %s: %s", self.listen_text(), self.units_text() or "no device yet")
        return True

    def listen_text(self):
        host, port = self.address or self.settings.listen
        return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)

    # -- what is served ------------------------------------------------------------------------
    def watch(self, states):
        """Serve `states`' devices (agent.polling.DeviceState). A device whose plan is the same as
        before a reload keeps its cached blocks, so SCADA sees no gap at a SIGHUP."""
        old = {}
        for targets in self.units.values():
            for t in targets:
                old[t.device.name] = t.device
        units = {}
        for st in states:
            d = st.device
            gu = gateway_unit(d)
            if gu is None:
                continue
            prev = old.get(d.name)
            if prev is not None and prev is not d and _same_plan(prev, d) and not any(d.blocks):
                d.blocks = list(prev.blocks)
            units.setdefault(gu, []).append(Target(d, st, self.settings.max_age))
        self.units = units

    def units_text(self):
        return ", ".join("unit %d = %s" % (u, "+".join(t.device.name for t in ts))
                         for u, ts in sorted(self.units.items()))

    def update(self, cfg):
        """A reload that keeps `listen`: the live limits (max_clients, idle_timeout, max_age)."""
        self.settings = cfg.gateway

    # -- the loop's side (agent.service) -------------------------------------------------------
    def fds(self):
        out = list(self.clients)
        if self.listener is not None and self.clock() >= self._accept_pause_until:
            out.append(self.listener)
        return out

    def write_fds(self):
        return [s for s, c in self.clients.items() if c.outbuf]

    def serve(self, until):
        now = self.clock()
        if self.listener is None and now >= self._retry_at:
            self._open()
        readers = self.fds()
        writers = self.write_fds()
        if readers or writers:
            try:
                r, w, _ = select.select(readers, writers, [], 0)
            except (OSError, ValueError) as e:   # a socket closed under us: drop the bad ones
                self._prune(e)
                return
            for s in w:
                c = self.clients.get(s)
                if c is not None:
                    self._flush(c, now)
            for s in r:
                if self.clock() >= until:
                    break
                if s is self.listener:
                    self._accept(now)
                else:
                    c = self.clients.get(s)
                    if c is not None:
                        self._read(c)
        self._expire(self.clock())

    def _accept(self, now):
        for _ in range(ACCEPT_BURST):
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:      # EMFILE and the like: say so, and do not spin on it
                self._log("accept", "accept failed: %s (not accepting for %gs)", e, ACCEPT_PAUSE)
                self._accept_pause_until = self.clock() + ACCEPT_PAUSE
                return
            if len(self.clients) >= self.settings.max_clients:
                self.refused += 1
                self._log("full", "%s refused: %d clients connected already (max_clients)",
                          _peer_text(peer), len(self.clients))
                sock.close()
                continue
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            self.clients[sock] = _Client(sock, peer, now)
            self.accepted += 1
            log.debug("client %s connected (%d now)", _peer_text(peer), len(self.clients))

    def _read(self, c):
        try:
            data = c.sock.recv(RECV_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._drop(c, "error", "connection error: %s" % (e.strerror or e))
            return
        if not data:
            self._drop(c, None, "closed by the client")
            return
        now = self.clock()
        c.last = now
        buf = c.inbuf
        buf += data
        try:
            reqs, used = split_requests(buf)
        except FrameError:
            self._drop(c, "bad_frame", "not Modbus TCP (bad MBAP header): %s" % hexdump(buf, 32))
            return
        if used:
            del buf[:used]
        if reqs:
            units = self.units
            out = c.outbuf
            for tid, unit, pdu in reqs:
                adu, outcome = respond(tid, unit, pdu, units, now)
                out += adu
                if outcome is OK:
                    self.answered += 1
                else:
                    self.exceptions[outcome] = self.exceptions.get(outcome, 0) + 1
            self.requests += len(reqs)
            self._flush(c, now)

    def _flush(self, c, now):
        try:
            n = c.sock.send(c.outbuf)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as e:
            self._drop(c, "error", "send failed: %s" % (e.strerror or e))
            return
        if n:
            del c.outbuf[:n]
            c.last = now
        if len(c.outbuf) > OUT_MAX:
            self._drop(c, "slow_reader", "does not read its answers (%d bytes waiting)" % len(c.outbuf))

    def _expire(self, now):
        idle = self.settings.idle_timeout
        for c in [c for c in self.clients.values() if now - c.last > idle]:
            self._drop(c, "idle", "idle for %gs (idle_timeout)" % idle)

    def _drop(self, c, why, text):
        self.clients.pop(c.sock, None)
        try:
            c.sock.close()
        except OSError:
            pass
        if why is None:
            log.debug("client %s: %s", _peer_text(c.peer), text)
            return
        self.dropped[why] += 1
        self.last_error = "client %s: %s" % (_peer_text(c.peer), text)
        self._log(why, "client %s dropped: %s", _peer_text(c.peer), text)

    def _prune(self, err):
        for s, c in list(self.clients.items()):
            if s.fileno() < 0:
                self._drop(c, "error", str(err))

    def _log(self, what, fmt, *args):
        """Warn at most once per LOG_EVERY per kind of trouble (a flood must not fill logread)."""
        now = self.clock()
        last = self._logged.get(what)
        if last is not None and now - last < LOG_EVERY:
            self._suppressed[what] = self._suppressed.get(what, 0) + 1
            return
        self._logged[what] = now
        more = self._suppressed.pop(what, 0)
        log.warning(fmt + (" (%d more like it in the last %gs)" % (more, LOG_EVERY) if more else ""), *args)

    def state(self):
        return {
            "listen": self.listen_text(),
            "listening": self.listener is not None,
            "listen_error": self.listen_error,
            "clients": len(self.clients),
            "peers": sorted(_peer_text(c.peer) for c in self.clients.values()),
            "clients_total": self.accepted,
            "refused_clients": self.refused,
            "requests": self.requests,
            "answered": self.answered,
            "exceptions": {"%02X" % k: v for k, v in sorted(self.exceptions.items())},
            "dropped": dict(self.dropped),
            "last_error": self.last_error,
            "units": {str(u): [t.device.name for t in ts] for u, ts in sorted(self.units.items())},
        }

    def close(self):
        for c in list(self.clients.values()):
            self._drop(c, None, "gateway closing")
        if self.listener is not None:
            self.listener.close()
            self.listener = None


def _same_plan(a, b):
    return (a.connection.name == b.connection.name and a.unit == b.unit
            and [(r.function, r.address, r.count) for r in a.requests]
            == [(r.function, r.address, r.count) for r in b.requests])
