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
import struct
from array import array
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

# --- types ---------------------------------------------------------------------------------


class TypeInfo:
    """A value type: registers it spans, its struct code, and what its argument means."""

    __slots__ = ("code", "kind", "name", "words")

    def __init__(self, name, words, code, kind):
        self.name = name
        self.words = words      # registers (or bits, for 'bool' on bit tables)
        self.code = code        # struct code of the whole field
        self.kind = kind        # int | float | bool | string | bits | bit | byte


TYPES = {
    "bool": TypeInfo("bool", 1, None, "bool"),
    "bit": TypeInfo("bit", 1, "H", "bit"),          # bit N of a register
    "bits": TypeInfo("bits", 1, "H", "bits"),       # bits A-B of a register
    "int8": TypeInfo("int8", 1, "H", "byte"),       # int8 high|low
    "uint8": TypeInfo("uint8", 1, "H", "byte"),
    "int16": TypeInfo("int16", 1, "h", "int"),
    "uint16": TypeInfo("uint16", 1, "H", "int"),
    "int32": TypeInfo("int32", 2, "i", "int"),
    "uint32": TypeInfo("uint32", 2, "I", "int"),
    "float32": TypeInfo("float32", 2, "f", "float"),
    "int64": TypeInfo("int64", 4, "q", "int"),
    "uint64": TypeInfo("uint64", 4, "Q", "int"),
    "float64": TypeInfo("float64", 4, "d", "float"),
    "string": TypeInfo("string", None, "s", "string"),  # string N: N registers
}
# Telegraf-style spellings people paste from other configs.
TYPE_ALIASES = {"int8h": ("int8", "high"), "int8l": ("int8", "low"),
                "uint8h": ("uint8", "high"), "uint8l": ("uint8", "low"),
                "float": ("float32", None), "double": ("float64", None)}

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


def order_for(type_name, order):
    """The concrete byte order of a value of `type_name` given a point or device order
    (2, 4 or 8 letters). Raises ValueError naming the orders that fit."""
    words = TYPES[type_name].words
    if words == 1 and TYPES[type_name].kind == "int":
        if order in ORDERS_16:
            return order
        if order in ORDER_FOR_16:
            return ORDER_FOR_16[order]
        raise ValueError("byte order %s does not fit a 16-bit value (use AB or BA)" % order)
    if words == 2:
        if order in ORDERS_32:
            return order
        raise ValueError("byte order %s does not fit a 32-bit value (use one of %s)"
                         % (order, ", ".join(ORDERS_32)))
    if words == 4:
        if order in ORDERS_64:
            return order
        if order in ORDER_FOR_64:
            return ORDER_FOR_64[order]
        raise ValueError("byte order %s does not fit a 64-bit value (use one of %s)"
                         % (order, ", ".join(ORDERS_64)))
    raise ValueError("type %s has no byte order" % type_name)


def permutation(order):
    """Wire position of each byte, most significant first: 'CDAB' -> (2, 3, 0, 1)."""
    return tuple(order.index(chr(65 + i)) for i in range(len(order)))


# --- value transforms ----------------------------------------------------------------------


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


def make_transform(kind, scale=1.0, offset=0.0, divisor=1.0, decimals=None, enum=None,
                   bit_lo=0, bit_hi=15, signed=False, byte=None, digits=None):
    """Closure turning the raw struct value of one point into its reported value, or None when
    the raw value can be reported as is. Order: bits/byte extraction, enum, then
    value = raw * scale / divisor + offset, then rounding to `decimals`. `digits` rounds a float
    to that many significant digits first (7 for float32). NaN and infinities (raw, or
    reached by scaling) become None."""
    steps = []
    if kind == "bit":
        n = bit_lo
        steps.append(lambda v: bool((v >> n) & 1))
    elif kind == "bits":
        lo, width = bit_lo, bit_hi - bit_lo + 1
        mask = (1 << width) - 1
        if signed:
            sign, full = 1 << (width - 1), 1 << width
            steps.append(lambda v: (lambda x: x - full if x & sign else x)((v >> lo) & mask))
        else:
            steps.append(lambda v: (v >> lo) & mask)
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
    elif kind in ("int", "float", "bits", "byte"):
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
        if kind == "float":
            if digits:
                # float32 carries ~7 significant digits; widening to a double adds noise
                # (230.1 -> 230.10000610351562) that would be spooled, uploaded and stored.
                fmt = "%%.%dg" % digits
                if scaled:
                    steps.append(lambda v: x if (x := float(fmt % v) * mul / div + off) - x == 0.0 else None)
                else:
                    steps.append(lambda v: float(fmt % v) if v - v == 0.0 else None)
            elif scaled:
                steps.append(lambda v: x if (x := v * mul / div + off) - x == 0.0 else None)
            else:
                steps.append(lambda v: v if v - v == 0.0 else None)
        elif scaled:
            if mul == 1.0 and off == 0.0:
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
                groups.setdefault((source, endian), []).append(key)
        self._unpackers = []
        order = []
        for (source, endian), keys in sorted(groups.items()):
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
        for name, idx, fn in self._cooked:
            out[name] = fn(raw[idx])
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
