"""The uploader against a real HTTP server on 127.0.0.1 that fails on cue: down, 500, 413, 400,
connection reset mid-request, slow. The server deduplicates by seq like the real collector and
counts the duplicates it saw: every record must arrive exactly once in its store."""
import gzip
import json
import logging
import os
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
from agent.spool import Spool
from agent.upload import Uploader
from agent.upload.quarantine import FALLBACK as QUARANTINE

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
        self.reject_message = "value out of range"
        self.slow = slow
        self.per_record = 0.0
        self.location = "http://portal.example/login"     # where the "redirect" cue points
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
                if cue == "record_agent":   # what the collector says when a record's agent differs
                    return self.answer(422, {"error": "must equal the batch's agent 'x'",
                                             "where": "$.records[0].agent"})
                if cue == "html400":        # nginx/a WAF in front of the collector, not the collector
                    out = b"<html>\r\n<head><title>400 The plain HTTP request was sent to HTTPS port</title>"
                    self.send_response(400)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(out)))
                    self.end_headers()
                    self.wfile.write(out)
                    return None
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
                    self.send_header("Location", coll.location)
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
                            return self.answer(400, {"error": coll.reject_message,
                                                     "where": "$.records[%d].values" % i})
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


def quarantined(up, sp):
    """Records the uploader quarantined: its count, checked against the lines of the quarantine
    file it wrote (agent.upload.quarantine; by default in the spool's directory)."""
    n = 0
    for name in (QUARANTINE, QUARANTINE + ".1"):
        try:
            with open(os.path.join(str(sp.directory), name), "rb") as f:
                n += len(f.read().splitlines())
        except FileNotFoundError:
            pass
    assert up.state()["quarantined_total"] == n
    return n



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
    assert sum("TotalTimeout" in w and "timeout = 0.3s" in w for w in warnings) == 1   # the slow answer
    assert sum("ConnectionError" in w for w in warnings) == 2
    assert quarantined(up, sp) == 0
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
    assert sp.stats()["records"] == 30 and quarantined(up, sp) == 0
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
    assert sp.stats()["records"] == 0 and quarantined(up, sp) == 3
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
    assert quarantined(up, sp) == 0
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


def test_a_started_request_runs_to_its_timeout_not_to_the_deadline(tmp_path, collector):
    """The deadline (the next poll) decides whether a request STARTS; a started one runs to the
    configured timeout. Cut at the deadline, a collector slower than the gap stores every batch
    and never gets to acknowledge one (review r5)."""
    coll = collector(slow=1.2)
    coll.cues = ["slow"]
    sp = fill(tmp_path, 10)
    up = Uploader(coll.url, AGENT, timeout=30.0, backoff_max=0.02)
    # No time left (less than the prior a first request is given): no request at all.
    assert up.drain(sp, time.monotonic() + 0.005)["status"] == "deadline"
    assert coll.requests == 0
    res = up.drain(sp, time.monotonic() + 0.3)
    assert (res["sent"], res["batches"], res["quarantined"]) == (10, 1, 0)
    assert sp.stats()["records"] == 0
    st = up.state()
    assert st["failures_total"] == 0 and st["last_error"] is None and st["batch_limit"] == 500
    assert coll.requests == 1 and coll.duplicates == 0
    assert_exactly_once(coll, 10)
    sp.close()


def test_a_request_starts_only_when_the_estimate_fits_and_one_slow_answer_never_starves(tmp_path, collector):
    """After an answer that took 0.6 s, a 0.35 s gap starts no request (it would make the poll
    late), and no timeout halves the batch (review r5b). Gaps left unused (at least half the
    estimate) age the measurements, so a one-off slow answer does not keep the upload idle for
    good."""
    coll = collector(slow=0.6)
    coll.cues = ["slow"]
    sp = fill(tmp_path, 30)
    up = Uploader(coll.url, AGENT, batch_max_records=10, timeout=30.0, backoff_max=0.02)
    first = up.drain(sp, time.monotonic() + 0.35)
    assert first["sent"] == 10 and first["status"] == "deadline"
    assert up.state()["request_time"] > 0.35 and coll.requests == 1
    starts = []
    for _ in range(20):
        res = up.drain(sp, time.monotonic() + 0.35)
        starts.append(res["batches"])
        if res["batches"]:
            break
    assert starts[0] == 0 and starts[-1] >= 1, starts          # skipped first, then tried again
    pump(up, sp)
    assert_exactly_once(coll, 30)
    st = up.state()
    assert st["failures_total"] == 0 and st["batch_limit"] == 10
    sp.close()


def test_configured_timeouts_shrink_the_batches_until_they_fit(tmp_path, collector):
    coll = collector()
    coll.per_record = 0.002           # 400 records: 0.8 s, more than the timeout; 200: 0.4 s
    sp = fill(tmp_path, 400)
    up = Uploader(coll.url, AGENT, batch_max_records=500, backoff_max=0.02, timeout=0.6)
    pump(up, sp)
    assert sorted(coll.stored) == list(range(1, 401))
    st = up.state()
    assert st["batch_limit"] <= 200
    assert "TotalTimeout" in st["last_error"] and "timeout = 0.6s" in st["last_error"]   # the configured one
    sp.close()


def syn_black_hole():
    """A listening socket whose accept queue is full: Linux drops further SYNs, so a connect
    hangs as it does to a collector behind a dead route or a firewall that drops."""
    bh = socket.socket()
    bh.bind(("127.0.0.1", 0))
    bh.listen(0)
    held = []
    for _ in range(4):
        try:
            held.append(socket.create_connection(bh.getsockname(), timeout=0.3))
        except OSError:
            return bh, held
    for s in held + [bh]:
        s.close()
    pytest.skip("every connect was accepted: no SYN black hole on this kernel")


class SilentCollector:
    """Accepts connections and never answers: a hung collector, or a NAT that lost the flow."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.05)
        self.conns = []
        self.stop = False
        self.url = "http://127.0.0.1:%d/api/v1/batches" % self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stop:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                pass

    def close(self):
        self.stop = True
        self.thread.join()
        for c in self.conns + [self.sock]:
            c.close()


def wait_backoff(up):
    at = up.retry_at()
    while at is not None:
        time.sleep(max(at - time.monotonic(), 0.0))
        at = up.retry_at()


def test_a_black_holed_connect_is_bounded_by_the_gap_and_teaches_the_estimate(tmp_path):
    """Review r6: a SYN nobody answers blocked the poll for the whole [upload] timeout at every
    retry. The connect phase (nothing sent yet) ends with the gap; the time it took becomes the
    estimate, so the next gap of that size starts nothing and a later one tries again."""
    bh, held = syn_black_hole()
    sp = fill(tmp_path, 10)
    up = Uploader("http://127.0.0.1:%d/api/v1/batches" % bh.getsockname()[1], AGENT, timeout=5.0,
                  backoff_max=0.02)
    try:
        res = up.drain(sp, time.monotonic() + 0.4)
        st = up.state()
        assert res["status"] == "backoff" and st["failures_total"] == 1 and "ConnectTimeout" in st["last_error"]
        bound = float(re.search(r"connect timeout=([0-9.]+)", st["last_error"]).group(1))
        assert bound <= 0.4
        assert st["batch_limit"] == 500                # nothing was sent: no reason to halve the batch
        assert up.request_time() >= bound
        statuses = []
        for _ in range(6):
            wait_backoff(up)
            res = up.drain(sp, time.monotonic() + 0.39)   # a shade shorter: the floor is the time the first took, ~0.4 s
            statuses.append(res["status"])
            if res["status"] == "backoff":
                break
        assert statuses[0] == "deadline" and statuses[-1] == "backoff", statuses
        st = up.state()
        assert st["failures_total"] == 2 and float(re.search(r"connect timeout=([0-9.]+)",
                                                              st["last_error"]).group(1)) <= 0.4
        assert sp.stats()["records"] == 10
    finally:
        for s in held + [bh]:
            s.close()
        sp.close()


def test_a_hung_collector_costs_one_overrun_then_waits_for_a_gap_as_long(tmp_path):
    """Review r6: a collector that accepts and never answers made every retry run to the whole
    timeout in any 0.3 s gap (only answered requests fed the estimate). Now a request without an
    answer raises the estimate to the time it took: the gaps after it start nothing until the
    estimate has decayed (gaps of 0.6 s, at least half of it, age it), then one gap tries again;
    gaps of 0.3 s, less than half, never do (the loop's starvation rule is for those)."""
    silent = SilentCollector()
    sp = fill(tmp_path, 10)
    up = Uploader(silent.url, AGENT, timeout=1.0, backoff_max=0.02)
    try:
        res = up.drain(sp, time.monotonic() + 0.3)
        st = up.state()
        assert res["status"] == "backoff" and "timeout = 1s" in st["last_error"]    # ran to its timeout
        assert up.request_time() >= 1.0
        wait_backoff(up)
        assert [up.drain(sp, time.monotonic() + 0.3)["status"] for _ in range(8)] == ["deadline"] * 8
        assert up.request_time() >= 1.0
        statuses = []
        for _ in range(12):
            wait_backoff(up)
            res = up.drain(sp, time.monotonic() + 0.6)
            statuses.append(res["status"])
        tries = statuses.count("backoff")
        assert statuses[:4] == ["deadline"] * 4 and 1 <= tries <= 2, statuses
        assert up.state()["failures_total"] == 1 + tries and sp.stats()["records"] == 10
    finally:
        silent.close()
        sp.close()


def test_a_resend_after_a_late_answer_is_not_taken_for_seq_reuse(tmp_path, collector, caplog):
    """Review r6: a batch stored but answered after the timeout is resent halved; its first half
    is all duplicates below the collector's max_seq, which is this agent's own last post, not a
    restarted seq. No ERROR, nothing counted."""
    coll = collector(slow=1.0)
    coll.cues = ["slow"]
    sp = fill(tmp_path, 0)
    up = Uploader(coll.url, AGENT, batch_max_records=100, timeout=0.5, backoff_max=0.02)
    assert up.drain(sp, time.monotonic() + 10)["status"] == "empty"    # the first gap: nothing spooled yet
    for i in range(100):
        sp.append(data_record(AGENT, T0 + i, "meter1", 1, {"i": i}))
    pump(up, sp)
    st = up.state()
    assert "TotalTimeout" in st["last_error"] and st["batch_limit"] == 50
    assert st["duplicates_total"] == 100 and st["seq_reuse_suspected"] == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert sorted(coll.stored) == list(range(1, 101))
    sp.close()


def test_a_resend_after_a_restart_with_a_lagging_cursor_is_not_taken_for_seq_reuse(tmp_path, collector, caplog):
    """After a crash the cursor lags what the collector stored, and the batches need not fall on
    the same boundaries: every seq resent is one the spool had written, so no alarm."""
    coll = collector()
    sp = fill(tmp_path, 100)
    assert Uploader(coll.url, AGENT, **FAST)._post(sp.peek(100, 1 << 20))[0] == 200   # stored, never acked
    sp.close()
    sp = Spool(tmp_path / "spool", AGENT)                    # the next process
    up = Uploader(coll.url, AGENT, batch_max_records=30, **FAST)
    assert up.drain(sp, time.monotonic() + 20)["sent"] == 100
    st = up.state()
    assert st["duplicates_total"] == 100 and st["seq_reuse_suspected"] == 0 and st["last_max_seq"] == 100
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    sp.close()


def test_the_urls_credentials_never_reach_the_log_or_the_state(tmp_path, collector, caplog):
    """Review r6: the failure WARNING and the "reachable again" line logged the raw url."""
    coll = collector()
    coll.cues = ["500", "redirect"]
    coll.location = "http://portal:pw0rd@portal.example/login"
    sp = fill(tmp_path, 5)
    up = Uploader(coll.url.replace("http://", "http://site7:s3cr@t-pass@"), AGENT, **FAST)
    with caplog.at_level(logging.INFO, logger="agent.upload"):
        pump(up, sp)
    text = "\n".join(r.getMessage() for r in caplog.records) + json.dumps(up.state())
    assert "s3cr" not in text and "t-pass" not in text and "pw0rd" not in text
    assert "reachable again" in text and "http://***@127.0.0.1:%d/api/v1/batches" % coll.port in text
    assert "redirect to http://***@portal.example/login" in up.state()["last_error"]
    assert_exactly_once(coll, 5)
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
        code, _, answer = up._post(sp.peek(50, 1 << 20))
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


def test_a_proxy_html_400_backs_off_and_quarantines_nothing(tmp_path, collector, caplog):
    """Only the collector's JSON error naming a record quarantines; an HTML 400 from nginx, a
    WAF or a proxy says nothing about the records (review r3: it quarantined the backlog)."""
    coll = collector()
    coll.cues = ["html400"]
    sp = fill(tmp_path, 300)
    up = Uploader(coll.url, AGENT, **FAST)
    res = up.drain(sp, time.monotonic() + 10)
    assert res == {"status": "backoff", "sent": 0, "batches": 0, "quarantined": 0}
    assert coll.requests == 1 and sp.stats()["records"] == 300 and quarantined(up, sp) == 0
    lines = [r for r in caplog.records if r.name == "agent.upload" and r.levelno >= logging.WARNING]
    assert len(lines) == 1 and lines[0].levelno == logging.ERROR
    text = lines[0].getMessage()
    assert coll.url in text and "HTTP 400" in text and "[upload] url" in text
    assert "<html> <head><title>400 The plain HTTP request" in text and "\n" not in text
    pump(up, sp)
    assert_exactly_once(coll, 300)
    assert quarantined(up, sp) == 0
    sp.close()


def test_a_record_agent_mismatch_backs_off_instead_of_quarantining(tmp_path, collector, caplog):
    """"$.records[i].agent" while record i carries an agent id is an id mismatch (a rename), not
    a bad reading: back off with an ERROR naming both ids (review r2)."""
    coll = collector()
    coll.cues = ["record_agent"]
    sp = fill(tmp_path, 20)
    up = Uploader(coll.url, AGENT, **FAST)
    res = up.drain(sp, time.monotonic() + 10)
    assert res["status"] == "backoff" and res["quarantined"] == 0
    err = [r.getMessage() for r in caplog.records if r.name == "agent.upload" and r.levelno == logging.ERROR]
    assert len(err) == 1 and "agent id mismatch" in err[0] and "'site7'" in err[0]
    pump(up, sp)
    assert_exactly_once(coll, 20)
    assert quarantined(up, sp) == 0
    sp.close()


@pytest.fixture
def real_collector(tmp_path):
    """agent/collector with SQLite on its own keep-alive server; -> make(**overrides) -> (app, url)."""
    collector_mod = pytest.importorskip("agent.collector")
    from agent.collector.cli import make_server

    made = []

    def make(**over):
        app = collector_mod.make_app(None, db="sqlite:///%s" % (tmp_path / ("c%d.db" % len(made))), **over)
        srv = make_server("127.0.0.1", 0, app)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        made.append((srv, app))
        return app, "http://127.0.0.1:%d/api/v1/batches" % srv.server_address[1]

    yield make
    for srv, app in made:
        srv.shutdown()
        srv.server_close()
        close = getattr(app, "close", None)
        if close:
            close()


def stored(app, agent):
    return [r[1] for r in app.store.records(agent=agent)]


def renamed_spool(tmp_path, old_n=40, new_n=3):
    """A backlog written as 'old-id', then the agent renamed to 'new-id' (restart or SIGHUP)."""
    d = tmp_path / "spool"
    sp = Spool(d, "old-id")
    for i in range(old_n):
        sp.append(data_record("old-id", T0 + i, "meter1", 1, {"i": i}))
    sp.close()
    sp = Spool(d, "new-id")
    for i in range(new_n):
        sp.append(data_record("new-id", T0 + 100 + i, "meter1", 1, {"i": i}))
    return sp


def test_after_an_agent_id_rename_the_old_backlog_goes_out_as_the_old_agent(tmp_path, real_collector):
    """Every batch's envelope is its records' agent: nothing quarantined (review r2: the whole
    backlog was quarantined one record at a time)."""
    app, url = real_collector()
    sp = renamed_spool(tmp_path)
    up = Uploader(url, "new-id", batch_max_records=16, **FAST)
    res = up.drain(sp, time.monotonic() + 20)
    assert res["status"] == "empty" and res["quarantined"] == 0 and res["sent"] == 43
    assert stored(app, "old-id") == list(range(1, 41))
    assert stored(app, "new-id") == [41, 42, 43]
    assert sp.stats()["records"] == 0 and quarantined(up, sp) == 0
    assert up.state()["other_agent"] is None           # back to its own id once the old ones are out
    sp.close()


def test_a_renamed_agent_whose_token_cannot_send_the_old_id_backs_off_and_says_what_to_do(
        tmp_path, real_collector, caplog):
    app, url = real_collector(tokens={"new-id": "tok-new"})
    sp = renamed_spool(tmp_path)
    up = Uploader(url, "new-id", token="tok-new", **FAST)
    res = up.drain(sp, time.monotonic() + 20)
    assert res == {"status": "backoff", "sent": 0, "batches": 0, "quarantined": 0}
    assert sp.stats()["records"] == 43 and quarantined(up, sp) == 0
    err = [r.getMessage() for r in caplog.records if r.name == "agent.upload" and r.levelno == logging.ERROR]
    assert len(err) == 1
    assert "HTTP 403" in err[0] and "'old-id'" in err[0] and "keep [agent] id = old-id" in err[0]
    st = up.state()
    assert st["other_agent"] == "old-id" and "keep [agent] id = old-id" in st["last_error"]
    # The operator keeps the old id (with its token) until the backlog is out: all of it arrives.
    app2, url2 = real_collector(tokens={"old-id": "tok-old", "new-id": "tok-new"})
    up_old = Uploader(url2, "old-id", token="tok-old", **FAST)
    assert up_old.drain(sp, time.monotonic() + 20)["sent"] == 40
    assert stored(app2, "old-id") == list(range(1, 41))
    sp.close()


def test_all_duplicates_below_the_collectors_max_seq_is_reported_as_seq_reuse(tmp_path, real_collector, caplog):
    """A spool recreated with the same agent id restarts its seq: the collector keeps the old
    records and answers "duplicates" for the new readings. The uploader cannot save them, but it
    must not stay quiet: one ERROR per streak, counted in state()."""
    app, url = real_collector()
    first = fill(tmp_path / "a", 100)
    up = Uploader(url, AGENT, **FAST)
    assert up.drain(first, time.monotonic() + 20)["sent"] == 100
    first.close()
    # A resend of a batch whose answer was lost is not that signature (max_seq == its last seq).
    assert up.state()["seq_reuse_suspected"] == 0
    again = Spool(tmp_path / "b" / "spool", AGENT, fresh_seq=lambda: 1)     # flash wiped: seq 1 again
    for i in range(30):
        again.append(data_record(AGENT, T0 + 1000 + i, "meter1", 1, {"v": -1.0, "i": i}))
    up2 = Uploader(url, AGENT, batch_max_records=10, **FAST)
    res = up2.drain(again, time.monotonic() + 20)
    assert res["sent"] == 30 and res["batches"] == 3
    st = up2.state()
    assert st["duplicates_total"] == 30 and st["seq_reuse_suspected"] == 30 and st["last_max_seq"] == 100
    err = [r.getMessage() for r in caplog.records if r.name == "agent.upload" and r.levelno == logging.ERROR]
    assert len(err) == 1 and "seq 1..10" in err[0] and "up to 100" in err[0] and "DISCARDED" in err[0]
    assert "beyond any this agent has sent (30)" in err[0] and "another router" in err[0]
    again.close()


def test_the_original_resend_is_not_taken_for_seq_reuse(tmp_path, real_collector, caplog):
    app, url = real_collector()
    sp = fill(tmp_path, 20)
    up = Uploader(url, AGENT, **FAST)
    code, _, _ = up._post(sp.peek(20, 1 << 20))    # stored, answer "lost": sent again below
    assert code == 200
    assert up.drain(sp, time.monotonic() + 20)["sent"] == 20
    st = up.state()
    assert st["duplicates_total"] == 20 and st["seq_reuse_suspected"] == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    sp.close()


def test_a_fast_collector_gets_requests_in_gaps_far_shorter_than_the_old_floor(tmp_path, collector):
    """Issue 9: MIN_REQUEST_TIME = 0.2 s under the measured request time kept every gap shorter
    than that idle, although each request took 2 ms. A first request starts on a small prior;
    after that, what the requests took decides: 40 ms gaps are enough on loopback, 0.2 ms are not."""
    coll = collector()
    sp = fill(tmp_path, 0)
    up = Uploader(coll.url, AGENT, **FAST)
    sent = []
    for i in range(10):
        sp.append(data_record(AGENT, T0 + i, "meter1", 1, {"v": 230.0, "i": i}))
        sent.append(up.drain(sp, time.monotonic() + 0.04)["sent"])
    started = sum(1 for n in sent if n)
    assert started >= 8, sent        # (a request or a drain call slowed by a loaded machine may skip a gap)
    assert up.request_time() < 0.04
    sp.append(data_record(AGENT, T0 + 10, "meter1", 1, {"v": 230.0, "i": 10}))
    assert up.drain(sp, time.monotonic() + 0.0002)["status"] == "deadline"     # no request is that fast
    assert up.drain(sp, time.monotonic() + 0.03, stop=lambda: True)["status"] == "stopped"
    assert coll.requests == started and coll.connections == 1
    pump(up, sp)
    assert_exactly_once(coll, 11)
    sp.close()


def test_secrets_in_url_queries_and_echoed_urls_are_redacted_everywhere_the_uploader_writes(tmp_path, collector,
                                                                                            caplog):
    """Issue 10 / D: a collector (or proxy) error that echoes the request URL with its query went
    raw into the bisect (now: named-record) log line and the quarantine file; the url's own query in every failure
    line. Every text the uploader writes goes through agent.config.redact."""
    coll = collector(reject=lambda r: r["values"]["i"] == 3)
    coll.reject_message = "value out of range (POST http://127.0.0.1/api/v1/batches?token=T0PSECRET)"
    coll.cues = ["500"]
    sp = fill(tmp_path, 8)
    up = Uploader(coll.url + "?token=URLSECRET", AGENT, **FAST)
    with caplog.at_level(logging.DEBUG, logger="agent"):
        pump(up, sp)
    quarantined = (tmp_path / "spool" / QUARANTINE).read_text()
    text = "\n".join(r.getMessage() for r in caplog.records) + json.dumps(up.state()) + quarantined
    assert "quarantined, the others sent again" in text and "T0PSECRET" not in text and "URLSECRET" not in text
    assert "token=***" in quarantined and '"i": 3' in quarantined.replace('"i":3', '"i": 3')
    assert sorted(coll.stored) == [1, 2, 3, 5, 6, 7, 8]
    sp.close()


def test_a_record_the_collector_names_is_quarantined_without_a_bisection(tmp_path, collector):
    """The collector names the first record it refuses ($.records[i]): the ones before it are
    sent, that one is quarantined, the rest sent again. Before, a bisection cost about
    2 log2(n) requests per bad record (review: a far-future ts took three splits)."""
    coll = collector(reject=lambda r: r["values"]["i"] == 300)
    sp = fill(tmp_path, 500)
    up = Uploader(coll.url, AGENT, batch_max_records=500, **FAST)
    res = up.drain(sp, time.monotonic() + 10)
    assert res["status"] == "empty" and res["quarantined"] == 1
    assert coll.requests == 3          # the refused batch, the 300 before, the 199 after
    assert sorted(coll.stored) == [s for s in range(1, 501) if s != 301]
    q = [json.loads(x) for x in (tmp_path / "spool" / QUARANTINE).read_bytes().splitlines()]
    assert [x["record"]["values"]["i"] for x in q] == [300]
    assert q[0]["reason"] == "HTTP 400: value out of range (where: $.records[0].values)"
    sp.close()
