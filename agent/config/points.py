"""Point lines (the [points:NAME] sections and the [points] section of a meter profile):

    name = [table] address type [argument] [order] [key=value ...]

    voltage_l1   = input 0 float32
    energy_total = holding 342 uint32 CDAB scale=0.01 unit=kWh
    temperature  = 301200 int16 scale=0.1 unit=degC       ; classic address: input register 1199
    door         = holding 7 bit 3 invert=yes enum=0:"door open",1:""

What a type takes (its argument, byte orders, options) is agent.types.TYPES: this module only
reads the line and asks the table. A value in double quotes may hold spaces (enum labels).
"""
import re

from agent.config.ini import _suggest
from agent.config.values import parse_bool, parse_int, parse_number
from agent.types import (
    ALL_ORDERS,
    CLASSIC_PREFIX,
    NUMERIC,
    POINT_OPTIONS,
    TABLES,
    TYPE_ALIASES,
    TYPES,
    make_transform,
    order_for,
)


class Point:
    """One named value: where it lives, how it is decoded, how it is reported."""

    __slots__ = ("address", "bit_hi", "bit_lo", "byte", "count", "decimals", "deadband", "divisor",
                 "enum", "invert", "line", "name", "offset", "order", "overlap", "path", "reverse",
                 "scale", "section", "signed", "swap", "table", "text", "type", "unit")

    def __init__(self, name, table, address, type, count, order=None, scale=1.0, offset=0.0,
                 divisor=1.0, decimals=None, unit=None, deadband=0.0, enum=None, swap=False,
                 signed=False, bit_lo=0, bit_hi=15, byte=None, path=None, line=None, section=None,
                 text=None, invert=False, reverse=False, overlap=False):
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
        self.invert = invert        # bit/bool: report the negated boolean
        self.reverse = reverse      # bits: the field's bit order mirrored
        self.overlap = overlap      # may share registers with other points (the manual says so)
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
            mask = ((1 << (self.bit_hi - self.bit_lo + 1)) - 1) << self.bit_lo
            if self.order == "BA":   # the bits of the byte-swapped register
                mask = ((mask & 0xFF) << 8) | (mask >> 8)
            return {self.address: mask}
        if kind == "byte":
            return {self.address: 0xFF00 if self.byte == "high" else 0x00FF}
        return {a: 0xFFFF for a in range(self.address, self.address + self.count)}

    def transform(self):
        t = TYPES[self.type]
        return make_transform(t.kind, scale=self.scale, offset=self.offset, divisor=self.divisor,
                              decimals=self.decimals, enum=self.enum, bit_lo=self.bit_lo,
                              bit_hi=self.bit_hi, signed=self.signed or t.signed,
                              byte=self.byte, float32=t.code == "f", invert=self.invert,
                              reverse=self.reverse, fraction_first=self.type.endswith("_reversed"))

    def __repr__(self):
        return "Point(%r, %s %d %s)" % (self.name, self.table, self.address, self.type)


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
    words = split_words(text)
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
    opts = _point_options([w for w in words if "=" in w], tname, reasons, bit_lo, bit_hi)
    for r in reasons:
        problems.error(path, line, section, name, r)
    if reasons:
        return None
    return Point(name, table, address, tname, count, order=order, path=path, line=line,
                 section=section, text=text, bit_lo=bit_lo, bit_hi=bit_hi, byte=byte, **opts)


def split_words(text):
    """A point line's words: split at blanks outside double quotes (`enum=0:"on hold",1:run`
    is one word); the quotes stay, the option parsers read them."""
    words, cur, quoted = [], [], False
    for c in text:
        if c == '"':
            quoted = not quoted
        if c.isspace() and not quoted:
            if cur:
                words.append("".join(cur))
                cur = []
            continue
        cur.append(c)
    if cur:
        words.append("".join(cur))
    return words


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


def _point_type(positional, table):
    """Consume `type [argument]` -> (type name, registers or bits, byte, bit_lo, bit_hi): the
    argument's parser and the table a type lives in come from agent.types.TYPES."""
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
    t = TYPES[tname]
    if is_bits and t.table != "bit":
        raise _PointError("%s table holds single bits: use type bool" % table)
    if not is_bits and t.table == "bit":
        raise _PointError("bool is for coil/discrete tables; in a register use `bit N`")
    attrs = {"count": t.words, "bit_lo": 0, "bit_hi": 15, "byte": byte}
    if t.arg is not None and not (t.kind == "byte" and byte is not None):
        if not positional:
            raise _PointError(t.arg_help)
        try:
            attrs.update(t.arg(positional.pop(0)))
        except ValueError as e:
            raise _PointError(str(e)) from None
    return tname, attrs["count"], attrs["byte"], attrs["bit_lo"], attrs["bit_hi"]


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
    elif TYPES[tname].device_order and not TABLES[table][1]:
        order = order_for(tname, byte_order)
    if positional:
        extra = positional[0]
        hint = " (byte orders: %s)" % ", ".join(ALL_ORDERS) if _ORDER_TOKEN.match(extra.upper()) else ""
        reasons.append("unexpected %r%s" % (extra, hint))
    return order


# Why an option is refused where it does not apply (default: "X does not apply to a T value").
_NOT_HERE = {
    "enum": "enum applies to integer and bit values, not %s",
    "swap": "swap applies to strings only (use a byte order for numbers)",
    "signed": "signed applies to bit fields (`bits A-B signed=yes`) and append only; use an intN type",
    "invert": "invert applies to bits and bools (`bit 3 invert=yes`), not %s",
    "reverse": "reverse applies to bit fields only (`bits 4-7 reverse=yes`)",
}


def _point_options(words, tname, reasons, bit_lo=0, bit_hi=15):
    """`key=value` words -> {option: value}; appends a reason for each bad or misplaced one.
    Which options a type takes is its TYPES entry's `options`."""
    t = TYPES[tname]
    opts = {}
    given = set()     # options written, valid or not (a bad one is not also "missing")
    for w in words:
        k, _, v = w.partition("=")
        k = k.lower()
        given.add(k)
        if k not in POINT_OPTIONS:
            reasons.append("unknown option %r%s" % (k, _suggest(k, POINT_OPTIONS)))
        elif k in opts:
            reasons.append("option %r given twice" % k)
        elif k not in t.options:
            msg = _NOT_HERE.get(k, "%s does not apply to a %%s value" % k)
            reasons.append(msg % tname if "%s" in msg else msg)
        else:
            try:
                opts[k] = _point_option(k, v, t, bit_lo, bit_hi)
            except ValueError as e:
                reasons.append("%s: %s" % (k, e))
    if "enum" in opts:
        clash = [k for k in NUMERIC if k in opts and k != "deadband"]
        if clash:
            reasons.append("enum cannot be combined with %s" % ", ".join(clash))
    for k in t.requires:
        if k not in given:
            reasons.append("%s needs %s=N (the digits of the fraction register, 1..5)" % (tname, k))
    return opts


def _point_option(key, text, t=None, bit_lo=0, bit_hi=15):
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
        if t is not None and t.kind == "append":
            if not 1 <= v <= 5:
                raise ValueError("must be 1..5 for %s (the fraction register holds 0..65535)" % t.name)
        elif not 0 <= v <= 15:
            raise ValueError("must be 0..15")
        return v
    if key == "unit":
        if not text:
            raise ValueError("empty")
        return _unquote(text)
    if key == "enum":
        return parse_enum(text, t, bit_lo, bit_hi)
    return parse_bool(text)   # swap, signed, invert, reverse, overlap


def _unquote(text):
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    return text


def parse_enum(text, t=None, bit_lo=0, bit_hi=15):
    """`0:off,1:"on hold",2:""` -> {0: "off", 1: "on hold", 2: ""}. A label in double quotes
    may hold spaces and commas, or be empty; ValueError says why a label is refused."""
    if not text:
        raise ValueError('empty: write enum=0:off,1:on (labels with spaces in double quotes: '
                         '1:"on hold")')
    table, i, n = {}, 0, len(text)
    while i < n:
        j = text.find(":", i)
        comma = text.find(",", i)
        if j < 0 or (0 <= comma < j):
            item = text[i:comma if comma >= 0 else n]
            raise ValueError("%r: write enum=0:off,1:on (value:label, comma-separated)" % item)
        key_text = text[i:j]
        try:
            key = parse_int(key_text)
        except ValueError:
            raise ValueError("%r before ':' is not an integer (write enum=0:off,1:on)" % key_text) from None
        i = j + 1
        if text[i:i + 1] == '"':
            end = text.find('"', i + 1)
            if end < 0:
                raise ValueError('label of %d: the opening " has no closing " (an unquoted " ;" '
                                 'or " #" on the line starts a comment and cuts it)' % key)
            label = text[i + 1:end]
            i = end + 1
            if i < n and text[i] != ",":
                raise ValueError('label of %d: expected "," after the closing quote, got %r'
                                 % (key, text[i:]))
        else:
            end = text.find(",", i)
            end = n if end < 0 else end
            label = text[i:end]
            i = end
            if not label:
                raise ValueError('label of %d is empty: write %d:"" for an empty label (so a '
                                 'forgotten one is not taken for it)' % (key, key))
            if '"' in label:
                raise ValueError("label of %d: %r has a quote inside; put the whole label in "
                                 "double quotes, which cannot hold a quote themselves" % (key, label))
        if key in table:
            raise ValueError("value %d has two labels (%r and %r)" % (key, table[key], label))
        if t is not None and t.kind in ("bit", "bool") and key not in (0, 1):
            raise ValueError("value %d: a bit is 0 or 1" % key)
        if t is not None and t.kind == "bits" and not 0 <= key < (1 << (bit_hi - bit_lo + 1)) \
                and key >= 0:
            raise ValueError("value %d does not fit bits %d-%d (0..%d)" % (
                key, bit_lo, bit_hi, (1 << (bit_hi - bit_lo + 1)) - 1))
        table[key] = label
        if i < n:
            i += 1   # the comma
            if i == n:
                raise ValueError("trailing ',': a label is missing after it")
    return table
