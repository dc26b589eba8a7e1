"""What the collector's POST side accepts and refuses (in-process through wsgiref.validate, a real
SQLite file): keys given twice, timestamps from the future, the "partial" status and "errors"
lists, exact integers, the legacy endpoint's identity and seq space, and bodies whose JSON would
cost far more memory than their size (the process's peak RSS: test_collector_ingest_memory.py)."""
import gzip
import json
import threading
import time

import pytest

from agent.collector import make_app
from agent.collector.config import load_config
from agent.collector.fastpath import fast_head, fast_record, fast_rows
from agent.record import encode, gap_record, health_record, utc_timestamp
from tests.test_collector_api import Client
from tests.test_collector_store import db_url, pg_server, pg_url  # noqa: F401 (fixtures: SQLite and PostgreSQL)

NOW = 1_795_000_000.0  # 2026-11-18, the collector's clock in these tests
TOKEN_A = "token-for-agent-a-0123456789"


def rec(seq, t=NOW - 60, device="meter1", values=None, **extra):
    r = {"agent": "a", "seq": seq, "ts": utc_timestamp(t), "device": device, "unit": 1,
         "values": {"v": float(seq)} if values is None else values, "status": "ok"}
    r.update(extra)
    return r


def body(records, agent="a"):
    return encode({"agent": agent, "records": records}).rstrip(b"\n")


@pytest.fixture
def client(tmp_path):
    app = make_app(None, db="sqlite:///%s" % (tmp_path / "c.db"), clock=lambda: NOW, max_records=500,
                   max_body_bytes=1 << 20, max_decompressed_bytes=4 << 20)
    yield Client(app)
    app.close()


@pytest.fixture
def secure(tmp_path):
    app = make_app(None, db="sqlite:///%s" % (tmp_path / "s.db"), clock=lambda: NOW, tokens={"a": TOKEN_A})
    yield Client(app)
    app.close()


# --- keys given twice -------------------------------------------------------------------------

def test_a_values_key_twice_in_the_agents_own_form_is_refused_naming_record_and_key(client):
    """The fast path's regex matched {"v":1,"v":2}: stored columns (and Python) took the last value,
    SQLite's json_extract the first. Now 422 naming it, also once the device's layout is known."""
    good = body([rec(0), rec(1)]).decode()
    assert client.post(good.encode()).status == 200
    text = body([rec(2), rec(3, values={"v": 1.5, "w": 2})]).decode().replace('"w":2', '"v":2')
    assert '"values":{"v":1.5,"v":2}' in text
    assert fast_record(text, text.index('{"agent"', 2)) is not None  # the regex alone lets it through
    r = client.post(text.encode())
    assert (r.status, r.json()["where"]) == (422, "$.records[1].values.v"), r.body
    assert "twice" in r.json()["error"]
    assert client.count() == 2


@pytest.mark.parametrize("text, where", [
    # another key order: the general path
    ('{"records":[{"seq":0,"agent":"a","ts":"2026-11-18T08:00:00.000Z","device":"m","device":"n","unit":1,'
     '"values":{},"status":"ok"}],"agent":"a"}', "$.records[0].device"),
    ('{"agent":"a","agent":"b","records":[]}', "$.agent"),
    ('{"agent":"a","records":[],"records":[]}', "$.records"),
    ('{"agent":"a","records":[{"agent":"a","seq":0,"ts":"2026-11-18T08:00:00.000Z","device":"m","unit":1,'
     '"error":{"kind":"timeout","kind":"crc"},"status":"error"}]}', "$.records[0].error.kind"),
    ('{"agent":"a","records":[{"agent":"a","seq":0,"ts":"2026-11-18T08:00:00.000Z","device":"m","unit":1,'
     '"values":{"s":"\\u00e9","s":"x"},"status":"ok"}]}', "$.records[0].values.s"),  # an escape: general path
    ('{"agent":"a","records":[{"agent":"a","seq":0,"ts":"2026-11-18T08:00:00.000Z","device":"m","unit":1,'
     '"values":{"v":1},"status":"ok"},{"agent":"a","seq":1,"ts":"2026-11-18T08:00:00.000Z","device":"m",'
     '"unit":1,"kind":"health","health":{"n":1,"n":2}}]}', "$.records[1].health.n"),
])
def test_keys_given_twice_are_refused_on_the_general_path(client, text, where):
    r = client.post(text.encode())
    assert (r.status, r.json()["where"]) == (422, where), r.body
    assert client.count() == 0


def test_both_paths_refuse_the_same_duplicate_and_accept_the_same_distinct_keys():
    from agent.collector.jsonbody import parse_batch
    from agent.collector.validate import Invalid, batch_rows

    for keys_ok in (True, False):
        values = '{"a":1,"b":2,"c":3}' if keys_ok else '{"a":1,"b":2,"a":3}'
        text = ('{"agent":"a","records":[' + ",".join(
            '{"agent":"a","seq":%d,"ts":"2026-11-18T08:00:00.000Z","device":"m","unit":1,"values":%s,"status":"ok"}'
            % (i, values) for i in range(3)) + "]}")
        fast = fast_rows(text, fast_head(text)[1], "a", 1.0, 10, 8)
        try:
            general = batch_rows(parse_batch(text), 1.0, 10, 8)[1]
        except Invalid as e:
            general = e.path
        if keys_ok:
            assert fast == general and len(fast) == 3
        else:
            assert fast is None and general == "$.records[0].values.a"


# --- timestamps from the future ---------------------------------------------------------------

def test_a_reading_beyond_max_future_skew_is_refused_naming_the_record(client):
    """A ts in 2099 became the device's "last" reading until 2099: its status and values froze."""
    r = client.post(body([rec(0), rec(1, t=NOW + 2 * 86400), rec(2)]))
    assert (r.status, r.json()["where"]) == (422, "$.records[1].ts"), r.body
    assert "clock" in r.json()["error"]
    r = client.post(body([rec(0), rec(1, values={"v": 1}, ts="2099-01-01T00:00:00.000Z")]))
    assert (r.status, r.json()["where"]) == (422, "$.records[1].ts")
    assert client.count() == 0
    # within the skew (a router's clock a little ahead): stored
    r = client.post(body([rec(0), rec(1, t=NOW + 3600)]))
    assert (r.status, r.json()["stored"]) == (200, 2)


def test_future_health_is_refused_and_future_gaps_are_still_counted(client):
    h = health_record("a", NOW + 5 * 86400, "meter1", 1, {"polls": 3})
    h["seq"] = 0
    r = client.post(body([h]))
    assert (r.status, r.json()["where"]) == (422, "$.records[0].ts")
    g = gap_record("a", NOW + 5 * 86400, 7, None, None, None, None, "disk full")
    g["seq"] = 1
    r = client.post(body([g]))
    assert (r.status, r.json()["stored"]) == (200, 1), r.body
    assert client.app.store.agents()[0]["dropped"] == 7


def test_legacy_readings_from_the_future_are_refused(client):
    one = {"timestamp": "2099-01-15 10:30:45", "device_id": "d", "registers": {"r": 1}, "status": "success"}
    r = client.post(json.dumps([dict(one, timestamp="2026-11-18 07:00:00"), one]).encode(), path="/receive-data")
    assert (r.status, r.json()["where"]) == (422, "$[1].timestamp")
    assert client.count() == 0


def test_max_future_skew_is_configurable_and_0_turns_it_off(tmp_path):
    conf = tmp_path / "c.ini"
    conf.write_text("[collector]\nmax_future_skew = 2h\n")
    assert load_config(str(conf)).max_future_skew == 7200.0
    assert load_config(None).max_future_skew == 86400.0
    conf.write_text("[collector]\nmax_future_skew = soon\n")
    with pytest.raises(Exception) as e:
        load_config(str(conf))
    assert "c.ini:2: [collector] max_future_skew" in str(e.value)
    for skew, status in ((7200.0, 422), (0.0, 200), (1e15, 200)):  # 1e15 s: beyond year 9999, no check
        app = make_app(None, db="sqlite:///%s" % (tmp_path / ("%.0f.db" % skew)), clock=lambda: NOW,
                       max_future_skew=skew)
        try:
            assert Client(app).post(body([rec(0, t=NOW + 3 * 3600)])).status == status
        finally:
            app.close()


def test_the_agent_quarantines_only_the_future_record(tmp_path):
    """The agent's uploader quarantines a record only when the 422 names it ($.records[N]...)."""
    from agent.collector.cli import make_server
    from agent.spool import Spool
    from agent.upload import Uploader

    now = time.time()
    app = make_app(None, db="sqlite:///%s" % (tmp_path / "u.db"))
    srv = make_server("127.0.0.1", 0, app)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        sp = Spool(str(tmp_path / "spool"), "a")
        for i in range(6):
            r = rec(None, t=now + (30 * 86400 if i == 3 else -60 + i), values={"i": i})
            sp.append(r)
        up = Uploader("http://127.0.0.1:%d/api/v1/batches" % srv.server_address[1], "a", timeout=5.0)
        up.drain(sp, time.monotonic() + 10)
        assert sp.stats()["records"] == 0
        stored = sorted(json.loads(r[7])["values"]["i"] for r in app.store.records())
        assert stored == [0, 1, 2, 4, 5]
        assert up.state()["quarantined_total"] == 1
        sp.close()
    finally:
        srv.shutdown()
        srv.server_close()
        app.close()


# --- "partial" readings and "errors" lists (CONTRACTS.md §1) -----------------------------------

PARTIAL_ERROR = {"kind": "exception", "code": 2, "name": "ILLEGAL DATA ADDRESS", "function": 3, "address": 500,
                 "count": 1, "points": ["bad"], "message": "unit 1 fc 03 holding 500+1: exception code 2"}


def partial(seq, **kw):
    r = rec(seq, values={"good": 5})
    r["status"] = "partial"
    r["errors"] = [dict(PARTIAL_ERROR)]
    r.update(kw)
    return r


def test_partial_readings_are_stored_with_their_errors(client):
    error = rec(1)
    del error["values"]
    error.update(status="error", error={"kind": "exception", "message": "x"},
                 errors=[dict(PARTIAL_ERROR), {"kind": "timeout", "message": "no answer"}])
    r = client.post(body([partial(0), error]))
    assert (r.status, r.json()["stored"]) == (200, 2), r.body
    rows = list(client.app.store.records())
    assert [x[6] for x in rows] == ["partial", "error"]
    assert json.loads(rows[0][7])["errors"] == [PARTIAL_ERROR]
    assert json.loads(rows[0][7])["values"] == {"good": 5}


@pytest.mark.parametrize("change, where", [
    ({"errors": None}, "$.records[0].errors"),
    ({"errors": []}, "$.records[0].errors"),
    ({"errors": {"kind": "x", "message": "y"}}, "$.records[0].errors"),
    ({"errors": ["exception"]}, "$.records[0].errors[0]"),
    ({"errors": [{"message": "m"}]}, "$.records[0].errors[0].kind"),
    ({"errors": [{"kind": "exception"}]}, "$.records[0].errors[0].message"),
    ({"errors": [{"kind": "exception", "message": 3}]}, "$.records[0].errors[0].message"),
    ({"errors": [dict(PARTIAL_ERROR, code="2")]}, "$.records[0].errors[0].code"),
    ({"errors": [dict(PARTIAL_ERROR, code=True)]}, "$.records[0].errors[0].code"),
    ({"errors": [dict(PARTIAL_ERROR, address=70000)]}, "$.records[0].errors[0].address"),
    ({"errors": [dict(PARTIAL_ERROR, name="")]}, "$.records[0].errors[0].name"),
    ({"errors": [dict(PARTIAL_ERROR, points="bad")]}, "$.records[0].errors[0].points"),
    ({"errors": [dict(PARTIAL_ERROR, points=["ok", 7])]}, "$.records[0].errors[0].points[1]"),
    ({"errors": [PARTIAL_ERROR, dict(PARTIAL_ERROR, kind=None)]}, "$.records[0].errors[1].kind"),
    ({"values": None}, "$.records[0].values"),
    ({"values": [5]}, "$.records[0].values"),
    ({"status": "partly"}, "$.records[0].status"),
])
def test_malformed_partial_readings_are_refused_naming_the_field(client, change, where):
    r = partial(0)
    for k, v in change.items():
        if v is None:
            del r[k]
        else:
            r[k] = v
    resp = client.post(body([r]))
    assert (resp.status, resp.json()["where"]) == (422, where), resp.body
    assert client.count() == 0


def test_point_names_in_errors_may_be_as_long_as_the_agent_allows(client):
    """The agent sets no length on point names (nor does the collector on values keys)."""
    long_name = "p" * 300
    r = partial(0, values={long_name + "x": 1}, errors=[dict(PARTIAL_ERROR, points=[long_name])])
    assert client.post(body([r])).status == 200


def test_an_error_records_optional_errors_list_is_checked(client):
    error = rec(0)
    del error["values"]
    error.update(status="error", error={"kind": "timeout", "message": "x"}, errors=[{"kind": "timeout"}])
    r = client.post(body([error]))
    assert (r.status, r.json()["where"]) == (422, "$.records[0].errors[0].message")


# --- exact integers ---------------------------------------------------------------------------

BIG = 18000000000000000001  # a uint64 beyond 2^53: as a float it would be 18000000000000000000


@pytest.fixture
def any_db(db_url):  # noqa: F811 (the imported fixture)
    app = make_app(None, db=db_url, clock=lambda: NOW)
    yield Client(app)
    app.close()


def _payload(row):
    return row[7] if isinstance(row[7], str) else json.dumps(row[7])


@pytest.mark.parametrize("path", ["fast", "general", "gzip-general"])
def test_a_uint64_beyond_2_53_is_stored_exactly(any_db, path):
    client = any_db
    r = rec(0, values={"u64": BIG, "f": 1.5})
    text = body([r]).decode()
    if path == "fast":
        assert fast_rows(text, fast_head(text)[1], "a", NOW, 10, 8)[0][7].count(str(BIG)) == 1
        data = text.encode()
    else:  # another key order: parsed as JSON, stored as received
        data = json.dumps({"records": [r], "agent": "a"}, indent=1).encode()
        if path == "gzip-general":
            data = gzip.compress(data)
    headers = {"Content-Encoding": "gzip"} if path == "gzip-general" else None
    assert client.post(data, headers=headers).status == 200
    (row,) = client.app.store.records()
    assert str(BIG) in _payload(row) and json.loads(_payload(row))["values"]["u64"] == BIG
    dev = client.app.store.devices()[0]
    assert str(BIG) in dev["last_values"] and json.loads(dev["last_values"])["u64"] == BIG


def test_a_legacy_uint64_is_stored_exactly(any_db):
    client = any_db
    one = {"timestamp": "2026-11-18 07:00:00", "device_id": "d", "registers": {"r": BIG}, "status": "success"}
    assert client.post(json.dumps(one).encode(), path="/receive-data").status == 200
    (row,) = client.app.store.records()
    assert json.loads(_payload(row))["values"]["r"] == BIG and str(BIG) in _payload(row)


# --- the legacy endpoint: one reading, one record, outside the agents' seqs -----------------------

def test_the_same_legacy_reading_rebuilt_differently_is_stored_once(client):
    one = {"timestamp": "2024-01-15 10:30:45", "device_id": "RUT200_1",
           "registers": {"reg1": 123, "reg2": 7.0, "nested": {"x": 1, "y": [1, 2.5]}}, "status": "success"}
    assert client.post(json.dumps(one).encode(), path="/receive-data").json() == {"stored": 1, "duplicates": 0}
    again = [
        # the keys in another order, inside registers too, and extra whitespace
        '{ "status" : "success",\n "registers": {"nested": {"y": [1, 2.5], "x": 1}, "reg2": 7.0, "reg1": 123},'
        '\t"device_id": "RUT200_1", "timestamp": "2024-01-15 10:30:45" }',
        # 1.0 for 1, 7 for 7.0, 1.23e2 for 123, 2.50 for 2.5; "OK" for "success" (stored the same)
        json.dumps(dict(one, status="OK", registers={"reg1": 1.23e2, "reg2": 7,
                                                     "nested": {"x": 1.0, "y": [1.0, 2.50]}})),
    ]
    for text in again:
        r = client.post(text.encode(), path="/receive-data")
        assert r.json() == {"stored": 0, "duplicates": 1}, text
    # distinct readings stay distinct: another value, an exact integer next to the float it rounds to
    for registers in ({"reg1": 124}, {"reg1": 18000000000000000001}, {"reg1": 1.8e19}):
        r = client.post(json.dumps(dict(one, registers=registers)).encode(), path="/receive-data")
        assert r.json() == {"stored": 1, "duplicates": 0}, registers
    assert client.count() == 4


def test_legacy_posts_with_an_agents_token_leave_its_max_seq_alone(secure):
    """/receive-data with agent a's token stored under a with a 63-bit hash as seq: a's max_seq
    jumped there, and the agent then logged a false 'readings are being DISCARDED' error."""
    auth = {"Authorization": "Bearer " + TOKEN_A}
    r = secure.post(body([rec(i) for i in range(5)]), headers=auth)
    assert r.json()["max_seq"] == 4
    one = {"timestamp": "2026-11-18 07:00:00", "device_id": "script", "registers": {"r": 1}, "status": "success"}
    r = secure.post(json.dumps([one, dict(one, timestamp="2026-11-18 07:00:01")]).encode(), path="/receive-data",
                    headers=auth)
    assert r.json() == {"stored": 2, "duplicates": 0}
    assert secure.app.store.agents()[0]["max_seq"] == 4
    r = secure.post(body([rec(5)]), headers=auth)
    assert r.json() == {"stored": 1, "duplicates": 0, "max_seq": 5}
    # the legacy records keep their own (negative) seq space: no collision with the agent's
    seqs = sorted(x[1] for x in secure.app.store.records(agent="a"))
    assert seqs[2:] == [0, 1, 2, 3, 4, 5] and all(s < 0 for s in seqs[:2])


def test_a_legacy_only_agent_has_no_agent_seq(client):
    one = {"timestamp": "2026-11-18 07:00:00", "device_id": "d", "registers": {"r": 1}, "status": "success"}
    client.post(json.dumps(one).encode(), path="/receive-data")
    assert client.app.store.agents()[0]["max_seq"] == -1


# --- bodies that would cost far more memory parsed than their size ------------------------------

@pytest.mark.parametrize("make, path", [
    (lambda n: '{"agent":"a","records":[' + ",".join(["{}"] * n) + "]}", "/api/v1/batches"),
    (lambda n: "[" + ",".join(["{}"] * n) + "]", "/receive-data"),
    (lambda n: "[" * n, "/api/v1/batches"),
    (lambda n: '{"agent":"a","records":[],"x":[' + ",".join(["1"] * n * 8) + "]}", "/api/v1/batches"),
])
def test_too_many_json_values_for_the_cap_is_413_before_parsing(client, make, path):
    text = make((4 << 20) // 256 + 1)  # one more object/list than json_limits allows for the 4 MB cap
    r = client.post(gzip.compress(text.encode()), path=path, headers={"Content-Encoding": "gzip"})
    assert (r.status, r.json()["where"]) == (413, "body"), r.body
    assert "JSON" in r.json()["error"]


def test_too_many_records_is_413_while_parsing(client):
    """The general path counts records as it reads them (max_records 500 here)."""
    text = '{"records":[' + ",".join(["{}"] * 501) + '],"agent":"a"}'
    r = client.post(text.encode())
    assert (r.status, r.json()["where"]) == (413, "$.records")
