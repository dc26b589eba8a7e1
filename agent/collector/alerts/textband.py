"""Bands checked on a record's JSON text, without parsing it: the alert hook's fast path.

Most records change nothing for any rule: every watched value is inside its band (engine._band).
Parsing each record's values (float by float) just to see that cost ingest a fifth of its rate,
so for a device whose records keep one layout (the same value keys in the same order, as the
agent writes them) the hook first tries one regular expression over the whole stored text:

    {<head without braces or backslashes>"values":{"k1":V1,"k2":V2,...},"status":"ok"[,"clock":"unsynced"]}

where each watched key's Vi matches only numbers that are surely inside its band, null, and
strings without escapes (a threshold ignores both), and an unwatched key's any scalar. A match
proves "no value leaves its band", the same answer as parsing and calling quiet(); no match
(a value near or past a limit, an exponent, a nested value, another layout, a buffered or
partial record) says nothing, and the record is parsed as before. So the pattern may be
conservative, never wrong: tests/test_collector_alerts_fast.py checks it on random bands and
numbers against float().

Why the head cannot fool it: the stored text is valid JSON; with no backslash and no brace
before it, `"values":{` is the record's own top-level key (a quote there can only open a key).

"Surely inside (lo, hi)": a number -?I[.F] without exponent lies in [I, I+1) (or (-(I+1), -I])
and float() rounds monotonically onto that closed interval, so the integer part I is checked
against lo and hi with a margin of one; integer parts are bounded to 15 digits (exact in a float).
"""
import math
import re

_BIG = 10 ** 15 - 1          # integer parts beyond this: not judged here (floats stop being exact)
_STR = r'"[^"\\\x00-\x1f]*"'
_ANY = r'(?:-?(?:0|[1-9]\d*)(?:\.\d+|)(?:[eE][+-]?\d+|)|%s|true|false|null)' % _STR   # an unwatched scalar
_HEAD = r'\{[^{}\\]*"values":\{'
_TAIL = r'\},"status":"ok"(?:,"clock":"unsynced"|)\}'


def _fill_nines(n, k):
    s = str(n)
    return int(s[:-k] + "9" * k) if len(s) > k else int("9" * k)


def _split(lo, hi):
    """[lo, hi] (0 <= lo <= hi) as ranges whose ends have equal digit counts and differ in a
    prefix digit followed by 0..9 runs (the classic range-to-regex split)."""
    stops = {hi}
    k = 1
    stop = _fill_nines(lo, k)
    while lo <= stop < hi:
        stops.add(stop)
        k += 1
        stop = _fill_nines(lo, k)
    k = 1
    stop = hi + 1 - (hi + 1) % 10 ** k - 1
    while lo < stop <= hi:
        stops.add(stop)
        k += 1
        stop = hi + 1 - (hi + 1) % 10 ** k - 1
    out, start = [], lo
    for s in sorted(stops):
        out.append((start, s))
        start = s + 1
    return out


def _range_one(a, b):
    sa, sb = str(a), str(b)
    out = ""
    run = 0
    for x, y in zip(sa, sb):
        if x == y:
            out += x
        elif x == "0" and y == "9":
            run += 1
        else:
            out += "[%s-%s]" % (x, y)
    return out + (r"\d" if run == 1 else r"\d{%d}" % run if run else "")


def int_range(lo, hi):
    r"""Regex text of the JSON integers lo..hi (0 <= lo, no leading zeros; hi capped at 15
    digits), or None if none: integers with fewer digits than hi and more than lo as one
    `[1-9]\d{m,n}`, the two ends as the classic range-to-regex split (each alternative fails at
    its first digits: the match stays cheap)."""
    hi = min(hi, _BIG)
    if lo > hi:
        return None
    la, lb = len(str(lo)), len(str(hi))
    middle = None
    if la == lb:
        ends = _split(lo, hi)
    elif lo == 0:   # 0..9 and the whole middle: one repeat
        ends = _split(10 ** (lb - 1), hi)
        middle = r"(?:0|[1-9]\d{0,%d})" % (lb - 2)
    else:
        ends = _split(lo, 10 ** la - 1) + _split(10 ** (lb - 1), hi)
        if lb - la >= 2:
            middle = r"[1-9]\d{%d,%d}" % (la, lb - 2)
    parts = ([middle] if middle else []) + [_range_one(a, b) for a, b in ends]
    return "(?:%s)(?![0-9])" % "|".join(parts)


def number_in(lo, hi):
    """Regex text of JSON numbers surely in the open interval (lo, hi), or None if none is."""
    alts = []
    if not lo < hi or hi == -math.inf or lo == math.inf:
        return "(?:null|%s)" % _STR
    # non-negative -?I[.F] (a "-0.5" is negative: handled below): v in [I, I+1]
    a = 0 if lo == -math.inf else max(0, math.floor(lo) + 1)
    b = _BIG if hi == math.inf else math.ceil(hi) - 2
    if b >= a:
        r = int_range(a, b)
        if r:
            alts.append(r + r"(?:\.\d+|)")
    # negative: v in [-(I+1), -I]; -(I+1) > lo and -I < hi
    c = 0 if hi == math.inf else max(0, math.floor(-hi) + 1)
    d = _BIG if lo == -math.inf else math.ceil(-lo) - 2
    if d >= c:
        r = int_range(c, d)
        if r:
            alts.append("-" + r + r"(?:\.\d+|)")
    for word, v in (("true", 1.0), ("false", 0.0)):   # a coil: 1 and 0 (extract.numeric)
        if lo < v < hi:
            alts.append(word)
    alts += ["null", _STR]
    return "(?:%s)" % "|".join(alts)


def matcher(keys, bands):
    """A function text -> truthy when the record surely changes nothing; None when the keys
    cannot appear literally (quotes, backslashes, control characters). `keys`: the device's
    value keys in record order; `bands`: ((point, lo, hi), ...)."""
    by_point = dict((p, (lo, hi)) for p, lo, hi in bands)
    parts = []
    for k in keys:
        if '"' in k or "\\" in k or any(ord(c) < 0x20 for c in k):
            return None
        band = by_point.get(k)
        parts.append('"%s":%s' % (re.escape(k), _ANY if band is None else number_in(*band)))
    return re.compile(_HEAD + ",".join(parts) + _TAIL, re.ASCII | re.DOTALL).fullmatch
