"""Single-line logs for tailing (`logread -f`, `tail -F`):

    2026-11-21T10:30:45.123Z WARNING loop meter1 unit=1: poll failed: unit 1 fc 03 address 0 count 2: timeout

time (UTC, ms), level, component, then device and unit id when the line is about one device
(users must never have to guess which slave failed), then the message. One line per event:
newlines inside a message are escaped so a line is always one record.

To stderr by default (procd forwards the agent's stderr to logread), or to a file rotated by
size (`[agent] log_file`, `log_max_kb`; one old file kept as FILE.1).

Built on stdlib `logging`, which `requests`/urllib3 import anyway, so it costs no extra memory.
"""
import logging
import sys

from agent.record import utc_timestamp

# The package name: every module's `logging.getLogger(__name__)` ("agent.spool",
# "agent.modbus.client") lands in the same handler and format.
ROOT = "agent"

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}


class LineFormatter(logging.Formatter):
    def format(self, record):
        msg = record.getMessage()
        if record.exc_info:
            # keep the traceback but on the same line: the last frame says enough for tailing
            msg += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        if "\n" in msg:
            msg = msg.replace("\n", "\\n")
        component = record.name[len(ROOT) + 1:] if record.name.startswith(ROOT + ".") else record.name
        device = getattr(record, "device", None)
        unit = getattr(record, "unit", None)
        where = ""
        if device is not None:
            where = " " + str(device)
            if unit is not None:
                where += " unit=%s" % (unit,)
        return "%s %s %s%s: %s" % (utc_timestamp(record.created), record.levelname, component, where, msg)


def where(device=None, unit=None):
    """`extra=` for a log call about one device: `log.warning("...", extra=where(d.name, d.unit))`."""
    return {"device": device, "unit": unit}


def get(component):
    """The logger of one component (loop, spool, upload, modbus, config, ...); the same as
    `logging.getLogger(__name__)` in module agent.<component>."""
    return logging.getLogger(ROOT + "." + component)


def parse_level(level):
    if isinstance(level, int):
        return level
    try:
        return LEVELS[str(level).strip().lower()]
    except KeyError:
        raise ValueError("unknown log level %r (debug, info, warning, error)" % (level,)) from None


def setup(level="info", file=None, max_kb=1024, stream=None):
    """(Re)configure the agent's logging; safe to call again on SIGHUP."""
    root = logging.getLogger(ROOT)
    for h in list(root.handlers):
        root.removeHandler(h)
        try:
            h.close()
        except Exception:
            pass
    if file:
        # imported only when used: logging.handlers pulls in pickle, socket, queue (~0.4 MB)
        from logging.handlers import RotatingFileHandler

        handler = RotatingFileHandler(
            file, maxBytes=max(1, int(max_kb)) * 1024, backupCount=1, encoding="utf-8")
    else:
        handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(LineFormatter())
    root.addHandler(handler)
    root.setLevel(parse_level(level))
    root.propagate = False
    return root
