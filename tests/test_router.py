"""Issue 16: what the router simulation (tools/cross-test, tools/bench/router.py) found, kept.

* The CRC word table was a list: 1.3 MB of the 32-bit router's heap (2.5 MB on 64-bit),
  a third of the agent's Python heap with 1,000 points, for CRC speed a 9600-baud bus does not
  need. On a small host it is an array('H') (128 KiB) now.
* `requests` (with urllib3, ssl, http.client, email: a third of the start-up imports, ~1.5 s
  on the router) was imported by `import agent.upload`; now only by building an Uploader, so an
  agent without [upload] never loads it. (Deferring it further, to the first request or a
  background thread, made devices miss cycles under the router's budget: measured, not kept.)
* `check` estimates the router CPU share of the devices' polling and warns above
  [agent] cpu_budget.
"""
import subprocess
import sys
import textwrap

from agent import cli
from tests.conftest import ROOT


def child(code):
    """Run `code` in a fresh interpreter (nothing imported yet) with this tree first."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=str(ROOT), capture_output=True,
                         text=True, timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


ROUTER_MEMINFO = "MemTotal:          59716 kB\nMemFree:           21340 kB\n"    # a RUT200's /proc/meminfo


def test_the_crc_word_table_is_compact_on_a_router(tmp_path):
    """On a small host (a 32-bit interpreter, < 1 GiB of RAM or of cgroup limit) the first CRC builds the compact
    table: under 256 KiB of heap (the list was 1.3 MB on the 32-bit router, 2.5 MB on 64-bit),
    and the spec's answers. Elsewhere the faster list stays."""
    from agent.modbus import crc

    meminfo = tmp_path / "meminfo"
    meminfo.write_text(ROUTER_MEMINFO)
    assert crc.small_host(str(meminfo)) and crc.small_host(maxsize=2 ** 31 - 1)
    big = tmp_path / "big"
    big.write_text("MemTotal:       24000000 kB\n")
    none = str(tmp_path / "no-cgroup")
    assert not crc.small_host(str(big), maxsize=2 ** 63 - 1, cgroup=none)
    # a big machine, but the agent's cgroup may use 48 MB (v1 and v2)
    (tmp_path / "cg").write_text("4:memory:/agent\n1:cpu:/\n0::/agent2\n")
    (tmp_path / "fs" / "memory" / "agent").mkdir(parents=True)
    (tmp_path / "fs" / "memory" / "agent" / "memory.limit_in_bytes").write_text("50331648\n")
    assert crc.small_host(str(big), 2 ** 63 - 1, str(tmp_path / "cg"), str(tmp_path / "fs"))
    (tmp_path / "fs" / "memory" / "agent" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert not crc.small_host(str(big), 2 ** 63 - 1, str(tmp_path / "cg"), str(tmp_path / "fs"))
    (tmp_path / "fs" / "agent2").mkdir()
    (tmp_path / "fs" / "agent2" / "memory.max").write_text("50331648\n")
    assert crc.small_host(str(big), 2 ** 63 - 1, str(tmp_path / "cg"), str(tmp_path / "fs"))
    got = child("""
        import functools, tracemalloc
        tracemalloc.start()
        from agent.modbus import crc
        crc.small_host = functools.partial(crc.small_host, %r)
        a = tracemalloc.get_traced_memory()[0]
        v = crc.crc16(bytes.fromhex("01030000000a"))
        print(tracemalloc.get_traced_memory()[0] - a, "%%04x" %% v, crc.check(bytes.fromhex("01030000000ac5cd")))
    """ % str(meminfo)).split()
    assert got[1:] == ["cdc5", "True"]
    assert int(got[0]) < 256 * 1024, "the CRC table holds %d bytes" % int(got[0])


def test_requests_is_loaded_only_by_an_uploader():
    """Importing the loop and the upload package must not import requests (or ssl/http): an
    agent without [upload] (spool or MQTT only) never pays its ~1/3 of the start-up and ~4 MB.
    Building an Uploader imports it at once, before the first poll (later, it made devices miss
    cycles on the simulated router)."""
    got = child("""
        import sys
        import agent.loop
        from agent.upload import Uploader
        heavy = ("requests", "urllib3", "ssl", "http.client", "email")
        before = sorted(m for m in heavy if m in sys.modules)
        up = Uploader("http://127.0.0.1:9/api/v1/batches", "a1")
        print(before, sorted(m for m in heavy if m in sys.modules) == sorted(heavy))
        up.close()
    """)
    assert got == "[] True", got


def _site(tmp_path, devices, points, interval, budget=None):
    text = "[agent]\nid = t1\nspool_dir = %s\n" % (tmp_path / "spool")
    if budget:
        text += "cpu_budget = %s\n" % budget
    text += "\n[connection:plc]\ntype = tcp\nhost = 127.0.0.1\n"
    for d in range(devices):
        text += "\n[device:d%d]\nconnection = plc\nunit = %d\ninterval = %s\n[points:d%d]\n" % (d, d + 1, interval, d)
        text += "".join("p%d = holding %d uint16\n" % (i, i) for i in range(points))
    p = tmp_path / "agent.ini"
    p.write_text(text)
    return str(p)


def test_check_warns_when_polling_exceeds_the_cpu_budget(tmp_path, capsys):
    # 40 devices x 100 points every 300 ms: more than a RUT200 can do
    path = _site(tmp_path, 40, 100, "300ms")
    assert cli.main(["check", "-c", path]) == 0
    out, err = capsys.readouterr()
    assert "[agent] cpu_budget: polling these devices needs ~" in err and "more than cpu_budget = 50%" in err
    assert ("%s:1: [agent] cpu_budget" % path) in err     # no cpu_budget line: the section's line
    assert "cpu: polling needs ~" in out


def test_a_small_site_is_within_the_budget_and_the_budget_is_configurable(tmp_path, capsys):
    path = _site(tmp_path, 2, 10, "1s")
    assert cli.main(["check", "-c", path]) == 0
    out, err = capsys.readouterr()
    assert "cpu_budget" not in err and "cpu: polling needs ~" in out and "cpu_budget 50%" in out
    # the same big site passes with a budget it fits in, and is named at its line when it does not
    path = _site(tmp_path, 5, 50, "1s", budget="1%")
    assert cli.main(["check", "-c", path]) == 0
    _out, err = capsys.readouterr()
    assert "%s:4: [agent] cpu_budget" % path in err


def test_cpu_budget_out_of_range_names_its_line(tmp_path, capsys):
    path = _site(tmp_path, 1, 1, "1s", budget="150%")
    assert cli.main(["check", "-c", path]) == 2
    _out, err = capsys.readouterr()
    assert "agent.ini:4: [agent] cpu_budget" in err and "between 1 and 100" in err
