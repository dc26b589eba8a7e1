#!/usr/bin/env python3
"""Issue 15 (commission) micro-benchmarks, side by side with a peer where there is one.

    .venv/bin/python tools/bench/commission.py [--quick]

1. Modbus ASCII: decoding a 125-register FC03 answer frame, "frame bytes in -> data bytes out
   (checked)": agent/modbus/ascii.py vs pymodbus' FramerAscii.decode (which checks the LRC and
   returns the PDU, with no unit/function/byte-count checks). And building a read request.
   At 9600 baud 7E1 the answer itself takes 511 characters x 1.04 ms = 0.53 s on the line: the
   codec's share is what a router's CPU pays per answer.
2. Self-monitoring: one SelfMonitor.snapshot() (the /proc reads, statvfs, getloadavg), taken once
   per health round (default every 5 min), against that round's length.
3. systemd notify: one WATCHDOG=1 datagram to a bound socket (at most one per second).
Figures: best of several interleaved repeats, pinned to one CPU (tools/bench/codec.py's helpers).
"""
import os
import socket
import sys
import tempfile
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools" / "bench"))

from codec import measure, pin, table  # noqa: E402

from agent import notify  # noqa: E402
from agent.health import SelfMonitor  # noqa: E402
from agent.modbus import ascii as A  # noqa: E402


def main(argv):
    quick = "--quick" in argv
    number, repeat = (200, 3) if quick else (2000, 7)
    print("commission benchmarks (%s)" % pin())
    data = bytes(range(250))
    frame = A.build_adu(1, bytes((3, 250)) + data)
    assert A.decode_read(frame, 1, 3, 125) == data
    fns = {"agent ascii.decode_read": lambda: A.decode_read(frame, 1, 3, 125)}
    try:
        from pymodbus.framer.ascii import FramerAscii

        framer = FramerAscii(None)
        assert framer.decode(frame)[3][2:] == data
        fns["pymodbus FramerAscii.decode"] = lambda: framer.decode(frame)
    except Exception as e:  # pymodbus is a test peer; the bench runs without it
        print("  (pymodbus not usable: %s)" % e)
    got = measure(fns, number, repeat)
    table("1. ASCII: 125-register answer (%d characters) -> data" % len(frame), list(got.items()),
          got["agent ascii.decode_read"])
    fns = {"agent ascii.build_adu(read request)": lambda: A.build_adu(1, b"\x03\x00\x00\x00\x7d")}
    got = measure(fns, number, repeat)
    table("   ASCII: build a read request", list(got.items()), got["agent ascii.build_adu(read request)"])

    with tempfile.TemporaryDirectory() as tmp:
        mon = SelfMonitor(tmp)
        us = min(timeit.repeat(lambda: mon.snapshot(10), number=number // 10, repeat=repeat)) / (number // 10) * 1e6
        print("\n2. SelfMonitor.snapshot(): %.1f us per health round = %.5f%% of a 5-minute round"
              % (us, us / 3e8 * 100))
        path = os.path.join(tmp, "n.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        n = notify.Notifier(path, watchdog=60.0)

        def ping():
            n.send("WATCHDOG=1")
            sock.recv(64)
        us = min(timeit.repeat(ping, number=number, repeat=repeat)) / number * 1e6
        print("3. WATCHDOG=1 datagram (send + the test's recv): %.1f us, at most once a second" % us)
        n.close()
        sock.close()


if __name__ == "__main__":
    main(sys.argv[1:])
