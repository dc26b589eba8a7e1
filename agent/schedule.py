"""When each device is polled next: a drift-free slot schedule with dead-device back-off.

Pure: every method takes `now` (monotonic seconds) from the caller and touches no clock.

Slots: cycle k of a device starts at `start + k * interval`. Errors never accumulate because the
next due time is computed from k, not from when the last poll happened to end.

Late cycles: a cycle may start late as long as it still starts before the *next* slot begins;
once a whole slot has passed it is counted in `missed` and skipped. So an overloaded bus or a
stalled upload costs readings that are reported, never a burst of back-to-back polls
("counted, not bunched").

Dead devices: after `dead_after` consecutive failed cycles the device is only probed, with the
wait doubling from one interval up to `backoff_max` (or the lower cap the caller passes to
`done`, e.g. a connection's reconnect back-off), always on a slot boundary. This is the only
back-off of a device: the loop's Modbus clients never refuse a request the schedule decided to
send (agent.modbus.client `down_hold`: only the rest of the sweep after a failed connect), so a
device that comes back is noticed at most
`backoff_max` + one interval after it does. Slots passed over
on purpose are counted in `skipped`, not `missed`. The first success makes it live again.
A probe that would make a live device late can be deferred to a later slot (`defer`), which
spreads the probes of several dead devices over the slots instead of stacking their timeouts.
"""
import math


class DeviceSchedule:
    __slots__ = ("start", "interval", "dead_after", "backoff_max", "_k", "due", "missed", "skipped",
                 "failures", "backoff", "deferred_since", "backoff_limit")

    def __init__(self, start, interval, dead_after=3, backoff_max=300.0):
        if interval <= 0:
            raise ValueError("interval must be > 0, got %r" % (interval,))
        self.start = float(start)
        self.interval = float(interval)
        self.dead_after = max(1, int(dead_after))
        self.backoff_max = max(float(backoff_max), self.interval)
        self.k = 0            # index of the next cycle to run (sets `due`)
        self.missed = 0       # slots that passed while we were busy elsewhere
        self.skipped = 0      # slots passed over on purpose while the device is dead
        self.failures = 0     # consecutive failed cycles
        self.backoff = 0.0    # current probe wait while dead, seconds (0 when live)
        self.deferred_since = None  # due time of a probe that has been deferred, else None
        self.backoff_limit = self.backoff_max  # cap of the current back-off (see done)

    @property
    def k(self):
        """Index of the next cycle to run."""
        return self._k

    @k.setter
    def k(self, k):
        self._k = k
        # `due`, the monotonic time cycle k starts, is a plain attribute: the loop reads it for
        # every device at every step, and a property call costs more than the arithmetic
        self.due = self.start + k * self.interval

    @property
    def dead(self):
        return self.failures >= self.dead_after

    def lateness(self, now):
        """How late a cycle starting at `now` is, seconds (>= 0)."""
        return max(0.0, now - self.due)

    def slot_at(self, now):
        """Index of the slot `now` falls in (the last slot that has begun)."""
        # the epsilon keeps float rounding (10.2 - 10.0) / 0.1 = 1.999... in the right slot
        return int(math.floor((now - self.start) / self.interval + 1e-9))

    def catch_up(self, now):
        """Before starting a cycle at `now`: if whole slots have passed since the due one,
        count them as missed and move to the current slot. Returns the number missed."""
        current = self.slot_at(now)
        if current > self.k:
            n = current - self.k
            self.missed += n
            self.k = current
            return n
        return 0

    def defer(self, now):
        """Do not run the due cycle now: move to the next slot that starts after `now`; the slots
        passed over are counted in `skipped`. Returns the next due time."""
        if self.deferred_since is None:
            self.deferred_since = self.due
        nxt = max(self.k + 1, self.slot_at(now) + 1)
        self.skipped += nxt - self.k
        self.k = nxt
        return self.due

    def probe_soon(self, now):
        """A dead device's link is known to work again (another device on the same connection
        answered): probe it on the next slot instead of waiting out its back-off."""
        nxt = self.slot_at(now) + 1
        if nxt < self.k:
            self.skipped -= self.k - nxt   # counted in advance by done(), not skipped after all
            self.k = nxt
        return self.due

    def deferred_for(self, now):
        """Seconds since the deferred probe was first due (0 when nothing is deferred)."""
        return 0.0 if self.deferred_since is None else now - self.deferred_since

    def done(self, now, ok, backoff_max=None):
        """The cycle that was due has run (ended at `now`); pick the next slot. `ok`: the
        device answered. `backoff_max`: a lower cap for this failure's back-off (never below
        one interval). Returns the next due time."""
        self.deferred_since = None
        if ok:
            self.failures = 0
            self.backoff = 0.0
        else:
            self.failures += 1
        nxt = self.k + 1
        if self.dead:
            # Exponential back-off from one interval, capped; on a slot boundary so the probe
            # keeps the device's phase and never lands between other devices' slots at random.
            exp = self.failures - self.dead_after
            cap = self.backoff_max
            if backoff_max is not None:
                cap = max(self.interval, min(cap, float(backoff_max)))
            self.backoff_limit = cap
            self.backoff = min(self.interval * (2.0 ** min(exp, 60)), cap)
            slots = max(1, int(math.ceil(self.backoff / self.interval - 1e-9)))
            self.skipped += slots - 1
            nxt = self.k + slots
        self.k = nxt
        # The poll itself may have overrun slots (slow device, long timeout): those are missed.
        self.catch_up(now)
        return self.due
