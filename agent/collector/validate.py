"""Record validation: a parsed batch in, database rows out, or Invalid naming the JSON path.

Pure functions, called once per record on the ingest path, so they test types with `type(x) is`
and avoid building anything they do not store. A row is the tuple

    (agent, seq, ts, kind, device, unit, status, payload, clock, received)

kind is "data" (a reading: status "ok" with values, "partial" with the values of the blocks that
answered and an "errors" list, or "error" with the error object), "gap" or "health"; payload is
the whole record as JSON text, exactly as the agent sent it (unknown fields from newer agents
included), so exports give back what was received.

This is the general path: any key order, every check, the precise error. The body's JSON is
parsed in agent/collector/jsonbody.py; the agent's own encoding takes the fast path
(agent/collector/fastpath.py, which agrees with this one); /receive-data's legacy records are
agent/collector/legacy.py.
"""
import re

from agent.collector.jsonbody import MAX_SEQ, Invalid, TooMany
from agent.collector.jsonbody import encode as _encode
from agent.wire import TS_LEN

MAX_NAME = 128
MAX_TEXT = 4096
_SCALARS = (int, float, str, bool, type(None))
# re.ASCII everywhere below: in a str pattern \d also matches other scripts' digits (U+0663), which
# int() reads as numbers and JSON does not allow, e.g. "seq":1\u0663 would pass as 13.
_TS = re.compile(r"(\d{4})-(\d\d)-(\d\d)T([01]\d|2[0-3]):([0-5]\d):([0-5]\d)(?:\.(\d{1,6}))?Z", re.ASCII)
_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
good_dates = set()  # dates normalize_ts found valid (the fast path takes only these)


def normalize_ts(s):
    """'2026-11-21T10:30:45.123Z' (0-6 fraction digits) -> the same with exactly 3; None if bad.
    One fixed width keeps text order equal to time order, so `ts` sorts and indexes as text."""
    if type(s) is not str:
        return None
    m = _TS.fullmatch(s)
    if m is None:
        return None
    date = s[:10]
    if date not in good_dates:
        y, mo, d = int(m.group(1)), int(m.group(2)), int(m.group(3))
        if not (1 <= mo <= 12 and 1 <= d <= _DAYS[mo - 1]) or (
                mo == 2 and d == 29 and not (y % 4 == 0 and (y % 100 != 0 or y % 400 == 0))) or y < 1970:
            return None
        if len(good_dates) < 100000:
            good_dates.add(date)
    if len(s) == TS_LEN:
        return s
    frac = (m.group(7) or "") + "000"
    return "%s.%sZ" % (s[:19], frac[:3])


def check_depth(value, depth, max_depth, path):
    if depth > max_depth:
        raise Invalid(path, "nested deeper than %d levels" % max_depth)
    t = type(value)
    if t is dict:
        for k, v in value.items():
            if type(v) not in _SCALARS or type(v) is str and len(v) > MAX_TEXT:
                check_depth(v, depth + 1, max_depth, "%s.%s" % (path, k))
    elif t is list:
        for i, v in enumerate(value):
            if type(v) not in _SCALARS or type(v) is str and len(v) > MAX_TEXT:
                check_depth(v, depth + 1, max_depth, "%s[%d]" % (path, i))
    elif t is str:
        if len(value) > MAX_TEXT:
            raise Invalid(path, "string longer than %d characters" % MAX_TEXT)
    elif t not in _SCALARS:
        raise Invalid(path, "not a JSON value")


def checked_object(rec, key, path, max_depth):
    v = rec.get(key)
    if type(v) is not dict:
        raise Invalid("%s.%s" % (path, key), "expected an object")
    for k, x in v.items():
        if type(x) not in _SCALARS or type(x) is str and len(x) > MAX_TEXT:
            check_depth(x, 3, max_depth, "%s.%s.%s" % (path, key, k))
    return v


def _name(rec, key, path, required=True):
    v = rec.get(key)
    if type(v) is str and 0 < len(v) <= MAX_NAME:
        return v
    if v is None and not required:
        return None
    raise Invalid("%s.%s" % (path, key), "expected a non-empty string of at most %d characters" % MAX_NAME)


def _int(rec, key, path, lo, hi, required=True):
    v = rec.get(key)
    if type(v) is int and lo <= v <= hi:
        return v
    if v is None and not required:
        return None
    raise Invalid("%s.%s" % (path, key), "expected an integer %d..%d" % (lo, hi))


# The optional typed fields of one entry of a record's "errors" (CONTRACTS.md §1): (type, lo, hi)
_ERROR_FIELDS = (("code", int, 0, 255), ("name", str, 1, MAX_NAME), ("function", int, 0, 255),
                 ("address", int, 0, 65535), ("count", int, 0, 65536))


def _errors(rec, path, max_depth, required):
    """A record's "errors": a non-empty list of {"kind": str, "message": str, optional typed
    fields}; other keys are allowed (newer agents) within the depth and string limits."""
    v = rec.get("errors")
    if v is None and not required:
        return
    path += ".errors"
    if type(v) is not list or not v:
        raise Invalid(path, "expected a non-empty list of error objects")
    for i, e in enumerate(v):
        p = "%s[%d]" % (path, i)
        if type(e) is not dict:
            raise Invalid(p, 'expected an object {"kind": ..., "message": ...}')
        for k in ("kind", "message"):
            x = e.get(k)
            if type(x) is not str or len(x) > MAX_TEXT:
                raise Invalid("%s.%s" % (p, k), "expected a string of at most %d characters" % MAX_TEXT)
        for k, t, lo, hi in _ERROR_FIELDS:
            x = e.get(k)
            if x is not None and (type(x) is not t or not lo <= (x if t is int else len(x)) <= hi):
                raise Invalid("%s.%s" % (p, k), "expected %s" % (
                    "an integer %d..%d" % (lo, hi) if t is int else "a non-empty string of at most %d characters" % hi))
        points = e.get("points")
        if points is not None:
            if type(points) is not list:
                raise Invalid(p + ".points", "expected a list of point names")
            for j, x in enumerate(points):  # point names: the agent sets no length (values keys neither)
                if type(x) is not str or not 0 < len(x) <= MAX_TEXT:
                    raise Invalid("%s.points[%d]" % (p, j),
                                  "expected a non-empty string of at most %d characters" % MAX_TEXT)
        check_depth(e, 3, max_depth, p)


#: samples one buffered record may carry ([device] buffer = N on the agent allows up to 1000)
MAX_SAMPLES = 1000


def _samples(rec, ts, path, max_depth, max_ts):
    """A buffered record's "samples" (CONTRACTS.md section 8): 1..MAX_SAMPLES objects
    {"ts": UTC time, "values": {...}}, oldest first, the newest being the record's own ts."""
    v = rec.get("samples")
    path += ".samples"
    if type(v) is not list or not 0 < len(v) <= MAX_SAMPLES:
        raise Invalid(path, "expected a list of 1..%d samples {\"ts\": ..., \"values\": {...}}"
                      % MAX_SAMPLES)
    prev = None
    for i, sample in enumerate(v):
        p = "%s[%d]" % (path, i)
        if type(sample) is not dict:
            raise Invalid(p, 'expected an object {"ts": ..., "values": {...}}')
        extra = [k for k in sample if k not in ("ts", "values")]
        if extra:
            raise Invalid("%s.%s" % (p, extra[0]), 'unknown key: a sample holds "ts" and "values"')
        sts = normalize_ts(sample.get("ts"))
        if sts is None:
            raise Invalid(p + ".ts", "expected a UTC time like 2026-11-21T10:30:45.123Z")
        if prev is not None and sts < prev:
            raise Invalid(p + ".ts", "%s is before the sample above it (%s): samples are oldest first"
                          % (sts, prev))
        if max_ts is not None and sts > max_ts:
            raise Invalid(p + ".ts", "%s is later than the collector's clock allows (up to %s, "
                          "max_future_skew): is the agent's clock right?" % (sts, max_ts))
        prev = sts
        checked_object(sample, "values", p, max_depth)
    if prev != ts:
        raise Invalid(path, "the last sample's ts (%s) must be the record's ts (%s): the record "
                      "shows its newest sample" % (prev, ts))


def record_row(rec, raw, agent, received, path, max_depth, max_ts=None):
    """One record dict and its source text -> row tuple; raises Invalid. The payload is the
    whole record as sent (raw), re-encoded only when the source text is not at hand. A reading
    or health record whose ts is later than max_ts (the collector's clock plus max_future_skew)
    is refused: it would stay the device's "last" reading until that time. Gap records are not
    (they only count losses, and a gap from an agent whose clock is wrong must still be counted)."""
    if type(rec) is not dict:
        raise Invalid(path, "expected an object")
    get = rec.get
    if get("agent") != agent:
        raise Invalid(path + ".agent", "must equal the batch's agent %r" % agent)
    seq = get("seq")
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
        raise Invalid(path + ".seq", "expected an integer 0..2^63-1")
    ts = get("ts")
    if type(ts) is not str or len(ts) != TS_LEN or ts[:10] not in good_dates or _TS.fullmatch(ts) is None:
        ts = normalize_ts(ts)
        if ts is None:
            raise Invalid(path + ".ts", "expected a UTC time like 2026-11-21T10:30:45.123Z")
    clock = get("clock")
    if clock is not None and clock != "unsynced":
        raise Invalid(path + ".clock", 'expected "unsynced" or absent')
    kind = get("kind")
    if max_ts is not None and ts > max_ts and kind != "gap":
        raise Invalid(path + ".ts", "%s is later than the collector's clock allows (up to %s, "
                      "max_future_skew): is the agent's clock right?" % (ts, max_ts))
    if kind is None:
        device = get("device")
        if type(device) is not str or not 0 < len(device) <= MAX_NAME:
            device = _name(rec, "device", path)
        unit = get("unit")
        if unit is not None and (type(unit) is not int or not 0 <= unit <= 255):
            _int(rec, "unit", path, 0, 255)
        status = get("status")
        if status == "ok":
            # One flat object inside ({"values": {...}}) and short: no nesting and no long
            # string possible, so the per-value walk is skipped.
            if (type(get("values")) is not dict or raw is None or len(raw) > MAX_TEXT
                    or raw.count("{") > 2 or "[" in raw):
                checked_object(rec, "values", path, max_depth)
            if "samples" in rec:
                _samples(rec, ts, path, max_depth, max_ts)
        elif "samples" in rec:
            raise Invalid(path + ".samples", 'only an "ok" record carries samples (a partial or '
                          'failed poll is never buffered)')
        elif status == "error":
            if type(checked_object(rec, "error", path, max_depth).get("kind")) is not str:
                raise Invalid(path + ".error.kind", "expected a string")
            _errors(rec, path, max_depth, required=False)
        elif status == "partial":
            checked_object(rec, "values", path, max_depth)
            _errors(rec, path, max_depth, required=True)
        else:
            raise Invalid(path + ".status", 'expected "ok", "partial" or "error"')
        return (agent, seq, ts, "data", device, unit, status, raw or _encode(rec), clock, received)
    if kind == "gap":
        p = path
        first_ts, last_ts = rec.get("first_ts"), rec.get("last_ts")
        if first_ts is not None and normalize_ts(first_ts) is None:
            raise Invalid(p + ".first_ts", "expected a UTC time or null")
        if last_ts is not None and normalize_ts(last_ts) is None:
            raise Invalid(p + ".last_ts", "expected a UTC time or null")
        reason = rec.get("reason")
        if reason is not None and (type(reason) is not str or len(reason) > MAX_TEXT):
            raise Invalid(p + ".reason", "expected a string")
        _int(rec, "dropped", p, 0, MAX_SEQ)
        _int(rec, "first_seq", p, 0, MAX_SEQ, required=False)
        _int(rec, "last_seq", p, 0, MAX_SEQ, required=False)
        device = _name(rec, "device", path, required=False)
        return (agent, seq, ts, "gap", device, None, None, raw or _encode(rec), clock, received)
    if kind == "health":
        device = _name(rec, "device", path)
        unit = _int(rec, "unit", path, 0, 255, required=False)
        checked_object(rec, "health", path, max_depth)
        return (agent, seq, ts, "health", device, unit, None, raw or _encode(rec), clock, received)
    raise Invalid(path + ".kind", 'expected absent (a reading), "gap" or "health"')


def batch_rows(doc, received, max_records, max_depth, max_ts=None):
    """A body from parse_batch (records as (record, raw) pairs) -> (agent, rows); raises Invalid."""
    if type(doc) is not dict:
        raise Invalid("$", "expected an object {\"agent\": ..., \"records\": [...]}")
    agent = doc.get("agent")
    if type(agent) is not str or not 0 < len(agent) <= MAX_NAME:
        raise Invalid("$.agent", "expected a non-empty string of at most %d characters" % MAX_NAME)
    records = doc.get("records")
    if type(records) is not list:
        raise Invalid("$.records", "expected a list")
    if len(records) > max_records:
        raise TooMany("%d records in one batch, more than max_records %d" % (len(records), max_records))
    rows = []
    append = rows.append
    try:
        for rec, raw in records:
            append(record_row(rec, raw, agent, received, "", max_depth, max_ts))
    except Invalid as e:  # the path's prefix is built only when something is wrong
        raise Invalid("$.records[%d]%s" % (len(rows), e.path), e.reason) from None
    return agent, rows
