"""The INI file (agent/config.py): samples, defaults, every error at once with file:line."""
import re
import textwrap

import pytest

from agent.config import (
    AGENT_SCHEMA,
    CONNECTION_SCHEMA,
    DEVICE_SCHEMA,
    POINT_OPTIONS,
    UPLOAD_SCHEMA,
    AgentSettings,
    ConfigError,
    check_config,
    load_config,
    parse_duration,
)
from agent.types import TYPES
from tests.conftest import ROOT

CONF = ROOT / "conf"


def write(tmp_path, text, name="agent.ini"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text).lstrip("\n"))
    return str(p)


def errors_of(path):
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.errors


MINIMAL = """
[agent]
id = t1

[connection:plc]
type = tcp
host = 127.0.0.1

[device:d1]
connection = plc

[points:d1]
v = holding 0 uint16
"""


# --- the samples ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["agent.ini", "site-tcp-plc.ini", "site-rs485-meters.ini"])
def test_samples_load_without_errors_or_warnings(name):
    cfg, errors, warnings = check_config(str(CONF / name))
    assert errors == [] and warnings == []
    assert cfg.devices and all(d.requests for d in cfg.devices)


def test_sample_covers_every_option():
    text = (CONF / "agent.ini").read_text()
    keys = set(re.findall(r"^([a-z_0-9]+)\s*=", text, re.M))
    for schema in (AGENT_SCHEMA, UPLOAD_SCHEMA, CONNECTION_SCHEMA, DEVICE_SCHEMA):
        assert set(schema) <= keys, set(schema) - keys
    point_lines = "\n".join(re.findall(r"^\w+\s*=\s*(?:coil|discrete|holding|input|\d{5,6}).*$", text, re.M))
    for option in POINT_OPTIONS:
        assert option + "=" in point_lines, option
    for type_name in TYPES:
        assert re.search(r"\b%s\b" % type_name, point_lines), type_name


def test_sample_values_are_the_documented_ones():
    cfg = load_config(str(CONF / "agent.ini"))
    a = cfg.agent
    assert (a.id, a.interval, a.spool_dir, a.fsync, a.fsync_interval) == (
        "site7-rut200", 10.0, "/var/lib/modbus-agent/spool", "interval", 5.0)
    bus = cfg.connections["bus1"]
    assert (bus.type, bus.port, bus.baud, bus.parity, bus.stopbits, bus.timeout) == (
        "rtu", "/dev/ttyUSB0", 9600, "N", 1, 0.5)
    meter = cfg.device("meter1")
    assert meter.connection is bus and meter.interval == 5.0 and meter.profile == "sdm630"
    names = [p.name for p in meter.points]
    assert "frequency" not in names          # `frequency = off` dropped the profile's point
    assert "voltage_l1" in names and "serial_no" in names
    plc = cfg.device("plc1")
    assert plc.mode == "on_change" and plc.heartbeat == 300.0 and plc.base == 1
    level = [p for p in plc.points if p.name == "level"][0]
    assert (level.address, level.deadband, level.unit) == (0, 0.5, "%")


# --- defaults ------------------------------------------------------------------------------


def test_defaults_in_one_place(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    a = cfg.agent
    assert (a.interval, a.spool_dir, a.spool_max_mb, a.spool_max_age, a.spool_segment_kb) == (
        10.0, "/var/lib/modbus-agent/spool", 16, 7 * 86400, 256)
    assert (a.fsync, a.fsync_interval, a.log_level, a.log_file) == ("interval", 5.0, "info", None)
    assert (a.summary_interval, a.health_interval, a.dead_after, a.dead_backoff_max) == (300, 300, 3, 300)
    assert a.spool_max_bytes == 16 << 20 and a.spool_segment_bytes == 256 << 10
    assert cfg.upload is None
    c = cfg.connections["plc"]
    assert (c.port, c.timeout, c.pause, c.connect_timeout) == (502, 1.0, 0.0, None)
    d = cfg.devices[0]
    assert (d.unit, d.interval, d.base, d.byte_order, d.max_registers, d.max_bits, d.max_gap) == (
        1, 10.0, 0, "ABCD", 125, 2000, 10)
    assert (d.mode, d.enabled) == ("on_schedule", True)
    # the same defaults when the objects are built in code
    assert AgentSettings(id="x").dead_backoff_max == a.dead_backoff_max


def test_upload_defaults_and_quarantine_next_to_the_spool(tmp_path):
    text = MINIMAL + "\n[upload]\nurl = https://c.example/api/v1/batches\n"
    u = load_config(write(tmp_path, text)).upload
    assert (u.batch_max_records, u.batch_max_kb, u.gzip, u.timeout, u.verify, u.backoff_max) == (
        500, 256, True, 10.0, True, 300.0)
    assert u.token is None and u.ca_file is None
    assert u.quarantine_file == "/var/lib/modbus-agent/spool/quarantine.jsonl"


@pytest.mark.parametrize("text,seconds", [
    ("500ms", 0.5), ("10s", 10.0), ("5m", 300.0), ("1h", 3600.0), ("7d", 604800.0),
    ("2.5", 2.5), ("0.25s", 0.25), (" 3 s ", 3.0)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5 minutes", "-1s", "1w", "s"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


# --- every error, at once, with its place --------------------------------------------------

BROKEN = """
[agent]
idd = x
interval = 10x
fsync = sometimes

[conection:plc]
type = tcp

[connection:tcp1]
type = tcp
host = 10.0.0.1
port = 70000
baud = 9600

[connection:bus1]
type = rtu
baud = fast

[device:meter1]
connection = bus2
intervall = 5s
base = 2

[device:meter2]
connection = tcp1

[device:meter3]

[points:meter1]
a = holding 0 float32
b = holding 1 uint16
c = holdin 5 int16
d = holding 7 float33
e = holding 9 int16 scael=2
f = 40001 int32 ABCD
g = coil 3 int16
h = holding 20 float32 ABDC
i = holding 30 string
j = holding 300001 uint16
k = holding 40 float32 enum=0:a
l = 12 uint16

[points:meter9]
x = coil 1 bool
"""

EXPECTED = [
    (1, "[agent] id: missing (required)"),
    (2, "[agent] idd: unknown option (did you mean 'id'?)"),
    (3, "[agent] interval: '10x' is not a duration"),
    (4, "[agent] fsync: must be one of always | interval | never"),
    (6, "[conection:plc]: unknown section (did you mean 'connection'?)"),
    (12, "[connection:tcp1] port: must be between 1 and 65535"),
    (13, "[connection:tcp1] baud: does not apply to a tcp connection"),
    (15, "[connection:bus1] port: missing (required)"),
    (17, "[connection:bus1] baud: 'fast' is not a whole number"),
    (20, "[device:meter1] connection: no [connection:bus2] (did you mean 'bus1'?)"),
    (21, "[device:meter1] intervall: unknown option (did you mean 'interval'?)"),
    (22, "[device:meter1] base: must be between 0 and 1"),
    (24, "[device:meter2]: no points: add a [points:meter2] section or a profile"),
    (25, "[device:meter2] connection: connection 'tcp1' has errors"),
    (27, "[device:meter3] connection: missing (required)"),
    (27, "[device:meter3]: no points"),
    (31, "[points:meter1] b: overlaps a (holding 0) at holding 1"),
    (32, "[points:meter1] c: unknown table 'holdin'"),
    (33, "[points:meter1] d: unknown type 'float33' (did you mean 'float32'?)"),
    (34, "[points:meter1] e: unknown option 'scael' (did you mean 'scale'?)"),
    (35, "[points:meter1] f: overlaps a (holding 0) at holding 0"),
    (36, "[points:meter1] g: coil table holds single bits: use type bool"),
    (37, "[points:meter1] h: unexpected 'ABDC' (byte orders:"),
    (38, "[points:meter1] i: `string` needs its length in registers"),
    (39, "[points:meter1] j: classic address 300001 is in the input table, not holding"),
    (40, "[points:meter1] k: enum applies to integer and bit values, not float32"),
    (41, "[points:meter1] l: address 12 needs a table"),
    (43, "[points:meter9]: no [device:meter9] for these points (did you mean"),
]


def test_every_error_reported_at_once_in_line_order(tmp_path):
    path = write(tmp_path, BROKEN)
    errors = errors_of(path)
    assert len(errors) == len(EXPECTED), "\n".join(errors)
    for got, (line, start) in zip(errors, EXPECTED):
        assert got.startswith("%s:%d: %s" % (path, line, start)), got


def test_config_error_message_lists_them_all(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, BROKEN))
    assert str(info.value).count("\n") == len(EXPECTED) - 1


def test_syntax_errors(tmp_path):
    path = write(tmp_path, """
    orphan = 1
    [agent]
    id = a
    id = b
    just words
      indented = 1
    [agent
    """)
    errors = errors_of(path)
    assert any(e.startswith(path + ":1: [-] orphan: option before the first [section]") for e in errors)
    assert any(e.startswith(path + ":4: [agent] id: repeated (first at line 3)") for e in errors)
    assert any(e.startswith(path + ":5: [agent]: expected `key = value`") for e in errors)
    assert any(e.startswith(path + ":6: [agent]: indented line") for e in errors)
    assert any(e.startswith(path + ":7: [agent]: bad section header") for e in errors)


def test_missing_file_names_it(tmp_path):
    errors = errors_of(str(tmp_path / "nope.ini"))
    assert len(errors) == 1 and "nope.ini" in errors[0] and "cannot read" in errors[0]


def test_inline_comments_and_case(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL.replace("[points:d1]\nv = holding 0 uint16", """[points:d1]
Voltage_L1 = holding 0 uint16 unit=V   ; a comment
Mixed#Name = holding 1 uint16 # another""")))
    assert [(p.name, p.unit) for p in cfg.devices[0].points] == [("Voltage_L1", "V"), ("Mixed#Name", None)]


def test_classic_addresses(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL.replace("v = holding 0 uint16", """
h1 = 40001 uint16
h2 = 400010 uint16
i1 = 30001 int16
c1 = 00001
d1 = 10002 bool
h3 = holding 400020 uint16
lit = holding 40001 uint16""")))
    got = {p.name: (p.table, p.address) for p in cfg.devices[0].points}
    assert got == {"h1": ("holding", 0), "h2": ("holding", 9), "i1": ("input", 0), "c1": ("coil", 0),
                   "d1": ("discrete", 1), "h3": ("holding", 19), "lit": ("holding", 40001)}


def test_base_one_shifts_addresses(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL.replace("connection = plc", "connection = plc\nbase = 1")
                            .replace("v = holding 0 uint16", "v = holding 1 uint16\nw = 40003 uint16")))
    assert [(p.name, p.address) for p in cfg.devices[0].points] == [("v", 0), ("w", 2)]
    errors = errors_of(write(tmp_path, MINIMAL.replace("connection = plc", "connection = plc\nbase = 1")))
    assert any("below the device's base 1" in e for e in errors)


def test_bit_fields_may_share_a_register_but_not_bits(tmp_path):
    ok = MINIMAL.replace("v = holding 0 uint16", "a = holding 5 bits 0-3\nb = holding 5 bits 4-7\n"
                         "c = holding 5 uint8 high\nd = holding 6 bit 0\ne = holding 6 bit 1")
    assert len(load_config(write(tmp_path, ok)).devices[0].requests) == 1
    bad = MINIMAL.replace("v = holding 0 uint16", "a = holding 5 bits 0-3\nb = holding 5 bits 3-7")
    errors = errors_of(write(tmp_path, bad))
    assert len(errors) == 1 and "[points:d1] b: overlaps a (holding 5)" in errors[0]


def test_point_too_big_for_max_registers(tmp_path):
    text = MINIMAL.replace("connection = plc", "connection = plc\nmax_registers = 4").replace(
        "v = holding 0 uint16", "s = holding 0 string 8")
    errors = errors_of(write(tmp_path, text))
    assert len(errors) == 1 and "spans 8 registers, more than max_registers = 4" in errors[0]


def test_device_without_points_and_disabled_devices(tmp_path):
    errors = errors_of(write(tmp_path, MINIMAL.replace("[points:d1]\nv = holding 0 uint16", "")))
    assert errors == ["%s:8: [device:d1]: no points: add a [points:d1] section or a profile"
                      % (tmp_path / "agent.ini")]
    cfg = load_config(write(tmp_path, MINIMAL.replace("connection = plc", "connection = plc\nenabled = no")))
    assert cfg.devices == [] and cfg.disabled == ["d1"]


def test_serial_unit_zero_is_broadcast(tmp_path):
    text = """
    [agent]
    id = t
    [connection:bus]
    type = rtu
    port = /dev/ttyUSB0
    [device:m]
    connection = bus
    unit = 0
    [points:m]
    v = input 0 uint16
    """
    errors = errors_of(write(tmp_path, text))
    assert len(errors) == 1 and "[device:m] unit: must be 1..247 on a serial bus" in errors[0]


# --- the bus budget ------------------------------------------------------------------------

SLOW_BUS = """
[agent]
id = t
[connection:bus]
type = rtu
port = /dev/ttyUSB0
baud = {baud}
parity = E
[device:m1]
connection = bus
unit = 1
interval = {interval}
[points:m1]
block = input 0 string 100
[device:m2]
connection = bus
unit = 2
interval = {interval}
[points:m2]
block = input 0 string 100
"""


def test_an_interval_the_bus_cannot_serve_is_an_error(tmp_path):
    # 2 x (8 + 205 bytes) at 1200 baud 8E1 = ~3.9 s per cycle, against 2 s
    path = write(tmp_path, SLOW_BUS.format(baud=1200, interval="2s"))
    errors = errors_of(path)
    assert len(errors) == 1
    assert re.match(re.escape(path) + r":11: \[device:m1\] interval: the bus cannot serve this: "
                    r"connection bus needs \d+% of its time \(m1 \d+%, m2 \d+%\)", errors[0])


def test_a_busy_bus_is_a_warning(tmp_path):
    # the same at 1200 baud against 4.5 s: ~87%
    cfg, errors, warnings = check_config(write(tmp_path, SLOW_BUS.format(baud=1200, interval="4.5s")))
    assert errors == [] and cfg is not None
    assert len(warnings) == 1 and "connection bus is busy" in warnings[0]
    cfg, errors, warnings = check_config(write(tmp_path, SLOW_BUS.format(baud=19200, interval="4.5s")))
    assert errors == [] and warnings == []


# --- profiles in a config ------------------------------------------------------------------


def test_profile_points_override_and_removal(tmp_path):
    text = """
    [agent]
    id = t
    [connection:bus]
    type = rtu
    port = /dev/ttyUSB0
    [device:m]
    connection = bus
    profile = sdm120
    [points:m]
    voltage = input 0 float32 unit=V decimals=1
    frequency = off
    relay = coil 0 bool
    """
    dev = load_config(write(tmp_path, text)).devices[0]
    by_name = {p.name: p for p in dev.points}
    assert by_name["voltage"].decimals == 1
    assert "frequency" not in by_name and "relay" in by_name and "total_energy" in by_name
    assert dev.max_registers == 80        # the profile's limit applies unless the device sets one


def test_profile_problems(tmp_path):
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "mine.ini").write_text("[profile]\nbase = 3\n[points]\nx = holding 0 int99\n")
    text = """
    [agent]
    id = t
    [connection:plc]
    type = tcp
    host = h
    [device:a]
    connection = plc
    profile = nosuch
    [device:b]
    connection = plc
    profile = mine
    [points:b]
    gone = off
    """
    path = write(tmp_path, text)
    errors = errors_of(path)
    prof = str(tmp_path / "profiles" / "mine.ini")
    assert errors[0].startswith(path + ":8: [device:a] profile: profile 'nosuch' not found")
    assert any(e.startswith(path + ":13: [points:b] gone: `off` removes a profile point") for e in errors)
    assert any(e.startswith(prof + ":2: [profile] base: must be between 0 and 1") for e in errors)
    assert any(e.startswith(prof + ":4: [points] x: unknown type 'int99'") for e in errors)


# --- connections open the codec clients ----------------------------------------------------


def test_connections_open_codec_clients(tmp_path):
    from agent.modbus.client import RtuClient, RtuOverTcpClient, TcpClient

    text = """
    [agent]
    id = t
    [connection:a]
    type = tcp
    host = 10.1.1.1
    port = 1502
    timeout = 2s
    connect_timeout = 5s
    pause = 20ms
    backoff_max = 30s
    [connection:b]
    type = rtu
    port = /dev/ttyS1
    baud = 19200
    parity = e
    stopbits = 2
    bytesize = 7
    timeout = 300ms
    rs485_echo = yes
    [connection:c]
    type = rtu-over-tcp
    host = gw
    """
    cfg = load_config(write(tmp_path, text))
    a, b, c = (cfg.connections[n].open() for n in "abc")
    try:
        assert isinstance(a, TcpClient) and (a.host, a.port, a.timeout, a.connect_timeout, a.pause,
                                             a.backoff_max) == ("10.1.1.1", 1502, 2.0, 5.0, 0.02, 30.0)
        assert isinstance(b, RtuClient) and (b.port, b.baudrate, b.parity, b.bytesize, b.stopbits,
                                             b.timeout, b.rs485_echo) == ("/dev/ttyS1", 19200, "E", 7, 2, 0.3, True)
        assert isinstance(c, RtuOverTcpClient) and (c.host, c.port, c.timeout) == ("gw", 502, 1.0)
    finally:
        for client in (a, b, c):
            client.close()


# --- robustness: whatever an operator types, the answer is a Config or a ConfigError -------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_LINES = st.sampled_from([
    "[agent]", "[upload]", "[connection:c]", "[device:d]", "[points:d]", "[device:]", "[x",
    "id = a", "id = ", "interval = 5s", "interval = -1", "url = http://x/api/v1/batches",
    "type = tcp", "type = rtu", "type = rtu-over-tcp", "type = udp", "host = h", "port = 502",
    "port = /dev/ttyS0", "port = x", "baud = 0", "parity = Q", "connection = c", "connection = zz",
    "unit = 0", "unit = 300", "base = 1", "byte_order = CDAB", "profile = sdm120", "profile = nope",
    "max_registers = 2", "max_gap = 0", "enabled = no", "mode = on_change", "v = holding 0 float32",
    "w = 40001 int32 CDAB scale=0.1", "x = coil 0", "y = holding 0 bits 3-1", "z = holding 5 string 0",
    "s = input 65535 uint32", "e = holding 9 uint16 enum=1:on,0", "q = holding 9 bit 16", "r = = =",
    "t = holding 0x10 int8 high", "u = 300001 float64 HGFEDCBA decimals=99", "v = off", "  indented",
    "; comment", "", "junk", "k = holding -5 uint16", "m = holding 1 int16 scale=0",
    "n = holding 9 bit x", "o = holding 1 string x", "p = holding 2 bits a-b", "q = holding 3 int8 mid",
    "g = holding", "h = input 0x", "i = coil 1 bool ABCD", "j = holding 4 float32 AB",
])


@settings(deadline=None, max_examples=300)
@given(st.lists(_LINES, max_size=30))
def test_any_text_gives_a_config_or_a_config_error(lines):
    text = "\n".join(lines)
    try:
        cfg = load_config("fuzz.ini", text=text)
    except ConfigError as e:
        assert e.errors and all(msg.startswith("fuzz.ini:") or "profiles" in msg for msg in e.errors)
    else:
        assert cfg.agent.id
