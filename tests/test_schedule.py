"""agent.schedule: drift-free slots, missed cycles counted not bunched, dead-device back-off."""
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.schedule import DeviceSchedule


def test_on_time_cycles_follow_the_slot_grid_without_drift():
    s = DeviceSchedule(100.0, 0.1)
    dues = []
    for _ in range(1000):
        dues.append(s.due)
        s.done(s.due + 0.03, ok=True)  # each poll takes 30 ms
    # cycle k at start + k*interval exactly: no accumulation of the 30 ms or of float error
    assert dues[999] == 100.0 + 999 * 0.1
    assert s.missed == 0 and s.skipped == 0


def test_late_cycle_within_its_slot_runs_late_but_is_not_missed():
    s = DeviceSchedule(0.0, 1.0)
    s.done(1.5, ok=True)          # cycle 0 overran into slot 1
    assert s.k == 1 and s.due == 1.0 and s.missed == 0   # cycle 1 starts at once, late


def test_overrun_of_whole_slots_counts_missed_and_does_not_bunch():
    s = DeviceSchedule(0.0, 1.0)
    s.done(3.2, ok=True)          # a 3.2 s stall: slots 1 and 2 can no longer start on time
    assert s.missed == 2
    assert s.k == 3 and s.due == 3.0
    # only ONE cycle runs now; the next is slot 4, not a burst of three
    s.done(3.3, ok=True)
    assert s.due == 4.0 and s.missed == 2


def test_catch_up_before_starting_counts_passed_slots():
    s = DeviceSchedule(0.0, 0.5)
    assert s.catch_up(0.2) == 0
    assert s.catch_up(1.7) == 3   # slots 0,1,2 passed; slot 3 (1.5) still running
    assert s.due == 1.5


def test_dead_device_backs_off_exponentially_up_to_the_cap_on_slot_boundaries():
    s = DeviceSchedule(0.0, 1.0, dead_after=3, backoff_max=8.0)
    waits = []
    for _ in range(8):
        before = s.due
        s.done(before + 0.5, ok=False)   # each probe costs half a slot of timeout
        waits.append(s.due - before)
    # three normal cycles, then probes every 1, 2, 4, 8, 8 ... intervals
    assert waits == [1.0, 1.0, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert s.dead and s.missed == 0
    assert s.skipped == sum(int(w) - 1 for w in waits)
    for _ in range(3):
        assert float(s.due).is_integer()  # still on the grid
        s.done(s.due, ok=False)


def test_first_success_revives_a_dead_device():
    s = DeviceSchedule(0.0, 1.0, dead_after=2, backoff_max=60.0)
    for _ in range(5):
        s.done(s.due + 0.1, ok=False)
    assert s.dead
    due = s.due
    s.done(due + 0.1, ok=True)
    assert not s.dead and s.failures == 0 and s.backoff == 0.0
    assert s.due == due + 1.0


def test_defer_moves_a_probe_to_the_next_slot_and_remembers_since_when():
    s = DeviceSchedule(0.0, 1.0, dead_after=1, backoff_max=4.0)
    s.done(0.1, ok=False)                       # dead; next probe on slot 1
    assert s.dead and s.due == 1.0 and s.deferred_for(1.0) == 0.0
    assert s.defer(1.2) == 2.0                  # in the way of a live device: next slot
    assert s.defer(2.1) == 3.0
    assert s.deferred_for(3.0) == 2.0 and s.skipped == 2 and s.missed == 0
    s.done(3.2, ok=False)                       # probed: the deferral is over
    assert s.deferred_for(5.0) == 0.0


def test_probe_soon_pulls_a_dead_device_back_to_the_next_slot():
    s = DeviceSchedule(0.0, 1.0, dead_after=1, backoff_max=64.0)
    for _ in range(5):
        s.done(s.due + 0.1, ok=False)          # backing off: 1, 2, 4, 8, 16 slots
    assert s.due == 31.0 and s.skipped == 1 + 3 + 7 + 15
    assert s.probe_soon(15.5) == 16.0          # its link is back: next slot, not slot 31
    assert s.k == 5 + s.skipped                # 5 polls + skipped: the accounting still adds up
    assert s.probe_soon(15.7) == 16.0          # idempotent; never pushes a probe later


@settings(deadline=None, max_examples=150)
@given(
    interval=st.sampled_from([0.1, 0.25, 1.0, 5.0]),
    events=st.lists(st.tuples(st.floats(0.0, 4.0), st.booleans(), st.booleans()), min_size=1, max_size=60),
)
def test_properties_grid_monotone_no_bunching(interval, events):
    s = DeviceSchedule(10.0, interval, dead_after=3, backoff_max=30.0)
    now = 10.0
    starts = []
    for duration_slots, ok, deferred in events:
        now = max(now, s.due)          # the loop starts a cycle no earlier than it is due
        if deferred and s.dead:
            before = s.k
            s.defer(now + duration_slots * interval / 4)
            assert s.k > before
            continue
        s.catch_up(now)
        starts.append((s.k, now))
        now += duration_slots * interval
        before = s.k
        s.done(now, ok)
        assert s.k > before                             # always forward
        k_exact = (s.due - s.start) / interval
        assert math.isclose(k_exact, round(k_exact), abs_tol=1e-6)   # on the grid
        assert now < s.due + interval + 1e-9             # never more than one slot behind
    ks = [k for k, _ in starts]
    assert ks == sorted(set(ks))                          # each slot at most once: no bunching
    # every slot up to the last one started is accounted for: ran, missed, or skipped while dead
    assert s.k == len(starts) + s.missed + s.skipped
