"""Meter profiles: `profile = NAME` in a device section, NAME.ini with [profile] and [points]."""
import os

from agent.config.ini import read_ini
from agent.config.points import parse_point
from agent.config.schema import _BAD, PROFILE_SCHEMA, _apply_schema

# Where `profile = NAME` looks for NAME.ini after the config file's own profiles/ folder and
# [agent] profile_dir: the installed samples, then the source tree's conf/profiles.
PROFILE_DIRS = ("/etc/modbus-agent/profiles",
                os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "conf", "profiles"))


# --- profiles ------------------------------------------------------------------------------


def find_profile(name, config_path, profile_dir=None):
    """Path of profile `name` (a path, or NAME looked up as NAME.ini), or None."""
    if os.sep in name or name.endswith(".ini"):
        p = name if os.path.isabs(name) else os.path.join(os.path.dirname(config_path), name)
        return p if os.path.isfile(p) else None
    dirs = [os.path.join(os.path.dirname(os.path.abspath(config_path)), "profiles")]
    if profile_dir:
        dirs.insert(0, profile_dir)
    dirs.extend(PROFILE_DIRS)
    for d in dirs:
        p = os.path.join(d, name + ".ini")
        if os.path.isfile(p):
            return p
    return None


def load_profile(path, problems):
    """A meter profile file: [profile] metadata and [points]. -> (meta dict, [Point])."""
    sections = read_ini(path, problems)
    meta = {}
    points = []
    known = ("profile", "points")
    by_name = {s.name: s for s in sections}
    for s in sections:
        if s.name not in known:
            problems.error(path, s.line, s.name, None,
                           "unknown section in a profile (only [profile] and [points])")
    if "profile" in by_name:
        meta = _apply_schema(by_name["profile"], PROFILE_SCHEMA, problems)
    base = meta.get("base", 0)
    order = meta.get("byte_order", "ABCD")
    if base is _BAD:
        base = 0
    if order is _BAD:
        order = "ABCD"
    if "points" in by_name:
        s = by_name["points"]
        for name, (text, line) in s.entries.items():
            p = parse_point(name, text, base, order, path, line, "points", problems)
            if p is not None:
                points.append(p)
    else:
        problems.error(path, 1, "points", None, "profile has no [points] section")
    return meta, points
