"""One request's total deadline, and the bounded read of its answer.

`[upload] timeout` is the TOTAL time of one request (connect, send, headers, body), whatever the
server does. requests' own timeout is per socket read: a server (or proxy) that dribbles one byte
a second would hold the single-threaded loop, and SIGTERM, forever. `Alarm` enforces it. The
answer is read up to ANSWER_MAX bytes: a larger one is an error naming its size (the batch stays
in the spool and goes again after the back-off), so a hostile or broken server cannot make the
agent buffer hundreds of MB on a 64 MB router.
"""
import re
import signal
import threading
import time
import zlib

# The collector's answer is one small JSON object ({"stored":..}, or an error naming a record,
# < 1 kB); a proxy's error page a few kB. 64 KiB holds any of them, and reading that much costs
# nothing on a 64 MB router; more is not an answer this agent can use.
ANSWER_MAX = 64 * 1024
_READ_CHUNK = 8192

_CAUSED_BY = re.compile(r"\(Caused by (\w+)\((.*)\)\)$")
_OBJECT_REPR = re.compile(r"<[^<>]*>(?:: |, )?")


class RequestDeadline(BaseException):
    """A request's total deadline (`[upload] timeout`) passed. A BaseException, like
    KeyboardInterrupt, on purpose: requests and urllib3 let it through their `except Exception`
    handlers, and urllib3 closes the connection it interrupted instead of pooling it (the
    well-trodden Ctrl-C path)."""


class AnswerTooLarge(Exception):
    pass




class Alarm:
    """The total deadline of one request: SIGALRM (setitimer, sub-second) in the main thread.

    Why a signal: the alternatives cannot bound everything. A per-read socket timeout is what
    requests has; shrinking it to the time left before each read would need a socket wrapper
    that http.client's header reading (readline on a makefile, line by line), urllib3's TLS
    wrapping and proxies all go through, and `stream=True` with deadline checks between chunks
    only covers the body. An interval timer interrupts whatever blocks (connect, TLS
    handshake, send, a dribbled header line, a body read) and the handler raises
    RequestDeadline in the main thread, where the agent's single loop runs.

    It must never fire into other code: the handler raises only while armed; leaving the
    block disarms first, then cancels the timer, then puts the previous handler (and any timer
    that was running, less the time spent) back. Outside the main thread (a test or a tool
    driving an Uploader from a thread) signals cannot be used: the deadline is then only
    checked between body chunks, on top of requests' per-read timeout."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
        self.armed = False
        self._old_handler = self._old_timer = None
        self._t0 = 0.0

    def _fire(self, signum, frame):
        if self.armed:
            self.armed = False
            raise RequestDeadline()

    def __enter__(self):
        if self.usable:
            self._t0 = time.monotonic()
            self._old_timer = signal.setitimer(signal.ITIMER_REAL, 0)
            self._old_handler = signal.signal(signal.SIGALRM, self._fire)
            self.armed = True
            signal.setitimer(signal.ITIMER_REAL, max(self.seconds, 1e-3))
        return self

    def __exit__(self, *exc):
        if self.usable:
            self.armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            old = self._old_handler
            signal.signal(signal.SIGALRM, old if old is not None else signal.SIG_DFL)
            delay, interval = self._old_timer
            if delay > 0:
                signal.setitimer(signal.ITIMER_REAL, max(1e-3, delay - (time.monotonic() - self._t0)), interval)
        return False



def read_answer(r, limit, deadline):
    """The answer's body, at most `limit` bytes (AnswerTooLarge beyond, naming the size), read
    in chunks with the deadline checked between them (the only bound outside the main thread).
    Content-Encoding gzip/deflate (asked for identity, but a proxy may still compress) is
    inflated with the same bound: a small compressed answer must not inflate into a huge one."""
    n = r.headers.get("Content-Length", "")
    if n.isdigit() and int(n) > limit:
        raise AnswerTooLarge("answer of %s bytes (Content-Length), more than the %d this agent reads: "
                              "not the collector's answer (a proxy, a wrong url?)" % (n, limit))
    enc = r.headers.get("Content-Encoding", "identity").strip().lower()
    if enc in ("gzip", "x-gzip"):
        inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif enc == "deflate":
        inflate = zlib.decompressobj()
    elif enc in ("", "identity"):
        inflate = None
    else:
        raise AnswerTooLarge("answer in Content-Encoding %r, which this agent does not read" % enc[:40])
    out = bytearray()
    while True:
        chunk = r.raw.read(_READ_CHUNK, decode_content=False)
        if not chunk:
            break
        if inflate is not None:
            chunk = inflate.decompress(chunk, limit + 1 - len(out))
        out += chunk
        if len(out) > limit or (inflate is not None and inflate.unconsumed_tail):
            raise AnswerTooLarge("answer of more than %d bytes%s: not the collector's answer (a proxy, a "
                                  "wrong url?)" % (limit, " (after inflating)" if inflate is not None else ""))
        if time.monotonic() > deadline:
            raise RequestDeadline()
    return bytes(out)


def short(e):
    """One line, without the noise urllib3 nests into connection errors: "HTTPConnectionPool(...):
    Max retries exceeded with url: ... (Caused by X(<object at 0x...>, 'what happened'))" becomes
    "X: what happened", so the cause (and the connect timeout used) is not cut off."""
    s = str(e).replace("\n", " ")
    m = _CAUSED_BY.search(s)
    if m:
        s = "%s: %s" % (m.group(1), _OBJECT_REPR.sub("", m.group(2)).strip("'\" "))
    return s[:200]

