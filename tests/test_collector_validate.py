"""The collector's pure parts: the one-pass batch parser (checked against json.loads on random
documents with random whitespace), timestamps, legacy records."""
import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.collector.fastpath import fast_head, fast_rows
from agent.collector.jsonbody import TooMany, parse_batch
from agent.collector.legacy import legacy_row
from agent.collector.validate import Invalid, batch_rows, normalize_ts
from agent.record import encode

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
    assert -(1 << 63) <= a[1] < 0  # outside the agents' seqs 0..2^63-1
    assert json.loads(a[7]) == {"agent": "legacy", "seq": a[1], "ts": "2024-01-15T10:30:45.000Z", "device": "RUT200_1",
                                "unit": None, "values": {"reg1": 123}, "status": "ok"}
    with pytest.raises(Invalid) as e:
        legacy_row(dict(rec, device_id=""), "legacy", 1.0, "$[3]", 8, _h)
    assert e.value.path == "$[3].device_id"


# --- the fast path agrees with the general one --------------------------------------------------


names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=6)
scalar_values = (st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70)
                 | st.floats(allow_nan=False, allow_infinity=False) | names)
dates = st.sampled_from(["2026-11-21T10:30:45.123Z", "2026-02-28T23:59:59.999Z", "2026-02-30T00:00:00.000Z",
                         "2026-11-21T10:30:45Z", "2026-11-21T25:30:45.123Z", "1999-01-01T00:00:00.000Z"])
fast_records = st.fixed_dictionaries({
    "agent": st.sampled_from(["site7", "site7", "site7", "other"]),
    "seq": st.sampled_from([0, 1, 17, (1 << 63) - 1, 1 << 63, 10 ** 19]) | st.integers(0, 1000),
    "ts": dates, "device": st.sampled_from(["meter1", "m\u00e9ter", "", "x" * 129, 'q"uote']) | names,
    "unit": st.integers(0, 300),
    "values": st.dictionaries(names, scalar_values | st.lists(st.integers(), max_size=2), max_size=4),
    "status": st.sampled_from(["ok", "ok", "ok", "error"]),
}, optional={"clock": st.sampled_from(["unsynced", "later"]), "kind": st.sampled_from(["gap", "health"])})


def _general(text):
    try:
        return batch_rows(parse_batch(text), 1.0, 5, 8)[1]
    except (Invalid, TooMany, ValueError):
        return "refused"


@settings(max_examples=300, deadline=None)
@given(records=st.lists(fast_records, max_size=7))
def test_fast_path_agrees_with_the_general_path(records):
    text = encode({"agent": "site7", "records": records}).decode().rstrip("\n")
    head = fast_head(text)
    assert head is not None and head[0] == "site7"
    fast = fast_rows(text, head[1], head[0], 1.0, 5, 8)
    general = _general(text)
    if fast is None:
        return  # declined: the general path decides alone
    assert general != "refused", text
    assert fast == general


@pytest.mark.parametrize("ascii_digits, other_digits", [
    ('"seq":13', '"seq":1\u0663'), ('"unit":11', '"unit":1\u0661'), ('"v":13', '"v":1\u0663'),
    ('10:33:45', '10:3\u0663:45')])
def test_digits_of_other_scripts_are_refused_on_both_paths(ascii_digits, other_digits):
    """In a str regex \\d matches U+0663 too, and int() reads it: "seq":1\u0663 passed the fast
    path as seq 13 and its payload (not JSON) was stored as is."""
    good = ('{"agent":"site7","records":[{"agent":"site7","seq":13,"ts":"2026-11-21T10:33:45.123Z",'
            '"device":"meter1","unit":11,"values":{"v":13},"status":"ok"}]}')
    assert good.count(ascii_digits) == 1
    rows = fast_rows(good, fast_head(good)[1], "site7", 1.0, 10, 8)
    assert rows is not None and rows == _general(good)
    bad = good.replace(ascii_digits, other_digits)
    assert fast_rows(bad, fast_head(bad)[1], "site7", 1.0, 10, 8) is None
    assert _general(bad) == "refused"


def test_fast_path_takes_the_agents_own_records():
    recs = [{"agent": "site7", "seq": i, "ts": "2026-11-21T10:30:45.%03dZ" % i, "device": "meter1", "unit": 1,
             "values": {"v": 230.5, "i": -3, "s": "\u00e9", "b": False, "n": None}, "status": "ok"} for i in range(3)]
    recs[1]["clock"] = "unsynced"
    text = encode({"agent": "site7", "records": recs}).decode().rstrip("\n")
    rows = fast_rows(text, fast_head(text)[1], "site7", 1.0, 10, 8)
    assert rows == _general(text)
    assert [r[8] for r in rows] == [None, "unsynced", None]
    assert fast_head('{"records":[],"agent":"site7"}') is None
    assert fast_head('{"agent":"site7","records":[]} ') is None


_KEYS = st.sampled_from(["a", "b", "", ",", ":odd", "{", "}", "a,b", " "])
_VALS = st.sampled_from(['1', '-2.5', '"x,"', '":"', '"{"', '"a,b"', "true", "null", '""'])


@settings(max_examples=300, deadline=None)
@given(pairs=st.lists(st.tuples(_KEYS, _VALS), max_size=5), n=st.integers(1, 3), device=st.sampled_from(["m1", "m2"]))
def test_both_paths_refuse_a_key_given_twice_and_agree_otherwise(pairs, n, device):
    """The fast path's regex cannot see a repeated key; it learns each device's keys (a layout)
    and must refuse exactly what the general path refuses, whatever the keys and strings hold."""
    values = "{" + ",".join('"%s":%s' % kv for kv in pairs) + "}"
    text = '{"agent":"site7","records":[' + ",".join(
        '{"agent":"site7","seq":%d,"ts":"2026-11-21T10:30:45.123Z","device":"%s","unit":1,"values":%s,"status":"ok"}'
        % (i, device, values) for i in range(n)) + "]}"
    fast = fast_rows(text, fast_head(text)[1], "site7", 1.0, 5, 8)
    general = _general(text)
    if len({k for k, _ in pairs}) != len(pairs):
        assert fast is None and general == "refused", text
    else:
        assert fast == general != "refused", text


def test_layout_caches_stay_bounded_and_compile_a_few_per_request(monkeypatch):
    """A client may send any number of agents, devices and key sets: at most 4 patterns compiled
    per request, and the caches start again past their bounds (answers unchanged)."""
    from agent.collector import fastpath

    monkeypatch.setattr(fastpath, "_layouts", {})
    monkeypatch.setattr(fastpath, "_device_layouts", {})
    monkeypatch.setattr(fastpath, "_sizes", [0, 0])
    monkeypatch.setattr(fastpath, "_MAX_DEVICES", 10)
    monkeypatch.setattr(fastpath, "_MAX_CACHED_KEYS", 12)
    for agent in ("site7", "site8", "site9"):
        recs = ['{"agent":"%s","seq":%d,"ts":"2026-11-21T10:30:45.123Z","device":"d%d","unit":1,'
                '"values":{"k%d":1,"x":2},"status":"ok"}' % (agent, i, i % 9, i % 7) for i in range(60)]
        text = '{"agent":"%s","records":[%s]}' % (agent, ",".join(recs))
        before = set(fastpath._layouts)
        rows = fast_rows(text, fast_head(text)[1], agent, 1.0, 100, 8)
        assert rows is not None and rows == batch_rows(parse_batch(text), 1.0, 100, 8)[1]
        assert len(set(fastpath._layouts) - before) <= 4
        assert fastpath._sizes[0] <= 12 and fastpath._sizes[1] <= 10
        assert sum(len(d) for d in fastpath._device_layouts.values()) <= 10


def test_a_record_with_more_values_than_a_layout_takes_gets_the_general_checks():
    from agent.collector.fastpath import MAX_LAYOUT_KEYS

    for n, dup in ((MAX_LAYOUT_KEYS, False), (MAX_LAYOUT_KEYS + 1, False), (MAX_LAYOUT_KEYS + 1, True)):
        keys = ["k%d" % i for i in range(n)]
        if dup:
            keys[-1] = "k0"
        values = "{" + ",".join('"%s":%d' % (k, i) for i, k in enumerate(keys)) + "}"
        text = ('{"agent":"site7","records":[{"agent":"site7","seq":1,"ts":"2026-11-21T10:30:45.123Z",'
                '"device":"big","unit":1,"values":%s,"status":"ok"}]}' % values)
        fast = fast_rows(text, fast_head(text)[1], "site7", 1.0, 5, 8)  # parsed as JSON, with every check
        if not dup:
            assert fast is not None and fast == batch_rows(parse_batch(text), 1.0, 5, 8)[1]
        else:
            assert fast is None
            with pytest.raises(Invalid) as e:
                batch_rows(parse_batch(text), 1.0, 5, 8)
            assert e.value.path == "$.records[0].values.k0"


_error_objects = st.fixed_dictionaries(
    {"kind": st.sampled_from(["timeout", "exception", "crc", 'q"uote', ""]) | names, "message": names},
    optional={"code": st.sampled_from([0, 2, 255, 256, 1000, -1, "2"]), "name": names})


@settings(max_examples=300, deadline=None)
@given(errors=st.lists(_error_objects, min_size=1, max_size=5), clock=st.booleans(),
       extra=st.sampled_from([None, {"errors": [{"kind": "timeout", "message": "x"}]}, {"values": {}}]))
def test_fast_path_agrees_with_the_general_path_on_failed_reads(errors, clock, extra):
    """The agent's error records (agent/record.py error_record) take the fast path too."""
    from agent.record import error_record

    recs = []
    for i, err in enumerate(errors):
        r = error_record("site7", 1795000000.0 + i, "meter1", 1, err)
        r["seq"] = i
        if clock:
            r["clock"] = "unsynced"
        if extra and i == 0:
            r.update(extra)
        recs.append(r)
    text = encode({"agent": "site7", "records": recs}).decode().rstrip("\n")
    fast = fast_rows(text, fast_head(text)[1], "site7", 1.0, 5, 8)
    general = _general(text)
    assert fast is None or general != "refused", text
    if fast is not None:
        assert fast == general
        assert [r[6] for r in fast] == ["error"] * len(errors)


def test_the_agents_failed_reads_match_the_fast_pattern():
    from agent.collector.fastpath import _FAST_ERROR
    from agent.record import error_record

    for err in ({"kind": "timeout", "message": "no answer from unit 1 in 1.0 s"},
                {"kind": "exception", "message": "exception code 2 ILLEGAL DATA ADDRESS", "code": 2}):
        r = error_record("site7", 1795000000.0, "meter1", 1, err)
        r["seq"] = 7
        line = encode(r).decode().rstrip("\n")
        assert _FAST_ERROR(line).end() == len(line), line
        text = '{"agent":"site7","records":[%s]}' % line
        assert fast_rows(text, fast_head(text)[1], "site7", 1.0, 5, 8) == _general(text)
