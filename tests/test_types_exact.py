"""Values exactly as the device holds them (issue 9): a float32 is reported as the shortest
decimal that is the same float32 (not rounded to 7 digits: 16777215 stayed 16777220), a float64
as itself, and integers as exact Python ints, beyond 2^53 too, through the decoder, the record
encoding and `poll --json` against a real Modbus server.

The reference for "shortest" is an exhaustive search written here: '%.{n}g' for n = 1..9, the
first that packs back to the same float32 bits.
"""
import json
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.commands import probe_candidates
from agent.config import Problems, parse_point
from agent.device import Request
from agent.record import data_record, encode
from agent.types import ORDERS_32, ORDERS_64, shortest32
from tests.test_commands import Tables, UmodbusTcpPeer, config, run

BIG = 18000000000000000001          # a uint64 beyond 2^53 (float64 would make it 1.8e19)


def wire(natural, order):
    """Big-endian bytes A B C ... in the order the order's name spells."""
    return bytes(natural[ord(letter) - 65] for letter in order)


def decode_one(text, data):
    problems = Problems()
    p = parse_point("p", text, 0, "ABCD", "test.ini", 1, "points:d", problems)
    assert not problems.errors, problems.errors
    r = Request(p.table, p.address, p.count, [p])
    assert r.nbytes == len(data)
    return r.decoder.decode(data, {})["p"]


def shortest_reference(bits):
    """The shortest '%.{n}g' decimal of float32 `bits` that packs back to the same bits."""
    v = struct.unpack("<f", struct.pack("<I", bits))[0]
    for n in range(1, 10):
        x = float("%.*g" % (n, v))
        try:
            if struct.pack("<f", x) == struct.pack("<I", bits):
                return x
        except OverflowError:
            pass
    raise AssertionError("no 9-digit decimal for %08x" % bits)


def finite32(bits):
    return (bits >> 23) & 0xFF != 0xFF


def finite64(bits):
    return (bits >> 52) & 0x7FF != 0x7FF


# --- float32 -------------------------------------------------------------------------------


@pytest.mark.parametrize("regs, expected", [
    ("4B7FFFFF", 16777215.0),            # was 16777220.0
    ("4B3C614F", 12345679.0),            # was 12345680.0
    ("47F12065", 123456.79),             # float32(123456.789) = 123456.7890625, was 123456.8
    ("4366199A", 230.1),                 # still the short form, not 230.10000610351562
    ("00000001", 1e-45),                 # the smallest subnormal
    ("7F7FFFFF", 3.4028235e38),          # the largest float32
    ("80000000", -0.0),
])
def test_float32_known_values(regs, expected):
    got = decode_one("holding 0 float32", bytes.fromhex(regs))
    assert repr(got) == repr(expected)
    assert struct.pack(">f", got) == bytes.fromhex(regs)


def test_float32_rounds_further_only_when_the_point_says_decimals():
    raw = bytes.fromhex("47F12065")     # 123456.7890625
    assert decode_one("holding 0 float32", raw) == 123456.79
    assert decode_one("holding 0 float32 decimals=1", raw) == 123456.8
    assert decode_one("holding 0 float32 decimals=0", raw) == 123457.0
    assert decode_one("holding 0 float32 scale=10", bytes.fromhex("4366199A")) == 2301.0


@settings(deadline=None, max_examples=400)
@given(st.integers(0, 2 ** 32 - 1).filter(finite32), st.sampled_from(ORDERS_32))
def test_float32_any_bits_any_order_packs_back_to_the_same_bits(bits, order):
    natural = struct.pack(">I", bits)
    got = decode_one("holding 0 float32 %s" % order, wire(natural, order))
    assert struct.pack(">f", got) == natural
    assert repr(got) == repr(shortest_reference(bits))


@settings(deadline=None, max_examples=400)
@given(st.integers(0, 2 ** 64 - 1).filter(finite64), st.sampled_from(ORDERS_64))
def test_float64_any_bits_any_order_packs_back_to_the_same_bits(bits, order):
    natural = struct.pack(">Q", bits)
    got = decode_one("holding 0 float64 %s" % order, wire(natural, order))
    assert struct.pack(">d", got) == natural


def test_shortest32_agrees_with_the_exhaustive_search():
    """The table-driven fast path against the reference: random bit patterns, decimal values
    as devices store them, and the neighbours of every power of two and of ten (where the
    float32 step changes or the decade does)."""
    rng = random.Random(9)
    cases = [rng.getrandbits(32) for _ in range(20000)]
    for _ in range(5000):
        v = round(rng.uniform(-1e7, 1e7) * 10.0 ** -rng.randrange(0, 12), rng.randrange(0, 9))
        cases.append(struct.unpack("<I", struct.pack("<f", v))[0])
    for v in [2.0 ** e for e in range(-149, 128)] + [float("1e%d" % j) for j in range(-45, 39)]:
        b = struct.unpack("<I", struct.pack("<f", v))[0]
        cases += [b - 1, b, b + 1, b | 1 << 31, (b - 1) | 1 << 31, (b + 1) | 1 << 31]
    bad = []
    for bits in cases:
        bits &= 0xFFFFFFFF
        if not finite32(bits):
            continue
        v = struct.unpack("<f", struct.pack("<I", bits))[0]
        got = shortest32(v)
        if struct.pack("<f", got) != struct.pack("<I", bits) or repr(got) != repr(shortest_reference(bits)):
            bad.append((hex(bits), got, shortest_reference(bits)))
    assert not bad, bad[:10]


def test_shortest32_of_nan_and_infinities_is_none():
    for special in (float("nan"), float("inf"), float("-inf")):
        assert shortest32(special) is None


# --- integers ------------------------------------------------------------------------------


@pytest.mark.parametrize("options, expected", [
    ("", BIG),
    ("scale=1", BIG),
    ("scale=1 offset=0 divisor=1", BIG),
    ("decimals=2", BIG),
    ("scale=10", BIG * 10),              # whole-number scale: exact int, not 1.8e20
    ("offset=-1", BIG - 1),
    ("scale=2 offset=3", 2 * BIG + 3),
])
def test_uint64_beyond_2_53_stays_an_exact_int(options, expected):
    got = decode_one("holding 0 uint64 " + options, struct.pack(">Q", BIG))
    assert got == expected and isinstance(got, int)


def test_integer_division_is_correctly_rounded():
    """int / int true division is correctly rounded; converting to float first rounds twice."""
    v = 10499958131665514997
    assert decode_one("holding 0 uint64 divisor=10", struct.pack(">Q", v)) == v / 10
    assert decode_one("holding 0 uint64 scale=0.1", struct.pack(">Q", v)) == v / 10
    assert v / 10 != float(v) / 10.0          # the old result, one digit off
    assert decode_one("holding 0 int16 scale=0.1", struct.pack(">h", 2301)) == 230.1


def test_int64_extremes_exact():
    for v in (-(2 ** 63), 2 ** 63 - 1, -(2 ** 53) - 1):
        assert decode_one("holding 0 int64", struct.pack(">q", v)) == v
        assert decode_one("holding 0 int64 scale=1", struct.pack(">q", v)) == v


def test_record_encoding_keeps_every_digit():
    f32 = decode_one("holding 0 float32", bytes.fromhex("4B7FFFFF"))
    line = encode(data_record("a1", 1.8e9, "m", 1, {"big": BIG, "f": f32}))
    assert b'"big":18000000000000000001' in line and b'"f":16777215.0' in line
    assert json.loads(line)["values"] == {"big": BIG, "f": 16777215.0}


def test_poll_json_reports_exact_values_from_a_real_server(tmp_path, capsys):
    t = Tables()
    t.put("holding", 0, struct.pack(">Q", BIG))
    t.put("holding", 4, bytes.fromhex("4B7FFFFF"))
    t.put("holding", 6, bytes.fromhex("47F12065"))
    t.put("holding", 8, struct.pack(">Q", BIG))
    lines = ["big = holding 0 uint64", "count = holding 4 float32", "f = holding 6 float32",
             "big1 = holding 8 uint64 scale=1"]
    with UmodbusTcpPeer({1: t}) as peer:
        path = config(tmp_path, "type = tcp\nhost = 127.0.0.1\nport = %d\ntimeout = 2s" % peer.port,
                      [("m", 1, lines, "")])
        rc, out, err = run(capsys, "poll", "-c", path, "--json")
    assert rc == 0, out + err
    assert '"big":18000000000000000001' in out and '"big1":18000000000000000001' in out
    assert '"count":16777215.0' in out and '"f":123456.79' in out
    assert json.loads(out.splitlines()[0])["values"] == {
        "big": BIG, "count": 16777215.0, "f": 123456.79, "big1": BIG}


def test_probe_shows_float32_candidates_exactly():
    """`probe --expect` lists float32 readings the same way the agent will report them."""
    regs = {500: b"\x4b\x7f", 501: b"\xff\xff"}
    got = [c for c in probe_candidates(regs, 500, 16777000, 16777300) if c["type"] == "float32"]
    assert got and got[0]["order"] == "ABCD" and repr(got[0]["value"]) == "16777215.0"
