"""agent.common: the helpers the agent and the collector share (one copy of each)."""
import os

import pytest

from agent import common
from agent.collector import config as collector_config
from agent.common import atomic_replace, format_age, format_duration, parse_duration, parse_utc


def test_both_sides_use_the_one_copy():
    import agent.collector.page as page
    import agent.commands as commands
    import agent.config as config
    import agent.status as status

    assert config.parse_duration is common.parse_duration is collector_config.parse_duration
    assert config.redact is common.redact
    assert issubclass(config.ConfigError, common.ConfigError)
    assert issubclass(collector_config.ConfigError, common.ConfigError)
    assert config.ConfigError is not collector_config.ConfigError   # says who found the problem
    assert status.format_age is format_age and commands.format_duration is format_duration
    assert page._age(150) == "2m"


@pytest.mark.parametrize("text, seconds", [
    ("500ms", 0.5), ("10s", 10.0), ("5m", 300.0), ("1h", 3600.0), ("7d", 604800.0), ("30", 30.0),
    (" 10S ", 10.0), (".5", 0.5), ("2.5 m", 150.0),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10x", "-1s", "1e3", "s"])
def test_parse_duration_refuses(text):
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


@pytest.mark.parametrize("seconds", [0.25, 1, 1.5, 59, 90, 300, 7200, 86400, 7 * 86400, 0.001])
def test_format_duration_reads_back(seconds):
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


def test_format_duration_is_the_shortest_form():
    assert [format_duration(s) for s in (604800, 7200, 300, 90, 0.25, 1.5)] == [
        "7d", "2h", "5m", "90s", "250ms", "1.5s"]


@pytest.mark.parametrize("seconds, precise, coarse", [
    (None, "-", "-"), (0, "0s", "0s"), (89, "89s", "89s"), (90, "1m30s", "90s"), (119, "1m59s", "119s"),
    (120, "2m00s", "2m"), (5399, "89m59s", "89m"), (5400, "1h30m", "90m"), (7200, "2h00m", "2h"),
    (172799, "47h59m", "47h"), (172800, "2d00h", "2d"), (-30, "0s", "-30s"),
])
def test_format_age(seconds, precise, coarse):
    assert format_age(seconds) == precise
    assert format_age(seconds, precise=False) == coarse


@pytest.mark.parametrize("ts, seconds", [
    ("2026-11-21T10:30:45.123Z", 1795257045.123), ("2026-11-21T10:30:45Z", 1795257045.0),
    ("2026-11-21T10:30:45", 1795257045.0), ("2024-02-29T23:59:59.5Z", 1709251199.5),
    ("1970-01-01T00:00:00.000Z", 0.0),
])
def test_parse_utc(ts, seconds):
    assert parse_utc(ts) == pytest.approx(seconds)


@pytest.mark.parametrize("ts", [None, 17, "", "x", "2026-02-29T00:00:00Z", "2026-13-01T00:00:00Z",
                                "2026-11-21 10:30:45Z", "2026-11-21T25:00:00Z", "2026-11-21T10:30:45.Z"])
def test_parse_utc_refuses(ts):
    assert parse_utc(ts) is None


def test_parse_utc_reads_what_the_wire_writes():
    from agent.wire import utc_timestamp

    for t in (0.0, 1.8e9 + 0.123, 1795257045.999):
        assert parse_utc(utc_timestamp(t)) == pytest.approx(t, abs=0.0011)


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def test_atomic_replace_writes_durably_and_replaces(tmp_path):
    path = str(tmp_path / "f.json")
    atomic_replace(path, b"one\n")
    atomic_replace(path, b"two\n")
    assert _read(path) == b"two\n" and os.listdir(tmp_path) == ["f.json"]
    dfd = os.open(str(tmp_path), os.O_RDONLY)
    try:
        atomic_replace(path, b"three\n", dirfd=dfd)
    finally:
        os.close(dfd)
    atomic_replace(path, b"four\n", durable=False, tmp=str(tmp_path / ".f.tmp"))
    assert _read(path) == b"four\n" and os.listdir(tmp_path) == ["f.json"]


def test_atomic_replace_failure_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "d"
    target.mkdir()                         # a directory where the file should go: replace fails
    (target / "x").write_text("held")
    with pytest.raises(OSError):
        atomic_replace(str(target), b"new")
    assert sorted(os.listdir(tmp_path)) == ["d"] and (target / "x").read_text() == "held"


def test_atomic_replace_creates_the_directory_only_when_asked(tmp_path):
    path = str(tmp_path / "new" / "seq")
    with pytest.raises(FileNotFoundError):
        atomic_replace(path, b"1\n")
    atomic_replace(path, b"1\n", makedirs=True)
    assert _read(path) == b"1\n"


@pytest.mark.parametrize("text, agent, collector", [
    # the agent hides the whole userinfo (a token may be the user name); the collector keeps the
    # database role and hides its password
    ("postgresql://ingest:pw@db/m", "postgresql://***@db/m", "postgresql://ingest:***@db/m"),
    ("https://tok@h/x", "https://***@h/x", "https://tok@h/x"),
    # query values: both; `credential` only on the agent's side
    ("https://h/x?api_key=k&X-Amz-Credential=c", "https://h/x?api_key=***&X-Amz-Credential=***",
     "https://h/x?api_key=***&X-Amz-Credential=c"),
    # `key: value` secrets anywhere: the agent; libpq's quoted password: the collector
    ("[collector] read_token: too short", "[collector] read_token: *** short", "[collector] read_token: too short"),
    ("host=db password='a b' user=u", "host=db password=*** user=u", "host=db password=*** user=u"),
    ("host=db password='it\\'s' user=u", "host=db password=***s' user=u", "host=db password=*** user=u"),
])
def test_one_redactor_two_configurations(text, agent, collector):
    assert common.redact(text) == agent
    assert collector_config.redact(text) == collector


def test_redact_takes_an_exception():
    assert common.redact(OSError("cannot reach https://u:p@h/")) == "cannot reach https://***@h/"
    assert collector_config.redact(ValueError("postgresql://u:p@h/")) == "postgresql://u:***@h/"
