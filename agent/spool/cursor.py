"""The cursor file and the ack hint: where reading resumes, the seq floor, the totals.

  cursor.json  acknowledgement (acked seq, segment, offset) + seq floor (next_seq) + totals + the
               seq lease generation ("gen"), replaced atomically (tmp, fsync, rename, directory
               fsync).
  ack.hint     the latest acknowledgement between two durable cursor writes: one fixed-size line
               with a CRC, overwritten in place (same page, same inode), so acknowledging every
               poll cycle costs no new file and no fsync; it survives a killed process, and after
               a power cut a torn hint fails its CRC and cursor.json is used (re-sending means
               duplicates the collector drops, never loss). Created at open, so acknowledgements
               made while the disk is full are still kept. From byte HINT_SIZE on, the same file
               (the same page: a 16 kB tmpfs has four) holds the pending loss account: the
               records lost to failed writes that no gap record holds yet, one fixed-size line
               with a CRC, rewritten in place when it changes (see agent.spool.loss).

Acknowledged records never come back after a restart, even after SIGKILL (cursor.json or the
ack hint, both in the page cache); after a power cut up to fsync_interval seconds of
acknowledgements may be re-sent (duplicates the collector drops, never loss).
"""
import errno
import json
import logging
import os
import zlib

log = logging.getLogger("agent.spool")

CURSOR = "cursor.json"
ACK_HINT = "ack.hint"
HINT_SIZE = 128             # ack.hint: the acknowledgement line, then (at this offset) ...
PENDING_SIZE = 1024         # ... the pending loss account; both rewritten in place, never grown


class CursorFiles:
    """Spool methods for cursor.json and ack.hint (state: Spool.__init__)."""

    def _position(self, cursor):
        """Put the reader on the first un-acknowledged line: the cursor's (segment, offset) when it
        is still a line boundary, else the first line whose seq is above acked_seq."""
        segs = self._segs
        if cursor:
            key, off = cursor["segment"], cursor["offset"]
            while len(segs) > 1 and segs[0].key < key:
                self._delete(segs.pop(0), durable=False)
            if segs and segs[0].key == key and 0 <= off <= segs[0].size and self._boundary(segs[0], off):
                self._roff = off
                self._rline = self._count_lines(segs[0], off)
                return
        acked = self._acked_seq
        while len(segs) > 1 and segs[0].last_seq is not None and segs[0].last_seq <= acked:
            self._delete(segs.pop(0), durable=False)
        self._roff = self._rline = 0
        if segs and acked and segs[0].first_seq is not None and segs[0].first_seq <= acked:
            with open(segs[0].path, "rb") as f:
                data = f.read(segs[0].size)
            pos = 0
            lines = 0
            while pos < len(data):
                nl = data.find(b"\n", pos)
                m = self._meta(data[pos:nl])
                if m is not None and m[0] > acked:
                    break
                pos = nl + 1
                lines += 1
            self._roff, self._rline = pos, lines

    def _read_cursor(self):
        path = os.path.join(self.directory, CURSOR)
        try:
            with open(path, "rb") as f:
                cur = json.loads(f.read())
            if not isinstance(cur, dict) or not all(
                    type(cur.get(k)) is int for k in ("acked_seq", "next_seq", "segment", "offset")):
                raise ValueError("missing fields")
            return cur
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("spool %s: cursor unreadable (%s): re-sending from the oldest segment "
                        "(the collector drops duplicates)", path, e)
            return None

    def _write_cursor(self, durable):
        seg = self._segs[0] if self._segs else None
        cur = {"acked_seq": self._acked_seq, "next_seq": self._next_seq, "origin_seq": self.origin_seq,
               "segment": seg.key if seg else self._next_seq, "offset": self._roff if seg else 0}
        if self._lease.gen is not None:
            cur["gen"] = self._lease.gen
        if self._lease.gen_prev is not None:
            cur["gen_prev"] = self._lease.gen_prev
        for k, v in self.totals.items():
            if k != "appended":
                cur[k] = v
        path = os.path.join(self.directory, CURSOR)
        tmp = path + ".tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                data = json.dumps(cur, separators=(",", ":")).encode() + b"\n"
                if os.write(fd, data) != len(data):
                    raise OSError(errno.ENOSPC, "short write")
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            if durable:
                os.fsync(self._dirfd)
        except OSError as e:
            # Disk full or failing: the old cursor stays (re-sending means duplicates the collector
            # drops, never loss); keep trying on the next acknowledgement.
            self._cursor_dirty = True
            self._trouble("cursor", "cannot write %s: %s (tried again at every acknowledgement; "
                          "logged once)", CURSOR, e.strerror)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return False
        self._resolved("cursor", "%s written again", CURSOR)
        if durable:
            self._cursor_dirty = False
            self._last_cursor_sync = self._mono()
        else:
            self._cursor_dirty = True
        return True

    def _read_hint(self):
        try:
            with open(os.path.join(self.directory, ACK_HINT), "rb") as f:
                data = f.read(HINT_SIZE)
            body, crc = data.rstrip().rsplit(b" ", 1)
            if zlib.crc32(body) != int(crc, 16):
                raise ValueError("CRC mismatch")
            acked, nxt, seg, off = (int(x) for x in body.split())
            return {"acked_seq": acked, "next_seq": nxt, "segment": seg, "offset": off}
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("spool %s: %s unusable (%s); using %s", self.directory, ACK_HINT, e, CURSOR)
            return None

    def _write_hint(self):
        seg = self._segs[0] if self._segs else None
        body = b"%d %d %d %d" % (self._acked_seq, self._next_seq, seg.key if seg else self._next_seq,
                                 self._roff if seg else 0)
        data = (body + b" %08x" % zlib.crc32(body)).ljust(HINT_SIZE - 1) + b"\n"
        try:
            os.pwrite(self._hint_fd(), data, 0)
        except OSError as e:
            self._trouble("hint", "cannot write %s: %s", ACK_HINT, e.strerror)
            self._write_cursor(durable=False)
            return
        self._resolved("hint", "%s written again", ACK_HINT)
        self._cursor_dirty = True

    def _hint_fd(self):
        """The open ack.hint (created when missing). Raises OSError."""
        if self._hintfd is None:
            self._hintfd = os.open(os.path.join(self.directory, ACK_HINT), os.O_RDWR | os.O_CREAT, 0o644)
        return self._hintfd

    def _read_pending(self):
        """-> the pending loss account kept in ack.hint [count, first_seq, last_seq, first_ts,
        last_ts, reason], or None."""
        try:
            with open(os.path.join(self.directory, ACK_HINT), "rb") as f:
                f.seek(HINT_SIZE)
                data = f.read(PENDING_SIZE)
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("spool %s: cannot read %s: %s: an account of lost records may be missing",
                        self.directory, ACK_HINT, e.strerror)
            return None
        if not data:
            return None
        try:
            body, crc = data.rstrip().rsplit(b" ", 1)
            if zlib.crc32(body) != int(crc, 16):
                raise ValueError("CRC mismatch")
            doc = json.loads(body)
            if not doc:
                return None
            acc = [doc["dropped"], doc["first_seq"], doc["last_seq"], doc.get("first_ts"),
                   doc.get("last_ts"), doc["reason"]]
            if not (type(acc[0]) is int and type(acc[1]) is int and type(acc[2]) is int
                    and acc[0] > 0 and 0 < acc[1] <= acc[2] and isinstance(acc[5], str)):
                raise ValueError("not an account: %r" % (doc,))
            return acc
        except (ValueError, KeyError, TypeError) as e:
            log.warning("spool %s: the loss account in %s is unusable (%s): an account of lost "
                        "records may be missing", self.directory, ACK_HINT, e)
            return None

    def _write_pending_file(self, acc, sync=False):
        doc = {} if acc is None else {"dropped": acc[0], "first_seq": acc[1], "last_seq": acc[2],
                                      "first_ts": acc[3], "last_ts": acc[4], "reason": acc[5]}
        body = json.dumps(doc, separators=(",", ":")).encode()
        data = (body + b" %08x" % zlib.crc32(body)).ljust(PENDING_SIZE - 1) + b"\n"
        fd = self._hint_fd()
        if os.fstat(fd).st_size < HINT_SIZE:
            self._write_hint()      # a new file: the hint first, the account after it
        if os.pwrite(fd, data, HINT_SIZE) != len(data):
            raise OSError(errno.ENOSPC, "short write")
        if sync:
            os.fdatasync(fd)

    def _save_failed(self, sync=None):
        """Put the pending write-failure account (or none) in ack.hint: a pwrite in place, in
        the page cache (survives kill -9); synced in fsync=always mode, at close and by the
        interval's fsync."""
        self._pend_clear = False
        if sync is None:
            sync = self.fsync == "always"
        try:
            self._write_pending_file(self._failed, sync)
        except OSError as e:
            self._trouble("pending", "cannot write the loss account to %s: %s: it is kept in memory "
                          "only", ACK_HINT, e.strerror)
            return
        self._pend_dirty = not sync and self.fsync != "never"
        self._resolved("pending", "loss account written to %s again", ACK_HINT)

    def _persist_cursor(self):
        due = self.fsync == "always" or (
            self.fsync == "interval" and self._mono() - self._last_cursor_sync >= self.fsync_interval)
        if due:
            self._write_cursor(durable=True)
        else:
            self._write_hint()      # tick() writes the durable cursor when the interval is due
