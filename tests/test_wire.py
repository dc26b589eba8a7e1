"""The wire contract (agent/wire.py): what record, spool, upload and the collector rely on."""
import json

import pytest

from agent import wire
from agent.collector import fastpath, jsonbody, validate
from agent.record import data_record, error_record, gap_record, health_record, partial_record

T = 1_800_000_000.123


def _line(rec, seq=7):
    rec = dict(rec, seq=seq)
    return wire.encode(rec)


RECORDS = [
    data_record("site7", T, "meter1", 1, {"v": 230.1, "n": 18000000000000000001}),
    error_record("site7", T, "meter1", 1, {"kind": "timeout", "message": "no response within 0.5 s"}),
    partial_record("site7", T, "meter1", 1, {"good": 5},
                   [{"kind": "exception", "code": 2, "name": "ILLEGAL DATA ADDRESS", "function": 3,
                     "address": 500, "count": 1, "points": ["bad"], "message": "refused"}]),
    gap_record("site7", T, 3, 1, 3, "2027-01-15T08:00:00.000Z", "2027-01-15T08:00:02.000Z", "bounds"),
    health_record("site7", T, "meter1", 1, {"polls_ok": 3}),
    data_record("sité ünïcode", 1_000.0, "mèter", 1, {"ü": "ä"}),   # clock unset: "clock" last
]


@pytest.mark.parametrize("rec", RECORDS, ids=lambda r: r.get("kind") or r["status"])
def test_every_record_starts_with_the_head_keys_in_order(rec):
    line = _line(rec)
    assert line.endswith(b"\n") and b"\n" not in line[:-1]
    assert list(json.loads(line))[:3] == list(wire.RECORD_HEAD)
    assert line.startswith(wire.line_prefix(rec["agent"]))
    seq, ts = wire.slice_seq_ts(line, wire.line_prefix(rec["agent"]))
    assert seq == 7 and ts == rec["ts"] and len(ts) == wire.TS_LEN
    assert wire.line_agent(line) == rec["agent"]


def test_compact_utf8_and_no_nan():
    line = _line(RECORDS[-1])
    assert b": " not in line and b", " not in line and "mèter".encode() in line
    with pytest.raises(ValueError):
        wire.encode({"agent": "a", "seq": 1, "ts": "x", "v": float("nan")})


def test_slice_refuses_what_is_not_the_prefix():
    prefix = wire.line_prefix("site7")
    assert wire.slice_seq_ts(b'{"agent":"other","seq":1,"ts":"2027-01-15T08:00:00.000Z"}\n', prefix) is None
    assert wire.slice_seq_ts(prefix + b'x1,"ts":"2027-01-15T08:00:00.000Z"}\n', prefix) is None
    assert wire.slice_seq_ts(prefix + b'5,"device":"d"}\n', prefix) == (5, None)
    assert wire.line_agent(b'{"seq":1,"agent":"late"}') == "late"       # parsed when not sliceable
    assert wire.line_agent(b'{"agent":""}') is None and wire.line_agent(b"junk") is None


def test_utc_timestamp_is_ts_len_with_milliseconds():
    assert wire.utc_timestamp(T) == "2027-01-15T08:00:00.123Z"
    assert len(wire.utc_timestamp(0)) == wire.TS_LEN


def test_a_batch_of_spool_lines_is_what_the_collector_parses_on_both_paths():
    lines = [_line(r, seq=i + 1) for i, r in enumerate(RECORDS[:5])]
    body = (wire.envelope_head("site7") + b",".join(x[:-1] for x in lines) + wire.ENVELOPE_TAIL).decode()
    assert [r["seq"] for r in json.loads(body)["records"]] == [1, 2, 3, 4, 5]
    received = "2027-01-15T08:00:01.000Z"
    agent, rows = validate.batch_rows(jsonbody.parse_batch(body), received, 100, 8)
    assert agent == "site7" and [r[1] for r in rows] == [1, 2, 3, 4, 5]
    # The uploader's envelope is exactly what the fast path recognises.
    head = fastpath.fast_head(body)
    assert head is not None and head[0] == "site7"
    fast = fastpath.fast_rows(body, head[1], "site7", received, 100, 8)
    if fast is not None:   # None: the general path decides (gap/health/partial records)
        assert [r[1] for r in fast] == [1, 2, 3, 4, 5]


def test_the_collector_fast_path_matches_an_ok_reading_as_the_agent_writes_it():
    line = _line(data_record("site7", T, "meter1", 1, {"v": 230.1, "s": "x"}))[:-1].decode()
    m = fastpath.fast_record(line)
    assert m is not None and m.end() == len(line)
