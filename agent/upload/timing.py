"""How long a request takes: the estimate that decides which gaps between polls can start one.

A request is only STARTED when the time left before the next poll covers what such a request
has been measured to take (`RequestTimes.need`): the 90th percentile of the last RECENT answered
requests on a kept-alive connection, or of those that had to open a connection when none is
open (a cold request also pays the TCP/TLS handshake); before anything is measured, small
priors (REQUEST_PRIOR, + CONNECT_PRIOR when cold) that fit the gap of a 100 ms poll, so the
first records go out in the first gap. A receiver answering in 2 ms gets requests in any gap of
a few ms (the loop's margin aside), a WAN collector answering in 400 ms only in gaps that long.
A percentile, not a mean: a poll made late by an outlier costs more than a gap left unused.
A request that gets no answer (timeout, reset, refused) sets a floor under the estimate of the
time it took, so after a collector that accepts and hangs the next retry waits for a gap that
long instead of overrunning every short one. A gap left unused only because of the estimate,
when it was at least half the estimate, ages the measurements (`age`), so one slow answer or one
hung request cannot starve uploads for good; gaps far shorter than the measured requests age
nothing, and the loop's starvation rule (agent.gaps) takes over.
"""
import collections

# Before any request is measured: a LAN or loopback round trip with a small body on a slow CPU.
# Small enough to fit the gap of a 100 ms poll (the loop keeps 50 ms free before each poll): the
# first records go out at once; a slower collector costs one late poll, then it is measured.
REQUEST_PRIOR = 0.02
CONNECT_PRIOR = 0.01    # what a new connection adds, until one has been measured
RECENT = 20             # answered requests remembered per kind (kept-alive / new connection)
PERCENTILE = 0.9        # of those, the duration a gap must hold (of 20: the second longest)
CONNECT_MIN = 0.2       # a connect bounded by a short gap still gets this long (a SYN over 3G)
ESTIMATE_DECAY = 0.8    # a gap skipped only because of the estimate ages the measurements so
DECAY_GAP = 0.5         # ... when the gap was at least this fraction of the estimate


class RequestTimes:
    """Recent request durations, on a kept-alive connection (warm) and with a new one (cold),
    and the floor a request without an answer left (it took that long and taught nothing)."""

    __slots__ = ("warm", "cold", "floor", "alive")

    def __init__(self):
        self.warm = collections.deque(maxlen=RECENT)
        self.cold = collections.deque(maxlen=RECENT)
        self.floor = 0.0
        self.alive = False      # a kept-alive connection should be open

    def need(self):
        """The time a gap must still have for a request to start (seconds): what recent
        requests of the kind the next one will be (on the kept-alive connection, or opening
        one) took, at least the floor an unanswered request left."""
        warm = _percentile(self.warm)
        if warm is None:    # a request that opened a connection bounds one that reuses it
            warm = _percentile(self.cold)
        if warm is None:
            warm = REQUEST_PRIOR
        if self.alive:
            need = warm
        else:
            need = _percentile(self.cold)
            if need is None:
                need = warm + CONNECT_PRIOR
        return max(need, self.floor)

    def answered(self, cold, took):
        """A request got its answer after `took` seconds (`cold`: it opened the connection)."""
        (self.cold if cold else self.warm).append(took)
        self.floor = 0.0

    def unanswered(self, took):
        """A request ended without an answer after `took` seconds: no gap shorter than that."""
        self.alive = False
        self.floor = max(self.floor, took)

    def age(self):
        """A gap was left unused because of the estimate: make the measurements a little
        shorter (one slow answer must not keep every later gap idle for good)."""
        self.warm = collections.deque((d * ESTIMATE_DECAY for d in self.warm), maxlen=RECENT)
        self.cold = collections.deque((d * ESTIMATE_DECAY for d in self.cold), maxlen=RECENT)
        self.floor *= ESTIMATE_DECAY


def _percentile(durations):
    """The PERCENTILE of `durations` (None when empty): of 20, the second longest."""
    if not durations:
        return None
    d = sorted(durations)
    return d[min(len(d) - 1, int(PERCENTILE * len(d)))]

