"""The uploader-side quarantine (agent.upload.quarantine): records the collector rejected are
written with the reason, then acknowledged in the spool; bounded; falls back to the spool's
directory. Real spool files, real quarantine files (the spool's own Spool.quarantine tests in
tests/test_spool.py pinned the same behaviour there)."""
import json
import os

from agent.record import data_record, error_record
from agent.spool import Spool
from agent.upload.quarantine import FALLBACK, Quarantine

AGENT = "site7"
T0 = 1_795_000_000.0


def rec(i):
    return data_record(AGENT, T0 + i, "meter1", 1, {"v": 230.0 + i / 10, "i": i})


def test_quarantine_writes_the_records_with_the_reason_then_acks_them(tmp_path):
    sp = Spool(tmp_path, AGENT)
    for i in range(6):
        sp.append(rec(i))
    sp.append(error_record(AGENT, T0, "meter1", 1, {"kind": "timeout", "message": "no answer"}))
    q = Quarantine(clock=lambda: T0)
    assert q.keep(sp, sp.peek(3, 1 << 20), "HTTP 400: bad unit") == os.path.join(str(tmp_path), FALLBACK)
    lines = [json.loads(x) for x in (tmp_path / FALLBACK).read_bytes().splitlines()]
    assert [x["record"]["seq"] for x in lines] == [1, 2, 3]
    assert lines[0]["reason"] == "HTTP 400: bad unit" and lines[0]["quarantined"] == "2026-11-18T11:06:40.000Z"
    assert q.total == 3
    b = sp.peek(10, 1 << 20)
    assert [json.loads(x)["seq"] for x in b.lines] == [4, 5, 6, 7]
    sp.close()
    sp = Spool(tmp_path, AGENT)      # the acknowledgement is the spool's cursor: it survives a restart
    assert [json.loads(x)["seq"] for x in sp.peek(10, 1 << 20).lines] == [4, 5, 6, 7]
    sp.close()


def test_quarantine_falls_back_to_the_spool_dir_and_stays_bounded(tmp_path):
    (tmp_path / "not-a-dir").write_text("x")
    sp = Spool(tmp_path / "spool", AGENT)
    for i in range(40):
        sp.append(rec(i))
    q = Quarantine(tmp_path / "not-a-dir" / "q.jsonl", max_bytes=3000, fsync=False)
    while True:
        b = sp.peek(5, 1 << 20)
        if b is None:
            break
        assert q.keep(sp, b, "HTTP 422: test") == os.path.join(str(tmp_path / "spool"), FALLBACK)
    f = tmp_path / "spool" / FALLBACK
    older = (tmp_path / "spool" / (FALLBACK + ".1")).read_bytes().splitlines()
    assert os.path.getsize(f) <= 3000 and older
    assert json.loads(f.read_bytes().splitlines()[-1])["record"]["seq"] == 40
    assert q.total == 40 and sp.stats()["records"] == 0
    sp.close()


def test_quarantine_in_the_configured_file(tmp_path):
    sp = Spool(tmp_path / "spool", AGENT)
    for i in range(3):
        sp.append(rec(i))
    q = Quarantine(tmp_path / "q" / "rejected.jsonl")
    assert q.keep(sp, sp.peek(10, 1 << 20), "HTTP 422: x") == str(tmp_path / "q" / "rejected.jsonl")
    assert len((tmp_path / "q" / "rejected.jsonl").read_bytes().splitlines()) == 3
    assert not (tmp_path / "spool" / FALLBACK).exists() and sp.peek(10, 1 << 20) is None
    sp.close()


def test_nowhere_to_write_discards_with_an_error_and_moves_on(tmp_path, caplog):
    (tmp_path / "not-a-dir").write_text("x")
    sp = Spool(tmp_path / "spool", AGENT)
    for i in range(3):
        sp.append(rec(i))
    os.makedirs(tmp_path / "spool" / FALLBACK)     # the fallback is a directory: cannot be appended to
    q = Quarantine(tmp_path / "not-a-dir" / "q.jsonl")
    with caplog.at_level("ERROR", logger="agent.upload"):
        assert q.keep(sp, sp.peek(10, 1 << 20), "HTTP 422: x") is None
    assert any("3 rejected records seq 1..3 discarded" in r.getMessage() for r in caplog.records)
    assert sp.peek(10, 1 << 20) is None and q.total == 3
    sp.close()
