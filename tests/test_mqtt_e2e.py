"""End to end with MQTT: simulator -> agent process (HTTP and MQTT enabled together) -> fault proxy
-> collector, and -> relay -> mosquitto -> a subscriber with a persistent session; the zero-loss
audit for both outputs after broker restarts, a broker kill -9, a network reset mid-publish and
agent SIGKILLs (tests/test_e2e.py's audit for HTTP; here the same for MQTT).

The MQTT audit: every seq the agent generated reached the subscriber (at least once), and every
duplicate is a resend of a record the spool had not acknowledged for MQTT: inside a range the
agent logged as "sending again seq A..B" (a connection lost with a batch in flight), or inside
the first batch a restarted agent published ("publishing from seq N": the batch in flight when
it was killed). Shortened by default; FULL=1 runs more rounds.
"""
import json
import re
import time

import pytest

from tests.brokers import PASSWORD, USER, Auditor, Mosquitto, Relay
from tests.test_e2e import AGENT, E2E, FULL, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300 if FULL else 120),
              pytest.mark.skipif(Mosquitto.skip_reason() is not None, reason=str(Mosquitto.skip_reason()))]

BATCH = 20


class MqttE2E(E2E):
    def __init__(self, tmp_path, broker, relay):
        self.broker, self.relay = broker, relay
        super().__init__(tmp_path, changes={
            ("mqtt", "url"): "mqtt://127.0.0.1:%d" % relay.port,
            ("mqtt", "username"): USER, ("mqtt", "password"): PASSWORD,
            ("mqtt", "batch_max_records"): str(BATCH), ("mqtt", "inflight"): "10",
            ("mqtt", "backoff_max"): "1s", ("mqtt", "connect_timeout"): "2s", ("mqtt", "keepalive"): "5s"})

    def drain_mqtt(self, auditor, timeout=60):
        """The agent is stopped: a device-less agent with both outputs on the same spool until
        neither has a backlog (the HTTP audit's own drain then retires the MQTT cursor)."""
        a = self.site.run
        ini = a / "drain-mqtt.ini"
        status = a / "drain-mqtt.json"
        ini.write_text("\n".join([
            "[agent]", "id = %s" % AGENT, "spool_dir = %s" % self.spool_dir, "status_file = %s" % status,
            "[upload]", "url = http://127.0.0.1:%d/api/v1/batches" % self.proxy.port, "backoff_max = 1s",
            "[mqtt]", "url = %s" % self.broker.url(), "username = %s" % USER, "password = %s" % PASSWORD,
            "backoff_max = 1s", ""]))
        proc = self.site.start_agent_with(ini, "drain-mqtt")

        def drained():
            try:
                st = json.loads(status.read_text())
            except (OSError, ValueError):
                return False
            outs = st.get("outputs") or {}
            return all((outs.get(n) or {}).get("backlog", {}).get("records", 1) == 0 for n in ("http", "mqtt"))
        try:
            wait_for(lambda: drained() or not proc.alive(), timeout, "both outputs to drain", 0.3)
            assert proc.alive(), proc.tail()
        finally:
            rc = self.site.procs.pop("drain-mqtt").stop(timeout=20)
        assert rc == 0, proc.tail()
        return self.spool_next_seq()

    def allowed_resends(self):
        """Seq ranges the agent's logs say it published again without their acknowledgement."""
        ranges = []
        for name in ("agent", "drain-mqtt"):
            log = self.site.run / ("%s.log" % name)
            if not log.exists():
                continue
            for line in log.read_text(errors="replace").splitlines():
                m = re.search(r"mqtt: sending again seq (\d+)\.\.(\d+)", line)
                if m:
                    ranges.append((int(m.group(1)), int(m.group(2))))
                m = re.search(r"mqtt: publishing from seq (\d+)", line)
                if m:
                    ranges.append((int(m.group(1)), int(m.group(1)) + BATCH - 1))
        return ranges

    def mqtt_audit(self, auditor):
        next_seq = self.drain_mqtt(auditor)
        generated = set(range(self.spool_next_seq("origin_seq"), next_seq))
        wait_for(lambda: auditor.seqs(AGENT) >= generated, 20, "every seq at the subscriber", 0.2)
        got = auditor.seqs(AGENT)
        assert got <= generated, sorted(got - generated)[:10]
        missing = generated - got
        assert not missing, "lost on the way to MQTT: %s" % sorted(missing)[:20]
        dups = auditor.duplicates(AGENT)
        ranges = self.allowed_resends()
        unexplained = [s for s in dups if not any(lo <= s <= hi for lo, hi in ranges)]
        assert not unexplained, "duplicates that are not resends of unacknowledged records: %s" % unexplained[:10]
        summary = {"generated": len(generated), "received": len(got), "duplicates": len(dups),
                   "resend_ranges": len(ranges), "broker_redelivered": auditor.redelivered}
        print("mqtt audit:", json.dumps(summary))
        return summary


@pytest.fixture
def broker(tmp_path):
    b = Mosquitto(tmp_path / "broker")
    try:
        b.start()
    except (RuntimeError, OSError) as e:
        pytest.skip("mosquitto cannot start here: %s" % e)
    yield b
    b.stop()


def test_zero_loss_with_http_and_mqtt_through_broker_restarts_kills_resets_and_agent_sigkills(tmp_path, broker):
    auditor = Auditor(broker).start()
    relay = Relay(broker.port)
    e = MqttE2E(tmp_path, broker, relay)
    try:
        e.start_agent()
        e.wait_stored(5)
        wait_for(lambda: len(auditor.seqs(AGENT)) >= 5, 30, "records at the subscriber", 0.1)
        rounds = 3 if FULL else 1
        for _ in range(rounds):
            # a clean broker restart, then a kill -9: HTTP goes on meanwhile at its own pace
            for fault in ("restart", "kill9"):
                stored = len(e.stored())
                if fault == "restart":
                    broker.stop()
                else:
                    broker.kill9()
                time.sleep(1.5)
                assert len(e.stored()) > stored, "HTTP waited for MQTT"
                broker.start()
                n = len(auditor.seqs(AGENT))
                wait_for(lambda n=n: len(auditor.seqs(AGENT)) > n + 3, 30, "MQTT back after %s" % fault, 0.1)
            # a reset in the middle of a publish
            n = len(auditor.seqs(AGENT))
            relay.reset()
            wait_for(lambda n=n: len(auditor.seqs(AGENT)) > n + 3, 30, "MQTT back after a reset", 0.1)
            # the agent killed, then started again
            with auditor.lock:
                seen = len(auditor.status)
            assert auditor.status[-1][1] == b"online"
            e.kill_agent()
            wait_for(lambda seen=seen: any(p == b"offline" for _t, p, _r in auditor.status[seen:]), 10,
                     "the Last Will after a SIGKILL", 0.05)
            e.start_agent()
            n = len(auditor.seqs(AGENT))
            wait_for(lambda n=n: len(auditor.seqs(AGENT)) > n + 3, 30, "MQTT after the restart", 0.1)
        e.stop_agent()
        m = e.mqtt_audit(auditor)
        s = e.audit()
        assert s["missing"] == 0 and m["generated"] == s["generated"]
        assert auditor.status[-1][1] == b"offline"
    finally:
        auditor.stop()
        relay.close()
        e.close()
