"""The status file and `modbus-agent status -c FILE`.

The running loop rewrites a small JSON file (`[agent] status_file`) every few seconds, atomically
(write a temporary file in the same directory, then rename over the old one), so a reader never
sees half a file. `status` reads it: it never talks to the agent or the devices, so it works while
the bus is busy and costs the router nothing.

Content (all times wall clock, UTC):
    {"agent": id, "pid": n, "started": ts, "written": ts, "written_at": seconds, "period": seconds,
     "config": path, "devices": {name: {unit, interval, mode, connection, dead, next_due_in, ...health}},
     "spool": Spool.stats(), "upload": Uploader.state() or null, "last_summary": "...",
     "outputs": {name: {"connected": bool, "backlog": {records, bytes, oldest_age, acked_seq} (this
                 output's spool cursor), "last_error": text or null, ...the output's state()}}}
"""
import json
import os
import sys
import time

from agent.common import atomic_replace, format_age, parse_utc

# A status file older than this many periods means the agent is not running (or stuck).
STALE_PERIODS = 3
STALE_MIN = 30.0


def write_status(path, data):
    """Atomic replace: readers see the old file or the new one, never a mix. No fsync: the file
    is rewritten every few seconds and usually lives on tmpfs; flash is spared."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, ".%s.%d.tmp" % (os.path.basename(path), os.getpid()))
    # dumps, not dump: json.dump streams through the pure-Python encoder, dumps uses the C one
    text = json.dumps(data, separators=(",", ":"), sort_keys=True, default=str)
    atomic_replace(path, (text + "\n").encode("utf-8"), durable=False, tmp=tmp, mode=0o666)


def read_status(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _size(n):
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return ("%d %s" if unit == "B" else "%.1f %s") % (n, unit)
        n /= 1024.0
    return "%d B" % n  # pragma: no cover


def _parse_utc(ts):
    """'2026-11-21T10:30:45.123Z' -> epoch seconds (a number stays as it is), None if absent
    or unreadable."""
    if isinstance(ts, (int, float)):
        return ts
    return parse_utc(ts)


def _ago(ts, now):
    t = _parse_utc(ts)
    if t is None:
        return "never"
    return "%s ago" % format_age(now - t)


def format_status(st, now=None):
    """Status dict -> the text `modbus-agent status` prints."""
    now = time.time() if now is None else now
    lines = []
    written = st.get("written_at")
    started = _parse_utc(st.get("started"))
    # a stopped agent's uptime ends when it wrote its last status
    until = (written or now) if st.get("state") == "stopped" else now
    lines.append("agent %s  pid %s  up %s  status written %s" % (
        st.get("agent"), st.get("pid"), format_age(until - started) if started else "-",
        _ago(st.get("written"), now) if written is None else "%s ago" % format_age(now - written)))
    if st.get("state") == "stopped":
        lines.append("STOPPED: the agent exited cleanly; figures below are from its last moment")
    if st.get("clock_unsynced"):
        lines.append("WARNING: the clock looks unset (before the release date); records are flagged \"clock\": \"unsynced\"")
    devices = st.get("devices") or {}
    header = ("DEVICE", "UNIT", "STATE", "LAST SUCCESS", "FAILS", "OK", "PARTIAL", "FAILED", "TIMEOUT", "CRC",
              "FRAME", "CONN", "EXCEPTIONS", "MISSED")
    rows = [header]
    for name in sorted(devices):
        d = devices[name]
        if d.get("dead"):
            state = "dead"
        elif d.get("consecutive_failures"):
            state = "failing"
        elif d.get("refused_blocks"):
            state = "partial"   # answers, refusing some blocks (exception responses): alive
        elif d.get("polls_ok"):
            state = "ok"
        else:
            state = "waiting"
        exc = d.get("exceptions") or {}
        rows.append((
            name, str(d.get("unit", "-")), state, _ago(d.get("last_success"), now),
            str(d.get("consecutive_failures", 0)), str(d.get("polls_ok", 0)), str(d.get("polls_partial", 0)),
            str(d.get("polls_failed", 0)),
            str(d.get("timeouts", 0)), str(d.get("crc_errors", 0)), str(d.get("frame_errors", 0)),
            str(d.get("connection_errors", 0)),
            ",".join("%s:%s" % kv for kv in sorted(exc.items())) or "-",
            str(d.get("missed_cycles", 0)),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    for name in sorted(devices):
        err = devices[name].get("last_error")
        if err and (devices[name].get("consecutive_failures") or devices[name].get("refused_blocks")):
            lines.append("  %s: %s" % (name, err))
    sp = st.get("spool") or {}
    if sp:
        oldest = _parse_utc(sp.get("oldest_ts"))
        lines.append("spool: %s records, %s, oldest %s; segments %s, dropped %s, corrupt skipped %s, next seq %s" % (
            sp.get("records", "-"), _size(sp.get("bytes")),
            "%s ago" % format_age(now - oldest) if oldest else "-",
            sp.get("segments", "-"), sp.get("dropped", 0), sp.get("corrupt_skipped", 0), sp.get("next_seq", "-")))
    up = st.get("upload")
    if up is None:
        lines.append("upload: not configured (no [upload] section)")
    else:
        text = "upload: last ok %s; sent %s records in %s batches; %s failures" % (
            _ago(up.get("last_ok"), now), up.get("sent_total", 0), up.get("batches_total", 0),
            up.get("failures_total", 0))
        if up.get("quarantined_total"):
            text += "; %s quarantined" % up["quarantined_total"]
        if up.get("last_error"):
            text += "\n  last error %s: %s" % (_ago(up.get("last_error_at"), now), up["last_error"])
        if up.get("backoff_until") and (_parse_utc(up["backoff_until"]) or 0) > now:
            text += "\n  backing off until %s" % up["backoff_until"]
        lines.append(text)
    gw = (st.get("services") or {}).get("gateway")
    if gw:
        lines.append(gateway_text(gw))
    lines.extend(output_lines(st.get("outputs") or {}, now))
    return "\n".join(lines)


def gateway_text(gw):
    """The gateway's line(s) in `modbus-agent status` (agent.gateway.server state())."""
    exc = gw.get("exceptions") or {}
    dropped = {k: v for k, v in (gw.get("dropped") or {}).items() if v}
    text = "gateway: %s %s; %s client(s) connected (%s since start, %s refused: max_clients); " \
           "%s request(s), %s answered, exceptions %s; dropped %s" % (
               "listening on" if gw.get("listening") else "NOT listening on", gw.get("listen"),
               gw.get("clients", 0), gw.get("clients_total", 0), gw.get("refused_clients", 0),
               gw.get("requests", 0), gw.get("answered", 0),
               ",".join("%s:%s" % kv for kv in sorted(exc.items())) or "-",
               ",".join("%s:%s" % kv for kv in sorted(dropped.items())) or "-")
    if gw.get("listen_error"):
        text += "\n  %s" % gw["listen_error"]
    if gw.get("last_error"):
        text += "\n  last error: %s" % gw["last_error"]
    return text


def output_lines(outputs, now):
    """Per output (the status file's "outputs"): connected or not, its backlog, its last error;
    the HTTP one's details are the "upload" lines above."""
    lines = []
    for name in sorted(outputs):
        o = outputs[name] or {}
        b = o.get("backlog") or {}
        text = "output %s: %s; backlog %s records%s" % (
            name, "connected" if o.get("connected") else "NOT connected", b.get("records", "-"),
            ", oldest %s" % format_age(b["oldest_age"]) if b.get("oldest_age") is not None else "")
        if name != "http":
            text += "; sent %s records in %s messages, %s sent again" % (
                o.get("sent_total", 0), o.get("messages_total", 0), o.get("resent_total", 0))
            if o.get("quarantined_total"):
                text += "; %s quarantined" % o["quarantined_total"]
            if o.get("broker"):
                text += "; broker %s" % o["broker"]
        if o.get("last_error") and name != "http":
            text += "\n  last error %s: %s" % (_ago(o.get("last_error_at"), now), o["last_error"])
        lines.append(text)
    return lines


def is_stale(st, now=None):
    now = time.time() if now is None else now
    written = st.get("written_at")
    if written is None:
        written = _parse_utc(st.get("written")) or 0.0
    period = float(st.get("period") or 5.0)
    return now - written > max(STALE_PERIODS * period, STALE_MIN)


def cmd_status(args):
    """Exit 0: status printed and fresh; 1: no status file or stale (agent not running); 2: bad config."""
    from agent.config import load_or_report

    cfg = load_or_report(args.config)
    if cfg is None:
        return 2
    path = cfg.agent.status_file
    try:
        st = read_status(path)
    except FileNotFoundError:
        print("%s: no status file: the agent has not run with this config (or removed it on exit)" % path,
              file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print("%s: cannot read status file: %s" % (path, e), file=sys.stderr)
        return 1
    if getattr(args, "json", False):
        print(json.dumps(st, indent=2, sort_keys=True))
    else:
        print(format_status(st))
    if st.get("state") == "stopped":
        return 1
    if is_stale(st):
        print("WARNING: %s was last written %s: the agent is not running or is stuck" % (
            path, _ago(st.get("written"), time.time())), file=sys.stderr)
        return 1
    return 0
