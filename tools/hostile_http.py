"""A hostile HTTP server for the uploader's tests and benchmarks: answers every POST with a
dribbled, huge, endless or inflating answer (issue 10). Loopback only, bounded in time.

    h = Hostile("dribble_head", every=0.2)      # agent's [upload] url -> h.url
    h.answering.wait(10); ...; h.close()
"""
import gzip
import socket
import threading
import time

OK = b'{"stored": 1, "duplicates": 0, "max_seq": 1}'


class Hostile:
    """A raw-socket HTTP server: reads each request (head and Content-Length body), then answers
    as `mode` says. The first `ok_first` requests get a normal collector answer.

      dribble_head  the status line and headers, one byte every `every` s
      dribble_body  headers at once, Content-Length 200, then the body one byte every `every` s
      huge          Content-Length `size`, then that many spaces (JSON whitespace) at full speed
      chunked       Transfer-Encoding: chunked, 64 KiB chunks of spaces, no last chunk (`size` bytes,
                    then the connection closes)
      gzip          Content-Encoding: gzip, a small body inflating to `size` spaces
    Whatever it sends, it stops after `duration` s (tests stay bounded on the old code too)."""

    def __init__(self, mode, every=0.2, size=64_000_000, duration=8.0, ok_first=0):
        self.mode, self.every, self.size, self.duration, self.ok_first = mode, every, size, duration, ok_first
        self.requests = 0
        self.answering = threading.Event()    # a hostile answer has started
        self.stop = threading.Event()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.05)
        self.url = "http://127.0.0.1:%d/api/v1/batches" % self.sock.getsockname()[1]
        self.gz = gzip.compress(b" " * size, 9) if mode == "gzip" else None
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def close(self):
        self.stop.set()
        for t in list(self.threads):
            t.join(timeout=5)
        self.sock.close()

    def _accept(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, conn):
        f = conn.makefile("rb")
        try:
            while not self.stop.is_set():
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = f.readline(65537)
                    if not line:
                        return
                    head += line
                n = 0
                for h in head.split(b"\r\n"):
                    if h.lower().startswith(b"content-length:"):
                        n = int(h.split(b":", 1)[1])
                f.read(n)
                self.requests += 1
                if self.requests <= self.ok_first:
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(OK), OK))
                    continue
                self.answering.set()
                self._hostile(conn)
                return
        except OSError:
            return
        finally:
            f.close()
            conn.close()

    def _hostile(self, conn):
        end = time.monotonic() + self.duration
        if self.mode in ("dribble_head", "dribble_body"):
            if self.mode == "dribble_head":
                out = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + b"X-Pad: %s\r\n" % (b"a" * 500)
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n")
                out = b" " * 200
            for i in range(len(out)):
                if self.stop.wait(self.every) or time.monotonic() > end:
                    return
                conn.sendall(out[i:i + 1])
            return
        if self.mode == "huge":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % self.size)
            block, left = b" " * 65536, self.size
            while left > 0 and not self.stop.is_set() and time.monotonic() < end:
                conn.sendall(block[:left])
                left -= len(block)
            return
        if self.mode == "chunked":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
            chunk, sent = b"%x\r\n%s\r\n" % (65536, b" " * 65536), 0
            # never a last chunk; `size` bytes at most so an old agent reading it all stays bounded
            while sent < self.size and not self.stop.is_set() and time.monotonic() < end:
                conn.sendall(chunk)
                sent += 65536
            return
        if self.mode == "gzip":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(self.gz), self.gz))
            return
        raise AssertionError(self.mode)
