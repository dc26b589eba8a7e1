"""The batch body as JSON: parsing with limits and duplicate-key detection.

Before any JSON is parsed, check_json_size bounds what the body may make the parser allocate
(json_limits, from the size cap). parse_batch reads a batch in one pass, keeping each record's
exact source text (what gets stored); anything unusual falls back to json.loads for the error
message. A key given twice in one object is refused (json.loads would keep the last value,
SQLite's json_extract the first), NaN and Infinity too (not JSON, not storable in PostgreSQL).
The errors raised on the ingest path, Invalid (422) and TooMany (413), are defined here, the
lowest layer; agent/collector/validate.py re-exports them.
"""
import json
import re

# The compact JSON text the collector writes (payloads it builds, answers): one encoder for all.
encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                          check_circular=False).encode
MAX_SEQ = (1 << 63) - 1


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


# one JSON value at an index: the C scanner, with the two refusals above
scan_once = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_unique).scan_once
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
                            obj, end = scan_once(text, idx)
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
                    value, idx = scan_once(text, idx)
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
