"""The collector's HTTP API: in-process through wsgiref.validate (every response checked against
the WSGI spec), over real HTTP on 127.0.0.1, fuzzed with hypothesis, and the status page in a
real headless Chromium. Storage is a real SQLite file in tmp_path."""
import csv
import gzip
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.collector import make_app
from agent.collector.cli import make_server
from agent.collector.config import ConfigError, load_config, redact
from agent.record import encode, error_record, gap_record, health_record, utc_timestamp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T0 = 1_795_000_000.0
TOKEN_A = "token-for-agent-a-0123456789"
TOKEN_B = "token-for-agent-b-9876543210"


def data(agent, seq, device="meter1", t=None, **values):
    return {"agent": agent, "seq": seq, "ts": utc_timestamp(T0 + seq if t is None else t), "device": device,
            "unit": 1, "values": values or {"v": float(seq)}, "status": "ok"}


def batch(agent, records):
    return encode({"agent": agent, "records": records}).rstrip(b"\n")


class Client:
    """Calls the app in-process through wsgiref.validate.validator."""

    def __init__(self, app):
        from wsgiref.validate import validator

        self.app = app
        self.wsgi = validator(app)

    def call(self, method, path, body=b"", headers=None, qs="", content_type="application/json"):
        env = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": qs, "SCRIPT_NAME": "",
               "SERVER_NAME": "test", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
               "REMOTE_ADDR": "127.0.0.1", "wsgi.version": (1, 0), "wsgi.url_scheme": "http",
               "wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr, "wsgi.multithread": True,
               "wsgi.multiprocess": False, "wsgi.run_once": False}
        if body or method == "POST":
            env["CONTENT_LENGTH"] = str(len(body))
        if content_type is not None and method == "POST":
            env["CONTENT_TYPE"] = content_type
        for k, v in (headers or {}).items():
            env["HTTP_" + k.upper().replace("-", "_")] = v
        out = {}

        def start_response(status, hdrs, exc_info=None):
            out["status"], out["headers"] = status, dict(hdrs)

        it = self.wsgi(env, start_response)
        try:
            body_out = b"".join(it)
        finally:
            it.close()
        return Response(int(out["status"][:3]), out["headers"], body_out)

    def post(self, body, path="/api/v1/batches", **kw):
        return self.call("POST", path, body, **kw)

    def get(self, path, qs="", **kw):
        return self.call("GET", path, qs=qs, **kw)

    def count(self):
        return len(list(self.app.store.records()))


class Response:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)


@pytest.fixture
def client(tmp_path):
    app = make_app(None, db="sqlite:///%s" % (tmp_path / "c.db"), max_records=500, max_body_bytes=1 << 20,
                   max_decompressed_bytes=4 << 20)
    yield Client(app)
    app.close()


@pytest.fixture
def secure(tmp_path):
    app = make_app(None, db="sqlite:///%s" % (tmp_path / "s.db"), tokens={"a": TOKEN_A, "b": TOKEN_B},
                   read_token="read-token-0123456789")
    yield Client(app)
    app.close()


# --- config -------------------------------------------------------------------------------------

def test_the_sample_config_parses():
    cfg = load_config(os.path.join(ROOT, "conf", "collector.ini"))
    assert cfg.tokens_required and len(cfg.tokens) == 2
    assert cfg.db.startswith("sqlite:////")
    assert (cfg.max_body_bytes, cfg.max_records, cfg.retention_interval) == (8 << 20, 10000, 300.0)
    assert cfg.receive_data_mode == "token"
    assert "example-token" not in repr(cfg)


def test_config_errors_name_file_line_section_and_key(tmp_path):
    p = tmp_path / "bad.ini"
    p.write_text("[collector]\nlisten = nowhere\nmax_records = 0\ncolour = blue\n"
                 "[tokens]\nsite1 = short\n[extra]\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    errs = e.value.errors
    assert "%s:2: [collector] listen: expected HOST:PORT" % p in errs[1] or any(
        x.startswith("%s:2: [collector] listen" % p) for x in errs)
    assert any(x.startswith("%s:3: [collector] max_records: must be at least 1" % p) for x in errs)
    assert any(x.startswith("%s:4: [collector] colour: unknown key" % p) for x in errs)
    assert any(x.startswith("%s:6: [tokens] site1: token too short" % p) for x in errs)
    assert any(x.startswith("%s:7: [extra]: unknown section" % p) for x in errs)
    assert len(errs) == 5


SECRET = "S3cretPassw0rd"
SECRET_TOKEN = "9f8e7d6c5b4a39281706f5e4d3c2b1a0"


@pytest.mark.parametrize("text,where", [
    ("[collector]\ndb = postgresq://ingest:%s@db.example/modbus\n" % SECRET, ":2: [collector] db:"),
    ("[collector]\ndb = mysql://ingest:%s@db/x?password=%s\n" % (SECRET, SECRET), ":2: [collector] db:"),
    ("[tokens]\nsite7 %s\n" % SECRET_TOKEN, ":2: [tokens]: expected `key = value`"),
    ("[tokens]\nsite7 = 0123456789abcdef\n  %s\n[collector]\nread_token %s\n" % (SECRET_TOKEN, SECRET_TOKEN),
     ":5: [collector]: expected `key = value`, got a line starting 'read_token'"),
    ("site7 = %s\n[tokens]\n" % SECRET_TOKEN, ":1: expected a [section] header"),
    ("[tokens]\nsite7 = %s\nsite7 = %s\n" % (SECRET_TOKEN, SECRET_TOKEN), ":3: [tokens] site7: given twice"),
])
def test_config_errors_never_show_passwords_or_tokens(tmp_path, text, where):
    p = tmp_path / "c.ini"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) + where in msg, msg
    assert SECRET not in msg and SECRET_TOKEN not in msg, msg


def test_db_password_is_redacted_in_overrides_repr_and_cli_output(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, db="postgresq://u:%s@h/db" % SECRET)
    assert "postgresq://u:***@h/db" in str(e.value) and SECRET not in str(e.value)
    cfg = load_config(None, db="postgresql://u:%s@h/db?password=%s" % (SECRET, SECRET))
    assert SECRET not in repr(cfg)
    # The CLI's start failure names the database without the password (port 1: refused at once).
    pytest.importorskip("psycopg")
    r = subprocess.run([sys.executable, "-m", "agent.collector.cli", "--listen", "127.0.0.1:0",
                        "--db", "postgresql://ingest:%s@127.0.0.1:1/modbus?connect_timeout=5" % SECRET],
                       cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "cannot start" in r.stderr, r.stderr
    assert SECRET not in r.stdout + r.stderr


@pytest.mark.parametrize("conninfo, shown", [
    ("host=db password='pa ss' user=ingest", "host=db password=*** user=ingest"),
    ("host=db password = 'it\\'s \\\\ x' user=ingest", "host=db password = *** user=ingest"),
    ("host=db PASSWORD='' user=ingest", "host=db PASSWORD=*** user=ingest"),
    ("host=db password=plain user=ingest", "host=db password=*** user=ingest"),
    ("failed: host=db password='cut off by the log\nnext line", "failed: host=db password=***\nnext line"),
], ids=["quoted", "escapes", "empty", "bare", "unterminated"])
def test_libpq_conninfo_passwords_are_redacted_quoted_or_not(conninfo, shown):
    assert redact(conninfo) == shown


def test_a_conninfo_db_setting_is_rejected_without_echoing_its_quoted_password():
    with pytest.raises(ConfigError) as e:
        load_config(None, db="host=db password='%s with space' user=ingest" % SECRET)
    assert "password=***" in str(e.value) and SECRET not in str(e.value), str(e.value)
    assert "with space" not in str(e.value)


def test_defaults_are_local_and_open():
    cfg = load_config(None)
    assert cfg.listen == "127.0.0.1:8080" and cfg.db == "sqlite:///collector.db"
    assert not cfg.tokens_required and cfg.receive_data_mode == "open"


# --- ingest -------------------------------------------------------------------------------------

def test_post_a_batch_then_the_same_batch_again(client):
    body = batch("a", [data("a", i) for i in range(5)])
    r = client.post(body)
    assert (r.status, r.json()) == (200, {"stored": 5, "duplicates": 0, "max_seq": 4})
    r = client.post(body)
    assert (r.status, r.json()) == (200, {"stored": 0, "duplicates": 5, "max_seq": 4})
    r = client.post(gzip.compress(batch("a", [data("a", i) for i in range(3, 8)])),
                    headers={"Content-Encoding": "gzip"})
    assert (r.status, r.json()) == (200, {"stored": 3, "duplicates": 2, "max_seq": 7})
    assert client.count() == 8


def test_all_record_kinds_are_stored(client):
    err = error_record("a", T0 + 1, "plc", 2, {"kind": "exception", "message": "illegal address", "code": 2})
    gap = gap_record("a", T0 + 2, 3, 10, 12, utc_timestamp(T0), utc_timestamp(T0 + 1), "spool full")
    hl = health_record("a", T0 + 3, "plc", 2, {"requests": 5, "timeouts": 1})
    recs = [data("a", 0), err, gap, hl]
    for i, r in enumerate(recs):
        r["seq"] = i
    assert client.post(batch("a", recs)).json()["stored"] == 4
    got = [json.loads(x) for x in client.get("/api/v1/records", "format=jsonl").body.splitlines()]
    assert got == recs


def test_empty_batch_is_fine(client):
    r = client.post(b'{"agent":"a","records":[]}')
    assert (r.status, r.json()) == (200, {"stored": 0, "duplicates": 0, "max_seq": None})


BAD_RECORDS = [
    # (mutation of a good record, JSON path reported)
    ({"seq": -1}, "$.records[1].seq"),
    ({"seq": "7"}, "$.records[1].seq"),
    ({"seq": True}, "$.records[1].seq"),
    ({"seq": 1 << 63}, "$.records[1].seq"),
    ({"agent": "other"}, "$.records[1].agent"),
    ({"ts": "2026-02-30T00:00:00.000Z"}, "$.records[1].ts"),
    ({"ts": "yesterday"}, "$.records[1].ts"),
    ({"ts": 1795000000}, "$.records[1].ts"),
    ({"device": ""}, "$.records[1].device"),
    ({"device": "x" * 129}, "$.records[1].device"),
    ({"unit": 256}, "$.records[1].unit"),
    ({"status": "fine"}, "$.records[1].status"),
    ({"values": [1, 2]}, "$.records[1].values"),
    ({"values": {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": 1}}}}}}}}}, "$.records[1].values.a.b.c.d.e.f.g"),
    ({"values": {"s": "x" * 5000}}, "$.records[1].values.s"),
    ({"kind": "weather"}, "$.records[1].kind"),
    ({"clock": "maybe"}, "$.records[1].clock"),
    ({"status": "error", "error": "boom"}, "$.records[1].error"),
    ({"values": {"nul": "a\x00b"}}, "$.records[1].values.nul"),
]


@pytest.mark.parametrize("change,path", BAD_RECORDS, ids=[p + ":" + str(c)[:30] for c, p in BAD_RECORDS])
def test_a_bad_record_is_422_with_its_path_and_nothing_is_stored(client, change, path):
    bad = dict(data("a", 1), **change)
    r = client.post(batch("a", [data("a", 0), bad, data("a", 2)]))
    assert r.status == 422, r.body
    assert r.json()["where"] == path
    assert client.count() == 0


def test_batch_shape_errors(client):
    for body, where in [(b'[]', "$"), (b'{"records":[]}', "$.agent"), (b'{"agent":"a"}', "$.records"),
                        (b'{"agent":"a","records":{}}', "$.records"), (b'{"agent":"a","records":[1]}', "$.records[0]")]:
        r = client.post(body)
        assert (r.status, r.json()["where"]) == (422, where)


def test_too_many_records_is_413_so_the_agent_splits(client):
    r = client.post(batch("a", [data("a", i) for i in range(501)]))
    assert (r.status, r.json()["where"]) == (413, "$.records")
    assert client.count() == 0


@pytest.mark.parametrize("body,where", [
    (b'{"agent": "a", "records": [', "body: line 1 column 28"),
    (b'{"agent":"a","records":[]} trailing', "body: line 1 column 28"),
    (b'{"agent":"a","records":[{"v": NaN}]}', "body"),
    (b'\xff\xfe{}', "body: byte 0"),
    (b'[' * 10000, "body"),  # deeper than the parser goes (more brackets: 413, test_collector_ingest.py)
    (b"", "body"),
])
def test_malformed_json_is_400(client, body, where):
    r = client.post(body)
    assert r.status == 400, r.body
    assert r.json()["where"] == where


def test_size_limits_are_413(client):
    r = client.post(b" " * ((1 << 20) + 1))
    assert (r.status, r.json()["where"]) == (413, "body")
    bomb = gzip.compress(b" " * (5 << 20))  # 5 MiB of spaces in ~5 kB
    assert len(bomb) < 10000
    r = client.post(bomb, headers={"Content-Encoding": "gzip"})
    assert (r.status, r.json()["where"]) == (413, "body")
    r = client.post(b"\x1f\x8b\x08\x00garbage", headers={"Content-Encoding": "gzip"})
    assert r.status == 400
    r = client.post(gzip.compress(batch("a", [data("a", 1)]))[:-6], headers={"Content-Encoding": "gzip"})
    assert (r.status, r.json()["error"]) == (400, "truncated gzip data")


def test_wrong_content_type_or_encoding_is_415(client):
    body = batch("a", [data("a", 1)])
    assert client.post(body, content_type="text/plain").status == 415
    assert client.post(body, content_type=None).status == 415
    assert client.post(body, headers={"Content-Encoding": "br"}).status == 415
    assert client.post(body, content_type="application/json; charset=utf-8").status == 200


def test_missing_content_length_is_411(client):
    env_client = client
    r = env_client.call("POST", "/api/v1/batches", b"", content_type="application/json")
    assert r.status == 400  # Content-Length: 0 -> empty body
    from wsgiref.validate import validator

    env = {"REQUEST_METHOD": "POST", "PATH_INFO": "/api/v1/batches", "SCRIPT_NAME": "", "QUERY_STRING": "",
           "SERVER_NAME": "t", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "CONTENT_TYPE": "application/json",
           "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(b"{}"),
           "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False}
    out = {}
    it = validator(client.app)(env, lambda s, h, e=None: out.update(status=s))
    b"".join(it)
    it.close()
    assert out["status"].startswith("411")


def test_unknown_paths_and_methods(client):
    assert client.get("/nope").status == 404
    r = client.get("/api/v1/batches")
    assert r.status == 405 and r.headers["Allow"] == "POST"


# --- auth ---------------------------------------------------------------------------------------

def test_tokens(secure, caplog):
    caplog.set_level(logging.DEBUG, logger="modbus.collector")
    body = batch("a", [data("a", 1)])
    r = secure.post(body)
    assert (r.status, r.json()["where"]) == (401, "Authorization")
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert secure.post(body, headers={"Authorization": "Bearer wrong-token-000000000"}).status == 401
    assert secure.post(body, headers={"Authorization": "Basic " + TOKEN_A}).status == 401
    r = secure.post(body, headers={"Authorization": "Bearer " + TOKEN_B})
    assert (r.status, r.json()["where"]) == (403, "$.agent")
    assert secure.count() == 0
    r = secure.post(body, headers={"Authorization": "Bearer " + TOKEN_A})
    assert r.status == 200 and r.json()["stored"] == 1
    assert TOKEN_A not in caplog.text and TOKEN_B not in caplog.text and "wrong-token" not in caplog.text
    assert "401" in caplog.text  # the refusals were logged, without the tokens


def test_refusals_are_logged_with_the_agent_and_where_never_the_token(secure, caplog):
    caplog.set_level(logging.INFO, logger="modbus.collector")
    auth_a = {"Authorization": "Bearer " + TOKEN_A}
    bad = dict(data("a", 1), ts="yesterday")
    r = secure.post(batch("a", [data("a", 0), bad]), headers=auth_a)
    assert r.status == 422
    line = [m for m in caplog.messages if " 422 " in m][-1]
    assert "agent 'a'" in line and "where %s" % r.json()["where"] in line and "127.0.0.1" in line, line
    r = secure.post(batch("a", [data("a", 1)]), headers={"Authorization": "Bearer " + TOKEN_B})
    assert r.status == 403
    line = [m for m in caplog.messages if " 403 " in m][-1]
    assert "agent 'a' (token of 'b')" in line and "where $.agent" in line, line
    r = secure.post(b'{"agent": "a\\nforged line", "records": []}', headers=auth_a)
    assert r.status == 403
    line = [m for m in caplog.messages if " 403 " in m][-1]
    assert "\n" not in line and "agent 'a\\nforged line' (token of 'a')" in line, line
    r = secure.post(b"{", headers=auth_a)  # the body never got as far as naming an agent
    assert r.status == 400
    line = [m for m in caplog.messages if " 400 " in m][-1]
    assert " agent " not in line and "(token of 'a')" in line, line
    assert TOKEN_A not in caplog.text and TOKEN_B not in caplog.text


def test_read_token_protects_queries_but_not_health(secure):
    assert secure.get("/health").status == 200
    for path in ("/", "/api/v1/devices", "/api/v1/records", "/api/v1/agents"):
        assert secure.get(path).status == 401
        assert secure.get(path, headers={"Authorization": "Bearer read-token-0123456789"}).status == 200


def test_receive_data_modes(tmp_path):
    one = b'{"timestamp": "2024-01-15 10:30:45", "device_id": "RUT200_1", "registers": {"reg1": 123}, "status": "success"}'
    app = make_app(None, db="sqlite:///%s" % (tmp_path / "a.db"), tokens={"a": TOKEN_A}, receive_data="closed")
    c = Client(app)
    assert c.post(one, path="/receive-data").status == 404
    app.cfg.receive_data = "token"
    assert c.post(one, path="/receive-data").status == 401
    r = c.post(one, path="/receive-data", headers={"Authorization": "Bearer " + TOKEN_A})
    assert (r.status, r.json()) == (200, {"stored": 1, "duplicates": 0})
    (rec,) = [json.loads(x) for x in c.get("/api/v1/records", "format=jsonl").body.splitlines()]
    assert (rec["agent"], rec["device"], rec["ts"], rec["values"]) == ("a", "RUT200_1", "2024-01-15T10:30:45.000Z",
                                                                       {"reg1": 123})
    app.close()


def test_receive_data_single_list_retry_and_errors(client):
    one = {"timestamp": "2024-01-15 10:30:45", "device_id": "RUT200_1", "registers": {"reg1": 123, "reg2": 7},
           "status": "success"}
    r = client.post(json.dumps(one).encode(), path="/receive-data", content_type="text/plain")
    assert (r.status, r.json()) == (200, {"stored": 1, "duplicates": 0})
    # the script retries the same post, then sends a list including it and a new reading
    two = dict(one, timestamp="2024-01-15 10:31:45")
    failed = dict(one, timestamp="2024-01-15 10:32:45", status="timeout")
    r = client.post(json.dumps([one, two, failed]).encode(), path="/receive-data")
    assert r.json() == {"stored": 2, "duplicates": 1}
    recs = [json.loads(x) for x in client.get("/api/v1/records", "format=jsonl").body.splitlines()]
    assert [(x["agent"], x["status"]) for x in recs] == [("legacy", "ok"), ("legacy", "ok"), ("legacy", "error")]
    assert recs[2]["error"]["message"] == "timeout"
    r = client.post(json.dumps([two, dict(one, registers=[1])]).encode(), path="/receive-data")
    assert (r.status, r.json()["where"]) == (422, "$[1].registers")
    r = client.post(json.dumps(dict(one, timestamp="15/01/2024")).encode(), path="/receive-data")
    assert (r.status, r.json()["where"]) == (422, "$.timestamp")
    assert client.count() == 3


# --- queries ------------------------------------------------------------------------------------

def _fill(client):
    client.post(batch("a", [data("a", i, device="m%d" % (i % 2)) for i in range(6)]))
    err = error_record("a", T0 + 10, "m0", 1, {"kind": "timeout", "message": "no answer"})
    err["seq"] = 10
    client.post(batch("a", [err]))


def test_health_and_devices(client):
    h = client.get("/health")
    assert h.status == 200 and h.json()["db"] == "ok"
    _fill(client)
    devs = {d["device"]: d for d in client.get("/api/v1/devices").json()["devices"]}
    assert devs["m1"]["values"] == {"v": 5.0} and devs["m1"]["fresh"] is True
    assert devs["m0"]["errors"] == 1 and devs["m0"]["last_error"]["kind"] == "timeout"
    assert devs["m0"]["values"] == {"v": 4.0} and devs["m0"]["last_status"] == "error"
    (agent,) = client.get("/api/v1/agents").json()["agents"]
    assert (agent["agent"], agent["max_seq"], agent["records"]) == ("a", 10, 7)


def test_records_formats_and_filters(client):
    _fill(client)
    js = client.get("/api/v1/records", "agent=a&device=m1&format=json")
    assert js.headers["Content-Type"] == "application/json"
    assert [r["seq"] for r in js.json()] == [1, 3, 5]
    lines = client.get("/api/v1/records", "since=%s&until=%d&format=jsonl" % (
        utc_timestamp(T0 + 2), int(T0 + 5))).body.splitlines()
    assert [json.loads(x)["seq"] for x in lines] == [2, 3, 4]
    rows = list(csv.reader(io.StringIO(client.get("/api/v1/records", "format=csv&limit=2").body.decode())))
    assert rows[0][:3] == ["agent", "seq", "ts"] and [r[1] for r in rows[1:]] == ["0", "1"]
    assert json.loads(rows[1][7])["values"] == {"v": 0.0}
    assert client.get("/api/v1/records", "kind=health").json() == []
    assert client.get("/api/v1/records", "since=2026-11-18").json()[0]["seq"] == 0
    for qs, where in [("format=xml", "format"), ("limit=-1", "limit"), ("since=soon", "since"),
                      ("colour=red", "colour"), ("kind=x", "kind")]:
        r = client.get("/api/v1/records", qs)
        assert (r.status, r.json()["where"]) == (400, where)


def test_status_page_lists_devices_with_sparklines(client):
    now = time.time()
    client.post(batch("a", [data("a", i, t=now - 600 + i * 60, v=float(i % 3)) for i in range(10)]))
    r = client.get("/")
    html = r.body.decode()
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
    assert 'http-equiv="refresh"' in html and "<script" not in html
    assert 'data-device="meter1"' in html and "<polyline" in html and "v=0" in html


def test_retention_deletes_by_received_time_in_chunks(tmp_path):
    now = time.time()
    clock = [now - 40 * 86400]
    app = make_app(None, db="sqlite:///%s" % (tmp_path / "r.db"), retention_chunk=7, clock=lambda: clock[0])
    c = Client(app)
    c.post(batch("a", [data("a", i, t=clock[0] + i) for i in range(20)]))  # received 40 days ago
    clock[0] = now - 86400
    c.post(batch("a", [data("a", 100 + i, t=clock[0]) for i in range(3)]))
    clock[0] = now
    # Taken while the router's clock was unset (ts at its firmware date), received just now.
    unsynced = [dict(data("a", 200 + i, t=1_780_000_000.0 + i), clock="unsynced") for i in range(2)]
    assert c.post(batch("a", unsynced)).json()["stored"] == 2
    assert app.retention_once() == 0  # retention_days = 0: keep forever
    app.cfg.retention_days = 30
    assert app.retention_once() == 20
    assert sorted(r[1] for r in app.store.records()) == [100, 101, 102, 200, 201]
    app.close()


def test_retention_runs_in_the_background(tmp_path):
    db = "sqlite:///%s" % (tmp_path / "r.db")
    first = make_app(None, db=db, clock=lambda: time.time() - 40 * 86400)
    Client(first).post(batch("a", [data("a", i, t=time.time() - 40 * 86400) for i in range(5)]))
    first.close()
    first = make_app(None, db=db)
    Client(first).post(batch("a", [data("a", 9)]))
    first.close()
    app = make_app(None, db=db, retention_days=30, retention_interval=0.05)  # a restart with retention on
    deadline = time.monotonic() + 20
    while len(list(app.store.records())) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [r[1] for r in app.store.records()] == [9]
    app.close()


# --- fuzz: never a 500, nothing half-stored -----------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)

record_fields = st.fixed_dictionaries({}, optional={
    "agent": st.sampled_from(["a", "b", 1, None]), "seq": st.integers(-2, 1 << 64) | st.text(max_size=3),
    "ts": st.sampled_from(["2026-11-21T10:30:45.123Z", "2026-11-21T10:30:45Z", "2026-11-31T00:00:00Z", "", 5]),
    "device": st.text(max_size=5) | st.integers(), "unit": st.integers(-1, 300) | st.none(),
    "status": st.sampled_from(["ok", "error", "?", None]), "values": json_values, "error": json_values,
    "kind": st.sampled_from(["gap", "health", "x", None]), "health": json_values, "dropped": json_values,
    "clock": st.sampled_from(["unsynced", "x"]), "extra": json_values})


def _check_atomic(client, r, before):
    assert r.status in (200, 400, 411, 413, 415, 422), (r.status, r.body)
    assert set(r.json()) >= ({"stored", "duplicates"} if r.status == 200 else {"error", "where"})
    after = client.count()
    if r.status != 200:
        assert after == before
    else:
        assert after == before + r.json()["stored"]
        # whatever was stored can be shown and exported
        for path, qs in (("/api/v1/devices", ""), ("/api/v1/agents", ""), ("/", ""),
                         ("/api/v1/records", "format=jsonl"), ("/api/v1/records", "format=csv")):
            assert client.get(path, qs).status == 200, path
        for line in client.get("/api/v1/records", "format=jsonl").body.splitlines():
            json.loads(line)


def _near_valid(changes, seq):
    """A valid record with some fields replaced: half of them still pass, so storing is fuzzed too."""
    return dict(data("a", seq, device="d%d" % (seq % 3)), **changes)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(record_fields | st.builds(_near_valid, record_fields.map(
    lambda d: dict(list(d.items())[:1])), st.integers(0, 50)), max_size=5))
def test_fuzz_records_never_500_and_all_or_nothing(client, records):
    before = client.count()
    r = client.post(json.dumps({"agent": "a", "records": records}).encode())
    _check_atomic(client, r, before)


def test_numbers_beyond_float_range_are_stored_and_shown(client):
    body = (b'{"agent":"a","records":[{"agent":"a","seq":1,"ts":"2026-11-21T10:30:45.123Z","device":"d",'
            b'"unit":1,"values":{"big":1e400,"neg":-1e999,"v":2.5},"status":"ok"}]}')
    assert client.post(body).json()["stored"] == 1
    (dev,) = client.get("/api/v1/devices").json()["devices"]
    assert dev["values"] == {"big": None, "neg": None, "v": 2.5}
    assert client.get("/").status == 200
    assert b"1e400" in client.get("/api/v1/records", "format=jsonl").body


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()),
       path=st.sampled_from(["/api/v1/batches", "/receive-data"]), gz=st.booleans())
def test_fuzz_raw_bodies_never_500(client, body, path, gz):
    before = client.count()
    r = client.post(gzip.compress(body) if gz else body, path=path,
                    headers={"Content-Encoding": "gzip"} if gz else None)
    _check_atomic(client, r, before)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 400), flip=st.integers(0, 400), byte=st.integers(0, 255))
def test_fuzz_mutated_valid_batches(client, cut, flip, byte):
    good = bytearray(batch("a", [data("a", 1000 + cut), error_record("a", T0, "d", 1, {"kind": "crc", "message": "x"}) | {"seq": 2000 + flip}]))
    good[flip % len(good)] = byte
    body = bytes(good[:max(1, len(good) - cut % 50)])
    before = client.count()
    _check_atomic(client, client.post(body), before)


# --- over real HTTP -----------------------------------------------------------------------------

@pytest.fixture
def server(tmp_path):
    app = make_app(None, db="sqlite:///%s" % (tmp_path / "h.db"), max_body_bytes=256 << 10)
    srv = make_server("127.0.0.1", 0, app)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield "http://127.0.0.1:%d" % srv.server_address[1], app
    srv.shutdown()
    srv.server_close()
    app.close()


def test_over_http_keep_alive_limits_and_export(server):
    url, app = server
    with requests.Session() as s:
        for k in range(3):  # one connection, several batches
            r = s.post(url + "/api/v1/batches", data=batch("a", [data("a", k * 10 + i) for i in range(10)]),
                       headers={"Content-Type": "application/json"}, timeout=10)
            assert r.status_code == 200 and r.json()["stored"] == 10
        r = s.post(url + "/api/v1/batches", data=b"x" * (300 << 10), headers={"Content-Type": "application/json"},
                   timeout=10)
        assert r.status_code == 413
        r = s.post(url + "/api/v1/batches", data=b"{", headers={"Content-Type": "application/json"}, timeout=10)
        assert r.status_code == 400 and r.json()["where"].startswith("body")
        r = s.post(url + "/api/v1/batches", data=gzip.compress(batch("a", [data("a", 99)])), timeout=10,
                   headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
        assert r.json() == {"stored": 1, "duplicates": 0, "max_seq": 99}
        with s.get(url + "/api/v1/records?format=jsonl", stream=True, timeout=10) as r:
            seqs = [json.loads(line)["seq"] for line in r.iter_lines() if line]
        assert seqs == list(range(30)) + [99]
        assert s.get(url + "/health", timeout=10).json()["status"] == "ok"


def _serve(app):
    srv = make_server("127.0.0.1", 0, app)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return srv, "http://127.0.0.1:%d" % srv.server_address[1]


def _spool(tmp_path, agent, n):
    spool_mod = pytest.importorskip("agent.spool")
    sp = spool_mod.Spool(str(tmp_path / ("spool-" + agent)), agent)
    for i in range(n):
        rec = data(agent, 0, device="m%d" % (i % 3), t=T0 + i)
        rec["seq"] = None
        sp.append(rec)
    return sp


def test_the_agents_uploader_against_the_real_collector(tmp_path):
    """With tokens, a collector limit of 40 records per batch (413 -> the uploader splits), gzip."""
    upload = pytest.importorskip("agent.upload")
    app = make_app(None, db="sqlite:///%s" % (tmp_path / "u.db"), tokens={"site7": TOKEN_A, "site8": TOKEN_B},
                   max_records=40)
    srv, url = _serve(app)
    try:
        sp = _spool(tmp_path, "site7", 120)
        up = upload.Uploader(url + "/api/v1/batches", "site7", token=TOKEN_A, batch_max_records=50, gzip=True,
                             timeout=5.0)
        up.drain(sp, time.monotonic() + 20)
        assert sp.stats()["records"] == 0
        sp.close()
        recs = list(app.store.records(agent="site7"))
        assert len(recs) == 120 and len({r[1] for r in recs}) == 120
        assert app.store.agents()[0]["max_seq"] == max(r[1] for r in recs)
        # an agent presenting another agent's token: refused, nothing stored, nothing quarantined
        sp8 = _spool(tmp_path, "site8", 5)
        up8 = upload.Uploader(url + "/api/v1/batches", "site8", token=TOKEN_A, timeout=5.0)
        up8.drain(sp8, time.monotonic() + 5)
        assert sp8.stats()["records"] == 5
        assert list(app.store.records(agent="site8")) == []
        sp8.close()
    finally:
        srv.shutdown()
        srv.server_close()
        app.close()


def test_cli_with_no_config_is_local_open_and_says_so(tmp_path, free_port):
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "agent.collector.cli", "--listen", "127.0.0.1:%d" % free_port],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                r = requests.post("http://127.0.0.1:%d/api/v1/batches" % free_port, timeout=2,
                                  data=batch("x", [data("x", 1)]), headers={"Content-Type": "application/json"})
                break
            except requests.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        assert r.json()["stored"] == 1
        assert (tmp_path / "collector.db").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=20)[0]
    assert proc.returncode == 0
    assert "WITHOUT tokens" in out and "sqlite:///collector.db" in out


def test_cli_refuses_a_bad_config(tmp_path):
    p = tmp_path / "c.ini"
    p.write_text("[collector]\nmax_records = lots\n")
    r = subprocess.run([sys.executable, "-m", "agent.collector.cli", "-c", str(p)], cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "%s:2: [collector] max_records" % p in r.stderr


# --- the status page in a real browser ----------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")
def test_status_page_in_headless_chromium(server):
    url, app = server
    now = time.time()
    requests.post(url + "/api/v1/batches", timeout=10, headers={"Content-Type": "application/json"},
                  data=batch("site7", [data("site7", i, device="meter<1>", t=now - 900 + i * 60, v=230.0 + i % 4)
                                       for i in range(15)]))
    with tempfile.TemporaryDirectory() as profile:
        r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                            "--no-first-run", "--disable-background-networking", "--disable-component-update",
                            "--disable-sync", "--user-data-dir=" + profile, "--dump-dom", url + "/"],
                           capture_output=True, text=True, timeout=60)
    dom = r.stdout
    if "<html" not in dom:
        pytest.skip("chromium could not render: %s" % r.stderr[-300:])
    assert "<title>modbus-collector</title>" in dom
    assert 'data-device="meter&lt;1&gt;"' in dom  # escaped, not injected
    assert "<polyline" in dom and "site7" in dom


def test_cli_with_two_worker_processes(tmp_path, free_port):
    """--workers 2: two processes on one socket and one SQLite file; every record stored once."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "agent.collector.cli", "--listen", "127.0.0.1:%d" % free_port,
                             "--db", "sqlite:///%s" % (tmp_path / "w.db"), "--workers", "2"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = "http://127.0.0.1:%d" % free_port
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                requests.get(url + "/health", timeout=2)
                break
            except requests.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        results, errors = [], []

        def agent(k):
            try:
                with requests.Session() as s:
                    for b in range(10):
                        recs = [data("w%d" % k, b * 10 + i) for i in range(10)]
                        for _ in range(2):  # every batch twice: the retry is a duplicate
                            r = s.post(url + "/api/v1/batches", data=batch("w%d" % k, recs), timeout=10,
                                       headers={"Content-Type": "application/json"})
                            results.append(r.json())
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=agent, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert sum(r["stored"] for r in results) == 400 and sum(r["duplicates"] for r in results) == 400
        agents = requests.get(url + "/api/v1/agents", timeout=10).json()["agents"]
        assert [(a["agent"], a["max_seq"], a["records"]) for a in agents] == [("w%d" % k, 99, 100) for k in range(4)]
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out
    assert "2 worker processes" in out


def test_connections_beyond_max_connections_get_503_at_once(tmp_path):
    """Beyond max_connections a connection that is only waiting (here: idle, never sent a byte)
    is closed to make room (issue 10: slow clients must not hold the slots); 503 at once only
    when every connection is busy in the app."""
    import socket as socketmod

    app = make_app(None, db="sqlite:///%s" % (tmp_path / "m.db"))
    release, entered = threading.Event(), threading.Event()

    def slow_app(environ, start_response):
        if environ["PATH_INFO"] == "/slow":
            entered.set()
            release.wait(10)
        return app(environ, start_response)

    srv = make_server("127.0.0.1", 0, slow_app, max_connections=1)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    port = srv.server_address[1]
    try:
        idle = socketmod.create_connection(("127.0.0.1", port), timeout=10)  # holds the only slot
        assert requests.get("http://127.0.0.1:%d/health" % port, timeout=10).status_code == 200
        assert idle.recv(1) == b""  # it was the one closed
        idle.close()
        deadline = time.monotonic() + 10
        while not entered.is_set():  # the only slot, busy in the app (once the last one is closed)
            assert time.monotonic() < deadline
            busy = socketmod.create_connection(("127.0.0.1", port), timeout=10)
            busy.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            if not entered.wait(0.5):
                busy.close()
        r = requests.get("http://127.0.0.1:%d/health" % port, timeout=10)
        assert (r.status_code, r.json()["where"], r.headers["Retry-After"]) == (503, "max_connections", "5")
        release.set()
        assert busy.recv(100).startswith(b"HTTP/1.1 404")
        busy.close()
        deadline = time.monotonic() + 10
        while requests.get("http://127.0.0.1:%d/health" % port, timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "the slot was never given back"
            time.sleep(0.05)
    finally:
        release.set()
        srv.shutdown()
        srv.server_close()
        app.close()


def test_agents_beyond_max_connections_get_through_when_others_keep_alive(tmp_path):
    """Agents that reuse their keep-alive connection more often than the idle timeout must not
    hold the slots forever: with few slots free, answers say `Connection: close`."""
    app = make_app(None, db="sqlite:///%s" % (tmp_path / "k.db"))
    srv = make_server("127.0.0.1", 0, app, max_connections=2)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = "http://127.0.0.1:%d/api/v1/batches" % srv.server_address[1]
    agents = ["a%d" % i for i in range(6)]
    sessions = {a: requests.Session() for a in agents}
    refused = {a: 0 for a in agents}
    try:
        for rnd in range(4):
            for a in agents:
                body = batch(a, [data(a, rnd)])
                for _attempt in range(20):  # the uploader's retry, bounded
                    r = sessions[a].post(url, data=body, headers={"Content-Type": "application/json"},
                                         timeout=10)
                    if r.status_code != 503:
                        break
                    refused[a] += 1
                    time.sleep(0.02)
                assert r.status_code == 200, (a, rnd, r.status_code, refused)
                assert r.headers.get("Connection", "").lower() == "close"  # 2 slots: always low
        stored = {}
        for row in app.store.records():
            stored.setdefault(row[0], []).append(row[1])
        assert stored == {a: [0, 1, 2, 3] for a in agents}
    finally:
        for s in sessions.values():
            s.close()
        srv.shutdown()
        srv.server_close()
        app.close()


def _ask_health(conn):
    """One GET /health on an open socket; returns the answer's Connection header (or None)."""
    conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    f = conn.makefile("rb")
    assert f.readline().startswith(b"HTTP/1.1 200")
    head = {}
    while True:
        line = f.readline().strip()
        if not line:
            break
        k, _, v = line.decode().partition(":")
        head[k.strip().lower()] = v.strip()
    f.read(int(head["content-length"]))
    f.close()
    return head.get("connection")


def test_keep_alive_while_slots_are_plenty_close_when_few_are_left(tmp_path):
    import socket as socketmod

    app = make_app(None, db="sqlite:///%s" % (tmp_path / "k.db"))
    srv = make_server("127.0.0.1", 0, app, max_connections=20)  # keep-alive while >= 2 slots free
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    port = srv.server_address[1]
    held = []
    try:
        for _ in range(18):  # 18 of 20 slots taken, 2 left: each is kept open, reusable
            held.append(socketmod.create_connection(("127.0.0.1", port), timeout=10))
            assert _ask_health(held[-1]) is None
        assert [_ask_health(h) for h in held[:3]] == [None, None, None]
        last = socketmod.create_connection(("127.0.0.1", port), timeout=10)  # 1 slot left: low
        held.append(last)
        assert _ask_health(last) == "close"
        assert last.recv(1) == b""  # and the server did close it
    finally:
        for h in held:
            h.close()
        srv.shutdown()
        srv.server_close()
        app.close()


def test_under_gunicorn_with_chunked_uploads(tmp_path, free_port):
    """The production form from the README: gunicorn, two workers, one SQLite file."""
    pytest.importorskip("gunicorn", reason="gunicorn not installed (pip install gunicorn)")
    ini = tmp_path / "c.ini"
    ini.write_text("[collector]\ndb = sqlite:///%s\n[tokens]\nsite7 = %s\n" % (tmp_path / "g.db", TOKEN_A))
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-w", "2", "-b", "127.0.0.1:%d" % free_port,
                             "--chdir", ROOT, "--control-socket", str(tmp_path / "ctl"),
                             'agent.collector:make_app("%s")' % ini],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = "http://127.0.0.1:%d/api/v1/batches" % free_port
    auth = {"Content-Type": "application/json", "Authorization": "Bearer " + TOKEN_A}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get("http://127.0.0.1:%d/health" % free_port, timeout=2)
                break
            except requests.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        body = batch("site7", [data("site7", i) for i in range(20)])
        r = requests.post(url, data=iter([body[:100], body[100:]]), headers=auth, timeout=10)  # chunked
        assert r.json() == {"stored": 20, "duplicates": 0, "max_seq": 19}
        r = requests.post(url, data=gzip.compress(body), headers=dict(auth, **{"Content-Encoding": "gzip"}), timeout=10)
        assert r.json() == {"stored": 0, "duplicates": 20, "max_seq": 19}
        assert requests.post(url, data=iter([b" " * (9 << 20)]), headers=auth, timeout=30).status_code == 413
        assert requests.post(url, data=body, headers=dict(auth, Authorization="Bearer " + TOKEN_B),
                             timeout=10).status_code == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
