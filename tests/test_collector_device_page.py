"""GET /device/AGENT/DEVICE: SVG charts (pure functions), the page in-process on a real SQLite
file (escaping of hostile names, every section), the status page's link, and the page in a real
headless Chromium at a phone's width (screenshot checked for the chart, labels, no overflow)."""
import io
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import xml.etree.ElementTree as ET
import zlib
from html.parser import HTMLParser
from urllib.parse import unquote

import pytest

from agent.collector import make_app, rollup, svg
from agent.collector.cli import make_server
from agent.collector.device_page import device_url
from agent.record import encode, utc_timestamp

T0 = 1_795_000_000.0          # the app's clock: "now"
AGENT = "site<7>"
DEVICE = 'meter "A" <b>&amp; \u00e9\u96fb\u8868/1'   # HTML, quotes, an entity, unicode, a slash
SLASH_AGENT = "north/site"


def _data(seq, t, values, status="ok", **extra):
    rec = {"agent": AGENT, "seq": seq, "ts": utc_timestamp(t), "device": DEVICE, "unit": 3,
           "values": values, "status": status}
    rec.update(extra)
    return rec


def _records():
    recs = []
    seq = 0
    # two hours of readings every 60 s: a numeric point, an enum label, a bool
    for i in range(120):
        t = T0 - 7200 + i * 60
        recs.append(_data(seq, t, {"voltage": 230.0 + (i % 10), "mode": "run" if i % 30 < 20 else "stop<x>",
                                   "alarm": i % 7 == 0}))
        seq += 1
    # a buffered record (3 samples) in the last minute
    samples = [{"ts": utc_timestamp(T0 - 50 + k * 10), "values": {"voltage": 250.0 + k, "mode": "run",
                                                                   "alarm": False}} for k in range(3)]
    recs.append(_data(seq, T0 - 30, samples[-1]["values"], samples=samples))
    seq += 1
    recs.append({"agent": AGENT, "seq": seq, "ts": utc_timestamp(T0 - 20), "device": DEVICE, "unit": 3,
                 "status": "error", "error": {"kind": "timeout", "message": "unit 3 <timeout> after 1.0 s"}})
    seq += 1
    recs.append(_data(seq, T0 - 15, {"voltage": 240.0}, status="partial",
                      errors=[{"kind": "exception", "code": 2, "name": "ILLEGAL DATA ADDRESS", "points": ["mode"],
                               "message": "unit 3 fc 03 holding 500+1: exception code 2 ILLEGAL DATA ADDRESS"}]))
    seq += 1
    recs.append({"agent": AGENT, "seq": seq, "ts": utc_timestamp(T0 - 10), "kind": "health", "device": DEVICE,
                 "unit": 3, "health": {"polls_ok": 120, "timeouts": 1, "exceptions": {"2": 1}, "dead": False}})
    return recs


class _Client:
    def __init__(self, app):
        from wsgiref.validate import validator

        self.app, self.wsgi = app, validator(app)

    def call(self, method, path, body=b"", qs=""):
        env = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": qs, "SCRIPT_NAME": "",
               "SERVER_NAME": "test", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
               "REMOTE_ADDR": "127.0.0.1", "wsgi.version": (1, 0), "wsgi.url_scheme": "http",
               "wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr, "wsgi.multithread": True,
               "wsgi.multiprocess": False, "wsgi.run_once": False}
        if method == "POST":
            env["CONTENT_LENGTH"] = str(len(body))
            env["CONTENT_TYPE"] = "application/json"
        out = {}
        it = self.wsgi(env, lambda s, h, e=None: out.update(status=int(s[:3]), headers=dict(h)))
        try:
            data = b"".join(it)
        finally:
            it.close()
        return out["status"], out["headers"], data

    def get_url(self, url):
        """A link as the browser follows it: path percent-decoded as a WSGI server does."""
        path, _, qs = url.partition("?")
        return self.call("GET", unquote(path, "iso-8859-1"), qs=qs)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    db = tmp_path_factory.mktemp("page") / "p.db"
    app = make_app(None, db="sqlite:///%s" % db, clock=lambda: T0)
    c = _Client(app)
    st, _, body = c.call("POST", "/api/v1/batches", encode({"agent": AGENT, "records": _records()}).rstrip(b"\n"))
    assert st == 200 and json.loads(body)["stored"] == len(_records()), body
    other = {"agent": SLASH_AGENT, "seq": 0, "ts": utc_timestamp(T0 - 5), "device": "m1", "unit": 1,
             "values": {"v": 1}, "status": "ok"}
    assert c.call("POST", "/api/v1/batches", encode({"agent": SLASH_AGENT, "records": [other]}).rstrip(b"\n"))[0] == 200
    rollup.drain(app.store)  # rollups = async (the default): the job's work, done now
    yield c
    app.close()


# --- the SVG, pure ------------------------------------------------------------------------------

def _bucket(t, lo, hi, avg):
    return {"t": utc_timestamp(t), "count": 2, "min": lo, "max": hi, "avg": avg, "last": avg}


def test_chart_draws_a_band_and_an_average_line_split_at_an_outage():
    buckets = [_bucket(T0 - 3600 + k * 60, 1.0 + k, 3.0 + k, 2.0 + k) for k in range(10)]
    buckets += [_bucket(T0 - 1800 + k * 60, 5.0, 9.0, 7.0) for k in range(5)]  # after a 20-minute hole
    doc = ET.fromstring(svg.chart(buckets, T0 - 3600, T0, 60, label="v <last hour>", unit="V"))
    ns = "{http://www.w3.org/2000/svg}"
    assert len(doc.findall(ns + "polygon")) == 2 and len(doc.findall(ns + "polyline")) == 2
    texts = [t.text for t in doc.iter(ns + "text")]
    assert "v <last hour>" in texts and "V" in texts   # escaped in the SVG, parsed back
    assert {"0", "5", "10", "15"} >= {t for t in texts if t and t.isdigit()} != set()  # round y ticks
    # every drawn coordinate inside the viewBox
    for el in doc.findall(ns + "polygon") + doc.findall(ns + "polyline"):
        for pair in el.get("points").split():
            x, y = map(float, pair.split(","))
            assert 0 <= x <= svg.W and 0 <= y <= svg.H


def test_chart_without_data_says_so_and_skips_non_finite_buckets():
    doc = ET.fromstring(svg.chart([{"t": utc_timestamp(T0), "min": None, "max": 1, "avg": 1}], T0 - 60, T0, 60))
    assert doc.find("{http://www.w3.org/2000/svg}polyline") is None
    assert "no data" in ET.tostring(doc, encoding="unicode")


def test_state_spans_merge_runs_and_stop_at_an_outage():
    pts = [(0, "run"), (10, "run"), (20, True), (30, True), (40, None)]
    assert svg.state_spans(pts, 100) == [(0, 20, "run"), (20, 40, "true"), (40, 100, "null")]
    # the device went quiet after t=10: its state is not painted over the outage
    assert svg.state_spans([(0, "a"), (10, "a"), (500, "b")], 600, stale=60) == [(0, 70, "a"), (500, 560, "b")]
    strip = ET.fromstring(svg.state_strip([(0, 50, 'x"<y>'), (50, 100, "z")], 0, 100, label="st"))
    titles = [t.text for t in strip.iter("{http://www.w3.org/2000/svg}title")]
    assert titles == ['x"<y>', "z"]


# --- the page ----------------------------------------------------------------------------------

class _Strict(HTMLParser):
    """Collects tags and text; SVG parts are checked as XML separately."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.text, self.links = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "a":
            self.links.append(dict(attrs).get("href"))

    def handle_data(self, data):
        self.text.append(data)


def _page(client, agent=AGENT, device=DEVICE):
    st, headers, body = client.get_url(device_url(agent, device))
    assert st == 200, body
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    return body.decode("utf-8")


def test_device_page_has_every_part_and_escapes_names(client):
    html = _page(client)
    assert "<script" not in html and "<b>" not in html        # the names are text, never markup
    p = _Strict()
    p.feed(html)
    text = "".join(p.text)
    assert AGENT in text and DEVICE in text                    # and they read back exactly
    assert "script" not in p.tags and "b" not in p.tags
    # each <svg> is well-formed XML: names inside SVG text are escaped for XML too
    svgs = re.findall(r"<svg.*?</svg>", html, re.S)
    docs = [ET.fromstring(s) for s in svgs]
    charts = [d for d in docs if d.get("class") == "chart"]
    strips = [d for d in docs if d.get("class") == "strip"]
    assert len(charts) == 3                # voltage: hour, day, week
    # from the rollups: 1-minute rows for the hour and the day, 1-hour rows for the week
    assert re.findall(r'class="chartbox" data-level="(\w+)"', html) == ["1m", "1m", "1h"]
    assert len(strips) == 4                # mode and alarm: hour, day
    ns = "{http://www.w3.org/2000/svg}"
    hour = charts[0]
    assert hour.get("aria-label") == "voltage \u2014 last hour"
    assert hour.findall(ns + "polygon") and hour.findall(ns + "polyline")
    # the buffered record's three samples are in the hour: the top of the y axis covers 252
    ticks = [float(t.text) for t in hour.iter(ns + "text") if t.get("class") == "ytick"]
    assert max(ticks) >= 252
    labels = {t.text for d in strips for t in d.iter(ns + "title")}
    assert labels >= {"run", "stop<x>", "true", "false"}
    # last values, health, errors: the partial's message and the error's
    assert "unit 3 &lt;timeout&gt; after 1.0 s" in html and "ILLEGAL DATA ADDRESS" in html
    assert re.search(r"exceptions\.2</td><td class=\"num\">1<", html)
    assert "polls_ok" in html and "units are not sent by the agent" in html
    assert "Alerts" not in html or "id=\"alerts\"" in html


def test_status_page_links_to_the_device_page(client):
    st, _, body = client.call("GET", "/")
    p = _Strict()
    p.feed(body.decode("utf-8"))
    links = [h for h in p.links if h and h.startswith("/device")]
    assert device_url(AGENT, DEVICE) in links and device_url(SLASH_AGENT, "m1") in links
    for href in links:  # each link opens its device's page
        st, _, page = client.get_url(href)
        assert st == 200 and b"<svg" in page


def test_device_page_errors(client):
    assert client.call("GET", "/device/nobody/nothing")[0] == 404
    assert client.call("GET", "/device/only-agent")[0] == 404
    st, _, body = client.call("GET", "/device/a/\xff")            # not UTF-8 once re-read
    assert st == 400 and json.loads(body)["where"] == "path"
    st, _, body = client.call("GET", "/device", qs="agent=a&colour=red")
    assert st == 400 and json.loads(body)["where"] == "colour"
    assert device_url(SLASH_AGENT, "m1").startswith("/device?")  # a '/' in the agent: the query form
    assert _page(client, SLASH_AGENT, "m1").count('class="chart"') == 3


def test_device_page_needs_the_read_token(tmp_path):
    app = make_app(None, db="sqlite:///%s" % (tmp_path / "t.db"), read_token="read-token-0123456789")
    try:
        assert _Client(app).call("GET", "/device/a/b")[0] == 401
    finally:
        app.close()


# --- in a real browser ---------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PHONE_W = 390
# Loaded from the collector's own origin (the test wraps the app), so it may read the page's
# layout in an iframe of a phone's width and write what it measured into its own DOM.
PROBE = """<!DOCTYPE html><html><body><iframe id="f" width="%d" height="800" src="%s"></iframe>
<script>
document.getElementById('f').onload = function () {
  var d = this.contentDocument, e = d.documentElement, r = [];
  var svgs = d.querySelectorAll('svg'), wide = 0;
  for (var i = 0; i < svgs.length; i++) { if (svgs[i].getBoundingClientRect().right > e.clientWidth + 0.5) wide++; }
  document.body.setAttribute('data-scroll', e.scrollWidth);
  document.body.setAttribute('data-client', e.clientWidth);
  document.body.setAttribute('data-svgs', svgs.length);
  document.body.setAttribute('data-wide', wide);
  document.body.setAttribute('data-title', d.getElementById('title').textContent);
  document.body.setAttribute('data-done', '1');
};
</script></body></html>"""


def _chromium(args, timeout=60):
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                               "--no-first-run", "--disable-background-networking", "--disable-component-update",
                               "--disable-sync", "--hide-scrollbars", "--user-data-dir=" + profile] + args,
                              capture_output=True, text=True, timeout=timeout)


def png_pixels(path):
    """(width, height, rows of (r, g, b)) of an 8-bit RGB/RGBA non-interlaced PNG (Chromium's)."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, w = 8, [], None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, ctype, _c, _f, interlace = struct.unpack(">IIBBBBB", chunk)
            assert depth == 8 and ctype in (2, 6) and interlace == 0
            bpp = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat.append(chunk)
        pos += 12 + n
    raw = zlib.decompress(b"".join(idat))
    stride = w * bpp
    rows, prev = [], bytearray(stride)
    for y in range(h):
        ft = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if ft == 1:
                line[i] = (line[i] + a) & 255
            elif ft == 2:
                line[i] = (line[i] + b) & 255
            elif ft == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif ft == 4:
                pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append([tuple(line[x * bpp:x * bpp + 3]) for x in range(w)])
        prev = line
    return w, h, rows


def _near(p, rgb, tol=40):
    return all(abs(a - b) <= tol for a, b in zip(p, rgb))


@pytest.fixture(scope="module")
def served(client):
    url = device_url(AGENT, DEVICE)
    probe = (PROBE % (PHONE_W, url)).encode("utf-8")

    def wrapped(environ, start_response):
        if environ.get("PATH_INFO") == "/probe.html":
            start_response("200 OK", [("Content-Type", "text/html"), ("Content-Length", str(len(probe)))])
            return [probe]
        return client.app(environ, start_response)

    srv = make_server("127.0.0.1", 0, wrapped)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield "http://127.0.0.1:%d" % srv.server_address[1], url
    srv.shutdown()
    srv.server_close()


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")
def test_device_page_in_headless_chromium_at_phone_width(served, tmp_path):
    base, url = served
    r = _chromium(["--virtual-time-budget=5000", "--dump-dom", base + "/probe.html"])
    if "<html" not in r.stdout:
        pytest.skip("chromium could not render: %s" % r.stderr[-300:])
    m = re.search(r"<body([^>]*)>", r.stdout)
    attrs = dict(re.findall(r'data-(\w+)="([^"]*)"', m.group(1)))
    assert attrs.get("done") == "1", r.stdout[:500]
    assert int(attrs["svgs"]) == 7 and attrs["wide"] == "0"
    assert int(attrs["scroll"]) <= int(attrs["client"])          # no sideways scrolling on a phone
    from html import unescape

    assert unescape(attrs["title"]).replace("\u00a0", " ") == "%s / %s" % (AGENT, DEVICE)
    # the screenshot: the chart is drawn (the average line's and the band's colours), and nothing
    # is painted in the rightmost columns (no overflow past the viewport's edge)
    shot = tmp_path / "device.png"
    r = _chromium(["--window-size=%d,1400" % PHONE_W, "--screenshot=%s" % shot, base + url])
    assert shot.exists(), r.stderr[-300:]
    w, h, rows = png_pixels(str(shot))
    assert w == PHONE_W
    line = sum(1 for row in rows for p in row if _near(p, (0x0b, 0x4f, 0x8a), 30))
    band = sum(1 for row in rows for p in row if _near(p, (0xb8, 0xd6, 0xef), 25))
    assert line > 200 and band > 500, (line, band)
    edge = [row[x] for row in rows for x in (w - 3, w - 2, w - 1)]
    assert all(_near(p, (255, 255, 255), 8) for p in edge)
    # state strip colours are painted too (the palette's first entries)
    assert any(_near(p, tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)), 10)
               for row in rows[::4] for p in row[::2] for c in svg.PALETTE[:3])
    if os.environ.get("KEEP_SCREENSHOT"):
        shutil.copy(str(shot), os.environ["KEEP_SCREENSHOT"])


# --- the same on PostgreSQL ----------------------------------------------------------------------

from tests.test_collector_store import pg_server, pg_url  # noqa: E402,F401 -- the real server fixture


@pytest.mark.postgres
def test_device_page_metrics_and_influx_on_postgresql(pg_url):  # noqa: F811 -- the fixture
    from tests.test_collector_metrics import strict_parse

    app = make_app(None, db=pg_url, clock=lambda: T0)
    try:
        c = _Client(app)
        st, _, body = c.call("POST", "/api/v1/batches", encode({"agent": AGENT, "records": _records()}).rstrip(b"\n"))
        assert st == 200 and json.loads(body)["stored"] == len(_records()), body
        rollup.drain(app.store)
        html = _page(c)
        assert re.findall(r'class="chartbox" data-level="(\w+)"', html) == ["1m", "1m", "1h"]
        assert html.count('class="strip"') == 4 and "ILLEGAL DATA ADDRESS" in html and "exceptions.2" in html
        assert "<script" not in html and "<b>" not in html
        st, _, body = c.call("GET", "/metrics")
        fams = strict_parse(body.decode("utf-8"))
        [(labels, seq)] = fams["modbus_agent_max_seq"]["samples"]
        assert labels == {"agent": AGENT} and seq == len(_records()) - 1
        st, _, body = c.call("GET", "/api/v1/records", qs="format=influx&kind=data&status=ok")
        lines = body.decode("utf-8").splitlines()
        assert len(lines) == 120 + 3        # 120 readings, the buffered record's 3 samples
        lpp = pytest.importorskip("line_protocol_parser")
        assert lpp.parse_line(lines[-1])["fields"] == {"voltage": 252.0, "mode": "run", "alarm": False}
    finally:
        app.close()


# --- alerts, when the collector has them (the alerts branch) -------------------------------------

def test_device_page_and_metrics_show_the_devices_alerts(tmp_path):
    pytest.importorskip("agent.collector.alerts", reason="no alerts module in this tree")
    from tests.test_collector_metrics import strict_parse

    ini = tmp_path / "c.ini"
    ini.write_text("[collector]\ndb = sqlite:///%s\n\n[alert:high-voltage]\nkind = threshold\ndevice = *\n"
                   "point = voltage\nabove = 235\nfor = 0s\nseverity = critical\n" % (tmp_path / "a.db"))
    app = make_app(str(ini), clock=lambda: T0)
    try:
        c = _Client(app)
        st, _, body = c.call("POST", "/api/v1/batches", encode({"agent": AGENT, "records": _records()}).rstrip(b"\n"))
        assert st == 200, body
        html = _page(c)
        assert 'id="alerts"' in html and "high-voltage" in html and "firing critical" in html
        assert 'id="alert-history"' in html and "[FIRING critical] high-voltage: site&lt;7&gt;" in html
        fams = strict_parse(c.call("GET", "/metrics")[2].decode("utf-8"))
        assert [(lab["rule"], lab["device"], lab["point"], v) for lab, v in fams["modbus_alert_firing"]["samples"]] \
            == [("high-voltage", DEVICE, "voltage", 1)]
    finally:
        app.close()
    # without rules: no alerts section, no alert family
    app = make_app(None, db="sqlite:///%s" % (tmp_path / "a.db"), clock=lambda: T0)
    try:
        c = _Client(app)
        assert "Alerts" not in _page(c) and "modbus_alert_firing" not in c.call("GET", "/metrics")[2].decode()
    finally:
        app.close()


def test_state_strips_say_where_they_start_when_more_readings_than_one_page_reads(client, monkeypatch):
    from agent.collector import device_page

    pts, cut = device_page.recent_samples(client.app.store, AGENT, DEVICE, utc_timestamp(T0 - 86400), limit=10)
    assert cut is not None and cut > T0 - 7200 and min(p[0] for p in pts["mode"]) >= cut
    assert device_page.recent_samples(client.app.store, AGENT, DEVICE, utc_timestamp(T0 - 86400))[1] is None
    monkeypatch.setattr(device_page, "STATE_ROWS", 10)
    html = _page(client)
    labels = re.findall(r'<svg class="strip"[^>]* aria-label="([^"]*)"', html)
    assert len(labels) == 4 and all(lab.endswith(": the newest 10 readings)") for lab in labels), labels


def test_with_rollups_off_the_charts_come_from_raw_records_and_a_too_long_range_says_so(tmp_path, monkeypatch):
    from agent.collector import series

    app = make_app(None, db="sqlite:///%s" % (tmp_path / "off.db"), clock=lambda: T0, rollups="off")
    try:
        c = _Client(app)
        assert c.call("POST", "/api/v1/batches", encode({"agent": AGENT, "records": _records()}).rstrip(b"\n"))[0] == 200
        html = _page(c)
        assert re.findall(r'class="chartbox" data-level="(\w+)"', html) == ["raw", "raw", "raw"]
        assert html.count("<polyline") >= 3
        monkeypatch.setattr(series, "MAX_RAW_RECORDS", 50)   # a week of readings beyond what a query may read
        html = _page(c)
        assert html.count('class="note"') == 3 and "more than 50 records" in html
    finally:
        app.close()


@pytest.mark.parametrize("agent, device", [("site-dot", ".."), ("site-dot", "."), ("..", "m1"), (".", "m1")])
def test_a_device_or_agent_named_dot_or_dot_dot_has_a_link_a_browser_can_follow(tmp_path, agent, device):
    """A browser removes dot segments (RFC 3986 5.2.4) before it asks: /device/site/.. would be
    /device/, so the link must not put such a name in the path."""
    from urllib.parse import urljoin, urlsplit

    app = make_app(None, db="sqlite:///%s" % (tmp_path / "t.db"), clock=lambda: T0)
    try:
        c = _Client(app)
        rec = {"agent": agent, "seq": 1, "ts": utc_timestamp(T0 - 30), "device": device, "unit": 1,
               "values": {"v": 1.5}, "status": "ok"}
        assert c.call("POST", "/api/v1/batches", encode({"agent": agent, "records": [rec]}))[0] == 200
        p = _Strict()
        p.feed(c.call("GET", "/")[2].decode("utf-8"))
        links = [h for h in p.links if h and h.startswith("/device")]
        assert len(links) == 1
        u = urlsplit(urljoin("http://collector/", links[0]))  # as the browser resolves it
        st, _, page = c.get_url(u.path + ("?" + u.query if u.query else ""))
        assert st == 200 and b"<svg" in page
    finally:
        app.close()


@pytest.mark.parametrize("lo, hi", [(-1.7976931348623157e308, 1.7976931348623157e308), (-1e308, 1e308),
                                    (0.0, 5e-324), (1e-320, 2e-320)])
def test_chart_of_values_at_the_ends_of_the_float_range_is_drawn(lo, hi):
    """A float64 point whose band spans more than the largest float (hi - lo overflows), or less
    than the smallest (a subnormal span): the page drew nothing but a 500 (OverflowError,
    ValueError from log10(0))."""
    r = svg.nice_range(lo, hi)
    assert all(math.isfinite(v) for v in r) and r[0] <= lo and r[1] >= hi and r[2] > 0
    buckets = [{"t": utc_timestamp(T0 - 600), "min": lo, "max": hi, "avg": lo / 2 + hi / 2},
               {"t": utc_timestamp(T0 - 540), "min": hi, "max": hi, "avg": hi}]
    text = svg.chart(buckets, T0 - 3600, T0, 60, label="p")
    ET.fromstring(text)
    assert "nan" not in text and "inf" not in text and 'class="band"' in text
