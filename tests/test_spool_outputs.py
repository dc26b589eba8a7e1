"""Named cursors: one cursor per enabled output, each acknowledged on its own; a segment goes only
when every enabled output is past it (or a bound drops it, with gap records exact for each
output); a cursor of an output no longer enabled is retired; a new output starts at the oldest
record held; cursor.json and ack.hint from before named cursors are the "http" cursor. Real files."""
import json
import logging
import os

import pytest

from agent.spool import ACK_HINT, CURSOR, Spool
from agent.spool.cursor import NAMED_AT
from tests.test_spool import AGENT, audit_gaps, drain_all, drain_outputs, not_for, rec, segments

TWO = ("http", "mqtt")


def data_seqs(delivered):
    return [r["seq"] for r in delivered if r.get("kind") != "gap"]


def test_one_output_down_for_long_the_other_keeps_up(tmp_path):
    """mqtt is down while 3000 records are appended; http uploads after every 50 and never gets a
    record twice; the segments mqtt still needs are kept; a restart keeps both cursors; mqtt then
    gets everything, in order, once, and the spool shrinks back to its newest segment."""
    sp = Spool(tmp_path, AGENT, segment_bytes=4096, max_bytes=64 << 20, outputs=TWO)
    http, appended = [], []
    for i in range(3000):
        appended.append(sp.append(rec(i)))
        if i % 50 == 49:
            http += drain_all(sp, n=20, output="http")
        if i == 1500:                                   # a restart in the middle
            sp.close()
            sp = Spool(tmp_path, AGENT, segment_bytes=4096, max_bytes=64 << 20, outputs=TWO)
    st = sp.stats()
    assert data_seqs(http) == appended                 # all of them, once, in order: no re-send
    assert st["outputs"]["http"]["records"] == 0 and st["outputs"]["http"]["acked_seq"] == appended[-1]
    assert st["outputs"]["mqtt"]["records"] == 3000 == st["records"]     # held for the slow one
    assert st["outputs"]["mqtt"]["acked_seq"] == 0 and st["acked_seq"] == 0
    assert st["outputs"]["mqtt"]["bytes"] == st["bytes"] > st["outputs"]["http"]["bytes"] == 0
    assert len(segments(tmp_path)) == st["segments"] > 50
    assert st["dropped"] == 0
    sp.close()
    sp = Spool(tmp_path, AGENT, segment_bytes=4096, max_bytes=64 << 20, outputs=TWO)
    assert sp.peek(output="http") is None               # the restart kept http's cursor
    mqtt = drain_all(sp, n=300, output="mqtt")
    assert data_seqs(mqtt) == appended and not [r for r in mqtt if r.get("kind") == "gap"]
    assert len(segments(tmp_path)) == 1 and sp.stats()["records"] == 0
    sp.close()


def test_bounds_drop_oldest_and_account_for_every_record_per_output(tmp_path):
    """max_bytes with one output far behind: the oldest segments go; the output that kept up lost
    nothing and is handed no gap record; the one that was down gets records and gap records that
    account for every seq exactly (agent.spool.loss)."""
    sp = Spool(tmp_path, AGENT, max_bytes=64 << 10, segment_bytes=8 << 10, outputs=TWO)
    http = []
    for i in range(3000):
        sp.append(rec(i))
        if i % 40 == 39:
            http += drain_all(sp, n=25, output="http")
    http += drain_all(sp, output="http")
    size = sum(os.path.getsize(tmp_path / n) for n in segments(tmp_path))
    assert size <= 64 << 10
    st = sp.stats()
    assert st["dropped"] > 0
    mqtt = drain_all(sp, output="mqtt")
    views = {"http": http, "mqtt": mqtt}
    # http kept up: every data record, once, in order, and no gap record (none was meant for it).
    assert [r["values"]["i"] for r in http if r.get("kind") != "gap"] == list(range(3000))
    assert not [r for r in http if r.get("kind") == "gap"]
    # mqtt was down: exact accounting; its gap records are for it alone.
    gaps = audit_gaps(sp.next_seq, mqtt, skip=not_for("mqtt", views))
    assert gaps and all(g.get("outputs") == ["mqtt"] and "max_bytes" in g["reason"] for g in gaps)
    assert sum(g["dropped"] for g in gaps) == st["dropped"]
    # What http never saw are those gap records for mqtt (delivered to it, or dropped and
    # accounted for in its later ones): never a data record.
    unseen = set(range(1, sp.next_seq)) - {r["seq"] for r in http}
    assert unseen and not unseen & set(data_seqs(mqtt))
    assert len(gaps) <= st["segments"] + 2
    sp.close()


def test_a_drop_with_both_outputs_behind_is_exact_for_each(tmp_path):
    """http is part-way into the oldest segment, mqtt at its start: the records neither has get
    one gap record for both, those only mqtt lacks one for mqtt alone."""
    sp = Spool(tmp_path, AGENT, max_bytes=64 << 10, segment_bytes=8 << 10, outputs=TWO)
    for i in range(200):
        sp.append(rec(i))
    b = sp.peek(30, 1 << 20, output="http")
    http = [json.loads(x) for x in b.lines]
    sp.ack(b)                                           # http acked 1..30, mqtt nothing
    n = 200
    while sp.stats()["dropped"] == 0:                   # until the first segment is dropped
        sp.append(rec(n))
        n += 1
    http += drain_all(sp, output="http")
    mqtt = drain_all(sp, output="mqtt")
    views = {"http": http, "mqtt": mqtt}
    for o, got in views.items():
        audit_gaps(sp.next_seq, got, skip=not_for(o, views))
    g_http = [g for g in http if g.get("kind") == "gap"]
    g_mqtt = [g for g in mqtt if g.get("kind") == "gap"]
    assert [g.get("outputs") for g in g_http] == [None]
    assert sorted(str(g.get("outputs")) for g in g_mqtt) == ["None", "['mqtt']"]
    only_mqtt = next(g for g in g_mqtt if g.get("outputs"))
    assert (only_mqtt["first_seq"], only_mqtt["last_seq"], only_mqtt["dropped"]) == (1, 30, 30)
    assert g_http[0]["dropped"] + 30 == sp.stats()["dropped"]
    sp.close()


def test_a_retired_cursor_releases_its_segments(tmp_path, caplog):
    """mqtt falls behind, then is removed from the config: at the next open its cursor is retired
    (logged once), the segments only it needed are deleted, and it is not written again."""
    sp = Spool(tmp_path, AGENT, segment_bytes=4096, outputs=TWO)
    for i in range(500):
        sp.append(rec(i))
    drain_all(sp, output="http")
    assert len(segments(tmp_path)) > 10
    sp.close()
    with caplog.at_level(logging.INFO, logger="agent.spool"):
        sp = Spool(tmp_path, AGENT, segment_bytes=4096, outputs=("http",))
    retired = [r for r in caplog.records if "no longer enabled" in r.getMessage()]
    assert len(retired) == 1 and "mqtt" in retired[0].getMessage()
    assert len(segments(tmp_path)) == 1 and sp.stats()["records"] == 0
    assert set(sp.stats()["outputs"]) == {"http"}
    sp.close()
    assert set(json.loads((tmp_path / CURSOR).read_bytes())["cursors"]) == {"http"}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="agent.spool"):
        sp = Spool(tmp_path, AGENT, segment_bytes=4096, outputs=("http",))
    assert not [r for r in caplog.records if "no longer enabled" in r.getMessage()]
    sp.close()


def test_a_new_output_starts_at_the_oldest_record_held(tmp_path, caplog):
    sp = Spool(tmp_path, AGENT, segment_bytes=4096)
    for i in range(300):
        sp.append(rec(i))
    sp.ack(sp.peek(100, 1 << 20))
    sp.close()
    oldest = int(segments(tmp_path)[0][4:-6])          # the first segment still held
    assert oldest <= 101
    with caplog.at_level(logging.INFO, logger="agent.spool"):
        sp = Spool(tmp_path, AGENT, segment_bytes=4096, outputs=TWO)
    assert [r for r in caplog.records if "mqtt has no cursor yet" in r.getMessage()]
    assert [r["seq"] for r in drain_all(sp, output="http")] == list(range(101, 301))
    # The backlog from the oldest record held on (that segment's records http acknowledged too).
    assert [r["seq"] for r in drain_all(sp, output="mqtt")] == list(range(oldest, 301))
    sp.close()


@pytest.mark.parametrize("hint", ["hint", "no-hint"])
def test_state_from_before_named_cursors_is_the_http_cursor(tmp_path, hint):
    """cursor.json without "cursors" and an ack.hint without named lines (what the spool wrote
    before named cursors): read as the http cursor, which resumes exactly; mqtt starts fresh."""
    sp = Spool(tmp_path, AGENT, fsync="interval", fsync_interval=3600)
    for i in range(40):
        sp.append(rec(i))
    sp.ack(sp.peek(5, 1 << 20))        # durable cursor.json: acked 5
    sp.ack(sp.peek(10, 1 << 20))       # the hint only: acked 15
    os.close(sp._lockfd)               # "killed": no close()
    os.close(sp._dirfd)
    cur = json.loads((tmp_path / CURSOR).read_bytes())
    del cur["cursors"]
    (tmp_path / CURSOR).write_text(json.dumps(cur))
    data = (tmp_path / ACK_HINT).read_bytes()
    if hint == "hint":
        (tmp_path / ACK_HINT).write_bytes(data[:NAMED_AT])     # line + loss account, as before
    else:
        os.unlink(tmp_path / ACK_HINT)
    sp = Spool(tmp_path, AGENT, outputs=TWO)
    first = 16 if hint == "hint" else 6
    assert [r["seq"] for r in drain_all(sp, output="http")] == list(range(first, 41))
    assert [r["seq"] for r in drain_all(sp, output="mqtt")] == list(range(1, 41))
    sp.close()


def test_unknown_output_and_bad_outputs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="outputs"):
        Spool(tmp_path / "a", AGENT, outputs=())
    with pytest.raises(ValueError, match="outputs"):
        Spool(tmp_path / "b", AGENT, outputs=("http", "http"))
    sp = Spool(tmp_path / "c", AGENT)
    with pytest.raises(ValueError, match="'mqtt' is not enabled"):
        sp.peek(output="mqtt")
    sp.close()


def test_both_fast_outputs_share_one_gap_record_per_drop(tmp_path):
    """Two outputs at the same place (both down): a drop is one gap record for everyone, as with
    one output (no "outputs" key), and both get the same exact account."""
    sp = Spool(tmp_path, AGENT, max_bytes=64 << 10, segment_bytes=8 << 10, outputs=TWO)
    for i in range(1500):
        sp.append(rec(i))
    views = drain_outputs(sp)
    for o, got in views.items():
        gaps = audit_gaps(sp.next_seq, got, skip=not_for(o, views))
        assert gaps and all("outputs" not in g for g in gaps)
    assert [r["seq"] for r in views["http"]] == [r["seq"] for r in views["mqtt"]]
    sp.close()
