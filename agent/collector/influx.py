"""InfluxDB line protocol for `format=influx` on /api/v1/records and /api/v1/series, so history
can be piped into InfluxDB (`curl ... | influx write --bucket modbus --precision ns`).

    modbus,agent=site7,device=meter1,status=ok,unit=1 voltage_l1=230.1,mode="run",on=true,count=7i 1795000000123000000

One line per reading: a buffered record gives one line per sample (samples()). Measurements:
`modbus` (data: a point's value is a field; an "error" reading has the field error="message"),
`modbus_gap` (dropped, first_seq, last_seq), `modbus_health` (the health counters, nested keys
joined with "_"), and `modbus_series` for rollup buckets (count, min, max, avg, last; tag point).
Integers are `i` fields; one beyond int64 (a uint64 above 2^63) goes out as a float, the only
type InfluxDB 1.x takes for it. Values that are objects, lists or null are left out (a line
with no field left is skipped). Escaping per the line protocol reference: measurement `,` and
space; tag keys/values and field keys `,` `=` space (a backslash there is itself, except one right
before a separator or at the end, which no escape can write: it becomes U+29F5, a look-alike);
string fields `"` and `\\`. The
protocol has no line feed in a tag, key or field: in a tag or key it becomes a space, in a string
field the two characters `\\n` (`\\r`), so each point stays one line.
"""
import json
import math
import re

from agent.collector import series
from agent.collector.export import _closing
from agent.collector.samples import samples
from agent.collector.web import status
from agent.common import parse_utc

_INT64 = (-(1 << 63), (1 << 63) - 1)


def _clean(text):
    return str(text).replace("\r", " ").replace("\n", " ")


# A backslash escapes only the separators (`\\,` `\\=` `\\ `); any other is itself. So one right
# before a separator, or at the end, cannot be written: it becomes U+29F5, which looks the same.
_LONE_BACKSLASH = re.compile(r"\\(?=[,= ]|$)")


def escape_measurement(text):
    return _LONE_BACKSLASH.sub("\u29f5", _clean(text)).replace(",", "\\,").replace(" ", "\\ ")


def escape_key(text):
    """A tag key, tag value or field key."""
    return (_LONE_BACKSLASH.sub("\u29f5", _clean(text)).replace(",", "\\,").replace("=", "\\=")
            .replace(" ", "\\ "))


def field_value(v):
    """A field value's text, or None when the value has no field type (object, list, null, NaN)."""
    t = type(v)
    if t is bool:
        return "true" if v else "false"
    if t is int:
        if _INT64[0] <= v <= _INT64[1]:
            return "%di" % v
        return repr(float(v))
    if t is float:
        return repr(v) if math.isfinite(v) else None
    if t is str:
        return '"%s"' % v.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "\\r").replace("\n", "\\n")
    return None


def ts_ns(ts):
    """ts text -> integer nanoseconds since the epoch (records' ts carry milliseconds)."""
    t = parse_utc(ts)
    if t is None:
        return None
    whole = int(t)
    return whole * 1_000_000_000 + int(round((t - whole) * 1e6)) * 1000


def line(measurement, tags, fields, t_ns):
    """One line, or None when no field has a value. Tags in key order (what InfluxDB prefers),
    empty tag values left out (the protocol has none)."""
    fs = []
    for k, v in fields.items():
        text = field_value(v)
        if text is not None and k != "":
            fs.append("%s=%s" % (escape_key(k), text))
    if not fs:
        return None
    head = escape_measurement(measurement)
    for k in sorted(tags):
        v = tags[k]
        if v is None or v == "":
            continue
        head += ",%s=%s" % (escape_key(k), escape_key(v))
    out = "%s %s" % (head, ",".join(fs))
    return out if t_ns is None else "%s %d" % (out, t_ns)


def influx_lines(points):
    """(measurement, tags, fields, t_ns) tuples -> line-protocol lines (each without "\\n");
    points with no usable field are skipped. record_points and series_points make the tuples."""
    for p in points:
        text = line(*p)
        if text is not None:
            yield text


def _flat(obj, prefix=""):
    for k, v in obj.items():
        if type(v) is dict:
            yield from _flat(v, "%s%s_" % (prefix, k))
        else:
            yield "%s%s" % (prefix, k), v


def record_points(rows, measurement="modbus"):
    """Stored rows (ROW_COLUMNS order) -> points: data readings (one per sample), gaps, health."""
    for row in rows:
        agent, seq, ts, kind, device, unit, status, payload = row[:8]
        rec = json.loads(payload) if type(payload) is str else payload
        tags = {"agent": agent, "device": device, "unit": None if unit is None else str(unit)}
        if kind == "data":
            tags["status"] = status
            if status == "error":
                err = rec.get("error")
                msg = err.get("message") if type(err) is dict else None
                yield measurement, tags, {"error": msg if isinstance(msg, str) else json.dumps(err)}, ts_ns(ts)
                continue
            for sts, values in samples(rec):
                yield measurement, tags, values, ts_ns(sts)
        elif kind == "gap":
            fields = {k: rec.get(k) for k in ("dropped", "first_seq", "last_seq") if k in rec}
            fields["seq"] = seq
            yield measurement + "_gap", tags, fields, ts_ns(ts)
        elif kind == "health":
            health = rec.get("health")
            if type(health) is dict:
                yield measurement + "_health", tags, dict(_flat(health)), ts_ns(ts)


def series_points(agent, device, point, buckets, measurement="modbus_series", level=None):
    """query_series buckets -> points (one per bucket, at its start)."""
    tags = {"agent": agent, "device": device, "point": point, "level": level}
    for b in buckets:
        fields = {k: b.get(k) for k in ("count", "min", "max", "avg", "last")}
        yield measurement, tags, fields, ts_ns(b.get("t"))


def stream(lines, size=65536):
    """Lines -> byte pieces of ~size for a WSGI answer."""
    buf, n = [], 0
    for text in lines:
        buf.append(text)
        n += len(text) + 1
        if n >= size:
            yield ("\n".join(buf) + "\n").encode("utf-8")
            buf, n = [], 0
    if buf:
        yield ("\n".join(buf) + "\n").encode("utf-8")


def stream_records(rows):
    """GET /api/v1/records?format=influx: the WSGI iterable of the export's rows as lines (it
    closes the database pages when the client hangs up, as the other export formats do)."""
    return _closing(stream(influx_lines(record_points(rows))), rows)


def answer_series(start_response, result, agg):
    """GET /api/v1/series?format=influx: the query's buckets as modbus_series lines."""
    lines = influx_lines(series_points(result["agent"], result["device"], result["point"], result["buckets"],
                                       level=result.get("level")))
    body = b"".join(stream(lines))
    start_response(status(200), [("Content-Type", "text/plain; charset=utf-8"),
                                 ("Content-Length", str(len(body))), ("Cache-Control", "no-store")])
    return [body]


series.FORMATS["influx"] = answer_series  # the series route's formats (agent/collector/series.py)
