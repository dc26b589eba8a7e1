"""The collector's WSGI application: routing, request limits, auth, body reading, errors.

Bad input never reaches the database and never yields a 500: every check maps to a 4xx with a
JSON body {"error": reason, "where": place}. Order on POST: method, auth header, content type and
encoding, size (413 before reading), read, decompress with a cap, JSON, then validation (422
naming the JSON path). Storage errors (database locked or gone) are 503 so the agent backs off.
The routes live by concern: agent/collector/ingest.py (POSTs), agent/collector/reads.py (GETs,
with the export streams in agent/collector/export.py); each is a function of (app, environ,
start_response) using the helpers below.
"""
import hmac
import json
import logging
import threading
import time
import traceback
import zlib
from functools import partial

from agent.collector import device_page, ingest, jsonbody, metrics, reads, series
from agent.collector.alerts import api as alerts_api
from agent.collector.config import redact
from agent.collector.web import AGENT_KEY, TOKEN_AGENT_KEY, HTTPError, json_answer
from agent.wire import utc_timestamp

log = logging.getLogger("modbus.collector")


def bad_string_path(value, path="$"):
    """JSON path of the first string (or key) no database can store: NUL, lone surrogate. Slow;
    run only when the body has a \\u escape at all."""
    t = type(value)
    if t is str:
        if "\x00" in value:
            return path
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
    elif t is dict:
        for k, v in value.items():
            p = bad_string_path(k, path + ".<key>") or bad_string_path(v, "%s.%s" % (path, k))
            if p:
                return p
    elif t is list:
        for i, v in enumerate(value):
            p = bad_string_path(v, "%s[%d]" % (path, i))
            if p:
                return p
    return None


def _plain(doc):
    """parse_batch's doc with the (record, raw) pairs unwrapped, for bad_string_path."""
    if type(doc) is dict and type(doc.get("records")) is list:
        return dict(doc, records=[r for r, _ in doc["records"]])
    return doc


def _agent_note(environ):
    """' agent X' (and ' (token of Y)' when that differs) for a log line, or ''."""
    agent = environ.get(AGENT_KEY)
    token_agent = environ.get(TOKEN_AGENT_KEY)
    out = ""
    if agent is not None:  # repr: the body's agent may be any JSON value, newlines included
        out = " agent %s" % repr(agent[:64] if type(agent) is str else agent)[:80]
    if token_agent is not None and token_agent != agent:
        out += " (token of %r)" % token_agent
    return out


def _db_errors(dialect):
    """Exception classes that mean 'storage unavailable' (503): the agent backs off and retries."""
    import sqlite3

    errs = [sqlite3.OperationalError, sqlite3.DatabaseError]
    if dialect == "postgres":
        import psycopg

        errs.append(psycopg.DatabaseError)
    return tuple(errs)


class CollectorApp:
    """The WSGI callable: dispatch by path and method, errors as JSON answers, and what routes
    share (auth, body reading and JSON limits, the future-timestamp bound, retention)."""

    def __init__(self, cfg, store, clock=time.time):
        self.cfg = cfg
        self.store = store
        self.clock = clock
        self._tokens = [(a, t.encode("utf-8")) for a, t in sorted(cfg.tokens.items())]
        self._db_errors = _db_errors(getattr(store, "dialect", "sqlite"))
        self._stop = threading.Event()
        self._retention_thread = None
        self.alerts = None   # the alert engine (agent.collector.alerts.attach), when rules are configured
        self._rollup_thread = None  # agent/collector/rollup.start: backfill, rollup retention
        self.counters = metrics.Counters()  # this process's ingest counters, for /metrics
        self.routes = {
            "/api/v1/batches": {"POST": partial(ingest.post_batches, self)},
            "/receive-data": {"POST": partial(ingest.post_receive_data, self)},
            "/health": {"GET": partial(reads.get_health, self)},
            "/api/v1/devices": {"GET": partial(reads.get_devices, self)},
            "/api/v1/agents": {"GET": partial(reads.get_agents, self)},
            "/api/v1/records": {"GET": partial(reads.get_records, self)},
            "/api/v1/alerts": {"GET": partial(alerts_api.get_alerts, self)},
            "/api/v1/series": {"GET": partial(series.get_series, self)},
            "/": {"GET": partial(reads.get_page, self)},
            "/device": {"GET": partial(device_page.get_device_page, self)},
            "/metrics": {"GET": partial(metrics.get_metrics, self)},
        }

    # --- WSGI entry ---------------------------------------------------------------------------

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO") or "/"
        methods = self.routes.get(path)
        if methods is None and path.startswith("/device/"):
            methods = self.routes["/device"]  # /device/AGENT/DEVICE
        try:
            if methods is None:
                raise HTTPError(404, "no such endpoint", path)
            handler = methods.get(environ.get("REQUEST_METHOD", "GET"))
            if handler is None:
                raise HTTPError(405, "method not allowed", path, [("Allow", ", ".join(sorted(methods)))])
            return handler(environ, start_response)
        except HTTPError as e:
            self.counters.refuse(metrics.route_label(path), e.status)
            if e.status >= 500:
                log.warning("%s %s: %d %s", environ.get("REQUEST_METHOD"), path, e.status, e.error)
            else:
                # Which agent, when the body got that far (an agent's quarantined batch is found
                # by its id, not by the router's changing address); the token never.
                log.info("%s %s from %s%s: %d %s (where %s)", environ.get("REQUEST_METHOD"), path,
                         environ.get("REMOTE_ADDR", "?"), _agent_note(environ), e.status, e.error,
                         e.where)
            return json_answer(start_response, e.status, {"error": e.error, "where": e.where}, e.headers)
        except self._db_errors as e:
            self.counters.db_error()
            self.counters.refuse(metrics.route_label(path), 503)
            log.error("%s %s from %s%s: database error: %s", environ.get("REQUEST_METHOD"), path,
                      environ.get("REMOTE_ADDR", "?"), _agent_note(environ), redact(e))
            return json_answer(start_response, 503, {"error": "database unavailable", "where": "storage"},
                               [("Retry-After", "5")])

    # --- request helpers ----------------------------------------------------------------------

    def token_agent(self, environ):
        """The agent whose token is in Authorization: Bearer, or HTTPError 401. Every configured
        token is compared (constant time each, no early exit), so timing says nothing."""
        header = environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HTTPError(401, "missing Authorization: Bearer token", "Authorization",
                            [("WWW-Authenticate", 'Bearer realm="modbus-collector"')])
        given = token.strip().encode("utf-8", "surrogateescape")
        found = None
        for agent, expected in self._tokens:
            if hmac.compare_digest(given, expected) and found is None:
                found = agent
        if found is None:
            raise HTTPError(401, "unknown token", "Authorization",
                            [("WWW-Authenticate", 'Bearer realm="modbus-collector", error="invalid_token"')])
        return found

    def read_json(self, environ, allowed_types, parse=jsonbody.loads):
        return self.parse_json(self.read_body(environ, allowed_types), parse, self.json_limits)

    @property
    def json_limits(self):
        """What one body may hold (jsonbody.json_limits), from the largest text it can be."""
        return jsonbody.json_limits(max(self.cfg.max_body_bytes, self.cfg.max_decompressed_bytes))

    def max_ts(self, received):
        """The latest record ts accepted now (max_future_skew ahead), or None (check off)."""
        skew = self.cfg.max_future_skew
        if not 0 < skew < 253402300799 - received:  # beyond 9999-12-31: no ts can be later
            return None
        return utc_timestamp(received + skew)

    def read_body(self, environ, allowed_types):
        ctype = environ.get("CONTENT_TYPE", "").split(";", 1)[0].strip().lower()
        if ctype not in allowed_types:
            raise HTTPError(415, "expected Content-Type: application/json, got %r" % ctype[:100],
                            "Content-Type")
        encoding = environ.get("HTTP_CONTENT_ENCODING", "identity").strip().lower() or "identity"
        if encoding not in ("identity", "gzip"):
            raise HTTPError(415, "unsupported Content-Encoding %r (gzip or none)" % encoding[:50],
                            "Content-Encoding")
        limit = self.cfg.max_body_bytes
        length = environ.get("CONTENT_LENGTH", "")
        stream = environ["wsgi.input"]
        if length:
            # Plain ASCII digits only (RFC 9110 §8.6): int() would also take "+5", " 5", "1_0"
            # and other scripts' digits, and then this app and a proxy disagree on the framing.
            if not (length.isascii() and length.isdigit()):
                raise HTTPError(400, "Content-Length must be plain digits, got %r" % length[:40],
                                "Content-Length")
            n = int(length)
            if n > limit:
                raise HTTPError(413, "body of %d bytes exceeds max_body_bytes %d" % (n, limit), "body")
            body = self._read_exactly(stream, n)
        elif environ.get("wsgi.input_terminated"):  # chunked upload through gunicorn & co
            body = self._read_exactly(stream, limit + 1, allow_short=True)
            if len(body) > limit:
                raise HTTPError(413, "body exceeds max_body_bytes %d" % limit, "body")
        else:
            raise HTTPError(411, "Content-Length required", "Content-Length")
        if encoding == "gzip":
            body = self._gunzip(body)
        if not body:
            raise HTTPError(400, "empty body", "body")
        return body

    @staticmethod
    def parse_json(body, parse, limits, pairs=False):
        """Body (bytes, or the text already decoded) -> parse(text), or HTTPError. Before parsing,
        the count of JSON values the body may hold is checked against `limits` (413): that, not
        the body's size alone, is what bounds the memory parsing takes. `pairs`: records come as
        (record, raw) pairs."""
        try:
            text = body.decode("utf-8") if type(body) is bytes else body
            body = None  # the bytes go before parsing starts: one copy less at the peak
            jsonbody.check_json_size(text, limits)
            doc = parse(text)
        except jsonbody.TooMany as e:
            raise HTTPError(413, str(e), e.where) from None
        except jsonbody.Invalid as e:  # a key given twice
            raise HTTPError(422, e.reason, e.path) from None
        except RecursionError:
            raise HTTPError(400, "JSON nested too deeply", "body") from None
        except json.JSONDecodeError as e:
            raise HTTPError(400, "malformed JSON: %s" % e.msg,
                            "body: line %d column %d" % (e.lineno, e.colno)) from None
        except UnicodeDecodeError as e:
            raise HTTPError(400, "body is not UTF-8: %s" % e.reason, "body: byte %d" % e.start) from None
        except ValueError as e:  # NaN/Infinity
            raise HTTPError(400, "malformed JSON: %s" % str(e)[:200], "body") from None
        if "\\u" in text:
            bad = bad_string_path(_plain(doc) if pairs else doc)
            if bad:
                raise HTTPError(422, "string with NUL or an unpaired surrogate", bad)
        return doc

    @staticmethod
    def _read_exactly(stream, n, allow_short=False):
        """n bytes of the body (at most n when allow_short: a body that ends by itself). Under the
        built-in server the body is already in memory; under another server a read may time out:
        that is the client's 400, one log line, not a 500 with a traceback."""
        parts, got = [], 0
        while got < n:
            try:
                chunk = stream.read(min(n - got, 1 << 20))
            except OSError as e:
                raise HTTPError(400, "body not received (%d of %s bytes): %s"
                                % (got, "up to %d" % n if allow_short else n, e), "body") from None
            if not chunk:
                if allow_short:
                    break
                raise HTTPError(400, "body shorter than Content-Length (%d of %d bytes)" % (got, n), "body")
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def _gunzip(self, data):
        """Decompress with a hard cap: a gzip bomb costs at most max_decompressed_bytes of memory."""
        cap = self.cfg.max_decompressed_bytes
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out = d.decompress(data, cap + 1)
        except zlib.error as e:
            raise HTTPError(400, "bad gzip data: %s" % e, "body") from None
        if len(out) > cap or d.unconsumed_tail:
            raise HTTPError(413, "decompressed body exceeds max_decompressed_bytes %d" % cap, "body")
        if not d.eof:
            raise HTTPError(400, "truncated gzip data", "body")
        if d.unused_data:
            raise HTTPError(400, "data after the end of the gzip stream", "body")
        return out

    def check_read_access(self, environ):
        if self.cfg.read_token:
            header = environ.get("HTTP_AUTHORIZATION", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    token.strip().encode("utf-8", "surrogateescape"), self.cfg.read_token.encode("utf-8")):
                raise HTTPError(401, "read_token required", "Authorization",
                                [("WWW-Authenticate", 'Bearer realm="modbus-collector"')])

    # --- retention ----------------------------------------------------------------------------

    def retention_once(self, pause=0.0):
        """Delete records received more than retention_days ago, in chunks; returns how many went.
        By the time the collector received them, not their ts (see Store.delete_older)."""
        if not self.cfg.retention_days:
            return 0
        cutoff = self.clock() - self.cfg.retention_days * 86400.0
        total = 0
        while not self._stop.is_set():
            n = self.store.delete_older(cutoff, self.cfg.retention_chunk)
            total += n
            if n < self.cfg.retention_chunk:
                break
            if pause:
                self._stop.wait(pause)  # let ingest take the write lock between chunks
        if total:
            log.info("retention: deleted %d records received before %s", total, utc_timestamp(cutoff))
        return total

    def start_retention(self):
        if not self.cfg.retention_days or self._retention_thread is not None:
            return

        def loop():
            while not self._stop.is_set():
                try:
                    self.retention_once(pause=0.05)
                except Exception:
                    log.error("retention failed; will retry:\n%s", redact(traceback.format_exc()).rstrip())
                self._stop.wait(self.cfg.retention_interval)

        self._retention_thread = threading.Thread(target=loop, name="retention", daemon=True)
        self._retention_thread.start()

    def close(self):
        self._stop.set()
        for th in (self._retention_thread, self._rollup_thread):
            if th is not None:
                th.join(5)
        if self.alerts is not None:
            self.alerts.close()
        self.store.close()
