"""The spool: a crash-safe, bounded, flash-aware queue of record lines on disk.

Layout of the spool directory:
  seg-<first seq>.jsonl  segment files, one record per line (agent.wire), oldest first; the newest
                         one is "active" (appended to); rotated at `segment_bytes`.   segments
  cursor.json            one cursor per output + seq floor + totals + the seq lease generation,
                         replaced atomically.                                         cursor
  ack.hint               the latest acknowledgements between two durable cursor writes, and the
                         pending loss account; rewritten in place, CRC-checked.       cursor
  setaside.log           torn tails and corrupt lines found while reading, for a human. segments
  quarantine.jsonl       not the spool's: the uploader's quarantine (agent.upload.quarantine)
                         falls back to this directory when [upload] quarantine_file is unusable.
  lock                   flock: one agent per spool directory.                        facade

Where each part lives (one class, Spool, assembled from method groups; every field is set in
Spool.__init__ and every decision that orders writes, syncs and unlinks is in the facade):
  facade.py    Spool: open and recovery, _delete/_reap/_collect/_sync (the orderings), tick, ack,
               stats, close
  segments.py  segment files: names, start-up scan, torn tail, set-aside, line metadata, clock steps
  cursor.py    cursor.json and ack.hint (with the pending loss account), reader positioning
  lease.py     the seq lease in [agent] seq_file (was agent.seqlease)
  loss.py      loss accounting into gap records: bounds, drops, failed writes, corrupt lines,
               segments lost from outside
  reader.py    Batch and peek: reading batches
  writer.py    append, rotation, failed writes, a spool directory recreated

Named cursors (issue 11): Spool(..., outputs=("http",)) names the enabled outputs; each has its own
cursor: peek(..., output=NAME) hands out what that output has not acknowledged, ack(batch) moves
batch.output's cursor only. A segment is deleted when every enabled output is past it (the newest
one is always kept), or when a bound drops it: then the records some output had not got are
accounted for per output (one gap record for all outputs that lacked the same records, with
"outputs": [...] when it is not for all of them; another output is handed such a record with
"dropped" 0, so every output gets every seq or an account of it). A cursor of an output that is no
longer enabled is retired at open (logged once, not written again): it pins nothing. A new output
starts at the oldest record held. stats() tells what is held (behind the slowest output) and, in
"outputs", each output's backlog. cursor.json and ack.hint from before named cursors are read as
the "http" cursor.

Promises (see issue 4/6; the details are in the module named after each; "acknowledged" is per
output, "deleted" is when all of them are past):
- A line is written with one write(2): a kill leaves no half line; a torn line (power cut) is set
  aside at start and its seq reused (segments).
- Corrupt lines are skipped, counted, set aside and accounted for, never fatal (reader, loss).
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
  `seq_file` on persistent storage (lease; written durably before a leased block is used, about
  once per 65536 records, and at every open and clean close) or at `fresh_seq()` (the agent: the
  clock in ms), whichever is higher. "Older copy" is decided by a generation drawn at every open
  and written to cursor.json, then to the seq_file: only the spool whose cursor carries the
  seq_file's generation (the same spool, restarted) goes on from its own floor, and only if that
  floor is not below the seq the seq_file records (at a clean close: the exact next seq).
  spool_dir A, B, A again, and a backup restored after the spool was opened again, continue
  beyond the lease. Not recognised: a copy taken during the spool's latest run and restored after
  that run ended without a clean close (kill, power cut) at or above the last seq_file write.
- Segment ages (max_age) are elapsed time and follow wall-clock steps (segments).
- Bounds drop the oldest segment with an exact gap record; a failed write never raises and is
  accounted for once per outage; a deleted spool directory is recreated (loss, writer).
- Acknowledged records never come back after a restart, even after SIGKILL (cursor).
- Flash wear (measured by tools/bench/spool.py): `always` fsyncs every line (~4.4 kB written per
  300-byte record); `interval` fsyncs at most once per `fsync_interval` while the collector is
  unreachable (~1.15x the line bytes) and once per upload while it is reachable (~1.9x); `never`
  leaves it to the kernel (1.0x). Segments are fixed-name append-only files: no rewrites.
- Memory does not grow with the backlog (reader).
"""
from agent.spool.cursor import ACK_HINT, CURSOR
from agent.spool.facade import FSYNC_MODES, Spool, SpoolError
from agent.spool.loss import CORRUPT
from agent.spool.reader import Batch
from agent.spool.segments import CLOCK_STEP, SEG_PREFIX, SEG_SUFFIX, SETASIDE
from agent.spool.writer import LOCK

__all__ = ["ACK_HINT", "CLOCK_STEP", "CORRUPT", "CURSOR", "FSYNC_MODES", "LOCK", "SEG_PREFIX", "SEG_SUFFIX",
           "SETASIDE", "Batch", "Spool", "SpoolError"]
