"""A device's planned requests and its poll: the only code that runs every cycle.

`Device.poll(client)` sends the reads planned at load time (agent.plan) and hands each answer's
data bytes to the block decoder compiled for it (agent.types); nothing is looked up by name or
parsed while polling.
"""
from agent.plan import MAX_BITS, MAX_REGISTERS, Span, bus_estimate, plan_spans
from agent.types import TABLES, TYPES, BitBlockDecoder, Field, RegisterBlockDecoder


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
                size = 2 * p.count if t.code == "s" else struct_size(t.code)
                order = "BA" if (t.code == "s" and p.swap) else p.order
                fields.append(Field(p.name, 2 * (p.address - address), t.code, size, order,
                                    p.transform()))
            self.decoder = RegisterBlockDecoder(2 * count, fields)
        self.nbytes = self.decoder.nbytes

    def __repr__(self):
        return "Request(fc %02d %s %d+%d, %d points)" % (self.function, self.table, self.address,
                                                         self.count, len(self.points))


def struct_size(code):
    return {"h": 2, "H": 2, "i": 4, "I": 4, "f": 4, "q": 8, "Q": 8, "d": 8}[code]


class Device:
    """[device:NAME] with its points and planned requests."""

    def __init__(self, name, connection, unit=1, interval=10.0, base=0, byte_order="ABCD",
                 max_registers=MAX_REGISTERS, max_bits=MAX_BITS, max_gap=10, profile=None,
                 mode="on_schedule", heartbeat=900.0, enabled=True, points=None):
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
        self.points = list(points or ())
        self.requests = []
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
        return self.requests

    def poll(self, client):
        """Run the planned requests on `client`; {point name: value}. Raises the first
        ModbusError, with unit, function, address and count filled in."""
        from agent.modbus.errors import FrameError, ModbusError
        out = {}
        unit = self.unit
        for r in self.requests:
            try:
                data = client.read(unit, r.function, r.address, r.count)
            except ModbusError as e:
                raise e.with_context(unit=unit, function=r.function, address=r.address,
                                     count=r.count) from None
            if len(data) != r.nbytes:
                raise FrameError("wrong amount of data", unit=unit, function=r.function,
                                 address=r.address, count=r.count,
                                 expected="%d data bytes" % r.nbytes, got=bytes(data))
            r.decoder.decode(data, out)
        return out

    def estimate(self):
        """Bus use of one poll cycle: dict(requests, bytes, seconds)."""
        return bus_estimate(self.connection, [(r.function, r.count) for r in self.requests])

    def __repr__(self):
        return "Device(%r, unit %s, %d points, %d requests)" % (
            self.name, self.unit, len(self.points), len(self.requests))
