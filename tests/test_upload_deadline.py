"""The uploader against hostile HTTP servers on 127.0.0.1 (issue 10): one that dribbles its answer
a byte at a time, one that sends a huge or endless body, one that inflates a small gzip into a
huge one. Every request has a total deadline (`[upload] timeout`), the answer is read up to
ANSWER_MAX bytes, and nothing spooled is lost: the batch goes again after the back-off."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.config import load_config
from agent.loop import Loop
from agent.record import data_record
from agent.spool import Spool
from agent.upload import Uploader

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))
import simulator  # noqa: E402
from hostile_http import Hostile  # noqa: E402

AGENT = "site7"
T0 = 1_795_000_000.0
ANSWER_MAX = 64 * 1024     # agent.upload.ANSWER_MAX, the documented cap


@pytest.fixture
def hostile():
    made = []

    def make(mode, **kw):
        h = Hostile(mode, **kw)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def fill(path, n):
    sp = Spool(path, AGENT)
    for i in range(n):
        sp.append(data_record(AGENT, T0 + i, "meter1", 1, {"i": i}))
    return sp


# --- B: the total deadline --------------------------------------------------------------

@pytest.mark.parametrize("mode", ["dribble_head", "dribble_body"])
def test_a_dribbled_answer_ends_at_the_total_deadline_and_the_batch_stays(tmp_path, hostile, mode):
    """Issue 10: one byte every 0.2 s never trips requests' per-read timeout (1 s here), so the
    request (and the agent's only loop) ran as long as the server kept dribbling. Now the whole
    request, headers or body, ends at `[upload] timeout`."""
    h = hostile(mode, every=0.2, duration=8.0)
    sp = fill(tmp_path / "spool", 5)
    up = Uploader(h.url, AGENT, timeout=1.0, backoff_max=0.05)
    t = time.monotonic()
    res = up.drain(sp, time.monotonic() + 30)
    took = time.monotonic() - t
    st = up.state()
    assert res["status"] == "backoff" and res["sent"] == 0
    assert took < 1.8, "the request outlived its 1 s deadline: %.1f s" % took
    assert st["last_error"].startswith("TotalTimeout") and "timeout = 1s" in st["last_error"]
    assert sp.stats()["records"] == 5                       # nothing acknowledged, nothing lost
    assert up.request_time() >= 1.0                         # and the next short gap waits
    sp.close()


def test_the_deadline_alarm_never_fires_after_the_request_and_a_running_timer_is_kept(tmp_path, hostile):
    """SIGALRM is armed only around a request: afterwards the previous handler is back, and a
    timer that was running before (pytest-timeout uses one) still fires, at its own time."""
    h = hostile("dribble_head", ok_first=1)
    sp = fill(tmp_path / "spool", 3)
    fired = []
    old = signal.signal(signal.SIGALRM, lambda *a: fired.append(time.monotonic()))
    saved = signal.setitimer(signal.ITIMER_REAL, 0)
    try:
        t = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, 0.8)
        up = Uploader(h.url, AGENT, timeout=0.3, backoff_max=0.05)
        assert up.drain(sp, time.monotonic() + 10)["sent"] == 3       # answered at once: alarm unused
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 0.3          # the outer timer still runs
        time.sleep(1.0)
        assert len(fired) == 1 and 0.7 <= fired[0] - t <= 1.0         # fired once, at its time, not ours
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if saved[0] > 0:
            signal.setitimer(signal.ITIMER_REAL, saved[0], saved[1])
        sp.close()


def make_loop(tmp_path, port, url, interval="200ms", timeout="1s"):
    ini = tmp_path / "agent.ini"
    ini.write_text("""[agent]
id = deadline-test
interval = %(interval)s
spool_dir = %(tmp)s/spool
health_interval = 1h
summary_interval = 1h

[connection:sim]
type = tcp
host = 127.0.0.1
port = %(port)d
timeout = 200ms

[device:meter]
connection = sim
unit = 1

[points:meter]
voltage_l1 = input 0 float32 CDAB

[upload]
url = %(url)s
timeout = %(timeout)s
backoff_max = 1s
""" % {"tmp": tmp_path, "port": port, "url": url, "interval": interval, "timeout": timeout})
    return ini


@pytest.fixture
def sim():
    s = simulator.Simulator({1: simulator.EnergyMeter(seed=1)}, tcp=0)
    s.start()
    yield s
    s.stop()


def test_polling_keeps_its_cadence_while_the_collector_dribbles(tmp_path, sim, hostile):
    """Issue 10: a dribbling collector froze the loop (one reading in 30 s). Each try now costs
    polling at most `[upload] timeout` (1 s), and the try's duration keeps the short gaps from
    starting another: over 5 s of 200 ms polls, most slots are polled."""
    h = hostile("dribble_head", every=0.2, duration=30.0)
    loop = Loop(load_config(str(make_loop(tmp_path, sim.tcp_port, h.url))))
    try:
        end = time.monotonic() + 5.0
        while time.monotonic() < end:
            loop.step()
        st = loop.states[0]
        polls, slots = st.health.polls_ok, st.schedule.k
        tries = loop.uploader.state()["failures_total"]
    finally:
        loop.shutdown()
    assert tries >= 1 and h.answering.is_set()
    assert polls >= 15, "%d polls in 5 s of 200 ms slots (%d slots)" % (polls, slots)


def test_sigterm_stops_a_real_agent_within_the_upload_timeout_plus_one_second(tmp_path, sim, hostile):
    """Issue 10: SIGTERM was ignored while the collector dribbled (the handler only sets a flag
    and the request never ended). `python -m agent run` against a dribbling server, SIGTERM in
    the middle of the answer: exit 0 within [upload] timeout (2 s) + 1 s."""
    h = hostile("dribble_head", every=0.3, duration=30.0)
    ini = make_loop(tmp_path, sim.tcp_port, h.url, interval="1s", timeout="2s")
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    with open(tmp_path / "agent.log", "wb") as log:     # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(ini)], cwd=str(ROOT),
                                stdout=log, stderr=log, env=env)
    try:
        assert h.answering.wait(15), "the agent never posted: %s" % (tmp_path / "agent.log").read_text()
        time.sleep(0.3)                     # well inside the dribbled answer
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(8)
        except subprocess.TimeoutExpired:
            rc = None
        took = time.monotonic() - t
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = (tmp_path / "agent.log").read_text()
    assert rc == 0 and took <= 3.0, "SIGTERM took %.1f s (rc %s)\n%s" % (took, rc, text[-2000:])
    assert "stopped after" in text


# --- C: the answer's size ---------------------------------------------------------------

CHILD = r"""
import json, resource, sys, time
from agent.record import data_record
from agent.spool import Spool
from agent.upload import Uploader
url, path = sys.argv[1], sys.argv[2]
sp = Spool(path, "site7")
def add(n, k):
    for i in range(n):
        sp.append(data_record("site7", 1795000000.0 + k + i, "meter1", 1, {"i": i}))
def rss():
    # The peak, kB. VmHWM belongs to this process's memory map; ru_maxrss would carry the
    # parent's peak across fork+exec (a large pytest parent would hide the growth).
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
up = Uploader(url, "site7", timeout=5.0, backoff_max=0.01)
add(3, 0)
first = up.drain(sp, time.monotonic() + 10)                    # a normal answer: the baseline
add(3, 10)
before = rss()
t = time.monotonic()
second = up.drain(sp, time.monotonic() + 10)                   # the hostile one
took = time.monotonic() - t
print(json.dumps({"first": first, "second": second, "rss_before": before, "rss_after": rss(),
                  "took": took, "left": sp.stats()["records"], "error": up.state()["last_error"]}))
"""


@pytest.mark.parametrize("mode", ["huge", "chunked", "gzip"])
def test_a_huge_or_endless_answer_is_an_error_naming_its_size_and_memory_stays_flat(tmp_path, hostile, mode):
    """Issue 10: 300 MB of JSON whitespace took the agent's RSS to 620 MB. The answer is now read
    up to ANSWER_MAX (64 KiB): more is an error naming the size, the batch stays in the spool
    (retried after the back-off), and the agent's peak RSS grows by less than 1 MB over a normal
    request. Measured in a child process (its own peak RSS, VmHWM)."""
    h = hostile(mode, size=64_000_000, duration=15.0, ok_first=1)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", CHILD, h.url, str(tmp_path / "spool")], cwd=str(ROOT), env=env,
                         capture_output=True, text=True, timeout=40)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert r["first"]["sent"] == 3
    assert r["second"]["status"] == "backoff" and r["second"]["sent"] == 0 and r["left"] == 3
    want = {"huge": "answer of 64000000 bytes (Content-Length), more than the %d" % ANSWER_MAX,
            "chunked": "answer of more than %d bytes" % ANSWER_MAX,
            "gzip": "answer of more than %d bytes (after inflating)" % ANSWER_MAX}[mode]
    assert r["error"].startswith("HTTP 200: " + want), r["error"]
    growth = r["rss_after"] - r["rss_before"]
    assert growth < 1024, "peak RSS grew by %d kB reading a hostile answer" % growth
    assert r["took"] < 5.0
