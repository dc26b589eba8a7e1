"""The alert engine of one collector process: the ingest hook, the periodic evaluator, one sender
thread per notifier, and the views for the API and the status page.

Where each rule is evaluated:
- threshold, error, backlog, gap firing: in the ingest hook (Store.add_ingest_hook), inside the
  batch's write transaction, on the records of the batch. The state rows, the events and their
  outbox rows commit with the records or not at all: a batch rolled back (and retried by the
  agent) raises nothing twice, a batch stored raises what it must even if the process dies the
  next moment. Series of one agent are changed by one batch at a time: the hook runs after the
  batch's upsert of the agent's row, which PostgreSQL keeps locked until the commit (and
  SQLite's writer is exclusive), and the hook reads the agent's active states FOR UPDATE.
- silent, the gap rule's clearing, `repeat` reminders: every `[alerts] interval`, against the
  collector's clock. Each change is written only if the state row is still the version read
  (or, for a new series, if no other process inserted it first), in one transaction with its
  event: several processes evaluating at once raise each event once.

Sending never blocks ingest: the hook only inserts outbox rows; senders run in their own threads
and wake when a batch that raised something has committed (or every POLL seconds for events other
processes raised). Per notifier, one process at a time sends (a lease row in alert_leases, taken
and renewed before every request, longer than a request can take), oldest message first; a
message that fails is retried with exponential back-off (1 s doubling up to max_backoff) and holds
back the ones after it, so a webhook that was down gets everything afterwards, in order. A message
is marked sent only after the 2xx: a process killed between the two sends that message again
(at least once; the json format's "id" and the Idempotency-Key header let a receiver drop it).
"""
import json
import logging
import os
import secrets
import socket
import threading
import time
import traceback

from agent.collector.alerts import db, notify, textband
from agent.collector.alerts.evaluate import (
    ACTIVE,
    FIRING,
    INACTIVE,
    PENDING,
    RESOLVED,
    Event,
    State,
    event_fired,
    observe,
    silent,
)
from agent.collector.alerts.extract import field, numeric, samples
from agent.collector.config import redact
from agent.common import format_duration, parse_utc
from agent.wire import utc_timestamp

log = logging.getLogger("modbus.collector.alerts")
POLL = 1.0             # seconds between outbox checks when nothing woke the sender
FAIL_ATTEMPTS = 3      # a 4xx (other than 408/425/429) is tried this often, then given up
_CACHE_MAX = 65536


class _Conflict(Exception):
    """Another process changed the state row first: roll this change back."""


class _Device:
    """The rules that watch one device of one agent: `points` [(point, threshold rules)],
    `errors` the error rules."""
    __slots__ = ("points", "errors", "statuses", "calm", "cache", "keys")

    def __init__(self, rules):
        by_point = {}
        for r in rules:
            if r.kind == "threshold":
                by_point.setdefault(r.point, []).append(r)
        self.points = sorted(by_point.items())
        self.errors = [r for r in rules if r.kind == "error"]
        self.statuses = frozenset(s for r in self.errors for s in r.statuses)
        self.calm = _bands(self.points, None, None, {}) if self.points else None   # no series active
        self.cache = {}   # the states of the device's active series -> their bands
        self.keys = None  # the value keys of its last parsed record, in order (textband)

class _Plan:
    """The rules that may apply to one agent's records, resolved once per agent."""
    __slots__ = ("agent", "data_rules", "gap", "backlog", "devices")

    def __init__(self, agent, rules):
        self.agent = agent
        self.data_rules = [r for r in rules if r.kind in ("threshold", "error")]
        self.gap = [r for r in rules if r.kind == "gap"]
        self.backlog = [r for r in rules if r.kind == "backlog"]
        self.devices = {}

    def device(self, name):
        """The device's _Device, or None when no rule watches it."""
        try:
            return self.devices[name]
        except KeyError:
            pass
        mine = [r for r in self.data_rules if r.watches(self.agent, name)]
        out = _Device(mine) if mine else None
        if len(self.devices) > _CACHE_MAX:
            self.devices.clear()
        self.devices[name] = out
        return out


class Engine:
    def __init__(self, cfg, store, clock=time.time):
        self.cfg = cfg
        self.store = store
        self.clock = clock
        self.rules = {r.name: r for r in cfg.rules}
        self.notifiers = cfg.notifiers
        self.silent_rules = [r for r in cfg.rules if r.kind == "silent"]
        self.owner = "%s/%d/%s" % (socket.gethostname(), os.getpid(), secrets.token_hex(4))
        self._plans = {}
        self._raised = False
        self._stop = threading.Event()
        self._wake = {name: threading.Event() for name in self.notifiers}
        self._eval_wake = threading.Event()
        self._threads = []
        self._last_cleanup = None
        self._db_errors = _db_errors(store)
        self.started = clock()   # silence by receive time counts from here (evaluate.silent)

    # --- wiring -------------------------------------------------------------------------------

    def attach(self):
        """Register the ingest hook, and wake the senders once a batch that raised something
        has committed (Store.ingest returns after the commit)."""
        self.store.add_ingest_hook(self.hook)
        ingest = self.store.ingest

        def ingest_and_wake(agent, rows, received):
            result = ingest(agent, rows, received)
            if self._raised:
                self._raised = False
                self.wake()
            return result

        self.store.ingest = ingest_and_wake
        return self

    def start(self):
        """The evaluator thread and one sender thread per notifier."""
        t = threading.Thread(target=self._evaluate_loop, name="alerts-evaluate", daemon=True)
        self._threads.append(t)
        for n in self.notifiers.values():
            self._threads.append(threading.Thread(target=self._send_loop, args=(n,), name="alerts-" + n.name,
                                                  daemon=True))
        for t in self._threads:
            t.start()
        return self

    def wake(self):
        for e in self._wake.values():
            e.set()

    def close(self):
        self._stop.set()
        self._eval_wake.set()
        self.wake()
        for t in self._threads:
            t.join(15)
        for n in self.notifiers.values():
            try:
                db.release_lease(self.store, "notify:" + n.name, self.owner)
            except Exception:  # the database may be gone: the lease just runs out
                pass

    # --- ingest: sample-driven rules ----------------------------------------------------------

    def _plan(self, agent):
        try:
            return self._plans[agent]
        except KeyError:
            pass
        mine = [r for r in self.rules.values() if r.kind != "silent" and r.watches_agent(agent)]
        plan = _Plan(agent, mine) if mine else None
        if len(self._plans) > _CACHE_MAX:
            self._plans.clear()
        self._plans[agent] = plan
        return plan

    def hook(self, cur, store, agent, fresh, received):
        """Store ingest hook: evaluate the batch's new records, in its transaction.

        Cheap when nothing happens: the agent's pending and firing series are read once a batch
        (an indexed query, usually no row), and per device and point a band (_band) says which
        values change nothing for any of its rules; a sample inside it costs two comparisons.
        A state row is written only when its series changes state."""
        plan = self._plan(agent)
        if plan is None:
            return
        active = db.active_states(store, cur, agent)
        hot = {k[2] for k in active if k[3]}   # devices with a pending/firing threshold: bands per batch
        failing = {k[2] for k in active if not k[3]}   # ... with a pending/firing error rule
        changed = {}
        bands = {}
        texts = {}      # device -> its text check (textband.matcher) in this batch, or None
        budget = [_COMPILES_PER_BATCH]
        gaps = []
        # device -> (check, statuses): a data record whose status is not among `statuses` and
        # whose text passes `check` changes nothing (set after the device's first record of the
        # batch, dropped whenever its bands, layout or error series change)
        quick = {}
        for row in fresh:
            kind = row[3]
            if kind == "data":
                q = quick.get(row[4])
                if q is not None and row[6] not in q[1] and q[0](row[7]) is not None:
                    continue                        # the hot path: one regex match, no parse
                device = row[4]
                dp = plan.device(device)
                if dp is None:
                    quick[device] = _UNWATCHED
                    continue
                quick.pop(device, None)
                if dp.points:
                    bq = bands.get(device) if device in hot else dp.calm
                    if bq is None:
                        bq = bands[device] = self._device_bands(dp, agent, device, active)
                    fm = None
                    if dp.keys is not None:
                        fm = texts.get(device, texts)
                        if fm is texts:
                            fm = texts[device] = _text_matcher(dp.keys, bq[2], budget)
                    values = None
                    # every watched value surely in its band: nothing to parse
                    for t, values in (() if fm is not None and fm(row[7]) is not None else samples(row[7], row[2])):
                        if bq is None:
                            bq = bands[device] = self._device_bands(dp, agent, device, active)
                        bl, quiet, _ = bq
                        try:
                            if quiet(values):
                                continue            # the hot path: no value leaves its band
                        except TypeError:           # a string among the values: look at each
                            pass
                        for p, lo, hi, rules in bl:
                            v = values.get(p)
                            if v is None:
                                continue
                            if type(v) is not float and type(v) is not int:
                                v = numeric(v)      # a coil's bool; strings give None
                                if v is None:
                                    continue
                            if lo < v < hi:
                                continue            # changes nothing (the hot path: two comparisons)
                            v = numeric(v)
                            if v is None:
                                continue
                            for r in rules:
                                c = r.crossing(v)
                                if self._observe(cur, r, agent, device, p, t, v, c, not c and r.cleared(v),
                                                 received, active, changed):
                                    hot.add(device)     # a series changed: new bands from the next sample
                                    bq = bands[device] = None
                                    texts.pop(device, None)
                    if values is not None and dp.keys != tuple(values):
                        dp.keys = tuple(values)     # the device's layout, for the text check
                        texts.pop(device, None)
                    if texts.get(device) is not None and device not in failing:
                        quick[device] = (texts[device], dp.statuses)
                elif device not in failing:
                    quick[device] = (len, dp.statuses)
                if dp.errors and (row[6] in dp.statuses or device in failing):
                    status = row[6]
                    failing.add(device)
                    quick.pop(device, None)
                    for r in dp.errors:
                        c = status in r.statuses
                        self._observe(cur, r, agent, device, "", row[2], status, c, not c, received, active, changed)
            elif kind == "gap" and plan.gap:
                rec = json.loads(row[7])
                if type(rec.get("dropped")) is int and rec["dropped"] > 0:
                    gaps.append((row[2], rec["dropped"], rec))
            elif kind == "health" and plan.backlog:
                health = json.loads(row[7]).get("health")
                for r in plan.backlog:
                    v = numeric(_backlog(health, r.point))
                    if v is not None:
                        c = r.crossing(v)
                        self._observe(cur, r, agent, "", "", row[2], v, c, not c and r.cleared(v), received, active,
                                      changed)
        for (ts, dropped, rec), r in ((g, r) for g in gaps for r in plan.gap):
            key = (r.name, agent, "", "")
            st = active.get(key) or active.setdefault(key, State(r.name, agent))
            if st.state != FIRING and dropped < r.min_dropped:
                continue    # below the rule's bar; once it fires, every later drop counts
            total = dropped + (st.value if st.state == FIRING and type(st.value) in (int, float) else 0)
            ev = event_fired(r, st, total, ts, received, detail={
                k: rec.get(k) for k in ("first_seq", "last_seq", "first_ts", "last_ts", "reason")})
            if ev is not None:
                self._raise(cur, ev)
            changed[key] = st
        for st in changed.values():
            db.write_state(store, cur, st)

    @staticmethod
    def _device_bands(dp, agent, device, active):
        """_bands for a device whose series are not all inactive, kept per combination of their
        states (a firing alert stays firing for many batches: one lookup a batch, not a rebuild)."""
        sig = tuple(sorted((k[0], k[3], st.state) for k, st in active.items() if k[2] == device))
        bq = dp.cache.get(sig)
        if bq is None:
            if len(dp.cache) > 64:
                dp.cache.clear()
            bq = dp.cache[sig] = _bands(dp.points, agent, device, active)
        return bq

    def _observe(self, cur, r, agent, device, point, t, v, cond, clear, received, active, changed):
        """One sample for one rule's series; True when the series changed state."""
        key = (r.name, agent, device, point)
        st = active.get(key)
        if st is None:
            if not cond:
                return False    # not pending, not firing, not crossing: nothing to do
            st = active[key] = State(*key)
        ev = observe(r, st, t, v, cond, clear, received)
        if ev is not None:
            self._raise(cur, ev)
        if st.dirty:
            st.dirty = False
            changed[key] = st
            return True
        return False

    def _raise(self, cur, ev):
        rule = ev.rule
        text = notify.message(rule, ev)
        names = [n.name for n in self.cfg.notifiers_of(rule)]
        db.insert_event(self.store, cur, ev, text, names, ev.detail)
        self._raised = True
        (log.warning if ev.state == FIRING else log.info)("alert %s", text)

    # --- periodic: silence, gap clearing, reminders, history ----------------------------------

    def evaluate(self, now=None):
        """One periodic round; returns the events raised (for tests and the log)."""
        now = self.clock() if now is None else now
        changes = []   # (State, Event or None)
        with self.store._read() as cur:
            rows = {s.key: s for s in db.states(self.store, cur, rules=self.rules)}
        if self.silent_rules:
            changes += self._silence(now, rows)
        for st in rows.values():
            rule = self.rules.get(st.rule)
            if rule is None or st.state != FIRING:
                continue
            if rule.kind == "gap" and st.seen is not None and now - st.seen >= rule.clear_after:
                st.state, st.changed = RESOLVED, now
                changes.append((st, Event(rule, st, RESOLVED, st.value, st.last_ts, now)))
            elif rule.repeat and now - (st.notified or st.changed or now) >= rule.repeat:
                st.notified = now
                changes.append((st, Event(rule, st, FIRING, st.value, st.last_ts, now, reminder=True)))
        raised = []
        for st, ev in changes:
            try:
                with self.store._write() as cur:
                    if not db.write_state(self.store, cur, st, insert_only=st.version is None):
                        raise _Conflict
                    if ev is not None:
                        self._raise(cur, ev)
                        raised.append(ev)
            except _Conflict:
                continue
        self._raised = False
        if raised:
            self.wake()
        if self._last_cleanup is None or now - self._last_cleanup >= 3600:
            self._last_cleanup = now
            n = db.forget_older(self.store, now - self.cfg.keep)
            if n:
                log.info("alerts: %d events older than %s forgotten", n, format_duration(self.cfg.keep))
        return raised

    def _silence(self, now, rows):
        devices = self.store.devices()
        agent_ts = {}
        for d in devices:
            for col in ("last_ts", "health_ts"):
                t = parse_utc(d[col])
                if t is not None and t > agent_ts.get(d["agent"], float("-inf")):
                    agent_ts[d["agent"]] = t
        out = []
        for rule in self.silent_rules:
            seen = set()
            for d in devices:
                if not rule.watches(d["agent"], d["device"]):
                    continue
                key = (rule.name, d["agent"], d["device"], "")
                seen.add(key)
                st = rows.get(key) or State(*key)
                # a series firing before a restart keeps its true age (it must not resolve because
                # the collector restarted); any other starts counting no earlier than the start
                quiet, secs, detail = silent(rule, d, agent_ts.get(d["agent"]), now,
                                             None if st.state == FIRING else self.started)
                out += self._time_change(rule, st, quiet, secs, detail, d["last_ts"], now)
            if rule.literal:  # named without wildcards: silent from the start if it never reported
                key = (rule.name, rule.agent, rule.device, "")
                if key not in seen:
                    st = rows.get(key) or State(*key)
                    if st.state not in ACTIVE:
                        st.state, st.since, st.changed = PENDING, utc_timestamp(now), now
                        out.append((st, None))
                    else:
                        secs = now - (parse_utc(st.since) or now)
                        detail = {"last_ts": None, "received_age_s": round(secs, 1), "data_lag_s": None}
                        out += self._time_change(rule, st, secs > rule.for_, round(secs, 1), detail, None, now)
        return out

    def _time_change(self, rule, st, quiet, secs, detail, last_ts, now):
        if quiet and st.state != FIRING:
            st.state, st.since, st.fired, st.value, st.last_ts = FIRING, last_ts or st.since, last_ts, secs, last_ts
            st.notified = st.changed = st.seen = now
            return [(st, Event(rule, st, FIRING, secs, last_ts, now, detail=detail))]
        if not quiet and st.state == FIRING:
            st.state, st.value, st.last_ts, st.changed = RESOLVED, secs, last_ts, now
            return [(st, Event(rule, st, RESOLVED, secs, last_ts, now, detail=detail))]
        if not quiet and st.state == PENDING:
            st.state, st.changed = INACTIVE, now
            return [(st, None)]
        return []

    def _evaluate_loop(self):
        while not self._stop.is_set():
            try:
                self.evaluate()
            except Exception:
                log.error("alerts: evaluation failed; next try in %s:\n%s", format_duration(self.cfg.interval),
                          redact(traceback.format_exc()).rstrip())
            self._eval_wake.wait(self.cfg.interval)

    # --- sending ------------------------------------------------------------------------------

    def lease_for(self, n):
        """How long a sender's lease lasts: beyond any single request (2 timeouts + 1 s)."""
        return max(self.cfg.lease, 2 * n.timeout + 1.0)

    def deliver_once(self, n, now=None):
        """Send the notifier's oldest due message, if this process holds the notifier's lease.
        Returns seconds until it is worth trying again (0: go on at once)."""
        now = self.clock() if now is None else now
        if not db.take_lease(self.store, "notify:" + n.name, self.owner, now, self.lease_for(n)):
            return min(POLL, self.lease_for(n) / 4)      # another process sends for it now
        item = db.next_due(self.store, n.name)
        if item is None:
            return POLL
        oid, attempts, next_try, ev = item
        if next_try > now:
            return min(next_try - now, POLL)
        if now - ev["at"] > n.retry_for:
            why = "not delivered within retry_for %s (last: %s)" % (format_duration(n.retry_for), attempts)
            db.mark_failed(self.store, oid, why)
            log.error("alerts: %s: gave up message %d (%s): %s", n.label, ev["id"], ev["message"], why)
            return 0
        url, headers, body = notify.request(n, ev, self.rules.get(ev["rule"]))
        outcome, detail = notify.send(n, url, headers, body)
        done = self.clock()
        if outcome == "ok":
            db.mark_sent(self.store, oid, done)
            log.info("alerts: %s: sent %s %s (%s)%s", n.label, ev["rule"], ev["state"], detail,
                     " after %d attempts" % (attempts + 1) if attempts else "")
            return 0
        if outcome == "fail" and attempts + 1 >= FAIL_ATTEMPTS:
            db.mark_failed(self.store, oid, detail)
            log.error("alerts: %s: gave up message %d after %d attempts: %s (check the notifier's url, "
                      "token and format)", n.label, ev["id"], attempts + 1, detail)
            return 0
        delay = min(n.max_backoff, 2.0 ** min(attempts, 30))
        db.mark_retry(self.store, oid, done + delay, detail)
        (log.warning if attempts in (0, 5) or attempts % 50 == 0 else log.debug)(
            "alerts: %s: %s (attempt %d); retrying in %s", n.label, detail, attempts + 1, format_duration(delay))
        return min(delay, POLL)

    def _send_loop(self, n):
        wake = self._wake[n.name]
        while not self._stop.is_set():
            try:
                delay = self.deliver_once(n)
            except self._db_errors as e:
                log.warning("alerts: %s: database error: %s", n.label, redact(e))
                delay = POLL
            except Exception:
                log.error("alerts: %s: sender failed:\n%s", n.label,
                          notify.redact(n, traceback.format_exc()).rstrip())
                delay = POLL
            if delay > 0:
                wake.wait(delay)
                wake.clear()

    # --- views --------------------------------------------------------------------------------

    def current(self):
        """Pending and firing series of configured rules, firing first, then by rule."""
        with self.store._read() as cur:
            rows = db.states(self.store, cur, rules=self.rules, active_only=True)
        out = []
        for st in rows:
            r = self.rules[st.rule]
            out.append({
                "rule": r.name, "kind": r.kind, "severity": r.severity, "state": st.state,
                "agent": st.agent, "device": st.device or None, "point": st.point or None,
                "value": st.value, "threshold": r.threshold, "condition": r.describe(),
                "since": st.since, "fired": st.fired, "last_ts": st.last_ts,
                "changed": None if st.changed is None else utc_timestamp(st.changed),
                "notified": None if st.notified is None else utc_timestamp(st.notified),
            })
        order = {"critical": 0, "warning": 1, "info": 2}
        out.sort(key=lambda a: (a["state"] != FIRING, order.get(a["severity"], 3), a["rule"], a["agent"],
                                a["device"] or "", a["point"] or ""))
        return out

    def view(self, limit=100, since=None):
        """GET /api/v1/alerts."""
        history = db.history(self.store, limit, since)
        for ev in history:
            ev["at"] = utc_timestamp(ev["at"])
        outbox = db.outbox_summary(self.store)
        notifiers = []
        for name, n in sorted(self.notifiers.items()):
            o = outbox.get(name, {"queued": 0, "sent": 0, "failed": 0, "oldest_queued_at": None, "last_error": None})
            notifiers.append({"name": name, "format": n.format, "target": n.label,
                              "queued": o["queued"], "sent": o["sent"], "failed": o["failed"],
                              "oldest_queued_at": None if o["oldest_queued_at"] is None
                              else utc_timestamp(o["oldest_queued_at"]),
                              "last_error": o["last_error"]})
        rules = [{"name": r.name, "kind": r.kind, "severity": r.severity, "agent": r.agent,
                  "device": r.device if r.kind in ("threshold", "silent", "error") else None,
                  "condition": r.describe(), "repeat": r.repeat or None,
                  "notify": [n.name for n in self.cfg.notifiers_of(r)]} for r in self.rules.values()]
        return {"time": utc_timestamp(self.clock()), "current": self.current(), "history": history,
                "rules": rules, "notifiers": notifiers}


_quiet_cache = {}


def _bands(points, agent, device, active):
    """([(point, lo, hi, rules)], quiet, ((point, lo, hi), ...)) for a device's threshold rules
    in their states."""
    bl = [(p,) + _band(rules, agent, device, p, active) + (rules,) for p, rules in points]
    return bl, _quiet_check(bl), tuple((p, lo, hi) for p, lo, hi, _ in bl)


_text_cache = {}
_UNWATCHED = (len, frozenset())   # a device no rule watches: every record passes
_COMPILES_PER_BATCH = 2   # a compile costs about a millisecond: a device changing layout at every
                          # record (or a hostile client) gets the parse path, not a compile a record


def _text_matcher(keys, band_key, budget):
    """textband.matcher for a layout and a set of bands, compiled at most budget[0] times a
    batch and kept (bounded); None: parse."""
    key = (keys, band_key)
    try:
        return _text_cache[key]
    except KeyError:
        pass
    if budget[0] <= 0 or len(keys) > 256:
        return None
    budget[0] -= 1
    if len(_text_cache) > 1024:
        _text_cache.clear()
    f = _text_cache[key] = textband.matcher(keys, band_key)
    return f


def _quiet_check(bl):
    """A function values -> True when no watched value leaves its band (bl: [(point, lo, hi,
    rules)]), generated as straight-line code and kept per set of bands (they change only when
    a series changes state): the per-sample cost is then a dict lookup and two comparisons a
    point, no loop."""
    key = tuple((p, lo, hi) for p, lo, hi, _ in bl)
    f = _quiet_cache.get(key)
    if f is None:
        if len(_quiet_cache) > 4096:
            _quiet_cache.clear()
        lines = ["def quiet(values):", "    get = values.get"]
        env = {}
        for i, (p, lo, hi) in enumerate(key):
            env["p%d" % i], env["lo%d" % i], env["hi%d" % i] = p, lo, hi
            lines += ["    v = get(p%d)" % i,
                      "    if v is not None and not lo%d < v < hi%d:" % (i, i),
                      "        return False"]
        lines.append("    return True")
        exec("\n".join(lines), env)   # our own text: point names are in env, never in the code
        f = _quiet_cache[key] = env["quiet"]
    return f


def _band(rules, agent, device, point, active):
    """(lo, hi): a value v with lo < v < hi changes nothing for any of `rules` on this series in
    its current states (inactive: it does not cross; firing: it does not clear). A pending
    series has no such band: its `for` runs on every sample's time."""
    lo, hi = float("-inf"), float("inf")
    for r in rules:
        st = active.get((r.name, agent, device, point))
        state = st.state if st is not None else INACTIVE
        if state == PENDING:
            return 0.0, 0.0
        if r.above is not None:
            if state == FIRING:
                lo = max(lo, r.clear)
            else:
                hi = min(hi, r.above)
        elif state == FIRING:
            hi = min(hi, r.clear)
        else:
            lo = max(lo, r.below)
    return lo, hi


def _backlog(health, path):
    """A health record's backlog at `path`; an empty spool reports its oldest_age as null (no
    oldest record): that is no backlog, 0 (or a firing backlog alert would never resolve). A
    record without the field's parent object (an older agent) says nothing: None."""
    v = field(health, path)
    if v is None and "." in path and type(field(health, path.rsplit(".", 1)[0])) is dict:
        return 0.0
    return v


def _db_errors(store):
    import sqlite3

    errs = [sqlite3.Error]
    if getattr(store, "dialect", "") == "postgres":
        import psycopg

        errs.append(psycopg.Error)
    return tuple(errs)
