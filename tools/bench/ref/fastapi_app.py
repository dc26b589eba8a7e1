"""Reference collector for tools/bench/ingest.py: what the same endpoint looks like in FastAPI.

NOT shipped. Idiomatic FastAPI + pydantic v2 models, served by uvicorn (httptools + uvloop), storing
the same rows in the same schema (agent.collector.schema), WAL + synchronous=FULL, one transaction
per batch, idempotent on (agent, seq). It does less work than the real collector (no per-device
summary table, lighter validation), so the comparison is conservative.

    REF_DB=/tmp/ref.db uvicorn --app-dir tools/bench/ref fastapi_app:app --port 8081
"""
import contextlib
import fcntl
import os
import sqlite3
import sys
import threading
import time
from typing import List, Optional

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".."))
from agent.collector.schema import VERSION, statements  # noqa: E402

DB = os.environ.get("REF_DB", "ref.db")
_local = threading.local()
_write_lock = threading.Lock()


def connect():
    conn = sqlite3.connect(DB, isolation_level=None, check_same_thread=False, timeout=10)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    return conn


_lock_fd = {}


@contextlib.contextmanager
def process_lock():
    """Same cross-process write lock as the collector (flock), so uvicorn --workers N is not
    slowed by SQLite's sleeping busy handler either."""
    fd = _lock_fd.get(os.getpid())
    if fd is None:
        fd = _lock_fd[os.getpid()] = os.open(DB + "-writelock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def conn():
    c = getattr(_local, "conn", None)
    if c is None:
        c = _local.conn = connect()
    return c


def migrate():
    c = connect()
    c.execute("BEGIN IMMEDIATE")  # uvicorn --workers N: each worker imports this module
    c.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    if c.execute("SELECT count(*) FROM schema_version").fetchone()[0] == 0:
        for v in range(1, VERSION + 1):
            for s in statements("sqlite", v):
                c.execute(s)
        c.execute("INSERT INTO schema_version VALUES (?)", (VERSION,))
    c.execute("COMMIT")
    c.close()


migrate()
app = FastAPI()


class Record(BaseModel):
    model_config = ConfigDict(extra="allow")
    agent: str
    seq: int = Field(ge=0)
    ts: str
    kind: Optional[str] = None
    device: Optional[str] = None
    unit: Optional[int] = Field(default=None, ge=0, le=255)
    status: Optional[str] = None
    values: Optional[dict] = None
    error: Optional[dict] = None
    health: Optional[dict] = None
    clock: Optional[str] = None


class Batch(BaseModel):
    agent: str
    records: List[Record]


INSERT = ("INSERT INTO records (agent, seq, ts, kind, device, unit, status, payload, clock, received) "
          "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (agent, seq) DO NOTHING")
AGENT = ("INSERT INTO agents (agent, max_seq, records, first_seen, last_seen) VALUES (?, ?, ?, ?, ?) "
         "ON CONFLICT (agent) DO UPDATE SET max_seq = max(agents.max_seq, excluded.max_seq), "
         "records = agents.records + excluded.records, last_seen = excluded.last_seen RETURNING max_seq")


@app.post("/api/v1/batches")
def post_batch(batch: Batch):
    now = time.time()
    rows = []
    for r in batch.records:
        # payload: the whole record as JSON text, as the collector stores it (pydantic's encoder)
        payload = r.model_dump_json(exclude_unset=True)
        rows.append((r.agent, r.seq, r.ts, r.kind or "data", r.device, r.unit, r.status, payload, r.clock, now))
    c = conn()
    with _write_lock, process_lock():
        c.execute("BEGIN IMMEDIATE")
        cur = c.executemany(INSERT, rows)
        stored = cur.rowcount
        max_seq = c.execute(AGENT, (batch.agent, max(r.seq for r in batch.records), stored, now, now)).fetchone()[0]
        c.execute("COMMIT")
    return {"stored": stored, "duplicates": len(rows) - stored, "max_seq": max_seq}
