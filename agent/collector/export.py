"""Streaming exports of GET /api/v1/records: JSON, JSON lines and CSV, in pieces of ~64 KB.

The payload column is the record as the agent sent it, so JSON and JSON lines give back what was
received (a buffered record with its "samples"). CSV has one row per reading: a buffered record
gives one row per sample (per_sample). CSV cells a spreadsheet would run as a formula are neutralised (csv_cell). Every stream
closes the database cursor generator when the client hangs up (_closing).
"""
import csv
import io
import json
import re

from agent.collector.jsonbody import encode as _encode
from agent.collector.samples import samples
from agent.collector.store import ROW_COLUMNS


def primed(rows):
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


_SAMPLES_KEY = '"samples":['
_TS_AT, _PAYLOAD_AT = ROW_COLUMNS.index("ts"), ROW_COLUMNS.index("payload")


def per_sample(row):
    """A stored row -> the rows CSV shows for it: a buffered record ([device] buffer = N) gives
    one row per sample, its ts the sample's and its payload the sample as a one-poll record
    (the shape an unbuffered reading has); any other row as it is."""
    payload = row[_PAYLOAD_AT]
    if type(payload) is str and _SAMPLES_KEY not in payload:
        return (row,)
    rec = json.loads(payload) if type(payload) is str else payload
    if type(rec) is not dict or "samples" not in rec:
        return (row,)
    head = {k: rec[k] for k in ("agent", "seq") if k in rec}
    tail = {k: rec[k] for k in ("device", "unit") if k in rec}
    out = []
    for ts, values in samples(rec):
        one = dict(head, ts=ts, **tail)
        one["values"] = values
        one["status"] = rec.get("status")
        r = list(row)
        r[_TS_AT], r[_PAYLOAD_AT] = ts, _encode(one)
        out.append(r)
    return out


def stream_csv(rows):
    def pieces():
        buf = io.StringIO()
        # RFC 4180 line ends: the writer then also quotes a field holding a bare CR, which with
        # "\n" it left unquoted (and readers split the row there).
        w = csv.writer(buf, lineterminator="\r\n")
        w.writerow(ROW_COLUMNS)
        for row in rows:
            for r in per_sample(row):
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
