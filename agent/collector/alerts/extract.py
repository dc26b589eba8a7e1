"""A point's samples out of a stored record's JSON text, cheaply: the alert hook sees every record
of every batch, and parsing each one (5 us) would cost a third of ingest.

The answer is always what agent.collector.samples.samples() gives for that point: a record
without "samples" holds one sample, (ts, values), and for such a record in the agent's flat
compact form (no backslash, so no string holds a quote and every `"name":` is a key; exactly two
objects, the record and its values; a point name that is none of the record's own keys) the
value is sliced by regex. Anything else (buffered records, partial records with their "errors",
escapes, nested values) is parsed and handed to samples(). tests/test_collector_alerts.py
checks both ways agree.
"""
import json
import re

from agent.collector.samples import samples

# Keys a record or its error objects have themselves: a point of that name is read by parsing.
_RECORD_KEYS = frozenset(("agent", "seq", "ts", "device", "unit", "values", "status", "error", "errors",
                          "clock", "samples", "kind", "message", "code", "name", "function", "address",
                          "count", "points", "health", "dropped"))
_NUMBER = r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?"
_patterns = {}


def _pattern(point):
    p = _patterns.get(point)
    if p is None:
        if len(_patterns) > 4096:
            _patterns.clear()
        p = _patterns[point] = re.compile(
            r'"%s":(%s|true|false|null|")' % (re.escape(point), _NUMBER)).search
    return p


def numeric(v):
    """A value a threshold compares: numbers and booleans (as 0/1); None for anything else."""
    t = type(v)
    if t is float:
        return v if v == v and v not in (float("inf"), float("-inf")) else None
    if t is int or t is bool:
        return float(v)
    return None


def point_samples(payload, ts, point):
    """[(ts, numeric value)] of `point` in one data record (its JSON text, its ts column)."""
    if ('"%s":' % point) not in payload:
        return []
    if ("\\" not in payload and '"samples"' not in payload and point not in _RECORD_KEYS
            and payload.count("{") == 2):
        m = _pattern(point)(payload)
        if m is None:
            return []
        tok = m.group(1)
        if tok == "true":
            return [(ts, 1.0)]
        if tok == "false":
            return [(ts, 0.0)]
        if tok in ("null", '"'):
            return []
        v = numeric(json.loads(tok))
        return [] if v is None else [(ts, v)]
    return parsed_samples(json.loads(payload), point)


def parsed_samples(record, point):
    out = []
    for t, values in samples(record):
        v = numeric(values.get(point))
        if v is not None:
            out.append((t, v))
    return out


def field(doc, path):
    """doc's value at a dotted path ('spool.oldest_age'), or None."""
    for part in path.split("."):
        if type(doc) is not dict:
            return None
        doc = doc.get(part)
    return doc
