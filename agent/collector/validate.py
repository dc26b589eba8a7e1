"""Record validation: a parsed batch in, database rows out, or Invalid naming the JSON path.

Pure functions, called once per record on the ingest path, so they test types with `type(x) is`
and avoid building anything they do not store. A row is the tuple

    (agent, seq, ts, kind, device, unit, status, payload, clock, received)

kind is "data" (a reading: status "ok" with values, or "error" with the error object), "gap" or
"health"; payload is the whole record as JSON text, exactly as the agent sent it (unknown fields
from newer agents included), so exports give back what was received.
"""
import json
import re

_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                           check_circular=False).encode
MAX_SEQ = (1 << 63) - 1
MAX_NAME = 128
MAX_TEXT = 4096
_SCALARS = (int, float, str, bool, type(None))
# re.ASCII everywhere below: in a str pattern \d also matches other scripts' digits (U+0663), which
# int() reads as numbers and JSON does not allow, e.g. "seq":1\u0663 would pass as 13.
_TS = re.compile(r"(\d{4})-(\d\d)-(\d\d)T([01]\d|2[0-3]):([0-5]\d):([0-5]\d)(?:\.(\d{1,6}))?Z", re.ASCII)
_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_good_dates = set()


class TooMany(ValueError):
    """More records in one batch than max_records: a size limit (413), so the agent splits."""


class Invalid(ValueError):
    """A record or batch failed validation; `path` is a JSON path like $.records[3].values.v."""

    def __init__(self, path, reason):
        self.path = path
        self.reason = reason
        super().__init__("%s: %s" % (path, reason))


def _reject_constant(name):
    raise ValueError("%s is not valid JSON" % name)


def loads(text):
    """json.loads that refuses NaN/Infinity (not JSON, and not storable in PostgreSQL JSON)."""
    return json.loads(text, parse_constant=_reject_constant)


_scan_once = json.JSONDecoder(parse_constant=_reject_constant).scan_once
_scanstring = json.decoder.scanstring
_WS = re.compile(r"[ \t\n\r]*")
_WS_CHARS = " \t\n\r"


class _Fallback(Exception):
    pass


def _skip(text, idx):
    if text[idx:idx + 1] in _WS_CHARS:
        return _WS.match(text, idx).end()
    return idx


def parse_batch(text):
    """Parse a batch body (str) in one pass, keeping each record's exact source text:
    -> dict whose "records" (when a list) holds (record, raw_text) pairs.

    The raw text is what gets stored (the payload column), so a record is parsed once and
    never re-encoded. Anything unusual falls back to json.loads, which also produces the
    error message for malformed input."""
    try:
        idx = _skip(text, 0)
        if text[idx:idx + 1] != "{":
            raise _Fallback
        idx = _skip(text, idx + 1)
        doc = {}
        if text[idx:idx + 1] == "}":
            idx += 1
        else:
            while True:
                if text[idx:idx + 1] != '"':
                    raise _Fallback
                key, idx = _scanstring(text, idx + 1, True)
                idx = _skip(text, idx)
                if text[idx:idx + 1] != ":":
                    raise _Fallback
                idx = _skip(text, idx + 1)
                if key == "records" and text[idx:idx + 1] == "[":
                    recs = []
                    idx = _skip(text, idx + 1)
                    if text[idx:idx + 1] == "]":
                        idx += 1
                    else:
                        append = recs.append
                        while True:  # the hot loop: one C scan per record, little else
                            obj, end = _scan_once(text, idx)
                            append((obj, text[idx:end]))
                            c = text[end]
                            if c == ",":
                                idx = end + 1
                                if text[idx] != "{":
                                    idx = _skip(text, idx)
                                continue
                            if c in _WS_CHARS:
                                end = _WS.match(text, end).end()
                                c = text[end:end + 1]
                                if c == ",":
                                    idx = _skip(text, end + 1)
                                    continue
                            if c == "]":
                                idx = end + 1
                                break
                            raise _Fallback
                    value = recs
                else:
                    value, idx = _scan_once(text, idx)
                doc[key] = value
                idx = _skip(text, idx)
                c = text[idx:idx + 1]
                if c == ",":
                    idx = _skip(text, idx + 1)
                elif c == "}":
                    idx += 1
                    break
                else:
                    raise _Fallback
        if _skip(text, idx) != len(text):
            raise _Fallback
        return doc
    except (_Fallback, StopIteration, ValueError, IndexError):
        pass
    doc = loads(text)  # raises the JSONDecodeError that names line and column
    if type(doc) is dict and type(doc.get("records")) is list:
        doc["records"] = [(r, None) for r in doc["records"]]
    return doc


def normalize_ts(s):
    """'2026-11-21T10:30:45.123Z' (0-6 fraction digits) -> the same with exactly 3; None if bad.
    One fixed width keeps text order equal to time order, so `ts` sorts and indexes as text."""
    if type(s) is not str:
        return None
    m = _TS.fullmatch(s)
    if m is None:
        return None
    date = s[:10]
    if date not in _good_dates:
        y, mo, d = int(m.group(1)), int(m.group(2)), int(m.group(3))
        if not (1 <= mo <= 12 and 1 <= d <= _DAYS[mo - 1]) or (
                mo == 2 and d == 29 and not (y % 4 == 0 and (y % 100 != 0 or y % 400 == 0))) or y < 1970:
            return None
        if len(_good_dates) < 100000:
            _good_dates.add(date)
    if len(s) == 24:
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


def _object(rec, key, path, max_depth):
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


def record_row(rec, raw, agent, received, path, max_depth):
    """One record dict and its source text -> row tuple; raises Invalid. The payload is the
    whole record as sent (raw), re-encoded only when the source text is not at hand."""
    if type(rec) is not dict:
        raise Invalid(path, "expected an object")
    get = rec.get
    if get("agent") != agent:
        raise Invalid(path + ".agent", "must equal the batch's agent %r" % agent)
    seq = get("seq")
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
        raise Invalid(path + ".seq", "expected an integer 0..2^63-1")
    ts = get("ts")
    if type(ts) is not str or len(ts) != 24 or ts[:10] not in _good_dates or _TS.fullmatch(ts) is None:
        ts = normalize_ts(ts)
        if ts is None:
            raise Invalid(path + ".ts", "expected a UTC time like 2026-11-21T10:30:45.123Z")
    clock = get("clock")
    if clock is not None and clock != "unsynced":
        raise Invalid(path + ".clock", 'expected "unsynced" or absent')
    kind = get("kind")
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
                _object(rec, "values", path, max_depth)
        elif status == "error":
            if type(_object(rec, "error", path, max_depth).get("kind")) is not str:
                raise Invalid(path + ".error.kind", "expected a string")
        else:
            raise Invalid(path + ".status", 'expected "ok" or "error"')
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
        _object(rec, "health", path, max_depth)
        return (agent, seq, ts, "health", device, unit, None, raw or _encode(rec), clock, received)
    raise Invalid(path + ".kind", 'expected absent (a reading), "gap" or "health"')


def batch_rows(doc, received, max_records, max_depth):
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
            append(record_row(rec, raw, agent, received, "", max_depth))
    except Invalid as e:  # the path's prefix is built only when something is wrong
        raise Invalid("$.records[%d]%s" % (len(rows), e.path), e.reason) from None
    return agent, rows


# --- the fast path: the agent's own encoding, matched by one regular expression per record ---------
#
# The agent writes every record the same way (agent/record.py: compact, keys in a fixed order, no
# escapes in the usual case). A record in exactly that form is checked and split into its columns
# by one regex match, without building a dict: about 40% less CPU than parse + validate, which is
# most of the collector's work per record. Anything else (another key order, a gap, health or
# error record, an escape, a number beyond 300 digits, a date not seen yet) takes the general
# path, record by record, with the same rules; tests check that both paths agree.

_FS = r'"[^"\\\x00-\x1f]{0,4096}"'  # a JSON string without escapes, at most MAX_TEXT characters
# a JSON number that cannot overflow a float (< 1e300: at most 200 integer digits, exponent < 100)
# (Optional parts as an empty alternative, (?:X|), not (?:X)?: the same matches, but sre runs a
# branch faster than a repeat; the values loop is most of the collector's CPU per record.)
_FN = r"-?(?:0|[1-9]\d{0,199})(?:\.\d{1,300}|)(?:[eE][+-]?\d{1,2}|)"
_FKV = r"%s:(?:%s|%s|true|false|null)" % (_FS, _FN, _FS)
_FAST_RECORD = re.compile(
    r'\{"agent":"([^"\\\x00-\x1f]{1,128})","seq":(0|[1-9]\d{0,18}),'
    r'"ts":"(\d{4}-\d\d-\d\dT(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d\.\d{3}Z)",'
    r'"device":"([^"\\\x00-\x1f]{1,128})","unit":(\d{1,3}),'
    r'"values":\{(?:%s(?:,%s)*|)\},"status":"ok"(,"clock":"unsynced")?\}' % (_FKV, _FKV), re.ASCII).match
fast_record = _FAST_RECORD  # for store.aggregate
_FAST_HEAD = re.compile(r'\{"agent":"([^"\\\x00-\x1f]{1,128})","records":\[').match


def fast_head(text):
    """'{"agent":"X","records":[' ... ']}' exactly (the uploader's body) -> (agent, index of the
    first record); None for any other shape."""
    m = _FAST_HEAD(text)
    if m is None or not text.endswith("]}"):
        return None
    return m.group(1), m.end()


def fast_rows(text, idx, agent, received, max_records, max_depth):
    """Rows of a body accepted by fast_head, or None when the general path must decide: any
    record it cannot accept (malformed, invalid, too many) sends the whole body there, so what
    is refused, and the message saying why, never depends on which path saw it first."""
    rows = []
    append = rows.append
    match = _FAST_RECORD
    last = len(text) - 2  # the records' closing bracket
    if idx == last:
        return rows
    try:
        while True:
            m = match(text, idx)
            if m is not None:
                end = m.end()
                a, seq, ts, device, unit, clock = m.groups()
                seq, unit = int(seq), int(unit)
                if a != agent or seq > MAX_SEQ or unit > 255 or ts[:10] not in _good_dates:
                    m = None  # the general checks decide (and learn a new date)
                else:
                    append((agent, seq, ts, "data", device, unit, "ok", text[idx:end], clock and "unsynced",
                            received))
            if m is None:
                obj, end = _scan_once(text, idx)
                append(record_row(obj, text[idx:end], agent, received, "", max_depth))
            if len(rows) > max_records:
                return None
            c = text[end]
            if c == ",":
                idx = end + 1
            elif c == "]" and end == last:
                return rows
            else:
                return None
    except (StopIteration, ValueError, IndexError, RecursionError):  # Invalid is a ValueError
        return None


# --- the legacy /receive-data format -------------------------------------------------------------

_LEGACY_TS = re.compile(r"(\d{4}-\d\d-\d\d)[ T](\d\d:\d\d:\d\d)(\.\d{1,6})?Z?", re.ASCII)


def legacy_row(rec, agent, received, path, max_depth, hasher):
    """{"timestamp": "2024-01-15 10:30:45", "device_id": ..., "registers": {...}, "status": ...} -> row.

    These posts carry no sequence number. The row's seq is a 63-bit hash of the record's content
    (device, timestamp, registers, status), so a script that retries a post stores it once, while
    every distinct reading gets its own identity. Timestamps without a zone are taken as UTC."""
    if type(rec) is not dict:
        raise Invalid(path, "expected an object")
    device = rec.get("device_id")
    if type(device) is not str or not 0 < len(device) <= MAX_NAME:
        raise Invalid(path + ".device_id", "expected a non-empty string of at most %d characters" % MAX_NAME)
    stamp = rec.get("timestamp")
    m = _LEGACY_TS.fullmatch(stamp) if type(stamp) is str else None
    ts = m and normalize_ts("%sT%s%sZ" % (m.group(1), m.group(2), m.group(3) or ""))
    if not ts:
        raise Invalid(path + ".timestamp", 'expected "YYYY-MM-DD HH:MM:SS" (UTC)')
    registers = _object(rec, "registers", path, max_depth)
    status = rec.get("status", "success")
    if type(status) is not str or len(status) > MAX_NAME:
        raise Invalid(path + ".status", "expected a string")
    key = _encode([device, ts, registers, status])
    seq = int.from_bytes(hasher(key.encode("utf-8")), "big") >> 1
    out = {"agent": agent, "seq": seq, "ts": ts, "device": device, "unit": None}
    if status.lower() in ("success", "ok"):
        st = "ok"
        out["values"] = registers
    else:
        st = "error"
        out["error"] = {"kind": "legacy", "message": status}
        out["values"] = registers
    out["status"] = st
    return (agent, seq, ts, "data", device, None, st, _encode(out), None, received)
