"""Rollups: per (agent, device, point) count/min/max/sum/last over 1-minute and 1-hour buckets.

Two ways to keep them, `[collector] rollups`:
- async (the default): the batch's transaction adds one row to rollup_queue naming its new
  records (seq runs of one agent); the rollup job (the app's rollup thread, see start) reads
  them, computes outside any write lock, then in ONE transaction deletes those queue rows and
  merges the buckets. The queue is the job's whole state: a stop anywhere resumes exactly
  there, and a queue row another process already took (its delete finds fewer rows) rolls the
  step back, so nothing counts twice. Ingest pays one small insert per batch; the job gives
  way to a stream of batches (job_due), so the series lag the records by up to JOB_MAX_LAG.
- sync: the batch's own transaction merges its buckets (read-your-writes, at the price of
  the whole rollup work on the ingest path: tools/bench/history.py measures both).
Either way a bucket counts exactly the stored records: a re-posted batch (its records are not
`fresh`) adds nothing. Records may arrive late and in any order (an agent's day-old backlog):
every bucket is a merge of partial aggregates (count and sum add, min/max take the extreme,
`last` is the value of the newest sample by its own ts; of equal ts, the larger value, so the
result does not depend on arrival order). avg = sum / count, computed when read.

What rolls up: data records with values ("ok", "partial"), each sample of a buffered record
(agent/collector/samples.py), and of those only numbers: JSON integers and finite floats.
Booleans, strings and objects are states, not quantities (the device page draws them as a state
strip from the raw records); records taken while the agent's clock was unset
("clock": "unsynced") carry no real time and are left out. Integers are summed as floats
(a uint64 beyond 2^53 loses its last digits in a rollup; the raw record keeps them).

Tables (schema.py migration 5): rollup_series (id, agent, device, point), rollup_1m and rollup_1h
(sid, t = bucket start in epoch seconds, n, sum, min, max, last, last_ms = epoch ms of the `last`
sample), rollup_queue (async: batches not rolled up yet), rollup_state (the backfill's cursor)
and rollup_pending (records that went through the hook while a backfill ran: it skips them).

Existing records (a database from before migration 5) are rolled up by `backfill_step`, in
chunks of records in (agent, seq) order, each chunk and the cursor past it in one transaction:
a stop anywhere resumes exactly there. While it runs the hook marks what it rolled up in
rollup_pending, so a record is counted once whichever of the two saw it first.
"""
import calendar
import json
import logging
import math
import threading
import time
import traceback

from agent.collector.samples import samples
from agent.collector.validate import normalize_ts

log = logging.getLogger("modbus.collector")

LEVELS = (("1m", 60), ("1h", 3600))  # (table suffix, bucket seconds), finest first
ROWS_PER_UPSERT = 100  # 8 parameters a row: 800 per statement, under SQLite's old 999
BACKFILL_CHUNK = 2000  # records per backfill transaction
_ROLLABLE = ("ok", "partial")

_minute_cache = {}


def minute_epoch(prefix):
    """'2026-11-21T10:30' -> epoch seconds of that minute (cached: a batch has few minutes)."""
    t = _minute_cache.get(prefix)
    if t is None:
        if len(_minute_cache) > 100000:
            _minute_cache.clear()
        t = _minute_cache[prefix] = calendar.timegm(
            (int(prefix[:4]), int(prefix[5:7]), int(prefix[8:10]), int(prefix[11:13]), int(prefix[14:16]), 0))
    return t


def ts_ms(ts):
    """Canonical ts text -> epoch milliseconds."""
    return minute_epoch(ts[:16]) * 1000 + int(ts[17:19]) * 1000 + int(ts[20:23])


def newer(ms, value, last_ms, last):
    """Does a sample (ms, value) replace the bucket's last (last_ms, last)? The newer sample
    wins; of equal times the larger value (arrival order must not matter)."""
    return ms > last_ms or (ms == last_ms and value > last)


def accumulate(rows, acc=None):
    """Stored rows (ROW_COLUMNS tuples, payload = JSON text) of one agent -> acc, a dict
    {(device, minute prefix 'YYYY-MM-DDTHH:MM'): {point: [n, sum, min, max, last, last ts text]}}.
    Pure; the hooks, the job and the backfill use it; the tests check the buckets it leads to
    against a brute force. (Two levels: the (device, minute) key is built once per sample, not
    once per value; this loop is most of the rollups' CPU.)"""
    if acc is None:
        acc = {}
    isfinite = math.isfinite
    loads = json.loads
    for row in rows:
        if row[3] != "data" or row[6] not in _ROLLABLE or row[8] == "unsynced" or row[4] is None:
            continue
        payload = row[7]
        rec = loads(payload) if type(payload) is str else payload
        if type(rec) is not dict:
            continue
        device = row[4]
        for ts, values in samples(rec):
            if type(ts) is not str or len(ts) != 24 or ts[23] != "Z":
                ts = normalize_ts(ts)
                if ts is None:
                    continue
            g = acc.get((device, ts[:16]))
            if g is None:
                g = acc[(device, ts[:16])] = {}
            for point, v in values.items():
                tv = type(v)
                if tv is float:
                    if not isfinite(v):
                        continue
                elif tv is int:
                    try:
                        v = float(v)
                    except OverflowError:
                        continue
                else:
                    continue
                a = g.get(point)
                if a is None:
                    g[point] = [1, v, v, v, v, ts]
                    continue
                a[0] += 1
                a[1] += v
                if v < a[2]:
                    a[2] = v
                elif v > a[3]:
                    a[3] = v
                if ts > a[5] or (ts == a[5] and v > a[4]):
                    a[4] = v
                    a[5] = ts
    return acc


def buckets(acc):
    """acc (accumulate) -> {"1m": {(device, point, t): [n, sum, min, max, last, last_ms]},
    "1h": {...}}: the 1-hour buckets merged from the 1-minute ones."""
    m1, h1 = {}, {}
    ms_of = {}
    for (device, mk), points in acc.items():
        t = minute_epoch(mk)
        th = t - t % 3600
        base = t * 1000
        for point, (n, s, lo, hi, last, last_ts) in points.items():
            ms = ms_of.get(last_ts)
            if ms is None:
                ms = ms_of[last_ts] = base + int(last_ts[17:19]) * 1000 + int(last_ts[20:23])
            m1[(device, point, t)] = [n, s, lo, hi, last, ms]
            h = h1.get((device, point, th))
            if h is None:
                h1[(device, point, th)] = [n, s, lo, hi, last, ms]
                continue
            h[0] += n
            h[1] += s
            if lo < h[2]:
                h[2] = lo
            if hi > h[3]:
                h[3] = hi
            if ms > h[5] or (ms == h[5] and last > h[4]):
                h[4], h[5] = last, ms
    return {"1m": m1, "1h": h1}


def merge(a, n, s, lo, hi, last, ms):
    """Merge a partial aggregate into bucket `a` = [n, sum, min, max, last, last_ms], in place."""
    a[0] += n
    a[1] += s
    if lo < a[2]:
        a[2] = lo
    if hi > a[3]:
        a[3] = hi
    if newer(ms, last, a[5], a[4]):
        a[4], a[5] = last, ms


# --- SQL ------------------------------------------------------------------------------------

def _upsert_sql(store, level, n):
    least, greatest = ("LEAST", "GREATEST") if store.dialect == "postgres" else ("MIN", "MAX")
    tbl = "rollup_" + level
    row = "(" + ", ".join([store.ph] * 8) + ")"
    return ("INSERT INTO {t} (sid, t, n, sum, min, max, last, last_ms) VALUES {rows} "
            "ON CONFLICT (sid, t) DO UPDATE SET n = {t}.n + excluded.n, sum = {t}.sum + excluded.sum, "
            "min = {lo}({t}.min, excluded.min), max = {hi}({t}.max, excluded.max), "
            "last = CASE WHEN excluded.last_ms > {t}.last_ms OR (excluded.last_ms = {t}.last_ms "
            "AND excluded.last > {t}.last) THEN excluded.last ELSE {t}.last END, "
            "last_ms = {hi}({t}.last_ms, excluded.last_ms)").format(
                t=tbl, rows=", ".join([row] * n), lo=least, hi=greatest)


def _sql_cache(store):
    c = store.__dict__.get("_rollup_sql")
    if c is None:
        c = store._rollup_sql = {}
    return c


def series_ids(cur, store, agent, names):
    """{(device, point): id} for `names` (a set of (device, point)), creating missing series.
    Looked up per batch, never cached across transactions: a series row created by a batch
    that then rolls back must not leave an id behind that a later series could get."""
    q = store._sql
    cur.execute(q("SELECT device, point, id FROM rollup_series WHERE agent = ?"), (agent,))
    ids = {(d, p): i for d, p, i in cur.fetchall()}
    missing = sorted(n for n in names if n not in ids)
    if missing:
        cur.executemany(q("INSERT INTO rollup_series (agent, device, point) VALUES (?, ?, ?) "
                          "ON CONFLICT (agent, device, point) DO NOTHING"),
                        [(agent, d, p) for d, p in missing])
        cur.execute(q("SELECT device, point, id FROM rollup_series WHERE agent = ?"), (agent,))
        ids = {(d, p): i for d, p, i in cur.fetchall()}
    return ids


def write_buckets(cur, store, agent, acc):
    """Merge one agent's accumulated samples into rollup_1m and rollup_1h (the caller's
    transaction). Rows go in (sid, t) order: two PostgreSQL transactions of one agent take
    their row locks in the same order (no deadlock)."""
    if not acc:
        return 0
    levels = buckets(acc)
    ids = series_ids(cur, store, agent, {(d, p) for d, p, _ in levels["1m"]})
    cache = _sql_cache(store)
    written = 0
    for level, _secs in LEVELS:
        rows = sorted((ids[(d, p)], t, *a) for (d, p, t), a in levels[level].items())
        for i in range(0, len(rows), ROWS_PER_UPSERT):
            part = rows[i:i + ROWS_PER_UPSERT]
            sql = cache.get((level, len(part)))
            if sql is None:
                sql = cache[(level, len(part))] = _upsert_sql(store, level, len(part))
            cur.execute(sql, [x for r in part for x in r])
        written += len(rows)
    return written


# --- the ingest hooks ---------------------------------------------------------------------------

MODES = ("async", "sync", "off")


def _mark_for_backfill(cur, store, agent, fresh):
    """While a backfill runs, mark the batch's records (the backfill skips them: they are
    rolled up through the hook)."""
    if store.__dict__.get("_rollup_backfilled"):
        return
    cur.execute("SELECT done FROM rollup_state WHERE name = 'backfill'")
    row = cur.fetchone()
    if row is None or row[0]:
        store._rollup_backfilled = True
        return
    marks = [(agent, r[1]) for r in fresh if r[3] == "data"]
    if marks:
        cur.executemany(store._sql("INSERT INTO rollup_pending (agent, seq) VALUES (?, ?) "
                                   "ON CONFLICT (agent, seq) DO NOTHING"), marks)


def sync_hook(cur, store, agent, fresh, received):
    """Ingest hook (CONTRACTS §9), rollups = sync: the batch's new records into the buckets,
    in its own transaction."""
    _mark_for_backfill(cur, store, agent, fresh)
    write_buckets(cur, store, agent, accumulate(fresh))


def seq_ranges(seqs):
    """Sorted seqs -> 'lo:hi,lo:hi' (an agent's batch is one or a few runs)."""
    out = []
    lo = prev = None
    for s in seqs:
        if prev is not None and s == prev + 1:
            prev = s
            continue
        if lo is not None:
            out.append("%d:%d" % (lo, prev))
        lo = prev = s
    if lo is not None:
        out.append("%d:%d" % (lo, prev))
    return ",".join(out)


def parse_ranges(text):
    return [tuple(int(x) for x in part.split(":", 1)) for part in text.split(",") if part]


def async_hook(cur, store, agent, fresh, received):
    """Ingest hook, rollups = async (the default): one row in rollup_queue naming the batch's
    new data records (seq runs), in the batch's transaction; the rollup job (drain_step) rolls
    them up and deletes the row in one transaction of its own."""
    _mark_for_backfill(cur, store, agent, fresh)
    seqs = [r[1] for r in fresh if r[3] == "data"]  # fresh is in seq order (store._ingest_tx)
    if seqs:
        cur.execute(store._sql("INSERT INTO rollup_queue (agent, seqs, n) VALUES (?, ?, ?)"),
                    (agent, seq_ranges(seqs), len(seqs)))
        now = time.monotonic()
        store._rollup_last_batch = now
        if store.__dict__.get("_rollup_first_queued") is None:
            store._rollup_first_queued = now


ingest_hook = sync_hook  # the name CONTRACTS §9 readers look for


def attach(store, mode="sync"):
    """Register the hook of `mode` ("sync", "async"; "off": none) on `store`, once."""
    if mode not in MODES:
        raise ValueError("rollups must be one of %s, got %r" % (", ".join(MODES), mode))
    hooks = tuple(store.ingest_hooks)
    if mode != "off" and sync_hook not in hooks and async_hook not in hooks:
        store.add_ingest_hook(sync_hook if mode == "sync" else async_hook)
    return store


class _Raced(Exception):
    """Another collector process rolled up some of these queue rows first."""


def drain_step(store, max_records=5000):
    """Roll up the oldest queued batches (up to about max_records records): read them and
    compute outside any write transaction (SQLite's write lock is held only for the writes),
    then in one transaction delete their queue rows and merge their buckets. If another
    process deleted some of those rows first, the transaction is rolled back (nothing counted
    twice) and the step answers 0 processed; returns (records rolled up, batches)."""
    q = store._sql
    payload = "payload::text" if store.dialect == "postgres" else "payload"
    cols = "agent, seq, ts, kind, device, unit, status, %s, clock, received" % payload
    with store._read() as cur:
        cur.execute(q("SELECT id, agent, seqs, n FROM rollup_queue ORDER BY id LIMIT ?"), (max(1, max_records),))
        queued = []
        total = 0
        for qid, agent, seqs, n in cur.fetchall():
            if queued and total + n > max_records:
                break
            queued.append((qid, agent, seqs))
            total += n
        if not queued:
            return 0, 0
        by_agent = {}
        for _qid, agent, seqs in queued:
            rows = by_agent.setdefault(agent, [])
            for lo, hi in parse_ranges(seqs):
                cur.execute(q("SELECT %s FROM records WHERE agent = ? AND seq >= ? AND seq <= ?" % cols),
                            (agent, lo, hi))
                rows.extend(cur.fetchall())
    accs = {agent: accumulate(rows) for agent, rows in by_agent.items()}
    ids = [qid for qid, _a, _s in queued]
    try:
        with store._write() as cur:
            deleted = 0
            for i in range(0, len(ids), 500):
                part = ids[i:i + 500]
                cur.execute(q("DELETE FROM rollup_queue WHERE id IN (%s)" % ", ".join(["?"] * len(part))), part)
                deleted += cur.rowcount
            if deleted != len(ids):
                raise _Raced()
            for agent in sorted(accs):
                write_buckets(cur, store, agent, accs[agent])
    except _Raced:
        return 0, 0
    return sum(len(r) for r in by_agent.values()), len(ids)


def drain(store, stop=None, max_records=5000, pause=0.0):
    """drain_step until the queue is empty (or `stop`); returns records rolled up."""
    total = 0
    while stop is None or not stop.is_set():
        n, batches = drain_step(store, max_records)
        total += n
        if batches == 0:
            if queued(store)[0] == 0:
                break
            time.sleep(0.01)  # another process is rolling those up
        if pause and stop is not None:
            stop.wait(pause)
    return total


def up_to_date(store):
    """False while the backfill runs or batches wait in rollup_queue (the rollups miss them)."""
    if not store.__dict__.get("_rollup_backfilled"):
        if not backfill_done(store):
            return False
        store._rollup_backfilled = True
    return queued(store)[0] == 0


def queued(store):
    """(batches, records) waiting in rollup_queue."""
    with store._read() as cur:
        cur.execute("SELECT COUNT(*), COALESCE(SUM(n), 0) FROM rollup_queue")
        n, r = cur.fetchone()
    return int(n), int(r)


# --- backfill -------------------------------------------------------------------------------

def backfill_done(store):
    with store._read() as cur:
        cur.execute("SELECT done FROM rollup_state WHERE name = 'backfill'")
        row = cur.fetchone()
    return row is None or bool(row[0])


def backfill_step(store, chunk=BACKFILL_CHUNK):
    """Roll up the next `chunk` records (by agent, seq) that existed before the upgrade, and
    move the cursor past them, in one transaction. Returns the number of records read, 0 when
    the backfill is done (then marked done and rollup_pending emptied)."""
    q = store._sql
    payload = "r.payload::text" if store.dialect == "postgres" else "r.payload"
    cols = "r.agent, r.seq, r.ts, r.kind, r.device, r.unit, r.status, %s, r.clock, r.received" % payload
    with store._write() as cur:
        # FOR UPDATE (PostgreSQL): collector processes backfilling at once take turns per chunk
        cur.execute("SELECT agent, seq, done FROM rollup_state WHERE name = 'backfill'"
                    + (" FOR UPDATE" if store.dialect == "postgres" else ""))
        state = cur.fetchone()
        if state is None or state[2]:
            return 0
        # Records the hook rolled up (marked in rollup_pending) are skipped. Only data rows
        # roll up; the cursor still moves over the others.
        where = "" if state[0] is None else "WHERE (r.agent, r.seq) > (?, ?) "
        args = () if state[0] is None else (state[0], state[1])
        cur.execute(q("SELECT %s, EXISTS (SELECT 1 FROM rollup_pending p WHERE p.agent = r.agent "
                      "AND p.seq = r.seq) FROM records r %sORDER BY r.agent, r.seq LIMIT ?" % (cols, where)),
                    args + (chunk,))
        rows = cur.fetchall()
        if not rows:
            cur.execute("UPDATE rollup_state SET done = 1 WHERE name = 'backfill'")
            cur.execute("DELETE FROM rollup_pending")
            return 0
        by_agent = {}
        for r in rows:
            if not r[10]:
                by_agent.setdefault(r[0], []).append(r[:10])
        for agent in sorted(by_agent):
            write_buckets(cur, store, agent, accumulate(by_agent[agent]))
        last = rows[-1]
        cur.execute(q("UPDATE rollup_state SET agent = ?, seq = ? WHERE name = 'backfill'"), (last[0], last[1]))
        # marks behind the cursor are no longer needed
        cur.execute(q("DELETE FROM rollup_pending WHERE agent < ? OR (agent = ? AND seq <= ?)"),
                    (last[0], last[0], last[1]))
        return len(rows)


def backfill(store, chunk=BACKFILL_CHUNK, stop=None, pause=0.0, limit=None):
    """Run backfill_step until done (or `stop` is set, or `limit` chunks); returns records read."""
    total = steps = 0
    while stop is None or not stop.is_set():
        n = backfill_step(store, chunk)
        total += n
        steps += 1
        if n == 0 or (limit is not None and steps >= limit):
            break
        if pause and stop is not None:
            stop.wait(pause)
    return total


# --- retention per level ------------------------------------------------------------------------

def delete_older(store, level, cutoff, chunk):
    """Delete up to `chunk` buckets of `level` starting before `cutoff` (epoch seconds) in one
    short transaction; returns the count. By bucket time: a rollup has no receive time."""
    tbl = "rollup_" + level
    with store._write() as cur:
        cur.execute(store._sql("DELETE FROM %s WHERE (sid, t) IN (SELECT sid, t FROM %s WHERE t < ? LIMIT ?)"
                               % (tbl, tbl)), (int(cutoff), chunk))
        return cur.rowcount


def retention_once(store, days, now, chunk, stop=None, pause=0.0):
    """days = {"1m": d, "1h": d} (0: keep forever) -> {level: deleted}."""
    out = {}
    for level, _secs in LEVELS:
        d = days.get(level) or 0
        if d <= 0:
            continue
        cutoff = now - d * 86400.0
        total = 0
        while stop is None or not stop.is_set():
            n = delete_older(store, level, cutoff, chunk)
            total += n
            if n < chunk:
                break
            if pause and stop is not None:
                stop.wait(pause)
        out[level] = total
        if total:
            log.info("retention: deleted %d %s rollup buckets before %s", total, level,
                     time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(cutoff)))
    return out


# --- the app's maintenance thread ---------------------------------------------------------------

# The job gives way to ingest: it rolls up once no batch came for JOB_IDLE seconds, or once the
# oldest batch it knows of has waited JOB_MAX_LAG (so under steady load from many agents, which
# is never idle, the series are at most that far behind, and a burst of batches is stored at the
# rate without rollups; the work is only moved, tools/bench/history.py shows both rates).
JOB_IDLE = 0.1
JOB_MAX_LAG = 10.0


def job_due(store, now):
    first = store.__dict__.get("_rollup_first_queued")
    if first is None:
        return False
    last = store.__dict__.get("_rollup_last_batch") or 0.0
    return now - last >= JOB_IDLE or now - first >= JOB_MAX_LAG


def start(app):
    """Attach the hook of cfg.rollups to app.store and start the thread that runs the rollup job
    (async: drains rollup_queue, see job_due), the backfill (if one is left) and the rollups'
    retention every retention_interval. Returns the thread (or None)."""
    cfg = app.cfg
    mode = getattr(cfg, "rollups", "async")
    store = app.store
    if mode == "off":
        store._rollups_off = True  # series.query_series then reads the raw records
        return None
    attach(store, mode)
    days = {"1m": getattr(cfg, "retention_1m_days", 0.0), "1h": getattr(cfg, "retention_1h_days", 0.0)}
    stop = app._stop
    state = {"backfill": not backfill_done(store), "next_retention": 0.0}
    if mode == "async" and queued(store)[0]:  # left by a stop: at once
        store._rollup_first_queued = time.monotonic() - JOB_MAX_LAG

    def loop():
        while not stop.is_set():
            try:
                if mode == "async" and job_due(store, time.monotonic()):
                    store._rollup_first_queued = None  # a batch stored from now on sets it again
                    drain(store, stop=stop)
                if state["backfill"]:
                    t = time.monotonic()
                    n = backfill(store, stop=stop, pause=0.01, limit=10)
                    state["backfill"] = not backfill_done(store)
                    if not state["backfill"]:
                        log.info("rollups: backfill done (last %d records in %.0f s)", n, time.monotonic() - t)
                if any(days.values()) and time.monotonic() >= state["next_retention"]:
                    retention_once(store, days, app.clock(), cfg.retention_chunk, stop, 0.05)
                    state["next_retention"] = time.monotonic() + cfg.retention_interval
            except Exception:
                log.error("rollup job failed; will retry:\n%s", traceback.format_exc().rstrip())
                stop.wait(min(5.0, cfg.retention_interval))
                if mode == "async":
                    store._rollup_first_queued = time.monotonic() - JOB_MAX_LAG  # try again now
            stop.wait(0.05)  # job_due is a look at two numbers: polling it costs nothing

    th = threading.Thread(target=loop, name="rollups", daemon=True)
    th.start()
    return th
