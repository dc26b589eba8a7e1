"""The new point options and [device] keys in the config: each error names `file:line:
[section] key` and says why (agent/config/points.py, agent/config/load.py), through `check`
as an operator runs it."""
import subprocess
import sys

import pytest

from agent.config import check_config

HEAD = """[agent]
id = a1
spool_dir = /tmp/x

[connection:link]
type = tcp
host = 127.0.0.1

[device:d]
connection = link
%s
[points:d]
%s
"""


def write(tmp_path, points, device=""):
    p = tmp_path / "agent.ini"
    p.write_text(HEAD % (device, points))
    return str(p)


@pytest.mark.parametrize("line, why", [
    ('e = holding 0 uint16 enum=0:,1:on', 'label of 0 is empty: write 0:"" for an empty label'),
    ('e = holding 0 uint16 enum=0:"on hold,1:x', 'the opening " has no closing "'),
    ('e = holding 0 uint16 enum=0:on"x,1:x', "has a quote inside"),
    ('e = holding 0 uint16 enum=0:a,0:b', "value 0 has two labels ('a' and 'b')"),
    ('e = holding 0 uint16 enum=x:a', "'x' before ':' is not an integer"),
    ('e = holding 0 uint16 enum=0:a,', "trailing ','"),
    ('e = holding 0 bit 1 enum=0:a,2:b', "value 2: a bit is 0 or 1"),
    ('e = holding 0 bits 0-1 enum=4:x', "value 4 does not fit bits 0-1 (0..3)"),
    ('e = holding 0 uint16 enum=0:"a" ,1:b', "unexpected ',1:b'"),
    ("e = holding 0 float32 invert=yes", "invert applies to bits and bools"),
    ("e = holding 0 int16 reverse=yes", "reverse applies to bit fields only"),
    ("e = holding 0 append", "append needs decimals=N"),
    ("e = holding 0 append decimals=6", "decimals: must be 1..5 for append"),
    ("e = holding 0 append enum=0:a decimals=1", "enum applies to integer and bit values, not append"),
    ("e = holding 0 bits 0-3 ABCDEFGH", "byte order ABCDEFGH does not fit a 16-bit value"),
    ("e = holding 0 uint16 overlap=maybe", "overlap:"),
])
def test_bad_point_options_name_file_line_section_and_key(tmp_path, line, why):
    path = write(tmp_path, line)
    cfg, errors, _ = check_config(path)
    assert cfg is None
    assert any(e.startswith("%s:13: [points:d] e: " % path) and why in e for e in errors), errors


def test_overlap_is_an_error_by_default_and_allowed_per_point(tmp_path):
    pts = "word = holding 5 uint16\nb3 = holding 5 bit 3\nf = holding 6 float32\nraw = holding 7 uint16\n"
    cfg, errors, _ = check_config(write(tmp_path, pts))
    assert any(":14: [points:d] b3: overlaps word (holding 5) at holding 5; if the manual defines both "
               "there, add overlap=yes to one of them" in e for e in errors), errors
    assert any(":16: [points:d] raw: overlaps f" in e for e in errors), errors
    pts = pts.replace("word = holding 5 uint16", "word = holding 5 uint16 overlap=yes").replace(
        "raw = holding 7 uint16", "raw = holding 7 uint16 overlap=yes")
    cfg, errors, _ = check_config(write(tmp_path, pts))
    assert errors == [] and len(cfg.devices[0].requests) == 1
    # overlap=yes lets one point overlap; two others still may not
    cfg, errors, _ = check_config(write(tmp_path, pts + "b3b = holding 5 bit 3\n"))
    assert any("b3b: overlaps b3" in e for e in errors), errors


@pytest.mark.parametrize("device, key, why", [
    ("buffer = 0", "buffer", "between 1 and 1000"),
    ("buffer = many", "buffer", ""),
    ("first = later", "first", "always"),
    ("first = on_change", "first", "applies to mode = on_change"),
    ("writable = maybe", "writable", ""),
])
def test_bad_device_keys_name_file_line_section_and_key(tmp_path, device, key, why):
    path = write(tmp_path, "v = holding 0 uint16", device + "\n")
    r = subprocess.run([sys.executable, "-m", "agent", "check", "-c", path], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2
    assert "%s:11: [device:d] %s: " % (path, key) in r.stderr and why in r.stderr, r.stderr


def test_the_new_keys_load(tmp_path):
    cfg, errors, _ = check_config(write(tmp_path, 'v = holding 0 bit 3 invert=yes enum=0:"not ok",1:""',
                                        "buffer = 10\nwritable = yes\nmode = on_change\nfirst = on_change\n"))
    assert errors == [], errors
    d = cfg.devices[0]
    assert (d.buffer, d.writable, d.first) == (10, True, "on_change")
    assert d.points[0].enum == {0: "not ok", 1: ""} and d.points[0].invert


def test_check_shows_buffer_and_writable_in_the_plan(tmp_path):
    from agent.commands import plan_lines

    cfg, errors, _ = check_config(write(tmp_path, "v = holding 0 uint16", "buffer = 10\nwritable = yes\n"))
    assert errors == []
    assert any("10 polls per record, writable (modbus-agent write)" in line for line in plan_lines(cfg))
