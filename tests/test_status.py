"""agent.status: atomic status file, formatting, staleness."""
import json
import os
import re
import time

from agent.status import format_status, is_stale, read_status, write_status


def _sample(now):
    return {
        "agent": "site7", "pid": 42, "state": "running", "started": "2026-11-21T10:00:00.000Z",
        "written": "2026-11-21T10:30:00.000Z", "written_at": now, "period": 5.0,
        "devices": {
            "meter1": {"unit": 1, "polls_ok": 10, "polls_failed": 0, "consecutive_failures": 0,
                       "last_success": "2026-11-21T10:29:59.000Z", "timeouts": 0, "crc_errors": 0,
                       "exceptions": {}, "dead": False},
            "plc": {"unit": 7, "polls_ok": 0, "polls_failed": 9, "consecutive_failures": 9,
                    "last_success": None, "timeouts": 9, "crc_errors": 0, "exceptions": {"6": 2},
                    "dead": True, "last_error": "unit 7 fc 03 address 0 count 2: no answer"},
        },
        "spool": {"records": 12, "bytes": 3400, "oldest_ts": "2026-11-21T10:29:48.000Z", "segments": 1,
                  "dropped": 0, "corrupt_skipped": 0, "next_seq": 13},
        "upload": {"last_ok": "2026-11-21T10:29:59.000Z", "last_error": None, "sent_total": 100},
    }


def test_write_is_atomic_replace_and_round_trips(tmp_path):
    path = tmp_path / "status.json"
    write_status(str(path), {"a": 1})
    inode = os.stat(path).st_ino
    write_status(str(path), _sample(time.time()))
    assert os.stat(path).st_ino != inode           # replaced by rename, not rewritten in place
    assert read_status(str(path))["devices"]["plc"]["timeouts"] == 9
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]   # no temp file left behind


def test_format_names_each_device_its_state_and_the_backlog():
    now = 1_795_257_000.0  # 2026-11-21T10:30:00Z
    text = format_status(_sample(now), now=now)
    lines = text.splitlines()
    meter = next(line for line in lines if line.startswith("meter1"))
    plc = next(line for line in lines if line.startswith("plc"))
    assert " ok " in meter and "1s ago" in meter
    assert " dead " in plc and "never" in plc and "6:2" in plc
    assert any("no answer" in line for line in lines)       # the failing device's last error
    assert "spool: 12 records, 3.3 kB, oldest 12s" in text
    assert "sent 100 records" in text


def test_stale_when_not_rewritten_for_several_periods():
    now = time.time()
    st = _sample(now - 10)
    assert not is_stale(st, now)
    st["written_at"] = now - 120
    assert is_stale(st, now)
    json.dumps(st)


def _cfg(tmp_path):
    ini = tmp_path / "agent.ini"
    ini.write_text("[agent]\nid = s1\nspool_dir = %s/spool\nstatus_file = %s/status.json\n\n"
                   "[connection:c]\ntype = tcp\nhost = 127.0.0.1\n\n[device:d]\nconnection = c\n\n"
                   "[points:d]\nx = holding 0 uint16\n" % (tmp_path, tmp_path))
    return ini


def test_cmd_status_exit_codes(tmp_path, capsys):
    from argparse import Namespace

    from agent.status import cmd_status

    ini = _cfg(tmp_path)
    args = Namespace(config=str(ini))
    assert cmd_status(args) == 1                      # never ran: no status file
    assert "no status file" in capsys.readouterr().err
    write_status(str(tmp_path / "status.json"), _sample(time.time()))
    assert cmd_status(args) == 0
    assert "meter1" in capsys.readouterr().out
    st = _sample(time.time())
    st["state"] = "stopped"
    write_status(str(tmp_path / "status.json"), st)
    assert cmd_status(args) == 1 and "STOPPED" in capsys.readouterr().out
    ini.write_text(ini.read_text().replace("id = s1", "id = s1\nbogus = 2"))
    assert cmd_status(args) == 2
    assert "[agent] bogus" in capsys.readouterr().err   # the config error says where


def test_status_json_through_the_command_line(tmp_path, capsys):
    from agent.cli import main

    ini = _cfg(tmp_path)
    write_status(str(tmp_path / "status.json"), _sample(time.time()))
    assert main(["status", "-c", str(ini), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["devices"]["plc"]["exceptions"] == {"6": 2}


def test_a_device_with_only_partial_polls_shows_them(tmp_path):
    """Review: a device whose every poll was partial showed OK 0 / FAILED 0 and no sign of its polls."""
    from agent.status import format_status as render
    st = {"agent": "a", "state": "running", "written_at": 1_800_000_000.0, "period": 5,
          "devices": {"m": {"unit": 1, "polls_ok": 0, "polls_partial": 7, "polls_failed": 0,
                            "refused_blocks": 1, "consecutive_failures": 0,
                            "last_error": "refuses fc 03 holding 500+1 (point bad)"}}}
    text = render(st, now=1_800_000_001.0)
    header = next(line for line in text.splitlines() if line.startswith("DEVICE"))
    row = next(line for line in text.splitlines() if line.startswith("m "))
    cols = dict(zip(re.split(r"\s{2,}", header), re.split(r"\s{2,}", row)))
    assert cols["STATE"] == "partial" and cols["PARTIAL"] == "7" and cols["OK"] == "0"
