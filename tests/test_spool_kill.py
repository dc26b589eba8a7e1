"""SIGKILL at random moments while a real process appends, uploads (to a file) and acknowledges:
after every restart the seqs are contiguous, nothing acknowledged reappears, and at the end every
seq ever assigned was delivered, each seq always with the same record (never reused). With a
seq_file (small lease blocks, so kills land around its writes too), the same: the spool that wrote
the seq_file last goes on from its own floor (agent.spool.lease generations), no seq skipped.
Run with one output and with two (named cursors, each acknowledged on its own rhythm): every
output's view keeps all of the above."""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap

import pytest

from agent.spool import Spool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILLS = 8

CHILD = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, sys.argv[1])
    from agent.record import data_record
    from agent.spool import Spool
    spool_dir, delivered, acklog, run = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
    outputs = sys.argv[7].split(",")
    sp = Spool(spool_dir, "site7", segment_bytes=4096, max_bytes=64 << 20, fsync="interval",
               fsync_interval=0.02, seq_file=sys.argv[6] or None, seq_lease=50, outputs=outputs)
    dfd = {o: os.open(delivered + "." + o, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) for o in outputs}
    afd = {o: os.open(acklog + "." + o, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) for o in outputs}
    every = dict(zip(outputs, (37, 53)))    # each output on its own rhythm
    print("ready", flush=True)
    i = 0
    while True:
        i += 1
        sp.append(data_record("site7", 1795000000.0 + i, "meter1", 1, {"run": run, "i": i}))
        for o in outputs:
            if i % every[o] == 0:
                b = sp.peek(50, 1 << 20, output=o)
                # "Upload": the delivery is logged before the ack, as a collector stores before it answers.
                os.write(dfd[o], b"".join(x + b"\\n" for x in b.lines))
                sp.ack(b)
                os.write(afd[o], b"%d\\n" % b.last_seq)
        if i % 11 == 0:
            sp.tick()
""")


def read_lines(path):
    """Complete lines only: a SIGKILL can cut a multi-page write short."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    return data.split(b"\n")[:-1]


def remaining(spool_dir, seq_file, outputs):
    """-> ({output: seqs it has not acknowledged}, next seq)."""
    sp = Spool(spool_dir, "site7", seq_file=seq_file, seq_lease=50, outputs=outputs)
    seqs = {}
    for o in outputs:
        b = sp.peek(10 ** 6, 1 << 30, output=o)
        seqs[o] = b.seqs if b is not None else []
    nxt = sp.next_seq
    sp.close()
    return seqs, nxt


@pytest.mark.parametrize("outputs", [("http",), ("http", "mqtt")], ids=["one-output", "two-outputs"])
@pytest.mark.parametrize("with_seq_file", [False, True], ids=["no-seq-file", "seq-file"])
def test_sigkill_at_random_moments(tmp_path, with_seq_file, outputs):
    seq_file = str(tmp_path / "site7.seq") if with_seq_file else None
    rnd = random.Random(int.from_bytes(os.urandom(4), "big"))
    spool_dir, delivered, acklog = tmp_path / "spool", tmp_path / "delivered", tmp_path / "acks"
    last_next = 1
    for k in range(KILLS):
        p = subprocess.Popen([sys.executable, "-c", CHILD, ROOT, str(spool_dir), str(delivered),
                              str(acklog), "run%d" % k, seq_file or "", ",".join(outputs)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            assert p.stdout.readline() == b"ready\n"
            try:
                p.wait(timeout=rnd.uniform(0.02, 0.4))
            except subprocess.TimeoutExpired:
                pass
            assert p.poll() is None, "the appender died on its own"
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=30)
            p.stdout.close()
        by_output, nxt = remaining(spool_dir, seq_file, outputs)
        assert nxt >= last_next, "seq went backwards"
        for o, seqs in by_output.items():
            acks = [int(x) for x in read_lines(str(acklog) + "." + o)]
            # Contiguous, following what was acknowledged, and seq never went backwards.
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) if seqs else True
            assert nxt == (seqs[-1] + 1 if seqs else nxt)
            if acks and seqs:
                # (the ack log is written after the ack: a kill in between leaves it one batch behind)
                assert seqs[0] > acks[-1], "%s: acknowledged records reappeared" % o
            if seqs:
                got = {json.loads(x)["seq"] for x in read_lines(str(delivered) + "." + o)}
                assert got >= set(range(1, seqs[0])), "%s: records left the spool without being delivered" % o
        last_next = nxt
    # Final drain, as the uploader would after the last restart.
    sp = Spool(spool_dir, "site7", seq_file=seq_file, seq_lease=50, outputs=outputs)
    for o in outputs:
        while True:
            b = sp.peek(500, 1 << 20, output=o)
            if b is None:
                break
            with open(str(delivered) + "." + o, "ab") as f:
                f.write(b"".join(x + b"\n" for x in b.lines))
            sp.ack(b)
    nxt = sp.next_seq
    sp.close()
    views = [check_delivered(str(delivered) + "." + o, nxt) for o in outputs]
    assert all(v == views[0] for v in views), "the outputs were handed different records for a seq"


def check_delivered(delivered, nxt):
    by_seq = {}
    dups = 0
    for line in read_lines(delivered):
        r = json.loads(line)
        if r["seq"] in by_seq:
            dups += 1
            assert by_seq[r["seq"]] == line, "seq %d reused for a different record" % r["seq"]
        by_seq[r["seq"]] = line
    assert sorted(by_seq) == list(range(1, nxt)), "a seq was skipped or lost"
    # Re-sends only come from the batch in flight at a kill (delivered but not yet acknowledged).
    assert dups <= KILLS * 50
    runs = {json.loads(by_seq[s])["values"]["run"] for s in by_seq}
    assert len(runs) == KILLS
    return by_seq
