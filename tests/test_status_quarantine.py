"""The quarantine is the uploader's (agent.upload.quarantine): its count reaches the status file
and `modbus-agent status` from the uploader's state ("quarantined_total"); the spool's stats no
longer carry a "quarantined" count (nothing in the spool quarantines). Real loop, real spool,
the real collector on 127.0.0.1 refusing a record dated a month ahead (422 naming it)."""
import json
import threading
import time

from agent.cli import main
from agent.collector import make_app
from agent.collector.cli import make_server
from agent.config import load_config
from agent.loop import Loop
from agent.record import data_record


def test_status_shows_the_uploaders_quarantine_count(tmp_path, capsys):
    app = make_app(None, db="sqlite:///%s" % (tmp_path / "c.db"))
    srv = make_server("127.0.0.1", 0, app)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    ini = tmp_path / "agent.ini"
    ini.write_text("[agent]\nid = s1\nspool_dir = %s/spool\nstatus_file = %s/status.json\n\n"
                   "[upload]\nurl = http://127.0.0.1:%d/api/v1/batches\nquarantine_file = %s/rejected.jsonl\n\n"
                   "[connection:c]\ntype = tcp\nhost = 127.0.0.1\n\n[device:d]\nconnection = c\n\n"
                   "[points:d]\nx = holding 0 uint16\n" % (tmp_path, tmp_path, srv.server_address[1], tmp_path))
    loop = Loop(load_config(str(ini)))
    try:
        now = time.time()
        for i in range(5):
            loop.spool.append(data_record("s1", now + (30 * 86400 if i == 2 else i - 60), "d", 1, {"x": i}))
        loop.uploader.drain(loop.spool, time.monotonic() + 10)
        assert loop.spool.stats()["records"] == 0
        assert [json.loads(x)["record"]["values"] for x in (tmp_path / "rejected.jsonl").read_text().splitlines()] \
            == [{"x": 2}]
        loop.write_status()
    finally:
        loop.shutdown()
        srv.shutdown()
        srv.server_close()
        app.close()
    st = json.loads((tmp_path / "status.json").read_text())
    assert st["upload"]["quarantined_total"] == 1
    assert "quarantined" not in st["spool"]         # one count, the uploader's
    main(["status", "-c", str(ini)])
    out = capsys.readouterr().out
    assert "sent 4 records in" in out and "; 1 quarantined" in out, out
