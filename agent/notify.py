"""Telling the service manager the loop is alive: systemd's notify protocol (a datagram per
message to $NOTIFY_SOCKET, no libsystemd) or procd's instance watchdog (`ubus call service
watchdog`). `from_env()` picks the one the environment asks for (else a no-op).

    READY=1       the loop runs (sent once, from Loop.run): `Type=notify` units count as started
    WATCHDOG=1    the loop is alive (from Loop.periodic, which runs every step; the loop's
                  sleep ends when a ping is due, `ping_at`): with `WatchdogSec=` a loop that
                  hangs stops sending it and systemd kills and restarts the agent
    STOPPING=1    shutdown began (Loop.shutdown)
    STATUS=...    the summary line, shown by `systemctl status`

$NOTIFY_SOCKET is a unix datagram socket path, or, starting with '@', a name in the abstract
namespace (sd_notify(3)). $WATCHDOG_USEC is the watchdog timeout; $WATCHDOG_PID, when set, must
be our pid (else the watchdog is meant for another process). Without $NOTIFY_SOCKET (procd, a
shell, the tests) every call does nothing. A failed send is logged once and never raises: the
notify channel must not be able to stop the loop.

procd (OpenWrt 21.02 and later) restarts an instance whose watchdog timer runs out
(`procd_set_param watchdog 1 SECONDS`); the timer is reset by the ubus call
`service watchdog {"name": SERVICE, "instance": INSTANCE}`. init/modbus-agent passes
$MODBUS_AGENT_PROCD_WATCHDOG="SERVICE INSTANCE SECONDS [UBUS_SOCKET]" and `ProcdWatchdog` makes
that call with the `ubus` command every SECONDS / 2 from the loop (a short-lived child, started
without waiting for it; one at a time, reaped on the next ping). procd's respawn alone never
notices a hung process: it acts only when the process exits.
"""
import os
import socket
import time

from agent import log as agentlog

log = agentlog.get("notify")

#: ping at least this often whatever the watchdog timeout (a datagram a second is nothing), and
#: at most every half of the timeout as sd_watchdog_enabled(3) advises
PING_EVERY_MAX = 1.0


def socket_address(path):
    """$NOTIFY_SOCKET's value as a socket address: '@name' is the abstract name '\\0name'."""
    if path.startswith("@"):
        return "\0" + path[1:]
    return path


class Notifier:
    """Sends the notify messages for one process; `address` None: a no-op."""

    def __init__(self, address=None, watchdog=None, mono=time.monotonic):
        self.address = address
        #: the watchdog timeout in seconds, None when systemd expects no pings
        self.watchdog_timeout = watchdog
        self.ping_every = None if watchdog is None else min(watchdog / 2.0, PING_EVERY_MAX)
        self.mono = mono
        self.next_ping = 0.0
        self.sent = 0
        self._sock = None
        self._failing = False

    @classmethod
    def from_env(cls, env=None, pid=None, mono=time.monotonic):
        env = os.environ if env is None else env
        path = env.get("NOTIFY_SOCKET")
        if not path:
            return cls(mono=mono)
        watchdog = None
        usec = env.get("WATCHDOG_USEC")
        owner = env.get("WATCHDOG_PID")
        mine = not owner or owner.strip() == str(os.getpid() if pid is None else pid)
        if usec and mine:
            try:
                watchdog = int(usec) / 1e6 if int(usec) > 0 else None
            except ValueError:
                log.warning("WATCHDOG_USEC=%r is not a number: no watchdog pings", usec)
        return cls(socket_address(path), watchdog, mono)

    @property
    def enabled(self):
        return self.address is not None

    def send(self, message):
        """One datagram; True when it went out."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)   # a full socket drops a ping, never blocks the loop
            self._sock.sendto(message.encode("utf-8", "replace"), self.address)
        except OSError as e:
            if not self._failing:
                log.warning("systemd notify to %r failed: %s (logged once while it lasts)",
                            self.address.replace("\0", "@"), e)
            self._failing = True
            return False
        self._failing = False
        self.sent += 1
        return True

    def ready(self, status=None):
        self.send("READY=1\nMAINPID=%d" % os.getpid() + ("\nSTATUS=" + status if status else ""))
        self.next_ping = self.mono()

    def watchdog(self, now=None):
        """WATCHDOG=1 when a ping is due (cheap to call every step)."""
        if self.ping_every is None:
            return
        now = self.mono() if now is None else now
        if now >= self.next_ping:
            self.next_ping = now + self.ping_every
            self.send("WATCHDOG=1")

    def ping_at(self):
        """When the next WATCHDOG=1 is due (monotonic; inf without a watchdog): the loop's
        sleep ends by then, so a short WatchdogSec= is kept even when nothing else is due."""
        return float("inf") if self.ping_every is None else self.next_ping

    def status(self, text):
        if text:
            self.send("STATUS=" + text.replace("\n", " "))

    def stopping(self):
        self.send("STOPPING=1")

    def close(self):
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


class ProcdWatchdog(Notifier):
    """procd's instance watchdog: `ubus call service watchdog` instead of datagrams; READY,
    STATUS and STOPPING mean nothing to procd."""

    def __init__(self, service, instance, timeout, socket_path=None, mono=time.monotonic,
                 ubus="ubus"):
        super().__init__(None, timeout, mono)
        self.ping_every = timeout / 2.0     # a child process per ping: not every second
        self.service, self.instance = service, instance
        self.command = [ubus] + (["-s", socket_path] if socket_path else []) + [
            "call", "service", "watchdog",
            '{"name": "%s", "instance": "%s"}' % (service, instance)]
        self._child = None

    @classmethod
    def parse(cls, text, mono=time.monotonic):
        parts = text.split()
        try:
            timeout = float(parts[2])
            if len(parts) not in (3, 4) or timeout <= 0:
                raise ValueError
        except (IndexError, ValueError):
            log.warning("MODBUS_AGENT_PROCD_WATCHDOG=%r: want \"SERVICE INSTANCE SECONDS [SOCKET]\"; "
                        "no watchdog pings", text)
            return NULL
        return cls(parts[0], parts[1], timeout, parts[3] if len(parts) > 3 else None, mono)

    @property
    def enabled(self):
        return True

    def ready(self, status=None):
        self.next_ping = self.mono()

    def status(self, text):
        pass

    def stopping(self):
        pass

    def send(self, message):
        """Start one `ubus call` (the message is always WATCHDOG=1 here)."""
        import subprocess

        child = self._child
        if child is not None and child.poll() is None:
            return False        # the last ping still runs (ubusd busy): never pile them up
        try:
            self._child = subprocess.Popen(self.command, stdin=subprocess.DEVNULL,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                           close_fds=True)
        except OSError as e:
            if not self._failing:
                log.warning("procd watchdog: %s failed: %s (logged once while it lasts)",
                            self.command[0], e)
            self._failing = True
            return False
        self._failing = False
        self.sent += 1
        return True

    def close(self):
        child, self._child = self._child, None
        if child is not None:
            try:
                child.wait(1.0)
            except Exception:
                pass


def from_env(env=None, mono=time.monotonic):
    """The notifier the environment asks for: systemd's ($NOTIFY_SOCKET), procd's watchdog
    ($MODBUS_AGENT_PROCD_WATCHDOG), or the no-op."""
    env = os.environ if env is None else env
    if env.get("NOTIFY_SOCKET"):
        return Notifier.from_env(env, mono=mono)
    if env.get("MODBUS_AGENT_PROCD_WATCHDOG"):
        return ProcdWatchdog.parse(env["MODBUS_AGENT_PROCD_WATCHDOG"], mono)
    return NULL


#: the notifier of a loop that is not run under a service manager (and of loops built by tests)
NULL = Notifier()
