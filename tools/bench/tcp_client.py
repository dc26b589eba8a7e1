#!/usr/bin/env python3
"""Sequential FC03 x 125 reads over loopback Modbus TCP, one connection per client:
the agent's full client path vs a C libmodbus client and pymodbus's sync client.

    .venv/bin/python tools/bench/tcp_client.py [--quick] [-n READS] [--server c|python] [--same-cpu]

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

def main(argv):
    quick = "--quick" in argv
    n = int(argv[argv.index("-n") + 1]) if "-n" in argv else (500 if quick else 3000)
    rounds = 3 if quick else 7
    kind = argv[argv.index("--server") + 1] if "--server" in argv else "c"
    same_cpu = "--same-cpu" in argv
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    client_cpu = cpus[0] if cpus else None
    server_cpu = cpus[1] if len(cpus) >= 2 and not same_cpu else client_cpu
    if client_cpu is not None:
        os.sched_setaffinity(0, {client_cpu})
        pinning = f"client pinned to CPU {client_cpu}, server to CPU {server_cpu}"
    else:
        pinning = "not pinned"

    server = None
    if kind == "c":
        proc, port, why = start_c_server(server_cpu)
        if proc is None:
            print(f"C server unavailable ({why}): using the Python server")
            kind = "python"
        else:
            server = proc
            server_name = ("minimal C server (tools/bench/fast_server.c: thread per connection, "
                           "canned response), own process")
    if kind == "python":
        ctx = multiprocessing.get_context("fork")
        q = ctx.Queue()
        server = ctx.Process(target=serve, args=(q, server_cpu), daemon=True)
        server.start()
        port = q.get(timeout=10)
        server_name = ("minimal raw-socket Python server (thread per connection, canned response), "
                       "own process")
    print(f"TCP client benchmark: sequential FC03 x 125 reads, one connection each, {n} reads x "
          f"{rounds} rounds (best round), {pinning}")
    print(f"server: {server_name}")

    binary, why = build_libmodbus_client()
    if binary is None:
        print(f"SKIP libmodbus: {why}")

    clients = {"agent": lambda: agent_client(port, n), "pymodbus": lambda: pymodbus_client(port, n)}
    if binary is not None:
        clients["libmodbus"] = lambda: libmodbus_client(binary, port, n)
    best = dict.fromkeys(clients, float("inf"))
    try:
        for _ in range(rounds):
            for name, run in clients.items():
                best[name] = min(best[name], run())
    finally:
        server.terminate()
        if kind == "python":
            server.join(2)
        else:
            server.wait(2)

    agent = best["agent"]
    labels = {
        "agent": "agent TcpClient.read + struct unpack (Python)",
        "libmodbus": "libmodbus modbus_read_registers (C)",
        "pymodbus": "pymodbus ModbusTcpClient (sync)",
    }
    print(f"\n  {'client':<48} {'us/read':>9} {'reads/s':>9} {'agent speed':>12}")
    for name in ("agent", "libmodbus", "pymodbus"):
        if name in best:
            us = best[name]
            ratio = "(agent)" if name == "agent" else f"{us / agent:.2f}x"
            print(f"  {labels[name]:<48} {us:>9.1f} {1e6 / us:>9.0f} {ratio:>12}")

    print("\nTargets (issue 2; speed = other's time / agent's time)")
    ok = True
    for name, target in (("libmodbus", 0.8), ("pymodbus", 2.0)):
        if name not in best:
            print(f"  SKIP  agent vs {name}")
            continue
        ratio = best[name] / agent
        ok &= ratio >= target
        print(f"  {'PASS' if ratio >= target else 'MISS'}  agent vs {name}: {ratio:.2f}x (target >= {target}x)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
