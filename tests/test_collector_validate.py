"""The collector's pure parts: the one-pass batch parser (checked against json.loads on random
documents with random whitespace), timestamps, legacy records."""
import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.collector.validate import Invalid, legacy_row, normalize_ts, parse_batch

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                      max_leaves=10)
ws = st.sampled_from(["", " ", "\n", "\t", " \r\n "])


def _dump(v, w):
    """JSON text of v with whitespace w between every token."""
    if isinstance(v, dict):
        return "{" + w + ("," + w).join(json.dumps(k) + w + ":" + w + _dump(x, w) for k, x in v.items()) + w + "}"
    if isinstance(v, list):
        return "[" + w + ("," + w).join(_dump(x, w) for x in v) + w + "]"
    return json.dumps(v)


@settings(max_examples=200, deadline=None)
@given(agent=st.text(max_size=5), records=st.lists(values, max_size=5), extra=st.dictionaries(st.text(max_size=3), values, max_size=2),
       w=ws, order=st.booleans())
def test_parse_batch_agrees_with_json_loads_and_keeps_each_records_text(agent, records, extra, w, order):
    doc = dict(extra)
    if order:
        doc["agent"], doc["records"] = agent, records
    else:
        doc["records"], doc["agent"] = records, agent
    text = w + _dump(doc, w) + w
    got = parse_batch(text)
    expect = json.loads(text)
    assert {k: v for k, v in got.items() if k != "records"} == {k: v for k, v in expect.items() if k != "records"}
    assert [r for r, _ in got["records"]] == expect["records"]
    for r, raw in got["records"]:
        assert raw is None or json.loads(raw) == r


@pytest.mark.parametrize("text", ['{"agent":"a","records":[{"x":1},]}', '{"agent":"a","records":[{"x":1}',
                                  '{"agent":"a"}}', '', '{"a":NaN}', '{"a":1} {"b":2}', '{"records":[{"v":Infinity}]}'])
def test_parse_batch_refuses_what_json_refuses(text):
    with pytest.raises(ValueError):
        parse_batch(text)


@pytest.mark.parametrize("given_,expected", [
    ("2026-11-21T10:30:45.123Z", "2026-11-21T10:30:45.123Z"),
    ("2026-11-21T10:30:45Z", "2026-11-21T10:30:45.000Z"),
    ("2026-11-21T10:30:45.1Z", "2026-11-21T10:30:45.100Z"),
    ("2026-11-21T10:30:45.123456Z", "2026-11-21T10:30:45.123Z"),
    ("2024-02-29T00:00:00Z", "2024-02-29T00:00:00.000Z"),
    ("2026-02-29T00:00:00Z", None), ("2026-04-31T00:00:00Z", None), ("2026-11-21T24:00:00Z", None),
    ("2026-11-21T10:30:45+01:00", None), ("2026-11-21 10:30:45Z", None), ("1969-12-31T23:59:59Z", None),
    (1795000000, None), (None, None),
])
def test_timestamps_are_normalised_to_one_sortable_width(given_, expected):
    assert normalize_ts(given_) == expected


def _h(b):
    return hashlib.blake2b(b, digest_size=8).digest()


def test_legacy_identity_is_the_content():
    rec = {"timestamp": "2024-01-15 10:30:45", "device_id": "RUT200_1", "registers": {"reg1": 123}, "status": "success"}
    a = legacy_row(rec, "legacy", 1.0, "$", 8, _h)
    b = legacy_row(dict(rec), "legacy", 2.0, "$", 8, _h)  # the same post again, later
    c = legacy_row(dict(rec, registers={"reg1": 124}), "legacy", 1.0, "$", 8, _h)
    assert a[1] == b[1] != c[1]
    assert 0 <= a[1] < 1 << 63
    assert json.loads(a[7]) == {"agent": "legacy", "seq": a[1], "ts": "2024-01-15T10:30:45.000Z", "device": "RUT200_1",
                                "unit": None, "values": {"reg1": 123}, "status": "ok"}
    with pytest.raises(Invalid) as e:
        legacy_row(dict(rec, device_id=""), "legacy", 1.0, "$[3]", 8, _h)
    assert e.value.path == "$[3].device_id"
