"""Shared fixtures: loopback ports, pseudo-terminal pairs."""
import logging
import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture
def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def pty_pair():
    """A real pseudo-terminal pair: (master_fd, slave_path). The agent opens the slave with
    pyserial; a peer (umodbus/pymodbus or a raw fd loop) serves on the master."""
    import tty

    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    path = os.ttyname(slave)
    yield master, path
    for fd in (master, slave):
        try:
            os.close(fd)
        except OSError:
            pass


@pytest.fixture(autouse=True)
def agent_logging_restored():
    """`agent.log.setup` (run by `Loop.reload` and the log tests) gives the "agent" logger its own
    handler and stops it propagating, as the running agent wants; without this, every later
    test in the same worker that reads log records through caplog would see none."""
    logger = logging.getLogger("agent")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    for h in list(logger.handlers):
        if h not in saved[0]:
            logger.removeHandler(h)
            h.close()
    logger.handlers[:] = saved[0]
    logger.propagate = saved[1]
    logger.setLevel(saved[2])
