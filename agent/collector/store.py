"""Storage interface shared by the SQLite and PostgreSQL backends.

A backend supplies `_write()` (a context manager: cursor inside one write transaction, committed
on exit, rolled back on error), `_read()` (cursor for short reads), `_pager()` (a context manager
giving fetch(sql, args) -> rows, one short read transaction per call, on a connection of the
export's own, released on exit) and `ph` (the parameter placeholder). Everything else, the SQL
included, lives here once.
"""
import json
import math
import operator

from agent.collector.fastpath import OK_TAIL, VALUES_KEY, fast_record
from agent.collector.jsonbody import encode
from agent.collector.schema import VERSION, statements

_encode = encode   # the collector's compact JSON (agent.collector.jsonbody)

ROW_COLUMNS = ("agent", "seq", "ts", "kind", "device", "unit", "status", "payload", "clock", "received")
# Rows per export page (one short read transaction each, see Store.records).
EXPORT_PAGE = 1000
DEVICE_COLUMNS = ("agent", "device", "unit", "last_ts", "last_status", "values_ts", "last_values",
                  "error_ts", "last_error", "health_ts", "health", "records", "errors", "last_seen")


_seq_of = operator.itemgetter(1)  # ROW_COLUMNS: (agent, seq, ...)
_device_key = operator.itemgetter(0, 1)  # DEVICE_COLUMNS: (agent, device, ...)


def open_store(url, **kw):
    """'sqlite:///path' (or a bare path) -> SQLiteStore; 'postgresql://...' -> PostgresStore."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        from agent.collector.postgres import PostgresStore

        return PostgresStore(url, **kw)
    from agent.collector.sqlite import SQLiteStore

    # sqlite:///rel.db -> rel.db ; sqlite:////abs/x.db -> /abs/x.db ; a bare path as is
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
    elif url.startswith("sqlite://"):
        path = url[len("sqlite://"):]
    else:
        path = url
    return SQLiteStore(path, **kw)


def _newer(col, ts_col, cap):
    """Upsert expression: take the incoming value when its timestamp is newer, or when the stored
    one is beyond `cap` (SQL: the incoming batch's receive time plus the future skew, as ts text):
    a reading stamped in 2099 (a clock gone wrong, stored before such stamps were refused) must
    not hold a device's last values and status for good."""
    return ("%s = CASE WHEN excluded.%s IS NOT NULL AND (devices.%s IS NULL OR excluded.%s >= devices.%s "
            "OR devices.%s > %s) THEN excluded.%s ELSE devices.%s END"
            % (col, ts_col, ts_col, ts_col, ts_col, ts_col, cap, col, col))


def finite(v):
    """v with non-finite floats (1e400 parses as inf) replaced by None: JSON has no infinity."""
    if type(v) is float:
        return v if math.isfinite(v) else None
    if type(v) is dict:
        return {k: finite(x) for k, x in v.items()}
    if type(v) is list:
        return [finite(x) for x in v]
    return v


def _field(payload, key):
    """One field of a stored record (payload = the record's JSON text) as compact JSON text."""
    if key == "values" and type(payload) is str:
        # The agent's own compact form (validate's fast path): slice instead of parse + encode.
        # In that form no string holds a quote, so the first "values": and the last
        # ,"status":"ok" are the record's own.
        m = fast_record(payload)
        if m is not None and m.end() == len(payload):
            return payload[payload.index(VALUES_KEY) + len(VALUES_KEY):payload.rindex(OK_TAIL)]
    v = json.loads(payload).get(key) if type(payload) is str else payload.get(key)
    if v is None:
        return None
    try:
        return _encode(v)
    except ValueError:
        return _encode(finite(v))


def aggregate(rows):
    """New rows -> per-device summary rows (DEVICE_COLUMNS order) and (gaps, dropped).
    Only the newest record of each kind per device is parsed again (for its values/error/health)."""
    devs = {}
    gaps = dropped = 0
    for agent, _seq, ts, kind, device, unit, status, payload, _clock, received in rows:
        if kind == "gap":
            gaps += 1
            dropped += json.loads(payload).get("dropped") or 0
        if device is None:
            continue
        d = devs.get(device)
        if d is None:
            d = devs[device] = [agent, device, unit, None, None, None, None, None, None, None, None, 0, 0,
                                received]
        d[11] += 1
        if unit is not None:
            d[2] = unit
        if kind == "data":
            if d[3] is None or ts >= d[3]:
                d[3], d[4] = ts, status
            # "ok" and "partial" carry values (partial: those of the blocks that answered)
            if status != "error" and (d[5] is None or ts >= d[5]):
                d[5], d[6] = ts, payload
            if status != "ok":  # "error" and "partial": something failed
                d[12] += 1
                if d[7] is None or ts >= d[7]:
                    d[7], d[8] = ts, payload
        elif kind == "health" and (d[9] is None or ts >= d[9]):
            d[9], d[10] = ts, payload
    for d in devs.values():
        if d[6] is not None:
            d[6] = _field(d[6], "values")
        if d[8] is not None:
            d[8] = _failure(d[8])
        if d[10] is not None:
            d[10] = _field(d[10], "health")
    return [tuple(d) for d in devs.values()], gaps, dropped


def _failure(payload):
    """A failed reading's error as compact JSON text (devices.last_error). An "error" record's
    own "error"; for a "partial" one (CONTRACTS §1) an error of kind "partial" that names every
    refused point: {"kind": "partial", "message": ..., "points": [...], "errors": [...]}."""
    rec = json.loads(payload) if type(payload) is str else payload
    if rec.get("status") != "partial":
        return _field(rec, "error")
    errors = [e for e in rec.get("errors") or () if type(e) is dict]
    points = []
    for e in errors:
        for p in e.get("points") or ():
            if type(p) is str and p not in points:
                points.append(p)
    messages = [e["message"] for e in errors if type(e.get("message")) is str]
    out = {"kind": "partial", "message": "; ".join(messages) or "some points failed", "points": points,
           "errors": errors}
    try:
        return _encode(out)
    except ValueError:
        return _encode(finite(out))


class Store:
    dialect = "sqlite"
    ph = "?"
    # Called inside each batch's write transaction, after its records and summaries are written:
    # hook(cur, store, agent, fresh, received), `fresh` = the newly stored rows (ROW_COLUMNS tuples,
    # seq order; payload = the record's JSON text). A hook that raises rolls the whole batch back
    # (the agent retries it), so what a hook maintains (rollups, alert inputs) is exactly as
    # durable as the records. Register with add_ingest_hook; keep hooks cheap: they run on ingest.
    ingest_hooks = ()

    def add_ingest_hook(self, hook):
        self.ingest_hooks = tuple(self.ingest_hooks) + (hook,)

    def _sql(self, text):
        return text if self.ph == "?" else text.replace("?", self.ph)

    # A stored reading stamped more than this many seconds after its batch arrived loses its
    # place as a device's "last" to any later batch (see _newer). At least the ingest's own
    # future-skew refusal, so that only rows from before that refusal are affected.
    future_skew = 86400.0

    def _ts_text(self, epoch_sql):
        """SQL: epoch seconds -> ts text ('2026-11-21T10:30:45.123Z'), SQLite's form."""
        return "strftime('%%Y-%%m-%%dT%%H:%%M:%%fZ', %s, 'unixepoch')" % epoch_sql

    def _prepare_sql(self):
        q = self._sql
        cap = self._ts_text("excluded.last_seen + %r" % float(self.future_skew))
        cols = ", ".join(ROW_COLUMNS)
        self.sql_insert = q("INSERT INTO records (%s) VALUES (%s) ON CONFLICT (agent, seq) DO NOTHING"
                            % (cols, ", ".join(["?"] * len(ROW_COLUMNS))))
        if self.dialect == "postgres":
            self.sql_insert = self.sql_insert.replace(
                "VALUES (" + ", ".join([self.ph] * len(ROW_COLUMNS)),
                "VALUES (" + ", ".join([self.ph] * 7 + [self.ph + "::jsonb"] + [self.ph] * 2))
        self.sql_existing = q("SELECT seq FROM records WHERE agent = ? AND seq >= ? AND seq <= ?")
        self.sql_agent = q(
            "INSERT INTO agents (agent, max_seq, records, gaps, dropped, first_seen, last_seen) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (agent) DO UPDATE SET "
            "max_seq = CASE WHEN excluded.max_seq > agents.max_seq THEN excluded.max_seq ELSE agents.max_seq END, "
            "records = agents.records + excluded.records, gaps = agents.gaps + excluded.gaps, "
            "dropped = agents.dropped + excluded.dropped, last_seen = excluded.last_seen RETURNING max_seq")
        self.sql_device = q(
            "INSERT INTO devices (%s) VALUES (%s) ON CONFLICT (agent, device) DO UPDATE SET "
            "unit = COALESCE(excluded.unit, devices.unit), %s, %s, %s, %s, %s, %s, %s, %s, "
            "records = devices.records + excluded.records, errors = devices.errors + excluded.errors, "
            "last_seen = excluded.last_seen"
            % (", ".join(DEVICE_COLUMNS), ", ".join(["?"] * len(DEVICE_COLUMNS)),
               _newer("last_status", "last_ts", cap), _newer("last_ts", "last_ts", cap),
               _newer("last_values", "values_ts", cap), _newer("values_ts", "values_ts", cap),
               _newer("last_error", "error_ts", cap), _newer("error_ts", "error_ts", cap),
               _newer("health", "health_ts", cap), _newer("health_ts", "health_ts", cap)))

    # --- schema -----------------------------------------------------------------------------

    def migrate(self):
        """Apply missing migrations, each in its own transaction; returns the schema version."""
        with self._write() as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            cur.execute("SELECT version FROM schema_version")
            row = cur.fetchone()
            if row is None:
                cur.execute(self._sql("INSERT INTO schema_version (version) VALUES (?)"), (0,))
                current = 0
            else:
                current = row[0]
        if current > VERSION:
            raise RuntimeError("database schema version %d is newer than this collector (%d)"
                               % (current, VERSION))
        for v in range(current + 1, VERSION + 1):
            self._migrate_outside_transaction(v)
            with self._write() as cur:
                cur.execute("SELECT version FROM schema_version")
                if cur.fetchone()[0] >= v:  # another collector process migrated meanwhile
                    continue
                for stmt in statements(self.dialect, v):
                    cur.execute(stmt)
                cur.execute(self._sql("UPDATE schema_version SET version = ?"), (v,))
        return VERSION

    def _migrate_outside_transaction(self, version):
        """Steps of migration `version` that cannot run in a transaction (none in SQLite)."""

    # --- ingest -----------------------------------------------------------------------------

    def ingest(self, agent, rows, received):
        """Store validated rows of one agent in one transaction, idempotent on (agent, seq).
        Returns (stored, duplicates, max_seq); committed when it returns."""
        if not rows:
            with self._read() as cur:
                cur.execute(self._sql("SELECT max_seq FROM agents WHERE agent = ?"), (agent,))
                row = cur.fetchone()
            return 0, 0, row[0] if row else None
        with self._write() as cur:
            return self._ingest_tx(cur, agent, rows, received)

    def _ingest_tx(self, cur, agent, rows, received):
        """The statements of one batch, inside a transaction the caller commits."""
        seqs = [r[1] for r in rows]
        lo, hi = min(seqs), max(seqs)
        cur.execute(self.sql_existing, (agent, lo, hi))
        existing = {r[0] for r in cur.fetchall()}
        if existing or len(set(seqs)) != len(seqs):
            fresh, seen = [], set(existing)
            for r in rows:
                if r[1] not in seen:
                    seen.add(r[1])
                    fresh.append(r)
        else:
            fresh = rows
        # Lock order (PostgreSQL): two overlapping batches of one agent on two workers must take
        # their row locks in the same order, or each waits for the other (deadlock: 503 and a
        # retry). So records by seq (an agent's batch is in seq order already: sorting it costs
        # one pass; legacy content-hash seqs are not), then devices by name, then the one agent
        # row last. aggregate() then sees rows in seq order: of two equal ts, the higher seq wins.
        fresh = sorted(fresh, key=_seq_of)
        stored = self._insert(cur, fresh) if fresh else 0
        # `stored` < len(fresh) only if another process stored some of them in between: then
        # `fresh` becomes what this transaction stored, so neither the device counters nor an
        # ingest hook (rollups) count those twice.
        if stored < len(fresh):
            fresh = self._stored_here(cur, agent, fresh)
        devices, gaps, dropped = aggregate(fresh)
        if devices:
            devices.sort(key=_device_key)
            cur.executemany(self.sql_device, devices)
        # Legacy /receive-data records have negative seqs (legacy.legacy_row), outside the
        # agents' 0..2^63-1: they never move max_seq (-1 until the agent sends a record itself).
        cur.execute(self.sql_agent, (agent, max(hi, -1), stored, gaps, dropped, received, received))
        max_seq = cur.fetchone()[0]
        for hook in self.ingest_hooks:
            hook(cur, self, agent, fresh, received)
        return stored, len(rows) - stored, max_seq

    def _insert(self, cur, rows):
        cur.executemany(self.sql_insert, rows)
        return cur.rowcount

    def _stored_here(self, cur, agent, rows):
        """The rows this transaction inserted (others were inserted meanwhile by another
        transaction; SQLite has one writer, so only PostgreSQL has to tell them apart)."""
        return rows

    # --- queries ----------------------------------------------------------------------------

    def ping(self):
        with self._read() as cur:
            cur.execute("SELECT version FROM schema_version")
            return cur.fetchone()[0]

    def agents(self):
        with self._read() as cur:
            cur.execute("SELECT agent, max_seq, records, gaps, dropped, first_seen, last_seen "
                        "FROM agents ORDER BY agent")
            return [dict(zip(("agent", "max_seq", "records", "gaps", "dropped", "first_seen", "last_seen"), r))
                    for r in cur.fetchall()]

    def devices(self):
        with self._read() as cur:
            cur.execute("SELECT %s FROM devices ORDER BY agent, device" % ", ".join(DEVICE_COLUMNS))
            return [dict(zip(DEVICE_COLUMNS, r)) for r in cur.fetchall()]

    def series(self, agent, device, since, limit=2000):
        """(ts, payload) of a device's readings with values (ok, partial) since `since`, oldest
        first (for sparklines)."""
        with self._read() as cur:
            cur.execute(self._sql(
                "SELECT ts, %s FROM records WHERE agent = ? AND device = ? AND ts >= ? AND kind = 'data' "
                "AND status IN ('ok', 'partial') ORDER BY ts DESC LIMIT ?" % self._payload_text),
                (agent, device, since, limit))
            rows = cur.fetchall()
        rows.reverse()
        return rows

    _payload_text = "payload"

    def _record_sql(self, where):
        """SELECT of one export page: the filters, the keyset condition, ORDER BY the key, LIMIT."""
        sql = "SELECT %s FROM records" % ", ".join(
            c if c != "payload" else self._payload_text for c in ROW_COLUMNS)
        if where:
            sql += " WHERE " + " AND ".join(where)
        return self._sql(sql + " ORDER BY ts, agent, seq LIMIT ?")

    def records(self, agent=None, device=None, since=None, until=None, kind=None, status=None, limit=None,
                received_before=None, page=EXPORT_PAGE):
        """Generator of row tuples (ROW_COLUMNS order), oldest first: (ts, agent, seq) order.

        Keyset pagination: `page` rows per query, each query its own short read transaction, the
        next one starting after the last key seen. Between pages nothing is held, so a client
        that reads an export slowly (or stalls) pins no snapshot: SQLite's WAL can be
        checkpointed and reset, PostgreSQL's vacuum goes on. The key is immutable and unique, so
        every row that exists for the whole export comes exactly once, in order, whatever is
        inserted or deleted (retention) meanwhile. `received_before` (epoch seconds, server time)
        bounds the export to rows stored by then, so an export started under ingest ends."""
        where, args = [], []
        for col, op, val in (("agent", "=", agent), ("device", "=", device), ("ts", "<", until),
                             ("kind", "=", kind), ("status", "=", status), ("received", "<=", received_before)):
            if val is not None:
                where.append("%s %s ?" % (self._hint(col, agent, device), op))
                args.append(val)
        # `since` only on the first page: after it the key condition implies it, and given both
        # the planner may start every page's index range at `since` (quadratic in the export).
        first_sql = self._record_sql(where + ["ts >= ?"] if since is not None else where)
        next_sql = self._record_sql(where + ["(ts, agent, seq) > (?, ?, ?)"])
        first_args = args + [since] if since is not None else args
        return self._pages(first_sql, first_args, next_sql, args, limit, max(1, int(page)))

    def _hint(self, col, agent, device):
        """Column expression for a filter (SQLite: see SQLiteStore)."""
        return col

    def _pages(self, first_sql, first_args, next_sql, args, limit, page):
        left = limit
        with self._pager() as fetch:
            rows = None
            while left is None or left > 0:
                n = page if left is None else min(page, left)
                if rows is None:
                    rows = fetch(first_sql, first_args + [n])
                else:
                    last = rows[-1]  # ROW_COLUMNS: (agent, seq, ts, ...)
                    rows = fetch(next_sql, args + [last[2], last[0], last[1], n])
                yield from rows
                if len(rows) < n:
                    return
                if left is not None:
                    left -= n

    def delete_older(self, cutoff, chunk):
        """Delete up to `chunk` records received before `cutoff` (epoch seconds, server time) in
        one short transaction; returns the count. By `received`, not by the record's ts: records
        taken while the agent's clock was unset ("clock":"unsynced") carry a ts far in the past
        and would otherwise go right after they were received and acknowledged."""
        with self._write() as cur:
            cur.execute(self._sql(
                "DELETE FROM records WHERE (agent, seq) IN "
                "(SELECT agent, seq FROM records WHERE received < ? LIMIT ?)"), (float(cutoff), chunk))
            return cur.rowcount
