"""The collector's WSGI application: routing, request limits, auth, responses.

Bad input never reaches the database and never yields a 500: every check below maps to a 4xx
with a JSON body {"error": reason, "where": place}. Order on POST: method, auth header, content
type and encoding, size (413 before reading), read, decompress with a cap, JSON, then validation
(422 naming the JSON path). Storage errors (database locked or gone) are 503 so the agent backs off.
"""
import csv
import hashlib
import hmac
import io
import json
import logging
import re
import threading
import time
import traceback
import zlib
from urllib.parse import parse_qs

from agent.collector import page, validate
from agent.collector.config import redact
from agent.collector.store import ROW_COLUMNS, finite
from agent.record import utc_timestamp

log = logging.getLogger("modbus.collector")
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                           check_circular=False).encode
_JSON_TYPES = ("application/json",)
_LEGACY_TYPES = ("application/json", "text/json", "text/plain", "application/x-www-form-urlencoded", "")
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 411: "Length Required", 413: "Payload Too Large",
            415: "Unsupported Media Type", 422: "Unprocessable Entity", 500: "Internal Server Error",
            503: "Service Unavailable"}


class HTTPError(Exception):
    def __init__(self, status, error, where="", headers=()):
        super().__init__(error)
        self.status = status
        self.error = error
        self.where = where
        self.headers = list(headers)


def _status(code):
    return "%d %s" % (code, _REASONS.get(code, "Unknown"))


def _hasher(data):
    return hashlib.blake2b(data, digest_size=8).digest()


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


def _loads_finite(text):
    """Stored JSON text -> value, numbers beyond float range as None (JSON has no infinity)."""
    return None if not text else finite(json.loads(text))


def _plain(doc):
    """parse_batch's doc with the (record, raw) pairs unwrapped, for bad_string_path."""
    if type(doc) is dict and type(doc.get("records")) is list:
        return dict(doc, records=[r for r, _ in doc["records"]])
    return doc


_AGENT_KEY = "modbus_collector.agent"  # environ: the batch's agent id, once read
_TOKEN_AGENT_KEY = "modbus_collector.token_agent"  # environ: the agent the token belongs to


def _agent_note(environ):
    """' agent X' (and ' (token of Y)' when that differs) for a log line, or ''."""
    agent = environ.get(_AGENT_KEY)
    token_agent = environ.get(_TOKEN_AGENT_KEY)
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
    def __init__(self, cfg, store, clock=time.time):
        self.cfg = cfg
        self.store = store
        self.clock = clock
        self._tokens = [(a, t.encode("utf-8")) for a, t in sorted(cfg.tokens.items())]
        self._db_errors = _db_errors(getattr(store, "dialect", "sqlite"))
        self._stop = threading.Event()
        self._retention_thread = None
        self.routes = {
            "/api/v1/batches": {"POST": self.post_batches},
            "/receive-data": {"POST": self.post_receive_data},
            "/health": {"GET": self.get_health},
            "/api/v1/devices": {"GET": self.get_devices},
            "/api/v1/agents": {"GET": self.get_agents},
            "/api/v1/records": {"GET": self.get_records},
            "/": {"GET": self.get_page},
        }

    # --- WSGI entry ---------------------------------------------------------------------------

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO") or "/"
        methods = self.routes.get(path)
        try:
            if methods is None:
                raise HTTPError(404, "no such endpoint", path)
            handler = methods.get(environ.get("REQUEST_METHOD", "GET"))
            if handler is None:
                raise HTTPError(405, "method not allowed", path, [("Allow", ", ".join(sorted(methods)))])
            return handler(environ, start_response)
        except HTTPError as e:
            if e.status >= 500:
                log.warning("%s %s: %d %s", environ.get("REQUEST_METHOD"), path, e.status, e.error)
            else:
                # Which agent, when the body got that far (an agent's quarantined batch is found
                # by its id, not by the router's changing address); the token never.
                log.info("%s %s from %s%s: %d %s (where %s)", environ.get("REQUEST_METHOD"), path,
                         environ.get("REMOTE_ADDR", "?"), _agent_note(environ), e.status, e.error,
                         e.where)
            return self._json(start_response, e.status, {"error": e.error, "where": e.where}, e.headers)
        except self._db_errors as e:
            log.error("%s %s from %s%s: database error: %s", environ.get("REQUEST_METHOD"), path,
                      environ.get("REMOTE_ADDR", "?"), _agent_note(environ), redact(e))
            return self._json(start_response, 503, {"error": "database unavailable", "where": "storage"},
                              [("Retry-After", "5")])

    @staticmethod
    def _json(start_response, code, obj, headers=()):
        body = (_encode(obj) + "\n").encode("utf-8")
        start_response(_status(code), [("Content-Type", "application/json"),
                                       ("Content-Length", str(len(body)))] + list(headers))
        return [body]

    # --- request helpers ----------------------------------------------------------------------

    def _token_agent(self, environ):
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

    def _read_json(self, environ, allowed_types, parse=validate.loads):
        return self._parse_json(self._read_body(environ, allowed_types), parse, self._json_limits)

    @property
    def _json_limits(self):
        """What one body may hold (validate.json_limits), from the largest text it can be."""
        return validate.json_limits(max(self.cfg.max_body_bytes, self.cfg.max_decompressed_bytes))

    def _max_ts(self, received):
        """The latest record ts accepted now (max_future_skew ahead), or None (check off)."""
        skew = self.cfg.max_future_skew
        if not 0 < skew < 253402300799 - received:  # beyond 9999-12-31: no ts can be later
            return None
        return utc_timestamp(received + skew)

    def _read_body(self, environ, allowed_types):
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
    def _parse_json(body, parse, limits, pairs=False):
        """Body (bytes, or the text already decoded) -> parse(text), or HTTPError. Before parsing,
        the count of JSON values the body may hold is checked against `limits` (413): that, not
        the body's size alone, is what bounds the memory parsing takes. `pairs`: records come as
        (record, raw) pairs."""
        try:
            text = body.decode("utf-8") if type(body) is bytes else body
            body = None  # the bytes go before parsing starts: one copy less at the peak
            validate.check_json_size(text, limits)
            doc = parse(text)
        except validate.TooMany as e:
            raise HTTPError(413, str(e), e.where) from None
        except validate.Invalid as e:  # a key given twice
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

    def _check_read_access(self, environ):
        if self.cfg.read_token:
            header = environ.get("HTTP_AUTHORIZATION", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    token.strip().encode("utf-8", "surrogateescape"), self.cfg.read_token.encode("utf-8")):
                raise HTTPError(401, "read_token required", "Authorization",
                                [("WWW-Authenticate", 'Bearer realm="modbus-collector"')])

    # --- POST endpoints -----------------------------------------------------------------------

    def post_batches(self, environ, start_response):
        t0 = time.monotonic()
        token_agent = self._token_agent(environ) if self.cfg.tokens_required else None
        if token_agent is not None:
            environ[_TOKEN_AGENT_KEY] = token_agent
        body = self._read_body(environ, _JSON_TYPES)
        received = self.clock()
        max_ts, limits = self._max_ts(received), self._json_limits
        rows = head = None
        try:
            text, body = body.decode("utf-8"), None  # one copy of the body at a time
        except UnicodeDecodeError:
            text = None  # the general path says where
        if text is not None and "\\" not in text:  # no escapes at all: no NUL or surrogate to look for
            head = validate.fast_head(text)
        if head is not None:
            agent = environ[_AGENT_KEY] = head[0]
            if token_agent is not None and agent != token_agent:
                raise HTTPError(403, "token belongs to another agent", "$.agent")
            rows = validate.fast_rows(text, head[1], agent, received, self.cfg.max_records, self.cfg.max_depth,
                                      max_ts, limits)
        if rows is None:  # the general path: any shape, every check, precise errors
            max_records = self.cfg.max_records
            doc = self._parse_json(body if text is None else text, lambda t: validate.parse_batch(t, max_records),
                                   limits, pairs=True)
            if type(doc) is dict and "agent" in doc:
                environ[_AGENT_KEY] = doc["agent"]
            if token_agent is not None and type(doc) is dict and doc.get("agent") != token_agent:
                raise HTTPError(403, "token belongs to another agent", "$.agent")
            try:
                agent, rows = validate.batch_rows(doc, received, self.cfg.max_records, self.cfg.max_depth, max_ts)
            except validate.Invalid as e:
                raise HTTPError(422, e.reason, e.path) from None
            except validate.TooMany as e:
                raise HTTPError(413, str(e), e.where) from None
            doc = None
        text = None  # the rows hold each record's text: the body and what was parsed go before storing
        stored, dups, max_seq = self.store.ingest(agent, rows, received)
        log.debug("batch from %s: %d stored, %d duplicates, max_seq %s, %.1f ms",
                  agent, stored, dups, max_seq, (time.monotonic() - t0) * 1000)
        return self._json(start_response, 200, {"stored": stored, "duplicates": dups, "max_seq": max_seq})

    def post_receive_data(self, environ, start_response):
        mode = self.cfg.receive_data_mode
        if mode == "closed":
            raise HTTPError(404, "/receive-data is closed on this collector", "receive_data")
        agent = self._token_agent(environ) if mode == "token" else self.cfg.receive_data_agent
        environ[_AGENT_KEY] = agent
        doc = self._read_json(environ, _LEGACY_TYPES)
        received = self.clock()
        recs, prefix = (doc, "$") if type(doc) is list else ([doc], None)
        if len(recs) > self.cfg.max_records:
            raise HTTPError(413, "%d records in one post, more than max_records %d"
                            % (len(recs), self.cfg.max_records), "$")
        try:
            max_ts = self._max_ts(received)
            rows = [validate.legacy_row(r, agent, received, "%s[%d]" % (prefix, i) if prefix else "$",
                                        self.cfg.max_depth, _hasher, max_ts) for i, r in enumerate(recs)]
        except validate.Invalid as e:
            raise HTTPError(422, e.reason, e.path) from None
        # Content-hash seqs, negative: outside the agents' seqs, they never move max_seq.
        stored, dups, _ = self.store.ingest(agent, rows, received)
        return self._json(start_response, 200, {"stored": stored, "duplicates": dups})

    # --- GET endpoints ------------------------------------------------------------------------

    def get_health(self, environ, start_response):
        try:
            version = self.store.ping()
        except Exception as e:  # any driver error: the answer is "not healthy", not a 500
            return self._json(start_response, 503, {"status": "error", "db": "unreachable: %s" % redact(e),
                                                   "where": "storage"})
        return self._json(start_response, 200, {"status": "ok", "db": "ok", "schema": version,
                                               "time": utc_timestamp(self.clock())})

    def device_view(self):
        """Devices with parsed last values, age and freshness (for the API and the page)."""
        now = self.clock()
        out = []
        for d in self.store.devices():
            age = now - d["last_seen"]
            out.append({
                "agent": d["agent"], "device": d["device"], "unit": d["unit"],
                "last_seen": utc_timestamp(d["last_seen"]), "age_s": round(age, 1),
                "fresh": age <= self.cfg.stale_after, "last_ts": d["last_ts"], "last_status": d["last_status"],
                "values_ts": d["values_ts"],
                "values": _loads_finite(d["last_values"]),
                "error_ts": d["error_ts"], "last_error": _loads_finite(d["last_error"]),
                "health_ts": d["health_ts"], "health": _loads_finite(d["health"]),
                "records": d["records"], "errors": d["errors"],
            })
        return out

    def agent_view(self):
        now = self.clock()
        return [dict(a, first_seen=utc_timestamp(a["first_seen"]), last_seen=utc_timestamp(a["last_seen"]),
                     age_s=round(now - a["last_seen"], 1)) for a in self.store.agents()]

    def get_devices(self, environ, start_response):
        self._check_read_access(environ)
        return self._json(start_response, 200, {"devices": self.device_view()})

    def get_agents(self, environ, start_response):
        self._check_read_access(environ)
        return self._json(start_response, 200, {"agents": self.agent_view()})

    def get_page(self, environ, start_response):
        self._check_read_access(environ)
        now = self.clock()
        since = utc_timestamp(now - 3600)
        devices = self.device_view()
        series = {(d["agent"], d["device"]): self.store.series(d["agent"], d["device"], since)
                  for d in devices}
        body = page.render(self.agent_view(), devices, series, now, self.cfg.refresh).encode("utf-8")
        start_response(_status(200), [("Content-Type", "text/html; charset=utf-8"),
                                      ("Content-Length", str(len(body))), ("Cache-Control", "no-store")])
        return [body]

    def get_records(self, environ, start_response):
        self._check_read_access(environ)
        q = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        allowed = ("agent", "device", "since", "until", "kind", "status", "limit", "format")
        for k in q:
            if k not in allowed:
                raise HTTPError(400, "unknown parameter (known: %s)" % ", ".join(allowed), k)
        arg = {k: v[-1] for k, v in q.items() if v and v[-1] != ""}
        fmt = arg.pop("format", "json")
        if fmt not in ("json", "jsonl", "csv"):
            raise HTTPError(400, "format must be json, jsonl or csv", "format")
        for k in ("agent", "device"):
            if k in arg:
                arg[k] = parse_name(arg[k], k)
        for k in ("since", "until"):
            if k in arg:
                arg[k] = parse_time(arg[k], k)
        if "limit" in arg:
            arg["limit"] = parse_count(arg["limit"], "limit")
        if arg.get("kind") not in (None, "data", "gap", "health"):
            raise HTTPError(400, "kind must be data, gap or health", "kind")
        if arg.get("status") not in (None, "ok", "partial", "error"):
            raise HTTPError(400, "status must be ok, partial or error", "status")
        # Only what was stored when the export began: under ingest, paging would chase new rows.
        rows = self.store.records(received_before=self.clock(), **arg)
        rows = _primed(rows)  # the first page now: a database error is a 503, not a cut-off 200
        ctype = {"json": "application/json", "jsonl": "application/x-ndjson",
                 "csv": "text/csv; charset=utf-8"}[fmt]
        start_response(_status(200), [("Content-Type", ctype), ("Cache-Control", "no-store")])
        return {"json": stream_json, "jsonl": stream_jsonl, "csv": stream_csv}[fmt](rows)

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
        if self._retention_thread is not None:
            self._retention_thread.join(5)
        self.store.close()


MAX_LIMIT = (1 << 63) - 1  # the largest LIMIT both databases take (a signed 64-bit integer)
_COUNT = re.compile(r"[0-9]{1,19}", re.ASCII)  # ASCII digits only: int() reads other scripts' too
_MAX_EPOCH = 253402300799.999  # 9999-12-31T23:59:59.999Z: ts text with a 4-digit year sorts as time


def parse_count(text, where):
    """Query count: plain ASCII digits, 0..2^63-1, or HTTPError 400 naming the parameter."""
    if _COUNT.fullmatch(text) is None or int(text) > MAX_LIMIT:
        raise HTTPError(400, "%s must be an integer 0..%d" % (where, MAX_LIMIT), where)
    return int(text)


def parse_name(text, where):
    """Query agent/device name: what a record's can be (1..128 characters, no NUL)."""
    if len(text) > validate.MAX_NAME or "\x00" in text:
        raise HTTPError(400, "%s must be at most %d characters, without NUL" % (where, validate.MAX_NAME), where)
    return text


def parse_time(text, where):
    """Query time: ISO UTC ('2026-11-21T10:30:45Z', '2026-11-21 10:30:45', '2026-11-21') or epoch seconds."""
    t = text.strip()
    try:
        secs = float(t)
    except ValueError:
        pass
    else:
        if not -_MAX_EPOCH <= secs <= _MAX_EPOCH:  # NaN fails too
            raise HTTPError(400, "epoch seconds out of range (up to %d, year 9999)" % _MAX_EPOCH, where)
        if secs < 0:
            secs = 0.0  # before any record (validate refuses years before 1970)
        return utc_timestamp(secs)
    if len(t) == 10:
        t += "T00:00:00"
    t = t.replace(" ", "T")
    if not t.endswith("Z"):
        t += "Z"
    ts = validate.normalize_ts(t)
    if ts is None:
        raise HTTPError(400, "expected an ISO UTC time (2026-11-21T10:30:45Z) or epoch seconds", where)
    return ts


def _primed(rows):
    """The generator `rows` with its first item fetched now (the export's first page query)."""
    try:
        first = next(rows)
    except StopIteration:
        return iter(())
    return _Chain(first, rows)


class _Chain:
    """first, then the rest of `rows`; close() closes `rows` (its database connection)."""

    def __init__(self, first, rows):
        self._first, self._rows = [first], rows

    def __iter__(self):
        return self

    def __next__(self):
        if self._first:
            return self._first.pop()
        return next(self._rows)

    def close(self):
        self._rows.close()


def record_json(row):
    """Row -> the record's JSON text: the payload is the record as the agent sent it."""
    return row[7] if type(row[7]) is str else _encode(row[7])


def _chunked(pieces, size=65536):
    buf, n = [], 0
    for p in pieces:
        buf.append(p)
        n += len(p)
        if n >= size:
            yield "".join(buf).encode("utf-8")
            buf, n = [], 0
    if buf:
        yield "".join(buf).encode("utf-8")


def stream_json(rows):
    def pieces():
        yield "["
        first = True
        for r in rows:
            yield record_json(r) if first else "," + record_json(r)
            first = False
        yield "]\n"
    return _closing(_chunked(pieces()), rows)


def stream_jsonl(rows):
    return _closing(_chunked(record_json(r) + "\n" for r in rows), rows)


_FORMULA_LEAD = frozenset("=+-@\t\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)


def csv_cell(v):
    """A text cell that a spreadsheet would run as a formula (=, +, -, @, tab, CR first) with a
    single quote in front (OWASP's CSV injection advice). Numbers (seq, unit, received) are not
    text and go out as they are; a text cell that is a plain decimal number ("-5") is not a
    formula either and is left alone. Values are inside the payload, a JSON object ('{' first)."""
    if type(v) is str and v and v[0] in _FORMULA_LEAD and _PLAIN_NUMBER.fullmatch(v) is None:
        return "'" + v
    return v


def stream_csv(rows):
    def pieces():
        buf = io.StringIO()
        # RFC 4180 line ends: the writer then also quotes a field holding a bare CR, which with
        # "\n" it left unquoted (and readers split the row there).
        w = csv.writer(buf, lineterminator="\r\n")
        w.writerow(ROW_COLUMNS)
        for r in rows:
            w.writerow([csv_cell(v) for v in r])
            if buf.tell() >= 65536:
                yield buf.getvalue()
                buf.seek(0)
                buf.truncate()
        yield buf.getvalue()
    return _closing(_chunked(pieces(), 1), rows)


class _closing:
    """WSGI response iterable whose close() also closes the database cursor generator, so a
    client that hangs up mid-export releases its connection."""

    def __init__(self, it, rows):
        self._it = it
        self._rows = rows

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._it)

    def close(self):
        self._it.close()
        close = getattr(self._rows, "close", None)
        if close:
            close()
