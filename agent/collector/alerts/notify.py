"""Notifications: one event -> the HTTP request a notifier's format asks for, and sending it.

Formats (`[notify:NAME] format =`):
    json      the event itself (README "Alert notifications, json format", field by field):
              {"version": 1, "id", "rule", "kind", "severity", "state", "reminder", "agent",
               "device", "point", "value", "threshold", "condition", "ts", "since", "at",
               "message", "detail"}
    slack     {"text": message}                           (Slack incoming webhook; Mattermost too)
    discord   {"content": message}                        (Discord webhook; at most 2000 characters)
    telegram  {"chat_id": chat_id, "text": message}       (POST https://api.telegram.org/bot<TOKEN>/sendMessage)

Plain http.client, no redirects followed (a redirected POST would become a GET elsewhere), a
total timeout per request. Outcomes: "ok" (2xx), "retry" (connection refused or reset, timeout,
408, 425, 429, 5xx: the outbox tries again later) or "fail" (another 4xx: the request itself is
wrong; tried 3 times, then given up, logged). Log lines name the notifier by label (host only)
and pass through redact(), which removes the URL's path and query and every header value.
"""
import base64
import http.client
import json
import socket
import ssl
from urllib.parse import unquote, urlsplit

from agent.collector.config import redact as redact_config
from agent.common import format_age, format_duration
from agent.wire import utc_timestamp

USER_AGENT = "modbus-collector-alerts/1"
DISCORD_MAX = 2000
TELEGRAM_MAX = 4096
RETRY_STATUSES = (408, 425, 429)


def _value_text(v):
    if type(v) is float:
        return ("%d" % v) if v.is_integer() and abs(v) < 1e15 else repr(v)
    return json.dumps(v)


def series_text(ev):
    parts = [ev["agent"]]
    if ev.get("device"):
        parts.append(ev["device"])
    out = "/".join(parts)
    if ev.get("point"):
        out += " " + ev["point"]
    return out


def message(rule, ev):
    """One line for people: '[FIRING warning] high_voltage: site7/meter1 voltage_l1 = 253.4 (voltage_l1
    above 250 for 2m) at 2026-12-01T10:02:00.000Z'."""
    d = {"agent": ev.agent, "device": ev.device, "point": ev.point}
    head = "[%s%s %s] %s: %s" % ("REMINDER " if ev.reminder else "", ev.state.upper(), rule.severity, rule.name,
                                 series_text(d))
    if rule.kind == "silent":
        detail = ev.detail
        if ev.state == "firing" and detail.get("last_ts") is None and ev.since:
            body = " has not reported since this collector watches it (%s, for %s) (%s)" % (
                ev.since, format_age(ev.value), rule.describe())
        elif ev.state == "firing":
            body = " silent for %s: last reading %s, last record received %s ago (%s)" % (
                format_age(ev.value), detail.get("last_ts") or "never", format_age(detail.get("received_age_s")),
                rule.describe())
        else:
            body = " reporting again: last reading %s (%s)" % (detail.get("last_ts") or "never", rule.describe())
    elif rule.kind == "error":
        body = " status %s (%s)" % (ev.value, rule.describe())
    elif rule.kind == "gap":
        body = " %s records dropped (%s)" % (_value_text(ev.value), rule.describe())
    elif rule.kind == "backlog":
        body = " spool backlog %s old (%s)" % (format_age(ev.value or 0), rule.describe())
    else:
        body = " = %s (%s)" % (_value_text(ev.value), rule.describe())
    return head + body + " at %s" % (ev.ts or utc_timestamp(ev.at))


def document(ev, rule=None):
    """The json format: the event row (db.event_dict) as sent. `condition` from the rule when it
    is still configured."""
    return {
        "version": 1, "id": ev["id"], "rule": ev["rule"], "kind": ev["kind"], "severity": ev["severity"],
        "state": ev["state"], "reminder": ev["reminder"], "agent": ev["agent"], "device": ev["device"],
        "point": ev["point"], "value": ev["value"], "threshold": ev["threshold"],
        "condition": rule.describe() if rule is not None else None,
        "ts": ev["ts"], "since": ev["since"], "at": utc_timestamp(ev["at"]), "message": ev["message"],
        "detail": ev["detail"],
    }


def request(notifier, ev, rule=None):
    """(url, headers, body bytes) for one event row."""
    fmt = notifier.format
    text = ev["message"]
    if fmt == "json":
        doc = document(ev, rule)
    elif fmt == "slack":
        doc = {"text": text}
    elif fmt == "discord":
        doc = {"content": text[:DISCORD_MAX]}
    else:
        doc = {"chat_id": notifier.chat_id, "text": text[:TELEGRAM_MAX], "disable_web_page_preview": True}
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    headers = [("Content-Type", "application/json"), ("User-Agent", USER_AGENT)]
    headers += [h for h in notifier.headers]
    if fmt == "json":
        headers.append(("Idempotency-Key", "modbus-alert-%s-%s" % (ev["id"], notifier.name)))
    return notifier.url, headers, body


def redact(notifier, text):
    """text with the notifier's URL path/query, userinfo and header values replaced by ***."""
    text = str(text)
    for secret in sorted(notifier.secrets(), key=len, reverse=True):
        text = text.replace(secret, "***")
    return redact_config(text)


def send(notifier, url, headers, body):
    """POST once: ("ok" | "retry" | "fail", detail text for the log/outbox; never holds a secret)."""
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port
    path = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    if parts.username is not None:   # https://user:password@host/...: HTTP basic auth
        cred = "%s:%s" % (unquote(parts.username), unquote(parts.password or ""))
        headers = list(headers) + [("Authorization", "Basic " + base64.b64encode(cred.encode()).decode())]
    try:
        if parts.scheme.lower() == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=notifier.timeout,
                                               context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(host, port, timeout=notifier.timeout)
        try:
            conn.putrequest("POST", path, skip_accept_encoding=True)
            for k, v in headers:
                conn.putheader(k, v)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            resp.read(65536)
            status = resp.status
        finally:
            conn.close()
    except (socket.timeout, TimeoutError):
        return "retry", "timed out after %s" % format_duration(notifier.timeout)
    except (OSError, http.client.HTTPException) as e:
        return "retry", redact(notifier, "%s: %s" % (type(e).__name__, e))
    if 200 <= status < 300:
        return "ok", "HTTP %d" % status
    if status in RETRY_STATUSES or status >= 500:
        return "retry", "HTTP %d" % status
    return "fail", "HTTP %d" % status
