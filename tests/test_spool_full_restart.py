"""A spool with a seq_file, stopped (cleanly or by kill -9) while its disk is full, started again
once the disk was freed (review1 item 2): the seq goes on right after the readings lost in the
outage -- no jump of a lease block, no "an older copy of the spool?" warning -- and one gap record
accounts for exactly the readings lost, so the collector has no hole that nothing explains.

The cause: at open, the seq lease's "older copy" check compared the seq_file's base (the writer's
next seq, past the lost readings: at a clean close, or when the lease moved on during the outage)
with the spool's floor BEFORE the pending loss account in ack.hint (the lost readings' seqs) had
raised that floor, so the spool's own lost seqs looked like another copy's.

Real 64 kB tmpfs (skipped without mount rights), real spool,
the seq_file on another filesystem (as in the field: /etc or flash, not the spool partition)."""
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from agent.record import data_record
from agent.spool import Spool
from agent.spool.lease import LEASE
from tests.test_spool import audit_gaps, drain_all
from tests.test_spool_failures import AGENT, ROOT, T0, fill, gaps, reading


@pytest.fixture
def small_fs(tmp_path):
    """A real 64 kB tmpfs (a router's small spool partition), unmounted whatever happens."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a 64 kB tmpfs here (mount needs root/CAP_SYS_ADMIN): %s" % r.stderr.strip())
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


LEASES = pytest.mark.parametrize("lease", [LEASE, 4], ids=["lease-65536", "lease-4"])


def warnings(caplog, text):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and text in r.getMessage()]


def options(tmp_path, lease):
    return dict(segment_bytes=4096, max_bytes=1 << 20, seq_file=str(tmp_path / "site7.seq"), seq_lease=lease)


def restart_and_audit(d, kw, caplog, delivered, lost, n):
    """Open the spool again (the disk is free now): the seq goes on right after the lost seqs,
    no "older copy" warning, one gap record for exactly `lost`, every seq accounted for."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="agent.spool"):
        sp = Spool(d, AGENT, **kw)
    assert warnings(caplog, "older copy") == []
    assert sp.next_seq == lost[-1] + 1, "the seq jumped by %d" % (sp.next_seq - lost[-1] - 1)
    sp.append(reading(n))
    delivered += drain_all(sp)
    g = gaps(delivered)
    assert [(x["dropped"], x["first_seq"], x["last_seq"]) for x in g] == [(len(lost), lost[0], lost[-1])], g
    assert g[0]["seq"] == lost[-1] + 1 and delivered[-1]["seq"] == lost[-1] + 2
    audit_gaps(sp.next_seq, delivered)      # every seq from 1 on: delivered or in the gap record
    assert [r["values"]["i"] for r in delivered if r.get("kind") != "gap"] == \
        [i for i in range(n + 1) if i not in set(range(n - len(lost), n))]
    sp.close()
    with caplog.at_level(logging.INFO, logger="agent.spool"):
        sp = Spool(d, AGENT, **kw)          # and a normal restart after that: no jump either
    assert warnings(caplog, "older copy") == [] and sp.next_seq == lost[-1] + 3
    assert drain_all(sp) == []
    sp.close()


def lose(sp, i, count):
    """Append readings i, i+1, ... to a spool on a full disk until `count` were lost (the first
    ones may still fit in the active segment's last page) -> (next reading, the lost seqs)."""
    lost = []
    while len(lost) < count:
        before = sp.stats()["write_lost"]
        seq = sp.append(reading(i))
        i += 1
        if sp.stats()["write_lost"] > before:
            lost.append(seq)
        assert i < 1000, "the disk never filled"
    assert lost == list(range(lost[0], lost[0] + count))
    return i, lost


@LEASES
def test_clean_stop_while_full_then_start_after_freeing(small_fs, tmp_path, caplog, lease):
    d = small_fs / "spool"
    kw = options(tmp_path, lease)
    sp = Spool(d, AGENT, **kw)
    for i in range(10):
        sp.append(reading(i))
    delivered = drain_all(sp)
    filler = fill(small_fs)
    n, lost = lose(sp, 10, 15)
    sp.close()                              # SIGTERM: a clean stop while the disk is full
    os.unlink(filler)
    restart_and_audit(d, kw, caplog, delivered, lost, n)


CHILD = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, sys.argv[1])
    from agent.spool import Spool
    from tests.test_spool_failures import fill
    from tests.test_spool_full_restart import lose
    mnt, lease = sys.argv[2], int(sys.argv[4])
    sp = Spool(os.path.join(mnt, "spool"), "site7", segment_bytes=4096, max_bytes=1 << 20,
               seq_file=sys.argv[3], seq_lease=lease)
    fill(mnt)
    n, lost = lose(sp, 10, 15)
    sp.tick()
    print(n, lost[0], lost[-1], flush=True)
    sys.stdin.read()        # killed here, never closed
""")


@LEASES
def test_kill_9_while_full_then_start_after_freeing(small_fs, tmp_path, caplog, lease):
    """The same with kill -9: no close, so the seq_file's base is where the lease last moved on
    (with a small lease: during the outage, at a lost seq)."""
    d = small_fs / "spool"
    kw = options(tmp_path, lease)
    sp = Spool(d, AGENT, **kw)
    for i in range(10):
        sp.append(reading(i))
    delivered = drain_all(sp)
    sp.close()
    p = subprocess.Popen([sys.executable, "-c", CHILD, ROOT, str(small_fs), kw["seq_file"], str(lease)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        out = p.stdout.readline().split()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(10)
    n, first, last = (int(x) for x in out)
    assert last - first == 14, out
    os.unlink(os.path.join(str(small_fs), "filler"))
    restart_and_audit(d, kw, caplog, delivered, list(range(first, last + 1)), n)


def test_a_segment_dropped_for_room_keeps_its_account_across_a_stop(small_fs, tmp_path):
    d = small_fs / "spool"
    kw = options(tmp_path, LEASE)
    sp = Spool(d, AGENT, **kw)
    sp.append(reading(0))                   # a small oldest segment (one page), never uploaded
    for i in range(1, 4):                   # 5 kB records, one segment each
        sp.append(data_record(AGENT, T0 + i, "meter1", 1, {"p%d" % k: k * 1.5 for k in range(400)}))
    filler = fill(small_fs)
    sp.append(data_record(AGENT, T0 + 4, "meter1", 1, {"p%d" % k: k * 1.5 for k in range(400)}))
    assert sp.stats()["dropped"] == 1 and sp.stats()["write_lost"] == 1   # seq 1 dropped: no room for 5 kB
    (small_fs / "other").mkdir()
    other = fill(small_fs / "other")        # another writer on the partition takes the freed page
    sp.close()
    os.unlink(filler)
    os.unlink(other)
    sp = Spool(d, AGENT, **kw)
    sp.append(reading(5))
    delivered = drain_all(sp)
    audit_gaps(sp.next_seq, delivered)      # fails: seq 1 is gone with no gap record
    sp.close()


DROP_CHILD = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, sys.argv[1])
    from agent.record import data_record
    from agent.spool import Spool
    from tests.test_spool_failures import AGENT, T0, fill, reading
    mnt, seq_file, mode = sys.argv[2], sys.argv[3], sys.argv[4]
    sp = Spool(os.path.join(mnt, "spool"), AGENT, segment_bytes=4096, max_bytes=1 << 20, seq_file=seq_file)
    sp.append(reading(0))                   # a small oldest segment (one page), never uploaded
    for i in range(1, 4):                   # 5 kB records, one segment each
        sp.append(data_record(AGENT, T0 + i, "meter1", 1, {"p%d" % k: k * 1.5 for k in range(400)}))
    filler = fill(mnt)
    if mode == "big":                       # the retried 5 kB record does not fit in the freed page
        sp.append(data_record(AGENT, T0 + 4, "meter1", 1, {"p%d" % k: k * 1.5 for k in range(400)}))
    else:                                   # the retried reading fits: only the drop is pending
        sp.append(reading(4))
    st = sp.stats()
    if mode == "written":                   # room again: the gap record is written (not yet synced)
        os.unlink(filler)
        sp.append(reading(5))
    print(st["dropped"], st["write_lost"], sp.stats()["gaps"], flush=True)
    sys.stdin.read()        # killed here (no close): between the drop and the next append, or
                            # after the gap record but before ack.hint's account is cleared
""")


@pytest.mark.parametrize("mode, lost, gaps_before", [("big", 1, 0), ("small", 0, 0), ("written", 0, 1)])
def test_kill_9_after_a_segment_was_dropped_for_room(small_fs, tmp_path, caplog, mode, lost, gaps_before):
    """kill -9 right after a segment was dropped to make room (its gap record not written yet:
    ack.hint holds the account) or right after its gap record was written (ack.hint still holds
    the account: it must not be issued again): after the restart every seq is delivered or
    accounted for exactly once."""
    d = small_fs / "spool"
    kw = options(tmp_path, LEASE)
    p = subprocess.Popen([sys.executable, "-c", DROP_CHILD, ROOT, str(small_fs), kw["seq_file"], mode],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        out = p.stdout.readline().split()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(10)
    assert [int(x) for x in out] == [1, lost, gaps_before], out
    filler = small_fs / "filler"
    if filler.exists():
        filler.unlink()
    with caplog.at_level(logging.INFO, logger="agent.spool"):
        sp = Spool(d, AGENT, **kw)
    # ack.hint held the account in every mode; "written": the gap record found in the spool
    assert len(warnings(caplog, "of a segment dropped before the restart")) == (mode != "written")
    sp.append(reading(6))
    delivered = drain_all(sp)
    found = audit_gaps(sp.next_seq, delivered)
    assert sum(g["dropped"] for g in found) == 1 + lost and found[0]["first_seq"] == 1, found
    sp.close()
    sp = Spool(d, AGENT, **kw)          # and once more: nothing is issued again
    sp.append(reading(7))
    again = drain_all(sp)
    assert not gaps(again), gaps(again)
    sp.close()


STRESS_CHILD = textwrap.dedent("""
    import os, random, sys
    sys.path.insert(0, sys.argv[1])
    from agent.record import data_record
    from agent.spool import Spool
    from tests.test_spool_failures import AGENT, T0, fill
    mnt, seed = sys.argv[2], int(sys.argv[3])
    rnd = random.Random(seed)
    kw = dict(segment_bytes=4096, max_bytes=40000, fsync=rnd.choice(["interval", "always", "never"]))
    sp = Spool(os.path.join(mnt, "spool"), AGENT, **kw)
    print("up", flush=True)
    i = 0
    while True:             # until killed
        i += 1
        r = rnd.random()
        if r < 0.05:
            fill(mnt)
        elif r < 0.10 and os.path.exists(os.path.join(mnt, "filler")):
            os.unlink(os.path.join(mnt, "filler"))
        n = rnd.choice([1, 1, 1, 50, 400])
        sp.append(data_record(AGENT, T0 + i, "m", 1, {"p%d" % k: k for k in range(n)}))
        if rnd.random() < 0.2:
            sp.tick()
        if rnd.random() < 0.02:
            sp.close()
            sp = Spool(os.path.join(mnt, "spool"), AGENT, **kw)
""")


KILLED_BEFORE_UNLINK = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, sys.argv[1])
    from agent.record import data_record
    from agent.spool import Spool
    from tests.test_spool_failures import AGENT, T0, fill
    mnt = sys.argv[2]
    unlink = Spool._unlink
    def killed_there(self, path):
        # A dropped segment about to go while its account is only in ack.hint (no gap record yet:
        # the disk is full): the moment a kill -9 hits here.
        if os.path.basename(path).startswith("seg-") and self._dropped:
            os.kill(os.getpid(), signal.SIGKILL)
        unlink(self, path)
    Spool._unlink = killed_there
    sp = Spool(os.path.join(mnt, "spool"), AGENT, segment_bytes=4096, max_bytes=1 << 20)
    for i in range(12):
        sp.append(data_record(AGENT, T0 + i, "m", 1, {"p%d" % k: k for k in range(50)}))
    fill(mnt)
    for i in range(12, 200):
        sp.append(data_record(AGENT, T0 + i, "m", 1, {"p%d" % k: k for k in range(50)}))
    print("never killed", flush=True)
""")


def test_a_kill_between_a_dropped_segments_account_and_its_unlink_does_not_count_it_twice(small_fs):
    """Regression (found by the random-kill stress test below): on a full disk a segment dropped
    for room has its account put in ack.hint, then it is unlinked; cursor.json cannot be
    rewritten there, so the cursor still points into it. A kill -9 between the two used to leave
    the segment on disk: the next start handed out its records AND issued the account of their
    loss (a gap record for seqs that were delivered). The start now finishes the drop."""
    r = subprocess.run([sys.executable, "-c", KILLED_BEFORE_UNLINK, ROOT, str(small_fs)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stdout, r.stderr[-2000:])
    (small_fs / "filler").unlink()
    sp = Spool(small_fs / "spool", AGENT, segment_bytes=4096, max_bytes=1 << 20)
    delivered = drain_all(sp)
    gaps = audit_gaps(sp.next_seq, delivered)       # fails: a gap record for delivered seqs
    assert gaps and sum(g["dropped"] for g in gaps) >= 1
    sp.close()


def test_a_dropped_segments_account_is_synced_before_its_unlink(small_fs, monkeypatch):
    """Regression (review of cdd6a33): the account of a dropped segment now goes into ack.hint in
    the drop itself, unsynced in interval mode; _reap synced it before the unlink only when the
    account was still unsaved or segment bytes were pending. A segment dropped by max_age on a
    full disk right after the interval's fsync went while its account was only in the page
    cache: a power cut there lost both."""
    seen = []
    unlink = Spool._unlink

    def watched(self, path):
        if path in self._doomed and self._dropped:     # a dropped segment, its account pending
            seen.append(self._pend_dirty)       # the account in ack.hint not yet synced?
        unlink(self, path)

    monkeypatch.setattr(Spool, "_unlink", watched)
    later = [0.0]
    sp = Spool(small_fs / "spool", AGENT, segment_bytes=4096, max_bytes=1 << 20, max_age=3600,
               fsync="interval", fsync_interval=0.0, clock=lambda: time.time() + later[0],
               monotonic=lambda: time.monotonic() + later[0])
    for i in range(12):
        sp.append(data_record(AGENT, T0 + i, "m", 1, {"p%d" % k: k for k in range(50)}))
    fill(small_fs)                              # no room for the gap record
    later[0] = 7200.0                           # the old segments are past max_age now
    sp.tick()                                   # the interval's fsync, then the age bound drops
    sp.close()
    assert seen and not any(seen), seen         # fails: the account was unsynced at the unlink


# Once a non-strict xfail (one run in a few dozen lost or doubled a few seqs' account): fixed by
# the two kill moments above and the gap-record marks (agent/spool/loss.py _fix_marks); 120
# stress trials of six kills each then found no account lost or doubled.
@pytest.mark.parametrize("trial", range(40 if os.environ.get("FULL") == "1" else 3))
def test_kill_9_at_random_times_while_the_disk_fills_and_frees(small_fs, trial):
    """A writer that fills and frees its disk (segments dropped for room, failed writes) is
    SIGKILLed at random times, six times; after each, everything is read back. In the end every
    seq is delivered or accounted for exactly once: no account lost with a dropped segment, none
    issued twice, no seq that nothing explains (next_seq moved on by a drop's cursor write)."""
    import random
    import time
    rnd = random.Random(trial)
    d = small_fs / "spool"
    delivered = []
    for k in range(6):
        p = subprocess.Popen([sys.executable, "-c", STRESS_CHILD, ROOT, str(small_fs), str(trial * 10 + k)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            p.stdout.readline()
            time.sleep(rnd.uniform(0.01, 0.3))
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait(10)
        filler = small_fs / "filler"
        if filler.exists():
            filler.unlink()
        sp = Spool(d, AGENT, segment_bytes=4096, max_bytes=40000)
        delivered += drain_all(sp)
        sp.close()
    sp = Spool(d, AGENT, segment_bytes=4096, max_bytes=40000)
    delivered += drain_all(sp)
    audit_gaps(sp.next_seq, delivered)
    sp.close()
