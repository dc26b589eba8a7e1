"""Records into the spool, for the loop: an append never raises into the loop.

- A write that fails (OSError: the spool already counted the record as lost) is logged once
  when it starts and once when it ends, not per reading (a router's logread is small).
- A value JSON cannot carry (an infinity a decoder let through, an odd type) must not stop the
  loop: procd would restart the agent into the same reading, forever. The reading becomes an
  error record (kind "agent") saying which values were wrong, with the reading's ts.
"""
import time

from agent import log as agentlog
from agent.record import error_record

log = agentlog.get("loop")


class Appender:
    """Counts what the loop appended (`appended`) and what it could not (`errors`)."""

    def __init__(self, agent_id, wall=time.time):
        self.agent_id = agent_id
        self.wall = wall
        self.appended = 0
        self.errors = 0
        self._failing = 0       # appends failing in a row

    def _failed(self, e, rec):
        self.errors += 1
        if not self._failing:
            log.error("spool append failed: %s: readings are lost while this lasts (logged once)", e,
                      extra=agentlog.where(rec.get("device"), rec.get("unit")))
        self._failing += 1

    def append(self, spool, rec):
        """Spool `rec`; never raises."""
        try:
            spool.append(rec)
            self.appended += 1
            if self._failing:
                log.warning("spool append works again after %d failed appends", self._failing)
                self._failing = 0
        except OSError as e:
            self._failed(e, rec)
        except (ValueError, TypeError, OverflowError) as e:
            # A value JSON cannot carry (an infinity a decoder let through, an odd type) must
            # not stop the loop: procd would restart the agent into the same reading, forever.
            # The reading becomes an error record (kind "agent") saying what was wrong.
            self.errors += 1
            self._unencodable(spool, rec, e)

    def _unencodable(self, spool, rec, e):
        device, unit = rec.get("device"), rec.get("unit")
        values = rec.get("values")
        bad = ""
        if isinstance(values, dict):
            bad = ", ".join("%s=%r" % (k, v) for k, v in values.items()
                            if not (v is None or type(v) in (str, bool, int) or
                                    (type(v) is float and v - v == 0.0)))
        message = "record cannot be encoded (%s: %s)%s" % (type(e).__name__, e, ": " + bad if bad else "")
        log.error("%s; spooled as an error record instead", message[:300], extra=agentlog.where(device, unit))
        err = error_record(self.agent_id, self.wall(), device, unit, {"kind": "agent", "message": message[:500]})
        err["ts"] = rec.get("ts") if isinstance(rec.get("ts"), str) else err["ts"]
        err.pop("clock", None)
        if rec.get("clock") == "unsynced":
            err["clock"] = "unsynced"
        try:
            spool.append(err)
            self.appended += 1
        except OSError as e2:
            self._failed(e2, err)
        except (ValueError, TypeError, OverflowError) as e2:
            log.error("spool append failed (%d so far): %s", self.errors, e2,
                      extra=agentlog.where(device, unit))
