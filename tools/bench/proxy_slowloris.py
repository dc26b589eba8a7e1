#!/usr/bin/env python3
"""Slowloris against the README's nginx setup: an agent-like client's post latency meanwhile.

    .venv/bin/python tools/bench/proxy_slowloris.py [--connections 200] [--seconds 20]

Starts the same site as tests/test_collector_proxy.py (Debian's nginx with the rendered
conf/nginx-collector.conf over TLS with a test CA, the real collector from conf/collector.ini on
127.0.0.1). An attacker on 127.0.0.3 opens N TLS connections and dribbles each request head one
byte per second; a client on 127.0.0.1 posts an empty batch every 250 ms on one keep-alive
connection (as the agent does) and reports status counts and p50/p99/max latency, plus how many
attack connections nginx still held at the end (client_header_timeout is a total deadline).
Loopback only. Needs nginx and openssl (skips otherwise, like the test).
"""
import argparse
import os
import statistics
import sys
import tempfile
import threading
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, ROOT)

import requests  # noqa: E402

from tests.test_collector_proxy import AGENT, NGINX, OPENSSL, Site, _tls  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=200)
    p.add_argument("--seconds", type=float, default=20.0)
    args = p.parse_args(argv)
    if NGINX is None or OPENSSL is None:
        print("skipped: needs nginx (apt-get install nginx) and the openssl CLI")
        return 0
    site = Site(tempfile.mkdtemp(prefix="proxy-slowloris-"))
    stop = threading.Event()
    socks, opened = [], []

    def attacker():
        for _ in range(args.connections):
            try:
                s = _tls(site, "127.0.0.3")
                s.sendall(b"POST /api/v1/batches HTTP/1.1\r\n")
            except OSError as e:
                print("attacker: connection %d failed: %s" % (len(socks) + 1, e))
                break
            socks.append(s)
        opened.append(len(socks))
        while not stop.is_set():
            for s in list(socks):
                try:
                    s.sendall(b"X")
                except OSError:
                    socks.remove(s)
            stop.wait(1.0)

    threading.Thread(target=attacker, daemon=True).start()
    try:
        deadline = time.monotonic() + 30
        while not opened and time.monotonic() < deadline:
            time.sleep(0.1)
        lat, codes = [], {}
        body = b'{"agent": "%s", "records": []}' % AGENT.encode()
        headers = {"Content-Type": "application/json", "Authorization": "Bearer " + site.token}
        end = time.monotonic() + args.seconds
        with requests.Session() as s:
            while time.monotonic() < end:
                t0 = time.monotonic()
                try:
                    code = s.post(site.url + "/api/v1/batches", data=body, headers=headers, verify=site.ca,
                                  timeout=10).status_code
                except requests.RequestException as e:
                    code = type(e).__name__
                lat.append(time.monotonic() - t0)
                codes[code] = codes.get(code, 0) + 1
                time.sleep(0.25)
        lat.sort()
        print("attack: %d TLS connections opened, %d still held by nginx after %.0f s"
              % (opened[0] if opened else 0, len(socks), args.seconds))
        print("posts: %d %s  p50 %.1f ms  p99 %.1f ms  max %.1f ms"
              % (len(lat), codes, statistics.median(lat) * 1000, lat[max(0, int(len(lat) * 0.99) - 1)] * 1000,
                 lat[-1] * 1000))
    finally:
        stop.set()
        for s in socks:
            s.close()
        site.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
