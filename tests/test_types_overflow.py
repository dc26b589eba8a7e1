"""A finite raw value can become infinite by scaling (float64 1e308 * 10, uint64 * 1e300):
reported as None like NaN, never handed to the encoder (r4: the agent crash-looped on it)."""
import json
import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import Problems, parse_point
from agent.device import Request
from agent.record import data_record, encode
from agent.types import make_transform


def decode_one(text, data):
    problems = Problems()
    p = parse_point("p", text, 0, "ABCD", "test.ini", 1, "points:d", problems)
    assert not problems.errors, problems.errors
    return Request(p.table, p.address, p.count, [p]).decoder.decode(data, {})["p"]


def test_float64_scaled_past_the_largest_double_is_none():
    f = make_transform("float", scale=10.0)
    assert f(1e308) is None and f(-1e308) is None
    assert f(1e307) == pytest.approx(1e308)


@pytest.mark.parametrize("text, raw", [
    ("holding 0 float64 scale=10", struct.pack(">d", 1e308)),
    ("holding 0 float64 offset=1e308", struct.pack(">d", 1e308)),
    ("holding 0 float64 divisor=1e-10", struct.pack(">d", 1e300)),
    ("holding 0 float32 scale=1e300", struct.pack(">f", 3e38)),
    ("holding 0 uint64 scale=1e300", struct.pack(">Q", 2 ** 64 - 1)),
    ("holding 0 int64 scale=1e300 decimals=2", struct.pack(">q", -2 ** 63)),
    ("holding 0 int32 divisor=1e-306", struct.pack(">i", 2 ** 31 - 1)),
    ("holding 0 float64 scale=10", bytes.fromhex("7FE1CCF385EBC8A0")),   # wrong byte order, huge
])
def test_decoded_overflow_is_none_and_the_record_encodes(text, raw):
    v = decode_one(text, raw)
    assert v is None
    assert json.loads(encode(data_record("a", 1.8e9, "m", 1, {"p": v})))["values"] == {"p": None}


@settings(max_examples=200, deadline=None)
@given(raw=st.floats(allow_nan=True, allow_infinity=True),
       scale=st.floats(min_value=-1e300, max_value=1e300).filter(lambda x: x != 0),
       offset=st.floats(min_value=-1e300, max_value=1e300))
def test_any_scaled_float64_encodes(raw, scale, offset):
    v = decode_one("holding 0 float64 scale=%r offset=%r" % (scale, offset), struct.pack(">d", raw))
    assert v is None or math.isfinite(v)
    encode(data_record("a", 1.8e9, "m", 1, {"p": v}))      # never raises


def test_tiny_scale_loads_and_decodes():
    """scale=5e-324 (found by the property test above): its reciprocal is infinite, which made
    the config loader raise OverflowError instead of decoding."""
    assert decode_one("holding 0 float64 scale=5e-324", struct.pack(">d", 1.0)) == 5e-324
    assert decode_one("holding 0 uint16 scale=5e-324", struct.pack(">H", 2)) == 1e-323
