"""The alerts' SQL (schema migration 4), the same for SQLite and PostgreSQL.

alert_state   one row per rule and series that was ever pending: (rule, agent, device, point)
              ('' where the rule has no device or point), state (evaluate.py), since (data ts the
              condition began), fired (data ts it fired), value (JSON of the value that caused the
              last change), last_ts (newest sample evaluated: older ones are ignored), seen (server
              time of the last sample that kept it pending/firing), notified (server time of the
              last firing notification or reminder), changed (server time of the last transition),
              version (+1 at every write: a change read elsewhere is written only if still current)
alert_events  the history: one row per notification raised (firing, resolved, reminder), with the
              rule, kind, severity, series, value, threshold, ts (data time), since, at (server
              time), message and detail (JSON)
alert_outbox  one row per event and notifier: attempts, next_try (server time), sent (server time
              once a 2xx came back), failed (why it was given up), last_error
alert_leases  name ('notify:NAME'), owner (a collector process), until (server time): who sends
              for a notifier now

Durability: state, events and outbox rows of sample-driven rules are written in the batch's own
transaction (Store ingest hook), so they exist exactly when the records that raised them do.
"""
import json

from agent.collector.alerts.evaluate import ACTIVE, State

_COLS = ", ".join(State.COLUMNS)
_EVENT_COLS = ("id", "rule", "kind", "severity", "state", "reminder", "agent", "device", "point", "value",
               "threshold", "ts", "since", "at", "message", "detail")


def _q(store, sql):
    return store._sql(sql)


def active_states(store, cur, agent):
    """{key: State} of the agent's pending and firing series, locked until the batch commits
    (PostgreSQL FOR UPDATE; SQLite's write transaction is exclusive anyway), in key order."""
    sql = ("SELECT %s FROM alert_state WHERE agent = ? AND state IN ('pending', 'firing') "
           "ORDER BY rule, device, point" % _COLS)
    if store.dialect == "postgres":
        sql += " FOR UPDATE"
    cur.execute(_q(store, sql), (agent,))
    return {(r[0], r[1], r[2], r[3]): _state(r) for r in cur.fetchall()}


def _state(r):
    return State.from_row(r)


def states(store, cur, rules=None, active_only=False):
    sql = "SELECT %s FROM alert_state" % _COLS
    if active_only:
        sql += " WHERE state IN ('pending', 'firing')"
    cur.execute(sql + " ORDER BY rule, agent, device, point")
    out = [_state(r) for r in cur.fetchall()]
    return out if rules is None else [s for s in out if s.rule in rules]


def write_state(store, cur, st, insert_only=False):
    """Write a changed state. A row read before (st.version set) is updated only if nobody
    changed it since (returns False then: the change is dropped, the next evaluation sees the
    other writer's state). A new series is inserted; if its row exists already, it is replaced
    (the ingest hook: it holds the agent's series, and reads only the active ones) or, with
    `insert_only` (the periodic evaluator, which read every row), False: someone was first."""
    value = st.value_json()
    row = (st.state, st.since, st.fired, value, st.last_ts, st.seen, st.notified, st.changed)
    if st.version is None:
        cur.execute(_q(store,
                       "INSERT INTO alert_state (%s) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0) "
                       "ON CONFLICT (rule, agent, device, point) DO %s" % (_COLS, "NOTHING" if insert_only else
                       "UPDATE SET state = excluded.state, "
                       "since = excluded.since, fired = excluded.fired, value = excluded.value, "
                       "last_ts = excluded.last_ts, seen = excluded.seen, notified = excluded.notified, "
                       "changed = excluded.changed, version = alert_state.version + 1")),
                    st.key + row)
        return cur.rowcount == 1 or not insert_only
    cur.execute(_q(store,
                   "UPDATE alert_state SET state = ?, since = ?, fired = ?, value = ?, last_ts = ?, seen = ?, "
                   "notified = ?, changed = ?, version = version + 1 "
                   "WHERE rule = ? AND agent = ? AND device = ? AND point = ? AND version = ?"),
                row + st.key + (st.version,))
    return cur.rowcount == 1


def insert_event(store, cur, ev, message, notifiers, detail):
    """The event's history row and one outbox row per notifier; returns the event id."""
    rule = ev.rule
    cur.execute(_q(store,
                   "INSERT INTO alert_events (rule, kind, severity, state, reminder, agent, device, point, value, "
                   "threshold, ts, since, at, message, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                   "RETURNING id"),
                (rule.name, rule.kind, rule.severity, ev.state, 1 if ev.reminder else 0, ev.agent, ev.device,
                 ev.point, None if ev.value is None else json.dumps(ev.value), rule.threshold, ev.ts, ev.since,
                 ev.at, message, json.dumps(detail, sort_keys=True) if detail else None))
    eid = cur.fetchone()[0]
    if notifiers:
        cur.executemany(_q(store, "INSERT INTO alert_outbox (event, notifier, next_try) VALUES (?, ?, ?)"),
                        [(eid, n, ev.at) for n in notifiers])
    return eid


# --- the outbox ---------------------------------------------------------------------------------

def take_lease(store, name, owner, now, duration):
    """Hold (or renew) the lease `name` until now + duration, if it is free, expired or ours."""
    with store._write() as cur:
        cur.execute(_q(store,
                       "INSERT INTO alert_leases (name, owner, until) VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE "
                       "SET owner = excluded.owner, until = excluded.until "
                       "WHERE alert_leases.owner = excluded.owner OR alert_leases.until < ?"),
                    (name, owner, now + duration, now))
        return cur.rowcount == 1


def release_lease(store, name, owner):
    with store._write() as cur:
        cur.execute(_q(store, "DELETE FROM alert_leases WHERE name = ? AND owner = ?"), (name, owner))


def next_due(store, notifier):
    """(outbox id, attempts, next_try, event dict) of the notifier's oldest undelivered message,
    or None. Oldest first, always: a message that fails holds back the ones after it (order)."""
    with store._read() as cur:
        cur.execute(_q(store,
                       "SELECT o.id, o.attempts, o.next_try, %s FROM alert_outbox o JOIN alert_events e "
                       "ON e.id = o.event WHERE o.notifier = ? AND o.sent IS NULL AND o.failed IS NULL "
                       "ORDER BY o.id LIMIT 1" % ", ".join("e." + c for c in _EVENT_COLS)),
                    (notifier,))
        r = cur.fetchone()
    if r is None:
        return None
    return r[0], r[1], r[2], event_dict(r[3:])


def event_dict(r):
    d = dict(zip(_EVENT_COLS, r))
    d["reminder"] = bool(d["reminder"])
    d["value"] = None if d["value"] is None else json.loads(d["value"])
    d["detail"] = json.loads(d["detail"]) if d["detail"] else {}
    return d


def mark_sent(store, oid, now):
    with store._write() as cur:
        cur.execute(_q(store, "UPDATE alert_outbox SET sent = ?, attempts = attempts + 1, last_error = NULL "
                              "WHERE id = ? AND sent IS NULL"), (now, oid))
        return cur.rowcount == 1


def mark_retry(store, oid, next_try, error):
    with store._write() as cur:
        cur.execute(_q(store, "UPDATE alert_outbox SET attempts = attempts + 1, next_try = ?, last_error = ? "
                              "WHERE id = ? AND sent IS NULL"), (next_try, error[:500], oid))


def mark_failed(store, oid, why):
    with store._write() as cur:
        cur.execute(_q(store, "UPDATE alert_outbox SET attempts = attempts + 1, failed = ?, last_error = ? "
                              "WHERE id = ? AND sent IS NULL"), (why[:500], why[:500], oid))


# --- views and housekeeping ---------------------------------------------------------------------

def history(store, limit, since=None):
    """Newest events first."""
    sql = "SELECT %s FROM alert_events" % ", ".join(_EVENT_COLS)
    args = []
    if since is not None:
        sql += " WHERE at >= ?"
        args.append(since)
    with store._read() as cur:
        cur.execute(_q(store, sql + " ORDER BY id DESC LIMIT ?"), args + [limit])
        return [event_dict(r) for r in cur.fetchall()]


def outbox_summary(store):
    """notifier -> {"queued", "failed", "sent", "last_error", "oldest_queued_at"}."""
    with store._read() as cur:
        cur.execute("SELECT o.notifier, COUNT(*), MIN(e.at) FROM alert_outbox o JOIN alert_events e "
                    "ON e.id = o.event WHERE o.sent IS NULL AND o.failed IS NULL GROUP BY o.notifier")
        queued = {r[0]: (r[1], r[2]) for r in cur.fetchall()}
        cur.execute("SELECT notifier, SUM(CASE WHEN sent IS NOT NULL THEN 1 ELSE 0 END), "
                    "SUM(CASE WHEN failed IS NOT NULL THEN 1 ELSE 0 END) FROM alert_outbox GROUP BY notifier")
        counts = {r[0]: (int(r[1] or 0), int(r[2] or 0)) for r in cur.fetchall()}
        cur.execute("SELECT notifier, last_error FROM alert_outbox WHERE id IN (SELECT MAX(id) FROM alert_outbox "
                    "WHERE last_error IS NOT NULL GROUP BY notifier)")
        errors = dict(cur.fetchall())
    out = {}
    for n in set(queued) | set(counts):
        q, oldest = queued.get(n, (0, None))
        sent, failed = counts.get(n, (0, 0))
        out[n] = {"queued": q, "sent": sent, "failed": failed, "oldest_queued_at": oldest,
                  "last_error": errors.get(n)}
    return out


def forget_older(store, cutoff):
    """Delete history older than `cutoff` (server time) whose deliveries are over (sent or given
    up); the state rows stay. Returns the count of events deleted."""
    with store._write() as cur:
        cur.execute(_q(store, "DELETE FROM alert_outbox WHERE event IN (SELECT id FROM alert_events WHERE at < ?) "
                              "AND (sent IS NOT NULL OR failed IS NOT NULL)"), (cutoff,))
        cur.execute(_q(store, "DELETE FROM alert_events WHERE at < ? AND NOT EXISTS "
                              "(SELECT 1 FROM alert_outbox o WHERE o.event = alert_events.id)"), (cutoff,))
        return cur.rowcount


def is_active(state):
    return state in ACTIVE
