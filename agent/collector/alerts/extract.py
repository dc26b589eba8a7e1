"""A data record's samples out of its stored JSON text, cheaply: the alert hook sees every record
of every batch, and json.loads of each one would cost ingest a good part of its rate.

The answer is always what agent.collector.samples.samples() gives: a record without a
"samples" key holds one sample, (ts, values); when its `"values":{` is the first object inside
the record and no backslash comes before it (so it is the record's own key: no string can hold
that text with its quote unescaped), the C JSON
scanner parses that object alone, in place, and "samples" can only come after it. Anything else (buffered records, a record with an
object before its values) is parsed whole and handed to samples(). tests/test_collector_alerts.py
checks both ways agree.
"""
import json

from agent.collector.samples import samples as record_samples

_VALUES = '"values":{'
_AT = len(_VALUES) - 1
_scan = json.JSONDecoder().scan_once
_INF = (float("inf"), float("-inf"))


def samples(payload, ts):
    """[(ts, values dict)] of one data record's JSON text (`ts`: its ts column)."""
    i = payload.find(_VALUES)
    # no backslash before it either: in `"x\"values":{` the quote is escaped, the key is x"values
    if i > 0 and payload.find("{", 1) == i + _AT and payload.find("\\", 0, i) < 0:
        try:
            values, end = _scan(payload, i + _AT)
        except StopIteration:   # not JSON after all: let the full parse say so
            end = None
        # "samples" (a list of objects) cannot come before: its "{" would be the first one
        if end is not None and payload.find('"samples"', end) < 0:
            return [(ts, values)]
    return record_samples(json.loads(payload))


def numeric(v):
    """A value a threshold compares: numbers and booleans (as 0/1); None for anything else
    (strings, null, the infinities and NaN a huge exponent parses to)."""
    t = type(v)
    if t is float:
        return v if v == v and v not in _INF else None
    if t is int or t is bool:
        return float(v)
    return None


def field(doc, path):
    """doc's value at a dotted path ('spool.oldest_age'), or None."""
    for part in path.split("."):
        if type(doc) is not dict:
            return None
        doc = doc.get(part)
    return doc
