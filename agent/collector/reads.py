"""The collector's read endpoints: GET /health, /api/v1/devices, /api/v1/agents, /api/v1/records
(query checks, then a streamed export: agent/collector/export.py) and the status page (/).

Every read but /health needs read_token when one is set (app.check_read_access). Query
parameters are checked before any query runs: unknown ones, bad times and counts are 400 naming
the parameter. An export covers what was stored when it began (received before now), and its
first page is fetched before the answer starts, so a database error is a 503, not a cut 200.
"""
import json
import re
from urllib.parse import parse_qs

from agent.collector import influx, page, validate
from agent.collector.config import redact
from agent.collector.export import primed, stream_csv, stream_json, stream_jsonl
from agent.collector.samples import samples
from agent.collector.store import finite
from agent.collector.web import HTTPError, json_answer, status
from agent.wire import utc_timestamp

MAX_LIMIT = (1 << 63) - 1  # the largest LIMIT both databases take (a signed 64-bit integer)
_COUNT = re.compile(r"[0-9]{1,19}", re.ASCII)  # ASCII digits only: int() reads other scripts' too
_MAX_EPOCH = 253402300799.999  # 9999-12-31T23:59:59.999Z: ts text with a 4-digit year sorts as time


def _loads_finite(text):
    """Stored JSON text -> value, numbers beyond float range as None (JSON has no infinity)."""
    return None if not text else finite(json.loads(text))


def get_health(app, environ, start_response):
    try:
        version = app.store.ping()
    except Exception as e:  # any driver error: the answer is "not healthy", not a 500
        return json_answer(start_response, 503, {"status": "error", "db": "unreachable: %s" % redact(e),
                                                 "where": "storage"})
    return json_answer(start_response, 200, {"status": "ok", "db": "ok", "schema": version,
                                             "time": utc_timestamp(app.clock())})


def device_view(app):
    """Devices with parsed last values, age and freshness (for the API and the page)."""
    now = app.clock()
    out = []
    for d in app.store.devices():
        age = now - d["last_seen"]
        out.append({
            "agent": d["agent"], "device": d["device"], "unit": d["unit"],
            "last_seen": utc_timestamp(d["last_seen"]), "age_s": round(age, 1),
            "fresh": age <= app.cfg.stale_after, "last_ts": d["last_ts"], "last_status": d["last_status"],
            "values_ts": d["values_ts"],
            "values": _loads_finite(d["last_values"]),
            "error_ts": d["error_ts"], "last_error": _loads_finite(d["last_error"]),
            "health_ts": d["health_ts"], "health": _loads_finite(d["health"]),
            "records": d["records"], "errors": d["errors"],
        })
    return out


def agent_view(app):
    now = app.clock()
    own = agent_self(app.store.devices())
    return [dict(a, first_seen=utc_timestamp(a["first_seen"]), last_seen=utc_timestamp(a["last_seen"]),
                 age_s=round(now - a["last_seen"], 1), **own.get(a["agent"], {}))
            for a in app.store.agents()]


def agent_self(devices):
    """agent -> {"self": the agent's own figures, "self_ts": when}: the "agent" object of its
    newest health record (every device's health record carries it, agent.health.SelfMonitor)."""
    out = {}
    for d in devices:
        ts = d["health_ts"]
        if not ts or (d["agent"] in out and out[d["agent"]]["self_ts"] >= ts):
            continue
        health = _loads_finite(d["health"])
        own = health.get("agent") if isinstance(health, dict) else None
        if isinstance(own, dict):
            out[d["agent"]] = {"self": own, "self_ts": ts}
    return out


def get_devices(app, environ, start_response):
    app.check_read_access(environ)
    return json_answer(start_response, 200, {"devices": device_view(app)})


def get_agents(app, environ, start_response):
    app.check_read_access(environ)
    return json_answer(start_response, 200, {"agents": agent_view(app)})


def get_page(app, environ, start_response):
    app.check_read_access(environ)
    now = app.clock()
    since = utc_timestamp(now - 3600)
    devices = device_view(app)
    series = {(d["agent"], d["device"]): sample_rows(app.store.series(d["agent"], d["device"], since))
              for d in devices}
    alerts = app.alerts.current() if app.alerts is not None else None
    body = page.render(agent_view(app), devices, series, now, app.cfg.refresh, alerts).encode("utf-8")
    start_response(status(200), [("Content-Type", "text/html; charset=utf-8"),
                                 ("Content-Length", str(len(body))), ("Cache-Control", "no-store")])
    return [body]


def sample_rows(rows):
    """(ts, payload) rows of readings -> (ts, payload) per reading: a buffered record's samples
    each as {"values": ...} at its own ts (agent.collector.samples), others as they are."""
    out = []
    for ts, payload in rows:
        if type(payload) is str and '"samples":[' not in payload:
            out.append((ts, payload))
            continue
        try:
            rec = json.loads(payload) if type(payload) is str else payload
        except ValueError:
            continue
        out.extend((sts, {"values": values}) for sts, values in samples(rec))
    return out


def get_records(app, environ, start_response):
    app.check_read_access(environ)
    q = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
    allowed = ("agent", "device", "since", "until", "kind", "status", "limit", "format")
    for k in q:
        if k not in allowed:
            raise HTTPError(400, "unknown parameter (known: %s)" % ", ".join(allowed), k)
    arg = {k: v[-1] for k, v in q.items() if v and v[-1] != ""}
    fmt = arg.pop("format", "json")
    if fmt not in ("json", "jsonl", "csv", "influx"):
        raise HTTPError(400, "format must be json, jsonl, csv or influx", "format")
    for k in ("agent", "device"):
        if k in arg:
            arg[k] = parse_name(arg[k], k)
    for k in ("since", "until"):
        if k in arg:
            arg[k] = parse_time(arg[k], k)
    if "limit" in arg:
        arg["limit"] = parse_count(arg["limit"], "limit")
    if arg.get("kind") not in (None, "data", "gap", "health"):
        raise HTTPError(400, "kind must be data, gap or health", "kind")
    if arg.get("status") not in (None, "ok", "partial", "error"):
        raise HTTPError(400, "status must be ok, partial or error", "status")
    # Only what was stored when the export began: under ingest, paging would chase new rows.
    rows = app.store.records(received_before=app.clock(), **arg)
    rows = primed(rows)  # the first page now: a database error is a 503, not a cut-off 200
    ctype = {"json": "application/json", "jsonl": "application/x-ndjson",
             "csv": "text/csv; charset=utf-8", "influx": "text/plain; charset=utf-8"}[fmt]
    start_response(status(200), [("Content-Type", ctype), ("Cache-Control", "no-store")])
    if fmt == "influx":  # InfluxDB line protocol (agent/collector/influx.py)
        return influx.stream_records(rows)
    return {"json": stream_json, "jsonl": stream_jsonl, "csv": stream_csv}[fmt](rows)


def parse_count(text, where):
    """Query count: plain ASCII digits, 0..2^63-1, or HTTPError 400 naming the parameter."""
    if _COUNT.fullmatch(text) is None or int(text) > MAX_LIMIT:
        raise HTTPError(400, "%s must be an integer 0..%d" % (where, MAX_LIMIT), where)
    return int(text)


def parse_name(text, where):
    """Query agent/device name: what a record's can be (1..128 characters, no NUL)."""
    if len(text) > validate.MAX_NAME or "\x00" in text:
        raise HTTPError(400, "%s must be at most %d characters, without NUL" % (where, validate.MAX_NAME), where)
    return text


def parse_time(text, where):
    """Query time: ISO UTC ('2026-11-21T10:30:45Z', '2026-11-21 10:30:45', '2026-11-21') or epoch seconds."""
    t = text.strip()
    try:
        secs = float(t)
    except ValueError:
        pass
    else:
        if not -_MAX_EPOCH <= secs <= _MAX_EPOCH:  # NaN fails too
            raise HTTPError(400, "epoch seconds out of range (up to %d, year 9999)" % _MAX_EPOCH, where)
        if secs < 0:
            secs = 0.0  # before any record (validate refuses years before 1970)
        return utc_timestamp(secs)
    if len(t) == 10:
        t += "T00:00:00"
    t = t.replace(" ", "T")
    if not t.endswith("Z"):
        t += "Z"
    ts = validate.normalize_ts(t)
    if ts is None:
        raise HTTPError(400, "expected an ISO UTC time (2026-11-21T10:30:45Z) or epoch seconds", where)
    return ts
