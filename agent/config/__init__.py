"""The agent's one flat INI file, parsed once into typed objects.

    cfg = load_config("/etc/modbus-agent/agent.ini")   # or raises ConfigError listing EVERY problem

Sections: [agent], [upload] (optional), [connection:NAME], [device:NAME], [points:NAME].
Every option, its type and its default is in one place: the schemas (schema.py). Each problem is
reported as `file:line: [section] key: reason`.

The package, in the order a file flows through it:
    ini.py       the flat INI subset read with line numbers; Problems (errors + warnings)
    values.py    value parsers (text -> value or ValueError), name checks
    schema.py    the schemas (with reload tags: what SIGHUP rebuilds), Settings/Connection/
                 Config, applying a schema to a section
    points.py    the point grammar (`name = [table] address type ...`) -> Point
    profiles.py  meter profiles: finding and reading NAME.ini
    load.py      load_config/check_config: sections -> objects, then the cross-checks
This module re-exports the names the rest of the agent imports from `agent.config`;
parse_duration, redact and the ConfigError base are agent.common's (shared with the collector).
"""
from agent.common import parse_duration, redact
from agent.config.ini import Problems, Section, read_ini
from agent.config.load import (
    BUS_WARN,
    SECTION_KINDS,
    ConfigError,
    check_config,
    default_seq_file,
    load_config,
    load_or_report,
)
from agent.config.points import Point, parse_point
from agent.config.profiles import PROFILE_DIRS, find_profile, load_profile
from agent.config.schema import (
    AGENT_SCHEMA,
    CONNECTION_SCHEMA,
    CONNECTION_TIMEOUT,
    CONNECTION_TYPES,
    DEVICE_SCHEMA,
    GATEWAY,
    GATEWAY_SCHEMA,
    LIVE,
    POINT_OPTIONS,
    PROFILE_SCHEMA,
    RELOAD_SECTIONS,
    RELOAD_TAGS,
    REQUIRED,
    SPOOL,
    UPLOAD_SCHEMA,
    UPLOADER,
    AgentSettings,
    Config,
    Connection,
    GatewaySettings,
    Settings,
    UploadSettings,
    changed,
    reload_tags,
    reopen_keys,
)
from agent.config.values import MAX_NAME, name_problem, parse_bool, parse_int, parse_number

__all__ = [
    "AGENT_SCHEMA", "BUS_WARN", "CONNECTION_SCHEMA", "CONNECTION_TIMEOUT", "CONNECTION_TYPES",
    "DEVICE_SCHEMA", "GATEWAY", "GATEWAY_SCHEMA", "GatewaySettings", "LIVE", "MAX_NAME", "POINT_OPTIONS", "PROFILE_DIRS", "PROFILE_SCHEMA", "RELOAD_SECTIONS",
    "RELOAD_TAGS", "REQUIRED", "SECTION_KINDS", "SPOOL", "UPLOADER", "UPLOAD_SCHEMA", "AgentSettings", "Config", "ConfigError", "Connection",
    "Point", "Problems", "Section", "Settings", "UploadSettings", "changed", "check_config",
    "default_seq_file", "find_profile", "load_config", "load_or_report", "load_profile",
    "name_problem", "parse_bool", "parse_duration", "parse_int", "parse_number", "parse_point",
    "read_ini", "redact", "reload_tags", "reopen_keys",
]
