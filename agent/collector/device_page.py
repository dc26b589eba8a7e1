"""GET /device/AGENT/DEVICE: one device's page. Server-rendered HTML with inline SVG
(agent/collector/svg.py), no JavaScript, one column that fits a phone.

What it shows, and where each part comes from:
- last values (devices.last_values); records carry no engineering units (a point's `unit =` in
  the agent's INI stays on the router), so a value is shown with its point name only;
- per numeric point, the last hour, day and week as a min-max band and an average line, from
  the rollups (series.query_series picks the level for the step);
- per non-numeric point (enum labels, strings, bools), a state strip of the last hour and day
  from the raw records, read through samples() (buffered records give every sample);
- the last health record's counters, the device's recent failed readings (error, partial), and
  its alerts (firing, pending, recent events) when the collector evaluates alert rules.
"""
import json
import math
from html import escape
from urllib.parse import parse_qs, quote, urlencode

from agent.collector import series, svg
from agent.collector.samples import samples
from agent.collector.web import HTTPError, status
from agent.common import format_age, parse_utc
from agent.wire import utc_timestamp

# (label, seconds, step): the step gives about 60-170 buckets per chart
WINDOWS = (("last hour", 3600, 60), ("last day", 86400, 900), ("last week", 7 * 86400, 3600))
STATE_WINDOWS = (("last hour", 3600), ("last day", 86400))
STATE_ROWS = 10000      # raw records read for the state strips (the newest): a day at 10 s
RECENT_ERRORS = 20
# The page runs no script and loads nothing: should a name ever slip through unescaped, the
# browser still runs nothing (defence in depth; every text is escaped).
CSP = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


def device_url(agent, device):
    """The page's path for (agent, device): each name one percent-encoded path segment (the
    query form when the agent's name holds '/', which the path form cannot tell apart, or when
    a name is '.' or '..': a browser resolves those dot segments away before it asks)."""
    if "/" in agent or agent in (".", "..") or device in (".", ".."):
        return "/device?" + urlencode({"agent": agent, "device": device})
    return "/device/%s/%s" % (quote(agent, safe=""), quote(device, safe=""))


def is_number(v):
    return type(v) in (int, float) and (type(v) is int or math.isfinite(v))


def split_points(values):
    """Last values -> (numeric point names, other point names), each in record order."""
    nums, others = [], []
    for k, v in (values or {}).items():
        (nums if is_number(v) else others).append(k)
    return nums, others


def recent_samples(store, agent, device, since, limit=None):
    """({point: [(epoch, value)]} oldest first, cut) from the device's raw records since `since`
    (samples(): buffered ones give every sample). Only the newest `limit` records are read: `cut`
    is then the epoch the read ones begin at (older ones left out), else None."""
    out = {}
    limit = STATE_ROWS if limit is None else limit
    rows = store.series(agent, device, since, limit=limit)
    for _ts, payload in rows:
        rec = json.loads(payload) if isinstance(payload, str) else payload
        for sts, values in samples(rec):
            t = parse_utc(sts) if isinstance(sts, str) and sts >= since else None
            if t is None:
                continue
            for k, v in values.items():
                out.setdefault(k, []).append((t, v))
    for pts in out.values():
        pts.sort(key=lambda p: p[0])
    cut = parse_utc(rows[0][0]) if len(rows) >= limit else None
    return out, cut


def recent_errors(store, agent, device, n=RECENT_ERRORS):
    """The device's newest failed readings (status error or partial), newest first:
    [(ts, status, message)]."""
    with store._read() as cur:
        cur.execute(store._sql(
            "SELECT ts, status, %s FROM records WHERE agent = ? AND device = ? AND kind = 'data' "
            "AND status IN ('error', 'partial') ORDER BY ts DESC LIMIT ?" % store._payload_text),
            (agent, device, n))
        rows = cur.fetchall()
    out = []
    for ts, st, payload in rows:
        rec = json.loads(payload) if isinstance(payload, str) else payload
        if st == "partial":
            msgs = [e.get("message") for e in rec.get("errors") or () if type(e) is dict]
            msg = "; ".join(m for m in msgs if isinstance(m, str)) or "some points failed"
        else:
            err = rec.get("error")
            msg = err.get("message") if type(err) is dict else None
            msg = msg if isinstance(msg, str) else json.dumps(err)
        out.append((ts, st, msg))
    return out


ALERT_HISTORY = 200  # newest alert events looked through for the device's own


def device_alerts(app, agent, device):
    """The device's alerts when the collector evaluates any (app.alerts: the alerts engine,
    agent/collector/alerts): (current, history) as GET /api/v1/alerts gives them, only this
    device's (and its agent's agent-wide ones: gap, backlog); None without an engine."""
    engine = getattr(app, "alerts", None)
    if engine is None:
        return None
    view = engine.view(ALERT_HISTORY, None)

    def mine(a):
        return a.get("agent") == agent and a.get("device") in (device, "", None)

    return ([a for a in view.get("current") or () if mine(a)],
            [e for e in view.get("history") or () if mine(e)][:10])


def collect(app, agent, device, now):
    """Everything the page shows, as plain data (None when the device is unknown)."""
    d = None
    for row in app.store.devices():
        if row["agent"] == agent and row["device"] == device:
            d = row
            break
    if d is None:
        return None
    values = _loads(d["last_values"]) or {}
    # Which points: the last values', those seen in the last day's raw records (a partial
    # reading's last values lack the refused ones) and those the rollups hold; numeric or not
    # by the newest value seen.
    recent, cut = recent_samples(app.store, agent, device, utc_timestamp(now - max(s for _l, s in STATE_WINDOWS)))
    newest = {k: pts[-1][1] for k, pts in recent.items()}
    newest.update(values)
    for name in series.points(app.store, agent, device):
        newest.setdefault(name, 0)
    nums, others = split_points(newest)
    until = utc_timestamp(now)
    charts = []
    for name in nums:
        per = []
        for label, secs, step in WINDOWS:
            since = now - secs
            try:
                res = series.query_series(app.store, agent, device, name, utc_timestamp(since), until, step)
            except HTTPError as e:  # rollups = off and more raw records than a query may read
                res = {"level": "raw", "buckets": [], "note": e.error}
            per.append((label, since, res.get("step", step), res.get("buckets") or [], res.get("level"),
                        res.get("note")))
        charts.append((name, per))
    states = [(name, recent.get(name, [])) for name in others]
    return {"device": d, "values": values, "charts": charts, "states": states, "states_cut": cut,
            "health": _loads(d["health"]), "last_error": _loads(d["last_error"]),
            "errors": recent_errors(app.store, agent, device),
            "alerts": device_alerts(app, agent, device),
            "stale_after": app.cfg.stale_after}


def _loads(text):
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _value_text(v):
    if type(v) is float:
        return svg.fmt_number(v) if abs(v) < 1e15 else repr(v)
    if isinstance(v, str):
        return v
    return json.dumps(v)


CSS = """body{font:15px system-ui,sans-serif;margin:0 auto;padding:0.8em;max-width:680px;color:#222;overflow-wrap:anywhere}
h1{font-size:1.3em;margin:0.2em 0}h2{font-size:1.1em;margin:1.2em 0 0.4em;border-bottom:1px solid #ddd}
h3{font-size:1em;margin:0.8em 0 0.2em}table{border-collapse:collapse;width:100%}
td,th{padding:3px 6px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
td.num{font-family:monospace;text-align:right;white-space:nowrap}svg{display:block;width:100%;height:auto}
.stale{color:#a60}.ok{color:#070}.err{color:#b00}.partial{color:#b70}small{color:#777}
.point{margin-bottom:1em}nav a{margin-right:1em}td.st{white-space:nowrap}#errors td.num{font-size:12px;white-space:normal}"""


def render(data, now, agent, device):
    d = data["device"]
    age = now - d["last_seen"]
    fresh = age <= data["stale_after"]
    status = d["last_status"] or "-"
    cls = {"ok": "ok", "partial": "partial"}.get(status, "err")
    title = "%s / %s" % (agent, device)
    out = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           '<title>%s - modbus-collector</title><style>%s</style></head><body>' % (escape(title), CSS),
           '<nav><a href="/">&larr; all devices</a></nav>',
           '<h1 id="title">%s <small>/</small> %s</h1>' % (escape(agent), escape(device)),
           '<p id="summary">unit %s &middot; <span class="%s">last seen %s ago</span> &middot; '
           'last reading <span class="%s">%s</span> &middot; %d records, %d failed</p>'
           % ("-" if d["unit"] is None else int(d["unit"]), "ok" if fresh else "stale",
              escape(format_age(age, precise=False)), cls, escape(status), d["records"], d["errors"])]
    # last values
    values = data["values"]
    out.append('<h2>Last values</h2>')
    if values:
        out.append('<p><small>at %s (units are not sent by the agent)</small></p><table id="values">'
                   % escape(d["values_ts"] or "?"))
        for k, v in values.items():
            out.append('<tr><td>%s</td><td class="num">%s</td></tr>' % (escape(k), escape(_value_text(v))))
        out.append('</table>')
    else:
        out.append('<p><small>no values yet</small></p>')
    # alerts (only when the collector evaluates any)
    if data["alerts"] is not None:
        current, history = data["alerts"]
        out.append('<h2>Alerts</h2>')
        if current:
            out.append('<table id="alerts">')
            for a in current:
                what = " ".join(str(x) for x in (a.get("point"), a.get("condition")) if x)
                out.append('<tr><td>%s</td><td class="st %s">%s</td><td>%s</td><td>%s</td><td class="num">%s</td></tr>'
                           % (escape(str(a.get("rule", ""))), "err" if a.get("state") == "firing" else "partial",
                              escape("%s %s" % (a.get("state", ""), a.get("severity") or "")),
                              escape(what), escape(_value_text(a.get("value"))),
                              escape(str(a.get("since") or ""))))
            out.append('</table>')
        else:
            out.append('<p><small>none firing or pending</small></p>')
        if history:
            out.append('<table id="alert-history">')
            for e in history:
                out.append('<tr><td class="num">%s</td><td>%s</td><td>%s</td></tr>'
                           % (escape(str(e.get("ts") or e.get("at") or "")), escape(str(e.get("state") or "")),
                              escape(str(e.get("message") or "")[:300])))
            out.append('</table>')
    # charts
    if data["charts"]:
        out.append('<h2>Charts</h2><p><small>band: min to max of each interval; line: average</small></p>')
    for name, per in data["charts"]:
        out.append('<div class="point" data-point="%s"><h3>%s</h3>' % (escape(name), escape(name)))
        for label, since, step, buckets, level, note in per:
            out.append('<div class="chartbox" data-level="%s">%s%s</div>'
                       % (escape(str(level)), svg.chart(buckets, since, now, step, label="%s \u2014 %s" % (name, label)),
                          '<p class="note"><small>%s</small></p>' % escape(note) if note else ""))
        out.append('</div>')
    if data["states"]:
        out.append('<h2>States</h2>')
    for name, pts in data["states"]:
        out.append('<div class="point" data-point="%s"><h3>%s</h3>' % (escape(name), escape(name)))
        for label, secs in STATE_WINDOWS:
            since = now - secs
            sel = [p for p in pts if p[0] >= since]
            spans = svg.state_spans(sel, now, stale=data["stale_after"])
            cut = data["states_cut"]
            if cut is not None and cut > since:  # more readings than one page reads: say where it starts
                label += " (from %s: the newest %d readings)" % (utc_timestamp(cut)[11:16], STATE_ROWS)
            out.append(svg.state_strip(spans, since, now, label="%s \u2014 %s" % (name, label)))
        out.append('</div>')
    # health
    out.append('<h2>Health</h2>')
    health = data["health"]
    if health:
        out.append('<p><small>from the agent, at %s</small></p><table id="health">' % escape(d["health_ts"] or "?"))
        for k, v in _flat(health):
            out.append('<tr><td>%s</td><td class="num">%s</td></tr>' % (escape(k), escape(_value_text(v))))
        out.append('</table>')
    else:
        out.append('<p><small>no health record yet</small></p>')
    # errors
    out.append('<h2>Recent errors</h2>')
    if data["errors"]:
        out.append('<table id="errors">')
        for ts, st, msg in data["errors"]:
            out.append('<tr><td class="num">%s</td><td class="st %s">%s</td><td>%s</td></tr>'
                       % (escape(ts), "partial" if st == "partial" else "err", escape(st), escape(msg[:300])))
        out.append('</table>')
    else:
        out.append('<p><small>none</small></p>')
    out.append('<p><small>generated %s</small></p></body></html>' % utc_timestamp(now))
    return "".join(out)


def _flat(obj, prefix=""):
    """A health dict as (dotted key, scalar) rows: exceptions {"2": 3} -> exceptions.2 = 3."""
    for k, v in obj.items():
        key = "%s%s" % (prefix, k)
        if type(v) is dict:
            yield from _flat(v, key + ".")
        else:
            yield key, v


def parse_target(environ):
    """(agent, device) of a request: /device/AGENT/DEVICE (PATH_INFO, percent-decoded by the
    server as Latin-1 per PEP 3333: re-read as UTF-8; the device is everything after the agent's
    segment, so a device name may hold '/'), or /device?agent=A&device=D (any names)."""
    from agent.collector.reads import parse_name

    path = environ.get("PATH_INFO") or ""
    if path == "/device":
        q = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        for k in q:
            if k not in ("agent", "device"):
                raise HTTPError(400, "unknown parameter (known: agent, device)", k)
        agent, device = (q.get("agent") or [""])[-1], (q.get("device") or [""])[-1]
        if not agent or not device:
            raise HTTPError(400, "expected /device/AGENT/DEVICE or /device?agent=A&device=D", "path")
    else:
        rest = path[len("/device/"):]
        try:
            rest = rest.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            raise HTTPError(400, "device path is not UTF-8", "path") from None
        agent, sep, device = rest.partition("/")
        if not agent or not sep or not device:
            raise HTTPError(404, "expected /device/AGENT/DEVICE", "path")
    return parse_name(agent, "agent"), parse_name(device, "device")


def get_device_page(app, environ, start_response):
    app.check_read_access(environ)
    agent, device = parse_target(environ)
    now = app.clock()
    data = collect(app, agent, device, now)
    if data is None:
        raise HTTPError(404, "no such device (agent %r, device %r)" % (agent[:64], device[:64]), "path")
    body = render(data, now, agent, device).encode("utf-8")
    start_response(status(200), [("Content-Type", "text/html; charset=utf-8"),
                                 ("Content-Length", str(len(body))), ("Cache-Control", "no-store"),
                                 ("Content-Security-Policy", CSP), ("X-Content-Type-Options", "nosniff")])
    return [body]
