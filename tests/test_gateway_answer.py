"""The gateway's pure part (agent.gateway.answer) and its config: answers from cached blocks,
table by table; the exception rules; MBAP splitting; [gateway] / gateway_unit in the config;
Device.blocks as Device.poll keeps them (against a real umodbus server); `check`'s lines."""
import struct
import time
from types import SimpleNamespace

import pytest

from agent.config import GATEWAY_SCHEMA, check_config, load_config
from agent.gateway.answer import Target, respond, split_requests
from agent.modbus.errors import FrameError

DEVICE = """[agent]
id = gw-unit

[connection:c]
type = tcp
host = 127.0.0.1
port = %(port)d

[device:d]
connection = c
unit = 4
interval = 1s
max_registers = 4

[points:d]
a = holding 0 uint16
b = holding 1 uint16
c = holding 2 uint16
d = holding 3 uint16
e = holding 4 uint16
f = holding 5 uint16
g = holding 20 uint16
k0 = coil 3 bool
k1 = coil 12 bool
"""


def device(tmp_path, port=502, extra=""):
    p = tmp_path / "d.ini"
    p.write_text(DEVICE % {"port": port} + extra)
    return load_config(str(p)).devices[0]


def fill(dev, t, regs=None, coils=None):
    """Give every planned block data, as one poll at `t` would."""
    for i, r in enumerate(dev.requests):
        if r.function == 3:
            data = b"".join(struct.pack(">H", (regs or {}).get(a, 0x1100 + a)) for a in range(r.address, r.address + r.count))
        else:
            out = bytearray((r.count + 7) // 8)
            for k in range(r.count):
                if (coils or {}).get(r.address + k):
                    out[k >> 3] |= 1 << (k & 7)
            data = bytes(out)
        dev.blocks[i] = (r.function, r.address, r.count, data, t)


def ask(units, fc, address, count, unit=4, now=None, tid=9):
    pdu = struct.pack(">BHH", fc, address, count)
    adu, outcome = respond(tid, unit, pdu, units, time.monotonic() if now is None else now)
    assert adu[:4] == struct.pack(">HH", tid, 0) and struct.unpack(">H", adu[4:6])[0] == len(adu) - 6
    return adu[7:], outcome


def test_the_plan_the_tests_rely_on(tmp_path):
    d = device(tmp_path)
    assert [(r.function, r.address, r.count) for r in d.requests] == [
        (1, 3, 10), (3, 0, 4), (3, 4, 2), (3, 20, 1)]


def test_registers_whole_block_part_and_span_of_one_poll(tmp_path):
    d = device(tmp_path)
    now = time.monotonic()
    fill(d, now)
    units = {4: [Target(d)]}
    pdu, out = ask(units, 3, 0, 4)
    assert out == "ok" and pdu == bytes((3, 8)) + d.blocks[1][3]      # the block's own bytes
    pdu, _ = ask(units, 3, 1, 2)
    assert pdu == bytes((3, 4)) + struct.pack(">HH", 0x1101, 0x1102)
    pdu, _ = ask(units, 3, 2, 4)                                         # spans blocks 0+4 and 4+2
    assert pdu == bytes((3, 8)) + struct.pack(">4H", 0x1102, 0x1103, 0x1104, 0x1105)


def test_a_span_over_blocks_of_different_polls_or_a_hole_is_02(tmp_path):
    d = device(tmp_path)
    now = time.monotonic()
    fill(d, now)
    fn, a, c, data, _t = d.blocks[2]
    d.blocks[2] = (fn, a, c, data, now - 1.0)    # refused in the last poll: an older reading
    units = {4: [Target(d)]}
    assert ask(units, 3, 2, 4)[1] == 2
    assert ask(units, 3, 4, 2)[1] == "ok"         # on its own it is one reading, young enough
    assert ask(units, 3, 5, 2)[1] == 2            # register 6 is not read by any planned request
    assert ask(units, 3, 19, 1)[1] == 2
    assert ask(units, 4, 0, 1)[1] == 2            # input table: not read at all
    assert ask(units, 3, 65535, 2)[1] == 2        # past the last address


def test_bits_are_moved_to_the_request_and_repacked(tmp_path):
    d = device(tmp_path)
    fill(d, time.monotonic(), coils={3: 1, 5: 1, 12: 1})
    units = {4: [Target(d)]}
    pdu, _ = ask(units, 1, 3, 10)
    assert pdu == bytes((1, 2)) + d.blocks[0][3]
    pdu, _ = ask(units, 1, 5, 8)                   # coils 5..12: bit 0 = coil 5, bit 7 = coil 12
    assert pdu == bytes((1, 1, 0b10000001))
    pdu, _ = ask(units, 1, 12, 1)
    assert pdu == bytes((1, 1, 1))


def test_the_device_bytes_are_kept_even_with_nonzero_padding(tmp_path):
    d = device(tmp_path)
    fill(d, time.monotonic())
    d.blocks[0] = (1, 3, 10, b"\x01\xfc", d.blocks[0][4])   # a device that sends junk padding bits
    pdu, _ = ask({4: [Target(d)]}, 1, 3, 10)
    assert pdu == b"\x01\x02\x01\xfc"


def test_stale_dead_and_never_answered_are_0B(tmp_path):
    d = device(tmp_path)
    units = {4: [Target(d)]}
    assert ask(units, 3, 0, 4)[1] == 11                       # no poll yet
    now = time.monotonic()
    fill(d, now - 3.5)                                         # default max_age: 3 intervals
    assert ask(units, 3, 0, 4, now=now)[1] == 11
    fill(d, now - 2.5)
    assert ask(units, 3, 0, 4, now=now)[1] == "ok"
    assert ask({4: [Target(d, max_age=2.0)]}, 3, 0, 4, now=now)[1] == 11
    dead = SimpleNamespace(schedule=SimpleNamespace(dead=True))
    assert ask({4: [Target(d, dead)]}, 3, 0, 4, now=now)[1] == 11


@pytest.mark.parametrize("pdu,code", [
    (bytes((5, 0, 1, 0xFF, 0)), 1), (bytes((6, 0, 1, 0, 7)), 1), (bytes((15, 0, 0, 0, 1, 1, 1)), 1),
    (bytes((16, 0, 0, 0, 1, 2, 0, 7)), 1), (bytes((22, 0, 0, 0, 0, 0, 0)), 1), (bytes((23,) + (0,) * 10), 1),
    (bytes((8, 0, 0, 0, 0)), 1), (bytes((43, 14, 1, 0)), 1), (bytes((0x83, 0, 0, 0, 1)), 1), (bytes((0,)), 1),
    (struct.pack(">BHH", 3, 0, 0), 3), (struct.pack(">BHH", 3, 0, 126), 3), (struct.pack(">BHH", 1, 0, 2001), 3),
    (struct.pack(">BHHB", 3, 0, 1, 0), 3), (bytes((3, 0)), 3),
])
def test_what_is_not_a_read_we_can_answer(tmp_path, pdu, code):
    d = device(tmp_path)
    fill(d, time.monotonic())
    adu, outcome = respond(1, 4, pdu, {4: [Target(d)]}, time.monotonic())
    assert outcome == code
    assert adu == struct.pack(">HHHBBB", 1, 0, 3, 4, (pdu[0] | 0x80) & 0xFF, code)


def test_an_unknown_unit_is_0B_whatever_it_asks(tmp_path):
    d = device(tmp_path)
    fill(d, time.monotonic())
    for pdu in (struct.pack(">BHH", 3, 0, 1), bytes((6, 0, 1, 0, 7))):
        adu, outcome = respond(1, 5, pdu, {4: [Target(d)]}, time.monotonic())
        assert outcome == 11 and adu[7:] == bytes((pdu[0] | 0x80, 11))


def test_split_requests_keeps_partial_frames_and_refuses_what_is_not_mbap():
    a = struct.pack(">HHHBBHH", 1, 0, 6, 4, 3, 0, 1)
    b = struct.pack(">HHHBBHH", 2, 0, 6, 4, 3, 1, 1)
    reqs, used = split_requests(a + b[:5])
    assert reqs == [(1, 4, a[7:])] and used == len(a)
    reqs, used = split_requests(bytearray(a + b))
    assert [r[0] for r in reqs] == [1, 2] and used == 24
    assert split_requests(b"\x00\x01\x00") == ([], 0)
    with pytest.raises(FrameError):
        split_requests(b"\x00\x01\x00\x07\x00\x06\x01\x03")          # protocol id 7
    with pytest.raises(FrameError):
        split_requests(b"\x00\x01\x00\x00\x01\x00\x01\x03")          # length 256


def test_device_poll_keeps_each_blocks_bytes_and_poll_time(tmp_path):
    """Against a real umodbus server: blocks hold exactly the data bytes of each answer, one t
    per poll; a block that is refused keeps its previous answer."""
    from modbus_peers import UmodbusTcp

    from agent.device import Refused

    server = UmodbusTcp()
    try:
        d = device(tmp_path, port=server.port)
        d.unit = 1
        client = d.connection.open()
        try:
            t0 = time.monotonic()
            d.poll(client)
            assert all(b is not None for b in d.blocks)
            ts = {b[4] for b in d.blocks}
            assert len(ts) == 1 and t0 <= ts.pop() <= time.monotonic()
            holding = server.store.holding
            fn, a, c, data, t = d.blocks[1]
            assert (fn, a, c) == (3, 0, 4) and data == struct.pack(">4H", *holding[0:4])
            old = d.blocks[3]
            d.requests[3].address = 60000            # now refused (exception 2)
            with pytest.raises(Refused):
                d.poll(client)
            assert d.blocks[3] == old and d.blocks[1][4] > old[4]
        finally:
            client.close()
    finally:
        server.stop()


# ------------------------------------------------------------------------- config

GW = """[agent]
id = gw-config
%(gateway)s
[connection:a]
type = tcp
host = 127.0.0.1

[connection:b]
type = rtu
port = /dev/ttyUSB0

[device:m1]
connection = a
%(m1)s

[points:m1]
v = holding 0 uint16

[device:m2]
connection = b
%(m2)s

[points:m2]
v = holding 0 uint16
"""


def check(tmp_path, gateway="[gateway]\nlisten = :1502\n", m1="", m2=""):
    p = tmp_path / "gw.ini"
    p.write_text(GW % {"gateway": gateway, "m1": m1, "m2": m2})
    return check_config(str(p))


def test_gateway_defaults_and_listen_forms(tmp_path):
    cfg, errors, warnings = check(tmp_path, m2="gateway_unit = 2")
    assert errors == [] and warnings == []
    g = cfg.gateway
    assert (g.listen, g.max_clients, g.idle_timeout, g.max_age) == (("0.0.0.0", 1502), 16, 60.0, None)
    for text, want in (("192.168.1.1:502", ("192.168.1.1", 502)), ("[::]:5020", ("::", 5020)),
                       ("localhost:0", ("localhost", 0))):
        cfg, errors, _ = check(tmp_path, gateway="[gateway]\nlisten = %s\n" % text, m2="gateway_unit = 2")
        assert errors == [] and cfg.gateway.listen == want
    _cfg, errors, _ = check(tmp_path, gateway="[gateway]\nlisten = ::1:502\nmax_clients = 0\nmax_age = 0\n",
                            m2="gateway_unit = 2")
    assert len(errors) == 3 and all("[gateway]" in e for e in errors), errors
    assert "brackets" in errors[0] and "gw.ini:4:" in errors[0]
    _cfg, errors, _ = check(tmp_path, gateway="[gateway]\nmax_clients = 4\n", m2="gateway_unit = 2")
    assert len(errors) == 1 and "[gateway] listen: missing (required)" in errors[0]
    assert cfg.gateway is not None and check(tmp_path, gateway="")[0].gateway is None


def test_the_same_unit_on_two_buses_is_an_error_naming_both(tmp_path):
    _cfg, errors, _ = check(tmp_path)
    assert len(errors) == 1, errors
    e = errors[0]
    assert "[device:m2] unit" in e and "device m1" in e and "gw.ini:14," in e and "gateway_unit" in e
    # remapping either of them, or not serving one, makes it fine
    for m1, m2 in (("", "gateway_unit = 2"), ("gateway_unit = 7", ""), ("", "gateway_unit = off")):
        cfg, errors, _ = check(tmp_path, m1=m1, m2=m2)
        assert errors == [], (m1, m2, errors)
    # a remap onto a unit that is taken is named at the remap
    _cfg, errors, _ = check(tmp_path, m1="unit = 3", m2="gateway_unit = 3")
    assert len(errors) == 1 and "[device:m2] gateway_unit" in errors[0]
    # without [gateway] two buses with unit 1 are as fine as ever; gateway_unit does nothing
    cfg, errors, warnings = check(tmp_path, gateway="", m2="gateway_unit = 2")
    assert errors == [] and len(warnings) == 1 and "no effect without a [gateway]" in warnings[0]
    cfg, errors, warnings = check(tmp_path, gateway="")
    assert errors == [] and warnings == []


def test_two_sections_polling_one_device_are_both_served_under_its_unit(tmp_path):
    p = tmp_path / "gw.ini"
    p.write_text((GW % {"gateway": "[gateway]\nlisten = :1502\n", "m1": "", "m2": ""}).replace(
        "[device:m2]\nconnection = b", "[device:m2]\nconnection = a\ninterval = 1m"))
    cfg, errors, warnings = check_config(str(p))
    assert errors == [], errors


def test_the_sample_documents_every_gateway_key():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "conf" / "agent.ini").read_text()
    keys = set(re.findall(r"^([a-z_0-9]+)\s*=", text, re.M))
    assert set(GATEWAY_SCHEMA) | {"gateway_unit"} <= keys


def test_check_says_what_is_served_under_which_unit(tmp_path, capsys):
    from agent.commands import cmd_check

    p = tmp_path / "gw.ini"
    p.write_text(GW % {"gateway": "[gateway]\nlisten = 127.0.0.1:1502\nmax_age = 30s\n", "m1": "",
                       "m2": "gateway_unit = 12"})
    assert cmd_check(SimpleNamespace(config=str(p))) == 0
    out = capsys.readouterr().out
    assert "gateway: Modbus TCP on 127.0.0.1:1502, read-only" in out
    assert "  unit 1: device m1 (unit 1 on a), max_age 30s: fc 03 0+1" in out
    assert "  unit 12: device m2 (unit 1 on b), max_age 30s: fc 03 0+1" in out


def test_a_reload_keeps_the_cached_blocks_of_a_device_whose_plan_is_the_same(tmp_path):
    from agent.config import GatewaySettings
    from agent.gateway.server import Gateway

    old, same, changed = device(tmp_path), device(tmp_path), device(tmp_path, extra="h = holding 30 uint16\n")
    fill(old, time.monotonic())
    gw = Gateway(GatewaySettings(listen=("127.0.0.1", 0)))
    try:
        st = SimpleNamespace(schedule=SimpleNamespace(dead=False))
        gw.watch([SimpleNamespace(device=old, schedule=st.schedule)])
        assert gw.state()["units"] == {"4": ["d"]} and gw.state()["listening"]
        gw.watch([SimpleNamespace(device=same, schedule=st.schedule)])
        assert same.blocks == old.blocks
        gw.watch([SimpleNamespace(device=changed, schedule=st.schedule)])
        assert not any(changed.blocks)       # another plan: its own polls fill it
    finally:
        gw.close()
    assert gw.listener is None


def test_a_block_the_device_refuses_gets_the_devices_own_exception(tmp_path):
    d = device(tmp_path)
    now = time.monotonic()
    fill(d, now)
    d.blocks[3] = None                          # holding 20+1: refused since the start
    st = SimpleNamespace(schedule=SimpleNamespace(dead=False), refused={(3, 20, 1): 2})
    units = {4: [Target(d, st)]}
    assert ask(units, 3, 20, 1, now=now)[1] == 2
    assert ask(units, 3, 0, 4, now=now)[1] == "ok"
    fill(d, now - 10)                           # all old; the refused one answers 0B no more
    st.refused = {(3, 0, 4): 4}
    assert ask(units, 3, 0, 4, now=now)[1] == 4
    assert ask(units, 3, 4, 2, now=now)[1] == 11


def test_a_port_that_cannot_be_bound_is_logged_and_tried_again(caplog):
    import logging
    import socket

    from agent.config import GatewaySettings
    from agent.gateway.server import Gateway

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    caplog.set_level(logging.INFO, logger="agent")
    gw = Gateway(GatewaySettings(listen=("127.0.0.1", port)))
    try:
        st = gw.state()
        assert not st["listening"] and "cannot listen on 127.0.0.1:%d" % port in st["listen_error"]
        assert any("cannot listen" in r.getMessage() and "tried again every" in r.getMessage()
                   for r in caplog.records)
        gw.serve(time.monotonic() + 0.01)          # not yet time to retry: still down, no error
        assert not gw.state()["listening"]
        holder.close()
        gw._retry_at = 0.0                          # the retry is due
        gw.serve(time.monotonic() + 0.01)
        assert gw.state()["listening"] and gw.state()["listen_error"] is None
    finally:
        holder.close()
        gw.close()


def test_sighup_rebinds_a_new_listen_address_and_takes_the_rest_in_place(tmp_path):
    import socket

    from agent.loop import Loop

    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    ini = tmp_path / "agent.ini"
    base = (DEVICE % {"port": 9}).replace("id = gw-unit", "id = gw-unit\nspool_dir = %s/spool\nstatus_file = %s/st.json"
                                          % (tmp_path, tmp_path))
    p1, p2 = free_port(), free_port()
    ini.write_text(base + "\n[gateway]\nlisten = 127.0.0.1:%d\n" % p1)
    loop = Loop(load_config(str(ini)))
    try:
        gw = loop.services[0]
        assert gw.address == ("127.0.0.1", p1)
        ini.write_text(base + "\n[gateway]\nlisten = 127.0.0.1:%d\nmax_clients = 3\n" % p1)
        loop.reload()
        assert loop.services == [gw] and gw.settings.max_clients == 3
        assert gw.units[4][0].device is loop.states[0].device     # the new device objects
        ini.write_text(base + "\n[gateway]\nlisten = 127.0.0.1:%d\n" % p2)
        loop.reload()
        new = loop.services[0]
        assert new is not gw and new.address == ("127.0.0.1", p2) and gw.listener is None
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", p1), timeout=1).close()
        socket.create_connection(("127.0.0.1", p2), timeout=1).close()
        ini.write_text(base)
        loop.reload()
        assert loop.services == [] and new.listener is None
        assert "services" not in loop.status()
    finally:
        loop.shutdown()


def test_check_notes_that_a_low_port_needs_root(tmp_path, capsys, monkeypatch):
    import agent.commands as commands

    p = tmp_path / "gw.ini"
    p.write_text(GW % {"gateway": "[gateway]\nlisten = :502\n", "m1": "", "m2": "gateway_unit = 2"})
    monkeypatch.setattr(commands.os, "geteuid", lambda: 1000, raising=False)
    assert commands.cmd_check(SimpleNamespace(config=str(p))) == 0
    assert "port 502 is below 1024: the agent needs root" in capsys.readouterr().out
    monkeypatch.setattr(commands.os, "geteuid", lambda: 0, raising=False)
    assert commands.cmd_check(SimpleNamespace(config=str(p))) == 0
    assert "below 1024" not in capsys.readouterr().out


def test_a_long_upload_gap_still_answers_requests_between_its_slices(tmp_path):
    """An output busy for the whole gap, in slices of 250 ms: the gateway is served between
    slices, not only after the gap (3 s here)."""
    import socket
    import threading

    from agent import output
    from agent.loop import Loop

    class Busy(output.Output):
        name = "busy"

        def fill_gap(self, spool, until, slice_end=None, stop=None):
            if until - time.monotonic() < 0.3:
                return {"status": output.DEADLINE, "batches": 0}
            time.sleep(0.25)
            return {"status": output.SLICE, "batches": 1}

        def request_time(self):
            return 0.01

    ini = tmp_path / "agent.ini"
    ini.write_text((DEVICE % {"port": 9}).replace(
        "id = gw-unit", "id = gw-unit\nspool_dir = %s/spool\nstatus_file = %s/st.json" % (tmp_path, tmp_path)
    ).replace("interval = 1s", "interval = 3s") + "\n[gateway]\nlisten = 127.0.0.1:0\n")
    loop = Loop(load_config(str(ini)), outputs=[Busy()])
    stop = threading.Event()

    def run():
        while not stop.is_set():
            loop.step()

    t = threading.Thread(target=run)
    try:
        loop.step()                        # the first poll (connection refused at once)
        t.start()
        time.sleep(0.4)                    # well inside the busy gap
        port = loop.services[0].address[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            t0 = time.monotonic()
            s.sendall(struct.pack(">HHHBBHH", 5, 0, 6, 4, 3, 0, 4))
            ans = s.recv(100)
            waited = time.monotonic() - t0
        assert ans[:2] == b"\x00\x05" and ans[7] == 0x83     # 0B: nothing read yet, but answered
        assert waited < 1.0, waited
    finally:
        stop.set()
        loop.stop_requested = True
        if loop.services and loop.services[0].address:   # a connection wakes the loop's sleep
            socket.create_connection(("127.0.0.1", loop.services[0].address[1]), timeout=2).close()
        t.join(10)
        loop.shutdown()
