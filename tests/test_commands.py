"""`check`, `poll` and `probe` end to end: the real CLI against real Modbus peers.

The TCP peer is umodbus's socketserver-based server in a background thread (its answers are
computed by umodbus, not by our codec); the RTU peer is tools/simulator.py on a pseudo-terminal
(umodbus PDUs, its own RTU framing and CRC), opened by the agent with pyserial.
"""
import json
import math
import socketserver
import struct
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from umodbus.exceptions import IllegalDataAddressError
from umodbus.server.tcp import RequestHandler, get_server

from agent import cli
from agent.commands import parse_expect, probe_candidates
from tests.conftest import ROOT
from tests.test_commands_spool import disk_dir  # noqa: F401 (a fixture)

CODES = {"int16": ">h", "uint16": ">H", "int32": ">i", "uint32": ">I", "float32": ">f",
         "int64": ">q", "uint64": ">Q", "float64": ">d"}


def wire(value, type_name, order):
    """Big-endian bytes A B C ... put on the wire in the order the order's name spells."""
    natural = struct.pack(CODES[type_name], value)
    return bytes(natural[ord(letter) - 65] for letter in order)


class Tables:
    """Register and bit tables of one unit, filled with byte strings."""

    def __init__(self):
        self.coil, self.discrete, self.holding, self.input = {}, {}, {}, {}

    def put(self, table, address, data):
        store = getattr(self, table)
        for i in range(0, len(data), 2):
            store[address + i // 2] = struct.unpack(">H", data[i:i + 2])[0]

    def store(self, function_code):
        return {1: self.coil, 2: self.discrete, 3: self.holding, 4: self.input}[function_code]


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class UmodbusTcpPeer:
    """umodbus Modbus TCP server in a background thread serving {unit: Tables}."""

    def __init__(self, units):
        self.units = units
        self.server = get_server(_Server, ("127.0.0.1", 0), RequestHandler)
        self.port = self.server.server_address[1]

        @self.server.route(slave_ids=list(units), function_codes=[1, 2, 3, 4], addresses=None)
        def read(slave_id, function_code, address):
            store = self.units[slave_id].store(function_code)
            if address not in store:
                raise IllegalDataAddressError()
            return store[address]

        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


# Known values in every type and order, plus the other point kinds.
CASES = []
for _type, _values in (("int16", [-12345]), ("uint16", [54321]), ("int32", [-123456789]),
                       ("uint32", [3456789012]), ("float32", [-230.25]), ("int64", [-(2 ** 40) - 7]),
                       ("uint64", [2 ** 63 + 12345]), ("float64", [1234567.890625])):
    _orders = (("AB", "BA") if _type.endswith("16") else
               ("ABCD", "BADC", "CDAB", "DCBA") if _type.endswith("32") else
               ("ABCDEFGH", "BADCFEHG", "CDABGHEF", "DCBAHGFE", "HGFEDCBA", "GHEFCDAB", "FEHGBADC", "EFGHABCD"))
    for _order in _orders:
        CASES.append(("%s_%s" % (_type, _order), _type, _order, _values[0]))


def known_device(base_address=0):
    """(Tables, point lines, expected values) for one unit holding every type and order."""
    t = Tables()
    for a in range(base_address, base_address + 160):   # the holes read as 0
        t.holding[a] = t.input[a] = 0
    lines, expected = [], {}
    addr = base_address
    for name, type_name, order, value in CASES:
        data = wire(value, type_name, order)
        table = "input" if type_name.startswith("float") else "holding"
        t.put(table, addr, data)
        lines.append("%s = %s %d %s %s" % (name, table, addr, type_name, order))
        expected[name] = value
        addr += len(data) // 2 + 1          # a one-register hole between values
    t.put("holding", addr, struct.pack(">h", 2301))
    lines.append("temperature = holding %d int16 scale=0.1 unit=degC" % addr)
    expected["temperature"] = 230.1
    t.put("holding", addr + 1, b"\xa5\x3c")
    lines.append("mode = holding %d bits 0-3 enum=12:auto,3:manual" % (addr + 1))
    lines.append("level = holding %d bits 4-7 signed=yes" % (addr + 1))
    lines.append("alarm = holding %d bit 15" % (addr + 1))
    expected.update(mode="auto", level=3, alarm=True)
    t.put("holding", addr + 2, b"SDM630\0\0")
    lines.append("model = holding %d string 4" % (addr + 2))
    expected["model"] = "SDM630"
    t.put("input", 900, struct.pack(">f", math.nan))
    lines.append("broken = input 900 float32")
    expected["broken"] = None
    for a in range(16):
        t.coil[a] = 1 if a in (0, 9) else 0
        t.discrete[a] = 0
    lines += ["pump = coil 0 bool", "fan = coil 1 bool", "valve = coil 9 bool enum=0:closed,1:open"]
    expected.update(pump=True, fan=False, valve="open")
    t.discrete[4] = 1
    lines.append("door = discrete 4 bool")
    expected["door"] = True
    return t, lines, expected


def config(tmp_path, connection, devices, name="agent.ini"):
    """Write an agent.ini with one connection section and [device]/[points] per (name, unit, lines)."""
    text = "[agent]\nid = test-agent\n\n[connection:link]\n%s\n" % textwrap.dedent(connection).strip()
    for dev_name, unit, lines, extra in devices:
        text += "\n[device:%s]\nconnection = link\nunit = %d\n%s\n[points:%s]\n%s\n" % (
            dev_name, unit, extra, dev_name, "\n".join(lines))
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# --- check ---------------------------------------------------------------------------------


def test_check_prints_the_plan(disk_dir, capsys):  # noqa: F811 (the fixture)
    # on disk (tests/test_commands_spool.py: disk_dir): with the config under a tmpfs /tmp, the
    # seq_file next to it would add a (right) warning about RAM to stderr
    _t, lines, _e = known_device()
    path = config(disk_dir, "type = tcp\nhost = 127.0.0.1", [("plc", 1, lines, "max_gap = 0")])
    ini = Path(path)
    ini.write_text(ini.read_text().replace("id = test-agent\n", "id = test-agent\nspool_dir = %s\n"
                                           % (disk_dir / "spool"), 1))
    rc, out, err = run(capsys, "check", "-c", path)
    assert rc == 0 and err == ""
    assert "OK: agent test-agent, 1 connection(s), 1 device(s), %d point(s)" % len(lines) in out
    assert "device plc: unit 1, every 10s" in out
    assert "bytes on the wire" in out and "% of 10s" in out
    assert "fc 01 coil" in out and "fc 02 discrete" in out


def test_check_warns_above_80_percent(tmp_path, capsys):
    lines = ["block = input 0 string 100"]
    path = config(tmp_path, "type = rtu\nport = /dev/ttyUSB0\nbaud = 2400",
                  [("m1", 1, lines, "interval = 1.1s")])
    rc, out, err = run(capsys, "check", "-c", path)
    assert rc == 0
    assert "WARNING: above 80%" in out
    assert "warning: " in err and "connection link is busy" in err


def test_check_exits_2_with_every_error(tmp_path, capsys):
    path = config(tmp_path, "type = tcp\nhost = 127.0.0.1\nprot = 502",
                  [("plc", 1, ["a = holding 0 float32", "b = holding 1 int16", "c = holding 5 flaot32"], "")])
    rc, out, err = run(capsys, "check", "-c", path)
    assert rc == 2 and out == ""
    assert "[connection:link] prot: unknown option (did you mean 'port'?)" in err
    assert "[points:plc] b: overlaps a (holding 0)" in err
    assert "[points:plc] c: unknown type 'flaot32' (did you mean 'float32'?)" in err
    assert err.strip().endswith("3 error(s)")


# --- poll ----------------------------------------------------------------------------------


@pytest.fixture
def tcp_site(tmp_path):
    t, lines, expected = known_device()
    with UmodbusTcpPeer({1: t, 2: t}) as peer:
        path = config(tmp_path, "type = tcp\nhost = 127.0.0.1\nport = %d\ntimeout = 2s" % peer.port,
                      [("plc", 1, lines, "max_gap = 1"), ("twin", 2, lines, "max_gap = 0")])
        yield path, expected, peer


def test_poll_json_every_type_and_order_over_tcp(tcp_site, capsys):
    path, expected, _peer = tcp_site
    rc, out, err = run(capsys, "poll", "-c", path, "--json")
    assert rc == 0, out + err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["device"] for r in records] == ["plc", "twin"]
    for r in records:
        assert r["status"] == "ok" and r["agent"] == "test-agent" and r["seq"] is None
        assert r["values"] == expected


def test_poll_table_shows_names_values_units(tcp_site, capsys):
    path, _expected, _peer = tcp_site
    rc, out, _err = run(capsys, "poll", "-c", path, "--device", "plc")
    assert rc == 0
    assert out.startswith("plc (unit 1 on link): ok\n")
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:]}
    assert rows["temperature"] == ["230.1", "degC"]
    assert rows["float32_CDAB"] == ["-230.25"]
    assert rows["model"] == ["SDM630"]
    assert rows["broken"] == ["-"]
    assert "twin" not in out


def test_poll_failing_device_reports_and_exits_1_after_the_others(tmp_path, capsys):
    t, lines, expected = known_device()
    with UmodbusTcpPeer({1: t}) as peer:
        path = config(tmp_path, "type = tcp\nhost = 127.0.0.1\nport = %d" % peer.port,
                      [("bad", 1, ["nothing = holding 5000 uint16"], ""), ("good", 1, lines, "")])
        rc, out, _err = run(capsys, "poll", "-c", path, "--json")
        assert rc == 1
        bad, good = [json.loads(line) for line in out.splitlines()]
        assert bad["status"] == "error" and bad["error"]["kind"] == "exception"
        assert bad["error"]["code"] == 2 and "address 5000" in bad["error"]["message"]
        assert good["status"] == "ok" and good["values"] == expected
        rc, out, _err = run(capsys, "poll", "-c", path)
        assert rc == 1
        assert "bad (unit 1 on link): ERROR exception: unit 1 fc 03 address 5000 count 1" in out
        assert "good (unit 1 on link): ok" in out


def test_poll_unreachable_connection(tmp_path, capsys, free_port):
    path = config(tmp_path, "type = tcp\nhost = 127.0.0.1\nport = %d\ntimeout = 200ms" % free_port,
                  [("gone", 1, ["v = holding 0 uint16"], "")])
    rc, out, _err = run(capsys, "poll", "-c", path, "--json")
    assert rc == 1
    rec = json.loads(out)
    assert rec["status"] == "error" and rec["error"]["kind"] == "connection"


def test_poll_unknown_device_and_bad_config(tmp_path, capsys):
    path = config(tmp_path, "type = tcp\nhost = 127.0.0.1", [("plc", 1, ["v = holding 0 uint16"], "")])
    rc, _out, err = run(capsys, "poll", "-c", path, "--device", "plx")
    assert rc == 2 and "no device 'plx'" in err
    rc, _out, err = run(capsys, "poll", "-c", str(tmp_path / "missing.ini"))
    assert rc == 2 and "cannot read" in err


# --- RTU on a pseudo-terminal, RTU over TCP ------------------------------------------------


@pytest.fixture
def simulator():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import simulator as sim_module
    finally:
        sys.path.remove(str(ROOT / "tools"))
    return sim_module


def _sim_device(sim_module, tables):
    dev = sim_module.Device()
    dev.coils, dev.discrete, dev.holding, dev.input = tables.coil, tables.discrete, tables.holding, tables.input
    return dev


@pytest.mark.parametrize("link", ["rtu", "rtu-over-tcp"])
def test_poll_over_rtu(tmp_path, capsys, simulator, link):
    t, lines, expected = known_device()
    sim = simulator.Simulator({5: _sim_device(simulator, t)}, tcp=None, rtu=(link == "rtu"),
                              rtu_tcp=0 if link == "rtu-over-tcp" else None)
    with sim:
        if link == "rtu":
            conn = "type = rtu\nport = %s\nbaud = 115200\ntimeout = 1s" % sim.rtu_path
        else:
            conn = "type = rtu-over-tcp\nhost = 127.0.0.1\nport = %d\ntimeout = 1s" % sim.rtu_tcp_port
        path = config(tmp_path, conn, [("meter", 5, lines, "max_gap = 4")])
        rc, out, err = run(capsys, "poll", "-c", path, "--json")
    assert rc == 0, out + err
    rec = json.loads(out)
    assert rec["unit"] == 5 and rec["values"] == expected


# --- probe ---------------------------------------------------------------------------------


def test_parse_expect():
    assert parse_expect("220..240") == (220.0, 240.0)
    assert parse_expect("-10..-2.5") == (-10.0, -2.5)
    assert parse_expect("5..1") == (1.0, 5.0)
    with pytest.raises(ValueError, match="LOW..HIGH"):
        parse_expect("220-240")


def _regs(address, data):
    return {address + i // 2: data[i:i + 2] for i in range(0, len(data), 2)}


def test_probe_candidates_rank_the_true_reading_first():
    regs = _regs(100, wire(231.7, "float32", "CDAB"))
    best = probe_candidates(regs, 100, 220, 240)[0]
    assert (best["type"], best["order"], best["base"], best["scale"]) == ("float32", "CDAB", 0, 1)
    # the manual numbers from 1: the register behind "101" is protocol address 100
    best = probe_candidates(regs, 101, 220, 240)[0]
    assert (best["type"], best["order"], best["base"], best["protocol"]) == ("float32", "CDAB", 1, 100)
    # a word-swapped float read from a 1-based manual: the natural-order reading one register
    # later is half of it (43 65 00 00 = 229.0) and must not win
    regs = _regs(199, b"\0\0" + wire(229.8, "float32", "CDAB") + b"\0\0\0\0")
    best = probe_candidates(regs, 201, 220, 240)[0]
    assert (best["type"], best["order"], best["protocol"], best["value"]) == ("float32", "CDAB", 200, 229.8)
    regs = _regs(10, struct.pack(">HH", 0, 2317))       # uint32 ABCD, scale 0.1
    kinds = [(c["type"], c["order"], c["scale"]) for c in probe_candidates(regs, 10, 220, 240)]
    assert ("uint32", "ABCD", 0.1) in kinds
    assert not probe_candidates(regs, 10, 5e9, 6e9)   # above any 32-bit reading


def test_probe_against_a_server(tmp_path, capsys):
    t = Tables()
    t.put("holding", 200, wire(229.8, "float32", "BADC"))
    t.put("holding", 202, struct.pack(">HH", 0xFFFF, 0xFFFF))
    t.put("input", 50, struct.pack(">h", -153))
    with UmodbusTcpPeer({3: t}) as peer:
        path = config(tmp_path, "type = tcp\nhost = 127.0.0.1\nport = %d" % peer.port,
                      [("dev", 3, ["x = holding 0 uint16"], "")])
        rc, out, err = run(capsys, "probe", "-c", path, "--device", "dev", "--address", "200",
                           "--expect", "220..240")
        assert rc == 0, err
        first = [line for line in out.splitlines() if line.startswith("  probe_")][0]
        assert first.split(";")[0].strip() == "probe_200 = holding 200 float32 BADC"
        assert "= 229.8" in first and "0-based" in first
        # 300051 = input register 50 in the classic form; a signed 16-bit value scaled by 0.1
        rc, out, err = run(capsys, "probe", "-c", path, "--device", "dev", "--address", "300051",
                           "--expect=-16..-15")
        assert rc == 0, err
        lines = [line.split(";")[0].strip() for line in out.splitlines() if line.startswith("  probe_")]
        assert "probe_300051 = input 50 int16 AB scale=0.1" in lines
        # nothing there at all
        rc, out, err = run(capsys, "probe", "-c", path, "--device", "dev", "--address", "7000",
                           "--expect", "1..2")
        assert rc == 1 and "nothing could be read" in err


def test_probe_pasted_line_is_a_valid_point(tmp_path, capsys):
    t = Tables()
    t.put("holding", 9, wire(4321.5, "float64", "GHEFCDAB"))
    with UmodbusTcpPeer({1: t}) as peer:
        path = config(tmp_path, "type = tcp\nhost = 127.0.0.1\nport = %d" % peer.port,
                      [("dev", 1, ["x = holding 1 uint16"], "base = 1")])
        rc, out, _err = run(capsys, "probe", "-c", path, "--device", "dev", "--address", "10",
                            "--expect", "4000..5000")
        assert rc == 0
        pasted = [line.split(";")[0].strip() for line in out.splitlines() if line.startswith("  probe_")][0]
        assert pasted == "probe_10 = holding 10 float64 GHEFCDAB"   # device base 1: 10 -> protocol 9
        path2 = config(tmp_path, "type = tcp\nhost = 127.0.0.1\nport = %d" % peer.port,
                       [("dev", 1, [pasted], "base = 1")], name="pasted.ini")
        rc, out, _err = run(capsys, "poll", "-c", path2, "--json")
        assert rc == 0 and json.loads(out)["values"] == {"probe_10": 4321.5}
