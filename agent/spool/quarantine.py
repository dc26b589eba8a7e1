"""Quarantine: records the collector rejected (4xx) are kept with the reason for a human, and
the queue moves on, so one bad record never blocks it.

  quarantine.jsonl  (or [upload] quarantine_file) one {"quarantined": TS, "reason": ..., "record":
                    LINE} per line; bounded: one older generation (.1) is kept.

Still on the Spool in this round; it is the uploader's concern and moves to its side next.
"""
import json
import logging
import os

from agent.record import utc_timestamp

log = logging.getLogger("agent.spool")

QUARANTINE = "quarantine.jsonl"


class Quarantine:
    """Spool methods for the quarantine file (state: Spool.__init__)."""

    def quarantine(self, batch, reason):
        """The collector rejected these records (4xx): keep them with the reason in the quarantine
        file for a human, and move on so one bad record never blocks the queue."""
        if batch is None or not batch.count:
            return
        head = ('{"quarantined":"%s","reason":%s,"record":' % (
            utc_timestamp(self._clock()), json.dumps(str(reason)[:500]))).encode("utf-8")
        data = b"".join(head + line + b"}\n" for line in batch.lines)
        q = self._write_quarantine(self.quarantine_file, data)
        if q is None and self.quarantine_file != os.path.join(self.directory, QUARANTINE):
            q = self._write_quarantine(os.path.join(self.directory, QUARANTINE), data)
        if q is None:
            # Nowhere to keep them (disk full): the queue must still move on; say exactly what went.
            log.error("spool %s: quarantine impossible, %d rejected records seq %d..%d discarded: %s",
                      self.directory, batch.count, batch.first_seq, batch.last_seq, str(reason)[:200])
        self.totals["quarantined"] += batch.count
        log.warning("spool %s: quarantined %d records seq %d..%d in %s: %s", self.directory,
                    batch.count, batch.first_seq, batch.last_seq, q, str(reason)[:200])
        self._acked(batch)

    def _write_quarantine(self, q, data):
        """Append to the quarantine file (bounded: one older generation, q.1, is kept). -> q or None."""
        try:
            if os.path.getsize(q) + len(data) > self.quarantine_max_bytes:
                os.replace(q, q + ".1")
                log.warning("spool %s: quarantine file %s full: moved to %s.1, replacing the older one",
                            self.directory, q, q)
        except OSError:
            pass
        try:
            parent = os.path.dirname(q)
            if parent:
                os.makedirs(parent, exist_ok=True)
            with open(q, "ab") as f:
                f.write(data)
                f.flush()
                if self.fsync != "never":
                    os.fsync(f.fileno())
            return q
        except OSError as e:
            log.error("spool %s: cannot write quarantine file %s: %s", self.directory, q, e.strerror)
            return None
