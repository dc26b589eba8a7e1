"""The flat INI subset, read with line numbers: every problem is `file:line: [section] key: reason`.

configparser drops line numbers, lowercases keys and allows syntax we do not want, hence this
small line-oriented reader. `Problems` collects errors and warnings in file and line order.
"""
import re

from agent.common import ini_value as _ini_value
from agent.common import redact


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


def _line_of(section, key):
    for k, (_v, line) in section.entries.items():
        if k.lower() == key:
            return line
    return section.line
