#!/usr/bin/env python3
"""MQTT output benchmark: records/s published from the spool at QoS 1 to a local mosquitto, CPU
per record, and the agent's memory with [mqtt] enabled vs HTTP only (target: at most +2 MB).

    .venv/bin/python tools/bench/mqtt.py [--records N]

Throughput: N realistic meter records in a spool, MqttOutput.fill_gap in 100 ms gaps (as the
loop gives them) until the spool is empty, acknowledged after every PUBACK; per record and
batch = yes (JSON arrays of 100), plain and TLS, and QoS 0. Peer: paho's own threaded client
(loop_start, publish, wait_for_publish at the end) publishing the same lines at QoS 1 with the
same in-flight window: what the library does when nothing else shares the process. CPU is this
process's (user + system), the broker's not counted.

Memory: `python -m agent run` with no devices, HTTP only, then HTTP + MQTT connected to the
broker (both with a spool of 2000 records to send, so the publish path has run): VmRSS and
VmHWM after the backlog is gone.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools" / "bench"))

from proc import rss_kb  # noqa: E402

from agent.config.schema import MqttSettings  # noqa: E402
from agent.record import data_record  # noqa: E402
from agent.spool import Spool  # noqa: E402
from tests.brokers import PASSWORD, USER, Mosquitto  # noqa: E402

AGENT = "site7-rut200"


def values(i):
    k = (i * 7919) % 1000
    return {"voltage_l1": 229.0 + k % 31 / 10, "voltage_l2": 230.0 + k % 17 / 10, "voltage_l3": 231.0 - k % 23 / 10,
            "current_l1": round(4.0 + k / 997, 3), "current_l2": round(3.5 + k / 991, 3),
            "current_l3": round(4.1 + k / 983, 3), "power": round(2700.0 + k * 1.37, 1),
            "energy": round(1234567.8 + i * 0.21, 2), "frequency": 50.0 + k % 7 / 100, "pf": 0.9 + k % 9 / 100}


def fill(directory, n, outputs=("mqtt",)):
    sp = Spool(str(directory), AGENT, outputs=outputs, fsync="never")
    for i in range(n):
        sp.append(data_record(AGENT, 1.8e9 + i, "meter%d" % (i % 20), 1 + i % 20, values(i)))
    return sp


def cpu():
    t = os.times()
    return t.user + t.system


def ours(broker, tmp, n, label, tls=False, **kw):
    from agent.mqtt.output import MqttOutput

    sp = fill(tmp / ("spool-" + label), n)
    s = MqttSettings(url=broker.url(tls), username=USER, password=PASSWORD, ca_file=broker.certs["ca"] if tls else None,
                     quarantine_file=str(tmp / "q.jsonl"), **kw)
    out = MqttOutput(s, AGENT)
    t0, c0 = time.monotonic(), cpu()
    while sp.stats()["outputs"]["mqtt"]["records"]:
        out.fill_gap(sp, time.monotonic() + 0.1)
    wall, used = time.monotonic() - t0, cpu() - c0
    st = out.state()
    out.close()
    sp.close()
    assert st["sent_total"] == n, st
    return {"case": label, "records_s": n / wall, "us_cpu_per_record": 1e6 * used / n, "messages": st["messages_total"]}


def peer(broker, tmp, n, inflight=20):
    """paho with its own network thread: the same lines, QoS 1, same window."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    sp = fill(tmp / "spool-peer", n)
    b = sp.peek(n, 1 << 30, output="mqtt")
    lines = b.lines
    sp.close()
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-peer", protocol=paho.MQTTv5)
    c.username_pw_set(USER, PASSWORD)
    c.max_inflight_messages_set(inflight)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    t0, c0 = time.monotonic(), cpu()
    infos = [c.publish("modbus/%s/meter" % AGENT, line, qos=1) for line in lines]
    for info in infos:
        info.wait_for_publish(30)
    wall, used = time.monotonic() - t0, cpu() - c0
    c.disconnect()
    c.loop_stop()
    return {"case": "peer: paho threaded", "records_s": n / wall, "us_cpu_per_record": 1e6 * used / n, "messages": n}


def agent_rss(broker, tmp, with_mqtt, n=2000):
    d = tmp / ("agent-mqtt" if with_mqtt else "agent-http")
    d.mkdir()
    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))      # HTTP: a port that refuses (the uploader backs off), same in both
    port = sink.getsockname()[1]
    sink.close()
    outputs = ("http", "mqtt") if with_mqtt else ("http",)
    fill(d / "spool", n, outputs).close()
    ini = d / "agent.ini"
    text = ("[agent]\nid = %s\nspool_dir = %s\nstatus_file = %s\nfsync = never\n"
            "[upload]\nurl = http://127.0.0.1:%d/api/v1/batches\nbackoff_max = 1s\n" % (
                AGENT, d / "spool", d / "status.json", port))
    if with_mqtt:
        text += "[mqtt]\nurl = %s\nusername = %s\npassword = %s\n" % (broker.url(), USER, PASSWORD)
    ini.write_text(text)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", "agent", "run", "-c", str(ini)], env=env, cwd=str(d),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 60
        while time.monotonic() < end:
            time.sleep(0.5)
            try:
                st = json.loads((d / "status.json").read_text())
            except (OSError, ValueError):
                continue
            m = (st.get("outputs") or {}).get("mqtt")
            if not with_mqtt or (m and m["backlog"] and m["backlog"]["records"] == 0):
                break
        time.sleep(6)       # a status period and a few gaps more
        rss = rss_kb(p.pid)
        with open("/proc/%d/status" % p.pid) as f:
            hwm = next(int(x.split()[1]) for x in f if x.startswith("VmHWM:"))
        return rss, hwm
    finally:
        p.terminate()
        p.wait(20)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=20000)
    args = ap.parse_args()
    reason = Mosquitto.skip_reason()
    if reason:
        print("mqtt bench: %s" % reason)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="bench-mqtt-"))
    broker = Mosquitto(tmp / "broker").start()
    try:
        n = args.records
        rows = [ours(broker, tmp, n, "qos 1, one message per record"),
                ours(broker, tmp, n, "qos 1, batch = yes (an array per topic)", batch=True),
                ours(broker, tmp, n, "qos 1, mqtts", tls=True),
                ours(broker, tmp, n, "qos 0, one message per record", qos=0),
                peer(broker, tmp, n)]
        ref = rows[-1]
        print("MQTT output, %d records of ~%d bytes, local mosquitto (measured under load: other jobs share "
              "the 2 cores)" % (n, 300))
        print("%-38s %12s %16s %10s %12s" % ("case", "records/s", "CPU us/record", "messages", "vs peer"))
        for r in rows:
            print("%-38s %12.0f %16.1f %10d %11.2fx" % (r["case"], r["records_s"], r["us_cpu_per_record"],
                                                         r["messages"], r["records_s"] / ref["records_s"]))
        http = agent_rss(broker, tmp, False)
        mq = agent_rss(broker, tmp, True)
        print()
        print("agent RSS (python -m agent run, no devices, 2000 records backlog sent)")
        print("%-20s %10s %10s" % ("", "VmRSS kB", "VmHWM kB"))
        print("%-20s %10d %10d" % ("HTTP only", http[0], http[1]))
        print("%-20s %10d %10d" % ("HTTP + MQTT", mq[0], mq[1]))
        delta = (mq[0] - http[0]) / 1024.0
        print("MQTT adds %.2f MB RSS (%.2f MB peak); target <= 2 MB: %s" % (
            delta, (mq[1] - http[1]) / 1024.0, "OK" if delta <= 2.0 else "OVER"))
    finally:
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
