"""One bad block must not hide the good ones (issue 9).

A device that answers a block with an exception response answered: the other blocks are read,
the record is "partial" (CONTRACTS.md section 1), the device stays alive (no dead-device
back-off), the log says once which points and addresses it refuses and what to change, and
`poll` shows the same. Silence (timeout), CRC, frame and connection errors still end the poll.

Real peers: umodbus's Modbus TCP server (tests.modbus_peers, 200 registers), and raw socket
servers answering crafted frames where a real server cannot be made to (exception 3 for a
count that is too large, a gateway's exception 11).
"""
import json
import logging
import struct

import pytest

from agent import cli
from agent.config import load_config
from agent.loop import Loop
from agent.status import format_status
from tests import modbus_peers as peers


@pytest.fixture
def umodbus():
    server = peers.UmodbusTcp()
    yield server
    server.stop()


def write_ini(tmp_path, port, points, device="", agent="", timeout="300ms"):
    ini = tmp_path / "agent.ini"
    ini.write_text("""[agent]
id = iso-test
interval = 100ms
spool_dir = %(tmp)s/spool
status_file = %(tmp)s/status.json
health_interval = 1h
summary_interval = 1h
dead_after = 3
dead_backoff_max = 5s
%(agent)s
[connection:link]
type = tcp
host = 127.0.0.1
port = %(port)d
timeout = %(timeout)s

[device:meter]
connection = link
unit = 1
%(device)s
[points:meter]
%(points)s
""" % {"tmp": tmp_path, "port": port, "agent": agent, "device": device, "timeout": timeout,
       "points": points})
    return str(ini)


def spooled(loop, device="meter"):
    batch = loop.spool.peek(10000, 1 << 24)
    recs = [json.loads(line) for line in batch.lines] if batch else []
    return [r for r in recs if r.get("device") == device and "kind" not in r]


def run_polls(loop, count):
    st = loop.states[0]
    h = st.health
    def polls():
        return h.polls_ok + getattr(h, "polls_partial", 0) + h.polls_failed   # (no partial before)

    want = polls() + count
    for _ in range(5000):
        if polls() >= want:
            return
        loop.step()
    raise AssertionError("the loop did not poll %d times" % count)


def refusals(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_refused_block_does_not_hide_the_good_one_and_the_device_stays_alive(tmp_path, umodbus, caplog):
    caplog.set_level(logging.DEBUG, logger="agent")
    loop = Loop(load_config(write_ini(tmp_path, umodbus.port,
                                      "good = holding 0 uint16\nbad = holding 500 uint16\n")))
    try:
        run_polls(loop, 8)
        st = loop.states[0]
        recs = spooled(loop)
        loop.summary()
        status = format_status(loop.status())
    finally:
        loop.shutdown()
    good = umodbus.store.holding[0]
    assert len(recs) == 8
    for r in recs:
        assert list(r)[:8] == ["agent", "seq", "ts", "device", "unit", "values", "status", "errors"]
        assert r["status"] == "partial" and r["values"] == {"good": good}
        assert r["errors"] == [{"kind": "exception", "code": 2, "name": "ILLEGAL DATA ADDRESS",
                                "function": 3, "address": 500, "count": 1, "points": ["bad"],
                                "message": "unit 1 fc 03 holding 500+1: exception code 2 ILLEGAL DATA ADDRESS"}]
    h, sched = st.health, st.schedule
    assert not sched.dead and not h.dead and sched.backoff == 0.0 and sched.failures == 0
    assert (h.polls_ok, h.polls_partial, h.polls_failed) == (0, 8, 0)
    assert h.exceptions == {2: 8} and h.refused_blocks == 1 and h.consecutive_failures == 0
    # said once, not every cycle: which point, which addresses, what to change
    warned = refusals(caplog)
    assert len(warned) == 1, warned
    assert "refuses fc 03 holding 500+1 (point bad) with exception code 2 ILLEGAL DATA ADDRESS" in warned[0]
    assert "base" in warned[0] and "address" in warned[0] and "partial" in warned[0]
    assert not any("no answer" in m for m in warned)
    assert "DEAD" not in loop.last_summary and "ok=0(+0) failed=0(+0) partial=8 refusing 1 block(s)" in loop.last_summary
    row = next(line for line in status.splitlines() if line.startswith("meter"))
    assert row.split()[2] == "partial"


class SparseUmodbus:
    """umodbus's Modbus TCP server for a meter that maps holding 0-9 and 20-29 and input 0-9
    only: a read that touches any other address is refused with exception 2, as real meters do."""

    def __init__(self):
        import socketserver
        import threading

        from umodbus.exceptions import IllegalDataAddressError
        from umodbus.server.tcp import RequestHandler, get_server

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.holding = {a: 1000 + a for a in list(range(10)) + list(range(20, 30))}
        self.input = {a: 2000 + a for a in range(10)}
        self.server = get_server(Server, ("127.0.0.1", 0), RequestHandler)
        self.port = self.server.server_address[1]

        @self.server.route(slave_ids=[1], function_codes=[3, 4], addresses=None)
        def read(slave_id, function_code, address):
            store = self.holding if function_code == 3 else self.input
            if address not in store:
                raise IllegalDataAddressError()
            return store[address]

        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def sparse():
    server = SparseUmodbus()
    yield server
    server.stop()


SPARSE_POINTS = "a = holding 5 uint16\nb = holding 25 uint16\nfar = holding 400 uint16\ni = input 3 uint16\n"


def test_blocks_across_holes_suggest_max_gap_and_count_each_refused_block(tmp_path, sparse, caplog):
    """holding 5 and 25 share a block with max_gap = 20, which reads the unmapped 10-19: refused
    (lower max_gap, says the log); holding 400 alone is refused too (its address or the base).
    Two refused blocks per poll count twice under exception 2."""
    caplog.set_level(logging.DEBUG, logger="agent")
    loop = Loop(load_config(write_ini(tmp_path, sparse.port, SPARSE_POINTS, device="max_gap = 20\n")))
    try:
        run_polls(loop, 3)
        st = loop.states[0]
        recs = spooled(loop)
    finally:
        loop.shutdown()
    assert [(r.table, r.address, r.count) for r in st.device.requests] == [
        ("holding", 5, 21), ("holding", 400, 1), ("input", 3, 1)]
    assert [r["status"] for r in recs] == ["partial"] * 3
    assert all(r["values"] == {"i": 2003} for r in recs)
    assert [(e["address"], e["count"], e["points"]) for e in recs[0]["errors"]] == [
        (5, 21, ["a", "b"]), (400, 1, ["far"])]
    assert st.health.exceptions == {2: 6} and st.health.refused_blocks == 2 and not st.schedule.dead
    warned = refusals(caplog)
    assert len(warned) == 2, warned
    assert "holding 5+21 (points a, b)" in warned[0]
    assert "19 registers no point asks for (holding 6-24" in warned[0] and "max_gap = 0" in warned[0]
    assert "holding 400+1 (point far)" in warned[1] and "base = 0" in warned[1]
    assert "agent.ini:" in warned[1]     # names the point's line


def test_poll_command_shows_partial_values_and_the_fix(tmp_path, sparse, capsys):
    path = write_ini(tmp_path, sparse.port, SPARSE_POINTS, device="max_gap = 20\n")
    assert cli.main(["poll", "-c", path]) == 1
    out = capsys.readouterr().out
    assert "meter (unit 1 on link): PARTIAL: the device refuses 2 of 3 request(s)" in out
    assert "refused: unit 1 fc 03 holding 5+21: exception code 2 ILLEGAL DATA ADDRESS (a, b)" in out
    assert "Set a lower max_gap" in out
    assert "refused: unit 1 fc 03 holding 400+1: exception code 2 ILLEGAL DATA ADDRESS (far)" in out
    assert "base = 1" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("  ") and
            not line.strip().startswith(("refused", "fix"))}
    assert rows["i"] == ["2003"]
    assert rows["a"][:2] == rows["far"][:2] == ["-", "refused"]
    assert cli.main(["poll", "-c", path, "--json"]) == 1
    rec = json.loads(capsys.readouterr().out)
    assert rec["status"] == "partial" and rec["values"] == {"i": 2003}
    assert [e["points"] for e in rec["errors"]] == [["a", "b"], ["far"]]
    # check names the block that reads holes before any device refuses it
    assert cli.main(["check", "-c", path]) == 0
    assert "reads 19 unasked register(s) in holes (max_gap 20)" in capsys.readouterr().out
    # the suggested fix works: max_gap = 0 reads a and b on their own
    path = write_ini(tmp_path, sparse.port, SPARSE_POINTS, device="max_gap = 0\n")
    assert cli.main(["poll", "-c", path, "--json"]) == 1
    rec = json.loads(capsys.readouterr().out)
    assert rec["values"] == {"a": 1005, "b": 1025, "i": 2003}
    assert [e["points"] for e in rec["errors"]] == [["far"]]


def quantity_limited(limit):
    """A device that answers exception 3 to a read of more than `limit` registers."""
    def handler(request):
        tid, _pid, _length, unit = struct.unpack_from(">HHHB", request)
        fc, address, count = struct.unpack_from(">BHH", request, 7)
        if count > limit:
            return [peers.mbap(tid, unit, bytes((fc | 0x80, 3)))]
        return [peers.mbap(tid, unit, bytes((fc, 2 * count)) + b"".join(
            struct.pack(">H", address + i) for i in range(count)))]
    return handler


def test_exception_3_for_a_count_too_large_says_max_registers(tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG, logger="agent")
    server = peers.SocketServer(quantity_limited(4), framing="mbap")
    try:
        points = "one = holding 0 uint16\n" + "".join("r%d = holding %d uint16\n" % (a, a) for a in range(100, 110))
        path = write_ini(tmp_path, server.port, points, device="max_gap = 0\n")
        assert cli.main(["poll", "-c", path]) == 1
        out = capsys.readouterr().out
        assert "refused: unit 1 fc 03 holding 100+10: exception code 3 ILLEGAL DATA VALUE" in out
        assert "max_registers (now 125)" in out
        loop = Loop(load_config(path))
        try:
            run_polls(loop, 3)
            recs = spooled(loop)
            st = loop.states[0]
        finally:
            loop.shutdown()
        assert [r["status"] for r in recs] == ["partial"] * 3 and recs[0]["values"] == {"one": 0}
        assert recs[0]["errors"][0]["code"] == 3 and recs[0]["errors"][0]["name"] == "ILLEGAL DATA VALUE"
        assert not st.schedule.dead
        warned = refusals(caplog)
        assert len(warned) == 1 and "max_registers" in warned[0]
        # the fix works: with max_registers = 4 every block answers
        path = write_ini(tmp_path, server.port, points, device="max_gap = 0\nmax_registers = 4\n")
        assert cli.main(["poll", "-c", path, "--json"]) == 0
        rec = json.loads(capsys.readouterr().out)
        assert rec["status"] == "ok" and rec["values"]["r109"] == 109
    finally:
        server.stop()


def test_every_block_refused_is_an_error_record_listing_them_but_the_device_is_alive(tmp_path, umodbus):
    loop = Loop(load_config(write_ini(tmp_path, umodbus.port, "bad = holding 500 uint16\nworse = input 900 uint16\n")))
    try:
        run_polls(loop, 6)
        st = loop.states[0]
        recs = spooled(loop)
    finally:
        loop.shutdown()
    assert len(recs) == 6   # polled every cycle: not backed off
    for r in recs:
        assert r["status"] == "error" and "values" not in r
        assert r["error"]["kind"] == "exception" and r["error"]["code"] == 2
        assert "unit 1 fc 03 address 500 count 1" in r["error"]["message"]
        assert [(e["function"], e["address"], e["points"]) for e in r["errors"]] == [(3, 500, ["bad"]), (4, 900, ["worse"])]
    assert not st.schedule.dead and st.schedule.skipped == 0 and st.health.exceptions == {2: 12}


def test_a_gateway_whose_target_does_not_answer_is_not_answering(tmp_path):
    """Exception 11 (gateway target device failed to respond) is the device's silence, said by
    the gateway: it ends the poll and counts towards dead like a timeout."""
    def handler(request):
        tid, _pid, _length, unit = struct.unpack_from(">HHHB", request)
        return [peers.mbap(tid, unit, bytes((request[7] | 0x80, 11)))]
    server = peers.SocketServer(handler, framing="mbap")
    try:
        loop = Loop(load_config(write_ini(tmp_path, server.port, "a = holding 0 uint16\nb = input 0 uint16\n")))
        try:
            run_polls(loop, 3)
            st = loop.states[0]
            recs = spooled(loop)
        finally:
            loop.shutdown()
    finally:
        server.stop()
    assert st.schedule.dead and st.health.dead
    assert all(r["status"] == "error" and r["error"]["code"] == 11 and "errors" not in r for r in recs)
    assert st.health.exceptions == {11: 3}   # one request per poll: the second was not sent


def test_a_timeout_after_a_good_block_still_ends_the_poll_as_an_error(tmp_path):
    """Silence means nobody answers: the poll stops there, status error, as before."""
    def handler(request):
        tid, _pid, _length, unit = struct.unpack_from(">HHHB", request)
        fc, address, count = struct.unpack_from(">BHH", request, 7)
        if fc == 4:
            return []                                   # input registers: silence
        return [peers.mbap(tid, unit, bytes((fc, 2 * count)) + b"\x00\x07" * count)]
    server = peers.SocketServer(handler, framing="mbap")
    try:
        loop = Loop(load_config(write_ini(tmp_path, server.port, "a = holding 0 uint16\nb = input 0 uint16\n"
                                                                 "c = input 500 uint16\n", timeout="100ms")))
        try:
            run_polls(loop, 3)
            st = loop.states[0]
            recs = spooled(loop)
        finally:
            loop.shutdown()
    finally:
        server.stop()
    assert [r["status"] for r in recs] == ["error"] * 3
    assert all(r["error"]["kind"] == "timeout" for r in recs)
    assert st.schedule.dead and st.health.timeouts == 3


def test_a_busy_block_is_asked_once_more_and_the_others_are_read(tmp_path):
    calls = {"busy": 0}

    def handler(request):
        tid, _pid, _length, unit = struct.unpack_from(">HHHB", request)
        fc, address, count = struct.unpack_from(">BHH", request, 7)
        if address == 50 and calls["busy"] % 2 == 0:      # every other request to 50: busy
            calls["busy"] += 1
            return [peers.mbap(tid, unit, bytes((fc | 0x80, 6)))]
        if address == 50:
            calls["busy"] += 1
        return [peers.mbap(tid, unit, bytes((fc, 2 * count)) + struct.pack(">H", address))]
    server = peers.SocketServer(handler, framing="mbap")
    try:
        loop = Loop(load_config(write_ini(tmp_path, server.port, "a = holding 0 uint16\nb = holding 50 uint16\n")))
        try:
            run_polls(loop, 2)
            st = loop.states[0]
            recs = spooled(loop)
        finally:
            loop.shutdown()
    finally:
        server.stop()
    assert [r["status"] for r in recs] == ["ok", "ok"] and recs[0]["values"] == {"a": 0, "b": 50}
    assert st.health.busy_retries == 2 and st.health.exceptions == {}


def test_a_refused_block_that_answers_again_is_said_once_and_records_are_ok_again(tmp_path, sparse, caplog):
    caplog.set_level(logging.DEBUG, logger="agent")
    loop = Loop(load_config(write_ini(tmp_path, sparse.port, "a = holding 5 uint16\nlate = holding 40 uint16\n")))
    try:
        run_polls(loop, 3)
        sparse.holding[40] = 4040            # the register appears (a firmware update, a mode switch)
        run_polls(loop, 3)
        st = loop.states[0]
        recs = spooled(loop)
    finally:
        loop.shutdown()
    assert [r["status"] for r in recs] == ["partial"] * 3 + ["ok"] * 3
    assert recs[-1]["values"] == {"a": 1005, "late": 4040} and "errors" not in recs[-1]
    msgs = [(r.levelname, r.getMessage()) for r in caplog.records if "holding 40" in r.getMessage()
            or "40+1" in r.getMessage()]
    assert [level for level, _ in msgs] == ["WARNING", "INFO"], msgs
    assert "answers again" in msgs[1][1]
    assert st.health.refused_blocks == 0 and (st.health.polls_partial, st.health.polls_ok) == (3, 3)
