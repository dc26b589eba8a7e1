"""`modbus-agent scan`: find the devices on a connection (unit ids, baud rates, parities), with
progress, Ctrl-C keeping what was found, and ready-to-paste [device:...] sections; the
identification (FC 43 / MEI 14) of what answers."""
import sys
import time

from agent.commands import _err, _out
from agent.common import format_duration, parse_duration
from agent.config import load_or_report
from agent.modbus.errors import (
    EXCEPTION_NAMES,
    ConnectionLost,
    DeviceError,
    ModbusError,
    ModbusTimeout,
)

#: scan's answer timeout unless --timeout: short, a device answers a 1-register read in a few
#: ms (slow meters in up to ~100 ms); a gateway's socket adds its own latency on top
SCAN_TIMEOUT = 0.2
#: silence kept between scan requests unless --pause: lets a slow device that answers late
#: finish before the next unit is asked (no collision on the bus)
SCAN_PAUSE = 0.05
#: the presence probe: a 1-register read at protocol address 0, holding then input
SCAN_PROBES = ((3, "holding"), (4, "input"))


def parse_units(text):
    """'1-247', '1,3,10-20' -> sorted unit ids; ValueError naming what is wrong."""
    units = set()
    for part in text.split(","):
        part = part.strip()
        first, sep, last = part.partition("-")
        try:
            lo, hi = int(first), int(last) if sep else int(first)
        except ValueError:
            raise ValueError("--units %r: write unit ids and ranges, e.g. 1-247 or 1,3,10-20" % text) from None
        if not 0 <= lo <= hi <= 255:
            raise ValueError("--units %r: %s is not a range within 0..255" % (text, part))
        units.update(range(lo, hi + 1))
    return sorted(units)


def _parse_list(text, what, parse):
    out = []
    for part in text.split(","):
        try:
            out.append(parse(part.strip()))
        except ValueError:
            raise ValueError("--%s %r: %r is not valid" % (what, text, part)) from None
    return out


def _parity(text):
    p = text.upper()
    if p not in ("N", "E", "O"):
        raise ValueError(text)
    return p


def _baud(text):
    b = int(text)
    if b <= 0:
        raise ValueError(text)
    return b


class ScanHit:
    """One device that answered: unit, line settings, how it answered, its identification."""

    def __init__(self, unit, line, how, table=None, data=None, code=None):
        self.unit = unit
        self.line = line            # (baud, parity) on a serial bus, None on TCP
        self.how = how              # "data" | "exception"
        self.table = table          # the table that gave data
        self.data = data
        self.code = code            # the exception code when only exceptions came
        self.identity = None        # {"conformity", "objects"} or None
        self.ident_error = None

    def describe(self):
        if self.how == "data":
            text = "data (%s 0 = 0x%s)" % (self.table, bytes(self.data).hex())
        else:
            text = "exception %d %s (it answers: a device is there)" % (
                self.code, EXCEPTION_NAMES.get(self.code, "UNKNOWN EXCEPTION"))
        if self.identity:
            text += "; identification: " + identity_text(self.identity)
        elif self.ident_error:
            text += "; no identification (%s)" % self.ident_error
        return text


def identity_text(identity):
    """The identification's basic objects (and the model name) on one line."""
    objects = identity["objects"]
    shown = [objects[k] for k in ("vendor_name", "product_code", "revision", "model_name") if objects.get(k)]
    return " / ".join(shown) or "(no objects)"


def scan_unit(client, unit):
    """Ask `unit` the presence probes; a ScanHit when it answered (data or an exception), None
    when nothing came. Other failures (CRC, frame: something answered, garbled) raise."""
    first_exception = None
    for function, table in SCAN_PROBES:
        try:
            data = client.read(unit, function, 0, 1)
        except DeviceError as e:
            first_exception = first_exception or e
            continue
        except ModbusTimeout:
            if first_exception is None:
                return None
            break
        return ScanHit(unit, None, "data", table=table, data=data)
    return ScanHit(unit, None, "exception", code=first_exception.code)


def identify_hit(client, hit):
    try:
        hit.identity = client.identify(hit.unit)
    except DeviceError as e:
        hit.ident_error = "exception %d %s" % (e.code, e.name)
    except ModbusError as e:
        hit.ident_error = e.kind


def _slug(text):
    out = "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")
    return "_".join(filter(None, out.split("_")))[:24]


def scan_sections(conn, hits):
    """The ready-to-paste sections for what a scan found: a [connection:...] for each line
    setting other than the connection's own, and per device its [device:...] and [points:...]
    (the probe's register, which answered, as a first point)."""
    lines = []
    own = (conn.baud, conn.parity) if serial_port(conn) else None
    conn_names = {}
    for hit in hits:
        if hit.line is not None and hit.line != own and hit.line not in conn_names:
            name = "%s_%d%s" % (conn.name, hit.line[0], hit.line[1].lower())
            conn_names[hit.line] = name
            lines += ["; the same port at %d %s: devices at different rates cannot share a bus; set them "
                      "to one rate (then drop this section), or use it instead of [connection:%s] "
                      "if only these devices are on the port (one port, one connection)"
                      % (hit.line + (conn.name,)),
                      "[connection:%s]" % name, "type = %s" % conn.type, "port = %s" % conn.port,
                      "baud = %d" % hit.line[0], "parity = %s" % hit.line[1],
                      "bytesize = %d" % conn.bytesize, "stopbits = %d" % conn.stopbits, ""]
    used = set()
    for hit in hits:
        base = "unit%d" % hit.unit
        if hit.identity:
            product = hit.identity["objects"].get("product_code") or hit.identity["objects"].get("product_name")
            if product and _slug(product):
                base = "%s_%d" % (_slug(product), hit.unit)
        name = base
        n = 2
        while name in used:
            name = "%s_%d" % (base, n)
            n += 1
        used.add(name)
        lines.append("[device:%s]" % name)
        if hit.identity:
            lines.append("; " + ", ".join("%s: %s" % kv for kv in hit.identity["objects"].items()))
        lines += ["connection = %s" % conn_names.get(hit.line, conn.name), "unit = %d" % hit.unit]
        if hit.identity:
            lines.append("identify = yes")
        lines += ["", "[points:%s]" % name]
        if hit.how == "data":
            lines.append("; the register the scan read; add the manual's points (`modbus-agent probe` "
                         "guesses type and order)")
            lines.append("reg0 = %s 0 uint16" % hit.table)
        else:
            lines.append("; it refused register 0 of both tables (exception %d): add the manual's "
                         "points before `check`" % hit.code)
            lines.append("; reg = holding ADDRESS uint16")
        lines.append("")
    return lines


def serial_port(conn):
    """Whether the connection is a serial port of this machine (its `port` is a device path):
    then scan can try other line settings."""
    key = conn.transport.keys.get("port")
    return key is not None and key.kind == "path" and "baud" in conn.transport.keys


def _scan_settings(conn, baud, parity, timeout, pause):
    """A copy of the connection's settings for one scan pass."""
    import copy

    s = copy.copy(conn)
    if baud is not None:
        s.baud, s.parity = baud, parity
    s.timeout = timeout
    s.pause = pause
    if hasattr(s, "connect_timeout") and s.connect_timeout is None:
        s.connect_timeout = max(timeout, 1.0)
    return s


class _Progress:
    """Progress on stderr: one line rewritten on a terminal, a line per 50 units otherwise."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.shown = False

    def show(self, text, i, n):
        if self.tty:
            self.stream.write("\r\033[K%s %d/%d" % (text, i, n))
            self.shown = True
        elif i == 1 or i == n or i % 50 == 0:
            self.stream.write("%s %d/%d\n" % (text, i, n))
        self.stream.flush()

    def clear(self):
        if self.tty and self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False


def cmd_scan(args):
    cfg = load_or_report(args.config)
    if cfg is None:
        return 2
    conn = cfg.connections.get(args.connection)
    if conn is None:
        _err("no connection %r (connections: %s)" % (args.connection, ", ".join(cfg.connections) or "none"))
        return 2
    try:
        units = parse_units(args.units) if args.units else None
        bauds = _parse_list(args.bauds, "bauds", _baud) if args.bauds else None
        parities = _parse_list(args.parities, "parities", _parity) if args.parities else None
        timeout = parse_duration(args.timeout) if args.timeout else min(conn.timeout, SCAN_TIMEOUT)
        pause = parse_duration(args.pause) if args.pause is not None else max(conn.pause, SCAN_PAUSE)
    except ValueError as e:
        _err(str(e))
        return 2
    serial_line = serial_port(conn)
    if (bauds or parities) and not serial_line:
        _err("--bauds/--parities: connection %s is %s; only a serial port of this router can be "
             "switched from here (a gateway's serial side is set in the gateway)" % (conn.name, conn.type))
        return 2
    if units is None:
        units = list(range(1, 248))
    if conn.transport.serial:
        bad = [u for u in units if not 1 <= u <= 247]
        if bad:
            _err("--units: %s outside 1..247, the unit ids of a serial bus" % ", ".join(map(str, bad[:5])))
            return 2
    lines = [(b, p) for b in (bauds or [conn.baud]) for p in (parities or [conn.parity])] \
        if serial_line else [None]
    hits = []
    progress = _Progress()
    interrupted = False
    started = time.monotonic()
    _out("scanning %s (%s): unit(s) %s, timeout %s, pause %s%s" % (
        conn.name, conn.describe(), _ranges_text(units), format_duration(timeout), format_duration(pause),
        ", line settings: " + " ".join("%d %s" % lp for lp in lines) if serial_line else ""))
    try:
        for line in lines:
            settings = _scan_settings(conn, line[0] if line else None, line[1] if line else None,
                                      timeout, pause)
            label = conn.transport.describe(settings)
            client = conn.transport.open(settings)
            try:
                for i, unit in enumerate(units, 1):
                    progress.show("scanning %s: unit %d" % (label, unit), i, len(units))
                    try:
                        hit = scan_unit(client, unit)
                    except ConnectionLost as e:
                        progress.clear()
                        _err("%s: %s" % (label, e.describe()))
                        if not hits:
                            return 1
                        break
                    except ModbusError as e:
                        # garbled: something is there, or two devices answer one unit id, or a
                        # wrong line setting turned an answer into noise
                        progress.clear()
                        _out("  unit %3d at %s: garbled answer (%s): %s" % (unit, label, e.kind, e.describe()))
                        continue
                    if hit is None:
                        continue
                    hit.line = line
                    identify_hit(client, hit)
                    hits.append(hit)
                    progress.clear()
                    _out("  unit %3d at %s: %s" % (unit, label, hit.describe()))
            finally:
                client.close()
    except KeyboardInterrupt:
        interrupted = True
    progress.clear()
    took = time.monotonic() - started
    if interrupted:
        _out("interrupted after %.1f s: what was found so far" % took)
    _out("%d device(s) answered%s" % (len(hits), "" if interrupted else " (%.1f s)" % took))
    if not conn.transport.serial and len(hits) == len(units) > 1:
        _out("note: every unit id answered: a TCP device that ignores the unit id (use the one "
             "its manual gives, often 1 or 255)")
    if hits:
        _out("")
        _out("; ready to paste into %s:" % cfg.path)
        for text in scan_sections(conn, hits):
            _out(text)
    return 130 if interrupted else (0 if hits else 1)


def _ranges_text(units):
    """[1, 2, 3, 7] -> '1-3,7'."""
    out = []
    for u in units:
        if out and out[-1][1] == u - 1:
            out[-1][1] = u
        else:
            out.append([u, u])
    return ",".join("%d" % a if a == b else "%d-%d" % (a, b) for a, b in out)
