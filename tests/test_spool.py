"""The spool against real files: rotation, bounds with exact gap records, torn and corrupt lines,
lost cursor, seq continuity across restarts, disk errors (the quarantine is the uploader's: tests/test_upload_quarantine.py)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.record import data_record, encode
from agent.spool import ACK_HINT, CURSOR, SETASIDE, Spool, SpoolError
from agent.upload.quarantine import Quarantine

AGENT = "site7"
T0 = 1_795_000_000.0   # 2026-11-19, after CLOCK_SANE


class Clock:
    def __init__(self, t=T0):
        self.t = t

    def __call__(self):
        return self.t


def rec(i, t=T0):
    return data_record(AGENT, t + i * 0.001, "meter1", 1, {"v": i * 0.5, "i": i})


def segments(d):
    return sorted(n for n in os.listdir(d) if n.startswith("seg-"))


# The corruption and damage tests run with one output and with two (named cursors): every output's
# view must keep the promises on its own.
OUTPUTS = pytest.mark.parametrize("outputs", [("http",), ("http", "mqtt")], ids=["one-output", "two-outputs"])


def drain_all(sp, n=100, output="http"):
    """Every record the spool hands out, acknowledged batch by batch -> list of parsed records."""
    out = []
    while True:
        b = sp.peek(n, 1 << 20, output=output)
        if b is None:
            return out
        out.extend(json.loads(x) for x in b.lines)
        assert [r["seq"] for r in out[-b.count:]] == b.seqs
        sp.ack(b)


def drain_outputs(sp, n=100):
    """drain_all for every enabled output in turn, until none gets more (an output's reading may
    write gap records, which the others get too) -> {output: records}."""
    views = {o: [] for o in sp.outputs}
    while True:
        more = {o: drain_all(sp, n, output=o) for o in sp.outputs}
        if not any(more.values()):
            return views
        for o, got in more.items():
            views[o] += got


def for_others(g):
    """A gap record for other outputs, as this one is handed it: "dropped" 0 (agent.spool.reader)."""
    return "outputs" in g and g["dropped"] == 0


def audit_gaps(next_seq, delivered):
    """Every seq the spool assigned (1..next_seq-1: records and gap records alike) is delivered
    exactly once or accounted for by a gap record: the gap records' counts add up to exactly the
    number of missing seqs, their ranges cover them all, and no gap claims more than its range
    lost. Returns the gap records (but those for other outputs: they account for nothing here)."""
    got = [r["seq"] for r in delivered]
    assert len(got) == len(set(got)), "duplicate delivery"
    gaps = [r for r in delivered if r.get("kind") == "gap" and not for_others(r)]
    missing = set(range(1, next_seq)) - set(got)
    covered = set()
    for g in gaps:
        assert g["first_seq"] <= g["last_seq"] < g["seq"]
        assert g["first_seq"] in missing and g["last_seq"] in missing, g
        in_range = {s for s in missing if g["first_seq"] <= s <= g["last_seq"]}
        assert g["dropped"] <= len(in_range), g
        covered |= in_range
    assert covered == missing, "lost without a gap record: %s" % sorted(missing - covered)[:10]
    assert sum(g["dropped"] for g in gaps) == len(missing), "gap counts do not add up"
    return gaps


def test_append_peek_ack_roundtrip(tmp_path):
    sp = Spool(tmp_path, AGENT)
    seqs = [sp.append(rec(i)) for i in range(10)]
    assert seqs == list(range(1, 11))
    b = sp.peek(4, 1 << 20)
    assert (b.count, b.first_seq, b.last_seq) == (4, 1, 4)
    r = rec(0)
    r["seq"] = 1
    assert b.lines[0] + b"\n" == encode(r)          # the line is the record, byte for byte
    assert sp.peek(4, 1 << 20).seqs == [1, 2, 3, 4]  # peek does not move the cursor
    sp.ack(b)
    assert sp.stats()["records"] == 6
    rest = drain_all(sp)
    assert [x["seq"] for x in rest] == list(range(5, 11))
    assert sp.peek(10, 1 << 20) is None
    st_ = sp.stats()
    assert (st_["records"], st_["bytes"], st_["oldest_ts"], st_["acked_seq"]) == (0, 0, None, 10)
    sp.close()


def test_peek_respects_bytes_and_always_returns_one(tmp_path):
    sp = Spool(tmp_path, AGENT)
    for i in range(5):
        sp.append(rec(i))
    one = len(sp.peek(1, 1 << 20).lines[0])
    b = sp.peek(100, one * 2 + 1)
    assert b.count == 2 and b.nbytes <= one * 2 + 1
    assert sp.peek(100, 10).count == 1     # a line larger than max_bytes still goes, alone
    sp.close()


def test_reopen_continues_seq_and_backlog(tmp_path):
    sp = Spool(tmp_path, AGENT)
    for i in range(20):
        sp.append(rec(i))
    sp.ack(sp.peek(7, 1 << 20))
    sp.close()
    sp = Spool(tmp_path, AGENT)
    assert sp.stats()["records"] == 13
    assert sp.append(rec(20)) == 21
    assert [r["seq"] for r in drain_all(sp)] == list(range(8, 22))
    sp.close()


def test_seq_continues_after_everything_acked_and_restart(tmp_path):
    sp = Spool(tmp_path, AGENT, segment_bytes=4096, max_bytes=1 << 20)
    for i in range(200):
        sp.append(rec(i))
    drain_all(sp)
    assert len(segments(tmp_path)) == 1      # the newest segment stays: it holds the seq floor
    sp.close()
    sp = Spool(tmp_path, AGENT)
    assert sp.stats()["records"] == 0
    assert sp.append(rec(0)) == 201
    drain_all(sp)
    sp.close()
    # Even with every segment gone, the cursor's floor keeps seq going forward.
    for n in segments(tmp_path):
        os.unlink(tmp_path / n)
    sp = Spool(tmp_path, AGENT)
    assert sp.append(rec(0)) == 202
    sp.close()
    # And with the cursor gone, the segment's content and name keep it.
    os.unlink(tmp_path / CURSOR)
    sp = Spool(tmp_path, AGENT)
    assert sp.append(rec(0)) == 203
    sp.close()


def test_lost_state_starts_beyond_any_earlier_seq(tmp_path):
    """A spool on tmpfs loses everything at reboot. Starting again at seq 1 would have the
    collector discard every new reading as a duplicate of an old one: `fresh_seq` (the agent
    passes the clock in ms) is where a stateless spool starts instead, and only then."""
    start = iter([1_800_000_000_000, 1_800_000_600_000])
    sp = Spool(tmp_path, AGENT, fresh_seq=lambda: next(start))
    assert sp.stats()["origin_seq"] == 1_800_000_000_000
    seqs = [sp.append(rec(i)) for i in range(50)]
    assert seqs == list(range(1_800_000_000_000, 1_800_000_000_050))
    drain_all(sp, n=20)
    sp.close()
    # state kept: the floor and the origin carry on, the fresh start is not consulted again
    sp = Spool(tmp_path, AGENT, fresh_seq=lambda: pytest.fail("consulted with state on disk"))
    assert sp.append(rec(0)) == 1_800_000_000_050
    assert sp.stats()["origin_seq"] == 1_800_000_000_000
    sp.close()
    # state lost (reboot with the spool in RAM): the next start is beyond everything handed out
    for name in os.listdir(tmp_path):
        os.unlink(tmp_path / name)
    sp = Spool(tmp_path, AGENT, fresh_seq=lambda: next(start))
    assert sp.append(rec(0)) == 1_800_000_600_000
    sp.close()


def test_without_fresh_seq_a_new_spool_starts_at_one(tmp_path):
    sp = Spool(tmp_path, AGENT)
    assert sp.append(rec(0)) == 1 and sp.stats()["origin_seq"] == 1
    sp.close()


def test_rotation_and_acked_segments_deleted(tmp_path):
    sp = Spool(tmp_path, AGENT, segment_bytes=4096, max_bytes=1 << 20)
    for i in range(300):
        sp.append(rec(i))
    n = len(segments(tmp_path))
    assert n >= 8 and sp.stats()["segments"] == n
    for name in segments(tmp_path):
        assert os.path.getsize(tmp_path / name) <= 4096
    sp.ack(sp.peek(150, 1 << 20))
    assert len(segments(tmp_path)) < n
    first = int(segments(tmp_path)[0][4:-6])
    assert first <= 151                   # nothing un-acked was deleted
    assert [r["seq"] for r in drain_all(sp)] == list(range(151, 301))
    sp.close()


def test_torn_last_line_set_aside_and_seq_not_reused(tmp_path):
    sp = Spool(tmp_path, AGENT)
    for i in range(5):
        sp.append(rec(i))
    sp.close()
    seg = tmp_path / segments(tmp_path)[-1]
    with open(seg, "ab") as f:                       # a power cut in the middle of seq 6
        f.write(b'{"agent":"site7","seq":6,"ts":"2026-11-19T')
    sp = Spool(tmp_path, AGENT)
    st_ = sp.stats()
    assert st_["torn_set_aside"] == 1 and st_["records"] == 5
    assert b'"seq":6,"ts":"2026-11-19T' in (tmp_path / SETASIDE).read_bytes()
    assert seg.read_bytes().endswith(b"}\n")
    # The torn line was never complete, so nobody (no upload) ever had seq 6: it is reused and
    # the seqs stay contiguous.
    assert sp.append(rec(6)) == 6
    assert [r["seq"] for r in drain_all(sp)] == [1, 2, 3, 4, 5, 6]
    sp.close()


def test_truncated_segment_mid_line(tmp_path):
    sp = Spool(tmp_path, AGENT, segment_bytes=4096, max_bytes=1 << 20)
    for i in range(100):
        sp.append(rec(i))
    sp.close()
    names = segments(tmp_path)
    mid = tmp_path / names[len(names) // 2]
    data = mid.read_bytes()
    cut = data.rfind(b"\n", 0, len(data) // 2) + 17   # 17 bytes into a line
    lost_line = data[cut - 17:data.find(b"\n", cut)]
    lost_seq = json.loads(lost_line)["seq"]
    os.truncate(mid, cut)
    sp = Spool(tmp_path, AGENT)
    got = [r["seq"] for r in drain_all(sp)]
    kept = {json.loads(x)["seq"] for x in data[:cut - 17].splitlines()}
    assert set(got) >= kept and lost_seq not in got
    assert got == sorted(got)
    assert sp.stats()["torn_set_aside"] == 1
    assert sp.append(rec(0)) == 101
    sp.close()


@OUTPUTS
def test_corrupt_middle_lines_skipped_and_counted(tmp_path, outputs):
    sp = Spool(tmp_path, AGENT, outputs=outputs)
    for i in range(10):
        sp.append(rec(i))
    sp.close()
    seg = tmp_path / segments(tmp_path)[0]
    lines = seg.read_bytes().split(b"\n")
    lines[3] = lines[3][:40] + b"\x00\xff garbage"          # prefix intact, body destroyed
    lines[6] = b"\x00" * 30                                 # a block of zeros
    lines.insert(8, b"not json at all")
    seg.write_bytes(b"\n".join(lines))
    sp = Spool(tmp_path, AGENT, outputs=outputs)
    for got in drain_outputs(sp, n=3).values():
        assert [r["seq"] for r in got if r.get("kind") != "gap"] == [1, 2, 3, 5, 6, 8, 9, 10]
        # seqs 4 and 7 were spooled but cannot be read back: gap records (reason "corrupt") say so;
        # the junk line between 8 and 9 held no record of its own (no seq is missing there).
        # (with two outputs each accounts for what it met; the other's account reaches it as
        # a gap record "for others", dropped 0)
        assert [(g["dropped"], g["first_seq"], g["last_seq"], g["reason"]) for g in got
                if g.get("kind") == "gap" and not for_others(g)] == [(1, 4, 4, "corrupt"), (1, 7, 7, "corrupt")]
        audit_gaps(sp.next_seq, got)
    assert sp.stats()["corrupt_skipped"] == 3
    assert sp.stats()["corrupt_lost"] == 2
    s = sp.append(rec(11))
    for o in outputs:
        assert [r["seq"] for r in drain_all(sp, output=o)] == [s]
    sp.close()
    assert sp.stats()["corrupt_skipped"] == 3               # counted once despite re-peeks


@OUTPUTS
def test_wholly_corrupt_segment_and_cursor_never_crash(tmp_path, outputs):
    (tmp_path / "seg-0000000000000001.jsonl").write_bytes(os.urandom(5000).replace(b"\n", b"x") + b"\n" * 3)
    (tmp_path / CURSOR).write_bytes(b"{\x00 half a cursor")
    sp = Spool(tmp_path, AGENT, outputs=outputs)
    # The segment was opened for seq 1: one record that cannot be read back (3 junk lines, but
    # only one seq is missing), accounted for as corrupt (for each output).
    for got in drain_outputs(sp).values():
        assert [(r["kind"], r["dropped"], r["first_seq"], r["last_seq"], r["reason"]) for r in got
                if not for_others(r)] == [("gap", 1, 1, 1, "corrupt")]
    s = sp.append(rec(0))
    assert s >= 2                                 # above the broken segment's name
    for o in outputs:
        assert [r["seq"] for r in drain_all(sp, output=o)] == [s]
    assert sp.stats()["corrupt_skipped"] == 3
    sp.close()


def test_deleted_cursor_resends_from_oldest_segment(tmp_path):
    sp = Spool(tmp_path, AGENT, segment_bytes=4096, max_bytes=1 << 20)
    for i in range(100):
        sp.append(rec(i))
    sp.ack(sp.peek(60, 1 << 20))
    first_kept = int(segments(tmp_path)[0][4:-6])
    sp.close()
    for name in (CURSOR, ACK_HINT):
        if (tmp_path / name).exists():
            os.unlink(tmp_path / name)
    sp = Spool(tmp_path, AGENT)
    got = [r["seq"] for r in drain_all(sp)]
    # Duplicates of acked records are possible (the collector drops them); loss is not.
    assert got == list(range(first_kept, 101)) and first_kept <= 61
    assert sp.append(rec(0)) == 101
    sp.close()


def test_ack_hint_between_durable_cursors(tmp_path):
    """Acks between two durable cursor writes go to the in-place hint; a torn hint (power cut)
    falls back to cursor.json: re-sending, never skipping."""
    sp = Spool(tmp_path, AGENT, fsync="interval", fsync_interval=3600)
    for i in range(30):
        sp.append(rec(i))
    sp.ack(sp.peek(5, 1 << 20))          # due at once: durable cursor.json (acked 5)
    sp.ack(sp.peek(10, 1 << 20))         # within the interval: hint only (acked 15)
    cursor = json.loads((tmp_path / CURSOR).read_bytes())
    assert cursor["acked_seq"] == 5
    hint = (tmp_path / ACK_HINT).read_bytes()
    assert len(hint) >= 128 and hint.startswith(b"15 31 ")      # then the loss account (none)
    os.close(sp._lockfd)                 # "killed": no close(), no final cursor write
    os.close(sp._dirfd)
    sp = Spool(tmp_path, AGENT)
    assert drain_all(sp, n=4)[0]["seq"] == 16
    sp.close()
    # A torn hint: CRC fails, cursor.json is used.
    sp = Spool(tmp_path, AGENT, fsync="interval", fsync_interval=3600)
    for i in range(10):
        sp.append(rec(i))
    sp.ack(sp.peek(4, 1 << 20))
    acked = json.loads((tmp_path / CURSOR).read_bytes())["acked_seq"]
    os.close(sp._lockfd)
    os.close(sp._dirfd)
    (tmp_path / ACK_HINT).write_bytes(hint[:20] + b"\x00" * 30)
    sp = Spool(tmp_path, AGENT)
    assert drain_all(sp)[0]["seq"] == acked + 1
    sp.close()


@pytest.mark.parametrize("layout", ["named", "single"])
def test_stale_cursor_offset_falls_back_to_acked_seq(tmp_path, layout):
    sp = Spool(tmp_path, AGENT)
    for i in range(10):
        sp.append(rec(i))
    sp.ack(sp.peek(4, 1 << 20))
    sp.close()
    cur = json.loads((tmp_path / CURSOR).read_bytes())
    cur["offset"] += 3                                    # not a line boundary any more
    if layout == "named":
        cur["cursors"]["http"]["offset"] += 3
    else:
        del cur["cursors"]                                # as written before named cursors
    (tmp_path / CURSOR).write_text(json.dumps(cur))
    sp = Spool(tmp_path, AGENT)
    assert [r["seq"] for r in drain_all(sp)] == list(range(5, 11))
    sp.close()


def test_size_bound_drops_oldest_with_exact_gap_records(tmp_path):
    sp = Spool(tmp_path, AGENT, max_bytes=64 << 10, segment_bytes=8 << 10)
    appended = []
    delivered = []
    for i in range(3000):
        appended.append(sp.append(rec(i)))
        if i == 1000:                               # a partial upload in the middle
            b = sp.peek(30, 1 << 20)
            delivered.extend(json.loads(x) for x in b.lines)
            sp.ack(b)
    size = sum(os.path.getsize(tmp_path / n) for n in segments(tmp_path))
    assert size <= 64 << 10
    st_ = sp.stats()
    delivered.extend(drain_all(sp))
    gaps = audit_gaps(sp.next_seq, delivered)
    assert gaps and all("max_bytes" in g["reason"] for g in gaps)
    # Gap records stay few: about one per segment still held, not one per drop ever made.
    assert len(gaps) <= st_["segments"] + 2, (len(gaps), st_["segments"])
    assert sp.next_seq - 1 - 3000 <= 2 * (3000 // 40), "gap records churned"
    assert sum(g["dropped"] for g in gaps) == st_["dropped"]
    assert appended == sorted(set(appended))
    for g in gaps:
        assert g["first_ts"] <= g["last_ts"]
    sp.close()


def test_age_bound_drops_with_gap_record(tmp_path):
    clock = Clock()
    sp = Spool(tmp_path, AGENT, max_age=3600, segment_bytes=4096, clock=clock, monotonic=clock)
    for i in range(100):
        sp.append(rec(i))
    clock.t += 1800
    for i in range(100):
        sp.append(rec(i, clock.t))
    sp.tick(clock.t)
    assert sp.stats()["dropped"] == 0
    clock.t += 2000                                  # the first half is now older than an hour
    sp.tick(clock.t)
    dropped = sp.stats()["dropped"]
    assert 0 < dropped <= 100
    delivered = drain_all(sp)
    gaps = audit_gaps(sp.next_seq, delivered)
    assert len(gaps) == 1 and "max_age" in gaps[0]["reason"] and gaps[0]["first_seq"] == 1
    sp.close()


def test_age_bound_after_restart_ignores_clock_jump(tmp_path):
    clock = Clock(1000.0)                            # router booted without NTP: 1970
    sp = Spool(tmp_path, AGENT, max_age=3600, clock=clock)
    for i in range(5):
        sp.append(data_record(AGENT, clock.t, "m", 1, {"i": i}))
    sp.close()
    os.utime(tmp_path / segments(tmp_path)[0], (1000.0, 1000.0))
    clock.t = T0                                     # NTP set the clock: 56 years later
    sp = Spool(tmp_path, AGENT, max_age=3600, clock=clock)
    sp.tick(clock.t)
    assert sp.stats()["dropped"] == 0 and sp.stats()["records"] == 5
    sp.close()


# (The quarantine is the uploader's: tests/test_upload_quarantine.py writes rejected records with
# the reason, acknowledges them in a real spool, falls back to the spool's directory, stays bounded.)


def test_foreign_record_order_is_normalised(tmp_path):
    sp = Spool(tmp_path, AGENT)
    sp.append({"ts": "2026-11-21T10:30:45.123Z", "device": "x", "status": "ok", "agent": "other"})
    b = sp.peek(1, 1 << 20)
    assert b.lines[0].startswith(b'{"agent":"site7","seq":1,"ts":"2026-11-21T10:30:45.123Z"')
    sp.close()


@OUTPUTS
def test_segment_deleted_from_outside_is_accounted_for(tmp_path, outputs):
    sp = Spool(tmp_path, AGENT, segment_bytes=4096, max_bytes=1 << 20, outputs=outputs)
    for i in range(100):
        sp.append(rec(i))
    sp.ack(sp.peek(5, 1 << 20))                      # http only: another output is further behind
    names = segments(tmp_path)
    os.unlink(tmp_path / names[0])                   # the head, partly acknowledged
    os.unlink(tmp_path / names[-1])                  # the active one: appends would go nowhere
    middle = tmp_path / names[len(names) // 2]
    os.truncate(middle, os.path.getsize(middle) // 2)  # cut short: kept aside, accounted for
    sp.tick()
    for i in range(100, 110):
        sp.append(rec(i))
    for o, delivered in drain_outputs(sp).items():
        lost = set(range(6 if o == "http" else 1, sp.next_seq)) - {r["seq"] for r in delivered}
        gaps = [r for r in delivered if r.get("kind") == "gap"]
        assert sum(g["dropped"] for g in gaps) == len(lost) > 0
        assert {g["reason"] for g in gaps} == {"segment file deleted from outside the agent",
                                               "segment file truncated from outside the agent"}
        assert [r["values"]["i"] for r in delivered if r.get("kind") != "gap"][-10:] == list(range(100, 110))
    assert os.path.exists(str(middle) + ".unreadable")
    sp.close()


def test_one_agent_per_directory(tmp_path):
    sp = Spool(tmp_path, AGENT)
    with pytest.raises(SpoolError, match="in use"):
        Spool(tmp_path, AGENT)
    sp.close()
    Spool(tmp_path, AGENT).close()


@pytest.mark.parametrize("mode", ["always", "interval", "never"])
def test_fsync_modes_round_trip(tmp_path, mode):
    sp = Spool(tmp_path, AGENT, fsync=mode, fsync_interval=0.0)
    for i in range(50):
        sp.append(rec(i))
        sp.tick()
    sp.ack(sp.peek(10, 1 << 20))
    sp.close()
    sp = Spool(tmp_path, AGENT, fsync=mode)
    assert [r["seq"] for r in drain_all(sp)] == list(range(11, 51))
    sp.close()
    with pytest.raises(ValueError):
        Spool(tmp_path / "x", AGENT, fsync="sometimes")


def test_interval_mode_syncs_before_handing_out_and_at_most_once_per_interval(tmp_path, monkeypatch):
    """A record is durable before the uploader sees it (no seq reuse after a power cut), and
    appending alone fsyncs at most once per interval, rotations included (flash wear)."""
    calls = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real(fd))[1])
    mono = [0.0]
    sp = Spool(tmp_path, AGENT, fsync="interval", fsync_interval=5.0, segment_bytes=4096,
               monotonic=lambda: mono[0])
    for i in range(200):                       # several rotations within one interval
        sp.append(rec(i))
        sp.tick()
    assert calls == []
    mono[0] += 5.0
    sp.tick()
    assert len(calls) >= 1
    n = len(calls)
    sp.tick()
    assert len(calls) == n                     # nothing new: no fsync
    sp.append(rec(200))
    b = sp.peek(500, 1 << 20)
    assert len(calls) == n + 1 and b.last_seq == 201
    sp.peek(500, 1 << 20)
    assert len(calls) == n + 1                 # already durable
    sp.close()


DISK_FULL = textwrap.dedent("""
    import json, os, resource, signal, sys
    sys.path.insert(0, sys.argv[2])
    from agent.spool import Spool
    from agent.record import data_record
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    sp = Spool(sys.argv[1], "site7", segment_bytes=64 << 10, max_bytes=1 << 20, fsync="never")
    for i in range(50):
        sp.append(data_record("site7", 1795000000.0, "m", 1, {"i": i}))
    # The filesystem refuses files above 20 kB from now on (EFBIG): "disk full" for the spool.
    resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
    for i in range(400):
        sp.append(data_record("site7", 1795000000.0, "m", 1, {"i": i}))
    print(json.dumps(sp.stats()))
    sp.close()
""")


def test_disk_full_loses_only_what_a_gap_record_accounts_for(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", DISK_FULL, str(tmp_path), root], capture_output=True,
                         timeout=60, check=True, text=True)
    st_ = json.loads(out.stdout)
    assert st_["write_errors"] > 0 and st_["next_seq"] > 450
    sp = Spool(tmp_path, AGENT)
    delivered = drain_all(sp)
    gaps = audit_gaps(st_["next_seq"], delivered)
    assert gaps and all("EFBIG" in g["reason"] or "large" in g["reason"] or "full" in g["reason"] for g in gaps)
    sp.close()


# A model of the spool checked against the real one through random appends, acks, quarantines
# (the uploader's writer: the records go to its file, then the batch is acknowledged), restarts and
# bound hits: everything appended is delivered once or accounted for by a gap record, and the
# quarantine file holds exactly the records quarantined.
ops = st.lists(st.one_of(
    st.tuples(st.just("append"), st.integers(1, 120)),
    st.tuples(st.just("ack"), st.integers(1, 80)),
    st.tuples(st.just("quarantine"), st.integers(1, 10)),
    st.tuples(st.just("reopen"), st.just(0)),
    st.tuples(st.just("age"), st.integers(0, 7200)),
), min_size=1, max_size=25)


@OUTPUTS
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops)
def test_model_random_operations(tmp_path_factory, ops, outputs):
    """(With two outputs an ack or quarantine goes to one of them, chosen by its size: each
    output's view must be exact on its own.)"""
    d = tmp_path_factory.mktemp("spool")
    clock = Clock()
    kw = dict(max_bytes=32 << 10, segment_bytes=4096, max_age=3600, clock=clock, monotonic=clock,
              outputs=outputs)
    sp = Spool(d, AGENT, **kw)
    qfile = tmp_path_factory.mktemp("q") / "rejected.jsonl"
    quarantine = Quarantine(qfile, max_bytes=1 << 30, fsync=False, clock=clock)
    appended, delivered, quarantined = [], {o: [] for o in outputs}, []
    for op, n in ops:
        if op == "append":
            appended += [sp.append(rec(i, clock.t)) for i in range(n)]
        elif op == "age":
            clock.t += n
            sp.tick(clock.t)
        elif op in ("ack", "quarantine"):
            o = outputs[n % len(outputs)]
            b = sp.peek(n, 1 << 20, output=o)
            if b is not None:
                delivered[o].extend(json.loads(x) for x in b.lines)
                if op == "ack":
                    sp.ack(b)
                else:
                    assert quarantine.keep(sp, b, "model") == str(qfile)
                    quarantined += [json.loads(x) for x in b.lines]
        else:
            sp.close()
            sp = Spool(d, AGENT, **kw)
    for o, got in drain_outputs(sp).items():
        delivered[o].extend(got)
    assert appended == sorted(set(appended)) and appended[-1:] <= [sp.next_seq - 1]
    for got in delivered.values():
        audit_gaps(sp.next_seq, got)
    kept = [json.loads(x) for x in qfile.read_bytes().splitlines()] if qfile.exists() else []
    assert [x["record"] for x in kept] == quarantined and all(x["reason"] == "model" for x in kept)
    assert quarantine.total == len(quarantined)
    st_ = sp.stats()
    assert st_["records"] == 0 and all(v["records"] == 0 for v in st_["outputs"].values())
    sp.close()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damage=st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 10 ** 6), st.binary(max_size=40),
                                 st.sampled_from(["overwrite", "truncate", "insert"])),
                       min_size=1, max_size=4))
@OUTPUTS
def test_random_damage_never_crashes_and_seq_goes_on(tmp_path_factory, damage, outputs):
    """Whatever happens to the files between two runs, the spool opens, hands out only whole JSON
    records in seq order, and the next seq is above every seq it hands out."""
    d = tmp_path_factory.mktemp("dmg")
    sp = Spool(d, AGENT, segment_bytes=4096, max_bytes=1 << 20, outputs=outputs)
    for i in range(120):
        sp.append(rec(i))
    sp.ack(sp.peek(30, 1 << 20))
    sp.close()
    files = segments(d) + [CURSOR, ACK_HINT]
    for which, where, junk, how in damage:
        path = d / files[which % len(files)]
        if not path.exists():
            continue
        data = bytearray(path.read_bytes())
        at = where % (len(data) + 1)
        if how == "overwrite":
            data[at:at + len(junk)] = junk
        elif how == "truncate":
            del data[at:]
        else:
            data[at:at] = junk
        path.write_bytes(bytes(data))
    sp = Spool(d, AGENT, segment_bytes=4096, max_bytes=1 << 20, outputs=outputs)
    views = drain_outputs(sp, n=17)
    for got in views.values():
        seqs = [r["seq"] for r in got]
        assert seqs == sorted(set(seqs))
    nxt = sp.append(rec(999))
    assert nxt > max((r["seq"] for got in views.values() for r in got), default=0) and nxt >= 2
    for o in outputs:
        assert [r["seq"] for r in drain_all(sp, output=o)] == [nxt]
    sp.close()
