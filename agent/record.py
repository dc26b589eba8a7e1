"""The record: one JSON object per line, the same in the spool, in uploads and in `poll --json`.

    {"agent": "site7-rut200", "seq": 1234, "ts": "2026-11-21T10:30:45.123Z", "device": "meter1",
     "unit": 1, "values": {"voltage_l1": 230.1}, "status": "ok"}

A failed read has "status": "error" and "error": {"kind", "message"[, "code"]} instead of values.
A device that refused some blocks with an exception response (it answered) gives "status":
"partial": "values" holds the points of the blocks that answered (refused points are omitted),
"errors" one entry per refused block: {"kind": "exception", "code", "name", "function", "address",
"count", "points", "message"}. An error record whose blocks were all refused carries the same
"errors" list after "error".
Records that are not readings carry a "kind":
  "gap"     the spool dropped records to stay in its bounds: "dropped", "first_seq", "last_seq",
            "first_ts", "last_ts" say exactly what is gone.
  "health"  per-device health counters ("device", "health": {...}).
(agent, seq) is the identity of every record; the spool assigns seq when it appends.
A record taken while the clock is obviously unset (before CLOCK_SANE) has "clock": "unsynced".
"""
import json
import time

# Release date of this version: a router clock before it has not been set by NTP yet.
CLOCK_SANE = 1_790_000_000.0  # 2026-09-21T14:13:20Z

_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def utc_timestamp(t):
    """Seconds since the epoch -> '2026-11-21T10:30:45.123Z' (UTC, milliseconds)."""
    ms = int(round(t * 1000.0))
    secs, ms = divmod(ms, 1000)
    tm = time.gmtime(secs)
    return "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ" % (
        tm.tm_year, tm.tm_mon, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ms)


def _base(agent, t, **fields):
    rec = {"agent": agent, "seq": None, "ts": utc_timestamp(t)}
    rec.update(fields)
    if t < CLOCK_SANE:
        rec["clock"] = "unsynced"
    return rec


def data_record(agent, t, device, unit, values):
    return _base(agent, t, device=device, unit=unit, values=values, status="ok")


def error_record(agent, t, device, unit, error, errors=None):
    """`error` is a ModbusError (its as_record()) or an already-built dict; `errors`, when
    given, lists every refused block (see partial_record)."""
    err = error.as_record() if hasattr(error, "as_record") else dict(error)
    if errors:
        return _base(agent, t, device=device, unit=unit, status="error", error=err,
                     errors=list(errors))
    return _base(agent, t, device=device, unit=unit, status="error", error=err)


def partial_record(agent, t, device, unit, values, errors):
    """Some blocks answered, others were refused: `values` of the ones that answered, `errors`
    a non-empty list of {"kind", "message"[, "code", "name", "function", "address", "count",
    "points"]}, one per refused block."""
    if not errors:
        raise ValueError("a partial record needs at least one error")
    return _base(agent, t, device=device, unit=unit, values=values, status="partial",
                 errors=list(errors))


def gap_record(agent, t, dropped, first_seq, last_seq, first_ts, last_ts, reason):
    return _base(agent, t, kind="gap", dropped=dropped, first_seq=first_seq, last_seq=last_seq,
                 first_ts=first_ts, last_ts=last_ts, reason=reason)


def health_record(agent, t, device, unit, health):
    return _base(agent, t, kind="health", device=device, unit=unit, health=health)


def encode(record):
    """Record -> one line of UTF-8 JSON, newline included. NaN/inf are not JSON: the caller
    must have replaced them (decoders turn them into None)."""
    return (_encoder.encode(record) + "\n").encode("utf-8")
