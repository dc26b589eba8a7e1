"""Per-device health counters: what `modbus-agent status` prints and what goes upstream as
`"kind": "health"` records.

Counters are cumulative since the agent started; a reload keeps them for devices whose name
did not change. Failures are split by who detected them (agent.modbus.errors): timeouts, CRC
errors, frame errors, lost connections, and exception responses by exception code.

Exceptions are counted per refused block (a poll whose two blocks are refused with code 2
counts 2 under "2"). A poll is ok (every block answered), partial (some blocks answered, others
were refused: the device is alive; `refused_blocks` says how many were refused at the last poll)
or failed (no block gave data); polls_ok + polls_partial + polls_failed = polls run.
"""

_KIND_COUNTER = {
    "timeout": "timeouts",
    "crc": "crc_errors",
    "frame": "frame_errors",
    "connection": "connection_errors",
}


class Health:
    __slots__ = ("device", "unit", "polls_ok", "polls_partial", "refused_blocks", "polls_failed",
                 "consecutive_failures",
                 "last_success", "last_failure", "last_error", "timeouts", "crc_errors",
                 "frame_errors", "connection_errors", "other_errors", "exceptions",
                 "busy_retries", "missed_cycles", "skipped_cycles", "dead", "last_duration")

    def __init__(self, device, unit):
        self.device = device
        self.unit = unit
        self.polls_ok = 0
        self.polls_partial = 0
        self.refused_blocks = 0      # blocks refused at the last poll that got an answer
        self.polls_failed = 0
        self.consecutive_failures = 0
        self.last_success = None     # wall-clock seconds of the last good poll
        self.last_failure = None
        self.last_error = None       # the error's message (with unit, fc, address, hex dump)
        self.timeouts = 0
        self.crc_errors = 0
        self.frame_errors = 0
        self.connection_errors = 0
        self.other_errors = 0
        self.exceptions = {}         # exception code -> count (Modbus spec section 7)
        self.busy_retries = 0
        self.missed_cycles = 0
        self.skipped_cycles = 0
        self.dead = False
        self.last_duration = None    # seconds the last poll took

    def ok(self, t, duration=None):
        self.polls_ok += 1
        self.refused_blocks = 0
        self.consecutive_failures = 0
        self.last_success = t
        self.dead = False
        self.last_duration = duration

    def partial(self, refused, t, duration=None):
        """Count a poll in which some blocks answered and others were refused
        (`refused`: agent.device.Refused)."""
        self.polls_partial += 1
        self.consecutive_failures = 0
        self.last_success = t
        self.last_failure = t
        self.dead = False
        self.last_duration = duration
        self.last_error = refused.summary()
        self._count_refusals(refused)

    def _count_refusals(self, refused):
        self.refused_blocks = len(refused.failures)
        for _r, e in refused.failures:
            self.exceptions[e.code] = self.exceptions.get(e.code, 0) + 1

    def failed(self, err, t, duration=None):
        """Count a failed poll. `err` is a ModbusError (or any exception); a Refused one (every
        block refused) counts each block's exception."""
        self.polls_failed += 1
        self.consecutive_failures += 1
        self.last_failure = t
        self.last_duration = duration
        kind = getattr(err, "kind", None)
        if getattr(err, "failures", None):
            self.last_error = err.summary()
            self._count_refusals(err)
        elif kind == "exception":
            self.last_error = str(err) or type(err).__name__
            code = getattr(err, "code", None)
            self.exceptions[code] = self.exceptions.get(code, 0) + 1
        else:
            self.last_error = str(err) or type(err).__name__
            name = _KIND_COUNTER.get(kind)
            if name is None:
                self.other_errors += 1
            else:
                setattr(self, name, getattr(self, name) + 1)

    def snapshot(self, utc=None):
        """JSON-ready dict. `utc` formats wall-clock times (agent.record.utc_timestamp)."""
        def when(t):
            if t is None:
                return None
            return utc(t) if utc else t
        return {
            "polls_ok": self.polls_ok,
            "polls_partial": self.polls_partial,
            "refused_blocks": self.refused_blocks,
            "polls_failed": self.polls_failed,
            "consecutive_failures": self.consecutive_failures,
            "last_success": when(self.last_success),
            "last_failure": when(self.last_failure),
            "last_error": self.last_error,
            "timeouts": self.timeouts,
            "crc_errors": self.crc_errors,
            "frame_errors": self.frame_errors,
            "connection_errors": self.connection_errors,
            "other_errors": self.other_errors,
            # JSON object keys are strings; exception codes stay readable ("6": 3)
            "exceptions": {str(k): v for k, v in sorted(self.exceptions.items(), key=lambda kv: str(kv[0]))},
            "busy_retries": self.busy_retries,
            "missed_cycles": self.missed_cycles,
            "skipped_cycles": self.skipped_cycles,
            "dead": self.dead,
            "last_duration_ms": None if self.last_duration is None else round(self.last_duration * 1000.0, 1),
        }
