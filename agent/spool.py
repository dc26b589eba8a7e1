"""The spool: a crash-safe, bounded, flash-aware queue of record lines on disk.

Layout of the spool directory:
  seg-<first seq>.jsonl  segment files, one record per line (agent.record.encode), oldest first;
                         the newest one is "active" (appended to); rotated at `segment_bytes`.
  cursor.json            upload cursor + seq floor + totals + the seq lease generation ("gen"),
                         replaced atomically (tmp, fsync, rename, directory fsync).
  ack.hint               the latest acknowledgement between two durable cursor writes: one
                         fixed-size line with a CRC, overwritten in place (same page, same inode),
                         so acknowledging every poll cycle costs no new file and no fsync; it
                         survives a killed process, and after a power cut a torn hint fails its
                         CRC and cursor.json is used (re-sending means duplicates the collector
                         drops, never loss). Created at open, so acknowledgements made while the
                         disk is full are still kept. From byte 128 on, the same file (the same
                         page: a 16 kB tmpfs has four) holds the pending loss account: the records
                         lost to failed writes that no gap record holds yet, one fixed-size line
                         with a CRC, rewritten in place when it changes (see "A write that fails").
  setaside.log           torn tails and corrupt lines found while reading, kept for a human.
  quarantine.jsonl       records the collector rejected (4xx), each with the reason.
  lock                   flock: one agent per spool directory.

Promises (see issue 4/6):
- A line is written with one write(2) of the whole line, so a killed process (SIGKILL) does not
  leave half a line (the kernel may cut a multi-page write short on a fatal signal; that, and a
  power cut, give a "torn" line without its newline: set aside at start, never parsed as a
  record, and its seq is reused, since no reader ever had an incomplete line).
- Corrupt lines (unparseable, wrong seq order) are skipped, counted and set aside, never fatal;
  reading goes on while writing goes on. A segment that vanishes, cannot be read or is cut short
  from outside is accounted for by a gap record.
- seq never goes backwards: the next seq follows the highest seq found in the segments, in the
  segment names (a segment is named after the seq of its first line) and in the cursor's
  `next_seq`; the newest segment is never deleted on acknowledgement, so even a fully acknowledged
  spool keeps its last seq on disk. With fsync always|interval, records are made durable before
  they are handed to the uploader, so after a power cut the agent never reuses a seq the collector
  has seen (the idempotent collector would discard the new reading as a duplicate: silent loss).
  With fsync never that guarantee is the kernel's writeback: use it only where the spool is not
  flash or power is protected.
- A spool whose state is gone (spool_dir in RAM after a reboot, a new spool_dir) or is an older
  copy does not start again below seqs handed out before: it starts at the seq lease kept in
  `seq_file` on persistent storage (agent.seqlease; written durably before a leased block is
  used, about once per 65536 records, and at every open and clean close) or at `fresh_seq()`
  (the agent: the clock in ms), whichever is higher. "Older copy" is decided by a generation
  drawn at every open and written to cursor.json, then to the seq_file: only the spool whose
  cursor carries the seq_file's generation (the same spool, restarted) goes on from its own
  floor, and only if that floor is not below the seq the seq_file records (at a clean close: the
  exact next seq). spool_dir A, B, A again, and a backup restored after the spool was opened
  again, continue beyond the lease. Not recognised: a copy taken during the spool's latest run
  and restored after that run ended without a clean close (kill, power cut) at or above the
  last seq_file write.
- Segment ages (max_age) are elapsed time, and the age of a segment is its file's mtime (the
  time of its last write), on the scale of the current wall clock. A wall-clock step seen while
  the agent runs (NTP setting a clock that was unset or behind at boot: an OpenWrt router
  without RTC boots at sysfixtime, sane but old) moves the segments' times with it, in memory
  and on the files (os.utime, one per segment per step: steps are rare), so neither the running
  agent nor the next start ages out the whole offline backlog. Why the file mtime and not the
  spool's own state: it is per segment, goes with the file, needs no cursor write, and a
  record's ts is no better (written by the same clock). Steps while the agent is not running
  cannot be measured; two cases are caught at start-up: a segment time before CLOCK_SANE (the
  clock was unset) starts ageing at the start (and is stamped so), and a segment time in the
  future (written with a synced clock, read with one that is behind) counts as now (in memory
  only: the file may be the right one), so it does not hold back the ageing of the others.
- When `max_bytes` or `max_age` is hit the oldest segment is dropped and a gap record
  (agent.record.gap_record) says how many records were lost (exactly), all within its
  first_seq..last_seq and first_ts..last_ts; it is uploaded like any record. A dropped segment is
  unlinked only once its gap record is written (and synced). A gap record that is itself dropped
  before upload passes its account on to the next one.
- A write that fails, whatever the error (disk full, EIO, EPERM from an immutable directory or file,
  ENOENT from a deleted spool directory), never raises: the record is lost and counted, its seq is
  not reused, and ONE gap record per outage accounts for exactly the records lost (a gap record
  that cannot be written takes no seq and loses nothing: it is tried again with the same account).
  While an account is pending nothing else is written (a reading whose gap record cannot be written
  is lost too, without a try), so the gap record is the first line after the loss. The log says it
  once when writing stops and once when it works again. On a full disk with a backlog the oldest
  segment is dropped to make room (as max_bytes would), at most once per outage when that does not
  help. The account is kept in ack.hint (pwrite in place, no new file, no fsync: it survives
  kill -9 in the page cache and costs the flash at most a page per kernel writeback; synced with
  the interval's fsync, and at close), so an agent stopped or killed during an outage writes the
  gap record after its restart; after a power cut the account of up to fsync_interval seconds of
  lost records may be missing, and their seqs (never on disk, never uploaded) are then reused.
  A deleted (or replaced) spool directory is recreated on the next write (with an ERROR line): its
  segments are accounted for as lost, cursor.json (seq floor, acknowledgement, generation), the
  lock and ack.hint (with the pending account) are written again; setaside.log and quarantine.jsonl, if they were there,
  are gone.
- Lines that were spooled but cannot be read back (corrupt bytes) are set aside and accounted for
  by a gap record with reason "corrupt" (never folded with losses, so the collector can tell
  corruption from loss): its range lies between the readable neighbours (exclusive; a segment's
  name bounds it too: every line in it has a seq >= the name) and its count is the seqs missing
  there -- not the unreadable lines: zeroed bytes or a lost newline merge several records into one
  line, junk adds lines that held no record -- less those a readable gap record right above
  accounts for already. A run of bad lines cut by a batch limit is counted once.
- Acknowledged records never come back after a restart, even after SIGKILL (cursor.json or the
  ack hint, both in the page cache); after a power cut up to fsync_interval seconds of
  acknowledgements may be re-sent (duplicates the collector drops, never loss).
- Flash wear (measured by tools/bench/spool.py): `always` fsyncs every line (~4.4 kB written per
  300-byte record); `interval` fsyncs at most once per `fsync_interval` while the collector is
  unreachable (~1.15x the line bytes) and once per upload while it is reachable (~1.9x); `never`
  leaves it to the kernel (1.0x). Segments are fixed-name append-only files: no rewrites.
- Memory does not grow with the backlog: the reader keeps a byte position, reads one batch
  (<= max_bytes) at a time and slices seq/ts from each line's fixed prefix; only lines from an
  earlier run are JSON-checked, once per batch.
"""
import calendar
import errno
import fcntl
import json
import logging
import os
import time
import zlib

from agent import seqlease
from agent.record import CLOCK_SANE, encode, gap_record, utc_timestamp

log = logging.getLogger("agent.spool")

SEG_PREFIX = "seg-"
SEG_SUFFIX = ".jsonl"
CURSOR = "cursor.json"
ACK_HINT = "ack.hint"
SETASIDE = "setaside.log"
QUARANTINE = "quarantine.jsonl"
LOCK = "lock"
FSYNC_MODES = ("always", "interval", "never")

_SCAN_CHUNK = 256 << 10
_SETASIDE_MAX = 1 << 20     # a wholly corrupt spool must not fill the flash with its copy
CORRUPT = "corrupt"         # the reason of gap records for lines spooled but unreadable
_HINT_SIZE = 128            # ack.hint: the acknowledgement line, then (at this offset) ...
_PENDING_SIZE = 1024        # ... the pending loss account; both rewritten in place, never grown
# Errors after which dropping the oldest segment can make room for the write.
_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# A change of (wall clock - monotonic clock) larger than this between two ticks is a clock step
# (NTP setting an unset clock, an operator's `date -s`), not drift: segment ages follow it.
CLOCK_STEP = 60.0


class SpoolError(Exception):
    """The spool cannot be used (directory locked by another agent, unwritable)."""


class Batch:
    """Oldest un-acknowledged lines, in seq order. `lines` are bytes without the newline;
    `_ends[i]` is the reader position just after line i (segment key, byte offset, line number),
    so a batch can be split (413) and its parts acknowledged in order."""

    __slots__ = ("lines", "seqs", "first_seq", "last_seq", "count", "nbytes", "_ends")

    def __init__(self, lines, seqs, ends):
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
        return (Batch(self.lines[:k], self.seqs[:k], self._ends[:k]),
                Batch(self.lines[k:], self.seqs[k:], self._ends[k:]))

    def __repr__(self):
        return "Batch(%d records, seq %d..%d, %d bytes)" % (self.count, self.first_seq, self.last_seq, self.nbytes)


class _Segment:
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


def _ts_epoch(ts):
    """'2026-11-21T10:30:45.123Z' -> seconds, None if it is not one."""
    try:
        return calendar.timegm(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")) + int(ts[20:23]) / 1000.0
    except (ValueError, TypeError):
        return None


class Spool:
    def __init__(self, directory, agent_id, max_bytes=16 << 20, max_age=7 * 86400, segment_bytes=256 << 10,
                 fsync="interval", fsync_interval=5.0, clock=time.time, quarantine_file=None,
                 quarantine_max_bytes=1 << 20, monotonic=time.monotonic, fresh_seq=None,
                 seq_file=None, seq_lease=seqlease.LEASE):
        if fsync not in FSYNC_MODES:
            raise ValueError("fsync must be one of %s, not %r" % ("|".join(FSYNC_MODES), fsync))
        self.directory = str(directory)
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
        # Seq lease on persistent storage apart from the spool (agent.seqlease); None: none.
        self.seq_file = str(seq_file) if seq_file else None
        self.seq_lease = max(1, int(seq_lease))
        # No seq >= _lease_end may be handed out before the lease moves on (no seq_file: never).
        self._lease_end = 0 if self.seq_file else 1 << 64
        self._lease_failed = False    # the seq_file could not be written (warned once)
        # Generation of this run (see agent.seqlease), written to cursor.json and the seq_file;
        # _gen_prev: the seq_file's generation when this run's cursor was first written (matches
        # until the seq_file is written with ours: a crash in between must not look like a copy).
        self._gen = self._gen_prev = None
        self._mono = monotonic        # fsync interval, clock step detection
        self._wall_off = None         # wall - monotonic at the last look (see _check_step)
        self.quarantine_file = str(quarantine_file or os.path.join(self.directory, QUARANTINE))
        self.quarantine_max_bytes = int(quarantine_max_bytes)
        # Every line the spool writes starts with this, so seq and ts are sliced, not parsed.
        self._prefix = b'{"agent":' + json.dumps(agent_id, ensure_ascii=False).encode("utf-8") + b',"seq":'
        self._plen = len(self._prefix)
        self._gap_size = 320 + 3 * self._plen     # room for one gap record line

        self._segs = []             # oldest first; the reader is always in _segs[0]
        self._roff = 0              # reader: byte offset in _segs[0] of the first un-acked line
        self._rline = 0             # reader: lines before _roff in _segs[0]
        self._wfd = None            # fd of the active segment (_segs[-1]) or None
        self._unsynced = []         # fds of rotated segments waiting for the interval's fsync
        self._doomed = []           # dropped segment paths waiting for their gap record (_reap)
        self._bytes = 0
        self._next_seq = 1
        self._acked_seq = 0
        self._dirty = False         # bytes written since the last fsync
        self._dir_dirty = False     # a segment was created/removed since the last directory fsync
        self._last_sync = self._mono()
        self._cursor_dirty = False
        self._last_cursor_sync = float("-inf")     # the first acknowledgement writes cursor.json
        self._pending_loss = []     # [count, first_seq, last_seq, first_ts, last_ts, reason] not yet in a gap record
        self._oldest_cache = (None, None)
        self._corrupt_mark = (0, -1)
        self._cut = False           # the last _collect_lines stopped at a limit, not at the end
        self._corrupt_memo = (0, 0)     # (lower, upper) seqs of the last corrupt account
        # Records lost to failed writes that no gap record holds yet (also in _pending_loss, and
        # in ack.hint): [count, first_seq, last_seq, first_ts, last_ts, reason] or None.
        self._failed = None
        self._pend_dirty = False    # the pending account (in ack.hint) written since the last fsync
        self._pend_clear = False    # a gap record took the account: clear it on disk after its fsync
        self._outage = None         # writes are failing: [monotonic start, strerror, lost, drop futile]
        self._troubles = set()      # what is failing (cursor, hint, fsync...): logged once, not per try
        self._locked_out = False    # the recreated directory is locked by another agent
        self.totals = {"appended": 0, "dropped": 0, "gaps": 0, "corrupt_skipped": 0, "torn_set_aside": 0,
                       "quarantined": 0, "write_errors": 0, "write_lost": 0, "corrupt_lost": 0}
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

    # ------------------------------------------------------------------ line metadata

    def _meta(self, line):
        """(seq, ts) of a line, cheaply: sliced from the fixed prefix the spool writes; lines written
        otherwise are parsed. None when the line has no usable seq."""
        p = self._plen
        if line.startswith(self._prefix):
            j = line.find(b",", p)
            if j > p:
                try:
                    seq = int(line[p:j])
                except ValueError:
                    return None
                ts = None
                if line.startswith(b'"ts":"', j + 1) and line[j + 31:j + 32] == b'"':
                    ts = line[j + 7:j + 31].decode("ascii", "replace")
                return seq, ts
            return None
        rec = self._parse(line)
        if rec is None:
            return None
        ts = rec.get("ts")
        return rec["seq"], ts if isinstance(ts, str) else None

    @staticmethod
    def _parse(line):
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

    # ------------------------------------------------------------------ start-up

    def _seg_path(self, key):
        return os.path.join(self.directory, "%s%016d%s" % (SEG_PREFIX, key, SEG_SUFFIX))

    def _recover(self):
        cursor = self._read_cursor()
        hint = self._read_hint()
        if hint and (not cursor or hint["acked_seq"] > cursor["acked_seq"]):
            cursor = dict(cursor or {}, **hint)
        floor = 1
        if cursor:
            floor = max(floor, cursor.get("next_seq", 1))
            self._acked_seq = cursor.get("acked_seq", 0)
            for k in self.totals:
                if isinstance(cursor.get(k), int) and k != "appended":
                    self.totals[k] = cursor[k]
        floor = max(floor, self._acked_seq + 1)
        names = []
        for name in os.listdir(self.directory):
            if name.startswith(SEG_PREFIX) and name.endswith(SEG_SUFFIX):
                try:
                    names.append((int(name[len(SEG_PREFIX):-len(SEG_SUFFIX)]), name))
                except ValueError:
                    log.warning("spool %s: ignoring stray file %s", self.directory, name)
            elif name.endswith(".tmp"):
                try:
                    os.unlink(os.path.join(self.directory, name))
                except OSError:
                    pass
        names.sort()
        for key, name in names:
            seg = _Segment(key, os.path.join(self.directory, name))
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
        lease = self._read_lease()
        mine = self._lease_is_mine(cursor, lease)
        if not cursor and not names and (self._fresh_seq is not None or lease is not None):
            # No cursor, no segment: a new spool, or one whose state was lost (a spool on tmpfs
            # after a reboot, new flash). The collector keeps (agent, seq) once, so restarting at
            # 1 would have every new reading discarded as a duplicate of an old one. Start at or
            # above the seq lease (beyond every seq handed out while it was writable) and the
            # caller's start (the agent: the clock in ms, beyond any seq a previous life could
            # have reached unless it averaged more than one record per millisecond).
            if self._fresh_seq is not None:
                floor = max(floor, int(self._fresh_seq()))
            if lease is not None:
                floor = max(floor, lease["lease"])
            log.info("spool %s: no previous state; sequence starts at %d", self.directory, floor)
        elif lease is not None and floor < lease["lease"] and (not mine or floor < lease["base"]):
            # Another spool wrote the seq_file since this one last ran (spool_dir A, B, A again;
            # a restored backup), or this is an older copy of the spool that wrote it (its state
            # ends below the seq the writer had reached): going on from this floor could reuse
            # seqs the collector holds. Beyond the lease nothing was ever handed out.
            log.warning("spool %s: its state ends at seq %d but the seq file %s was written by %s "
                        "(at seq %d): an older copy of the spool? sequence continues at %d",
                        self.directory, floor - 1, self.seq_file,
                        "this spool, further on" if mine else "another spool or run", lease["base"],
                        lease["lease"])
            floor = lease["lease"]
        if lease is not None:
            self._lease_end = lease["lease"]
        failed = self._read_pending()
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
                self._pending_loss = [list(failed)]
                floor = max(floor, failed[2] + 1)   # the gap record's range must stay unused
        if cursor and isinstance(cursor.get("origin_seq"), int):
            self.origin_seq = cursor["origin_seq"]
        else:
            self.origin_seq = names[0][0] if names else floor
        self._next_seq = floor
        if cursor:
            # Cursor writes until the new generation is in place (and all of them when the spool
            # is opened without the seq_file: a status look, a test) keep the one on disk.
            self._gen, self._gen_prev = cursor.get("gen"), cursor.get("gen_prev")
        self._position(cursor)
        # ack.hint is created now, while there is room: acknowledgements and the loss account
        # made while the disk is full then still overwrite it in place (cursor.json needs a new
        # file for every write).
        if hint is None:
            dirty = self._cursor_dirty
            self._write_hint()
            self._cursor_dirty = dirty
        try:
            size = os.fstat(self._hint_fd()).st_size
        except OSError:
            size = 0
        if self._pend_clear or size < _HINT_SIZE + _PENDING_SIZE:
            self._save_failed()
        if self.seq_file is not None:
            self._new_generation(cursor, lease, mine)
        now = self._clock()
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
        self._wall_off = now - self._mono()
        self._collect()
        self._age_bound(now)
        log.info("spool %s: opened, %d segments, %d records, %d bytes, next seq %d, acked seq %d",
                 self.directory, len(self._segs), self._backlog(), self._bytes - self._roff,
                 self._next_seq, self._acked_seq)

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

    def _read_hint(self):
        try:
            with open(os.path.join(self.directory, ACK_HINT), "rb") as f:
                data = f.read(_HINT_SIZE)
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
        data = (body + b" %08x" % zlib.crc32(body)).ljust(_HINT_SIZE - 1) + b"\n"
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
                f.seek(_HINT_SIZE)
                data = f.read(_PENDING_SIZE)
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
        data = (body + b" %08x" % zlib.crc32(body)).ljust(_PENDING_SIZE - 1) + b"\n"
        fd = self._hint_fd()
        if os.fstat(fd).st_size < _HINT_SIZE:
            self._write_hint()      # a new file: the hint first, the account after it
        if os.pwrite(fd, data, _HINT_SIZE) != len(data):
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

    def _trouble(self, key, fmt, *args):
        """Log an error once while it lasts (not once per try: a full disk must not flood the log)."""
        if key not in self._troubles:
            self._troubles.add(key)
            log.error("spool %s: " + fmt, self.directory, *args)

    def _resolved(self, key, fmt, *args):
        if key in self._troubles:
            self._troubles.discard(key)
            log.info("spool %s: " + fmt, self.directory, *args)

    def _read_lease(self):
        if self.seq_file is None:
            return None
        try:
            return seqlease.load(self.seq_file)
        except OSError as e:
            self._lease_trouble("cannot read: %s" % (e.strerror or e))
        except ValueError as e:
            log.warning("[agent] seq_file %s: unusable (%s): replaced; this start relies on the "
                        "spool's state and the clock alone", self.seq_file, e)
        return None

    def _lease_trouble(self, what):
        if not self._lease_failed:
            log.warning("[agent] seq_file %s: %s; the sequence floor is kept only in the spool and "
                        "the clock: if the spool is lost while the clock is unset, new records may "
                        "reuse seqs the collector already holds", self.seq_file, what)
        self._lease_failed = True

    @staticmethod
    def _lease_is_mine(cursor, lease):
        """Did this spool, in its latest run, write the seq_file last? Its cursor carries the
        lease's generation, or the generation the lease had when that run wrote its cursor (it
        stopped before it wrote the seq_file, so it handed out nothing under its own)."""
        if lease is None or not cursor:
            return False
        if lease["gen"] is None:
            return True         # a seq_file from before generations: only `base` tells
        return lease["gen"] in (cursor.get("gen"), cursor.get("gen_prev"))

    def _new_generation(self, cursor, lease, mine):
        """Start a new generation (agent.seqlease): cursor.json first, then the seq_file, both
        durably, so a crash in between leaves a cursor whose gen_prev still matches. A backup
        of the spool taken before this point carries an older generation and will jump."""
        self._gen = seqlease.new_generation()
        self._gen_prev = lease["gen"] if lease is not None else None
        if not self._write_cursor(durable=True) and mine:
            # cursor.json cannot be written (disk full): keep the generation it holds, or the
            # next start would take this spool for a copy.
            self._gen, self._gen_prev = cursor.get("gen"), cursor.get("gen_prev")
        floor = self._next_seq
        end = self._lease_end if floor < self._lease_end else floor + self.seq_lease
        if self._write_lease(end, floor):
            self._gen_prev = None

    def _write_lease(self, end, base):
        """Write the seq_file (lease `end`, `base`, this run's generation). A seq_file that cannot
        be written never stops the agent: one warning, another try a block later. -> written?"""
        self._lease_end = end
        try:
            seqlease.write(self.seq_file, end, max(0, base), self.agent_id, gen=self._gen)
        except OSError as e:
            self._lease_trouble("cannot write: %s" % (e.strerror or e))
            return False
        if self._lease_failed:
            log.info("[agent] seq_file %s: written again", self.seq_file)
        self._lease_failed = False
        return True

    def _extend_lease(self, seq):
        """Lease the block from `seq` on before it is handed out: one durable write per
        seq_lease seqs; `base` is `seq`, the seq about to be handed out."""
        self._write_lease(seq + self.seq_lease, seq)

    def _close_lease(self):
        """At a clean close: record the exact next seq as `base`, so a copy of this spool taken
        during this run (same generation, lower floor) is told apart. Only while the seq_file is
        still ours: another spool may have written it since (it has the newer word)."""
        if self.seq_file is None or self._gen is None:
            return
        try:
            doc = seqlease.load(self.seq_file)
        except (OSError, ValueError):
            return
        if doc is not None and doc["gen"] != self._gen:
            return
        self._write_lease(max(self._lease_end, self._next_seq), self._next_seq)

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
                chunk = os.pread(fd, min(_SCAN_CHUNK, size - off), off)
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
                chunk = f.read(min(_SCAN_CHUNK, left))
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

    # ------------------------------------------------------------------ writing

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
        if seq >= self._lease_end:
            self._extend_lease(seq)
        self._next_seq = seq + 1
        if self._failed is None and self._write(line, seq, record.get("ts"), now):
            if self._outage is not None:
                self._end_outage(None)
            return seq
        # else: its gap record could not be written just now, so neither can this line (and it
        # must not come first: see _recover)
        self._lose(seq, record.get("ts"))
        return seq

    def _lose(self, seq, ts):
        """Account for a record lost to a failed write (its seq stays unused)."""
        why = "write failed: %s" % (self._outage[1] if self._outage else "unknown error")
        self.totals["write_lost"] += 1
        if self._outage is not None:
            self._outage[2] += 1
        span = (1, seq, seq, ts, ts, why)
        acc = self._failed
        if acc is None:
            self._failed = list(span)
        else:
            acc[0] += 1
            acc[2] = max(acc[2], seq)
            if ts is not None and (acc[3] is None or ts < acc[3]):
                acc[3] = ts
            if ts is not None and (acc[4] is None or ts > acc[4]):
                acc[4] = ts
            if why not in acc[5].split("; "):
                acc[5] = (acc[5] + "; " + why)[:300]
        self._remember_gap([span], why)
        self._save_failed()

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
        elif retry and e.errno in _SPACE_ERRNOS and len(self._segs) > 1 and not (
                self._outage is not None and self._outage[3]):
            # Make room: the oldest data goes (accounted for by a gap record), the newest is kept.
            self._remember_gap(self._drop_oldest(), "disk full: %s" % why)
            self._reap()        # the space is needed now; the gap record follows with the next write
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
                      "them), and %s and %s are gone if they were there", self.directory,
                      self._backlog(), SETASIDE, QUARANTINE)
        for seg in list(self._segs):
            self._lost_segment(seg, "directory")
        for fd in self._unsynced + [self._hintfd]:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._unsynced, self._hintfd, self._doomed = [], None, []
        self._bytes = self._roff = self._rline = 0
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

    def _remember_gap(self, spans, reason):
        """Queue losses for the next gap record. A span is (count, first_seq, last_seq, first_ts,
        last_ts, reason or None); spans never share a lost seq, and all pending ones fold into one
        record: `dropped` is exactly how many records are gone, all of them within
        first_seq..last_seq (the range may also hold records that were delivered, such as other
        gap records). Folding (rather than one record per disjoint range) keeps a spool that
        overflows for days from filling up with gap records re-issuing each other's accounts."""
        for span in spans:
            count, fseq, lseq, fts, lts, why = span
            if not count:
                continue
            why = why or reason
            # Corruption and loss are told apart: each folds only into its own kind of account.
            corrupt = why == CORRUPT
            acc = next((a for a in self._pending_loss if (a[5] == CORRUPT) == corrupt), None)
            if acc is None:
                self._pending_loss.append([count, fseq, lseq, fts, lts, why])
                continue
            acc[0] += count
            acc[1] = min(acc[1], fseq)
            acc[2] = max(acc[2], lseq)
            if fts is not None and (acc[3] is None or fts < acc[3]):
                acc[3] = fts
            if lts is not None and (acc[4] is None or lts > acc[4]):
                acc[4] = lts
            if why not in acc[5].split("; "):
                acc[5] = (acc[5] + "; " + why)[:300]

    def _write_pending_gap(self):
        """Write the pending accounts as gap records. -> True when none is left. A gap record that
        cannot be written takes no seq (nothing was written: the seq was never handed out) and
        loses nothing: the account waits for the next try, with whatever was lost meanwhile."""
        pending, self._pending_loss = self._pending_loss, []
        for i, p in enumerate(pending):
            count, fseq, lseq, fts, lts, reason = p
            seq = self._next_seq
            rec = gap_record(self.agent_id, self._clock(), count, fseq, lseq, fts, lts, reason)
            rec["seq"] = seq
            line = encode(rec)
            if seq >= self._lease_end:
                self._extend_lease(seq)
            self._next_seq = seq + 1
            now = self._clock()
            if self._wfd is not None and self._segs[-1].size + len(line) > self.segment_bytes:
                self._rotate()
            if not self._write(line, seq, rec["ts"], now):
                self._next_seq = seq
                new, self._pending_loss = self._pending_loss, [list(x) for x in pending[i:]]
                if new:     # lost while trying (a segment dropped to make room): folded in
                    self._remember_gap([tuple(x) for x in new], new[0][5])
                return False
            self.totals["gaps"] += 1
            if self._failed is not None and reason != CORRUPT:
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

    def _open_segment(self, seq):
        if self._locked_out:
            raise OSError(errno.ENOLCK, "spool directory in use by another agent")
        seg = _Segment(seq, self._seg_path(seq))
        self._wfd = os.open(seg.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._segs.append(seg)
        self._dir_dirty = True
        if len(self._segs) == 1:
            self._roff = self._rline = 0

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
            self._remember_gap(self._drop_oldest(), why)
            dropped = True
        if self._wfd is None and self._segs and self._over(n):
            self._remember_gap(self._drop_oldest(), why)   # a lone closed segment over the bound
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
            self._remember_gap(self._drop_oldest(), "older than max_age (%gs)" % self.max_age)
            dropped = True
        if dropped and self._pending_loss:
            self._write_pending_gap()
        self._reap()

    def _drop_oldest(self):
        """Delete the oldest segment; -> spans for _remember_gap: the un-acknowledged records it
        held (read from the file: the gap record must be exact), and, re-issued with their own
        range and reason, the accounts of gap records that were not uploaded yet (what they
        accounted for is still gone and the collector must hear of it)."""
        seg = self._segs[0]
        start = self._roff
        direct = 0
        fseq = lseq = fts = lts = None
        carried = []
        try:
            with open(seg.path, "rb") as f:
                f.seek(start)
                data = f.read(seg.size - start)
        except OSError as e:
            self._lost_segment(seg, e)
            return []
        pos = 0
        last, run = self._acked_seq, None
        while pos < len(data):
            nl = data.find(b"\n", pos)
            if nl < 0:
                break
            line = data[pos:nl]
            at, pos = start + pos, nl + 1
            m = self._meta(line)
            if m is None:
                if self._corrupt(seg, at, line):      # unread so far: account for it as the reader would
                    if run is None:
                        run = [0, max(last, seg.key - 1), None]
                    run[0] += 1
                continue
            if m[0] <= self._acked_seq:
                continue
            if run is not None and m[0] > run[1]:
                self._corrupt_account(run, m[0], m[1], line)
                run = None
            last = max(last, m[0])
            direct += 1
            if fseq is None:
                fseq = m[0]
            lseq = m[0]
            ts = m[1]
            if ts is not None:     # time range: clocks step, so min/max rather than first/last
                if fts is None or ts < fts:
                    fts = ts
                if lts is None or ts > lts:
                    lts = ts
            if b'"kind":"gap"' in line:
                g = self._parse(line)
                if g is not None and type(g.get("dropped")) is int and type(g.get("first_seq")) is int:
                    carried.append((g["dropped"], g["first_seq"], g.get("last_seq"), g.get("first_ts"),
                                    g.get("last_ts"), g.get("reason")))
        if run is not None:
            self._corrupt_account(run, *(self._next_good((seg.key + 1, 0), run[1]) or (self._next_seq, None, None)))
        self._segs.pop(0)
        self._roff = self._rline = 0
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
        return [(direct, fseq, lseq, fts, lts, None)] + carried

    def _delete(self, seg, durable, defer=False):
        """Unlink a segment, after the cursor (and with it the seq floor) is written. A dropped
        segment (defer) is only unlinked by _reap, once the gap record that accounts for it is
        on disk: a power cut in between must not lose both the records and their account."""
        self._bytes -= seg.size
        self._write_cursor(durable=durable and self.fsync != "never")
        if defer:
            self._doomed.append(seg.path)
            return
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
        """Unlink dropped segments, after syncing the gap records written for them."""
        if not self._doomed:
            return
        if self.fsync != "never" and self._dirty:
            self._sync()
        for path in self._doomed:
            self._unlink(path)
        self._doomed = []
        self._dir_dirty = True

    def _collect(self):
        """Delete fully acknowledged segments at the head, except the newest one (it keeps the
        seq floor on disk even when every record has been acknowledged)."""
        while len(self._segs) > 1 and self._roff >= self._segs[0].size and (
                self._wfd is None or len(self._segs) > 1):
            seg = self._segs.pop(0)
            self._roff = self._rline = 0
            self._delete(seg, durable=self.fsync == "always")

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

    def _write_cursor(self, durable):
        seg = self._segs[0] if self._segs else None
        cur = {"acked_seq": self._acked_seq, "next_seq": self._next_seq, "origin_seq": self.origin_seq,
               "segment": seg.key if seg else self._next_seq, "offset": self._roff if seg else 0}
        if self._gen is not None:
            cur["gen"] = self._gen
        if self._gen_prev is not None:
            cur["gen_prev"] = self._gen_prev
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

    def _lost_segment(self, seg, err):
        """A segment file was deleted from outside the agent (err FileNotFoundError or nlink 0),
        cannot be read (err: an OSError, e.g. EIO from worn flash) or was truncated from outside
        (err None): account for its unread records with a gap record (their count is known; the
        range is from the first unread seq to the last), keep a readable rest aside for a human
        (<segment>.unreadable), go on with the next segment: never stop reading."""
        head = seg is self._segs[0]
        lost = seg.count - (self._rline if head else 0)
        first = seg.first_seq
        if head and self._acked_seq + 1 > (first or 0):
            first = self._acked_seq + 1
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
        if head:
            self._roff = self._rline = 0
        self.totals["dropped"] += max(lost, 0)
        if lost > 0 and first is not None and seg.last_seq is not None:
            self._remember_gap([(lost, first, seg.last_seq, seg.first_ts, seg.last_ts, None)], why)

    # ------------------------------------------------------------------ reading

    def peek(self, max_records=500, max_bytes=256 << 10):
        """The oldest un-acknowledged lines, or None when there are none. Does not move the
        cursor (ack/quarantine do). Lines are made durable first (see module doc)."""
        if self._pending_loss:
            self._write_pending_gap()
        if self._dirty and self.fsync != "never":
            self._sync()
        max_records = max(1, int(max_records))
        while True:
            batch, skipped_to = self._read(max_records, max_bytes)
            if batch is not None:
                return batch
            if skipped_to is None:
                if self._pending_loss and self._write_pending_gap():
                    continue    # the gap record for lines just found unreadable
                return None
            self._advance(skipped_to)   # only corrupt or already-acked lines there: step over

    def _read(self, max_records, max_bytes):
        """-> (Batch or None, position to skip to when only unusable lines were found)."""
        raw = self._collect_lines(max_records, max_bytes)
        while raw is None:
            if self._pending_loss:
                self._write_pending_gap()
            raw = self._collect_lines(max_records, max_bytes)
        if not raw:
            return None, None
        self._check_lines(raw)
        lines, seqs, ends = [], [], []
        last = self._acked_seq
        run = None      # unreadable lines not yet accounted for: [lines, lower seq, lower ts]
        prev = None     # the last readable line
        for e in raw:
            line, seq, endpos, seg, off = e
            if seq is None or seq <= last:
                if (seq is None or seq > self._acked_seq) and self._corrupt(seg, off, line):
                    if run is None:
                        # Every line of a segment has a seq >= its name (the seq of its first line).
                        run = [0, max(last, seg.key - 1), self._meta(prev)[1] if prev is not None else None]
                    run[0] += 1
                if ends:
                    ends[-1] = endpos    # acknowledging the batch steps over the bad line too
                continue
            if run is not None:
                self._corrupt_account(run, seq, self._meta(line)[1], line)
                run = None
            last = seq
            prev = line
            lines.append(line)
            seqs.append(seq)
            ends.append(endpos)
        if run is not None:
            # The readable neighbour above is further on (or there is none: every seq up to the
            # next one to be handed out is then below it).
            nxt = self._next_good(raw[-1][2], run[1]) if self._cut else None
            self._corrupt_account(run, *(nxt or (self._next_seq, None, None)))
        if lines:
            return Batch(lines, seqs, ends), None
        return None, raw[-1][2]

    def _corrupt_account(self, run, upper, upper_ts, upper_line):
        """Unreadable lines between the readable seqs run[1] and `upper`: a gap record (reason
        "corrupt") for the seqs missing between them. Counting seqs, not lines: zeroed bytes or a
        lost newline merge several records into one unreadable line, junk adds lines that held no
        record. Seqs between them that a readable gap record right after accounts for already
        (records lost to a failed write) are not counted twice; the same range seen again, across
        a batch boundary, is not counted again."""
        lines, lower, lower_ts = run
        room = upper - lower - 1
        if upper_line is not None and b'"kind":"gap"' in upper_line:
            g = self._parse(upper_line)
            if g is not None and type(g.get("dropped")) is int and type(g.get("first_seq")) is int \
                    and type(g.get("last_seq")) is int:
                overlap = min(g["last_seq"], upper - 1) - max(g["first_seq"], lower + 1) + 1
                room -= max(0, min(g["dropped"], overlap))
        memo_lower, memo_upper = self._corrupt_memo
        if upper == memo_upper and lower >= memo_lower:
            return      # the rest of a run already accounted for (the whole range was counted)
        count = room
        if count <= 0:
            return      # not records of their own (junk, a duplicate): set aside, nothing lost
        self._corrupt_memo = (lower, upper)
        self.totals["corrupt_lost"] += count
        log.warning("spool %s: %d unreadable lines between seq %d and %d (set aside in %s): %d records "
                    "cannot be read back; a gap record accounts for them", self.directory, lines,
                    lower, upper, SETASIDE, count)
        self._remember_gap([(count, lower + 1, upper - 1, lower_ts, upper_ts, CORRUPT)], CORRUPT)

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

    def _collect_lines(self, max_records, max_bytes):
        """Complete lines from the reader on, within the limits (at least one):
        [line, seq or None, end position, segment, offset]. Lines written by this process carry
        their seq in the fixed prefix; others get it checked in _check_lines. None when a segment
        file turned out to be gone (accounted for, removed from the list)."""
        raw = []
        nbytes = 0
        plen = self._plen
        self._cut = True
        for i, seg in enumerate(self._segs):
            off = self._roff if i == 0 else 0
            lno = self._rline if i == 0 else 0
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

    def _corrupt(self, seg, offset, line):
        """Count and set aside an unreadable line, once. -> True when it is new."""
        if (seg.key, offset) <= self._corrupt_mark:
            return False    # seen by an earlier peek of the same, not yet acknowledged, lines
        self._corrupt_mark = (seg.key, offset)
        self.totals["corrupt_skipped"] += 1
        self._set_aside(seg.path, offset, line, "corrupt line skipped")
        log.warning("spool %s: corrupt line at offset %d skipped (%d bytes): %r",
                    seg.path, offset, len(line), line[:60])
        return True

    def _advance(self, end):
        key, off, lno = end
        while self._segs and self._segs[0].key < key:
            if len(self._segs) == 1:
                return
            seg = self._segs.pop(0)
            self._roff = self._rline = 0
            self._delete(seg, durable=self.fsync == "always")
        if self._segs and self._segs[0].key == key and off > self._roff:
            self._roff, self._rline = off, lno
        self._collect()

    def ack(self, batch):
        """The collector stored the batch (2xx): move the cursor past it, delete acked segments."""
        if batch is None or not batch.count:
            return
        self._advance(batch._ends[-1])
        if batch.last_seq > self._acked_seq:
            self._acked_seq = batch.last_seq
        self._persist_cursor()

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
        self._advance(batch._ends[-1])
        if batch.last_seq > self._acked_seq:
            self._acked_seq = batch.last_seq
        self._persist_cursor()

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

    def _persist_cursor(self):
        due = self.fsync == "always" or (
            self.fsync == "interval" and self._mono() - self._last_cursor_sync >= self.fsync_interval)
        if due:
            self._write_cursor(durable=True)
        else:
            self._write_hint()      # tick() writes the durable cursor when the interval is due

    # ------------------------------------------------------------------ status

    def _backlog(self):
        return sum(s.count for s in self._segs) - self._rline

    def oldest_ts(self):
        """ts of the oldest un-acknowledged record, or None."""
        if not self._segs:
            return None
        pos = (self._segs[0].key, self._roff)
        if self._oldest_cache[0] == pos:
            return self._oldest_cache[1]
        ts = None
        for i, seg in enumerate(self._segs):
            off = self._roff if i == 0 else 0
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
            self._oldest_cache = (pos, ts)
        return ts

    def stats(self):
        ts = self.oldest_ts()
        t = _ts_epoch(ts) if ts else None
        st = {"records": self._backlog(), "bytes": self._bytes - self._roff, "oldest_ts": ts,
              "oldest_age": round(max(0.0, self._clock() - t), 3) if t is not None else None,
              "segments": len(self._segs), "next_seq": self._next_seq, "acked_seq": self._acked_seq,
              "origin_seq": self.origin_seq,
              "fsync": self.fsync, "bytes_written": self.bytes_written}
        st.update(self.totals)
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
            if self._failed is not None or self._pend_clear:
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
            self._close_lease()
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
