"""`modbus-agent run`: the agent's main job, the whole loop in this one file. Beside it:
agent.polling (one poll and what its outcome does: record, health, schedule), agent.appender
(spool appends that never raise), agent.output (what the loop asks of an output in a gap;
agent.upload is the HTTP one), agent.gaps (how a gap is shared among the outputs, the
starvation rule), agent.summary (the summary line, the status file's content).

One thread, synchronous, no asyncio. Each turn of the loop does one step:

  1. pick the device whose next cycle is due first (agent.schedule: cycle k starts at
     start + k * interval on the monotonic clock; slots that passed are counted as missed);
  2. if it is due: poll it (`device.poll(client)`, one client per connection, shared by the
     devices on it), build a record (agent.record), apply on_change, `spool.append`;
  3. otherwise, in the gap before it is due: periodic work (health records, summary log line,
     status file), then each output's `fill_gap(spool, deadline)` (agent.output, agent.gaps;
     the HTTP uploader is one): requests start only while the time left before the next poll
     (less SAFETY_MARGIN) covers one, `spool.tick`, and sleep until the next due time (or the
     end of an output's back-off, when that comes first).

Services (agent.service; agent.gateway's Modbus TCP server of the cached readings) read no
spool: the sleep selects on their sockets too and serves them without ending, and each poll is
followed by one round of what is ready (SERVICE_SLICE when the next poll is already due), so a
request waits at most one poll and never makes one late.

Why this shape: a reading is appended to the spool before anything is uploaded, so a crash or a
dead collector never loses it; uploads only use time the bus does not need, so a day of backlog
drains without moving a single poll (complaint: catch-up that disturbs polling).

Dead-device isolation (complaint: one dead slave delays everybody): `device.poll` stops at the
first request nobody answers (timeout, CRC, frame, connection), so a failing device costs at most
its own timeout per cycle (one deadline per request, agent.modbus.client); a block the device
refuses with an exception response does not stop the poll: the device answered, it is alive,
and the record is "partial" (agent.device.Refused), logged once per refused block; on a shared
slot the devices that answered last time go first, failing ones after them; after `dead_after`
consecutive failures a device is only probed, with the wait doubling up to `dead_backoff_max`,
and a probe whose timeout would not fit before the next live device is due waits for a later
slot (so several dead devices never stack their timeouts). A busy answer (exception 6, or
5 ACKNOWLEDGE) is retried once after the connection's pause.

One back-off per device/connection pair: the schedule's. The loop's clients refuse a request
only within `down_hold` of a failed connect (half the shortest interval on that connection: the
rest of the same sweep, so the other units behind a dead gateway learn it at once instead of each
waiting out a connect timeout), never a device's own next probe, so every probe the schedule
decides on really goes out; for a lost connection the schedule's back-off is capped by
the connection's `backoff_max` as well as `dead_backoff_max`. A device that comes back is
noticed at most dead_backoff_max + one interval later.

Signals: SIGTERM/SIGINT finish the current step, flush and close the spool, exit 0.
SIGHUP reloads the config file; an invalid file is logged error by error and the old
config keeps running. Signals wake the sleep through `signal.set_wakeup_fd`.

Timestamps: `time.time()` at the start of the poll (UTC, ms); scheduling uses
`time.monotonic()` only, so an NTP step at boot never bunches or skips polls. Records taken
before the clock is set are flagged by agent.record (`"clock": "unsynced"`).
"""
import os
import select
import signal
import sys
import time

from agent import log as agentlog
from agent import notify
from agent.appender import Appender
from agent.config import redact
from agent.gaps import Gaps, lingering
from agent.outputs import build as build_outputs
from agent.polling import DeviceState, Poller
from agent.record import CLOCK_SANE, health_record, utc_timestamp
from agent.status import write_status
from agent.summary import status_doc, summary_line

# After a failed connect the other devices on that connection fail at once for this share of the
# shortest interval there (agent.modbus.client down_hold): the rest of the sweep, not the next poll.
LINK_DOWN_HOLD_SHARE = 0.5
# How often the status file is rewritten.
STATUS_PERIOD = 5.0
# With no device configured, wake up this often to upload and write status.
IDLE_PERIOD = 1.0
# Services (agent.service): they start no work this close to the next poll, and when the bus is
# saturated (the next poll already due) they get this long after each poll.
SERVICE_MARGIN = 0.002
SERVICE_SLICE = 0.002

log = agentlog.get("loop")



def clock_seq(wall=time.time):
    """First seq of a spool that has no state: the clock in milliseconds (never earlier than the
    release date), so a spool lost with its seq floor (tmpfs after a reboot) never hands out a seq
    the collector already holds for this agent. With the clock unset (no RTC, no NTP yet) the
    seq lease in `[agent] seq_file` is what keeps it beyond the earlier lives (agent.spool.lease)."""
    return int(max(wall(), CLOCK_SANE) * 1000)


def output_names(cfg, others=()):
    """The enabled outputs' names, one spool cursor each: those the config enables
    (agent.outputs: [upload]'s "http", [mqtt]'s "mqtt"), then `others`' (agent.output)."""
    from agent.outputs import configured_names

    names = configured_names(cfg)
    return names + tuple(out.name for out in others if out.name not in names)


def open_spool(cfg, outputs=None):
    """`outputs`: the names of the enabled outputs (default: output_names(cfg)); with none at
    all the spool keeps its default cursor, so the records wait for an output enabled later."""
    from agent.spool import Spool

    a = cfg.agent
    names = output_names(cfg) if outputs is None else tuple(outputs)
    cursors = {"outputs": names} if names else {}
    return Spool(a.spool_dir, a.id, fresh_seq=clock_seq, seq_file=a.seq_file, **cursors,
                 max_bytes=int(a.spool_max_mb * (1 << 20)),
                 max_age=a.spool_max_age,
                 segment_bytes=int(a.spool_segment_kb * 1024),
                 fsync=a.fsync,
                 fsync_interval=a.fsync_interval)


def make_uploader(cfg):
    if cfg.upload is None:
        return None
    from agent.upload import Quarantine, Uploader

    u = cfg.upload
    return Uploader(u.url, cfg.agent.id, token=u.token, batch_max_records=u.batch_max_records,
                    batch_max_kb=u.batch_max_kb, gzip=u.gzip, timeout=u.timeout, ca_file=u.ca_file,
                    verify=u.verify, backoff_max=u.backoff_max,
                    quarantine=Quarantine(u.quarantine_file))


def make_services(cfg, states=()):
    """The services the config asks for (agent.service): [gateway]'s, when there is one."""
    from agent.gateway import make_gateway

    gw = make_gateway(cfg, states)
    return [gw] if gw is not None else []


class Loop:
    """`uploader`: [upload]'s output (default: built from cfg); `outputs`: any others;
    `services`: agent.service.Service list (default: built from cfg, make_services)."""

    #: systemd notify / procd watchdog (agent.notify): READY from run, WATCHDOG from periodic,
    #: STOPPING at shutdown
    notifier = notify.NULL

    def __init__(self, cfg, spool=None, uploader=None, mono=time.monotonic, wall=time.time, outputs=(),
                 services=None):
        self.mono = mono
        self.wall = wall
        self.cfg = cfg
        # the outputs the config enables besides [upload]'s (agent.outputs: [mqtt]), by name
        self._configured = build_outputs(cfg, skip=("http",))
        self._extra = list(outputs)         # given by the caller, not rebuilt on reload
        self.gaps = Gaps(self._extra + list(self._configured.values()), mono)   # asked in order (agent.gaps)
        self._uploader = None
        self.uploader = uploader if uploader is not None else make_uploader(cfg)
        self.spool = spool if spool is not None else open_spool(cfg, output_names(cfg, outputs))
        self.clients = {}             # connection name -> client (one per connection)
        self.stop_requested = False
        self.reload_requested = False
        self.stopped = False
        self.log_level = None         # `run --log-level`: kept over reloads
        self._wake_r = self._wake_w = None
        self.started_wall = wall()
        self.appender = Appender(cfg.agent.id, wall)
        self.last_summary = None
        self.clock_unsynced = self.started_wall < CLOCK_SANE
        now = mono()
        self.states = [DeviceState(d, now, cfg.agent) for d in cfg.devices]
        self.poller = Poller(cfg.agent.id, self.states, self.append, self.client_for, mono, wall)
        self._set_timers(now)
        if services is None:
            services = make_services(cfg, self.states) if getattr(cfg, "gateway", None) is not None else []
        else:
            for svc in services:
                svc.watch(self.states)
        self.services = list(services)

    @property
    def uploader(self):
        """The output [upload] builds (agent.upload.Uploader), None when upload is off."""
        return self._uploader

    @uploader.setter
    def uploader(self, out):
        """Put `out` in the outputs in place of the previous [upload] output (SIGHUP rebuilds it);
        its gap record carries over when the name is the same."""
        old, self._uploader = self._uploader, out
        self.gaps.replace(old, out)

    @property
    def outputs(self):
        """The outputs (agent.output), in the order they are asked to fill a gap."""
        return self.gaps.outputs

    @property
    def forced_uploads(self):
        """Requests that made polls wait since the last summary, every output's."""
        return self.gaps.forced()

    @property
    def starve_after(self):
        return self.gaps.starve_after

    @starve_after.setter
    def starve_after(self, seconds):
        self.gaps.starve_after = seconds

    def _set_timers(self, now):
        a = self.cfg.agent
        self.summary_interval = a.summary_interval
        self.health_interval = a.health_interval
        self.next_summary = now + self.summary_interval
        self.next_status = now  # right away: `status` works from the first second

    # -- signals -------------------------------------------------------------------------
    def install_signals(self):
        """Handlers only set flags; the byte the C handler writes to the wake-up pipe ends
        the loop's sleep at once."""
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self._wake_r, self._wake_w = r, w
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, self._on_hup)

    def uninstall_signals(self):
        if self._wake_r is None:
            return
        signal.set_wakeup_fd(-1)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = None

    def _on_stop(self, signum, frame):
        self.stop_requested = True

    def _on_hup(self, signum, frame):
        self.reload_requested = True

    def _sleep_until(self, until):
        """Sleep until `until` (loop clock), or a signal; the services' sockets wake it too,
        and are served (up to SERVICE_MARGIN before `until`) without ending the sleep."""
        while True:
            timeout = until - self.mono()
            if timeout <= 0 or self.stop_requested or self.reload_requested:
                return
            readers, writers = [], []
            if timeout > SERVICE_MARGIN:    # closer to the poll, ready sockets wait for it
                for svc in self.services:
                    readers.extend(svc.fds())
                    writers.extend(svc.write_fds())
            if self._wake_r is not None:
                readers.append(self._wake_r)
            if not readers and not writers:
                time.sleep(timeout)
                return
            try:
                ready, ready_w, _ = select.select(readers, writers, [], timeout)
            except (OSError, ValueError):   # a service's socket went bad: it sorts that out
                ready, ready_w = [], [True]
            if self._wake_r is not None and self._wake_r in ready:
                try:
                    while os.read(self._wake_r, 64):
                        pass
                except (BlockingIOError, InterruptedError):
                    pass
                return
            if not ready and not ready_w:
                return
            self.serve_services(until - SERVICE_MARGIN)

    def serve_services(self, until):
        """Each service handles its ready I/O before `until` (loop clock); never raises."""
        for svc in self.services:
            end = time.monotonic() + (until - self.mono())   # services keep time.monotonic()
            try:
                svc.serve(end)
            except Exception:
                log.exception("%s failed", svc.name)

    def _serve_after_poll(self):
        """A request waits at most one poll: after each poll the services handle what is ready,
        up to the next poll, or for SERVICE_SLICE when it is already due (a saturated bus)."""
        if not self.services:
            return
        now = self.mono()
        st = self.next_state(now)
        due = st.schedule.due - SERVICE_MARGIN if st is not None else now + SERVICE_SLICE
        self.serve_services(due if due > now else now + SERVICE_SLICE)

    # -- the loop ------------------------------------------------------------------------
    def run(self):
        """Run until SIGTERM/SIGINT; returns the exit code."""
        a = self.cfg.agent
        log.info("started: agent %s, %d device(s) on %d connection(s), spool %s, upload %s",
                 a.id, len(self.states), len(self.cfg.connections), a.spool_dir,
                 redact(self.cfg.upload.url) if self.cfg.upload else "off")
        for w in self.cfg.warnings:
            log.warning("config: %s", w)
        if self.clock_unsynced:
            log.warning("clock reads %s, before the release date: records are flagged \"clock\": \"unsynced\" "
                        "until NTP sets it", utc_timestamp(self.started_wall))
        self.notifier = notify.from_env(mono=self.mono)
        self.notifier.ready("polling %d device(s)" % len(self.states))
        code = 0
        try:
            while not self.stop_requested:
                if self.reload_requested:
                    self.reload_requested = False
                    self.reload()
                self.step()
        except Exception:
            log.exception("loop failed; closing the spool (procd/systemd restarts the agent)")
            code = 1
        finally:
            self.shutdown()
        return code

    def next_state(self, now):
        """The device to poll next. Among those already due, devices that answered their last
        poll go before failing ones, so on a shared slot a failing device's timeout comes after
        the healthy ones' polls; otherwise the earliest due (ties: config order)."""
        best = best_key = None
        for st in self.states:
            due = st.schedule.due
            key = (0, st.schedule.failures > 0, due) if due <= now else (1, False, due)
            if best_key is None or key < best_key:
                best, best_key = st, key
        return best

    def probe_in_the_way(self, st, now):
        """Would probing dead device `st` now make a live device late? Its probe costs up to its
        connection's timeout; if that does not fit before the next live device is due, the probe
        waits for a later slot: the probes of several dead devices spread over the slots instead
        of stacking their timeouts. Never deferred for longer than its back-off, so a device is
        still probed when its timeout cannot fit in any gap."""
        sched = st.schedule
        if sched.deferred_for(now) >= max(sched.backoff, sched.interval):
            return False
        conn = st.device.connection
        # What a probe costs: the connection's timeouts, or what the device's failed polls
        # really took when that was more (a resend, a busy retry, a peer that dribbles bytes)
        cost = max(conn.timeout or 0.0, conn.connect_timeout or 0.0,
                   st.health.last_duration or 0.0)
        nxt = None
        for other in self.states:
            if other is not st and not other.schedule.dead:
                due = other.schedule.due
                if nxt is None or due < nxt:
                    nxt = due
        return nxt is not None and now + cost > nxt

    def step(self):
        now = self.mono()
        # periodic work first, every step: a saturated bus must not starve the status file
        self.periodic(now)
        st = self.next_state(now)
        if st is not None and st.schedule.due <= now:
            if st.schedule.dead and self.probe_in_the_way(st, now):
                st.schedule.defer(now)
                st.health.skipped_cycles = st.schedule.skipped
                return
            for out in self.gaps.starving(now):
                self.upload_starved(now, out)
                now = self.mono()
            self.poller.poll(st, now, self.summary_interval)
            self._tick()
            self._serve_after_poll()
            return
        due = st.schedule.due if st is not None else now + IDLE_PERIOD
        # The outputs work up to the next poll (the status/summary timers run between slices and
        # must not chop the gap into pieces too short for a request), then sleep.
        self.upload_until(due)
        self._tick()
        self._sleep_until(min(due, self.next_status, self.next_summary, self.gaps.retry_at(),
                              self.notifier.ping_at()))

    _tick_failing = False

    def _tick(self):
        try:
            self.spool.tick(self.wall())
        except OSError as e:
            if not self._tick_failing:      # once while it lasts, not once per loop iteration
                log.error("spool: %s (logged once while it lasts)", e)
            self._tick_failing = True
        else:
            self._tick_failing = False

    # -- polling -------------------------------------------------------------------------
    def client_for(self, conn):
        client = self.clients.get(conn.name)
        if client is None:
            client = self.clients[conn.name] = conn.open()
            # the device schedule owns the back-off; the client only tells the rest of a sweep
            intervals = [st.device.interval for st in self.states if st.device.connection.name == conn.name]
            client.down_hold = LINK_DOWN_HOLD_SHARE * min(intervals or [0.0])
        return client

    def append(self, rec):
        """Spool `rec`; never raises (agent.appender)."""
        self.appender.append(self.spool, rec)

    @property
    def appended(self):
        return self.appender.appended

    @property
    def append_errors(self):
        return self.appender.errors

    # -- the gaps between polls ----------------------------------------------------------
    def periodic(self, now):
        self.notifier.watchdog(now)
        if self.clock_unsynced and self.wall() >= CLOCK_SANE:
            self.clock_unsynced = False
            log.info("clock is set now (%s): records are no longer flagged", utc_timestamp(self.wall()))
        own = None      # the agent's own figures, read once per round (agent.health.SelfMonitor)
        for st in self.states:
            if now >= st.next_health:
                # next on the health grid, not now + interval: no drift, no bunching
                while st.next_health <= now:
                    st.next_health += self.health_interval
                h = st.health
                if own is None:
                    own = self._self_monitor().snapshot(self.polls_run())
                    backlog = self._spool_backlog()
                self.append(health_record(self.cfg.agent.id, self.wall(), h.device, h.unit,
                                          dict(h.snapshot(utc_timestamp), agent=own, spool=backlog)))
        if now >= self.next_summary:
            while self.next_summary <= now:
                self.next_summary += self.summary_interval
            self.summary()
            self.notifier.status(self.last_summary)
        if now >= self.next_status:
            self.next_status = now + STATUS_PERIOD
            self.write_status()

    _monitor = None

    def _spool_backlog(self):
        """The spool's backlog for health records (the collector's `backlog` alert rule reads
        spool.oldest_age): what is held behind the slowest output, and per output."""
        try:
            st = self.spool.stats()
        except OSError:
            return None
        return {"records": st["records"], "bytes": st["bytes"], "oldest_age": st["oldest_age"],
                "outputs": {name: {"records": o["records"], "oldest_age": o["oldest_age"]}
                            for name, o in st["outputs"].items()}}

    def _self_monitor(self):
        if self._monitor is None or self._monitor.spool_dir != self.cfg.agent.spool_dir:
            from agent.health import SelfMonitor

            self._monitor = SelfMonitor(self.cfg.agent.spool_dir, self.mono)
        return self._monitor

    def polls_run(self):
        h = [st.health for st in self.states]
        return sum(x.polls_ok + x.polls_partial + x.polls_failed for x in h)

    def upload_until(self, until):
        """Let each output work in the gap before `until` (the next poll), in order, each in what
        the ones before it left (agent.gaps). Between an output's slices the services get
        SERVICE_SLICE too, so a catch-up does not hold a request for the whole gap."""
        between = self.periodic
        if self.services:
            def between(now):
                self.periodic(now)
                self.serve_services(min(until - SERVICE_MARGIN, self.mono() + SERVICE_SLICE))
        for out in self.outputs:
            if self._stopping():
                return
            self.gaps.fill(out, self.spool, until, between, self._stopping, self._holding_back(out))

    def _stopping(self):
        """No output starts a further request once this is true (SIGTERM, SIGHUP)."""
        return self.stop_requested or self.reload_requested

    def upload_starved(self, now, out):
        """No gap for `out` for starve_after while records wait: one request's time from polling."""
        self.gaps.force(out, self.spool, now, self.periodic, self._stopping, self._holding_back(out))

    def _holding_back(self, out):
        """[upload] linger holds the uploader back (read live: a reload changes it in place)."""
        return out is self._uploader and lingering(self.cfg.upload, self.spool)

    def _spool_stats(self):
        try:
            return self.spool.stats()
        except Exception as e:
            return {"error": str(e)}

    def summary(self):
        """Log the summary line (agent.summary) and start the next period's counts."""
        text = summary_line(self.states, self._spool_stats(), self.gaps.period(), self.append_errors)
        for st in self.states:
            st.summary_ok = st.summary_failed = 0
        self.last_summary = text
        log.info("%s", text)

    def status(self):
        """The status file's content (agent.summary.status_doc), with each service's state."""
        doc = status_doc(self.cfg, self.states, self._spool_stats(), self._uploader, self.mono(), self.wall(),
                         self.started_wall, self.stopped, self.clock_unsynced, STATUS_PERIOD,
                         self.appended, self.append_errors, self.last_summary, outputs=self.outputs)
        if self.services:
            doc["services"] = {svc.name: _state(svc) for svc in self.services}
        return doc

    def write_status(self):
        path = self.cfg.agent.status_file
        if not path:
            return
        try:
            write_status(path, self.status())
        except OSError as e:
            log.error("status file %s: %s", path, e)

    # -- reload and shutdown -------------------------------------------------------------
    def reload(self):
        from agent.config import SPOOL, UPLOADER, ConfigError, changed, load_config

        path = self.cfg.path
        log.info("SIGHUP: reloading %s", path)
        try:
            new = load_config(path)
        except ConfigError as e:
            errors = e.errors or [str(e)]
            for err in errors:
                log.error("reload: %s", err)
            log.error("reload: %d error(s) in %s: still running the previous config", len(errors), path)
            return
        except OSError as e:
            log.error("reload: %s: %s: still running the previous config", path, e)
            return
        old = self.cfg
        # Logging first: a log_file the new config cannot open must leave everything as it was
        # (procd would restart the agent into the same file, and `run` would refuse it).
        try:
            setup_logging(new, self.log_level)
        except (ValueError, OSError) as e:
            setup_logging(old, self.log_level)
            log.error("reload: %s: [agent] log: %s: still running the previous config", path, e)
            return
        self.poller.flush_all()   # [device] buffer: polls not yet in a record, before states go
        # what to rebuild: the keys the config schema tags SPOOL / UPLOADER / MQTT (agent.config.schema);
        # the spool is opened again too when the set of outputs (its cursors) changes
        # (no output at all: the spool keeps its default cursor, see open_spool)
        cursors = output_names(new, self._extra) or ("http",)
        reopen = changed(old, new, SPOOL) or cursors != tuple(self.spool.outputs)
        if reopen and not self._reopen_spool(old, new):
            setup_logging(old, self.log_level)
            return
        if changed(old, new, UPLOADER):
            _close(self.uploader)
            self.uploader = make_uploader(new)
        # a new spool: an output holding a batch of the old one in flight (MQTT) starts anew
        self._rebuild_outputs(old, new, everything=reopen)
        for client in self.clients.values():
            _close(client)
        self.clients = {}
        kept = {(st.device.name, st.device.unit): st.health for st in self.states}
        self.cfg = new
        now = self.mono()
        self.states = [DeviceState(d, now, new.agent, kept.get((d.name, d.unit))) for d in new.devices]
        self.poller = Poller(new.agent.id, self.states, self.append, self.client_for, self.mono, self.wall)
        self.appender.agent_id = new.agent.id
        self._set_timers(now)
        self._reload_services(old, new)
        log.info("reloaded: %d device(s) on %d connection(s)", len(self.states), len(new.connections))

    def _reload_services(self, old, new):
        """[gateway]: a new listen address opens a new socket (when the old one holds the port,
        it is closed first; an address that cannot be bound is logged and retried by the
        service); anything else is taken in place, and every service gets the new device states."""
        from agent.config import GATEWAY, changed

        gw = next((svc for svc in self.services if svc.name == "gateway"), None)
        if changed(old, new, GATEWAY) and (gw is None or new.gateway is None
                                           or new.gateway.listen != old.gateway.listen):
            fresh = make_services(new, self.states) if new.gateway is not None else []
            if fresh and gw is not None and not fresh[0].state().get("listening"):
                # the old socket may hold the port (0.0.0.0:502 -> 192.168.1.1:502): free it first
                _close(fresh[0])
                _close(gw)
                gw = None
                fresh = make_services(new, self.states)
            _close(gw)
            if gw is not None and not fresh:    # the port closes: say so, as a start says where it listens
                log.info("reload: gateway stopped (no [gateway] section): %s closed", gw.listen_text())
            self.services = [svc for svc in self.services if svc is not gw and svc.name != "gateway"] + fresh
        elif gw is not None:
            gw.update(new)
        for svc in self.services:
            svc.watch(self.states)

    def _output_names(self, cfg):
        """The spool cursors `cfg` asks for: the configured outputs by `cfg`, the others as they are."""
        return output_names(cfg, self._extra)

    def _rebuild_outputs(self, old, new, everything=False):
        """The configured outputs besides [upload]'s (agent.outputs): one whose section's keys
        changed (its reload tag), or that was added or removed, is closed and built anew (all
        of them with `everything`)."""
        from agent.config import changed
        from agent.outputs import BY_NAME, configured_names

        for name in dict.fromkeys(n for n in configured_names(old) + configured_names(new) if n != "http"):
            if not everything and not changed(old, new, BY_NAME[name].tag) and name in self._configured:
                continue
            prev = self._configured.pop(name, None)
            _close(prev)
            out = build_outputs(new, skip=[n for n in BY_NAME if n != name]).get(name)
            if out is not None:
                self._configured[name] = out
            if prev is not None:
                self.gaps.replace(prev, out)
            elif out is not None:
                self.gaps.replace(None, out)        # puts it first; asked after the others instead
                self.gaps.outputs.remove(out)
                self.gaps.outputs.append(out)
            log.info("reload: %s output %s", name, "rebuilt" if prev and out else "started" if out else "stopped")

    def _reopen_spool(self, old, new):
        """Switch to the spool `new` describes. A spool that cannot be opened (directory not
        writable, locked by another agent) leaves the previous config running.
        The old spool is closed first: the directory lock must be released when it is the same
        directory, and its last writes (a pending gap record, the seq_file at close) must come
        before the new spool reads the seq_file and continues beyond it (agent.spool.lease)."""
        self.spool.close()
        try:
            spool = open_spool(new, self._output_names(new))
        except Exception as e:
            log.error("reload: cannot open the spool: %s: still running the previous config", e)
            self.spool = open_spool(old, self._output_names(old))
            return False
        self.spool = spool
        return True

    def shutdown(self):
        self.notifier.stopping()
        log.info("stopping: closing the spool")
        self.poller.flush_all()   # [device] buffer: the polls not yet in a record
        for client in self.clients.values():
            _close(client)
        self.clients = {}
        for out in self.outputs:
            _close(out)
        for svc in self.services:
            _close(svc)
        self.stopped = True
        self.write_status()   # the last figures, while the spool can still report them
        try:
            self.spool.close()
        except Exception:
            log.exception("spool close failed")
        self.uninstall_signals()
        log.info("stopped after %d record(s) appended", self.appended)
        self.notifier.close()


def _close(obj):
    """Close a client or an output (None: nothing); a failure to close is not worth more than a debug line."""
    if obj is None:
        return
    try:
        obj.close()
    except Exception as e:
        log.debug("close %s: %s", type(obj).__name__, e)


def _state(obj):
    try:
        return obj.state()
    except Exception as e:
        return {"error": str(e)}


def setup_logging(cfg, level=None):
    a = cfg.agent
    agentlog.setup(level or a.log_level, a.log_file, a.log_max_kb)


def cmd_run(args):
    """Exit codes: 0 stopped by SIGTERM/SIGINT, 1 the loop failed, 2 bad config."""
    from agent.config import load_or_report

    cfg = load_or_report(args.config)
    if cfg is None:
        return 2
    try:
        setup_logging(cfg, args.log_level)
    except (ValueError, OSError) as e:
        print("%s: [agent] log: %s" % (args.config, e), file=sys.stderr)
        return 2
    try:
        loop = Loop(cfg)
    except Exception as e:  # SpoolError, OSError: the spool directory is unusable or locked
        log.error("cannot start: %s", e)
        return 1
    loop.log_level = args.log_level
    loop.install_signals()
    return loop.run()
