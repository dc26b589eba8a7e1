"""Per-device health counters: what `modbus-agent status` prints and what goes upstream as
`"kind": "health"` records.

Counters are cumulative since the agent started; a reload keeps them for devices whose name
did not change. Failures are split by who detected them (agent.modbus.errors): timeouts, CRC
errors, frame errors, lost connections, and exception responses by exception code.

Exceptions are counted per refused block (a poll whose two blocks are refused with code 2
counts 2 under "2"). A poll is ok (every block answered), partial (some blocks answered, others
were refused: the device is alive; `refused_blocks` says how many were refused at the last poll)
or failed (no block gave data); polls_ok + polls_partial + polls_failed = polls run.

`identity`: what the device answered to read device identification (FC 43 / MEI 14, asked once
after the first poll that got an answer, agent.polling), or why not.

The agent's own figures (`SelfMonitor`, the "agent" object of every health record): CPU time
(total, share of one core and per poll over the last health interval), resident memory, load
average, free space where the spool is, the process's and the system's uptime. Read from
os.times(), /proc/self/statm, /proc/self/stat, os.getloadavg(), statvfs and /proc/uptime: a few
syscalls per health interval, no psutil.
"""
import os
import time

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
                 "busy_retries", "missed_cycles", "skipped_cycles", "dead", "last_duration",
                 "identity")

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
        self.identity = None         # FC 43 answer ({"conformity", "objects"} or {"error"}), None: not asked

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
            **({"identity": self.identity} if self.identity is not None else {}),
        }


def _page_kb():
    try:
        return os.sysconf("SC_PAGE_SIZE") // 1024
    except (ValueError, OSError, AttributeError):
        return 4


class SelfMonitor:
    """The agent's own health, for the "agent" object of health records. `snapshot(polls)`:
    `polls` is the number of polls run so far (all devices), for CPU time per poll."""

    def __init__(self, spool_dir, mono=time.monotonic, proc="/proc"):
        self.spool_dir = spool_dir
        self.mono = mono
        self.proc = proc
        self.started = mono()
        self._page_kb = _page_kb()
        self._last = (self.started, self._cpu(), 0)    # (mono, cpu seconds, polls) at the last snapshot

    @staticmethod
    def _cpu():
        t = os.times()
        return t.user + t.system

    def _read(self, name):
        try:
            with open(os.path.join(self.proc, name), "rb") as f:
                return f.read(256).split()
        except OSError:
            return None

    def snapshot(self, polls=0):
        now, cpu = self.mono(), self._cpu()
        t0, cpu0, polls0 = self._last
        self._last = (now, cpu, polls)
        used = cpu - cpu0
        out = {"cpu_s": round(cpu, 2),
               "cpu_pct": round(100.0 * used / (now - t0), 2) if now > t0 else None,
               "cpu_ms_per_poll": round(1000.0 * used / (polls - polls0), 2) if polls > polls0 else None}
        statm = self._read("self/statm")
        out["rss_kb"] = int(statm[1]) * self._page_kb if statm and len(statm) > 1 else None
        try:
            out["load"] = [round(x, 2) for x in os.getloadavg()]
        except (OSError, AttributeError):
            out["load"] = None
        try:
            st = os.statvfs(self.spool_dir)
            out["spool_free_mb"] = round(st.f_bavail * st.f_frsize / 1048576.0, 1)
        except OSError:
            out["spool_free_mb"] = None
        up = self._read("uptime")
        system = float(up[0]) if up else None
        out["uptime_s"] = round(self._process_age(system, now), 1)
        out["system_uptime_s"] = None if system is None else round(system, 1)
        return out

    def _process_age(self, system, now):
        """Seconds since the process started: boot-relative start time in /proc/self/stat
        (field 22, clock ticks) against /proc/uptime; else since this monitor was made."""
        try:
            with open(os.path.join(self.proc, "self/stat"), "rb") as f:
                fields = f.read(1024).rsplit(b")", 1)[1].split()
            return max(0.0, system - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
        except (OSError, IndexError, ValueError, TypeError, AttributeError):
            return now - self.started
