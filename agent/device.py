"""A device's planned requests and its poll: the only code that runs every cycle.

`Device.poll(client)` sends the reads planned at load time (agent.plan) and hands each answer's
data bytes to the block decoder compiled for it (agent.types); nothing is looked up by name or
parsed while polling.

Requests are independent (issue 9): a block the device refuses with an exception response
does not hide the others. The device answered, so it is alive; the poll goes on with the next
block and ends in `Refused` (the values of the blocks that answered, and each refused block with
its exception). Busy (5 ACKNOWLEDGE, 6 SERVER DEVICE BUSY) is asked once more at once (the
client keeps the connection's `pause` before it). A failure that means nobody answered (timeout,
CRC, frame, connection, and a gateway's 10/11 "target did not respond") ends the poll at once
as before: the next requests would only wait out the same silence.
"""
import time

from agent.modbus.errors import DeviceError, FrameError, ModbusError
from agent.modbus.pdu import MAX_BITS, MAX_REGISTERS, read_data_length
from agent.plan import Span, bus_estimate, plan_spans
from agent.types import TABLES, TYPES, BitBlockDecoder, Field, RegisterBlockDecoder

#: exception codes that mean the device itself did not answer (a gateway says so for it)
NOT_ANSWERING = frozenset((10, 11))


class Request:
    """One planned read and the decoder of its answer."""

    __slots__ = ("address", "count", "decoder", "function", "nbytes", "points", "table")

    def __init__(self, table, address, count, points):
        self.table = table
        self.function, is_bits = TABLES[table]
        self.address = address
        self.count = count
        self.points = points
        if is_bits:
            fields = [Field(p.name, p.address - address, None, 1, None, p.transform()) for p in points]
            self.decoder = BitBlockDecoder(count, fields)
        else:
            fields = []
            for p in points:
                t = TYPES[p.type]
                size = read_data_length(self.function, t.size(p.count))
                order = "BA" if (t.code == "s" and p.swap) else p.order
                fields.append(Field(p.name, read_data_length(self.function, p.address - address),
                                    t.code, size, order, p.transform()))
            self.decoder = RegisterBlockDecoder(read_data_length(self.function, count), fields)
        self.nbytes = self.decoder.nbytes

    def __repr__(self):
        return "Request(fc %02d %s %d+%d, %d points)" % (self.function, self.table, self.address,
                                                         self.count, len(self.points))


class Device:
    """[device:NAME] with its points and planned requests."""

    #: [device] gateway_unit (agent.gateway): None = its own unit, False = not served
    gateway_unit = None

    def __init__(self, name, connection, unit=1, interval=10.0, base=0, byte_order="ABCD",
                 max_registers=MAX_REGISTERS, max_bits=MAX_BITS, max_gap=10, profile=None,
                 mode="on_schedule", heartbeat=900.0, enabled=True, points=None, writable=False,
                 buffer=1, first="always", identify=False):
        self.name = name
        self.connection = connection
        self.unit = unit
        self.interval = interval
        self.base = base
        self.byte_order = byte_order
        self.max_registers = max_registers
        self.max_bits = max_bits
        self.max_gap = max_gap
        self.profile = profile
        self.mode = mode
        self.heartbeat = heartbeat
        self.enabled = enabled
        self.writable = writable    # `modbus-agent write` may write here
        self.buffer = buffer        # polls per record (agent.polling)
        self.first = first          # on_change: the first poll after start sent, or a baseline
        self.identify = identify      # FC 43 once after the first answer (agent.polling)
        self.points = list(points or ())
        self.requests = []
        self.blocks = []        # per planned request: its last good answer (see poll)
        self.path = None
        self.line = None
        self.interval_line = None
        self.plan()

    def plan(self):
        """(Re)plan the requests from the points: fewest reads per table, see agent.plan."""
        self.requests = []
        for table in ("coil", "discrete", "holding", "input"):
            pts = [p for p in self.points if p.table == table]
            if not pts:
                continue
            bits = TABLES[table][1]
            limit = self.max_bits if bits else self.max_registers
            gap = self.max_gap * 16 if bits else self.max_gap
            for planned in plan_spans([Span(p.address, p.count, p) for p in pts], limit, gap):
                self.requests.append(Request(table, planned.address, planned.count,
                                             [s.key for s in planned.spans]))
        self.blocks = [None] * len(self.requests)
        return self.requests

    def poll(self, client):
        """Run the planned requests on `client`; {point name: value}.

        Raises `Refused` when the device answered some requests with an exception response
        (its `values` hold the points of the other blocks), and the first other ModbusError
        (which ends the poll), with unit, function, address and count filled in.

        `blocks[i]`: (function, address, count, data bytes, t) of planned request i's last good
        answer, the bytes as the device sent them, t the monotonic start of that poll (one t per
        poll: the gateway, agent.gateway, serves a read spanning blocks only from one poll);
        None until it first answers."""
        out = {}
        unit = self.unit
        refused = None
        blocks = self.blocks
        if len(blocks) != len(self.requests):   # requests replaced without plan()
            blocks = self.blocks = [None] * len(self.requests)
        t = time.monotonic()
        for i, r in enumerate(self.requests):
            try:
                data = client.read(unit, r.function, r.address, r.count)
            except DeviceError as e:
                data, e = self._after_exception(client, r, e)
                if data is None:
                    if refused is None:
                        refused = []
                    refused.append((r, e))
                    continue
            except ModbusError as e:
                raise e.with_context(unit=unit, function=r.function, address=r.address,
                                     count=r.count) from None
            if len(data) != r.nbytes:
                raise FrameError("wrong amount of data", unit=unit, function=r.function,
                                 address=r.address, count=r.count,
                                 expected="%d data bytes" % r.nbytes, got=bytes(data))
            r.decoder.decode(data, out)
            blocks[i] = (r.function, r.address, r.count, bytes(data), t)
        if refused is not None:
            raise Refused(self, out, refused)
        return out

    #: busy answers asked again, since the device was made (the loop adds them to its health)
    busy_retries = 0

    def _after_exception(self, client, r, e):
        """An exception response to request `r`: (data, None) when a busy device answers the
        one retry, (None, DeviceError) when the block is refused; raises when the exception
        says that nobody answered (a gateway's 10/11), or the retry fails otherwise."""
        unit = self.unit
        e.with_context(unit=unit, function=r.function, address=r.address, count=r.count)
        if e.code in NOT_ANSWERING:
            raise e
        if not e.retryable:
            return None, e
        self.busy_retries += 1
        try:
            return client.read(unit, r.function, r.address, r.count), None
        except DeviceError as e2:
            e2.with_context(unit=unit, function=r.function, address=r.address, count=r.count)
            if e2.code in NOT_ANSWERING:
                raise e2 from None
            return None, e2
        except ModbusError as e2:
            raise e2.with_context(unit=unit, function=r.function, address=r.address,
                                  count=r.count) from None

    def estimate(self):
        """Bus use of one poll cycle: dict(requests, bytes, seconds)."""
        return bus_estimate(self.connection, [(r.function, r.count) for r in self.requests])

    def __repr__(self):
        return "Device(%r, unit %s, %d points, %d requests)" % (
            self.name, self.unit, len(self.points), len(self.requests))


class Refused(DeviceError):
    """The device answered some planned requests with an exception response.

    `values`: the points of the blocks that answered (may be empty); `failures`: [(Request,
    DeviceError)] for each refused block, in plan order. As a DeviceError it carries the first
    refusal's code and context, so code that knows nothing of partial polls sees the first
    failure, as before."""

    def __init__(self, device, values, failures):
        first = failures[0][1]
        super().__init__(first.code, unit=first.unit, function=first.function,
                         address=first.address, count=first.count)
        self.retryable = False
        self.device = device
        self.values = values
        self.failures = failures
        self.requests = len(device.requests)

    def errors(self):
        """The record's "errors" list (agent.record, CONTRACTS.md section 1)."""
        return [block_error(self.device.unit, r, e) for r, e in self.failures]

    def summary(self):
        """One line: which blocks and points are refused, how."""
        return "; ".join(block_error(self.device.unit, r, e)["message"] + " (%s)" % point_names(r)
                         for r, e in self.failures)


def point_names(r, limit=8):
    """'point a' / 'points a, b, ... N more': the points a block reads, for log lines."""
    names = [p.name for p in r.points]
    text = ", ".join(names[:limit])
    if len(names) > limit:
        text += ", ... %d more" % (len(names) - limit)
    return "point%s %s" % ("s" if len(names) > 1 else "", text)


def block_error(unit, r, e):
    """One refused block as an "errors" entry."""
    return {"kind": "exception", "code": e.code, "name": e.name, "function": r.function,
            "address": r.address, "count": r.count, "points": [p.name for p in r.points],
            "message": "unit %d fc %02d %s %d+%d: exception code %d %s" % (
                unit, r.function, r.table, r.address, r.count, e.code, e.name)}


def holes(r):
    """Addresses request `r` reads that none of its points asks for (gaps up to max_gap)."""
    covered = set()
    for p in r.points:
        covered.update(range(p.address, p.address + max(1, p.count)))
    return [a for a in range(r.address, r.address + r.count) if a not in covered]


def refusal_hint(device, r, code):
    """What to change when `device` refuses request `r` with exception `code` (text, or "")."""
    bits = TABLES[r.table][1]
    unit_word = "bits" if bits else "registers"
    if code == 2:
        gap = holes(r)
        if gap:
            return ("the block also reads %d %s no point asks for (%s %s; holes up to max_gap = %d): "
                    "devices refuse a read that touches an address they do not map. Set a lower "
                    "max_gap (max_gap = 0 reads only the points' own %s) in [device:%s], or split "
                    "the points into separate blocks" % (
                        len(gap), unit_word, r.table, _ranges(gap), device.max_gap, unit_word,
                        device.name))
        if len(r.points) == 1:
            p = r.points[0]
            return ("the device has no %s %s %d: check the point's address (%s) and the device's "
                    "base (base = %d: the configured number %d is protocol address %d; a manual "
                    "that counts from 1 needs base = 1)" % (
                        r.table, "bit" if bits else "register", p.address, _where(p), device.base,
                        p.address + device.base, p.address))
        return ("one of these points is at an address the device does not map, or the block is "
                "longer than the device accepts: check their addresses and the device's base "
                "(%d), or lower max_%s (now %d) to find which" % (
                    device.base, "bits" if bits else "registers",
                    device.max_bits if bits else device.max_registers))
    if code == 3:
        limit = device.max_bits if bits else device.max_registers
        return ("exception 3 to a read usually means the quantity: this block reads %d %s at once "
                "and some devices accept fewer per request. Set a lower max_%s (now %d) in "
                "[device:%s]" % (r.count, unit_word, "bits" if bits else "registers", limit,
                                 device.name))
    if code == 1:
        return ("the device does not support function %02d (%s table): check the point's table "
                "(holding vs input, coil vs discrete)" % (r.function, r.table))
    if code == 4:
        return "the device failed while reading these %s (its own fault): check the device" % unit_word
    return ""


def _where(p):
    if getattr(p, "path", None) and getattr(p, "line", None):
        return "%s:%s" % (p.path, p.line)
    return p.name


def _ranges(addresses, limit=4):
    """[3, 4, 5, 9] -> '3-5, 9'."""
    runs = []
    for a in addresses:
        if runs and runs[-1][1] == a - 1:
            runs[-1][1] = a
        else:
            runs.append([a, a])
    text = ", ".join("%d" % a if a == b else "%d-%d" % (a, b) for a, b in runs[:limit])
    if len(runs) > limit:
        text += ", ..."
    return text
