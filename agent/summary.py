"""What the running loop says about itself: the summary log line and the status file's content.

Pure functions of what the loop holds (device states, the spool's stats, the outputs and their
gap records); agent.loop calls them, agent.status writes and reads the file and formats it for
`modbus-agent status`. The summary line, every `[agent] summary_interval`:

    summary: meter1 ok=120(+30) failed=0(+0), ...; spool N records B bytes oldest 3s;
             upload last_ok=... sent_total=...[; upload STARVED: ...][; spool append errors n]
"""
import os

from agent.wire import utc_timestamp


def device_text(st):
    """One device's part: totals, (+ since the last summary), and what is wrong."""
    h = st.health
    s = "%s ok=%d(+%d) failed=%d(+%d)" % (st.device.name, h.polls_ok, st.summary_ok, h.polls_failed, st.summary_failed)
    if h.missed_cycles:
        s += " missed=%d" % h.missed_cycles
    if h.polls_partial:
        s += " partial=%d" % h.polls_partial
    if h.refused_blocks:
        s += " refusing %d block(s)" % h.refused_blocks
    if h.dead:
        s += " DEAD"
    return s


def output_text(out):
    """An output's state in a few words (the HTTP uploader's keys)."""
    try:
        st = out.state()
    except Exception as e:
        return "state unavailable (%s)" % e
    keys = ("last_ok", "last_error", "backoff_until", "sent_total")
    shown = ["%s=%s" % (k, st[k]) for k in keys if st.get(k) not in (None, "")]
    return " ".join(shown) or "no attempt yet"


def summary_line(states, sp, outputs, append_errors):
    """`sp`: the spool's stats; `outputs`: [(output, forced, windows)], forced: requests that made
    polls wait, windows: gaps it could start one in, both since the last summary."""
    age = sp.get("oldest_age")
    age = "-" if age is None else "%ds" % age
    text = "summary: %s; spool %s records %s bytes oldest %s" % (
        ", ".join(device_text(st) for st in states) or "no devices", sp.get("records", "?"), sp.get("bytes", "?"), age)
    for out, forced, windows in outputs:
        label = out.label or out.name
        text += "; %s %s" % (label, output_text(out))
        if forced:
            text += "; %s delayed polls %d time(s): no gap between polls to %s in" % (label, forced, label)
        elif not windows and sp.get("records"):
            text += "; %s STARVED: no gap of %.3gs between polls to %s in" % (label, out.request_time(), label)
    if append_errors:
        text += "; spool append errors %d" % append_errors
    return text


def device_status(st, now):
    """One device's entry in the status file (`now`: the loop's monotonic clock)."""
    d = st.health.snapshot(utc_timestamp)
    dev = st.device
    d.update(unit=dev.unit, interval=dev.interval, mode=dev.mode,
             connection=dev.connection.name, next_due_in=round(st.schedule.due - now, 3),
             probe_backoff=st.schedule.backoff or None)
    return d


def outputs_status(outputs, sp):
    """The status file's "outputs": {name: {"connected", "backlog": {records, bytes, oldest_age,
    acked_seq} (the spool's, for this output's cursor), "last_error", "last_ok", ... and the rest
    of the output's state()}}. "connected" is the output's own word when it has one (MQTT),
    else whether its last attempt succeeded (HTTP: no error since the last success)."""
    per = sp.get("outputs") or {}
    out = {}
    for o in outputs:
        try:
            st = dict(o.state())
        except Exception as e:
            st = {"last_error": "state unavailable (%s)" % e}
        if "connected" not in st:
            st["connected"] = bool(st.get("last_ok")) and not st.get("consecutive_failures")
        st.setdefault("last_error", None)
        st["backlog"] = per.get(o.name)
        out[o.name] = st
    return out


def status_doc(cfg, states, sp, uploader, now, wall, started_wall, stopped, clock_unsynced, period,
               appended, append_errors, last_summary, outputs=()):
    """The status file's content (agent.status documents it); `uploader`: [upload]'s output,
    `outputs`: every output (outputs_status)."""
    if isinstance(sp.get("oldest_ts"), (int, float)):
        sp = dict(sp, oldest_ts=utc_timestamp(sp["oldest_ts"]))
    return {
        "agent": cfg.agent.id,
        "pid": os.getpid(),
        "state": "stopped" if stopped else "running",
        "config": cfg.path,
        "started": utc_timestamp(started_wall),
        "written": utc_timestamp(wall),
        "written_at": wall,
        "period": period,
        "clock_unsynced": clock_unsynced,
        "devices": {st.device.name: device_status(st, now) for st in states},
        "spool": sp,
        "appended": appended,
        "append_errors": append_errors,
        "upload": uploader.state() if uploader is not None else None,
        "outputs": outputs_status(outputs, sp),
        "last_summary": last_summary,
    }
