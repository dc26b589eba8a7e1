"""Alert rules and notifiers from collector.ini: `[alert:NAME]`, `[notify:NAME]` and `[alerts]`.

Parsed once into plain objects; every problem is reported at once as `file:line: [section] key:
reason` through the collector config's own `where` (agent/collector/config.py load_config).

Rule kinds (`kind =`, default threshold):
    threshold  a point of matching devices above/below a limit for `for`, resolving at `clear`
    silent     no record from a matching device for `for` (see alerts/evaluate.py: silent())
    error      a matching device's readings are `status` (error, partial) for `for`
    gap        an agent's gap records report at least `min_dropped` dropped records; resolves
               after `clear_after` without another one
    backlog    an agent's health records report a spool backlog (`field`, seconds) older than
               `older_than` for `for`
"""
import fnmatch
import re

from agent.common import format_duration, ini_value, parse_duration

KINDS = ("threshold", "silent", "error", "gap", "backlog")
SEVERITIES = ("critical", "warning", "info")
FORMATS = ("json", "slack", "discord", "telegram")
STATUSES = ("error", "partial")
# The field of a health record ($.health...) that holds the agent's spool backlog: the age in
# seconds of the oldest record still waiting for upload (agent Spool.stats()["oldest_age"]).
BACKLOG_FIELD = "spool.oldest_age"
_COMMON = ("kind", "severity", "repeat", "notify", "agent")
KEYS = {
    "threshold": _COMMON + ("device", "point", "above", "below", "clear", "for"),
    "silent": _COMMON + ("device", "for"),
    "error": _COMMON + ("device", "status", "for"),
    "gap": _COMMON + ("min_dropped", "clear_after"),
    "backlog": _COMMON + ("older_than", "clear", "for", "field"),
}
NOTIFY_KEYS = ("url", "format", "chat_id", "header", "token", "timeout", "max_backoff", "retry_for")
ENGINE_DEFAULTS = {"interval": 10.0, "keep": 30 * 86400.0, "lease": 30.0}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HEADER = re.compile(r"^([A-Za-z0-9-]{1,64})\s*:\s*(\S.*)$")
_URL = re.compile(r"^(https?)://([^/?#\s]+)([^\s]*)$", re.I)
_GLOB = re.compile(r"[*?\[]")


class Rule:
    """One `[alert:NAME]` section. `series(agent, device)` -> does the rule watch it."""

    def __init__(self, name, kind, where):
        self.name, self.kind, self.where = name, kind, where
        self.agent, self.device = "*", "*"
        self.point = None             # threshold: the point; backlog: the health field path
        self.above = self.below = self.clear = None
        self.for_ = 0.0
        self.statuses = STATUSES
        self.min_dropped = 1
        self.clear_after = 3600.0
        self.severity = "warning"
        self.repeat = 0.0             # 0: no reminders
        self.notify = None            # None: every notifier; else a tuple of names
        self._agent_match = self._device_match = None

    def watches_agent(self, agent):
        return self._agent_match(agent)

    def watches(self, agent, device):
        return self._agent_match(agent) and self._device_match(device)

    @property
    def literal(self):
        """Agent and device named without wildcards: watched before they ever report."""
        return not _GLOB.search(self.agent) and not _GLOB.search(self.device)

    @property
    def threshold(self):
        """The limit the notification names: above/below, silence `for`, min_dropped, older_than."""
        if self.kind in ("threshold", "backlog"):
            return self.above if self.above is not None else self.below
        if self.kind == "silent":
            return self.for_
        if self.kind == "gap":
            return self.min_dropped
        return None

    def crossing(self, v):
        """The firing condition on a numeric value (threshold, backlog)."""
        return v > self.above if self.above is not None else v < self.below

    def cleared(self, v):
        """The resolving condition (hysteresis: `clear`, default the limit itself)."""
        return v <= self.clear if self.above is not None else v >= self.clear

    def describe(self):
        """The condition in words, for messages and the API."""
        f = " for %s" % format_duration(self.for_) if self.for_ else ""
        if self.kind == "threshold":
            if self.above is not None:
                c = "" if self.clear == self.above else ", clears at %s or below" % _num(self.clear)
                return "%s above %s%s%s" % (self.point, _num(self.above), f, c)
            c = "" if self.clear == self.below else ", clears at %s or above" % _num(self.clear)
            return "%s below %s%s%s" % (self.point, _num(self.below), f, c)
        if self.kind == "silent":
            return "no record for %s" % format_duration(self.for_)
        if self.kind == "error":
            return "readings %s%s" % (" or ".join(self.statuses), f)
        if self.kind == "gap":
            return "gap records dropping at least %d record%s (clears after %s without one)" % (
                self.min_dropped, "" if self.min_dropped == 1 else "s", format_duration(self.clear_after))
        c = "" if self.clear == self.above else ", clears at %s" % format_duration(self.clear)
        return "spool backlog older than %s%s%s" % (format_duration(self.above), f, c)

    def __repr__(self):
        return "Rule(%r, %s: %s)" % (self.name, self.kind, self.describe())


class Notifier:
    """One `[notify:NAME]` webhook. The URL and headers hold secrets: `label` is what logs show."""

    def __init__(self, name, where):
        self.name, self.where = name, where
        self.url = None
        self.format = "json"
        self.chat_id = None
        self.headers = []
        self.timeout = 10.0
        self.max_backoff = 300.0
        self.retry_for = 86400.0

    @property
    def label(self):
        """`notify:NAME (https://host/...)`: the host, never the path or query (Slack, Discord and
        Telegram put the token there) nor userinfo."""
        m = _URL.match(self.url or "")
        host = m.group(2).rpartition("@")[2] if m else "?"
        return "notify:%s (%s://%s/...)" % (self.name, m.group(1).lower() if m else "?", host)

    def secrets(self):
        """Texts never to show in a log line: the URL's path and query, header values."""
        out = [v for _, v in self.headers]
        m = _URL.match(self.url or "")
        if m:
            out += [p for p in (m.group(3), m.group(2).rpartition("@")[0], self.url) if len(p) > 1]
        return out

    def __repr__(self):
        return "Notifier(%s, %s)" % (self.label, self.format)


class AlertConfig:
    def __init__(self):
        self.rules = []
        self.notifiers = {}
        self.interval = ENGINE_DEFAULTS["interval"]
        self.keep = ENGINE_DEFAULTS["keep"]
        self.lease = ENGINE_DEFAULTS["lease"]

    def __bool__(self):
        return bool(self.rules or self.notifiers)

    def notifiers_of(self, rule):
        names = sorted(self.notifiers) if rule.notify is None else rule.notify
        return [self.notifiers[n] for n in names]


def owns(section):
    """Sections this module parses."""
    return section == "alerts" or section.startswith(("alert:", "notify:"))


def _num(v):
    return ("%d" % v) if float(v).is_integer() and abs(v) < 1e15 else repr(float(v))


def _number(text):
    try:
        v = float(text)
    except ValueError:
        raise ValueError("expected a number, got %r" % text) from None
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError("expected a finite number, got %r" % text)
    return v


def _duration(text, zero_ok=True):
    v = parse_duration(text)
    if v < 0 or (v == 0 and not zero_ok):
        raise ValueError("must be more than 0" if not zero_ok else "must be 0 or more")
    return v


def _glob(text):
    if not text or len(text) > 128 or "\x00" in text:
        raise ValueError("expected a name or a glob (meter*, site-?) of 1..128 characters")
    return text


def _matcher(pattern):
    if not _GLOB.search(pattern):
        return pattern.__eq__
    rx = re.compile(fnmatch.translate(pattern)).match
    return lambda name: rx(name) is not None


def parse(cp, where, errors):
    """configparser sections -> AlertConfig; problems appended to `errors` (where(section, key)
    names the place)."""
    out = AlertConfig()
    sections = cp.sections()
    notify_refs = []  # (rule, where, names): checked once every notifier is known
    for section in sections:
        prefix, _, name = section.partition(":")
        if section == "alerts":
            _parse_engine(cp, section, where, errors, out)
            continue
        if prefix not in ("alert", "notify"):
            continue
        if not _NAME.match(name):
            errors.append("%s: expected [%s:NAME], NAME of letters, digits, _ . - (1..64)" % (
                where(section, None), prefix))
            continue
        items = {}
        for key, raw in cp.items(section):
            value, problem = ini_value(raw, "token" if key.lower() in ("url", "header", "token") else key)
            if problem:
                errors.append("%s: %s" % (where(section, key), problem))
            else:
                items[key.lower()] = (key, value)
        if prefix == "notify":
            n = _parse_notifier(section, name, items, where, errors)
            if n is not None:
                out.notifiers[name] = n
        else:
            r = _parse_rule(section, name, items, where, errors, notify_refs)
            if r is not None:
                out.rules.append(r)
    for _rule, place, names in notify_refs:
        unknown = [n for n in names if n not in out.notifiers]
        if unknown:
            errors.append("%s: no [notify:%s] section%s (known: %s)" % (
                place, unknown[0], "" if len(unknown) == 1 else " (nor %s)" % ", ".join(unknown[1:]),
                ", ".join(sorted(out.notifiers)) or "none"))
    return out


def _parse_engine(cp, section, where, errors, out):
    for key, raw in cp.items(section):
        k = key.lower()
        value, problem = ini_value(raw, k)
        if problem is None and k not in ENGINE_DEFAULTS:
            problem = "unknown key (known: %s)" % ", ".join(ENGINE_DEFAULTS)
        if problem is None:
            try:
                setattr(out, k, _duration(value, zero_ok=False))
            except ValueError as e:
                problem = str(e)
        if problem:
            errors.append("%s: %s" % (where(section, key), problem))


def _parse_rule(section, name, items, where, errors, notify_refs):
    def bad(key, reason):
        errors.append("%s: %s" % (where(section, items[key][0] if key in items else None), reason))

    kind = items.get("kind", (None, "threshold"))[1].strip().lower()
    if kind not in KINDS:
        bad("kind", "expected one of %s, got %r" % (", ".join(KINDS), kind))
        return None
    rule = Rule(name, kind, where(section, None))
    before = len(errors)
    for k, (key, value) in items.items():
        if k not in KEYS[kind]:
            bad(k, "not a key of a %s rule (its keys: %s)" % (kind, ", ".join(KEYS[kind])))
            continue
        try:
            if k in ("agent", "device"):
                setattr(rule, k, _glob(value))
            elif k == "point":
                if not value or len(value) > 128:
                    raise ValueError("expected the point's name (1..128 characters)")
                rule.point = value
            elif k == "field":
                if not re.match(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$", value):
                    raise ValueError("expected a dotted path into the health record, like %s" % BACKLOG_FIELD)
                rule.point = value
            elif k in ("above", "below"):
                setattr(rule, k, _number(value))
            elif k == "clear":
                rule.clear = _duration(value) if kind == "backlog" else _number(value)
            elif k == "older_than":
                rule.above = _duration(value, zero_ok=False)
            elif k in ("for", "clear_after", "repeat"):
                setattr(rule, "for_" if k == "for" else k, _duration(value, zero_ok=k == "for" or k == "repeat"))
            elif k == "min_dropped":
                if not value.isdigit() or int(value) < 1:
                    raise ValueError("expected a whole number of records, at least 1")
                rule.min_dropped = int(value)
            elif k == "status":
                got = tuple(s.strip().lower() for s in value.split(",") if s.strip())
                wrong = [s for s in got if s not in STATUSES]
                if not got or wrong:
                    raise ValueError("expected error, partial or both (error, partial), got %r" % value)
                rule.statuses = got
            elif k == "severity":
                v = value.strip().lower()
                if v not in SEVERITIES:
                    raise ValueError("expected %s, got %r" % (", ".join(SEVERITIES), value))
                rule.severity = v
            elif k == "notify":
                names = tuple(n.strip() for n in value.split(",") if n.strip())
                rule.notify = () if names in ((), ("none",)) else names
                if rule.notify:
                    notify_refs.append((rule, where(section, key), rule.notify))
        except ValueError as e:
            bad(k, str(e))
    if kind == "threshold":
        if rule.point is None:
            bad("point", "a threshold rule needs `point = NAME`")
        if ("above" in items) == ("below" in items):
            bad("above" if "above" in items else "below",
                "a threshold rule needs exactly one of `above = X` or `below = X`")
    if kind == "silent" and "for" not in items:
        bad("for", "a silent rule needs `for = DURATION` (how long without a record)")
    if kind == "silent" and rule.for_ <= 0 and "for" in items:
        bad("for", "must be more than 0")
    if kind == "backlog":
        if rule.above is None:
            bad("older_than", "a backlog rule needs `older_than = DURATION`")
        rule.point = rule.point or BACKLOG_FIELD
    if rule.clear is None:
        rule.clear = rule.above if rule.above is not None else rule.below
    elif rule.above is not None and rule.clear > rule.above:
        bad("clear", "must be at or below the limit (%s) it clears" % _num(rule.above))
    elif rule.below is not None and rule.clear < rule.below:
        bad("clear", "must be at or above the limit (%s) it clears" % _num(rule.below))
    if len(errors) > before:
        return None
    rule._agent_match = _matcher(rule.agent)
    rule._device_match = _matcher(rule.device)
    return rule


def _parse_notifier(section, name, items, where, errors):
    def bad(key, reason):
        errors.append("%s: %s" % (where(section, items[key][0] if key in items else None), reason))

    n = Notifier(name, where(section, None))
    before = len(errors)
    for k, (_key, value) in items.items():
        try:
            if k not in NOTIFY_KEYS:
                raise ValueError("unknown key (known: %s)" % ", ".join(NOTIFY_KEYS))
            if k == "url":
                if not _URL.match(value):
                    raise ValueError("expected an http:// or https:// URL")  # never echo it: a secret
                n.url = value
            elif k == "format":
                v = value.strip().lower()
                if v not in FORMATS:
                    raise ValueError("expected %s, got %r" % (", ".join(FORMATS), value))
                n.format = v
            elif k == "chat_id":
                if not re.match(r"^(-?\d{1,20}|@[A-Za-z0-9_]{1,64})$", value):
                    raise ValueError("expected a Telegram chat id (-1001234567890) or @channelname")
                n.chat_id = value
            elif k == "header":
                for part in (p.strip() for p in value.splitlines() if p.strip()):
                    m = _HEADER.match(part)
                    if m is None:
                        raise ValueError("expected `Header-Name: value` (one a line)")
                    n.headers.append((m.group(1), m.group(2).strip()))
            elif k == "token":
                if len(value) < 8:
                    raise ValueError("too short (at least 8 characters)")
                n.headers.append(("Authorization", "Bearer " + value))
            else:
                setattr(n, k, _duration(value, zero_ok=False))
        except ValueError as e:
            bad(k, str(e))
    if n.url is None and "url" not in items:
        bad("url", "a notifier needs `url = https://...`")
    if n.format == "telegram" and n.chat_id is None and "chat_id" not in items:
        bad("chat_id", "format = telegram needs `chat_id = ...` (the chat the bot posts to)")
    return None if len(errors) > before else n
