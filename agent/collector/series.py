"""Series queries: one point of one device over time, in buckets of `step` seconds, from the
coarsest table whose bucket divides the step (rollup_1h, rollup_1m, else the raw records), and
GET /api/v1/series (JSON or CSV).

    query_series(store, agent, device, point, since, until, step, agg=None) ->
        {"level": "raw" | "1m" | "1h", "step": seconds,
         "buckets": [{"t": "<bucket start ts>", "count": n, "min": x, "max": x, "avg": x, "last": x}, ...]}

since/until: ts text ('2026-11-21T10:30:45.123Z'). The buckets are those starting in
[since rounded down to the step, until), each whole (the last one may reach past until); aligned
to the epoch (a 1-day step: UTC midnights), oldest first, empty buckets left out. `agg` (one of
AGGS) keeps only that value in each bucket (avg is null when the sum overflowed the float range).
Numbers only: see agent/collector/rollup.py for
what rolls up. With rollups = async the last second or so may not be rolled up yet.

Grafana reads the rollup tables directly: GRAFANA_SQLITE and GRAFANA_POSTGRES below (also in
the README and schema.py), tested against both databases.
"""
import calendar
import json
import math

from agent.collector import rollup
from agent.collector.samples import samples
from agent.collector.web import HTTPError, json_answer, status

AGGS = ("count", "min", "max", "avg", "last")

# Grafana panels on the rollup tables (`t` is epoch seconds; Grafana takes a numeric time column
# as that). The SQLite one (frser-sqlite-datasource): hourly average and band of one point. The
# PostgreSQL one: 1-minute rollups re-bucketed to the panel's interval (at least a minute).
GRAFANA_SQLITE = """\
SELECT r.t AS time, r.sum / r.n AS avg, r.min AS min, r.max AS max
FROM rollup_1h r JOIN rollup_series s ON s.id = r.sid
WHERE s.agent = 'site7' AND s.device = 'meter1' AND s.point = 'voltage_l1'
  AND r.t >= $__from / 1000 AND r.t < $__to / 1000
ORDER BY r.t"""
GRAFANA_POSTGRES = """\
SELECT r.t / g.step * g.step AS time, SUM(r.sum) / SUM(r.n) AS avg, MIN(r.min) AS min, MAX(r.max) AS max
FROM rollup_1m r JOIN rollup_series s ON s.id = r.sid,
     (SELECT GREATEST(60, $__interval_ms / 60000 * 60) AS step) g
WHERE s.agent = 'site7' AND s.device = 'meter1' AND s.point = 'voltage_l1'
  AND $__unixEpochFilter(r.t)
GROUP BY 1 ORDER BY 1"""
MAX_BUCKETS = 100000     # buckets one answer may hold (400 beyond: a coarser step)
MAX_RAW_RECORDS = 500000  # records a raw-level query may read (400 beyond: a step of 60 s or more)
RAW_SPAN = 3600.0        # raw queries read records this far past until (and one more: _from_raw)


def epoch(ts):
    """Canonical ts text -> epoch seconds (float, milliseconds kept)."""
    return calendar.timegm((int(ts[:4]), int(ts[5:7]), int(ts[8:10]), int(ts[11:13]), int(ts[14:16]),
                            int(ts[17:19]))) + int(ts[20:23]) / 1000.0


def level_for(step):
    """The coarsest rollup level whose bucket divides `step` (seconds), or "raw"."""
    for name, secs in reversed(rollup.LEVELS):
        if step >= secs and step % secs == 0:
            return name
    return "raw"


def _utc(t):
    from agent.wire import utc_timestamp

    return utc_timestamp(t)


def _bucket_dict(t, a, agg):
    n, s, lo, hi, last = a[0], a[1], a[2], a[3], a[4]
    avg = s / n
    if not math.isfinite(avg):  # the sum overflowed (float64 values near 1.8e308): unknown, not inf
        avg = None
    b = {"t": _utc(t), "count": n, "min": lo, "max": hi, "avg": avg, "last": last}
    if agg is not None:
        return {"t": b["t"], agg: b[agg]}
    return b


def _series_id(store, agent, device, point):
    with store._read() as cur:
        cur.execute(store._sql("SELECT id FROM rollup_series WHERE agent = ? AND device = ? AND point = ?"),
                    (agent, device, point))
        row = cur.fetchone()
    return None if row is None else row[0]


def _from_rollup(store, level, sid, lo, hi, step):
    """Buckets of `step` merged from the level's rows with lo <= t < hi: {bucket t: aggregate}."""
    with store._read() as cur:
        cur.execute(store._sql("SELECT t, n, sum, min, max, last, last_ms FROM rollup_%s "
                               "WHERE sid = ? AND t >= ? AND t < ? ORDER BY t" % level), (sid, lo, hi))
        rows = cur.fetchall()
    out = {}
    for t, n, s, mn, mx, last, ms in rows:
        b = t - t % step
        a = out.get(b)
        if a is None:
            out[b] = [n, s, mn, mx, last, ms]
        else:
            rollup.merge(a, n, s, mn, mx, last, ms)
    return out


def _from_raw(store, agent, device, point, lo, hi, step):
    """Buckets of `step` computed from the raw records (through samples())."""
    from agent.wire import utc_timestamp

    out = {}
    read = 0
    # A buffered record's ts is its newest sample's: its first samples may be before `until`
    # even when its ts is after, so the records read reach RAW_SPAN beyond, and one record
    # further: a buffer may span longer than RAW_SPAN (buffer = 1000 at 10 s is 2.8 h), and a
    # device's polls are in time order (CONTRACTS §8), so a later record's samples all come
    # after that one's ts, past `until`.
    end = utc_timestamp(min(hi + RAW_SPAN, 253402300799))
    rows = store.records(agent=agent, device=device, since=utc_timestamp(lo), kind="data")
    try:
        for row in rows:
            if row[2] >= end:
                _raw_row(row, point, lo, hi, step, out)
                break
            read += 1
            if read > MAX_RAW_RECORDS:
                raise HTTPError(400, "more than %d records in range at a raw step: use a step of 60 s or a "
                                "multiple of it (rollups)" % MAX_RAW_RECORDS, "step")
            _raw_row(row, point, lo, hi, step, out)
    finally:
        rows.close()
    return out


def _raw_row(row, point, lo, hi, step, out):
    """One stored data row's samples of `point` into `out` ({bucket t: aggregate})."""
    # per sample, not per minute: the step may be finer than a minute
    if row[6] not in ("ok", "partial") or row[8] == "unsynced":
        return
    rec = json.loads(row[7]) if type(row[7]) is str else row[7]
    for ts, values in samples(rec):
        v = values.get(point)
        if type(v) is int:
            v = float(v)
        elif type(v) is not float or v != v or v in (float("inf"), float("-inf")):
            continue
        if type(ts) is not str or len(ts) != 24:
            from agent.collector.validate import normalize_ts

            ts = normalize_ts(ts)
            if ts is None:
                continue
        ms = rollup.ts_ms(ts)
        t = ms // 1000
        b = t - t % step
        if not lo <= b < hi:  # whole buckets, as the rollups' (see query_series)
            continue
        a = out.get(b)
        if a is None:
            out[b] = [1, v, v, v, v, ms]
        else:
            rollup.merge(a, 1, v, v, v, v, ms)


def query_series(store, agent, device, point, since, until, step, agg=None):
    """See the module docstring. step: whole seconds >= 1."""
    step = int(step)
    if step < 1:
        raise ValueError("step must be at least 1 second")
    if agg is not None and agg not in AGGS:
        raise ValueError("agg must be one of %s" % ", ".join(AGGS))
    lo = int(epoch(since))
    lo -= lo % step
    hi_f = epoch(until)
    hi = int(hi_f) if hi_f == int(hi_f) else int(hi_f) + 1
    hi = -(-hi // step) * step  # the end of the bucket holding until's last moment: whole buckets
    level = "raw" if store.__dict__.get("_rollups_off") else level_for(step)
    if level == "raw":
        acc = _from_raw(store, agent, device, point, lo, hi, step)
    else:
        sid = _series_id(store, agent, device, point)
        acc = {} if sid is None else _from_rollup(store, level, sid, lo, hi, step)
    return {"level": level, "step": step,
            "buckets": [_bucket_dict(t, acc[t], agg) for t in sorted(acc)]}


def points(store, agent, device):
    """Sorted names of a device's points that have rollups (numeric points)."""
    with store._read() as cur:
        cur.execute(store._sql("SELECT point FROM rollup_series WHERE agent = ? AND device = ? ORDER BY point"),
                    (agent, device))
        return sorted(r[0] for r in cur.fetchall())


# --- GET /api/v1/series -------------------------------------------------------------------------

PARAMS = ("agent", "device", "point", "since", "until", "step", "agg", "format")
DEFAULT_BUCKETS = 1000   # without step=: the finest of 60 s multiples giving at most this many


def _csv_number(v):
    return "" if v is None else repr(v)


def render_csv(result, agg):
    cols = ("t",) + ((agg,) if agg else AGGS)
    lines = [",".join(cols)]
    for b in result["buckets"]:
        lines.append(",".join([b["t"]] + [_csv_number(b[c]) for c in cols[1:]]))
    return "\r\n".join(lines) + "\r\n"


def _step_default(lo, hi):
    span = max(1.0, hi - lo)
    minutes = -(-span // (60 * DEFAULT_BUCKETS))  # ceil
    step = int(max(1, minutes) * 60)
    if step >= 3600:
        step = -(-step // 3600) * 3600
    return step


def parse_step(text):
    """step=: seconds (digits) or a duration (30s, 5m, 1h, 1d)."""
    from agent.common import parse_duration

    try:
        v = float(text) if text.isascii() and text.isdigit() else parse_duration(text)
    except (ValueError, TypeError):
        raise HTTPError(400, "step must be whole seconds or a duration like 1m, 1h, 1d", "step") from None
    if v != int(v) or v < 1:
        raise HTTPError(400, "step must be a whole number of seconds, at least 1", "step")
    return int(v)


def get_series(app, environ, start_response):
    """GET /api/v1/series?agent=&device=&point=&since=&until=&step=&agg=&format=json|csv"""
    from urllib.parse import parse_qs

    from agent.collector.reads import parse_name, parse_time

    app.check_read_access(environ)
    q = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
    for k in q:
        if k not in PARAMS:
            raise HTTPError(400, "unknown parameter (known: %s)" % ", ".join(PARAMS), k)
    arg = {k: v[-1] for k, v in q.items() if v and v[-1] != ""}
    for k in ("agent", "device", "point"):
        if k not in arg:
            raise HTTPError(400, "%s is required" % k, k)
        arg[k] = parse_name(arg[k], k)
    fmt = arg.get("format", "json")
    if fmt not in FORMATS:
        raise HTTPError(400, "format must be %s" % " or ".join(sorted(FORMATS)), "format")
    now = app.clock()
    from agent.wire import utc_timestamp

    until = parse_time(arg["until"], "until") if "until" in arg else utc_timestamp(now)
    since = parse_time(arg["since"], "since") if "since" in arg else utc_timestamp(epoch(until) - 86400)
    if since >= until:
        raise HTTPError(400, "since must be before until", "since")
    lo, hi = epoch(since), epoch(until)
    step = parse_step(arg["step"]) if "step" in arg else _step_default(lo, hi)
    if (hi - lo) / step > MAX_BUCKETS:
        raise HTTPError(400, "%d-second step over %s..%s gives more than %d buckets: a coarser step"
                        % (step, since, until, MAX_BUCKETS), "step")
    agg = arg.get("agg")
    if agg is not None and agg not in AGGS:
        raise HTTPError(400, "agg must be one of %s" % ", ".join(AGGS), "agg")
    result = query_series(app.store, arg["agent"], arg["device"], arg["point"], since, until, step, agg)
    result = dict({"agent": arg["agent"], "device": arg["device"], "point": arg["point"],
                   "since": since, "until": until}, **result)
    if result["level"] != "raw":
        result["complete"] = rollup.up_to_date(app.store)
    return FORMATS[fmt](start_response, result, agg)


def _answer_json(start_response, result, agg):
    return json_answer(start_response, 200, result, [("Cache-Control", "no-store")])


def _answer_csv(start_response, result, agg):
    body = render_csv(result, agg).encode("utf-8")
    start_response(status(200), [("Content-Type", "text/csv; charset=utf-8"),
                                 ("Content-Length", str(len(body))), ("Cache-Control", "no-store")])
    return [body]


# format= -> answer(start_response, result, agg); format=influx is added here by its own module
FORMATS = {"json": _answer_json, "csv": _answer_csv}
