"""`modbus-agent write`: one value to a point (the inverse of its type, order and scaling) or raw
registers/coils, the frame shown and confirmed, then read back. For commissioning: refused
unless the device says `writable = yes`; the agent itself never writes."""
import struct
import sys

from agent.commands import _err, _format_value, _key_line, _out, _select_devices
from agent.config import load_or_report
from agent.modbus.errors import (
    ModbusError,
)

#: tables a Modbus function writes (discrete inputs and input registers are read-only)
_WRITE_FC = {"coil": (5, 15), "holding": (6, 16)}


def _frame_text(conn_type, unit, pdu_bytes):
    """The request as it goes on the wire (hex), for the confirmation."""
    from agent.modbus import ascii, rtu, tcp

    if conn_type in ("rtu", "rtu-over-tcp"):
        return "RTU frame %s" % rtu.build_adu(unit, pdu_bytes).hex(" ")
    if conn_type in ("ascii", "ascii-over-tcp"):
        return "ASCII frame %s CR LF" % ascii.build_adu(unit, pdu_bytes)[:-2].decode("ascii")
    if conn_type == "tcp":
        return "TCP frame %s (transaction id 0000 here: the client numbers it)" % (
            tcp.build_adu(0, unit, pdu_bytes).hex(" "))
    return "PDU %s (unit %d, framed by the %s transport)" % (pdu_bytes.hex(" "), unit, conn_type)


def _confirm(args, prompt):
    if getattr(args, "yes", False):
        return True
    sys.stdout.write(prompt + " [y/N] ")
    sys.stdout.flush()
    answer = sys.stdin.readline()
    if not (hasattr(sys.stdin, "isatty") and sys.stdin.isatty()):
        sys.stdout.write(answer.strip() + "\n")   # piped: show the answer as a terminal would
    return answer.strip().lower() in ("y", "yes")


def _parse_raw_values(table, texts):
    """--raw values -> register words (0..65535, -32768..-1 as two's complement, 0x hex) or
    coil booleans; ValueError saying which one is wrong."""
    out = []
    for text in texts:
        t = text.strip().lower()
        if table == "coil":
            if t in ("1", "on", "true", "yes"):
                out.append(True)
            elif t in ("0", "off", "false", "no"):
                out.append(False)
            else:
                raise ValueError("coil value %r: write 1/0, on/off or true/false" % text)
            continue
        try:
            v = int(t, 0)
        except ValueError:
            raise ValueError("register value %r is not an integer (decimal, or 0x hex)" % text) from None
        if not -0x8000 <= v <= 0xFFFF:
            raise ValueError("register value %r does not fit 16 bits (0..65535, or -32768..-1)" % text)
        out.append(v & 0xFFFF)
    return out


def _check_count(fc, n, what):
    """ValueError when one request of `fc` cannot carry `n` values (FC 15: 1968 coils, FC 16:
    123 registers), rather than the codec's InvalidRequest after the plan was shown."""
    from agent.modbus.pdu import FUNCTIONS

    limit = FUNCTIONS[fc].max_count
    if n > limit:
        raise ValueError("%s at most %d value(s) (fc %02d %s), not %d: write them in several "
                         "steps" % (what, limit, fc, FUNCTIONS[fc].name, n))


def write_plan(dev, args):
    """What `write` sends: (table, address, function, payload, read-back count, point or None,
    note), or raises ValueError (usage) / Unwritable (the value)."""
    from agent.types import encode

    if args.raw:
        if len(args.what) < 3:
            raise ValueError("--raw takes TABLE ADDRESS VALUE... (e.g. --raw holding 10 225)")
        table = args.what[0].lower()
        if table not in _WRITE_FC:
            raise ValueError("table %r cannot be written: coil (FC 05/15) or holding (FC 06/16); "
                             "discrete inputs and input registers are read-only" % args.what[0])
        try:
            address = int(args.what[1], 0)
        except ValueError:
            raise ValueError("address %r is not an integer (protocol address, 0-based)" % args.what[1]) from None
        values = _parse_raw_values(table, args.what[2:])
        if not 0 <= address <= 0xFFFF or address + len(values) > 0x10000:
            raise ValueError("address %d + %d is outside 0..65535" % (address, len(values)))
        single, multi = _WRITE_FC[table]
        fc = single if len(values) == 1 else multi
        _check_count(fc, len(values), "--raw %s takes" % table)
        return table, address, fc, values[0] if len(values) == 1 else values, len(values), None, ""
    if len(args.what) != 2:
        raise ValueError("write takes DEVICE POINT VALUE (or --raw TABLE ADDRESS VALUE...)")
    name, text = args.what
    point = next((p for p in dev.points if p.name == name), None)
    if point is None:
        from agent.config.ini import _suggest

        raise ValueError("device %s has no point %r%s" % (dev.name, name,
                                                          _suggest(name, [p.name for p in dev.points])))
    if point.table not in _WRITE_FC:
        raise ValueError("point %s is in the %s table, which is read-only (no Modbus function "
                         "writes it): only coil and holding points can be written" % (name, point.table))
    wv = encode(point, text)
    single, multi = _WRITE_FC[point.table]
    if wv.bits is not None:
        return point.table, point.address, single, wv.bits[0], 1, point, ""
    if wv.modify is not None:
        return point.table, point.address, single, wv.modify, 1, point, (
            "the field shares holding %d with other bits: it is read first, only these bits "
            "change" % point.address)
    regs = wv.registers
    fc = single if len(regs) == 1 else multi
    _check_count(fc, len(regs), "point %s is %d registers: one write takes" % (name, len(regs)))
    return point.table, point.address, fc, regs[0] if len(regs) == 1 else regs, len(regs), point, ""


def cmd_write(args):
    """`write -c FILE DEVICE POINT VALUE` / `--raw TABLE ADDRESS VALUE...`: the point's inverse
    transform, the frame shown and confirmed, FC 05/06/15/16, then read back and printed.
    Exit 0 written and read back as asked, 1 the device refused or reads back otherwise,
    2 usage, config, or a value the point cannot hold."""
    from agent.device import Request
    from agent.modbus.pdu import FUNCTIONS
    from agent.types import Unwritable

    cfg = load_or_report(args.config)
    if cfg is None:
        return 2
    devices = _select_devices(cfg, args.device)
    if devices is None:
        return 2
    dev = devices[0]
    if not dev.writable:
        _err("%s:%s: [device:%s] writable: writes are refused unless the device section says "
             "`writable = yes` (the agent itself never writes; this is for commissioning)"
             % (cfg.path, _key_line(cfg.path, "device:" + dev.name, "writable"), dev.name))
        return 2
    try:
        table, address, fc, payload, count, point, note = write_plan(dev, args)
    except Unwritable as e:
        _err("%s.%s: refused: %s" % (dev.name, args.what[0], e))
        return 2
    except ValueError as e:
        _err(str(e))
        return 2
    head = "%s (unit %d on %s)" % (dev.name, dev.unit, dev.connection.name)
    client = dev.connection.open()
    try:
        if callable(payload):      # a bit field: read-modify-write of its register
            try:
                old = client.read(dev.unit, 3, address, 1)
            except ModbusError as e:
                _err("%s: cannot read holding %d before changing its bits: %s" % (head, address, e.describe()))
                return 1
            word = (old[0] << 8) | old[1]
            payload = payload(word)
            note += " (now 0x%04x -> 0x%04x)" % (word, payload)
        what = ("%s = %s" % (point.name, args.what[1])) if point is not None else "raw"
        shown = payload if isinstance(payload, list) else [payload]
        vals = " ".join(("1" if v else "0") if table == "coil" else "0x%04x" % v for v in shown)
        _out("%s: write %s -> fc %02d %s %d: %s" % (head, what, fc, table, address, vals))
        if note:
            _out("  " + note)
        pdu_bytes = FUNCTIONS[fc].build(address, payload)
        _out("  " + _frame_text(dev.connection.type, dev.unit, pdu_bytes))
        if not _confirm(args, "send it?"):
            _out("not sent")
            return 1
        try:
            if fc == 5:
                client.write_coil(dev.unit, address, payload)
            elif fc == 6:
                client.write_register(dev.unit, address, payload)
            elif fc == 15:
                client.write_coils(dev.unit, address, payload)
            else:
                client.write_registers(dev.unit, address, payload)
        except ModbusError as e:
            _err("%s: write failed: %s" % (head, e.describe()))
            return 1
        _out("  written")
        read_fc = 1 if table == "coil" else 3
        try:
            data = client.read(dev.unit, read_fc, address, count)
        except ModbusError as e:
            _err("%s: written, but the read back failed: %s" % (head, e.describe()))
            return 1
    finally:
        client.close()
    if point is not None:
        value = Request(point.table, point.address, point.count, [point]).decoder.decode(bytes(data), {})[point.name]
        _out("read back: %s = %s %s" % (point.name, _format_value(value), point.unit or ""))
        return 0
    if table == "coil":
        got = [bool((data[i >> 3] >> (i & 7)) & 1) for i in range(count)]
        _out("read back: coil %d: %s" % (address, " ".join("1" if v else "0" for v in got)))
        return 0 if got == shown else 1
    got = list(struct.unpack(">%dH" % count, bytes(data)))
    _out("read back: holding %d: %s" % (address, " ".join("0x%04x (%d)" % (v, v) for v in got)))
    if got != shown:
        _out("  differs from what was written: the device rounds, limits or ignores the write")
        return 1
    return 0
