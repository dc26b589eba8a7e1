"""How the loop shares the gaps between polls among its outputs (agent.output).

In every gap the loop asks its outputs in order (`Gaps.fill`, one output at a time, each in what
the ones before it left); an output starts a request only when the time left before the next
poll, less SAFETY_MARGIN, covers what its requests take (`Output.request_time`), and runs a
started one to its end. Each fill_gap call starts requests for DRAIN_SLICE at most, then the
loop's timers and signals get a turn. What the loop keeps per output (`_Turns`): when it last
had a chance to work, and, since the last summary, how many gaps could start a request and how
many requests made polls wait. With records waiting and no chance for STARVE_AFTER, an output
gets one request's time before the due poll (`Gaps.force`): a few late polls cost less than a
spool that fills up and drops the oldest data.
"""
import time

from agent import log as agentlog
from agent import output

# Seconds left free between the end of an output's slice and the next poll: its last request
# must be over before the bus needs the CPU again.
SAFETY_MARGIN = 0.05
# A fill_gap call starts requests for at most this long, so SIGTERM/SIGHUP and the timers are
# served between calls in a long gap. It never limits a request: a started one runs to its end.
DRAIN_SLICE = 1.0
# Don't start a request in a gap shorter than this: one HTTP round trip would not fit.
MIN_DRAIN_GAP = 0.02
# With records waiting and no gap between polls long enough for an output to start a request for
# this long (its measured request time is longer than every gap), the loop takes one request's
# time from polling for that output.
STARVE_AFTER = 10.0

log = agentlog.get("loop")


class _Turns:
    """What the loop keeps about one output's gaps."""

    __slots__ = ("last_chance", "windows", "forced")

    def __init__(self, now):
        self.last_chance = now    # last time it could start a request (or had nothing to do)
        self.windows = 0          # gaps long enough to start one in, since the last summary
        self.forced = 0           # requests that made polls wait, since the last summary


class Gaps:
    """The outputs, in the order they are asked, and each one's gap record. `mono`: the loop's
    clock (a test's, maybe); outputs keep time.monotonic(), translated here."""

    def __init__(self, outputs, mono=time.monotonic):
        self.mono = mono
        self.outputs = list(outputs)
        self.turns = {out.name: _Turns(mono()) for out in self.outputs}
        self.starve_after = STARVE_AFTER

    def replace(self, old, new):
        """Put output `new` in place of `old` (either may be None); the gap record carries over
        when the name is the same."""
        i = self.outputs.index(old) if old is not None else 0
        self.outputs = [o for o in self.outputs if o is not old]
        if new is not None:
            self.outputs.insert(i, new)
            self.turns.setdefault(new.name, _Turns(self.mono()))
        elif old is not None:
            del self.turns[old.name]

    def forced(self):
        return sum(t.forced for t in self.turns.values())

    def starving(self, now):
        """The outputs that have had no chance to work for starve_after."""
        return [out for out in self.outputs if now - self.turns[out.name].last_chance >= self.starve_after]

    def fill(self, out, spool, until, periodic, stopping, holding_back=False):
        """`out` works in the gap before `until` (the loop's clock). `periodic(now)`: the loop's
        timers, run between slices; `stopping()`: no further request once true; `holding_back`:
        the output is to wait on purpose (linger), which is not starving. Returns when the spool
        is empty, the output backs off, or no further request fits."""
        turns = self.turns[out.name]
        if holding_back:
            turns.last_chance = self.mono()
            return
        while not stopping():
            now = self.mono()
            periodic(now)
            end = until - SAFETY_MARGIN
            if end - now < MIN_DRAIN_GAP:
                return
            if end - now >= out.request_time():
                turns.windows += 1
            # The output's own clock (time.monotonic): the loop's may be a test's.
            t = time.monotonic()
            try:
                res = out.fill_gap(spool, t + (end - now), t + DRAIN_SLICE, stop=stopping)
            except Exception:  # an output handles its own network errors; anything else is a bug
                log.exception("%s failed", out.label or out.name)
                return
            status = res.get("status")
            if status in (output.EMPTY, output.BACKOFF) or res.get("batches"):
                turns.last_chance = self.mono()
            if status != output.SLICE:
                return   # empty, backing off, or no further request fits before the poll

    def force(self, out, spool, now, periodic, stopping, holding_back=False):
        """`out` has had no gap for starve_after while records wait: give one request its time
        before the due poll (which is then late, and the schedule counts what it misses)."""
        turns = self.turns[out.name]
        # + MIN_DRAIN_GAP: the output checks the time left on its own clock a moment later
        need = out.request_time() + SAFETY_MARGIN + MIN_DRAIN_GAP
        label = out.label or out.name
        if not turns.forced:
            log.warning("no gap of %.2fs between polls to %s in for %gs: polls wait for one %s "
                        "every %gs (intervals are too short for this bus and uplink)",
                        need, label, self.starve_after, label, self.starve_after)
        turns.forced += 1
        turns.last_chance = now   # at most one forced request per starve_after
        self.fill(out, spool, now + need, periodic, stopping, holding_back)

    def retry_at(self):
        """When the first backing-off output may try again (loop clock), +inf when none is."""
        at = float("inf")
        for out in self.outputs:
            t = out.retry_at()
            if t is not None:
                at = min(at, self.mono() + (t - time.monotonic()))
        return at

    def period(self):
        """[(output, forced, windows)] since the last call, for the summary line; starts anew."""
        rows = [(out, self.turns[out.name].forced, self.turns[out.name].windows) for out in self.outputs]
        for turns in self.turns.values():
            turns.windows = turns.forced = 0
        return rows


def lingering(upload, spool):
    """`[upload] linger` (0 = upload in every gap): let a small backlog wait until its oldest
    record is that old or a full batch is ready. Every POST costs the router's CPU the same few
    milliseconds whatever its size, so fewer, fuller batches mean less CPU; a catch-up is never
    held back (its oldest record is old). `upload`: the [upload] settings, read live."""
    linger = upload.linger
    if linger <= 0:
        return False
    try:
        sp = spool.stats()
    except Exception:
        return False
    age = sp.get("oldest_age")
    return (sp.get("records") or 0) < upload.batch_max_records and (age is None or age < linger)
