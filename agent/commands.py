"""`check`, `poll` and `probe`: what an operator runs over SSH before starting the agent
(`write` and `scan`, the commissioning commands: agent/write.py, agent/scan.py).

Exit codes (agent.cli): 0 ok, 1 a device failed (poll) or nothing matched (probe), 2 bad
configuration or usage.
"""
import os
import struct
import sys
import time

from agent import cpucost
from agent.common import format_duration
from agent.config import BUS_WARN, check_config, load_or_report, redact
from agent.device import Refused, holes, refusal_hint
from agent.modbus.errors import (
    ModbusError,
    hexdump,
)
from agent.record import data_record, encode, error_record, partial_record
from agent.types import TABLES, shortest32


def _out(text=""):
    sys.stdout.write(text + "\n")


def _err(text):
    sys.stderr.write(text + "\n")




# --- check ---------------------------------------------------------------------------------


def plan_lines(cfg):
    """The polling plan as text lines: per connection, per device, per request."""
    lines = []
    for conn in cfg.connections.values():
        if not conn.devices:
            lines.append("connection %s: %s, no enabled device" % (conn.name, conn.describe()))
            continue
        load = sum(d.estimate()["seconds"] / d.interval for d in conn.devices)
        lines.append("connection %s: %s, timeout %s, pause %s: bus busy %.1f%% of the time%s" % (
            conn.name, conn.describe(), format_duration(conn.timeout), format_duration(conn.pause), 100 * load,
            "  WARNING: above %d%%" % (100 * BUS_WARN) if load > BUS_WARN else ""))
        for d in conn.devices:
            est = d.estimate()
            share = est["seconds"] / d.interval
            extra = d.mode + (" (heartbeat %s)" % format_duration(d.heartbeat) if d.mode == "on_change" else "")
            lines.append("  device %s: unit %d, every %s, %s, %d point(s)%s%s%s" % (
                d.name, d.unit, format_duration(d.interval), extra, len(d.points),
                ", profile %s" % d.profile if d.profile else "",
                ", %d polls per record" % d.buffer if getattr(d, "buffer", 1) > 1 else "",
                ", writable (modbus-agent write)" if getattr(d, "writable", False) else ""))
            lines.append("    %d request(s) per cycle, %d bytes on the wire, ~%.1f ms bus time = "
                         "%.1f%% of %s%s" % (
                             est["requests"], est["bytes"], 1000 * est["seconds"], 100 * share,
                             format_duration(d.interval),
                             "  WARNING: above %d%%" % (100 * BUS_WARN) if share > BUS_WARN else ""))
            for r in d.requests:
                names = " ".join(p.name for p in r.points)
                if len(names) > 70:
                    names = names[:67] + "..."
                lines.append("      fc %02d %-8s %5d +%-4d %s" % (r.function, r.table, r.address,
                                                               r.count, names))
                gap = holes(r)
                if gap:
                    # a device that maps no register there refuses the whole block (exception 2)
                    lines.append("        reads %d unasked %s in holes (max_gap %d): if the device "
                                 "refuses this block with exception 2, lower max_gap" % (
                                     len(gap), "bit(s)" if TABLES[r.table][1] else "register(s)",
                                     d.max_gap))
    return lines


def cmd_check(args):
    cfg, errors, warnings = check_config(args.config)
    if cfg is not None:
        warnings = list(warnings) + spool_warnings(cfg) + cpu_warnings(cfg)
    for w in warnings:
        _err("warning: " + w)
    if errors:
        for e in errors:
            _err(e)
        _err("%s: %d error(s)" % (args.config, len(errors)))
        return 2
    npoints = sum(len(d.points) for d in cfg.devices)
    _out("%s: OK: agent %s, %d connection(s), %d device(s), %d point(s)%s" % (
        args.config, cfg.agent.id, len(cfg.connections), len(cfg.devices), npoints,
        ", disabled: " + ", ".join(cfg.disabled) if cfg.disabled else ""))
    _out("upload: %s" % (redact(cfg.upload.url) if cfg.upload else "off (no [upload] section)"))
    for line in mqtt_check_lines(cfg):
        _out(line)
    _out("spool: %s, at most %g MB and %s, fsync %s" % (
        cfg.agent.spool_dir, cfg.agent.spool_max_mb, format_duration(cfg.agent.spool_max_age), cfg.agent.fsync))
    _out(cpu_line(cfg))
    for line in plan_lines(cfg):
        _out(line)
    for line in gateway_lines(cfg):
        _out(line)
    return 0


def gateway_lines(cfg):
    """[gateway]: where it listens and which device answers under which unit id."""
    gw = getattr(cfg, "gateway", None)
    if gw is None:
        return ["gateway: off (no [gateway] section)"]
    from agent.config.load import gateway_unit
    from agent.gateway.answer import default_max_age

    host, port = gw.listen
    lines = ["gateway: Modbus TCP on %s, read-only (FC 01-04 from the last poll's bytes), at most %d "
             "client(s), idle_timeout %s" % (("[%s]:%d" if ":" in host else "%s:%d") % (host, port),
                                             gw.max_clients, format_duration(gw.idle_timeout))]
    if 0 < port < 1024 and hasattr(os, "geteuid") and os.geteuid() != 0:
        lines.append("  note: port %d is below 1024: the agent needs root (procd) or CAP_NET_BIND_SERVICE "
                     "(systemd AmbientCapabilities=); `check` runs as uid %d" % (port, os.geteuid()))
    served = sorted(((gateway_unit(d), d) for d in cfg.devices if gateway_unit(d) is not None),
                    key=lambda x: x[0])
    for gu, d in served:
        reads = ", ".join("fc %02d %d+%d" % (r.function, r.address, r.count) for r in d.requests[:6])
        if len(d.requests) > 6:
            reads += ", ... %d more" % (len(d.requests) - 6)
        lines.append("  unit %d: device %s (unit %d on %s), max_age %s: %s" % (
            gu, d.name, d.unit, d.connection.name,
            format_duration(gw.max_age if gw.max_age is not None else default_max_age(d)), reads))
    hidden = [d.name for d in cfg.devices if gateway_unit(d) is None]
    if hidden:
        lines.append("  not served (gateway_unit = off): %s" % ", ".join(hidden))
    if not served:
        lines.append("  no device served")
    return lines
def mqtt_check_lines(cfg):
    """What [mqtt] publishes where (agent.mqtt.check; pure, paho is not imported)."""
    from agent.mqtt.check import check_lines

    return check_lines(cfg)


def ram_filesystem(path, mounts="/proc/mounts"):
    """(mount point, fs type) when `path`, or its nearest existing parent, is on tmpfs or ramfs
    (lost at power off); None otherwise or when the mount table cannot be read."""
    try:
        with open(mounts, encoding="utf-8", errors="replace") as f:
            table = [line.split()[:3] for line in f if len(line.split()) >= 3]
    except OSError:
        return None
    p = os.path.abspath(path)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    p = os.path.realpath(p)
    best = None
    for _dev, mnt, fstype in table:
        mnt = mnt.replace("\\040", " ")   # /proc/mounts escapes spaces
        # longest mount point wins; on a tie the later line (mounted over the earlier one)
        if (p == mnt or p.startswith(mnt.rstrip("/") + "/")) and (best is None or len(mnt) >= len(best[0])):
            best = (mnt, fstype)
    if best is not None and best[1] in RAM_FILESYSTEMS:
        return best
    return None


RAM_FILESYSTEMS = ("tmpfs", "ramfs")


def spool_warnings(cfg, mounts="/proc/mounts"):
    """`check` warnings about where the spool lives (not errors: a test bench may want RAM)."""
    out = []
    ram = ram_filesystem(cfg.agent.spool_dir, mounts)
    if ram is not None:
        out.append("%s:%d: [agent] spool_dir: %s is in RAM (%s): records waiting for upload are lost "
                   "on power loss; put it on flash or USB storage" % (
                       cfg.path, _key_line(cfg.path, "agent", "spool_dir"), cfg.agent.spool_dir, ram[1]))
    seq_file = getattr(cfg.agent, "seq_file", None)
    ram = ram_filesystem(seq_file, mounts) if seq_file else None
    if ram is not None:
        out.append("%s:%d: [agent] seq_file: %s is in RAM (%s): after a reboot a spool that lost its "
                   "state may reuse seqs the collector holds (new readings dropped as duplicates); "
                   "put it on flash" % (cfg.path, _key_line(cfg.path, "agent", "seq_file"), seq_file, ram[1]))
    return out


def cpu_line(cfg):
    """The estimated CPU share of polling on a router (agent.cpucost), for `check`'s summary."""
    total, shares = cpucost.estimate(cfg.devices)
    top = ", ".join("%s %.1f%%" % (d.name, 100 * s) for d, s in shares[:3])
    return "cpu: polling needs ~%.0f%% of %s; cpu_budget %g%%%s" % (
        100 * total, cpucost.ROUTER, cfg.agent.cpu_budget, "; costliest: " + top if top else "")


def cpu_warnings(cfg):
    """`check` warning when the estimated router CPU share exceeds [agent] cpu_budget."""
    total, shares = cpucost.estimate(cfg.devices)
    if 100 * total <= cfg.agent.cpu_budget:
        return []
    top = ", ".join("%s %.1f%%" % (d.name, 100 * s) for d, s in shares[:3])
    return ["%s:%d: [agent] cpu_budget: polling these devices needs ~%.0f%% of %s, more than cpu_budget = "
            "%g%% (costliest: %s; per poll ~%.1f ms + %.2f ms per point of router CPU, tools/bench/router.py): "
            "lengthen intervals or drop points" % (
                cfg.path, _key_line(cfg.path, "agent", "cpu_budget"), 100 * total, cpucost.ROUTER,
                cfg.agent.cpu_budget, top, 1000 * cpucost.PER_POLL, 1000 * cpucost.PER_POINT)]


def _key_line(path, section, key):
    """Line of `key` in [section] of the INI file (the section's line when the key is left at
    its default; 0 when neither is found)."""
    found, current = 0, None
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                t = line.strip()
                if t.startswith("["):
                    current = t[1:].split("]", 1)[0].strip()
                    if current == section and not found:
                        found = n
                elif current == section and t.split("=", 1)[0].strip().lower() == key:
                    return n
    except OSError:
        pass
    return found


# --- poll ----------------------------------------------------------------------------------


def _format_value(v):
    if isinstance(v, float):
        return "%.10g" % v
    if v is None:
        return "-"
    return str(v)


def _select_devices(cfg, name):
    if name is None:
        return cfg.devices
    for d in cfg.devices:
        if d.name == name:
            return [d]
    if name in cfg.disabled:
        _err("device %s is disabled (enabled = no)" % name)
    else:
        _err("no device %r (devices: %s)" % (name, ", ".join(d.name for d in cfg.devices)))
    return None


def cmd_poll(args):
    cfg = load_or_report(args.config)
    if cfg is None:
        return 2
    devices = _select_devices(cfg, getattr(args, "device", None))
    if devices is None:
        return 2
    clients = {}
    failed = 0
    try:
        for dev in devices:
            t = time.time()
            refused = None
            try:
                client = clients.get(dev.connection.name)
                if client is None:
                    client = clients[dev.connection.name] = dev.connection.open()
                values = dev.poll(client)
                error = None
            except Refused as e:
                # the device answered, refusing some blocks: show what it gave and why not the rest
                refused = e
                values, error = (e.values, None) if e.values else (None, e)
                failed += error is None
            except ModbusError as e:
                values, error = None, e
            except OSError as e:   # e.g. the serial port does not exist
                values, error = None, {"kind": "connection", "message": str(e)}
            if error is not None:
                failed += 1
            if args.json:
                errors = refused.errors() if refused is not None else None
                if error is not None:
                    rec = error_record(cfg.agent.id, t, dev.name, dev.unit, error, errors)
                elif refused is not None:
                    rec = partial_record(cfg.agent.id, t, dev.name, dev.unit, values, errors)
                else:
                    rec = data_record(cfg.agent.id, t, dev.name, dev.unit, values)
                try:
                    line = encode(rec)
                except (ValueError, TypeError, OverflowError) as e:
                    # a value JSON cannot carry: say so as the agent would spool it, go on
                    failed += error is None and refused is None
                    line = encode(error_record(cfg.agent.id, t, dev.name, dev.unit, {
                        "kind": "agent", "message": "record cannot be encoded (%s: %s)" % (type(e).__name__, e)}))
                sys.stdout.write(line.decode("utf-8"))
                continue
            head = "%s (unit %d on %s)" % (dev.name, dev.unit, dev.connection.name)
            if error is not None:
                msg = error.describe() if hasattr(error, "describe") else error["message"]
                kind = getattr(error, "kind", None) or error.get("kind")
                _out("%s: ERROR %s: %s" % (head, kind, msg))
                if refused is not None:
                    _refusal_lines(dev, refused)
                continue
            if refused is not None:
                _out("%s: PARTIAL: the device refuses %d of %d request(s)" % (
                    head, len(refused.failures), refused.requests))
                _refusal_lines(dev, refused)
            else:
                _out("%s: ok" % head)
            missing = set()
            if refused is not None:
                for r, e in refused.failures:
                    missing.update((p.name, e.code) for p in r.points)
            why = dict(missing)
            width = max(len(p.name) for p in dev.points)
            for p in dev.points:
                if p.name in why:
                    _out("  %-*s  %16s  refused (exception %d)" % (width, p.name, "-", why[p.name]))
                    continue
                _out("  %-*s  %16s  %s" % (width, p.name, _format_value(values.get(p.name)),
                                           p.unit or ""))
    finally:
        for c in clients.values():
            try:
                c.close()
            except Exception:
                pass
    return 1 if failed else 0


def _refusal_lines(dev, refused):
    """Each refused block of `poll`, and what to change."""
    for (r, e), entry in zip(refused.failures, refused.errors()):
        _out("  refused: %s (%s)" % (entry["message"], ", ".join(entry["points"])))
        hint = refusal_hint(dev, r, e.code)
        if hint:
            _out("    fix: %s" % hint)


# --- probe ---------------------------------------------------------------------------------

PROBE_TYPES = (
    # (type, struct code, registers, byte orders)
    ("uint16", "H", 1, ("AB", "BA")),
    ("int16", "h", 1, ("AB", "BA")),
    ("float32", "f", 2, ("ABCD", "CDAB", "BADC", "DCBA")),
    ("uint32", "I", 2, ("ABCD", "CDAB", "BADC", "DCBA")),
    ("int32", "i", 2, ("ABCD", "CDAB", "BADC", "DCBA")),
    ("float64", "d", 4, ("ABCDEFGH", "GHEFCDAB", "BADCFEHG", "HGFEDCBA",
                         "CDABGHEF", "DCBAHGFE", "FEHGBADC", "EFGHABCD")),
    ("uint64", "Q", 4, ("ABCDEFGH", "GHEFCDAB", "BADCFEHG", "HGFEDCBA",
                        "CDABGHEF", "DCBAHGFE", "FEHGBADC", "EFGHABCD")),
    ("int64", "q", 4, ("ABCDEFGH", "GHEFCDAB", "BADCFEHG", "HGFEDCBA",
                       "CDABGHEF", "DCBAHGFE", "FEHGBADC", "EFGHABCD")),
)
PROBE_SCALES = (1, 0.1, 0.01, 0.001)
# How often each order is met in the field: the natural order first, then swapped words.
_ORDER_RANK = {"AB": 2, "ABCD": 2, "ABCDEFGH": 2, "CDAB": 1, "GHEFCDAB": 1}


def parse_expect(text):
    """'LOW..HIGH' -> (low, high) floats."""
    low, sep, high = text.partition("..")
    try:
        if not sep:
            raise ValueError
        lo, hi = float(low), float(high)
    except ValueError:
        raise ValueError("--expect %r: write LOW..HIGH, e.g. 220..240 or -10..10.5" % text) from None
    if lo > hi:
        lo, hi = hi, lo
    return lo, hi


def parse_probe_address(text, table):
    """Manual address as written (decimal, 0x hex or classic 5/6-digit) -> (table, number)."""
    t = text.strip()
    if t.isdigit() and len(t) in (5, 6) and t[0] in "34":
        return ("input" if t[0] == "3" else "holding"), int(t[1:])
    return table, int(t, 16) if t.lower().startswith("0x") else int(t, 10)


def read_window(client, unit, function, first, count):
    """Registers first..first+count-1 -> {address: 2 bytes}, reading as much as the device
    allows: devices reject reads that touch an unmapped register, so on an exception the
    window shrinks to the parts that exist."""
    got = {}
    tries = [(first, count)] + [(a, 1) for a in range(first, first + count)]
    last_error = None
    for a, n in tries:
        if a < 0 or all(x in got for x in range(a, a + n)):
            continue
        try:
            data = client.read(unit, function, a, n)
        except ModbusError as e:
            last_error = e
            if e.kind in ("timeout", "connection"):
                break   # a dead link will not answer the smaller reads either
            continue
        for i in range(n):
            got[a + i] = bytes(data[2 * i:2 * i + 2])
    return got, last_error


def probe_candidates(registers, address, low, high, device_base=0):
    """All (type, order, scale, base) readings of the registers at `address` (as written in a
    manual, base 0 or 1) that land in low..high, best first.

    `registers`: {protocol address: 2 bytes}. Returns dicts with type, order, scale, base,
    protocol (address), value, score."""
    out = []
    for base in (0, 1):
        start = address - base
        if start < 0:
            continue
        for tname, code, words, orders in PROBE_TYPES:
            try:
                blob = b"".join(registers[a] for a in range(start, start + words))
            except KeyError:
                continue
            for order in orders:
                natural = bytes(blob[order.index(chr(65 + i))] for i in range(2 * words))
                raw = struct.unpack(">" + code, natural)[0]
                if code in "fd":
                    if raw != raw or raw in (float("inf"), float("-inf")):
                        continue
                    if code == "f":
                        raw = shortest32(raw)
                scales = (1,) if code in "fd" else PROBE_SCALES
                for scale in scales:
                    value = raw if scale == 1 else round(raw * scale, 6)
                    if not low <= value <= high:
                        continue
                    score = _ORDER_RANK.get(order, 0) + (2 if scale == 1 else 0)
                    score += 1 if base == device_base else 0
                    # A float landing in the range is strong evidence (random bit patterns
                    # rarely do) -- unless one of its registers is 0: then it is often half of
                    # the real value read with the wrong base or word order (230.0 = 43 66 00 00).
                    if code in "fd" and value != 0 and b"\0\0" not in [blob[i:i + 2] for i in range(0, len(blob), 2)]:
                        score += 3
                    if raw == 0:
                        score -= 3
                    out.append({"type": tname, "order": order, "scale": scale, "base": base,
                                "protocol": start, "value": value, "score": score, "words": words})
    mid = (low + high) / 2.0
    out.sort(key=lambda c: (-c["score"], abs(c["value"] - mid), c["words"]))
    return out


def point_line(name, table, c, device_base):
    """A candidate as a point line for [points:DEVICE] (address in the device's base)."""
    text = "%s = %s %d %s %s" % (name, table, c["protocol"] + device_base, c["type"], c["order"])
    if c["scale"] != 1:
        text += " scale=%g" % c["scale"]
    return text


def probe_identity(client, unit):
    """`probe`'s identification line (FC 43 / MEI 14) when the device speaks it, else None."""
    from agent.scan import identity_text

    try:
        return identity_text(client.identify(unit))
    except ModbusError:
        return None


def cmd_probe(args):
    cfg = load_or_report(args.config)
    if cfg is None:
        return 2
    devices = _select_devices(cfg, args.device)
    if devices is None:
        return 2
    dev = devices[0]
    try:
        low, high = parse_expect(args.expect)
        table, address = parse_probe_address(args.address, args.table)
    except ValueError as e:
        _err(str(e))
        return 2
    if not 0 <= address <= 0xFFFF:
        _err("--address %s is outside 0..65535" % args.address)
        return 2
    function = 3 if table == "holding" else 4
    client = dev.connection.open()
    try:
        # base 1 needs address-1, 64-bit values need 4 registers from the start
        first = max(0, address - 1)
        registers, error = read_window(client, dev.unit, function, first, address + 4 - first)
        ident = probe_identity(client, dev.unit) if registers else None
    finally:
        client.close()
    if not registers:
        _err("%s (unit %d): nothing could be read around %s %d: %s" % (
            dev.name, dev.unit, table, address, error.describe() if error else "no data"))
        return 1
    if ident:
        _out("%s (unit %d) identification: %s" % (dev.name, dev.unit, ident))
    _out("%s (unit %d) %s registers read:" % (dev.name, dev.unit, table))
    for a in sorted(registers):
        v = struct.unpack(">H", registers[a])[0]
        _out("  %5d: %s  (%d)" % (a, hexdump(registers[a]), v))
    cands = probe_candidates(registers, address, low, high, dev.base)
    if not cands:
        _out("no type, byte order, scale or address base gives a value in %g..%g" % (low, high))
        return 1
    _out("candidates for %s..%s, best first (paste into [points:%s]; addresses in the device's "
         "base %d):" % (_format_value(low), _format_value(high), dev.name, dev.base))
    name = "probe_%s" % args.address
    shown = cands[:20]
    width = max(len(point_line(name, table, c, dev.base)) for c in shown)
    for c in shown:
        _out("  %-*s   ; = %s  (manual address %s is %d-based)" % (
            width, point_line(name, table, c, dev.base), _format_value(c["value"]), address, c["base"]))
    if len(cands) > len(shown):
        _out("  ... and %d more" % (len(cands) - len(shown)))
    return 0
