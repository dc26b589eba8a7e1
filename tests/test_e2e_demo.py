"""tools/demo: the one-command demo runs the whole product, prints values as they reach the
collector, stops cleanly on --duration and on Ctrl-C (no orphans), and keeps its files."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
from demo import format_record, rewrite_ini

DEMO = [sys.executable, str(ROOT / "tools" / "demo.py")]
VALUE_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3}  #(\d+)  (meter1/1|plc1/2) ")


def processes_mentioning(text):
    """PIDs whose command line contains `text` (the run directory: every child has it)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if text.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def test_rewrite_ini_keeps_comments_and_order():
    text = "; head\n[agent]\nid = x   ; the id\ninterval = 2s\n\n[upload]\nurl = http://a\n"
    out = rewrite_ini(text, {("agent", "interval"): "5s", ("agent", "spool_dir"): "/s",
                             ("upload", "url"): "http://b", ("upload", "gzip"): None,
                             ("device:d", "unit"): "3"})
    assert out == ("; head\n[agent]\nid = x   ; the id\ninterval = 5s\nspool_dir = /s\n\n"
                   "[upload]\nurl = http://b\n\n[device:d]\nunit = 3\n")
    assert rewrite_ini("[a]\nk = 1\nj = 2\n", {("a", "k"): None}) == "[a]\nj = 2\n"


def test_format_record_shows_values_errors_and_gaps():
    ts = "2026-11-21T10:30:45.123Z"
    assert format_record({"seq": 7, "ts": ts, "device": "m", "unit": 1, "status": "ok",
                          "values": {"v": 230.1, "on": True}}) == "10:30:45.123  #7  m/1        v=230.1 on=1"
    assert "ERROR timeout: no answer" in format_record(
        {"seq": 8, "ts": ts, "device": "m", "unit": 1, "status": "error",
         "error": {"kind": "timeout", "message": "no answer"}})
    assert "GAP: 5 records dropped (seq 1-5" in format_record(
        {"seq": 9, "ts": ts, "kind": "gap", "dropped": 5, "first_seq": 1, "last_seq": 5, "reason": "size"})


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_demo_runs_unattended_and_keeps_its_files(tmp_path):
    run = tmp_path / "demo-run"
    r = subprocess.run(DEMO + ["--duration", "6", "--run-dir", str(run)], capture_output=True, text=True,
                       timeout=100, cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    devices = {m.group(2) for m in map(VALUE_LINE.match, lines) if m}
    assert devices == {"meter1/1", "plc1/2"}, r.stdout
    assert any(re.search(r"status page:\s+http://127\.0\.0\.1:\d+/", ln) for ln in lines)
    assert "agent exit 0, collector exit 0, simulator exit 0" in r.stdout
    for f in ("agent.ini", "collector.db", "agent.log", "collector.log", "simulator.log", "spool"):
        assert (run / f).exists(), f
    assert processes_mentioning(str(run)) == []


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_demo_ctrl_c_stops_everything_and_a_second_run_carries_on(tmp_path):
    run = tmp_path / "demo-run"

    def start():
        return subprocess.Popen(DEMO + ["--run-dir", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=str(tmp_path), start_new_session=True)

    def until_values(p, n):
        seqs = []
        for line in p.stdout:
            m = VALUE_LINE.match(line)
            if m:
                seqs.append(int(m.group(1)))
                if len(seqs) >= n:
                    return seqs
        raise AssertionError("the demo ended before %d values: %s" % (n, p.stderr.read()))

    p = start()
    try:
        first = until_values(p, 3)
        os.killpg(p.pid, signal.SIGINT)          # what Ctrl-C at the terminal does
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert "demo: stopping" in out and "agent exit 0" in out
    deadline = time.monotonic() + 5
    while processes_mentioning(str(run)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_mentioning(str(run)) == []
    assert (run / "collector.db").exists() and list((run / "spool").iterdir())

    p = start()
    try:
        again = until_values(p, 1)
        os.killpg(p.pid, signal.SIGINT)
        p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0
    assert again[0] > max(first)       # the spool and the collector kept their data: seq carries on


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_demo_killed_with_sigkill_leaves_no_orphans(tmp_path):
    """Even when the demo itself is SIGKILLed (no chance to clean up), its children follow."""
    run = tmp_path / "demo-run"
    p = subprocess.Popen(DEMO + ["--run-dir", str(run)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True, cwd=str(tmp_path), start_new_session=True)
    try:
        for line in p.stdout:
            if VALUE_LINE.match(line):
                break
        assert len(processes_mentioning(str(run))) >= 3     # the demo's agent, collector, simulator
        p.kill()
        p.wait(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
    deadline = time.monotonic() + 20
    while processes_mentioning(str(run)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_mentioning(str(run)) == []
