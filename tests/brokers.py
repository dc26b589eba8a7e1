"""A real MQTT broker for the tests: Debian's mosquitto on free loopback ports, with a password
file (mosquitto_passwd) and a TLS listener whose certificate a test CA signs (openssl), plus an
auditing subscriber with a persistent session.

    broker = Mosquitto(tmp_dir).start()      # broker.port (plain), broker.tls_port, broker.ca
    broker.restart(); broker.kill9(); broker.stop()
    sub = Auditor(broker).start()            # sub.counts[(agent, seq)] -> deliveries
    relay = Relay(broker.port)               # agent -> relay.port -> broker; relay.reset() RSTs all

`Mosquitto.skip_reason()` says why a broker cannot run here (pytest.skip with it).
"""
import json
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
USER, PASSWORD = "agent", "s3cret-pw"
AUDIT_USER, AUDIT_PASSWORD = "audit", "audit-pw"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_ca(d):
    """A CA and a server certificate for localhost / 127.0.0.1 (EC keys: fast). -> paths."""
    d = Path(d)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True, cwd=d, timeout=30)  # noqa: E731
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=modbus-agent test CA")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "san.ext")
    run("req", *ec, "-keyout", "client.key", "-out", "client.csr", "-subj", "/CN=agent")
    run("x509", "-req", "-in", "client.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "client.crt", "-days", "2")
    # a CA nobody trusts, for the wrong-CA case
    run("req", "-x509", *ec, "-keyout", "other.key", "-out", "other-ca.crt", "-days", "2", "-subj", "/CN=other")
    return {k: str(d / v) for k, v in (("ca", "ca.crt"), ("cert", "server.crt"), ("key", "server.key"),
                                       ("client_cert", "client.crt"), ("client_key", "client.key"),
                                       ("other_ca", "other-ca.crt"))}


class Mosquitto:
    def __init__(self, directory, extra="", acl=None):
        self.acl = acl      # acl_file text (None: every user may publish and subscribe anywhere)
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.extra = extra
        self.proc = None
        self.port = free_port()
        self.tls_port = free_port()
        self.log = self.dir / "mosquitto.log"

    @staticmethod
    def skip_reason():
        if not os.path.exists(MOSQUITTO):
            return "no mosquitto broker (%s): apt-get install mosquitto" % MOSQUITTO
        if not os.path.exists(PASSWD):
            return "no mosquitto_passwd (%s)" % PASSWD
        if not shutil.which("openssl"):
            return "no openssl to make the test CA"
        return None

    def _configure(self):
        d = self.dir
        self.certs = make_ca(d)
        pw = d / "passwd"
        pw.write_text("")
        subprocess.run([PASSWD, "-b", str(pw), USER, PASSWORD], check=True, capture_output=True, timeout=30)
        subprocess.run([PASSWD, "-b", str(pw), AUDIT_USER, AUDIT_PASSWORD], check=True, capture_output=True,
                       timeout=30)
        os.chmod(pw, 0o600)
        (d / "data").mkdir(exist_ok=True)
        c = self.certs
        extra = self.extra
        if self.acl is not None:
            (d / "acl").write_text(self.acl)
            extra += "\nacl_file %s\n" % (d / "acl")
        (d / "mosquitto.conf").write_text(
            "user %s\n"
            "per_listener_settings false\nallow_anonymous false\npassword_file %s\n"
            "persistence true\npersistence_location %s/\nautosave_interval 1\n"
            "max_queued_messages 100000\nmax_inflight_messages 100\n"
            "log_dest file %s\nlog_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
            "listener %d 127.0.0.1\n"
            "listener %d 127.0.0.1\ncafile %s\ncertfile %s\nkeyfile %s\nrequire_certificate false\n%s\n" % (
                pwd.getpwuid(os.getuid()).pw_name, pw, d / "data", self.log, self.port, self.tls_port, c["ca"], c["cert"], c["key"], self.extra))

    def start(self, timeout=10.0):
        if not hasattr(self, "certs"):
            self._configure()
        with open(self.dir / "stderr.log", "ab") as err:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.dir / "mosquitto.conf")],
                                         stdout=subprocess.DEVNULL, stderr=err)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError("mosquitto exited %s: %s" % (
                    self.proc.returncode, (self.dir / "stderr.log").read_text()[-500:]))
            try:
                for p in (self.port, self.tls_port):
                    socket.create_connection(("127.0.0.1", p), 0.2).close()
                return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("mosquitto did not listen within %gs" % timeout)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill9(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def restart(self):
        self.stop()
        return self.start()

    def url(self, tls=False):
        return "mqtt%s://127.0.0.1:%d" % ("s" if tls else "", self.tls_port if tls else self.port)


def records_of(payload):
    """The records a message carries: one record, or a JSON array of them."""
    doc = json.loads(payload)
    return doc if isinstance(doc, list) else [doc]


class Auditor:
    """A subscriber with a persistent session (clean_session off, QoS 1) on `topic`: every
    (agent, seq) it is handed, how often, and which deliveries the broker flagged dup."""

    def __init__(self, broker, topic="modbus/#", client_id="auditor"):
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.broker = broker
        self.topic = topic
        self.counts = {}
        self.redelivered = 0        # deliveries the broker flagged dup (its own resend to us)
        self.messages = []          # (topic, payload) of the first few per topic, for the tests to look at
        self._per_topic = {}
        self.status = []            # payloads seen on status topics
        self.lock = threading.Lock()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False,
                        protocol=paho.MQTTv311)
        c.username_pw_set(AUDIT_USER, AUDIT_PASSWORD)
        c.reconnect_delay_set(0.05, 0.2)
        c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(topic, qos=1)
        c.on_message = self._on_message
        self.client = c

    def start(self, timeout=10.0):
        self.client.connect("127.0.0.1", self.broker.port, keepalive=10)
        self.client.loop_start()
        end = time.monotonic() + timeout
        while not self.client.is_connected() and time.monotonic() < end:
            time.sleep(0.02)
        return self

    def _on_message(self, client, userdata, msg):
        with self.lock:
            if msg.topic.endswith("/status"):
                self.status.append((msg.topic, msg.payload, msg.retain))
                return
            n = self._per_topic.get(msg.topic, 0)
            if n < 60:
                self._per_topic[msg.topic] = n + 1
                self.messages.append((msg.topic, msg.payload))
            if msg.dup:
                self.redelivered += 1
            for rec in records_of(msg.payload):
                key = (rec.get("agent"), rec.get("seq"))
                self.counts[key] = self.counts.get(key, 0) + 1

    def seqs(self, agent):
        with self.lock:
            return {s for (a, s) in self.counts if a == agent}

    def duplicates(self, agent):
        with self.lock:
            return {s: n for (a, s), n in self.counts.items() if a == agent and n > 1}

    def stop(self):
        self.client.disconnect()
        self.client.loop_stop()


class Relay:
    """A TCP relay agent <-> broker that can reset every connection it carries (mid-publish)."""

    def __init__(self, port):
        self.target = ("127.0.0.1", port)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        self.resets = 0
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopped:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(self.target, 2)
                u.settimeout(None)
            except OSError:
                c.close()
                continue
            self.conns.append((c, u))
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def reset(self):
        """RST both sides of every connection (SO_LINGER 0), as a NAT or a radio link does."""
        for c, u in self.conns:
            for s in (c, u):
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    s.shutdown(socket.SHUT_RDWR)    # wakes the pipe threads blocked in recv
                except OSError:
                    pass
                s.close()
        self.resets += 1
        self.conns = []

    def close(self):
        self.stopped = True
        self.reset()
        self.sock.close()
