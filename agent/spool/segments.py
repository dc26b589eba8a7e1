"""Segment files: naming, the start-up scan (torn tail set aside and cut off), line metadata
sliced from the wire prefix, setaside.log, and segment times (ages follow clock steps).

  seg-<first seq>.jsonl  one record per line (agent.wire), oldest first; the newest one is
                         "active" (appended to); rotated at `segment_bytes`.
  setaside.log           torn tails and corrupt lines found while reading, kept for a human
                         (bounded: a wholly corrupt spool must not fill the flash with its copy).

A line is written with one write(2) of the whole line, so a killed process (SIGKILL) does not
leave half a line (the kernel may cut a multi-page write short on a fatal signal; that, and a
power cut, give a "torn" line without its newline: set aside at start, never parsed as a record,
and its seq is reused, since no reader ever had an incomplete line).

Segment ages (max_age) are elapsed time, and the age of a segment is its file's mtime (the time
of its last write), on the scale of the current wall clock. A wall-clock step seen while the
agent runs (NTP setting a clock that was unset or behind at boot: an OpenWrt router without RTC
boots at sysfixtime, sane but old) moves the segments' times with it, in memory and on the files
(os.utime, one per segment per step: steps are rare), so neither the running agent nor the next
start ages out the whole offline backlog. Why the file mtime and not the spool's own state: it
is per segment, goes with the file, needs no cursor write, and a record's ts is no better
(written by the same clock). Steps while the agent is not running cannot be measured; two cases
are caught at start-up (Spool._recover): a segment time before CLOCK_SANE (the clock was unset)
starts ageing at the start (and is stamped so), and a segment time in the future (written with a
synced clock, read with one that is behind) counts as now (in memory only: the file may be the
right one), so it does not hold back the ageing of the others.
"""
import calendar
import json
import logging
import os
import time

from agent import wire
from agent.record import CLOCK_SANE, utc_timestamp

log = logging.getLogger("agent.spool")

SEG_PREFIX = "seg-"
SEG_SUFFIX = ".jsonl"
SETASIDE = "setaside.log"
SCAN_CHUNK = 256 << 10
_SETASIDE_MAX = 1 << 20     # a wholly corrupt spool must not fill the flash with its copy
# A change of (wall clock - monotonic clock) larger than this between two ticks is a clock step
# (NTP setting an unset clock, an operator's `date -s`), not drift: segment ages follow it.
CLOCK_STEP = 60.0


class Segment:
    __slots__ = ("key", "path", "size", "count", "first_seq", "last_seq", "first_ts", "last_ts",
                 "mtime", "verified")

    def __init__(self, key, path):
        self.key = key              # seq of the first line this segment was opened for
        self.path = path
        self.size = 0               # durable-to-us bytes (complete lines only)
        self.count = 0              # lines (records; corrupt ones included until read)
        self.first_seq = self.last_seq = None
        self.first_ts = self.last_ts = None
        self.mtime = 0.0            # spool clock at the last append (file mtime after a restart)
        self.verified = True        # written by this process: lines need no JSON check


def ts_epoch(ts):
    """'2026-11-21T10:30:45.123Z' -> seconds, None if it is not one."""
    try:
        return calendar.timegm(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")) + int(ts[20:23]) / 1000.0
    except (ValueError, TypeError):
        return None


def segment_names(directory):
    """-> [(key, file name)] of the segment files, oldest first; leftover *.tmp files removed."""
    names = []
    for name in os.listdir(directory):
        if name.startswith(SEG_PREFIX) and name.endswith(SEG_SUFFIX):
            try:
                names.append((int(name[len(SEG_PREFIX):-len(SEG_SUFFIX)]), name))
            except ValueError:
                log.warning("spool %s: ignoring stray file %s", directory, name)
        elif name.endswith(".tmp"):
            try:
                os.unlink(os.path.join(directory, name))
            except OSError:
                pass
    names.sort()
    return names


def parse(line):
    """A line -> its record (a dict with an int seq >= 1), or None."""
    try:
        rec = json.loads(line)
    except ValueError:  # UnicodeDecodeError is a ValueError too
        return None
    if not isinstance(rec, dict):
        return None
    seq = rec.get("seq")
    if type(seq) is not int or seq < 1:
        return None
    return rec


class SegmentFiles:
    """Spool methods for segment files and line metadata (state: Spool.__init__)."""
    def _meta(self, line):
        """(seq, ts) of a line, cheaply: sliced from the fixed prefix the spool writes (agent.wire);
        lines written otherwise are parsed. None when the line has no usable seq."""
        if line.startswith(self._prefix):
            return wire.slice_seq_ts(line, self._prefix)
        rec = parse(line)
        if rec is None:
            return None
        ts = rec.get("ts")
        return rec["seq"], ts if isinstance(ts, str) else None

    _parse = staticmethod(parse)

    def _seg_path(self, key):
        return os.path.join(self.directory, "%s%016d%s" % (SEG_PREFIX, key, SEG_SUFFIX))

    def _scan(self, seg):
        """Fill seg's size/count/first/last from its file; set a torn tail aside and truncate it.
        A torn line's seq is reused: the line was never complete, so no reader (uploader) ever had
        it: the next seq follows the last durable record."""
        fd = os.open(seg.path, os.O_RDWR)
        try:
            st = os.fstat(fd)
            size = st.st_size
            seg.mtime = st.st_mtime
            off = 0
            carry = b""
            count = 0
            first = last = None
            while off < size:
                chunk = os.pread(fd, min(SCAN_CHUNK, size - off), off)
                if not chunk:
                    break
                off += len(chunk)
                buf = carry + chunk if carry else chunk
                nl = buf.rfind(b"\n")
                if nl < 0:
                    carry = buf
                    continue
                count += buf.count(b"\n", 0, nl + 1)
                if first is None:
                    first = self._first_meta(buf, nl)
                m = self._last_meta(buf, nl)
                if m is not None:
                    last = m
                carry = buf[nl + 1:]
            if carry:
                good = size - len(carry)
                self._set_aside(seg.path, good, carry, "torn last line (power cut or kill during write)")
                self.totals["torn_set_aside"] += 1
                log.warning("spool %s: torn last line (%d bytes at offset %d) set aside in %s",
                            seg.path, len(carry), good, SETASIDE)
                os.ftruncate(fd, good)
                os.fsync(fd)
                size = good
            seg.size = size
            seg.count = count
            if first:
                seg.first_seq, seg.first_ts = first
            if last:
                seg.last_seq, seg.last_ts = last
        finally:
            os.close(fd)

    def _first_meta(self, buf, end):
        pos = 0
        while pos < end:
            nl = buf.find(b"\n", pos, end + 1)
            m = self._meta(buf[pos:nl])
            if m is not None:
                return m
            pos = nl + 1
        return None

    def _last_meta(self, buf, end):
        stop = end
        while stop > 0:
            start = buf.rfind(b"\n", 0, stop) + 1
            m = self._meta(buf[start:stop])
            if m is not None:
                return m
            stop = start - 1
        return None

    @staticmethod
    def _boundary(seg, off):
        if off == 0:
            return True
        with open(seg.path, "rb") as f:
            f.seek(off - 1)
            return f.read(1) == b"\n"

    @staticmethod
    def _count_lines(seg, off):
        n = 0
        with open(seg.path, "rb") as f:
            left = off
            while left > 0:
                chunk = f.read(min(SCAN_CHUNK, left))
                if not chunk:
                    break
                n += chunk.count(b"\n")
                left -= len(chunk)
        return n

    def _set_aside(self, where, offset, data, reason):
        path = os.path.join(self.directory, SETASIDE)
        try:
            if os.path.getsize(path) > _SETASIDE_MAX:
                return
        except OSError:
            pass
        head = ("# %s %s offset %d: %s (%d bytes)\n" % (
            utc_timestamp(time.time()), os.path.basename(where), offset, reason, len(data))).encode()
        try:
            with open(path, "ab") as f:
                f.write(head + data[:64 << 10] + b"\n")
        except OSError as e:
            self._trouble("setaside", "cannot write %s: %s", SETASIDE, e.strerror)

    def _restamp(self, segs):
        """Put the segments' times (seg.mtime) on their files, so that the next start reads
        the ages this run measured, not the clock readings of their writes (a restart after an
        NTP step would otherwise age out the whole offline backlog). Clock steps are rare: one
        utime (and fsync, unless fsync=never) per segment then. A file that cannot be stamped
        keeps its age in memory for this run."""
        for seg in segs:
            try:
                fd = os.open(seg.path, os.O_RDONLY)
            except OSError:
                continue        # gone: the next read accounts for it
            try:
                os.utime(fd, (seg.mtime, seg.mtime))
                if self.fsync != "never":
                    os.fsync(fd)
            except OSError as e:
                log.warning("spool %s: cannot set the time of %s: %s", self.directory,
                            os.path.basename(seg.path), e.strerror)
            finally:
                os.close(fd)

    def _check_step(self, now):
        """Segment ages are elapsed time, not clock readings. When the wall clock moved against
        the monotonic clock by more than CLOCK_STEP since the last look (NTP setting a clock that
        was unset at boot: records spooled offline would all look older than max_age and be
        dropped before the link that brought NTP back could upload them), the segments' times
        move with it. Small changes (drift, slewing) are followed silently. -> monotonic now."""
        mono = self._mono()
        off = now - mono
        prev, self._wall_off = self._wall_off, off
        if prev is not None:
            step = off - prev
            if step > CLOCK_STEP or step < -CLOCK_STEP:
                for seg in self._segs:
                    # never into the future: a segment's last write is not later than now
                    seg.mtime = min(seg.mtime + step, now)
                self._restamp(self._segs)
                log.info("spool %s: wall clock stepped by %+.0fs: segment ages follow (measured in "
                         "elapsed time, not clock readings)", self.directory, step)
        return mono

    def _start_ages(self, now):
        """At open: segment times from a clock that was unset, or from the future (see the
        module doc)."""
        rescued = []
        for seg in self._segs:
            if seg.mtime < CLOCK_SANE <= now:
                # Written while the clock was unset: it would look decades old now that the clock
                # is set. Never drop data because of a clock jump: it starts ageing now (kept on
                # the file, so the next start does not start it again).
                seg.mtime = now
                rescued.append(seg)
            elif seg.mtime > now:
                # From the future: written with a clock that was right, read with one that is
                # behind (an offline boot at sysfixtime). Not on the file: the clock on disk may
                # well be the right one; in memory, a segment no younger than now, so it neither
                # holds back the ageing of the others nor gets the next clock step added on top.
                seg.mtime = now
        self._restamp(rescued)
