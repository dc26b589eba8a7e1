"""Loading the whole file: sections sorted by kind, each parsed against its schema, devices
planned, then the cross-checks (connections used, units unique, points not overlapping, the bus
time fitting the intervals).
"""
import os
import re

from agent import common
from agent.config.ini import Problems, _line_of, _suggest, read_ini
from agent.config.points import parse_point
from agent.config.profiles import PROFILE_DIRS, find_profile, load_profile
from agent.config.schema import (
    _BAD,
    _CONNECTION_SCHEMAS,
    AGENT_SCHEMA,
    CONNECTION_SCHEMA,
    DEVICE_SCHEMA,
    GATEWAY_SCHEMA,
    MQTT_SCHEMA,
    UPLOAD_SCHEMA,
    AgentSettings,
    Config,
    Connection,
    GatewaySettings,
    MqttSettings,
    UploadSettings,
    _apply_schema,
)
from agent.config.values import name_problem
from agent.device import Device
from agent.modbus.transport import TRANSPORTS
from agent.types import TABLES

#: share of its interval a connection may spend on the bus before `check` warns
BUS_WARN = 0.80


class ConfigError(common.ConfigError):
    """Every problem found in the agent's config file, one `file:line: [section] key: reason` each."""


def load_or_report(path, out=None):
    """`load_config`, or None after printing every error and their count (to stderr): what
    each command does with a bad file before exiting 2."""
    import sys

    try:
        return load_config(path)
    except ConfigError as e:
        out = out or sys.stderr
        for line in e.errors:
            print(line, file=out)
        print("%s: %d error(s)" % (path, len(e.errors)), file=out)
        return None


# --- loading -------------------------------------------------------------------------------


def load_config(path, text=None):
    """Read, parse and validate `path` -> Config, or raise ConfigError with every problem."""
    cfg, problems = _load(path, text)
    if problems.errors:
        raise ConfigError(problems.errors)
    return cfg


def check_config(path, text=None):
    """(Config or None, errors, warnings): for `check`, which prints everything."""
    cfg, problems = _load(path, text)
    return (None if problems.errors else cfg), problems.errors, problems.warnings


SECTION_KINDS = ("agent", "upload", "gateway", "mqtt", "connection:NAME", "device:NAME", "points:NAME")
#: the sections that appear at most once
SINGLE_SECTIONS = ("agent", "upload", "gateway", "mqtt")


def default_seq_file(config_path, agent_id):
    """`[agent] seq_file` when not set: next to the config file (/etc/modbus-agent on OpenWrt:
    flash, which survives a reboot, unlike a spool under /var)."""
    return os.path.join(os.path.dirname(os.path.abspath(config_path)), agent_id + ".seq")


def _load(path, text):
    problems = Problems()
    try:
        sections = read_ini(path, problems, text)
    except OSError as e:
        problems.error(path, 0, "-", None, "cannot read: %s" % (e.strerror or e))
        return None, problems
    except UnicodeDecodeError as e:
        problems.error(path, 0, "-", None, "not UTF-8 text: %s" % e)
        return None, problems
    by_kind = _sort_sections(path, sections, problems)

    agent_sec = by_kind["agent"]
    if agent_sec is None:
        problems.error(path, 1, "agent", None, "missing [agent] section (it needs at least `id`)")
        agent = AgentSettings()
    else:
        agent = AgentSettings(**_good(_apply_schema(agent_sec, AGENT_SCHEMA, problems)))
    if agent.seq_file is None and agent.id:
        agent.seq_file = default_seq_file(path, agent.id)
    upload = None
    if by_kind["upload"] is not None:
        upload = _load_upload(by_kind["upload"], agent, problems)
    gateway = None
    if by_kind["gateway"] is not None:
        gateway = GatewaySettings(**_good(_apply_schema(by_kind["gateway"], GATEWAY_SCHEMA, problems)))

    connections = {}
    for name, s in by_kind["connection"].items():
        conn = _load_connection(name, s, problems)
        if conn is not None:
            connections[name] = conn

    devices, disabled = [], []
    for name, s in by_kind["device"].items():
        dev = _load_device(name, s, by_kind["points"].get(name), agent, connections,
                           by_kind["connection"], problems)
        if dev is None:
            continue
        if not dev.enabled:
            disabled.append(name)
            continue
        devices.append(dev)
        dev.connection.devices.append(dev)

    for name, s in by_kind["points"].items():
        if name not in by_kind["device"]:
            problems.error(path, s.line, s.name, None, "no [device:%s] for these points%s" % (
                name, _suggest(name, by_kind["device"])))
    used = {v for s in by_kind["device"].values() for k, (v, _l) in s.entries.items()
            if k.lower() == "connection"}
    for name, s in by_kind["connection"].items():
        if name not in used:
            problems.warn(path, s.line, s.name, None, "no device uses this connection")
    _check_bus_time(connections, problems)
    _check_units(devices, problems)
    _check_gateway_units(devices, gateway, problems)
    _check_serial_ports(connections, by_kind["connection"], problems)
    mqtt = None
    if by_kind["mqtt"] is not None:
        mqtt = _load_mqtt(by_kind["mqtt"], agent, devices, problems)
    return Config(path, agent, upload, connections, devices, disabled, problems.warnings,
                  gateway=gateway, mqtt=mqtt), problems


def _good(values):
    """Parsed values without the ones that failed (already reported)."""
    return {k: v for k, v in values.items() if v is not _BAD}


def _sort_sections(path, sections, problems):
    """{'agent': Section|None, 'upload': Section|None, 'connection'|'device'|'points': {name: Section}}"""
    out = {"agent": None, "upload": None, "gateway": None, "mqtt": None, "connection": {}, "device": {}, "points": {}}
    for s in sections:
        head, sep, name = s.name.partition(":")
        head, name = head.strip().lower(), name.strip()
        if s.name in SINGLE_SECTIONS:
            out[s.name] = s
        elif sep and name and head in ("device", "points") and name_problem(name):
            problems.error(path, s.line, s.name, None, name_problem(name))
        elif sep and name and head in ("connection", "device", "points"):
            out[head][name] = s
        else:
            problems.error(path, s.line, s.name, None, "unknown section%s; sections are %s" % (
                _suggest(head, ("agent", "upload", "gateway", "mqtt", "connection", "device", "points")),
                ", ".join("[%s]" % k for k in SECTION_KINDS)))
    return out


def _load_upload(s, agent, problems):
    upload = UploadSettings(**_good(_apply_schema(s, UPLOAD_SCHEMA, problems)))
    if upload.quarantine_file is None and agent.spool_dir:
        upload.quarantine_file = os.path.join(agent.spool_dir, "quarantine.jsonl")
    if upload.token is not None and upload.url and re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/?#]*@", upload.url):
        # requests turns URL userinfo into "Authorization: Basic ...", replacing the Bearer token:
        # every post would get 401 and the agent would retry forever.
        problems.error(s.path, _line_of(s, "url"), s.name, "url",
                       "has user:password@ and [upload] token is set: the HTTP client would send the "
                       "URL's credentials (Basic) instead of the token, and the collector answers 401; "
                       "remove the user:password@ part")
    if upload.token is None and upload.url and upload.url.startswith("http://") \
            and not re.match(r"^http://(127\.|localhost|\[::1\])", upload.url):
        problems.warn(s.path, _line_of(s, "url"), s.name, "url",
                      "plain http without an [upload] token, so anyone on the path can read and forge uploads")
    return upload


def _load_mqtt(s, agent, devices, problems):
    """[mqtt] -> MqttSettings (agent.mqtt), with the checks that need more than one key."""
    from agent.mqtt.topic import Template, topic_problem
    from agent.mqtt.url import parse_url

    m = MqttSettings(**_good(_apply_schema(s, MQTT_SCHEMA, problems)))
    if m.quarantine_file is None and agent.spool_dir:
        m.quarantine_file = os.path.join(agent.spool_dir, "mqtt-quarantine.jsonl")
    if m.password is not None and m.username is None:
        problems.error(s.path, _line_of(s, "password"), s.name, "password", "needs username")
    if m.key_file and not m.cert_file:
        problems.error(s.path, _line_of(s, "key_file"), s.name, "key_file", "needs cert_file (the client certificate)")
    tls, host = parse_url(m.url)[:2] if m.url else (None, "")
    for key in ("ca_file", "cert_file", "key_file"):
        f = getattr(m, key)
        if f is not None and not os.access(f, os.R_OK):
            problems.error(s.path, _line_of(s, key), s.name, key, "%s: cannot read it (%s)" % (
                f, "no such file" if not os.path.exists(f) else "permission denied"))
        elif f is not None and tls is False:
            problems.warn(s.path, _line_of(s, key), s.name, key, "is only used with an mqtts:// url")
    if m.insecure and tls:
        problems.warn(s.path, _line_of(s, "insecure"), s.name, "insecure",
                      "yes: the broker's certificate is not checked, anyone on the path can pose as the broker")
    local = re.match(r"^(127\.|localhost$|::1$)", host)
    if m.password is not None and tls is False and not local:
        problems.warn(s.path, _line_of(s, "password"), s.name, "password",
                      "is sent in clear text over mqtt://: use mqtts:// so that nobody on the path reads it")
    if m.topic and agent.id:
        tmpl = Template(m.topic)
        if "device" in tmpl.fields:
            for d in devices:
                bad = topic_problem(d.name)
                if bad and "wildcard" in bad:
                    problems.error(d.path, d.line, "device:" + d.name, None,
                                   "the name %s, and [mqtt] topic %r puts it in the topic: rename the device "
                                   "or leave {device} out of the topic" % (bad, m.topic))
    return m


def _load_connection(name, s, problems):
    """[connection:NAME] -> Connection, or None after reporting its problems. Which keys are
    allowed depends on the type, so the type is read first."""
    raw_type = None
    for k, (v, _line) in s.entries.items():
        if k.lower() == "type":
            raw_type = v.strip().lower()
    schema = _CONNECTION_SCHEMAS.get(raw_type)
    if schema is None:
        _apply_schema(s, CONNECTION_SCHEMA, problems)   # reports the type and everything else
        return None
    kind = raw_type
    values = _apply_schema(s, schema, problems, applies=True, kind=kind,
                           hints=TRANSPORTS[kind].keys)
    if any(v is _BAD for v in values.values()):
        return None
    values.pop("type", None)
    return Connection(name, kind, **values)


def _load_device(name, s, psec, agent, connections, conn_sections, problems):
    """[device:NAME] with its profile and [points:NAME] -> Device (planned), or None after
    reporting every problem with it."""
    path = s.path
    values = _apply_schema(s, DEVICE_SCHEMA, problems)
    ok = not any(v is _BAD for v in values.values())
    conn = None
    cname = values.get("connection")
    if cname not in (None, _BAD):
        conn = connections.get(cname)
        if conn is None:
            line = _line_of(s, "connection")
            if cname in conn_sections:
                problems.error(path, line, s.name, "connection",
                               "connection %r has errors (see above)" % cname)
            else:
                problems.error(path, line, s.name, "connection", "no [connection:%s]%s" % (
                    cname, _suggest(cname, conn_sections)))
            ok = False
    unit = values.get("unit", 1)
    if conn is not None and unit is not _BAD and conn.transport.serial and not 1 <= unit <= 247:
        problems.error(path, _line_of(s, "unit"), s.name, "unit",
                       "must be 1..247 on a serial bus (0 is broadcast, which cannot be read)")
        ok = False
    if values.get("first") == "on_change" and values.get("mode", "on_schedule") != "on_change":
        problems.error(path, _line_of(s, "first"), s.name, "first",
                       "first = on_change applies to mode = on_change (a device on_schedule sends "
                       "every poll)")
        ok = False
    points, points_ok = _device_points(name, s, psec, values, agent, problems)
    if not (ok and points_ok):
        return None
    for k, spec in DEVICE_SCHEMA.items():
        values.setdefault(k, spec[1])
    if values["interval"] is None:
        values["interval"] = agent.interval or AGENT_SCHEMA["interval"][1]
    values["connection"] = conn
    gateway_unit = values.pop("gateway_unit")
    dev = Device(name, points=points, **values)
    dev.gateway_unit = gateway_unit
    dev.path, dev.line = path, s.line
    dev.gateway_lines = {k: _line_of(s, k) for k in ("unit", "gateway_unit")}
    dev.interval_line = _line_of(s, "interval")
    return dev


def _device_points(name, s, psec, values, agent, problems):
    """The profile's points, then the device's own, which add or override by name (`off`
    drops one). -> ([Point], ok). May set max_registers/max_gap from the profile."""
    ok = True
    base = values.get("base", 0)
    order = values.get("byte_order", "ABCD")
    base = 0 if base is _BAD else base
    order = "ABCD" if order is _BAD else order
    points = {}
    prof = values.get("profile")
    if prof not in (None, _BAD):
        ppath = find_profile(prof, s.path, agent.profile_dir)
        if ppath is None:
            problems.error(s.path, _line_of(s, "profile"), s.name, "profile",
                           "profile %r not found (looked for %s.ini in the config's profiles/ "
                           "folder, %s)" % (prof, prof, ", ".join(PROFILE_DIRS)))
            ok = False
        else:
            n_before = problems.count()
            meta, ppoints = load_profile(ppath, problems)
            ok = problems.count() == n_before
            for k in ("max_registers", "max_gap"):
                if k not in values and meta.get(k) not in (None, _BAD):
                    values[k] = meta[k]
            points.update((p.name, p) for p in ppoints)
    if psec is not None:
        for pname, (text, line) in psec.entries.items():
            if text.lower() in ("off", "none", "-"):
                if pname not in points:
                    problems.error(s.path, line, psec.name, pname,
                                   "`%s` removes a profile point, but the profile has no such point" % text)
                    ok = False
                points.pop(pname, None)
                continue
            p = parse_point(pname, text, base, order, s.path, line, psec.name, problems)
            if p is None:
                ok = False
                continue
            points.pop(pname, None)
            points[pname] = p
    if not points and ok:
        problems.error(s.path, s.line, s.name, None,
                       "no points: add a [points:%s] section or a profile" % name)
        ok = False
    pts = list(points.values())
    if not _check_overlaps(pts, problems):
        ok = False
    for p in pts:
        key = "max_bits" if TABLES[p.table][1] else "max_registers"
        limit = values.get(key)
        if limit not in (None, _BAD) and p.count > limit:
            problems.error(p.path, p.line, p.section, p.name,
                           "spans %d registers, more than %s = %d" % (p.count, key, limit))
            ok = False
    return pts, ok


def _check_units(devices, problems):
    seen = {}
    for d in devices:
        key = (d.connection.name, d.unit)
        if key in seen:
            problems.warn(d.path, d.line, "device:" + d.name, "unit",
                          "unit %d on %s is also device %s" % (d.unit, d.connection.name, seen[key]))
        seen[key] = d.name


def gateway_unit(d):
    """The unit id the gateway serves device `d` under (None: not served)."""
    if d.gateway_unit is False:
        return None
    return d.unit if d.gateway_unit is None else d.gateway_unit


def _check_gateway_units(devices, gateway, problems):
    """One gateway unit id, one device: two devices that would be served under the same unit id
    are an error naming both, unless they are the same unit on the same connection (two
    sections polling one device: both sections' blocks are served). Without [gateway],
    gateway_unit only earns a warning (it does nothing)."""
    if gateway is None:
        for d in devices:
            if d.gateway_unit is not None:
                problems.warn(d.path, _line_of_device(d, "gateway_unit"), "device:" + d.name, "gateway_unit",
                              "has no effect without a [gateway] section")
        return
    seen = {}
    for d in devices:
        gu = gateway_unit(d)
        if gu is None:
            continue
        other = seen.get(gu)
        if other is None:
            seen[gu] = d
            continue
        if (other.connection.name, other.unit) == (d.connection.name, d.unit):
            continue
        key = "gateway_unit" if d.gateway_unit is not None else "unit"
        problems.error(d.path, _line_of_device(d, key), "device:" + d.name, key,
                       "the gateway would serve both this device (unit %d on %s) and device %s "
                       "(%s:%s, unit %d on %s) under unit %d: set gateway_unit = N (a free unit "
                       "id) in one of them" % (d.unit, d.connection.name, other.name, other.path,
                                               other.line, other.unit, other.connection.name, gu))


def _line_of_device(d, key):
    """The line of `key` in device `d`'s section (its section line when not set there)."""
    return (getattr(d, "gateway_lines", None) or {}).get(key) or d.line


def _check_serial_ports(connections, sections, problems):
    """Two connections in use on one serial port: the agent opens a port once, exclusively,
    so the second one's devices would fail every poll (`scan` suggests a second connection
    for devices found at another rate; both cannot be used at once)."""
    seen = {}
    for name, conn in connections.items():
        key = conn.transport.keys.get("port")
        if not conn.devices or key is None or key.kind != "path" or not conn.port:
            continue
        real = os.path.realpath(conn.port)
        if real in seen:
            other = sections[seen[real]]
            s = sections[name]
            problems.error(s.path, _line_of(s, "port"), s.name, "port",
                           "%s is also the port of [connection:%s] (line %d): one serial port is "
                           "one bus, opened once, so one of them could never be polled; put the "
                           "devices of that port in one connection, at one line setting"
                           % (conn.port, seen[real], _line_of(other, "port")))
        else:
            seen[real] = name


def _check_overlaps(points, problems):
    """Two points may share a register only through disjoint bit masks (bit, bits, int8),
    unless one of them says `overlap=yes` (the manual defines both on those registers: a
    status word and its bits, a float and its raw words)."""
    ok = True
    owners = {}   # (table, address) -> [(mask, point)]
    for p in points:
        if p.overlap:
            continue
        for addr, mask in p.footprint().items():
            lst = owners.setdefault((p.table, addr), [])
            for other_mask, other in lst:
                if other_mask & mask:
                    problems.error(p.path, p.line, p.section, p.name,
                                   "overlaps %s (%s %d) at %s %d; if the manual defines both "
                                   "there, add overlap=yes to one of them" % (
                                       other.name, other.table, other.address, p.table, addr))
                    ok = False
                    break
            else:
                lst.append((mask, p))
                continue
            break
    return ok


def _check_bus_time(connections, problems):
    """A connection's devices must fit their intervals: sum of (bus time / interval) <= 100%."""
    for conn in connections.values():
        if not conn.devices:
            continue
        shares = [(d.estimate()["seconds"] / d.interval, d) for d in conn.devices]
        load = sum(s for s, _ in shares)
        worst_share, worst = max(shares, key=lambda x: x[0])
        detail = ", ".join("%s %.0f%%" % (d.name, 100 * s) for s, d in shares)
        where = (worst.path, worst.interval_line, "device:" + worst.name, "interval")
        if load > 1.0:
            problems.error(*where, "the bus cannot serve this: connection %s needs %.0f%% of its time "
                                   "(%s); lengthen intervals, raise the baud rate or drop points"
                           % (conn.name, 100 * load, detail))
        elif load > BUS_WARN:
            problems.warn(*where, "connection %s is busy %.0f%% of the time (%s): little room for "
                                  "retries and slow answers" % (conn.name, 100 * load, detail))
