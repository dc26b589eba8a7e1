"""CRC-16/MODBUS (Modbus over Serial Line v1.02, section 6.2.2 and appendix B).

Polynomial 0xA001 (reflected 0x8005), initial value 0xFFFF, no final XOR; the CRC goes on the
wire low byte first. A frame with its CRC appended has a CRC of 0 (the residue), which is how
`check` verifies a received ADU in one pass.

Speed: the classic loop does one table lookup per byte. Here two bytes are folded per step:
after XOR-ing the 16-bit little-endian word into the register, the register's next value depends
only on that 16-bit result, so a 65536-entry table replaces two byte steps by one lookup, and the
loop runs over the frame's words without copying them (`memoryview.cast`).

Memory vs speed: the table is built lazily on the first CRC (TCP-only agents never pay). As a
list it returns existing ints instead of boxing one per lookup, which makes the loop ~1.6x
faster than the compact `array('H')` (128 KiB), but it costs 1.3 MB on a 32-bit router (2.5 MB on
64-bit; tracemalloc under qemu-mipsel, tools/cross-test): on a RUT200 that was a third of the
agent's Python heap, while a bus saturated at 115200 baud needs < 2% of the router's CPU for its
CRCs with the array (9600 baud: < 0.2%). So the agent builds the array on a small machine (a
32-bit interpreter, or less than 1 GiB of RAM for the process: `small_host`) and the list elsewhere.

Byte order: `cast('H')` reads words in host order. On a big-endian host (MIPS routers) a word is
`b0 << 8 | b1`, so the table is built for the byte-swapped register instead: the register is kept
swapped during the loop (0xFFFF is its own swap) and swapped back at the end. No per-frame
byteswap is needed on either kind of host.
"""
import sys
from array import array

POLY = 0xA001
INIT = 0xFFFF


def byte_table():
    """The 256-entry one-byte table (the spec's CRC table, as one 16-bit word per index)."""
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ POLY if crc & 1 else crc >> 1
        table.append(crc)
    return table


TABLE8 = byte_table()


def word_table(byteorder=sys.byteorder, as_list=False, _t8=TABLE8):
    """The 65536-entry table for one lookup per 16-bit word, in `byteorder`'s word order.

    For x = register ^ (b0 | b1 << 8), two byte steps give
    T[lo] >> 8 ^ T[(hi ^ T[lo]) & 0xFF] with lo, hi the bytes of x. Built row by row
    (fixed hi) from the byte table: 65536 cheap steps, no bit loop.
    """
    if byteorder == "little":
        values = [(t >> 8) ^ _t8[hi ^ (t & 0xFF)] for hi in range(256) for t in _t8]
    else:
        # index and value both byte-swapped: table[swap(x)] = swap(T16[x])
        values = [0] * 65536
        for hi in range(256):
            for lo in range(256):
                t = _t8[lo]
                v = (t >> 8) ^ _t8[hi ^ (t & 0xFF)]
                values[lo << 8 | hi] = ((v & 0xFF) << 8) | (v >> 8)
    # the list is returned as built (no second copy at start-up on a small router)
    return values if as_list else array("H", values)


def make_crc16(byteorder=sys.byteorder, compact=False):
    """Build a `crc16(data) -> int` for a host of `byteorder`.

    The agent uses the host's order; tests build the other one and feed it words read in that
    order, to prove the big-endian path on a little-endian machine. `compact` keeps the table
    as `array('H')` (128 KiB, slower lookups) instead of a list (1.3 MB on 32-bit, 2.5 MB on
    64-bit).
    """
    t16 = word_table(byteorder, as_list=not compact)
    t8 = TABLE8
    native = byteorder == sys.byteorder

    if native:
        def words(data, even):
            return memoryview(data)[:even].cast("H")
    else:
        def words(data, even):
            a = array("H")
            a.frombytes(bytes(data[:even]))
            a.byteswap()
            return a

    swapped = byteorder == "big"

    def crc16(data, _t16=t16, _t8=t8, _words=words, _swapped=swapped):
        """CRC-16/MODBUS of `data` (bytes-like) as an int; the wire order is `crc & 0xFF, crc >> 8`."""
        n = len(data)
        even = n & ~1
        crc = INIT
        if even:
            for w in _words(data, even):
                crc = _t16[crc ^ w]
            if _swapped:
                crc = ((crc & 0xFF) << 8) | (crc >> 8)
        if n & 1:
            crc = (crc >> 8) ^ _t8[(crc ^ data[even]) & 0xFF]
        return crc

    return crc16


def small_host(meminfo="/proc/meminfo", maxsize=sys.maxsize, cgroup="/proc/self/cgroup", root="/sys/fs/cgroup"):
    """True on a 32-bit interpreter, or where this process may use less than 1 GiB of RAM (the
    machine's MemTotal, or its cgroup's memory limit, v1 or v2): there the word table is the
    compact array."""
    if maxsize <= 2 ** 32:
        return True
    limits = []
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(cgroup) as f:
            for line in f:
                _id, controllers, path = line.rstrip("\n").split(":", 2)
                if controllers == "":           # v2: memory.max, "max" when unlimited
                    name = "%s%s/memory.max" % (root, path.rstrip("/"))
                elif "memory" in controllers.split(","):
                    name = "%s/memory%s/memory.limit_in_bytes" % (root, path.rstrip("/"))
                else:
                    continue
                try:
                    with open(name) as g:
                        text = g.read().strip()
                except OSError:
                    continue
                if text.isdigit():
                    limits.append(int(text))
    except (OSError, ValueError):
        pass
    return bool(limits) and min(limits) < (1 << 30)


_crc16 = None


def crc16(data):
    """CRC-16/MODBUS of `data` (bytes-like) as an int; the wire order is `crc & 0xFF, crc >> 8`.
    Builds the word table on first use (compact on a small host)."""
    global _crc16
    if _crc16 is None:
        _crc16 = make_crc16(compact=small_host())
    return _crc16(data)


def crc16_bytes(data):
    """The two CRC bytes as sent on the wire (low byte first)."""
    crc = crc16(data)
    return bytes((crc & 0xFF, crc >> 8))


def append_crc(data):
    """`data` + its CRC: an RTU ADU from unit id + PDU."""
    crc = crc16(data)
    return bytes(data) + bytes((crc & 0xFF, crc >> 8))


def check(adu):
    """True when `adu` (including its trailing CRC) is intact: the CRC residue is 0."""
    return crc16(adu) == 0


def crc16_bytewise(data, _t8=TABLE8):
    """The plain one-byte-table loop (reference for tests and the benchmark)."""
    crc = INIT
    for b in data:
        crc = (crc >> 8) ^ _t8[(crc ^ b) & 0xFF]
    return crc
