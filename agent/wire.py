"""The wire format: one record is one line of compact UTF-8 JSON, and the same bytes travel
everywhere: appended to the spool, sent in an upload batch, stored as the collector's payload.

Stdlib only: the agent (record, spool, upload) and the collector (fastpath, validate, app, reads) import it.
tests/test_wire.py pins every fact below; change one and that test says who relies on it.

The contract:
- A record's first keys are RECORD_HEAD, in that order: `{"agent":"ID","seq":N,"ts":"TS",...`.
  The spool reads a line's seq and ts by slicing that prefix (never parsing the line); the
  uploader reads a line's agent the same way; the collector's fast path matches it.
- A reading then has "device", "unit", "values", "status" (and "error"/"errors", "clock"), in the
  order agent.record builds them; the collector's fast path relies on `"values":{...},"status":"ok"`
  being the last keys of an ok reading (before an optional `"clock":"unsynced"`).
- TS: UTC with milliseconds, exactly TS_LEN characters: `2026-11-21T10:30:45.123Z`.
- Separators are compact (`,` and `:` without spaces), non-ASCII is written as UTF-8, NaN and
  infinities are not JSON (the caller replaces them).
- A batch is `{"agent":"ID","records":[LINE,LINE,...]}`: the spool lines joined by commas
  without their newlines, under the agent that wrote them (ENVELOPE_TAIL closes it).
"""
import json
import time

RECORD_HEAD = ("agent", "seq", "ts")
TS_LEN = 24
AGENT_KEY = b'{"agent":'
ENVELOPE_TAIL = b"]}"

_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_decoder = json.JSONDecoder()
_TS_KEY = b'"ts":"'


def encode(record):
    """Record (a dict whose first keys are RECORD_HEAD) -> one line, newline included."""
    return (_encoder.encode(record) + "\n").encode("utf-8")


def _json_text(value):
    return json.dumps(value, ensure_ascii=False).encode("utf-8")


def line_prefix(agent_id):
    """How a line of this agent starts, up to the seq's digits: b'{"agent":"ID","seq":'."""
    return AGENT_KEY + _json_text(agent_id) + b',"seq":'


def envelope_head(agent_id):
    """The start of a batch of this agent's lines: b'{"agent":"ID","records":['."""
    return AGENT_KEY + _json_text(agent_id) + b',"records":['


def slice_seq_ts(line, prefix):
    """(seq, ts or None) sliced from a line that starts with `prefix` (line_prefix of its agent);
    None when the line does not start so or its seq is not a number. ts is None when the key after
    seq is not a TS_LEN-character "ts"."""
    p = len(prefix)
    if not line.startswith(prefix):
        return None
    j = line.find(b",", p)
    if j <= p:
        return None
    try:
        seq = int(line[p:j])
    except ValueError:
        return None
    ts = None
    start = j + 1 + len(_TS_KEY)
    if line.startswith(_TS_KEY, j + 1) and line[start + TS_LEN:start + TS_LEN + 1] == b'"':
        ts = line[start:start + TS_LEN].decode("ascii", "replace")
    return seq, ts


def line_agent(line):
    """The agent id a line carries (a non-empty string), None when it has none: sliced when the
    line starts with AGENT_KEY, parsed otherwise."""
    agent = None
    try:
        if line.startswith(AGENT_KEY):
            agent, _ = _decoder.raw_decode(line[len(AGENT_KEY):len(AGENT_KEY) + 1024].decode("utf-8", "replace"))
        else:
            rec = json.loads(line)
            agent = rec.get("agent") if isinstance(rec, dict) else None
    except ValueError:
        return None
    return agent if isinstance(agent, str) and agent else None


def utc_timestamp(t):
    """Seconds since the epoch -> '2026-11-21T10:30:45.123Z' (UTC, milliseconds, TS_LEN chars)."""
    ms = int(round(t * 1000.0))
    secs, ms = divmod(ms, 1000)
    tm = time.gmtime(secs)
    return "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ" % (
        tm.tm_year, tm.tm_mon, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ms)
