"""One connection to the broker, driven from the loop's gaps: paho-mqtt without its thread.

The socket is ours until the MQTT CONNECT: a non-blocking TCP connect and, for mqtts, a
non-blocking TLS handshake, advanced by `advance(until)` in whatever gaps there are (never past
`until`, the loop's deadline), all within `connect_timeout`. Then paho takes the socket (a Client
whose `_create_socket` hands ours over) and sends CONNECT; from there `pump(until)` selects on
the socket and calls paho's loop_read / loop_write / loop_misc (keepalive) until `until` or until
`done()` says there is nothing left to wait for. paho is imported here only, and this module is
imported only when [mqtt] is configured (agent.outputs).

Name resolution (getaddrinfo) blocks: it is done once per connect attempt, at its start, only
when a gap starts one; a literal address or /etc/hosts costs nothing. A new paho Client per
connection: its in-flight state is never resent by paho (the spool is what resends).
"""
import errno
import select
import socket
import ssl
import time

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

# Session.state values
TCP, TLS, MQTT, UP, DOWN = "tcp", "tls", "mqtt", "up", "down"

# CONNACK reasons that need the operator, not time (ERROR, with a hint)
AUTH_HINT = "check [mqtt] username / password (and the broker's password file or ACL)"
_OPERATOR_CODES = {0x84: "set [mqtt] protocol = 3.1.1 (the broker does not speak MQTT 5)",
                   0x85: "check [mqtt] client_id (the broker refuses it)",
                   0x86: AUTH_HINT, 0x87: AUTH_HINT, 0x8C: AUTH_HINT, 0x8A: "the broker bans this client",
                   0x01: "set [mqtt] protocol = 5 or 3.1.1 to what the broker speaks",
                   0x02: "check [mqtt] client_id (the broker refuses it)", 0x04: AUTH_HINT, 0x05: AUTH_HINT}


class ConnectFailed(Exception):
    """A connect attempt failed. `hint`: what the operator should do (None: an outage)."""

    def __init__(self, reason, hint=None):
        super().__init__(reason)
        self.reason, self.hint = reason, hint


class _Client(paho.Client):
    """paho's client, given a socket that is already connected (and TLS-wrapped)."""

    _given_sock = None

    def _create_socket(self):
        sock, self._given_sock = self._given_sock, None
        if sock is None:
            raise OSError(errno.ENOTCONN, "no socket prepared")
        return sock


def tls_context(ca_file=None, cert_file=None, key_file=None, insecure=False):
    """The TLS context for mqtts (ssl errors propagate: the caller says which file is wrong)."""
    ctx = ssl.create_default_context(cafile=ca_file)
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file)
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Session:
    """One connect attempt and, once up, the connection. `s`: the [mqtt] settings (agent.config);
    `tls`: an ssl context or None; `will`: (topic, payload) or None; `on_publish(mid, reason)`:
    paho's PUBACK (QoS 1) or written (QoS 0) callback; `mono`: time.monotonic."""

    def __init__(self, s, host, port, tls, client_id, will, on_publish, mono=time.monotonic):
        self.s = s
        self.host, self.port, self.tls = host, port, tls
        self.client_id = client_id
        self.will = will
        self.on_publish = on_publish
        self.mono = mono
        self.state = TCP
        self.deadline = mono() + s.connect_timeout
        self.sock = None
        self.client = None
        self.reason = None          # why it went DOWN
        self.hint = None
        self.max_packet = None      # the broker's Maximum Packet Size (MQTT 5 CONNACK), if any
        self.connack = None         # (code, reason text) of the CONNACK
        self.started = mono()
        self.lost = False           # DOWN after having been UP
        self._want = "w"            # what the socket waits for before the next step: r, w or rw
        self._open()

    # -- connecting ----------------------------------------------------------------------
    def _open(self):
        try:
            infos = socket.getaddrinfo(self.host, self.port, 0, socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise ConnectFailed("cannot resolve %s: %s" % (self.host, e.strerror or e)) from None
        family, kind, proto, _name, addr = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        # small PUBLISH packets as they come: Nagle + the broker's delayed ACK stall the window
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(addr)
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            sock.close()
            raise ConnectFailed("connect to %s port %d: %s" % (self.host, self.port, _strerror(err)))
        self.sock = sock
        self._want = "w"

    def advance(self, until):
        """Go on connecting until UP, DOWN (ConnectFailed raised) or `until`. -> state."""
        while self.state in (TCP, TLS, MQTT):
            now = self.mono()
            if now >= self.deadline:
                self._down("no %s within [mqtt] connect_timeout = %gs" % (
                    {TCP: "TCP connection", TLS: "TLS handshake", MQTT: "CONNACK"}[self.state],
                    self.s.connect_timeout))
                raise ConnectFailed(self.reason)
            wait = min(until, self.deadline) - now
            if wait < 0:
                return self.state
            if not self._ready(wait):
                if self.mono() >= until:
                    return self.state
                continue
            try:
                self._step()
            except ConnectFailed as e:
                self._down(e.reason, e.hint)
                raise
            if self.state == DOWN:      # refused in paho's CONNACK callback
                raise ConnectFailed(self.reason, self.hint)
        return self.state

    def _ready(self, wait):
        r = [self.sock] if "r" in self._want else []
        w = [self.sock] if "w" in self._want else []
        if self.state == MQTT and isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        try:
            rr, ww, _ = select.select(r, w, [], max(0.0, wait))
        except (OSError, ValueError):
            return True     # the step finds out what is wrong
        return bool(rr or ww)

    def _step(self):
        if self.state == TCP:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise ConnectFailed("connect to %s port %d: %s" % (self.host, self.port, _strerror(err)))
            if self.tls is not None:
                self.sock = self.tls.wrap_socket(self.sock, server_hostname=self.host, do_handshake_on_connect=False)
                self.state = TLS
                self._want = "rw"
            else:
                self._connect_mqtt()
            return
        if self.state == TLS:
            try:
                self.sock.do_handshake()
            except ssl.SSLWantReadError:
                self._want = "r"
                return
            except ssl.SSLWantWriteError:
                self._want = "w"
                return
            except ssl.SSLCertVerificationError as e:
                raise ConnectFailed("TLS: certificate verify failed: %s" % (e.verify_message or e),
                                    "check [mqtt] ca_file (the CA that signed the broker's certificate) and "
                                    "that the url's host is the name in the certificate") from None
            except (ssl.SSLError, OSError) as e:
                raise ConnectFailed("TLS handshake with %s: %s" % (self.host, e)) from None
            self._connect_mqtt()
            return
        # MQTT: CONNECT sent, CONNACK awaited
        c = self.client
        rc = c.loop_read()
        if self.state == MQTT and c.want_write():
            c.loop_write()
        if self.state == MQTT and rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise ConnectFailed(self._closed_reason(rc))

    def _connect_mqtt(self):
        s = self.s
        v5 = s.protocol == "5"
        c = _Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                    clean_session=None if v5 else True,
                    protocol=paho.MQTTv5 if v5 else paho.MQTTv311, reconnect_on_failure=False)
        c.suppress_exceptions = False
        c.max_inflight_messages_set(s.inflight)
        if s.username is not None:
            c.username_pw_set(s.username, s.password)
        if self.will is not None:
            c.will_set(self.will[0], self.will[1], qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_publish = self._on_publish
        c.on_disconnect = self._on_disconnect
        c.connect_async(self.host, self.port, keepalive=int(s.keepalive),
                        **({"clean_start": True} if v5 else {}))
        c._given_sock = self.sock
        self.client = c
        self.state = MQTT
        self._want = "r"
        rc = c.reconnect()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise ConnectFailed("sending CONNECT: %s" % paho.error_string(rc))

    def _on_connect(self, client, userdata, flags, reason, properties):
        code = getattr(reason, "value", reason)
        self.connack = (code, str(reason))
        if getattr(reason, "is_failure", code != 0):
            hint = _OPERATOR_CODES.get(code)
            self._down("broker refused the connection: CONNACK %s (0x%02X)" % (reason, code), hint)
            return
        self.max_packet = getattr(properties, "MaximumPacketSize", None) if properties is not None else None
        self.state = UP

    def _on_publish(self, client, userdata, mid, reason, properties):
        self.on_publish(mid, reason)

    def _on_disconnect(self, client, userdata, flags, reason, properties):
        if self.state == UP:
            self.lost = True
            self._down("connection lost: %s" % reason)

    def _closed_reason(self, rc):
        if self.reason:
            return self.reason
        return "broker closed the connection before CONNACK (%s)" % paho.error_string(rc)

    # -- connected -----------------------------------------------------------------------
    def pump(self, until, done=None):
        """Exchange packets until `until` or `done()`; -> True while UP. Always one round,
        even when `until` has passed (a zero-timeout select): keepalive and PUBACKs read."""
        first = True
        while self.state == UP:
            if done is not None and done():
                return True
            now = self.mono()
            if not first and now >= until:
                return True
            first = False
            c = self.client
            r = [self.sock]
            w = [self.sock] if c.want_write() else []
            pending = isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()
            wait = 0.0 if pending else max(0.0, min(until, now + 1.0) - now)
            try:
                rr, ww, _ = select.select(r, w, [], wait)
            except (OSError, ValueError) as e:
                self._lose("select: %s" % e)
                return False
            if (rr or pending) and not self._rc(c.loop_read(), "read"):
                return False
            if (ww or c.want_write()) and not self._rc(c.loop_write(), "write"):
                return False
            if not self._rc(c.loop_misc(), "keepalive"):
                return False
        return False

    def _rc(self, rc, what):
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            return self.state == UP
        self._lose("%s: %s" % (what, paho.error_string(rc)))
        return False

    def _lose(self, reason):
        if self.state == UP:
            self.lost = True
        self._down(self.reason or "connection lost: %s" % reason)

    def publish(self, topic, payload, qos, retain=False):
        """-> mid (paho queues beyond the in-flight window); raises ConnectFailed when down."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise ConnectFailed("publish: %s" % paho.error_string(info.rc))
        return info.mid

    def ping_due(self):
        """time.monotonic() when paho will send its next PINGREQ (keepalive without traffic)."""
        c = self.client
        try:
            return min(c._last_msg_out, c._last_bytes_received) + c._keepalive
        except (AttributeError, TypeError):     # another paho: every keepalive/2 is safe
            return self.mono() + self.s.keepalive / 2.0

    def inflight(self):
        c = self.client
        return len(c._out_messages) if c is not None else 0

    # -- ending --------------------------------------------------------------------------
    def _down(self, reason, hint=None):
        if self.state == DOWN:
            return
        self.state = DOWN
        self.reason = self.reason or reason
        self.hint = self.hint or hint
        self._close_sock()

    def _close_sock(self):
        c, self.client = self.client, None
        if c is not None:
            c.on_disconnect = None
            try:
                c._sock_close()
            except Exception:   # closing a broken connection: nothing to save
                pass
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None

    def close(self, last=None, wait=0.5):
        """A clean end: publish `last` = (topic, payload) retained, DISCONNECT, and flush for
        `wait` seconds at most."""
        if self.state == UP and self.client is not None:
            c = self.client
            try:
                if last is not None:
                    c.publish(last[0], last[1], qos=0, retain=True)
                c.disconnect()
                end = self.mono() + wait
                while c.want_write() and self.mono() < end:
                    select.select([], [self.sock], [], max(0.0, end - self.mono()))
                    if c.loop_write() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                        break
            except Exception:   # going away anyway
                pass
        self.state = DOWN
        self.reason = self.reason or "closed"
        self._close_sock()


def _strerror(err):
    try:
        import os

        return "%s (%s)" % (os.strerror(err), errno.errorcode.get(err, err))
    except ValueError:
        return str(err)
