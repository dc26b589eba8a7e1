"""The uploader against a real HTTP server on 127.0.0.1 that fails on cue: down, 500, 413, 400,
connection reset mid-request, slow. The server deduplicates by seq like the real collector and
counts the duplicates it saw: every record must arrive exactly once in its store."""
import gzip
import json
import logging
import re
import socket
import ssl
import struct
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agent.record import data_record
from agent.spool import QUARANTINE, Spool
from agent.upload import Uploader

AGENT = "site7"
T0 = 1_795_000_000.0
FAST = dict(backoff_max=0.02, timeout=5.0)


class Collector:
    """Store keyed by seq; behaviour for the next requests set by `cues`."""

    def __init__(self, port=0, token=None, max_records=None, max_body=None, reject=None,
                 slow=1.0, tls=None):
        self.stored = {}
        self.duplicates = 0
        self.requests = 0
        self.connections = 0
        self.cues = []
        self.token = token
        self.max_records = max_records
        self.max_body = max_body
        self.reject = reject
        self.slow = slow
        self.per_record = 0.0
        self.headers = []
        self.lock = threading.Lock()
        coll = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True    # headers and body are two writes: no 40 ms delayed-ACK stalls

            def setup(self):
                with coll.lock:
                    coll.connections += 1
                super().setup()

            def log_message(self, *a):
                pass

            def answer(self, code, obj):
                out = json.dumps(obj).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(out)))
                    self.end_headers()
                    self.wfile.write(out)
                except OSError:     # the client gave up (timeout): what a slow collector sees
                    self.close_connection = True

            def reset(self):
                # RST instead of FIN: what a crashed collector or a middlebox looks like.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True

            def do_POST(self):
                with coll.lock:
                    coll.requests += 1
                    cue = coll.cues.pop(0) if coll.cues else None
                    coll.headers.append(dict(self.headers))
                n = int(self.headers["Content-Length"])
                if cue == "reset":
                    self.rfile.read(n // 2)
                    return self.reset()
                body = self.rfile.read(n)
                if cue == "500":
                    return self.answer(500, {"error": "database is locked", "where": "store"})
                if cue == "bad_agent":
                    return self.answer(400, {"error": "agent id not allowed", "where": "$.agent"})
                if cue == "portal":     # a captive portal: 200 and a web page, nothing stored
                    out = b"<html><body>Please accept the terms of use</body></html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(out)))
                    self.end_headers()
                    self.wfile.write(out)
                    return None
                if cue == "redirect":
                    self.send_response(302)
                    self.send_header("Location", "http://portal.example/login")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                if coll.token and self.headers.get("Authorization") != "Bearer %s" % coll.token:
                    return self.answer(401, {"error": "bad token", "where": "Authorization"})
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                doc = json.loads(body)
                recs = doc["records"]
                assert doc["agent"] == AGENT
                if coll.max_records and len(recs) > coll.max_records:
                    return self.answer(413, {"error": "too many records", "where": "records"})
                if coll.max_body and len(body) > coll.max_body:
                    return self.answer(413, {"error": "body too large", "where": "body"})
                if coll.reject:
                    for i, r in enumerate(recs):
                        if coll.reject(r):
                            return self.answer(400, {"error": "value out of range", "where": "$.records[%d].values" % i})
                with coll.lock:
                    stored = dups = 0
                    for r in recs:
                        if r["seq"] in coll.stored:
                            dups += 1
                            assert coll.stored[r["seq"]] == r, "same seq, different record"
                        else:
                            coll.stored[r["seq"]] = r
                            stored += 1
                    coll.duplicates += dups
                if cue == "store_then_reset":       # stored, but the answer never arrives
                    return self.reset()
                if cue == "slow":
                    time.sleep(coll.slow)
                if coll.per_record:             # a slow link or a busy database: time grows with size
                    time.sleep(coll.per_record * len(recs))
                self.answer(200, {"stored": stored, "duplicates": dups, "max_seq": max(coll.stored)})

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_port
        self.url = "%s://127.0.0.1:%d/api/v1/batches" % ("https" if tls else "http", self.port)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def collector():
    made = []

    def make(**kw):
        c = Collector(**kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def fill(tmp_path, n, **kw):
    sp = Spool(tmp_path / "spool", AGENT, **kw)
    for i in range(n):
        sp.append(data_record(AGENT, T0 + i, "meter1", 1, {"v": 230.0 + i / 10, "i": i}))
    return sp


def pump(up, sp, rounds=400):
    """What the loop does: drain in slices; while backing off, wait a little."""
    results = []
    for _ in range(rounds):
        res = up.drain(sp, time.monotonic() + 10)
        results.append(res["status"])
        if sp.stats()["records"] == 0:
            return results
        if res["status"] == "backoff":
            time.sleep(0.01)
    raise AssertionError("spool not drained: %r, %r" % (sp.stats(), up.state()))


def assert_exactly_once(coll, n):
    assert sorted(coll.stored) == list(range(1, n + 1)), "lost or unexpected seqs"
    for seq, r in coll.stored.items():
        assert r["values"]["i"] == seq - 1 and r["agent"] == AGENT


def test_every_record_arrives_exactly_once_through_faults(tmp_path, collector, caplog):
    coll = collector(slow=1.0)
    coll.cues = [None, "500", None, "reset", "store_then_reset", None, "slow", "500", None]
    sp = fill(tmp_path, 1000)
    up = Uploader(coll.url, AGENT, batch_max_records=100, backoff_max=0.02, timeout=0.3)
    pump(up, sp)
    assert_exactly_once(coll, 1000)
    # The batches whose answer was lost (stored then reset; too slow) were sent again: the
    # collector saw them twice and kept them once.
    assert coll.duplicates == 200
    st = up.state()
    assert st["failures_total"] == 5 and st["consecutive_failures"] == 0
    assert st["sent_total"] == 1000 and st["duplicates_total"] == 200
    warnings = [r.getMessage() for r in caplog.records if r.name == "agent.upload" and r.levelno == logging.WARNING]
    assert len(warnings) == 5 and all("\n" not in w for w in warnings)
    assert sum("HTTP 500: database is locked" in w for w in warnings) == 2
    assert sum("ReadTimeout" in w for w in warnings) == 1
    assert sum("ConnectionError" in w for w in warnings) == 2
    assert sp.stats()["quarantined"] == 0
    sp.close()


@pytest.mark.parametrize("use_gzip", [True, False])
def test_wire_format_keepalive_and_token(tmp_path, collector, use_gzip, caplog):
    coll = collector(token="s3cret-t0ken")
    sp = fill(tmp_path, 250)
    up = Uploader(coll.url, AGENT, token="s3cret-t0ken", batch_max_records=50, gzip=use_gzip, **FAST)
    caplog.set_level(logging.DEBUG)
    res = up.drain(sp, time.monotonic() + 10)
    assert res == {"status": "empty", "sent": 250, "batches": 5, "quarantined": 0}
    assert_exactly_once(coll, 250)
    h = coll.headers[0]
    assert h["Content-Type"] == "application/json"
    assert h.get("Content-Encoding") == ("gzip" if use_gzip else None)
    assert h["Authorization"] == "Bearer s3cret-t0ken"
    assert coll.connections == 1                        # one keep-alive connection for all batches
    assert "s3cret" not in caplog.text
    sp.close()


def test_wrong_token_backs_off_and_quarantines_nothing(tmp_path, collector, caplog):
    coll = collector(token="right")
    sp = fill(tmp_path, 30)
    up = Uploader(coll.url, AGENT, token="wrong-secret", **FAST)
    res = up.drain(sp, time.monotonic() + 10)
    assert res["status"] == "backoff" and res["sent"] == 0
    assert sp.stats()["records"] == 30 and sp.stats()["quarantined"] == 0
    assert "401" in up.state()["last_error"] and "bad token" in up.state()["last_error"]
    assert "wrong-secret" not in caplog.text
    up = Uploader(coll.url, AGENT, token="right", **FAST)
    pump(up, sp)
    assert_exactly_once(coll, 30)
    sp.close()


def test_413_splits_down_and_remembers_the_limit(tmp_path, collector):
    coll = collector(max_records=7)
    sp = fill(tmp_path, 200)
    up = Uploader(coll.url, AGENT, batch_max_records=100, **FAST)
    res = up.drain(sp, time.monotonic() + 10)
    assert res["status"] == "empty" and res["quarantined"] == 0
    assert_exactly_once(coll, 200)
    assert up.state()["batch_limit"] <= 7
    assert coll.duplicates == 0
    sp.close()


def test_single_record_still_413_is_quarantined(tmp_path, collector):
    coll = collector(max_body=1500)
    sp = Spool(tmp_path / "spool", AGENT)
    for i in range(20):
        values = {"i": i, "blob": "x" * (2000 if i == 11 else 10)}
        sp.append(data_record(AGENT, T0 + i, "meter1", 1, values))
    up = Uploader(coll.url, AGENT, batch_max_records=20, gzip=False, **FAST)
    res = up.drain(sp, time.monotonic() + 10)
    assert res["status"] == "empty" and res["quarantined"] == 1
    assert sorted(coll.stored) == [s for s in range(1, 21) if s != 12]
    q = [json.loads(x) for x in (tmp_path / "spool" / QUARANTINE).read_bytes().splitlines()]
    assert [x["record"]["seq"] for x in q] == [12]
    assert "413" in q[0]["reason"]
    sp.close()


def test_400_quarantines_only_the_bad_records_and_goes_on(tmp_path, collector):
    bad = {13, 57, 58}
    coll = collector(reject=lambda r: r["values"]["i"] in bad)
    sp = fill(tmp_path, 100)
    up = Uploader(coll.url, AGENT, batch_max_records=100, **FAST)
    res = up.drain(sp, time.monotonic() + 10)
    assert res["status"] == "empty" and res["quarantined"] == 3
    assert sorted(coll.stored) == [s for s in range(1, 101) if s - 1 not in bad]
    q = [json.loads(x) for x in (tmp_path / "spool" / QUARANTINE).read_bytes().splitlines()]
    assert sorted(x["record"]["values"]["i"] for x in q) == sorted(bad)
    assert all(x["reason"] == "HTTP 400: value out of range (where: $.records[0].values)" for x in q)
    assert sp.stats()["records"] == 0 and sp.stats()["quarantined"] == 3
    sp.close()


def test_request_level_rejection_backs_off_instead_of_quarantining(tmp_path, collector):
    coll = collector()
    coll.cues = ["bad_agent", "bad_agent"]
    sp = fill(tmp_path, 50)
    up = Uploader(coll.url, AGENT, **FAST)
    assert up.drain(sp, time.monotonic() + 10)["status"] == "backoff"
    assert "agent id not allowed (where: $.agent)" in up.state()["last_error"]
    pump(up, sp)
    assert_exactly_once(coll, 50)
    assert sp.stats()["quarantined"] == 0
    sp.close()


def test_collector_down_then_up(tmp_path, free_port, collector):
    sp = fill(tmp_path, 120)
    up = Uploader("http://127.0.0.1:%d/api/v1/batches" % free_port, AGENT, batch_max_records=50,
                  backoff_max=0.3, timeout=2.0)
    res = up.drain(sp, time.monotonic() + 10)
    assert res["status"] == "backoff" and res["sent"] == 0
    st = up.state()
    assert st["failures_total"] == 1 and "ConnectionError" in st["last_error"] and st["backoff_until"]
    # While backing off, drain returns at once without touching the network.
    assert up.drain(sp, time.monotonic() + 10)["status"] == "backoff"
    assert up.state()["failures_total"] == 1
    coll = collector(port=free_port)
    pump(up, sp)
    assert_exactly_once(coll, 120)
    assert up.state()["backoff_until"] is None
    sp.close()


def test_backoff_grows_exponentially_up_to_the_cap(tmp_path, free_port):
    sp = fill(tmp_path, 5)
    up = Uploader("http://127.0.0.1:%d/api/v1/batches" % free_port, AGENT, backoff_max=8.0, timeout=1.0)
    delays = []
    for _ in range(7):
        up._backoff_until = 0.0                  # skip the wait itself; measure what was chosen
        t = time.monotonic()
        up.drain(sp, t + 10)
        delays.append(up._backoff_until - t)
    for k, d in enumerate(delays):
        want = min(8.0, 2.0 ** k)
        assert 0.5 * want - 0.05 <= d <= want + 0.5, (k, delays)
    assert sp.stats()["records"] == 5
    sp.close()


def test_deadline_caps_the_request_timeout(tmp_path, collector):
    coll = collector(slow=3.0)
    coll.cues = ["slow"]
    sp = fill(tmp_path, 10)
    up = Uploader(coll.url, AGENT, timeout=30.0, backoff_max=0.02)
    # No time left: no request at all.
    assert up.drain(sp, time.monotonic() + 0.05)["status"] == "deadline"
    assert coll.requests == 0
    res = up.drain(sp, time.monotonic() + 0.8)
    assert res["status"] == "backoff"
    m = re.search(r"read timeout=([0-9.]+)", up.state()["last_error"])
    assert m and float(m.group(1)) <= 0.8, up.state()["last_error"]
    pump(up, sp)
    assert_exactly_once(coll, 10)
    sp.close()


def test_timeouts_shrink_the_batches_until_they_fit(tmp_path, collector):
    coll = collector()
    coll.per_record = 0.002           # 400 records: 0.8 s, more than a slice; 200: 0.4 s
    sp = fill(tmp_path, 400)
    up = Uploader(coll.url, AGENT, batch_max_records=500, backoff_max=0.02, timeout=10.0)
    for _ in range(100):
        up.drain(sp, time.monotonic() + 0.6)    # the loop's slices between polls
        if sp.stats()["records"] == 0:
            break
        time.sleep(0.01)
    assert sorted(coll.stored) == list(range(1, 401))
    assert up.state()["batch_limit"] <= 200
    sp.close()


def test_reset_mid_request_then_500_then_ok(tmp_path, collector):
    coll = collector()
    coll.cues = ["reset", "reset", "500"]
    sp = fill(tmp_path, 40)
    up = Uploader(coll.url, AGENT, batch_max_records=40, **FAST)
    statuses = pump(up, sp)
    assert statuses.count("backoff") >= 3
    assert_exactly_once(coll, 40)
    assert coll.duplicates == 0 and up.state()["failures_total"] == 3
    sp.close()


def test_captive_portal_and_redirect_acknowledge_nothing(tmp_path, collector):
    coll = collector()
    coll.cues = ["portal", "redirect"]
    sp = fill(tmp_path, 30)
    up = Uploader(coll.url, AGENT, **FAST)
    assert up.drain(sp, time.monotonic() + 10)["status"] == "backoff"
    assert "captive portal" in up.state()["last_error"] and sp.stats()["records"] == 30
    time.sleep(0.05)
    assert up.drain(sp, time.monotonic() + 10)["status"] == "backoff"
    assert "redirect to http://portal.example/login" in up.state()["last_error"]
    assert sp.stats()["records"] == 30 and coll.stored == {}
    pump(up, sp)
    assert_exactly_once(coll, 30)
    sp.close()


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    key, crt = str(d / "key.pem"), str(d / "cert.pem")
    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", key, "-out", crt, "-days", "1", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip("openssl cannot make a test certificate: %s" % e)
    return crt, key


def test_tls_verified_by_default_and_ca_file(tmp_path, collector, cert):
    coll = collector(tls=cert)
    sp = fill(tmp_path, 20)
    up = Uploader(coll.url, AGENT, **FAST)
    res = up.drain(sp, time.monotonic() + 10)
    assert res["status"] == "backoff" and "SSLError" in up.state()["last_error"]
    assert coll.stored == {}
    up = Uploader(coll.url, AGENT, ca_file=cert[0], **FAST)
    pump(up, sp)
    assert_exactly_once(coll, 20)
    sp.close()


def test_against_the_real_collector(tmp_path):
    """The collector of agent/collector (SQLite, its own keep-alive server) as the peer."""
    collector_mod = pytest.importorskip("agent.collector")
    from agent.collector.cli import make_server

    db = tmp_path / "c.db"
    app = collector_mod.make_app(None, db="sqlite:///%s" % db, tokens={AGENT: "tok"}, max_records=64)
    srv = make_server("127.0.0.1", 0, app)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        sp = fill(tmp_path, 600)
        url = "http://127.0.0.1:%d/api/v1/batches" % srv.server_address[1]
        up = Uploader(url, AGENT, token="tok", batch_max_records=200, **FAST)
        # A batch stored but whose answer was lost (not acknowledged): it goes again below.
        code, _, answer = up._post(sp.peek(50, 1 << 20), 5.0)
        assert code == 200 and answer["stored"] == 50
        pump(up, sp)
        st = up.state()
        # 200 records per batch is over the collector's max_records (64): its 4xx makes the
        # uploader split, and nothing is quarantined.
        assert st["quarantined_total"] == 0 and st["sent_total"] == 600 and st["duplicates_total"] == 50
        sp.close()
        import sqlite3

        with sqlite3.connect(str(db)) as con:
            seqs = [r[0] for r in con.execute("SELECT seq FROM records WHERE agent=? ORDER BY seq", (AGENT,))]
        assert seqs == list(range(1, 601))
    finally:
        srv.shutdown()
        srv.server_close()
        close = getattr(app, "close", None)
        if close:
            close()
