"""A real HTTP webhook receiver on loopback for the alert tests and tools/bench/alerts.py: records
every POST (path, headers, JSON body, arrival time); can answer an error status or be down
(its port closed) and come back on the same port."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver:
    def __init__(self, port=0):
        self.got = []            # dicts: path, headers, body (parsed JSON), t (time.monotonic())
        self.status = 200        # what it answers
        self.delay = 0.0         # seconds before it answers (a slow webhook)
        self._cond = threading.Condition()
        self._server = None
        self.port = port
        self.start()

    def start(self):
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n)
                code = receiver.status
                if receiver.delay:
                    time.sleep(receiver.delay)
                if code < 300:
                    with receiver._cond:
                        receiver.got.append({"path": self.path, "headers": dict(self.headers),
                                             "body": json.loads(raw), "t": time.monotonic()})
                        receiver._cond.notify_all()
                body = b'{"ok":true}' if code < 300 else b'{"ok":false}'
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._server.handle_error = lambda request, address: None   # a sender killed mid-request
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self):
        """Down: the port refuses connections until start()."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def url(self, path="/hook"):
        return "http://127.0.0.1:%d%s" % (self.port, path)

    def bodies(self):
        with self._cond:
            return [g["body"] for g in self.got]

    def wait_for(self, n, timeout=10.0):
        """The first n messages, once there are n (or AssertionError after timeout)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.got) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("webhook got %d of %d messages: %r" % (
                        len(self.got), n, [g["body"] for g in self.got]))
                self._cond.wait(left)
            return [g["body"] for g in self.got[:n]]
