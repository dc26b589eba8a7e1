"""Issue 10, "Spool: every failure accounted for", against real filesystems: an immutable spool
directory (EPERM: chattr +i), a spool directory deleted while the agent runs (ENOENT), a 64 kB
tmpfs that fills up (ENOSPC) with restarts and a kill -9 during the outage, and bytes corrupted in
the middle of a segment, uploaded to the real collector on 127.0.0.1.

What each test checks: every reading is delivered once or counted by a gap record, the gap
records add up EXACTLY to what is missing (one gap record per outage), the log says it once per
outage and once when writing works again, and the collector can tell corruption (reason
"corrupt") from loss."""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from contextlib import contextmanager

import pytest

from agent.record import data_record
from agent.spool import ACK_HINT, CURSOR, LOCK, Spool, SpoolError
from tests.test_spool import OUTPUTS, audit_gaps, drain_all, drain_outputs, not_for
from tests.test_spool_seq import collector, upload  # noqa: F401 (collector: a fixture)

AGENT = "site7"
T0 = 1_795_000_000.0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reading(i):
    return data_record(AGENT, T0 + i, "meter1", 1, {"i": i})


def readings_lost(delivered, n):
    """Readings 0..n-1 that were not delivered."""
    got = {r["values"]["i"] for r in delivered if r.get("kind") != "gap"}
    return sorted(set(range(n)) - got)


def gaps(delivered):
    return [r for r in delivered if r.get("kind") == "gap"]


def errors(caplog, text=None):
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.ERROR and (text is None or text in r.getMessage())]


def messages(caplog, text):
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


@contextmanager
def immutable(path):
    r = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip("cannot make %s immutable here (chattr +i needs root and ext4/tmpfs): %s"
                    % (path, r.stderr.strip()))
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)


@pytest.fixture
def small_fs(tmp_path):
    """A 64 kB tmpfs (a router's small spool partition); skips without mount rights."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root/CAP_SYS_ADMIN): %s" % r.stderr.strip())
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(mnt):
    """Fill the filesystem up to the last byte; -> the filler's path."""
    path = os.path.join(str(mnt), "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"x" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return path


# ---------------------------------------------------------------- EPERM: an immutable directory

def test_immutable_directory_loses_only_what_one_gap_record_accounts_for(tmp_path, caplog):
    d = tmp_path / "spool"
    sp = Spool(d, AGENT, segment_bytes=4096, max_bytes=1 << 20)
    delivered = []
    for i in range(10):
        sp.append(reading(i))
    delivered += drain_all(sp)
    with immutable(d):
        # The open segment still takes lines; the next one cannot be created (EPERM), nor can
        # cursor.json be replaced. Nothing raises, polling goes on.
        for i in range(10, 60):
            sp.append(reading(i))
            sp.tick()
            delivered += drain_all(sp)
    for i in range(60, 70):
        sp.append(reading(i))
        sp.tick()
    delivered += drain_all(sp)
    lost = readings_lost(delivered, 70)
    g = gaps(delivered)
    assert lost and len(g) == 1, g
    assert g[0]["dropped"] == len(lost) == sp.stats().get("write_lost")
    assert "Operation not permitted" in g[0]["reason"]
    audit_gaps(sp.next_seq, delivered)
    # Once when it starts, once when it works again; the cursor's own trouble once.
    assert len(errors(caplog, "records are lost while this lasts")) == 1
    assert len(messages(caplog, "writing works again after")) == 1
    assert len(errors(caplog)) <= 3, errors(caplog)
    sp.close()


def test_immutable_segment_file(tmp_path, caplog):
    """EPERM on the write itself (the active segment made immutable): the next line goes to a
    new segment, so one reading is lost, and one gap record says so."""
    d = tmp_path / "spool"
    sp = Spool(d, AGENT, segment_bytes=1 << 20)
    for i in range(5):
        sp.append(reading(i))
    seg = d / sorted(n for n in os.listdir(d) if n.startswith("seg-"))[-1]
    with immutable(seg):
        for i in range(5, 15):
            sp.append(reading(i))
    for i in range(15, 20):
        sp.append(reading(i))
    delivered = drain_all(sp)
    g = gaps(delivered)
    assert len(g) == 1 and g[0]["dropped"] == len(readings_lost(delivered, 20)) == 1
    assert "Operation not permitted" in g[0]["reason"]
    audit_gaps(sp.next_seq, delivered)
    assert len(errors(caplog, "records are lost while this lasts")) == 1
    sp.close()


def test_loop_append_logs_once_per_outage(tmp_path, caplog):
    """Loop.append through a real spool in an immutable directory: polling goes on, one ERROR
    line for the outage (not one per reading), one line when it works again."""
    from agent.config import load_config
    from agent.loop import Loop

    ini = tmp_path / "agent.ini"
    ini.write_text(textwrap.dedent("""
        [agent]
        id = %s
        spool_dir = %s/spool
        spool_segment_kb = 4
        status_file = %s/status.json

        [connection:c]
        type = tcp
        host = 127.0.0.1
        port = 1

        [device:meter1]
        connection = c
        unit = 1

        [points:meter1]
        i = holding 0 uint16
    """ % (AGENT, tmp_path, tmp_path)))
    loop = Loop(load_config(str(ini)))
    try:
        d = tmp_path / "spool"
        with immutable(d):
            for i in range(40):
                loop.append(reading(i))
                loop._tick()
        for i in range(40, 45):
            loop.append(reading(i))
        delivered = drain_all(loop.spool)
    finally:
        loop.shutdown()
    lost = readings_lost(delivered, 45)
    assert lost and [g["dropped"] for g in gaps(delivered)] == [len(lost)]
    errs = errors(caplog)
    assert len([e for e in errs if "lost" in e]) == 1, errs
    assert len(errs) <= 3, errs
    assert len(messages(caplog, "works again after")) == 1


# ---------------------------------------------------------------- ENOENT: the directory deleted

def test_deleted_spool_directory_is_recreated(tmp_path, caplog):
    d = tmp_path / "spool"
    sp = Spool(d, AGENT, segment_bytes=4096, max_bytes=1 << 20)
    for i in range(30):
        sp.append(reading(i))
    delivered = []
    b = sp.peek(10, 1 << 20)
    delivered += [json.loads(x) for x in b.lines]
    sp.ack(b)
    shutil.rmtree(d)                       # 20 un-uploaded records go with it
    for i in range(30, 60):                # the first few go to the unlinked file, the tick notices
        sp.append(reading(i))
        if i % 5 == 0:
            sp.tick()
    assert d.is_dir() and (d / CURSOR).exists() and (d / LOCK).exists() and (d / ACK_HINT).exists()
    assert len(errors(caplog, "deleted or replaced from outside")) == 1
    # The lock is held again: a second agent on the recreated directory is refused.
    with pytest.raises(SpoolError, match="in use"):
        Spool(d, AGENT)
    # The seq floor is on disk again: cursor.json carries the next seq.
    assert json.loads((d / CURSOR).read_bytes())["next_seq"] > 30
    delivered += drain_all(sp)
    nxt = sp.next_seq
    sp.close()
    g = gaps(delivered)
    lost = readings_lost(delivered, 60)
    assert lost and sum(x["dropped"] for x in g) == len(lost)
    assert {x["reason"] for x in g} <= {"spool directory deleted from outside the agent",
                                        "segment file deleted from outside the agent"}
    audit_gaps(nxt, delivered)
    sp = Spool(d, AGENT)                   # and the next start goes on beyond every seq
    assert sp.append(reading(99)) == nxt
    sp.close()


# ---------------------------------------------------------------- ENOSPC: a 64 kB tmpfs

def test_disk_full_tmpfs_one_exact_gap_record_and_two_log_lines(small_fs, caplog):
    sp = Spool(small_fs / "spool", AGENT, segment_bytes=4096, max_bytes=1 << 20)
    delivered = []
    for i in range(20):
        sp.append(reading(i))
    delivered += drain_all(sp)
    filler = fill(small_fs)
    for i in range(20, 60):                  # the collector is reachable: everything is uploaded
        sp.append(reading(i))
        sp.tick()
        delivered += drain_all(sp)
        sp.tick()
    os.unlink(filler)
    for i in range(60, 80):
        sp.append(reading(i))
        sp.tick()
        delivered += drain_all(sp)
    lost = readings_lost(delivered, 80)
    g = gaps(delivered)
    assert len(g) == 1, [(x["dropped"], x["first_seq"], x["last_seq"]) for x in g]
    assert len(lost) >= 20 and g[0]["dropped"] == len(lost) == sp.stats().get("write_lost")
    assert "No space left on device" in g[0]["reason"]
    audit_gaps(sp.next_seq, delivered)
    assert len(errors(caplog, "records are lost while this lasts")) == 1
    assert len(messages(caplog, "writing works again after")) == 1
    assert len(errors(caplog)) <= 3, errors(caplog)     # + cursor.json, once
    sp.close()


def test_restart_while_the_disk_is_full_keeps_the_pending_gap(small_fs):
    d = small_fs / "spool"
    sp = Spool(d, AGENT, segment_bytes=4096, max_bytes=1 << 20)
    for i in range(10):
        sp.append(reading(i))
    delivered = drain_all(sp)
    filler = fill(small_fs)
    n = 10
    for _run in range(3):                    # lost readings, a clean stop, a start: still full
        for _ in range(15):
            sp.append(reading(n))
            n += 1
        sp.close()
        sp = Spool(d, AGENT, segment_bytes=4096, max_bytes=1 << 20)
    os.unlink(filler)
    for _ in range(5):
        sp.append(reading(n))
        n += 1
    delivered += drain_all(sp)
    lost = readings_lost(delivered, n)
    g = gaps(delivered)
    assert len(lost) >= 30 and [x["dropped"] for x in g] == [len(lost)], g
    audit_gaps(sp.next_seq, delivered)
    sp.close()


CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from agent.record import data_record
    from agent.spool import Spool
    sp = Spool(sys.argv[2], "site7", segment_bytes=4096, max_bytes=1 << 20)
    for i in range(int(sys.argv[3])):
        sp.append(data_record("site7", 1795000000.0 + i, "meter1", 1, {"i": 1000 + i}))
        if i % 5 == 0:
            sp.tick()
    print(sp.stats().get("write_lost"), flush=True)
    sys.stdin.read()        # killed here, never closed
""")


def test_kill_9_during_the_outage_keeps_the_account(small_fs):
    """The loss account is rewritten in place in ack.hint (page cache): a killed agent's
    account survives."""
    d = small_fs / "spool"
    sp = Spool(d, AGENT, segment_bytes=4096, max_bytes=1 << 20)
    for i in range(10):
        sp.append(reading(i))
    delivered = drain_all(sp)
    sp.close()
    filler = fill(small_fs)
    p = subprocess.Popen([sys.executable, "-c", CHILD, ROOT, str(d), "25"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        lost_in_child = p.stdout.readline().strip()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(10)
    assert lost_in_child in ("25", "None")     # (None: the code before the fix)
    os.unlink(filler)
    sp = Spool(d, AGENT, segment_bytes=4096, max_bytes=1 << 20)
    sp.append(reading(10))
    delivered += drain_all(sp)
    g = gaps(delivered)
    assert [x["dropped"] for x in g] == [25], g
    assert [r["values"]["i"] for r in delivered if r.get("kind") != "gap"] == list(range(11))
    audit_gaps(sp.next_seq, delivered)
    sp.close()
    # ... and once written, the account is not issued again by the next start.
    sp = Spool(d, AGENT)
    assert gaps(drain_all(sp)) == []
    sp.close()


def test_killed_after_the_gap_record_before_the_account_is_cleared(small_fs):
    """fsync=interval clears the on-disk account only once its gap record is synced; a kill in
    between must not issue the account a second time (the gap record, a line after the lost
    seqs, is found at the next start)."""
    d = small_fs / "spool"
    kw = dict(segment_bytes=4096, max_bytes=1 << 20, fsync="interval", fsync_interval=3600)
    sp = Spool(d, AGENT, **kw)
    for i in range(10):
        sp.append(reading(i))
    delivered = drain_all(sp)
    filler = fill(small_fs)
    for i in range(10, 70):                 # the active segment's last page fills, then rotation
        sp.append(reading(i))
    os.unlink(filler)
    sp.append(reading(70))                  # the gap record, then the reading; no fsync yet
    assert b'"dropped"' in (d / ACK_HINT).read_bytes()      # the account is still on disk
    os.close(sp._lockfd)                    # "killed": no close()
    os.close(sp._dirfd)
    sp = Spool(d, AGENT, **kw)
    delivered += drain_all(sp)
    g = gaps(delivered)
    assert len(g) == 1 and g[0]["dropped"] == len(readings_lost(delivered, 71)) >= 10
    audit_gaps(sp.next_seq, delivered)
    sp.close()


# ---------------------------------------------------------------- corrupt bytes mid-segment

def stored(app):
    return [json.loads(r[7]) for r in app.store.records(agent=AGENT)]


def test_corrupt_bytes_mid_segment_are_a_corrupt_gap_at_the_collector(tmp_path, collector):  # noqa: F811
    d = tmp_path / "spool"
    sp = Spool(d, AGENT, segment_bytes=4096)
    for i in range(120):
        sp.append(reading(i))
    nxt = sp.next_seq
    sp.close()
    segs = sorted(n for n in os.listdir(d) if n.startswith("seg-"))
    assert len(segs) >= 2
    seg = d / segs[0]
    data = bytearray(seg.read_bytes())
    # Zero ~700 bytes in the middle: several records and the newlines between them gone (one
    # unreadable line holding parts of several records), and a few garbage bytes elsewhere.
    mid = len(data) // 2
    data[mid:mid + 700] = b"\x00" * 700
    data[200:204] = b"\xff\xfe{]"
    seg.write_bytes(bytes(data))
    sp = Spool(d, AGENT, segment_bytes=4096)
    upload(collector.url, sp)
    sp.close()
    recs = stored(collector)
    seqs = {r["seq"] for r in recs}
    g = [r for r in recs if r.get("kind") == "gap"]
    missing = set(range(1, max(seqs) + 1)) - seqs
    assert missing and g and all(x["reason"] == "corrupt" for x in g)
    # The collector's holes are exactly what the corrupt gap records account for.
    assert sum(x["dropped"] for x in g) == len(missing)
    covered = {s for x in g for s in range(x["first_seq"], x["last_seq"] + 1)}
    assert missing <= covered
    assert max(seqs) >= nxt


@OUTPUTS
def test_corrupt_run_across_a_batch_boundary_is_counted_once(tmp_path, outputs):
    d = tmp_path / "spool"
    sp = Spool(d, AGENT, outputs=outputs)
    for i in range(40):
        sp.append(reading(i))
    sp.close()
    seg = d / sorted(n for n in os.listdir(d) if n.startswith("seg-"))[0]
    lines = seg.read_bytes().split(b"\n")
    for k in range(10, 22):                 # seqs 11..22 unreadable, each line on its own
        lines[k] = b"#" * len(lines[k])
    seg.write_bytes(b"\n".join(lines))
    sp = Spool(d, AGENT, outputs=outputs)
    views = drain_outputs(sp, n=7)          # batches end inside the run
    for o, delivered in views.items():
        g = gaps(delivered)
        assert sum(x["dropped"] for x in g) == 12 and {x["reason"] for x in g} == {"corrupt"}
        audit_gaps(sp.next_seq, delivered, skip=not_for(o, views))
    assert sp.stats()["corrupt_lost"] == 12
    sp.close()
