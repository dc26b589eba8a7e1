"""The status page: server-rendered HTML, inline SVG sparklines, a meta refresh. No JavaScript."""
import json
import math
from html import escape

from agent.collector.device_page import device_url
from agent.common import format_age

SPARK_W, SPARK_H = 160, 28


def first_numeric(values):
    """Name of the first numeric (non-bool) value in a values dict, or None."""
    for k, v in (values or {}).items():
        if type(v) in (int, float):
            return k
    return None


def sparkline(points, width=SPARK_W, height=SPARK_H):
    """[(x, y), ...] -> an inline <svg> polyline scaled to the box; '' with fewer than 2 points."""
    if len(points) < 2:
        return ""
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    dx, dy = (x1 - x0) or 1.0, (y1 - y0) or 1.0
    coords = " ".join("%.1f,%.1f" % ((x - x0) / dx * (width - 2) + 1, height - 1 - (y - y0) / dy * (height - 2))
                      for x, y in points)
    return ('<svg class="spark" width="%d" height="%d" viewBox="0 0 %d %d" role="img" aria-label="last hour">'
            '<polyline fill="none" stroke="#2a6" stroke-width="1.5" points="%s"/></svg>'
            % (width, height, width, height, coords))


def _ts_seconds(ts):
    # '2026-11-21T10:30:45.123Z' -> seconds within a sortable day count; only relative x matters
    d = int(ts[8:10]) * 86400 + int(ts[11:13]) * 3600 + int(ts[14:16]) * 60
    return d + float(ts[17:23])


def series_points(rows, name):
    pts = []
    for ts, payload in rows:
        try:
            rec = json.loads(payload) if isinstance(payload, str) else payload
            v = (rec.get("values") or {}).get(name)
        except (ValueError, AttributeError):
            continue
        if type(v) in (int, float) and math.isfinite(v):
            pts.append((_ts_seconds(ts), float(v)))
    # a month boundary inside the hour would fold x; keep order by position instead
    if any(b[0] < a[0] for a, b in zip(pts, pts[1:])):
        pts = [(i, p[1]) for i, p in enumerate(pts)]
    return pts


def _fmt(v):
    if type(v) is float:
        return repr(v)  # the shortest text that is this float: the value as stored, not rounded
    return escape(json.dumps(v) if not isinstance(v, str) else v)


_STATUS_CLASS = {"ok": "ok", "partial": "partial"}  # anything else: "err"


def refused(err):
    """A partial reading's error (store._failure) -> 'bad, bad2 (exception 2 ILLEGAL DATA ADDRESS)'."""
    parts = []
    for e in err.get("errors") or ():
        if type(e) is not dict:
            continue
        points = ", ".join(str(p) for p in e.get("points") or ())
        if not points:
            points = "address %s+%s" % (e.get("address", "?"), e.get("count", "?"))
        if type(e.get("code")) is int:
            why = ("exception %d %s" % (e["code"], e.get("name") or "")).rstrip()
        else:
            why = str(e.get("kind") or "failed")
        parts.append("%s (%s)" % (points, why))
    return "; ".join(parts) or str(err.get("message") or "some points failed")


def _age(s):
    return format_age(s, precise=False)


def self_cell(own):
    """The agent's own figures (its newest health record's "agent" object) as one short line."""
    if not isinstance(own, dict):
        return "<small>-</small>"

    def num(key):
        v = own.get(key)
        return v if type(v) in (int, float) else None
    parts = []
    if num("cpu_pct") is not None:
        parts.append("cpu %.1f%%" % num("cpu_pct"))
    if num("cpu_ms_per_poll") is not None:
        parts.append("%.1f ms/poll" % num("cpu_ms_per_poll"))
    if num("rss_kb") is not None:
        parts.append("rss %.1f MB" % (num("rss_kb") / 1024.0))
    load = own.get("load")
    if isinstance(load, list) and load and type(load[0]) in (int, float):
        parts.append("load %.2f" % load[0])
    if num("spool_free_mb") is not None:
        parts.append("spool free %.0f MB" % num("spool_free_mb"))
    if num("uptime_s") is not None:
        parts.append("up %s" % _age(num("uptime_s")))
    return escape(", ".join(parts)) if parts else "<small>-</small>"


CSS = """body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;width:100%}th,td{padding:4px 8px;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}
th{background:#f4f4f4}.stale{color:#a60}.err{color:#b00}.ok{color:#070}.partial{color:#b70;background:#fff3d6}.vals{font-family:monospace;font-size:12px}
h2{margin-top:1.5em}small{color:#777}"""


def alerts_table(alerts):
    """The firing and pending alerts (alerts Engine.current()) as a table; '' when none is configured."""
    if alerts is None:
        return ""
    out = ['<h2>Alerts</h2><table id="alerts"><tr><th>state</th><th>severity</th><th>rule</th><th>series</th>'
           '<th>value</th><th>condition</th><th>since</th></tr>']
    for a in alerts:
        series = "/".join(escape(str(x)) for x in (a["agent"], a["device"]) if x)
        if a["point"]:
            series += " " + escape(a["point"])
        out.append('<tr class="alert %s" data-rule="%s"><td class="%s">%s</td><td>%s</td><td>%s</td><td>%s</td>'
                   '<td>%s</td><td>%s</td><td>%s</td></tr>'
                   % (a["state"], escape(a["rule"]), "err" if a["state"] == "firing" else "partial",
                      escape(a["state"]), escape(a["severity"]), escape(a["rule"]), series,
                      "" if a["value"] is None else _fmt(a["value"]), escape(a["condition"]),
                      escape(a["since"] or a["changed"] or "")))
    if not alerts:
        out.append('<tr><td colspan="7"><small>no alert is firing</small></td></tr>')
    out.append('</table>')
    return "".join(out)


def render(agents, devices, series, now, refresh=5, alerts=None):
    """agents/devices: the app's views; series: (agent, device) -> [(ts, record JSON), ...] of the last hour;
    alerts: the firing/pending alerts, or None when no rule is configured."""
    out = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
           '<meta http-equiv="refresh" content="%d">' % int(refresh),
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           '<title>modbus-collector</title><style>%s</style></head><body>' % CSS,
           '<h1>modbus-collector</h1>', alerts_table(alerts)]
    out.append('<h2>Agents</h2><table id="agents"><tr><th>agent</th><th>last seen</th><th>records</th>'
               '<th>max seq</th><th>gaps (dropped)</th><th>agent health</th></tr>')
    for a in agents:
        out.append('<tr class="agent"><td>%s</td><td>%s ago</td><td>%d</td><td>%s</td><td>%d (%d)</td>'
                   '<td class="self">%s</td></tr>'
                   % (escape(a["agent"]), _age(a["age_s"]), a["records"], a["max_seq"], a["gaps"], a["dropped"],
                      self_cell(a.get("self"))))
    if not agents:
        out.append('<tr><td colspan="6"><small>no agent has uploaded yet</small></td></tr>')
    out.append('</table><h2>Devices</h2><table id="devices"><tr><th>agent</th><th>device</th><th>unit</th>'
               '<th>age</th><th>status</th><th>last values</th><th>last hour</th><th>errors</th></tr>')
    for d in devices:
        values = d["values"] or {}
        name = first_numeric(values)
        spark = sparkline(series_points(series.get((d["agent"], d["device"]), []), name)) if name else ""
        status = d["last_status"] or "-"
        err = d["last_error"] or {}
        if status == "error":
            note = ' <small>%s</small>' % escape(str(err.get("message", ""))[:80])
        elif status == "partial":
            note = ' <small class="refused">refused: %s</small>' % escape(refused(err)[:200])
        else:
            note = ""
        vals = ", ".join("%s=%s" % (escape(str(k)), _fmt(v)) for k, v in list(values.items())[:8])
        if len(values) > 8:
            vals += ", &hellip;"
        out.append(
            '<tr class="device" data-agent="%s" data-device="%s"><td>%s</td><td><a href="%s">%s</a></td><td>%s</td>'
            '<td class="%s">%s</td><td class="%s">%s%s</td><td class="vals">%s</td><td>%s%s</td>'
            '<td title="%s">%d</td></tr>'
            % (escape(d["agent"]), escape(d["device"]), escape(d["agent"]),
               escape(device_url(d["agent"], d["device"])), escape(d["device"]),
               "" if d["unit"] is None else d["unit"], "ok" if d["fresh"] else "stale", _age(d["age_s"]),
               _STATUS_CLASS.get(status, "err"), escape(status), note,
               vals, spark, ' <small>%s</small>' % escape(name) if spark else "",
               escape(str(err.get("message", ""))), d["errors"]))
    if not devices:
        out.append('<tr><td colspan="8"><small>no device data yet</small></td></tr>')
    out.append('</table><p><small>refreshes every %ds</small></p></body></html>' % int(refresh))
    return "".join(out)
