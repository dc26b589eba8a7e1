"""The built-in HTTP server (agent/collector/server.py) against hostile clients on 127.0.0.1:
slowloris heads, short bodies, request smuggling through ambiguous framing, chunked bodies (raw
sockets, requests, curl). Every hostile client is a small helper here, bounded in time; deadlines
are set small through the collector config, as an operator would."""
import gzip
import json
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

from agent.collector import make_app
from agent.collector.cli import make_server
from agent.record import encode, utc_timestamp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T0 = 1_795_000_000.0
TOKEN = "token-for-agent-a-0123456789"
JSON = {"Content-Type": "application/json"}


def data(agent, seq):
    return {"agent": agent, "seq": seq, "ts": utc_timestamp(T0 + seq), "device": "meter1", "unit": 1,
            "values": {"v": float(seq)}, "status": "ok"}


def batch(agent, seqs):
    return encode({"agent": agent, "records": [data(agent, s) for s in seqs]}).rstrip(b"\n")


@pytest.fixture
def serve(tmp_path):
    """serve(max_connections=None, wrap=None, **config) -> (port, app): a real collector app on
    the built-in server, on a thread; everything stopped after the test."""
    running = []

    def start(max_connections=None, wrap=None, **cfg):
        app = make_app(None, db="sqlite:///%s" % (tmp_path / ("c%d.db" % len(running))), **cfg)
        kw = {"max_connections": max_connections} if max_connections else {}
        srv = make_server("127.0.0.1", 0, wrap(app) if wrap else app, **kw)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        running.append((srv, app))
        return srv.server_address[1], app

    yield start
    for srv, app in running:
        srv.shutdown()
        srv.server_close()
        app.close()


class Raw:
    """A client socket that keeps what it received beyond the answer it was reading (`pending`)."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.pending = b""

    def recv(self, n):
        if self.pending:
            out, self.pending = self.pending[:n], self.pending[n:]
            return out
        return self.sock.recv(n)

    def sendall(self, data):
        self.sock.sendall(data)

    def settimeout(self, t):
        self.sock.settimeout(t)

    def close(self):
        self.sock.close()


def connect(port):
    return Raw(port)


def read_answer(sock):
    """One HTTP answer from the socket: (status, {lower-case header: value}, body), or None at EOF."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        piece = sock.recv(65536)
        if not piece:
            assert not buf, "connection closed in the middle of an answer: %r" % buf
            return None
        buf += piece
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    n = int(headers.get("content-length", 0))
    while len(rest) < n:
        piece = sock.recv(65536)
        assert piece, "connection closed in the middle of an answer body"
        rest += piece
    sock.pending = rest[n:] + sock.pending
    return status, headers, rest[:n]


def closed(sock, within=3.0):
    """True when the server closes the connection within `within` s without sending anything more."""
    sock.settimeout(within)
    try:
        return not sock.pending and sock.recv(65536) == b""
    except socket.timeout:
        return False
    except ConnectionResetError:
        return True


def exchange(port, raw):
    """Send raw bytes on a new connection; (first answer, closed afterwards?)."""
    s = connect(port)
    try:
        s.sendall(raw)
        ans = read_answer(s)
        return ans, closed(s)
    finally:
        s.close()


def post_head(length_headers, path="/api/v1/batches", version="HTTP/1.1"):
    return ("POST %s %s\r\nHost: x\r\nContent-Type: application/json\r\n%s\r\n"
            % (path, version, "".join("%s\r\n" % h for h in length_headers))).encode()


def chunked(body, sizes=(7, 100, 1 << 20)):
    out, i, k = b"", 0, 0
    while i < len(body):
        n = sizes[k % len(sizes)]
        piece = body[i:i + n]
        out += b"%x\r\n%s\r\n" % (len(piece), piece)
        i += n
        k += 1
    return out + b"0\r\n\r\n"


class Slowloris:
    """n connections from 127.0.0.1 that send a request head one byte every `interval` seconds
    and reconnect at once whenever the server drops them (answer or close), on a thread."""

    HEAD = b"POST /api/v1/batches HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "

    def __init__(self, port, n, interval):
        self.port, self.n, self.interval = port, n, interval
        self.connects = self.dropped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)

    def _run(self):
        sel = selectors.DefaultSelector()
        conns = {}

        def connect_one():
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", self.port))
            conns[s] = [0.0, 0]
            sel.register(s, selectors.EVENT_READ)
            self.connects += 1

        for _ in range(self.n):
            connect_one()
        lost = 0
        while not self._stop.is_set():
            for _ in range(lost):
                connect_one()
            lost = 0
            for key, _ in sel.select(0.02):
                s = key.fileobj
                try:
                    s.recv(4096)
                except OSError:
                    pass
                sel.unregister(s)
                s.close()
                del conns[s]
                self.dropped += 1
                lost += 1
            now = time.monotonic()
            for s, st in list(conns.items()):
                if now >= st[0]:
                    try:
                        s.send(self.HEAD if not st[1] else b"a")
                        st[1] += 1
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        sel.unregister(s)
                        s.close()
                        del conns[s]
                        lost += 1
                        continue
                    st[0] = now + self.interval
        for s in conns:
            s.close()
        sel.close()


# --- slowloris ------------------------------------------------------------------------------------

def test_slowloris_does_not_keep_a_real_agent_out(serve, tmp_path):
    """120 slow heads (one byte every 0.5 s, reconnecting when dropped) against 60 connection
    slots and the default per-address cap (all from 127.0.0.1, like the agent): every post of a
    real batch gets 200 within 2 s, and the agent's uploader drains its spool. Before issue 10
    the slots were threads that the slow heads held: 503 on nearly every post."""
    port, app = serve(max_connections=60)
    url = "http://127.0.0.1:%d/api/v1/batches" % port
    with Slowloris(port, 120, 0.5) as attack:
        time.sleep(1.5)  # the attack is established: every slot taken, attackers queueing
        assert attack.connects >= 120
        worst, codes = 0.0, []
        with requests.Session() as s:
            for k in range(8):
                t0 = time.monotonic()
                r = s.post(url, data=batch("a", range(k * 50, k * 50 + 50)), headers=JSON, timeout=5)
                worst = max(worst, time.monotonic() - t0)
                codes.append(r.status_code)
                time.sleep(0.1)
        assert codes == [200] * 8, codes
        assert worst < 2.0, worst
        # the real agent's uploader, through the same attack
        from agent import upload
        from agent.spool import Spool

        sp = Spool(str(tmp_path / "spool"), "b")
        for _ in range(60):
            rec = data("b", 0)
            rec["seq"] = None
            sp.append(rec)
        up = upload.Uploader(url, "b", batch_max_records=20, timeout=5.0)
        t0 = time.monotonic()
        up.drain(sp, time.monotonic() + 10)
        assert sp.stats()["records"] == 0 and time.monotonic() - t0 < 6.0
        sp.close()
        assert attack.dropped > 0  # the attackers were being closed, not served
    assert len(list(app.store.records(agent="a"))) == 400
    assert len(list(app.store.records(agent="b"))) == 60


def test_clients_that_stop_reading_answers_do_not_block_the_agents_posts(serve):
    """24 clients ask for a long answer and read none of it (their app threads block in send):
    posts are served by threads such readers cannot take."""
    def wrap(app):
        def w(environ, start_response):
            if environ["PATH_INFO"] == "/endless":
                start_response("200 OK", [("Content-Type", "text/plain")])
                return iter(lambda: b"x" * 65536, None)
            return app(environ, start_response)
        return w

    port, _ = serve(wrap=wrap)
    readers = []
    try:
        for _ in range(24):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", port))
            s.sendall(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
            readers.append(s)
        time.sleep(1.0)  # every read thread is blocked in sendall by now
        with requests.Session() as session:
            for k in range(5):
                t0 = time.monotonic()
                r = session.post("http://127.0.0.1:%d/api/v1/batches" % port, data=batch("r", [k]),
                                 headers=JSON, timeout=5)
                assert r.status_code == 200 and time.monotonic() - t0 < 2.0
    finally:
        for s in readers:
            s.close()


def test_head_deadline_is_total_not_per_read(serve):
    """A head that keeps arriving (one byte every 0.1 s) is still cut at head_timeout: 408."""
    port, _ = serve(head_timeout=0.6)
    s = connect(port)
    t0 = time.monotonic()
    s.sendall(b"POST /api/v1/batches HTTP/1.1\r\nHost: x\r\n")
    answer = None
    while time.monotonic() - t0 < 5:
        try:
            s.sendall(b"X")
        except OSError:
            break
        s.settimeout(0.1)
        try:
            answer = s.recv(4096)
            break
        except socket.timeout:
            continue
    took = time.monotonic() - t0
    s.close()
    assert answer and answer.startswith(b"HTTP/1.1 408"), answer
    assert b'"where":"head"' in answer.replace(b" ", b"")
    assert 0.5 <= took < 2.0, took


def test_idle_connection_without_a_request_is_closed_after_head_timeout(serve):
    port, _ = serve(head_timeout=0.5)
    s = connect(port)
    t0 = time.monotonic()
    assert closed(s, within=3)
    assert time.monotonic() - t0 < 2.0
    s.close()


def test_a_slow_head_is_closed_to_make_room_for_a_complete_request(serve):
    """The only slot is held by a partial head: a newcomer gets in, the slow one gets 503."""
    port, _ = serve(max_connections=1)
    slow = connect(port)
    slow.sendall(b"POST /api/v1/batches HTTP/1.1\r\nHo")
    time.sleep(0.1)
    r = requests.get("http://127.0.0.1:%d/health" % port, timeout=5)
    assert r.status_code == 200
    ans = read_answer(slow)
    assert ans[0] == 503 and json.loads(ans[2])["where"] == "max_connections"
    slow.close()


def test_per_address_cap_makes_room_within_the_address(serve):
    """max_connections_per_address: a 4th connection of 127.0.0.1 closes one of that address's
    waiting ones, not the newcomer: partial heads go first (the oldest of them), before a
    connection that has not sent anything yet."""
    port, _ = serve(max_connections_per_address=3)
    held = [connect(port) for _ in range(3)]
    time.sleep(0.1)
    for h in held[1:]:
        h.sendall(b"GET /hea")
        time.sleep(0.05)
    r = requests.get("http://127.0.0.1:%d/health" % port, timeout=5)
    assert r.status_code == 200
    assert read_answer(held[1])[0] == 503
    held[2].sendall(b"lth HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_answer(held[2])[0] == 200
    held[0].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_answer(held[0])[0] == 200
    for h in held:
        h.close()


# --- framing (RFC 9112 §6) ------------------------------------------------------------------------

def test_chunked_bodies_are_decoded_and_stored(serve):
    port, app = serve()
    body = batch("a", range(30))
    raw = post_head(["Transfer-Encoding: chunked"]) + chunked(body)
    (status, _, out), was_closed = exchange(port, raw)
    assert status == 200 and json.loads(out) == {"stored": 30, "duplicates": 0, "max_seq": 29}
    # chunk extensions and trailers (ignored), gzip inside chunks, keep-alive afterwards
    gz = gzip.compress(batch("a", range(30, 40)))
    s = connect(port)
    s.sendall(post_head(["Transfer-Encoding: chunked", "Content-Encoding: gzip"])
              + b"%x;name=value\r\n%s\r\n0\r\nX-Trailer: yes\r\n\r\n" % (len(gz), gz))
    status, headers, out = read_answer(s)
    assert status == 200 and json.loads(out)["stored"] == 10 and headers.get("connection") != "close"
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_answer(s)[0] == 200
    s.close()
    # requests sends a generator body chunked
    r = requests.post("http://127.0.0.1:%d/api/v1/batches" % port, headers=JSON, timeout=5,
                      data=iter([batch("a", range(40, 50))[:17], batch("a", range(40, 50))[17:]]))
    assert r.json() == {"stored": 10, "duplicates": 0, "max_seq": 49}
    assert len(list(app.store.records(agent="a"))) == 50


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_chunked_upload(serve, tmp_path):
    port, app = serve()
    f = tmp_path / "batch.json"
    f.write_bytes(batch("c", range(500)))
    r = subprocess.run(["curl", "-sS", "--max-time", "10", "--data-binary", "@%s" % f, "-H",
                        "Transfer-Encoding: chunked", "-H", "Content-Type: application/json",
                        "http://127.0.0.1:%d/api/v1/batches" % port], capture_output=True, timeout=20)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"stored": 500, "duplicates": 0, "max_seq": 499}
    assert len(list(app.store.records(agent="c"))) == 500


def test_chunk_data_is_never_read_as_the_next_request(serve):
    """Request smuggling: before issue 10 the chunked body was answered 411 and then parsed as the
    next request on the connection (this chunk returned the agents list)."""
    port, _ = serve()
    inner = b"GET /api/v1/agents HTTP/1.1\r\nHost: x\r\n\r\n"
    s = connect(port)
    s.sendall(post_head(["Transfer-Encoding: chunked"]) + b"%x\r\n%s\r\n0\r\n\r\n" % (len(inner), inner))
    status, _, out = read_answer(s)
    assert status == 400 and json.loads(out)["error"].startswith("malformed JSON")
    s.settimeout(1.0)
    try:
        more = s.pending or s.recv(65536)
    except socket.timeout:
        more = b""
    s.close()
    assert b"agents" not in more and b"HTTP/1.1 200" not in more


@pytest.mark.parametrize("headers,version,status", [
    (["Content-Length: 10", "Transfer-Encoding: chunked"], "HTTP/1.1", 400),
    (["Transfer-Encoding: chunked", "Content-Length: 10"], "HTTP/1.1", 400),
    (["Transfer-Encoding: chunked"], "HTTP/1.0", 400),
    (["Content-Length: 5", "Content-Length: 10"], "HTTP/1.1", 400),
    (["Content-Length: 10", "Content-Length: 10"], "HTTP/1.1", 400),
    (["Content-Length: 5, 10"], "HTTP/1.1", 400),
    (["Content-Length: +10"], "HTTP/1.1", 400),
    (["Content-Length: 1_0"], "HTTP/1.1", 400),
    (["Content-Length: -1"], "HTTP/1.1", 400),
    (["Content-Length: 0x10"], "HTTP/1.1", 400),
    (["Content-Length: \xd9\xa3"], "HTTP/1.1", 400),  # ARABIC-INDIC DIGIT THREE, in UTF-8
    (["Transfer-Encoding: chunked, chunked"], "HTTP/1.1", 501),
    (["Transfer-Encoding: gzip, chunked"], "HTTP/1.1", 501),
    (["Transfer-Encoding: chunked, gzip"], "HTTP/1.1", 400),
    (["Transfer-Encoding: identity"], "HTTP/1.1", 400),
    (["Transfer-Encoding: chunked", "Transfer-Encoding: gzip"], "HTTP/1.1", 400),
    (["Content-Length : 10"], "HTTP/1.1", 400),          # whitespace before the colon
    (["Content-Length: 10", " 20"], "HTTP/1.1", 400),    # obs-fold
    (["Expect: something-else"], "HTTP/1.1", 417),
])
def test_ambiguous_framing_is_refused_and_the_connection_closed(serve, headers, version, status):
    port, app = serve()
    body = b'{"agent":"x","records":[]}'
    raw = ("POST /api/v1/batches %s\r\nHost: x\r\nContent-Type: application/json\r\n%s\r\n\r\n"
           % (version, "\r\n".join(headers))).encode("latin-1") + body + b"GET /api/v1/agents HTTP/1.1\r\n\r\n"
    (got, _, out), was_closed = exchange(port, raw)
    assert got == status, (got, out)
    assert json.loads(out)["where"] and was_closed
    assert list(app.store.records()) == []


@pytest.mark.parametrize("raw", [
    b"POST /api/v1/batches HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\n\n0\n\n",  # bare LF
    b"POST /api/v1/batches HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST /api/v1/batches HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nabcde\r\n0\r\n\r\n",
    b"POST /api/v1/batches HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcdeXY0\r\n\r\n",
    b"POST /api/v1/batches HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\nabcde\n0\n\n",
    b"POST /api/v1/batches HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nbad trailer\r\n\r\n",
    b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n",
    b"GET /he alth HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\x00y\r\n\r\n",
])
def test_malformed_heads_and_chunks_are_400_and_close(serve, raw):
    port, _ = serve()
    (status, _, out), was_closed = exchange(port, raw)
    assert status in (400, 505), out
    assert "where" in json.loads(out) and was_closed


def test_chunked_body_over_max_body_bytes_is_413_while_it_arrives(serve):
    port, _ = serve(max_body_bytes="1k")
    s = connect(port)
    s.sendall(post_head(["Transfer-Encoding: chunked"]) + b"400\r\n" + b" " * 1024 + b"\r\n1\r\n")
    status, _, out = read_answer(s)
    assert status == 413 and json.loads(out) == {"error": "body exceeds max_body_bytes 1024", "where": "body"}
    assert closed(s)
    s.close()


def test_content_length_over_the_cap_gets_413_not_a_reset(serve):
    """Answered from Content-Length without reading; the rest is drained, so the client that is
    still sending reads the 413 instead of a connection reset."""
    port, _ = serve(max_body_bytes="64k")
    r = requests.post("http://127.0.0.1:%d/api/v1/batches" % port, data=b" " * (4 << 20), headers=JSON, timeout=10)
    assert r.status_code == 413 and r.json()["where"] == "body"


def test_short_body_is_400_after_the_body_deadline_with_one_log_line(serve, caplog):
    """Content-Length larger than what is sent: 400 once body_timeout has passed (before: a 500
    after 60 s, with two tracebacks)."""
    port, _ = serve(body_timeout=0.5)
    caplog.set_level(logging.INFO, logger="modbus.collector")
    s = connect(port)
    t0 = time.monotonic()
    s.sendall(post_head(["Content-Length: 100"]) + b'{"agent":"x"')
    status, _, out = read_answer(s)
    took = time.monotonic() - t0
    assert status == 400 and 0.4 <= took < 2.0, (status, took)
    assert json.loads(out) == {"error": "body shorter than Content-Length (12 of 100 bytes) within body_timeout 0.5s",
                               "where": "body"}
    assert closed(s)
    s.close()
    lines = [r for r in caplog.records if r.name == "modbus.collector" and r.levelno >= logging.INFO]
    assert len(lines) == 1 and "400" in lines[0].getMessage() and not lines[0].exc_info
    assert "Traceback" not in caplog.text


def test_expect_100_continue_and_pipelining(serve):
    port, _ = serve()
    s = connect(port)
    body = batch("e", range(3))
    s.sendall(post_head(["Content-Length: %d" % len(body), "Expect: 100-continue"]))
    s.settimeout(2)
    assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
    s.sendall(body)
    assert read_answer(s)[0] == 200
    # two requests in one write: two answers, in order
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
    first = read_answer(s)
    rest = s.pending
    assert first[0] == 200
    s2 = rest
    while b"\r\n\r\n" not in s2:
        s2 += s.recv(4096)
    assert s2.startswith(b"HTTP/1.1 404")
    s.close()


def test_headers_with_underscores_are_dropped(serve):
    """X_Token and X-Token would both be HTTP_X_TOKEN (a proxy that checks one is fooled by the
    other): names with underscores are dropped. The server's own process environment is not
    copied into requests (wsgiref did)."""
    seen = {}

    def wrap(app):
        def w(environ, start_response):
            seen.update(environ)
            return app(environ, start_response)
        return w

    port, _ = serve(wrap=wrap)
    (status, _, _), _ = exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\nX_Token: evil\r\nX-Real: ok\r\n"
                                       b"Connection: close\r\n\r\n")
    assert status == 200
    assert seen.get("HTTP_X_REAL") == "ok" and "HTTP_X_TOKEN" not in seen
    assert "PATH" not in seen and "HOME" not in seen


def test_app_refuses_a_content_length_that_is_not_plain_digits(tmp_path):
    """Under gunicorn & co the app sees CONTENT_LENGTH as sent: int() took +5, 1_0 and ' 5'."""
    import io

    app = make_app(None, db="sqlite:///%s" % (tmp_path / "d.db"))
    try:
        for length in ("+5", "1_0", "-0", "\u0663"):
            env = {"REQUEST_METHOD": "POST", "PATH_INFO": "/api/v1/batches", "CONTENT_TYPE": "application/json",
                   "CONTENT_LENGTH": length, "wsgi.input": io.BytesIO(b"{}" * 8)}
            out = {}

            def start_response(status, headers, exc_info=None, out=out):
                out["status"] = status

            body = b"".join(app(env, start_response))
            assert out["status"].startswith("400") and json.loads(body)["where"] == "Content-Length", length
    finally:
        app.close()


def test_cli_reads_the_server_settings_from_the_config(tmp_path, free_port):
    ini = tmp_path / "c.ini"
    ini.write_text("[collector]\nlisten = 127.0.0.1:%d\ndb = sqlite:///%s\nhead_timeout = 500ms\n"
                   "body_timeout = 1s\nmax_connections_per_address = 10\n" % (free_port, tmp_path / "c.db"))
    proc = subprocess.Popen([sys.executable, "-m", "agent.collector.cli", "-c", str(ini)], cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                requests.get("http://127.0.0.1:%d/health" % free_port, timeout=2)
                break
            except requests.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        s = connect(free_port)
        t0 = time.monotonic()
        s.sendall(b"GET /health HTTP/1.1\r\n")
        status = read_answer(s)[0]
        assert status == 408 and time.monotonic() - t0 < 2.0
        s.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=20)[0]
    assert proc.returncode == 0, out
    bad = tmp_path / "bad.ini"
    bad.write_text("[collector]\nhead_timeout = 0\n")
    r = subprocess.run([sys.executable, "-m", "agent.collector.cli", "-c", str(bad)], cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "%s:2: [collector] head_timeout: must be more than 0" % bad in r.stderr
