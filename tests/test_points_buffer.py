"""`[device] buffer = N` and `first = on_change` (agent/polling.py, agent/record.py), end to end:
the real Loop polling umodbus's TCP server, its spool lines posted to the real collector app
(in process, a real SQLite file), validated, stored, exported per sample (CSV) and as stored
(JSON); malformed samples refused naming the field (CONTRACTS.md section 8).
"""
import csv
import io
import json
import sys
import time

import pytest

from agent.collector import make_app
from agent.collector.fastpath import fast_head, fast_rows
from agent.collector.validate import batch_rows
from agent.config import load_config
from agent.loop import Loop
from agent.wire import envelope_head
from tests import modbus_peers as peers
from tests.conftest import ROOT
from tests.test_collector_api import Client

sys.path.insert(0, str(ROOT / "tools"))
import simulator as S

NOW = 1_795_000_000.0


@pytest.fixture(scope="module")
def umodbus():
    server = peers.UmodbusTcp()
    yield server
    server.stop()


def make_loop(tmp_path, port, device_extra):
    ini = tmp_path / "agent.ini"
    ini.write_text("""[agent]
id = buf
interval = 40ms
spool_dir = %(tmp)s/spool
status_file = %(tmp)s/status.json
health_interval = 1h
summary_interval = 1h

[connection:link]
type = tcp
host = 127.0.0.1
port = %(port)d
timeout = 200ms
backoff_max = 50ms

[device:meter]
connection = link
%(extra)s

[points:meter]
v = holding 3 uint16
w = holding 5 uint16
""" % {"tmp": tmp_path, "port": port, "extra": device_extra})
    return Loop(load_config(str(ini)))


def spooled(loop):
    batch = loop.spool.peek(10000, 1 << 24)
    return [] if batch is None else [line for line in batch.lines if b'"device":"meter"' in line]


def run_until(loop, cond, seconds=5):
    end = time.monotonic() + seconds
    while not cond() and time.monotonic() < end:
        loop.step()


def test_buffered_records_flush_before_an_error_and_at_stop_in_time_order(tmp_path):
    sim = S.Simulator({1: S.Plc(seed=1)}, tcp=0)
    sim.start()
    try:
        loop = make_loop(tmp_path, sim.tcp_port, "buffer = 3")
        h = loop.states[0].health
        run_until(loop, lambda: h.polls_ok >= 7)
        assert h.polls_ok == 7
        sim.set_fault(1, "exception", count=1, code=4)   # the next poll fails: the pending one first
        run_until(loop, lambda: h.consecutive_failures >= 1)
    finally:
        sim.stop()
    recs = [json.loads(line) for line in spooled(loop)]
    kinds = [(r["status"], len(r.get("samples", ()))) for r in recs]
    assert kinds == [("ok", 3), ("ok", 3), ("ok", 0), ("error", 0)], kinds
    seqs = [r["seq"] for r in recs]
    assert seqs == sorted(seqs)
    times = [s["ts"] for r in recs[:2] for s in r["samples"]] + [recs[2]["ts"], recs[3]["ts"]]
    assert times == sorted(times) and len(set(times)) == len(times)
    for r in recs[:2]:
        assert r["ts"] == r["samples"][-1]["ts"] and r["values"] == r["samples"][-1]["values"]
    loop.shutdown()


def test_polls_still_pending_at_stop_are_written(tmp_path, umodbus):
    loop = make_loop(tmp_path, umodbus.port, "buffer = 10")
    h = loop.states[0].health
    run_until(loop, lambda: h.polls_ok >= 4)
    assert spooled(loop) == []
    loop.shutdown()
    loop2 = make_loop(tmp_path, umodbus.port, "buffer = 10")
    try:
        recs = [json.loads(line) for line in spooled(loop2)]
    finally:
        loop2.shutdown()
    assert len(recs) == 1 and len(recs[0]["samples"]) == 4


def test_first_on_change_takes_the_first_poll_as_a_baseline(tmp_path, umodbus):
    loop = make_loop(tmp_path, umodbus.port, "mode = on_change\nheartbeat = 1h\nfirst = on_change")
    h = loop.states[0].health
    try:
        run_until(loop, lambda: h.polls_ok >= 3)
        assert spooled(loop) == []                     # nothing moved: nothing sent
        umodbus.store.holding[3] = (umodbus.store.holding[3] + 1) & 0xFFFF
        run_until(loop, lambda: h.polls_ok >= 5)
        recs = [json.loads(line) for line in spooled(loop)]
    finally:
        loop.shutdown()
    assert len(recs) == 1 and recs[0]["values"]["v"] == umodbus.store.holding[3]


def agent_lines(tmp_path, umodbus, n=6, buffer=3):
    loop = make_loop(tmp_path, umodbus.port, "buffer = %d" % buffer)
    h = loop.states[0].health
    try:
        run_until(loop, lambda: h.polls_ok >= n)
        return spooled(loop)
    finally:
        loop.shutdown()


@pytest.fixture
def client(tmp_path):
    app = make_app(None, db="sqlite:///%s" % (tmp_path / "c.db"), clock=lambda: time.time(),
                   max_records=500, max_body_bytes=1 << 20, max_decompressed_bytes=4 << 20)
    yield Client(app)
    app.close()


def test_the_collector_stores_the_agents_buffered_records_and_exports_each_sample(tmp_path, umodbus, client):
    lines = agent_lines(tmp_path, umodbus)
    assert len(lines) == 2
    text = (envelope_head("buf") + b",".join(line.rstrip(b"\n") for line in lines) + b"]}").decode()
    # the fast path and the general path agree on the agent's own buffered records
    agent, idx = fast_head(text)
    fast = fast_rows(text, idx, agent, 1.0, 500, 32)
    doc = json.loads(text)
    general = batch_rows({"agent": doc["agent"], "records": [(r, line.rstrip(b"\n").decode())
                                                             for r, line in zip(doc["records"], lines)]},
                         1.0, 500, 32)[1]
    assert fast == general and len(fast) == 2
    r = client.post(text.encode())
    assert (r.status, r.json()["stored"]) == (200, 2), r.body
    stored = json.loads(client.get("/api/v1/records").body)
    assert [len(x["samples"]) for x in stored] == [3, 3]                  # JSON: as stored
    rows = list(csv.DictReader(io.StringIO(client.get("/api/v1/records", "format=csv").body.decode())))
    assert len(rows) == 6                                                 # CSV: one row per sample
    want = [s for rec in stored for s in rec["samples"]]
    assert [row["ts"] for row in rows] == [s["ts"] for s in want]
    assert [json.loads(row["payload"])["values"] for row in rows] == [s["values"] for s in want]
    assert [int(row["seq"]) for row in rows] == [stored[0]["seq"]] * 3 + [stored[1]["seq"]] * 3
    dev = json.loads(client.get("/api/v1/devices").body)["devices"][0]
    assert dev["values"] == stored[1]["values"]                           # the newest sample's


def buffered(seq=1, **change):
    ts = ["2026-11-18T10:00:00.000Z", "2026-11-18T10:00:01.000Z"]
    r = {"agent": "a", "seq": seq, "ts": ts[-1], "device": "m", "unit": 1, "values": {"v": 2},
         "status": "ok", "samples": [{"ts": ts[0], "values": {"v": 1}}, {"ts": ts[1], "values": {"v": 2}}]}
    for k, v in change.items():
        if v is None:
            del r[k]
        else:
            r[k] = v
    return r


@pytest.mark.parametrize("change, where, why", [
    ({"samples": []}, "$.records[0].samples", "1..1000"),
    ({"samples": {"ts": "x"}}, "$.records[0].samples", "list"),
    ({"samples": ["x"]}, "$.records[0].samples[0]", "object"),
    ({"samples": [{"ts": "yesterday", "values": {}}]}, "$.records[0].samples[0].ts", "UTC time"),
    ({"samples": [{"ts": "2026-11-18T10:00:01.000Z", "values": [1]}]}, "$.records[0].samples[0].values", "object"),
    ({"samples": [{"ts": "2026-11-18T10:00:01.000Z", "values": {}, "x": 1}]}, "$.records[0].samples[0].x", "unknown"),
    ({"samples": [{"ts": "2026-11-18T10:00:02.000Z", "values": {}}, {"ts": "2026-11-18T10:00:01.000Z", "values": {}}]},
     "$.records[0].samples[1].ts", "oldest first"),
    ({"samples": [{"ts": "2026-11-18T09:00:00.000Z", "values": {}}]}, "$.records[0].samples", "record's ts"),
    ({"status": "partial", "errors": [{"kind": "exception", "message": "m"}]}, "$.records[0].samples", '"ok"'),
])
def test_malformed_samples_are_refused_naming_the_field(client, change, where, why):
    resp = client.post(json.dumps({"agent": "a", "records": [buffered(**change)]}).encode())
    assert (resp.status, resp.json()["where"]) == (422, where), resp.body
    assert why in resp.json()["error"]
    assert client.count() == 0


def test_the_fast_path_takes_the_agents_buffered_records_itself(tmp_path, umodbus, monkeypatch):
    from agent.collector import fastpath

    lines = agent_lines(tmp_path, umodbus, n=4, buffer=2)
    text = (envelope_head("buf") + b",".join(line.rstrip(b"\n") for line in lines) + b"]}").decode()
    agent, idx = fast_head(text)
    want = fast_rows(text, idx, agent, 1.0, 500, 32)      # learns the dates, compiles the layout

    def general(*a, **k):
        raise AssertionError("the general path was asked")
    monkeypatch.setattr(fastpath, "record_row", general)
    assert fast_rows(text, idx, agent, 1.0, 500, 32) == want and len(want) == 2
    # a sample whose values differ in keys from the record's: the general path decides
    odd = text.replace('"values":{"v":', '"values":{"u":', 1)
    with pytest.raises(AssertionError, match="general path"):
        fast_rows(odd, idx, agent, 1.0, 500, 32)
