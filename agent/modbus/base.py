"""The clients' shared base: the public read/write methods, argument checks, stats, back-off.

Subclasses (`tcp_client.TcpClient`, `rtu_client.RtuClient`, `rtu_client.RtuOverTcpClient`)
move the bytes: `_connect`, `_close`, `_where`, `_read` (FC 01-04, the hot path) and
`_exchange_pdu` (any other request). The rules they follow are in `agent.modbus.client`.

Each also declares itself as a transport (`agent.modbus.transport`): its connection `TYPE`,
whether its devices sit on an RTU bus (`SERIAL`), the [connection] keys it takes (`KEYS`),
how it is made from a connection's settings (`from_settings`), how the connection is named
in messages (`describe`) and the bus time of a poll cycle (`bus_time`, for `check`).
"""
import time

from agent.modbus import pdu as _pdu
from agent.modbus.errors import (
    ConnectionLost,
    CRCError,
    DeviceError,
    FrameError,
    InvalidRequest,
    ModbusError,
    ModbusTimeout,
)

_monotonic = time.monotonic

STAT_KEYS = ("requests", "timeouts", "crc_errors", "frame_errors", "exceptions", "reconnects",
             "stale_discarded", "connection_errors", "resyncs")
_STAT_FOR = {
    ModbusTimeout: "timeouts",
    CRCError: "crc_errors",
    FrameError: "frame_errors",
    DeviceError: "exceptions",
    ConnectionLost: "connection_errors",
    InvalidRequest: None,
}
#: spec quantity limits of the reads, for the fast argument check in `read`
_READ_MAX = _pdu.READ_MAX

# bus-time estimate (`check`), not timeouts:
#: allowance per request for an RTU device to start answering (RTU slaves typically need a
#: few ms; many meters 10-20 ms)
RTU_TURNAROUND = 0.010
#: allowance per request on a TCP link (round trip plus the device's processing)
TCP_ALLOWANCE = 0.005


def _check_unit(unit):
    if not isinstance(unit, int) or not 0 <= unit <= 255:
        raise InvalidRequest(f"unit id must be 0..255, not {unit!r}")


class Client:
    """Request building, validation, stats, back-off; subclasses move the bytes."""

    #: consecutive timeouts after which the link is closed, to be reopened by the next call.
    #: On a socket a half-open link (gateway rebooted, NAT entry or Wi-Fi gone, no FIN) only
    #: shows as silence, and TCP itself gives up only after many minutes. None: never (a serial
    #: port, where reopening proves nothing).
    close_after_timeouts = None

    #: How long after a failed connect the next call fails at once, without touching the network.
    #: None (a script, `poll`, `probe`: no schedule of its own): the whole reconnect back-off
    #: window. The agent's loop sets a short hold instead (agent.loop.LINK_DOWN_HOLD): its device
    #: schedule (agent.schedule.DeviceSchedule) owns the only back-off of each device/connection
    #: pair and decides when a request goes out; two back-offs stacked refused the very probes the
    #: schedule had chosen ("backing off ..., next try in 0.0 s"). No hold at all made every
    #: device behind one dead gateway wait out its own connect timeout in the same sweep (ten
    #: units x 1 s froze the loop for 10 s): within the hold they learn the link is down at once.
    down_hold = None

    # --- the transport declaration (agent.modbus.transport) ---------------------------------

    #: the [connection] `type` this client speaks
    TYPE = None
    #: its devices sit on an RTU bus (units 1..247; the bus time is the line's)
    SERIAL = False
    #: the [connection] keys it takes (agent.modbus.keys.Key)
    KEYS = ()

    @classmethod
    def from_settings(cls, settings):
        """A client for a connection: `settings` has every key in KEYS as an attribute."""
        raise NotImplementedError

    @classmethod
    def _on_socket(cls, s):
        """A client on the TCP socket a connection's settings name (TcpClient, RtuOverTcpClient)."""
        return cls(s.host, port=s.port, timeout=s.timeout, connect_timeout=s.connect_timeout,
                   pause=s.pause, backoff_max=s.backoff_max)

    @classmethod
    def describe(cls, settings):
        """The connection in messages and `check`: "tcp 10.0.0.5:502"."""
        return "%s %s:%s" % (cls.TYPE, settings.host, settings.port)

    @classmethod
    def bus_time(cls, settings, reads):
        """Bus use of `reads` [(function, count)] -> {"requests", "bytes", "seconds"}."""
        raise NotImplementedError

    @staticmethod
    def _bus_time(reads, request_length, response_length, char_time, per_request):
        """Bytes and seconds of `reads`: each read costs its request and response bytes at
        `char_time` each, plus `per_request` seconds (silences, turnaround, pause)."""
        nbytes = 0
        seconds = 0.0
        for function, count in reads:
            n = request_length + response_length(function, count)
            nbytes += n
            seconds += n * char_time + per_request
        return {"requests": len(reads), "bytes": nbytes, "seconds": seconds}

    # --- instances -----------------------------------------------------------------------

    def __init__(self, timeout, pause, backoff_min, backoff_max):
        self.timeout = float(timeout)
        self.pause = float(pause or 0.0)
        self.backoff_min = float(backoff_min)
        self.backoff_max = float(backoff_max)
        self.stats = dict.fromkeys(STAT_KEYS, 0)
        self._failures = 0          # consecutive connection failures (drives the back-off)
        self._down_until = 0.0      # monotonic time before which we do not reconnect
        self._lost_at = 0.0         # monotonic time the link last failed
        self._connected_once = False
        self._last_end = 0.0        # monotonic end of the last exchange (pause, RTU silence)
        self._timeouts = 0          # consecutive timeouts (a half-open link shows as these)

    # --- public API ------------------------------------------------------------------------

    def read(self, unit, function, address, count):
        """FC 01-04: the response's data bytes as on the wire."""
        try:
            ok = (function in _READ_MAX and 0 < count <= _READ_MAX[function]
                  and address >= 0 and address + count <= 0x10000 and 0 <= unit <= 255)
        except TypeError:
            ok = False
        if not ok:
            self._invalid(unit, function, address, count)
        self.stats["requests"] += 1
        try:
            return self._read(unit, function, address, count)
        except ModbusError as e:
            self._count_failure(e, unit, function, address, count)
            raise

    def write_coil(self, unit, address, value):
        """FC 05."""
        return self._request(unit, _pdu.WRITE_SINGLE_COIL, address, value, 1, value)

    def write_register(self, unit, address, value):
        """FC 06."""
        return self._request(unit, _pdu.WRITE_SINGLE_REGISTER, address, value, 1, value)

    def write_coils(self, unit, address, values):
        """FC 15."""
        values = list(values)
        return self._request(unit, _pdu.WRITE_MULTIPLE_COILS, address, values, len(values))

    def write_registers(self, unit, address, values):
        """FC 16."""
        values = list(values)
        return self._request(unit, _pdu.WRITE_MULTIPLE_REGISTERS, address, values, len(values))

    def read_device_identification(self, unit, read_code=_pdu.READ_BASIC, object_id=0):
        """FC 43 / MEI 14, one answer: a pdu.Identification (objects from `object_id` on)."""
        return self._request(unit, _pdu.ENCAPSULATED_INTERFACE, object_id, read_code, None,
                             read_code)

    def identify(self, unit, regular=True):
        """The device's identification (FC 43 / MEI 14): {"conformity": level, "objects":
        {name: text}}. The basic objects (vendor name, product code, revision), then the
        regular ones when the device claims them (conformity 2 or 3; a refusal of those keeps
        the basic ones), each stream followed through its "more follows" answers.
        DeviceError (usually 1 ILLEGAL FUNCTION) when the device does not speak it."""
        first = self.read_device_identification(unit, _pdu.READ_BASIC)
        objects = {}
        self._follow(unit, _pdu.READ_BASIC, first, objects)
        if regular and first.conformity & 0x7F >= _pdu.READ_REGULAR:
            try:
                self._follow(unit, _pdu.READ_REGULAR, None, objects)
            except DeviceError:
                pass    # claims regular, refuses it: what the basic stream gave stands
        names = dict(_pdu.object_text(oid, value) for oid, value in sorted(objects.items()))
        return {"conformity": first.conformity, "objects": names}

    #: answers followed per stream at most (a device whose "next object id" never ends)
    MAX_IDENT_ANSWERS = 16

    def _follow(self, unit, read_code, answer, objects):
        object_id = 0
        for _ in range(self.MAX_IDENT_ANSWERS):
            if answer is None:
                answer = self.read_device_identification(unit, read_code, object_id)
            for oid, value in answer.objects:
                objects.setdefault(oid, value)
            if not answer.more:
                return
            if answer.next_id <= object_id:
                raise FrameError("'more follows' without a further object id", unit=unit,
                                 function=_pdu.ENCAPSULATED_INTERFACE,
                                 expected=f"next object id above {object_id}",
                                 got=f"next object id {answer.next_id}")
            object_id, answer = answer.next_id, None
        raise FrameError("'more follows' in every answer", unit=unit,
                         function=_pdu.ENCAPSULATED_INTERFACE,
                         expected=f"the last object within {self.MAX_IDENT_ANSWERS} answers")

    def close(self):
        self._close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- shared machinery ----------------------------------------------------------------

    def _count_failure(self, e, unit, function, address, count):
        """Count a failed exchange in `stats` and give its error the request's context."""
        key = _STAT_FOR.get(type(e), "frame_errors")
        if key:
            self.stats[key] += 1
        e.with_context(unit=unit, function=function, address=address, count=count)

    def _invalid(self, unit, function, address, count):
        try:
            if function not in _READ_MAX:
                raise InvalidRequest(f"function code {function!r} is not a read (01-04)")
            _check_unit(unit)
            _pdu.function(function).build(address, count)
            raise InvalidRequest("invalid request")  # pragma: no cover - build raised
        except InvalidRequest as e:
            raise e.with_context(unit=unit, function=function, address=address, count=count) from None

    def _request(self, unit, code, address, payload, count, value=None):
        fn = _pdu.FUNCTIONS[code]
        try:
            _check_unit(unit)
            request_pdu = fn.build(address, payload)
        except InvalidRequest as e:
            raise e.with_context(unit=unit, function=code, address=address, count=count) from None
        self.stats["requests"] += 1
        try:
            return self._exchange_pdu(unit, fn, request_pdu, address, count, value)
        except ModbusError as e:
            self._count_failure(e, unit, code, address, count)
            raise

    def _open(self, connect_timeout=None):
        """Connect (lazily), honouring the back-off window (or only `down_hold` of it)."""
        now = _monotonic()
        if now < self._down_until:
            if self.down_hold is None:
                raise ConnectionLost("%s: backing off after %d failed attempt(s), next try in %.1f s"
                                     % (self._where(), self._failures, self._down_until - now))
            if now - self._lost_at < self.down_hold:
                raise ConnectionLost("%s: link down: a connect failed %.2f s ago"
                                     % (self._where(), now - self._lost_at))
        try:
            if connect_timeout is None:
                self._connect()
            else:
                self._connect(connect_timeout)
        except ConnectionLost:
            self._lost()
            raise
        if self._connected_once:
            self.stats["reconnects"] += 1
        self._connected_once = True

    def _lost(self):
        """The link failed: close it and open the next back-off window."""
        self._close()
        self._failures += 1
        delay = min(self.backoff_min * (2 ** min(self._failures - 1, 30)), self.backoff_max)
        self._lost_at = _monotonic()
        self._down_until = self._lost_at + delay

    def _timed_out(self):
        """Count a timeout; close the link after `close_after_timeouts` in a row."""
        self._timeouts += 1
        if self.close_after_timeouts and self._timeouts >= self.close_after_timeouts:
            # maybe a half-open link: the next call opens a fresh one (and needs as many
            # timeouts again before it is dropped, so a dead device is not a reconnect storm)
            self._timeouts = 0
            self._close()

    def _wait_gap(self, gap):
        wait = self._last_end + gap - _monotonic()
        if wait > 0:
            time.sleep(wait)
