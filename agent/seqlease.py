"""The seq lease: a floor for the record sequence, kept on persistent storage apart from the spool.

The collector keeps (agent, seq) once. A spool that loses its state (spool_dir on tmpfs after a
reboot -- OpenWrt's /var is RAM --, a new spool_dir, a reflashed USB stick) must not start again
at a seq the collector already holds, or every new reading is silently dropped as a duplicate.
The clock alone is no floor: a router without RTC boots at the same sysfixtime every time and may
poll for hours before NTP answers.

So the spool leases seqs in blocks: before it hands out seq s >= the leased value it writes
`{"lease": s + LEASE, "base": s}` to `[agent] seq_file` (tmp, fsync, rename, directory fsync),
about one flash write per LEASE records (and one per start of a spool without state). The file
says: no seq >= "lease" was ever handed out, and seq "base" was (or was about to be). A spool
with no state starts at or above "lease"; a spool whose state ends below "base" is an older copy
(the spool_dir of an earlier config, a restored backup) and continues at "lease" too.
"""
import errno
import json
import os

LEASE = 65536


def read(path):
    """-> (lease, base) from `path`; None when the file does not exist. Raises ValueError when
    it is unreadable as a lease, OSError when it cannot be read."""
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(4096))
    except FileNotFoundError:
        return None
    if not isinstance(doc, dict) or type(doc.get("lease")) is not int or type(doc.get("base")) is not int \
            or not 0 <= doc["base"] < doc["lease"]:
        raise ValueError("not a seq lease: %r" % (doc,))
    return doc["lease"], doc["base"]


def write(path, lease, base, agent_id=None):
    """Replace the lease atomically and durably (it must be on flash before any seq it covers
    can reach the collector). Raises OSError."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    doc = {"lease": int(lease), "base": int(base)}
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
