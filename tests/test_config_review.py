"""Review findings on config (issue 9/10 fixes tried from outside): each failed on the code before."""
import pytest

from agent.collector.config import ConfigError as CollectorConfigError
from agent.collector.config import load_config as load_collector_config
from agent.config import ConfigError, check_config, load_config

AGENT = """[agent]
id = site7
spool_dir = %(tmp)s/spool
seq_file = %(tmp)s/seq

[upload]
url = %(url)s
%(token)s
"""


def _agent(tmp_path, url, token="token = abcdefghijklmnop0123"):
    p = tmp_path / "agent.ini"
    p.write_text(AGENT % {"tmp": tmp_path, "url": url, "token": token})
    return str(p)


def test_url_credentials_with_a_token_are_refused_naming_the_line(tmp_path):
    # requests sent the URL's user:pw as Basic auth instead of the Bearer token: 401 forever.
    path = _agent(tmp_path, "https://user:pw@collector.example/api/v1/batches")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = "\n".join(e.value.errors)
    assert "agent.ini:7: [upload] url:" in msg and "user:password@" in msg and "401" in msg
    assert "pw@" not in msg      # the password itself is never shown


def test_url_credentials_without_a_token_and_a_plain_url_with_one_still_load(tmp_path):
    load_config(_agent(tmp_path, "https://user:pw@proxy.example/api/v1/batches", token=""))
    load_config(_agent(tmp_path, "https://collector.example/api/v1/batches"))


def test_the_plain_http_warning_is_not_eaten_by_redaction(tmp_path):
    # "no token: anyone ..." matched the secret-value rule and printed "no token: *** on the path".
    _cfg, errors, warnings = check_config(_agent(tmp_path, "http://collector.example/api", token=""))
    assert not errors
    text = "\n".join(warnings)
    assert "anyone on the path can read and forge uploads" in text and "***" not in text


COLLECTOR = """[collector]
listen = 127.0.0.1:8080 ; local only
db = %(tmp)s/c.db

[tokens]
site7 = "abcdefghij ;klmnop"
"""


def test_the_collector_reads_quoted_values_and_inline_comments_as_the_agent_does(tmp_path):
    # The agent took `token = "ab ;cd"` as written; the collector kept the quotes: 401 unknown token.
    p = tmp_path / "collector.ini"
    p.write_text(COLLECTOR % {"tmp": tmp_path})
    cfg = load_collector_config(str(p))
    assert cfg.tokens["site7"] == "abcdefghij ;klmnop"
    assert cfg.listen == "127.0.0.1:8080"


def test_the_collector_refuses_a_token_a_comment_would_cut(tmp_path):
    p = tmp_path / "collector.ini"
    p.write_text("[tokens]\nsite7 = abcdefghij ;klmnopqrstu\n")
    with pytest.raises(CollectorConfigError) as e:
        load_collector_config(str(p))
    msg = str(e.value)
    assert "[tokens] site7" in msg and "double quotes" in msg and "klmnop" not in msg


def test_a_mistyped_connection_type_gets_a_suggestion(tmp_path):
    """review2: `type = rtu_tcp` listed the choices but did not say which one was meant."""
    p = tmp_path / "agent.ini"
    p.write_text("[agent]\nid = a\nspool_dir = %s/spool\n\n[connection:c]\ntype = rtu_tcp\nhost = 127.0.0.1\n"
                 "\n[device:d]\nconnection = c\n\n[points:d]\nv = holding 0 uint16\n" % tmp_path)
    _cfg, errors, _warnings = check_config(str(p))
    assert any("[connection:c] type:" in e and "did you mean 'rtu-over-tcp'?" in e for e in errors), errors
