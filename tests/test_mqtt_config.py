"""[mqtt] without a broker: the config checks, topic templates, messages built from the spool's
bytes, `check` lines, the password kept out of every message, and the promise that an HTTP-only
agent never imports paho."""
import json
import subprocess
import sys

import pytest

from agent.config import ConfigError, check_config, load_config, redact
from agent.config.schema import MQTT_SCHEMA
from agent.mqtt import message
from agent.mqtt.topic import Template, TopicError, line_fields
from agent.mqtt.url import parse_url
from agent.record import data_record, encode, gap_record, health_record
from tests.conftest import ROOT

CONF = ROOT / "conf"

BASE = """[agent]
id = a1
spool_dir = {tmp}/spool

[connection:plc]
type = tcp
host = 127.0.0.1

[device:{device}]
connection = plc

[points:{device}]
v = holding 0 uint16
"""


def write(tmp_path, mqtt, device="meter1"):
    p = tmp_path / "agent.ini"
    p.write_text(BASE.format(tmp=tmp_path, device=device) + "\n[mqtt]\n" + mqtt)
    return str(p)


def errors_of(path):
    with pytest.raises(ConfigError) as e:
        load_config(path)
    return e.value.errors


# --- the config ----------------------------------------------------------------------------


def test_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "url = mqtt://127.0.0.1\n"))
    m = cfg.mqtt
    assert (m.url, m.client_id, m.topic, m.status_topic, m.qos, m.retain, m.batch, m.protocol) == (
        "mqtt://127.0.0.1", None, "modbus/{agent}/{device}", "modbus/{agent}/status", 1, False, False, "5")
    assert (m.keepalive, m.inflight, m.max_message_kb, m.batch_max_records, m.insecure) == (60, 20, 256, 100, False)
    assert m.quarantine_file == str(tmp_path / "spool" / "mqtt-quarantine.jsonl")
    assert parse_url(m.url) == (False, "127.0.0.1", 1883)
    assert parse_url("mqtts://broker.example.com") == (True, "broker.example.com", 8883)
    assert parse_url("mqtts://[::1]:8884") == (True, "::1", 8884)


@pytest.mark.parametrize("topic,why", [
    ("modbus/+/x", "wildcard '+'"),
    ("modbus/{agent}/#", "wildcard '#'"),
    ("modbus/{dev}", "unknown placeholder {dev}"),
    ("modbus/{agent", "expected '}'"),
])
def test_a_topic_that_cannot_be_published_is_an_error_naming_its_line(tmp_path, topic, why):
    errs = errors_of(write(tmp_path, "url = mqtt://127.0.0.1\ntopic = %s\n" % topic))
    assert len(errs) == 1 and "agent.ini:" in errs[0] and "[mqtt] topic" in errs[0] and why in errs[0], errs


def test_a_device_name_with_a_wildcard_is_an_error_when_the_topic_holds_it(tmp_path):
    errs = errors_of(write(tmp_path, "url = mqtt://127.0.0.1\n", device="m+1"))
    assert len(errs) == 1 and "[device:m+1]" in errs[0] and "wildcard" in errs[0], errs
    # without {device} in the topic the name is fine
    assert load_config(write(tmp_path, "url = mqtt://127.0.0.1\ntopic = site/{agent}\n", device="m+1")).mqtt


def test_bad_values(tmp_path):
    errs = errors_of(write(tmp_path, "url = http://x\nqos = 2\nprotocol = 4\nstatus_topic = s/{device}\n"
                                     "ca_file = /nonexistent/ca.pem\npassword = pw\n"))
    text = "\n".join(errs)
    assert "[mqtt] url: 'http://x' is not mqtt://host[:port]" in text
    assert "[mqtt] qos: must be between 0 and 1" in text
    assert "[mqtt] protocol: must be one of 5 | 3.1.1" in text
    assert "[mqtt] status_topic" in text and "only {agent}" in text
    assert "[mqtt] password: needs username" in text


def test_the_password_never_shows(tmp_path):
    path = write(tmp_path, "url = mqtt://user:hunter2@127.0.0.1\nusername = u\npassword = hunter2\n")
    errs = errors_of(path)
    assert all("hunter2" not in e for e in errs) and any("username / password" in e for e in errs), errs
    path = write(tmp_path, "url = mqtt://broker.example.com\nusername = u\npassword = hunter2\n")
    cfg, errors, warnings = check_config(path)
    assert errors == [] and any("clear text" in w for w in warnings)
    assert "hunter2" not in repr(cfg.mqtt) and "password='***'" in repr(cfg.mqtt)
    out = subprocess.run([sys.executable, "-m", "agent", "check", "-c", path], capture_output=True, text=True,
                         timeout=60, cwd=str(ROOT))
    assert out.returncode == 0, out.stderr
    assert "hunter2" not in out.stdout + out.stderr
    assert "user u with a password" in out.stdout
    assert "hunter2" not in redact("mqtt password=hunter2")


def test_check_says_what_is_published_where(tmp_path):
    path = write(tmp_path, "url = mqtts://127.0.0.1:8884\nca_file = %s\ntopic = site/{agent}/{device}/{kind}\n"
                           "batch = yes\nqos = 0\n" % (CONF / "agent.ini"))
    out = subprocess.run([sys.executable, "-m", "agent", "check", "-c", path], capture_output=True, text=True,
                         timeout=60, cwd=str(ROOT))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "mqtt: mqtts://127.0.0.1:8884 (TLS, CA %s)" % (CONF / "agent.ini") in text
    assert "qos 0 (at most once" in text and "one message per batch of up to 100 records" in text
    assert "readings meter1 -> site/a1/meter1/reading" in text
    assert "health records -> site/a1/meter1/health, gap records -> site/a1/-/gap" in text
    assert 'status topic modbus/a1/status: "online" retained' in text


def test_the_sample_comments_every_key():
    text = (CONF / "agent.ini").read_text()
    sec = text.split("\n[mqtt]\n", 1)[1].split("\n[", 1)[0]
    lines = sec.splitlines()
    for key in MQTT_SCHEMA:
        i = next((n for n, line in enumerate(lines) if line.startswith(key + " =")), None)
        assert i is not None, key
        assert lines[i - 1].startswith(";") or lines[i - 1].split(" =")[0] in MQTT_SCHEMA, key
    cfg, errors, warnings = check_config(str(CONF / "agent.ini"))
    assert errors == [] and warnings == [] and cfg.mqtt.url == "mqtts://broker.example.com:8883"


# --- paho only with [mqtt] -----------------------------------------------------------------


PROBE = """
import sys
from agent.config import load_config
from agent.loop import Loop
cfg = load_config(sys.argv[1])
loop = Loop(cfg)
names = [o.name for o in loop.outputs]
loop.shutdown()
print(names, any(m == "paho" or m.startswith("paho.") for m in sys.modules))
"""


def test_an_http_only_agent_never_imports_paho(tmp_path):
    ini = tmp_path / "http.ini"
    ini.write_text(BASE.format(tmp=tmp_path, device="meter1") + "\n[upload]\nurl = http://127.0.0.1:9/x\n")
    out = subprocess.run([sys.executable, "-c", PROBE, str(ini)], capture_output=True, text=True, timeout=60,
                         cwd=str(ROOT))
    assert out.stdout.split() == ["['http']", "False"], out.stderr
    # `check` of an [mqtt] config does not need it either; a running [mqtt] agent does
    mq = write(tmp_path, "url = mqtt://127.0.0.1:9\nconnect_timeout = 1s\n")
    out = subprocess.run([sys.executable, "-c", PROBE, mq], capture_output=True, text=True, timeout=60,
                         cwd=str(ROOT))
    assert out.stdout.split() == ["['mqtt']", "True"], out.stderr


# --- topics and messages (pure) ------------------------------------------------------------


def lines_of(*recs):
    out = []
    for i, r in enumerate(recs, 1):
        r["seq"] = i
        out.append(encode(r).rstrip(b"\n"))
    return out


def test_topic_fields_are_sliced_from_the_line():
    t = 1.8e9
    lines = lines_of(data_record("a1", t, "meter/1", 3, {"v": 1}), health_record("a1", t, "m2", 4, {}),
                     gap_record("a1", t, 3, 1, 3, None, None, "full"), data_record("old-id", t, "é", 7, {}))
    assert [line_fields(x, "a1") for x in lines] == [
        ("a1", "meter/1", 3, "reading"), ("a1", "m2", 4, "health"), ("a1", "-", "", "gap"),
        ("old-id", "é", 7, "reading")]
    tmpl = Template("x/{agent}/{device}/{unit}/{kind}")
    assert [tmpl.for_line(x, "a1") for x in lines] == [
        "x/a1/meter/1/3/reading", "x/a1/m2/4/health", "x/a1/-/_/gap", "x/old-id/é/7/reading"]
    # a value from an older config that would put a wildcard in the topic is made safe
    assert tmpl.render("a1", "m+1", 1) == "x/a1/m_1/1/reading"
    with pytest.raises(TopicError):
        Template("a/#")


def test_messages_are_the_spool_lines_as_they_are():
    lines = lines_of(*[data_record("a1", 1.8e9, "m%d" % (i % 2), 1, {"v": i}) for i in range(6)])
    tmpl = Template("t/{device}")
    per = message.plan(lines, lambda x: tmpl.for_line(x, "a1"), False, 1 << 20)
    assert [m.payload for m in per.messages] == lines and per.too_big is None
    assert [(m.first, m.count) for m in per.messages] == [(i, 1) for i in range(6)]
    # batch = yes with interleaved devices: one array per topic, each in seq order
    grouped = message.plan(lines, lambda x: tmpl.for_line(x, "a1"), True, 1 << 20)
    assert [(m.topic, m.first, m.count) for m in grouped.messages] == [("t/m0", 0, 3), ("t/m1", 1, 3)]
    assert grouped.messages[1].payload == b"[" + b",".join(lines[1::2]) + b"]"
    # batch = yes: consecutive records of one topic become one JSON array of the same bytes
    same = Template("t/{agent}")
    arr = message.plan(lines, lambda x: same.for_line(x, "a1"), True, 1 << 20)
    assert len(arr.messages) == 1 and arr.messages[0].payload == b"[" + b",".join(lines) + b"]"
    assert [r["seq"] for r in json.loads(arr.messages[0].payload)] == list(range(1, 7))
    # cut to the size limit, never a record split
    limit = message.PACKET_OVERHEAD + len("t/a1") + 2 * len(lines[0]) + 4
    cut = message.plan(lines, lambda x: same.for_line(x, "a1"), True, limit)
    assert [m.count for m in cut.messages] == [2, 2, 2]
    assert b"".join(m.payload for m in cut.messages).count(b'"seq"') == 6
    # one record bigger than the limit: the plan stops before it
    big = lines[:2] + [lines[2] + b" " * 500] + lines[3:]
    p = message.plan(big, lambda x: same.for_line(x, "a1"), False, 400)
    assert [m.first for m in p.messages] == [0, 1] and p.too_big == (2, len(big[2]))
