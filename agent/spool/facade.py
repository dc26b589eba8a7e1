"""The Spool facade: opening (recovery), the ordering of syncs and unlinks, acknowledgement,
status and close. See the package doc (agent.spool) for the layout and promises."""
import fcntl
import logging
import os
import time

from agent import wire
from agent.spool.cursor import ACK_HINT, HINT_SIZE, MAX_OUTPUTS, PENDING_SIZE, CursorFiles, merge_positions
from agent.spool.lease import LEASE, SeqLease
from agent.spool.loss import CORRUPT, LossAccounting
from agent.spool.reader import Reader
from agent.spool.segments import Segment, SegmentFiles, segment_names, ts_epoch
from agent.spool.writer import LOCK, Writer

log = logging.getLogger("agent.spool")

FSYNC_MODES = ("always", "interval", "never")


class SpoolError(Exception):
    """The spool cannot be used (directory locked by another agent, unwritable)."""


class Spool(SegmentFiles, CursorFiles, LossAccounting, Reader, Writer):
    """The spool (see the package doc). Every field is set here; the method groups live in the
    modules named in the package doc, and the decisions that order writes, syncs and unlinks are
    here: _delete (cursor before unlink), _reap (gap records synced before dropped segments are
    unlinked), _sync (segments, directory, then the loss account's clearing), tick, close. It is
    a little above the ~350-line target on purpose: these orderings are read together, and opening
    (_recover) is where all the files meet."""

    def __init__(self, directory, agent_id, max_bytes=16 << 20, max_age=7 * 86400, segment_bytes=256 << 10,
                 fsync="interval", fsync_interval=5.0, clock=time.time, monotonic=time.monotonic,
                 fresh_seq=None, seq_file=None, seq_lease=LEASE, outputs=("http",)):
        if fsync not in FSYNC_MODES:
            raise ValueError("fsync must be one of %s, not %r" % ("|".join(FSYNC_MODES), fsync))
        self.directory = str(directory)
        # The enabled outputs, each with its own cursor (cursor.Cursor): a segment is deleted when
        # every one of them is past it (or a bound drops it: loss accounts for each output).
        self.outputs = tuple(outputs)
        if not self.outputs or len(set(self.outputs)) != len(self.outputs) or len(self.outputs) > MAX_OUTPUTS \
                or not all(isinstance(n, str) and n and n.isidentifier() for n in self.outputs):
            raise ValueError("outputs must be 1..%d distinct names, not %r" % (MAX_OUTPUTS, outputs))
        self._cursors = {}
        self._multi = len(self.outputs) > 1     # gap records may be meant for some outputs only
        self.agent_id = agent_id
        self.max_bytes = int(max_bytes)
        self.max_age = float(max_age) if max_age else 0.0
        # A segment must be well below the total bound, or dropping "the oldest" frees nothing.
        self.segment_bytes = int(max(4096, min(int(segment_bytes), self.max_bytes // 4)))
        self.fsync = fsync
        self.fsync_interval = float(fsync_interval)
        self._clock = clock           # wall clock: segment ages, gap record times
        # First seq of a spool with no state at all (None: 1). See _recover.
        self._fresh_seq = fresh_seq
        self.origin_seq = 1
        # Seq lease on persistent storage apart from the spool (lease.SeqLease; no seq_file: none).
        self._lease = SeqLease(seq_file, seq_lease, agent_id)
        self._mono = monotonic        # fsync interval, clock step detection
        self._wall_off = None         # wall - monotonic at the last look (see _check_step)
        # Every line the spool writes starts with this, so seq and ts are sliced, not parsed.
        self._prefix = wire.line_prefix(agent_id)
        self._plen = len(self._prefix)
        # Room for one gap record line (with "outputs" when it is not for all of them).
        self._gap_size = 320 + 3 * self._plen + (24 * len(self.outputs) if self._multi else 0)

        self._segs = []             # oldest first; the slowest cursor is always in _segs[0]
        self._wfd = None            # fd of the active segment (_segs[-1]) or None
        self._unsynced = []         # fds of rotated segments waiting for the interval's fsync
        self._doomed = []           # dropped segment paths waiting for their gap record (_reap)
        self._bytes = 0
        self._next_seq = 1
        self._dirty = False         # bytes written since the last fsync
        self._dir_dirty = False     # a segment was created/removed since the last directory fsync
        self._last_sync = self._mono()
        self._cursor_dirty = False
        self._last_cursor_sync = float("-inf")     # the first acknowledgement writes cursor.json
        self._pending_loss = []     # [count, first_seq, last_seq, first_ts, last_ts, reason, target] not in a gap record yet
        self._oldest_cache = {}     # output -> (reader position, ts of its oldest record)
        self._corrupt_mark = (0, -1)   # the furthest unreadable line met (set aside, counted)
        self._cut = False           # the last _collect_lines stopped at a limit, not at the end
        self._corrupt_high = 0      # the highest upper seq of a corrupt account counted in totals
        # Records lost to failed writes that no gap record holds yet (also in _pending_loss, and
        # in ack.hint): [count, first_seq, last_seq, first_ts, last_ts, reason] or None.
        self._failed = None
        # Accounts of dropped segments that no gap record holds yet (also in _pending_loss; put
        # in ack.hint by _reap before such a segment is unlinked: loss._keep_dropped).
        self._dropped = []
        self._dropped_dirty = False     # _dropped changed since ack.hint last got it
        self._dropped_saved = False     # ack.hint may hold dropped accounts
        self._capturing = False         # in loss._drop: spans queued now are a dropped segment's
        self._dropping = None           # in loss._drop: the key of the segment being dropped
        self._gap_writing = None        # (corrupt, target, seq) of the gap record being written
        self._inflight = []             # the _dropped entries the gap records being written hold
        self._pend_dirty = False    # the pending account (in ack.hint) written since the last fsync
        self._pend_clear = False    # a gap record took the account: clear it on disk after its fsync
        self._outage = None         # writes are failing: [monotonic start, strerror, lost, drop futile]
        self._troubles = set()      # what is failing (cursor, hint, fsync...): logged once, not per try
        self._locked_out = False    # the recreated directory is locked by another agent
        self.totals = {"appended": 0, "dropped": 0, "gaps": 0, "corrupt_skipped": 0, "torn_set_aside": 0,
                       "write_errors": 0, "write_lost": 0, "corrupt_lost": 0}
        self.bytes_written = 0      # line bytes written by this process (for bytes-per-record)

        try:
            os.makedirs(self.directory, exist_ok=True)
            self._lockfd = os.open(os.path.join(self.directory, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise SpoolError("%s: cannot open spool directory: %s" % (self.directory, e.strerror)) from e
        try:
            fcntl.flock(self._lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self._lockfd)
            raise SpoolError("%s: spool directory is in use by another agent" % self.directory) from e
        self._dirfd = os.open(self.directory, os.O_RDONLY)
        self._hintfd = None
        self._recover()

    def _recover(self):
        cursor = self._read_cursor()
        hint = self._read_hint()
        if hint and (not cursor or hint["acked_seq"] > cursor["acked_seq"]):
            # (the per-output positions are merged one by one: cursor.merge_positions)
            cursor = dict(cursor or {}, **{k: v for k, v in hint.items() if k != "cursors"})
        stored = merge_positions(cursor, hint)
        floor = 1
        if cursor:
            floor = max(floor, cursor.get("next_seq", 1))
            for k in self.totals:
                if isinstance(cursor.get(k), int) and k != "appended":
                    self.totals[k] = cursor[k]
        floor = max([floor] + [c["acked_seq"] + 1 for c in stored.values()])
        names = segment_names(self.directory)
        for key, name in names:
            seg = Segment(key, os.path.join(self.directory, name))
            self._scan(seg)
            if seg.last_seq is not None:
                floor = max(floor, seg.last_seq + 1)
            if not seg.size:
                # Created for seq `key`, which never reached the file: it may be reused.
                floor = max(floor, key)
                os.unlink(seg.path)
                continue
            floor = max(floor, key + 1)
            seg.verified = False
            self._segs.append(seg)
            self._bytes += seg.size
        failed, dropped = self._read_pending()
        if failed is not None:
            on_disk = max((seg.last_seq for seg in self._segs if seg.last_seq is not None), default=0)
            if on_disk > failed[2]:
                # A line after the lost seqs exists: the first one written after a loss is its gap
                # record (nothing else is written while an account is pending), so the account
                # is in the spool already (the process was killed before the account was cleared).
                self._pend_clear = True     # cleared below
            else:
                log.warning("spool %s: %d records seq %d..%d were lost to failed writes before the "
                            "restart (%s): a gap record will account for them", self.directory,
                            failed[0], failed[1], failed[2], failed[5])
                self._failed = failed
                self._pending_loss = [list(failed) + [None]]
                floor = max(floor, failed[2] + 1)   # the gap record's range must stay unused
        if dropped:
            self._recover_dropped(dropped)
        # The seq lease is judged against the spool's WHOLE floor, the lost seqs of the pending
        # account included: a clean stop (or the lease moving on) during the outage wrote a base
        # past them, and this spool's own lost seqs must not look like another copy's.
        lease = self._lease.read()
        mine = self._lease.is_mine(cursor, lease)
        floor = self._lease.start_floor(floor, cursor, lease, mine, not cursor and not names,
                                        self._fresh_seq, self.directory)
        if cursor and isinstance(cursor.get("origin_seq"), int):
            self.origin_seq = cursor["origin_seq"]
        else:
            self.origin_seq = names[0][0] if names else floor
        self._next_seq = floor
        if cursor:
            # Cursor writes until the new generation is in place (and all of them when the spool
            # is opened without the seq_file: a status look, a test) keep the one on disk.
            self._lease.gen, self._lease.gen_prev = cursor.get("gen"), cursor.get("gen_prev")
        self._position(stored, bool(cursor or hint))
        # ack.hint is created now, while there is room: acknowledgements and the loss account
        # made while the disk is full then still overwrite it in place (cursor.json needs a new
        # file for every write).
        if hint is None or set(stored) - set(self.outputs):     # (retired cursors: not again)
            dirty = self._cursor_dirty
            self._write_hint()
            self._cursor_dirty = dirty
        try:
            size = os.fstat(self._hint_fd()).st_size
        except OSError:
            size = 0
        if self._pend_clear or size < HINT_SIZE + PENDING_SIZE:
            self._save_failed()
        if self._lease.path is not None:
            self._lease.new_generation(cursor, lease, mine, lambda: self._write_cursor(durable=True),
                                       self._next_seq)
        now = self._clock()
        self._start_ages(now)
        self._wall_off = now - self._mono()
        self._collect()
        self._age_bound(now)
        slow = self._slowest()
        log.info("spool %s: opened, %d segments, %d records, %d bytes, next seq %d, acked seq %d%s",
                 self.directory, len(self._segs), self._backlog(slow), self._held_bytes(slow),
                 self._next_seq, slow.acked, "".join(
                     "; %s: %d records, acked seq %d" % (c.name, self._backlog(c), c.acked)
                     for c in self._cursors.values()) if self._multi else "")

    def _recover_dropped(self, dropped):
        """The accounts of dropped segments kept in ack.hint: one that a gap record of its kind and
        target from its mark on holds is in the spool already (killed before ack.hint was cleared);
        the others are queued again (and kept in ack.hint until their gap record is written)."""
        # A kill after the account was saved and before the unlink left such segments on disk
        # (the cursor may not have moved past them either: cursor.json cannot be rewritten on a
        # full disk): their records are accounted for as lost, so the drop is finished now, or
        # they would be handed out AND counted lost.
        through = max((d[8] for d in dropped if d[8] is not None), default=None)
        while through is not None and self._segs and self._segs[0].key <= through:
            seg = self._segs.pop(0)
            self._bytes -= seg.size
            log.warning("spool %s: %s was dropped before the restart (its account is kept): "
                        "deleted now", self.directory, os.path.basename(seg.path))
            self._unlink(seg.path)
            self._dir_dirty = True
        low = min(d[7] for d in dropped)
        gaps = []
        for seg in self._segs:
            if seg.last_seq is None or seg.last_seq < low:
                continue
            try:
                with open(seg.path, "rb") as f:
                    data = f.read(seg.size)
            except OSError:
                continue
            for line in data.split(b"\n"):
                if b'"kind":"gap"' in line:
                    g = self._parse(line)
                    if g is not None and type(g.get("seq")) is int and g["seq"] >= low:
                        gaps.append(g)
        for d in dropped:
            count, fseq, lseq, fts, lts, why, target, mark = d[:8]
            corrupt = why == CORRUPT
            outs = sorted(target) if target is not None else None
            if any(g["seq"] >= mark and (g.get("reason") == CORRUPT) == corrupt and g.get("outputs") == outs
                   and type(g.get("dropped")) is int and g["dropped"] >= count
                   and type(g.get("first_seq")) is int and g["first_seq"] <= fseq
                   and type(g.get("last_seq")) is int and g["last_seq"] >= lseq for g in gaps):
                self._pend_clear = True     # cleared below
                continue
            log.warning("spool %s: %d records seq %d..%d of a segment dropped before the restart (%s): a "
                        "gap record will account for them", self.directory, count, fseq, lseq, why)
            self._dropped.append(list(d))
            self._dropped_saved = True
            self._remember_gap([(count, fseq, lseq, fts, lts, why, target)], why)

    def _trouble(self, key, fmt, *args):
        """Log an error once while it lasts (not once per try: a full disk must not flood the log)."""
        if key not in self._troubles:
            self._troubles.add(key)
            log.error("spool %s: " + fmt, self.directory, *args)

    def _resolved(self, key, fmt, *args):
        if key in self._troubles:
            self._troubles.discard(key)
            log.info("spool %s: " + fmt, self.directory, *args)

    def _delete(self, seg, durable, defer=False):
        """Unlink a segment, after the cursor (and with it the seq floor) is written. A dropped
        segment (defer) is only unlinked by _reap, once the gap record that accounts for it is
        on disk: a power cut in between must not lose both the records and their account. Its
        cursor write waits for its account too (loss._drop): a cursor past a segment whose
        account was still only in memory lost both at a kill -9."""
        self._bytes -= seg.size
        if defer:
            self._doomed.append(seg.path)
            return
        self._write_cursor(durable=durable and self.fsync != "never")
        self._unlink(seg.path)
        self._dir_dirty = True

    def _unlink(self, path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:    # an immutable directory: found again (and skipped) at the next start
            self._trouble("unlink", "cannot delete %s: %s", os.path.basename(path), e.strerror)

    def _reap(self):
        """Unlink dropped segments, after syncing the gap records written for them (or, when those
        could not be written yet, the accounts in ack.hint that stand in for them)."""
        if not self._doomed:
            return
        if self.fsync != "never" and self._dirty:
            self._sync()
        if self._dropped and (self._dropped_dirty or self._pend_dirty):
            # Their gap record is not written yet (a full disk): ack.hint (pre-allocated, written
            # in place) keeps the account instead, synced, before the records go (loss._drop put
            # it there already, unsynced: it is written and synced again here).
            self._save_failed(sync=self.fsync != "never")
        for path in self._doomed:
            self._unlink(path)
        self._doomed = []
        self._dir_dirty = True

    def _collect(self):
        """Delete fully acknowledged segments at the head, except the newest one (it keeps the
        seq floor on disk even when every record has been acknowledged)."""
        segs = self._segs
        while len(segs) > 1 and all(c.key > segs[0].key or c.off >= segs[0].size
                                    for c in self._cursors.values()):
            seg = segs.pop(0)
            self._settle()
            self._delete(seg, durable=self.fsync == "always")

    def _advance(self, c, end):
        """Move cursor c to reader position `end` (never back; not into a segment that is gone)."""
        key, off, lno = end
        if (key, off) > (c.key, c.off) and any(s.key == key for s in self._segs):
            c.key, c.off, c.line = key, off, lno
        self._collect()

    def _acked(self, batch):
        """The output of `batch` has it (stored, or kept aside by that output): move its cursor past it."""
        c = self._cursors[batch.output]
        self._advance(c, batch._ends[-1])
        if batch.last_seq > c.acked:
            c.acked = batch.last_seq
        self._persist_cursor()

    def _sync(self):
        err = None
        for fd in self._unsynced:
            try:
                os.fdatasync(fd)
            except OSError as e:
                err = e
            os.close(fd)
        self._unsynced = []
        try:
            if self._wfd is not None and (self._dirty or self.fsync == "always"):
                os.fdatasync(self._wfd)
            if self._dir_dirty:
                os.fsync(self._dirfd)
                self._dir_dirty = False
        except OSError as e:
            err = e
        if self._pend_dirty and self._hintfd is not None:
            try:
                os.fdatasync(self._hintfd)
                self._pend_dirty = False
            except OSError as e:
                err = e
        if err is not None:
            self.totals["write_errors"] += 1
            self._trouble("fsync", "fsync failed: %s", err.strerror)
            return
        self._resolved("fsync", "fsync works again")
        self._dirty = False
        self._last_sync = self._mono()
        if self._pend_clear and self._failed is None:
            self._save_failed()     # the gap record that holds the account is durable now

    def tick(self, now=None):
        """Once per loop iteration: periodic fsync (interval mode), durable cursor, age bound."""
        if now is None:
            now = self._clock()
        mono = self._check_step(now)
        if self.fsync == "interval":
            if (self._dirty or self._pend_dirty) and mono - self._last_sync >= self.fsync_interval:
                self._sync()
            if self._cursor_dirty and mono - self._last_cursor_sync >= self.fsync_interval:
                self._write_cursor(durable=True)
        if self._dir_lost():
            self._recreate_dir()
        if self._wfd is not None:
            try:
                gone = os.fstat(self._wfd).st_nlink == 0
            except OSError:
                gone = True
            if gone:    # deleted from outside: appending to an unlinked file would lose everything
                self._lost_segment(self._segs[-1], "unlinked")
        if self._pending_loss:
            self._write_pending_gap()
        self._age_bound(now)

    def ack(self, batch):
        """The output stored the batch (the collector: 2xx): move that output's cursor past it,
        delete the segments every output is past."""
        if batch is None or not batch.count:
            return
        self._acked(batch)

    def stats(self):
        """What is held (behind the slowest output), the totals, and "outputs": per output."""
        now = self._clock()

        def age(ts):
            t = ts_epoch(ts) if ts else None
            return round(max(0.0, now - t), 3) if t is not None else None

        outs = {}
        for c in self._cursors.values():
            ts = self.oldest_ts(c.name)
            outs[c.name] = {"records": self._backlog(c), "bytes": self._held_bytes(c), "oldest_ts": ts,
                            "oldest_age": age(ts), "acked_seq": c.acked}
        slow = outs[self._slowest().name]
        st = {"records": slow["records"], "bytes": slow["bytes"], "oldest_ts": slow["oldest_ts"],
              "oldest_age": slow["oldest_age"], "segments": len(self._segs), "next_seq": self._next_seq,
              "acked_seq": slow["acked_seq"], "origin_seq": self.origin_seq,
              "fsync": self.fsync, "bytes_written": self.bytes_written}
        st.update(self.totals)
        st["outputs"] = outs
        return st

    @property
    def next_seq(self):
        return self._next_seq

    def close(self):
        """Flush and fsync everything; the spool object is unusable afterwards."""
        if self._lockfd is None:
            return
        try:
            if self._pending_loss:
                self._write_pending_gap()
            self._sync()
            self._reap()
            if self._wfd is not None:
                try:
                    os.fsync(self._wfd)
                finally:
                    os.close(self._wfd)
                    self._wfd = None
            if self._failed is not None or self._pend_clear or self._dropped:
                self._save_failed(sync=True)    # the account survives the stop (see _recover)
                if self._failed is not None:
                    log.error("spool %s: stopping with %d records lost to failed writes not yet in a "
                              "gap record: kept in %s for the next start", self.directory,
                              self._failed[0], ACK_HINT)
            self._write_cursor(durable=True)
            try:
                os.fsync(self._dirfd)
            except OSError:
                pass
            self._lease.close(self._next_seq)
        finally:
            for fd in self._unsynced:
                os.close(fd)
            self._unsynced = []
            if self._hintfd is not None:
                os.close(self._hintfd)
            os.close(self._dirfd)
            os.close(self._lockfd)
            self._lockfd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
