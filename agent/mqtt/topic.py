"""MQTT topics: the `[mqtt] topic` template, its checks, and the fields a spool line fills it with.

    modbus/{agent}/{device}          placeholders {agent} {device} {unit} {kind}

A publish topic may not hold the wildcards `+` and `#` (MQTT 3.1.1 4.7.1, 5.0 4.7.0: the
broker would close the connection), nor NUL, and is at most 65535 bytes of UTF-8; a template
that can only produce such topics is a config error. Values come from the record itself, sliced
from the spool line without parsing or re-encoding it (agent.wire's head, then agent.record's
key order): {agent} the line's agent (an earlier `[agent] id`'s records go to their own topic),
{device} and {unit} the record's (NO_DEVICE for a record that is not about a device: a gap
record), {kind} "reading" for readings (ok, partial, error), else the record's "kind" ("health",
"gap"). A value that would break the topic (a wildcard, NUL, a device name with `/` is kept: it
makes levels on purpose) is replaced by `_` with a warning once per value (only records spooled
under an older config can hold one: load_config refuses such device names).
"""
import json
import logging
import re
import string

log = logging.getLogger("agent.mqtt")

PLACEHOLDERS = ("agent", "device", "unit", "kind")
NO_DEVICE = "-"
READING = "reading"
MAX_TOPIC = 65535
_BAD_CHARS = re.compile("[+#\x00]")
# {"agent":"ID","seq":N,"ts":"TS", then optionally "kind":"K", then optionally "device":"D","unit":N
_HEAD = re.compile(rb'^\{"agent":("(?:[^"\\]|\\.)*"),"seq":-?\d+,"ts":"[^"]*"'
                   rb'(?:,"kind":"([A-Za-z_]+)")?(?:,"device":("(?:[^"\\]|\\.)*"),"unit":(\d+))?')


class TopicError(ValueError):
    """A template or a topic that cannot be published to (the reason says why)."""


def topic_problem(topic):
    """Why `topic` cannot be a publish topic, or None."""
    if not topic:
        return "is empty"
    m = _BAD_CHARS.search(topic)
    if m:
        c = m.group(0)
        what = "NUL" if c == "\x00" else "the wildcard %r" % c
        return "holds %s: wildcards are for subscriptions, a published message needs one exact topic" % what
    if len(topic.encode("utf-8")) > MAX_TOPIC:
        return "is longer than %d bytes" % MAX_TOPIC
    return None


class Template:
    """A parsed topic template. `fields`: the placeholders it uses (in order of appearance)."""

    def __init__(self, text):
        self.text = text
        fields = []
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as e:
            raise TopicError("%r: %s (write placeholders as {agent}, {device}, {unit}, {kind}; "
                             "a literal brace as {{ or }})" % (text, e)) from None
        literal = ""
        for lit, name, spec, conv in parsed:
            literal += lit
            if name is None:
                continue
            if name not in PLACEHOLDERS or spec or conv:
                raise TopicError("%r: unknown placeholder {%s}; the placeholders are %s" % (
                    text, name, ", ".join("{%s}" % p for p in PLACEHOLDERS)))
            if name not in fields:
                fields.append(name)
        self.fields = tuple(fields)
        problem = topic_problem(literal if fields else text)
        if problem and not (problem == "is empty" and fields):
            raise TopicError("%r %s" % (text, problem))
        self._warned = set()
        self._cache = {}

    def render(self, agent, device=NO_DEVICE, unit="", kind=READING):
        """The topic for these values (a value that would break the topic is made safe)."""
        key = (agent, device, unit, kind)
        topic = self._cache.get(key)
        if topic is None:
            values = {}
            for name, v in zip(PLACEHOLDERS, key):
                v = str(v)
                if _BAD_CHARS.search(v):
                    safe = _BAD_CHARS.sub("_", v)
                    if (name, v) not in self._warned:
                        self._warned.add((name, v))
                        log.warning("mqtt: {%s} %r would put a wildcard or NUL in topic %r: published as %r",
                                    name, v, self.text, safe)
                    v = safe
                values[name] = v or "_"
            topic = self.text.format(**values)
            if len(self._cache) > 1024:    # bounded: devices of a few configs, agents of a few ids
                self._cache.clear()
            self._cache[key] = topic
        return topic

    def for_line(self, line, agent_id):
        """The topic of one spool line (bytes, no newline)."""
        if not self.fields:
            return self.text
        return self.render(*line_fields(line, agent_id))


def line_fields(line, agent_id):
    """(agent, device, unit, kind) of a spool line, sliced from its head; a line that does not
    start as the agent writes them is parsed (and one that is not JSON counts as the agent's)."""
    m = _HEAD.match(line)
    if m is not None:
        agent = json.loads(m.group(1))
        kind = m.group(2).decode("ascii") if m.group(2) else READING
        if m.group(3) is not None:
            return agent, json.loads(m.group(3)), int(m.group(4)), kind
        return agent, NO_DEVICE, "", kind
    try:
        rec = json.loads(line)
    except ValueError:
        return agent_id, NO_DEVICE, "", READING
    if not isinstance(rec, dict):
        return agent_id, NO_DEVICE, "", READING
    agent = rec.get("agent") if isinstance(rec.get("agent"), str) and rec.get("agent") else agent_id
    device = rec.get("device") if isinstance(rec.get("device"), str) else NO_DEVICE
    unit = rec.get("unit") if type(rec.get("unit")) is int else ""
    kind = rec.get("kind") if isinstance(rec.get("kind"), str) else READING
    return agent, device, unit, kind
