"""Writing: one record is one line, appended with one write(2) (see agent.spool.segments);
rotation at segment_bytes; a failed write is tidied up (partial line taken back) and handed to
the loss accounting; a spool directory deleted or replaced from outside is recreated.

A deleted (or replaced) spool directory is recreated on the next write (with an ERROR line): its
segments are accounted for as lost, cursor.json (seq floor, acknowledgement, generation), the
lock and ack.hint (with the pending account) are written again; setaside.log (and the
uploader's quarantine file, if it was kept there) are gone.
"""
import errno
import fcntl
import logging
import os

from agent.record import encode
from agent.spool.loss import SPACE_ERRNOS
from agent.spool.segments import SETASIDE, Segment

log = logging.getLogger("agent.spool")

LOCK = "lock"


class Writer:
    """Spool methods that write lines (state: Spool.__init__)."""

    def append(self, record):
        """Assign record["seq"], write its line; returns the seq. Never raises on a full or failing
        disk: the record is then counted as lost and a gap record reports it once writing works."""
        if self._pending_loss:
            self._write_pending_gap()
        seq = self._next_seq
        record["seq"] = seq
        line = encode(record)
        if not line.startswith(self._prefix):
            # Foreign key order or agent: rebuild so every spooled line starts agent, seq, ts.
            rec = {"agent": self.agent_id, "seq": seq}
            rec.update((k, v) for k, v in record.items() if k not in ("agent", "seq"))
            line = encode(rec)
        now = self._clock()
        self._check_step(now)
        if self._make_room(len(line), now):
            seq = self._next_seq          # a gap record took the seq
            record["seq"] = seq
            line = self._prefix + str(seq).encode() + line[line.find(b",", self._plen):]
        self._lease.cover(seq)
        # _next_seq moves on once the line is written or counted as lost: a segment dropped while
        # trying writes cursor.json, and a kill -9 before _lose must not leave a seq that nothing
        # accounts for (the seq, never on disk, is then simply used again).
        if self._failed is None and self._write(line, seq, record.get("ts"), now):
            self._next_seq = seq + 1
            if self._outage is not None:
                self._end_outage(None)
            return seq
        # else: its gap record could not be written just now, so neither can this line (and it
        # must not come first: see _recover)
        self._next_seq = seq + 1
        self._lose(seq, record.get("ts"))
        return seq

    def _write(self, line, seq, ts, now, retry=True):
        """-> True when the line is in the segment (page cache at least)."""
        try:
            if self._wfd is None:
                self._open_segment(seq)
            seg = self._segs[-1]
            n = os.write(self._wfd, line)
            while n < len(line):      # a short write only happens when the disk is full
                k = os.write(self._wfd, line[n:])
                if k <= 0:
                    raise OSError(errno.ENOSPC, "short write")
                n += k
        except OSError as e:
            return self._write_failed(e, line, seq, ts, now, retry)
        seg.size += len(line)
        seg.count += 1
        seg.last_seq = seq
        seg.last_ts = ts
        if seg.first_seq is None:
            seg.first_seq, seg.first_ts = seq, ts
        seg.mtime = now
        self._bytes += len(line)
        self.bytes_written += len(line)
        self.totals["appended"] += 1
        if self.fsync == "always":
            self._sync()
        else:
            self._dirty = True
        return True

    def _write_failed(self, e, line, seq, ts, now, retry):
        """A write failed (any error: the caller accounts for the line). Tidy up, try a remedy
        once (recreate a deleted directory; drop the oldest segment on a full disk), say it once
        per outage. -> True when the line got written after all."""
        self.totals["write_errors"] += 1
        why = e.strerror or str(e)
        if self._wfd is not None:
            try:   # take back a partial line so the segment stays self-delimiting
                os.ftruncate(self._wfd, self._segs[-1].size)
            except OSError:
                pass
            # Start a fresh segment next time: a file the filesystem refuses to grow stays refused.
            try:
                os.close(self._wfd)
            except OSError:
                pass
            self._wfd = None
            if not self._segs[-1].size:
                self._delete(self._segs.pop(), durable=False)
        if retry and self._dir_lost():
            if self._recreate_dir():
                return self._write(line, seq, ts, now, retry=False)
        elif retry and e.errno in SPACE_ERRNOS and len(self._segs) > 1 and not (
                self._outage is not None and self._outage[3]):
            # Make room: the oldest data goes (accounted for by a gap record), the newest is kept.
            self._drop("disk full: %s" % why)
            self._reap()        # the space is needed now (its account in ack.hint); the gap record follows
            if self._write(line, seq, ts, now, retry=False):
                return True
            if self._outage is not None:
                self._outage[3] = True     # dropping did not help: not again in this outage
        if self._outage is None:
            self._outage = [self._mono(), why, 0, False]
            log.error("spool %s: cannot write (seq %d): %s: records are lost while this lasts (logged "
                      "once); a gap record will account for them once writing works again",
                      self.directory, seq, why)
        else:
            self._outage[1] = why
        return False

    def _open_segment(self, seq):
        if self._locked_out:
            raise OSError(errno.ENOLCK, "spool directory in use by another agent")
        seg = Segment(seq, self._seg_path(seq))
        self._wfd = os.open(seg.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._segs.append(seg)
        self._dir_dirty = True
        self._settle()      # cursors on the next seq (no segment before) start here

    def _rotate(self):
        if self._wfd is None:
            return
        fd, self._wfd = self._wfd, None
        if self.fsync == "interval" and self._dirty:
            # Synced (and closed) by the next interval's fsync, not now: rotating must not add
            # fsyncs (flash wear) beyond one per interval. A few at most stay open.
            self._unsynced.append(fd)
            if len(self._unsynced) >= 8:
                self._sync()
        else:       # always: every line is synced already; never: the kernel decides
            os.close(fd)

    def _dir_lost(self):
        """Was the spool directory deleted, or replaced by another one, since it was opened?"""
        try:
            st = os.stat(self.directory)
            mine = os.fstat(self._dirfd)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino) or mine.st_nlink == 0

    def _recreate_dir(self):
        """The spool directory is gone (deleted, or replaced from outside): account for the
        segments it held, recreate it with what lived there (lock, cursor.json with the seq
        floor, acknowledgement and generation, ack.hint). -> True when it is usable again."""
        if "dir" not in self._troubles:
            log.error("spool %s: the spool directory was deleted or replaced from outside the agent: "
                      "recreating it; its %d un-uploaded records are lost (a gap record accounts for "
                      "them), and %s and any other file kept there (a quarantine file) are gone",
                      self.directory, self._backlog(), SETASIDE)
        for seg in list(self._segs):
            self._lost_segment(seg, "directory")
        for fd in self._unsynced + [self._hintfd]:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._unsynced, self._hintfd, self._doomed = [], None, []
        self._bytes = 0
        self._settle()
        try:
            os.makedirs(self.directory, exist_ok=True)
            dirfd = os.open(self.directory, os.O_RDONLY)
        except OSError as e:
            self._trouble("dir", "cannot recreate the spool directory: %s", e.strerror)
            return False
        os.close(self._dirfd)
        self._dirfd = dirfd
        try:
            lockfd = os.open(os.path.join(self.directory, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(lockfd)
                raise
        except OSError as e:
            # Another agent took the new directory: writing there would mix two spools.
            self._locked_out = True
            self._trouble("dir", "the recreated spool directory is in use by another agent (%s): "
                          "this agent's records are lost until it is restarted", e.strerror)
            return False
        os.close(self._lockfd)
        self._lockfd = lockfd
        self._locked_out = False
        self._troubles.discard("dir")
        self._dir_dirty = True
        self._write_cursor(durable=self.fsync != "never")
        dirty = self._cursor_dirty
        self._write_hint()
        self._cursor_dirty = dirty
        self._save_failed()
        return True
