"""Collector configuration: conf/collector.ini, parsed once, defaults in one place.

Errors name the place: `file:line: [section] key: reason`, every problem at once.
Flags (--listen, --db) and make_app(**overrides) win over the file.
"""
import configparser
import ipaddress
import re

from agent import common
from agent.collector.alerts import rules as alert_rules
from agent.common import ini_value, parse_duration

DEFAULTS = {
    "listen": "127.0.0.1:8080",
    "db": "sqlite:///collector.db",
    "require_tokens": None,        # None: required when [tokens] has any entry
    "receive_data": None,          # open | token | closed; None: token when tokens are required
    "receive_data_agent": "legacy",
    "receive_data_timezone": "UTC",  # only UTC is implemented; legacy timestamps carry no zone
    "read_token": None,            # when set, GET endpoints other than /health need it
    "open_reads": False,           # beyond loopback, no read_token is refused unless this is yes
    "open_writes": False,          # beyond loopback, writes without tokens are refused unless yes
    "max_body_bytes": 8 << 20,
    "max_decompressed_bytes": 16 << 20,
    "max_records": 10000,
    "max_depth": 8,
    "max_future_skew": 86400.0,    # a record's ts may be this far ahead of the collector's clock; 0: no check
    "retention_days": 0.0,         # 0: keep forever
    "retention_1m_days": 0.0,      # 1-minute rollups (agent/collector/rollup.py); 0: keep forever
    "retention_1h_days": 0.0,      # 1-hour rollups; 0: keep forever
    "rollups": "async",            # async (a job right after each batch) | sync (in its transaction) | off
    "retention_interval": 300.0,
    "retention_chunk": 1000,
    "stale_after": 300.0,
    "refresh": 5,
    "metrics_values": False,       # /metrics also gives the last value of every numeric point
    "log_level": "INFO",
    "workers": 1,                  # built-in server: processes sharing the listening socket
    "max_connections": 200,        # built-in server: open connections per process
    "max_connections_per_address": 50,  # built-in server: per client address, per process
    "head_timeout": 10.0,          # built-in server: total time for a request's line + headers
    "body_timeout": 60.0,          # built-in server: total time for a request's body
}

_INT_KEYS = ("max_body_bytes", "max_decompressed_bytes", "max_records", "max_depth",
             "retention_chunk", "refresh", "workers", "max_connections", "max_connections_per_address")
_FLOAT_KEYS = ("retention_days", "retention_1m_days", "retention_1h_days", "retention_interval", "stale_after", "max_future_skew", "head_timeout",
               "body_timeout")
_SIZE = re.compile(r"^\s*(\d+)\s*([kKmMgG]?)[bB]?\s*$")
MIN_TOKEN = 16
_DB_SCHEMES = ("sqlite://", "postgresql://", "postgres://")
# A URL's scheme (2+ characters: C:/x.db is a path) and libpq's `key=value ...` conninfo form.
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")
_CONNINFO = re.compile(r"^\w+\s*=")
_AGENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
# A database URL shows its user (the role that failed) and hides only the password; libpq's
# `password=...` (quoted or not) and secret-looking URL query values go (agent.common.Redactor:
# the agent's rules, configured for the collector's texts). Not the agent's `token: x` rule: the
# collector's own messages read `[collector] read_token: reason`. Fewer query words (no
# `credential`: X-Amz-Credential is an access key id and scope, shown to tell URLs apart).
_redactor = common.Redactor(keep_user=True, secret_keys=False, libpq=True,
                            query_words=("key", "token", "secret", "password", "passwd", "pwd", "sig", "auth"))


def redact(text):
    """`text` with database passwords and secret-looking URL query values replaced by ***: run
    every error or log text that may hold the db URL (or a driver's message about it) through this."""
    return _redactor(text)


class ConfigError(common.ConfigError):
    """Every problem found in the collector's config (file, flags, overrides)."""


class Config:
    """Plain attribute bag; `tokens` maps agent id -> token."""

    def __init__(self, **kw):
        self.path = None
        self.tokens = {}
        self.origins = {}   # key -> where its value came from: "file:line: [collector] key" or "--flag"
        self.alerts = alert_rules.AlertConfig()   # [alert:*], [notify:*], [alerts] (collector/alerts/rules.py)
        for k, v in DEFAULTS.items():
            setattr(self, k, v)
        for k, v in kw.items():
            setattr(self, k, v)

    @property
    def tokens_required(self):
        if self.require_tokens is None:
            return bool(self.tokens)
        return bool(self.require_tokens)

    @property
    def receive_data_mode(self):
        if self.receive_data is None:
            return "token" if self.tokens_required else "open"
        return self.receive_data

    def __repr__(self):  # never show tokens or the database password
        return "Config(listen=%r, db=%r, agents=%d)" % (self.listen, redact(self.db), len(self.tokens))


def parse_size(text):
    m = _SIZE.match(text)
    if not m:
        raise ValueError("expected a size like 8M, 512k or bytes, got %r" % text)
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]


def parse_listen(text):
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("expected HOST:PORT, got %r" % text)
    return host.strip("[]") or "0.0.0.0", int(port)


def parse_db(text):
    """sqlite:///path, postgresql://... (or postgres://) as given; a plain path (x.db, ./x.db,
    /var/lib/x.db) -> sqlite:///path. Anything else that looks like a URL or a libpq conninfo
    string is refused, so a typo in a scheme never becomes a SQLite file named after it."""
    v = text.strip()
    if not v:
        raise ValueError("empty: expected a file path, sqlite:///path or postgresql://user@host/db")
    if v.startswith(_DB_SCHEMES):
        return v
    m = _SCHEME.match(v)
    if m:
        scheme = m.group(1).lower()
        if scheme in ("sqlite", "postgresql", "postgres"):
            raise ValueError("expected %s, got %r" % ("sqlite:///path (three slashes, four for an absolute path)"
                                                      if scheme == "sqlite" else "postgresql://user@host/db",
                                                      redact(v)))
        raise ValueError("unknown database scheme %r in %r: expected a file path, sqlite:///path or "
                         "postgresql://user@host/db%s" % (m.group(1), redact(v), "" if "://" in v else
                                                         " (a file name with ':' in it: sqlite:///NAME)"))
    if _CONNINFO.match(v):
        raise ValueError("%r looks like a libpq conninfo string: write it as a URL, "
                         "postgresql://user:password@host:port/db" % redact(v))
    return "sqlite:///" + v


def _bool(text):
    t = text.strip().lower()
    if t in ("1", "yes", "true", "on"):
        return True
    if t in ("0", "no", "false", "off"):
        return False
    raise ValueError("expected yes or no, got %r" % text)


def _line_numbers(path):
    """(section, key) -> line number, for error messages (configparser forgets them)."""
    where, section = {}, None
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            s = line.strip()
            if s.startswith("[") and s.endswith("]"):
                section = s[1:-1].strip()
                where[(section, None)] = n
            elif s and s[0] not in "#;" and ("=" in s or ":" in s) and not line[0].isspace():
                key = re.split(r"[=:]", s, maxsplit=1)[0].strip().lower()
                where[(section, key)] = n
    return where


def _section_at(path, lineno):
    """The [section] a line number of the file belongs to (None before the first header)."""
    section = None
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if n >= lineno:
                break
            s = line.strip()
            if s.startswith("[") and s.endswith("]"):
                section = s[1:-1].strip()
    return section


def _syntax_errors(path, e):
    """configparser's error as `file:line: [section]: reason` lines. configparser quotes the
    offending lines, and a [tokens] line, a read_token or a db URL holds a secret: lines before
    any section header or inside [tokens] are not shown at all, others only up to the first
    space (the key that lacks its `=`), with passwords redacted."""
    if isinstance(e, configparser.MissingSectionHeaderError):
        return ["%s:%d: expected a [section] header before the first setting (line not shown: it may "
                "hold a secret)" % (path, e.lineno)]
    if isinstance(e, configparser.ParsingError):
        out = []
        for lineno, line in e.errors:
            section = _section_at(path, lineno)
            if section in (None, "tokens"):
                shown = "(line not shown: it may hold a token)"
            else:
                words = str(line).strip("'\"").split()  # configparser hands over repr(line)
                shown = "got a line starting %r" % redact(words[0] if words else "")[:60]
            out.append("%s:%d: [%s]: expected `key = value`, %s" % (path, lineno, section, shown))
        return out
    if isinstance(e, configparser.DuplicateOptionError):
        return ["%s:%s: [%s] %s: given twice" % (path, e.lineno, e.section, e.option)]
    if isinstance(e, configparser.DuplicateSectionError):
        return ["%s:%s: [%s]: section given twice" % (path, e.lineno, e.section)]
    return ["%s: %s" % (path, redact(e))]


def convert(key, value):
    """Typed value for one [collector] key; raises ValueError with the reason."""
    if key in ("max_body_bytes", "max_decompressed_bytes"):
        return parse_size(value) if isinstance(value, str) else int(value)
    if key in _INT_KEYS:
        v = int(value)
        if v < 1:
            raise ValueError("must be at least 1")
        return v
    if key in ("retention_days", "retention_1m_days", "retention_1h_days"):
        v = float(value)
        if v < 0:
            raise ValueError("must be 0 (keep forever) or more")
        return v
    if key in _FLOAT_KEYS:
        v = parse_duration(value) if isinstance(value, str) else float(value)
        if key in ("head_timeout", "body_timeout") and v <= 0:
            raise ValueError("must be more than 0")
        return v
    if key in ("require_tokens", "open_reads", "open_writes", "metrics_values"):
        return _bool(value) if isinstance(value, str) else bool(value)
    if key == "read_token":
        if not value:   # `read_token =`: unset, as an empty agent token is
            return None
        if len(value) < MIN_TOKEN:
            raise ValueError("too short: %d characters, at least %d (e.g. `openssl rand -hex 24`): a "
                             "short token can be guessed over the network" % (len(value), MIN_TOKEN))
        return value
    if key == "rollups":
        if value not in ("async", "sync", "off"):
            raise ValueError("expected async, sync or off, got %r" % value)
        return value
    if key == "receive_data":
        if value not in ("open", "token", "closed"):
            raise ValueError("expected open, token or closed, got %r" % value)
        return value
    if key == "receive_data_timezone":
        if value.upper() != "UTC":
            raise ValueError("only UTC is supported")
        return "UTC"
    if key == "listen":
        parse_listen(value)
        return value
    if key == "db":
        return parse_db(value)
    if key == "log_level":
        v = value.upper()
        if v not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError("expected DEBUG, INFO, WARNING or ERROR")
        return v
    return value


def load_config(path=None, **overrides):
    """Read the INI file (None: built-in defaults) and apply overrides (None values ignored)."""
    cfg = Config()
    errors = []
    if path is not None:
        cfg.path = str(path)
        cp = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=None)
        cp.optionxform = str  # agent ids in [tokens] keep their case
        try:
            with open(path, encoding="utf-8") as f:
                cp.read_file(f)
        except OSError as e:
            raise ConfigError(["%s: %s" % (path, e)]) from None
        except configparser.Error as e:
            raise ConfigError(_syntax_errors(path, e)) from None
        lines = _line_numbers(path)

        def where(section, key):
            n = lines.get((section, key.lower() if key else None), lines.get((section, None), 0))
            return "%s:%d: [%s]%s" % (path, n, section, " " + key if key else "")

        for section in cp.sections():
            if section not in ("collector", "tokens") and not alert_rules.owns(section):
                errors.append("%s: unknown section" % where(section, None))
        cfg.alerts = alert_rules.parse(cp, where, errors)
        if cp.has_section("collector"):
            for key, value in cp.items("collector"):
                k = key.lower()
                if k not in DEFAULTS:
                    errors.append("%s: unknown key" % where("collector", key))
                    continue
                value, problem = ini_value(value, k)
                if problem:
                    errors.append("%s: %s" % (where("collector", key), problem))
                    continue
                try:
                    setattr(cfg, k, convert(k, value))
                    cfg.origins[k] = where("collector", key)
                except ValueError as e:
                    errors.append("%s: %s" % (where("collector", key), e))
        if cp.has_section("tokens"):
            for agent, token in cp.items("tokens"):
                token, problem = ini_value(token, "token")   # the agent's rule: quotes, comments
                if problem:
                    errors.append("%s: %s" % (where("tokens", agent), problem))
                elif not _AGENT_ID.match(agent):
                    errors.append("%s: not a valid agent id" % where("tokens", agent))
                elif len(token) < MIN_TOKEN:
                    errors.append("%s: token too short (at least %d characters)" % (where("tokens", agent), MIN_TOKEN))
                else:
                    cfg.tokens[agent] = token
                    cfg.origins[("tokens", agent)] = where("tokens", agent)
    for k, v in overrides.items():
        if v is None:
            continue
        if k == "tokens":
            cfg.tokens = dict(v)
            continue
        if k not in DEFAULTS:
            errors.append("override %s: unknown setting" % k)
            continue
        try:
            setattr(cfg, k, convert(k, v) if isinstance(v, str) or k in _INT_KEYS else v)
            cfg.origins[k] = "--" + k.replace("_", "-")
        except ValueError as e:
            errors.append("override %s: %s" % (k, e))
    if errors:
        raise ConfigError(errors)
    return cfg


# --- who may write and read, given where the built-in server listens -----------------------------

_PLACEHOLDER = "change-me"   # the sample conf/collector.ini's tokens say so


def is_loopback(host):
    """127.0.0.0/8, ::1 (also as ::ffff:127.x) and the name localhost; any other name or address
    (0.0.0.0, ::, a LAN address, a host name) may be reachable from the network."""
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def check_access(cfg):
    """The built-in server's startup check -> warnings to log; raises ConfigError.

    On loopback anything goes (tests, tools/demo, a collector behind a local proxy that does its
    own access control). Beyond loopback two separate opt-ins: writes that need no token (no
    [tokens], require_tokens = no, or receive_data = open) need `open_writes = yes`, and reads
    with no read_token need `open_reads = yes`; the sample's placeholder tokens are refused.
    gunicorn/waitress bind the socket themselves, so this check cannot apply there."""
    host, _ = parse_listen(cfg.listen)
    origin = cfg.origins.get("listen", "[collector] listen (built-in default)")
    listen = "%s %s" % (origin, cfg.listen) if origin.startswith("--") else "%s = %s" % (origin, cfg.listen)
    warnings = []
    errors = _placeholders(cfg)   # behind a local proxy too: the sample's tokens are public
    writes = []   # why anyone may write
    if not cfg.tokens_required:
        writes.append("agents' batches need no token (%s)" % (
            "require_tokens = no" if cfg.require_tokens is False else "no agent is listed in [tokens]"))
    if cfg.receive_data_mode == "open":
        writes.append("POST /receive-data stores anyone's records (receive_data = open%s)"
                      % ("" if cfg.receive_data == "open" else ", its default without tokens"))
    if cfg.require_tokens and not cfg.tokens:
        warnings.append("require_tokens = yes but [tokens] lists no agent: every batch will get 401")
    if is_loopback(host):
        if errors:
            raise ConfigError(errors)
        if not cfg.tokens_required:
            warnings.append("agents are accepted WITHOUT tokens (no [tokens] configured)%s" % (
                "" if cfg.path else "; built-in defaults: listening on %s, storing in %s"
                % (cfg.listen, redact(cfg.db))))
        return warnings
    name = "" if _is_address(host) else " (a host name counts as not loopback: write 127.0.0.1)"
    if writes and not cfg.open_writes:
        fixes = []
        listed = ("list every agent in [tokens] (AGENT_ID = TOKEN, at least %d characters, e.g. `openssl "
                  "rand -hex 24`)" % MIN_TOKEN)
        if not cfg.tokens_required:
            fixes.append("remove require_tokens = no" + ("" if cfg.tokens else " and " + listed)
                         if cfg.require_tokens is False else listed)
        if cfg.receive_data == "open":
            fixes.append("set receive_data = token or closed")
        errors.append(
            "%s is not a loopback address%s, and anyone who reaches it could store records: %s. To require "
            "tokens, %s; or set [collector] open_writes = yes (or --open-writes) to accept writes from anyone; "
            "or listen on 127.0.0.1" % (listen, name, "; ".join(writes), " and ".join(fixes)))
    elif writes:
        warnings.append("writes are OPEN to anyone who reaches %s (open_writes = yes): %s"
                        % (cfg.listen, "; ".join(writes)))
    if not cfg.read_token and not cfg.open_reads:
        errors.append(
            "%s is not a loopback address%s, and [collector] read_token is unset: the status page, "
            "/api/v1/records, /api/v1/devices and /api/v1/agents would answer anyone. Set read_token = "
            "A-SECRET (at least %d characters; readers send `Authorization: Bearer A-SECRET`), or set "
            "[collector] open_reads = yes (or --open-reads) to publish them" % (listen, name, MIN_TOKEN))
    elif not cfg.read_token:
        warnings.append("reads are OPEN to anyone who reaches %s (open_reads = yes): status page, records, "
                        "devices, agents" % cfg.listen)
    if errors:
        raise ConfigError(errors)
    return warnings


def _placeholders(cfg):
    """Errors for tokens still holding the sample config's placeholder text."""
    out = ["%s: still the sample's placeholder token (it says %s): set a token of your own "
           "(`openssl rand -hex 24`) here and in that agent's [upload] token"
           % (cfg.origins.get(("tokens", agent), "[tokens] " + agent), _PLACEHOLDER)
           for agent, token in sorted(cfg.tokens.items()) if _PLACEHOLDER in token.lower()]
    if cfg.read_token and _PLACEHOLDER in cfg.read_token.lower():
        out.append("%s: still the sample's placeholder (it says %s): set a secret of your own "
                   "(`openssl rand -hex 24`)" % (cfg.origins.get("read_token", "read_token"), _PLACEHOLDER))
    return out


def _is_address(host):
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
