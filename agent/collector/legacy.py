"""The legacy /receive-data format: one record or a list of them, without sequence numbers.

{"timestamp": "2024-01-15 10:30:45", "device_id": ..., "registers": {...}, "status": ...} -> a
row like the agents' (status ok or error), with a content-hash seq (legacy_row says why).
"""
import json
import re

from agent.collector.jsonbody import encode as _encode
from agent.collector.validate import MAX_NAME, Invalid, checked_object, normalize_ts

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
    registers = checked_object(rec, "registers", path, max_depth)
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
