"""The alert state machine, pure: no clock, no database. The engine hands it observations and
the current time; it answers with the new state and the notifications to raise.

Per rule and series (agent, device, point) the state is one of
    inactive  nothing wrong (or a pending condition that went away before `for`)
    pending   the condition holds since `since`, not yet for `for`
    firing    it held for `for`; a "firing" notification went out
    resolved  it fired, then cleared; a "resolved" notification went out
Only firing and resolved are notified, each once per transition (reminders while firing are
`repeat`'s, evaluated by the engine).

Time. Sample-driven rules (threshold, error, backlog) run on the data's own timestamps: `for`
is measured between the samples' ts, so an hour of backlog uploaded at once replays what
happened in the order and at the times it happened, and records already evaluated (a ts not
after the series' last one) change nothing. Time-driven rules (silent, the gap rule's clearing,
reminders) are evaluated periodically against the collector's clock; see silent().
"""
import json

from agent.common import parse_utc

INACTIVE, PENDING, FIRING, RESOLVED = "inactive", "pending", "firing", "resolved"
ACTIVE = (PENDING, FIRING)


class State:
    """One row of alert_state. `version` counts changes (optimistic concurrency between collector
    processes: a change is written only if nobody changed the row since it was read)."""
    __slots__ = ("rule", "agent", "device", "point", "state", "since", "fired", "_value", "_text", "last_ts",
                 "seen", "notified", "changed", "version", "dirty")
    COLUMNS = ("rule", "agent", "device", "point", "state", "since", "fired", "value", "last_ts",
               "seen", "notified", "changed", "version")

    def __init__(self, rule, agent, device="", point="", state=INACTIVE, since=None, fired=None, value=None,
                 last_ts=None, seen=None, notified=None, changed=None, version=None):
        self.rule, self.agent, self.device, self.point = rule, agent, device, point
        self.state, self.since, self.fired = state, since, fired
        self._value, self._text = value, None
        self.last_ts, self.seen, self.notified, self.changed = last_ts, seen, notified, changed
        self.version = version      # None: no row yet
        self.dirty = False

    @property
    def value(self):
        if self._text is not None:   # read from the database, parsed when first asked for
            self._value, self._text = json.loads(self._text), None
        return self._value

    @value.setter
    def value(self, v):
        self._value, self._text = v, None

    def value_json(self):
        """The value as stored (JSON text), without parsing what was read."""
        if self._text is not None:
            return self._text
        return None if self._value is None else json.dumps(self._value)

    @classmethod
    def from_row(cls, r):
        st = cls(*r[:7], None, *r[8:])
        st._text = r[7]
        return st

    @property
    def key(self):
        return (self.rule, self.agent, self.device, self.point)

    def __repr__(self):
        return "State(%r, %s, since %s, value %r)" % (self.key, self.state, self.since, self.value)


class Event:
    """A notification to raise: `state` firing or resolved; `value` what caused it; `ts` the data
    time of that value (or, for time-driven rules, of the last record seen)."""
    __slots__ = ("rule", "state", "agent", "device", "point", "value", "ts", "since", "reminder", "at", "detail")

    def __init__(self, rule, st, state, value, ts, at, reminder=False, detail=None):
        self.rule, self.state, self.value, self.ts, self.at = rule, state, value, ts, at
        self.agent, self.device, self.point = st.agent, st.device or None, st.point or None
        self.since = st.since
        self.reminder = reminder
        self.detail = detail or {}

    def __repr__(self):
        return "Event(%s %s %s/%s/%s = %r at %s)" % (self.rule.name, self.state, self.agent, self.device,
                                                     self.point, self.value, self.ts)


def _seconds_between(a, b):
    ta, tb = parse_utc(a), parse_utc(b)
    return 0.0 if ta is None or tb is None else tb - ta


def observe(rule, st, ts, value, cond, clear, now):
    """One sample of a series: `cond` the firing condition holds, `clear` the resolving one (for
    a threshold with hysteresis both may be false: between `clear` and the limit). Changes `st`
    (st.dirty when it changed); returns an Event or None. Samples not newer than the series'
    last are ignored (an upload retried, a record older than what was already seen)."""
    if st.last_ts is not None and ts is not None and ts <= st.last_ts:
        return None
    state = st.state
    st.last_ts = ts   # written with the next transition: a sample that changes nothing costs no write
    if state == FIRING:
        if clear:
            st.state, st.value, st.changed, st.seen, st.dirty = RESOLVED, value, now, now, True
            return Event(rule, st, RESOLVED, value, ts, now)
        return None
    if not cond:
        if state == PENDING:
            st.state, st.since, st.changed, st.dirty = INACTIVE, None, now, True
        return None
    if state != PENDING:
        st.state, st.since, st.value, st.changed, st.seen, st.dirty = PENDING, ts, value, now, now, True
    if rule.for_ <= 0 or _seconds_between(st.since, ts) >= rule.for_:
        st.state, st.fired, st.value, st.notified, st.changed, st.seen = FIRING, ts, value, now, now, now
        st.dirty = True
        return Event(rule, st, FIRING, value, ts, now)
    return None


def event_fired(rule, st, value, ts, now, detail=None):
    """An event-like rule (gap): fire now, or keep firing (newest value, `seen` now)."""
    st.seen, st.last_ts, st.dirty = now, ts, True
    if st.state == FIRING:
        st.value = value
        return None
    st.state, st.since, st.fired, st.value, st.notified, st.changed = FIRING, ts, ts, value, now, now
    return Event(rule, st, FIRING, value, ts, now, detail=detail)


def silent(rule, device, agent_ts, now, up_since=None):
    """Is a device silent: (silent?, seconds, detail). `device`: its row of the devices table
    (last_ts = newest reading's ts, last_seen = server time its last record arrived), agent_ts:
    the newest ts of anything from its agent (readings and health records of any device).

    Two clocks, so that an agent with a backlog raises no false alarm:
    - data time: the device's newest reading is more than `for` behind its own agent's newest
      record. An agent catching up on an hour of spool uploads old records, but each device's
      readings keep pace with the agent's other records: not silent. A dead device behind a
      live agent falls behind the agent's health records and other devices: silent, whatever
      the backlog.
    - receive time: nothing at all arrived for the device for `for` (agent, router or link
      down): silent. Records of a backlog arriving count as arrivals. `up_since`: when this
      collector started; the time it was down itself does not count (its agents held their
      records meanwhile: a restart must not raise every device silent)."""
    last_ts = parse_utc(device.get("last_ts"))
    received_age = now - max(device["last_seen"], up_since if up_since is not None else float("-inf"))
    lag = None if agent_ts is None else (agent_ts - last_ts if last_ts is not None else float("inf"))
    detail = {"last_ts": device.get("last_ts"), "received_age_s": round(received_age, 1),
              "data_lag_s": None if lag is None or lag == float("inf") else round(lag, 1)}
    worst = max(received_age, lag if lag is not None and lag != float("inf") else 0.0)
    if received_age > rule.for_ or (lag is not None and lag > rule.for_):
        return True, round(worst if lag != float("inf") else received_age, 1), detail
    return False, round(worst, 1), detail
