"""The HTTP uploader (the loop's "http" output, agent.output): drains the spool to the collector in bulk batches, in the gaps between polls.

Wire format (issue 4): POST {url} with body {"agent": ID, "records": [record, ...]} built by joining
the spool's lines (never re-encoded), Content-Type application/json, optional Content-Encoding gzip,
Authorization: Bearer TOKEN. The collector is idempotent on (agent, seq), so a batch whose answer was
lost is simply sent again: at-least-once here + idempotent storage there = exactly once.

Time: the loop gives `drain` the monotonic time of the next poll. A request is only STARTED when
the time left covers what such a request has been measured to take (`request_time`, see
agent.upload.timing). Once started a request runs to its end (at most its own `[upload] timeout`,
agent.upload.deadline) and the poll waits for it. Cutting a request short would be worse than a
late poll: a collector slower than the gap (cellular + TLS) would store every batch and never
get to acknowledge one. Only the connect phase is bounded by the time left (at least
CONNECT_MIN, a SYN round trip over a slow uplink; nothing has been sent yet, so nothing is
lost): a black-holed SYN costs the gap, not the whole timeout. A request that ran long without
an answer backs off at least NO_ANSWER_BACKOFF times as long (within backoff_max), so a hung or
dribbling server costs polling a bounded share of the time, not a timeout every few polls.

One agent per batch: the envelope's "agent" is always the agent of the records in the batch (every
spool line starts {"agent":ID,"seq":...}). After an `[agent] id` rename the old id's backlog goes
out as the old agent, in order, before the new id's records; nothing is rewritten or quarantined.
If the collector refuses that agent for our token (403: the token belongs to the new id) the
uploader backs off and logs an ERROR saying what to do: keep the old id until the backlog is
uploaded, or let the collector accept this token for the old id. Blocking loudly is the price of
never discarding good readings.

Answers:
  2xx + the collector's answer {"stored": n, ...}
                       stored: the spool acknowledges the batch (a quarantine, below, is the other way out).
                       A 2xx without that answer (a captive portal, a proxy's page, a wrong URL
                       served by some web server) is NOT an acknowledgement: back off.
                       Every record a duplicate while the collector already holds seqs higher
                       than this batch's AND than any this agent could have sent (the highest
                       seq it posted since start, at least the spool's last seq at start): the
                       signature of a seq that restarted or of a second router with the same
                       [agent] id (readings discarded as duplicates): ERROR once per streak,
                       counted as seq_reuse_suspected. A resend after a lost or late answer
                       (halved batch, or a lagging cursor after a restart) never looks so.
  3xx                  not followed (requests would turn the POST into a GET, and a GET's 200
                       would acknowledge records nobody stored): back off, log the Location
  413                  too large: split the batch in halves (down to one record; a single record
                       still too large is quarantined) and send smaller batches from then on
  400, 422, other 4xx  only the collector's own JSON error naming a record ("where":
                       "$.records[i]...", or a position "body: ..." of malformed JSON) rejects
                       records: bisect to find the bad ones, quarantine only those with the
                       reason, go on (one bad record never blocks the queue). Anything else is
                       not the records' fault and backs off with one log line naming the url,
                       the status and the first bytes of the answer: a proxy's or WAF's HTML 400,
                       "where" naming the request ("$.agent", a header), and "$.records[i].agent"
                       when record i does carry an agent id (an id mismatch, not a bad record)
  401 403 404 405 407 408 411 415 421 425 426 429, 5xx, network errors
                       not the records' fault (token, URL, overload, outage): exponential back-off
                       with jitter up to backoff_max, nothing quarantined (Retry-After honoured)
  timeout              the configured `timeout` (the request's total deadline) passed: back off,
                       at least 10x as long as it ran, and send smaller batches (the batch may be
                       too big for the link)
  answer > 64 KiB      not the collector's answer: back off, the batch stays (size in the error)
"""
import gzip as _gzip
import json
import logging
import random
import time

from agent.config import redact
from agent.output import Output
from agent.record import utc_timestamp
from agent.upload import verdict
from agent.upload.deadline import ANSWER_MAX, Alarm, AnswerTooLarge, RequestDeadline, read_answer, short
from agent.upload.quarantine import Quarantine
from agent.upload.timing import CONNECT_MIN, DECAY_GAP, RequestTimes
from agent.upload.verdict import RETRY_4XX
from agent.wire import ENVELOPE_TAIL, envelope_head, line_agent, line_prefix

# requests (with urllib3, ssl, http.client, email) is a third of the agent's imports and ~4 MB:
# imported when an Uploader is built, not by `import agent.upload`, so an agent without
# [upload] (spool only, or MQTT only) never loads it. Not later than the Uploader, though:
# on the simulated router (tools/bench/router.py, scenario 3) an import deferred to the first
# request, or to a background thread, put ~1.5 s of CPU into the first cycles and devices
# missed cycles (up to 3 each at half the assumed speed); before the first poll it costs none.
requests = urllib3 = http = None


def _http():
    """The requests module, imported on first use (with the names _post's except clause needs)."""
    global requests, urllib3, http
    if requests is None:
        import http.client

        import requests as _requests
        import urllib3 as _urllib3
        requests, urllib3 = _requests, _urllib3
    return requests


log = logging.getLogger("agent.upload")

GZIP_LEVEL = 1      # ~3x faster than level 6 on JSON, barely larger: the router's CPU is the bottleneck
BACKOFF_BASE = 1.0
# A request that ran T seconds without an answer (a hung or dribbling server, up to the whole
# timeout) backs off at least this many times T (within backoff_max): such a server holds the
# single loop, and with it polling, for at most ~1/(1 + this) of the time.
NO_ANSWER_BACKOFF = 10.0


class _Retry(Exception):
    """Stop draining and back off."""


class Uploader(Output):
    """The HTTP output: `fill_gap` is `drain`."""

    name = "http"
    label = "upload"

    def __init__(self, url, agent_id, token=None, batch_max_records=500, batch_max_kb=256, gzip=True,
                 timeout=10.0, ca_file=None, verify=True, backoff_max=300.0, session=None,
                 gzip_level=GZIP_LEVEL, quarantine=None):
        self.url = url
        # where rejected records go (agent.upload.quarantine): written, then acknowledged
        self.quarantine = quarantine if quarantine is not None else Quarantine()
        self._url_shown = redact(url)   # what logs and state() show: never the URL's credentials
        self.agent_id = agent_id
        self.batch_max_records = max(1, int(batch_max_records))
        self.batch_max_bytes = max(1024, int(batch_max_kb * 1024))
        self.gzip = bool(gzip)
        self.gzip_level = gzip_level
        self.timeout = float(timeout)
        self.backoff_max = float(backoff_max)
        self._head = envelope_head(agent_id)
        # how the spool's lines of this agent start: a batch whose lines all start so is ours
        self._line_prefix = line_prefix(agent_id)
        _http()
        self._session = session or requests.Session()
        # Passed with every request: a session-level verify loses to $REQUESTS_CA_BUNDLE in
        # requests (psf/requests#3829), which would silently ignore ca_file.
        self._verify = ca_file if ca_file else bool(verify)
        # identity: the answer's size on the wire is its size in memory (ANSWER_MAX holds)
        h = {"Content-Type": "application/json", "User-Agent": "modbus-agent", "Accept-Encoding": "identity"}
        if self.gzip:
            h["Content-Encoding"] = "gzip"
        if token:
            h["Authorization"] = "Bearer %s" % token
        self._headers = h
        # After a 413 (or a timeout) the collector's limit or the link's speed is known to be lower:
        # stay below it for a while.
        self._limit = self.batch_max_records
        self._ok_since_413 = 0
        self._failures = 0
        self._backoff_until = 0.0       # monotonic
        self._retry_after = None
        self._times = RequestTimes()        # what requests take: which gaps can start one
        self._no_answer_took = 0.0          # how long the failed request just now ran unanswered
        self._skipped = False               # the last drain call left its gap unused
        self._seq_reuse_streak = False
        # The highest seq this agent may have put on the collector: seeded at the first drain
        # from the spool's last seq (a previous process may have posted anything it had spooled,
        # and a lagging cursor resends it), raised before every request.
        self._posted_hi = None
        self._st = {"last_ok": None, "last_error": None, "last_error_at": None, "backoff_until": None,
                    "sent_total": 0, "batches_total": 0, "duplicates_total": 0, "quarantined_total": 0,
                    "failures_total": 0, "consecutive_failures": 0, "bytes_sent_total": 0,
                    "last_max_seq": None, "seq_reuse_suspected": 0, "other_agent": None}

    # ------------------------------------------------------------------ public

    def drain(self, spool, deadline, slice_end=None, stop=None):
        """Upload batches until the spool is empty, the time left before the monotonic `deadline`
        (the next poll) is too short to start another request, or an error starts a back-off.
        A started request is never cut short by `deadline`: it runs to its end, `timeout` at
        most. `slice_end` (optional, monotonic): start no further batch after it, so the caller
        regains control (timers, signals) in a long gap. `stop` (optional callable): start no
        further request once it returns true (SIGTERM: the agent stops within one request).
        Returns {"status": "empty"|"deadline"|"slice"|"backoff"|"stopped", "sent", "batches",
        "quarantined"}; returns at once while a back-off is running."""
        res = {"status": "empty", "sent": 0, "batches": 0, "quarantined": 0}
        if self._posted_hi is None:
            self._posted_hi = spool.next_seq - 1
        if time.monotonic() < self._backoff_until:
            res["status"] = "backoff"
            return res
        started = False
        try:
            while True:
                if stop is not None and stop():
                    res["status"] = "stopped"
                    break
                now = time.monotonic()
                left = deadline - now
                need = self.request_time()
                if left < need:
                    if not started and left >= need * DECAY_GAP:
                        # A whole gap unused because of the estimate (the previous call started
                        # nothing either, so this is not just the tail of a busy gap): age it,
                        # or one slow answer would keep every later gap idle for good.
                        if self._skipped:
                            self._times.age()
                        self._skipped = True
                    res["status"] = "deadline"
                    break
                if started and slice_end is not None and now >= slice_end:
                    res["status"] = "slice"
                    break
                batch = spool.peek(self._limit, self.batch_max_bytes, output=self.name)
                if batch is None:
                    break
                started = True
                self._skipped = False
                agent, batch = self._one_agent(batch)
                if not self._send_batch(spool, batch, agent, deadline, res, stop):
                    res["status"] = "stopped" if stop is not None and stop() else "deadline"
                    break
        except _Retry:
            res["status"] = "backoff"
        return res

    def request_time(self):
        """The time a gap must still have for a request to start (seconds): what recent
        requests of the kind the next one will be (on the kept-alive connection, or opening
        one) took, at least the floor an unanswered request left (agent.upload.timing)."""
        return self._times.need()

    def fill_gap(self, spool, until, slice_end=None, stop=None):
        return self.drain(spool, until, slice_end, stop)

    def retry_at(self):
        """When a back-off ends (time.monotonic()), None when not backing off."""
        return self._backoff_until if self._backoff_until > time.monotonic() else None

    def state(self):
        """For the status file."""
        st = dict(self._st)
        st["batch_limit"] = self._limit
        st["request_time"] = round(self.request_time(), 3)
        return st

    def close(self):
        self._session.close()

    # ------------------------------------------------------------------ batches

    def _one_agent(self, batch):
        """-> (agent, the leading part of `batch` whose records all belong to that agent). The
        spool holds the records of an earlier `[agent] id` until they are uploaded; each goes out
        under its own agent, so the collector's (agent, seq) identity is kept."""
        agent, k = leading_agent(batch.lines, self.agent_id, self._line_prefix)
        if agent != self.agent_id:
            if self._st["other_agent"] != agent:
                log.warning("upload: the spool holds records of agent %r (written before [agent] id became "
                            "%r): sending them as %r", agent, self.agent_id, agent)
            self._st["other_agent"] = agent
        if k < batch.count:
            batch = batch.split(k)[0]
        return agent, batch

    def _send_batch(self, spool, batch, agent, deadline, res, stop=None):
        """Send one batch, splitting it on 413 and bisecting it on a rejection. Sub-batches are
        sent in seq order so the spool's cursor only moves forward. False when the time left
        before `deadline` is too short to start the next request, or `stop()` says so (nothing
        is lost: the rest stays in the spool)."""
        stack = [batch]
        while stack:
            b = stack.pop()
            if isinstance(b, tuple):        # a record the collector named: kept aside, in seq order
                b, code, reason = b
                self._quarantine(spool, b, code, reason, res)
                continue
            if deadline - time.monotonic() < self.request_time() or (stop is not None and stop()):
                return False
            code, reason, answer = self._post(b, agent, deadline)
            if code is not None and 200 <= code < 300:
                self._ok(b, agent, answer)
                spool.ack(b)
                res["sent"] += b.count
                res["batches"] += 1
                continue
            if code == 413:
                if b.count > 1:
                    self._limit = max(1, b.count // 2)
                    self._ok_since_413 = 0
                    log.info("upload: 413 for %d records (%d bytes): splitting, batches of at most %d from now",
                             b.count, b.nbytes, self._limit)
                    first, second = b.split()
                    stack.append(second)
                    stack.append(first)
                    continue
                self._quarantine(spool, b, code, reason, res)
                continue
            if code is not None and 400 <= code < 500 and code not in RETRY_4XX and \
                    verdict.names_a_bad_record(b, answer):
                if b.count == 1:
                    self._quarantine(spool, b, code, reason, res)
                    continue
                i = verdict.bad_record_index(b, answer)
                if i is not None:
                    # The collector named it: those before it are fine, it goes to the quarantine
                    # (its reason as if it had been sent alone), the rest is sent again. A batch of
                    # 500 costs three requests instead of a bisection's twenty.
                    log.info("upload: %d rejected record %d of %d (seq %d, %s): quarantined, the others sent again",
                             code, i, b.count, b.seqs[i], redact(reason))
                    alone = reason.replace("$.records[%d]" % i, "$.records[0]", 1)
                    head, rest = b.split(i) if i else (None, b)
                    bad, tail = rest.split(1) if rest.count > 1 else (rest, None)
                    for part in (tail, (bad, code, alone), head):
                        if part is not None:
                            stack.append(part)
                    continue
                log.info("upload: %d rejected %d records seq %d..%d (%s): bisecting to find the bad ones",
                         code, b.count, b.first_seq, b.last_seq, redact(reason))
                first, second = b.split()
                stack.append(second)
                stack.append(first)
                continue
            # Not the records' fault: network, timeout, 5xx, token, url, a proxy's page, an id.
            if code is None and b.count > 1 and verdict.timed_out(reason):
                # The configured timeout passed: too big for the link or the collector, smaller
                # batches from now on, or it would never get through.
                self._limit = max(1, b.count // 2)
                self._ok_since_413 = 0
            self._fail(code, reason, verdict.hint(b, agent, self.agent_id, code, answer))
            raise _Retry()
        return True

    def _quarantine(self, spool, b, code, reason, res):
        self.quarantine.keep(spool, b, "HTTP %d: %s" % (code, redact(reason)))
        self._st["quarantined_total"] += b.count
        res["quarantined"] += b.count

    def _body(self, batch, agent):
        head = self._head if agent == self.agent_id else envelope_head(agent)
        body = head + b",".join(batch.lines) + ENVELOPE_TAIL
        if self.gzip:
            body = _gzip.compress(body, self.gzip_level)
        return body

    def _post(self, batch, agent=None, deadline=None):
        """-> (status code or None for a network error, reason text, parsed JSON answer or None).
        The whole request, from connect to the answer's last byte, ends within the configured
        timeout (deadline.Alarm); the connect phase also ends by the monotonic `deadline` (given at
        least CONNECT_MIN). The answer is read up to ANSWER_MAX bytes."""
        t0 = time.monotonic()
        body = self._body(batch, self.agent_id if agent is None else agent)
        if self._posted_hi is None or batch.last_seq > self._posted_hi:
            self._posted_hi = batch.last_seq
        cold = not self._times.alive
        self._times.alive = False      # until an answer says the connection stays open
        left = self.timeout if deadline is None else deadline - t0
        r = None
        try:
            with Alarm(self.timeout):
                r = self._session.post(self.url, data=body, headers=self._headers, stream=True,
                                       timeout=(min(self.timeout, max(left, CONNECT_MIN)), self.timeout),
                                       verify=self._verify, allow_redirects=False)
                raw = read_answer(r, ANSWER_MAX, t0 + self.timeout)
        except RequestDeadline:
            return self._no_answer(r, t0, "TotalTimeout: no complete answer within [upload] timeout = %gs "
                                          "(the server sends too slowly or not at all; timed out)" % self.timeout)
        except AnswerTooLarge as e:
            self._st["bytes_sent_total"] += len(body)
            return self._no_answer(r, t0, "HTTP %d: %s" % (r.status_code, e))
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException,
                OSError) as e:
            # No answer, but it took this long: a hung collector (accepts, never answers) must
            # not get a retry in every short gap, each overrunning the poll by the whole timeout.
            return self._no_answer(r, t0, "%s: %s" % (type(e).__name__, short(e)))
        # answered: how long requests take now decides which gaps can start one
        self._times.answered(cold, time.monotonic() - t0)
        self._times.alive = r.headers.get("Connection", "").lower() != "close" and getattr(r.raw, "version", 11) >= 11
        r.close()
        answer = None
        try:
            answer = json.loads(raw)
        except ValueError:
            pass
        text = raw.decode("utf-8", "replace")
        reason = r.reason or ""
        if isinstance(answer, dict) and answer.get("error"):
            reason = "%s (where: %s)" % (answer.get("error"), answer.get("where", "-"))
        elif r.status_code >= 400 and text:
            reason = "%s: %s" % (reason, " ".join(text[:200].split())[:120])
        self._st["bytes_sent_total"] += len(body)
        if 300 <= r.status_code < 400:
            return None, "HTTP %d redirect to %s: not followed, check [upload] url" % (
                r.status_code, r.headers.get("Location", "?")[:200]), None
        if 200 <= r.status_code < 300 and not (isinstance(answer, dict) and type(answer.get("stored")) is int):
            return None, "HTTP %d without the collector's answer (captive portal or wrong url?): %r" % (
                r.status_code, text[:80]), None
        if r.status_code == 429 or r.status_code == 503:
            try:
                self._retry_after = float(r.headers.get("Retry-After", ""))
            except ValueError:
                pass
        return r.status_code, reason, answer

    def _no_answer(self, r, t0, reason):
        """A request that ended without a usable answer: drop its connection (a half-read
        answer must not be reused), remember how long it took. -> (None, reason, None)"""
        if r is not None:
            try:
                r.close()
            except Exception:   # closing a broken connection: nothing left to save
                pass
        self._session.close()   # every pooled connection: the next request opens a new one
        self._no_answer_took = time.monotonic() - t0
        self._times.unanswered(self._no_answer_took)
        return None, reason, None

    def _ok(self, batch, agent, answer):
        st = self._st
        st["last_ok"] = utc_timestamp(time.time())
        st["sent_total"] += batch.count
        st["batches_total"] += 1
        dups = answer.get("duplicates") if isinstance(answer, dict) else None
        max_seq = answer.get("max_seq") if isinstance(answer, dict) else None
        if type(dups) is int:
            st["duplicates_total"] += dups
        if type(max_seq) is int:
            st["last_max_seq"] = max_seq
        reuse = verdict.seq_reuse(batch, agent, dups, max_seq, max(batch.last_seq, self._posted_hi or 0))
        if reuse is not None:
            st["seq_reuse_suspected"] += batch.count
            if not self._seq_reuse_streak:
                self._seq_reuse_streak = True
                log.error("%s", reuse)
        elif type(dups) is int and dups < batch.count:
            self._seq_reuse_streak = False
        if agent == self.agent_id:
            st["other_agent"] = None
        if self._failures:
            log.info("upload: %s reachable again after %d failures", self._url_shown, self._failures)
        self._failures = 0
        st["consecutive_failures"] = 0
        st["backoff_until"] = None
        if self._limit < self.batch_max_records:
            self._ok_since_413 += 1
            if self._ok_since_413 >= 50:    # the collector's limit may have been raised
                self._limit = min(self.batch_max_records, self._limit * 2)
                self._ok_since_413 = 0

    def _fail(self, code, reason, hint=None):
        self._failures += 1
        st = self._st
        st["failures_total"] += 1
        st["consecutive_failures"] = self._failures
        # a redirect's Location, an exception's or a proxy's text may carry a URL with credentials
        reason = redact(reason)
        # code None: the reason names it (ConnectionError, ReadTimeout, SSLError, redirect, ...)
        st["last_error"] = reason if code is None else "HTTP %d: %s" % (code, reason)
        if hint:
            st["last_error"] += "; " + hint
        st["last_error_at"] = utc_timestamp(time.time())
        # Exponential, capped, with jitter (half to full delay) so a fleet of routers coming back
        # after an outage does not hit the collector in lockstep.
        delay = min(self.backoff_max, BACKOFF_BASE * (2 ** min(self._failures - 1, 30)))
        delay *= random.uniform(0.5, 1.0)
        delay = max(delay, min(self.backoff_max, NO_ANSWER_BACKOFF * self._no_answer_took))
        self._no_answer_took = 0.0
        ra = self._retry_after
        if ra is not None:
            delay = max(delay, min(ra, self.backoff_max))
            self._retry_after = None
        self._backoff_until = time.monotonic() + delay
        st["backoff_until"] = utc_timestamp(time.time() + delay)
        # an operator's action is needed (hint): ERROR; an outage or overload: WARNING
        log.log(logging.ERROR if hint else logging.WARNING, "upload: %s %s; retry in %.1fs (failure %d)",
                self._url_shown, st["last_error"], delay, self._failures)


def leading_agent(lines, agent_id, own_prefix):
    """-> (the agent of the first line, how many lines from the start belong to it). A line
    without an agent id counts as `agent_id`'s (`own_prefix`: line_prefix(agent_id)): the
    collector judges that record."""
    first = lines[0]
    if first.startswith(own_prefix):
        agent, prefix = agent_id, own_prefix
    else:
        agent = line_agent(first)
        if agent is None:   # no agent id: send it as ours, the collector judges the record
            agent = agent_id
        prefix = line_prefix(agent)
    k = 1
    for line in lines[1:]:
        if not line.startswith(prefix):
            a = line_agent(line)
            if a != agent and not (a is None and agent == agent_id):
                break
        k += 1
    return agent, k
