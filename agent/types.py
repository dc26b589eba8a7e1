"""Data types, byte orders and scaling: point specs in, block decoders out.

A register block arrives as the response's data bytes (big-endian registers, Modbus Application
Protocol v1.1b3 section 6.3/6.4); a bit block as packed bits, LSB first (section 6.1/6.2).
Everything that can be decided from the config is decided once, in `compile_block`, so that
polling only slices bytes:

* fields in the natural order (ABCD, ABCDEFGH) and their mirror (DCBA, HGFEDCBA) unpack straight
  from the block with one big-endian and one little-endian `struct.Struct`;
* byte-swapped words (BADC, BADCFEHG) and swapped word order (CDAB, GHEFCDAB) unpack the same way
  from a copy of the block with the two bytes of every register exchanged (two slice copies);
* the four rarer 64-bit orders fall back to a per-field byte permutation;
* values that need no scaling are copied by one `itemgetter`; the rest go through a closure
  built for exactly the options the point has.
"""
import math
import struct
from array import array
from bisect import bisect_right
from operator import itemgetter

# --- tables --------------------------------------------------------------------------------

#: table name -> (read function code, is a bit table)
TABLES = {
    "coil": (1, True),
    "discrete": (2, True),
    "holding": (3, False),
    "input": (4, False),
}

#: leading digit of a classic 5/6-digit address -> table
CLASSIC_PREFIX = {"0": "coil", "1": "discrete", "3": "input", "4": "holding"}

# --- byte orders ---------------------------------------------------------------------------

ORDERS_16 = ("AB", "BA")
ORDERS_32 = ("ABCD", "BADC", "CDAB", "DCBA")
ORDERS_64 = ("ABCDEFGH", "BADCFEHG", "CDABGHEF", "DCBAHGFE",
             "HGFEDCBA", "GHEFCDAB", "FEHGBADC", "EFGHABCD")
ALL_ORDERS = ORDERS_16 + ORDERS_32 + ORDERS_64

# A device-wide 4-letter order carried over to 16- and 64-bit values: the byte swap inside a
# register stays, the word order (most significant word first or last) stays.
ORDER_FOR_16 = {"ABCD": "AB", "CDAB": "AB", "BADC": "BA", "DCBA": "BA"}
ORDER_FOR_64 = {"ABCD": "ABCDEFGH", "BADC": "BADCFEHG", "CDAB": "GHEFCDAB", "DCBA": "HGFEDCBA"}
# Orders that one struct call can read: (source, endianness). Source "swapped" is the block with
# the two bytes of each register exchanged.
_DIRECT = {
    "AB": ("plain", ">"), "BA": ("plain", "<"),
    "ABCD": ("plain", ">"), "DCBA": ("plain", "<"),
    "BADC": ("swapped", ">"), "CDAB": ("swapped", "<"),
    "ABCDEFGH": ("plain", ">"), "HGFEDCBA": ("plain", "<"),
    "BADCFEHG": ("swapped", ">"), "GHEFCDAB": ("swapped", "<"),
}


# --- types ---------------------------------------------------------------------------------
#
# The type table is the one place a type is defined: its size, struct code, kind (which
# transform and inverse it takes), its positional argument, the byte orders it takes, and the
# options that apply to it. agent/config/points.py, agent/device.py and `write` only ask it.

#: options that scale a number (and the deadband that compares scaled numbers)
NUMERIC = ("scale", "offset", "divisor", "decimals", "deadband")
#: options every point takes
COMMON_OPTIONS = ("unit", "overlap")


class _ArgError(ValueError):
    """The positional argument of a type is wrong (the message says how to write it)."""


def _arg_bit(text):
    try:
        n = int(text, 0)
    except ValueError:
        n = -1
    if not 0 <= n <= 15:
        raise _ArgError("bit number %s is not 0..15" % text)
    return {"bit_lo": n, "bit_hi": n}


def _arg_bits(text):
    lo, _, hi = text.partition("-")
    try:
        a, b = int(lo, 0), int(hi or lo, 0)
    except ValueError:
        a = b = -1
    if not 0 <= a <= b <= 15:
        raise _ArgError("bit range %s is not within 0-15, low-high" % text)
    return {"bit_lo": a, "bit_hi": b}


def _arg_length(text, limit=125):
    try:
        n = int(text, 0)
    except ValueError:
        n = 0
    if not 1 <= n <= limit:
        raise _ArgError("string length %s is not 1..%d registers" % (text, limit))
    return {"count": n}


def _arg_byte(text):
    byte = {"high": "high", "h": "high", "low": "low", "l": "low"}.get(text.lower())
    if byte is None:
        raise _ArgError("%r: int8/uint8 take `high` or `low`" % text)
    return {"byte": byte}


class TypeInfo:
    """A value type: registers it spans, its struct code, its kind, its argument, its orders
    and the options that apply to it.

    words:   registers (bits for 'bool'); None when the argument gives the count (string N)
    code:    struct code of the whole field as read from the block
    kind:    int | float | bool | string | bits | bit | byte | append: which transform
             (make_transform) and inverse (encode) it takes
    arg:     parser of the positional argument (text -> point attributes), or None
    orders:  byte orders it takes (a tuple), or () for none
    device_order: whether the device's byte_order applies when the point names none
    options: the key=value options that apply (besides COMMON_OPTIONS)
    table:   "register" or "bit" (coil/discrete)
    signed:  the raw value is signed before any option (int8)
    """

    __slots__ = ("arg", "arg_help", "code", "device_order", "kind", "name", "options", "orders",
                 "requires", "signed", "table", "words")

    def __init__(self, name, words, code, kind, arg=None, arg_help=None, orders=(),
                 device_order=False, options=(), table="register", signed=False, requires=()):
        self.name = name
        self.words = words
        self.code = code
        self.kind = kind
        self.arg = arg
        self.arg_help = arg_help
        self.orders = orders
        self.device_order = device_order
        self.options = frozenset(options) | frozenset(COMMON_OPTIONS)
        self.table = table
        self.signed = signed
        self.requires = requires

    def size(self, count):
        """Registers (or bits) a point of this type spans, given its count."""
        return count if self.words is None else self.words

    def __repr__(self):
        return "TypeInfo(%r)" % self.name


def _t(name, words, code, kind, **kw):
    return name, TypeInfo(name, words, code, kind, **kw)


_INT = NUMERIC + ("enum",)
_FLOAT = NUMERIC

TYPES = dict((
    _t("bool", 1, None, "bool", table="bit", options=("enum", "invert")),
    _t("bit", 1, "H", "bit", arg=_arg_bit, arg_help="`bit` needs the bit number: bit 0..15",
       orders=ORDERS_16, options=("enum", "invert")),
    _t("bits", 1, "H", "bits", arg=_arg_bits, arg_help="`bits` needs a range: bits 0-3",
       orders=ORDERS_16, options=_INT + ("signed", "reverse")),
    _t("int8", 1, "H", "byte", arg=_arg_byte, arg_help="`int8` needs high or low",
       options=_INT, signed=True),
    _t("uint8", 1, "H", "byte", arg=_arg_byte, arg_help="`uint8` needs high or low", options=_INT),
    _t("int16", 1, "h", "int", orders=ORDERS_16, device_order=True, options=_INT),
    _t("uint16", 1, "H", "int", orders=ORDERS_16, device_order=True, options=_INT),
    _t("int32", 2, "i", "int", orders=ORDERS_32, device_order=True, options=_INT),
    _t("uint32", 2, "I", "int", orders=ORDERS_32, device_order=True, options=_INT),
    _t("float32", 2, "f", "float", orders=ORDERS_32, device_order=True, options=_FLOAT),
    _t("int64", 4, "q", "int", orders=ORDERS_64, device_order=True, options=_INT),
    _t("uint64", 4, "Q", "int", orders=ORDERS_64, device_order=True, options=_INT),
    _t("float64", 4, "d", "float", orders=ORDERS_64, device_order=True, options=_FLOAT),
    _t("string", None, "s", "string", arg=_arg_length,
       arg_help="`string` needs its length in registers: string 8", options=("swap",)),
    # integer part in register N, fraction in N+1 (FairCom appendAdjacentRegisters): 12, 34
    # with decimals=2 -> 12.34; `_reversed`: the fraction first
    _t("append", 2, "I", "append", options=NUMERIC + ("signed",), requires=("decimals",)),
    _t("append_reversed", 2, "I", "append", options=NUMERIC + ("signed",), requires=("decimals",)),
))
# Telegraf-style spellings people paste from other configs.
TYPE_ALIASES = {"int8h": ("int8", "high"), "int8l": ("int8", "low"),
                "uint8h": ("uint8", "high"), "uint8l": ("uint8", "low"),
                "float": ("float32", None), "double": ("float64", None)}
#: every key=value option some type takes
POINT_OPTIONS = tuple(sorted(set().union(*(t.options for t in TYPES.values()))))


def order_for(type_name, order):
    """The concrete byte order of a value of `type_name` given a point or device order
    (2, 4 or 8 letters). Raises ValueError naming the orders that fit."""
    t = TYPES[type_name]
    if not t.orders:
        raise ValueError("type %s has no byte order" % type_name)
    if order in t.orders:
        return order
    n = len(t.orders[0])
    mapped = {2: ORDER_FOR_16, 8: ORDER_FOR_64}.get(n, {}).get(order)
    if mapped is not None:
        return mapped
    if n == 2:
        raise ValueError("byte order %s does not fit a 16-bit value (use AB or BA)" % order)
    raise ValueError("byte order %s does not fit a %d-bit value (use one of %s)"
                     % (order, 8 * n, ", ".join(t.orders)))


def permutation(order):
    """Wire position of each byte, most significant first: 'CDAB' -> (2, 3, 0, 1)."""
    return tuple(order.index(chr(65 + i)) for i in range(len(order)))


# --- value transforms ----------------------------------------------------------------------

# A float32 widened to a double shows digits the device never had (230.1 -> 230.10000610351562),
# and rounding it to 7 significant digits changes values (16777215 -> 16777220): a float32 needs
# up to 9. `shortest32` reports the shortest decimal that converts back to the same float32, as
# the double nearest to it (so its repr, which the JSON encoder writes, is that decimal).
#
# Formatting ('%.{n}g' for n = 6..9 until it packs back) would cost 2-3 formats per value.
# Instead, per segment of v (one decade and one binade of |v|, found by one bisect), a table holds
# 10^k for the 8th significant digit and half a float32 step in those units (hin/hout: minus/plus
# a margin far above the double rounding of m = v * 10^k). A 7- or 8-digit candidate is
# accepted when its distance from m is inside the half step, which is the float32 rounding
# interval: the test checks the candidate itself, so a candidate is never wrong, at worst one
# digit longer (only if the FPU mis-rounded). Powers of two (the step below is half the step
# above), subnormals, |v| >= 1e7 or < 1e-14, and distances within the margin take the
# formatting path. tests/test_types_exact.py compares both with an exhaustive '%.{n}g' search.
_F32 = struct.Struct("<f")
_pack32, _unpack32 = _F32.pack, _F32.unpack
_FLT_MIN = 1.1754943508222875e-38     # below: subnormal, fewer digits of precision
_ROUND = 6755399441055744.0           # 1.5 * 2^52: (x + _ROUND) - _ROUND rounds x to a whole number


def _shortest32_formatted(v):
    if v - v != 0.0:
        return None
    if v == 0.0:
        return v                # keeps -0.0
    # n = 6 suffices as a start for normal floats: a float32's rounding interval is narrower
    # than 0.12 units of the 6th digit, so a shorter decimal in it is also the nearest 6-digit one.
    for n in range(1 if abs(v) < _FLT_MIN else 6, 10):
        x = float("%.*g" % (n, v))
        try:
            if _unpack32(_pack32(x))[0] == v:
                return x
        except OverflowError:   # '%.4g' of the largest float32 is 3.403e38: beyond it
            pass
    return x


def _segments():
    """(bounds, table): table[bisect_right(bounds, v)] = (10^k8, hin, hout, 10^k7, 10^k9, may6)
    or None (formatting path: also NaN, the infinities, 0.0, beyond the largest finite bound).
    Negative values have their own, mirrored segments: no abs() per value."""
    p10 = [(float("1e%d" % j), j) for j in range(-45, 39)]
    p2 = [(math.ldexp(1.0, e), e) for e in range(-149, 128)]
    t10, t2 = [b for b, _ in p10], [b for b, _ in p2]
    # Powers of two alone in a segment (the float32 step below is half the step above), and on
    # the negative side the powers of ten too (-1000 starts the segment of -999.99).
    pos = {b for b in t10 if b >= t2[0]} | set(t2) | {math.nextafter(b, math.inf) for b in t2}
    neg = {-b for b in pos} | {math.nextafter(-b, 0.0) for b in t10 + t2 if b >= t2[0]}
    bounds = sorted(pos | neg | {0.0})

    def entry(lo, hi):
        mid = lo / 2 + hi / 2
        if mid in (lo, hi) or not math.isfinite(hi):
            return None                       # a segment of one double: the specials above
        a = abs(mid)                          # no power of two or ten within the segment
        if a < _FLT_MIN:
            return None
        i10 = bisect_right(t10, a)
        e = p2[bisect_right(t2, a) - 1][1]
        k8 = 7 - p10[i10 - 1][1] if i10 else None
        if k8 is None or not 1 <= k8 <= 21:
            return None
        u8 = float("1e%d" % k8)
        h = math.ldexp(1.0, e - 24) * u8      # half a float32 step, in units of the 8th digit
        return (u8, h - 1e-6, h + 1e-6, float("1e%d" % (k8 - 1)), float("1e%d" % (k8 + 1)),
                h > 4.0)
    table = [None] + [entry(lo, hi) for lo, hi in zip(bounds, bounds[1:] + [math.inf])]
    return bounds, table


_BOUNDS, _TABLE = _segments()


def shortest32(v, _bisect=bisect_right, _bounds=_BOUNDS, _table=_TABLE, _r=_ROUND):
    """A float32's value (widened to a double) -> the double nearest to the shortest decimal
    that converts back to the same float32 (0.0 and -0.0 as they are); None for NaN and the
    infinities."""
    t = _table[_bisect(_bounds, v)]
    if t is None:
        return _shortest32_formatted(v)
    u8, hin, hout, u7, u9, may6 = t
    m = v * u8
    r = (m * 0.1 + _r) - _r             # nearest 7-digit decimal, in units of the 7th digit
    e = m - r * 10.0
    if -hin < e < hin:
        # The interval may hold two 7-digit decimals when it is wider than one unit of the 7th
        # digit (may6); a 6-digit one (then shorter) is within 1 of the nearest 7-digit one,
        # which then ends in 9 or 1.
        if may6 and r % 10.0 in (1.0, 9.0):
            y = float("%.6g" % v)
            if _unpack32(_pack32(y))[0] == v:
                return y
        return r / u7
    if -hout < e < hout:
        return _shortest32_formatted(v)
    r = (m + _r) - _r                   # nearest 8-digit decimal
    e = m - r
    if -hin < e < hin:
        return r / u8
    if -hout < e < hout:
        return _shortest32_formatted(v)
    return ((m * 10.0 + _r) - _r) / u9  # 9 digits: always within the interval


def _append_step(decimals, signed, fraction_first):
    """The append transform: raw uint32 (two registers, first in the high half) -> number."""
    unit = 10 ** decimals

    def append(v):
        ip, frac = (v & 0xFFFF, v >> 16) if fraction_first else (v >> 16, v & 0xFFFF)
        if frac >= unit:
            return None
        if signed and ip & 0x8000:
            return -((65536 - ip) * unit + frac) / unit
        return (ip * unit + frac) / unit if unit > 1 else ip + frac
    return append


def _reciprocal(x):
    """10 for 0.1: scaling 2301 by 0.1 should give 230.1, not 230.10000000000002, so small
    decimal scales divide by their reciprocal instead of multiplying."""
    if x == 0 or x >= 1:
        return None
    r = 1.0 / x
    if r - r != 0.0:    # 1 / 5e-324 is infinite: no reciprocal (and round() would raise)
        return None
    n = round(r)
    if n > 1 and abs(r - n) < 1e-9 * n:
        return n
    return None


def _whole(x, limit=2 ** 53):
    """x as an int when it is a whole number of modest size, else None."""
    return int(x) if x == int(x) and abs(x) <= limit else None


def make_transform(kind, scale=1.0, offset=0.0, divisor=1.0, decimals=None, enum=None,
                   bit_lo=0, bit_hi=15, signed=False, byte=None, float32=False, invert=False,
                   reverse=False, fraction_first=False):
    """Closure turning the raw struct value of one point into its reported value, or None when
    the raw value can be reported as is. Order: bits/byte extraction, enum, then
    value = raw * scale / divisor + offset, then rounding to `decimals`. A float32 is first
    taken as its shortest decimal (`shortest32`). NaN and infinities (raw, or reached by
    scaling) become None. Integer values stay exact integers through whole-number scales and
    offsets; integer division is correctly rounded (no int -> float step first).

    invert (bit, bool): the boolean is negated before enum (FairCom bitBooleanZeroValue).
    reverse (bits): the field's bits are mirrored (its lowest bit becomes its highest) before
    the sign is taken. append: the raw uint32 holds the integer part in its high register and
    the fraction in its low one (`fraction_first`: the other way round); `decimals` digits of
    fraction: 12, 34 -> 12.34. A negative integer part (signed) gives -(|int| + fraction):
    -12, 34 -> -12.34; a fraction register of 10^decimals or more is no valid reading: None."""
    steps = []
    if kind == "bit":
        n = bit_lo
        if invert:
            steps.append(lambda v: not (v >> n) & 1)
        else:
            steps.append(lambda v: bool((v >> n) & 1))
    elif kind == "bool" and invert:
        steps.append(lambda v: not v)
    elif kind == "bits":
        lo, width = bit_lo, bit_hi - bit_lo + 1
        mask = (1 << width) - 1
        if reverse:
            steps.append(lambda v: int(bin(((v >> lo) & mask) | (1 << width))[:2:-1], 2))
        else:
            steps.append(lambda v: (v >> lo) & mask)
        if signed:
            sign, full = 1 << (width - 1), 1 << width
            steps.append(lambda x: x - full if x & sign else x)
    elif kind == "append":
        steps.append(_append_step(int(decimals or 0), signed, fraction_first))
        decimals = None if scale == 1.0 and offset == 0.0 and divisor == 1.0 else decimals
    elif kind == "byte":
        shift = 8 if byte == "high" else 0
        if signed:
            steps.append(lambda v: (lambda x: x - 256 if x & 0x80 else x)((v >> shift) & 0xFF))
        else:
            steps.append(lambda v: (v >> shift) & 0xFF)
    elif kind == "string":
        steps.append(lambda v: v.split(b"\0", 1)[0].decode("latin-1").strip())
    if enum:
        table = dict(enum)
        steps.append(lambda v: table.get(v, v))
    elif kind in ("int", "float", "bits", "byte", "append"):
        mul = float(scale)
        div = float(divisor)
        recip = _reciprocal(mul)
        if recip is not None:
            mul, div = 1.0, div * recip
        off = float(offset)
        scaled = mul != 1.0 or div != 1.0 or off != 0.0
        # `x - x == 0.0` is False exactly for NaN and the infinities (and cheaper than a
        # math.isfinite call or a helper): those become None, JSON has no spelling for them.
        # Checked on the result, after scaling: a finite raw value can overflow there (float64
        # 1e308 * 10, an int64 times a huge scale), and one infinite value must not reach the
        # encoder (it would stop the agent at every poll of that device).
        if kind in ("float", "append"):
            if kind == "append":
                if scaled:
                    steps.append(lambda v: v if v is None else (
                        x if (x := v * mul / div + off) - x == 0.0 else None))
            elif float32:
                s32 = shortest32
                if scaled:
                    def f32_scaled(v):
                        s = s32(v)
                        if s is None:
                            return None
                        x = s * mul / div + off
                        return x if x - x == 0.0 else None
                    steps.append(f32_scaled)
                else:
                    steps.append(s32)
            elif scaled:
                steps.append(lambda v: x if (x := v * mul / div + off) - x == 0.0 else None)
            else:
                steps.append(lambda v: v if v - v == 0.0 else None)
        elif scaled:
            # Integers: exact int arithmetic where it can be (a uint64 beyond 2^53 keeps every
            # digit through `scale=10 offset=-1`), a correctly rounded int / int true division
            # where it divides: neither can overflow, so no finite check.
            imul, idiv, ioff = _whole(mul), _whole(div), _whole(off, 2 ** 64)
            if imul is not None and ioff is not None and div == 1.0:
                if ioff == 0:
                    steps.append(lambda v: v * imul)
                elif imul == 1:
                    steps.append(lambda v: v + ioff)
                else:
                    steps.append(lambda v: v * imul + ioff)
            elif idiv is not None and mul == 1.0 and off == 0.0:
                steps.append(lambda v: v / idiv)
            elif mul == 1.0 and off == 0.0:
                steps.append(lambda v: x if (x := v / div) - x == 0.0 else None)
            elif div == 1.0 and off == 0.0:
                steps.append(lambda v: x if (x := v * mul) - x == 0.0 else None)
            else:
                steps.append(lambda v: x if (x := v * mul / div + off) - x == 0.0 else None)
        if decimals is not None:
            nd = int(decimals)
            steps.append(lambda v: None if v is None else round(v, nd))
    if not steps:
        return None
    if len(steps) == 1:
        return steps[0]
    if len(steps) == 2:
        f, g = steps
        return lambda v: g(f(v))

    def chain(v):
        for step in steps:
            v = step(v)
        return v
    return chain


# --- block decoders ------------------------------------------------------------------------


class Field:
    """One point's place in a block: byte offset from the block start, struct code, order."""

    __slots__ = ("code", "name", "offset", "order", "size", "source", "transform")

    def __init__(self, name, offset, code, size, order, transform):
        self.name = name
        self.offset = offset
        self.code = code
        self.size = size
        self.order = order
        self.transform = transform


def _swap_pairs(data):
    """Copy of `data` with the two bytes of every register exchanged (BADC <-> ABCD).
    array.byteswap does it in C (3-4x faster than two slice copies); the result is the same
    on big- and little-endian CPUs since only raw bytes go in and out."""
    out = array("H")
    out.frombytes(data)
    out.byteswap()
    return out


def _straight_line(cooked):
    """`out[name] = fn(raw[idx])` for every (name, idx, fn), compiled once into one function of
    straight-line code: a loop over the points costs about a quarter of the per-point time."""
    env = {}
    lines = ["def cook(raw, out):"]
    for i, (name, idx, fn) in enumerate(cooked):
        env["f%d" % i] = fn
        lines.append("    out[%r] = f%d(raw[%d])" % (str(name), i, int(idx)))
    exec("\n".join(lines) + "\n", env)   # names are literals via repr(): no injection
    return env["cook"]


class RegisterBlockDecoder:
    """Decodes the data bytes of one register read into {name: value}."""

    def __init__(self, nbytes, fields):
        self.nbytes = nbytes
        self.fields = list(fields)
        groups = {}    # (source, endian) -> [(offset, code, size, slot key)]
        slots = {}     # (source, endian, offset, code) -> raw index (shared by bit/byte points)
        odd = []       # fields needing a per-field permutation
        for f in self.fields:
            if f.code == "s" or f.order is None:
                source = "swapped" if f.order == "BA" else "plain"
                endian = ">"
            elif f.order in _DIRECT:
                source, endian = _DIRECT[f.order]
            else:
                odd.append(f)
                continue
            key = (source, endian, f.offset, f.code, f.size)
            if key not in slots:
                slots[key] = None
                # Overlapping fields (overlap=yes: a float and its raw words) cannot share one
                # struct format: each goes to the first layer where it overlaps nothing.
                layer = 0
                while any(k[2] < f.offset + f.size and f.offset < k[2] + k[4]
                          for k in groups.get((source, endian, layer), ())):
                    layer += 1
                groups.setdefault((source, endian, layer), []).append(key)
        self._unpackers = []
        order = []
        for (source, endian, _layer), keys in sorted(groups.items()):
            keys.sort(key=lambda k: k[2])
            fmt, pos = [endian], 0
            for _s, _e, offset, code, size in keys:
                if offset > pos:
                    fmt.append("%dx" % (offset - pos))
                fmt.append("%d%s" % (size, code) if code == "s" else code)
                pos = offset + size
            if pos < nbytes:
                fmt.append("%dx" % (nbytes - pos))
            self._unpackers.append((source == "swapped", struct.Struct("".join(fmt)).unpack))
            order.extend(keys)
        for i, key in enumerate(order):
            slots[key] = i
        self._need_swap = any(s for s, _ in self._unpackers)
        self._odd = []
        for f in odd:
            perm = permutation(f.order)
            getter = itemgetter(*[f.offset + p for p in perm])
            self._odd.append((f.name, struct.Struct(">" + f.code).unpack, getter, f.transform))
        plain_names, plain_idx, self._cooked = [], [], []
        for f in self.fields:
            if f in odd:
                continue
            if f.code == "s" or f.order is None:
                key = ("swapped" if f.order == "BA" else "plain", ">", f.offset, f.code, f.size)
            else:
                key = _DIRECT[f.order] + (f.offset, f.code, f.size)
            idx = slots[key]
            if f.transform is None:
                plain_names.append(f.name)
                plain_idx.append(idx)
            else:
                self._cooked.append((f.name, idx, f.transform))
        self._cook = _straight_line(self._cooked) if self._cooked else None
        self._plain_names = tuple(plain_names)
        if len(plain_idx) == 1:
            i0 = plain_idx[0]
            self._plain_get = lambda raw: (raw[i0],)
        elif plain_idx:
            self._plain_get = itemgetter(*plain_idx)
        else:
            self._plain_get = None

    def decode(self, data, out):
        """Add this block's values to the dict `out`. `data` must be exactly nbytes long."""
        if len(self._unpackers) == 1 and not self._need_swap:
            raw = self._unpackers[0][1](data)
        else:
            swapped = _swap_pairs(data) if self._need_swap else None
            raw = ()
            for use_swapped, unpack in self._unpackers:
                raw += unpack(swapped if use_swapped else data)
        if self._plain_get is not None:
            out.update(zip(self._plain_names, self._plain_get(raw)))
        if self._cook is not None:
            self._cook(raw, out)
        for name, unpack, getter, fn in self._odd:
            v = unpack(bytes(getter(data)))[0]
            out[name] = v if fn is None else fn(v)
        return out


class BitBlockDecoder:
    """Decodes the packed bits of one coil/discrete read (LSB of the first byte = first bit)."""

    def __init__(self, nbits, fields):
        self.nbytes = (nbits + 7) // 8
        self.fields = [(f.name, f.offset, f.transform) for f in fields]

    def decode(self, data, out):
        bits = int.from_bytes(data, "little")
        for name, offset, fn in self.fields:
            v = bool((bits >> offset) & 1)
            out[name] = v if fn is None else fn(v)
        return out


# --- the inverse: a value to write -> register words or bits -------------------------------


class Unwritable(ValueError):
    """A value the point cannot hold as given; the message says why."""


_INT_RANGE = {"h": (-0x8000, 0x7FFF), "H": (0, 0xFFFF), "i": (-(1 << 31), (1 << 31) - 1),
              "I": (0, (1 << 32) - 1), "q": (-(1 << 63), (1 << 63) - 1), "Q": (0, (1 << 64) - 1)}
_TRUE = ("1", "true", "on", "yes")
_FALSE = ("0", "false", "off", "no")


class WriteValue:
    """What writing one value to a point takes: `registers` (words in wire order from the
    point's address), or `bits` (coils), or `modify` (a function of the register's current
    word -> the new word: a bit field shares its register with others, so it is read first)."""

    __slots__ = ("bits", "modify", "raw", "registers")

    def __init__(self, raw, registers=None, bits=None, modify=None):
        self.raw = raw
        self.registers = registers
        self.bits = bits
        self.modify = modify


def _fraction(x):
    """A config number (a float from its text) as the exact decimal that was written."""
    from fractions import Fraction  # only `write` needs exact arithmetic: not the agent
    return Fraction(repr(float(x))) if not isinstance(x, int) else Fraction(x)


def _number(text):
    from decimal import Decimal, InvalidOperation
    from fractions import Fraction

    t = text.strip()
    if len(t) > _MAX_NUMBER_TEXT:
        raise Unwritable("%r... is not a number a register can hold (%d characters)"
                         % (t[:20], len(t)))
    try:
        return Fraction(int(t, 0))
    except ValueError:
        pass
    try:
        d = Decimal(t)
    except (InvalidOperation, ValueError):
        raise Unwritable("%r is not a number" % text) from None
    # Fraction(Decimal("1e999999999")) builds a billion-digit integer (minutes of CPU): no
    # register type comes near these magnitudes (float64 ends at about 1.8e308, 4.9e-324)
    if not d.is_finite() or (d and not -_MAX_EXPONENT <= d.adjusted() <= _MAX_EXPONENT):
        raise Unwritable("%r is not a number a register can hold (beyond 1e+-%d)"
                         % (text, _MAX_EXPONENT))
    return Fraction(d)


#: the longest value text `write` takes, and the largest decimal exponent (either sign)
_MAX_NUMBER_TEXT = 100
_MAX_EXPONENT = 330


def _unscale(p, value, what):
    """value -> raw register units, exactly: raw = (value - offset) * divisor / scale."""
    scale, offset, divisor = _fraction(p.scale), _fraction(p.offset), _fraction(p.divisor)
    raw = (value - offset) * divisor / scale
    if (scale, offset, divisor) != (1, 0, 1):
        what += " (%s in the register's units: %s)" % (_show(raw), _scaling_text(p))
    return raw, what


def _scaling_text(p):
    parts = []
    for k, default in (("scale", 1.0), ("divisor", 1.0), ("offset", 0.0)):
        v = getattr(p, k)
        if v != default:
            parts.append("%s=%s" % (k, repr(float(v)).rstrip("0").rstrip(".") if v != int(v) else int(v)))
    return " ".join(parts)


def _show(x):
    """An exact number for a message: as written where short, else 6 significant digits
    (float() would overflow to a traceback or underflow to a misleading 0.0)."""
    if hasattr(x, "denominator") and not isinstance(x, int):
        if x.denominator == 1 and abs(x.numerator) < 10 ** 17:
            return str(x.numerator)
        if x and 1e-9 <= abs(x) < 1e17:
            return repr(float(x))
        from decimal import Decimal

        return format((Decimal(x.numerator) / Decimal(x.denominator)).normalize(), ".6g")
    return str(x)


def _whole_raw(p, text, lo, hi, label):
    """A number (or an enum label) -> a whole raw value within lo..hi, or Unwritable."""
    enum = p.enum or {}
    for k, lab in enum.items():
        if lab == text:
            return k, "%r is %d" % (text, k)
    try:
        value = _number(text)
    except Unwritable:
        if enum:
            raise Unwritable("%r is not a number nor one of the labels: %s" % (
                text, ", ".join("%d:%r" % kv for kv in sorted(enum.items())))) from None
        raise
    raw, what = _unscale(p, value, _show(value))
    if raw.denominator != 1:
        raise Unwritable("%s is not a whole number: the %s holds whole steps%s, so it would "
                         "be rounded" % (what, label, " of %s" % _step(p) if _step(p) else ""))
    raw = raw.numerator
    if not lo <= raw <= hi:
        raise Unwritable("%s does not fit: a %s holds %d..%d" % (what, label, lo, hi))
    return raw, what


def _step(p):
    step = _fraction(p.scale) / _fraction(p.divisor)
    return "" if step == 1 else _show(step)


def _to_words(wire):
    return [(wire[i] << 8) | wire[i + 1] for i in range(0, len(wire), 2)]


def _wire(natural, order):
    """Natural (most significant first) bytes -> wire bytes in `order`."""
    if not order:
        return natural
    return bytes(natural[ord(c) - 65] for c in order)


def _swap16(w):
    return ((w & 0xFF) << 8) | (w >> 8)


def _field_modify(p, lo, width, raw):
    """A function old word -> new word setting bits lo..lo+width-1 of the (logical) register
    to `raw`; a BA point's register is byte-swapped on the wire."""
    mask = ((1 << width) - 1) << lo
    bits = (raw << lo) & mask
    swapped = p.order == "BA"

    def modify(word):
        logical = _swap16(word) if swapped else word
        logical = (logical & ~mask & 0xFFFF) | bits
        return _swap16(logical) if swapped else logical
    return modify


def _boolean(p, text):
    for k, lab in (p.enum or {}).items():
        if lab == text:
            return bool(k)
    t = text.strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise Unwritable("%r is not a boolean (1/0, true/false, on/off%s)" % (
        text, "" if not p.enum else " or a label: " + ", ".join(repr(v) for v in p.enum.values())))


def encode(p, text):
    """The inverse of the point's type, order and scaling: `text` (as typed on the command
    line) -> WriteValue. Raises Unwritable saying why a value does not fit or would not read
    back as written."""
    t = TYPES[p.type]
    kind = t.kind
    if kind == "bool":
        v = _boolean(p, text)
        v = not v if getattr(p, "invert", False) else v
        return WriteValue(v, bits=[v])
    if kind == "bit":
        v = _boolean(p, text)
        v = not v if getattr(p, "invert", False) else v
        return WriteValue(int(v), modify=_field_modify(p, p.bit_lo, 1, int(v)))
    if kind == "bits":
        width = p.bit_hi - p.bit_lo + 1
        signed = p.signed
        lo, hi = (-(1 << (width - 1)), (1 << (width - 1)) - 1) if signed else (0, (1 << width) - 1)
        raw, _ = _whole_raw(p, text, lo, hi, "%d-bit field%s" % (width, " (signed)" if signed else ""))
        raw &= (1 << width) - 1
        if getattr(p, "reverse", False):
            raw = int(bin(raw | (1 << width))[:2:-1], 2)
        return WriteValue(raw, modify=_field_modify(p, p.bit_lo, width, raw))
    if kind == "byte":
        signed = t.signed
        lo, hi = (-128, 127) if signed else (0, 255)
        raw, _ = _whole_raw(p, text, lo, hi, "%s byte" % p.type)
        return WriteValue(raw, modify=_field_modify(p, 8 if p.byte == "high" else 0, 8, raw & 0xFF))
    if kind == "int":
        lo, hi = _INT_RANGE[t.code]
        raw, _ = _whole_raw(p, text, lo, hi, p.type)
        natural = struct.pack(">" + t.code, raw)
        return WriteValue(raw, registers=_to_words(_wire(natural, p.order)))
    if kind == "float":
        from fractions import Fraction

        value = _number(text)
        raw, what = _unscale(p, value, _show(value))
        code = t.code
        try:
            natural = struct.pack(">" + code, float(raw))
        except (OverflowError, struct.error):
            raise Unwritable("%s does not fit a %s" % (what, p.type)) from None
        back = struct.unpack(">" + code, natural)[0]
        fn = p.transform()
        got = fn(back) if fn is not None else back
        if got is None or Fraction(got) != value and got != float(value):
            raise Unwritable("%s would read back as %s: a %s cannot hold it exactly (write %s)"
                             % (_show(value), _show(got), p.type, _show(got)))
        return WriteValue(back, registers=_to_words(_wire(natural, p.order)))
    if kind == "string":
        try:
            data = text.encode("latin-1")
        except UnicodeEncodeError:
            raise Unwritable("%r has characters outside Latin-1, which the register string "
                             "cannot hold" % text) from None
        room = 2 * p.count
        if len(data) > room:
            raise Unwritable("%d characters do not fit: string %d holds at most %d"
                             % (len(data), p.count, room))
        data = data.ljust(room, b"\0")
        if p.swap:
            data = bytes(data[i ^ 1] for i in range(room))
        return WriteValue(text, registers=_to_words(data))
    if kind == "append":
        d = int(p.decimals or 0)
        unit = 10 ** d
        value = _number(text)
        raw, what = _unscale(p, value, _show(value))
        scaled = raw * unit
        if scaled.denominator != 1:
            raise Unwritable("%s has more than %d decimal(s): the fraction register holds "
                             "exactly %d digit(s)" % (what, d, d))
        n = scaled.numerator
        if n < 0 and not p.signed:
            raise Unwritable("%s is negative: the integer register is unsigned (signed=yes "
                             "makes it int16)" % what)
        ip, frac = divmod(abs(n), unit)
        if n < 0 and ip == 0:
            raise Unwritable("%s cannot be written: the sign is carried by the integer register, "
                             "and -0 is 0" % what)
        ip = -ip if n < 0 else ip
        lo, hi = (-0x8000, 0x7FFF) if p.signed else (0, 0xFFFF)
        if not lo <= ip <= hi:
            raise Unwritable("%s does not fit: the integer register holds %d..%d" % (what, lo, hi))
        words = [ip & 0xFFFF, frac]
        if p.type == "append_reversed":
            words.reverse()
        return WriteValue(raw, registers=words)
    raise Unwritable("type %s cannot be written" % p.type)   # pragma: no cover - every kind above
