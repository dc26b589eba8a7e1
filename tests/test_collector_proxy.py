"""The README's production setup, run for real: a real agent -> nginx (Debian's, with the
sample conf/nginx-collector.conf) over HTTPS with a test CA and `verify = yes` -> the real
collector (the sample conf/collector.ini) on 127.0.0.1.

Installs nothing: skips (saying why) without an nginx binary (`apt-get install nginx`) or the
openssl CLI. nginx runs as a foreground subprocess with its own prefix, pid, temp and log files
in the test's directory; the sample is used as written except for the lines named in RENDER.
"""
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time

import pytest
import requests

from tests.conftest import ROOT
from tests.modbus_peers import UmodbusTcp

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                       if os.path.isfile(p) and os.access(p, os.X_OK)), None)
OPENSSL = shutil.which("openssl")
pytestmark = [
    pytest.mark.skipif(NGINX is None, reason="no nginx binary (Debian: apt-get install nginx)"),
    pytest.mark.skipif(OPENSSL is None, reason="no openssl command line tool (apt-get install openssl)"),
    pytest.mark.timeout(90),
]
AGENT = "site7-rut200"
SAMPLE_NGINX = ROOT / "conf" / "nginx-collector.conf"
SAMPLE_COLLECTOR = ROOT / "conf" / "collector.ini"


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout, what, proc=None, log=None):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if pred():
                return
        except (requests.ConnectionError, OSError):
            pass
        if proc is not None and proc.poll() is not None:
            raise AssertionError("%s: the process exited with %s\n%s" % (what, proc.returncode, _tail(log)))
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s\n%s" % (what, _tail(log)))
        time.sleep(0.05)


def _tail(path, n=30):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except (OSError, TypeError):
        return ""


# --- a test CA and a server certificate, with the openssl CLI ------------------------------------

def _openssl(*args, cwd):
    r = subprocess.run([OPENSSL, *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, "openssl %s: %s" % (" ".join(args), r.stderr)


def make_ca(d, name):
    """-> path of a self-signed CA certificate (key next to it). EC P-256: instant to generate."""
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", name + ".key", "-out", name + ".pem", "-days", "2", "-subj", "/CN=%s" % name,
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=d)
    return os.path.join(d, name + ".pem")


def make_server_cert(d, ca):
    """-> (cert, key) for 127.0.0.1 / localhost, signed by the CA `ca` (from make_ca)."""
    with open(os.path.join(d, "server.ext"), "w") as f:
        f.write("subjectAltName = IP:127.0.0.1, DNS:localhost\nbasicConstraints = critical, CA:FALSE\n"
                "keyUsage = critical, digitalSignature\nextendedKeyUsage = serverAuth\n"
                "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid, issuer\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=d)
    base = ca[:-len(".pem")]
    _openssl("x509", "-req", "-in", "server.csr", "-CA", ca, "-CAkey", base + ".key", "-CAcreateserial",
             "-out", "server.pem", "-days", "2", "-extfile", "server.ext", cwd=d)
    return os.path.join(d, "server.pem"), os.path.join(d, "server.key")


# --- rendering the samples ----------------------------------------------------------------------

def render(text, replacements, sample):
    """Each replacement's old text must occur in the sample exactly once: when the sample changes,
    this fails loudly instead of testing something other than what the README shows."""
    for old, new in replacements:
        n = text.count(old)
        assert n == 1, "%s: expected %r once, found it %d times" % (sample, old, n)
        text = text.replace(old, new)
    return text


def render_nginx(port, upstream_port, cert, key, logs):
    return render(SAMPLE_NGINX.read_text(), [
        ("listen 443 ssl;", "listen 127.0.0.1:%d ssl;" % port),
        ("listen [::]:443 ssl;", ""),
        ("/etc/ssl/modbus-collector/fullchain.pem", cert),
        ("/etc/ssl/modbus-collector/privkey.pem", key),
        ("server 127.0.0.1:8080;", "server 127.0.0.1:%d;" % upstream_port),
        ("/var/log/nginx/modbus-collector.access.log", os.path.join(logs, "access.log")),
        ("/var/log/nginx/modbus-collector.error.log", os.path.join(logs, "error.log")),
    ], SAMPLE_NGINX)


def nginx_main_conf(prefix, site):
    """What Debian's /etc/nginx/nginx.conf provides around sites-enabled/: the main context,
    here with every path inside `prefix`. As root, workers run as root (they must read the
    test's private temporary directory); otherwise as the user running the test."""
    paths = "\n".join("    %s_temp_path %s;" % (k, os.path.join(prefix, k)) for k in
                      ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return ("%sworker_processes 1;\npid %s;\nerror_log %s warn;\nevents { worker_connections 256; }\n"
            "http {\n    access_log off;\n%s\n    include %s;\n}\n"
            % ("user root;\n" if os.geteuid() == 0 else "", os.path.join(prefix, "nginx.pid"),
               os.path.join(prefix, "error.log"), paths, site))


def render_collector(port, db, tokens):
    text = SAMPLE_COLLECTOR.read_text()
    placeholders = re.findall(r"example-[A-Za-z0-9-]*change-me[A-Za-z0-9-]*", text)
    assert len(placeholders) == len(tokens), placeholders
    return render(text, [("listen = 127.0.0.1:8080", "listen = 127.0.0.1:%d" % port),
                         ("db = sqlite:////var/lib/modbus-collector/collector.db", "db = %s" % db),
                         ("retention_days = 400", "retention_days = 0")]
                  + list(zip(placeholders, tokens)), SAMPLE_COLLECTOR)


class Site:
    """The collector and nginx, started from the rendered samples; stopped by close()."""

    def __init__(self, d):
        self.dir = d
        self.ca = make_ca(d, "test-ca")
        self.other_ca = make_ca(d, "other-ca")   # signed nothing of this site
        cert, key = make_server_cert(d, self.ca)
        self.token, self.token8, self.read_token = (secrets.token_hex(24) for _ in range(3))
        self.procs = []
        # the collector, from the sample collector.ini (tokens, read_token) on loopback
        cport = free_port()
        ini = os.path.join(d, "collector.ini")
        with open(ini, "w") as f:
            f.write(render_collector(cport, os.path.join(d, "collector.db"),
                                     [self.read_token, self.token, self.token8]))
        self.collector_log = os.path.join(d, "collector.log")
        self.collector = self._start([sys.executable, "-m", "agent.collector.cli", "-c", ini], self.collector_log)
        wait_for(lambda: requests.get("http://127.0.0.1:%d/health" % cport, timeout=2).ok, 30,
                 "the collector", self.collector, self.collector_log)
        # nginx, from the sample site file, in front of it
        prefix = os.path.join(d, "nginx")
        os.makedirs(prefix)
        self.port = free_port()
        site = os.path.join(prefix, "modbus-collector.conf")
        with open(site, "w") as f:
            f.write(render_nginx(self.port, cport, cert, key, prefix))
        main = os.path.join(prefix, "nginx.conf")
        with open(main, "w") as f:
            f.write(nginx_main_conf(prefix, site))
        self.nginx_log = os.path.join(prefix, "error.log")
        self.access_log = os.path.join(prefix, "access.log")
        self.nginx = self._start([NGINX, "-p", prefix + "/", "-c", main, "-e", self.nginx_log,
                                  "-g", "daemon off;"], os.path.join(prefix, "stderr.log"))
        self.url = "https://127.0.0.1:%d" % self.port
        wait_for(lambda: requests.get(self.url + "/health", timeout=2, verify=self.ca).ok, 20,
                 "nginx", self.nginx, self.nginx_log)

    def _start(self, argv, log):
        with open(log, "w") as out:
            p = subprocess.Popen(argv, cwd=self.dir, stdout=out, stderr=subprocess.STDOUT,
                                 env=dict(os.environ, PYTHONPATH=str(ROOT)))
        self.procs.append(p)
        return p

    def read(self, path, **params):
        r = requests.get(self.url + path, params=params, timeout=10, verify=self.ca,
                         headers={"Authorization": "Bearer " + self.read_token})
        r.raise_for_status()
        return r.json()

    def close(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    s = Site(str(tmp_path_factory.mktemp("proxy")))
    yield s
    s.close()
    assert s.collector.returncode == 0, _tail(s.collector_log)
    assert s.nginx.returncode == 0, _tail(s.nginx_log)


AGENT_INI = """[agent]
id = %(agent)s
interval = 500ms
spool_dir = %(dir)s/spool
status_file = %(dir)s/status.json
[upload]
url = %(url)s/api/v1/batches
token = %(token)s
ca_file = %(ca)s
verify = yes
timeout = 5s
backoff_max = 1s
[connection:plc]
type = tcp
host = 127.0.0.1
port = %(port)d
timeout = 1s
[device:plc1]
connection = plc
unit = 1
[points:plc1]
level = holding 0 uint16
"""


def test_a_real_agent_uploads_through_nginx_over_verified_tls(site, tmp_path):
    peer = UmodbusTcp()
    ini = tmp_path / "agent.ini"
    ini.write_text(AGENT_INI % {"agent": AGENT, "dir": tmp_path, "url": site.url, "token": site.token,
                                "ca": site.ca, "port": peer.port})
    log = tmp_path / "agent.log"
    with open(log, "w") as out:
        agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(ini)], cwd=str(tmp_path),
                                 stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        def stored():
            recs = site.read("/api/v1/records", agent=AGENT, kind="data")
            return len(recs) >= 3 and recs
        wait_for(stored, 30, "3 records through the proxy", agent, log)
        recs = stored()
        assert all(r["device"] == "plc1" and r["values"] == {"level": peer.store.holding[0]} for r in recs), recs
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(15)
        peer.stop()
    text = log.read_text()
    assert agent.returncode == 0, text
    assert "SSLError" not in text and "CERTIFICATE_VERIFY_FAILED" not in text, text
    # nginx saw the agent's posts (its access log has the client's address: the collector's has not)
    with open(site.access_log) as f:
        posts = [line for line in f if '"POST /api/v1/batches HTTP/1.1" 200 ' in line]
    assert posts and all(line.startswith("127.0.0.1 ") for line in posts), posts
    # the sample's read_token is in force through the proxy
    r = requests.get(site.url + "/api/v1/records", timeout=10, verify=site.ca)
    assert r.status_code == 401 and r.json()["where"] == "Authorization"


def test_a_body_over_the_cap_gets_413_from_nginx_in_the_collectors_format(site):
    body = b"{" + b" " * (8 << 20) + b"}"   # two bytes over client_max_body_size 8m
    r = requests.post(site.url + "/api/v1/batches", data=body, timeout=30, verify=site.ca,
                      headers={"Content-Type": "application/json", "Authorization": "Bearer " + site.token})
    assert r.status_code == 413, r.text
    assert r.json() == {"error": "body larger than the proxy's client_max_body_size", "where": "nginx"}
    # a body within the cap goes through to the collector, which judges it
    r = requests.post(site.url + "/api/v1/batches", data=b'{"agent": "%s", "records": []}' % AGENT.encode(),
                      timeout=10, verify=site.ca,
                      headers={"Content-Type": "application/json", "Authorization": "Bearer " + site.token})
    assert r.status_code == 200 and r.json()["stored"] == 0, r.text


def test_the_agent_refuses_a_certificate_from_an_unknown_ca(site, tmp_path, caplog):
    from agent import spool as spool_mod
    from agent import upload

    sp = spool_mod.Spool(str(tmp_path / "spool"), "site8-rut955")
    for i in range(3):
        sp.append({"agent": "site8-rut955", "seq": None, "ts": "2026-12-01T10:00:0%d.000Z" % i,
                   "device": "m", "unit": 1, "status": "ok", "values": {"v": i}})
    up = upload.Uploader(site.url + "/api/v1/batches", "site8-rut955", token=site.token8, timeout=5.0,
                         ca_file=site.other_ca, verify=True)
    with caplog.at_level("INFO", logger="agent.upload"):
        up.drain(sp, time.monotonic() + 5)
    assert sp.stats()["records"] == 3     # nothing acknowledged, nothing lost
    failures = [r.getMessage() for r in caplog.records if "127.0.0.1:%d" % site.port in r.getMessage()]
    assert failures and "certificate verify failed" in failures[0], [r.getMessage() for r in caplog.records]
    assert site.read("/api/v1/records", agent="site8-rut955") == []
    # the same uploader with the right CA gets through
    up = upload.Uploader(site.url + "/api/v1/batches", "site8-rut955", token=site.token8, timeout=5.0,
                         ca_file=site.ca, verify=True)
    up.drain(sp, time.monotonic() + 10)
    assert sp.stats()["records"] == 0
    sp.close()
    assert len(site.read("/api/v1/records", agent="site8-rut955")) == 3


def _tls(site, source):
    """A TLS connection to nginx from the loopback address `source` (any of 127.0.0.0/8 works
    on Linux: a second client address without a second machine)."""
    import socket
    import ssl

    ctx = ssl.create_default_context(cafile=site.ca)
    raw = socket.create_connection(("127.0.0.1", site.port), timeout=10, source_address=(source, 0))
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def _post(site, source, body):
    import http.client
    import ssl

    conn = http.client.HTTPSConnection("127.0.0.1", site.port, timeout=10, source_address=(source, 0),
                                       context=ssl.create_default_context(cafile=site.ca))
    try:
        conn.request("POST", "/api/v1/batches", body=body, headers={
            "Content-Type": "application/json", "Authorization": "Bearer " + site.token})
        r = conn.getresponse()
        return r.status, r.getheader("Retry-After"), r.read()
    finally:
        conn.close()


def test_one_address_holding_its_connections_gets_429_and_others_still_get_through(site):
    """16 connections from one address that sent their head and then stall in the body (what
    a slowloris client does after the head) use up limit_conn 16 for that address only: its
    next request gets 429 with Retry-After at once, an agent on another address is stored."""
    import json

    ok = b'{"agent": "%s", "records": []}' % AGENT.encode()
    held = []
    try:
        for _ in range(16):
            s = _tls(site, "127.0.0.1")
            s.sendall(b"POST /api/v1/batches HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{")
            held.append(s)
        # nginx counts a connection once it has read its head: ask until all 16 are counted
        deadline = time.monotonic() + 10
        while True:
            status, retry_after, body = _post(site, "127.0.0.1", ok)
            if status != 200 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert (status, retry_after) == (429, "10"), body
        assert json.loads(body)["where"] == "nginx limit_conn"
        t0 = time.monotonic()
        status, _, body = _post(site, "127.0.0.2", ok)
        assert status == 200 and json.loads(body)["stored"] == 0, body
        assert time.monotonic() - t0 < 5      # generous: one TLS handshake and a post
    finally:
        for s in held:
            s.close()
    # once they are gone the first address gets in again
    wait_for(lambda: _post(site, "127.0.0.1", ok)[0] == 200, 10, "the address's slots to free up")
