"""The MQTT output ("mqtt", agent.output): publishes the spool to a broker, in the gaps between polls.

Delivery, QoS 1: a batch of the spool (its own cursor "mqtt") becomes messages (agent.mqtt.message:
one per record, or JSON arrays per topic with `batch = yes`), published with at most `inflight`
of them unacknowledged at a time (paho queues the rest, unsent); the spool acknowledges the
batch only once every message of it has its PUBACK. A connection lost with a batch in flight
acknowledges the prefix of the batch whose messages all had their PUBACK, and the rest goes out
again on the next connection (logged: "sending again seq A..B"), so a duplicate is always a
resend of a record the spool had not acknowledged. A broker that is down, restarted or
unreachable for a day costs latency only: the spool holds the records, as for HTTP.

QoS 0: a message counts as delivered when paho has written it to the socket; the broker confirms
nothing, so a connection lost (or a broker restarting) right after may lose what was written
just before (at most the batch in flight): logged once at start.

Time: no call blocks past the loop's `until`: the TCP connect and TLS handshake are non-blocking
(agent.mqtt.session), waiting for PUBACKs is a select bounded by `until`; a batch whose PUBACKs
have not all come by then stays in flight and is finished in the next gap (nothing is cut short:
the connection carries it). A new batch is started only when the time left covers what a batch
has been taking the CPU: handing a batch to paho (topics, packets, socket writes) measured by
agent.upload.timing.RequestTimes (shared with the HTTP output); the round trip to the broker is
not part of it, since a batch in flight never holds the loop.

Failures, each one WARNING (an outage) or ERROR (the operator must act: a wrong password, a
certificate, a refused client id) per attempt, i.e. once per back-off step, never once per gap;
the back-off doubles up to `backoff_max` with jitter; `state()` has last_error for `status`:
  unreachable / refused / timeout     back off, records stay
  CONNACK refused (bad password ...)  back off, ERROR with the CONNACK reason and a hint
  PUBACK refused (MQTT 5 reason >= 0x80)
      0x90 topic invalid, 0x95 packet too large, 0x99 payload format invalid: the message's own
          fault: a single record is quarantined; a batch message makes messages smaller
      anything else (not authorized, quota, the broker's own error): back off, records stay
  connections lost again and again over the same records, none acknowledged (what mosquitto
      does for a message above its message_size_limit): back off, ERROR with that hint
  a record too big to ever publish (its message alone above max_message_kb, or above the
  broker's Maximum Packet Size from CONNACK): quarantined (agent.upload.quarantine, its own
  file `[mqtt] quarantine_file`, default <spool_dir>/mqtt-quarantine.jsonl), the queue moves on.

Status topic: `status_topic` (default modbus/{agent}/status) gets "online" retained after each
CONNACK and "offline" retained at a clean stop; the Last Will says "offline" when the agent
vanishes (kill, power, link).
"""
import logging
import random
import time

from agent.common import redact
from agent.mqtt import message
from agent.mqtt.session import DOWN, UP, ConnectFailed, Session, tls_context
from agent.mqtt.topic import Template
from agent.mqtt.url import parse_url
from agent.output import BACKOFF, DEADLINE, EMPTY, SLICE, STOPPED, Output
from agent.upload.quarantine import Quarantine
from agent.upload.timing import RequestTimes
from agent.wire import utc_timestamp

log = logging.getLogger("agent.mqtt")

BACKOFF_BASE = 1.0
# A connect attempt starts in any gap at least this long: its steps never block (but for the
# name lookup, see agent.mqtt.session), it goes on in the next gaps.
CONNECT_GAP = 0.005
# The longest one fill_gap call waits in select for the broker (a CONNACK, PUBACKs) before it
# hands the gap back with SLICE: the loop serves its services (the Modbus TCP gateway) between
# slices, and a broker that is slow or stalled must not keep SCADA's requests waiting for the
# whole gap. Waiting costs nothing but a wake-up, so the slice is short.
WAIT_SLICE = 0.05
# Connections lost in a row with the same records in flight and none acknowledged before the
# log says what that usually means (a message above the broker's size limit)
LOST_STREAK = 3
# PUBACK reasons that are the message's own fault (sending it again cannot help)
MESSAGE_FAULT = {0x90: "topic name invalid", 0x95: "packet too large", 0x99: "payload format invalid"}
# the broker's own refusal (mosquitto says this for a message above its message_size_limit)
IMPLEMENTATION_SPECIFIC = 0x83


class MqttOutput(Output):
    """`s`: the [mqtt] settings (agent.config.schema.MqttSettings); `agent_id`: [agent] id."""

    name = "mqtt"
    label = "mqtt"

    def __init__(self, s, agent_id, quarantine=None, mono=time.monotonic):
        self.s = s
        self.agent_id = agent_id
        self.mono = mono
        self.tls_on, self.host, self.port = parse_url(s.url)
        self.url_shown = redact(s.url)
        self.topic = Template(s.topic)
        self.status_topic = Template(s.status_topic).render(agent_id) if s.status_topic else None
        self.client_id = s.client_id or agent_id
        self.qos = s.qos
        self.max_bytes = int(s.max_message_kb * 1024)
        self._limit_bytes = self.max_bytes      # lowered after a batch message was refused as too big
        self.quarantine = quarantine if quarantine is not None else Quarantine(s.quarantine_file, label="mqtt")
        self._tls = None
        if self.tls_on:
            self._tls = tls_context(s.ca_file, s.cert_file, s.key_file, s.insecure)
        self._session = None
        self._batch = None          # the spool batch in flight
        self._msgs = []             # its messages
        self._mids = {}             # mid -> index in _msgs
        self._acked = []            # per message: None (waiting), True (PUBACK ok), reason (refused)
        self._waiting = 0
        self._resend = None         # (first, last) seq not acknowledged when the last connection went
        self._batch_first = None    # the first seq this process published
        self._early = self._early_reason = None
        self._lost_streak = (None, 0)   # (first seq not acknowledged, connections lost over it)
        self._times = RequestTimes()
        self._failures = 0
        self._backoff_until = 0.0
        self._st = {"connected": False, "broker": self.url_shown, "qos": self.qos, "last_ok": None,
                    "last_error": None, "last_error_at": None, "backoff_until": None, "connected_since": None,
                    "sent_total": 0, "messages_total": 0, "batches_total": 0, "resent_total": 0,
                    "quarantined_total": 0, "refused_total": 0, "failures_total": 0, "consecutive_failures": 0,
                    "broker_max_packet": None}
        if self.qos == 0:
            log.warning("mqtt: qos = 0: a record leaves the spool once it is written to the socket; the broker "
                        "confirms nothing, so records written just before a connection is lost or the broker "
                        "restarts can be lost (at most one batch); qos = 1 delivers at least once")

    # ------------------------------------------------------------------ the Output interface

    def request_time(self):
        return self._times.need()

    def retry_at(self):
        """The end of a back-off; while connected, when the next keepalive ping is due (a poll
        interval longer than `keepalive` must not let the broker drop the connection)."""
        now = self.mono()
        if self._backoff_until > now:
            return self._backoff_until
        sess = self._session
        if sess is not None and sess.state == UP:
            return max(now + 1.0, sess.ping_due())     # (keepalive >= 5s: never a busy wake-up)
        return None

    def state(self):
        st = dict(self._st)
        st["inflight"] = self._waiting
        st["request_time"] = round(self.request_time(), 3)
        return st

    def close(self):
        if self._session is not None:
            self._session.close((self.status_topic, b"offline") if self.status_topic else None)
            self._session = None
        self._st["connected"] = False

    def fill_gap(self, spool, until, slice_end=None, stop=None):
        res = {"status": EMPTY, "sent": 0, "batches": 0, "quarantined": 0}
        if self.mono() < self._backoff_until:
            res["status"] = BACKOFF
            return res
        started = False
        # waits end here (a slice: see WAIT_SLICE); without slice_end the caller gave the whole gap
        wait_end = until if slice_end is None else min(until, slice_end, self.mono() + WAIT_SLICE)
        while True:
            if stop is not None and stop():
                res["status"] = STOPPED
                return res
            now = self.mono()
            sess = self._session
            if sess is None or sess.state != UP:
                if sess is not None and sess.state == DOWN:     # went down since the last look
                    self._lost(spool, res)
                    res["status"] = BACKOFF
                    return res
                status = self._connect(until, wait_end)
                if status is not None:
                    res["status"] = self._sliced(status, until, wait_end)
                    return res
                continue
            if self._batch is not None:
                sess.pump(wait_end, self._batch_done)
                if sess.state != UP:
                    self._lost(spool, res)
                    continue
                if not self._batch_done():
                    res["status"] = self._sliced(DEADLINE, until, wait_end)
                    return res
                self._finish(spool, res)
                continue
            if started and slice_end is not None and now >= slice_end:
                res["status"] = SLICE
                return res
            if until - now < self.request_time():
                sess.pump(now)      # keepalive, late PUBACKs: one zero-timeout round
                res["status"] = DEADLINE
                return res
            batch = spool.peek(self.s.batch_max_records, self.s.batch_max_kb * 1024, output=self.name)
            if batch is None:
                sess.pump(now)
                return res
            started = True
            self._start(spool, batch, res)
            if self._session is None:
                res["status"] = BACKOFF
                return res

    # ------------------------------------------------------------------ connecting

    def _sliced(self, status, until, wait_end):
        """DEADLINE at the end of a wait slice before the gap's end is SLICE: call again."""
        return SLICE if status == DEADLINE and wait_end < until and self.mono() < until else status

    def _connect(self, until, wait_end=None):
        """Start or advance a connect attempt, waiting until `wait_end` (default `until`) at
        most. -> None when UP; DEADLINE: time's up (an attempt goes on in the next gap or
        slice); BACKOFF: it failed."""
        if self._session is None:
            if until - self.mono() < CONNECT_GAP:
                return DEADLINE
            will = (self.status_topic, b"offline") if self.status_topic else None
            try:
                self._session = Session(self.s, self.host, self.port, self._tls, self.client_id, will,
                                        self._on_publish, self.mono)
            except ConnectFailed as e:
                self._fail(e.reason, e.hint)
                return BACKOFF
        try:
            state = self._session.advance(until if wait_end is None else wait_end)
        except ConnectFailed as e:
            self._session = None
            self._fail(e.reason, e.hint)
            return BACKOFF
        if state != UP:
            return DEADLINE
        sess = self._session
        self._times.alive = True
        took = self.mono() - sess.started
        mp = sess.max_packet
        self._st["broker_max_packet"] = mp
        self._st["connected"] = True
        self._st["connected_since"] = utc_timestamp(time.time())
        if self._failures:
            log.info("mqtt: connected to %s again after %d failure(s)", self.url_shown, self._failures)
        else:
            log.info("mqtt: connected to %s (%.0f ms, qos %d%s)", self.url_shown, 1000 * took, self.qos,
                     ", broker's maximum packet %d bytes" % mp if mp else "")
        # the failure count (the back-off's doubling) goes back to 0 with the first record
        # acknowledged (_count), not here: a broker that takes the connection and drops it
        # over the same message again must meet a growing back-off, not a reconnect a second
        self._st["backoff_until"] = None
        if self.status_topic:
            try:
                sess.publish(self.status_topic, b"online", qos=1, retain=True)
            except ConnectFailed as e:
                log.warning("mqtt: status topic %s: %s", self.status_topic, e.reason)
        return None

    def _fail(self, reason, hint=None):
        """A connect attempt or a connection failed: one log line, back off."""
        self._failures += 1
        st = self._st
        st["connected"] = False
        st["failures_total"] += 1
        st["consecutive_failures"] = self._failures
        text = redact(reason) + ("; " + hint if hint else "")
        st["last_error"] = text
        st["last_error_at"] = utc_timestamp(time.time())
        delay = min(self.s.backoff_max, BACKOFF_BASE * (2 ** min(self._failures - 1, 30)))
        delay *= random.uniform(0.5, 1.0)
        self._backoff_until = self.mono() + delay
        st["backoff_until"] = utc_timestamp(time.time() + delay)
        log.log(logging.ERROR if hint else logging.WARNING, "mqtt: %s: %s; retry in %.1fs (failure %d)",
                self.url_shown, text, delay, self._failures)

    # ------------------------------------------------------------------ batches

    def _limit(self):
        """The biggest PUBLISH packet a message may be: ours, or the broker's when lower."""
        mp = self._session.max_packet if self._session is not None else None
        return min(self._limit_bytes, mp) if mp else self._limit_bytes

    def _start(self, spool, batch, res):
        """Publish `batch` (its messages go out as the window allows), or quarantine the
        too-big record it starts with."""
        limit = self._limit()
        agent_id = self.agent_id
        plan = message.plan(batch.lines, lambda line: self.topic.for_line(line, agent_id), self.s.batch, limit)
        if plan.too_big is not None:
            i, size = plan.too_big
            if i == 0:
                bad = batch.split(1)[0] if batch.count > 1 else batch
                why = "MQTT: message of %d bytes is above %s (%d bytes): can never be published" % (
                    size + message.PACKET_OVERHEAD, "the broker's maximum packet size" if limit < self._limit_bytes
                    else "[mqtt] max_message_kb", limit)
                self.quarantine.keep(spool, bad, why)
                self._st["quarantined_total"] += bad.count
                res["quarantined"] += bad.count
                return
            batch = batch.split(i)[0]   # what comes before it goes now, then it is first
        if not self._st["batches_total"] and self._batch_first is None:
            # what this process starts from: after a kill, the batch in flight then goes again
            self._batch_first = batch.first_seq
            log.info("mqtt: publishing from seq %d (the first record the broker has not acknowledged)",
                     batch.first_seq)
        if self._resend is not None:
            lo, hi = self._resend
            if batch.first_seq <= hi:
                log.info("mqtt: sending again seq %d..%d (not acknowledged by the broker when the connection "
                         "was lost)", max(lo, batch.first_seq), min(hi, batch.last_seq))
                self._st["resent_total"] += sum(1 for q in batch.seqs if lo <= q <= hi)
            if batch.last_seq >= hi:
                self._resend = None
        self._batch = batch
        self._msgs = plan.messages
        self._acked = [None] * len(self._msgs)
        self._mids = {}
        self._waiting = len(self._msgs)
        t0 = self.mono()
        try:
            for i, m in enumerate(self._msgs):
                self._early = None
                mid = self._session.publish(m.topic, m.payload, self.qos, self.s.retain)
                self._mids[mid] = i
                if self._early == mid:      # QoS 0: written (and "published") inside publish()
                    self._on_publish(mid, self._early_reason)
            self._early = None
            # what handing a batch over takes (the CPU's time: the PUBACKs are waited for in
            # select, bounded by the gap, and a batch in flight goes on in the next gap)
            self._times.answered(False, self.mono() - t0)
        except ConnectFailed as e:
            log.warning("mqtt: %s", e.reason)
            self._session.close()
            self._lost(spool, res)

    def _on_publish(self, mid, reason):
        i = self._mids.pop(mid, None)
        if i is None:
            # the status topic's, a batch given up on, or QoS 0 inside publish() (see _start)
            self._early, self._early_reason = mid, reason
            return
        code = getattr(reason, "value", 0) or 0
        self._acked[i] = True if code < 0x80 else (code, str(reason))
        self._waiting -= 1
        if code >= 0x80:
            self._st["refused_total"] += 1

    def _batch_done(self):
        return self._waiting <= 0 or any(a is not None and a is not True for a in self._acked)

    def _finish(self, spool, res):
        """Every message of the batch is answered (or one was refused)."""
        refused = next(((i, a) for i, a in enumerate(self._acked) if a is not None and a is not True), None)
        if refused is None:
            b = self._batch
            spool.ack(b)
            self._count(b.count, len(self._msgs), res)
            self._clear()
            return
        i, (code, reason) = refused
        m = self._msgs[i]
        self._ack_prefix(spool, res)
        self._session.close()
        self._session = None
        self._st["connected"] = False
        what = "broker refused a message of %d record(s), %d bytes, to %s: PUBACK %s (0x%02X)" % (
            m.count, len(m.payload), m.topic, reason, code)
        if code in MESSAGE_FAULT or code == IMPLEMENTATION_SPECIFIC:
            if m.count > 1:
                self._limit_bytes = max(1024, len(m.payload) // 2)
                log.warning("mqtt: %s: messages of at most %d bytes from now on", what, self._limit_bytes)
                self._clear()
                return
            if code in MESSAGE_FAULT:
                b = spool.peek(1, 1 << 30, output=self.name)
                if b is not None:
                    self.quarantine.keep(spool, b, "MQTT: " + what)
                    self._st["quarantined_total"] += b.count
                    res["quarantined"] += b.count
                self._clear()
                return
        self._clear()
        hint = ("the broker refused it (mosquitto does so for a message above its message_size_limit): "
                "set [mqtt] max_message_kb below the broker's limit" if code == IMPLEMENTATION_SPECIFIC else
                "check the broker's ACL for this user and topic" if code == 0x87 else None)
        self._fail(what, hint)

    def _ack_prefix(self, spool, res):
        """Acknowledge the lines of the leading messages that all had their PUBACK."""
        b = self._batch
        waiting = [m.first for m, a in zip(self._msgs, self._acked) if a is not True]
        end = min(waiting) if waiting else b.count
        done = sum(1 for m, a in zip(self._msgs, self._acked) if a is True and m.first < end)
        if end == 0:
            return b
        if end >= b.count:
            spool.ack(b)
            self._count(b.count, done, res)
            return None
        head, rest = b.split(end)
        spool.ack(head)
        self._count(head.count, done, res)
        return rest

    def _lost(self, spool, res):
        """The connection went while a batch was in flight (or before one)."""
        sess, self._session = self._session, None
        self._times.alive = False
        reason = sess.reason if sess is not None else "connection lost"
        hint = None
        if self._batch is not None:
            rest = self._ack_prefix(spool, res)
            if rest is not None:
                self._resend = (rest.first_seq, rest.last_seq)
                reason += "; %d record(s) seq %d..%d not acknowledged: sent again on the next connection" % (
                    rest.count, rest.first_seq, rest.last_seq)
                # the same records, again nothing acknowledged: the broker drops the connection
                # over them (mosquitto does so for a message above its message_size_limit)
                streak = self._lost_streak
                self._lost_streak = (rest.first_seq, streak[1] + 1 if streak[0] == rest.first_seq else 1)
                if self._lost_streak[1] >= LOST_STREAK:
                    biggest = max((len(m.payload) for m in self._msgs), default=0)
                    hint = ("the connection was lost %d times in a row while publishing the same records "
                            "(biggest message %d bytes): a broker closes it so for a message above its own "
                            "size limit (mosquitto: message_size_limit); set [mqtt] max_message_kb below "
                            "that limit (records above it are then quarantined)" % (self._lost_streak[1], biggest))
            self._clear()
        self._fail(reason, hint)

    def _count(self, records, messages, res):
        self._lost_streak = (None, 0)
        self._failures = 0
        st = self._st
        st["consecutive_failures"] = 0
        st["sent_total"] += records
        st["messages_total"] += messages
        st["batches_total"] += 1
        st["last_ok"] = utc_timestamp(time.time())
        res["sent"] += records
        res["batches"] += 1

    def _clear(self):
        self._batch = None
        self._msgs = []
        self._acked = []
        self._mids = {}
        self._waiting = 0
