"""GET /api/v1/alerts: the alerts firing and pending now, recent history, rules and notifiers.

    ?limit=N   history entries, newest first (default 100, at most 10000)
    ?since=T   history from this time on (ISO UTC or epoch seconds)

{"time", "current": [{"rule", "kind", "severity", "state", "agent", "device", "point", "value",
  "threshold", "condition", "since", "fired", "last_ts", "changed", "notified"}, ...],
 "history": [the events as the json notification format has them, minus "version"/"condition"],
 "rules": [{"name", "kind", "severity", "agent", "device", "condition", "repeat", "notify"}],
 "notifiers": [{"name", "format", "target" (host only), "queued", "sent", "failed",
                "oldest_queued_at", "last_error"}]}
"""
from urllib.parse import parse_qs

from agent.collector.web import HTTPError, json_answer
from agent.common import parse_utc
from agent.wire import utc_timestamp

MAX_HISTORY = 10000


def get_alerts(app, environ, start_response):
    from agent.collector.reads import parse_count, parse_time

    app.check_read_access(environ)
    q = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
    for k in q:
        if k not in ("limit", "since"):
            raise HTTPError(400, "unknown parameter (known: limit, since)", k)
    arg = {k: v[-1] for k, v in q.items() if v and v[-1] != ""}
    limit = parse_count(arg["limit"], "limit") if "limit" in arg else 100
    if limit > MAX_HISTORY:
        raise HTTPError(400, "limit must be at most %d" % MAX_HISTORY, "limit")
    since = parse_utc(parse_time(arg["since"], "since")) if "since" in arg else None
    engine = getattr(app, "alerts", None)
    if engine is None:
        doc = {"time": utc_timestamp(app.clock()), "current": [], "history": [], "rules": [], "notifiers": []}
    else:
        doc = engine.view(limit, since)
    return json_answer(start_response, 200, doc, [("Cache-Control", "no-store")])
