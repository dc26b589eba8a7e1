"""Record validation: a parsed batch in, database rows out, or Invalid naming the JSON path.

Pure functions, called once per record on the ingest path, so they test types with `type(x) is`
and avoid building anything they do not store. A row is the tuple

    (agent, seq, ts, kind, device, unit, status, payload, clock, received)

kind is "data" (a reading: status "ok" with values, "partial" with the values of the blocks that
answered and an "errors" list, or "error" with the error object), "gap" or "health"; payload is the whole record as JSON text, exactly as the agent sent it (unknown fields
from newer agents included), so exports give back what was received.
"""
import json
import re

from agent.wire import AGENT_KEY, ENVELOPE_TAIL, RECORD_HEAD, TS_LEN

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
    """More records in one batch than max_records, or more JSON values in a body than its size
    allows: a size limit (413), so the agent splits. `where`: $.records or body."""

    def __init__(self, reason, where="$.records"):
        super().__init__(reason)
        self.where = where


class Invalid(ValueError):
    """A record or batch failed validation; `path` is a JSON path like $.records[3].values.v."""

    def __init__(self, path, reason):
        self.path = path
        self.reason = reason
        super().__init__("%s: %s" % (path, reason))


class DuplicateKey(Exception):
    """An object names one key twice. Not a ValueError: the one-pass parser's fallback to
    json.loads must not take it for malformed JSON (json.loads would keep the last value, SQLite's
    json_extract the first: one record, two readings)."""

    def __init__(self, key):
        super().__init__(key)
        self.key = key


def _reject_constant(name):
    raise ValueError("%s is not valid JSON" % name)


def _unique(pairs, dict=dict, len=len):
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise DuplicateKey(k)
            seen.add(k)
    return d


def loads(text):
    """json.loads that refuses NaN/Infinity (not JSON, and not storable in PostgreSQL JSON)."""
    return json.loads(text, parse_constant=_reject_constant)


def loads_unique(text):
    """loads that also refuses a key given twice in one object (DuplicateKey)."""
    return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique)


def duplicate_key_path(text):
    """JSON path of the first key given twice in `text` (valid JSON), e.g. $.records[2].values.v;
    None if there is none. Slow: run only once a DuplicateKey was seen."""

    def walk(v, path):
        if type(v) is list and v and type(v[0]) is tuple:  # an object, as its (key, value) pairs
            seen = set()
            for k, _ in v:
                if k in seen:
                    return "%s.%s" % (path, k)
                seen.add(k)
            for k, x in v:
                p = walk(x, "%s.%s" % (path, k))
                if p:
                    return p
        elif type(v) is list:
            for i, x in enumerate(v):
                p = walk(x, "%s[%d]" % (path, i))
                if p:
                    return p
        return None

    # pairs lists for objects; a list that holds tuples can only be an object's (JSON has none)
    return walk(json.loads(text, object_pairs_hook=list), "$")


# --- bounds on what one body may make the parser allocate -----------------------------------------
#
# The decompressed-size cap bounds a body's bytes, not what parsing it costs: `{}` is 3 bytes and
# a 64-byte dict (+ its slot in the list), so 64 MB of `{"records":[{},{},...]}` became 4.3 GB.
# Before any JSON is parsed, a count of the structural characters bounds the values in the body:
# every value or key but the first follows a `,` `:` `[` or `{`, and every object or list starts
# with `{` or `[` (inside strings too: an over-count, never an under-count). The limits are set
# from the cap, so peak memory per request is a fixed multiple of it (README: "peak memory per
# request"); the agent's records use about one value per 8 bytes, these limits one per 32, so only
# bodies of more than a quarter of the cap with the agent's density meet them, and they get 413,
# which makes the agent split its batch.
BYTES_PER_VALUE = 32
BYTES_PER_CONTAINER = 256


def json_limits(cap):
    """(max values, max objects+lists) in one body whose size is capped at `cap` bytes."""
    return max(1024, cap // BYTES_PER_VALUE), max(128, cap // BYTES_PER_CONTAINER)


def check_json_size(text, limits, start=0):
    """Raise TooMany when text[start:] may hold more JSON values or containers than `limits`
    (from json_limits) allow: C-speed counts, nothing allocated."""
    max_values, max_containers = limits
    containers = text.count("{", start) + text.count("[", start)
    if containers > max_containers:
        raise TooMany("body holds up to %d JSON objects/lists, more than %d (max_decompressed_bytes/%d)"
                      % (containers, max_containers, BYTES_PER_CONTAINER), "body")
    values = containers + text.count(",", start) + text.count(":", start) + 1
    if values > max_values:
        raise TooMany("body holds up to %d JSON values, more than %d (max_decompressed_bytes/%d)"
                      % (values, max_values, BYTES_PER_VALUE), "body")


_scan_once = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_unique).scan_once
_scanstring = json.decoder.scanstring
_WS = re.compile(r"[ \t\n\r]*")
_WS_CHARS = " \t\n\r"


class _Fallback(Exception):
    pass


def _skip(text, idx):
    if text[idx:idx + 1] in _WS_CHARS:
        return _WS.match(text, idx).end()
    return idx


def parse_batch(text, max_records=None):
    """Parse a batch body (str) in one pass, keeping each record's exact source text:
    -> dict whose "records" (when a list) holds (record, raw_text) pairs.

    The raw text is what gets stored (the payload column), so a record is parsed once and
    never re-encoded. Anything unusual falls back to json.loads, which also produces the
    error message for malformed input. A key given twice in one object raises Invalid naming
    it; more than max_records records raises TooMany as soon as the next one is read."""
    try:
        return _parse_batch(text, max_records)
    except DuplicateKey as e:
        raise Invalid(duplicate_key_path(text) or "$", "key %r given twice in one object"
                      % e.key[:100]) from None


def _parse_batch(text, max_records):
    if max_records is None:
        max_records = MAX_SEQ
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
                            if len(recs) > max_records:
                                raise TooMany("more than max_records %d records in one batch" % max_records)
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
                if key in doc:
                    raise DuplicateKey(key)
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
    except TooMany:
        raise
    except (_Fallback, StopIteration, ValueError, IndexError):
        pass
    doc = loads_unique(text)  # raises the JSONDecodeError that names line and column
    if type(doc) is dict and type(doc.get("records")) is list:
        if len(doc["records"]) > max_records:
            raise TooMany("%d records in one batch, more than max_records %d" % (len(doc["records"]), max_records))
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
    if type(ts) is not str or len(ts) != TS_LEN or ts[:10] not in _good_dates or _TS.fullmatch(ts) is None:
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
                _object(rec, "values", path, max_depth)
        elif status == "error":
            if type(_object(rec, "error", path, max_depth).get("kind")) is not str:
                raise Invalid(path + ".error.kind", "expected a string")
            _errors(rec, path, max_depth, required=False)
        elif status == "partial":
            _object(rec, "values", path, max_depth)
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
        _object(rec, "health", path, max_depth)
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


# --- the fast path: the agent's own encoding, matched by one regular expression per record ---------
#
# The agent writes every record the same way (agent/record.py: compact, keys in a fixed order, no
# escapes in the usual case). A record in exactly that form is checked and split into its columns
# by one regex match, without building a dict: about 40% less CPU than parse + validate, which is
# most of the collector's work per record. The same for a failed read (status "error" with the
# agent's error object). Anything else (another key order, a gap, health or partial record, an
# "errors" list, an escape, a number beyond 300 digits, a date not seen yet, more than 256 values)
# takes the general path, record by record, with the same rules; tests check that both paths agree.
#
# A regex cannot see that a key of "values" comes twice, so the generic pattern is only the first
# sight of a device: its keys are then read once (and a record naming one twice goes to the
# general path, which refuses it) and the device's later records are matched by a pattern with
# exactly those keys as literals (a "layout"), which cannot match a duplicate and runs faster than
# the generic one. Layouts are compiled a few per request at most (a compile costs milliseconds)
# and kept per agent and device, in bounded caches.

_FS = r'"[^"\\\x00-\x1f]{0,4096}"'  # a JSON string without escapes, at most MAX_TEXT characters
# a JSON number that cannot overflow a float (< 1e300: at most 200 integer digits, exponent < 100)
# (Optional parts as an empty alternative, (?:X|), not (?:X)?: the same matches, but sre runs a
# branch faster than a repeat; the values loop is most of the collector's CPU per record.)
_FN = r"-?(?:0|[1-9]\d{0,199})(?:\.\d{1,300}|)(?:[eE][+-]?\d{1,2}|)"
_FV = r"(?:%s|%s|true|false|null)" % (_FN, _FS)
_FKV = r"%s:%s" % (_FS, _FV)
# The record head as agent.wire declares it ({"agent":..,"seq":..,"ts":.. in that order, ts of
# TS_LEN characters), then device and unit as agent.record writes them.
_FAST_TS = r"\d{4}-\d\d-\d\dT(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d\.\d{3}Z"   # utc_timestamp's form
assert TS_LEN == 24, "_FAST_TS matches 24 characters"   # tests/test_wire.py pins both
_FAST_PREFIX = (re.escape(AGENT_KEY.decode()) + r'"([^"\\\x00-\x1f]{1,128})","%s":(0|[1-9]\d{0,18}),' % RECORD_HEAD[1]
                + r'"%s":"(%s)",' % (RECORD_HEAD[2], _FAST_TS)
                + r'"device":"([^"\\\x00-\x1f]{1,128})","unit":(\d{1,3}),')
# An ok reading ends `"values":{...},"status":"ok"` (+ the optional clock flag); store.py slices
# the values out of a stored payload between these two.
VALUES_KEY = '"values":'
OK_TAIL = ',"status":"ok"'
_FAST_START = _FAST_PREFIX + re.escape(VALUES_KEY) + r"\{"
_FAST_END = r"\}" + re.escape(OK_TAIL) + r'(,"clock":"unsynced")?\}'
# A failed read as the agent writes it (agent/record.py error_record, ModbusError.as_record): fixed
# keys, so no layout is needed and no key can come twice. With an "errors" list: the general path.
_FAST_ERROR = re.compile(_FAST_PREFIX + r'"status":"error","error":\{"kind":%s,"message":%s'
                         r'(?:,"code":(?:0|[1-9]\d{0,2})|)\}(,"clock":"unsynced")?\}' % (_FS, _FS), re.ASCII).match
MAX_LAYOUT_KEYS = 256  # more values than this in a record: the general path
# A bounded repeat: sre keeps about 1 KB of backtracking state per iteration of a repeated group
# until the match ends, so an unbounded one made a record of 300000 values cost 360 MB to match.
_FAST_RECORD = re.compile(_FAST_START + r"(?:%s(?:,%s){0,%d}|)" % (_FKV, _FKV, MAX_LAYOUT_KEYS - 1) + _FAST_END,
                          re.ASCII).match
fast_record = _FAST_RECORD  # for store.aggregate
_FAST_HEAD = re.compile(re.escape(AGENT_KEY.decode()) + r'"([^"\\\x00-\x1f]{1,128})","records":\[').match  # envelope_head
_ENVELOPE_TAIL = ENVELOPE_TAIL.decode()
_COMPILES_PER_REQUEST = 4
# Bounds (whatever clients send, in open mode anyone): a compiled layout takes about 1 KB a key,
# a device entry ~0.2 KB; past a bound the cache starts again (costs a recompile, never a wrong answer).
_MAX_CACHED_KEYS = 16384
_MAX_DEVICES = 65536
_layouts = {}  # tuple of keys -> compiled match of a record with exactly these "values" keys
_device_layouts = {}  # agent -> {device: match}
_sizes = [0, 0]  # keys in _layouts, devices in _device_layouts


def _layout(keys):
    m = _layouts.get(keys)
    if m is None:
        if _sizes[0] + len(keys) > _MAX_CACHED_KEYS:
            _layouts.clear()
            _sizes[0] = 0
        values = ",".join('"%s":%s' % (re.escape(k), _FV) for k in keys)
        m = _layouts[keys] = re.compile(_FAST_START + values + _FAST_END, re.ASCII).match
        _sizes[0] += len(keys)
    return m


def _learn(agent, device, keys):
    """Remember the layout of an agent's device (compiling it if new)."""
    if _sizes[1] >= _MAX_DEVICES:
        _device_layouts.clear()
        _sizes[1] = 0
    layouts = _device_layouts.get(agent)
    if layouts is None:
        layouts = _device_layouts[agent] = {}
    if device not in layouts:
        _sizes[1] += 1
    layouts[device] = _layout(keys)


def _values_keys(text, start, end):
    """Keys of the values object text[start:end] (fast form, valid JSON), in order."""
    return [k for k, _ in json.loads(text[start:end], object_pairs_hook=list)]


def fast_head(text):
    """'{"agent":"X","records":[' ... ']}' exactly (the uploader's body) -> (agent, index of the
    first record); None for any other shape."""
    m = _FAST_HEAD(text)
    if m is None or not text.endswith(_ENVELOPE_TAIL):
        return None
    return m.group(1), m.end()


def fast_rows(text, idx, agent, received, max_records, max_depth, max_ts=None, limits=None):
    """Rows of a body accepted by fast_head, or None when the general path must decide: any
    record it cannot accept (malformed, invalid, too many, a key twice, ts beyond max_ts) sends
    the whole body there, so what is refused, and the message saying why, never depends on which
    path saw it first. `limits` (json_limits) bounds what the rest of the body may hold once a
    record is parsed as JSON (TooMany)."""
    rows = []
    append = rows.append
    generic = _FAST_RECORD
    last = len(text) - 2  # the records' closing bracket
    if idx == last:
        return rows
    layouts = _device_layouts.get(agent) or {}
    compiles = _COMPILES_PER_REQUEST
    checked = False
    try:
        while True:
            # The device's layout, if known: its name sits before the first '"unit":' of the
            # record (found within the first 400 characters, or there is no layout to try)
            m = None
            status = "ok"
            d = text.find('","unit":', idx, idx + 400)
            p = text.rfind('"device":"', idx, d) if d > 0 else -1
            if p >= 0:
                match = layouts.get(text[p + 10:d])
                if match is not None:
                    m = match(text, idx)
            if m is None:
                m = generic(text, idx)
                if m is None:
                    m = _FAST_ERROR(text, idx)
                    status = "error"
                else:
                    # (at most MAX_LAYOUT_KEYS of them: the pattern's bound)
                    keys = tuple(_values_keys(text, text.index('"values":{', idx) + 9,
                                              text.rindex('},"status":"ok"', idx, m.end()) + 1))
                    if len(set(keys)) != len(keys):
                        m = None  # a key twice: the general path refuses it, naming it
                    elif compiles > 0 or keys in _layouts:
                        if keys not in _layouts:
                            compiles -= 1
                        _learn(agent, m.group(4), keys)
                        layouts = _device_layouts.get(agent) or {}
            if m is not None:
                end = m.end()
                a, seq, ts, device, unit, clock = m.groups()
                seq, unit = int(seq), int(unit)
                if (a != agent or seq > MAX_SEQ or unit > 255 or ts[:10] not in _good_dates
                        or max_ts is not None and ts > max_ts):
                    m = None  # the general checks decide (and learn a new date)
                else:
                    append((agent, seq, ts, "data", device, unit, status, text[idx:end], clock and "unsynced",
                            received))
            if m is None:
                if limits is not None and not checked:
                    check_json_size(text, limits, idx)  # TooMany: before anything is parsed
                    checked = True
                obj, end = _scan_once(text, idx)
                append(record_row(obj, text[idx:end], agent, received, "", max_depth, max_ts))
            if len(rows) > max_records:
                return None
            c = text[end]
            if c == ",":
                idx = end + 1
            elif c == "]" and end == last:
                return rows
            else:
                return None
    except (StopIteration, ValueError, IndexError, RecursionError, DuplicateKey):  # Invalid is a ValueError
        return None


# --- the legacy /receive-data format -------------------------------------------------------------

_LEGACY_TS = re.compile(r"(\d{4}-\d\d-\d\d)[ T](\d\d:\d\d:\d\d)(\.\d{1,6})?Z?", re.ASCII)


_canonical_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, sort_keys=True,
                                     check_circular=False).encode


def _canonical(v):
    """A value with every integral float as the int it equals (1.0 and 1, 1e2 and 100 are one
    reading; 1.8e19 stays apart from 18000000000000000001), for sort_keys encoding."""
    t = type(v)
    if t is float:
        return int(v) if v.is_integer() else v
    if t is dict:
        return {k: _canonical(x) for k, x in v.items()}
    if t is list:
        return [_canonical(x) for x in v]
    return v


def legacy_row(rec, agent, received, path, max_depth, hasher, max_ts=None):
    """{"timestamp": "2024-01-15 10:30:45", "device_id": ..., "registers": {...}, "status": ...} -> row.

    These posts carry no sequence number. The row's seq is a hash of the reading in a canonical
    form (device, timestamp, registers with sorted keys and integral floats as ints, status as
    stored), so a script that retries a post stores it once, however it rebuilds the JSON, while
    every distinct reading gets its own identity. The seq is NEGATIVE (-2^63..-1): legacy records
    live outside the agents' seqs (0..2^63-1), so a post with an agent's token never collides
    with its records nor moves its max_seq. Timestamps without a zone are taken as UTC."""
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
    if max_ts is not None and ts > max_ts:
        raise Invalid(path + ".timestamp", "%s is later than the collector's clock allows (up to %s, "
                      "max_future_skew): is the sender's clock right?" % (ts, max_ts))
    registers = _object(rec, "registers", path, max_depth)
    status = rec.get("status", "success")
    if type(status) is not str or len(status) > MAX_NAME:
        raise Invalid(path + ".status", "expected a string")
    ok = status.lower() in ("success", "ok")
    key = _canonical_encode([device, ts, _canonical(registers), "ok" if ok else status])
    seq = -1 - (int.from_bytes(hasher(key.encode("utf-8")), "big") >> 1)
    out = {"agent": agent, "seq": seq, "ts": ts, "device": device, "unit": None}
    if ok:
        st = "ok"
        out["values"] = registers
    else:
        st = "error"
        out["error"] = {"kind": "legacy", "message": status}
        out["values"] = registers
    out["status"] = st
    return (agent, seq, ts, "data", device, None, st, _encode(out), None, received)
