"""The records the collector rejected (a 4xx naming them), kept with the reason for a human.

One JSON line per record: {"quarantined": TS, "reason": "HTTP 422: ...", "record": {...}}, the
record being the spool's line as it was sent. The uploader writes them here, then acknowledges
the batch in the spool, so one bad record never blocks the queue; written (and fsynced, unless
the spool's `[agent] fsync` is never) before the acknowledgement, so a crash in between sends the batch again
rather than losing it. Bounded: a file that would grow beyond `max_bytes` becomes FILE.1
(replacing the older one) and a new file starts. A file that cannot be written (its directory
missing, a full disk) falls back to FALLBACK in the spool's directory; when that fails too the
records are discarded with an ERROR saying exactly which: the queue must still move on.
"""
import json
import logging
import os
import time

from agent.wire import utc_timestamp

log = logging.getLogger("agent.upload")

FALLBACK = "quarantine.jsonl"
MAX_BYTES = 1 << 20


class Quarantine:
    """`path`: `[upload] quarantine_file` (None: FALLBACK in the directory of the spool the
    records come from); `fsync`: make each write durable before the batch is acknowledged
    (None: as the spool does, unless its fsync is "never")."""

    def __init__(self, path=None, max_bytes=MAX_BYTES, fsync=None, clock=time.time, label="upload"):
        self.path = None if path is None else str(path)
        self.label = label      # the output whose records these are, in the log lines
        self.max_bytes = int(max_bytes)
        self.fsync = fsync
        self._clock = clock
        self.total = 0          # records quarantined by this process

    def keep(self, spool, batch, reason):
        """Write `batch`'s records with `reason`, then acknowledge it in `spool`. -> the file
        written, None when nothing could be written (the records are gone, logged)."""
        if batch is None or not batch.count:
            return None
        head = ('{"quarantined":"%s","reason":%s,"record":' % (
            utc_timestamp(self._clock()), json.dumps(str(reason)[:500]))).encode("utf-8")
        data = b"".join(head + line + b"}\n" for line in batch.lines)
        fallback = os.path.join(str(spool.directory), FALLBACK if self.label == "upload" else
                                self.label + "-" + FALLBACK)
        durable = spool.fsync != "never" if self.fsync is None else bool(self.fsync)
        q = self._write(self.path or fallback, data, durable)
        if q is None and (self.path or fallback) != fallback:
            q = self._write(fallback, data, durable)
        if q is None:
            # Nowhere to keep them (disk full): the queue must still move on; say exactly what went.
            log.error("%s: quarantine impossible, %d rejected records seq %d..%d discarded: %s",
                      self.label, batch.count, batch.first_seq, batch.last_seq, str(reason)[:200])
        self.total += batch.count
        log.warning("%s: quarantined %d records seq %d..%d in %s: %s",
                    self.label, batch.count, batch.first_seq, batch.last_seq, q, str(reason)[:200])
        spool.ack(batch)
        return q

    def _write(self, q, data, durable):
        """Append to file `q`, keeping one older generation (q.1). -> q or None."""
        try:
            if os.path.getsize(q) + len(data) > self.max_bytes:
                os.replace(q, q + ".1")
                log.warning("%s: quarantine file %s full: moved to %s.1, replacing the older one", self.label, q, q)
        except OSError:
            pass
        try:
            parent = os.path.dirname(q)
            if parent:
                os.makedirs(parent, exist_ok=True)
            with open(q, "ab") as f:
                f.write(data)
                f.flush()
                if durable:
                    os.fsync(f.fileno())
            return q
        except OSError as e:
            log.error("%s: cannot write quarantine file %s: %s", self.label, q, e.strerror)
            return None
