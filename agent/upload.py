"""The uploader: drains the spool to the collector in bulk batches, in the gaps between polls.

Wire format (issue 4): POST {url} with body {"agent": ID, "records": [record, ...]} built by joining
the spool's lines (never re-encoded), Content-Type application/json, optional Content-Encoding gzip,
Authorization: Bearer TOKEN. The collector is idempotent on (agent, seq), so a batch whose answer was
lost is simply sent again: at-least-once here + idempotent storage there = exactly once.

Answers:
  2xx + the collector's answer {"stored": n, ...}
                       stored: the spool acknowledges the batch (the only way a record leaves it).
                       A 2xx without that answer (a captive portal, a proxy's page, a wrong URL
                       served by some web server) is NOT an acknowledgement: back off.
  3xx                  not followed (requests would turn the POST into a GET, and a GET's 200
                       would acknowledge records nobody stored): back off, log the Location
  413                  too large: split the batch in halves (down to one record; a single record
                       still too large is quarantined) and send smaller batches from then on
  400, 422, other 4xx  the records are rejected: bisect to find the bad ones, quarantine only those
                       with the reason, go on (one bad record never blocks the queue); unless the
                       answer's "where" names the request, not a record ("$.agent", a header):
                       then every batch would be rejected, so back off instead
  401 403 404 405 407 408 411 415 421 425 426 429, 5xx, network errors
                       not the records' fault (token, URL, overload, outage): exponential back-off
                       with jitter up to backoff_max, nothing quarantined (Retry-After honoured)
"""
import gzip as _gzip
import json
import logging
import random
import time

import requests

from agent.record import utc_timestamp

log = logging.getLogger("agent.upload")

# 4xx answers that say nothing about the records themselves: quarantining on them would move a
# whole healthy backlog aside because of a revoked token or a typo in the URL.
RETRY_4XX = frozenset((401, 403, 404, 405, 407, 408, 411, 415, 421, 425, 426, 429))
GZIP_LEVEL = 1      # ~3x faster than level 6 on JSON, barely larger: the router's CPU is the bottleneck
BACKOFF_BASE = 1.0
MIN_REQUEST_TIME = 0.2  # do not start a request with less time than this before the deadline


class _Retry(Exception):
    """Stop draining and back off."""


class Uploader:
    def __init__(self, url, agent_id, token=None, batch_max_records=500, batch_max_kb=256, gzip=True,
                 timeout=10.0, ca_file=None, verify=True, backoff_max=300.0, session=None,
                 gzip_level=GZIP_LEVEL):
        self.url = url
        self.agent_id = agent_id
        self.batch_max_records = max(1, int(batch_max_records))
        self.batch_max_bytes = max(1024, int(batch_max_kb * 1024))
        self.gzip = bool(gzip)
        self.gzip_level = gzip_level
        self.timeout = float(timeout)
        self.backoff_max = float(backoff_max)
        self._head = b'{"agent":' + json.dumps(agent_id, ensure_ascii=False).encode("utf-8") + b',"records":['
        self._session = session or requests.Session()
        # Passed with every request: a session-level verify loses to $REQUESTS_CA_BUNDLE in
        # requests (psf/requests#3829), which would silently ignore ca_file.
        self._verify = ca_file if ca_file else bool(verify)
        h = {"Content-Type": "application/json", "User-Agent": "modbus-agent"}
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
        self._st = {"last_ok": None, "last_error": None, "last_error_at": None, "backoff_until": None,
                    "sent_total": 0, "batches_total": 0, "duplicates_total": 0, "quarantined_total": 0,
                    "failures_total": 0, "consecutive_failures": 0, "bytes_sent_total": 0,
                    "last_max_seq": None}

    # ------------------------------------------------------------------ public

    def drain(self, spool, deadline):
        """Upload batches until the spool is empty, the monotonic `deadline` passes or an error
        starts a back-off. Returns {"status": "empty"|"deadline"|"backoff", "sent", "batches",
        "quarantined"}; returns at once while a back-off is running."""
        res = {"status": "empty", "sent": 0, "batches": 0, "quarantined": 0}
        if time.monotonic() < self._backoff_until:
            res["status"] = "backoff"
            return res
        try:
            while True:
                if deadline - time.monotonic() < MIN_REQUEST_TIME:
                    res["status"] = "deadline"
                    break
                batch = spool.peek(self._limit, self.batch_max_bytes)
                if batch is None:
                    break
                if not self._send_batch(spool, batch, deadline, res):
                    res["status"] = "deadline"
                    break
        except _Retry:
            res["status"] = "backoff"
        return res

    def state(self):
        """For the status file."""
        st = dict(self._st)
        st["batch_limit"] = self._limit
        return st

    def close(self):
        self._session.close()

    # ------------------------------------------------------------------ batches

    def _send_batch(self, spool, batch, deadline, res):
        """Send one batch, splitting it on 413 and bisecting it on a rejection. Sub-batches are
        sent in seq order so the spool's cursor only moves forward. False when the deadline
        leaves no time for the next request (nothing is lost: the rest stays in the spool)."""
        stack = [batch]
        while stack:
            b = stack.pop()
            left = deadline - time.monotonic()
            if left < MIN_REQUEST_TIME:
                return False
            code, reason, answer = self._post(b, min(self.timeout, left))
            if code is None or code >= 500 or code in RETRY_4XX or _envelope_error(code, answer):
                if code is None and b.count > 1 and _timed_out(reason):
                    # Too big for the time we have (slow uplink, busy collector, short gaps
                    # between polls): smaller batches from now on, or it would never get through.
                    self._limit = max(1, b.count // 2)
                    self._ok_since_413 = 0
                self._fail(code, reason, answer)
                raise _Retry()
            if 200 <= code < 300:
                self._ok(b, answer)
                spool.ack(b)
                res["sent"] += b.count
                res["batches"] += 1
                continue
            if code == 413 and b.count > 1:
                self._limit = max(1, b.count // 2)
                self._ok_since_413 = 0
                log.info("upload: 413 for %d records (%d bytes): splitting, batches of at most %d from now",
                         b.count, b.nbytes, self._limit)
            elif code != 413 and b.count > 1:
                log.info("upload: %d rejected %d records seq %d..%d (%s): bisecting to find the bad ones",
                         code, b.count, b.first_seq, b.last_seq, reason)
            else:
                why = "HTTP %d: %s" % (code, reason)
                spool.quarantine(b, why)
                self._st["quarantined_total"] += b.count
                res["quarantined"] += b.count
                continue
            first, second = b.split()
            stack.append(second)
            stack.append(first)
        return True

    def _body(self, batch):
        body = self._head + b",".join(batch.lines) + b"]}"
        if self.gzip:
            body = _gzip.compress(body, self.gzip_level)
        return body

    def _post(self, batch, timeout):
        """-> (status code or None for a network error, reason text, parsed JSON answer or None)."""
        body = self._body(batch)
        try:
            r = self._session.post(self.url, data=body, headers=self._headers, timeout=timeout,
                                   verify=self._verify, allow_redirects=False)
        except requests.exceptions.RequestException as e:
            return None, "%s: %s" % (type(e).__name__, _short(e)), None
        answer = None
        try:
            answer = r.json()
        except ValueError:
            pass
        reason = r.reason or ""
        if isinstance(answer, dict) and answer.get("error"):
            reason = "%s (where: %s)" % (answer.get("error"), answer.get("where", "-"))
        elif r.status_code >= 400 and r.text:
            reason = "%s: %s" % (reason, r.text[:200].replace("\n", " "))
        self._st["bytes_sent_total"] += len(body)
        if 300 <= r.status_code < 400:
            return None, "HTTP %d redirect to %s: not followed, check [upload] url" % (
                r.status_code, r.headers.get("Location", "?")[:200]), None
        if 200 <= r.status_code < 300 and not (isinstance(answer, dict) and type(answer.get("stored")) is int):
            return None, "HTTP %d without the collector's answer (captive portal or wrong url?): %r" % (
                r.status_code, r.text[:80]), None
        if r.status_code == 429 or r.status_code == 503:
            try:
                self._retry_after = float(r.headers.get("Retry-After", ""))
            except ValueError:
                pass
        return r.status_code, reason, answer

    def _ok(self, batch, answer):
        st = self._st
        st["last_ok"] = utc_timestamp(time.time())
        st["sent_total"] += batch.count
        st["batches_total"] += 1
        if isinstance(answer, dict):
            if isinstance(answer.get("duplicates"), int):
                st["duplicates_total"] += answer["duplicates"]
            if isinstance(answer.get("max_seq"), int):
                st["last_max_seq"] = answer["max_seq"]
        if self._failures:
            log.info("upload: %s reachable again after %d failures", self.url, self._failures)
        self._failures = 0
        st["consecutive_failures"] = 0
        st["backoff_until"] = None
        if self._limit < self.batch_max_records:
            self._ok_since_413 += 1
            if self._ok_since_413 >= 50:    # the collector's limit may have been raised
                self._limit = min(self.batch_max_records, self._limit * 2)
                self._ok_since_413 = 0

    def _fail(self, code, reason, answer):
        self._failures += 1
        st = self._st
        st["failures_total"] += 1
        st["consecutive_failures"] = self._failures
        # code None: the reason names it (ConnectionError, ReadTimeout, SSLError, redirect, ...)
        st["last_error"] = reason if code is None else "HTTP %d: %s" % (code, reason)
        st["last_error_at"] = utc_timestamp(time.time())
        # Exponential, capped, with jitter (half to full delay) so a fleet of routers coming back
        # after an outage does not hit the collector in lockstep.
        delay = min(self.backoff_max, BACKOFF_BASE * (2 ** min(self._failures - 1, 30)))
        delay *= random.uniform(0.5, 1.0)
        ra = self._retry_after
        if ra is not None:
            delay = max(delay, min(ra, self.backoff_max))
            self._retry_after = None
        self._backoff_until = time.monotonic() + delay
        st["backoff_until"] = utc_timestamp(time.time() + delay)
        log.warning("upload: %s %s; retry in %.1fs (failure %d)", self.url, st["last_error"], delay,
                    self._failures)


def _timed_out(reason):
    """A read timeout, or a send that timed out (requests wraps that in a ConnectionError);
    not a connect timeout, which says nothing about the batch."""
    return reason.startswith("ReadTimeout") or ("timed out" in reason and not reason.startswith("ConnectTimeout"))


def _envelope_error(code, answer):
    """A 4xx whose `where` names the request rather than a record ("$.agent", "$", a header):
    every batch would get it, so quarantining would move the whole backlog aside. The collector
    names record problems "$.records[i]..." and unparseable bodies "body..." (bisected)."""
    if not (400 <= code < 500) or code == 413 or not isinstance(answer, dict):
        return False
    where = answer.get("where")
    return isinstance(where, str) and bool(where) and not where.startswith(("$.records", "records", "body"))


def _short(e):
    """One line, without the noise urllib3 nests into connection errors."""
    s = str(e).replace("\n", " ")
    return s[:200]
