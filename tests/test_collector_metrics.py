"""GET /metrics (Prometheus text format) and format=influx (InfluxDB line protocol), each output
read back by a real parser (prometheus_client's, line-protocol-parser's) and by a strict
reading of the format's grammar, with names holding quotes, backslashes, line feeds, commas,
equals signs, spaces and unicode. In-process (wsgiref.validate) on a real SQLite file, and once
over HTTP."""
import io
import json
import math
import re
import sys
import threading

import pytest
import requests

from agent.collector import influx, make_app, rollup
from agent.collector.cli import make_server
from agent.record import encode, utc_timestamp

T0 = 1_795_000_000.0
AGENT = 'site "7"\\north'
DEVICE = 'meter,1 = "a"\\b\n\u00e9\u96fb'
TOKEN = "token-for-the-agent-0123456789"


def _records():
    recs = [{"agent": AGENT, "seq": i, "ts": utc_timestamp(T0 - 100 + i), "device": DEVICE, "unit": 2,
             "values": {"voltage": 230.5 + i, "count": 7 + i, "big": (1 << 64) - 1, "on": i % 2 == 0,
                        "mode": 'run "fast"\\ok\nnext', "nested": {"x": 1}, "nothing": None,
                        "p w=r,1": 1.25},
             "status": "ok"} for i in range(3)]
    recs.append({"agent": AGENT, "seq": 3, "ts": utc_timestamp(T0 - 50), "device": DEVICE, "unit": 2,
                 "values": {"voltage": 1.0}, "status": "ok",
                 "samples": [{"ts": utc_timestamp(T0 - 52), "values": {"voltage": 3.0}},
                             {"ts": utc_timestamp(T0 - 50), "values": {"voltage": 1.0}}]})
    recs.append({"agent": AGENT, "seq": 4, "ts": utc_timestamp(T0 - 40), "device": DEVICE, "unit": 2,
                 "status": "error", "error": {"kind": "timeout", "message": 'no "answer"'}})
    recs.append({"agent": AGENT, "seq": 5, "ts": utc_timestamp(T0 - 30), "kind": "gap", "dropped": 12,
                 "first_seq": 100, "last_seq": 111, "reason": "spool full"})
    recs.append({"agent": AGENT, "seq": 6, "ts": utc_timestamp(T0 - 20), "kind": "health", "device": DEVICE,
                 "unit": 2, "health": {"polls_ok": 5, "exceptions": {"2": 1}, "dead": False, "last_error": None}})
    return recs


class _Client:
    def __init__(self, app):
        from wsgiref.validate import validator

        self.app, self.wsgi = app, validator(app)

    def call(self, method, path, body=b"", qs="", headers=None):
        env = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": qs, "SCRIPT_NAME": "",
               "SERVER_NAME": "test", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
               "REMOTE_ADDR": "127.0.0.1", "wsgi.version": (1, 0), "wsgi.url_scheme": "http",
               "wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr, "wsgi.multithread": True,
               "wsgi.multiprocess": False, "wsgi.run_once": False}
        if method == "POST":
            env["CONTENT_LENGTH"] = str(len(body))
            env["CONTENT_TYPE"] = "application/json"
        for k, v in (headers or {}).items():
            env["HTTP_" + k.upper().replace("-", "_")] = v
        out = {}
        it = self.wsgi(env, lambda s, h, e=None: out.update(status=int(s[:3]), headers=dict(h)))
        try:
            data = b"".join(it)
        finally:
            it.close()
        return out["status"], out["headers"], data


def _body(records, agent=AGENT):
    return encode({"agent": agent, "records": records}).rstrip(b"\n")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    db = tmp_path_factory.mktemp("metrics") / "m.db"
    app = make_app(None, db="sqlite:///%s" % db, clock=lambda: T0, metrics_values=True, stale_after=60.0)
    c = _Client(app)
    st, _, body = c.call("POST", "/api/v1/batches", _body(_records()))
    assert st == 200 and json.loads(body)["stored"] == 7, body
    assert json.loads(c.call("POST", "/api/v1/batches", _body(_records()[:2]))[2])["duplicates"] == 2
    assert c.call("POST", "/api/v1/batches", b'{"agent": "x", "records": [{}]}')[0] == 422
    assert c.call("POST", "/api/v1/batches", b"{")[0] == 400
    old = {"agent": "old", "seq": 0, "ts": utc_timestamp(T0 - 900), "device": "d", "unit": 1,
           "values": {"v": 1}, "status": "ok"}
    app.clock = lambda: T0 - 900                      # a device last heard of 15 minutes ago
    assert c.call("POST", "/api/v1/batches", _body([old], "old"))[0] == 200
    app.clock = lambda: T0
    rollup.drain(app.store)  # rollups = async (the default): the job's work, done now
    yield c
    app.close()


# --- a strict reading of the text exposition format (version 0.0.4) -------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL_VALUE = r'"((?:[^"\\\n]|\\[\\"n])*)"'
_SAMPLE = re.compile(r"^(%s)(?:\{((?:[a-zA-Z_][a-zA-Z0-9_]*=%s)(?:,[a-zA-Z_][a-zA-Z0-9_]*=%s)*)\})? "
                     r"([-+]?(?:[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?|Inf|NaN))$" % (_NAME, _LABEL_VALUE, _LABEL_VALUE))
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)=%s' % _LABEL_VALUE)


def _unescape(v):
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "\\": "\\", '"': '"'}[m.group(1)], v)


def strict_parse(text):
    """{name: {"type", "help", "samples": [(labels, value)]}}; AssertionError on any deviation."""
    assert text.endswith("\n") and "\r" not in text
    fams, current = {}, None
    for n, line in enumerate(text[:-1].split("\n"), 1):
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert name not in fams, "family %s twice (line %d)" % (name, n)
            current = fams[name] = {"help": line.split(" ", 3)[3], "samples": []}
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert current is fams.get(name) and kind in ("counter", "gauge"), line
            current["type"] = kind
        else:
            m = _SAMPLE.match(line)
            assert m, "line %d is not a sample: %r" % (n, line)
            assert m.group(1) in fams and fams[m.group(1)] is current, "sample outside its family: %r" % line
            labels = {k: _unescape(v) for k, v in _LABEL.findall(m.group(2) or "")}
            assert (labels, m.group(1)) not in [(s[0], m.group(1)) for s in current["samples"]], "duplicate " + line
            current["samples"].append((labels, float(m.group(5).replace("Inf", "inf"))))
    return fams


def _metrics(client):
    st, headers, body = client.call("GET", "/metrics")
    assert st == 200 and headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    return body.decode("utf-8")


def _one(fams, name, **labels):
    got = [v for lab, v in fams[name]["samples"] if all(lab.get(k) == v2 for k, v2 in labels.items())]
    assert len(got) == 1, (name, labels, fams[name]["samples"])
    return got[0]


def test_metrics_strict_format_and_values(client):
    fams = strict_parse(_metrics(client))
    assert _one(fams, "modbus_collector_records_stored_total") == 8      # 7 + the old agent's 1
    assert _one(fams, "modbus_collector_records_duplicate_total") == 2
    assert _one(fams, "modbus_collector_batches_total", route="/api/v1/batches") == 3
    assert _one(fams, "modbus_collector_requests_refused_total", status="422") == 1
    assert _one(fams, "modbus_collector_requests_refused_total", status="400") == 1
    assert _one(fams, "modbus_collector_db_up") == 1
    assert _one(fams, "modbus_agent_max_seq", agent=AGENT) == 6            # quotes, backslash: read back
    assert _one(fams, "modbus_agent_gaps_total", agent=AGENT) == 1
    assert _one(fams, "modbus_agent_dropped_records_total", agent=AGENT) == 12
    assert _one(fams, "modbus_agent_last_seen_timestamp_seconds", agent=AGENT) == T0
    assert _one(fams, "modbus_device_fresh", agent=AGENT, device=DEVICE) == 1   # line feed, unicode
    assert _one(fams, "modbus_device_fresh", agent="old", device="d") == 0
    assert _one(fams, "modbus_device_age_seconds", agent="old", device="d") == 900
    assert _one(fams, "modbus_device_failed_readings_total", agent=AGENT, device=DEVICE) == 1
    assert {lab["status"] for lab, _ in fams["modbus_device_last_status"]["samples"]} == {"error", "ok"}
    # metrics_values = yes: every numeric point's last value (the newest ok reading, seq 3)
    assert _one(fams, "modbus_point_value", agent=AGENT, device=DEVICE, point="voltage") == 1.0
    assert {lab["point"] for lab, _ in fams["modbus_point_value"]["samples"] if lab["agent"] == AGENT} == {"voltage"}


def test_metrics_values_of_every_kind_and_off_by_default(tmp_path):
    app = make_app(None, db="sqlite:///%s" % (tmp_path / "v.db"), clock=lambda: T0, metrics_values=True)
    try:
        c = _Client(app)
        assert c.call("POST", "/api/v1/batches", _body(_records()[:1]))[0] == 200
        fams = strict_parse(_metrics(c))
        got = {lab["point"]: v for lab, v in fams["modbus_point_value"]["samples"]}
        assert got == {"voltage": 230.5, "count": 7, "big": float((1 << 64) - 1), "on": 1, "p w=r,1": 1.25}
        app.cfg.metrics_values = False
        assert "modbus_point_value" not in _metrics(c)
    finally:
        app.close()


def test_metrics_parse_with_prometheus_client(client):
    parser = pytest.importorskip("prometheus_client.parser", reason="pip install prometheus_client")
    fams = {f.name: f for f in parser.text_string_to_metric_families(_metrics(client))}
    assert fams["modbus_collector_records_stored"].type == "counter"   # the parser drops _total
    dev = [s for s in fams["modbus_device_fresh"].samples if s.labels["agent"] == AGENT]
    assert dev and dev[0].labels["device"] == DEVICE and dev[0].value == 1
    assert sorted(s.labels["agent"] for s in fams["modbus_agent_max_seq"].samples) == sorted([AGENT, "old"])


def test_metrics_when_the_database_cannot_be_read(tmp_path):
    db = tmp_path / "broken.db"
    app = make_app(None, db="sqlite:///%s" % db, clock=lambda: T0)
    try:
        c = _Client(app)
        assert c.call("POST", "/api/v1/batches", _body(_records()[:1]))[0] == 200
        app.store.close()
        for suffix in ("", "-wal", "-shm"):
            if (tmp_path / ("broken.db" + suffix)).exists():
                (tmp_path / ("broken.db" + suffix)).unlink()
        db.write_bytes(b"this is not a database" * 500)
        fams = strict_parse(_metrics(c))
        assert _one(fams, "modbus_collector_db_up") == 0
        assert _one(fams, "modbus_collector_db_errors_total") == 1
        assert fams["modbus_agent_max_seq"]["samples"] == []
        assert _one(fams, "modbus_collector_records_stored_total") == 1   # this process's counters stay
    finally:
        app.close()


def test_metrics_needs_the_read_token(tmp_path):
    app = make_app(None, db="sqlite:///%s" % (tmp_path / "t.db"), read_token="read-token-0123456789")
    try:
        c = _Client(app)
        assert c.call("GET", "/metrics")[0] == 401
        assert c.call("GET", "/metrics", headers={"Authorization": "Bearer read-token-0123456789"})[0] == 200
    finally:
        app.close()


def test_metrics_values_config_key(tmp_path):
    from agent.collector.config import ConfigError, load_config

    p = tmp_path / "c.ini"
    p.write_text("[collector]\nmetrics_values = yes\n")
    assert load_config(str(p)).metrics_values is True
    assert load_config(None).metrics_values is False
    p.write_text("[collector]\nmetrics_values = maybe\n")
    with pytest.raises(ConfigError, match=r"c.ini:2: \[collector\] metrics_values: expected yes or no"):
        load_config(str(p))


# --- InfluxDB line protocol ------------------------------------------------------------------------

def _influx(client, qs="format=influx"):
    st, headers, body = client.call("GET", "/api/v1/records", qs=qs)
    assert st == 200 and headers["Content-Type"] == "text/plain; charset=utf-8"
    return body.decode("utf-8")


def test_influx_records_parse_with_a_real_line_protocol_parser(client):
    lpp = pytest.importorskip("line_protocol_parser", reason="pip install line-protocol-parser")
    text = _influx(client, "format=influx&agent=" + requests.utils.quote(AGENT))
    lines = text.rstrip("\n").split("\n")
    parsed = [lpp.parse_line(line) for line in lines]
    data = [p for p in parsed if p["measurement"] == "modbus" and "error" not in p["fields"]]
    assert len(data) == 5          # 3 readings + the buffered record's 2 samples
    first = data[0]
    assert first["tags"] == {"agent": AGENT, "device": DEVICE.replace("\n", " "), "unit": "2", "status": "ok"}
    assert first["fields"] == {"voltage": 230.5, "count": 7, "big": float((1 << 64) - 1), "on": True,
                               "mode": 'run "fast"\\ok\\nnext', "p w=r,1": 1.25}
    assert type(first["fields"]["count"]) is int and type(first["fields"]["voltage"]) is float
    assert first["time"] == int(T0 - 100) * 10 ** 9
    assert [p["fields"]["voltage"] for p in data[3:]] == [3.0, 1.0]             # samples, in order
    assert [p["time"] for p in data[3:]] == [int(T0 - 52) * 10 ** 9, int(T0 - 50) * 10 ** 9]
    err = [p for p in parsed if "error" in p["fields"]]
    assert err[0]["fields"] == {"error": 'no "answer"'} and err[0]["tags"]["status"] == "error"
    gap = [p for p in parsed if p["measurement"] == "modbus_gap"][0]
    assert gap["fields"] == {"dropped": 12, "first_seq": 100, "last_seq": 111, "seq": 5}
    health = [p for p in parsed if p["measurement"] == "modbus_health"][0]
    assert health["fields"] == {"polls_ok": 5, "exceptions_2": 1, "dead": False}


def test_influx_line_escaping_round_trips():
    lpp = pytest.importorskip("line_protocol_parser", reason="pip install line-protocol-parser")
    nasty = ['a b', 'a,b', 'a=b', 'a\\', '\\,\\ \\=', '"q"', '\u00e9\u96fb', "x\ny", "tab\there"]
    for s in nasty:
        text = influx.line("m %s,x" % s, {"t": s, s: "v"}, {s: s, "n": 1.5}, 10 ** 18)
        p = lpp.parse_line(text)
        clean = re.sub(r"\\(?=[,= ]|$)", "\u29f5", s.replace("\n", " "))  # see influx._LONE_BACKSLASH
        assert p["measurement"] == re.sub(r"\\(?=[,= ]|$)", "\u29f5", ("m %s,x" % s).replace("\n", " "))
        assert p["tags"] == {"t": clean, clean: "v"}
        assert p["fields"] == {clean: s.replace("\n", "\\n"), "n": 1.5}
        assert p["time"] == 10 ** 18
    assert influx.line("m", {"t": ""}, {"x": None, "y": float("nan"), "z": [1]}, None) is None
    assert influx.line("m", {"t": ""}, {"x": 1}, None) == "m x=1i"     # an empty tag is left out


def test_influx_series_points_for_the_series_route():
    lpp = pytest.importorskip("line_protocol_parser", reason="pip install line-protocol-parser")
    buckets = [{"t": utc_timestamp(T0 + 60 * k), "count": 6, "min": 1.0, "max": 2.5, "avg": 1.75, "last": 2.0}
               for k in range(2)]
    lines = list(influx.influx_lines(influx.series_points(AGENT, DEVICE, "voltage", buckets, level="1m")))
    p = lpp.parse_line(lines[1])
    assert p["measurement"] == "modbus_series" and p["tags"]["point"] == "voltage" and p["tags"]["level"] == "1m"
    assert p["fields"] == {"count": 6, "min": 1.0, "max": 2.5, "avg": 1.75, "last": 2.0}
    assert p["time"] == int(T0 + 60) * 10 ** 9


def test_influx_format_over_http_streams_every_record(tmp_path):
    lpp = pytest.importorskip("line_protocol_parser", reason="pip install line-protocol-parser")
    app = make_app(None, db="sqlite:///%s" % (tmp_path / "h.db"))
    srv = make_server("127.0.0.1", 0, app)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = "http://127.0.0.1:%d" % srv.server_address[1]
    try:
        recs = [{"agent": "a", "seq": i, "ts": utc_timestamp(T0 + i), "device": "m", "unit": 1,
                 "values": {"v": i * 0.5}, "status": "ok"} for i in range(2500)]   # several export pages
        r = requests.post(url + "/api/v1/batches", data=_body(recs, "a"), timeout=10,
                          headers={"Content-Type": "application/json"})
        assert r.json()["stored"] == 2500
        r = requests.get(url + "/api/v1/records", params={"format": "influx"}, timeout=10)
        got = [lpp.parse_line(line) for line in r.text.splitlines()]
        assert [p["fields"]["v"] for p in got] == [i * 0.5 for i in range(2500)]
        assert requests.get(url + "/api/v1/records", params={"format": "xml"}, timeout=10).status_code == 400
    finally:
        srv.shutdown()
        srv.server_close()
        app.close()


def test_number_text_is_what_prometheus_reads():
    from agent.collector.metrics import escape_label, number

    assert [number(v) for v in (True, 3, 0.1, math.inf, -math.inf)] == ["1", "3", "0.1", "+Inf", "-Inf"]
    assert number(math.nan) == "NaN"
    assert escape_label('a\\b"c\nd') == 'a\\\\b\\"c\\nd'


def test_influx_format_on_the_series_route(client):
    lpp = pytest.importorskip("line_protocol_parser", reason="pip install line-protocol-parser")
    qs = "agent=%s&device=%s&point=voltage&since=%s&until=%s&step=60" % (
        requests.utils.quote(AGENT), requests.utils.quote(DEVICE), utc_timestamp(T0 - 3600), utc_timestamp(T0))
    st, _, body = client.call("GET", "/api/v1/series", qs=qs)
    assert st == 200, body
    buckets = json.loads(body)["buckets"]
    assert buckets and buckets[0]["count"] == 5     # 3 readings and the buffered record's 2 samples
    text = _influx_series(client, qs + "&format=influx")
    got = [lpp.parse_line(line) for line in text.splitlines()]
    assert [p["time"] for p in got] == [influx.ts_ns(b["t"]) for b in buckets]
    assert [p["fields"] for p in got] == [{k: b[k] for k in ("count", "min", "max", "avg", "last")} for b in buckets]
    assert got[0]["tags"] == {"agent": AGENT, "device": DEVICE.replace("\n", " "), "point": "voltage", "level": "1m"}
    one = [lpp.parse_line(line) for line in _influx_series(client, qs + "&format=influx&agg=max").splitlines()]
    assert [p["fields"] for p in one] == [{"max": b["max"]} for b in buckets]


def _influx_series(client, qs):
    st, headers, body = client.call("GET", "/api/v1/series", qs=qs)
    assert st == 200 and headers["Content-Type"] == "text/plain; charset=utf-8", body
    return body.decode("utf-8")
