"""The seq lease (was agent.seqlease): a floor for the record sequence, kept on persistent storage apart from the spool.

The collector keeps (agent, seq) once. A spool that loses its state (spool_dir on tmpfs after a
reboot -- OpenWrt's /var is RAM --, a new spool_dir, a reflashed USB stick) must not start again
at a seq the collector already holds, or every new reading is silently dropped as a duplicate.
The clock alone is no floor: a router without RTC boots at the same sysfixtime every time and may
poll for hours before NTP answers.

So the spool leases seqs in blocks: before it hands out seq s >= the leased value it writes
`{"lease": s + LEASE, "base": s, "gen": G}` to `[agent] seq_file` (tmp, fsync, rename, directory
fsync), about one flash write per LEASE records, plus one at every open and one at every clean
close. The file says:
  lease  no seq >= lease was ever handed out (by any copy of the spool);
  base   the writer's next seq when it wrote the file (at a clean close: exactly its next seq);
  gen    the generation of the spool that wrote it: a random id drawn at every open and kept in
         that spool's cursor.json too.
A spool resumes from its own floor only when its cursor carries the lease's generation (it is
the spool that wrote the lease last, in its latest run) and its floor is not below `base`.
Anything else -- no state, another spool_dir, the same spool_dir after another one was used (A, B,
A again), a backup restored after the spool was opened again -- continues at `lease`, beyond
anything any copy could have handed out. Jumping is always safe (a hole in the seqs, never a
reused one); the generation keeps the normal restart of the same spool free of jumps.
"""
import errno
import json
import logging
import os

log = logging.getLogger("agent.spool")

LEASE = 65536


def load(path):
    """-> the lease document {"lease": int, "base": int, "gen": str or None} from `path`; None
    when the file does not exist. Raises ValueError when it is unreadable as a lease, OSError when
    it cannot be read. A file written before generations existed has gen None."""
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(4096))
    except FileNotFoundError:
        return None
    if not isinstance(doc, dict) or type(doc.get("lease")) is not int or type(doc.get("base")) is not int \
            or not 0 <= doc["base"] <= doc["lease"]:
        raise ValueError("not a seq lease: %r" % (doc,))
    gen = doc.get("gen")
    return {"lease": doc["lease"], "base": doc["base"], "gen": gen if isinstance(gen, str) else None}


def read(path):
    """-> (lease, base) from `path`; None when the file does not exist (see load)."""
    doc = load(path)
    return None if doc is None else (doc["lease"], doc["base"])


def new_generation():
    """A random generation id (64 bits, hex): drawn at every open of a spool."""
    return os.urandom(8).hex()


def write(path, lease, base, agent_id=None, gen=None):
    """Replace the lease atomically and durably (it must be on flash before any seq it covers
    can reach the collector). Raises OSError."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    doc = {"lease": int(lease), "base": int(base)}
    if gen is not None:
        doc["gen"] = gen
    if agent_id is not None:
        doc["agent"] = agent_id
    data = json.dumps(doc, separators=(",", ":")).encode() + b"\n"
    tmp = path + ".tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except FileNotFoundError:
        os.makedirs(parent, exist_ok=True)      # e.g. /var/lib/modbus-agent not created yet
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, "short write")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class SeqLease:
    """The spool's side of the lease: the seq_file's path, the end of the block leased so far
    (no seq >= end may be handed out before the lease moves on; no seq_file: never), and this
    run's generation (`gen`, written to cursor.json and the seq_file; `gen_prev`: the seq_file's
    generation when this run's cursor was first written, kept until the seq_file is written with
    ours, so a crash in between does not look like a copy)."""

    def __init__(self, path, block, agent_id):
        self.path = str(path) if path else None
        self.block = max(1, int(block))
        self.agent_id = agent_id
        self.end = 0 if self.path else 1 << 64
        self.failed = False        # the seq_file could not be written (warned once)
        self.gen = self.gen_prev = None

    def read(self):
        """-> the lease document, or None (no seq_file, none yet, unreadable: warned)."""
        if self.path is None:
            return None
        try:
            return load(self.path)
        except OSError as e:
            self._trouble("cannot read: %s" % (e.strerror or e))
        except ValueError as e:
            log.warning("[agent] seq_file %s: unusable (%s): replaced; this start relies on the "
                        "spool's state and the clock alone", self.path, e)
        return None

    def _trouble(self, what):
        if not self.failed:
            log.warning("[agent] seq_file %s: %s; the sequence floor is kept only in the spool and "
                        "the clock: if the spool is lost while the clock is unset, new records may "
                        "reuse seqs the collector already holds", self.path, what)
        self.failed = True

    @staticmethod
    def is_mine(cursor, lease):
        """Did this spool, in its latest run, write the seq_file last? Its cursor carries the
        lease's generation, or the generation the lease had when that run wrote its cursor (it
        stopped before it wrote the seq_file, so it handed out nothing under its own)."""
        if lease is None or not cursor:
            return False
        if lease["gen"] is None:
            return True         # a seq_file from before generations: only `base` tells
        return lease["gen"] in (cursor.get("gen"), cursor.get("gen_prev"))

    def start_floor(self, floor, cursor, lease, mine, no_state, fresh_seq, directory):
        """The first seq of this run, given the spool's own floor (see the module doc)."""
        if no_state and (fresh_seq is not None or lease is not None):
            # No cursor, no segment: a new spool, or one whose state was lost (a spool on tmpfs
            # after a reboot, new flash). The collector keeps (agent, seq) once, so restarting at
            # 1 would have every new reading discarded as a duplicate of an old one. Start at or
            # above the seq lease (beyond every seq handed out while it was writable) and the
            # caller's start (the agent: the clock in ms, beyond any seq a previous life could
            # have reached unless it averaged more than one record per millisecond).
            if fresh_seq is not None:
                floor = max(floor, int(fresh_seq()))
            if lease is not None:
                floor = max(floor, lease["lease"])
            log.info("spool %s: no previous state; sequence starts at %d", directory, floor)
        elif lease is not None and floor < lease["lease"] and (not mine or floor < lease["base"]):
            # Another spool wrote the seq_file since this one last ran (spool_dir A, B, A again;
            # a restored backup), or this is an older copy of the spool that wrote it (its state
            # ends below the seq the writer had reached): going on from this floor could reuse
            # seqs the collector holds. Beyond the lease nothing was ever handed out.
            log.warning("spool %s: its state ends at seq %d but the seq file %s was written by %s "
                        "(at seq %d): an older copy of the spool? sequence continues at %d",
                        directory, floor - 1, self.path,
                        "this spool, further on" if mine else "another spool or run", lease["base"],
                        lease["lease"])
            floor = lease["lease"]
        if lease is not None:
            self.end = lease["lease"]
        return floor

    def new_generation(self, cursor, lease, mine, write_cursor, next_seq):
        """Start a new generation: cursor.json first (write_cursor(): durable, -> written?), then
        the seq_file, both durably, so a crash in between leaves a cursor whose gen_prev still
        matches. A backup of the spool taken before this point carries an older generation and
        will jump."""
        self.gen = new_generation()
        self.gen_prev = lease["gen"] if lease is not None else None
        if not write_cursor() and mine:
            # cursor.json cannot be written (disk full): keep the generation it holds, or the
            # next start would take this spool for a copy.
            self.gen, self.gen_prev = cursor.get("gen"), cursor.get("gen_prev")
        end = self.end if next_seq < self.end else next_seq + self.block
        if self.write(end, next_seq):
            self.gen_prev = None

    def write(self, end, base):
        """Write the seq_file (lease `end`, `base`, this run's generation). A seq_file that cannot
        be written never stops the agent: one warning, another try a block later. -> written?"""
        self.end = end
        try:
            write(self.path, end, max(0, base), self.agent_id, gen=self.gen)
        except OSError as e:
            self._trouble("cannot write: %s" % (e.strerror or e))
            return False
        if self.failed:
            log.info("[agent] seq_file %s: written again", self.path)
        self.failed = False
        return True

    def cover(self, seq):
        """Before `seq` is handed out: lease the block from it on when it is beyond the lease (one
        durable write per `block` seqs; `base` is `seq`, the seq about to be handed out)."""
        if seq >= self.end:
            self.write(seq + self.block, seq)

    def close(self, next_seq):
        """At a clean close: record the exact next seq as `base`, so a copy of this spool taken
        during this run (same generation, lower floor) is told apart. Only while the seq_file is
        still ours: another spool may have written it since (it has the newer word)."""
        if self.path is None or self.gen is None:
            return
        try:
            doc = load(self.path)
        except (OSError, ValueError):
            return
        if doc is not None and doc["gen"] != self.gen:
            return
        self.write(max(self.end, next_seq), next_seq)
