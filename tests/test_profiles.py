"""Bundled meter profiles (conf/profiles): they load, cite their source, match the published
register maps at known anchor points, and decode a served register image end to end."""
import json
import struct

import pytest

from agent import cli
from agent.config import PROFILE_DIRS, Problems, load_config, load_profile
from agent.types import TYPES
from tests.conftest import ROOT
from tests.test_commands import Tables, UmodbusTcpPeer, wire

PROFILE_DIR = ROOT / "conf" / "profiles"
PROFILES = sorted(p.stem for p in PROFILE_DIR.glob("*.ini"))


def test_the_four_meters_are_there():
    assert {"sdm120", "sdm630", "iem3155", "em24"} <= set(PROFILES)
    assert str(PROFILE_DIR) in PROFILE_DIRS


@pytest.mark.parametrize("name", PROFILES)
def test_profile_loads_and_cites_its_source(name):
    path = str(PROFILE_DIR / (name + ".ini"))
    problems = Problems()
    meta, points = load_profile(path, problems)
    assert problems.errors == []
    assert meta["name"] == name and meta["manufacturer"] and meta["source"]
    text = (PROFILE_DIR / (name + ".ini")).read_text()
    assert "Source:" in text
    assert len(points) >= 10
    assert len({p.name for p in points}) == len(points)


# (profile, point, table, protocol address, type, order, scale) straight from the manuals
ANCHORS = [
    ("sdm120", "voltage", "input", 0x0000, "float32", "ABCD", 1.0),
    ("sdm120", "frequency", "input", 0x0046, "float32", "ABCD", 1.0),
    ("sdm120", "total_energy", "input", 0x0156, "float32", "ABCD", 1.0),
    ("sdm630", "voltage_l3", "input", 0x0004, "float32", "ABCD", 1.0),
    ("sdm630", "total_power", "input", 0x0034, "float32", "ABCD", 1.0),
    ("sdm630", "import_energy", "input", 0x0048, "float32", "ABCD", 1.0),
    ("sdm630", "current_neutral", "input", 0x00E0, "float32", "ABCD", 1.0),
    ("iem3155", "current_l1", "holding", 2999, "float32", "ABCD", 1.0),     # register 3000
    ("iem3155", "voltage_l1", "holding", 3027, "float32", "ABCD", 1.0),     # register 3028
    ("iem3155", "import_energy", "holding", 3203, "int64", "ABCDEFGH", 1.0),  # register 3204
    ("em24", "voltage_l1", "holding", 0x0000, "int32", "CDAB", 0.1),
    ("em24", "current_l1", "holding", 0x000C, "int32", "CDAB", 0.001),
    ("em24", "frequency", "holding", 0x0037, "int16", "AB", 0.1),
    ("em24", "import_energy", "holding", 0x003E, "int32", "CDAB", 0.1),
]


@pytest.mark.parametrize("profile,name,table,address,type_name,order,scale", ANCHORS,
                         ids=["%s.%s" % (a[0], a[1]) for a in ANCHORS])
def test_profile_anchor_points(profile, name, table, address, type_name, order, scale):
    _meta, points = load_profile(str(PROFILE_DIR / (profile + ".ini")), Problems())
    p = {p.name: p for p in points}[name]
    assert (p.table, p.address, p.type, p.order, p.scale) == (table, address, type_name, order, scale)


def _site(tmp_path, port, profile):
    path = tmp_path / "site.ini"
    path.write_text("[agent]\nid = t\n[connection:gw]\ntype = tcp\nhost = 127.0.0.1\nport = %d\n"
                    "[device:meter]\nconnection = gw\nunit = 1\nprofile = %s\n" % (port, profile))
    return str(path)


@pytest.mark.parametrize("name", PROFILES)
def test_profile_polls_a_served_register_image(tmp_path, capsys, name):
    """Serve each point's value encoded per the profile, poll through the CLI, compare."""
    _meta, points = load_profile(str(PROFILE_DIR / (name + ".ini")), Problems())
    t = Tables()
    for table in ("holding", "input"):
        for a in range(0, 4000):          # unmapped registers read as 0, as the meters do
            getattr(t, table)[a] = 0
    expected = {}
    for i, p in enumerate(points):
        kind = TYPES[p.type].kind
        if p.enum:
            raw = sorted(p.enum)[-1]
            expected[p.name] = p.enum[raw]
        elif kind == "float":
            raw = 100.0 + i + 0.5
            expected[p.name] = raw
        else:
            raw = 1000 + 7 * i
            expected[p.name] = raw if p.scale == 1.0 else pytest.approx(raw * p.scale)
        code = {"int16": "int16", "uint16": "uint16"}.get(p.type, p.type)
        t.put(p.table, p.address, wire(raw, code, p.order))
    with UmodbusTcpPeer({1: t}) as peer:
        cfg = load_config(_site(tmp_path, peer.port, name))
        assert len(cfg.devices[0].requests) <= 6
        rc = cli.main(["poll", "-c", cfg.path, "--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert json.loads(out)["values"] == expected


def test_eastron_requests_stay_within_80_registers(tmp_path):
    for profile in ("sdm120", "sdm630"):
        cfg = load_config(_site(tmp_path, 502, profile))
        assert all(r.count <= 80 for r in cfg.devices[0].requests)


def test_em24_known_reading():
    """EM24 sends INT32 least significant word first: 2301 (V*10) -> 230.1 V."""
    _meta, points = load_profile(str(PROFILE_DIR / "em24.ini"), Problems())
    p = {p.name: p for p in points}["voltage_l1"]
    from agent.device import Request

    data = struct.pack(">HH", 2301 & 0xFFFF, 0)    # LSW first
    assert Request(p.table, p.address, p.count, [p]).decoder.decode(data, {}) == {"voltage_l1": 230.1}
