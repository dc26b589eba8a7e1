"""Independent Modbus peers for the codec tests: umodbus and pymodbus servers (TCP, RTU on a pty,
RTU-over-TCP) and raw fakes that answer crafted bytes keyed by the request bytes.

Every peer runs in a background thread, binds port 0 / opens its own pty, and stops cleanly.
"""
import asyncio
import os
import select
import socket
import socketserver
import struct
import threading
import tty

from umodbus.server.serial import get_server as umodbus_serial_server
from umodbus.server.serial.rtu import RTUServer
from umodbus.server.tcp import RequestHandler
from umodbus.server.tcp import get_server as umodbus_tcp_server

from agent.modbus.crc import append_crc

N_REGISTERS = 200
N_BITS = 200


def initial_data():
    """The data every server starts with: (coils, discrete inputs, holding, input registers)."""
    coils = [i % 3 == 0 for i in range(N_BITS)]
    discrete = [i % 5 in (1, 2) for i in range(N_BITS)]
    holding = [(i * 257 + 3) & 0xFFFF for i in range(N_REGISTERS)]
    inputs = [(0xFFFF - i * 13) & 0xFFFF for i in range(N_REGISTERS)]
    return coils, discrete, holding, inputs


def rtu_request_length(buf):
    """Length of the RTU request starting `buf` (None: need more bytes)."""
    if len(buf) < 2:
        return None
    fc = buf[1]
    if fc in (15, 16):
        return None if len(buf) < 7 else 9 + buf[6]
    return 8


def new_pty():
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    return master, slave, os.ttyname(slave)


def close_fds(*fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# === umodbus ==================================================================================

class UmodbusStore:
    """umodbus route functions over plain lists; `data` is what the server holds."""

    def __init__(self, unit=1):
        self.unit = unit
        self.coils, self.discrete, self.holding, self.inputs = initial_data()

    def install(self, app):
        units = [self.unit]
        bits = list(range(N_BITS))
        regs = list(range(N_REGISTERS))

        @app.route(slave_ids=units, function_codes=[1, 5, 15], addresses=bits)
        def coils(slave_id, function_code, address, value=None):
            if function_code == 1:
                return int(self.coils[address])
            self.coils[address] = bool(value)
            return None

        @app.route(slave_ids=units, function_codes=[2], addresses=bits)
        def discrete(slave_id, function_code, address):
            return int(self.discrete[address])

        @app.route(slave_ids=units, function_codes=[3, 6, 16], addresses=regs)
        def holding(slave_id, function_code, address, value=None):
            if function_code == 3:
                return self.holding[address]
            self.holding[address] = value
            return None

        @app.route(slave_ids=units, function_codes=[4], addresses=regs)
        def inputs(slave_id, function_code, address):
            return self.inputs[address]

    def coils_at(self, address, count):
        return self.coils[address:address + count]

    def holding_at(self, address, count):
        return self.holding[address:address + count]


class UmodbusTcp:
    """umodbus's Modbus TCP server (socketserver, threaded)."""

    def __init__(self):
        self.store = UmodbusStore()

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True

        self.server = umodbus_tcp_server(Server, ("127.0.0.1", 0), RequestHandler)
        self.store.install(self.server)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(2)


class _NoPort:
    """umodbus's RTUServer wants a serial port object; we feed it frames ourselves."""

    baudrate = 19200
    timeout = 0
    inter_byte_timeout = 0


class UmodbusRtuApp:
    """umodbus's RTU server logic (`RTUServer.process`: CRC check, routing, response ADU)."""

    def __init__(self):
        self.store = UmodbusStore()
        self.app = umodbus_serial_server(RTUServer, _NoPort())
        self.store.install(self.app)

    def answer(self, request):
        return bytes(self.app.process(bytes(request)))


class _ByteServer:
    """Serve an RTU-framed byte stream: read whole requests, write `handler(request)` actions.

    An action is bytes (written), a float (sleep that long), "close" or "reset".
    """

    def __init__(self, handler):
        self.handler = handler
        self._stop = threading.Event()

    def serve_stream(self, read, write, close=None, reset=None, framing="rtu"):
        buf = b""
        while not self._stop.is_set():
            data = read()
            if data is None:
                continue
            if data == b"":
                return
            buf += data
            while True:
                n = rtu_request_length(buf) if framing == "rtu" else mbap_request_length(buf)
                if n is None or len(buf) < n:
                    break
                request, buf = buf[:n], buf[n:]
                for action in self.handler(request) or ():
                    if isinstance(action, (bytes, bytearray)):
                        write(bytes(action))
                    elif isinstance(action, float):
                        self._stop.wait(action)
                    elif action == "close" and close:
                        close()
                        return
                    elif action == "reset" and reset:
                        reset()
                        return


def mbap_request_length(buf):
    if len(buf) < 6:
        return None
    return 6 + struct.unpack_from(">H", buf, 4)[0]


class PtyServer(_ByteServer):
    """Serves on the master side of a pty pair; the client opens `path` with pyserial.
    `pty`: a (master_fd, slave_path) pair from the `pty_pair` fixture, which then closes it."""

    def __init__(self, handler, pty=None):
        super().__init__(handler)
        if pty is None:
            self.master, self.slave, self.path = new_pty()
        else:
            (self.master, self.path), self.slave = pty, None
        self._own_fds = pty is None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _read(self):
        if not select.select([self.master], [], [], 0.02)[0]:
            return None
        try:
            return os.read(self.master, 512)
        except OSError:
            return None  # slave side not open (yet)

    def _write(self, data):
        os.write(self.master, data)

    def _run(self):
        self.serve_stream(self._read, self._write)

    def stop(self):
        self._stop.set()
        self.thread.join(2)
        if self._own_fds:
            close_fds(self.master, self.slave)


class SocketServer(_ByteServer):
    """Raw TCP server: one thread per connection, each served by `handler`. `port` 0: any free
    one; a given port is bound with SO_REUSEADDR (a new server behind an address in use)."""

    def __init__(self, handler, framing="rtu", port=0):
        super().__init__(handler)
        self.framing = framing
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(8)
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.threads = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            self.connections += 1
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, conn):
        conn.settimeout(0.02)

        def read():
            try:
                return conn.recv(512)
            except socket.timeout:
                return None
            except OSError:
                return b""

        def write(data):
            try:
                conn.sendall(data)
            except OSError:
                pass

        def reset():
            # SO_LINGER 0: close sends RST, the client sees "connection reset"
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

        try:
            self.serve_stream(read, write, close=conn.close, reset=reset, framing=self.framing)
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def stop(self):
        self._stop.set()
        self.thread.join(2)
        for t in self.threads:
            t.join(2)
        self.listener.close()


class SilentServer:
    """Accepts connections and reads requests but never answers nor closes: from the client's
    side a half-open link (the peer gone without a FIN) looks just like this."""

    def __init__(self):
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.conns = []
        self._stop = threading.Event()
        self._unlisten = threading.Event()
        self._unlistened = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop.is_set():
            if self._unlisten.is_set() and self.listener is not None:
                self.listener.close()  # closed here, never under a select() of this thread
                self.listener = None
                self._unlistened.set()
            ready = select.select(self.conns + [self.listener] * (self.listener is not None),
                                  [], [], 0.02)[0]
            for s in ready:
                if s is self.listener:
                    self.conns.append(s.accept()[0])
                    continue
                try:
                    s.recv(512)
                except OSError:
                    pass

    def stop_listening(self):
        """Free the port for another server; the accepted connections stay open and silent."""
        self._unlisten.set()
        self._unlistened.wait(2)

    def stop(self):
        self._stop.set()
        self.thread.join(2)
        for s in self.conns + [self.listener] * (self.listener is not None):
            s.close()


def umodbus_rtu_handler(app):
    return lambda request: [app.answer(request)]


# === pymodbus =================================================================================

class PymodbusServer:
    """A pymodbus 3.x server (TCP, RTU-over-TCP or serial RTU) in its own thread and event loop."""

    def __init__(self, kind="tcp", serial_path=None, unit=1, framer=None, identity=None):
        """`framer`: "ascii" for Modbus ASCII (serial or on TCP); `identity`: {object id: text}
        it answers FC 43 / MEI 14 with (pymodbus' ModbusDeviceIdentification)."""
        from pymodbus import FramerType
        from pymodbus.server import ModbusSerialServer, ModbusTcpServer
        from pymodbus.simulator import DataType, SimData, SimDevice

        coils, discrete, holding, inputs = initial_data()
        self.port = None
        if kind != "serial":
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
        ready = threading.Event()
        self.error = None

        def run():
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)

            async def main():
                device = SimDevice(id=unit, simdata=(
                    [SimData(0, values=coils, datatype=DataType.BITS)],
                    [SimData(0, values=discrete, datatype=DataType.BITS)],
                    [SimData(0, values=holding, datatype=DataType.REGISTERS)],
                    [SimData(0, values=inputs, datatype=DataType.REGISTERS)],
                ))
                ident = None
                if identity:
                    from pymodbus.pdu.device import ModbusDeviceIdentification
                    ident = ModbusDeviceIdentification(info=dict(identity))
                if kind == "serial":
                    self.server = ModbusSerialServer(
                        device, framer=FramerType.ASCII if framer == "ascii" else FramerType.RTU,
                        port=serial_path, baudrate=38400, timeout=0.05, identity=ident)
                else:
                    fr = FramerType.RTU if kind == "rtu-over-tcp" else FramerType.SOCKET
                    if framer == "ascii":
                        fr = FramerType.ASCII
                    self.server = ModbusTcpServer(device, framer=fr, address=("127.0.0.1", self.port),
                                                  identity=ident)
                await self.server.serve_forever(background=True)
                ready.set()
                await self.server.serving

            try:
                self.loop.run_until_complete(main())
            except Exception as e:  # surfaced by the fixture
                self.error = e
                ready.set()
            finally:
                self.loop.close()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(5)
        if self.error:
            raise self.error

    def get(self, function, address, count):
        """What the server holds (FC 1-4 view)."""
        fut = asyncio.run_coroutine_threadsafe(
            self.server.context.async_getValues(1, function, address, count), self.loop)
        return list(fut.result(2))

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.server.shutdown(), self.loop).result(2)
        self.thread.join(2)


class PtyBridge:
    """Two pty pairs joined master to master: a peer opens `peer_path`, the client `path`.
    Lets a server that opens a serial device by name (pymodbus) face our client on a real pty."""

    def __init__(self):
        self.m1, self.s1, self.path = new_pty()
        self.m2, self.s2, self.peer_path = new_pty()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        pairs = {self.m1: self.m2, self.m2: self.m1}
        while not self._stop.is_set():
            ready = select.select(list(pairs), [], [], 0.02)[0]
            for fd in ready:
                try:
                    data = os.read(fd, 512)
                except OSError:
                    continue  # other side not open yet
                os.write(pairs[fd], data)

    def stop(self):
        self._stop.set()
        self.thread.join(2)
        close_fds(self.m1, self.s1, self.m2, self.s2)


# === crafted answers ==========================================================================

def rtu(unit, pdu):
    return append_crc(bytes((unit,)) + bytes(pdu))


def mbap(tid, unit, pdu, pid=0, length=None):
    pdu = bytes(pdu)
    return struct.pack(">HHHB", tid, pid, len(pdu) + 1 if length is None else length, unit) + pdu
