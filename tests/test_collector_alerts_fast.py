"""The alert hook's text check (agent/collector/alerts/textband.py): a record it lets through
changes nothing, so the events are exactly those of parsing every record."""
import math
import random
import re

import pytest

from agent.collector.alerts import engine, textband
from tests.test_collector_alerts import T0, Sim, write_ini

RULES = """
[alert:hi]
agent = a*
device = m*
point = v
above = 250
clear = 245
for = 20s
[alert:lo]
agent = a*
device = m*
point = v
below = -3.5
[alert:coil]
agent = a*
device = m*
point = c
above = 0.5
[alert:w]
agent = a*
device = m2
point = w
below = 1000
clear = 1010
for = 5s
[alert:err]
kind = error
agent = a*
device = m*
for = 10s
[notify:none]
url = http://127.0.0.1:9/x
"""


def test_numbers_it_accepts_are_inside_the_band_by_float():
    rnd = random.Random(7)
    for lo in range(0, 200, 7):
        for hi in list(range(lo, 400, 11)) + [10 ** 6, 10 ** 20]:
            r = re.compile(textband.int_range(lo, hi) or "(?!)", re.ASCII).fullmatch
            for n in list(range(0, 1200)) + [rnd.randrange(10 ** 18) for _ in range(50)]:
                if r(str(n)):
                    assert lo <= n <= hi, (lo, hi, n)
    hits = 0
    for _ in range(1000):
        lo = rnd.choice([-math.inf, rnd.uniform(-1e4, 1e4), float(rnd.randint(-300, 300))])
        hi = rnd.choice([math.inf, lo + rnd.uniform(0, 1e3), lo + rnd.randint(0, 50)])
        r = re.compile(textband.number_in(lo, hi), re.ASCII).fullmatch
        for _ in range(20):
            base = rnd.uniform(max(lo, -1e5), min(hi, 1e5)) if lo < 1e5 and hi > -1e5 else 0.0
            v = rnd.choice([base, rnd.randint(-20000, 20000), lo, hi, math.floor(hi) if -1e9 < hi < 1e9 else 0])
            if not math.isfinite(v):
                continue
            t = rnd.choice([repr(float(v)), "%.3f" % v, "%d" % v, "%.20f" % v, "%de1" % v, "-0", "0"])
            if r(t):
                hits += 1
                assert lo < float(t) < hi, (lo, hi, t)
    assert hits > 2000   # it does accept the usual case
    for word in ("true", "false", "null", '"x"', '"a\\"b"', "1e5", "[1]", "{}"):
        ok = re.compile(textband.number_in(0.5, 2.0), re.ASCII).fullmatch(word) is not None
        assert ok == (word in ("true", "null", '"x"')), word


def _stream(seed, calm=False):
    """Records of 3 devices with values wandering across every rule's limits; strings, nulls,
    booleans, exponents, errors and a layout change among them."""
    rnd = random.Random(seed)
    out = []
    for i in range(400):
        dev = "m%d" % rnd.randrange(3)
        v = rnd.choice([230.0, 231.5, 249.9, 250.0, 250.1, 260, 244, 246.5, -3.5, -3.6, 0, 2.5e2, 1e3, None,
                        "n/a", True])
        values = {"v": v, "c": rnd.choice([True, False, 0, 1, None]), "w": rnd.choice([990, 1005.5, 1020, 1e4])}
        if calm:
            values = {"v": rnd.choice([230.0, 231.5, 244, None, "n/a"]), "c": False, "w": rnd.choice([1005.5, 1e4])}
        if i % 97 == 5:
            values["extra"] = "new layout"
        status = "error" if rnd.random() < 0.05 and not calm else "ok"
        rec = {"agent": "a1", "seq": None, "ts": None, "device": dev, "unit": 1, "values": values, "status": status}
        if status == "error":
            del rec["values"]
            rec["error"] = {"kind": "timeout", "message": "no answer"}
        out.append((T0 + i * 3, rec))
    return out


def _events(tmp_path, name, stream, monkeypatch, text_check):
    if not text_check:
        monkeypatch.setattr(engine, "_text_matcher", lambda *a: None)
    engine._text_cache.clear()
    d = tmp_path / name
    d.mkdir()
    sim = Sim(write_ini(d, RULES), "sqlite:///%s" % (d / "c.db"))
    try:
        from agent.record import utc_timestamp
        batch = []
        for t, rec in stream:
            batch.append(dict(rec, ts=utc_timestamp(t)))
            if len(batch) == 25:
                sim.post(*batch, at=t)
                batch = []
        if batch:
            sim.post(*batch, at=stream[-1][0])
        ev = [(e["rule"], e["device"], e["point"], e["state"], e["value"], e["ts"])
              for e in engine.db.history(sim.engine.store, 10000)]
        return ev, sim.states()
    finally:
        sim.close()
        monkeypatch.undo()


@pytest.mark.parametrize("seed, calm", [(1, False), (2, False), (3, True)])
def test_events_with_the_text_check_are_exactly_those_of_parsing_every_record(tmp_path, monkeypatch, seed, calm):
    stream = _stream(seed, calm)
    calls = []
    real = engine.samples
    monkeypatch.setattr(engine, "samples", lambda p, t: calls.append(1) or real(p, t))
    fast = _events(tmp_path, "fast", stream, monkeypatch, True)
    parsed = len(calls)
    monkeypatch.setattr(engine, "samples", lambda p, t: calls.append(1) or real(p, t))
    slow = _events(tmp_path, "slow", stream, monkeypatch, False)
    assert fast == slow
    if calm:   # nothing crosses: only a device's first record of a batch (and a new layout) is parsed
        assert fast[0] == [] and parsed < len(stream) * 0.25, parsed
    else:
        assert len(fast[0]) > 20, fast[0]          # the stream does cross limits


def test_a_buffered_record_crossing_inside_is_parsed_though_its_newest_values_are_in_band(tmp_path):
    from agent.record import buffered_record, utc_timestamp
    sim = Sim(write_ini(tmp_path, RULES), "sqlite:///%s" % (tmp_path / "b.db"))
    try:
        flat = [{"agent": "a1", "seq": None, "ts": utc_timestamp(T0 + i), "device": "m1", "unit": 1,
                 "values": {"v": 230.0, "c": False, "w": 1005.5}, "status": "ok"} for i in range(5)]
        sim.post(*flat, at=T0 + 5)
        sim.post(*[dict(r, ts=utc_timestamp(T0 + 10 + i)) for i, r in enumerate(flat)], at=T0 + 15)
        assert engine._text_cache    # the device's layout is known: its records take the text check
        # polls 30 s apart: 251 and 260 (above 250 for 30s > for 20s) inside, the newest back at 231
        samples = [(T0 + 30 * (k + 1), {"v": v, "c": False, "w": 1005.5}) for k, v in enumerate([240, 251, 260, 231])]
        rec = dict(buffered_record("a1", samples, "m1", 1), seq=None)
        try:
            sim.post(dict(flat[0], ts=utc_timestamp(T0 + 20)), rec, at=T0 + 200)
        except AssertionError as e:   # validation of "samples" is the points branch's (CONTRACTS §8)
            pytest.skip("this tree's ingest does not accept buffered records yet: %s" % e)
        got = [(e["state"], e["value"]) for e in engine.db.history(sim.engine.store, 10) if e["rule"] == "hi"]
        assert got == [("resolved", 231.0), ("firing", 260.0)]
    finally:
        sim.close()
