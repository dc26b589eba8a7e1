"""The fast path of ingest: the agent's own encoding, matched by one regular expression per record.

fast_head accepts the uploader's envelope, fast_rows splits its records into rows without
building a dict, or answers None so that the general path (agent/collector/validate.py) decides
with every check and the precise error; tests check that both paths agree on every input.
"""
import json
import re

from agent.collector.jsonbody import DuplicateKey, check_json_size, scan_once
from agent.collector.validate import MAX_SAMPLES, MAX_SEQ, good_dates, record_row
from agent.wire import AGENT_KEY, ENVELOPE_TAIL, RECORD_HEAD, TS_LEN

# The agent writes every record the same way (agent/record.py: compact, keys in a fixed order, no
# escapes in the usual case). A record in exactly that form is checked and split into its columns
# by one regex match, without building a dict: about 40% less CPU than parse + validate, which is
# most of the collector's work per record. The same for a failed read (status "error" with the
# agent's error object). Anything else (another key order, a gap, health or partial record, an
# "errors" list, an escape, a number beyond 300 digits, a date not seen yet, more than 256 values;
# a buffered record with "samples" has its own match, _fast_buffered)
# takes the general path, record by record, with the same rules; tests check that both paths agree.
#
# A regex cannot see that a key of "values" comes twice, so the generic pattern is only the first
# sight of a device: its keys are then read once (and a record naming one twice goes to the
# general path, which refuses it) and the device's later records are matched by a pattern with
# exactly those keys as literals (a "layout"), which cannot match a duplicate and runs faster than
# the generic one. Layouts are compiled a few per request at most (a compile costs milliseconds)
# and kept per agent and device, in bounded caches.

_FS = r'"[^"\\\x00-\x1f]{0,4096}"'  # a JSON string without escapes, at most MAX_TEXT characters
# a JSON number that cannot overflow a float (< 1e300: at most 200 integer digits, exponent < 100)
# (Optional parts as an empty alternative, (?:X|), not (?:X)?: the same matches, but sre runs a
# branch faster than a repeat; the values loop is most of the collector's CPU per record.)
_FN = r"-?(?:0|[1-9]\d{0,199})(?:\.\d{1,300}|)(?:[eE][+-]?\d{1,2}|)"
_FV = r"(?:%s|%s|true|false|null)" % (_FN, _FS)
_FKV = r"%s:%s" % (_FS, _FV)
# The record head as agent.wire declares it ({"agent":..,"seq":..,"ts":.. in that order, ts of
# TS_LEN characters), then device and unit as agent.record writes them.
_FAST_TS = r"\d{4}-\d\d-\d\dT(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d\.\d{3}Z"   # utc_timestamp's form
assert TS_LEN == 24, "_FAST_TS matches 24 characters"   # tests/test_wire.py pins both
_FAST_PREFIX = (re.escape(AGENT_KEY.decode()) + r'"([^"\\\x00-\x1f]{1,128})","%s":(0|[1-9]\d{0,18}),' % RECORD_HEAD[1]
                + r'"%s":"(%s)",' % (RECORD_HEAD[2], _FAST_TS)
                + r'"device":"([^"\\\x00-\x1f]{1,128})","unit":(\d{1,3}),')
# An ok reading ends `"values":{...},"status":"ok"` (+ the optional clock flag); store.py slices
# the values out of a stored payload between these two.
VALUES_KEY = '"values":'
OK_TAIL = ',"status":"ok"'
_FAST_START = _FAST_PREFIX + re.escape(VALUES_KEY) + r"\{"
_FAST_END = r"\}" + re.escape(OK_TAIL) + r'(,"clock":"unsynced")?\}'
# A failed read as the agent writes it (agent/record.py error_record, ModbusError.as_record): fixed
# keys, so no layout is needed and no key can come twice. With an "errors" list: the general path.
_FAST_ERROR = re.compile(_FAST_PREFIX + r'"status":"error","error":\{"kind":%s,"message":%s'
                         r'(?:,"code":(?:0|[1-9]\d{0,2})|)\}(,"clock":"unsynced")?\}' % (_FS, _FS), re.ASCII).match
MAX_LAYOUT_KEYS = 256  # more values than this in a record: the general path
# A bounded repeat: sre keeps about 1 KB of backtracking state per iteration of a repeated group
# until the match ends, so an unbounded one made a record of 300000 values cost 360 MB to match.
_FAST_RECORD = re.compile(_FAST_START + r"(?:%s(?:,%s){0,%d}|)" % (_FKV, _FKV, MAX_LAYOUT_KEYS - 1) + _FAST_END,
                          re.ASCII).match
fast_record = _FAST_RECORD  # for store.aggregate
_FAST_HEAD = re.compile(re.escape(AGENT_KEY.decode()) + r'"([^"\\\x00-\x1f]{1,128})","records":\[').match  # envelope_head
_ENVELOPE_TAIL = ENVELOPE_TAIL.decode()
_COMPILES_PER_REQUEST = 4
# Bounds (whatever clients send, in open mode anyone): a compiled layout takes about 1 KB a key,
# a device entry ~0.2 KB; past a bound the cache starts again (costs a recompile, never a wrong answer).
_MAX_CACHED_KEYS = 16384
_MAX_DEVICES = 65536
_layouts = {}  # tuple of keys -> compiled match of a record with exactly these "values" keys
_device_layouts = {}  # agent -> {device: match}
_sizes = [0, 0]  # keys in _layouts, devices in _device_layouts


# A buffered record ([device] buffer = N; CONTRACTS.md section 8): the head and the newest values
# as in an ok record, then "samples", one object per poll. Every sample's values must have exactly
# the record's keys (an ok poll gives every point), matched by a pattern with those keys as
# literals, so no key can come twice; samples in time order, the last one at the record's ts, each
# date already seen. Anything else takes the general path, which says what is wrong.
_SAMPLES_OPEN = ',"samples":['
_FAST_BUF_HEAD = re.compile(_FAST_START + r"(?:%s(?:,%s){0,%d}|)" % (_FKV, _FKV, MAX_LAYOUT_KEYS - 1)
                            + r"\}" + re.escape(OK_TAIL + _SAMPLES_OPEN), re.ASCII).match
_FAST_BUF_TAIL = re.compile(r'\](,"clock":"unsynced")?\}', re.ASCII).match
_sample_layouts = {}  # tuple of keys -> compiled match of one sample with exactly these keys
_MAX_SAMPLE_LAYOUTS = 1024


class _Buffered:
    """What fast_rows takes from a match (end, groups) for a buffered record."""

    __slots__ = ("_end", "_groups", "compiled")

    def __init__(self, groups, end, compiled):
        self._groups, self._end, self.compiled = groups, end, compiled

    def end(self):
        return self._end

    def groups(self):
        return self._groups


def _fast_buffered(text, idx, max_ts, may_compile):
    """A buffered record in the agent's own form at text[idx:] -> _Buffered, or None (the
    general path decides)."""
    m = _FAST_BUF_HEAD(text, idx)
    if m is None:
        return None
    vend = m.end() - len(OK_TAIL) - len(_SAMPLES_OPEN)
    keys = tuple(_values_keys(text, text.index('"values":{', idx) + 9, vend))
    if len(set(keys)) != len(keys):
        return None
    match = _sample_layouts.get(keys)
    compiled = False
    if match is None:
        if not may_compile:
            return None
        if len(_sample_layouts) >= _MAX_SAMPLE_LAYOUTS:
            _sample_layouts.clear()
        values = ",".join('"%s":%s' % (re.escape(k), _FV) for k in keys)
        match = _sample_layouts[keys] = re.compile(
            r'\{"ts":"(%s)","values":\{%s\}\}' % (_FAST_TS, values), re.ASCII).match
        compiled = True
    pos, prev, n = m.end(), None, 0
    while True:
        sm = match(text, pos)
        if sm is None:
            return None
        sts = sm.group(1)
        if sts[:10] not in good_dates or (prev is not None and sts < prev) or (
                max_ts is not None and sts > max_ts):
            return None
        prev, n, pos = sts, n + 1, sm.end()
        if text[pos] != ",":
            break
        pos += 1
    t = _FAST_BUF_TAIL(text, pos)
    groups = m.groups()
    if t is None or n > MAX_SAMPLES or prev != groups[2]:
        return None
    return _Buffered(groups + (t.group(1),), t.end(), compiled)


def _layout(keys):
    m = _layouts.get(keys)
    if m is None:
        if _sizes[0] + len(keys) > _MAX_CACHED_KEYS:
            _layouts.clear()
            _sizes[0] = 0
        values = ",".join('"%s":%s' % (re.escape(k), _FV) for k in keys)
        m = _layouts[keys] = re.compile(_FAST_START + values + _FAST_END, re.ASCII).match
        _sizes[0] += len(keys)
    return m


def _learn(agent, device, keys):
    """Remember the layout of an agent's device (compiling it if new)."""
    if _sizes[1] >= _MAX_DEVICES:
        _device_layouts.clear()
        _sizes[1] = 0
    layouts = _device_layouts.get(agent)
    if layouts is None:
        layouts = _device_layouts[agent] = {}
    if device not in layouts:
        _sizes[1] += 1
    layouts[device] = _layout(keys)


def _values_keys(text, start, end):
    """Keys of the values object text[start:end] (fast form, valid JSON), in order."""
    return [k for k, _ in json.loads(text[start:end], object_pairs_hook=list)]


def fast_head(text):
    """'{"agent":"X","records":[' ... ']}' exactly (the uploader's body) -> (agent, index of the
    first record); None for any other shape."""
    m = _FAST_HEAD(text)
    if m is None or not text.endswith(_ENVELOPE_TAIL):
        return None
    return m.group(1), m.end()


def fast_rows(text, idx, agent, received, max_records, max_depth, max_ts=None, limits=None):
    """Rows of a body accepted by fast_head, or None when the general path must decide: any
    record it cannot accept (malformed, invalid, too many, a key twice, ts beyond max_ts) sends
    the whole body there, so what is refused, and the message saying why, never depends on which
    path saw it first. `limits` (json_limits) bounds what the rest of the body may hold once a
    record is parsed as JSON (TooMany)."""
    rows = []
    append = rows.append
    generic = _FAST_RECORD
    last = len(text) - 2  # the records' closing bracket
    if idx == last:
        return rows
    layouts = _device_layouts.get(agent) or {}
    compiles = _COMPILES_PER_REQUEST
    checked = False
    try:
        while True:
            # The device's layout, if known: its name sits before the first '"unit":' of the
            # record (found within the first 400 characters, or there is no layout to try)
            m = None
            status = "ok"
            d = text.find('","unit":', idx, idx + 400)
            p = text.rfind('"device":"', idx, d) if d > 0 else -1
            if p >= 0:
                match = layouts.get(text[p + 10:d])
                if match is not None:
                    m = match(text, idx)
            if m is None:
                m = generic(text, idx)
                if m is None:
                    m = _FAST_ERROR(text, idx)
                    status = "error"
                    if m is None:   # a buffered record? (its head pattern fails fast on others)
                        m = _fast_buffered(text, idx, max_ts, compiles > 0)
                        status = "ok"
                        if m is not None and m.compiled:
                            compiles -= 1
                else:
                    # (at most MAX_LAYOUT_KEYS of them: the pattern's bound)
                    keys = tuple(_values_keys(text, text.index('"values":{', idx) + 9,
                                              text.rindex('},"status":"ok"', idx, m.end()) + 1))
                    if len(set(keys)) != len(keys):
                        m = None  # a key twice: the general path refuses it, naming it
                    elif compiles > 0 or keys in _layouts:
                        if keys not in _layouts:
                            compiles -= 1
                        _learn(agent, m.group(4), keys)
                        layouts = _device_layouts.get(agent) or {}
            if m is not None:
                end = m.end()
                a, seq, ts, device, unit, clock = m.groups()
                seq, unit = int(seq), int(unit)
                if (a != agent or seq > MAX_SEQ or unit > 255 or ts[:10] not in good_dates
                        or max_ts is not None and ts > max_ts):
                    m = None  # the general checks decide (and learn a new date)
                else:
                    append((agent, seq, ts, "data", device, unit, status, text[idx:end], clock and "unsynced",
                            received))
            if m is None:
                if limits is not None and not checked:
                    check_json_size(text, limits, idx)  # TooMany: before anything is parsed
                    checked = True
                obj, end = scan_once(text, idx)
                append(record_row(obj, text[idx:end], agent, received, "", max_depth, max_ts))
            if len(rows) > max_records:
                return None
            c = text[end]
            if c == ",":
                idx = end + 1
            elif c == "]" and end == last:
                return rows
            else:
                return None
    except (StopIteration, ValueError, IndexError, RecursionError, DuplicateKey):  # Invalid is a ValueError
        return None
