"""Point lines (the [points:NAME] sections and the [points] section of a meter profile):

    name = [table] address type [argument] [order] [key=value ...]

    voltage_l1   = input 0 float32
    energy_total = holding 342 uint32 CDAB scale=0.01 unit=kWh
    temperature  = 301200 int16 scale=0.1 unit=degC       ; classic address: input register 1199
"""
import re

from agent.config.ini import _suggest
from agent.config.schema import POINT_OPTIONS
from agent.config.values import parse_bool, parse_int, parse_number
from agent.plan import MAX_REGISTERS
from agent.types import (
    ALL_ORDERS,
    CLASSIC_PREFIX,
    TABLES,
    TYPE_ALIASES,
    TYPES,
    make_transform,
    order_for,
)


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
