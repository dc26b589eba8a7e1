"""`check` warns when the spool is in RAM (OpenWrt's /var is tmpfs: the backlog dies with the
power), and never prints upload credentials."""
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from agent.commands import ram_filesystem

ROOT = Path(__file__).resolve().parent.parent

MOUNTS = """/dev/root /rom squashfs ro,relatime 0 0
proc /proc proc rw,nosuid,nodev,noexec,noatime 0 0
tmpfs {r}/tmp tmpfs rw,nosuid,nodev,noatime 0 0
/dev/ubi0_1 {r}/overlay ubifs rw,noatime 0 0
overlayfs:/overlay / overlay rw,noatime,lowerdir=/,upperdir=/overlay/upper 0 0
tmpfs /dev tmpfs rw,nosuid,relatime,size=512k,mode=755 0 0
/dev/sda1 {r}/mnt/sda1 ext4 rw,relatime 0 0
tmpfs {r}/mnt/sda1/cache ramfs rw 0 0
"""


@pytest.fixture
def root(tmp_path):
    """An OpenWrt-like tree of mount points under tmp_path and its mount table."""
    for d in ("tmp", "overlay", "mnt/sda1/cache", "srv"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "mounts").write_text(MOUNTS.format(r=tmp_path))
    return tmp_path


@pytest.mark.parametrize("path, expected", [
    ("tmp/modbus-agent/spool", ("tmp", "tmpfs")),           # does not exist: its parent counts
    ("overlay/modbus-agent/spool", None),                   # flash
    ("srv/modbus-agent/spool", None),                       # the overlay root: flash
    ("mnt/sda1/modbus-agent/spool", None),                  # USB stick
    ("mnt/sda1/cache/spool", ("mnt/sda1/cache", "ramfs")),  # the longest mount point wins
    ("mnt/sda1/cache", ("mnt/sda1/cache", "ramfs")),        # the mount point itself
])
def test_ram_filesystem_longest_mount_point(root, path, expected):
    got = ram_filesystem(str(root / path), str(root / "mounts"))
    assert got == (None if expected is None else (str(root / expected[0]), expected[1]))


def test_unreadable_mount_table_means_no_warning(tmp_path):
    assert ram_filesystem("/tmp/x", str(tmp_path / "missing")) is None


def _tmpfs_dir():
    """A tmpfs directory of this machine (from its real mount table), or None."""
    try:
        with open("/proc/mounts") as f:
            mounts = [line.split()[1:3] for line in f]
    except OSError:
        return None
    for mnt, fs in mounts:
        if fs == "tmpfs" and mnt in ("/dev/shm", "/run/shm", "/tmp", "/run/user") and os.access(mnt, os.W_OK):
            return mnt
    tmp = tempfile.gettempdir()        # TMPDIR on a tmpfs somewhere else
    return tmp if ram_filesystem(tmp) is not None and os.access(tmp, os.W_OK) else None


@pytest.fixture
def disk_dir(tmp_path):
    """A fresh directory that is NOT in RAM, by this machine's own mount table: tmp_path when
    it is on disk; else (a tmpfs /tmp, Debian 13's default) /var/tmp, the source tree or the
    home directory. `check` warns about a spool or seq_file in RAM, so tests that expect no
    warning must not put the config (the seq_file's default place) under a tmpfs /tmp."""
    if ram_filesystem(str(tmp_path)) is None:
        yield tmp_path
        return
    for base in ("/var/tmp", str(ROOT), os.path.expanduser("~")):
        if os.path.isdir(base) and os.access(base, os.W_OK) and ram_filesystem(base) is None:
            d = Path(tempfile.mkdtemp(prefix="modbus-agent-test-", dir=base))
            try:
                yield d
            finally:
                shutil.rmtree(str(d), ignore_errors=True)
            return
    pytest.skip("no writable directory on disk here")


def run_check(ini):
    return subprocess.run([sys.executable, "-m", "agent", "check", "-c", str(ini)], cwd=str(ROOT),
                          capture_output=True, text=True, timeout=60)


AGENT_INI = """[agent]
id = site7
spool_dir = %s
[upload]
url = https://ingest:S3cretPassw0rd@collector.example/api/v1/batches
[connection:plc]
type = tcp
host = 127.0.0.1
[device:m]
connection = plc
[points:m]
v = holding 0 uint16
"""


@pytest.mark.skipif(_tmpfs_dir() is None, reason="no writable tmpfs on this machine")
def test_check_warns_about_a_spool_in_ram(disk_dir):
    spool = os.path.join(_tmpfs_dir(), "modbus-agent-test-%s" % uuid.uuid4().hex, "spool")   # never created
    ini = disk_dir / "agent.ini"
    ini.write_text(AGENT_INI % spool)
    r = run_check(ini)
    assert r.returncode == 0, r.stderr          # a warning, not an error
    assert ("warning: %s:3: [agent] spool_dir: %s is in RAM (tmpfs): records waiting for upload are "
            "lost on power loss; put it on flash or USB storage" % (ini, spool)) in r.stderr
    assert not os.path.exists(os.path.dirname(spool))
    assert "seq_file" not in r.stderr           # next to the config file: on disk


@pytest.mark.skipif(_tmpfs_dir() is None, reason="no writable tmpfs on this machine")
def test_check_warns_about_a_seq_file_in_ram(disk_dir):
    seq_file = os.path.join(_tmpfs_dir(), "modbus-agent-test-%s" % uuid.uuid4().hex, "site7.seq")
    ini = disk_dir / "agent.ini"
    ini.write_text(AGENT_INI.replace("[upload]", "seq_file = %s\n[upload]" % seq_file) % (disk_dir / "spool"))
    r = run_check(ini)
    assert r.returncode == 0, r.stderr
    assert "warning: %s:4: [agent] seq_file: %s is in RAM (tmpfs)" % (ini, seq_file) in r.stderr
    assert "spool_dir" not in r.stderr


def test_check_does_not_warn_about_a_spool_on_disk_and_hides_credentials(disk_dir):
    ini = disk_dir / "agent.ini"
    ini.write_text(AGENT_INI % (disk_dir / "spool"))
    r = run_check(ini)
    assert r.returncode == 0, r.stderr
    assert "in RAM" not in r.stderr
    assert "upload: https://***@collector.example/api/v1/batches" in r.stdout
    assert "S3cretPassw0rd" not in r.stdout + r.stderr
