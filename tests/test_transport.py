"""The transport registry (agent/modbus/transport.py) and the codec facts it builds on.

The registry's promise: a new transport is its client module plus one line in TRANSPORTS; the
config (types, keys, defaults, errors), `check`'s bus time and Connection.open follow."""
import os
import subprocess
import sys
import textwrap

import pytest

from agent.config import CONNECTION_SCHEMA, CONNECTION_TYPES, load_config
from agent.modbus import pdu, rtu, tcp
from agent.modbus.keys import REQUIRED
from agent.modbus.transport import TRANSPORTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_config_takes_the_registry_as_it_is():
    assert CONNECTION_TYPES == tuple(TRANSPORTS) == ("tcp", "rtu", "rtu-over-tcp", "ascii",
                                                     "ascii-over-tcp")
    for name, t in TRANSPORTS.items():
        assert name == t.client.TYPE
        for key in t.keys:
            assert name in CONNECTION_SCHEMA[key][2], (name, key)
    takes = {key for t in TRANSPORTS.values() for key in t.keys}
    assert set(CONNECTION_SCHEMA) == takes | {"type"}
    assert [t.serial for t in TRANSPORTS.values()] == [False, True, True, True, True]


def test_required_keys_and_defaults_per_type(tmp_path):
    assert TRANSPORTS["rtu"].keys["port"].default is REQUIRED
    assert TRANSPORTS["tcp"].keys["port"].default == 502
    path = tmp_path / "a.ini"
    path.write_text("[agent]\nid = t\n[connection:a]\ntype = tcp\nhost = h\n"
                    "[connection:b]\ntype = rtu\nport = /dev/ttyS0\n")
    cfg = load_config(str(path))
    a, b = cfg.connections["a"], cfg.connections["b"]
    assert (a.port, a.timeout, a.transport) == (502, 1.0, TRANSPORTS["tcp"])
    assert (b.port, b.timeout, b.baud, b.host) == ("/dev/ttyS0", 0.5, 9600, None)


@pytest.mark.parametrize("function", sorted(pdu.READ_FUNCTIONS))
def test_read_lengths_come_from_the_function_table(function):
    fn = pdu.FUNCTIONS[function]
    assert pdu.READ_MAX[function] == fn.max_count
    for count in (1, 7, 8, 9, 16, fn.max_count):
        assert pdu.read_data_length(function, count) == fn.response_length(count) - 2
        assert rtu.read_response_length(function, count) == rtu.response_length(fn, count)
        assert tcp.read_response_length(function, count) == tcp.response_length(fn, count)


# A transport the agent does not have: its client module (here inline) and one registry line.
NEW_TRANSPORT = textwrap.dedent("""
    import sys
    from agent.modbus import keys, transport
    from agent.modbus.base import Client

    class LoopClient(Client):
        TYPE = "loop"
        SERIAL = True
        KEYS = (keys.SERIAL_PORT, keys.timeout_key(0.25)) + keys.LINK_KEYS + (
            keys.Key("lines", "int", 2, bounds=(1, 4)),)

        @classmethod
        def from_settings(cls, s):
            c = cls(s.timeout, s.pause, 0.5, s.backoff_max)
            c.port, c.lines = s.port, s.lines
            return c

        @classmethod
        def describe(cls, s):
            return "loop %s x%d" % (s.port, s.lines)

        @classmethod
        def bus_time(cls, s, reads):
            return cls._bus_time(reads, 8, lambda f, n: 5 + 2 * n, 0.001, 0.01 + s.pause)

    transport.TRANSPORTS["loop"] = transport.Transport(LoopClient)   # the one registry line

    from agent.commands import plan_lines
    from agent.config import ConfigError, load_config

    good, bad = sys.argv[1], sys.argv[2]
    cfg = load_config(good)
    conn = cfg.connections["l"]
    client = conn.open()
    print(type(client).__name__, client.port, client.lines, client.timeout)
    print(conn.describe())
    print(cfg.device("d").estimate())
    print(plan_lines(cfg)[0])
    try:
        load_config(bad)
    except ConfigError as e:
        print("\\n".join(line.split(": ", 1)[1] for line in e.errors))
""")


def test_a_new_transport_is_one_client_class_and_one_registry_line(tmp_path):
    good = tmp_path / "good.ini"
    good.write_text("[agent]\nid = t\n[connection:l]\ntype = loop\nport = /dev/loop0\nlines = 3\n"
                    "[device:d]\nconnection = l\n[points:d]\na = holding 0 uint16\n")
    bad = tmp_path / "bad.ini"
    bad.write_text("[agent]\nid = t\n[connection:l]\ntype = loop\nlines = 9\nhost = h\n"
                   "[device:d]\nconnection = l\nunit = 0\n[points:d]\na = holding 0 uint16\n")
    out = subprocess.run([sys.executable, "-c", NEW_TRANSPORT, str(good), str(bad)],
                         capture_output=True, text=True, timeout=30,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "LoopClient /dev/loop0 3 0.25"
    assert lines[1] == "loop /dev/loop0 x3"
    assert lines[2] == str({"requests": 1, "bytes": 15, "seconds": 15 * 0.001 + 0.01})
    assert lines[3].startswith("connection l: loop /dev/loop0 x3, timeout 250ms")
    errors = lines[4:]
    assert "[connection:l] lines: must be between 1 and 4, not 9" in errors
    assert "[connection:l] host: does not apply to a loop connection (only tcp, rtu-over-tcp, ascii-over-tcp)" in errors
    assert "[connection:l] port: missing (required): the serial device, e.g. /dev/ttyUSB0" in errors
