"""CPU time and resident memory of another process, read from /proc (Linux), for the
benchmarks that watch a running agent (cycle.py, soak.py)."""
import os

CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """User + system CPU seconds the process has used so far."""
    with open("/proc/%d/stat" % pid) as f:
        # the command name may hold spaces and parentheses: split after its last ')'
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / float(CLK)


def rss_kb(pid):
    """Resident set size in kB (VmRSS), 0 if the kernel does not say."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0
