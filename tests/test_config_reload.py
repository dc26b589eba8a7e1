"""SIGHUP's reload diff comes from tags in the config schema (agent.config.schema): every [agent]
and [upload] key says whether changing it reopens the spool, rebuilds the uploader, or is read
live. A key added without saying so fails here, and so does a key the spool or the uploader is
built from that is not tagged for it."""
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent.config import (
    LIVE,
    RELOAD_SECTIONS,
    RELOAD_TAGS,
    SPOOL,
    UPLOADER,
    changed,
    load_config,
    reopen_keys,
)
from agent.loop import Loop, make_uploader, open_spool

# properties computed from one schema key (what a builder may read instead of the key itself)
DERIVED = {"spool_max_bytes": "spool_max_mb", "spool_segment_bytes": "spool_segment_kb",
           "log_max_bytes": "log_max_kb", "batch_max_bytes": "batch_max_kb"}


def write_ini(tmp_path, agent="", upload=""):
    ini = tmp_path / "agent.ini"
    ini.write_text("""[agent]
id = reload-test
spool_dir = %(tmp)s/spool
status_file = %(tmp)s/status.json
%(agent)s
[upload]
url = http://127.0.0.1:9/api/v1/batches
%(upload)s
[connection:c]
type = tcp
host = 127.0.0.1
port = 9

[device:d]
connection = c

[points:d]
v = holding 0 uint16
""" % {"tmp": tmp_path, "agent": agent, "upload": upload})
    return ini


def test_every_agent_and_upload_key_says_what_a_reload_rebuilds():
    for section, schema in RELOAD_SECTIONS:
        for key, spec in schema.items():
            assert len(spec) == 3, (
                "[%s] %s has no reload tag: add (SPOOL,), (UPLOADER,), both, or LIVE as the third "
                "element of its schema entry (agent/config/schema.py)" % (section, key))
            assert spec[2] == LIVE or set(spec[2]) <= set(RELOAD_TAGS), (section, key, spec[2])


class Recorder:
    """A settings object that remembers which attributes were read."""

    def __init__(self, settings):
        self._settings = settings
        self.read = set()

    def __getattr__(self, name):
        self.read.add(name)
        return getattr(self._settings, name)


def _read_by(build, cfg):
    agent, upload = Recorder(cfg.agent), Recorder(cfg.upload)
    built = build(SimpleNamespace(agent=agent, upload=upload, path=cfg.path))
    read = {("agent", DERIVED.get(n, n)) for n in agent.read}
    read |= {("upload", DERIVED.get(n, n)) for n in upload.read}
    return built, read


def test_what_the_spool_and_the_uploader_are_built_from_is_tagged_for_them(tmp_path):
    cfg = load_config(str(write_ini(tmp_path)))
    spool, read = _read_by(open_spool, cfg)
    spool.close()
    assert read and read <= set(reopen_keys(SPOOL)), read - set(reopen_keys(SPOOL))
    uploader, read = _read_by(make_uploader, cfg)
    uploader.close()
    assert read and read <= set(reopen_keys(UPLOADER)), read - set(reopen_keys(UPLOADER))


def test_changed_names_the_keys_and_treats_a_key_without_a_tag_as_every_tag():
    schema = {"dir": (str, None, (SPOOL,)), "url": (str, None, (UPLOADER,)),
              "pace": (str, None, LIVE), "new": (str, None)}
    sections = (("agent", schema),)

    def cfg(**values):
        base = dict(dir="a", url="u", pace=1, new=0)
        base.update(values)
        return SimpleNamespace(agent=SimpleNamespace(**base))

    assert changed(cfg(), cfg(), SPOOL, sections) == []
    assert changed(cfg(), cfg(pace=2), SPOOL, sections) == []
    assert changed(cfg(), cfg(pace=2), UPLOADER, sections) == []
    assert changed(cfg(), cfg(dir="b"), SPOOL, sections) == ["agent.dir"]
    assert changed(cfg(), cfg(dir="b"), UPLOADER, sections) == []
    assert changed(cfg(), cfg(url="v"), UPLOADER, sections) == ["agent.url"]
    assert changed(cfg(), cfg(new=1), SPOOL, sections) == ["agent.new"]
    assert changed(cfg(), cfg(new=1), UPLOADER, sections) == ["agent.new"]
    gone = SimpleNamespace(agent=None)
    assert changed(cfg(), gone, SPOOL, sections) == ["agent.dir", "agent.new"]


@pytest.mark.parametrize("edit, spool_reopened, uploader_rebuilt", [
    (("agent", "fsync_interval = 2s"), True, False),
    (("agent", "spool_max_age = 1d"), True, False),
    (("agent", "health_interval = 1h"), False, False),
    (("upload", "token = t0ken"), False, True),
    (("upload", "quarantine_file = %(tmp)s/q.jsonl"), False, True),    # the uploader's file
    (("upload", "linger = 5s"), False, False),
])
def test_reload_rebuilds_what_the_tags_say(tmp_path, edit, spool_reopened, uploader_rebuilt):
    ini = write_ini(tmp_path)
    loop = Loop(load_config(str(ini)))
    try:
        spool, uploader, before = loop.spool, loop.uploader, loop.cfg
        section, line = edit
        write_ini(tmp_path, **{section: line % {"tmp": tmp_path}})
        loop.reload()
        assert loop.cfg is not before and loop.cfg.path == str(ini)   # the reload went through
        assert Path(loop.spool.directory) == tmp_path / "spool"
        assert (loop.spool is not spool) == spool_reopened
        assert (loop.uploader is not uploader) == uploader_rebuilt
    finally:
        loop.shutdown()
