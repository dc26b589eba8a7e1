"""Peak memory of the real collector process (`modbus-collector`, a subprocess on 127.0.0.1) while
it refuses bodies that are small on the wire and huge once parsed: gzip bombs of millions of tiny
JSON values within the decompressed-size cap, to /api/v1/batches and to the open /receive-data.
The figure checked is the process's VmHWM (peak RSS) from /proc, before and after each post."""
import gzip
import os
import signal
import subprocess
import sys
import time

import pytest
import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAP = 4 << 20  # max_decompressed_bytes of the collector under test
# README's figure: peak memory per request at most 10 x max_decompressed_bytes (the body as bytes,
# then as text, each record's text, what the parser may build within json_limits, and storing:
# measured up to 7.6x at the limits, 2x for a refused bomb); x2 for text holding a character
# beyond U+00FF, x4 beyond U+FFFF (Python then keeps every character of it in 2 or 4 bytes).
BOUND = 10 * CAP

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")


def vm_hwm(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM for %d" % pid)


@pytest.fixture
def collector(tmp_path, free_port):
    conf = tmp_path / "collector.ini"
    conf.write_text("[collector]\nmax_body_bytes = 1M\nmax_decompressed_bytes = %d\nreceive_data = open\n" % CAP)
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "agent.collector.cli", "-c", str(conf), "--listen",
                             "127.0.0.1:%d" % free_port, "--db", "sqlite:///%s" % (tmp_path / "c.db")],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = "http://127.0.0.1:%d" % free_port
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                requests.get(url + "/health", timeout=2)
                break
            except requests.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, "collector did not start"
                time.sleep(0.1)
        # one real batch first: imports, the database and the first request's buffers are the base
        ok = ('{"agent":"a","records":[{"agent":"a","seq":0,"ts":"2026-11-21T10:30:45.123Z",'
              '"device":"m","unit":1,"values":{"v":1},"status":"ok"}]}')
        r = requests.post(url + "/api/v1/batches", data=gzip.compress(ok.encode()), timeout=10,
                          headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
        assert r.status_code == 200, r.text
        yield url, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _fill(head, item, tail, size=CAP):
    """head + item, item, ... + tail: `size` bytes at most (within the cap)."""
    n = (size - len(head) - len(tail)) // (len(item) + 1)
    return (head + ",".join([item] * n) + tail).encode()


BOMBS = {
    # {} is 3 bytes, a dict is 64 (+ its slot, its raw text, its pair): 1.4 M of them
    "records of empty objects": ("/api/v1/batches", _fill('{"agent":"a","records":[', "{}", "]}")),
    # one record, its values a list of a million empty lists
    "one record of empty lists": ("/api/v1/batches", _fill(
        '{"agent":"a","records":[{"agent":"a","seq":1,"ts":"2026-11-21T10:30:45.123Z","device":"m","unit":1,'
        '"values":{"v":[', "[]", ']},"status":"ok"}]}')),
    # two-character strings: 5 bytes each on the wire, 50 as objects
    "one record of short strings": ("/api/v1/batches", _fill(
        '{"agent":"a","records":[{"agent":"a","seq":2,"ts":"2026-11-21T10:30:45.123Z","device":"m","unit":1,'
        '"values":{"v":[', '"ab"', ']},"status":"ok"}]}')),
    # no token needed: the open legacy endpoint
    "legacy list of empty objects": ("/receive-data", _fill("[", "{}", "]")),
    "legacy registers of small objects": ("/receive-data", _fill(
        '{"timestamp":"2024-01-15 10:30:45","device_id":"d","registers":{"r":[', '{"a":1}', "]}}")),
}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_a_gzip_bomb_of_tiny_values_is_refused_within_a_bounded_peak_rss(collector, name):
    url, pid = collector
    path, body = BOMBS[name]
    assert len(body) <= CAP
    wire = gzip.compress(body, 9)
    assert len(wire) < 64 << 10  # small on the wire
    before = vm_hwm(pid)
    r = requests.post(url + path, data=wire, timeout=60,
                      headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    grown = vm_hwm(pid) - before
    print("%s: %d bytes on the wire, %d decompressed: %d, peak RSS +%.1f MB" % (
        name, len(wire), len(body), r.status_code, grown / 1e6))
    assert grown <= BOUND, "peak RSS grew by %.0f MB for one %d-byte request (bound %.0f MB)" % (
        grown / 1e6, len(wire), BOUND / 1e6)
    assert r.status_code == 413, r.text
    assert r.json()["where"] == "body" and "JSON" in r.json()["error"]
    # and the collector still works
    assert requests.get(url + "/health", timeout=10).status_code == 200


def _at_the_limits(kind):
    from agent.collector.jsonbody import json_limits

    max_values, max_containers = json_limits(CAP)
    head = ('{"agent":"a","records":[{"agent":"a","seq":1,"ts":"2026-11-21T10:30:45.123Z","device":"m",'
            '"unit":1,"values":{"v":[')
    tail = ']},"status":"ok"}]}'
    n = max_values - 20
    if kind == "values":
        return (head + ",".join(['"ab"'] * n) + tail).encode()
    if kind == "containers":
        return (head + ",".join(['{"a":[]}'] * (max_containers // 2 - 10)) + tail).encode()
    # as many values, filling the cap; with one astral character the text is 4 bytes a character
    fill = ['"%s"' % ("x" * (CAP // n - 4))] * (n - 1)
    last = {"astral": '"\U0001F600"', "bmp": '"\u4e2d"'}.get(kind, '"y"')
    return (head + ",".join(fill + [last]) + tail).encode()


@pytest.mark.parametrize("kind", ["values", "containers", "long strings", "bmp", "astral"])
def test_the_largest_bodies_the_limits_let_through_stay_within_the_bound(collector, kind):
    """At the limits (json_limits of the cap), not beyond: accepted, and the peak stays within the
    bound (x2 for text with a character beyond U+00FF, x4 beyond U+FFFF: Python then holds every
    character of the text in 2 or 4 bytes).
    These are the worst cases the parser really builds, and the record is stored."""
    url, pid = collector
    body = _at_the_limits(kind)
    assert len(body) <= CAP
    before = vm_hwm(pid)
    r = requests.post(url + "/api/v1/batches", data=gzip.compress(body), timeout=60,
                      headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    grown = vm_hwm(pid) - before
    bound = BOUND * {"astral": 4, "bmp": 2}.get(kind, 1)
    print("at the limits, %s: %d bytes: %d, peak RSS +%.1f MB" % (kind, len(body), r.status_code, grown / 1e6))
    assert r.status_code == 200, r.text
    assert grown <= bound, "peak RSS grew by %.0f MB (bound %.0f MB)" % (grown / 1e6, bound / 1e6)


def test_one_record_of_the_agents_own_form_with_a_third_of_a_million_values(collector):
    """The fast path matches it by regex without parsing; reading its keys (to refuse a repeated
    one) must not build them all: the record gets the general checks, bounded like any body."""
    url, pid = collector
    head = ('{"agent":"a","records":[{"agent":"a","seq":3,"ts":"2026-11-21T10:30:45.123Z","device":"m","unit":1,'
            '"values":{')
    n = (CAP - 200) // 13
    body = (head + ",".join('"k%06d":1' % i for i in range(n)) + '},"status":"ok"}]}').encode()
    assert len(body) <= CAP
    before = vm_hwm(pid)
    r = requests.post(url + "/api/v1/batches", data=gzip.compress(body), timeout=60,
                      headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    grown = vm_hwm(pid) - before
    print("fast form, %d values: %d, peak RSS +%.1f MB" % (n, r.status_code, grown / 1e6))
    assert grown <= BOUND
    assert (r.status_code, r.json()["where"]) == (413, "body")
