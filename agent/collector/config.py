"""Collector configuration: conf/collector.ini, parsed once, defaults in one place.

Errors name the place: `file:line: [section] key: reason`, every problem at once.
Flags (--listen, --db) and make_app(**overrides) win over the file.
"""
import configparser
import re

DEFAULTS = {
    "listen": "127.0.0.1:8080",
    "db": "sqlite:///collector.db",
    "require_tokens": None,        # None: required when [tokens] has any entry
    "receive_data": None,          # open | token | closed; None: token when tokens are required
    "receive_data_agent": "legacy",
    "receive_data_timezone": "UTC",  # only UTC is implemented; legacy timestamps carry no zone
    "read_token": None,            # when set, GET endpoints other than /health need it
    "max_body_bytes": 8 << 20,
    "max_decompressed_bytes": 64 << 20,
    "max_records": 10000,
    "max_depth": 8,
    "retention_days": 0.0,         # 0: keep forever
    "retention_interval": 300.0,
    "retention_chunk": 1000,
    "stale_after": 300.0,
    "refresh": 5,
    "log_level": "INFO",
    "workers": 1,                  # built-in server: processes sharing the listening socket
    "max_connections": 200,        # built-in server: open connections per process
    "max_connections_per_address": 50,  # built-in server: per client address, per process
    "head_timeout": 10.0,          # built-in server: total time for a request's line + headers
    "body_timeout": 60.0,          # built-in server: total time for a request's body
}

_INT_KEYS = ("max_body_bytes", "max_decompressed_bytes", "max_records", "max_depth",
             "retention_chunk", "refresh", "workers", "max_connections", "max_connections_per_address")
_FLOAT_KEYS = ("retention_days", "retention_interval", "stale_after", "head_timeout", "body_timeout")
_SIZE = re.compile(r"^\s*(\d+)\s*([kKmMgG]?)[bB]?\s*$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_AGENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
# Secrets inside text: a URL's userinfo password (scheme://user:PASSWORD@host; up to the last @,
# since passwords are not always percent-encoded) and password=VALUE (URL query, libpq keywords;
# libpq conninfo quotes a value holding spaces or quotes as 'va lue', with \' and \\ inside: the
# whole quoted value goes, and an unterminated one (cut-off text) up to the end of its line).
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@'\"]*:)[^\s'\"]*@")
_KEY_PASSWORD = re.compile(r"(\bpassword\s*=\s*)(?:'(?:\\.|[^'\\\n])*\\?'?|[^\s&'\"]+)",
                           re.IGNORECASE)


def redact(text):
    """`text` with database passwords replaced by ***: run every error or log text that may hold
    the db URL (or a driver's message about it) through this."""
    text = _URL_PASSWORD.sub(r"\1***@", str(text))
    return _KEY_PASSWORD.sub(r"\1***", text)


class ConfigError(Exception):
    def __init__(self, errors):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


class Config:
    """Plain attribute bag; `tokens` maps agent id -> token."""

    def __init__(self, **kw):
        self.path = None
        self.tokens = {}
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


def parse_duration(text):
    m = _DURATION.match(text)
    if not m:
        raise ValueError("expected a duration like 500ms, 10s, 5m, 1h, 7d, got %r" % text)
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_listen(text):
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("expected HOST:PORT, got %r" % text)
    return host.strip("[]") or "0.0.0.0", int(port)


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
    if key == "retention_days":
        v = float(value)
        if v < 0:
            raise ValueError("must be 0 (keep forever) or more")
        return v
    if key in _FLOAT_KEYS:
        v = parse_duration(value) if isinstance(value, str) else float(value)
        if key in ("head_timeout", "body_timeout") and v <= 0:
            raise ValueError("must be more than 0")
        return v
    if key == "require_tokens":
        return _bool(value) if isinstance(value, str) else bool(value)
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
        if not (value.startswith("sqlite://") or value.startswith("postgresql://")
                or value.startswith("postgres://")):
            raise ValueError("expected sqlite:///path or postgresql://..., got %r" % redact(value))
        return value
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
            if section not in ("collector", "tokens"):
                errors.append("%s: unknown section" % where(section, None))
        if cp.has_section("collector"):
            for key, value in cp.items("collector"):
                k = key.lower()
                if k not in DEFAULTS:
                    errors.append("%s: unknown key" % where("collector", key))
                    continue
                try:
                    setattr(cfg, k, convert(k, value.strip()))
                except ValueError as e:
                    errors.append("%s: %s" % (where("collector", key), e))
        if cp.has_section("tokens"):
            for agent, token in cp.items("tokens"):
                token = token.strip()
                if not _AGENT_ID.match(agent):
                    errors.append("%s: not a valid agent id" % where("tokens", agent))
                elif len(token) < 16:
                    errors.append("%s: token too short (at least 16 characters)" % where("tokens", agent))
                else:
                    cfg.tokens[agent] = token
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
        except ValueError as e:
            errors.append("override %s: %s" % (k, e))
    if errors:
        raise ConfigError(errors)
    return cfg
