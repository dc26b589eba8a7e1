"""Byte links under the RTU clients (a serial port, a TCP socket) and opening a TCP connection.

A link reads what is there within a timeout (`read_some`), writes a whole request, drops
stale input and closes; every failure is ConnectionLost naming the port or host.
"""
import os
import select
import socket

from agent.modbus.errors import ConnectionLost

try:
    import termios
    # pyserial lets termios.error (not an OSError) through from tcflush/tcdrain
    SERIAL_ERRORS = (OSError, ValueError, termios.error)
except ImportError:  # pragma: no cover - not a POSIX host
    SERIAL_ERRORS = (OSError, ValueError)

#: bytes asked of the kernel per read
RECV_SIZE = 4096


def open_tcp(host, port, connect_timeout):
    """A TCP connection to a device or gateway, Nagle off (requests are small and answered at
    once); ConnectionLost naming host:port when it cannot be made."""
    try:
        sock = socket.create_connection((host, port), connect_timeout)
    except socket.timeout:
        raise ConnectionLost(f"connect to {host}:{port} timed out after {connect_timeout:g} s") from None
    except OSError as e:
        raise ConnectionLost(f"connect to {host}:{port} failed: {e.strerror or e}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def open_serial(path, baudrate, parity, bytesize, stopbits):
    """An exclusive, non-blocking pyserial port; ConnectionLost naming the port when it cannot
    be opened. pyserial is imported here so TCP-only agents never load it."""
    try:
        import serial
        return serial.Serial(path, baudrate=baudrate, parity=parity, bytesize=bytesize,
                             stopbits=stopbits, timeout=0, exclusive=True)
    except ImportError:
        raise ConnectionLost("pyserial is not installed") from None
    except SERIAL_ERRORS as e:
        raise ConnectionLost(f"open {path} failed: {e}") from None


class FdLink:
    """Byte link on a file descriptor: select() for the timeout, then one read."""

    def __init__(self, fd, where):
        self.fd = fd
        self.where = where

    def read_some(self, n, timeout):
        try:
            ready = select.select((self.fd,), (), (), timeout)[0]
            if not ready:
                return b""
            data = self._read(n)
        except OSError as e:
            raise ConnectionLost(f"{self.where}: read failed: {e.strerror or e}") from None
        if not data:
            raise ConnectionLost(f"{self.where}: closed (read returned nothing)")
        return data

    def drop_input(self):
        try:
            while select.select((self.fd,), (), (), 0)[0]:
                if not self._read(RECV_SIZE):
                    raise ConnectionLost(f"{self.where}: closed")
        except OSError as e:
            raise ConnectionLost(f"{self.where}: read failed: {e.strerror or e}") from None


class SerialLink(FdLink):
    def __init__(self, serial_port, where):
        super().__init__(serial_port.fileno(), where)
        self.port = serial_port

    def _read(self, n):
        return os.read(self.fd, n)

    def write(self, data):
        try:
            self.port.write(data)
            self.port.flush()  # tcdrain: the answer's timeout starts when the request is out
        except SERIAL_ERRORS as e:
            raise ConnectionLost(f"{self.where}: write failed: {e}") from None

    def drop_input(self):
        try:
            self.port.reset_input_buffer()
        except SERIAL_ERRORS as e:
            raise ConnectionLost(f"{self.where}: {e}") from None
        super().drop_input()

    def close(self):
        try:
            self.port.close()
        except SERIAL_ERRORS:
            pass


class SocketLink(FdLink):
    def __init__(self, sock, where):
        super().__init__(sock.fileno(), where)
        self.sock = sock

    def _read(self, n):
        return self.sock.recv(n)

    def write(self, data):
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise ConnectionLost(f"{self.where}: send failed: {e.strerror or e}") from None

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
