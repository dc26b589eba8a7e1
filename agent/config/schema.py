"""The schemas: the one place where options, their types and their defaults live, and the
typed objects built from them (Settings, Connection, Config).
"""
from agent.common import parse_duration
from agent.config.ini import _suggest
from agent.config.values import (
    _agent_id,
    _between,
    _choice,
    _not_negative,
    _positive,
    _reason,
    _text,
    _url,
    parse_bool,
    parse_int,
    parse_number,
)
from agent.modbus import keys as _keys
from agent.modbus.pdu import MAX_BITS, MAX_REGISTERS
from agent.modbus.transport import TRANSPORTS
from agent.types import POINT_OPTIONS as _POINT_OPTIONS

# --- schemas: the one place where options, types and defaults live -------------------------

REQUIRED = object()

# The third element of an [agent] / [upload] entry: what SIGHUP rebuilds when the key's value
# changes (Loop.reload asks `changed(old, new, SPOOL)`). LIVE: nothing to rebuild, the loop
# reads the new value from the new config (devices, timers and logging are redone on every
# reload). Every key says which, so a spool option cannot be added and silently skip the reopen
# (tests/test_config_reload.py); a key without the element counts as all of them.
SPOOL = "spool"          # changing it closes the spool and opens it again (agent.loop.open_spool)
UPLOADER = "uploader"    # changing it builds a new uploader (agent.loop.make_uploader)
GATEWAY = "gateway"      # changing it opens the gateway's listening socket anew (agent.gateway)
MQTT = "mqtt"            # changing it builds a new MQTT output (agent.outputs)
RELOAD_TAGS = (SPOOL, UPLOADER, GATEWAY, MQTT)
LIVE = ()

AGENT_SCHEMA = {
    "id": (_agent_id, REQUIRED, (SPOOL, UPLOADER, MQTT)),
    "interval": (_positive(parse_duration), 10.0, LIVE),
    "spool_dir": (_text, "/var/lib/modbus-agent/spool", (SPOOL,)),
    "seq_file": (_text, None, (SPOOL,)),      # None: <directory of the config file>/<id>.seq
    "spool_max_mb": (_positive(parse_number), 16.0, (SPOOL,)),
    "spool_max_age": (_positive(parse_duration), 7 * 86400.0, (SPOOL,)),
    "spool_segment_kb": (_positive(parse_int), 256, (SPOOL,)),
    "fsync": (_choice("always", "interval", "never"), "interval", (SPOOL,)),
    "fsync_interval": (_positive(parse_duration), 5.0, (SPOOL,)),
    "status_file": (_text, "/tmp/modbus-agent-status.json", LIVE),
    "log_level": (_choice("debug", "info", "warning", "error"), "info", LIVE),
    "log_file": (_text, None, LIVE),
    "log_max_kb": (_positive(parse_int), 512, LIVE),
    "summary_interval": (_positive(parse_duration), 300.0, LIVE),
    "health_interval": (_positive(parse_duration), 300.0, LIVE),
    "dead_after": (_positive(parse_int), 3, LIVE),
    "dead_backoff_max": (_positive(parse_duration), 300.0, LIVE),
    "profile_dir": (_text, None, LIVE),
    # `check` warns when the devices' polling is estimated above this share of the router's
    # CPU (agent.cpucost); a router also routes, runs its web UI and its modem.
    "cpu_budget": (_between(1, 100, lambda t: parse_number(t.strip().rstrip("%"))), 50.0, LIVE),
}

UPLOAD_SCHEMA = {
    "url": (_url, REQUIRED, (UPLOADER,)),
    "token": (_text, None, (UPLOADER,)),
    "batch_max_records": (_positive(parse_int), 500, (UPLOADER,)),
    "batch_max_kb": (_positive(parse_int), 256, (UPLOADER,)),
    "gzip": (parse_bool, True, (UPLOADER,)),
    "timeout": (_positive(parse_duration), 10.0, (UPLOADER,)),
    "ca_file": (_text, None, (UPLOADER,)),
    "verify": (parse_bool, True, (UPLOADER,)),
    "backoff_max": (_positive(parse_duration), 300.0, (UPLOADER,)),
    "quarantine_file": (_text, None, (UPLOADER,)),   # the uploader's (None: <spool_dir>/quarantine.jsonl)
    "linger": (_not_negative(parse_duration), 0.0, LIVE),
}



def _or_empty(parse):
    """An empty value is the default (None)."""
    def check(text):
        return parse(text) if text.strip() else None
    return check


def parse_listen(text):
    """`host:port`, `[v6 address]:port` or `:port` (every interface) -> (host, port); port 0
    takes any free port (tests)."""
    t = text.strip()
    if t.startswith("["):
        host, sep, port = t[1:].partition("]:")
    else:
        host, sep, port = t.rpartition(":")
    if not sep or ":" in host and not t.startswith("["):
        raise ValueError("%r is not host:port (an IPv6 address goes in brackets: [::]:502)" % text)
    port = _between(0, 65535)(port)
    return (host or "0.0.0.0", port)


# [gateway]: the Modbus TCP server of the cached readings (agent.gateway)
GATEWAY_SCHEMA = {
    "listen": (parse_listen, REQUIRED, (GATEWAY,)),
    "max_clients": (_between(1, 1000), 16, LIVE),
    "idle_timeout": (_positive(parse_duration), 60.0, LIVE),
    "max_age": (_or_empty(_positive(parse_duration)), None, LIVE),   # None: 3 x each device's interval
}


def _mqtt_url(text):
    from agent.mqtt.url import parse_url  # pure: no paho

    parse_url(text)
    return text.strip()


def _topic(text):
    from agent.mqtt.topic import Template  # pure: no paho

    t = text.strip()
    Template(t)
    return t


def _status_topic(text):
    t = text.strip()
    if t.lower() in ("", "off", "none", "no"):
        return ""
    t = _topic(t)
    from agent.mqtt.topic import Template

    if set(Template(t).fields) - {"agent"}:
        raise ValueError("%r: the status topic takes only {agent} (it is the agent's, not a device's)" % t)
    return t


MQTT_SCHEMA = {
    "url": (_mqtt_url, REQUIRED, (MQTT,)),
    "client_id": (_text, None, (MQTT,)),             # None: the agent id
    "username": (_text, None, (MQTT,)),
    "password": (_text, None, (MQTT,)),
    "topic": (_topic, "modbus/{agent}/{device}", (MQTT,)),
    "status_topic": (_status_topic, "modbus/{agent}/status", (MQTT,)),
    "qos": (_between(0, 1), 1, (MQTT,)),
    "retain": (parse_bool, False, (MQTT,)),
    "keepalive": (_between(5, 65535, parse_duration), 60.0, (MQTT,)),
    "batch": (parse_bool, False, (MQTT,)),
    "batch_max_records": (_between(1, 10000), 100, (MQTT,)),
    "batch_max_kb": (_positive(parse_int), 256, (MQTT,)),
    "max_message_kb": (_between(1, 256 * 1024), 256, (MQTT,)),
    "inflight": (_between(1, 65535), 20, (MQTT,)),
    "protocol": (_choice("5", "3.1.1"), "5", (MQTT,)),
    "connect_timeout": (_positive(parse_duration), 10.0, (MQTT,)),
    "backoff_max": (_positive(parse_duration), 300.0, (MQTT,)),
    "ca_file": (_text, None, (MQTT,)),
    "cert_file": (_text, None, (MQTT,)),
    "key_file": (_text, None, (MQTT,)),
    "insecure": (parse_bool, False, (MQTT,)),
    "quarantine_file": (_text, None, (MQTT,)),      # None: <spool_dir>/mqtt-quarantine.jsonl
}

# (Config attribute, its schema): the sections whose keys carry reload tags
RELOAD_SECTIONS = (("agent", AGENT_SCHEMA), ("upload", UPLOAD_SCHEMA), ("gateway", GATEWAY_SCHEMA),
                   ("mqtt", MQTT_SCHEMA))


def reload_tags(spec):
    """The reload tags of one schema entry; an entry without them counts as every tag (the
    safe side: rebuild too much rather than keep running on stale settings)."""
    return spec[2] if len(spec) > 2 else RELOAD_TAGS


def reopen_keys(tag, sections=RELOAD_SECTIONS):
    """[(section, key)] whose change means rebuilding `tag` (SPOOL, UPLOADER)."""
    return [(name, key) for name, schema in sections
            for key, spec in schema.items() if tag in reload_tags(spec)]


def changed(old, new, tag, sections=RELOAD_SECTIONS):
    """The "section.key"s tagged `tag` whose values differ between two Configs (empty: keep
    the live object). A section present in one and absent (None) in the other counts as a
    change of all its tagged keys."""
    out = []
    for name, key in reopen_keys(tag, sections):
        a, b = getattr(old, name, None), getattr(new, name, None)
        if (a is None) != (b is None) or (a is not None and
                                          repr(getattr(a, key, None)) != repr(getattr(b, key, None))):
            out.append("%s.%s" % (name, key))
    return out


# [connection:NAME]: the keys and defaults of each type come from its transport
# (agent.modbus.transport: TRANSPORTS, one entry per type, declared by its client class).
CONNECTION_TYPES = tuple(TRANSPORTS)


def key_parser(key):
    """The value parser of a transport's `agent.modbus.keys.Key`."""
    kind = key.kind
    if kind == "text":
        return _text
    if kind == "path":
        def path(text):
            if not text:
                raise ValueError("empty: name %s" % key.hint)
            return text
        return path
    if kind == "bool":
        return parse_bool
    if kind == "choice":
        return _choice(*key.choices, fold=str.upper)
    parse = parse_int if kind == "int" else parse_duration
    if key.positive:
        return _positive(parse)
    if key.bounds is not None:
        return _between(key.bounds[0], key.bounds[1], parse)
    return _not_negative(parse)


def _default(key):
    return REQUIRED if key.default is _keys.REQUIRED else key.default


def connection_schema(kind=None):
    """key -> (parser, default, connection types it applies to), every key of every type.
    For `kind` (a type) its own parsers and defaults; without one (the type is not known)
    what all types that take the key agree on: no parser (the text is kept) and no default
    where they differ (a port number or a device path, per-type timeouts)."""
    schema = {"type": (_choice(*CONNECTION_TYPES), REQUIRED, CONNECTION_TYPES)}
    owners = {}
    for t in TRANSPORTS.values():
        for name in t.keys:
            owners.setdefault(name, []).append(t)
    for name, ts in owners.items():
        types = tuple(t.name for t in ts)
        own = TRANSPORTS[kind].keys.get(name) if kind is not None else None
        if own is not None:
            schema[name] = (key_parser(own), _default(own), types)
            continue
        first = ts[0].keys[name]
        same = [t.keys[name] for t in ts]
        parse = key_parser(first) if all(first.same_value(k) for k in same) else None
        default = _default(first) if all(_default(k) == _default(first) for k in same) else None
        schema[name] = (parse, default, types)
    return schema


#: every connection key (docs, the sample's coverage test, a section of an unknown type)
CONNECTION_SCHEMA = connection_schema()
#: connection type -> its default timeout
CONNECTION_TIMEOUT = {name: t.keys["timeout"].default for name, t in TRANSPORTS.items()}
_CONNECTION_SCHEMAS = {name: connection_schema(name) for name in TRANSPORTS}

def _gateway_unit(text):
    """[device] gateway_unit: the unit id the gateway serves the device under, or off."""
    t = text.strip().lower()
    if not t:
        return None
    if t in ("off", "no", "none"):
        return False
    return _between(1, 255)(text)


DEVICE_SCHEMA = {
    "connection": (_text, REQUIRED),
    "unit": (_between(0, 255), 1),
    "interval": (_positive(parse_duration), None),      # None: [agent] interval
    "base": (_between(0, 1), 0),
    "byte_order": (_choice("ABCD", "BADC", "CDAB", "DCBA", fold=str.upper), "ABCD"),
    "max_registers": (_between(1, MAX_REGISTERS), MAX_REGISTERS),
    "max_bits": (_between(1, MAX_BITS), MAX_BITS),
    "max_gap": (_between(0, MAX_REGISTERS), 10),
    "profile": (_text, None),
    "mode": (_choice("on_schedule", "on_change"), "on_schedule"),
    "heartbeat": (_positive(parse_duration), 900.0),
    "enabled": (parse_bool, True),
    # `modbus-agent write` may write to this device (the agent itself never writes)
    "writable": (parse_bool, False),
    # N successful polls in one record ("samples"; agent.record), 1: a record per poll
    "buffer": (_between(1, 1000), 1),
    # the first poll after start (on_change mode): "always" sent, or only a baseline
    "first": (_choice("always", "on_change"), "always"),
    # read device identification (FC 43 / MEI 14) once after the first answer, into health
    # records; off by default (an old device may stay silent on a function it lacks: `scan`
    # writes `identify = yes` for the devices that answered it)
    "identify": (parse_bool, False),
    "gateway_unit": (_gateway_unit, None),               # None: its own unit; False: not served
}

PROFILE_SCHEMA = {
    "name": (_text, None),
    "manufacturer": (_text, None),
    "model": (_text, None),
    "source": (_text, None),
    "base": (_between(0, 1), 0),
    "byte_order": (_choice("ABCD", "BADC", "CDAB", "DCBA", fold=str.upper), "ABCD"),
    "unit": (_between(0, 255), None),
    "notes": (_text, None),
    # the meter's own limits, used unless the device section sets its own
    "max_registers": (_between(1, MAX_REGISTERS), None),
    "max_gap": (_between(0, MAX_REGISTERS), None),
}

#: point options: the type table (agent.types) says which exist and which type takes them
POINT_OPTIONS = _POINT_OPTIONS


# --- the typed objects ---------------------------------------------------------------------


class Settings:
    """Attributes from a schema; defaults come from the schema, nowhere else."""

    SCHEMA = {}

    def __init__(self, **values):
        for key, spec in self.SCHEMA.items():
            default = spec[1]
            setattr(self, key, values.pop(key, None if default is REQUIRED else default))
        if values:
            raise TypeError("unknown settings: %s" % ", ".join(sorted(values)))

    def __repr__(self):
        return "%s(%s)" % (type(self).__name__,
                           ", ".join("%s=%r" % (k, getattr(self, k)) for k in self.SCHEMA))


class AgentSettings(Settings):
    """[agent]: identity, default interval, spool, logging, dead-device handling."""

    SCHEMA = AGENT_SCHEMA

    @property
    def spool_max_bytes(self):
        return int(self.spool_max_mb * (1 << 20))

    @property
    def spool_segment_bytes(self):
        return self.spool_segment_kb << 10

    @property
    def log_max_bytes(self):
        return self.log_max_kb << 10


class UploadSettings(Settings):
    """[upload]: where and how the spool is uploaded."""

    SCHEMA = UPLOAD_SCHEMA

    @property
    def batch_max_bytes(self):
        return self.batch_max_kb << 10


class GatewaySettings(Settings):
    """[gateway]: where the Modbus TCP server of the cached readings listens, its limits."""

    SCHEMA = GATEWAY_SCHEMA


class MqttSettings(Settings):
    """[mqtt]: the broker the spool is also published to (agent.mqtt)."""

    SCHEMA = MQTT_SCHEMA

    def __repr__(self):     # the password never shows, wherever a Config is printed
        return "%s(%s)" % (type(self).__name__, ", ".join(
            "%s=%r" % (k, "***" if k == "password" and self.password else getattr(self, k)) for k in self.SCHEMA))


class Connection:
    """[connection:NAME]: one TCP link or serial bus shared by its devices.

    Every connection key is an attribute; defaults come from the type's transport (keys of
    other types: the default in CONNECTION_SCHEMA, or None)."""

    def __init__(self, name, type, **values):
        self.name = name
        self.type = type
        self.transport = TRANSPORTS[type]
        for key, spec in _CONNECTION_SCHEMAS[type].items():
            if key != "type":
                default = spec[1]
                setattr(self, key, values.pop(key, None if default is REQUIRED else default))
        if values:
            raise TypeError("unknown settings: %s" % ", ".join(sorted(values)))
        self.devices = []   # filled by load_config: the enabled devices on this connection

    def describe(self):
        return self.transport.describe(self)

    def open(self):
        """A codec client for this connection (connects lazily on its first read)."""
        return self.transport.open(self)

    def __repr__(self):
        return "Connection(%r, %s)" % (self.name, self.describe())


class Config:
    """The whole file: cfg.agent, cfg.upload, cfg.connections, cfg.devices (enabled ones)."""

    def __init__(self, path, agent, upload, connections, devices, disabled=(), warnings=(), gateway=None,
                 mqtt=None):
        self.path = path
        self.gateway = gateway        # GatewaySettings, None without a [gateway] section
        self.agent = agent
        self.upload = upload
        self.mqtt = mqtt        # MqttSettings or None
        self.connections = connections
        self.devices = devices
        self.disabled = list(disabled)
        self.warnings = list(warnings)

    def device(self, name):
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(name)


# --- applying a schema to a section --------------------------------------------------------


def _apply_schema(section, schema, problems, applies=None, kind=None, hints=None):
    """Parse a settings section against its schema -> {key: value} (only keys present, plus
    REQUIRED errors). Unknown keys are errors with a suggestion. `hints`: {key: object with
    .hint}, said after "missing (required)" (a transport's keys)."""
    values = {}
    for key, (text, line) in section.entries.items():
        k = key.lower()
        if k not in schema:
            problems.error(section.path, line, section.name, key,
                           "unknown option" + _suggest(k, schema))
            continue
        spec = schema[k]
        if applies is not None and kind not in spec[2]:
            problems.error(section.path, line, section.name, key,
                           "does not apply to a %s connection (only %s)" % (kind, ", ".join(spec[2])))
            continue
        parse = spec[0]
        if parse is None:
            values[k] = (text, line)
            continue
        try:
            values[k] = parse(text)
        except ValueError as e:
            problems.error(section.path, line, section.name, key, _reason(k, text, e))
            values[k] = _BAD
    for key, spec in schema.items():
        if spec[1] is REQUIRED and key not in values:
            if applies is not None and kind not in spec[2]:
                continue
            hint = getattr((hints or {}).get(key), "hint", None)
            problems.error(section.path, section.line, section.name, key,
                           "missing (required)" + (": " + hint if hint else ""))
            values[key] = _BAD
    return values


_BAD = object()   # a value that failed to parse (already reported)
