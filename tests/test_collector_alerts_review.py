"""Defects found reviewing the alerts as an operator would (rev13): a real agent's health records
once its spool has drained, and a collector that was down itself."""
from agent.collector.alerts import attach
from agent.collector.app import CollectorApp
from agent.collector.config import load_config
from agent.collector.store import open_store
from agent.record import health_record
from tests.test_collector_alerts import T0, Sim, reading, write_ini

BACKLOG = """
[alert:behind]
kind = backlog
older_than = 1h
[notify:hook]
url = http://127.0.0.1:9/x
"""

SILENT = """
[alert:quiet]
kind = silent
for = 10m
[notify:hook]
url = http://127.0.0.1:9/x
"""


class SimAt(Sim):
    """A collector process that starts at `at` (on the simulated clock)."""

    def __init__(self, path, db_url, at):
        self.now = at
        self.app = CollectorApp(load_config(path), open_store(db_url), clock=lambda: self.now)
        self.engine = self.app.alerts = attach(self.app, start=False)
        self.seqs = {}


def _spool(records, oldest_age):
    # what agent/loop.py _spool_backlog writes: an empty spool has no oldest record (null)
    return {"records": records, "bytes": records * 300, "oldest_age": oldest_age,
            "outputs": {"http": {"records": records, "oldest_age": oldest_age}}}


def test_a_backlog_alert_resolves_when_the_agent_reports_an_empty_spool(tmp_path):
    sim = Sim(write_ini(tmp_path, BACKLOG), "sqlite:///%s" % (tmp_path / "c.db"))
    try:
        sim.post(health_record("a", T0, "m1", 1, {"polls_ok": 1, "spool": _spool(9000, 7200.0)}), at=T0)
        assert sim.states() == [("behind", "firing", 7200.0)]
        # the collector is back, the agent drains: its next health record reports nothing held
        sim.post(health_record("a", T0 + 300, "m1", 1, {"polls_ok": 2, "spool": _spool(0, None)}), at=T0 + 300)
        assert sim.states() == []
        # an agent that reports no spool at all (an older one) says nothing either way
        sim.post(health_record("a", T0 + 400, "m1", 1, {"polls_ok": 3, "spool": _spool(9000, 7200.0)}), at=T0 + 400)
        sim.post(health_record("a", T0 + 500, "m1", 1, {"polls_ok": 4}), at=T0 + 500)
        assert sim.states() == [("behind", "firing", 7200.0)]
    finally:
        sim.close()


def test_a_collector_restart_raises_no_device_silent_and_keeps_a_silent_alert_firing(tmp_path):
    path, db = write_ini(tmp_path, SILENT), "sqlite:///%s" % (tmp_path / "c.db")
    sim = Sim(path, db)
    sim.post(reading("a", T0, 1, "m1"), reading("b", T0, 1, "m1"), at=T0)
    sim.post(reading("a", T0 + 600, 1, "m1"), at=T0 + 600)   # b/m1 dies after T0
    assert [(e.agent, e.state) for e in sim.engine.evaluate(T0 + 700)] == [("b", "firing")]
    sim.close()
    # the collector is down for an hour (an upgrade); agent a held its records meanwhile
    sim = SimAt(path, db, T0 + 4300)
    try:
        assert sim.engine.evaluate(T0 + 4300) == []          # no storm: a/m1 is not silent...
        assert sim.states() == [("quiet", "firing", 700.0)]   # ...and b/m1 stays firing, once
        sim.seqs["a"] = 2
        sim.post(reading("a", T0 + 4300, 1, "m1"), at=T0 + 4310)   # a's backlog arrives
        assert sim.engine.evaluate(T0 + 4400) == []
        # a device that stays silent after the restart fires `for` after it
        assert [(e.agent, e.state) for e in sim.engine.evaluate(T0 + 4310 + 601)] == [("a", "firing")]
    finally:
        sim.close()


def test_a_key_ending_in_an_escaped_quote_and_values_is_not_taken_for_the_values(tmp_path):
    import json

    from agent.collector.alerts.extract import samples as fast_samples
    from agent.collector.samples import samples
    from tests.test_collector_alerts import call

    text = ('{"agent":"a","seq":0,"ts":"2026-11-18T09:46:40.000Z","device":"m1","unit":1,'
            '"x\\"values":{"v":999},"values":{"v":1},"status":"ok"}')
    assert fast_samples(text, "2026-11-18T09:46:40.000Z") == samples(json.loads(text))
    sim = Sim(write_ini(tmp_path, "[alert:hv]\npoint = v\nabove = 100\n[notify:n]\nurl = http://127.0.0.1:9/x\n"),
              "sqlite:///%s" % (tmp_path / "c.db"))
    try:
        status, body = call(sim.app, "POST", "/api/v1/batches", ('{"agent":"a","records":[%s]}' % text).encode())
        assert status == 200, body
        assert sim.states() == []      # v is 1: no alert on the 999 of another key
    finally:
        sim.close()
