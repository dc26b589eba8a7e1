#!/usr/bin/env python3
"""Modbus device simulator: a site to point the agent at, with faults on cue.

Serves Modbus TCP, RTU on a pseudo-terminal (the slave path is printed) and optionally
RTU-over-TCP, Modbus ASCII on a second pseudo-terminal and ASCII-over-TCP. The answer PDUs are computed by umodbus (an implementation we did not write:
the agent is always tested against a peer of its own making); this module owns the socket
and pty loops so that it can mangle the bytes on the way out.

Devices, one per unit id, the same unit ids on every transport:
  meter    three-phase energy meter, input registers, float32 CDAB (word-swapped):
           0 voltage_l1  2 voltage_l2  4 voltage_l3  6 current_l1  8 current_l2  10 current_l3
           12 power_l1  14 power_l2  16 power_l3  18 power_total  20 power_factor
           22 frequency  24 energy_import (kWh, only increases)
  plc      coils 0-15 (0 running, 1 alarm, 2 blinker), discrete inputs 0-7,
           holding int16: 0 temperature x10, 1 setpoint x10 (writable), 2 pressure x100,
           3 counter (uint16, +1/s), 4 level (int16, negative half the time), 5-19 writable;
           input registers 0-9: uptime_s (uint32 ABCD at 0), 2 cycle_ms
  generic  N holding registers that change every second (reg i = (second + i) mod 65536);
           for load tests

A unit id with no device behind it never answers (RTU and TCP alike, like a gateway without
gateway exceptions). On the serial lines (ptys) a device given a baud rate (`KIND:UNIT@BAUD`)
answers only while the port is set to that rate (read from the pty's termios: the rate the
master opened it with), as a device at another rate would see only garbage.

Read device identification (FC 43 / MEI 14, answered here: umodbus does not speak it): the meter
answers basic and regular objects, two objects per answer so that "more follows" is used; the
plc and generic devices answer exception 1 (ILLEGAL FUNCTION), as devices without it do.

Faults (per unit; see Simulator.set_fault): delay, silence, exception, crc, truncate,
garbage, drop, reset, gone. Server-wide: down (the TCP listeners close, connections are
refused, then they come back on the same ports).

Command line:
  tools/simulator.py [serve] --tcp 5020 --rtu --meter 1 --plc 2 --control 5099
  tools/simulator.py serve --ascii --ascii-tcp 5021 --device meter:1@9600 --device plc:7@19200
  tools/simulator.py ctl 127.0.0.1:5099 fault 1 silence --duration 10
  tools/simulator.py ctl 127.0.0.1:5099 clear [UNIT]
  tools/simulator.py ctl 127.0.0.1:5099 down 5
  tools/simulator.py ctl 127.0.0.1:5099 stats
The control port speaks one JSON object per line each way, e.g.
  {"cmd": "fault", "unit": 1, "kind": "exception", "code": 6, "count": 3}  ->  {"ok": true}
"""
import argparse
import json
import math
import os
import random
import select
import socket
import struct
import sys
import threading
import time
import tty

from umodbus.client.serial.redundancy_check import get_crc
from umodbus.exceptions import IllegalDataAddressError, ServerDeviceFailureError
from umodbus.exceptions import ModbusError as UModbusError
from umodbus.functions import create_function_from_request_pdu
from umodbus.route import Map
from umodbus.utils import pack_exception_pdu

FAULT_KINDS = {
    "delay": "answer after `seconds` (default 1.0)",
    "silence": "no answer at all (the client times out)",
    "exception": "exception response with `code` (default 4; 6 = busy)",
    "crc": "RTU: wrong CRC; TCP: wrong protocol id (the frame is rejected either way)",
    "truncate": "send only the first half of the answer",
    "garbage": "append bytes after the answer",
    "drop": "TCP: close the connection instead of answering (RTU: silence)",
    "reset": "TCP: reset the connection (RST) instead of answering (RTU: silence)",
    "gone": "the unit has disappeared: silence until the fault ends, then it is back",
    "fuzz": "random bytes instead of the answer; half the time a random PDU in a valid frame",
}

# Which store a function code reads or writes (Modbus Application Protocol V1.1b3, 6.1-6.12).
TABLE_BY_FC = {1: "coils", 2: "discrete", 3: "holding", 4: "input",
               5: "coils", 6: "holding", 15: "coils", 16: "holding"}


# --------------------------------------------------------------------------- devices

def _float_cdab(x):
    """float32 -> two registers in CDAB order (low word first), as many meters send them."""
    hi, lo = struct.unpack(">HH", struct.pack(">f", x))
    return lo, hi


class Device:
    """Register tables of one unit. `update(now)` moves the values; endpoint() is what
    umodbus's route map calls for every address of a request."""

    kind = "device"
    #: FC 43 / MEI 14 objects {object id: text}; empty: the device does not speak it
    identity = {}
    #: objects per identification answer (more follow in the next one)
    ident_per_answer = 2
    #: the only baud rate it answers at on a serial line (None: any)
    baud = None

    def __init__(self, seed=0):
        self.rng = random.Random(seed)
        self.coils, self.discrete, self.holding, self.input = {}, {}, {}, {}
        self.lock = threading.Lock()

    def update(self, now):
        pass

    def endpoint(self, slave_id, function_code, address, value=None):
        store = getattr(self, TABLE_BY_FC[function_code])
        if address not in store:
            raise IllegalDataAddressError()
        if value is None and function_code not in (5, 6, 15, 16):
            return store[address]
        if function_code in (5, 15):
            value = 1 if value else 0
        store[address] = value & 0xFFFF
        return None

    def points(self):
        """{name: (table, address, type)} for building configs and checking values."""
        return {}


class EnergyMeter(Device):
    """Three-phase meter: ~230 V with noise, load currents that wander, power = V*I*pf,
    an energy register that only increases."""

    kind = "meter"
    identity = {0: "Simulated Meters Ltd", 1: "SM-3P-CDAB", 2: "1.4.2",
                3: "https://example.invalid/sm3p", 4: "Three-phase energy meter",
                5: "SM3P-100A", 6: "modbus-agent simulator"}
    NAMES = ["voltage_l1", "voltage_l2", "voltage_l3", "current_l1", "current_l2", "current_l3",
             "power_l1", "power_l2", "power_l3", "power_total", "power_factor", "frequency",
             "energy_import"]

    def __init__(self, seed=0, energy=12345.6):
        super().__init__(seed)
        self.energy = energy  # kWh
        self.t_last = None
        self.phase = [self.rng.uniform(0, 6.28) for _ in range(3)]
        self.values = {}
        self.update(time.time())

    def update(self, now):
        rng, v = self.rng, {}
        for k in range(3):
            volts = 230.0 + 2.0 * math.sin(now / 60.0 + self.phase[k]) + rng.gauss(0, 0.3)
            amps = max(0.0, 8.0 + 4.0 * math.sin(now / 300.0 + self.phase[k]) + rng.gauss(0, 0.2))
            v["voltage_l%d" % (k + 1)] = volts
            v["current_l%d" % (k + 1)] = amps
        pf = 0.92 + 0.03 * math.sin(now / 120.0)
        total = 0.0
        for k in range(1, 4):
            p = v["voltage_l%d" % k] * v["current_l%d" % k] * pf
            v["power_l%d" % k] = p
            total += p
        v["power_total"] = total
        v["power_factor"] = pf
        v["frequency"] = 50.0 + 0.02 * math.sin(now / 30.0) + rng.gauss(0, 0.005)
        if self.t_last is not None and now > self.t_last:
            self.energy += total * (now - self.t_last) / 3.6e6
        self.t_last = now if self.t_last is None else max(self.t_last, now)
        v["energy_import"] = self.energy
        self.values = v
        for i, name in enumerate(self.NAMES):
            lo, hi = _float_cdab(v[name])
            self.input[2 * i] = lo
            self.input[2 * i + 1] = hi

    def points(self):
        return {name: ("input", 2 * i, "float32 CDAB") for i, name in enumerate(self.NAMES)}


class Plc(Device):
    """A small PLC: coils, discrete inputs, int16 holding registers (some negative)."""

    kind = "plc"

    def __init__(self, seed=0):
        super().__init__(seed)
        self.t0 = time.time()
        for a in range(16):
            self.coils[a] = 0
        self.coils[0] = 1
        for a in range(8):
            self.discrete[a] = a % 2
        for a in range(20):
            self.holding[a] = 0
        self.holding[1] = 220
        for a in range(10):
            self.input[a] = 0
        self.update(self.t0)

    def update(self, now):
        rng = self.rng
        up = max(0, int(now - self.t0))
        self.coils[2] = int(now) // 5 % 2
        self.discrete[0] = int(now) // 3 % 2
        temp = int(round(215 + 15 * math.sin(now / 90.0) + rng.gauss(0, 2)))
        self.holding[0] = temp & 0xFFFF
        self.holding[2] = int(round(150 + 20 * math.sin(now / 45.0))) & 0xFFFF
        self.holding[3] = up & 0xFFFF
        self.holding[4] = int(round(50 * math.sin(now / 20.0))) & 0xFFFF
        self.input[0], self.input[1] = (up >> 16) & 0xFFFF, up & 0xFFFF
        self.input[2] = rng.randint(8, 12)
        self.coils[1] = 1 if temp > 235 else 0

    def points(self):
        return {"running": ("coil", 0, "bool"), "alarm": ("coil", 1, "bool"),
                "blinker": ("coil", 2, "bool"), "door": ("discrete", 0, "bool"),
                "temperature": ("holding", 0, "int16 scale=0.1"),
                "setpoint": ("holding", 1, "int16 scale=0.1"),
                "pressure": ("holding", 2, "int16 scale=0.01"),
                "counter": ("holding", 3, "uint16"), "level": ("holding", 4, "int16"),
                "uptime": ("input", 0, "uint32")}


class Generic(Device):
    """N holding registers, all changing once a second: cheap to serve, for load tests."""

    kind = "generic"

    def __init__(self, seed=0, registers=100):
        super().__init__(seed)
        self.n = registers
        self.second = None
        self.update(time.time())

    def update(self, now):
        s = int(now)
        if s != self.second:
            self.second = s
            for a in range(self.n):
                self.holding[a] = (s + a) & 0xFFFF

    def points(self):
        return {"r%d" % a: ("holding", a, "uint16") for a in range(self.n)}


DEVICE_KINDS = {"meter": EnergyMeter, "plc": Plc, "generic": Generic}


# --------------------------------------------------------------------------- faults

class Fault:
    __slots__ = ("kind", "until", "remaining", "seconds", "code")

    def __init__(self, kind, until, remaining, seconds, code):
        self.kind, self.until, self.remaining = kind, until, remaining
        self.seconds, self.code = seconds, code


def rtu_request_length(buf):
    """Length of the RTU request ADU that starts `buf` (unit, PDU, CRC), None when more
    bytes are needed to tell, 0 for a function code whose size we do not know (the frame
    then ends at the next silence, as the spec's 3.5-character rule says)."""
    if len(buf) < 2:
        return None
    fc = buf[1]
    if fc in (1, 2, 3, 4, 5, 6):
        return 8
    if fc in (15, 16):
        return None if len(buf) < 7 else 9 + buf[6]
    return 0


def crc_ok(frame):
    return len(frame) >= 4 and get_crc(frame[:-2]) == frame[-2:]


# --------------------------------------------------------------------------- the server

class Simulator:
    """Modbus slaves on TCP, an RTU pty and RTU-over-TCP, with per-unit fault injection.

        sim = Simulator({1: EnergyMeter(), 2: Plc()}, tcp=0, rtu=True)
        sim.start(); sim.tcp_port; sim.rtu_path
        sim.set_fault(1, "silence", duration=5)
        sim.stop()
    """

    def __init__(self, devices, host="127.0.0.1", tcp=0, rtu=False, rtu_tcp=None, control=None,
                 log=None, ascii=False, ascii_tcp=None):
        self.devices = dict(devices)
        self.host = host
        self.tcp_port, self.rtu_tcp_port, self.control_port = tcp, rtu_tcp, control
        self.want_rtu = rtu
        self.rtu_path = None
        self.want_ascii, self.ascii_tcp_port, self.ascii_path = ascii, ascii_tcp, None
        self._ascii_pty = None
        self.log = log or (lambda msg: None)
        self.route_map = Map()
        for unit, dev in self.devices.items():
            self.route_map.add_rule(dev.endpoint, [unit], None, None)
        self._faults = {}
        self._fuzz_rng = random.Random(0)
        self._flock = threading.Lock()
        self._stats = {}
        self._stop = threading.Event()
        self._threads = []
        self._listeners = {}   # name -> socket (tcp, rtu_tcp)
        self._conns = set()
        self._controls = set()
        self._conn_lock = threading.Lock()    # listeners, connections, down state
        self._down_until = 0.0
        self._pty = None

    # -- lifecycle

    def start(self):
        if self.tcp_port is not None:
            self.tcp_port = self._listen("tcp", self.tcp_port)
        if self.rtu_tcp_port is not None:
            self.rtu_tcp_port = self._listen("rtu_tcp", self.rtu_tcp_port)
        if self.want_rtu:
            master, slave = os.openpty()
            tty.setraw(master)
            tty.setraw(slave)
            # The slave stays open here too: when the agent closes it, reading the master
            # would otherwise fail with EIO until somebody opens it again.
            self._pty = (master, slave)
            self.rtu_path = os.ttyname(slave)
            self._spawn(self._rtu_loop, master)
        if self.ascii_tcp_port is not None:
            self.ascii_tcp_port = self._listen("ascii_tcp", self.ascii_tcp_port)
        if self.want_ascii:
            master, slave = os.openpty()
            tty.setraw(master)
            tty.setraw(slave)
            self._ascii_pty = (master, slave)
            self.ascii_path = os.ttyname(slave)
            self._spawn(self._ascii_loop, master)
        self._spawn(self._accept_loop)
        if self.control_port is not None:
            self.control_port = self._listen("control", self.control_port)
        return self

    def stop(self):
        self._stop.set()
        with self._conn_lock:
            for s in list(self._listeners.values()) + list(self._conns) + list(self._controls):
                _close(s)
            self._listeners.clear()
            self._conns.clear()
        for t in self._threads:
            t.join(timeout=2.0)
        for pty in (self._pty, self._ascii_pty):
            for fd in pty or ():
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._pty = self._ascii_pty = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _spawn(self, fn, *args):
        self._threads = [t for t in self._threads if t.is_alive()]
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        self._threads.append(t)
        return t

    def _listen(self, name, port):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, port))
        s.listen(16)
        with self._conn_lock:
            self._listeners[name] = s
        return s.getsockname()[1]

    # -- fault API

    def set_fault(self, unit, kind, duration=None, count=None, seconds=None, code=None):
        """Inject a fault on `unit` (None: every unit) for `duration` seconds and/or the next
        `count` requests (neither: until clear_fault). Kinds: see FAULT_KINDS."""
        if kind not in FAULT_KINDS:
            raise ValueError("unknown fault kind %r; one of %s" % (kind, ", ".join(FAULT_KINDS)))
        until = None if duration is None else time.monotonic() + float(duration)
        f = Fault(kind, until, None if count is None else int(count),
                  1.0 if seconds is None else float(seconds), 4 if code is None else int(code))
        with self._flock:
            self._faults[unit] = f
        self.log("fault unit=%s %s duration=%s count=%s" % (unit, kind, duration, count))

    def clear_fault(self, unit=None, all_units=True):
        with self._flock:
            if unit is None and all_units:
                self._faults.clear()
            else:
                self._faults.pop(unit, None)

    def set_down(self, duration):
        """Close the TCP listeners and every connection; reopen on the same ports after
        `duration` seconds (meanwhile connections are refused)."""
        with self._conn_lock:
            self._down_until = time.monotonic() + float(duration)
            for name in ("tcp", "rtu_tcp", "ascii_tcp"):
                _close(self._listeners.pop(name, None))
            for c in list(self._conns):
                _close(c)
            self._conns.clear()
        self.log("down for %ss" % duration)

    def stats(self, unit=None):
        """Per-unit counters: requests, answered, and one counter per fault kind applied."""
        with self._flock:
            if unit is not None:
                return dict(self._stats.get(unit, {}))
            return {u: dict(s) for u, s in self._stats.items()}

    def _count(self, unit, key):
        s = self._stats.setdefault(unit, {})
        s[key] = s.get(key, 0) + 1

    def _take_fault(self, unit):
        with self._flock:
            self._count(unit, "requests")
            for key in (unit, None):
                f = self._faults.get(key)
                if f is None:
                    continue
                if f.until is not None and time.monotonic() >= f.until:
                    del self._faults[key]
                    continue
                if f.remaining is not None:
                    f.remaining -= 1
                    if f.remaining <= 0:
                        del self._faults[key]
                self._count(unit, f.kind)
                return f
            return None

    # -- one request

    def answer(self, unit, pdu, baud=None):
        """Request PDU -> (response PDU or None for silence, the fault applied or None).
        `baud`: the serial line's rate (None: not a serial line); a device set to another
        rate does not answer."""
        dev = self.devices.get(unit)
        if dev is None:
            return None, None  # nobody with that unit id on the bus
        if baud is not None and dev.baud is not None and dev.baud != baud:
            return None, None  # at another baud rate it sees garbage and stays silent
        fault = self._take_fault(unit)
        if fault is not None and fault.kind in ("silence", "gone", "drop", "reset"):
            return None, fault
        fc = pdu[0] if pdu else 0
        if fault is not None and fault.kind == "exception":
            return pack_exception_pdu(fc & 0x7F, fault.code), fault
        if fc == 43:
            resp = identify_answer(dev, pdu)
            with self._flock:
                self._count(unit, "answered")
            return resp, fault
        with dev.lock:
            dev.update(time.time())
            try:
                function = create_function_from_request_pdu(bytes(pdu))
                results = function.execute(unit, self.route_map)
                if fc in (1, 2, 3, 4):
                    resp = function.create_response_pdu(results)
                else:
                    resp = function.create_response_pdu()
            except UModbusError as e:
                resp = pack_exception_pdu(fc & 0x7F, e.error_code)
            except Exception:
                resp = pack_exception_pdu(fc & 0x7F, ServerDeviceFailureError.error_code)
        with self._flock:
            self._count(unit, "answered")
        return resp, fault

    def _mangle(self, adu, fault, rtu):
        """Apply byte-level faults to a framed answer. Returns the bytes to send."""
        if fault is None:
            return adu
        if fault.kind == "crc":
            if rtu:
                return adu[:-2] + bytes([adu[-2] ^ 0xFF, adu[-1] ^ 0x5A])
            return adu[:2] + b"\x00\x07" + adu[4:]  # protocol id must be 0
        if fault.kind == "truncate":
            return adu[:max(1, len(adu) // 2)]
        if fault.kind == "garbage":
            return adu + b"\xde\xad\xbe\xef"
        if fault.kind == "fuzz":
            rng = self._fuzz_rng
            if rng.random() < 0.5:
                return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 2 * len(adu))))
            pdu = bytes([adu[1] if rtu else adu[7]]) + bytes(
                rng.getrandbits(8) for _ in range(rng.randint(0, 60)))
            if rtu:
                return _rtu_frame(adu[0], pdu)
            return adu[:4] + struct.pack(">HB", len(pdu) + 1, adu[6]) + pdu
        return adu

    # -- TCP (MBAP) and RTU-over-TCP connections

    def _accept_loop(self):
        while not self._stop.is_set():
            with self._conn_lock:
                if self._down_until and time.monotonic() >= self._down_until:
                    self._down_until = 0.0
                    reopen = True
                else:
                    reopen = False
                socks = dict(self._listeners)
            if reopen:
                try:
                    if self.tcp_port is not None:
                        self._listen("tcp", self.tcp_port)
                    if self.rtu_tcp_port is not None:
                        self._listen("rtu_tcp", self.rtu_tcp_port)
                    if self.ascii_tcp_port is not None:
                        self._listen("ascii_tcp", self.ascii_tcp_port)
                    self.log("up again")
                except OSError as e:
                    self.log("cannot reopen: %s" % e)
                continue
            by_sock = {s: n for n, s in socks.items()}
            try:
                ready, _, _ = select.select(list(by_sock), [], [], 0.1)
            except (OSError, ValueError):
                time.sleep(0.05)
                continue
            for s in ready:
                try:
                    conn, _ = s.accept()
                except OSError:
                    continue
                name = by_sock[s]
                if name == "control":
                    with self._conn_lock:
                        self._controls.add(conn)
                    self._spawn(self._control_conn, conn)
                    continue
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with self._conn_lock:
                    self._conns.add(conn)
                self._spawn({"tcp": self._tcp_conn, "rtu_tcp": self._rtu_tcp_conn,
                             "ascii_tcp": self._ascii_tcp_conn}[name], conn)

    def _recv(self, conn):
        """Next chunk from a connection; b'' when it is closed or we are stopping."""
        while not self._stop.is_set():
            try:
                r, _, _ = select.select([conn], [], [], 0.2)
                if r:
                    return conn.recv(4096)
            except (OSError, ValueError):
                return b""
        return b""

    def _finish_conn(self, conn, reset=False):
        with self._conn_lock:
            self._conns.discard(conn)
        _close(conn, shutdown=not reset)

    def _tcp_conn(self, conn):
        buf = b""
        try:
            while True:
                while len(buf) < 7 or len(buf) < 6 + struct.unpack(">H", buf[4:6])[0]:
                    if len(buf) >= 6 and not 2 <= struct.unpack(">H", buf[4:6])[0] <= 254:
                        return  # out of sync: a real device would drop the connection too
                    chunk = self._recv(conn)
                    if not chunk:
                        return
                    buf += chunk
                n = 6 + struct.unpack(">H", buf[4:6])[0]
                adu, buf = buf[:n], buf[n:]
                tid, unit = adu[:2], adu[6]
                pdu, fault = self.answer(unit, adu[7:])
                if not self._respond_tcp(conn, fault, pdu, lambda p, u=unit, t=tid: (
                        t + b"\x00\x00" + struct.pack(">HB", len(p) + 1, u) + p), rtu=False):
                    return
        finally:
            self._finish_conn(conn)

    def _rtu_tcp_conn(self, conn):
        buf = b""
        try:
            while True:
                chunk = self._recv(conn)
                if not chunk:
                    return
                buf += chunk
                while True:
                    n = rtu_request_length(buf)
                    if n is None or n == 0 or len(buf) < n:
                        if n == 0:
                            buf = b""  # unknown function code on a stream: resync by dropping
                        break
                    frame, buf = buf[:n], buf[n:]
                    if not crc_ok(frame):
                        buf = b""
                        break
                    unit = frame[0]
                    pdu, fault = self.answer(unit, frame[1:-2])
                    if not self._respond_tcp(conn, fault, pdu, lambda p, u=unit: _rtu_frame(u, p),
                                             rtu=True):
                        return
        finally:
            self._finish_conn(conn)

    def _respond_tcp(self, conn, fault, pdu, frame, rtu):
        """Send an answer on a connection honouring the fault; False to close it."""
        if fault is not None and fault.kind == "drop":
            return False
        if fault is not None and fault.kind == "reset":
            try:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            with self._conn_lock:
                self._conns.discard(conn)
            _close(conn, shutdown=False)  # linger 0 + close = RST, not FIN
            return False
        if pdu is None:
            return True
        if fault is not None and fault.kind == "delay" and self._stop.wait(fault.seconds):
            return False
        try:
            conn.sendall(self._mangle(frame(pdu), fault, rtu))
        except OSError:
            return False
        return True

    # -- RTU on the pty

    def _rtu_loop(self, fd):
        buf = b""
        while not self._stop.is_set():
            try:
                r, _, _ = select.select([fd], [], [], 0.05)
            except (OSError, ValueError):
                return
            if not r:
                # Silence: whatever is buffered is a frame of unknown size or line noise.
                if buf:
                    if crc_ok(buf):
                        self._rtu_answer(fd, buf)
                    buf = b""
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.05)
                continue
            buf += chunk
            while buf:
                n = rtu_request_length(buf)
                if not n or len(buf) < n:
                    break
                frame, buf = buf[:n], buf[n:]
                if not crc_ok(frame):
                    buf = b""  # resync at the next silence, as a real slave does
                    break
                self._rtu_answer(fd, frame)

    def _rtu_answer(self, fd, frame):
        unit = frame[0]
        if unit == 0:
            return  # broadcast: slaves never answer
        pdu, fault = self.answer(unit, frame[1:-2], line_baud(fd))
        if pdu is None:
            return
        if fault is not None and fault.kind == "delay" and self._stop.wait(fault.seconds):
            return
        out = self._mangle(_rtu_frame(unit, pdu), fault, rtu=True)
        try:
            os.write(fd, out)
        except OSError:
            pass

    # -- Modbus ASCII on the second pty and on ascii_tcp connections

    def _ascii_loop(self, fd):
        frames = AsciiFrames()
        while not self._stop.is_set():
            try:
                r, _, _ = select.select([fd], [], [], 0.05)
                if not r:
                    continue
                chunk = os.read(fd, 4096)
            except (OSError, ValueError):
                if self._stop.is_set():
                    return
                time.sleep(0.05)
                continue
            for unit, pdu in frames.feed(chunk):
                if unit == 0:
                    continue   # broadcast
                answer, fault = self.answer(unit, pdu, line_baud(fd))
                out = self._ascii_out(unit, answer, fault)
                if out:
                    try:
                        os.write(fd, out)
                    except OSError:
                        pass

    def _ascii_tcp_conn(self, conn):
        frames = AsciiFrames()
        try:
            while True:
                chunk = self._recv(conn)
                if not chunk:
                    return
                for unit, pdu in frames.feed(chunk):
                    answer, fault = self.answer(unit, pdu)
                    if fault is not None and fault.kind in ("drop", "reset"):
                        return
                    out = self._ascii_out(unit, answer, fault)
                    if out:
                        try:
                            conn.sendall(out)
                        except OSError:
                            return
        finally:
            self._finish_conn(conn)

    def _ascii_out(self, unit, pdu, fault):
        """The ASCII frame of an answer with the fault applied (None: silence)."""
        if pdu is None:
            return None
        if fault is not None and fault.kind == "delay" and self._stop.wait(fault.seconds):
            return None
        frame = ascii_frame(unit, pdu)
        if fault is None:
            return frame
        if fault.kind == "crc":       # a wrong LRC
            bad = (int(frame[-4:-2], 16) ^ 0x5A) & 0xFF
            return frame[:-4] + b"%02X" % bad + frame[-2:]
        if fault.kind == "truncate":
            return frame[:max(1, len(frame) // 2)]
        if fault.kind == "garbage":   # line noise around the answer
            return b"\x00\xffzz" + frame + b"#!"
        if fault.kind == "fuzz":
            rng = self._fuzz_rng
            if rng.random() < 0.5:
                return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, len(frame))))
            return ascii_frame(unit, bytes([pdu[0]]) + bytes(
                rng.getrandbits(8) for _ in range(rng.randint(0, 60))))
        return frame

    # -- control port

    def _control_conn(self, conn):
        f = conn.makefile("rwb")
        try:
            for line in f:
                try:
                    reply = self.control(json.loads(line))
                except Exception as e:  # a bad command must not kill the simulator
                    reply = {"ok": False, "error": str(e)}
                f.write(json.dumps(reply).encode() + b"\n")
                f.flush()
        except (OSError, ValueError):
            pass
        finally:
            with self._conn_lock:
                self._controls.discard(conn)
            _close(conn)

    def control(self, cmd):
        """One control command (a dict) -> reply dict. See the module docstring."""
        op = cmd.get("cmd")
        if op == "fault":
            self.set_fault(cmd.get("unit"), cmd["kind"], duration=cmd.get("duration"),
                           count=cmd.get("count"), seconds=cmd.get("seconds"), code=cmd.get("code"))
        elif op == "clear":
            self.clear_fault(cmd.get("unit"), all_units=cmd.get("unit") is None)
        elif op == "down":
            self.set_down(cmd.get("duration", 5))
        elif op == "stats":
            return {"ok": True, "stats": {str(u): s for u, s in self.stats().items()}}
        else:
            raise ValueError("unknown cmd %r; one of fault, clear, down, stats" % op)
        return {"ok": True}


def ascii_frame(unit, pdu):
    """Modbus ASCII frame: ':' + hex pairs of unit, PDU and LRC + CR LF (Serial Line 2.5.2)."""
    body = bytes([unit]) + bytes(pdu)
    return b":" + (body + bytes([-sum(body) & 0xFF])).hex().upper().encode() + b"\r\n"


class AsciiFrames:
    """Cuts ASCII request frames out of a character stream, as a slave does: ':' starts (and
    restarts) a frame, LF ends it; frames that are not hex or fail the LRC are dropped."""

    def __init__(self):
        self.buf = None

    def feed(self, chunk):
        out = []
        for c in chunk:
            if c == 0x3A:
                self.buf = bytearray()
            elif self.buf is not None:
                if c == 0x0A:
                    text, self.buf = bytes(self.buf).rstrip(b"\r"), None
                    try:
                        body = bytes.fromhex(text.decode("ascii"))
                    except ValueError:
                        continue
                    if len(body) >= 3 and -sum(body[:-1]) & 0xFF == body[-1]:
                        out.append((body[0], body[1:-1]))
                elif len(self.buf) > 600:
                    self.buf = None
                else:
                    self.buf.append(c)
        return out


def identify_answer(dev, pdu):
    """FC 43 / MEI 14 answer PDU of `dev` (Modbus Application Protocol 6.21): stream access
    (read codes 1 basic, 2 regular, 3 extended) from the object asked for, `ident_per_answer`
    objects per answer with "more follows"; code 4 one object. Exceptions as the spec says."""
    if not dev.identity:
        return pack_exception_pdu(43, 1)
    if len(pdu) != 4 or pdu[1] != 0x0E:
        return pack_exception_pdu(43, 3)
    code, first = pdu[2], pdu[3]
    if code not in (1, 2, 3, 4):
        return pack_exception_pdu(43, 3)
    ids = sorted(dev.identity)
    regular = any(3 <= i <= 6 for i in ids)
    conformity = 0x82 if regular else 0x81
    if code == 4:
        if first not in dev.identity:
            return pack_exception_pdu(43, 2)
        chosen, more, nxt = [first], 0, 0
    else:
        stream = [i for i in ids if i <= (2 if code == 1 else 6 if code == 2 else 255)]
        if first not in stream:
            first = 0   # an unknown object id restarts the stream (6.21)
        rest = [i for i in stream if i >= first]
        chosen = rest[:dev.ident_per_answer]
        more = 0xFF if len(rest) > len(chosen) else 0
        nxt = rest[len(chosen)] if more else 0
    objects = b"".join(bytes([i, len(dev.identity[i].encode())]) + dev.identity[i].encode()
                       for i in chosen)
    return bytes([43, 0x0E, code, conformity, more, nxt, len(chosen)]) + objects


def line_baud(fd):
    """The baud rate a pty's slave side is set to (termios of the pair), None if unknown."""
    try:
        import termios
        speed = termios.tcgetattr(fd)[5]
    except Exception:   # termios.error is no OSError; not a tty: no rate to honour
        return None
    return _BAUDS.get(speed)


def _baud_table():
    try:
        import termios
    except ImportError:
        return {}
    return {getattr(termios, "B%d" % b): b for b in (1200, 2400, 4800, 9600, 19200, 38400, 57600,
                                                      115200, 230400) if hasattr(termios, "B%d" % b)}


_BAUDS = _baud_table()


def _rtu_frame(unit, pdu):
    body = bytes([unit]) + pdu
    return body + get_crc(body)


def _close(s, shutdown=True):
    """Close a socket; shut it down first so the peer sees the FIN at once even while another
    thread still sits in select() on it."""
    if s is None:
        return
    if shutdown:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    try:
        s.close()
    except OSError:
        pass


# --------------------------------------------------------------------------- command line

def parse_units(specs, default):
    """['meter:1', 'plc:2', 'generic:10-29:100', 'meter:5@19200'] -> {unit: Device}
    (@BAUD: the device answers on the serial lines only at that rate)."""
    devices = {}
    for spec in specs or default:
        parts = spec.split(":")
        kind = parts[0]
        if kind not in DEVICE_KINDS or len(parts) < 2:
            raise ValueError("device %r: want KIND:UNIT[-LAST][:REGISTERS], KIND one of %s"
                             % (spec, ", ".join(DEVICE_KINDS)))
        units, _, baud = parts[1].partition("@")
        first, _, last = units.partition("-")
        for unit in range(int(first), int(last or first) + 1):
            if not 1 <= unit <= 247:
                raise ValueError("device %r: unit id %d outside 1-247" % (spec, unit))
            if kind == "generic":
                devices[unit] = Generic(seed=unit, registers=int(parts[2]) if len(parts) > 2 else 100)
            else:
                devices[unit] = DEVICE_KINDS[kind](seed=unit)
            if baud:
                devices[unit].baud = int(baud)
    return devices


def build_parser():
    p = argparse.ArgumentParser(
        prog="simulator.py", description=__doc__.splitlines()[0],
        epilog="Control port protocol (JSON lines): " + "; ".join([
            '{"cmd":"fault","unit":U,"kind":K[,"duration":S][,"count":N][,"seconds":D][,"code":C]}',
            '{"cmd":"clear"[,"unit":U]}', '{"cmd":"down","duration":S}', '{"cmd":"stats"}'])
        + ". Fault kinds: " + "; ".join("%s: %s" % kv for kv in FAULT_KINDS.items())
        + ". Omit unit (or null) for every unit.")
    sub = p.add_subparsers(dest="command")
    s = sub.add_parser("serve", help="run the simulated site (the default)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--tcp", type=int, default=5020, metavar="PORT", help="Modbus TCP port (0: any free one); -1 to disable")
    s.add_argument("--rtu", action="store_true", help="serve RTU on a new pseudo-terminal (its path is printed)")
    s.add_argument("--rtu-tcp", type=int, default=None, metavar="PORT", help="also serve RTU-over-TCP")
    s.add_argument("--ascii", action="store_true", help="serve Modbus ASCII on another pseudo-terminal")
    s.add_argument("--ascii-tcp", type=int, default=None, metavar="PORT", help="also serve ASCII-over-TCP")
    s.add_argument("--device", action="append", metavar="KIND:UNIT[-LAST][@BAUD][:REGS]",
                   help="a device (repeat); KIND meter, plc or generic; default meter:1 and plc:2")
    s.add_argument("--control", type=int, default=None, metavar="PORT", help="JSON-lines control port (0: any free one)")
    s.add_argument("--ready-file", metavar="PATH", help="write the ports and pty path here as JSON when serving")
    s.add_argument("--quiet", action="store_true", help="do not log faults")
    c = sub.add_parser("ctl", help="send one command to a running simulator's control port")
    c.add_argument("address", metavar="HOST:PORT")
    c.add_argument("op", choices=["fault", "clear", "down", "stats"])
    c.add_argument("args", nargs="*", help="fault: UNIT KIND; clear: [UNIT]; down: SECONDS")
    c.add_argument("--duration", type=float)
    c.add_argument("--count", type=int)
    c.add_argument("--seconds", type=float, help="delay fault: how long")
    c.add_argument("--code", type=int, help="exception fault: the exception code")
    return p


def ctl(address, cmd, timeout=5.0):
    """Send one command to a simulator's control port; returns the reply dict."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout) as s:
        f = s.makefile("rwb")
        f.write(json.dumps(cmd).encode() + b"\n")
        f.flush()
        return json.loads(f.readline())


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("serve", "ctl", "-h", "--help"):
        argv.insert(0, "serve")
    args = build_parser().parse_args(argv)
    if args.command == "ctl":
        cmd = {"cmd": args.op}
        if args.op == "fault":
            if len(args.args) != 2:
                print("ctl fault: want UNIT KIND", file=sys.stderr)
                return 2
            cmd.update(unit=None if args.args[0] in ("*", "all") else int(args.args[0]), kind=args.args[1])
            for k in ("duration", "count", "seconds", "code"):
                if getattr(args, k) is not None:
                    cmd[k] = getattr(args, k)
        elif args.op == "clear" and args.args:
            cmd["unit"] = int(args.args[0])
        elif args.op == "down":
            cmd["duration"] = float(args.args[0]) if args.args else 5.0
        reply = ctl(args.address, cmd)
        print(json.dumps(reply))
        return 0 if reply.get("ok") else 1

    try:
        devices = parse_units(args.device, ["meter:1", "plc:2"])
    except ValueError as e:
        print("simulator: %s" % e, file=sys.stderr)
        return 2

    def log(msg):
        if not args.quiet:
            print("simulator: %s" % msg, file=sys.stderr, flush=True)

    sim = Simulator(devices, host=args.host, tcp=None if args.tcp < 0 else args.tcp, rtu=args.rtu,
                    rtu_tcp=args.rtu_tcp, control=args.control, log=log, ascii=args.ascii,
                    ascii_tcp=args.ascii_tcp)
    import signal

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *a: stop.set())
    sim.start()
    info = {"host": args.host, "tcp_port": sim.tcp_port, "rtu_path": sim.rtu_path,
            "rtu_tcp_port": sim.rtu_tcp_port, "control_port": sim.control_port,
            "ascii_path": sim.ascii_path, "ascii_tcp_port": sim.ascii_tcp_port,
            "units": {str(u): d.kind for u, d in sorted(devices.items())}, "pid": os.getpid()}
    units = ", ".join("%d=%s" % (u, d.kind) for u, d in sorted(devices.items()))
    if sim.tcp_port is not None:
        print("simulator: Modbus TCP on %s:%d (units %s)" % (args.host, sim.tcp_port, units), flush=True)
    if sim.rtu_path:
        print("simulator: Modbus RTU on %s (units %s)" % (sim.rtu_path, units), flush=True)
    if sim.rtu_tcp_port is not None:
        print("simulator: RTU-over-TCP on %s:%d" % (args.host, sim.rtu_tcp_port), flush=True)
    if sim.ascii_path:
        print("simulator: Modbus ASCII on %s (units %s)" % (sim.ascii_path, units), flush=True)
    if sim.ascii_tcp_port is not None:
        print("simulator: ASCII-over-TCP on %s:%d" % (args.host, sim.ascii_tcp_port), flush=True)
    if sim.control_port is not None:
        print("simulator: control on %s:%d (see --help)" % (args.host, sim.control_port), flush=True)
    if args.ready_file:
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(info, f)
        os.replace(tmp, args.ready_file)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
