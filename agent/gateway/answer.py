"""The gateway's pure part: a Modbus TCP request -> the answer ADU, from the cached blocks.

Each served device keeps, per planned read, the data bytes of its last good answer and the
monotonic start of that poll (agent.device `Device.blocks`). A read (FC 01-04) is answered from
those bytes only, never re-encoded from decoded values: a read of exactly a planned block gets
the device's own bytes; a part of a block gets that slice (registers) or those bits (coils and
discrete inputs, repacked LSB first as section 6.1 says); a read spanning several blocks of one
table is assembled when one poll gave them all.

Exceptions (Modbus Application Protocol v1.1b3, section 7), checked in this order:
  unit not served                      0B  GATEWAY TARGET DEVICE FAILED TO RESPOND
  not FC 01-04 (writes 05/06/15/16/22/23, diagnostics, anything else)
                                       01  ILLEGAL FUNCTION (read-only: a third party's
                                           write never reaches the bus)
  malformed read, quantity 0 or above 2000 bits / 125 registers
                                       03  ILLEGAL DATA VALUE
  past address 65535, or an address no planned read covers, or blocks from different polls
                                       02  ILLEGAL DATA ADDRESS
  device dead, not answered yet, or its block older than max_age
                                       0B  GATEWAY TARGET DEVICE FAILED TO RESPOND, or the
                                           device's own exception code when it refuses that
                                           block (the poll's partial record says so too)
0B for an unknown unit is what pymodbus' server answers by default (GATEWAY_NO_RESPONSE) and
what a pass-through gateway such as mbusd ends up saying when nobody on the bus answers: a
SCADA scanning unit ids sees the same as behind a real gateway.
"""
from agent.modbus import pdu as _pdu
from agent.modbus import tcp

#: outcome names (the service's counters), besides "ok"
OK = "ok"
EXC_ILLEGAL_FUNCTION = 1
EXC_ILLEGAL_ADDRESS = 2
EXC_ILLEGAL_VALUE = 3
EXC_TARGET_FAILED = 11

_READ_PDU_LENGTH = 5   # fc, address, count


class Target:
    """One device served under a gateway unit: its planned blocks, indexed once per table, and
    a view of its liveness. `device`: agent.device.Device (requests, blocks); `state`: the
    loop's DeviceState (schedule.dead) or None; `max_age`: seconds a block may be old."""

    __slots__ = ("device", "state", "max_age", "spans")

    def __init__(self, device, state=None, max_age=None):
        self.device = device
        self.state = state
        self.max_age = max_age if max_age is not None else default_max_age(device)
        spans = {}
        for i, r in enumerate(device.requests):
            spans.setdefault(r.function, []).append((r.address, r.address + r.count, i))
        for lst in spans.values():
            lst.sort()
        self.spans = spans

    @property
    def dead(self):
        st = self.state
        return st is not None and st.schedule.dead

    def cover(self, function, address, end):
        """Indexes of planned requests that together cover [address, end) in `function`'s
        table (greedy: each step the block reaching furthest), or None."""
        spans = self.spans.get(function)
        if not spans:
            return None
        pos, out = address, []
        while pos < end:
            best = None
            for a, e, i in spans:
                if a > pos:
                    break
                if e > pos and (best is None or e > best[0]):
                    best = (e, i)
            if best is None:
                return None
            out.append(best[1])
            pos = best[0]
        return out


def default_max_age(device):
    """A cached block is served while younger than this: three intervals (two missed polls)."""
    return 3.0 * device.interval


def exception_adu(tid, unit, function, code):
    return tcp.build_adu(tid, unit, bytes(((function | _pdu.EXCEPTION_BIT) & 0xFF, code)))


def respond(tid, unit, pdu, units, now):
    """-> (answer ADU, outcome: OK or the exception code). `units`: {unit id: [Target]};
    `now`: time.monotonic() (the blocks' clock)."""
    fc = pdu[0]
    targets = units.get(unit)
    if not targets:
        return exception_adu(tid, unit, fc, EXC_TARGET_FAILED), EXC_TARGET_FAILED
    if fc not in _pdu.READ_FUNCTIONS:
        return exception_adu(tid, unit, fc, EXC_ILLEGAL_FUNCTION), EXC_ILLEGAL_FUNCTION
    if len(pdu) != _READ_PDU_LENGTH:
        return exception_adu(tid, unit, fc, EXC_ILLEGAL_VALUE), EXC_ILLEGAL_VALUE
    address = (pdu[1] << 8) | pdu[2]
    count = (pdu[3] << 8) | pdu[4]
    if not 1 <= count <= _pdu.READ_MAX[fc]:
        return exception_adu(tid, unit, fc, EXC_ILLEGAL_VALUE), EXC_ILLEGAL_VALUE
    end = address + count
    if end > 0x10000:
        return exception_adu(tid, unit, fc, EXC_ILLEGAL_ADDRESS), EXC_ILLEGAL_ADDRESS
    outcome = EXC_ILLEGAL_ADDRESS
    for target in targets:
        idx = target.cover(fc, address, end)
        if idx is None:
            continue
        data, outcome = _data(target, idx, fc, address, count, end, now)
        if data is not None:
            return tcp.build_adu(tid, unit, bytes((fc, len(data))) + data), OK
    return exception_adu(tid, unit, fc, outcome), outcome


def _data(target, idx, fc, address, count, end, now):
    """(data bytes, OK) from the blocks `idx` of `target`, or (None, exception code)."""
    if target.dead:
        return None, EXC_TARGET_FAILED
    blocks = target.device.blocks
    got = [blocks[i] if i < len(blocks) else None for i in idx]
    if None in got:
        # not answered since the agent started: the device's own refusal if it refuses it
        return None, _refusal(target, idx) or EXC_TARGET_FAILED
    t = got[0][4]
    if any(b[4] != t for b in got):
        return None, EXC_ILLEGAL_ADDRESS    # blocks of different polls: not one reading
    if now - t > target.max_age:
        return None, _refusal(target, idx) or EXC_TARGET_FAILED
    if len(got) == 1:
        _f, a, c, data, _t = got[0]
        if a == address and c == count:
            return data, OK                 # the device's own bytes, padding bits included
    if fc >= _pdu.READ_HOLDING_REGISTERS:
        parts, pos = [], address
        for _f, a, c, data, _t in got:
            stop = min(end, a + c)
            parts.append(data[(pos - a) << 1:(stop - a) << 1])
            pos = stop
        return b"".join(parts), OK
    out = bytearray(_pdu.bit_bytes(count))
    pos = address
    for _f, a, c, data, _t in got:
        stop = min(end, a + c)
        for n in range(pos, stop):
            k = n - a
            if data[k >> 3] >> (k & 7) & 1:
                j = n - address
                out[j >> 3] |= 1 << (j & 7)
        pos = stop
    return bytes(out), OK


def _refusal(target, idx):
    """The exception code the device answers one of these blocks with (the loop's
    DeviceState.refused, kept while the device refuses it), or None: a block a device
    refuses gets the device's own word for it, not "no answer"."""
    refused = getattr(target.state, "refused", None)
    if not refused:
        return None
    reqs = target.device.requests
    for i in idx:
        r = reqs[i]
        code = refused.get((r.function, r.address, r.count))
        if code is not None:
            return code
    return None


def split_requests(buf):
    """Complete request ADUs at the start of `buf` -> ([(tid, unit, pdu)], bytes used).
    Raises agent.modbus.errors.FrameError when the MBAP header cannot be one (protocol id not 0,
    length out of range): the stream is out of sync and the connection should be closed."""
    out, pos, n = [], 0, len(buf)
    while n - pos >= tcp.MBAP_LENGTH:
        tid, length, unit = tcp.parse_header(buf[pos:pos + tcp.MBAP_LENGTH])
        stop = pos + 6 + length
        if stop > n:
            break
        out.append((tid, unit, bytes(buf[pos + tcp.MBAP_LENGTH:stop])))
        pos = stop
    return out, pos
