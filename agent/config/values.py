"""Value parsers for the agent's INI file: text -> value, or ValueError with the reason.

Also the checks on names (agent id, device names). parse_duration and redact are shared with the
collector (agent.common).
"""
import math
import re

# A key whose value is never shown in a parse error (agent.common.redact does the rest).
from agent.common import SECRET_KEY as _SECRET_KEY

# --- value parsers: text -> value, or ValueError with the reason ---------------------------


def parse_int(text):
    t = text.strip().lower()
    try:
        return int(t, 16) if t.startswith("0x") else int(t, 10)
    except ValueError:
        raise ValueError("%r is not a whole number" % text) from None


def parse_number(text):
    try:
        v = float(text)
    except ValueError:
        raise ValueError("%r is not a number" % text) from None
    if not math.isfinite(v):
        raise ValueError("%r is not a finite number" % text)
    return v


_BOOLS = {"yes": True, "true": True, "on": True, "1": True,
          "no": False, "false": False, "off": False, "0": False}


def parse_bool(text):
    try:
        return _BOOLS[text.strip().lower()]
    except KeyError:
        raise ValueError("%r is not yes/no" % text) from None


def _positive(parse):
    def check(text):
        v = parse(text)
        if v <= 0:
            raise ValueError("must be greater than 0, not %s" % text)
        return v
    return check


def _not_negative(parse):
    def check(text):
        v = parse(text)
        if v < 0:
            raise ValueError("must not be negative, not %s" % text)
        return v
    return check


def _between(lo, hi, parse=parse_int):
    def check(text):
        v = parse(text)
        if not lo <= v <= hi:
            raise ValueError("must be between %s and %s, not %s" % (lo, hi, text))
        return v
    return check


def _choice(*choices, fold=str.lower):
    def check(text):
        v = fold(text.strip())
        if v not in choices:
            from agent.config.ini import _suggest
            raise ValueError("must be one of %s, not %r%s" % (" | ".join(choices), text,
                                                             _suggest(v.replace("_", "-"), choices)))
        return v
    return check


def _text(text):
    return text.strip() or None


_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# The collector's limit on agent and device names (agent/collector/validate.py MAX_NAME): a
# longer name would have every record of that device rejected (422) and quarantined.
MAX_NAME = 128
# Characters the collector's fast path and the one-line logs cannot take as they are.
_BAD_NAME_CHAR = re.compile(r'["\\\x00-\x1f\x7f]')


def name_problem(name):
    """Why a device name cannot be used, or None."""
    if len(name) > MAX_NAME:
        return "device name is %d characters long; the collector takes at most %d" % (len(name), MAX_NAME)
    if _BAD_NAME_CHAR.search(name):
        return "device name must not contain quotes, backslashes or control characters"
    return None


def _reason(key, value, error):
    """The text of a value's parse error; a secret key's value is never part of it."""
    reason = str(error)
    if value and _SECRET_KEY.search(key):
        reason = reason.replace(repr(value), "***").replace(value, "***")
    return reason


def _agent_id(text):
    if not _ID.match(text):
        raise ValueError("%r: use 1-64 letters, digits, '.', '_' or '-'" % text)
    return text


def _url(text):
    if not re.match(r"^https?://[^/\s]+", text):
        raise ValueError("%r is not an http:// or https:// URL" % text)
    return text
