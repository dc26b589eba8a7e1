"""The cursor file and the ack hint: where reading resumes, the seq floor, the totals.

  cursor.json  per output (in "cursors": {name: {acked_seq, segment, offset}}; the top-level
               acked_seq/segment/offset are the slowest one's, and a file without "cursors" is the
               "http" cursor) + seq floor (next_seq) + totals + the seq lease generation ("gen"),
               replaced atomically (tmp, fsync, rename, directory fsync).
  ack.hint     the latest acknowledgement between two durable cursor writes: one fixed-size line
               with a CRC, overwritten in place (same page, same inode), so acknowledging every
               poll cycle costs no new file and no fsync; it survives a killed process, and after
               a power cut a torn hint fails its CRC and cursor.json is used (re-sending means
               duplicates the collector drops, never loss). Created at open, so acknowledgements
               made while the disk is full are still kept. From byte HINT_SIZE on, the same file
               (the same page: a 16 kB tmpfs has four) holds the pending loss account: the
               records lost to failed writes that no gap record holds yet (and, under "segs",
               those of segments dropped for room before their gap record could be written, each
               with its mark: loss.LossAccounting._keep_dropped), one fixed-size line with a CRC, rewritten in place when it changes (see agent.spool.loss). From byte
               NAMED_AT on, one line per enabled output ("name acked segment offset CRC"), ended
               by a blank line; the first line (at 0) is the slowest output's, so a hint without
               named lines (written before named cursors) is the "http" cursor.

Acknowledged records never come back after a restart, even after SIGKILL (cursor.json or the
ack hint, both in the page cache); after a power cut up to fsync_interval seconds of
acknowledgements may be re-sent (duplicates the collector drops, never loss).
"""
import errno
import json
import logging
import os
import zlib

from agent.common import atomic_replace

log = logging.getLogger("agent.spool")

CURSOR = "cursor.json"
ACK_HINT = "ack.hint"
HINT_SIZE = 128             # ack.hint: the acknowledgement line, then (at this offset) ...
PENDING_SIZE = 1024         # ... the pending loss account; both rewritten in place, never grown


NAMED_AT = HINT_SIZE + PENDING_SIZE     # ack.hint: one line per output's cursor from here on
MAX_OUTPUTS = 16


class Cursor:
    """One output's place in the spool: the reader position (segment key, byte offset in it, lines
    before the offset) of its first un-acknowledged line, and the highest seq it acknowledged.
    Kept on a segment that exists (or, with no segment, on the next seq: see Spool._settle)."""

    __slots__ = ("name", "key", "off", "line", "acked", "mark", "memo")

    def __init__(self, name, key, acked=0):
        self.name = name
        self.key, self.off, self.line = key, 0, 0
        self.acked = acked
        self.mark = (0, -1)         # the last unreadable line it met (segment key, offset)
        self.memo = (0, 0)          # (lower, upper) seqs of its last corrupt account

    def doc(self, no_segment_key):
        key = self.key if no_segment_key is None else no_segment_key
        return {"acked_seq": self.acked, "segment": key, "offset": self.off if no_segment_key is None else 0}


def _an_account(acc):
    """Is acc [count, first_seq, last_seq, first_ts, last_ts, reason] a usable loss account?"""
    return (type(acc[0]) is int and type(acc[1]) is int and type(acc[2]) is int
            and acc[0] > 0 and 0 < acc[1] <= acc[2] and isinstance(acc[5], str))


def _crc_line(body, size):
    return (body + b" %08x" % zlib.crc32(body)).ljust(size - 1) + b"\n"


def _crc_body(data):
    """-> the body of a CRC-checked line; ValueError when it is not one."""
    body, crc = data.rstrip().rsplit(b" ", 1)
    if zlib.crc32(body) != int(crc, 16):
        raise ValueError("CRC mismatch")
    return body


def merge_positions(cursor, hint):
    """-> {output name: {"acked_seq", "segment", "offset"}} from cursor.json and ack.hint: per
    output, the hint's position when it acknowledged more. A cursor.json without "cursors" (one
    upload cursor, before named cursors) and a hint without named lines are the "http" cursor."""
    out = {}
    if cursor:
        named = cursor.get("cursors")
        if isinstance(named, dict):
            for name, c in named.items():
                if isinstance(c, dict) and all(type(c.get(k)) is int for k in ("acked_seq", "segment", "offset")):
                    out[name] = c
        else:
            out["http"] = {k: cursor[k] for k in ("acked_seq", "segment", "offset")}
    for name, c in (hint or {}).get("cursors", {}).items():
        if name not in out or c["acked_seq"] > out[name]["acked_seq"]:
            out[name] = c
    return out


class CursorFiles:
    """Spool methods for cursor.json and ack.hint (state: Spool.__init__)."""

    def _place(self, c, pos):
        """Put cursor c on its first un-acknowledged line: the stored (segment, offset) when it is
        still a line boundary, else the first line whose seq is above its acked seq."""
        segs = self._segs
        if not segs:
            c.key, c.off, c.line = self._next_seq, 0, 0
            return
        key, off = pos["segment"], pos["offset"]
        i = 0
        while i < len(segs) - 1 and segs[i].key < key:
            i += 1
        seg = segs[i]
        if seg.key == key and 0 <= off <= seg.size and self._boundary(seg, off):
            c.key, c.off, c.line = key, off, self._count_lines(seg, off)
            return
        acked = c.acked
        while i < len(segs) - 1 and segs[i].last_seq is not None and segs[i].last_seq <= acked:
            i += 1
        seg = segs[i]
        c.key, c.off, c.line = seg.key, 0, 0
        if acked and seg.first_seq is not None and seg.first_seq <= acked:
            with open(seg.path, "rb") as f:
                data = f.read(seg.size)
            pos = 0
            lines = 0
            while pos < len(data):
                nl = data.find(b"\n", pos)
                m = self._meta(data[pos:nl])
                if m is not None and m[0] > acked:
                    break
                pos = nl + 1
                lines += 1
            c.off, c.line = pos, lines

    def _position(self, stored, had_state):
        """Make the enabled outputs' cursors from the stored positions (merge_positions): a new
        output starts at the oldest record held, a cursor of an output no longer enabled is
        retired (logged; not written again); delete the segments all of them are past."""
        held = self._segs[0].key if self._segs else self._next_seq
        for name in self.outputs:
            pos = stored.get(name)
            c = self._cursors[name] = Cursor(name, held, pos["acked_seq"] if pos else 0)
            if pos is not None:
                self._place(c, pos)
            elif had_state:
                log.info("spool %s: output %s has no cursor yet: it starts at the oldest record held "
                         "(%d records)", self.directory, name, self._backlog(c))
        for name in sorted(set(stored) - set(self.outputs)):
            log.info("spool %s: output %s is no longer enabled: its cursor (acked seq %d) is retired "
                     "and holds no segment", self.directory, name, stored[name]["acked_seq"])
        segs = self._segs
        while len(segs) > 1 and all(c.key > segs[0].key for c in self._cursors.values()):
            self._delete(segs.pop(0), durable=False)

    def _settle(self):
        """Cursors whose segment is gone move to the start of the next one (none: the next seq)."""
        segs = self._segs
        for c in self._cursors.values():
            seg = next((s for s in segs if s.key >= c.key), None)
            if seg is None:
                c.key, c.off, c.line = self._next_seq, 0, 0
            elif seg.key != c.key:
                c.key, c.off, c.line = seg.key, 0, 0

    def _slowest(self):
        """The cursor furthest behind: it decides what the spool holds."""
        cs = self._cursors
        if len(cs) == 1:
            return next(iter(cs.values()))
        return min(cs.values(), key=lambda c: (c.key, c.off))

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
        none = None if self._segs else self._next_seq
        cur = self._slowest().doc(none)
        cur["next_seq"], cur["origin_seq"] = self._next_seq, self.origin_seq
        cur["cursors"] = {c.name: c.doc(none) for c in self._cursors.values()}
        if self._lease.gen is not None:
            cur["gen"] = self._lease.gen
        if self._lease.gen_prev is not None:
            cur["gen_prev"] = self._lease.gen_prev
        for k, v in self.totals.items():
            if k != "appended":
                cur[k] = v
        try:
            atomic_replace(os.path.join(self.directory, CURSOR),
                           json.dumps(cur, separators=(",", ":")).encode() + b"\n",
                           durable=durable, dirfd=self._dirfd)
        except OSError as e:
            # Disk full or failing: the old cursor stays (re-sending means duplicates the collector
            # drops, never loss); keep trying on the next acknowledgement.
            self._cursor_dirty = True
            self._trouble("cursor", "cannot write %s: %s (tried again at every acknowledgement; "
                          "logged once)", CURSOR, e.strerror)
            return False
        self._resolved("cursor", "%s written again", CURSOR)
        if durable:
            self._cursor_dirty = False
            self._last_cursor_sync = self._mono()
        else:
            self._cursor_dirty = True
        return True

    def _read_hint(self):
        """-> {"acked_seq", "next_seq", "segment", "offset": the slowest cursor (the "http" one in a
        hint from before named cursors), "cursors": {name: position}} or None."""
        try:
            with open(os.path.join(self.directory, ACK_HINT), "rb") as f:
                data = f.read(NAMED_AT + MAX_OUTPUTS * HINT_SIZE)
            acked, nxt, seg, off = (int(x) for x in _crc_body(data[:HINT_SIZE]).split())
            hint = {"acked_seq": acked, "next_seq": nxt, "segment": seg, "offset": off}
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("spool %s: %s unusable (%s); using %s", self.directory, ACK_HINT, e, CURSOR)
            return None
        named = {}
        for at in range(NAMED_AT, len(data), HINT_SIZE):
            line = data[at:at + HINT_SIZE]
            if not line.strip():
                break       # the end of the named lines
            try:
                name, acked, seg, off = _crc_body(line).split()
                named[name.decode()] = {"acked_seq": int(acked), "segment": int(seg), "offset": int(off)}
            except ValueError as e:
                log.warning("spool %s: a cursor line in %s is unusable (%s); using %s", self.directory,
                            ACK_HINT, e, CURSOR)
        hint["cursors"] = named or {"http": {k: hint[k] for k in ("acked_seq", "segment", "offset")}}
        return hint

    def _write_hint(self):
        none = None if self._segs else self._next_seq
        slow = self._slowest().doc(none)
        data = _crc_line(b"%d %d %d %d" % (slow["acked_seq"], self._next_seq, slow["segment"],
                                           slow["offset"]), HINT_SIZE)
        named = b"".join(_crc_line(b"%s %d %d %d" % (c.name.encode(), c.acked, d["segment"], d["offset"]),
                                   HINT_SIZE)
                         for c, d in ((c, c.doc(none)) for c in self._cursors.values()))
        try:
            fd = self._hint_fd()
            os.pwrite(fd, data, 0)
            if os.fstat(fd).st_size < NAMED_AT:
                self._write_pending_file()      # a new file: the account before them
            os.pwrite(fd, named + b" " * (HINT_SIZE - 1) + b"\n", NAMED_AT)   # a blank line ends them
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
        """-> (the pending write-failure account kept in ack.hint [count, first_seq, last_seq,
        first_ts, last_ts, reason] or None, the dropped-segment accounts kept there [count,
        first_seq, last_seq, first_ts, last_ts, reason, target (frozenset or None), mark, through
        (the newest dropped segment's key, or None)])."""
        try:
            with open(os.path.join(self.directory, ACK_HINT), "rb") as f:
                f.seek(HINT_SIZE)
                data = f.read(PENDING_SIZE)
        except FileNotFoundError:
            return None, []
        except OSError as e:
            log.warning("spool %s: cannot read %s: %s: an account of lost records may be missing",
                        self.directory, ACK_HINT, e.strerror)
            return None, []
        if not data:
            return None, []
        try:
            doc = json.loads(_crc_body(data))
            if not doc:
                return None, []
            acc = None
            if "dropped" in doc:
                acc = [doc["dropped"], doc["first_seq"], doc["last_seq"], doc.get("first_ts"),
                       doc.get("last_ts"), doc["reason"]]
                if not _an_account(acc):
                    raise ValueError("not an account: %r" % (doc,))
            segs = []
            for d in doc.get("segs", ()):
                # (an account written before `through` was kept has 8 fields)
                count, fseq, lseq, fts, lts, why, outs, mark = d[:8]
                through = d[8] if len(d) == 9 else None
                if not (_an_account(d[:6]) and type(mark) is int and len(d) in (8, 9)
                        and (through is None or type(through) is int)
                        and (outs is None or (isinstance(outs, list) and all(isinstance(n, str) for n in outs)))):
                    raise ValueError("not an account: %r" % (d,))
                segs.append([count, fseq, lseq, fts, lts, why, None if outs is None else frozenset(outs), mark,
                             through])
            return acc, segs
        except (ValueError, KeyError, TypeError) as e:
            log.warning("spool %s: the loss account in %s is unusable (%s): an account of lost "
                        "records may be missing", self.directory, ACK_HINT, e)
            return None, []

    def _write_pending_file(self, sync=False):
        """Write the pending accounts (_failed, _dropped) in ack.hint's account area. Raises OSError."""
        acc = self._failed
        doc = {} if acc is None else {"dropped": acc[0], "first_seq": acc[1], "last_seq": acc[2],
                                      "first_ts": acc[3], "last_ts": acc[4], "reason": acc[5]}
        if self._dropped:
            doc["segs"] = [d[:5] + [d[5][:120], None if d[6] is None else sorted(d[6]), d[7], d[8]]
                           for d in self._dropped]
        body = json.dumps(doc, separators=(",", ":")).encode()
        if len(body) > PENDING_SIZE - 16 and self._dropped:
            # Many outputs with dropped segments at once: the failed writes' account comes first.
            self._trouble("pending-segs", "the accounts of %d dropped segments do not fit in %s: they "
                          "are kept in memory only", len(self._dropped), ACK_HINT)
            del doc["segs"]
            body = json.dumps(doc, separators=(",", ":")).encode()
        data = _crc_line(body, PENDING_SIZE)
        fd = self._hint_fd()
        if os.fstat(fd).st_size < HINT_SIZE:
            self._write_hint()      # a new file: the hint first, the account after it
        if os.pwrite(fd, data, HINT_SIZE) != len(data):
            raise OSError(errno.ENOSPC, "short write")
        if sync:
            os.fdatasync(fd)

    def _save_failed(self, sync=None):
        """Put the pending accounts (records lost to failed writes, dropped segments; or none) in
        ack.hint: a pwrite in place, in the page cache (survives kill -9); synced in fsync=always
        mode, at close, by the interval's fsync and when asked."""
        self._pend_clear = False
        if sync is None:
            sync = self.fsync == "always"
        try:
            self._write_pending_file(sync)
        except OSError as e:
            self._trouble("pending", "cannot write the loss account to %s: %s: it is kept in memory "
                          "only", ACK_HINT, e.strerror)
            return
        self._dropped_dirty = False
        self._dropped_saved = bool(self._dropped)
        self._pend_dirty = not sync and self.fsync != "never"
        self._resolved("pending", "loss account written to %s again", ACK_HINT)

    def _persist_cursor(self):
        due = self.fsync == "always" or (
            self.fsync == "interval" and self._mono() - self._last_cursor_sync >= self.fsync_interval)
        if due:
            self._write_cursor(durable=True)
        else:
            self._write_hint()      # tick() writes the durable cursor when the interval is due
