"""The seq lease: a floor for the record sequence, kept on persistent storage apart from the spool.

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
import os

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
