"""init/modbus-agent under a real procd (OpenWrt's service manager, built for this host by
tools/build-procd.sh): its respawn thresholds after a crash, and its instance watchdog
restarting a hung agent (SIGSTOP) while a live one, which calls `ubus call service watchdog`
from its loop, is left alone.

procd runs here as OpenWrt runs it after boot (not PID 1: it serves the `service` ubus object
on ubusd's socket and manages the instances). The init script's start_service is sourced with a
small stand-in for /lib/functions/procd.sh (procd_open_instance/procd_set_param/
procd_close_instance building the same `ubus call service set` message with libubox's jshn).

Skipped unless $PROCD_ROOT names such a build (sbin/ubusd, bin/ubus, share/libubox/jshn.sh,
lib/) and $PROCD_BIN its procd binary (default $PROCD_ROOT/sbin/procd)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: jshn.sh needs `export -n` (busybox ash on OpenWrt; bash here)
SHELL = "bash"
PROCD_ROOT = os.environ.get("PROCD_ROOT")
PROCD_BIN = os.environ.get("PROCD_BIN") or (PROCD_ROOT and os.path.join(PROCD_ROOT, "sbin", "procd"))

pytestmark = pytest.mark.skipif(
    not (PROCD_ROOT and PROCD_BIN and os.path.exists(PROCD_BIN)
         and os.path.exists(os.path.join(PROCD_ROOT, "sbin", "ubusd"))),
    reason="no procd build: set PROCD_ROOT (tools/build-procd.sh)")

#: our stand-in for OpenWrt's procd.sh: the same message, built with libubox's jshn
PROCD_SH = r"""
. "$PROCD_ROOT/share/libubox/jshn.sh"
procd_open_instance() {
	json_init
	json_add_string name modbus-agent
	json_add_object instances
	json_add_object "${1:-instance1}"
}
procd_set_param() {
	local type="$1"; shift
	case "$type" in
	command|respawn|watchdog|netdev|file)
		json_add_array "$type"; for a in "$@"; do json_add_string "" "$a"; done; json_close_array;;
	env|data|limits)
		json_add_object "$type"
		for kv in "$@"; do json_add_string "${kv%%=*}" "${kv#*=}"; done
		json_close_object;;
	stdout|stderr) json_add_boolean "$type" "$1";;
	term_timeout|nice) json_add_int "$type" "$1";;
	esac
}
procd_close_instance() {
	json_close_object
	json_close_object
	ubus -s "$UBUS_SOCK" call service set "$(json_dump)"
}
"""


class Procd:
    def __init__(self, tmp):
        self.tmp = tmp
        self.sock = str(tmp / "ubus.sock")
        lib = os.path.join(PROCD_ROOT, "lib")
        self.env = dict(os.environ, LD_LIBRARY_PATH=lib, PYTHONPATH=str(ROOT),
                        PATH=os.path.join(PROCD_ROOT, "bin") + os.pathsep + os.environ["PATH"])
        self.ubusd = subprocess.Popen([os.path.join(PROCD_ROOT, "sbin", "ubusd"), "-s", self.sock],
                                      env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait(lambda: os.path.exists(self.sock), "ubusd socket")
        self.log = open(tmp / "procd.log", "wb")  # noqa: SIM115 - closed in stop()
        self.procd = subprocess.Popen([PROCD_BIN, "-s", self.sock, "-S", "-d", "2"], env=self.env,
                                      stdout=self.log, stderr=self.log)
        self._wait(lambda: "service" in self.ubus("list"), "procd's service object")

    def ubus(self, *args):
        out = subprocess.run(["ubus", "-s", self.sock] + list(args), env=self.env,
                             capture_output=True, text=True, timeout=5)
        return out.stdout

    def instance(self):
        """(running, pid) of the agent's instance."""
        text = self.ubus("call", "service", "list", '{"name": "modbus-agent"}')
        info = json.loads(text or "{}").get("modbus-agent", {}).get("instances", {}).get("agent", {})
        return info.get("running", False), info.get("pid")

    def start_service(self, config, **variables):
        """Source init/modbus-agent, set its variables, run its start_service."""
        sets = "".join("%s=%s\n" % kv for kv in variables.items())
        script = "%s\n. %s\nCONFIG=%s\nPYTHON=%s\nLIBDIR=%s\nUBUS_SOCKET=%s\n%sstart_service\n" % (
            PROCD_SH, ROOT / "init" / "modbus-agent", config, sys.executable, ROOT, self.sock, sets)
        env = dict(self.env, PROCD_ROOT=PROCD_ROOT, UBUS_SOCK=self.sock)
        out = subprocess.run([SHELL, "-c", script], env=env, capture_output=True, text=True, timeout=10)
        assert out.returncode == 0, out.stderr

    @staticmethod
    def _wait(pred, what, timeout=10):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            v = pred()
            if v:
                return v
            time.sleep(0.05)
        raise AssertionError("gave up waiting for " + what)

    def wait(self, pred, what, timeout=20):
        try:
            return self._wait(pred, what, timeout)
        except AssertionError:
            self.log.flush()
            raise AssertionError("%s\n%s" % (what, (self.tmp / "procd.log").read_text()[-3000:])) from None

    def stop(self):
        try:
            self.ubus("call", "service", "delete", '{"name": "modbus-agent"}')
        except Exception:
            pass
        for p in (self.procd, self.ubusd):
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        self.log.close()


@pytest.fixture
def procd(tmp_path):
    p = Procd(tmp_path)
    yield p
    running, pid = p.instance()
    p.stop()
    if pid:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except OSError:
                pass


def test_hung_agent_is_restarted_live_one_left_alone_crash_respawned(tmp_path, procd):
    ini = tmp_path / "agent.ini"
    ini.write_text("[agent]\nid = p1\nspool_dir = %s\n" % (tmp_path / "spool"))
    procd.start_service(ini, WATCHDOG=2, TERM_TIMEOUT=1, RESPAWN_TIMEOUT=1)
    first = procd.wait(lambda: procd.instance()[1], "the agent to start")
    # alive and pinging: after 3 watchdog periods it is the same process
    time.sleep(6)
    assert procd.instance() == (True, first)
    # hung: no ping; procd's watchdog restarts it (SIGTERM, SIGKILL after term_timeout)
    os.kill(first, signal.SIGSTOP)
    second = procd.wait(lambda: procd.instance()[0] and procd.instance()[1] not in (None, first)
                        and procd.instance()[1], "a new agent after the hang")
    assert "watchdog" in (tmp_path / "procd.log").read_text()
    # a crash (kill -9): respawned after RESPAWN_TIMEOUT
    os.kill(second, signal.SIGKILL)
    third = procd.wait(lambda: procd.instance()[0] and procd.instance()[1] not in (None, second)
                       and procd.instance()[1], "a new agent after the crash")
    assert third not in (first, second)
    listed = json.loads(procd.ubus("call", "service", "list", '{"name": "modbus-agent"}'))
    agent = listed["modbus-agent"]["instances"]["agent"]
    assert agent["respawn"] == {"threshold": 3600, "timeout": 1, "retry": 0}
    assert agent["term_timeout"] == 1
