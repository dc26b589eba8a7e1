"""Seqs are never reused, even when the spool loses its state, and segment ages survive clock steps.

The collector keeps (agent, seq) once: a spool that starts again at seq 1 (spool_dir on tmpfs
after a reboot, a new spool_dir) has every new reading silently dropped as a duplicate. Real
collector (agent.collector on 127.0.0.1, SQLite), real spool directories, real seq files.
"""
import json
import logging
import os
import shutil
import threading
import urllib.request

import pytest

from agent.config import load_config
from agent.loop import open_spool
from agent.record import CLOCK_SANE, data_record
from agent.spool import Spool
from agent.spool import lease as seqlease

AGENT = "site7"
BOOT_CLOCK = 1_780_000_000.0      # sysfixtime: an unset clock, the same at every boot (< CLOCK_SANE)


@pytest.fixture
def collector(tmp_path):
    from agent.collector import make_app
    from agent.collector.cli import make_server

    app = make_app(None, db="sqlite:///" + str(tmp_path / "collector.db"))
    server = make_server("127.0.0.1", 0, app)
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    app.url = "http://127.0.0.1:%d/api/v1/batches" % server.server_address[1]
    yield app
    server.shutdown()
    server.server_close()


def upload(url, sp, agent=AGENT):
    """POST every spooled record as the uploader would (the spool lines joined, no
    re-encoding); -> totals of the collector's answers."""
    totals = {"stored": 0, "duplicates": 0}
    while True:
        b = sp.peek(500, 1 << 20)
        if b is None:
            return totals
        body = b'{"agent":' + json.dumps(agent).encode() + b',"records":[' + b",".join(b.lines) + b"]}"
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            ans = json.loads(r.read())
        totals["stored"] += ans["stored"]
        totals["duplicates"] += ans["duplicates"]
        sp.ack(b)


def values_stored(app, agent=AGENT):
    return [json.loads(r[7])["values"]["v"] for r in app.store.records(agent=agent)]


def reading(t, v):
    return data_record(AGENT, t, "meter1", 1, {"v": v})


def write_ini(tmp_path, spool_dir, extra=""):
    ini = tmp_path / "etc" / "agent.ini"
    ini.parent.mkdir(exist_ok=True)
    ini.write_text("[agent]\nid = %s\nspool_dir = %s\nstatus_file = %s\n%s" % (
        AGENT, spool_dir, tmp_path / "status.json", extra))
    return load_config(str(ini))


def wipe(d):
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))


# --- a spool that lost its state (r1, r1b) --------------------------------------------------


def test_agent_spool_lost_at_reboot_keeps_new_readings(tmp_path, collector):
    """r1: the agent's spool (open_spool, as `run` opens it) in RAM: after a reboot it is empty
    again. The readings of the new life must be stored, not dropped as duplicates."""
    cfg = write_ini(tmp_path, tmp_path / "var" / "spool")
    sp = open_spool(cfg)
    for i in range(100):
        sp.append(reading(CLOCK_SANE + 100 + i, 1.0))
    assert upload(collector.url, sp) == {"stored": 100, "duplicates": 0}
    sp.close()
    wipe(cfg.agent.spool_dir)                       # reboot: /var is tmpfs
    sp = open_spool(cfg)
    for i in range(10):
        sp.append(reading(CLOCK_SANE + 200 + i, 2.0))
    assert upload(collector.url, sp) == {"stored": 10, "duplicates": 0}
    sp.close()
    assert values_stored(collector).count(2.0) == 10


def test_default_seq_file_is_next_to_the_config(tmp_path):
    cfg = write_ini(tmp_path, tmp_path / "spool")
    assert cfg.agent.seq_file == str(tmp_path / "etc" / (AGENT + ".seq"))
    cfg = write_ini(tmp_path, tmp_path / "spool", "seq_file = %s\n" % (tmp_path / "lib" / "x.seq"))
    assert cfg.agent.seq_file == str(tmp_path / "lib" / "x.seq")
    sp = open_spool(cfg)
    seq = sp.append(reading(CLOCK_SANE, 1.0))
    sp.close()
    lease, base = seqlease.read(cfg.agent.seq_file)
    assert base == seq + 1 < lease                  # a clean close records the exact next seq


def test_unset_clock_every_boot_no_collision(tmp_path, collector):
    """r1b: no RTC, no NTP: every boot starts from the same clock. The clock is then no floor;
    the seq lease on flash is. The first life runs through several lease blocks."""
    seq_file = tmp_path / "etc" / "site7.seq"

    def life(n, v):
        d = tmp_path / ("life%s" % v)               # an empty spool every boot
        sp = Spool(d, AGENT, fresh_seq=lambda: int((BOOT_CLOCK + 3) * 1000), seq_file=seq_file,
                   seq_lease=64, clock=lambda: BOOT_CLOCK)
        seqs = [sp.append(reading(BOOT_CLOCK + i, v)) for i in range(n)]
        got = upload(collector.url, sp)
        sp.close()
        return seqs, got

    first, got = life(300, 1.0)
    assert got == {"stored": 300, "duplicates": 0}
    second, got = life(100, 2.0)
    assert got == {"stored": 100, "duplicates": 0}
    assert min(second) > max(first)
    assert values_stored(collector).count(2.0) == 100


def test_lease_moves_ahead_of_the_seqs_once_per_block(tmp_path):
    seq_file = tmp_path / "x.seq"
    sp = Spool(tmp_path / "spool", AGENT, seq_file=seq_file, seq_lease=100)
    # written when the fresh spool opens; base: the seq about to be handed out
    assert seqlease.read(seq_file) == (101, 1)
    writes = [os.stat(seq_file).st_ino]
    for i in range(1, 251):
        seq = sp.append(reading(CLOCK_SANE, i))
        lease, base = seqlease.read(seq_file)
        assert base <= seq < lease <= seq + 100     # always ahead, never far ahead
        if os.stat(seq_file).st_ino != writes[-1]:
            writes.append(os.stat(seq_file).st_ino)
    assert seqlease.read(seq_file) == (301, 201)    # moved at seq 101 and 201 only
    assert len(writes) == 3
    sp.close()
    assert seqlease.read(seq_file) == (301, 251)    # a clean close: the exact next seq
    # a restart with state inside the lease: seqs go on without a jump, the lease stays (the
    # file is written once, with the new run's generation)
    sp = Spool(tmp_path / "spool", AGENT, seq_file=seq_file, seq_lease=100)
    assert seqlease.read(seq_file) == (301, 251)
    assert sp.append(reading(CLOCK_SANE, 0)) == 251
    sp.close()
    assert seqlease.read(seq_file) == (301, 252)


def test_lost_state_starts_at_the_lease_even_with_a_later_clock_start(tmp_path):
    seq_file = tmp_path / "x.seq"
    sp = Spool(tmp_path / "a", AGENT, seq_file=seq_file, fresh_seq=lambda: 5000, seq_lease=1000)
    assert sp.append(reading(CLOCK_SANE, 0)) == 5000
    sp.close()
    sp = Spool(tmp_path / "b", AGENT, seq_file=seq_file, fresh_seq=lambda: 10)
    assert sp.append(reading(CLOCK_SANE, 0)) == 6000 and sp.stats()["origin_seq"] == 6000
    sp.close()
    sp = Spool(tmp_path / "c", AGENT, seq_file=seq_file, fresh_seq=lambda: 10 ** 9)
    assert sp.append(reading(CLOCK_SANE, 0)) == 10 ** 9      # the clock is ahead: it wins
    sp.close()


def test_an_older_copy_of_the_spool_continues_beyond_the_lease(tmp_path):
    """spool_dir switched from A to B and back (or a restored backup): A's state ends below
    seqs that B handed out; going on from A's floor would reuse them."""
    seq_file = tmp_path / "x.seq"
    a = Spool(tmp_path / "a", AGENT, seq_file=seq_file, seq_lease=50)
    a_seqs = [a.append(reading(CLOCK_SANE, i)) for i in range(20)]
    a.close()
    b = Spool(tmp_path / "b", AGENT, seq_file=seq_file, seq_lease=50)
    b_seqs = [b.append(reading(CLOCK_SANE, i)) for i in range(120)]
    b.close()
    assert min(b_seqs) > max(a_seqs)
    a = Spool(tmp_path / "a", AGENT, seq_file=seq_file, seq_lease=50)
    assert a.append(reading(CLOCK_SANE, 0)) > max(b_seqs)
    a.close()


def run_spool(d, seq_file, n, lease=10, v=0):
    """Open the spool in `d`, hand out n seqs, close it cleanly: -> the seqs."""
    sp = Spool(d, AGENT, seq_file=seq_file, seq_lease=lease, fsync="always")
    seqs = [sp.append(reading(CLOCK_SANE, v)) for _ in range(n)]
    sp.close()
    return seqs


def test_spool_dir_a_b_a_at_a_block_boundary_reuses_no_seq(tmp_path):
    """A ends exactly at the end of its lease block, B continues there, A comes back: A's
    floor is B's first seq (not below the seq_file's base), yet B handed it out."""
    seq_file = tmp_path / "x.seq"
    a = run_spool(tmp_path / "a", seq_file, 10)
    b = run_spool(tmp_path / "b", seq_file, 5)
    assert min(b) > max(a)
    a2 = run_spool(tmp_path / "a", seq_file, 3)
    assert min(a2) > max(b)
    b2 = run_spool(tmp_path / "b", seq_file, 3)         # and back to B, the same
    assert min(b2) > max(a2)


def test_a_restored_backup_from_inside_the_lease_block_reuses_no_seq(tmp_path):
    seq_file = tmp_path / "x.seq"
    a = run_spool(tmp_path / "a", seq_file, 13)           # lease block moved at seq 11
    shutil.copytree(str(tmp_path / "a"), str(tmp_path / "backup"))
    a += run_spool(tmp_path / "a", seq_file, 5)          # 14..18, same block
    shutil.rmtree(str(tmp_path / "a"))
    shutil.copytree(str(tmp_path / "backup"), str(tmp_path / "a"))
    r = run_spool(tmp_path / "a", seq_file, 3)
    assert min(r) > max(a)


def test_a_copy_taken_while_the_spool_ran_reuses_no_seq(tmp_path):
    """Same run (same generation): the clean close recorded the exact next seq."""
    seq_file = tmp_path / "x.seq"
    sp = Spool(tmp_path / "a", AGENT, seq_file=seq_file, seq_lease=1000, fsync="always")
    seqs = [sp.append(reading(CLOCK_SANE, i)) for i in range(5)]
    shutil.copytree(str(tmp_path / "a"), str(tmp_path / "copy"))
    seqs += [sp.append(reading(CLOCK_SANE, i)) for i in range(5)]
    sp.close()
    assert run_spool(tmp_path / "copy", seq_file, 1)[0] > max(seqs)


def test_restarts_of_the_same_spool_skip_no_seq(tmp_path):
    """The normal case: the spool that wrote the seq_file last goes on from its own floor,
    whether it was closed or not, across lease blocks."""
    seq_file = tmp_path / "x.seq"
    seqs = []
    for _ in range(4):
        seqs += run_spool(tmp_path / "a", seq_file, 7, lease=5)
    assert seqs == list(range(1, 29))
    # stopped without a close (kill): the seq_file still has this run's generation
    sp = Spool(tmp_path / "a", AGENT, seq_file=seq_file, seq_lease=5, fsync="always")
    seqs += [sp.append(reading(CLOCK_SANE, 0)) for _ in range(3)]
    shutil.copytree(str(tmp_path / "a"), str(tmp_path / "after-kill"))    # the state a kill leaves
    sp.close()
    assert run_spool(tmp_path / "after-kill", seq_file, 2) == [32, 33]


def test_a_crash_between_the_cursor_and_the_seq_file_at_open_skips_no_seq(tmp_path):
    """An open writes its new generation to cursor.json, then to the seq_file; killed in
    between, the cursor's gen_prev still matches the seq_file: no jump."""
    seq_file = tmp_path / "x.seq"
    assert run_spool(tmp_path / "a", seq_file, 4) == [1, 2, 3, 4]
    before = seq_file.read_bytes()
    sp = Spool(tmp_path / "a", AGENT, seq_file=seq_file, seq_lease=10, fsync="always")
    shutil.copytree(str(tmp_path / "a"), str(tmp_path / "crashed"))
    seq_file.write_bytes(before)                          # the seq_file write never happened
    sp.close()
    assert json.loads((tmp_path / "crashed" / "cursor.json").read_bytes())["gen_prev"] == \
        seqlease.load(seq_file)["gen"]
    assert run_spool(tmp_path / "crashed", seq_file, 2) == [5, 6]


def test_sighup_spool_dir_a_b_a_reuses_no_seq(tmp_path):
    """The loop's reload: the old spool's close must not put back a seq_file the new spool
    has moved on (lease or generation)."""
    from agent.loop import Loop

    spools = {k: tmp_path / k for k in "ab"}
    seq_file = tmp_path / "etc" / (AGENT + ".seq")
    loop = Loop(write_ini(tmp_path, spools["a"]), uploader=None)
    seqs = []
    try:
        for k in "abab":
            if str(loop.spool.directory) != str(spools[k]):
                write_ini(tmp_path, spools[k])
                loop.reload()
                assert loop.spool.directory == str(spools[k])
            got = [loop.spool.append(reading(CLOCK_SANE, i)) for i in range(5)]
            assert min(got) > max(seqs or [0])
            assert seqlease.load(seq_file)["lease"] > max(got)
            seqs += got
    finally:
        loop.shutdown()
    assert seqlease.load(seq_file)["lease"] > max(seqs)


def test_unwritable_seq_file_warns_once_and_the_agent_goes_on(tmp_path, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    seq_file = blocker / "site7.seq"                 # its parent is a file: never writable
    with caplog.at_level(logging.WARNING, logger="agent.spool"):
        sp = Spool(tmp_path / "spool", AGENT, seq_file=seq_file, seq_lease=10,
                   fresh_seq=lambda: 1_800_000_000_000)
        seqs = [sp.append(reading(CLOCK_SANE, i)) for i in range(100)]
        sp.close()
    assert seqs == list(range(1_800_000_000_000, 1_800_000_000_100))   # the clock floor
    warned = [r.getMessage() for r in caplog.records if "[agent] seq_file" in r.getMessage()]
    assert len(warned) == 1 and str(seq_file) in warned[0], warned


def test_corrupt_seq_file_is_not_fatal(tmp_path, caplog):
    seq_file = tmp_path / "x.seq"
    seq_file.write_bytes(b"\x00garbage")
    with caplog.at_level(logging.WARNING, logger="agent.spool"):
        sp = Spool(tmp_path / "spool", AGENT, seq_file=seq_file, fresh_seq=lambda: 777)
    assert sp.append(reading(CLOCK_SANE, 0)) == 777
    sp.close()
    assert any("[agent] seq_file" in r.getMessage() for r in caplog.records)
    assert seqlease.read(seq_file)[0] > 777          # rewritten


# --- clock steps (r10) -----------------------------------------------------------------------


class Clocks:
    """Wall clock and monotonic clock, moved separately (a step) or together (time passing)."""

    def __init__(self, wall):
        self.wall = wall
        self.mono = 1000.0

    def elapse(self, s):
        self.wall += s
        self.mono += s


def test_ntp_step_does_not_age_out_the_offline_backlog(tmp_path):
    """r10: records spooled offline with the clock unset; NTP steps the clock months forward
    when the link comes back. Segment ages are elapsed time: nothing is dropped."""
    c = Clocks(BOOT_CLOCK)
    sp = Spool(tmp_path, AGENT, clock=lambda: c.wall, monotonic=lambda: c.mono,
               segment_bytes=64 << 10, max_age=7 * 86400)
    for i in range(3000):
        c.elapse(10)
        sp.append(reading(c.wall, i))
        if i % 100 == 0:
            sp.tick(c.wall)
    assert sp.stats()["segments"] > 3
    c.wall += 180 * 86400                            # NTP: the clock jumps, no time passes
    c.mono += 0.5
    sp.tick(c.wall)
    st = sp.stats()
    assert st["dropped"] == 0 and st["records"] == 3000
    # ageing goes on in elapsed time: 7 days after a segment's last record, it goes (here: the
    # segments of the first half of the offline period)
    c.elapse(7 * 86400 - 3000 * 10 // 2)
    sp.tick(c.wall)
    st = sp.stats()
    assert 0 < st["dropped"] < 3000 and st["gaps"] == 1
    sp.close()


def test_clock_step_backwards_does_not_keep_segments_forever(tmp_path):
    c = Clocks(CLOCK_SANE + 365 * 86400)            # a clock a year ahead...
    sp = Spool(tmp_path, AGENT, clock=lambda: c.wall, monotonic=lambda: c.mono,
               segment_bytes=4096, max_age=3600)
    for i in range(100):
        sp.append(reading(c.wall, i))
    c.wall -= 365 * 86400                            # ...set right
    sp.tick(c.wall)
    assert sp.stats()["dropped"] == 0
    c.elapse(3601)
    sp.tick(c.wall)
    assert sp.stats()["dropped"] > 0                 # an hour later they are an hour old
    sp.close()


def test_small_clock_changes_are_followed(tmp_path):
    """Drift and slewing (a few seconds) are not steps: ages are left as measured."""
    c = Clocks(CLOCK_SANE)
    sp = Spool(tmp_path, AGENT, clock=lambda: c.wall, monotonic=lambda: c.mono,
               segment_bytes=4096, max_age=3600)
    for i in range(100):
        sp.append(reading(c.wall, i))
    c.wall += 30
    c.elapse(3575)
    sp.tick(c.wall)                                  # 3575 s elapsed + 30 s slew > max_age
    assert sp.stats()["dropped"] > 0
    sp.close()


def test_ntp_step_then_restart_keeps_the_offline_backlog(tmp_path):
    """An offline boot at sysfixtime (sane, so no start-up rescue, but 30 days behind), NTP
    steps the clock while the agent runs, then the agent restarts before the backlog is
    uploaded: the segment ages measured across the step must survive the restart."""
    c = Clocks(CLOCK_SANE + 10 * 86400)

    def open_():
        return Spool(tmp_path / "spool", AGENT, clock=lambda: c.wall, monotonic=lambda: c.mono,
                     max_age=7 * 86400, seq_file=tmp_path / "x.seq", segment_bytes=4096, fsync="always")

    sp = open_()
    for i in range(200):
        c.elapse(60)
        sp.append(reading(c.wall, i))
        for name in os.listdir(tmp_path / "spool"):     # the kernel's clock is the offline one too
            if name.startswith("seg-"):
                os.utime(tmp_path / "spool" / name, (c.wall, c.wall))
    assert sp.stats()["segments"] > 3
    c.wall += 30 * 86400                                 # NTP
    c.mono += 1
    sp.tick(c.wall)
    assert sp.stats()["records"] == 200
    sp.close()
    sp = open_()                                          # procd respawn, upgrade, config change
    st = sp.stats()
    assert st["records"] == 200 and st["dropped"] == 0
    sp.close()
    c.elapse(7 * 86400 + 60)                              # ...and they still age, in elapsed time
    sp = open_()
    assert sp.stats()["dropped"] == 200
    sp.close()


def test_segments_from_the_future_do_not_hold_back_ageing(tmp_path):
    """Written with a synced clock; the router reboots offline 30 days behind (sysfixtime); NTP
    steps it forward again: the step must not be added on top of the segments' right times."""
    c = Clocks(CLOCK_SANE + 60 * 86400)

    def open_():
        return Spool(tmp_path / "spool", AGENT, clock=lambda: c.wall, monotonic=lambda: c.mono,
                     max_age=7 * 86400, segment_bytes=4096, fsync="always")

    sp = open_()
    for i in range(100):
        c.elapse(60)
        sp.append(reading(c.wall, i))
    sp.close()
    for name in os.listdir(tmp_path / "spool"):
        if name.startswith("seg-"):
            os.utime(tmp_path / "spool" / name, (c.wall, c.wall))
    end = c.wall
    c.wall, c.mono = end - 30 * 86400, 0.0               # reboot offline, 30 days behind
    sp = open_()
    c.wall += 30 * 86400                                 # NTP
    c.mono += 1
    sp.tick(c.wall)
    assert sp.stats()["dropped"] == 0
    c.wall, c.mono = end + 6 * 86400, 1 + 6 * 86400
    sp.tick(c.wall)
    assert sp.stats()["dropped"] == 0
    c.wall, c.mono = end + 8 * 86400, 1 + 8 * 86400      # 8 days after the last record: gone
    sp.tick(c.wall)
    assert sp.stats()["dropped"] == 100
    sp.close()


def test_a_clock_step_never_puts_segment_times_in_the_future(tmp_path):
    c = Clocks(CLOCK_SANE + 86400)
    sp = Spool(tmp_path, AGENT, clock=lambda: c.wall, monotonic=lambda: c.mono,
               segment_bytes=4096, max_age=3600)
    for i in range(100):
        sp.append(reading(c.wall, i))
    c.wall -= 86400                                     # stepped back: the segments follow...
    c.mono += 1
    sp.tick(c.wall)
    c.wall += 2 * 86400                                 # ...and forward, past where they were
    c.mono += 1
    sp.tick(c.wall)
    sp.close()
    mtimes = [os.stat(tmp_path / n).st_mtime for n in os.listdir(tmp_path) if n.startswith("seg-")]
    assert mtimes and max(mtimes) <= c.wall             # on the files too (the next start reads them)
    c.elapse(3601)
    sp = Spool(tmp_path, AGENT, clock=lambda: c.wall, monotonic=lambda: c.mono,
               segment_bytes=4096, max_age=3600)
    assert sp.stats()["dropped"] == 100
    sp.close()


def test_a_segment_rescued_from_an_unset_clock_keeps_ageing_across_restarts(tmp_path):
    """Written with the clock unset, opened with it set: it starts ageing then, once (the file
    keeps that time), not again at every restart."""
    c = Clocks(BOOT_CLOCK)
    kw = dict(clock=lambda: c.wall, monotonic=lambda: c.mono, segment_bytes=4096, max_age=3600)
    sp = Spool(tmp_path, AGENT, **kw)
    for i in range(100):
        sp.append(reading(c.wall, i))
    sp.close()
    for name in os.listdir(tmp_path):
        if name.startswith("seg-"):
            os.utime(tmp_path / name, (BOOT_CLOCK, BOOT_CLOCK))
    c.wall = CLOCK_SANE + 86400                         # set between two runs
    for _ in range(3):
        sp = Spool(tmp_path, AGENT, **kw)
        dropped = sp.stats()["dropped"]
        sp.close()
        assert dropped == 0
        c.elapse(1500)
    sp = Spool(tmp_path, AGENT, **kw)                   # 4500 s after the first rescue
    assert sp.stats()["dropped"] == 100
    sp.close()
