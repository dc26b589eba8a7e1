"""The MQTT output against a real broker (mosquitto, tests/brokers.py): delivery from the spool
with its own cursor, TLS, the password file, and each bad input as one clear log line and a
status field with nothing lost. One broker for the module."""
import json
import logging
import os
import socket
import time

import pytest

from agent.config.schema import MqttSettings
from agent.mqtt.output import MqttOutput
from agent.record import data_record
from agent.spool import Spool
from tests.brokers import PASSWORD, USER, Auditor, Mosquitto, Relay

pytestmark = pytest.mark.skipif(Mosquitto.skip_reason() is not None, reason=str(Mosquitto.skip_reason()))

BROKER_MAX_PACKET = 64 * 1024


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    b = Mosquitto(tmp_path_factory.mktemp("broker"), extra="max_packet_size %d" % BROKER_MAX_PACKET)
    try:
        b.start()
    except (RuntimeError, OSError) as e:
        pytest.skip("mosquitto cannot start here: %s" % e)
    yield b
    b.stop()


@pytest.fixture(scope="module")
def auditor(broker):
    a = Auditor(broker).start()
    yield a
    a.stop()


def settings(broker, tmp_path, tls=False, **kw):
    kw.setdefault("username", USER)
    kw.setdefault("password", PASSWORD)
    kw.setdefault("backoff_max", 0.5)
    kw.setdefault("connect_timeout", 2.0)
    return MqttSettings(url=broker.url(tls), ca_file=broker.certs["ca"] if tls else None,
                        quarantine_file=str(tmp_path / "mqtt-quarantine.jsonl"), **kw)


def spool_with(tmp_path, agent, n, size=0):
    sp = Spool(str(tmp_path / "spool"), agent, outputs=("mqtt",))
    for i in range(n):
        sp.append(data_record(agent, time.time(), "meter1", 1, {"v": i, "pad": "x" * size}))
    return sp


def drive(out, sp, seconds=5.0, until_empty=True):
    """Give `out` gaps of 100 ms until the spool is empty for it (or `seconds` pass)."""
    end = time.monotonic() + seconds
    res = None
    while time.monotonic() < end:
        res = out.fill_gap(sp, time.monotonic() + 0.1)
        if until_empty and res["status"] == "empty" and sp.stats()["outputs"]["mqtt"]["records"] == 0:
            return res
        if res["status"] == "backoff":
            time.sleep(0.02)
    return res


def wait_seqs(auditor, agent, n, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end and len(auditor.seqs(agent)) < n:
        time.sleep(0.02)
    return auditor.seqs(agent)


def spool_lines(sp):
    b = sp.peek(10000, 1 << 30, output="mqtt")
    return [] if b is None else b.lines


@pytest.mark.parametrize("tls", [False, True], ids=["mqtt", "mqtts"])
def test_every_record_published_once_as_spooled(broker, auditor, tmp_path, tls):
    agent = "pub-tls" if tls else "pub-plain"
    sp = spool_with(tmp_path, agent, 250)
    lines = spool_lines(sp)
    kw = {"cert_file": broker.certs["client_cert"], "key_file": broker.certs["client_key"]} if tls else {}
    out = MqttOutput(settings(broker, tmp_path, tls, **kw), agent)
    try:
        res = drive(out, sp)
        assert res["status"] == "empty", out.state()
        st = out.state()
        assert st["connected"] and st["sent_total"] == 250 and st["messages_total"] == 250, st
        assert st["last_error"] is None and st["resent_total"] == 0
        seqs = wait_seqs(auditor, agent, 250)
        assert seqs == set(range(1, 251)) and not auditor.duplicates(agent)
        with auditor.lock:
            got = [p for t, p in auditor.messages if t == "modbus/%s/meter1" % agent]
        assert got and all(p in lines for p in got)       # the spool's bytes, not re-encoded
    finally:
        out.close()
        sp.close()
    end = time.monotonic() + 3
    while time.monotonic() < end and (("modbus/%s/status" % agent, b"offline", False) not in auditor.status):
        time.sleep(0.02)
    assert ("modbus/%s/status" % agent, b"online", False) in auditor.status
    assert ("modbus/%s/status" % agent, b"offline", False) in auditor.status


def test_batch_messages_are_json_arrays_of_the_spool_lines(broker, auditor, tmp_path):
    agent = "pub-batch"
    sp = spool_with(tmp_path, agent, 120)
    lines = spool_lines(sp)
    out = MqttOutput(settings(broker, tmp_path, batch=True, batch_max_records=50, topic="batch/{agent}"), agent)
    sub = Auditor(broker, topic="batch/#", client_id="batch-auditor").start()
    try:
        assert drive(out, sp)["status"] == "empty"
        assert out.state()["messages_total"] == 3 and out.state()["sent_total"] == 120
        assert wait_seqs(sub, agent, 120) == set(range(1, 121))
        with sub.lock:
            payloads = [p for _t, p in sub.messages]
        assert payloads[0] == b"[" + b",".join(lines[:50]) + b"]"
    finally:
        sub.stop()
        out.close()
        sp.close()


def test_a_wrong_password_is_one_line_per_backoff_step_and_loses_nothing(broker, auditor, tmp_path, caplog):
    agent = "bad-pw"
    sp = spool_with(tmp_path, agent, 30)
    out = MqttOutput(settings(broker, tmp_path, password="wrong-" + PASSWORD, backoff_max=0.3), agent)
    caplog.set_level(logging.INFO, "agent.mqtt")
    t0 = time.monotonic()
    drive(out, sp, seconds=1.5, until_empty=False)
    assert time.monotonic() - t0 < 4.0
    st = out.state()
    lines = [r.getMessage() for r in caplog.records if "refused the connection" in r.getMessage()]
    assert st["failures_total"] >= 3 and len(lines) == st["failures_total"], (st, lines)
    assert all(r.levelno == logging.ERROR for r in caplog.records if "refused the connection" in r.getMessage())
    assert "CONNACK Not authorized" in st["last_error"] and "username / password" in st["last_error"]
    assert PASSWORD not in "\n".join(r.getMessage() for r in caplog.records) + json.dumps(st)
    assert not st["connected"] and sp.stats()["outputs"]["mqtt"]["records"] == 30
    out.close()
    # the right password: everything goes
    out = MqttOutput(settings(broker, tmp_path), agent)
    try:
        assert drive(out, sp)["status"] == "empty"
        assert wait_seqs(auditor, agent, 30) == set(range(1, 31))
    finally:
        out.close()
        sp.close()


def test_tls_with_the_wrong_ca_says_so(broker, tmp_path):
    sp = spool_with(tmp_path, "bad-ca", 3)
    s = settings(broker, tmp_path, tls=True)
    s.ca_file = broker.certs["other_ca"]
    out = MqttOutput(s, "bad-ca")
    try:
        assert out.fill_gap(sp, time.monotonic() + 1.0)["status"] == "backoff"
        err = out.state()["last_error"]
        assert "certificate verify failed" in err and "ca_file" in err, err
        assert sp.stats()["outputs"]["mqtt"]["records"] == 3
    finally:
        out.close()
        sp.close()


def test_an_unreachable_or_silent_broker_never_holds_the_loop(broker, tmp_path):
    """A refused port backs off at once; a broker that accepts and never answers costs each gap
    no more than the gap (the connect goes on in the next one) and fails at connect_timeout."""
    sp = spool_with(tmp_path, "unreach", 3)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    s = settings(broker, tmp_path)
    s.url = "mqtt://127.0.0.1:%d" % port
    out = MqttOutput(s, "unreach")
    assert out.fill_gap(sp, time.monotonic() + 1.0)["status"] == "backoff"
    assert "Connection refused" in out.state()["last_error"], out.state()
    out.close()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    s.url = "mqtt://127.0.0.1:%d" % silent.getsockname()[1]
    s.connect_timeout = 0.6
    out = MqttOutput(s, "silent")
    try:
        late = []
        end = time.monotonic() + 1.2
        while time.monotonic() < end:
            until = time.monotonic() + 0.1
            out.fill_gap(sp, until)
            late.append(time.monotonic() - until)
        assert max(late) < 0.25, late      # (generous: a loaded machine; the connect_timeout is 0.6s)
        assert "no CONNACK within [mqtt] connect_timeout = 0.6s" in out.state()["last_error"]
        assert sp.stats()["outputs"]["mqtt"]["records"] == 3
    finally:
        out.close()
        silent.close()
        sp.close()


def test_records_too_big_to_publish_are_quarantined_and_the_rest_goes(broker, auditor, tmp_path, caplog):
    """Above [mqtt] max_message_kb, or above the broker's Maximum Packet Size (CONNACK): the
    record is quarantined with the reason (agent.upload.quarantine), the queue moves on."""
    agent = "big"
    sp = Spool(str(tmp_path / "spool"), agent, outputs=("mqtt",))
    for i, pad in enumerate((10, 3000, 10, BROKER_MAX_PACKET + 10, 10)):
        sp.append(data_record(agent, time.time(), "meter1", 1, {"v": i, "pad": "x" * pad}))
    caplog.set_level(logging.INFO)
    out = MqttOutput(settings(broker, tmp_path, max_message_kb=2 * 1024), agent)
    out2 = None
    try:
        assert drive(out, sp)["status"] == "empty"
        q = [json.loads(x) for x in (tmp_path / "mqtt-quarantine.jsonl").read_text().splitlines()]
        assert [r["record"]["seq"] for r in q] == [4]
        assert "broker's maximum packet size (65536 bytes)" in q[0]["reason"]
        assert out.state()["quarantined_total"] == 1 and out.state()["broker_max_packet"] == BROKER_MAX_PACKET
        for i in range(2):
            sp.append(data_record(agent, time.time(), "meter1", 1, {"v": i, "pad": "y" * 3000}))
        out2 = MqttOutput(settings(broker, tmp_path, max_message_kb=2), agent)
        assert drive(out2, sp)["status"] == "empty"
        q = [json.loads(x) for x in (tmp_path / "mqtt-quarantine.jsonl").read_text().splitlines()]
        assert [r["record"]["seq"] for r in q] == [4, 6, 7] and "[mqtt] max_message_kb" in q[1]["reason"]
        assert wait_seqs(auditor, agent, 4) == {1, 2, 3, 5}
        assert any("mqtt: quarantined 1 records seq 4..4" in r.getMessage() for r in caplog.records)
    finally:
        out.close()
        if out2 is not None:
            out2.close()
        sp.close()


def test_a_broker_that_drops_the_connection_over_a_big_message_gets_a_hint(tmp_path, caplog):
    """mosquitto closes the connection for a message above its message_size_limit (no PUBACK,
    no reason the client can read): after LOST_STREAK losses over the same records the ERROR says
    what to do (and the back-off grows: reconnecting is not progress); nothing is lost, and max_message_kb below the limit quarantines only that one."""
    b = Mosquitto(tmp_path / "small-broker", extra="message_size_limit 1500")
    try:
        b.start()
    except (RuntimeError, OSError) as e:
        pytest.skip("mosquitto cannot start here: %s" % e)
    sp = Spool(str(tmp_path / "spool"), "limit", outputs=("mqtt",))
    for pad in (10, 3000, 10):
        sp.append(data_record("limit", time.time(), "meter1", 1, {"pad": "x" * pad}))
    caplog.set_level(logging.INFO, "agent.mqtt")
    out = MqttOutput(settings(b, tmp_path, backoff_max=0.1), "limit")
    out2 = None
    try:
        end = time.monotonic() + 8
        while time.monotonic() < end and "message_size_limit" not in (out.state()["last_error"] or ""):
            out.fill_gap(sp, time.monotonic() + 0.1)
            time.sleep(0.02)
        st = out.state()
        assert st["consecutive_failures"] >= 3 and "message_size_limit" in (st["last_error"] or "") and "max_message_kb" in st["last_error"], st
        assert any(r.levelno == logging.ERROR and "message_size_limit" in r.getMessage() for r in caplog.records)
        assert sp.stats()["outputs"]["mqtt"]["records"] == 2      # seq 1 went before the big one
        out.close()
        out2 = MqttOutput(settings(b, tmp_path, max_message_kb=1), "limit")
        assert drive(out2, sp)["status"] == "empty"
        q = [json.loads(x) for x in (tmp_path / "mqtt-quarantine.jsonl").read_text().splitlines()]
        assert [r["record"]["seq"] for r in q] == [2] and out2.state()["sent_total"] == 1
    finally:
        out.close()
        if out2 is not None:
            out2.close()
        sp.close()
        b.stop()


def test_the_window_is_bounded(broker, tmp_path):
    class Spy(MqttOutput):
        seen = []

        def _on_publish(self, mid, reason):
            self.seen.append(self._session.client._inflight_messages)     # paho's own count
            super()._on_publish(mid, reason)

    sp = spool_with(tmp_path, "window", 200)
    out = Spy(settings(broker, tmp_path, inflight=5, batch_max_records=200), "window")
    try:
        assert drive(out, sp)["status"] == "empty"
        assert out.state()["sent_total"] == 200 and len(out.seen) >= 200 and max(out.seen) <= 5, max(out.seen)
    finally:
        out.close()
        sp.close()


def test_a_reset_mid_publish_resends_only_what_was_not_acknowledged(broker, auditor, tmp_path, caplog):
    agent = "reset"
    n = 3000
    sp = spool_with(tmp_path, agent, n)
    relay = Relay(broker.port)
    s = settings(broker, tmp_path, batch_max_records=100, inflight=50)
    s.url = "mqtt://127.0.0.1:%d" % relay.port
    caplog.set_level(logging.INFO, "agent.mqtt")
    out = MqttOutput(s, agent)
    try:
        end = time.monotonic() + 20
        while time.monotonic() < end and sp.stats()["outputs"]["mqtt"]["records"]:
            out.fill_gap(sp, time.monotonic() + 0.05)
            sent = out.state()["sent_total"]
            if relay.resets < 3 and sent >= (relay.resets + 1) * 700 and out.state()["inflight"]:
                relay.reset()       # in the middle of a batch: some PUBACKs never come
        assert relay.resets == 3 and sp.stats()["outputs"]["mqtt"]["records"] == 0
        got = wait_seqs(auditor, agent, n)
        assert got == set(range(1, n + 1))
        resent = set()
        for r in caplog.records:
            m = r.getMessage()
            if m.startswith("mqtt: sending again seq "):
                lo, hi = m.split("seq ")[1].split(" ")[0].split("..")
                resent.update(range(int(lo), int(hi) + 1))
        dups = auditor.duplicates(agent)
        assert set(dups) <= resent, sorted(set(dups) - resent)[:10]
        assert all(c == 2 for c in dups.values())
        assert out.state()["resent_total"] >= len(dups)
        print("reset audit: %d records, %d resets, %d resent, %d duplicates" % (
            n, relay.resets, len(resent), len(dups)))
    finally:
        out.close()
        relay.close()
        sp.close()


def test_status_file_and_reload_add_the_mqtt_output_with_the_backlog(broker, auditor, tmp_path):
    """SIGHUP adding [mqtt]: the spool gets a cursor for it (the backlog held is published),
    the status file's "outputs" map says connected, backlog and last error."""
    from agent.config import load_config
    from agent.loop import Loop

    agent = "reload"
    ini = tmp_path / "agent.ini"
    head = "[agent]\nid = %s\nspool_dir = %s\nstatus_file = %s\n" % (agent, tmp_path / "spool", tmp_path / "st.json")
    ini.write_text(head)
    loop = Loop(load_config(str(ini)))
    try:
        for i in range(20):
            loop.append(data_record(agent, time.time(), "m", 1, {"v": i}))
        first = loop.spool.next_seq - 20    # a fresh spool starts at the clock in ms
        assert [o.name for o in loop.outputs] == []
        ini.write_text(head + "[mqtt]\nurl = %s\nusername = %s\npassword = %s\nbackoff_max = 1s\n" % (
            broker.url(), USER, PASSWORD))
        loop.reload()
        assert [o.name for o in loop.outputs] == ["mqtt"] and loop.spool.outputs == ("mqtt",)
        end = time.monotonic() + 5
        while time.monotonic() < end and loop.spool.stats()["outputs"]["mqtt"]["records"]:
            loop.upload_until(loop.mono() + 0.2)
        assert wait_seqs(auditor, agent, 20) == set(range(first, first + 20))
        loop.write_status()
        st = json.loads((tmp_path / "st.json").read_text())["outputs"]["mqtt"]
        assert st["connected"] and st["backlog"]["records"] == 0 and st["last_error"] is None
        assert st["sent_total"] == 20 and PASSWORD not in json.dumps(st)
        # a changed [mqtt] key rebuilds it; a wrong password shows in the status, nothing lost
        ini.write_text(head + "[mqtt]\nurl = %s\nusername = %s\npassword = nope\nbackoff_max = 1s\n" % (
            broker.url(), USER))
        loop.reload()
        loop.append(data_record(agent, time.time(), "m", 1, {"v": 99}))
        loop.upload_until(loop.mono() + 0.5)
        loop.write_status()
        st = json.loads((tmp_path / "st.json").read_text())["outputs"]["mqtt"]
        assert not st["connected"] and "Not authorized" in st["last_error"] and st["backlog"]["records"] == 1
        from agent.status import format_status

        text = format_status(json.loads((tmp_path / "st.json").read_text()))
        assert "output mqtt: NOT connected; backlog 1 records" in text and "Not authorized" in text
        # adding [upload] to the MQTT-only agent: the spool gets the "http" cursor too
        ini.write_text(ini.read_text() + "[upload]\nurl = http://127.0.0.1:9/api/v1/batches\n")
        loop.reload()
        assert [o.name for o in loop.outputs] == ["http", "mqtt"] and loop.spool.outputs == ("http", "mqtt")
        assert loop.spool.stats()["outputs"]["http"]["records"] >= 1
    finally:
        loop.shutdown()
    assert os.path.exists(tmp_path / "spool")
