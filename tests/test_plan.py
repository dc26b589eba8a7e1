"""Request planning (agent/plan.py): addresses in, requests out; and the bus-time estimate."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.modbus.pdu import read_data_length
from agent.modbus.rtu import char_time, frame_gap
from agent.plan import Span, bus_estimate, plan_addresses, plan_spans

# (case, spans [(address, count)], max_count, max_gap, expected reads [(start, count)])
CASES = [
    ("nothing", [], 125, 10, []),
    ("one register", [(0, 1)], 125, 10, [(0, 1)]),
    ("touching spans merge", [(0, 2), (2, 2), (4, 1)], 125, 0, [(0, 5)]),
    ("gap within max_gap merges", [(0, 2), (10, 2)], 125, 8, [(0, 12)]),
    ("gap beyond max_gap splits", [(0, 2), (11, 2)], 125, 8, [(0, 2), (11, 2)]),
    ("max_gap 0 never reads a hole", [(0, 1), (2, 1), (3, 1)], 125, 0, [(0, 1), (2, 2)]),
    ("unsorted input", [(20, 2), (0, 2), (10, 2)], 125, 10, [(0, 22)]),
    ("limit splits a run", [(i, 2) for i in range(0, 130, 2)], 125, 0, [(0, 124), (124, 6)]),
    ("a 2-register value is never cut", [(0, 124), (124, 2)], 125, 10, [(0, 124), (124, 2)]),
    ("exactly at the limit", [(0, 123), (123, 2)], 125, 0, [(0, 125)]),
    ("lower limit for out-of-spec devices", [(0, 2), (2, 2), (4, 2)], 4, 0, [(0, 4), (4, 2)]),
    ("overlapping bit fields share a register", [(100, 1), (100, 1), (101, 1)], 125, 0, [(100, 2)]),
    ("a string inside a span", [(0, 10), (2, 2)], 125, 0, [(0, 10)]),
    ("bits: 2000 per read", [(0, 1), (1999, 1), (2000, 1)], 2000, 2000, [(0, 2000), (2000, 1)]),
    ("far apart", [(0, 2), (40000, 2)], 125, 125, [(0, 2), (40000, 2)]),
    ("top of the address space", [(65534, 2)], 125, 10, [(65534, 2)]),
    ("greedy: gap exactly max_gap", [(0, 1), (6, 1), (12, 1)], 125, 5, [(0, 13)]),
    ("greedy: chain broken once", [(0, 1), (6, 1), (13, 1), (19, 1)], 125, 5, [(0, 7), (13, 7)]),
]


@pytest.mark.parametrize("case,spans,max_count,max_gap,expected", CASES, ids=[c[0] for c in CASES])
def test_plan_table(case, spans, max_count, max_gap, expected):
    assert plan_addresses(spans, max_count, max_gap) == expected


def test_span_larger_than_a_read_is_refused():
    with pytest.raises(ValueError, match="more than the 10"):
        plan_spans([Span(0, 11, "serial")], 10, 0)


def test_planned_reads_carry_their_spans():
    a, b, c = Span(0, 2, "a"), Span(2, 2, "b"), Span(50, 2, "c")
    reads = plan_spans([c, b, a], 125, 10)
    assert [[s.key for s in r.spans] for r in reads] == [["a", "b"], ["c"]]


def _brute_min_reads(spans, max_count, max_gap):
    """Fewest reads by dynamic programming over the sorted spans (reference for the greedy)."""
    spans = sorted(spans)
    n = len(spans)
    best = [0] + [None] * n
    for j in range(1, n + 1):
        for i in range(j):
            if best[i] is None:
                continue
            group = spans[i:j]
            start = group[0][0]
            end = max(a + c for a, c in group)
            ok = end - start <= max_count
            reach = group[0][0] + group[0][1]
            for a, c in group[1:]:
                if a - reach > max_gap:
                    ok = False
                reach = max(reach, a + c)
            if ok and (best[j] is None or best[i] + 1 < best[j]):
                best[j] = best[i] + 1
    return best[n]


@st.composite
def point_spans(draw):
    """Spans as a validated config has them: disjoint, except several bit fields that share
    one register (equal 1-register spans)."""
    spans, pos = [], 0
    for gap, count, shared in draw(st.lists(st.tuples(st.integers(0, 20), st.sampled_from([1, 2, 4]),
                                                      st.booleans()), max_size=14)):
        pos += gap
        spans.append((pos, count))
        if count == 1 and shared:
            spans.append((pos, 1))
        pos += count
    return draw(st.permutations(spans))


@settings(deadline=None, max_examples=150)
@given(point_spans(), st.integers(4, 40), st.integers(0, 12))
def test_greedy_is_minimal_and_covers_everything(spans, max_count, max_gap):
    reads = plan_addresses(spans, max_count, max_gap)
    # every span is inside exactly the read that serves it, no read exceeds the limit
    for a, c in spans:
        assert any(s <= a and a + c <= s + n for s, n in reads)
    assert all(1 <= n <= max_count for _s, n in reads)
    # reads are ordered and disjoint
    assert all(s1 + n1 <= s2 for (s1, n1), (s2, _n2) in zip(reads, reads[1:]))
    assert len(reads) == _brute_min_reads(spans, max_count, max_gap)


class Conn:
    def __init__(self, type, baud=9600, parity="N", bytesize=8, stopbits=1, pause=0.0):
        self.type, self.baud, self.parity, self.bytesize, self.stopbits, self.pause = (
            type, baud, parity, bytesize, stopbits, pause)


def test_rtu_character_time_and_gap():
    assert char_time(9600) == pytest.approx(10 / 9600)             # 8N1: 10 bits
    assert char_time(9600, parity="E") == pytest.approx(11 / 9600)  # 8E1: 11 bits
    assert char_time(9600, stopbits=2) == pytest.approx(11 / 9600)
    assert frame_gap(9600) == pytest.approx(3.5 * 10 / 9600)
    assert frame_gap(38400) == pytest.approx(0.00175)


def test_response_sizes():
    assert read_data_length(3, 10) == 20
    assert read_data_length(1, 9) == 2
    assert read_data_length(2, 8) == 1


def test_bus_estimate_rtu_by_hand():
    # read 2 registers at 9600 8N1: request 8 bytes, response 5+4 = 9 bytes
    est = bus_estimate(Conn("rtu"), [(4, 2)])
    ct = 10 / 9600
    assert est["requests"] == 1
    assert est["bytes"] == 17
    assert est["seconds"] == pytest.approx(17 * ct + 2 * 3.5 * ct + 0.010)


def test_bus_estimate_tcp_counts_mbap_and_pause():
    est = bus_estimate(Conn("tcp", pause=0.02), [(3, 10), (1, 16)])
    assert est["bytes"] == (12 + 9 + 20) + (12 + 9 + 2)
    assert est["seconds"] == pytest.approx(2 * (0.005 + 0.02))


def test_slower_baud_costs_more():
    fast = bus_estimate(Conn("rtu", baud=115200), [(3, 125)])["seconds"]
    slow = bus_estimate(Conn("rtu", baud=2400), [(3, 125)])["seconds"]
    assert slow > 10 * fast
