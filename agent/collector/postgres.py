"""PostgreSQL backend (psycopg 3), for several collector processes or machines sharing one database
behind a load balancer. Same schema and SQL as SQLite (store.py); payload is jsonb.

Idempotence holds across processes: the primary key (agent, seq) with ON CONFLICT DO NOTHING
decides, not anything held in memory. Migrations take an advisory lock, so collectors started
together migrate once. One connection per thread, autocommit for reads, an explicit transaction
per batch; a broken connection is dropped and reopened on the next request.
"""
import contextlib
import threading

import psycopg

from agent.collector.store import Store

_MIGRATION_LOCK = 0x6D6F6462  # 'modb': pg_advisory_xact_lock key for schema migrations


class PostgresStore(Store):
    dialect = "postgres"
    ph = "%s"
    _payload_text = "payload::text"

    def __init__(self, url, migrate=True, connect_timeout=10):
        self.url = url
        self.connect_timeout = connect_timeout
        self._local = threading.local()
        self._all = []
        self._all_lock = threading.Lock()
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
        # serialise migrations between collector processes starting at the same time
        conn = self._connect(autocommit=False)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
            conn.commit()
            try:
                return super().migrate()
            finally:
                with conn.cursor() as cur:
                    cur.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
                conn.commit()
        finally:
            conn.close()

    @contextlib.contextmanager
    def _read(self):
        conn = self._conn()
        try:
            with conn.cursor() as cur:
                yield cur
        except psycopg.OperationalError:
            self._drop()
            raise

    def _stream(self, sql, args, chunk=500):
        # A server-side (named) cursor in its own connection: rows arrive `chunk` at a time.
        conn = self._connect(autocommit=False)
        try:
            with conn.cursor(name="modbus_collector_export") as cur:
                cur.itersize = chunk
                cur.execute(sql, args)
                while True:
                    rows = cur.fetchmany(chunk)
                    if not rows:
                        break
                    yield from rows
            conn.rollback()
        finally:
            conn.close()

    def _insert(self, cur, rows):
        cur.executemany(self.sql_insert, rows)
        return cur.rowcount

    def close(self):
        with self._all_lock:
            conns, self._all = self._all, []
        for c in conns:
            try:
                c.close()
            except psycopg.Error:
                pass
        self._local = threading.local()
