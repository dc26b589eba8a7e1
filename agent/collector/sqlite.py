"""SQLite backend: the embedded default.

WAL mode with synchronous=FULL: a batch is on disk before its 2xx goes out. One connection per
thread (sqlite3 connections must not be shared), writes serialised by a lock in this process so
threads queue in Python instead of spinning in SQLite's busy handler; busy_timeout covers other
processes (a retention job, a backup, the sqlite3 shell).
"""
import contextlib
import sqlite3
import threading

from agent.collector.store import Store

BUSY_TIMEOUT_MS = 10000


class SQLiteStore(Store):
    dialect = "sqlite"
    ph = "?"

    def __init__(self, path, migrate=True):
        self.path = str(path)
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._all = []
        self._all_lock = threading.Lock()
        self._prepare_sql()
        if migrate:
            self.migrate()

    def _connect(self):
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=BUSY_TIMEOUT_MS / 1000.0, cached_statements=64)
        conn.execute("PRAGMA busy_timeout = %d" % BUSY_TIMEOUT_MS)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    def _conn(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
            with self._all_lock:
                self._all.append(conn)
        return conn

    @contextlib.contextmanager
    def _write(self):
        conn = self._conn()
        with self._write_lock:
            cur = conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                yield cur
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            else:
                conn.execute("COMMIT")
            finally:
                cur.close()

    @contextlib.contextmanager
    def _read(self):
        cur = self._conn().cursor()
        try:
            yield cur
        finally:
            cur.close()

    def _stream(self, sql, args, chunk=500):
        # Its own connection: the generator may be consumed after the request's thread moved on
        # (a WSGI server may iterate elsewhere), and closing it ends the read transaction.
        conn = self._connect()
        try:
            cur = conn.execute(sql, args)
            while True:
                rows = cur.fetchmany(chunk)
                if not rows:
                    break
                yield from rows
        finally:
            conn.close()

    def close(self):
        with self._all_lock:
            conns, self._all = self._all, []
        for c in conns:
            try:
                c.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()
