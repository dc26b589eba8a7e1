"""Request planning: which reads cover a device's points, per (connection, unit, table).

A pure function of addresses. Points are spans (address, count) in one table; a request reads one
contiguous range. Two neighbouring spans share a request when the hole between them is at most
`max_gap` (registers, or bits for coil/discrete tables) and the whole request stays within
`max_count` (at most the spec's limits, agent.modbus.pdu MAX_REGISTERS / MAX_BITS).
`max_gap = 0` lets only touching spans share a request: the planner never reads an address the
operator did not ask for.

Greedy extension gives the fewest requests: any sub-range of a valid request is itself valid, so
taking each request as far as it can go never makes a later one necessary that an earlier cut
would have avoided.
"""

from agent.modbus.transport import TRANSPORTS

__all__ = ["Planned", "Span", "bus_estimate", "plan_addresses", "plan_spans"]


class Span:
    """What a request must cover for one point."""

    __slots__ = ("address", "count", "key")

    def __init__(self, address, count, key=None):
        self.address = address
        self.count = count
        self.key = key

    @property
    def end(self):
        return self.address + self.count

    def __repr__(self):
        return "Span(%d, %d, %r)" % (self.address, self.count, self.key)


class Planned:
    """One planned read: start address, count, and the spans (points) it serves."""

    __slots__ = ("address", "count", "spans")

    def __init__(self, address, count, spans):
        self.address = address
        self.count = count
        self.spans = spans

    def __repr__(self):
        return "Planned(%d, %d, %d spans)" % (self.address, self.count, len(self.spans))

    def as_tuple(self):
        return (self.address, self.count)


def plan_spans(spans, max_count, max_gap):
    """Spans of one table -> list of Planned reads, fewest possible, in address order.

    Raises ValueError when a single span is larger than `max_count` (no read can hold it).
    Overlapping spans (several bit fields of one register) simply share the read.
    """
    if max_count < 1:
        raise ValueError("max_count must be at least 1")
    if max_gap < 0:
        raise ValueError("max_gap must not be negative")
    ordered = sorted(spans, key=lambda s: (s.address, s.count))
    out = []
    start = end = None
    members = []
    for s in ordered:
        if s.count > max_count:
            raise ValueError("%r needs %d, more than the %d one read may hold"
                             % (s.key, s.count, max_count))
        if members:
            gap = s.address - end
            new_end = max(end, s.end)
            if gap <= max_gap and new_end - start <= max_count:
                members.append(s)
                end = new_end
                continue
            out.append(Planned(start, end - start, members))
        start, end, members = s.address, s.end, [s]
    if members:
        out.append(Planned(start, end - start, members))
    return out


def plan_addresses(pairs, max_count, max_gap):
    """Table-test helper: [(address, count), ...] -> [(start, count), ...]."""
    return [p.as_tuple() for p in plan_spans([Span(a, c) for a, c in pairs], max_count, max_gap)]


# --- bus time ------------------------------------------------------------------------------

def bus_estimate(conn, reads):
    """Bus use of `reads` [(function, count)] on a connection-like object (.type, .pause and
    the keys of its transport) -> {"requests", "bytes", "seconds"}: its transport's estimate
    (agent.modbus.transport). RTU: request and response bytes at the line's character time,
    each framed by a 3.5-character silence, plus a turnaround allowance and the pause. TCP:
    MBAP bytes, a per-request allowance and the pause. RTU over TCP: the serial time on the
    gateway's bus plus the TCP allowance."""
    return TRANSPORTS[conn.type].bus_time(conn, reads)
