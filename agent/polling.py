"""One poll of one device and what its outcome does: the record it spools, its health, its
schedule, the log lines (once per change, not per cycle), on_change and the heartbeat.

agent.loop decides WHEN a device is polled; `Poller.poll` does the poll and handles the outcome:
  - every block answered: an ok record (on_change: only when a value moved beyond its deadband,
    or the heartbeat is due; `moved`);
  - some blocks refused with an exception response (agent.device.Refused): the device answered,
    it is alive; a "partial" record, or an error record listing the blocks when none gave data;
    each refused block is logged once, and once more when it answers again;
  - no answer (timeout, CRC, frame, connection: a ModbusError) or a bug: an error record, the
    failure counted; after `dead_after` in a row the schedule only probes the device;
  - a device that answers again after a connection failure revives the dead devices on the same
    connection (they are probed on their next slot, not after their back-off).
"""
import logging
import time

from agent import log as agentlog
from agent.device import Refused, point_names, refusal_hint
from agent.health import Health
from agent.modbus.errors import ModbusError
from agent.record import buffered_record, data_record, error_record, partial_record
from agent.schedule import DeviceSchedule

log = agentlog.get("loop")


def _where(dev):
    return agentlog.where(dev.name, dev.unit)


def moved(old, new, deadbands):
    """on_change: does `new` differ from the last sent `old` beyond the points' deadbands?

    A numeric value counts as moved when |new - old| > deadband (deadband 0: any change);
    anything else (strings, bools, None, a point appearing or vanishing) when it differs."""
    if old is None or old.keys() != new.keys():
        return True
    for name, value in new.items():
        prev = old[name]
        if value == prev:
            continue
        band = deadbands.get(name) or 0.0
        if (band and type(value) in (int, float) and type(prev) in (int, float)):
            if abs(value - prev) > band:
                return True
            continue
        return True
    return False


class DeviceState:
    """Everything the loop keeps about one device between cycles."""

    __slots__ = ("device", "schedule", "health", "deadbands", "last_sent", "last_sent_at",
                 "next_health", "summary_ok", "summary_failed", "was_failing", "missed_logged_at",
                 "last_error_kind", "last_sent_slot", "refused", "pending", "started")

    def __init__(self, device, start, agent_cfg, health=None):
        self.device = device
        self.schedule = DeviceSchedule(start, device.interval,
                                       dead_after=agent_cfg.dead_after,
                                       backoff_max=agent_cfg.dead_backoff_max)
        self.health = health or Health(device.name, device.unit)
        self.deadbands = {p.name: p.deadband or 0.0 for p in device.points}
        self.last_sent = None         # values of the last record sent (on_change)
        self.last_sent_at = None      # monotonic time it was sent
        self.last_sent_slot = None    # start of the schedule slot of that poll (heartbeat)
        self.next_health = start + agent_cfg.health_interval
        self.summary_ok = 0
        self.summary_failed = 0
        self.was_failing = False
        self.missed_logged_at = None
        self.last_error_kind = None   # "connection", "timeout", ... of the last failure
        self.refused = {}             # (function, address, count) -> exception code, as logged
        self.pending = []             # buffer = N: [(wall time, values)] not yet in a record
        self.started = False          # a poll has given data since start (first = on_change)


class Poller:
    """Polls devices for the loop: `states` (the loop's DeviceState list, for the siblings on
    a connection), `append(record)` (the loop's spool append), `client_for(connection)` (the
    loop's one client per connection)."""

    def __init__(self, agent_id, states, append, client_for, mono=time.monotonic, wall=time.time):
        self.agent_id = agent_id
        self.states = states
        self.append = append
        self.client_for = client_for
        self.mono = mono
        self.wall = wall

    def poll(self, st, now, log_every):
        """Poll `st`'s device once (its slot is due at `now`), record the outcome, move its
        schedule. `log_every`: say missed cycles at WARNING at most this often."""
        dev = st.device
        sched = st.schedule
        missed = sched.catch_up(now)
        if missed:
            # an overloaded bus misses cycles every time: say it once per summary period, the
            # summary line and the status file carry the running count
            level = logging.DEBUG
            if st.missed_logged_at is None or now - st.missed_logged_at >= log_every:
                st.missed_logged_at = now
                level = logging.WARNING
            log.log(level, "missed %d cycle(s) (interval %gs, %d so far): the loop was busy elsewhere",
                    missed, dev.interval, sched.missed, extra=_where(dev))
        t = self.wall()
        t0 = self.mono()
        alive = True
        # back after a lost link or as a dead device: it may be another one now (identify again)
        reconnected = st.was_failing and (st.schedule.dead or st.last_error_kind == "connection")
        try:
            client = self.client_for(dev.connection)
            values = self._poll_once(st, client)
        except Refused as e:      # the device answered, refusing some blocks: alive
            self._refused(st, t, e, self.mono() - t0)
        except ModbusError as e:
            alive = False
            self._failed(st, t, e, self.mono() - t0)
        except Exception as e:  # a bug must cost one reading, not the agent
            alive = False
            log.exception("poll raised %s", type(e).__name__, extra=_where(dev))
            self._failed(st, t, e, self.mono() - t0)
        else:
            self._succeeded(st, t, values, self.mono() - t0)
        if alive and dev.identify and (st.health.identity is None or reconnected):
            self._identify(st, client)
        end = self.mono()
        # the one back-off of this device/connection pair (see the module docstring)
        cap = dev.connection.backoff_max if st.last_error_kind == "connection" else None
        sched.done(end, alive, cap)
        st.health.missed_cycles = sched.missed
        st.health.skipped_cycles = sched.skipped
        if sched.dead and not st.health.dead:
            log.warning("no answer %d times in a row: probing with back-off up to %gs so the others keep "
                        "their cadence", sched.failures, sched.backoff_limit, extra=_where(dev))
        st.health.dead = sched.dead

    def _identify(self, st, client):
        """Read device identification (FC 43 / MEI 14) after the first poll the device answered,
        and again when it answers after a lost connection or as a dead device (it may have been
        replaced): its vendor, product code and revision go into its health records. A device
        without it (exception 1, or silence) is asked no more often than that."""
        dev = st.device
        try:
            st.health.identity = client.identify(dev.unit)
            log.info("identification: %s", ", ".join(
                "%s %s" % kv for kv in st.health.identity["objects"].items()), extra=_where(dev))
        except ModbusError as e:
            code = getattr(e, "code", None)
            st.health.identity = {"error": e.describe(), **({"code": code} if code else {})}
            log.debug("no identification: %s", e, extra=_where(dev))
        except Exception as e:   # a client without it, a bug: never the poll's problem
            st.health.identity = {"error": "%s: %s" % (type(e).__name__, e)}

    def _poll_once(self, st, client):
        """One poll; a busy block (exception 5/6) is asked once more by Device.poll, counted here."""
        dev = st.device
        before = dev.busy_retries
        try:
            return dev.poll(client)
        finally:
            if dev.busy_retries != before:
                st.health.busy_retries += dev.busy_retries - before
                log.debug("busy, asked again %d time(s)", dev.busy_retries - before, extra=_where(dev))

    def _succeeded(self, st, t, values, duration, refused=None):
        """A poll that gave data: every block (`refused` None) or some (agent.device.Refused)."""
        dev = st.device
        if refused is None:
            st.health.ok(t, duration)
            st.summary_ok += 1
            if st.refused:
                self._log_refusals(st, None)
        else:
            st.health.partial(refused, t, duration)
        self._answered(st)
        if dev.mode == "on_change":
            # the heartbeat counts in schedule slots (the due time of this cycle), not in when
            # the append happened: a poll that ends a little earlier than the one that sent
            # must not push the heartbeat a whole interval late
            slot = st.schedule.due
            if not st.started and dev.first == "on_change" and refused is None:
                # first = on_change: the first reading after start is the baseline, not news
                st.started = True
                st.last_sent, st.last_sent_at, st.last_sent_slot = values, self.mono(), slot
                return
            heartbeat = dev.heartbeat or 0.0
            due_heartbeat = (heartbeat > 0 and st.last_sent_slot is not None
                             and slot - st.last_sent_slot >= heartbeat - 1e-6)
            if not (due_heartbeat or moved(st.last_sent, values, st.deadbands)):
                return
            st.last_sent = values
            st.last_sent_at = self.mono()
            st.last_sent_slot = slot
        st.started = True
        if refused is None:
            if dev.buffer > 1:
                st.pending.append((t, values))
                if len(st.pending) >= dev.buffer:
                    self.flush(st)
                return
            self.append(data_record(self.agent_id, t, dev.name, dev.unit, values))
        else:
            self.flush(st)
            self.append(partial_record(self.agent_id, t, dev.name, dev.unit, values, refused.errors()))

    def flush(self, st):
        """`buffer = N`: the polls not yet recorded go out as one record now (before a partial
        or error record, so seq order stays time order; at a reload or stop, so none is lost)."""
        if not st.pending:
            return
        dev, pending = st.device, st.pending
        st.pending = []
        if len(pending) == 1:
            self.append(data_record(self.agent_id, pending[0][0], dev.name, dev.unit, pending[0][1]))
        else:
            self.append(buffered_record(self.agent_id, pending, dev.name, dev.unit))

    def flush_all(self):
        for st in self.states:
            self.flush(st)

    def _answered(self, st):
        """The device answered (data or an exception response): after failures, say so once and
        probe the dead devices that share its connection soon."""
        if st.was_failing:
            log.info("answering again", extra=_where(st.device))
            st.was_failing = False
            self._revive_siblings(st)

    def _refused(self, st, t, err, duration):
        """The device answered, refusing some blocks (agent.device.Refused): a partial record,
        or, when no block gave data, an error record listing them all. Alive either way."""
        self._log_refusals(st, err)
        if err.values:
            self._succeeded(st, t, err.values, duration, err)
            return
        dev = st.device
        st.health.failed(err, t, duration)
        st.summary_failed += 1
        st.last_sent = None
        self._answered(st)
        st.last_error_kind = err.kind
        self.flush(st)
        self.append(error_record(self.agent_id, t, dev.name, dev.unit, err, err.errors()))

    def _log_refusals(self, st, err):
        """Say once which blocks the device refuses (and what to change), and once when a
        refused block answers again; not every cycle (a router's logread is small)."""
        dev = st.device
        now = {}
        if err is not None:
            for r, e in err.failures:
                now[(r.function, r.address, r.count)] = (r, e)
        for key, (r, e) in now.items():
            if st.refused.get(key) == e.code:
                continue
            hint = refusal_hint(dev, r, e.code)
            log.warning("refuses fc %02d %s %d+%d (%s) with exception code %d %s%s; %s",
                        r.function, r.table, r.address, r.count, point_names(r), e.code, e.name,
                        ": " + hint if hint else "",
                        "records are \"partial\": the other blocks are read" if err.values else
                        "no block gives data, but the device answers: it is not dead", extra=_where(dev))
        for key in list(st.refused):
            if key not in now:
                log.info("fc %02d address %d+%d answers again", key[0], key[1], key[2], extra=_where(dev))
        st.refused = {key: e.code for key, (r, e) in now.items()}

    def _revive_siblings(self, st):
        """The connection works again: dead devices on it that failed because the link was down
        (a gateway reboot, a cable) are probed on their next slot, not after their back-off."""
        now = self.mono()
        name = st.device.connection.name
        for other in self.states:
            if (other is not st and other.schedule.dead and other.last_error_kind == "connection"
                    and other.device.connection.name == name):
                other.schedule.probe_soon(now)
                other.health.skipped_cycles = other.schedule.skipped

    def _failed(self, st, t, err, duration):
        dev = st.device
        h = st.health
        st.last_error_kind = err.kind if isinstance(err, ModbusError) else None
        first = h.consecutive_failures == 0
        h.failed(err, t, duration)
        st.summary_failed += 1
        st.last_sent = None  # on_change: the next good reading is news
        st.was_failing = True
        if first:
            log.warning("poll failed: %s", err, extra=_where(dev))
        else:
            log.debug("poll failed again (%d): %s", h.consecutive_failures, err, extra=_where(dev))
        if isinstance(err, ModbusError):
            rec = error_record(self.agent_id, t, dev.name, dev.unit, err)
        else:
            rec = error_record(self.agent_id, t, dev.name, dev.unit,
                               {"kind": "agent", "message": "%s: %s" % (type(err).__name__, err)})
        self.flush(st)
        self.append(rec)
