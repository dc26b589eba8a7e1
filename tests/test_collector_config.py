"""Collector configuration: who may write and read given where it listens (the startup check of
`modbus-collector`), --db given as a plain path, secrets in URL queries redacted.

The CLI is started as a real process. Refusals use 192.0.2.1 (TEST-NET-1, never assigned to this
machine) as the non-loopback address: refused before binding, as they must be; and a build that
forgot to refuse fails to bind it instead of listening on the network."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import requests

from agent.collector import make_app
from agent.collector.config import ConfigError, check_access, is_loopback, load_config, parse_db, redact
from tests.conftest import ROOT

TOKEN = "token-for-site7-0123456789"
READ = "read-token-0123456789abcdef"
SAMPLE = ROOT / "conf" / "collector.ini"


def cli(*args, cwd, timeout=30):
    return subprocess.run([sys.executable, "-m", "agent.collector.cli", *args], cwd=str(cwd), capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def ini(tmp_path, text):
    p = tmp_path / "c.ini"
    p.write_text(text)
    return p


def errors_of(cfg):
    with pytest.raises(ConfigError) as e:
        check_access(cfg)
    return e.value.errors


# --- loopback or not ----------------------------------------------------------------------------

@pytest.mark.parametrize("host, local", [
    ("127.0.0.1", True), ("127.5.6.7", True), ("localhost", True), ("LocalHost", True), ("::1", True),
    ("::ffff:127.0.0.1", True), ("0.0.0.0", False), ("::", False), ("192.168.1.10", False),
    ("10.0.0.1", False), ("collector.lan", False), ("127.0.0.1.example.com", False)])
def test_what_counts_as_loopback(host, local):
    assert is_loopback(host) is local


@pytest.mark.parametrize("listen", ["127.0.0.1:8080", "127.0.0.2:0", "localhost:8080", "[::1]:8080"])
def test_loopback_without_any_token_still_starts_and_says_so(listen):
    """Tests, tools/demo and dev use: no tokens, no config, loopback."""
    assert check_access(load_config(None, listen=listen)) == [
        "agents are accepted WITHOUT tokens (no [tokens] configured); built-in defaults: listening on %s, "
        "storing in sqlite:///collector.db" % listen]


@pytest.mark.parametrize("listen", ["0.0.0.0:8080", ":8080", "[::]:8080", "192.168.1.10:8080"])
def test_beyond_loopback_without_tokens_writes_and_reads_are_both_refused(listen):
    errs = errors_of(load_config(None, listen=listen))
    assert len(errs) == 2, errs
    assert errs[0].startswith("--listen %s is not a loopback address, and anyone who reaches it could store "
                              "records: agents' batches need no token (no agent is listed in [tokens]); POST "
                              "/receive-data stores anyone's records" % listen), errs[0]
    assert "To require tokens, list every agent in [tokens] (AGENT_ID = TOKEN" in errs[0], errs[0]
    assert "open_writes = yes (or --open-writes)" in errs[0]
    assert "read_token is unset" in errs[1] and "open_reads = yes (or --open-reads)" in errs[1]


def test_a_host_name_is_not_taken_for_loopback_and_the_message_says_so():
    errs = errors_of(load_config(None, listen="collector.lan:8080"))
    assert all("(a host name counts as not loopback: write 127.0.0.1)" in e for e in errs), errs


def test_tokens_without_read_token_beyond_loopback_is_refused_naming_the_file_line(tmp_path):
    """The issue's case: [tokens] set, read_token unset, as the shipped sample used to be."""
    p = ini(tmp_path, "[collector]\nlisten = 0.0.0.0:8080\n[tokens]\nsite7 = %s\n" % TOKEN)
    errs = errors_of(load_config(p))
    assert errs == [
        "%s:2: [collector] listen = 0.0.0.0:8080 is not a loopback address, and [collector] read_token is "
        "unset: the status page, /api/v1/records, /api/v1/devices and /api/v1/agents would answer anyone. "
        "Set read_token = A-SECRET (at least 16 characters; readers send `Authorization: Bearer A-SECRET`), or "
        "set [collector] open_reads = yes (or --open-reads) to publish them" % p]


def test_tokens_and_read_token_beyond_loopback_start_quietly(tmp_path):
    p = ini(tmp_path, "[collector]\nlisten = 0.0.0.0:8080\nread_token = %s\n[tokens]\nsite7 = %s\n" % (READ, TOKEN))
    assert check_access(load_config(p)) == []


def test_reads_and_writes_are_separate_opt_ins(tmp_path):
    base = "[collector]\nlisten = 0.0.0.0:8080\n"
    # open writes do not open reads ...
    errs = errors_of(load_config(ini(tmp_path, base + "open_writes = yes\n")))
    assert len(errs) == 1 and "read_token is unset" in errs[0], errs
    # ... and open reads do not open writes
    errs = errors_of(load_config(ini(tmp_path, base + "open_reads = yes\n")))
    assert len(errs) == 1 and "could store records" in errs[0], errs
    # both: starts, and says loudly what is open
    warnings = check_access(load_config(ini(tmp_path, base + "open_writes = yes\nopen_reads = yes\n")))
    assert [w.split(":")[0] for w in warnings] == ["writes are OPEN to anyone who reaches 0.0.0.0",
                                                  "reads are OPEN to anyone who reaches 0.0.0.0"], warnings
    # the flags do the same as the keys
    assert len(check_access(load_config(None, listen="0.0.0.0:8080", open_writes=True, open_reads=True))) == 2


def test_open_keys_take_yes_or_no_only(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(ini(tmp_path, "[collector]\nopen_reads = maybe\n"))
    assert str(e.value) == "%s:2: [collector] open_reads: expected yes or no, got 'maybe'" % (tmp_path / "c.ini")


@pytest.mark.parametrize("extra, named", [
    ("require_tokens = no\n", "agents' batches need no token (require_tokens = no); POST /receive-data stores "
                              "anyone's records (receive_data = open, its default without tokens). To require "
                              "tokens, remove require_tokens = no; or set [collector] open_writes = yes"),
    ("receive_data = open\n", "POST /receive-data stores anyone's records (receive_data = open). To require "
                              "tokens, set receive_data = token or closed; or set [collector] open_writes = yes"),
], ids=["require_tokens-no", "receive_data-open"])
def test_writes_opened_by_another_key_beyond_loopback_are_refused_naming_it(tmp_path, extra, named):
    p = ini(tmp_path, "[collector]\nlisten = 0.0.0.0:8080\nread_token = %s\n%s[tokens]\nsite7 = %s\n"
            % (READ, extra, TOKEN))
    errs = errors_of(load_config(p))
    assert len(errs) == 1 and named in errs[0], errs


def test_require_tokens_with_no_tokens_warns_that_every_batch_will_be_refused():
    warnings = check_access(load_config(None, require_tokens="yes"))
    assert warnings == ["require_tokens = yes but [tokens] lists no agent: every batch will get 401"]


# --- tokens ------------------------------------------------------------------------------------

def test_a_short_read_token_is_refused_without_showing_it(tmp_path):
    p = ini(tmp_path, "[collector]\nread_token = s3cret-short\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == ("%s:2: [collector] read_token: too short: 12 characters, at least 16 (e.g. `openssl "
                            "rand -hex 24`): a short token can be guessed over the network" % p)
    with pytest.raises(ConfigError) as e:
        make_app(None, db="sqlite:///%s" % (tmp_path / "x.db"), read_token="s3cret-short")
    assert "override read_token: too short" in str(e.value) and "s3cret" not in str(e.value)


def test_an_empty_read_token_is_unset(tmp_path):
    assert load_config(ini(tmp_path, "[collector]\nread_token =\n")).read_token is None


def test_the_samples_placeholder_tokens_are_refused_even_on_loopback():
    errs = errors_of(load_config(SAMPLE, listen="127.0.0.1:0"))
    assert len(errs) == 3, errs
    text = SAMPLE.read_text().splitlines()
    for e in errs:
        m = re.match(r"^%s:(\d+): \[(collector|tokens)\] (\S+): still the sample's placeholder" % re.escape(str(SAMPLE)), e)
        assert m, e
        assert "change-me" in text[int(m.group(1)) - 1] and m.group(3) in text[int(m.group(1)) - 1]
    assert "example-" not in "".join(errs)   # says which line, never the token


def test_the_sample_with_its_placeholders_replaced_may_listen_on_the_network(tmp_path):
    text = re.sub(r"example-[\w-]*change-me[\w-]*", lambda m: "x%032d" % len(m.group(0)), SAMPLE.read_text())
    p = ini(tmp_path, text.replace("listen = 127.0.0.1:8080", "listen = 0.0.0.0:8080"))
    assert check_access(load_config(p)) == []


# --- the CLI ------------------------------------------------------------------------------------

def test_cli_refuses_to_listen_beyond_loopback_without_tokens(tmp_path):
    t0 = time.monotonic()
    r = cli("--listen", "192.0.2.1:8080", "--db", "sqlite:///%s" % (tmp_path / "x.db"), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("modbus-collector: --listen 192.0.2.1:8080 is not a loopback address"), r.stderr
    assert "open_writes = yes (or --open-writes)" in r.stderr and "open_reads = yes (or --open-reads)" in r.stderr
    assert not (tmp_path / "x.db").exists()     # refused before anything was opened
    assert time.monotonic() - t0 < 20


def test_cli_refuses_tokens_without_read_token_beyond_loopback(tmp_path):
    p = ini(tmp_path, "[collector]\nlisten = 192.0.2.1:8080\ndb = sqlite:///%s\n[tokens]\nsite7 = %s\n"
            % (tmp_path / "x.db", TOKEN))
    r = cli("-c", str(p), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "%s:2: [collector] listen = 192.0.2.1:8080 is not a loopback address, and [collector] read_token is " \
           "unset" % p in r.stderr
    assert TOKEN not in r.stderr


def test_cli_refuses_the_sample_config_until_its_tokens_are_replaced(tmp_path):
    r = cli("-c", str(SAMPLE), "--listen", "127.0.0.1:0", "--db", "sqlite:///%s" % (tmp_path / "x.db"),
            cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("still the sample's placeholder") == 3, r.stderr


# --- --db PATH ----------------------------------------------------------------------------------

@pytest.mark.parametrize("given, url", [
    ("x.db", "sqlite:///x.db"), ("./x.db", "sqlite:///./x.db"), ("data/x.db", "sqlite:///data/x.db"),
    ("/var/lib/x.db", "sqlite:////var/lib/x.db"), ("sqlite:///x.db", "sqlite:///x.db"),
    ("sqlite:////abs/x.db", "sqlite:////abs/x.db"), ("postgresql://u@h/db", "postgresql://u@h/db"),
    ("postgres://u@h/db", "postgres://u@h/db"), ("C:/x.db", "sqlite:///C:/x.db"),
    ("my data/x y.db", "sqlite:///my data/x y.db")])
def test_db_accepts_a_plain_path_as_sqlite(given, url):
    assert parse_db(given) == url
    assert load_config(None, db=given).db == url


@pytest.mark.parametrize("given, reason", [
    ("mysql://u:s3cret@h/db", "unknown database scheme 'mysql' in 'mysql://u:***@h/db': expected a file path, "
                              "sqlite:///path or postgresql://user@host/db"),
    ("postgresq://u@h/db", "unknown database scheme 'postgresq'"),
    ("file:x.db", "unknown database scheme 'file' in 'file:x.db': expected a file path, sqlite:///path or "
                  "postgresql://user@host/db (a file name with ':' in it: sqlite:///NAME)"),
    ("sqlite:x.db", "expected sqlite:///path (three slashes, four for an absolute path), got 'sqlite:x.db'"),
    ("postgresql:/h/db", "expected postgresql://user@host/db, got 'postgresql:/h/db'"),
    ("dbname=modbus host=db", "looks like a libpq conninfo string: write it as a URL"),
    ("", "empty: expected a file path"),
])
def test_db_refuses_what_looks_like_another_scheme(given, reason):
    with pytest.raises(ValueError) as e:
        parse_db(given)
    assert reason in str(e.value) and "s3cret" not in str(e.value), str(e.value)


def test_cli_db_given_as_a_plain_path_stores_there(tmp_path, free_port):
    proc = subprocess.Popen([sys.executable, "-m", "agent.collector.cli", "--listen", "127.0.0.1:%d" % free_port,
                             "--db", "sub.db"], cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = "http://127.0.0.1:%d" % free_port
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                requests.get(url + "/health", timeout=2)
                break
            except requests.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
        r = requests.post(url + "/api/v1/batches", timeout=10, headers={"Content-Type": "application/json"},
                          data=b'{"agent": "a", "records": [{"agent": "a", "seq": 1, "ts": "2026-12-01T10:00:00.000Z",'
                               b' "device": "m", "unit": 1, "status": "ok", "values": {"v": 1}}]}')
        assert r.json()["stored"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=20)[0]
    assert proc.returncode == 0, out
    assert "storing in sqlite:///sub.db" in out
    assert (tmp_path / "sub.db").stat().st_size > 0


def test_cli_db_with_an_unknown_scheme_is_a_usage_error(tmp_path):
    r = cli("--listen", "127.0.0.1:0", "--db", "mysql://ingest:s3cret@h/modbus", cwd=tmp_path)
    assert r.returncode == 2 and "unknown database scheme 'mysql'" in r.stderr, r.stderr
    assert "s3cret" not in r.stderr
    assert os.listdir(tmp_path) == []        # no file named after the URL


# --- redact: secret-looking URL query values ----------------------------------------------------

@pytest.mark.parametrize("text, shown", [
    ("https://h/x?api_key=abc123&device=m1", "https://h/x?api_key=***&device=m1"),
    ("https://h/x?device=m1&token=abc123", "https://h/x?device=m1&token=***"),
    ("https://h/x?X-Amz-Signature=abc&X-Amz-Credential=c", "https://h/x?X-Amz-Signature=***&X-Amz-Credential=c"),
    ("https://h/x?sig=abc#frag", "https://h/x?sig=***#frag"),
    ("https://h/x?AUTH=abc;next=1", "https://h/x?AUTH=***;next=1"),
    ("https://h/x?client_secret=abc&pwd=def&passwd=ghi", "https://h/x?client_secret=***&pwd=***&passwd=***"),
    ("postgresql://u:pw@h/db?sslpassword=abc&application_name=c",
     "postgresql://u:***@h/db?sslpassword=***&application_name=c"),
    ("cannot connect to 'https://h/x?apikey=abc' (refused)", "cannot connect to 'https://h/x?apikey=***' (refused)"),
    ("https://h/x?device=m1&limit=5", "https://h/x?device=m1&limit=5"),
])
def test_redact_hides_secret_looking_query_values(text, shown):
    assert redact(text) == shown


def test_a_database_in_a_missing_directory_is_named_in_the_error(tmp_path):
    """Review: `--db` into a directory that does not exist said only "unable to open database file"."""
    import subprocess
    import sys
    db = tmp_path / "nowhere" / "c.db"
    r = subprocess.run([sys.executable, "-m", "agent.collector.cli", "--listen", "127.0.0.1:0", "--db", str(db)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert str(db) in r.stderr and "directory %s does not exist" % (tmp_path / "nowhere") in r.stderr
