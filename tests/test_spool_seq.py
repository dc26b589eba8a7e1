"""Seqs are never reused, even when the spool loses its state, and segment ages survive clock steps.

The collector keeps (agent, seq) once: a spool that starts again at seq 1 (spool_dir on tmpfs
after a reboot, a new spool_dir) has every new reading silently dropped as a duplicate. Real
collector (agent.collector on 127.0.0.1, SQLite), real spool directories, real seq files.
"""
import json
import logging
import os
import threading
import urllib.request

import pytest

from agent import seqlease
from agent.config import load_config
from agent.loop import open_spool
from agent.record import CLOCK_SANE, data_record
from agent.spool import Spool

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
    assert base < seq < lease


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
    assert seqlease.read(seq_file) == (101, 0)      # written when the fresh spool opens
    for i in range(1, 251):
        seq = sp.append(reading(CLOCK_SANE, i))
        lease, base = seqlease.read(seq_file)
        assert base <= seq < lease <= seq + 100     # always ahead, never far ahead
    assert seqlease.read(seq_file) == (301, 201)    # moved at seq 101 and 201 only
    sp.close()
    # a restart with state inside the lease: seqs go on without a jump and the file stays
    before = os.stat(seq_file)
    sp = Spool(tmp_path / "spool", AGENT, seq_file=seq_file, seq_lease=100)
    assert sp.append(reading(CLOCK_SANE, 0)) == 251
    sp.close()
    after = os.stat(seq_file)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


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
