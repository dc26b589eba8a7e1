"""The agent's one flat INI file, parsed once into typed objects.

    cfg = load_config("/etc/modbus-agent/agent.ini")   # or raises ConfigError listing EVERY problem

Sections: [agent], [upload] (optional), [connection:NAME], [device:NAME], [points:NAME].
Every option, its type and its default is in one place: the schemas below. The file is read by a
small line-oriented parser (configparser drops line numbers, lowercases keys and allows syntax we
do not want), so each problem is reported as `file:line: [section] key: reason`.

Point lines (the [points:NAME] sections and the [points] section of a meter profile):

    name = [table] address type [argument] [order] [key=value ...]

    voltage_l1   = input 0 float32
    energy_total = holding 342 uint32 CDAB scale=0.01 unit=kWh
    temperature  = 301200 int16 scale=0.1 unit=degC       ; classic address: input register 1199
"""
import math
import os
import re

from agent.device import Device
from agent.plan import MAX_BITS, MAX_REGISTERS
from agent.types import (
    ALL_ORDERS,
    CLASSIC_PREFIX,
    TABLES,
    TYPE_ALIASES,
    TYPES,
    make_transform,
    order_for,
)

# Where `profile = NAME` looks for NAME.ini after the config file's own profiles/ folder and
# [agent] profile_dir: the installed samples, then the source tree's conf/profiles.
PROFILE_DIRS = ("/etc/modbus-agent/profiles",
                os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "conf", "profiles"))

#: share of its interval a connection may spend on the bus before `check` warns
BUS_WARN = 0.80


class ConfigError(Exception):
    """Every problem found in a config file, one `file:line: [section] key: reason` each."""

    def __init__(self, errors):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


def load_or_report(path, out=None):
    """`load_config`, or None after printing every error and their count (to stderr): what
    each command does with a bad file before exiting 2."""
    import sys

    try:
        return load_config(path)
    except ConfigError as e:
        out = out or sys.stderr
        for line in e.errors:
            print(line, file=out)
        print("%s: %d error(s)" % (path, len(e.errors)), file=out)
        return None


# --- value parsers: text -> value, or ValueError with the reason ---------------------------

_DURATION = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text):
    """'500ms', '10s', '5m', '1h', '7d' or bare seconds -> float seconds."""
    m = _DURATION.match(text.strip().lower())
    if not m:
        raise ValueError("%r is not a duration (write 500ms, 10s, 5m, 1h, 7d or seconds)" % text)
    return float(m.group(1)) * _UNIT_SECONDS[m.group(2)]


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
            raise ValueError("must be one of %s, not %r" % (" | ".join(choices), text))
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


# Values never shown in an error or warning (they end up in logread on SIGHUP, in support
# tickets): keys that hold secrets, and the user:password part of URLs.
_SECRET_VALUE = re.compile(r"(?i)\b((?:[a-z0-9_.-]*(?:token|password|passwd|secret)[a-z0-9_.-]*)[\"']?\s*[:=]\s*)"
                           r"(?:\*\*\*(?=[&;#\s'\"]|$)|'[^']*'|\"[^\"]*\"|[^\s'\",;]+)")   # *** + delimiter: done above
# Userinfo runs to the LAST '@' of the URL: a password may hold '@' (or '/', which breaks the URL
# but still must not show), and stopping at the first one would print the rest of it. A path that
# holds '@' hides the host too: showing too little beats showing a secret.
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^\s'\"]*@")


# A URL's query parameters whose name looks like a secret (`?api_key=...`, `&sig=...`,
# `access_token`, `X-Amz-Signature`, `auth`): the value goes, the name stays (it says what to fix).
# Wider than _SECRET_VALUE on purpose, and only after `?`/`&` so that words such as "signed"
# or "monkey" in ordinary messages are left alone.
_QUERY_SECRET = re.compile(r"(?i)([?&;][^=&;#\s'\"?]*(?:key|token|secret|passw|pwd|sig|auth|credential|session)"
                           r"[^=&;#\s'\"?]*=)[^&;#\s'\"]*")

_SECRET_KEY = re.compile(r"(?i)token|password|passwd|secret")


def redact(text):
    """`text` with secret values, URL credentials and secret-looking query values replaced by ***."""
    text = _URL_USERINFO.sub(r"\1***@", text)
    text = _QUERY_SECRET.sub(r"\1***", text)
    return _SECRET_VALUE.sub(r"\1***", text)


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


# --- schemas: the one place where options, types and defaults live -------------------------

REQUIRED = object()

AGENT_SCHEMA = {
    "id": (_agent_id, REQUIRED),
    "interval": (_positive(parse_duration), 10.0),
    "spool_dir": (_text, "/var/lib/modbus-agent/spool"),
    "seq_file": (_text, None),      # None: <directory of the config file>/<id>.seq
    "spool_max_mb": (_positive(parse_number), 16.0),
    "spool_max_age": (_positive(parse_duration), 7 * 86400.0),
    "spool_segment_kb": (_positive(parse_int), 256),
    "fsync": (_choice("always", "interval", "never"), "interval"),
    "fsync_interval": (_positive(parse_duration), 5.0),
    "status_file": (_text, "/tmp/modbus-agent-status.json"),
    "log_level": (_choice("debug", "info", "warning", "error"), "info"),
    "log_file": (_text, None),
    "log_max_kb": (_positive(parse_int), 512),
    "summary_interval": (_positive(parse_duration), 300.0),
    "health_interval": (_positive(parse_duration), 300.0),
    "dead_after": (_positive(parse_int), 3),
    "dead_backoff_max": (_positive(parse_duration), 300.0),
    "profile_dir": (_text, None),
}

UPLOAD_SCHEMA = {
    "url": (_url, REQUIRED),
    "token": (_text, None),
    "batch_max_records": (_positive(parse_int), 500),
    "batch_max_kb": (_positive(parse_int), 256),
    "gzip": (parse_bool, True),
    "timeout": (_positive(parse_duration), 10.0),
    "ca_file": (_text, None),
    "verify": (parse_bool, True),
    "backoff_max": (_positive(parse_duration), 300.0),
    "quarantine_file": (_text, None),   # None: <spool_dir>/quarantine.jsonl
    "linger": (_not_negative(parse_duration), 0.0),
}

CONNECTION_TYPES = ("tcp", "rtu", "rtu-over-tcp")
_TCP, _RTU, _RTU_TCP = CONNECTION_TYPES
# key -> (parser, default, connection types it applies to). A default of None for `timeout`
# means "per type", see CONNECTION_TIMEOUT.
CONNECTION_SCHEMA = {
    "type": (_choice(*CONNECTION_TYPES), REQUIRED, CONNECTION_TYPES),
    "host": (_text, REQUIRED, (_TCP, _RTU_TCP)),
    "port": (None, None, CONNECTION_TYPES),   # TCP port number or serial device path, by type
    "timeout": (_positive(parse_duration), None, CONNECTION_TYPES),
    "connect_timeout": (_positive(parse_duration), None, (_TCP, _RTU_TCP)),
    "pause": (_not_negative(parse_duration), 0.0, CONNECTION_TYPES),
    "backoff_max": (_positive(parse_duration), 60.0, CONNECTION_TYPES),
    # serial line; on rtu-over-tcp they describe the bus behind the gateway (for `check` only)
    "baud": (_positive(parse_int), 9600, (_RTU, _RTU_TCP)),
    "parity": (_choice("N", "E", "O", fold=str.upper), "N", (_RTU, _RTU_TCP)),
    "bytesize": (_between(7, 8), 8, (_RTU, _RTU_TCP)),
    "stopbits": (_between(1, 2), 1, (_RTU, _RTU_TCP)),
    "rs485_echo": (parse_bool, False, (_RTU,)),
}
CONNECTION_TIMEOUT = {_TCP: 1.0, _RTU: 0.5, _RTU_TCP: 1.0}

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

POINT_OPTIONS = ("scale", "offset", "divisor", "decimals", "unit", "deadband", "enum", "swap", "signed")


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


class Connection:
    """[connection:NAME]: one TCP link or serial bus shared by its devices."""

    def __init__(self, name, type, host=None, port=None, timeout=None, connect_timeout=None,
                 pause=0.0, backoff_max=60.0, baud=9600, parity="N", bytesize=8, stopbits=1,
                 rs485_echo=False):
        self.name = name
        self.type = type
        self.host = host
        self.port = port if port is not None else (502 if type != _RTU else None)
        self.timeout = timeout if timeout is not None else CONNECTION_TIMEOUT[type]
        self.connect_timeout = connect_timeout
        self.pause = pause
        self.backoff_max = backoff_max
        self.baud = baud
        self.parity = parity
        self.bytesize = bytesize
        self.stopbits = stopbits
        self.rs485_echo = rs485_echo
        self.devices = []   # filled by load_config: the enabled devices on this connection

    def describe(self):
        if self.type == _RTU:
            return "rtu %s %d %d%s%d" % (self.port, self.baud, self.bytesize, self.parity, self.stopbits)
        return "%s %s:%s" % (self.type, self.host, self.port)

    def open(self):
        """A codec client for this connection (connects lazily on its first read)."""
        from agent.modbus import client  # lazily: `check` must work without the transports
        if self.type == _RTU:
            return client.RtuClient(self.port, baudrate=self.baud, parity=self.parity,
                                    bytesize=self.bytesize, stopbits=self.stopbits,
                                    timeout=self.timeout, pause=self.pause,
                                    rs485_echo=self.rs485_echo, backoff_max=self.backoff_max)
        cls = client.TcpClient if self.type == _TCP else client.RtuOverTcpClient
        return cls(self.host, port=self.port, timeout=self.timeout,
                   connect_timeout=self.connect_timeout, pause=self.pause,
                   backoff_max=self.backoff_max)

    def __repr__(self):
        return "Connection(%r, %s)" % (self.name, self.describe())


class Point:
    """One named value: where it lives, how it is decoded, how it is reported."""

    __slots__ = ("address", "bit_hi", "bit_lo", "byte", "count", "decimals", "deadband", "divisor",
                 "enum", "line", "name", "offset", "order", "path", "scale", "section", "signed",
                 "swap", "table", "text", "type", "unit")

    def __init__(self, name, table, address, type, count, order=None, scale=1.0, offset=0.0,
                 divisor=1.0, decimals=None, unit=None, deadband=0.0, enum=None, swap=False,
                 signed=False, bit_lo=0, bit_hi=15, byte=None, path=None, line=None, section=None,
                 text=None):
        self.name = name
        self.table = table          # coil | discrete | holding | input
        self.address = address      # protocol address (0-based, as on the wire)
        self.type = type            # key of agent.types.TYPES
        self.count = count          # registers (or bits) it spans
        self.order = order          # concrete byte order, None for single-register/bit values
        self.scale = scale
        self.offset = offset
        self.divisor = divisor
        self.decimals = decimals
        self.unit = unit
        self.deadband = deadband
        self.enum = enum
        self.swap = swap
        self.signed = signed
        self.bit_lo = bit_lo
        self.bit_hi = bit_hi
        self.byte = byte
        self.path = path
        self.line = line
        self.section = section
        self.text = text

    @property
    def function(self):
        return TABLES[self.table][0]

    @property
    def where(self):
        return "%s:%s: [%s] %s" % (self.path, self.line, self.section, self.name)

    def footprint(self):
        """{address: mask} it occupies: bit masks inside registers, 1 for bits."""
        if TABLES[self.table][1]:
            return {self.address: 1}
        kind = TYPES[self.type].kind
        if kind in ("bit", "bits"):
            return {self.address: ((1 << (self.bit_hi - self.bit_lo + 1)) - 1) << self.bit_lo}
        if kind == "byte":
            return {self.address: 0xFF00 if self.byte == "high" else 0x00FF}
        return {a: 0xFFFF for a in range(self.address, self.address + self.count)}

    def transform(self):
        kind = TYPES[self.type].kind
        return make_transform(kind, scale=self.scale, offset=self.offset, divisor=self.divisor,
                              decimals=self.decimals, enum=self.enum, bit_lo=self.bit_lo,
                              bit_hi=self.bit_hi, signed=self.signed or self.type == "int8",
                              byte=self.byte, float32=self.type == "float32")

    def __repr__(self):
        return "Point(%r, %s %d %s)" % (self.name, self.table, self.address, self.type)


class Config:
    """The whole file: cfg.agent, cfg.upload, cfg.connections, cfg.devices (enabled ones)."""

    def __init__(self, path, agent, upload, connections, devices, disabled=(), warnings=()):
        self.path = path
        self.agent = agent
        self.upload = upload
        self.connections = connections
        self.devices = devices
        self.disabled = list(disabled)
        self.warnings = list(warnings)

    def device(self, name):
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(name)


# --- the INI reader ------------------------------------------------------------------------


class Section:
    __slots__ = ("entries", "line", "name", "path")

    def __init__(self, path, name, line):
        self.path = path
        self.name = name
        self.line = line
        self.entries = {}   # key (as written) -> (value, line)


class Problems:
    """Collects errors and warnings, each with its place in a file."""

    def __init__(self):
        self._errors = []
        self._warnings = []

    @staticmethod
    def format(path, line, section, key, reason):
        where = "%s:%s: [%s]" % (path, line, section)
        if key:
            where += " " + key
        return "%s: %s" % (where, redact(reason))

    def error(self, path, line, section, key, reason):
        self._errors.append((path, line or 0, len(self._errors),
                             self.format(path, line, section, key, reason)))

    def warn(self, path, line, section, key, reason):
        self._warnings.append((path, line or 0, len(self._warnings),
                               self.format(path, line, section, key, reason)))

    # In file and line order: the order an operator fixes them in.
    @property
    def errors(self):
        return [e[-1] for e in sorted(self._errors, key=lambda e: e[:3])]

    @property
    def warnings(self):
        return [w[-1] for w in sorted(self._warnings, key=lambda w: w[:3])]

    def count(self):
        return len(self._errors)


_SECTION = re.compile(r"^\[\s*([^\]]*?)\s*\]\s*(?:[;#].*)?$")
_INLINE_COMMENT = re.compile(r"\s[;#]")


_QUOTED = re.compile(r'^"([^"]*)"\s*(?:[;#].*)?$')


def _ini_value(text, key):
    """The value part of `key = value` -> (value, None) or (None, problem). An inline comment
    (` ;`, ` #`) ends an unquoted value; a value in double quotes is taken as written, ` ;` and
    all (`token = "ab ;cd"`). A secret key whose value a comment would cut is refused: the
    token sent would silently differ from the one written, and the collector's 401 would not
    say why."""
    text = text.strip()
    if text.startswith('"'):
        m = _QUOTED.match(text)
        if m is None:
            return None, ('a value that starts with " needs its closing " (and nothing but a '
                          'comment after it); a quoted value cannot itself hold a "')
        return m.group(1), None
    m = _INLINE_COMMENT.search(text)
    if m is None:
        return text, None
    if _SECRET_KEY.search(key) and text[:m.start()].strip():
        mark = text[m.start() + 1]
        return None, ('holds " %s", which starts a comment here, so the value would be cut short; '
                      'if it belongs to the value, put the whole value in double quotes ("ab %scd"); '
                      'if it is a comment, put it on a line of its own' % (mark, mark))
    return text[:m.start()].strip(), None


def read_ini(path, problems, text=None):
    """The flat INI subset: `[section]`, `key = value`, full-line and inline (` ;`, ` #`)
    comments, values optionally in double quotes (`token = "ab ;cd"`, taken as written). No
    continuation lines, no interpolation, no escapes, keys keep their case."""
    if text is None:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    sections = []
    current = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in ";#":
            continue
        if line.startswith("["):
            m = _SECTION.match(line)
            if not m or not m.group(1):
                problems.error(path, lineno, current.name if current else "-", None,
                               "bad section header %r" % line)
                current = None
                continue
            name = m.group(1)
            dup = [s for s in sections if s.name == name]
            if dup:
                problems.error(path, lineno, name, None,
                               "section repeated (first at line %d)" % dup[0].line)
            current = Section(path, name, lineno)
            sections.append(current)
            continue
        if raw[:1].isspace():
            problems.error(path, lineno, current.name if current else "-", None,
                           "indented line: continuation lines are not supported")
            continue
        if "=" not in line:
            # only the first word: the rest may be a secret (`token: 9f8e...`, `token 9f8e...`)
            word = re.split(r"[\s:]", line, maxsplit=1)[0]
            problems.error(path, lineno, current.name if current else "-", None,
                           "expected `key = value`, got a line starting with %r%s" % (
                               word, " (rest not shown)" if len(word) < len(line) else ""))
            continue
        key, value = line.split("=", 1)
        key = key.strip()
        value, problem = _ini_value(value, key)
        if problem:
            problems.error(path, lineno, current.name if current else "-", key or None, problem)
            continue
        if current is None:
            problems.error(path, lineno, "-", key, "option before the first [section]")
            continue
        if not key:
            problems.error(path, lineno, current.name, None, "missing key before '='")
            continue
        if key in current.entries:
            problems.error(path, lineno, current.name, key,
                           "repeated (first at line %d)" % current.entries[key][1])
            continue
        current.entries[key] = (value, lineno)
    return sections


def _suggest(word, choices):
    import difflib  # only when a key is wrong: keeps it out of the running agent's memory

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return " (did you mean %r?)" % close[0] if close else ""


def _apply_schema(section, schema, problems, applies=None, kind=None):
    """Parse a settings section against its schema -> {key: value} (only keys present, plus
    REQUIRED errors). Unknown keys are errors with a suggestion."""
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
            problems.error(section.path, section.line, section.name, key, "missing (required)")
            values[key] = _BAD
    return values


_BAD = object()   # a value that failed to parse (already reported)


def _line_of(section, key):
    for k, (_v, line) in section.entries.items():
        if k.lower() == key:
            return line
    return section.line


# --- point lines ---------------------------------------------------------------------------

_ORDER_TOKEN = re.compile(r"^[A-H]{2,8}$")


def _classic(token, table):
    """'40001' -> ('holding', 0); None when `token` is not a classic 5/6-digit address. Raises
    _PointError for the classic form out of its range (465537, 40000)."""
    if not token.isdigit() or len(token) not in (5, 6) or token[0] not in CLASSIC_PREFIX:
        return None
    ctable = CLASSIC_PREFIX[token[0]]
    n = int(token[1:])
    if len(token) == 5 and table is not None:
        return None   # `holding 40001` is register 40001 as written
    if n < 1 or n > (9999 if len(token) == 5 else 65536):
        if table not in (None, ctable):
            return None   # `holding 100000`: just too large, reported as such
        raise _PointError(_classic_range_error(token, ctable))
    return ctable, n - 1


def _classic_range_error(token, ctable):
    d = token[0]
    what = {"coil": "coils", "discrete": "discrete inputs", "input": "input registers",
            "holding": "holding registers"}[ctable]
    return ("classic address %s is out of range: %s are %s0001..%s9999 (5 digits) or "
            "%s00001..%s65536 (6 digits)" % (token, what, d, d, d, d))


class _PointError(ValueError):
    """A problem that ends the parsing of one point line."""


def parse_point(name, text, base, byte_order, path, line, section, problems):
    """One point line -> Point, or None after reporting every problem with it.

        name = [table] address type [argument] [order] [key=value ...]
    """
    reasons = []
    if not name or any(c.isspace() for c in name):
        reasons.append("point names must not contain spaces")
    words = text.split()
    positional = [w for w in words if "=" not in w]
    try:
        table, address = _point_location(positional, base, reasons, problems.warn,
                                         (path, line, section, name))
        tname, count, byte, bit_lo, bit_hi = _point_type(positional, table)
        order = _point_order(positional, tname, table, byte_order, reasons)
    except ValueError as e:   # _PointError, or a number that does not parse
        reasons.append(str(e))
        for r in reasons:
            problems.error(path, line, section, name, r)
        return None
    is_bits = TABLES[table][1]
    if address is not None and (address + count - 1 > 0xFFFF or address < 0):
        reasons.append("address %d + %d %s is outside 0..65535" % (
            address, count, "bits" if is_bits else "registers"))
    opts = _point_options([w for w in words if "=" in w], TYPES[tname].kind, tname, reasons)
    for r in reasons:
        problems.error(path, line, section, name, r)
    if reasons:
        return None
    return Point(name, table, address, tname, count, order=order, path=path, line=line,
                 section=section, text=text, bit_lo=bit_lo, bit_hi=bit_hi, byte=byte, **opts)


def _point_location(positional, base, reasons, warn, where):
    """Consume `[table] address` -> (table, protocol address)."""
    if not positional:
        raise _PointError("expected `[table] address type [order] [key=value ...]`")
    table = None
    tok = positional.pop(0)
    if tok.lower() in TABLES:
        table = tok.lower()
        if not positional:
            raise _PointError("missing address after %r" % tok)
        tok = positional.pop(0)
    elif not tok[:1].isdigit():
        raise _PointError("unknown table %r (coil, discrete, holding, input)%s" % (
            tok, _suggest(tok.lower(), TABLES)))
    classic = _classic(tok, table)
    if classic is not None:
        ctable, address = classic
        if table is not None and ctable != table:
            reasons.append("classic address %s is in the %s table, not %s" % (tok, ctable, table))
        return ctable, address
    try:
        address = parse_int(tok)
    except ValueError as e:
        raise _PointError("address: %s" % e) from None
    if table is None:
        raise _PointError("address %s needs a table (coil, discrete, holding, input) or the "
                          "classic 5/6-digit form (40001 = holding register 0)" % tok)
    if base and address < base:
        reasons.append("address %d is below the device's base %d (base = 1: the first register "
                       "is %s 1)" % (address, base, table))
        return table, None   # one error: no second one about the shifted address
    if len(tok) == 5 and tok.isdigit() and CLASSIC_PREFIX.get(tok[0]) == table and int(tok[1:]) >= 1:
        # `holding 40001`: register 40001 as written, or the classic form (the first holding
        # register) with a table put in front? The off-by-40001 trap: say what it reads.
        classic = int(tok[1:]) - 1 + base
        what = table if TABLES[table][1] else table + " register"
        warn(*where, "%s %s reads %s %d (protocol address %d); did you mean %s %d (%s in the "
                     "classic form)? Write `%s` without the table for the classic form"
             % (table, tok, what, address, address - base, table, classic, tok, tok))
    return table, address - base


_TYPE_ARG_HELP = {"bit": "`bit` needs the bit number: bit 0..15",
                  "bits": "`bits` needs a range: bits 0-3",
                  "string": "`string` needs its length in registers: string 8"}


def _point_type(positional, table):
    """Consume `type [argument]` -> (type name, registers or bits, byte, bit_lo, bit_hi)."""
    is_bits = TABLES[table][1]
    if not positional:
        if is_bits:
            return "bool", 1, None, 0, 15
        raise _PointError("missing type (e.g. uint16, int32, float32, string 8, bits 0-3)")
    tname = positional.pop(0).lower()
    byte = None
    if tname in TYPE_ALIASES:
        tname, byte = TYPE_ALIASES[tname]
    if tname not in TYPES:
        raise _PointError("unknown type %r%s" % (tname, _suggest(tname, list(TYPES) + list(TYPE_ALIASES))))
    if is_bits and tname != "bool":
        raise _PointError("%s table holds single bits: use type bool" % table)
    if not is_bits and tname == "bool":
        raise _PointError("bool is for coil/discrete tables; in a register use `bit N`")
    count, bit_lo, bit_hi = TYPES[tname].words, 0, 15
    if tname not in ("bit", "bits", "string") and not (tname in ("int8", "uint8") and byte is None):
        return tname, count, byte, bit_lo, bit_hi
    if not positional:
        raise _PointError(_TYPE_ARG_HELP.get(tname, "`%s` needs high or low" % tname))
    arg = positional.pop(0)
    if tname == "bit":
        bit_lo = bit_hi = parse_int(arg)
        if not 0 <= bit_lo <= 15:
            raise _PointError("bit number %s is not 0..15" % arg)
    elif tname == "bits":
        lo, _, hi = arg.partition("-")
        try:
            bit_lo, bit_hi = parse_int(lo), parse_int(hi or lo)
        except ValueError:
            bit_lo = bit_hi = -1
        if not 0 <= bit_lo <= bit_hi <= 15:
            raise _PointError("bit range %s is not within 0-15, low-high" % arg)
    elif tname == "string":
        try:
            count = parse_int(arg)
        except ValueError:
            count = 0
        if not 1 <= count <= MAX_REGISTERS:
            raise _PointError("string length %s is not 1..%d registers" % (arg, MAX_REGISTERS))
    else:
        byte = {"high": "high", "h": "high", "low": "low", "l": "low"}.get(arg.lower())
        if byte is None:
            raise _PointError("%r: int8/uint8 take `high` or `low`" % arg)
    return tname, count, byte, bit_lo, bit_hi


def _point_order(positional, tname, table, byte_order, reasons):
    """Consume an optional byte order -> the concrete order, or the device's default."""
    order = None
    word = positional[0].upper() if positional else ""
    if word in ALL_ORDERS:
        positional.pop(0)
        try:
            order = order_for(tname, word)
        except ValueError as e:
            reasons.append(str(e))
    elif TYPES[tname].kind in ("int", "float") and not TABLES[table][1]:
        order = order_for(tname, byte_order)
    if positional:
        extra = positional[0]
        hint = " (byte orders: %s)" % ", ".join(ALL_ORDERS) if _ORDER_TOKEN.match(extra.upper()) else ""
        reasons.append("unexpected %r%s" % (extra, hint))
    return order


def _point_options(words, kind, tname, reasons):
    """`key=value` words -> {option: value}; appends a reason for each bad or misplaced one."""
    opts = {}
    for w in words:
        k, _, v = w.partition("=")
        k = k.lower()
        if k not in POINT_OPTIONS:
            reasons.append("unknown option %r%s" % (k, _suggest(k, POINT_OPTIONS)))
        elif k in opts:
            reasons.append("option %r given twice" % k)
        else:
            try:
                opts[k] = _point_option(k, v)
            except ValueError as e:
                reasons.append("%s: %s" % (k, e))
    numeric = ("scale", "offset", "divisor", "decimals")
    if kind in ("string", "bool", "bit"):
        reasons.extend("%s does not apply to a %s value" % (k, tname)
                       for k in numeric + ("deadband",) if k in opts)
    if "enum" in opts:
        if kind in ("float", "string"):
            reasons.append("enum applies to integer and bit values, not %s" % tname)
        clash = [k for k in numeric if k in opts]
        if clash:
            reasons.append("enum cannot be combined with %s" % ", ".join(clash))
    if "swap" in opts and kind != "string":
        reasons.append("swap applies to strings only (use a byte order for numbers)")
    if "signed" in opts and kind != "bits":
        reasons.append("signed applies to bit fields only (`bits A-B signed=yes`); use an intN type")
    return opts


def _point_option(key, text):
    if key in ("scale", "offset", "deadband"):
        v = parse_number(text)
        if key == "scale" and v == 0:
            raise ValueError("must not be 0")
        if key == "deadband" and v < 0:
            raise ValueError("must not be negative")
        return v
    if key == "divisor":
        v = parse_number(text)
        if v == 0:
            raise ValueError("must not be 0")
        return v
    if key == "decimals":
        v = parse_int(text)
        if not 0 <= v <= 15:
            raise ValueError("must be 0..15")
        return v
    if key == "unit":
        if not text:
            raise ValueError("empty")
        return text
    if key == "enum":
        table = {}
        for item in text.split(","):
            k, sep, label = item.partition(":")
            if not sep or not label:
                raise ValueError("%r: write enum=0:off,1:on" % item)
            table[parse_int(k)] = label
        return table
    return parse_bool(text)   # swap, signed


# --- profiles ------------------------------------------------------------------------------


def find_profile(name, config_path, profile_dir=None):
    """Path of profile `name` (a path, or NAME looked up as NAME.ini), or None."""
    if os.sep in name or name.endswith(".ini"):
        p = name if os.path.isabs(name) else os.path.join(os.path.dirname(config_path), name)
        return p if os.path.isfile(p) else None
    dirs = [os.path.join(os.path.dirname(os.path.abspath(config_path)), "profiles")]
    if profile_dir:
        dirs.insert(0, profile_dir)
    dirs.extend(PROFILE_DIRS)
    for d in dirs:
        p = os.path.join(d, name + ".ini")
        if os.path.isfile(p):
            return p
    return None


def load_profile(path, problems):
    """A meter profile file: [profile] metadata and [points]. -> (meta dict, [Point])."""
    sections = read_ini(path, problems)
    meta = {}
    points = []
    known = ("profile", "points")
    by_name = {s.name: s for s in sections}
    for s in sections:
        if s.name not in known:
            problems.error(path, s.line, s.name, None,
                           "unknown section in a profile (only [profile] and [points])")
    if "profile" in by_name:
        meta = _apply_schema(by_name["profile"], PROFILE_SCHEMA, problems)
    base = meta.get("base", 0)
    order = meta.get("byte_order", "ABCD")
    if base is _BAD:
        base = 0
    if order is _BAD:
        order = "ABCD"
    if "points" in by_name:
        s = by_name["points"]
        for name, (text, line) in s.entries.items():
            p = parse_point(name, text, base, order, path, line, "points", problems)
            if p is not None:
                points.append(p)
    else:
        problems.error(path, 1, "points", None, "profile has no [points] section")
    return meta, points


# --- loading -------------------------------------------------------------------------------


def load_config(path, text=None):
    """Read, parse and validate `path` -> Config, or raise ConfigError with every problem."""
    cfg, problems = _load(path, text)
    if problems.errors:
        raise ConfigError(problems.errors)
    return cfg


def check_config(path, text=None):
    """(Config or None, errors, warnings): for `check`, which prints everything."""
    cfg, problems = _load(path, text)
    return (None if problems.errors else cfg), problems.errors, problems.warnings


SECTION_KINDS = ("agent", "upload", "connection:NAME", "device:NAME", "points:NAME")


def default_seq_file(config_path, agent_id):
    """`[agent] seq_file` when not set: next to the config file (/etc/modbus-agent on OpenWrt:
    flash, which survives a reboot, unlike a spool under /var)."""
    return os.path.join(os.path.dirname(os.path.abspath(config_path)), agent_id + ".seq")


def _load(path, text):
    problems = Problems()
    try:
        sections = read_ini(path, problems, text)
    except OSError as e:
        problems.error(path, 0, "-", None, "cannot read: %s" % (e.strerror or e))
        return None, problems
    except UnicodeDecodeError as e:
        problems.error(path, 0, "-", None, "not UTF-8 text: %s" % e)
        return None, problems
    by_kind = _sort_sections(path, sections, problems)

    agent_sec = by_kind["agent"]
    if agent_sec is None:
        problems.error(path, 1, "agent", None, "missing [agent] section (it needs at least `id`)")
        agent = AgentSettings()
    else:
        agent = AgentSettings(**_good(_apply_schema(agent_sec, AGENT_SCHEMA, problems)))
    if agent.seq_file is None and agent.id:
        agent.seq_file = default_seq_file(path, agent.id)
    upload = None
    if by_kind["upload"] is not None:
        upload = _load_upload(by_kind["upload"], agent, problems)

    connections = {}
    for name, s in by_kind["connection"].items():
        conn = _load_connection(name, s, problems)
        if conn is not None:
            connections[name] = conn

    devices, disabled = [], []
    for name, s in by_kind["device"].items():
        dev = _load_device(name, s, by_kind["points"].get(name), agent, connections,
                           by_kind["connection"], problems)
        if dev is None:
            continue
        if not dev.enabled:
            disabled.append(name)
            continue
        devices.append(dev)
        dev.connection.devices.append(dev)

    for name, s in by_kind["points"].items():
        if name not in by_kind["device"]:
            problems.error(path, s.line, s.name, None, "no [device:%s] for these points%s" % (
                name, _suggest(name, by_kind["device"])))
    used = {v for s in by_kind["device"].values() for k, (v, _l) in s.entries.items()
            if k.lower() == "connection"}
    for name, s in by_kind["connection"].items():
        if name not in used:
            problems.warn(path, s.line, s.name, None, "no device uses this connection")
    _check_bus_time(connections, problems)
    _check_units(devices, problems)
    return Config(path, agent, upload, connections, devices, disabled, problems.warnings), problems


def _good(values):
    """Parsed values without the ones that failed (already reported)."""
    return {k: v for k, v in values.items() if v is not _BAD}


def _sort_sections(path, sections, problems):
    """{'agent': Section|None, 'upload': Section|None, 'connection'|'device'|'points': {name: Section}}"""
    out = {"agent": None, "upload": None, "connection": {}, "device": {}, "points": {}}
    for s in sections:
        head, sep, name = s.name.partition(":")
        head, name = head.strip().lower(), name.strip()
        if s.name in ("agent", "upload"):
            out[s.name] = s
        elif sep and name and head in ("device", "points") and name_problem(name):
            problems.error(path, s.line, s.name, None, name_problem(name))
        elif sep and name and head in ("connection", "device", "points"):
            out[head][name] = s
        else:
            problems.error(path, s.line, s.name, None, "unknown section%s; sections are %s" % (
                _suggest(head, ("agent", "upload", "connection", "device", "points")),
                ", ".join("[%s]" % k for k in SECTION_KINDS)))
    return out


def _load_upload(s, agent, problems):
    upload = UploadSettings(**_good(_apply_schema(s, UPLOAD_SCHEMA, problems)))
    if upload.quarantine_file is None and agent.spool_dir:
        upload.quarantine_file = os.path.join(agent.spool_dir, "quarantine.jsonl")
    if upload.token is None and upload.url and upload.url.startswith("http://") \
            and not re.match(r"^http://(127\.|localhost|\[::1\])", upload.url):
        problems.warn(s.path, _line_of(s, "url"), s.name, "url",
                      "plain http and no token: anyone on the path can read and forge uploads")
    return upload


def _load_connection(name, s, problems):
    """[connection:NAME] -> Connection, or None after reporting its problems. Which keys are
    allowed depends on the type, so the type is read first."""
    raw_type = None
    for k, (v, _line) in s.entries.items():
        if k.lower() == "type":
            raw_type = v.strip().lower()
    if raw_type not in CONNECTION_TYPES:
        _apply_schema(s, CONNECTION_SCHEMA, problems)   # reports the type and everything else
        return None
    kind = raw_type
    values = _apply_schema(s, CONNECTION_SCHEMA, problems, applies=True, kind=kind)
    if "port" in values:
        text, line = values["port"]
        try:
            if kind == _RTU:
                if not text:
                    raise ValueError("empty: name the serial device, e.g. /dev/ttyUSB0")
                values["port"] = text
            else:
                values["port"] = _between(1, 65535)(text)
        except ValueError as e:
            problems.error(s.path, line, s.name, "port", str(e))
            values["port"] = _BAD
    elif kind == _RTU:
        problems.error(s.path, s.line, s.name, "port",
                       "missing (required): the serial device, e.g. /dev/ttyUSB0")
        return None
    if any(v is _BAD for v in values.values()):
        return None
    values.pop("type", None)
    return Connection(name, kind, **values)


def _load_device(name, s, psec, agent, connections, conn_sections, problems):
    """[device:NAME] with its profile and [points:NAME] -> Device (planned), or None after
    reporting every problem with it."""
    path = s.path
    values = _apply_schema(s, DEVICE_SCHEMA, problems)
    ok = not any(v is _BAD for v in values.values())
    conn = None
    cname = values.get("connection")
    if cname not in (None, _BAD):
        conn = connections.get(cname)
        if conn is None:
            line = _line_of(s, "connection")
            if cname in conn_sections:
                problems.error(path, line, s.name, "connection",
                               "connection %r has errors (see above)" % cname)
            else:
                problems.error(path, line, s.name, "connection", "no [connection:%s]%s" % (
                    cname, _suggest(cname, conn_sections)))
            ok = False
    unit = values.get("unit", 1)
    if conn is not None and unit is not _BAD and conn.type != _TCP and not 1 <= unit <= 247:
        problems.error(path, _line_of(s, "unit"), s.name, "unit",
                       "must be 1..247 on a serial bus (0 is broadcast, which cannot be read)")
        ok = False
    points, points_ok = _device_points(name, s, psec, values, agent, problems)
    if not (ok and points_ok):
        return None
    for k, spec in DEVICE_SCHEMA.items():
        values.setdefault(k, spec[1])
    if values["interval"] is None:
        values["interval"] = agent.interval or AGENT_SCHEMA["interval"][1]
    values["connection"] = conn
    dev = Device(name, points=points, **values)
    dev.path, dev.line = path, s.line
    dev.interval_line = _line_of(s, "interval")
    return dev


def _device_points(name, s, psec, values, agent, problems):
    """The profile's points, then the device's own, which add or override by name (`off`
    drops one). -> ([Point], ok). May set max_registers/max_gap from the profile."""
    ok = True
    base = values.get("base", 0)
    order = values.get("byte_order", "ABCD")
    base = 0 if base is _BAD else base
    order = "ABCD" if order is _BAD else order
    points = {}
    prof = values.get("profile")
    if prof not in (None, _BAD):
        ppath = find_profile(prof, s.path, agent.profile_dir)
        if ppath is None:
            problems.error(s.path, _line_of(s, "profile"), s.name, "profile",
                           "profile %r not found (looked for %s.ini in the config's profiles/ "
                           "folder, %s)" % (prof, prof, ", ".join(PROFILE_DIRS)))
            ok = False
        else:
            n_before = problems.count()
            meta, ppoints = load_profile(ppath, problems)
            ok = problems.count() == n_before
            for k in ("max_registers", "max_gap"):
                if k not in values and meta.get(k) not in (None, _BAD):
                    values[k] = meta[k]
            points.update((p.name, p) for p in ppoints)
    if psec is not None:
        for pname, (text, line) in psec.entries.items():
            if text.lower() in ("off", "none", "-"):
                if pname not in points:
                    problems.error(s.path, line, psec.name, pname,
                                   "`%s` removes a profile point, but the profile has no such point" % text)
                    ok = False
                points.pop(pname, None)
                continue
            p = parse_point(pname, text, base, order, s.path, line, psec.name, problems)
            if p is None:
                ok = False
                continue
            points.pop(pname, None)
            points[pname] = p
    if not points and ok:
        problems.error(s.path, s.line, s.name, None,
                       "no points: add a [points:%s] section or a profile" % name)
        ok = False
    pts = list(points.values())
    if not _check_overlaps(pts, problems):
        ok = False
    for p in pts:
        key = "max_bits" if TABLES[p.table][1] else "max_registers"
        limit = values.get(key)
        if limit not in (None, _BAD) and p.count > limit:
            problems.error(p.path, p.line, p.section, p.name,
                           "spans %d registers, more than %s = %d" % (p.count, key, limit))
            ok = False
    return pts, ok


def _check_units(devices, problems):
    seen = {}
    for d in devices:
        key = (d.connection.name, d.unit)
        if key in seen:
            problems.warn(d.path, d.line, "device:" + d.name, "unit",
                          "unit %d on %s is also device %s" % (d.unit, d.connection.name, seen[key]))
        seen[key] = d.name


def _check_overlaps(points, problems):
    """Two points may share a register only through disjoint bit masks (bit, bits, int8)."""
    ok = True
    owners = {}   # (table, address) -> [(mask, point)]
    for p in points:
        for addr, mask in p.footprint().items():
            lst = owners.setdefault((p.table, addr), [])
            for other_mask, other in lst:
                if other_mask & mask:
                    problems.error(p.path, p.line, p.section, p.name,
                                   "overlaps %s (%s %d) at %s %d" % (
                                       other.name, other.table, other.address, p.table, addr))
                    ok = False
                    break
            else:
                lst.append((mask, p))
                continue
            break
    return ok


def _check_bus_time(connections, problems):
    """A connection's devices must fit their intervals: sum of (bus time / interval) <= 100%."""
    for conn in connections.values():
        if not conn.devices:
            continue
        shares = [(d.estimate()["seconds"] / d.interval, d) for d in conn.devices]
        load = sum(s for s, _ in shares)
        worst_share, worst = max(shares, key=lambda x: x[0])
        detail = ", ".join("%s %.0f%%" % (d.name, 100 * s) for s, d in shares)
        where = (worst.path, worst.interval_line, "device:" + worst.name, "interval")
        if load > 1.0:
            problems.error(*where, "the bus cannot serve this: connection %s needs %.0f%% of its time "
                                   "(%s); lengthen intervals, raise the baud rate or drop points"
                           % (conn.name, 100 * load, detail))
        elif load > BUS_WARN:
            problems.warn(*where, "connection %s is busy %.0f%% of the time (%s): little room for "
                                  "retries and slow answers" % (conn.name, 100 * load, detail))
