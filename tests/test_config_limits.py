"""Config limits shared with the collector (r8) and secrets kept out of every error text (r12b)."""
import logging

import pytest

from agent.collector.validate import MAX_NAME, Invalid, record_row
from agent.config import ConfigError, check_config, load_config, redact
from agent.record import data_record, encode

TOKEN = "9f8e7d6c5b4a39281706f5e4d3c2b1a0"


def write(tmp_path, text):
    p = tmp_path / "a.ini"
    p.write_text(text)
    return str(p)


def device_ini(tmp_path, name):
    return write(tmp_path, """[agent]
id = site7
spool_dir = %s/spool
[connection:plc]
type = tcp
host = 127.0.0.1
[device:%s]
connection = plc
[points:%s]
v = holding 0 uint16
""" % (tmp_path, name, name))


def collector_accepts(name):
    rec = data_record("site7", 1.8e9, name, 1, {"v": 1})
    rec["seq"] = 1
    line = encode(rec).decode().strip()
    try:
        record_row(rec, line, "site7", 0, "$.records[0]", 8)
        return True
    except Invalid:
        return False


def test_device_name_the_collector_rejects_is_a_config_error(tmp_path):
    name = "m" * (MAX_NAME + 2)
    assert not collector_accepts(name)
    path = device_ini(tmp_path, name)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.errors[0].startswith("%s:7: [device:%s]: " % (path, name))
    assert "130 characters" in e.value.errors[0] and "at most 128" in e.value.errors[0]


def test_longest_device_name_the_collector_takes_is_accepted(tmp_path):
    name = "m" * MAX_NAME
    assert collector_accepts(name)
    assert load_config(device_ini(tmp_path, name)).devices[0].name == name


@pytest.mark.parametrize("name", ['meter"1', "meter\\1", "meter\x011"])
def test_device_name_with_quotes_or_control_characters_is_rejected(tmp_path, name):
    with pytest.raises(ConfigError) as e:
        load_config(device_ini(tmp_path, name))
    assert any("quotes, backslashes or control characters" in x for x in e.value.errors)


@pytest.mark.parametrize("agent_id", ["a" * 65, "site 7", "-site7", "site7/x"])
def test_agent_id_outside_the_collector_limits_is_rejected(tmp_path, agent_id):
    path = write(tmp_path, "[agent]\nid = %s\n" % agent_id)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.errors[0].startswith("%s:2: [agent] id: " % path)


# --- secrets ---------------------------------------------------------------------------------


def test_token_line_without_equals_is_not_echoed(tmp_path):
    """r12b: `token: SECRET` (a colon instead of `=`) came back whole in the error (logread on
    SIGHUP); so did `token SECRET`."""
    path = write(tmp_path, "[agent]\nid = site7\n[upload]\nurl = https://c.example/api/v1/batches\n"
                           "token: %s\ntoken %s\ntokn = %s\n" % (TOKEN, TOKEN, TOKEN))
    cfg, errors, warnings = check_config(path)
    assert len(errors) == 3
    assert errors[0] == ("%s:5: [upload]: expected `key = value`, got a line starting with 'token' "
                         "(rest not shown)" % path)
    assert all(TOKEN not in e for e in errors + warnings), errors


def test_url_credentials_are_not_echoed(tmp_path):
    path = write(tmp_path, "[agent]\nid = site7\n[upload]\nurl = ftp://ingest:S3cretPassw0rd@c.example/x\n")
    _cfg, errors, _w = check_config(path)
    assert errors and all("S3cretPassw0rd" not in e for e in errors), errors
    assert "ftp://***@c.example/x" in errors[0]


def test_reload_logs_config_errors_without_the_token(tmp_path, caplog):
    """On SIGHUP the errors go to the log: the same texts, redacted."""
    from agent.loop import Loop

    path = write(tmp_path, "[agent]\nid = site7\nspool_dir = %s/spool\nstatus_file = %s/st.json\n"
                           "[upload]\nurl = http://127.0.0.1:9/api/v1/batches\ntoken = %s\n"
                 % (tmp_path, tmp_path, TOKEN))
    loop = Loop(load_config(path))
    try:
        with open(path, "a") as f:
            f.write("token: %s\n" % TOKEN)
        with caplog.at_level(logging.ERROR, logger="agent.loop"):
            loop.reload()
    finally:
        loop.shutdown()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "expected `key = value`" in text and TOKEN not in text


@pytest.mark.parametrize("text, shown", [
    ("got 'token: abc123'", "got 'token: ***'"),
    ("password=hunter2 and more", "password=*** and more"),
    ("db_secret = 'x y z' next", "db_secret = *** next"),
    ("postgresql://ingest:pw@db.example/modbus", "postgresql://***@db.example/modbus"),
    # '@' inside the password: the userinfo runs to the last '@' (review: 't-pass' was shown)
    ("http://site7:s3cr@t-pass@host/api/v1/batches", "http://***@host/api/v1/batches"),
    ("upload: https://site7:a@b@c@collector.example:8443/api/v1/batches down",
     "upload: https://***@collector.example:8443/api/v1/batches down"),
    ("https://tok@h/x and http://h2/y", "https://***@h/x and http://h2/y"),
    ("http://127.0.0.1:8080/api/v1/batches", "http://127.0.0.1:8080/api/v1/batches"),
    ("token too short (at least 16 characters)", "token too short (at least 16 characters)"),
    ("unknown option (did you mean 'token'?)", "unknown option (did you mean 'token'?)"),
])
def test_redact(text, shown):
    assert redact(text) == shown
