"""Loss accounting: every record that will never be read back is counted in a gap record
(agent.record.gap_record), uploaded like any record.

- Bounds: when `max_bytes` or `max_age` is hit the oldest segment is dropped and a gap record says
  how many records were lost (exactly), all within its first_seq..last_seq and first_ts..last_ts.
  A dropped segment is unlinked only once its gap record is written (and synced: Spool._reap). A
  gap record that is itself dropped before upload passes its account on to the next one.
- A write that fails, whatever the error (disk full, EIO, EPERM from an immutable directory or
  file, ENOENT from a deleted spool directory), never raises: the record is lost and counted, its
  seq is not reused, and ONE gap record per outage accounts for exactly the records lost (a gap
  record that cannot be written takes no seq and loses nothing: it is tried again with the same
  account). While an account is pending nothing else is written (a reading whose gap record
  cannot be written is lost too, without a try), so the gap record is the first line after the
  loss. The log says it once when writing stops and once when it works again. On a full disk with
  a backlog the oldest segment is dropped to make room (as max_bytes would), at most once per
  outage when that does not help; such a segment is unlinked at once (the space is needed now)
  and its gap record follows, so until then its account is in ack.hint too (put there, synced,
  before the unlink; at the next start a gap record of its kind and target past the newest line
  of that time says it was written). The account is kept in ack.hint (pwrite in place, no new file,
  no fsync: it survives kill -9 in the page cache and costs the flash at most a page per kernel
  writeback; synced with the interval's fsync, and at close), so an agent stopped or killed during
  an outage writes the gap record after its restart; after a power cut the account of up to
  fsync_interval seconds of lost records may be missing, and their seqs (never on disk, never
  uploaded) are then reused.
- A segment that vanishes, cannot be read or is cut short from outside is accounted for by a gap
  record.
- Lines that were spooled but cannot be read back (corrupt bytes) are set aside and accounted for
  by a gap record with reason "corrupt" (never folded with losses, so the collector can tell
  corruption from loss): its range lies between the readable neighbours (exclusive; a segment's
  name bounds it too: every line in it has a seq >= the name) and its count is the seqs missing
  there -- not the unreadable lines: zeroed bytes or a lost newline merge several records into one
  line, junk adds lines that held no record -- less those a readable gap record right above
  accounts for already. A run of bad lines cut by a batch limit is counted once.
"""
import errno
import logging
import os

from agent.record import encode, gap_record
from agent.spool.segments import SETASIDE

log = logging.getLogger("agent.spool")

CORRUPT = "corrupt"         # the reason of gap records for lines spooled but unreadable
# Errors after which dropping the oldest segment can make room for the write.
SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def fold(acc, span):
    """Add span (count, first_seq, last_seq, first_ts, last_ts, reason) to the account `acc` (a
    list of the same, maybe a target after them): counts add, ranges widen, reasons join."""
    count, fseq, lseq, fts, lts, why = span[:6]
    acc[0] += count
    acc[1] = min(acc[1], fseq)
    acc[2] = max(acc[2], lseq)
    if fts is not None and (acc[3] is None or fts < acc[3]):
        acc[3] = fts
    if lts is not None and (acc[4] is None or lts > acc[4]):
        acc[4] = lts
    if why not in acc[5].split("; "):
        acc[5] = (acc[5] + "; " + why)[:300]


class LossAccounting:
    """Spool methods that account for lost records (state: Spool.__init__)."""

    def _lose(self, seq, ts):
        """Account for a record lost to a failed write (its seq stays unused)."""
        why = "write failed: %s" % (self._outage[1] if self._outage else "unknown error")
        self.totals["write_lost"] += 1
        if self._outage is not None:
            self._outage[2] += 1
        span = (1, seq, seq, ts, ts, why)
        if self._failed is None:
            self._failed = list(span)
        else:
            fold(self._failed, span)
        self._remember_gap([span], why)
        self._save_failed()

    def _remember_gap(self, spans, reason):
        """Queue losses for the next gap record. A span is (count, first_seq, last_seq, first_ts,
        last_ts, reason or None[, target: the outputs it is for, None: all]); spans never share a
        lost seq, and all pending ones of a kind (loss or corruption) and target fold into one
        record: `dropped` is exactly how many records are gone, all of them within
        first_seq..last_seq (the range may also hold records that were delivered, such as other
        gap records). Folding (rather than one record per disjoint range) keeps a spool that
        overflows for days from filling up with gap records re-issuing each other's accounts."""
        for span in spans:
            count, fseq, lseq, fts, lts, why = span[:6]
            target = span[6] if len(span) > 6 else None
            if not count:
                continue
            why = why or reason
            # Corruption and loss are told apart: each folds only into its own kind of account.
            corrupt = why == CORRUPT
            if self._capturing:
                self._keep_dropped(count, fseq, lseq, fts, lts, why, target)
            acc = next((a for a in self._pending_loss if (a[5] == CORRUPT) == corrupt and a[6] == target), None)
            if acc is None:
                self._pending_loss.append([count, fseq, lseq, fts, lts, why, target])
                continue
            fold(acc, (count, fseq, lseq, fts, lts, why))

    def _write_pending_gap(self):
        """Write the pending accounts as gap records. -> True when none is left. A gap record that
        cannot be written takes no seq (nothing was written: the seq was never handed out) and
        loses nothing: the account waits for the next try, with whatever was lost meanwhile."""
        pending, self._pending_loss = self._pending_loss, []
        # The dropped-segment accounts these gap records hold (not those made while writing them).
        self._inflight = list(self._dropped)
        try:
            return self._write_gaps(pending)
        finally:
            self._inflight = []

    def _write_gaps(self, pending):
        for i, p in enumerate(pending):
            count, fseq, lseq, fts, lts, reason, target = p
            seq = self._next_seq
            rec = gap_record(self.agent_id, self._clock(), count, fseq, lseq, fts, lts, reason)
            if target is not None:
                rec["outputs"] = sorted(target)     # for these outputs only (Reader._meant_for)
            rec["seq"] = seq
            line = encode(rec)
            self._lease.cover(seq)
            now = self._clock()
            if self._wfd is not None and self._segs[-1].size + len(line) > self.segment_bytes:
                self._rotate()
            # ack.hint's marks must say, before this line can exist, which dropped-segment
            # accounts it holds (mark <= seq) and which it does not (mark > seq): a kill -9 right
            # after the write must not make the next start take an account it does not hold
            # for written (_recover_dropped), nor re-issue one it holds.
            corrupt = reason == CORRUPT
            if self._dropped and self._fix_marks(corrupt, target, seq):
                self._save_failed()
            # _next_seq moves on only once the line is written: a segment dropped while trying
            # writes cursor.json, whose floor must not skip the seq this record may not get.
            self._gap_writing = (corrupt, target, seq)
            try:
                written = self._write(line, seq, rec["ts"], now)
            finally:
                self._gap_writing = None
            if not written:
                new, self._pending_loss = self._pending_loss, [list(x) for x in pending[i:]]
                if new:     # lost while trying (a segment dropped to make room): folded in
                    self._remember_gap([tuple(x) for x in new], new[0][5])
                return False
            self._next_seq = seq + 1
            self.totals["gaps"] += 1
            if self._dropped:
                self._dropped_written(reason == CORRUPT, target, seq)
            if self._failed is not None and reason != CORRUPT and target is None:
                # Its account is in this gap record now (folded in: _remember_gap).
                self._failed = None
                if self.fsync == "interval":
                    self._pend_clear = True     # once the gap record is durable (_sync)
                else:
                    self._save_failed()
            if self._outage is not None:
                self._end_outage((seq, count, fseq, lseq, fts, lts, reason))
            else:
                log.warning("spool %s: gap record seq %d: %d records seq %s..%s (%s..%s) lost: %s",
                            self.directory, seq, count, fseq, lseq, fts, lts, reason)
        return True

    def _fix_marks(self, corrupt, target, seq):
        """Set the marks of the dropped-segment accounts of this kind and target for a gap record
        about to be written at `seq`: those it holds (_inflight) at most seq, the others past it.
        -> True when one changed."""
        changed = False
        for d in self._dropped:
            if (d[5] == CORRUPT) != corrupt or d[6] != target:
                continue
            if any(d is x for x in self._inflight):
                if d[7] > seq:
                    d[7], changed = seq, True
            elif d[7] <= seq:
                d[7], changed = seq + 1, True
        return changed

    def _drop(self, why):
        """Drop the oldest segment (_drop_oldest) and queue its account; the account is also kept
        in _dropped until a gap record holds it, so _reap can put it in ack.hint before the
        segment is unlinked when that gap record could not be written first (a full disk)."""
        self._capturing = True
        # Its key goes with its account into ack.hint: a kill after the account is saved and
        # before the unlink leaves the segment on disk, and the next start must finish the drop
        # (_recover_dropped) rather than hand out records whose loss is already on record.
        self._dropping = self._segs[0].key if self._segs else None
        try:
            self._remember_gap(self._drop_oldest(), why)
        finally:
            self._capturing = False
        # The order a kill -9 may cut anywhere: the account (with the segment's key) in ack.hint,
        # then the cursor past the segment, then (_reap) the unlink. Killed before the account:
        # the old cursor hands the records out again; after it: the next start finishes the drop
        # and issues the account (_recover_dropped). An account that cannot be put in ack.hint
        # keeps the old cursor, for the same reason.
        if self._dropped_dirty:
            self._save_failed()
        if not self._dropped_dirty:
            self._write_cursor(durable=False)
        else:
            self._cursor_dirty = True

    def _keep_dropped(self, count, fseq, lseq, fts, lts, why, target):
        """Add a dropped segment's span to _dropped: [count, first_seq, last_seq, first_ts,
        last_ts, reason, target, mark, through]. `mark`: every gap record that can hold it has seq
        >= mark (it is written after the newest line on disk now), so at the next start a gap
        record of its kind and target from mark on says the account is in the spool (_recover).
        `through`: the key of the newest segment whose records it accounts for (segments are
        dropped oldest first, so every segment up to it is gone or going). Folded into an entry of
        its kind and target, except one a gap record being written holds (_inflight)."""
        corrupt = why == CORRUPT
        acc = next((d for d in self._dropped if (d[5] == CORRUPT) == corrupt and d[6] == target
                    and not any(d is x for x in self._inflight)), None)
        if acc is None:
            mark = max((s.last_seq for s in self._segs if s.last_seq is not None), default=0) + 1
            writing = self._gap_writing
            if writing is not None and writing[:2] == (corrupt, target):
                # Dropped to make room for a gap record of its kind that does not hold it.
                mark = max(mark, writing[2] + 1)
            self._dropped.append([count, fseq, lseq, fts, lts, why, target, mark, self._dropping])
        else:
            fold(acc, (count, fseq, lseq, fts, lts, why))
            if self._dropping is not None:
                acc[8] = self._dropping if acc[8] is None else max(acc[8], self._dropping)
        self._dropped_dirty = True

    def _dropped_written(self, corrupt, target, seq):
        """A gap record (seq) of this kind and target is written: the dropped-segment accounts it
        holds are done. (Those it does not hold have marks past it already: _fix_marks before
        the write, _keep_dropped for the ones dropped during it.)"""
        kept, done = [], False
        for d in self._dropped:
            if (d[5] == CORRUPT) == corrupt and d[6] == target and any(d is x for x in self._inflight):
                done = True
                continue
            kept.append(d)
        self._dropped = kept
        if not self._dropped_saved or not done:
            return
        if self.fsync == "interval":
            self._pend_clear = True     # once the gap record is durable (_sync)
        else:
            self._save_failed()

    def _make_room(self, n, now):
        """Rotate the active segment and enforce max_bytes before writing n bytes.
        Returns True when a gap record was written (seqs moved)."""
        if self._wfd is not None and self._segs[-1].size and self._segs[-1].size + n > self.segment_bytes:
            self._rotate()
            self._collect()
        why = "spool over max_bytes (%d)" % self.max_bytes
        before = self._next_seq
        dropped = False
        while self._over(n) and len(self._segs) > 1:
            self._drop(why)
            dropped = True
        if self._wfd is None and self._segs and self._over(n):
            self._drop(why)   # a lone closed segment over the bound
            dropped = True
        if dropped and self._pending_loss:
            self._write_pending_gap()
        self._reap()
        return self._next_seq != before

    def _over(self, n):
        """Would n more bytes, plus the gap records still to write, break max_bytes?"""
        return self._bytes + n + self._gap_size * (len(self._pending_loss) + 1) > self.max_bytes

    def _age_bound(self, now):
        if not self.max_age or not self._segs:
            return
        limit = now - self.max_age
        dropped = False
        while self._segs and self._segs[0].mtime < limit:
            if self._wfd is not None and len(self._segs) == 1:
                self._rotate()
            self._drop("older than max_age (%gs)" % self.max_age)
            dropped = True
        if dropped and self._pending_loss:
            self._write_pending_gap()
        self._reap()

    def _target(self, names):
        """The outputs a gap record is for: None (every enabled output), or the set of names."""
        names = frozenset(names)
        return None if len(names) == len(self._cursors) else names

    def _drop_oldest(self):
        """Delete the oldest segment; -> spans for _remember_gap: the records it held that some
        enabled output had not acknowledged (read from the file: the gap records must be exact),
        one span per set of outputs that had not got them (one output, or all of them at the same
        place: one span for everyone), and, re-issued with their own range and reason, the
        accounts of gap records not yet delivered, for the outputs they were for (what they
        accounted for is still gone and those outputs must hear of it)."""
        seg = self._segs[0]
        inside = [c for c in self._cursors.values() if c.key == seg.key and c.off < seg.size]
        start = min((c.off for c in inside), default=seg.size)
        direct = 0
        fseq = lseq = None
        groups = {}     # target -> [count, first seq, last seq, first ts, last ts]
        carried = []
        try:
            with open(seg.path, "rb") as f:
                f.seek(start)
                data = f.read(seg.size - start)
        except OSError as e:
            self._lost_segment(seg, e)
            return []
        pos = 0
        last = {c.name: c.acked for c in inside}
        runs = {}       # output -> its run of unreadable lines (see Reader._read)
        while pos < len(data):
            nl = data.find(b"\n", pos)
            if nl < 0:
                break
            line = data[pos:nl]
            at, pos = start + pos, nl + 1
            unread = [c for c in inside if c.off <= at]
            m = self._meta(line)
            if m is None:
                for c in unread:
                    if self._corrupt(seg, at, line, c):     # unread so far: as the reader would
                        run = runs.get(c.name)
                        if run is None:
                            run = runs[c.name] = [0, max(last[c.name], seg.key - 1), None]
                        run[0] += 1
                continue
            missing = []
            for c in unread:
                if m[0] <= c.acked:
                    continue
                run = runs.get(c.name)
                if run is not None and m[0] > run[1]:
                    self._corrupt_account(runs.pop(c.name), m[0], m[1], line, c)
                last[c.name] = max(last[c.name], m[0])
                missing.append(c.name)
            if not missing:
                continue
            direct += 1
            if fseq is None:
                fseq = m[0]
            lseq = m[0]
            target = self._target(missing)
            g = groups.get(target)
            if g is None:
                g = groups[target] = [0, m[0], m[0], None, None]
            g[0] += 1
            g[2] = m[0]
            ts = m[1]
            if ts is not None:     # time range: clocks step, so min/max rather than first/last
                if g[3] is None or ts < g[3]:
                    g[3] = ts
                if g[4] is None or ts > g[4]:
                    g[4] = ts
            if b'"kind":"gap"' in line:
                gap = self._parse(line)
                # Its account goes on to those it was for (all, or its "outputs") that lacked it.
                mine = [n for n in missing if self._meant_for(line, n)]
                if mine and gap is not None and type(gap.get("dropped")) is int and type(gap.get("first_seq")) is int:
                    carried.append((gap["dropped"], gap["first_seq"], gap.get("last_seq"), gap.get("first_ts"),
                                    gap.get("last_ts"), gap.get("reason"), self._target(mine)))
        for name, run in runs.items():
            self._corrupt_account(run, *(self._next_good((seg.key + 1, 0), run[1]) or (self._next_seq, None, None)),
                                  self._cursors[name])
        self._segs.pop(0)
        self._settle()
        self.totals["dropped"] += direct
        if self._wfd is not None and not self._segs:
            os.close(self._wfd)
            self._wfd = None
        self._delete(seg, durable=False, defer=True)
        log.warning("spool %s: dropped segment %s: %d un-uploaded records%s",
                    self.directory, os.path.basename(seg.path), direct,
                    " seq %d..%d" % (fseq, lseq) if direct else "")
        if not direct:
            return []
        return [(g[0], g[1], g[2], g[3], g[4], None, t) for t, g in groups.items()] + carried

    def _lost_segment(self, seg, err):
        """A segment file was deleted from outside the agent (err FileNotFoundError or nlink 0),
        cannot be read (err: an OSError, e.g. EIO from worn flash) or was truncated from outside
        (err None): account for its unread records with a gap record (their count is known; the
        range is from the first unread seq to the last), keep a readable rest aside for a human
        (<segment>.unreadable), go on with the next segment: never stop reading."""
        # Per output, the lines of this segment it had not read: all of them for a cursor in an
        # earlier segment, those after its place for one in it, none for one beyond it.
        starts = {c.name: (0 if c.key < seg.key else c.line) for c in self._cursors.values() if c.key <= seg.key}
        lost = seg.count - min(starts.values()) if starts else 0
        spans = []
        cuts = sorted(set(starts.values()))
        for i, s0 in enumerate(cuts):
            count = (cuts[i + 1] if i + 1 < len(cuts) else seg.count) - s0
            names = [n for n, s in starts.items() if s <= s0]
            first = seg.first_seq
            acked = min(self._cursors[n].acked for n in names)
            if acked + 1 > (first or 0):
                first = acked + 1
            if count > 0 and seg.last_seq is not None:
                spans.append((count, first, seg.last_seq, seg.first_ts, seg.last_ts, None, self._target(names)))
        if err == "directory":
            why = "spool directory deleted from outside the agent"
        elif isinstance(err, FileNotFoundError) or err == "unlinked":
            why = "segment file deleted from outside the agent"
        elif err is None:
            why = "segment file truncated from outside the agent"
        else:
            why = "segment file unreadable: %s" % (err.strerror or err)
        if err != "directory" and why != "segment file deleted from outside the agent":
            try:
                os.replace(seg.path, seg.path + ".unreadable")
            except OSError:
                pass
        log.error("spool %s: segment %s: %s: %d records lost", self.directory, os.path.basename(seg.path),
                  why, lost)
        if seg is self._segs[-1] and self._wfd is not None:
            try:
                os.close(self._wfd)
            except OSError:
                pass
            self._wfd = None
        self._segs.remove(seg)
        self._bytes -= seg.size
        self._settle()
        self.totals["dropped"] += max(lost, 0)
        if spans:
            self._remember_gap(spans, why)

    def _corrupt_account(self, run, upper, upper_ts, upper_line, c):
        """Unreadable lines between the readable seqs run[1] and `upper`: a gap record (reason
        "corrupt") for the seqs missing between them. Counting seqs, not lines: zeroed bytes or a
        lost newline merge several records into one unreadable line, junk adds lines that held no
        record. Seqs between them that a readable gap record right after accounts for already
        (records lost to a failed write) are not counted twice; the same range seen again, across
        a batch boundary, is not counted again. Each output (cursor c) accounts for the runs it
        meets: a gap record for c alone (with one output: for everyone); counted once in totals."""
        lines, lower, lower_ts = run
        room = upper - lower - 1
        if upper_line is not None and b'"kind":"gap"' in upper_line and self._meant_for(upper_line, c.name):
            g = self._parse(upper_line)
            if g is not None and type(g.get("dropped")) is int and type(g.get("first_seq")) is int \
                    and type(g.get("last_seq")) is int:
                overlap = min(g["last_seq"], upper - 1) - max(g["first_seq"], lower + 1) + 1
                room -= max(0, min(g["dropped"], overlap))
        memo_lower, memo_upper = c.memo
        if upper == memo_upper and lower >= memo_lower:
            return      # the rest of a run already accounted for (the whole range was counted)
        count = room
        if count <= 0:
            return      # not records of their own (junk, a duplicate): set aside, nothing lost
        c.memo = (lower, upper)
        target = self._target([c.name])
        if not self._multi or upper > self._corrupt_high:     # another output's account of it
            self._corrupt_high = max(self._corrupt_high, upper)
            self.totals["corrupt_lost"] += count
        log.warning("spool %s: %d unreadable lines between seq %d and %d (set aside in %s): %d records "
                    "cannot be read back; a gap record accounts for them", self.directory, lines,
                    lower, upper, SETASIDE, count)
        self._remember_gap([(count, lower + 1, upper - 1, lower_ts, upper_ts, CORRUPT, target)], CORRUPT)

    def _end_outage(self, gap):
        start, why, lost, _ = self._outage
        self._outage = None
        if gap is None:
            log.warning("spool %s: writing works again after %.1fs (%s); %d records lost",
                        self.directory, self._mono() - start, why, lost)
        else:
            seq, count, fseq, lseq, fts, lts, reason = gap
            log.warning("spool %s: writing works again after %.1fs (%s): gap record seq %d: %d records "
                        "seq %s..%s (%s..%s) lost: %s", self.directory, self._mono() - start, why,
                        seq, count, fseq, lseq, fts, lts, reason)
