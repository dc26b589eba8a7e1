"""HTTP/1.1 request framing (RFC 9112), pure: bytes in, a parsed head or a decoded body out.

No sockets and no clock here: the server (agent/collector/server.py) feeds what it has read
and acts on the result. Strict where leniency lets two parsers disagree about where a request
ends (request smuggling): CRLF line ends only, no whitespace before a colon, no obs-fold, no
control characters. Framing follows RFC 9112 §6: Content-Length is plain digits, given once;
`Transfer-Encoding: chunked` bodies are decoded with the decoded size capped while they arrive;
both at once, an HTTP/1.0 Transfer-Encoding, any other coding, or a malformed chunk raise Refuse
(400 or 501), after which the server closes the connection, so no byte of a refused body is
ever read as a request.
"""
import json
import re

MAX_HEAD = 64 << 10          # request line + headers
MAX_CHUNK_LINE = 4096        # a chunk-size line with its extensions
MAX_TRAILERS = 8 << 10

_HEAD_END = re.compile(rb"\r?\n\r?\n")
# all used with fullmatch
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_DIGITS = re.compile(rb"[0-9]{1,18}")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?")
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
_CTL_IN_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")   # HTAB is allowed in field values
_CTL_IN_TARGET = re.compile(rb"[\x00-\x20\x7f]")

_REASONS = {100: "Continue", 400: "Bad Request", 408: "Request Timeout", 413: "Payload Too Large",
            414: "URI Too Long", 417: "Expectation Failed", 431: "Request Header Fields Too Large",
            501: "Not Implemented", 503: "Service Unavailable", 505: "HTTP Version Not Supported"}


class Refuse(Exception):
    """The server refuses the request before the app sees it; the connection closes after the answer."""

    def __init__(self, status, error, where, headers=()):
        super().__init__(error)
        self.status, self.error, self.where, self.headers = status, error, where, list(headers)


def error_answer(status, error, where, headers=()):
    """The bytes of a JSON error answer with `Connection: close` (the app's {"error", "where"} shape)."""
    body = (json.dumps({"error": error, "where": where}, ensure_ascii=True) + "\n").encode("ascii")
    lines = ["HTTP/1.1 %d %s" % (status, _REASONS.get(status, "Error")), "Content-Type: application/json",
             "Content-Length: %d" % len(body), "Connection: close"]
    lines += ["%s: %s" % h for h in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body



def take_head(buf, scan=0):
    """The request head's bytes (up to, without, the empty line), removed from `buf` (a
    bytearray) with that line, or None while it is incomplete; Refuse 414/431 once `buf` holds
    more than MAX_HEAD bytes without one. `scan`: how much of `buf` was searched before (a head
    arriving byte by byte is scanned once, not once per byte)."""
    m = _HEAD_END.search(buf, max(0, scan - 3), MAX_HEAD + 4)
    if m is None:
        if len(buf) > MAX_HEAD:
            nl = buf.find(b"\n")
            if nl < 0 or nl > MAX_HEAD:
                raise Refuse(414, "request line longer than %d bytes" % MAX_HEAD, "request line")
            raise Refuse(431, "request head longer than %d bytes" % MAX_HEAD, "head")
        return None
    raw = bytes(buf[:m.start()])
    del buf[:m.end()]
    return raw


class Head:
    """A parsed request head: method, target, version (1, x), headers as [(lower-case name, value)]."""
    __slots__ = ("method", "target", "version", "headers")

    def __init__(self, method, target, version, headers):
        self.method, self.target, self.version, self.headers = method, target, version, headers

    def values(self, name):
        return [v for k, v in self.headers if k == name]


def parse_head(data):
    """The head's bytes (up to, without, the empty line) -> Head, or Refuse. Strict where leniency
    lets two parsers disagree about where a request ends (RFC 9112 §2.2, §5): CRLF line ends only,
    no whitespace before the colon, no obs-fold, no control characters."""
    bare = data.replace(b"\r\n", b"")
    if b"\n" in bare or b"\r" in bare:
        raise Refuse(400, "line endings in the request head must be CRLF", "head")
    lines = data.split(b"\r\n")
    while lines and lines[0] == b"":  # RFC 9112 §2.2: empty lines before the request line are ignored
        lines.pop(0)
    if not lines:
        raise Refuse(400, "empty request", "request line")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise Refuse(400, "malformed request line %r" % lines[0][:100].decode("latin-1"), "request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise Refuse(400, "malformed method", "request line")
    m = _VERSION.fullmatch(version)
    if not m:
        raise Refuse(400, "malformed HTTP version %r" % version[:20].decode("latin-1"), "request line")
    if m.group(1) != b"1":
        raise Refuse(505, "only HTTP/1.x is supported", "request line")
    if _CTL_IN_TARGET.search(target):
        raise Refuse(400, "control character or space in the request target", "request line")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            if line[:1] in (b" ", b"\t"):
                raise Refuse(400, "obsolete line folding in the request head", "head")
            raise Refuse(400, "malformed header line %r" % line[:60].decode("latin-1"), "head")
        value = value.strip(b" \t")
        if _CTL_IN_VALUE.search(value):
            raise Refuse(400, "control character in header %s" % name.decode("ascii"), name.decode("ascii"))
        headers.append((name.decode("ascii").lower(), value.decode("latin-1")))
    return Head(method.decode("ascii"), target.decode("latin-1"), (1, int(m.group(2))), headers)


def body_framing(head):
    """('length', n), ('chunked', None) or ('none', 0) for a request head, or Refuse
    (RFC 9112 §6.1, §6.3): anything ambiguous is 400 and closes the connection."""
    te = head.values("transfer-encoding")
    cl = head.values("content-length")
    if te:
        if head.version < (1, 1):
            raise Refuse(400, "Transfer-Encoding in an HTTP/1.0 request", "Transfer-Encoding")
        if cl:
            raise Refuse(400, "both Content-Length and Transfer-Encoding: ambiguous framing", "Transfer-Encoding")
        codings = [c.strip().lower() for c in ",".join(te).split(",")]
        if codings[-1:] != ["chunked"]:
            raise Refuse(400, "Transfer-Encoding %r does not end with chunked" % ",".join(te)[:60],
                         "Transfer-Encoding")
        if len(codings) > 1:
            raise Refuse(501, "unsupported Transfer-Encoding %r (only chunked)" % ",".join(te)[:60],
                         "Transfer-Encoding")
        return "chunked", None
    if cl:
        if len(cl) > 1:
            raise Refuse(400, "Content-Length given %d times" % len(cl), "Content-Length")
        raw = cl[0].encode("latin-1")
        if not _DIGITS.fullmatch(raw):
            raise Refuse(400, "Content-Length must be plain digits, got %r" % cl[0][:40], "Content-Length")
        return "length", int(raw)
    return "none", 0


class Chunked:
    """Incremental decoder of a chunked body (RFC 9112 §7.1) with a cap on the decoded size."""

    def __init__(self, cap):
        self.cap = cap
        self.parts = []
        self.size = 0
        self._state = "size"
        self._left = 0
        self._trailer = 0

    def feed(self, buf):
        """Consume what it can of `buf` (a bytearray, consumed in place); True once the last chunk
        and the trailers are in. Refuse on bad framing (400) or beyond the cap (413)."""
        while True:
            if self._state == "data":
                if not buf:
                    return False
                take = min(self._left, len(buf))
                self.parts.append(bytes(buf[:take]))
                del buf[:take]
                self._left -= take
                if self._left:
                    return False
                self._state = "crlf"
            if self._state == "crlf":
                if len(buf) < 2:
                    return False
                if buf[:2] != b"\r\n":
                    raise Refuse(400, "chunk data not followed by CRLF", "body: chunk framing")
                del buf[:2]
                self._state = "size"
            i = buf.find(b"\r\n")
            limit = MAX_CHUNK_LINE if self._state == "size" else MAX_TRAILERS - self._trailer
            if i < 0:
                if len(buf) > limit:
                    raise Refuse(400, "chunk-size line or trailers too long", "body: chunk framing")
                if b"\n" in buf:
                    raise Refuse(400, "chunk framing line not ended by CRLF", "body: chunk framing")
                return False
            if i > limit:
                raise Refuse(400, "chunk-size line or trailers too long", "body: chunk framing")
            line = bytes(buf[:i])
            del buf[:i + 2]
            if self._state == "size":
                m = _CHUNK_SIZE.fullmatch(line)
                if not m:
                    raise Refuse(400, "malformed chunk size %r" % line[:40].decode("latin-1"),
                                 "body: chunk framing")
                n = int(m.group(1), 16)
                if self.size + n > self.cap:
                    raise Refuse(413, "body exceeds max_body_bytes %d" % self.cap, "body")
                if n == 0:
                    self._state = "trailer"
                else:
                    self._state, self._left = "data", n
                    self.size += n
            else:  # trailer section: fields ignored (never merged into the head), up to the empty line
                if not line:
                    return True
                if b"\n" in line or b"\r" in line or b":" not in line:
                    raise Refuse(400, "malformed trailer field", "body: chunk framing")
                self._trailer += len(line) + 2
                if self._trailer > MAX_TRAILERS:
                    raise Refuse(400, "trailers too long", "body: chunk framing")

    def body(self):
        return b"".join(self.parts)

