"""The collector's database schema, versioned; migrations run at start, each in one transaction
(PostgreSQL index builds that must not lock `records` run just before it, see concurrent_indexes).

Tables (the same in SQLite and PostgreSQL, so a Grafana data source of either kind charts them):

records   one row per record, identity (agent, seq)
    agent    TEXT     agent id                      seq   INTEGER  the agent's sequence number
    ts       TEXT     '2026-11-21T10:30:45.123Z' (UTC, always 3 fraction digits: text order = time order)
    kind     TEXT     'data' | 'gap' | 'health'     device TEXT   device name (NULL for gaps)
    unit     INTEGER  Modbus unit id                 status TEXT   'ok' | 'partial' | 'error' for data,
                                                                   else NULL ('partial': some points
                                                                   refused, named in $.errors)
    payload  the whole record as JSON, exactly as the agent sent it: values under $.values, a failed
             read's error under $.error, gap details ($.dropped, $.first_seq, ...), health counters
             under $.health. (PostgreSQL: jsonb.)
    clock    'unsynced' when the agent's clock was not set yet, else NULL
    received REAL     server time (epoch seconds) the batch was stored; retention deletes by it
                      (not by ts: a record taken while the agent's clock was unset has a ts
                      far in the past, yet must live as long as any other once received)
agents    agent, max_seq, records, gaps, dropped, first_seen, last_seen (epoch seconds)
devices   per (agent, device): unit, last_ts/last_status (newest reading), values_ts/last_values,
          error_ts/last_error, health_ts/health, records, errors, last_seen (epoch seconds)
alert_state, alert_events, alert_outbox, alert_leases: agent/collector/alerts/db.py says what
          each column holds (migration 4)
legacy /receive-data posts land in `records` too: agent = the token's agent (or receive_data_agent),
seq = a NEGATIVE hash of the canonical reading (see legacy.legacy_row), outside the agents' seqs
(0 and up), so agents.max_seq never counts them. (Before schema 3 it was a positive 63-bit hash;
such rows are kind 'data' with unit NULL, and migration 3 takes them out of max_seq.)

rollup_series  id, agent, device, point: one row per numeric point ever rolled up
rollup_1m, rollup_1h  per series (sid = rollup_series.id) and bucket (t: its start, epoch seconds,
          a multiple of 60 / 3600): n, sum, min, max, last (the value of the newest sample),
          last_ms (that sample's time, epoch milliseconds); avg = sum / n. Kept by
          agent/collector/rollup.py, read by series.py (GET /api/v1/series).
rollup_queue, rollup_state, rollup_pending  the rollup job's queue and the backfill's cursor.

Grafana on the rollups (fast at any range; series.GRAFANA_SQLITE / GRAFANA_POSTGRES):
    SELECT r.t AS time, r.sum / r.n AS avg, r.min AS min, r.max AS max
    FROM rollup_1h r JOIN rollup_series s ON s.id = r.sid
    WHERE s.agent = 'site7' AND s.device = 'meter1' AND s.point = 'voltage_l1'
      AND r.t >= $__from / 1000 AND r.t < $__to / 1000 ORDER BY r.t          (SQLite, hourly)
    SELECT r.t / g.step * g.step AS time, SUM(r.sum) / SUM(r.n) AS avg, MIN(r.min) AS min, MAX(r.max) AS max
    FROM rollup_1m r JOIN rollup_series s ON s.id = r.sid,
         (SELECT GREATEST(60, $__interval_ms / 60000 * 60) AS step) g
    WHERE s.agent = 'site7' AND s.device = 'meter1' AND s.point = 'voltage_l1'
      AND $__unixEpochFilter(r.t) GROUP BY 1 ORDER BY 1                       (PostgreSQL, panel step)

Grafana on the raw records, SQLite data source (frser-sqlite-datasource), one point over time:
    SELECT ts AS time, json_extract(payload, '$.values.voltage_l1') AS voltage_l1 FROM records
    WHERE agent = 'site7' AND device = 'meter1' AND kind = 'data' AND status IN ('ok', 'partial')
      AND ts >= strftime('%Y-%m-%dT%H:%M:%fZ', $__from / 1000, 'unixepoch') ORDER BY ts
Grafana, PostgreSQL:
    SELECT ts::timestamptz AS time, (payload->'values'->>'voltage_l1')::float AS voltage_l1 FROM records
    WHERE agent = 'site7' AND device = 'meter1' AND kind = 'data' AND status IN ('ok', 'partial')
      AND ts >= to_char($__timeFrom() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') ORDER BY ts
(A partial reading lacks the refused points: NULL there.) Integers beyond 64 bits (a uint64 above
2^63) are stored exactly, but SQLite's json_extract and ->> turn them into a REAL and ::float
rounds them: read `payload -> '$.values.x'` (SQLite: the JSON text) or
`(payload->'values'->>'x')::numeric` (PostgreSQL) where every digit matters.
"""

# Each migration: list of statements per dialect. Never edit a released one; append a new one.
MIGRATIONS = [
    # 1: initial schema
    {
        "sqlite": [
            """CREATE TABLE records (
                agent TEXT NOT NULL, seq INTEGER NOT NULL, ts TEXT NOT NULL, kind TEXT NOT NULL,
                device TEXT, unit INTEGER, status TEXT, payload TEXT NOT NULL, clock TEXT,
                received REAL NOT NULL, PRIMARY KEY (agent, seq)) WITHOUT ROWID""",
            "CREATE INDEX records_ts ON records (ts)",
            "CREATE INDEX records_device ON records (agent, device, ts)",
        ],
        "postgres": [
            """CREATE TABLE records (
                agent TEXT NOT NULL, seq BIGINT NOT NULL, ts TEXT NOT NULL, kind TEXT NOT NULL,
                device TEXT, unit INTEGER, status TEXT, payload JSONB NOT NULL, clock TEXT,
                received DOUBLE PRECISION NOT NULL, PRIMARY KEY (agent, seq))""",
            "CREATE INDEX records_ts ON records (ts)",
            "CREATE INDEX records_device ON records (agent, device, ts)",
        ],
        "common": [
            """CREATE TABLE agents (
                agent TEXT PRIMARY KEY, max_seq BIGINT NOT NULL, records BIGINT NOT NULL DEFAULT 0,
                gaps BIGINT NOT NULL DEFAULT 0, dropped BIGINT NOT NULL DEFAULT 0,
                first_seen DOUBLE PRECISION NOT NULL, last_seen DOUBLE PRECISION NOT NULL)""",
            """CREATE TABLE devices (
                agent TEXT NOT NULL, device TEXT NOT NULL, unit INTEGER,
                last_ts TEXT, last_status TEXT, values_ts TEXT, last_values TEXT,
                error_ts TEXT, last_error TEXT, health_ts TEXT, health TEXT,
                records BIGINT NOT NULL DEFAULT 0, errors BIGINT NOT NULL DEFAULT 0,
                last_seen DOUBLE PRECISION NOT NULL, PRIMARY KEY (agent, device))""",
        ],
    },
    # 2: index for retention, which deletes by `received` (server time), not by the record's ts.
    # PostgreSQL builds it CONCURRENTLY, outside the migration transaction: a plain CREATE INDEX
    # holds a SHARE lock on `records` for the whole build, and on a big table that stops every
    # collector's ingest for minutes. (SQLite has one writer anyway: plain, in the transaction.)
    {
        "sqlite": [
            "CREATE INDEX records_received ON records (received)",
        ],
        "postgres_concurrently": [
            ("records_received", "ON records (received)"),
        ],
    },
    # 3: legacy rows stored before their seqs became negative had positive 63-bit hash seqs; one
    # posted with an agent's own token pushed that agent's max_seq to a hash, and the agent then
    # read every answer as "your seqs are below the collector's" (a false seq-reuse alarm). Such an
    # agent's max_seq becomes the highest seq of its own records again (-1 when it has none).
    # Agents' readings always have a unit; legacy rows are the kind 'data' rows without one.
    {
        "common": [
            """UPDATE agents SET max_seq = COALESCE(
                   (SELECT MAX(r.seq) FROM records r
                    WHERE r.agent = agents.agent AND NOT (r.kind = 'data' AND r.unit IS NULL)), -1)
               WHERE EXISTS (SELECT 1 FROM records r WHERE r.agent = agents.agent AND r.seq = agents.max_seq
                             AND r.kind = 'data' AND r.unit IS NULL AND r.seq >= 0)""",
        ],
    },
    # 4: alerts (agent/collector/alerts/): the state per rule and series, the history of
    # notifications (events), the outbox that delivers each event to each notifier once, in order,
    # and the leases that let one collector process at a time send for a notifier.
    {
        "sqlite": [
            """CREATE TABLE alert_events (
                id INTEGER PRIMARY KEY AUTOINCREMENT, rule TEXT NOT NULL, kind TEXT NOT NULL,
                severity TEXT NOT NULL, state TEXT NOT NULL, reminder INTEGER NOT NULL DEFAULT 0,
                agent TEXT NOT NULL, device TEXT, point TEXT, value TEXT, threshold DOUBLE PRECISION,
                ts TEXT, since TEXT, at DOUBLE PRECISION NOT NULL, message TEXT NOT NULL, detail TEXT)""",
            """CREATE TABLE alert_outbox (
                id INTEGER PRIMARY KEY AUTOINCREMENT, event BIGINT NOT NULL, notifier TEXT NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0, next_try DOUBLE PRECISION NOT NULL,
                sent DOUBLE PRECISION, failed TEXT, last_error TEXT)""",
        ],
        "postgres": [
            """CREATE TABLE alert_events (
                id BIGSERIAL PRIMARY KEY, rule TEXT NOT NULL, kind TEXT NOT NULL,
                severity TEXT NOT NULL, state TEXT NOT NULL, reminder INTEGER NOT NULL DEFAULT 0,
                agent TEXT NOT NULL, device TEXT, point TEXT, value TEXT, threshold DOUBLE PRECISION,
                ts TEXT, since TEXT, at DOUBLE PRECISION NOT NULL, message TEXT NOT NULL, detail TEXT)""",
            """CREATE TABLE alert_outbox (
                id BIGSERIAL PRIMARY KEY, event BIGINT NOT NULL, notifier TEXT NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0, next_try DOUBLE PRECISION NOT NULL,
                sent DOUBLE PRECISION, failed TEXT, last_error TEXT)""",
        ],
        "common": [
            """CREATE TABLE alert_state (
                rule TEXT NOT NULL, agent TEXT NOT NULL, device TEXT NOT NULL, point TEXT NOT NULL,
                state TEXT NOT NULL, since TEXT, fired TEXT, value TEXT, last_ts TEXT,
                seen DOUBLE PRECISION, notified DOUBLE PRECISION, changed DOUBLE PRECISION,
                version BIGINT NOT NULL DEFAULT 0, PRIMARY KEY (rule, agent, device, point))""",
            "CREATE INDEX alert_state_active ON alert_state (agent, state)",
            "CREATE INDEX alert_events_at ON alert_events (at)",
            "CREATE INDEX alert_outbox_due ON alert_outbox (notifier, id) WHERE sent IS NULL AND failed IS NULL",
            """CREATE TABLE alert_leases (
                name TEXT PRIMARY KEY, owner TEXT NOT NULL, until DOUBLE PRECISION NOT NULL)""",
        ],
    },
    # 5: rollups (agent/collector/rollup.py): per (agent, device, point) 1-minute and 1-hour
    # buckets, a series table so a bucket row carries an integer id instead of three names,
    # the queue of stored batches not rolled up yet, and the backfill's cursor (existing
    # records are rolled up in chunks after the upgrade; a fresh database has none, so its
    # backfill starts done).
    {
        "sqlite": [
            """CREATE TABLE rollup_series (
                id INTEGER PRIMARY KEY, agent TEXT NOT NULL, device TEXT NOT NULL, point TEXT NOT NULL,
                UNIQUE (agent, device, point))""",
        ] + ["""CREATE TABLE rollup_%s (
                sid INTEGER NOT NULL, t INTEGER NOT NULL, n INTEGER NOT NULL, sum REAL NOT NULL,
                min REAL NOT NULL, max REAL NOT NULL, last REAL NOT NULL, last_ms INTEGER NOT NULL,
                PRIMARY KEY (sid, t)) WITHOUT ROWID""" % level for level in ("1m", "1h")] + [
            "CREATE TABLE rollup_pending (agent TEXT NOT NULL, seq INTEGER NOT NULL, "
            "PRIMARY KEY (agent, seq)) WITHOUT ROWID",
            "CREATE TABLE rollup_queue (id INTEGER PRIMARY KEY, agent TEXT NOT NULL, seqs TEXT NOT NULL, "
            "n INTEGER NOT NULL)",
        ],
        "postgres": [
            """CREATE TABLE rollup_series (
                id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, agent TEXT NOT NULL,
                device TEXT NOT NULL, point TEXT NOT NULL, UNIQUE (agent, device, point))""",
        ] + ["""CREATE TABLE rollup_%s (
                sid BIGINT NOT NULL, t BIGINT NOT NULL, n BIGINT NOT NULL, sum DOUBLE PRECISION NOT NULL,
                min DOUBLE PRECISION NOT NULL, max DOUBLE PRECISION NOT NULL,
                last DOUBLE PRECISION NOT NULL, last_ms BIGINT NOT NULL, PRIMARY KEY (sid, t))"""
             % level for level in ("1m", "1h")] + [
            "CREATE TABLE rollup_pending (agent TEXT NOT NULL, seq BIGINT NOT NULL, PRIMARY KEY (agent, seq))",
            "CREATE TABLE rollup_queue (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, "
            "agent TEXT NOT NULL, seqs TEXT NOT NULL, n INTEGER NOT NULL)",
        ],
        "common": [
            """CREATE TABLE rollup_state (
                name TEXT PRIMARY KEY, agent TEXT, seq BIGINT, done INTEGER NOT NULL)""",
            """INSERT INTO rollup_state (name, agent, seq, done)
               SELECT 'backfill', NULL, NULL, CASE WHEN EXISTS (SELECT 1 FROM records) THEN 0 ELSE 1 END""",
        ],
    },
]

VERSION = len(MIGRATIONS)


def statements(dialect, version):
    """Statements of migration `version` (1-based) for 'sqlite' or 'postgres', run in the
    migration's transaction."""
    m = MIGRATIONS[version - 1]
    return list(m.get(dialect, [])) + list(m.get("common", []))


def concurrent_indexes(version):
    """PostgreSQL indexes of migration `version` built with CREATE INDEX CONCURRENTLY before its
    transaction: (name, "ON table (columns)") pairs."""
    return list(MIGRATIONS[version - 1].get("postgres_concurrently", []))
