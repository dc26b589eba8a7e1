#!/usr/bin/env python3
"""Block decoding benchmark: one 125-register read -> 50 named, scaled values.

    .venv/bin/python tools/bench/decode.py [--quick]

The work, identical on both sides: a 125-register response holding 50 mixed points (float32 in
big and little word order, int32/uint32, int16/uint16 with scale 0.1/0.01, float64 and uint64
in both word orders, a 4-bit field, a 16-character string); output a dict {name: value} with
scaling applied, float32 as the shortest decimal that is the same float32, and NaN/inf
replaced by None.

  agent     agent.device.Request's compiled decoder (resolved at load time), from the
            response's data bytes.
  pymodbus  ModbusClientMixin.convert_from_registers (pymodbus 3.x) per point on the
            register list pymodbus hands its users (`rr.registers`), with the same scaling
            and NaN handling written as plainly as its docs show; the bytes -> register list
            step pymodbus does while decoding the PDU is NOT counted against it.

Only word orders pymodbus supports (big/little) are used, so both do the same work. Pinned to
one CPU; each figure is the best of several interleaved repeats.
"""
import math
import os
import random
import struct
import sys
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from agent.config import Problems, parse_point  # noqa: E402
from agent.device import Request  # noqa: E402


def pin():
    try:
        cpu = sorted(os.sched_getaffinity(0))[-1]
        os.sched_setaffinity(0, {cpu})
        return "pinned to CPU %d" % cpu
    except (AttributeError, OSError) as e:
        return "not pinned (%s)" % e


# (count, type, word order, scale, extra) -> the 50 points
MIX = [
    (12, "float32", "big", 1.0, ""),
    (8, "float32", "little", 1.0, ""),
    (5, "int32", "big", 0.01, ""),
    (5, "uint32", "little", 1.0, ""),
    (8, "int16", "big", 0.1, ""),
    (6, "uint16", "big", 1.0, ""),
    (2, "float64", "big", 1.0, ""),
    (1, "float64", "little", 1.0, ""),
    (1, "uint64", "little", 1.0, ""),
    (1, "bits", "big", 1.0, "0-3"),
    (1, "string", "big", 1.0, "8"),
]
WORDS = {"float32": 2, "int32": 2, "uint32": 2, "int16": 1, "uint16": 1, "float64": 4,
         "uint64": 4, "bits": 1, "string": 8}
CODE = {"float32": ">f", "int32": ">i", "uint32": ">I", "int16": ">h", "uint16": ">H",
        "float64": ">d", "uint64": ">Q"}
AGENT_ORDER = {("float32", "big"): "ABCD", ("float32", "little"): "CDAB",
               ("int32", "big"): "ABCD", ("uint32", "little"): "CDAB",
               ("float64", "big"): "ABCDEFGH", ("float64", "little"): "GHEFCDAB",
               ("uint64", "little"): "GHEFCDAB", ("int16", "big"): "AB", ("uint16", "big"): "AB"}


def build():
    """-> (point specs, data bytes, registers list). Points are packed with small holes."""
    rng = random.Random(7)
    specs, data, addr = [], bytearray(), 0
    for count, type_name, word_order, scale, extra in MIX:
        for _ in range(count):
            n = len(specs)
            name = "p%02d_%s" % (n, type_name)
            words = WORDS[type_name]
            if type_name == "string":
                raw = b"MODBUS-AGENT\0\0\0\0"
            elif type_name == "bits":
                raw = struct.pack(">H", rng.randrange(65536))
            else:
                value = rng.uniform(-500, 500) if type_name.startswith("float") else (
                    rng.randrange(0, 60000) if type_name.startswith("u") else rng.randrange(-30000, 30000))
                if n == 3:
                    value = math.nan   # one sensor reports NaN
                raw = struct.pack(CODE[type_name], value)
                if word_order == "little":
                    raw = b"".join(raw[i:i + 2] for i in range(len(raw) - 2, -1, -2))
            specs.append((name, addr, type_name, word_order, scale, extra))
            data += raw
            addr += words
            if n % 7 == 6:             # a hole now and then, read through by the planner
                data += b"\0\0"
                addr += 1
    assert addr <= 125, addr
    data += b"\0\0" * (125 - addr)
    registers = list(struct.unpack(">125H", bytes(data)))
    return specs, bytes(data), registers


def agent_decoder(specs):
    problems = Problems()
    points = []
    for name, addr, type_name, word_order, scale, extra in specs:
        text = "holding %d %s" % (addr, type_name)
        if extra:
            text += " " + extra
        if (type_name, word_order) in AGENT_ORDER:
            text += " " + AGENT_ORDER[(type_name, word_order)]
        if scale != 1.0:
            text += " scale=%g" % scale
        points.append(parse_point(name, text, 0, "ABCD", "bench", 0, "points", problems))
    assert not problems.errors, problems.errors
    return Request("holding", 0, 125, points).decoder


def pymodbus_decoder(specs):
    from pymodbus.client.mixin import ModbusClientMixin as M

    dt = M.DATATYPE
    kinds = {"float32": dt.FLOAT32, "int32": dt.INT32, "uint32": dt.UINT32, "int16": dt.INT16,
             "uint16": dt.UINT16, "float64": dt.FLOAT64, "uint64": dt.UINT64, "bits": dt.UINT16,
             "string": dt.STRING}
    plan = [(name, addr, addr + WORDS[t], kinds[t], order, scale, t) for name, addr, t, order, scale, _x in specs]
    convert = M.convert_from_registers
    isfinite = math.isfinite
    pack_f, unpack_f = struct.Struct("f").pack, struct.Struct("f").unpack

    def decode(registers):
        out = {}
        for name, start, end, kind, order, scale, t in plan:
            v = convert(registers[start:end], kind, word_order=order)
            if t == "bits":
                v = v & 0xF
            elif t == "string":
                v = v.strip()
            elif t.startswith("float"):
                if t == "float32":   # the shortest decimal that is the same float32
                    if isfinite(v):
                        for n in (6, 7, 8, 9):
                            x = float("%.*g" % (n, v))
                            if unpack_f(pack_f(x))[0] == v:
                                break
                        v = x
                    else:
                        v = None
                elif not isfinite(v):
                    v = None
            if scale != 1.0 and v is not None:
                v = v * scale
            out[name] = v
        return out

    return decode


def main():
    quick = "--quick" in sys.argv
    where = pin()
    specs, data, registers = build()
    agent = agent_decoder(specs)
    fns = {"agent": lambda: agent.decode(data, {})}
    try:
        import pymodbus
    except ImportError:   # e.g. on the router: the agent's own figure only
        pymodbus = None
    if pymodbus is not None:
        pm = pymodbus_decoder(specs)
        a = agent.decode(data, {})
        b = pm(registers)
        assert a.keys() == b.keys()
        for k in a:   # same results (scale 0.1 divides on our side: compare approximately)
            x, y = a[k], b[k]
            assert (x is None and y is None) or x == y or abs(x - y) <= 1e-9 * max(1.0, abs(y)), (k, x, y)
        fns["pymodbus"] = lambda: pm(registers)
    number, repeat = (200, 3) if quick else (2000, 7)
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, fn in fns.items():
            best[name] = min(best[name], timeit.timeit(fn, number=number) / number * 1e6)
    print("decode one 125-register block into %d named values (%s, Python %s, pymodbus %s)" % (
        len(specs), where, sys.version.split()[0], pymodbus.__version__ if pymodbus else "not installed"))
    print("  %-58s %9s" % ("implementation", "us/block"))
    print("  %-58s %9.2f" % ("agent: compiled block decoder (from data bytes)", best["agent"]))
    if pymodbus is None:
        return
    print("  %-58s %9.2f" % ("pymodbus: convert_from_registers per point (from registers)", best["pymodbus"]))
    print("  agent is %.1fx faster (%.2f us vs %.2f us per point)" % (
        best["pymodbus"] / best["agent"], best["agent"] / len(specs), best["pymodbus"] / len(specs)))


if __name__ == "__main__":
    main()
