"""What a configuration costs a router's CPU, for `check` (`[agent] cpu_budget`).

The figures are router CPU seconds measured by tools/bench/router.py (`--scenario cost`): the
agent inside a kernel CPU quota of 1/RATIO of an x86 core (RATIO 20: the calibration in that
file), 20 Modbus TCP devices polled every second with few and with many points, records spooled
and uploaded; the two runs give the cost of one poll and of one point. RTU devices cost the same
CPU per poll (the bus time is `check`'s other warning). A device polled on_change still costs
its polls. These are estimates for a RUT200-class router (MT7628, 580 MHz MIPS 24KEc, no FPU);
a router twice as slow doubles them.
"""

ROUTER = "a RUT200-class router's CPU (580 MHz MIPS, no FPU)"
PER_POLL = 0.0051      # s of router CPU per device poll: request, record, spool line, upload share
PER_POINT = 0.000016   # s of router CPU per point read, decoded, recorded and uploaded
BASE = 0.01            # share of the router's CPU the idle loop uses (timers, status file)


def device_share(device):
    """Share (0..) of the router's CPU that polling `device` at its interval takes."""
    return (PER_POLL + PER_POINT * len(device.points)) / device.interval


def estimate(devices):
    """(total share of the router's CPU, [(device, share)] costliest first)."""
    shares = sorted(((d, device_share(d)) for d in devices), key=lambda x: -x[1])
    return BASE + sum(s for _d, s in shares), shares
