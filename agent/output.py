"""What the loop asks of an output: somewhere the spool's records go, in the gaps between polls.

The loop (agent.loop) holds a list of outputs and, in every gap before the next poll, asks each
in turn to `fill_gap`; it never knows what an output does with the records. The spool keeps one
cursor per output, by `name` (agent.spool: a segment goes only when every output has
acknowledged it), so an output reads with `spool.peek(..., output=name)` and acknowledges with
`spool.ack(batch)`. agent.upload.Uploader (the HTTP output, "http") is the first one.

The rules every output keeps, because the bus comes first:
  - start a piece of work (a request) only when the time left before `until` covers what such
    a piece has been taking (`request_time`); never cut a started one short: it runs to its own
    deadline and the poll waits (a request cut short may have been stored but not acknowledged,
    and a collector slower than the gap would never get one acknowledged);
  - start nothing after `slice_end` (the loop's timers and signals get their turn) nor once
    `stop()` is true (SIGTERM, SIGHUP: the agent stops within one request);
  - an outage is the output's to handle (back-off, `retry_at`), never an exception into the loop.

The loop keeps, per output, whether it has had a gap to work in (`request_time` against the
gaps); an output that has had none for agent.gaps.STARVE_AFTER while records wait is given one
request's time before a poll (which is then late) rather than letting the spool fill up.
"""

# fill_gap's statuses: the gap is used up or the output has nothing to do in it ...
EMPTY = "empty"         # nothing left to send
DEADLINE = "deadline"   # the time left does not cover another request
BACKOFF = "backoff"     # backing off after a failure (retry_at says until when)
STOPPED = "stopped"     # stop() said so
# ... or it stopped at slice_end with more to do: the loop serves its timers and calls again
SLICE = "slice"


class Output:
    """The interface (the HTTP uploader is the model). Subclasses set `name` and implement
    `fill_gap` and `request_time`; the rest has defaults."""

    name = None     # the spool's cursor for this output ("http")
    label = None    # the word for it in the summary line (default: name)

    def fill_gap(self, spool, until, slice_end=None, stop=None):
        """Work in the gap before `until` (time.monotonic()) by the rules above. -> {"status":
        EMPTY|DEADLINE|BACKOFF|STOPPED|SLICE, "batches": n acknowledged, ...}."""
        raise NotImplementedError

    def request_time(self):
        """Seconds the time left in a gap must cover for this output to start a request."""
        raise NotImplementedError

    def retry_at(self):
        """time.monotonic() when a back-off ends (the loop wakes then if that is before the next
        poll), None when not backing off."""
        return None

    def state(self):
        """A dict for the status file and the summary line."""
        return {}

    def close(self):
        """Release connections and files (shutdown, or a reload that replaces the output)."""
