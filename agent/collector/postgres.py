"""PostgreSQL backend (psycopg 3), for several collector processes or machines sharing one database
behind a load balancer. Same schema and SQL as SQLite (store.py); payload is jsonb.

Idempotence holds across processes: the primary key (agent, seq) with ON CONFLICT DO NOTHING
decides, not anything held in memory. Migrations take an advisory lock, so collectors started
together migrate once. One connection per thread, autocommit for reads, an explicit transaction
per batch; a broken connection is dropped and reopened on the next request.
"""
import contextlib
import threading
import time

import psycopg

from agent.collector.schema import concurrent_indexes
from agent.collector.store import Store

_MIGRATION_LOCK = 0x6D6F6462  # 'modb': session advisory lock key for schema migrations


class PostgresStore(Store):
    dialect = "postgres"
    ph = "%s"
    _payload_text = "payload::text"

    def _ts_text(self, epoch_sql):
        return ("to_char(to_timestamp(%s) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
                % epoch_sql)

    def __init__(self, url, migrate=True, connect_timeout=10, future_skew=None):
        self.url = url
        self.connect_timeout = connect_timeout
        self._local = threading.local()
        self._all = []
        self._all_lock = threading.Lock()
        if future_skew is not None:
            self.future_skew = float(future_skew)
        self._prepare_sql()
        if migrate:
            self.migrate()

    def _connect(self, autocommit=True):
        return psycopg.connect(self.url, autocommit=autocommit, connect_timeout=self.connect_timeout,
                               application_name="modbus-collector")

    def _conn(self):
        conn = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.broken:
            conn = self._local.conn = self._connect()
            with self._all_lock:
                self._all.append(conn)
        return conn

    def _drop(self):
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass

    @contextlib.contextmanager
    def _write(self):
        conn = self._conn()
        try:
            with conn.transaction(), conn.cursor() as cur:
                yield cur
        except psycopg.OperationalError:
            self._drop()
            raise

    def migrate(self):
        # Serialise migrations between collector processes starting at the same time. The lock
        # is polled, not waited for: a session blocked in pg_advisory_lock() holds a snapshot,
        # and CREATE INDEX CONCURRENTLY (run by the holder) waits for every older snapshot to
        # go, which is an undetected deadlock.
        conn = self._connect(autocommit=True)
        try:
            pause = 0.02
            while not conn.execute("SELECT pg_try_advisory_lock(%s)", (_MIGRATION_LOCK,)).fetchone()[0]:
                time.sleep(pause)
                pause = min(pause * 2, 0.5)
            try:
                return super().migrate()
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
        finally:
            conn.close()

    def _migrate_outside_transaction(self, version):
        """Build migration `version`'s indexes with CREATE INDEX CONCURRENTLY (autocommit: it
        cannot run in a transaction block), so ingest by other collectors goes on meanwhile.
        Runs under the migration advisory lock, so no other collector builds the same index.
        A build that failed or was cut off (collector killed, connection lost) leaves an
        INVALID index of that name, which IF NOT EXISTS would keep for good: drop it first."""
        if not concurrent_indexes(version):
            return
        with self._read() as cur:
            cur.execute("SELECT version FROM schema_version")
            if cur.fetchone()[0] >= version:
                return
            for name, target in concurrent_indexes(version):
                cur.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)",
                            (name,))
                row = cur.fetchone()
                if row is not None and not row[0]:
                    cur.execute("DROP INDEX CONCURRENTLY IF EXISTS %s" % name)
                cur.execute("CREATE INDEX CONCURRENTLY IF NOT EXISTS %s %s" % (name, target))

    @contextlib.contextmanager
    def _read(self):
        conn = self._conn()
        try:
            with conn.cursor() as cur:
                yield cur
        except psycopg.OperationalError:
            self._drop()
            raise

    @contextlib.contextmanager
    def _pager(self):
        """fetch(sql, args) -> all rows of one page. An autocommit connection of its own: each
        page is one statement, its own transaction, so a slow export holds no snapshot between
        pages (a server-side cursor would, for the whole export: vacuum stalls, tables bloat)."""
        conn = self._connect(autocommit=True)
        try:
            yield lambda sql, args: conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def _insert(self, cur, rows):
        cur.executemany(self.sql_insert, rows)
        return cur.rowcount

    def _stored_here(self, cur, agent, rows):
        """Rows whose record was inserted by this transaction (xmin), not by a concurrent one
        that got its (agent, seq) in first."""
        cur.execute("SELECT seq FROM records WHERE agent = %s AND seq = ANY(%s) "
                    "AND xmin = pg_current_xact_id()::xid", (agent, [r[1] for r in rows]))
        mine = {r[0] for r in cur.fetchall()}
        return [r for r in rows if r[1] in mine]

    def close(self):
        with self._all_lock:
            conns, self._all = self._all, []
        for c in conns:
            try:
                c.close()
            except psycopg.Error:
                pass
        self._local = threading.local()
