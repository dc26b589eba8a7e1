"""The record: one JSON object per line, the same in the spool, in uploads and in `poll --json`.

    {"agent": "site7-rut200", "seq": 1234, "ts": "2026-11-21T10:30:45.123Z", "device": "meter1",
     "unit": 1, "values": {"voltage_l1": 230.1}, "status": "ok"}

A buffered record (`[device] buffer = N`) adds "samples": [{"ts", "values"}, ...] after
"status": N polls, oldest first, the newest (also in "ts"/"values") included.
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
The line format itself (key order, timestamp, encoding, batch envelope) is agent.wire's.
"""
from agent.wire import encode, utc_timestamp  # noqa: F401  (re-exported: the record's encoding)

# Release date of this version: a router clock before it has not been set by NTP yet.
CLOCK_SANE = 1_790_000_000.0  # 2026-09-21T14:13:20Z


def _base(agent, t, **fields):
    rec = {"agent": agent, "seq": None, "ts": utc_timestamp(t)}
    rec.update(fields)
    if t < CLOCK_SANE:
        rec["clock"] = "unsynced"
    return rec


def data_record(agent, t, device, unit, values):
    return _base(agent, t, device=device, unit=unit, values=values, status="ok")


def buffered_record(agent, samples, device, unit):
    """`[device] buffer = N`: N successful polls [(t, values)] (oldest first) in one record.
    "ts" and "values" are the newest sample's, so a reader that knows nothing of buffering
    still sees the latest reading; "samples" holds every poll, the newest included:

        {..., "values": {...}, "status": "ok", "samples": [{"ts": ..., "values": {...}}, ...]}
    """
    t, values = samples[-1]
    rec = _base(agent, t, device=device, unit=unit, values=values, status="ok",
                samples=[{"ts": utc_timestamp(st), "values": v} for st, v in samples])
    return rec


def error_record(agent, t, device, unit, error, errors=None):
    """`error` is a ModbusError (its as_record()) or an already-built dict; `errors`, when
    given, lists every refused block (see partial_record)."""
    fields = {"status": "error", "error": error.as_record() if hasattr(error, "as_record") else dict(error)}
    if errors:
        fields["errors"] = list(errors)     # after "error": the order agent.wire describes
    return _base(agent, t, device=device, unit=unit, **fields)


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


