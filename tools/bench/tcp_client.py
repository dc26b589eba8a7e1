#!/usr/bin/env python3
"""Sequential FC03 x 125 reads over loopback Modbus TCP, one connection per client:
the agent's full client path vs a C libmodbus client and pymodbus's sync client.

    .venv/bin/python tools/bench/tcp_client.py [--quick] [-n READS] [--server c|python] [--same-cpu]

Two placements in one run: server and client on the same CPU (every microsecond of client CPU
time shows in the figure), and server on its own CPU (adds the cross-CPU wake-up latency a
real link has); `--same-cpu` runs only the first.

Every client talks to the same server, a minimal raw-socket server written for the bench (one
thread per connection, answers every request with a canned 125-register response carrying the
request's transaction id): by default in C (tools/bench/fast_server.c, compiled with gcc) so its
own time is small and the clients dominate; `--server python` uses a Python one. It runs in its
own process pinned to its own CPU (`--same-cpu`: the client's), never competing for the GIL. The Python clients run in this process pinned to
another CPU; the C client is a child process with the same pinning. Rounds are interleaved
and the best round of each client is reported (microseconds per read, "ADU out -> ints in").

The libmodbus client (tools/bench/libmodbus_client.c) is compiled with gcc into
tools/bench/.build/. Without libmodbus-dev it tries `apt-get install -y libmodbus-dev` when
running as root, else prints a skip line and carries on with the others.
"""
import multiprocessing
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from agent.modbus.client import TcpClient  # noqa: E402

VALUES = [(i * 521) & 0xFFFF for i in range(125)]
BODY = struct.pack(">HHBBB", 0, 253, 1, 3, 250) + struct.pack(">125H", *VALUES)


# --- the server ----------------------------------------------------------------------------------

def _serve_connection(conn):
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(12)
    view = memoryview(buf)
    recv_into, send, body = conn.recv_into, conn.sendall, BODY
    try:
        while True:
            got = recv_into(buf, 12)
            if not got:
                return
            while got < 12:  # the 12-byte request nearly always arrives whole
                n = recv_into(view[got:], 12 - got)
                if not n:
                    return
                got += n
            send(bytes(view[:2]) + body)
    except OSError:
        pass
    finally:
        conn.close()


def serve(port_queue, cpu):
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port_queue.put(listener.getsockname()[1])
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_serve_connection, args=(conn,), daemon=True).start()


# --- the clients ---------------------------------------------------------------------------------

def agent_client(port, n):
    regs = struct.Struct(">125H").unpack
    c = TcpClient("127.0.0.1", port, timeout=2.0)
    read = c.read
    for _ in range(200):
        read(1, 3, 0, 125)
    t0 = time.perf_counter()
    for _ in range(n):
        values = list(regs(read(1, 3, 0, 125)))
    dt = time.perf_counter() - t0
    c.close()
    assert values == VALUES
    return dt / n * 1e6


def pymodbus_client(port, n):
    from pymodbus.client import ModbusTcpClient

    c = ModbusTcpClient("127.0.0.1", port=port, timeout=2)
    c.connect()
    for _ in range(200):
        c.read_holding_registers(0, count=125, device_id=1)
    t0 = time.perf_counter()
    for _ in range(n):
        values = c.read_holding_registers(0, count=125, device_id=1).registers
    dt = time.perf_counter() - t0
    c.close()
    assert values == VALUES
    return dt / n * 1e6


def compile_c(name, libs):
    """Compile tools/bench/NAME.c into tools/bench/.build/NAME; (path, None) or (None, reason)."""
    source = HERE / f"{name}.c"
    out_dir = HERE / ".build"
    binary = out_dir / name
    if not shutil.which("gcc"):
        return None, "gcc not found"
    if binary.exists() and binary.stat().st_mtime >= source.stat().st_mtime:
        return binary, None
    out_dir.mkdir(exist_ok=True)
    r = subprocess.run(["gcc", "-O2", "-o", str(binary), str(source), *libs], capture_output=True, text=True)
    if r.returncode != 0:
        lines = r.stderr.strip().splitlines()
        return None, "gcc failed: " + (lines[-1] if lines else "?")
    return binary, None


def start_c_server(cpu):
    binary, why = compile_c("fast_server", ["-lpthread"])
    if binary is None:
        return None, None, why
    pre = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
    proc = subprocess.Popen([str(binary)], stdout=subprocess.PIPE, text=True, preexec_fn=pre)
    port = int(proc.stdout.readline())
    return proc, port, None


def build_libmodbus_client():
    """Path of the compiled C client, or (None, reason)."""
    if not Path("/usr/include/modbus/modbus.h").exists():
        if os.geteuid() == 0 and shutil.which("apt-get"):
            print("libmodbus-dev missing: apt-get install -y libmodbus-dev ...", flush=True)
            subprocess.run(["apt-get", "install", "-y", "libmodbus-dev"], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not Path("/usr/include/modbus/modbus.h").exists():
            return None, "libmodbus-dev not installed (apt-get install libmodbus-dev as root)"
    flags = ["-I/usr/include/modbus", "-lmodbus"]
    if shutil.which("pkg-config"):
        cf = subprocess.run(["pkg-config", "--cflags", "--libs", "libmodbus"], capture_output=True, text=True)
        if cf.returncode == 0 and cf.stdout.strip():
            flags = cf.stdout.split()
    return compile_c("libmodbus_client", flags)


def libmodbus_client(binary, port, n):
    r = subprocess.run([str(binary), "127.0.0.1", str(port), str(n)], capture_output=True, text=True,
                       timeout=120)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip())
    us, checksum = r.stdout.split()
    assert int(checksum) == sum(VALUES)
    return float(us)


# --- main ----------------------------------------------------------------------------------------

def start_server(kind, cpu):
    """(stop function, port, description) of the bench server pinned to `cpu`."""
    if kind == "c":
        proc, port, why = start_c_server(cpu)
        if proc is not None:
            def stop():
                proc.terminate()
                proc.wait(2)
            return stop, port, ("minimal C server (tools/bench/fast_server.c: thread per connection, "
                                "canned response), own process")
        print(f"C server unavailable ({why}): using the Python server")
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    proc = ctx.Process(target=serve, args=(q, cpu), daemon=True)
    proc.start()
    port = q.get(timeout=10)

    def stop_python():
        proc.terminate()
        proc.join(2)
    return stop_python, port, ("minimal raw-socket Python server (thread per connection, canned "
                               "response), own process")


LABELS = {
    "agent": "agent TcpClient.read -> list of ints (Python)",
    "libmodbus": "libmodbus modbus_read_registers (C)",
    "pymodbus": "pymodbus ModbusTcpClient (sync)",
}
TARGETS = (("libmodbus", 0.8), ("pymodbus", 2.0))


def run_mode(kind, client_cpu, server_cpu, n, rounds, binary):
    stop, port, server_name = start_server(kind, server_cpu)
    where = ("server on its own CPU %s, client on CPU %s" % (server_cpu, client_cpu)
             if server_cpu != client_cpu else "server and client on the same CPU %s" % client_cpu)
    print(f"\n{where}; server: {server_name}")
    clients = {"agent": lambda: agent_client(port, n), "pymodbus": lambda: pymodbus_client(port, n)}
    if binary is not None:
        clients["libmodbus"] = lambda: libmodbus_client(binary, port, n)
    best = dict.fromkeys(clients, float("inf"))
    try:
        for _ in range(rounds):
            for name, run in clients.items():
                best[name] = min(best[name], run())
    finally:
        stop()
    agent = best["agent"]
    print(f"  {'client':<48} {'us/read':>9} {'reads/s':>9} {'agent speed':>12}")
    for name in ("agent", "libmodbus", "pymodbus"):
        if name in best:
            us = best[name]
            ratio = "(agent)" if name == "agent" else f"{us / agent:.2f}x"
            print(f"  {LABELS[name]:<48} {us:>9.1f} {1e6 / us:>9.0f} {ratio:>12}")
    return {name: best[name] / agent for name, _ in TARGETS if name in best}, where


def main(argv):
    quick = "--quick" in argv
    n = int(argv[argv.index("-n") + 1]) if "-n" in argv else (500 if quick else 3000)
    rounds = 3 if quick else 7
    kind = argv[argv.index("--server") + 1] if "--server" in argv else "c"
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    client_cpu = cpus[0] if cpus else None
    if client_cpu is not None:
        os.sched_setaffinity(0, {client_cpu})  # the C client inherits it
    modes = [client_cpu]  # same CPU: every microsecond of client CPU time shows
    if len(cpus) >= 2 and "--same-cpu" not in argv:
        modes.append(cpus[1])  # own CPU: adds the cross-CPU wake-up latency of a real link
    print(f"TCP client benchmark: sequential FC03 x 125 reads, one connection per client, "
          f"{n} reads x {rounds} interleaved rounds, best round; Python {sys.version.split()[0]}")
    binary, why = build_libmodbus_client()
    if binary is None:
        print(f"SKIP libmodbus: {why}")

    results = [run_mode(kind, client_cpu, server_cpu, n, rounds, binary) for server_cpu in modes]

    print("\nTargets (issue 2; speed = other's time per read / agent's time per read), judged on the")
    print("same-CPU placement, where client cost dominates; the own-CPU placement is dominated by")
    print("cross-CPU wake-up latency (same for every client) and is shown for information")
    ok = True
    for i, (ratios, where) in enumerate(results):
        for name, target in TARGETS:
            if name not in ratios:
                print(f"  SKIP  agent vs {name} ({where})")
                continue
            good = ratios[name] >= target
            if i == 0:
                ok &= good
                verdict = "PASS" if good else "MISS"
            else:
                verdict = "info"
            print(f"  {verdict}  agent vs {name}: {ratios[name]:.2f}x (target >= {target}x; {where})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
