"""systemd notify: a real unix datagram socket receives READY=1, WATCHDOG=1 and STOPPING=1 from
a running agent (`modbus-agent run` in a subprocess), a hung agent (SIGSTOP) sends no WATCHDOG,
and the abstract-namespace and WATCHDOG_PID rules hold."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import notify

ROOT = Path(__file__).resolve().parent.parent


def _receive(sock, until, want=None):
    """Datagrams until `until` (monotonic), or until one contains `want`."""
    got = []
    while time.monotonic() < until:
        sock.settimeout(max(0.01, until - time.monotonic()))
        try:
            data, _ = sock.recvfrom(4096)
        except socket.timeout:
            break
        got.append((time.monotonic(), data.decode()))
        if want is not None and want in got[-1][1]:
            break
    return got


@pytest.fixture
def notify_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    yield path, sock
    sock.close()


def test_agent_notifies_and_a_hung_loop_stops_pinging(tmp_path, notify_socket):
    path, sock = notify_socket
    ini = tmp_path / "agent.ini"
    ini.write_text("[agent]\nid = n1\nspool_dir = %s\n" % (tmp_path / "spool"))
    env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="600000", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(ini)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        got = _receive(sock, time.monotonic() + 10, "READY=1")
        assert got and "READY=1" in got[-1][1], got
        assert "MAINPID=%d" % proc.pid in got[-1][1]
        pings = [t for t, m in _receive(sock, time.monotonic() + 1.6) if m == "WATCHDOG=1"]
        # every half timeout (0.3 s), although the idle loop has nothing else to do for 1 s
        assert len(pings) >= 3, pings
        assert max(b - a for a, b in zip(pings, pings[1:])) < 0.8
        # the loop hangs: no ping while it is stopped (systemd would kill it after 1 s)
        os.kill(proc.pid, signal.SIGSTOP)
        _receive(sock, time.monotonic() + 0.2)            # what was in flight
        stopped = _receive(sock, time.monotonic() + 1.5)
        assert not [m for _, m in stopped if m == "WATCHDOG=1"], stopped   # systemd: kill at 0.6 s
        os.kill(proc.pid, signal.SIGCONT)
        again = _receive(sock, time.monotonic() + 3, "WATCHDOG=1")
        assert again and again[-1][1] == "WATCHDOG=1"
        proc.send_signal(signal.SIGTERM)
        end = _receive(sock, time.monotonic() + 10, "STOPPING=1")
        assert end and end[-1][1] == "STOPPING=1"
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait(5)


def test_abstract_socket_name():
    name = "modbus-agent-test-%d" % os.getpid()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        n = notify.Notifier.from_env({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "4000000"},
                                     mono=lambda: 0.0)
        assert n.watchdog_timeout == 4.0 and n.ping_every == 1.0
        n.ready()
        n.watchdog(0.0)
        n.watchdog(0.5)       # not due yet: no second ping
        n.status("ok 3 devices")
        n.stopping()
        got = [m for _, m in _receive(sock, time.monotonic() + 2, "STOPPING=1")]
        n.close()
    finally:
        sock.close()
    assert got[0].startswith("READY=1\nMAINPID=")
    assert got[1:] == ["WATCHDOG=1", "STATUS=ok 3 devices", "STOPPING=1"]


def test_watchdog_for_another_pid_and_no_socket():
    n = notify.Notifier.from_env({"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000",
                                  "WATCHDOG_PID": "1"}, pid=4242)
    assert n.enabled and n.watchdog_timeout is None      # the watchdog is PID 1's, not ours
    assert notify.Notifier.from_env({}).enabled is False
    assert notify.NULL.send("READY=1") is False


def test_send_failure_never_raises(caplog):
    n = notify.Notifier("/nonexistent/notify.sock", watchdog=1.0)
    assert n.send("READY=1") is False
    assert n.send("WATCHDOG=1") is False
    assert sum("notify" in r.getMessage() for r in caplog.records) == 1   # logged once


def test_procd_watchdog_runs_ubus_call(tmp_path):
    log = tmp_path / "calls"
    ubus = tmp_path / "ubus"
    ubus.write_text('#!/bin/sh\necho "$@" >> %s\n' % log)
    ubus.chmod(0o755)
    clock = [0.0]
    n = notify.from_env({"MODBUS_AGENT_PROCD_WATCHDOG": "modbus-agent agent 60 /tmp/u.sock"},
                        mono=lambda: clock[0])
    assert isinstance(n, notify.ProcdWatchdog) and n.ping_every == 30.0
    n.command[0] = str(ubus)
    n.ready()
    n.watchdog()            # due at once
    clock[0] = 10.0
    n.watchdog()            # not yet
    n.close()
    clock[0] = 30.0
    n.watchdog()
    n.close()
    assert log.read_text().splitlines() == [
        '-s /tmp/u.sock call service watchdog {"name": "modbus-agent", "instance": "agent"}'] * 2
    assert notify.from_env({"MODBUS_AGENT_PROCD_WATCHDOG": "only two"}) is notify.NULL
    missing = notify.ProcdWatchdog("s", "i", 2.0, ubus=str(tmp_path / "no-ubus"))
    assert missing.send("WATCHDOG=1") is False          # logged, never raised
