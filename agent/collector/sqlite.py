"""SQLite backend: the embedded default.

WAL mode with synchronous=FULL: a batch is on disk before its 2xx goes out. One connection per
thread (sqlite3 connections must not be shared), writes serialised by a lock in this process so
threads queue in Python instead of spinning in SQLite's busy handler; busy_timeout covers other
processes (a retention job, a backup, the sqlite3 shell).

Several processes (`modbus-collector --workers N`, or gunicorn workers) may share one file: the
writer also holds an flock on `<db>-writelock`, so a process waits in the kernel and wakes the
moment the other commits, instead of sleeping in SQLite's busy handler (1, 2, 5, 10 ... ms).

Group commit: batches that arrive while another batch is being written queue up, and the next
thread to get the lock writes all of them in one transaction (a savepoint each, so one failing
batch does not take the others down) and one fsync. Every batch is still committed before its
answer goes out; under load there are just fewer fsyncs than batches.

Records go in with multi-row INSERTs (ROWS_PER_INSERT rows a statement), not executemany: the
sqlite3 module lets go of the GIL around every sqlite3_step, which executemany calls once per row,
and while other request threads parse their batches each of those 1000 re-acquisitions can wait
for the interpreter's switch interval (5 ms): the writer, which holds the write lock everyone
queues on, crawls. One statement per ROWS_PER_INSERT rows steps 11 times per 1000-record batch.
"""
import contextlib
import fcntl
import itertools
import os
import sqlite3
import threading

from agent.collector.store import ROW_COLUMNS, Store

BUSY_TIMEOUT_MS = 10000
# The WAL file is cut back to this size whenever it is reset (after a checkpoint that copied
# everything back and no reader still needs it). Without a limit SQLite reuses the file at
# whatever size it once reached: one spike (a reader that pinned old pages while ingest went on)
# would keep gigabytes of WAL on disk until the collector stops. Steady state is about
# wal_autocheckpoint (1000 pages, 4 MB) plus one group commit, so 16 MB never truncates then.
WAL_SIZE_LIMIT = 16 << 20
# 10 parameters a row: 990 per statement, under the 999 that SQLite before 3.32 allows.
ROWS_PER_INSERT = 99
_ROW_PARAMS = "(" + ", ".join(["?"] * len(ROW_COLUMNS)) + ")"
_flatten = itertools.chain.from_iterable


def insert_sql(n):
    """INSERT of n records (ROW_COLUMNS order) in one statement, duplicates of (agent, seq) skipped."""
    return ("INSERT INTO records (%s) VALUES %s ON CONFLICT (agent, seq) DO NOTHING"
            % (", ".join(ROW_COLUMNS), ", ".join([_ROW_PARAMS] * n)))


class _Job:
    __slots__ = ("agent", "rows", "received", "result", "error", "done")

    def __init__(self, agent, rows, received):
        self.agent, self.rows, self.received = agent, rows, received
        self.result = self.error = None
        self.done = False


class SQLiteStore(Store):
    dialect = "sqlite"
    ph = "?"

    def __init__(self, path, migrate=True, future_skew=None):
        self.path = str(path)
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._queue = []
        self._queue_lock = threading.Lock()
        self._lock_fd = None
        self._lock_pid = None
        self._all = []
        self._all_lock = threading.Lock()
        self._insert_sqls = {}  # rows per statement -> SQL text (the sizes a batch's tail takes)
        if future_skew is not None:
            self.future_skew = float(future_skew)
        self._prepare_sql()
        if migrate:
            self.migrate()

    def _connect(self):
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=BUSY_TIMEOUT_MS / 1000.0, cached_statements=64)
        except sqlite3.OperationalError as e:
            # sqlite says "unable to open database file" without the file: name it, and its directory
            folder = os.path.dirname(os.path.abspath(self.path))
            why = "" if os.path.isdir(folder) else " (directory %s does not exist)" % folder
            raise sqlite3.OperationalError("%s: %s%s" % (self.path, e, why)) from None
        conn.execute("PRAGMA busy_timeout = %d" % BUSY_TIMEOUT_MS)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA journal_size_limit = %d" % WAL_SIZE_LIMIT)
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
    def _process_lock(self):
        """Exclusive between processes writing this database (flock on a side file)."""
        if self._lock_pid != os.getpid():  # first use, or a fork: the fd must be this process's own
            try:
                self._lock_fd = os.open(self.path + "-writelock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError:
                self._lock_fd = None  # read-only directory: SQLite's own locking still holds
            self._lock_pid = os.getpid()
        if self._lock_fd is None:
            yield
            return
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _write(self):
        conn = self._conn()
        with self._write_lock, self._process_lock():
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

    def ingest(self, agent, rows, received):
        if not rows:
            return super().ingest(agent, rows, received)
        job = _Job(agent, rows, received)
        with self._queue_lock:
            self._queue.append(job)
        with self._write_lock:
            if not job.done:  # else an earlier lock holder wrote it in its group
                with self._process_lock():
                    with self._queue_lock:
                        jobs, self._queue = self._queue, []
                    self._write_group(jobs)
        if job.error is not None:
            raise job.error
        return job.result

    def _write_group(self, jobs):
        """One transaction for all queued batches; called with the write lock held."""
        conn = self._conn()
        cur = conn.cursor()
        single = len(jobs) == 1
        try:
            cur.execute("BEGIN IMMEDIATE")
            for j in jobs:
                if single:
                    j.result = self._ingest_tx(cur, j.agent, j.rows, j.received)
                    continue
                cur.execute("SAVEPOINT batch")
                try:
                    j.result = self._ingest_tx(cur, j.agent, j.rows, j.received)
                except sqlite3.Error as e:
                    cur.execute("ROLLBACK TO batch")
                    j.error = e
                cur.execute("RELEASE batch")
            cur.execute("COMMIT")
        except BaseException as e:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            for j in jobs:
                j.result, j.error = None, e
            if not isinstance(e, Exception):
                raise
        finally:
            for j in jobs:
                j.done = True
            cur.close()

    def _insert(self, cur, rows):
        """rows in statements of up to ROWS_PER_INSERT rows (see the module doc); returns how many
        were new."""
        stored = 0
        sqls = self._insert_sqls
        for i in range(0, len(rows), ROWS_PER_INSERT):
            part = rows[i:i + ROWS_PER_INSERT]
            sql = sqls.get(len(part))
            if sql is None:
                sql = sqls[len(part)] = insert_sql(len(part))
            cur.execute(sql, list(_flatten(part)))
            stored += cur.rowcount
        return stored

    @contextlib.contextmanager
    def _read(self):
        cur = self._conn().cursor()
        try:
            yield cur
        finally:
            cur.close()

    def _hint(self, col, agent, device):
        # Unary + keeps a column's index out of the plan. agent= without device=: the planner
        # stays on records_ts, which holds (ts, agent, seq) in key order (a WITHOUT ROWID index
        # carries the primary key), instead of taking the primary key (agent, seq) and sorting
        # all the agent's rows again for every page. received (the export's bound, nearly every
        # row): never records_received plus a sort.
        if col == "received" or col == "agent" and device is None:
            return "+" + col
        return col

    @contextlib.contextmanager
    def _pager(self):
        """fetch(sql, args) -> all rows of one page, its read transaction over when it returns.
        Its own connection: the export may be consumed after the request's thread moved on (a
        WSGI server may iterate elsewhere); closed when the export ends or the client hangs up."""
        conn = self._connect()
        try:
            def fetch(sql, args):
                cur = conn.execute(sql, args)
                try:
                    return cur.fetchall()
                finally:
                    cur.close()
            yield fetch
        finally:
            conn.close()

    def close(self):
        if self._lock_fd is not None and self._lock_pid == os.getpid():
            os.close(self._lock_fd)
        self._lock_fd = self._lock_pid = None
        with self._all_lock:
            conns, self._all = self._all, []
        for c in conns:
            try:
                c.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()
