"""GET /metrics: the collector in the Prometheus text exposition format (version 0.0.4).

Two kinds of figures:
- this process's ingest counters (Counters, kept in memory since it started): batches, records
  stored and duplicate, refused requests by HTTP status, database errors. Under
  `--workers N` or gunicorn each process counts its own and a scrape reaches one of them, so
  sum them with `sum without (instance, pid)` only when each process is scraped on its own port;
  the counters carry a `pid` label so two processes never look like one counter going back.
- the database's view, the same from every process: per agent last seen, max seq, records, gaps
  and dropped records; per device last seen, age, freshness, records and failed readings, the
  last reading's status; the alert series firing or pending (when rules are configured); and,
  with `[collector] metrics_values = yes`, the last value of every numeric point (bools as 0/1).

A database that cannot be read still gives an answer (200): the counters plus
modbus_collector_db_up 0, so the scrape itself says what is wrong.
"""
import math
import os
import threading

from agent import __version__
from agent.collector.web import status

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Counters:
    """Ingest counters of this process (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.batches = {}       # route -> count
        self.stored = 0
        self.duplicates = 0
        self.refused = {}       # (route, status) -> count
        self.db_errors = 0

    def batch(self, route, stored, duplicates):
        with self._lock:
            self.batches[route] = self.batches.get(route, 0) + 1
            self.stored += stored
            self.duplicates += duplicates

    def refuse(self, route, code):
        with self._lock:
            key = (route, str(code))
            self.refused[key] = self.refused.get(key, 0) + 1

    def db_error(self):
        with self._lock:
            self.db_errors += 1

    def snapshot(self):
        with self._lock:
            return dict(self.batches), self.stored, self.duplicates, dict(self.refused), self.db_errors


# The routes a refusal is counted under: a fixed set, so a scanner's random paths do not grow
# the label set without bound.
ROUTES = ("/api/v1/batches", "/receive-data", "/api/v1/records", "/api/v1/devices", "/api/v1/agents",
          "/api/v1/series", "/api/v1/alerts", "/health", "/metrics", "/device", "/")


def route_label(path):
    if path in ROUTES:
        return path
    if path.startswith("/device/"):
        return "/device"
    return "other"


def escape_label(v):
    """A label value in the text format: backslash, double quote and line feed escaped."""
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _help(text):
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def number(v):
    """A sample value: Go's float syntax (+Inf, -Inf, NaN; integers as they are)."""
    if type(v) is bool:
        return "1" if v else "0"
    if type(v) is int:
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


class Exposition:
    """Families in order, each with HELP and TYPE once, then its samples."""

    def __init__(self):
        self.lines = []

    def family(self, name, kind, help_text, samples):
        """samples: [(labels dict, value)]; a family without samples still says what it is."""
        self.lines.append("# HELP %s %s" % (name, _help(help_text)))
        self.lines.append("# TYPE %s %s" % (name, kind))
        for labels, value in samples:
            if labels:
                lab = ",".join('%s="%s"' % (k, escape_label(v)) for k, v in labels.items())
                self.lines.append("%s{%s} %s" % (name, lab, number(value)))
            else:
                self.lines.append("%s %s" % (name, number(value)))

    def text(self):
        return "\n".join(self.lines) + "\n"


def _alert_states(app):
    """The alerts engine's current (firing, pending) series, or None without an engine."""
    engine = getattr(app, "alerts", None)
    return None if engine is None else list(engine.current())


def render(app, now):
    import json

    out = Exposition()
    pid = {"pid": str(os.getpid())}
    batches, stored, dups, refused, db_errors = app.counters.snapshot()
    out.family("modbus_collector_info", "gauge", "The collector's version.", [({"version": __version__}, 1)])
    out.family("modbus_collector_batches_total", "counter", "Batches stored by this process, by route.",
               [(dict(pid, route=r), n) for r, n in sorted(batches.items())])
    out.family("modbus_collector_records_stored_total", "counter",
               "Records newly stored by this process.", [(pid, stored)])
    out.family("modbus_collector_records_duplicate_total", "counter",
               "Records received again and skipped (already stored) by this process.", [(pid, dups)])
    out.family("modbus_collector_requests_refused_total", "counter",
               "Requests this process answered with an error status, by route and status.",
               [(dict(pid, route=r, status=s), n) for (r, s), n in sorted(refused.items())])
    db_up, agents, devices, alert_states = 1, [], [], None
    try:
        agents = app.store.agents()
        devices = app.store.devices()
        alert_states = _alert_states(app)
    except app._db_errors:
        app.counters.db_error()
        db_errors += 1
        db_up = 0
    out.family("modbus_collector_db_errors_total", "counter",
               "Requests of this process that failed on the database (answered 503).", [(pid, db_errors)])
    out.family("modbus_collector_db_up", "gauge", "1 when this scrape could read the database.", [({}, db_up)])
    out.family("modbus_agent_last_seen_timestamp_seconds", "gauge", "When the agent's last batch was stored.",
               [({"agent": a["agent"]}, float(a["last_seen"])) for a in agents])
    out.family("modbus_agent_max_seq", "gauge", "Highest sequence number stored for the agent.",
               [({"agent": a["agent"]}, a["max_seq"]) for a in agents])
    out.family("modbus_agent_records_total", "counter", "Records stored for the agent.",
               [({"agent": a["agent"]}, a["records"]) for a in agents])
    out.family("modbus_agent_gaps_total", "counter", "Gap records the agent sent (spool losses).",
               [({"agent": a["agent"]}, a["gaps"]) for a in agents])
    out.family("modbus_agent_dropped_records_total", "counter", "Records the agent reported lost in gaps.",
               [({"agent": a["agent"]}, a["dropped"]) for a in agents])
    stale = app.cfg.stale_after
    dev = [({"agent": d["agent"], "device": d["device"]}, d) for d in devices]
    out.family("modbus_device_last_seen_timestamp_seconds", "gauge",
               "When a batch with the device's records was last stored.",
               [(lab, float(d["last_seen"])) for lab, d in dev])
    out.family("modbus_device_age_seconds", "gauge", "Seconds since the device's records were last stored.",
               [(lab, round(now - d["last_seen"], 3)) for lab, d in dev])
    out.family("modbus_device_fresh", "gauge", "1 when the device's records arrived within stale_after (%gs)."
               % stale, [(lab, 1 if now - d["last_seen"] <= stale else 0) for lab, d in dev])
    out.family("modbus_device_records_total", "counter", "Records stored for the device.",
               [(lab, d["records"]) for lab, d in dev])
    out.family("modbus_device_failed_readings_total", "counter", "Readings with status error or partial.",
               [(lab, d["errors"]) for lab, d in dev])
    out.family("modbus_device_last_status", "gauge", "1 for the status of the device's newest reading.",
               [(dict(lab, status=d["last_status"]), 1) for lab, d in dev if d["last_status"]])
    if alert_states is not None:
        out.family("modbus_alert_firing", "gauge",
                   "Alert series now firing (1) or pending (0); resolved ones are not listed.",
                   [({"rule": a.get("rule") or "", "severity": a.get("severity") or "", "agent": a.get("agent") or "",
                      "device": a.get("device") or "", "point": a.get("point") or ""},
                     1 if a.get("state") == "firing" else 0) for a in alert_states])
    if app.cfg.metrics_values:
        samples = []
        for lab, d in dev:
            try:
                values = json.loads(d["last_values"]) if d["last_values"] else {}
            except ValueError:
                continue
            for k, v in (values or {}).items():
                if type(v) in (int, float, bool):
                    if type(v) is float and not math.isfinite(v):
                        continue
                    samples.append((dict(lab, point=k), v))
        out.family("modbus_point_value", "gauge", "Last value of each numeric point (bools as 0/1).", samples)
    return out.text()


def get_metrics(app, environ, start_response):
    app.check_read_access(environ)
    body = render(app, app.clock()).encode("utf-8")
    start_response(status(200), [("Content-Type", CONTENT_TYPE), ("Content-Length", str(len(body))),
                                 ("Cache-Control", "no-store")])
    return [body]
