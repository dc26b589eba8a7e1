"""Reading batches: the oldest un-acknowledged lines, as they are on disk (zero copy).

Corrupt lines (unparseable, wrong seq order) are skipped, counted and set aside, never fatal;
reading goes on while writing goes on. Memory does not grow with the backlog: the reader keeps a
byte position, reads one batch (<= max_bytes) at a time and slices seq/ts from each line's fixed
prefix (agent.wire); only lines from an earlier run are JSON-checked, once per batch. With fsync
always|interval, lines are made durable before they are handed out (peek syncs first).
"""
import json
import logging
import os

log = logging.getLogger("agent.spool")


class Batch:
    """Oldest un-acknowledged lines, in seq order. `lines` are bytes without the newline;
    `_ends[i]` is the reader position just after line i (segment key, byte offset, line number),
    so a batch can be split (413) and its parts acknowledged in order."""

    __slots__ = ("lines", "seqs", "first_seq", "last_seq", "count", "nbytes", "output", "_ends")

    def __init__(self, lines, seqs, ends, output="http"):
        self.output = output        # the output whose cursor ack() moves
        self.lines = lines
        self.seqs = seqs
        self._ends = ends
        self.count = len(lines)
        self.first_seq = seqs[0]
        self.last_seq = seqs[-1]
        self.nbytes = sum(len(x) for x in lines)

    def split(self, k=None):
        """-> (first part, second part); both non-empty. Needs count >= 2."""
        if k is None:
            k = self.count // 2
        return (Batch(self.lines[:k], self.seqs[:k], self._ends[:k], self.output),
                Batch(self.lines[k:], self.seqs[k:], self._ends[k:], self.output))

    def __repr__(self):
        return "Batch(%d records, seq %d..%d, %d bytes)" % (self.count, self.first_seq, self.last_seq, self.nbytes)


class Reader:
    """Spool methods that read batches (state: Spool.__init__)."""

    def peek(self, max_records=500, max_bytes=256 << 10, output="http"):
        """The oldest lines `output` has not acknowledged, or None when there are none. Does not
        move its cursor (ack/quarantine do). Lines are made durable first (see module doc)."""
        c = self._cursors.get(output)
        if c is None:
            raise ValueError("spool %s: output %r is not enabled (outputs: %s)" % (
                self.directory, output, ", ".join(self.outputs)))
        if self._pending_loss:
            self._write_pending_gap()
        if self._dirty and self.fsync != "never":
            self._sync()
        max_records = max(1, int(max_records))
        while True:
            batch, skipped_to = self._read(max_records, max_bytes, c)
            if batch is not None:
                return batch
            if skipped_to is None:
                if self._pending_loss and self._write_pending_gap():
                    continue    # the gap record for lines just found unreadable
                return None
            self._advance(c, skipped_to)    # only corrupt, acked or others' lines: step over

    def _read(self, max_records, max_bytes, c):
        """-> (Batch or None, position to skip to when only unusable lines were found)."""
        raw = self._collect_lines(max_records, max_bytes, c)
        while raw is None:
            if self._pending_loss:
                self._write_pending_gap()
            raw = self._collect_lines(max_records, max_bytes, c)
        if not raw:
            return None, None
        self._check_lines(raw)
        lines, seqs, ends = [], [], []
        last = c.acked
        multi = self._multi
        run = None      # unreadable lines not yet accounted for: [lines, lower seq, lower ts]
        prev = None     # the last readable line
        for e in raw:
            line, seq, endpos, seg, off = e
            if seq is None or seq <= last:
                if (seq is None or seq > c.acked) and self._corrupt(seg, off, line, c):
                    if run is None:
                        # Every line of a segment has a seq >= its name (the seq of its first line).
                        run = [0, max(last, seg.key - 1), self._meta(prev)[1] if prev is not None else None]
                    run[0] += 1
                if ends:
                    ends[-1] = endpos    # acknowledging the batch steps over the bad line too
                continue
            if run is not None:
                self._corrupt_account(run, seq, self._meta(line)[1], line, c)
                run = None
            last = seq
            prev = line
            if (multi or not seg.verified) and not self._meant_for(line, c.name):
                if ends:
                    ends[-1] = endpos    # a gap record for other outputs: stepped over
                continue
            lines.append(line)
            seqs.append(seq)
            ends.append(endpos)
        if run is not None:
            # The readable neighbour above is further on (or there is none: every seq up to the
            # next one to be handed out is then below it).
            nxt = self._next_good(raw[-1][2], run[1]) if self._cut else None
            self._corrupt_account(run, *(nxt or (self._next_seq, None, None)), c)
        if lines:
            return Batch(lines, seqs, ends, c.name), None
        return None, raw[-1][2]

    def _next_good(self, end, above):
        """-> (seq, ts, line) of the first readable line after reader position `end` with a seq above
        `above`, or None when there is none yet. Rare (a corrupt run cut by a batch limit)."""
        key, off = end[0], end[1]
        for seg in self._segs:
            if seg.key < key:
                continue
            start = off if seg.key == key else 0
            try:
                with open(seg.path, "rb") as f:
                    f.seek(start)
                    data = f.read(max(0, seg.size - start))
            except OSError:
                return None
            for line in data.split(b"\n")[:-1]:
                rec = self._parse(line)
                if rec is not None and rec["seq"] > above:
                    ts = rec.get("ts")
                    return rec["seq"], ts if isinstance(ts, str) else None, line
        return None

    def _collect_lines(self, max_records, max_bytes, c):
        """Complete lines from the reader on, within the limits (at least one):
        [line, seq or None, end position, segment, offset]. Lines written by this process carry
        their seq in the fixed prefix; others get it checked in _check_lines. None when a segment
        file turned out to be gone (accounted for, removed from the list)."""
        raw = []
        nbytes = 0
        plen = self._plen
        self._cut = True
        for seg in self._segs:
            if seg.key < c.key:
                continue
            off = c.off if seg.key == c.key else 0
            lno = c.line if seg.key == c.key else 0
            if off >= seg.size:
                continue
            try:
                fd = os.open(seg.path, os.O_RDONLY)
            except OSError as e:
                self._lost_segment(seg, e)
                return None     # the segment list changed: read again
            try:
                want = max(max_bytes, 64 << 10)
                while off < seg.size:
                    try:
                        data = os.pread(fd, min(want, seg.size - off), off)
                    except OSError as e:
                        self._lost_segment(seg, e)
                        return None
                    if not data:
                        self._lost_segment(seg, None)
                        return None
                    pos = 0
                    end = len(data)
                    while pos < end:
                        nl = data.find(b"\n", pos)
                        if nl < 0:
                            break
                        line = data[pos:nl]
                        if raw and (len(raw) >= max_records or nbytes + len(line) > max_bytes):
                            return raw
                        lno += 1
                        seq = None
                        if seg.verified:
                            seq = int(line[plen:line.find(b",", plen)])
                        raw.append([line, seq, (seg.key, off + nl + 1, lno), seg, off + pos])
                        nbytes += len(line)
                        pos = nl + 1
                    if pos == 0:
                        if off + len(data) >= seg.size:
                            break     # no newline up to the end: cannot happen (size counts whole lines)
                        want *= 2     # one line longer than the read: read more
                        continue
                    off += pos
            finally:
                os.close(fd)
        self._cut = False
        return raw

    def _check_lines(self, raw):
        """Lines from an earlier run (or another writer) must be whole JSON records before they go
        into a body: one corrupt line would make the collector reject the whole batch. One
        json.loads over the batch is a third cheaper than one per line; per line only on failure."""
        todo = [e for e in raw if e[1] is None]
        if not todo:
            return
        seqs = [self._meta(e[0]) if e[0].startswith(self._prefix) else None for e in todo]
        if all(seqs):
            try:
                docs = json.loads(b"[" + b",".join(e[0] for e in todo) + b"]")
            except ValueError:
                docs = None
            if docs is not None and len(docs) == len(todo) and all(
                    type(d) is dict and d.get("seq") == m[0] for d, m in zip(docs, seqs)):
                for e, m in zip(todo, seqs):
                    e[1] = m[0]
                return
        for e in todo:
            rec = self._parse(e[0])
            e[1] = rec["seq"] if rec is not None else None

    def _corrupt(self, seg, offset, line, c):
        """An unreadable line met by cursor c: -> True when it is new to c (c accounts for it);
        counted and set aside once, by the first cursor that meets it."""
        pos = (seg.key, offset)
        if pos <= c.mark:
            return False    # seen by an earlier peek of the same, not yet acknowledged, lines
        c.mark = pos
        if pos <= self._corrupt_mark:
            return True     # another output met it first (set aside, counted)
        self._corrupt_mark = pos
        self.totals["corrupt_skipped"] += 1
        self._set_aside(seg.path, offset, line, "corrupt line skipped")
        log.warning("spool %s: corrupt line at offset %d skipped (%d bytes): %r",
                    seg.path, offset, len(line), line[:60])
        return True

    def _meant_for(self, line, name):
        """Is the line for output `name`? Only a gap record with "outputs" (an account of records
        that only those outputs had not got when they were dropped) is not for every output."""
        if b',"outputs":[' not in line:
            return True
        rec = self._parse(line)
        outs = rec.get("outputs") if rec is not None and rec.get("kind") == "gap" else None
        return not isinstance(outs, list) or name in outs

    def _backlog(self, c=None):
        """Records (lines) after cursor c (default: the slowest: what the spool holds)."""
        c = c or self._slowest()
        return sum(s.count for s in self._segs if s.key >= c.key) - c.line

    def _held_bytes(self, c):
        return sum(s.size for s in self._segs if s.key >= c.key) - c.off

    def oldest_ts(self, output=None):
        """ts of the oldest record `output` (default: the slowest) has not acknowledged, or None."""
        c = self._cursors[output] if output is not None else self._slowest()
        if not self._segs:
            return None
        pos = (c.key, c.off)
        cached = self._oldest_cache.get(c.name)
        if cached is not None and cached[0] == pos:
            return cached[1]
        ts = None
        for seg in self._segs:
            if seg.key < c.key:
                continue
            off = c.off if seg.key == c.key else 0
            if off >= seg.size:
                continue
            try:
                with open(seg.path, "rb") as f:
                    f.seek(off)
                    data = f.read(min(4096, seg.size - off))
            except FileNotFoundError:
                return None     # deleted from outside: the next peek or tick accounts for it
            nl = data.find(b"\n")
            m = self._meta(data[:nl]) if nl >= 0 else None
            ts = m[1] if m else None
            break
        if ts is not None:  # an empty backlog is not cached: the next append must show up
            self._oldest_cache[c.name] = (pos, ts)
        return ts
