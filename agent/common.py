"""Helpers both the agent and the collector use (stdlib only, Python 3.9): durations, secrets
in messages, the config error base, UTC timestamps read back, ages, atomic file replace.

The line format itself (record head, `ts` written, envelope) is agent.wire; this module only
holds what is not part of that contract.
"""
import calendar
import datetime
import errno
import os
import re

# --- durations -----------------------------------------------------------------------------

_DURATION = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text):
    """'500ms', '10s', '5m', '1h', '7d' or bare seconds (any case, spaces around) -> float seconds;
    ValueError with the reason otherwise."""
    m = _DURATION.match(text.strip().lower())
    if not m:
        raise ValueError("%r is not a duration (write 500ms, 10s, 5m, 1h, 7d or seconds)" % text)
    return float(m.group(1)) * _UNIT_SECONDS[m.group(2)]


def format_duration(s):
    """Seconds -> the shortest way to write them in a config file ('7d', '90s', '250ms', '1.5s'):
    what parse_duration reads back."""
    if s >= 1 and float(s).is_integer():
        if s % 86400 == 0:
            return "%dd" % (s // 86400)
        if s % 3600 == 0:
            return "%dh" % (s // 3600)
        if s % 60 == 0:
            return "%dm" % (s // 60)
        return "%ds" % s
    if s < 1:
        return "%gms" % round(s * 1000, 3)
    return "%gs" % s


# --- ages: how long ago, for people ----------------------------------------------------------


def format_age(seconds, precise=True):
    """Seconds -> '45s', '5m03s', '3h20m', '2d04h' (precise: two units, as `modbus-agent status`
    shows them), or '45s', '5m', '3h', '2d' (coarse: one unit, the collector's status page,
    each unit from twice its size on). None -> '-'. A negative age (a clock ahead) is 0s when
    precise, and shown as it is ('-30s') when coarse."""
    if seconds is None:
        return "-"
    if not precise:
        if seconds < 120:
            return "%ds" % seconds
        if seconds < 7200:
            return "%dm" % (seconds // 60)
        if seconds < 172800:
            return "%dh" % (seconds // 3600)
        return "%dd" % (seconds // 86400)
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return "%ds" % seconds
    if seconds < 5400:
        return "%dm%02ds" % divmod(int(seconds), 60)
    if seconds < 172800:
        return "%dh%02dm" % divmod(int(seconds) // 60, 60)
    return "%dd%02dh" % divmod(int(seconds) // 3600, 24)


# --- UTC timestamps read back --------------------------------------------------------------

_UTC = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d+))?Z?")


def parse_utc(ts):
    """'2026-11-21T10:30:45.123Z' (what agent.wire.utc_timestamp writes; any number of fraction
    digits or none, the Z optional) -> epoch seconds; None for anything else (not a str, not a
    calendar date)."""
    if type(ts) is not str:
        return None
    m = _UTC.fullmatch(ts)
    if m is None:
        return None
    parts = tuple(int(g) for g in m.groups()[:6])
    try:
        datetime.datetime(*parts)      # a real date and time of day, or ValueError
    except ValueError:
        return None
    frac = m.group(7)
    return calendar.timegm(parts) + (float("0." + frac) if frac else 0.0)


# -- INI values: the rule both config readers apply (agent/config, agent/collector/config) --
SECRET_KEY = re.compile(r"(?i)token|password|passwd|secret")
_INLINE_COMMENT = re.compile(r"\s[;#]")
_QUOTED = re.compile(r'^"([^"]*)"\s*(?:[;#].*)?$')


def ini_value(text, key):
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
    if SECRET_KEY.search(key) and text[:m.start()].strip():
        mark = text[m.start() + 1]
        return None, ('holds " %s", which starts a comment here, so the value would be cut short; '
                      'if it belongs to the value, put the whole value in double quotes ("ab %scd"); '
                      'if it is a comment, put it on a line of its own' % (mark, mark))
    return text[:m.start()].strip(), None


# --- secrets in messages ---------------------------------------------------------------------

# Values never shown in an error, a warning or a log line (they end up in logread, support
# tickets, the collector's log): URL credentials, secret-looking query values, the values of keys
# that hold secrets. One set of rules; the agent and the collector each configure a Redactor
# (the agent's is `redact` below, the collector's agent.collector.config.redact).

# Userinfo runs to the LAST '@' of the URL: a password may hold '@' (or '/', which breaks the URL
# but still must not show), and stopping at the first one would print the rest of it. A path that
# holds '@' hides the host too: showing too little beats showing a secret.
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^\s'\"]*@")
# ... or only the password part, keeping the user name (scheme://user:***@host)
_URL_PASSWORD = re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^\s:/@'\"]*:)[^\s'\"]*@")

# A URL's query parameters whose name holds one of these (`?api_key=...`, `&sig=...`,
# `access_token`, `X-Amz-Signature`, `auth`): the value goes, the name stays (it says what to fix).
# Only after `?`/`&`/`;`, so that words such as "signed" or "monkey" in messages are left alone.
QUERY_SECRET_WORDS = ("key", "token", "secret", "passw", "pwd", "sig", "auth", "credential", "session")
# Keys whose value goes wherever they stand: `token: x`, `password=x`, `db_secret = 'x y'` (an
# unquoted value ends at white space, a quote, `,` or `;`). `***` + delimiter: done above.
_SECRET_KEY_VALUE = re.compile(r"(?i)\b((?:[a-z0-9_.-]*(?:token|password|passwd|secret)[a-z0-9_.-]*)[\"']?\s*[:=]\s*)"
                               r"(?:\*\*\*(?=[&;#\s'\"]|$)|'[^']*'|\"[^\"]*\"|[^\s'\",;]+)")
# libpq conninfo's password=VALUE: a value holding spaces or quotes is quoted as 'va lue', with \'
# and \\ inside: the whole quoted value goes, and an unterminated one (cut-off text) up to the end
# of its line; unquoted, it ends at white space, a quote or `&` (a URL query).
_LIBPQ_PASSWORD = re.compile(r"(?i)(\bpassword\s*=\s*)(?:'(?:\\.|[^'\\\n])*\\?'?|[^\s&'\"]+)")


class Redactor:
    """redactor(text) -> text (or str(text): an exception will do) with secrets replaced by ***:
    URL credentials, secret-looking URL query values, then the values of secret keys.

    keep_user: show a URL's user name and hide only its password (a database URL: the role is
    what the operator needs to see); by default the whole userinfo goes (an upload URL may carry
    its token as the user name: https://TOKEN@host). query_words: what in a query parameter's
    name makes its value a secret. secret_keys: `token: x`, `db_secret = x` anywhere (not for text
    whose own prefix is `[section] read_token: reason`). libpq: conninfo's `password=...`."""

    def __init__(self, keep_user=False, query_words=QUERY_SECRET_WORDS, secret_keys=True, libpq=False):
        self._url = _URL_PASSWORD if keep_user else _URL_USERINFO
        self._query = re.compile(r"(?i)([?&;][^=&;#\s'\"?]*(?:%s)[^=&;#\s'\"?]*=)[^&;#\s'\"]*"
                                 % "|".join(map(re.escape, query_words)))
        self._keys = [rule for rule, on in ((_SECRET_KEY_VALUE, secret_keys), (_LIBPQ_PASSWORD, libpq)) if on]

    def __call__(self, text):
        text = self._url.sub(r"\1***@", str(text))
        text = self._query.sub(r"\1***", text)
        for rule in self._keys:
            text = rule.sub(r"\1***", text)
        return text


_agent_redactor = Redactor()


def redact(text):
    """The agent's messages (config errors, upload and log lines) with secret values, URL
    credentials (the whole userinfo) and secret-looking URL query values replaced by ***."""
    return _agent_redactor(text)


# --- config errors ---------------------------------------------------------------------------


class ConfigError(Exception):
    """Every problem found in a config file, one `file:line: [section] key: reason` each
    (`errors`). agent.config and agent.collector.config raise their own subclasses."""

    def __init__(self, errors):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


# --- atomic file replace ---------------------------------------------------------------------


def atomic_replace(path, data, durable=True, tmp=None, dirfd=None, makedirs=False, mode=0o644):
    """Write bytes `data` to `path` so that readers (and a restart after a crash) see the old
    file or the new one, never a mix: a temporary file in the same directory, then os.replace.

    durable: fsync the file before the rename and the directory after it (the new name survives
    a power cut); without it the page cache decides (a status file on tmpfs, rewritten every few
    seconds: flash is spared). tmp: the temporary name (default path + '.tmp'). dirfd: an open
    descriptor of the directory to fsync (else it is opened for it). makedirs: create a missing
    directory. On OSError the temporary file is removed and the old file stays."""
    tmp = tmp or path + ".tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    except FileNotFoundError:
        if not makedirs:
            raise
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, "short write")
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        if dirfd is not None:
            os.fsync(dirfd)
            return
        dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
