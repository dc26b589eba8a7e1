"""Config details from issues 9 and 10: one clear error per address mistake, a warning for the
classic off-by-40001 trap, quoted values (a token holding " ;"), and secrets in URL queries
kept out of `check` and the uploader's log lines."""
import logging
import subprocess
import sys
import textwrap
import time

import pytest

from agent.config import check_config, load_config, redact
from agent.record import data_record
from agent.spool import Spool
from agent.upload import Uploader
from tests.conftest import ROOT

INI = """\
[agent]
id = t1
spool_dir = {spool}
{upload}
[connection:plc]
type = tcp
host = 127.0.0.1

[device:d1]
connection = plc
{device}
[points:d1]
{points}
"""


def write(tmp_path, points="v = holding 0 uint16", device="", upload=""):
    p = tmp_path / "agent.ini"
    p.write_text(INI.format(spool=tmp_path / "spool", upload=upload, device=device, points=points))
    return str(p)


def line_of(path, needle):
    with open(path) as f:
        return next(n for n, line in enumerate(f, 1) if needle in line)


def run_check(path):
    return subprocess.run([sys.executable, "-m", "agent", "check", "-c", path], cwd=str(ROOT),
                          capture_output=True, text=True, timeout=60)


# --- addresses -----------------------------------------------------------------------------


def test_below_base_is_one_error_not_two(tmp_path):
    path = write(tmp_path, device="base = 1")
    _cfg, errors, _w = check_config(path)
    assert errors == ["%s:13: [points:d1] v: address 0 is below the device's base 1 (base = 1: "
                      "the first register is holding 1)" % path]


@pytest.mark.parametrize("text", ["465537 uint16", "holding 465537 uint16"])
def test_classic_form_out_of_range_says_out_of_range(tmp_path, text):
    path = write(tmp_path, points="v = " + text)
    _cfg, errors, _w = check_config(path)
    assert errors == ["%s:13: [points:d1] v: classic address 465537 is out of range: holding "
                      "registers are 40001..49999 (5 digits) or 400001..465536 (6 digits)" % path]


def test_classic_zero_is_out_of_range_too(tmp_path):
    _cfg, errors, _w = check_config(write(tmp_path, points="v = 40000 uint16"))
    assert len(errors) == 1 and "classic address 40000 is out of range" in errors[0]


@pytest.mark.parametrize("base, protocol, meant", [(0, 40001, 0), (1, 40000, 1)])
def test_table_and_classic_address_warns_what_it_reads(tmp_path, base, protocol, meant):
    path = write(tmp_path, device="base = %d" % base, points="v = holding 40001 uint16")
    cfg = load_config(path)                     # a warning, not an error
    assert cfg.devices[0].points[0].address == protocol
    warning = ("%s:13: [points:d1] v: holding 40001 reads holding register 40001 (protocol address "
               "%d); did you mean holding %d (40001 in the classic form)? Write `40001` without "
               "the table for the classic form" % (path, protocol, meant))
    assert cfg.warnings == [warning]
    r = run_check(path)
    assert r.returncode == 0 and "warning: " + warning in r.stderr


def test_no_warning_for_plain_addresses_or_the_classic_form(tmp_path):
    cfg = load_config(write(tmp_path, points="a = 40001 uint16\nb = holding 4001 uint16\n"
                                              "c = holding 30001 uint16\nd = input 9999 uint16"))
    assert cfg.warnings == []
    assert [(p.table, p.address) for p in cfg.devices[0].points] == [
        ("holding", 0), ("holding", 4001), ("holding", 30001), ("input", 9999)]


def test_the_warning_is_logged_by_run(tmp_path):
    """The running agent logs config warnings at start (agent/loop.py logs cfg.warnings)."""
    path = write(tmp_path, points="v = holding 40001 uint16")
    log_file = tmp_path / "agent.log"
    ini = tmp_path / "agent.ini"
    ini.write_text(ini.read_text().replace("id = t1\n", "id = t1\nlog_file = %s\n" % log_file))
    p = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", path], cwd=str(ROOT),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        text = ""
        while "reads holding register 40001" not in text and time.monotonic() < deadline:
            time.sleep(0.1)
            text = log_file.read_text() if log_file.exists() else ""
    finally:
        p.terminate()
        p.wait(10)
    assert "config: %s:14: [points:d1] v: holding 40001 reads holding register 40001" % path in text, text


# --- quoted values, a token holding " ;" ---------------------------------------------------


@pytest.mark.parametrize("line, token", [
    ('token = "ab ;cd #ef"', "ab ;cd #ef"),
    ('token = "ab ;cd"   ; a comment after the quotes', "ab ;cd"),
    ("token = ab;cd", "ab;cd"),                 # no space before ;: not a comment
    ("token = plain", "plain"),
])
def test_token_values(tmp_path, line, token):
    cfg = load_config(write(tmp_path, upload="[upload]\nurl = https://c.example/x\n" + line + "\n"))
    assert cfg.upload.token == token


@pytest.mark.parametrize("line", ["token = x7Q ;k9", "token = x7Q #k9", "token = x7Qk9   ; comment"])
def test_token_cut_by_a_comment_is_refused_and_not_shown(tmp_path, line):
    path = write(tmp_path, upload="[upload]\nurl = https://c.example/x\n" + line + "\n")
    _cfg, errors, _w = check_config(path)
    mark = line.split()[3][0]
    assert errors == ['%s:6: [upload] token: holds " %s", which starts a comment here, so the value '
                      'would be cut short; if it belongs to the value, put the whole value in double '
                      'quotes ("ab %scd"); if it is a comment, put it on a line of its own'
                      % (path, mark, mark)]
    r = run_check(path)
    assert r.returncode == 2 and "x7Q" not in r.stdout + r.stderr


def test_unterminated_quote_is_an_error(tmp_path):
    path = write(tmp_path, upload='[upload]\nurl = https://c.example/x\ntoken = "abc\n')
    _cfg, errors, _w = check_config(path)
    assert len(errors) == 1 and errors[0].startswith(path + ':6: [upload] token: a value that starts with "')
    assert "abc" not in errors[0]


def test_quotes_work_for_any_key_and_inline_comments_still_work(tmp_path):
    cfg = load_config(write(tmp_path, upload='[upload]\nurl = "https://c.example/x"  ; the collector\n',
                            points="v = holding 0 uint16 unit=V   ; volts"))
    assert cfg.upload.url == "https://c.example/x" and cfg.devices[0].points[0].unit == "V"


# --- secrets in URL queries ----------------------------------------------------------------

SECRET = "S3cr3tK3y9"


@pytest.mark.parametrize("url, shown", [
    ("https://c.example/api/v1/batches?api_key=%s&site=7" % SECRET,
     "https://c.example/api/v1/batches?api_key=***&site=7"),
    ("https://c.example/x?site=7&ApiKey=%s" % SECRET, "https://c.example/x?site=7&ApiKey=***"),
    ("https://c.example/x?access_token=%s&sig=%s&X-Amz-Signature=%s&auth=%s&pwd=%s" % ((SECRET,) * 5),
     "https://c.example/x?access_token=***&sig=***&X-Amz-Signature=***&auth=***&pwd=***"),
    ("https://u:%s@c.example/x?password=%s&page=2" % (SECRET, SECRET), "https://***@c.example/x?password=***&page=2"),
])
def test_redact_hides_secret_query_values_and_keeps_the_names(url, shown):
    assert redact(url) == shown


def test_redact_leaves_ordinary_words_alone():
    text = "signed applies to bit fields only (`bits A-B signed=yes`); monkey=1 keyboard=2"
    assert redact(text) == text


def test_check_does_not_print_a_query_secret(tmp_path):
    path = write(tmp_path, upload="[upload]\nurl = https://c.example/api/v1/batches?api_key=%s&site=7\n" % SECRET)
    r = run_check(path)
    assert r.returncode == 0, r.stderr
    assert "upload: https://c.example/api/v1/batches?api_key=***&site=7" in r.stdout
    assert SECRET not in r.stdout + r.stderr


def test_upload_failure_log_lines_do_not_show_a_query_secret(tmp_path, free_port, caplog):
    """A real connection attempt to a closed port on 127.0.0.1: requests' error text repeats the
    URL's path and query; neither the log line nor the status shows the key."""
    sp = Spool(tmp_path / "spool", "t1")
    sp.append(data_record("t1", 1.8e9, "m", 1, {"v": 1}))
    url = "http://127.0.0.1:%d/api/v1/batches?api_key=%s&site=7" % (free_port, SECRET)
    up = Uploader(url, "t1", timeout=1.0, backoff_max=0.1)
    with caplog.at_level(logging.INFO, logger="agent"):
        res = up.drain(sp, time.monotonic() + 5)
    sp.close()
    assert res["status"] == "backoff"
    lines = [r.getMessage() for r in caplog.records if "upload:" in r.getMessage()]
    assert lines and all(SECRET not in s for s in lines), lines
    assert any("api_key=***" in s for s in lines), lines
    assert SECRET not in str(up.state())


def test_sample_config_documents_quoting():
    text = (ROOT / "conf" / "agent.ini").read_text()
    assert 'token = "ab ;cd"' in textwrap.dedent(text)
