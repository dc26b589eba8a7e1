"""`modbus-collector [-c FILE] [--listen HOST:PORT] [--db URL] [--workers N]`: the stdlib server.

A threaded wsgiref server with HTTP/1.1 keep-alive (agents reuse their connection); with
--workers N, N forked processes accept on one socket (parsing and validation then use several
cores). The same app also runs under gunicorn or waitress (see agent/collector/__init__.py).
Exit codes: 0 stopped, 2 bad configuration or usage, 1 could not start.
"""
import argparse
import logging
import signal
import socket
import socketserver
import sys
import threading
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer

from agent import __version__

log = logging.getLogger("modbus.collector")
DRAIN_MAX = 64 << 20


class _Handler(ServerHandler):
    http_version = "1.1"
    _keep = False

    def cleanup_headers(self):
        # Decided here, before the headers go out, so the client is told `Connection: close`.
        # wsgiref's ServerHandler closes after every request: keep the connection when the
        # response has a length, the client did not ask to close, and the server has slots to
        # spare. When free slots run low, connections close after their answer so the slots
        # turn over: agents that post more often than the idle timeout would otherwise keep
        # theirs forever, and every agent beyond max_connections would get 503 forever.
        super().cleanup_headers()
        rh = self.request_handler
        self._keep = ("Content-Length" in self.headers and rh.request_version == "HTTP/1.1"
                      and not rh.close_connection
                      and self.environ.get("HTTP_CONNECTION", "").lower() != "close"
                      and not rh.server.slots_low())
        if not self._keep and "Connection" not in self.headers:
            self.headers["Connection"] = "close"

    def close(self):
        if not self._keep:
            self.request_handler.close_connection = True
        super().close()


class _Body:
    """wsgi.input that stops at Content-Length and knows how much the app left unread."""

    def __init__(self, rfile, length):
        self._rfile = rfile
        self.remaining = length

    def read(self, size=-1):
        if size is None or size < 0 or size > self.remaining:
            size = self.remaining
        data = self._rfile.read(size) if size else b""
        self.remaining -= len(data)
        if size and not data:
            self.remaining = 0
        return data

    def readline(self, size=-1):
        if size is None or size < 0 or size > self.remaining:
            size = self.remaining
        data = self._rfile.readline(size) if size else b""
        self.remaining -= len(data)
        return data

    def __iter__(self):
        while self.remaining:
            line = self.readline()
            if not line:
                return
            yield line


class RequestHandler(WSGIRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60  # idle keep-alive connections go away
    wbufsize = 1 << 16  # status line, headers and body leave in one send (see also TCP_NODELAY)

    def setup(self):
        super().setup()
        # Without this, Nagle + the client's delayed ACK add 40 ms to every small answer.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle(self):
        self.close_connection = True
        self.handle_one_request()
        while not self.close_connection:
            self.handle_one_request()

    def handle_one_request(self):
        self.raw_requestline = self.rfile.readline(65537)
        if not self.raw_requestline:
            self.close_connection = True
            return
        if len(self.raw_requestline) > 65536:
            self.requestline = ""
            self.request_version = ""
            self.command = ""
            self.send_error(414)
            self.close_connection = True
            self.wfile.flush()
            return
        if not self.parse_request():
            self.close_connection = True
            self.wfile.flush()
            return
        environ = self.get_environ()
        try:
            length = max(0, int(environ.get("CONTENT_LENGTH") or 0))
        except ValueError:
            length = 0
            self.close_connection = True
        body = _Body(self.rfile, length)
        handler = _Handler(body, self.wfile, self.get_stderr(), environ,
                           multithread=True, multiprocess=False)
        handler.request_handler = self
        handler.run(self.server.get_app())
        if body.remaining and not self.close_connection:
            # The app answered without reading the body (413, 401). Read and drop the rest: closing
            # with unread data makes the kernel send RST, and the client may then never see the
            # 413 it needs to split its batch. Bodies beyond DRAIN_MAX are not worth reading.
            if body.remaining > DRAIN_MAX:
                self.close_connection = True
            else:
                while body.remaining and body.read(min(body.remaining, 1 << 20)):
                    pass
        self.wfile.flush()

    def log_message(self, format, *args):
        log.debug("%s %s", self.address_string(), format % args)

    def log_request(self, code="-", size="-"):
        log.debug('%s "%s" %s', self.address_string(), self.requestline, code)


_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 5\r\n"
         b"Connection: close\r\nContent-Length: 59\r\n\r\n"
         b'{"error":"too many connections","where":"max_connections"}\n')


class Server(socketserver.ThreadingMixIn, WSGIServer):
    """One thread per connection, at most max_connections at once: beyond that a client gets an
    immediate 503 (its uploader backs off) instead of a thread, so idle or slow connections
    cannot use up the process. Keep-alive only while at least `keepalive_min_free` slots are
    free (10 %, at least 2); below that every answer closes its connection (see _Handler)."""
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, handler, max_connections=200):
        self.max_connections = max_connections
        self.keepalive_min_free = max(2, -(-max_connections // 10))
        self._free = max_connections
        self._free_lock = threading.Lock()
        super().__init__(address, handler)

    def slots_low(self):
        return self._free < self.keepalive_min_free

    def _take_slot(self):
        with self._free_lock:
            if self._free <= 0:
                return False
            self._free -= 1
            return True

    def _give_slot(self):
        with self._free_lock:
            self._free += 1

    def process_request(self, request, client_address):
        if not self._take_slot():
            try:
                request.sendall(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._give_slot()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._give_slot()


def make_server(host, port, app, max_connections=200):
    server = Server((host, port), RequestHandler, max_connections)
    server.set_app(app)
    return server


def build_parser():
    p = argparse.ArgumentParser(prog="modbus-collector", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version="modbus-collector %s" % __version__)
    p.add_argument("-c", "--config", metavar="FILE", help="collector INI file (default: built-in, open, local)")
    p.add_argument("--listen", metavar="HOST:PORT", help="override [collector] listen")
    p.add_argument("--db", metavar="URL", help="override [collector] db (a file path, sqlite:///path or "
                   "postgresql://...)")
    p.add_argument("--open-writes", action="store_true", default=None,
                   help="override [collector] open_writes: beyond loopback, accept writes without tokens")
    p.add_argument("--open-reads", action="store_true", default=None,
                   help="override [collector] open_reads: beyond loopback, answer reads without read_token")
    p.add_argument("--log-level", default=None, help="override [collector] log_level")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="override [collector] workers: processes sharing the listening socket")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from agent.collector import make_app
    from agent.collector.config import ConfigError, check_access, load_config, parse_listen, redact

    try:
        cfg = load_config(args.config, listen=args.listen, db=args.db, log_level=args.log_level,
                          open_writes=args.open_writes, open_reads=args.open_reads)
        host, port = parse_listen(cfg.listen)
        warnings = check_access(cfg)
    except (ConfigError, ValueError) as e:
        print("modbus-collector: %s" % redact(e), file=sys.stderr)
        return 2
    logging.basicConfig(level=getattr(logging, cfg.log_level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for w in warnings:
        log.warning("%s", w)
    workers = args.workers or cfg.workers
    try:
        if workers > 1:
            server = Server((host, port), RequestHandler, cfg.max_connections)
            server.socket.setblocking(False)  # workers race for accept(); losers must not block in it
            make_app(cfg, retention_days=0).close()  # migrate once, before forking; fail early
            app = None
        else:
            app = make_app(cfg)
            server = make_server(host, port, app, cfg.max_connections)
    except Exception as e:
        log.error("cannot start: %s", redact(e))
        return 1

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    log.info("modbus-collector %s listening on http://%s:%d, storing in %s%s", __version__, host,
             server.server_address[1], redact(cfg.db),
             " (%d worker processes)" % workers if workers > 1 else "")
    if workers > 1:
        return _prefork(server, cfg, workers)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        app.close()
        log.info("stopped")
    return 0


def _worker(server, cfg, k):
    """A forked worker: its own app and database connections, the parent's listening socket."""
    from agent.collector import make_app

    code = 0
    app = None
    try:
        app = make_app(cfg, retention_days=0 if k else None)  # retention runs in worker 0 only
        server.set_app(app)
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    except Exception:
        import traceback

        from agent.collector.config import redact

        log.error("worker %d failed:\n%s", k, redact(traceback.format_exc()).rstrip())
        code = 1
    finally:
        if app is not None:
            app.close()
    return code


def _prefork(server, cfg, workers):
    import os
    import time

    children = {}

    def spawn(k):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _worker(server, cfg, k)
            finally:
                os._exit(code)
        children[pid] = k

    try:
        for k in range(workers):
            spawn(k)
        while True:
            pid, status = os.wait()
            k = children.pop(pid, None)
            if k is not None:
                log.error("worker %d (pid %d) exited with status %d; starting a new one", k, pid, status)
                time.sleep(1.0)
                spawn(k)
    except KeyboardInterrupt:
        pass
    finally:
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for pid in list(children):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        server.server_close()
        log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
