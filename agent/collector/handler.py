"""Running the WSGI app for one complete request, on an app thread of the built-in server.

The I/O thread (agent/collector/server.py) hands over a connection whose head and whole body
are in memory; here they become a WSGI environ, wsgiref runs the app, and the answer goes out
with a deadline per flush (a client that stops reading costs a thread for body_timeout at most).
Whether the connection is kept for the next request is decided before the headers are sent
(_Handler.cleanup_headers), so the client is told `Connection: close` when it is not.
"""
import io
import logging
import queue
import sys
import threading
import traceback
from urllib.parse import unquote
from wsgiref.handlers import SimpleHandler

from agent import __version__

log = logging.getLogger("modbus.collector")

FLUSH_SIZE = 1 << 16  # the answer is sent in pieces of about this size


class _Out:
    """wsgiref's stdout: buffers, sends with a total deadline per flush (socket timeout), and turns
    any send failure into ConnectionAbortedError, which wsgiref takes as 'client went away'."""

    def __init__(self, sock):
        self.sock = sock
        self.parts, self.n = [], 0
        self.failed = None

    def write(self, data):
        self.parts.append(data)
        self.n += len(data)
        if self.n >= FLUSH_SIZE:
            self.flush()
        return len(data)

    def flush(self):
        if not self.parts or self.failed:
            return
        data = b"".join(self.parts)
        self.parts, self.n = [], 0
        try:
            self.sock.sendall(data)
        except OSError as e:
            self.failed = e
            raise ConnectionAbortedError(str(e)) from None



class _Handler(SimpleHandler):
    http_version = "1.1"
    server_software = "modbus-collector/%s" % __version__
    os_environ = {}  # wsgiref copies the server process's environment into every request: not here
    error_status = "500 Internal Server Error"
    error_headers = [("Content-Type", "application/json"), ("Content-Length", "44")]
    error_body = b'{"error":"internal error","where":"server"}\n'
    _keep = False

    def cleanup_headers(self):
        # Decided here, before the headers go out, so the client is told `Connection: close`.
        # Keep the connection when the response has a length, the client did not ask to close,
        # the whole body was read, and the server has slots to spare. When free slots run low,
        # connections close after their answer so the slots turn over: agents that post more
        # often than the idle timeout would otherwise keep theirs forever.
        super().cleanup_headers()
        c = self.request_handler
        self._keep = ("Content-Length" in self.headers and c.request_version == "HTTP/1.1"
                      and not c.close_connection and not c.unread
                      and "close" not in self.environ.get("HTTP_CONNECTION", "").lower()
                      and not c.server.slots_low())
        if not self._keep and "Connection" not in self.headers:
            self.headers["Connection"] = "close"

    def close(self):
        c = self.request_handler
        if not self._keep:
            c.close_connection = True
        if self.status and log.isEnabledFor(logging.DEBUG):
            log.debug('%s "%s %s" %s %d', c.ip, c.head.method, c.head.target[:200], self.status.split(" ", 1)[0],
                      self.bytes_sent)
        super().close()

    def log_exception(self, exc_info):
        from agent.collector.config import redact

        env = self.environ or {}
        log.error("%s %s from %s: the application failed:\n%s", env.get("REQUEST_METHOD"),
                  env.get("PATH_INFO"), env.get("REMOTE_ADDR"),
                  redact("".join(traceback.format_exception(*exc_info))).rstrip())
        self.request_handler.close_connection = True



def environ(c, server_name, server_port):
    """The WSGI environ of connection `c`'s parsed request (c.head; its body is wsgi.input)."""
    head = c.head
    path, _, query = head.target.partition("?")
    if path.startswith(("http://", "https://")):  # absolute-form (RFC 9112 §3.2.2)
        path = "/" + path.split("/", 3)[3] if path.count("/") >= 3 else "/"
    env = {"REQUEST_METHOD": head.method, "SCRIPT_NAME": "", "PATH_INFO": unquote(path, "iso-8859-1"),
           "QUERY_STRING": query, "SERVER_NAME": server_name, "SERVER_PORT": str(server_port),
           "SERVER_PROTOCOL": c.request_version, "SERVER_SOFTWARE": _Handler.server_software,
           "GATEWAY_INTERFACE": "CGI/1.1", "REMOTE_ADDR": c.ip, "REMOTE_PORT": str(c.addr[1]),
           "CONTENT_TYPE": "text/plain"}
    if c.unread:
        env["CONTENT_LENGTH"] = str(c.unread)
    elif c.framing != "none":
        env["CONTENT_LENGTH"] = str(len(c.body))
    for k, v in head.headers:
        if "_" in k:  # X_Token would alias X-Token (and Content_Length the length): dropped
            continue
        if k == "content-type":
            env["CONTENT_TYPE"] = v
            continue
        if k in ("content-length", "transfer-encoding"):  # the server's business, done above
            continue
        key = "HTTP_" + k.replace("-", "_").upper()
        env[key] = env[key] + "," + v if key in env else v
    return env


def serve(c, app, timeout, server_name, server_port):
    """Run `app` for the request of connection `c` and send its answer (blocking socket, `timeout`
    per flush) -> True when the connection may carry another request."""
    keep = False
    try:
        c.sock.settimeout(timeout)  # per flush of the answer: a stalled reader goes
        out = _Out(c.sock)
        handler = _Handler(io.BytesIO(c.body or b""), out, sys.stderr, environ(c, server_name, server_port),
                           multithread=True, multiprocess=False)
        handler.request_handler = c
        handler.run(app)
        if out.failed is None:
            out.flush()
        if out.failed is not None:
            log.info("%s %s from %s: answer not delivered (%s); connection closed", c.head.method,
                     c.head.target[:100], c.ip, out.failed)
            c.close_connection = True
        keep = not c.close_connection
    except Exception:
        log.error("%s: request failed:\n%s", c.ip, traceback.format_exc().rstrip())
    finally:
        c.body = None
    return keep


class Pool:
    """App threads, started when needed, up to `size`; they wait on one queue."""

    def __init__(self, size, work):
        self.size, self._work = size, work
        self._q = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0

    def submit(self, item):
        with self._lock:
            start = self._idle == 0 and self._threads < self.size
            if start:
                self._threads += 1
            else:
                self._idle -= 1  # this item is one idle thread's now
        self._q.put(item)
        if start:
            threading.Thread(target=self._run, name="collector-app", daemon=True).start()

    def _run(self):
        while True:
            item = self._q.get()
            if item is None:
                return
            try:
                self._work(item)
            finally:
                with self._lock:
                    self._idle += 1

    def stop(self):
        with self._lock:
            n = self._threads
            self._threads = 0
        for _ in range(n):
            self._q.put(None)
