"""tools/openwrt-archive: the tar.gz an operator copies onto the router."""
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_archive_unpacks_to_a_runnable_agent_with_init_script(tmp_path):
    out = tmp_path / "ma.tar.gz"
    subprocess.run([sys.executable, str(ROOT / "tools" / "openwrt-archive"), "-o", str(out)], check=True,
                   capture_output=True)
    with tarfile.open(out) as tar:
        names = tar.getnames()
        init = tar.getmember("etc/init.d/modbus-agent")
        assert init.mode & 0o111 and init.uid == 0
        assert "etc" not in names and "usr/bin" not in names   # system directories left alone
        tar.extractall(tmp_path / "root")
    assert not any("/collector/" in n or "__pycache__" in n for n in names)
    lib = tmp_path / "root" / "usr" / "lib" / "modbus-agent"
    r = subprocess.run([sys.executable, "-m", "agent", "--version"], cwd=str(tmp_path),
                       env=dict(os.environ, PYTHONPATH=str(lib)), capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("modbus-agent ")
    script = (tmp_path / "root" / "etc" / "init.d" / "modbus-agent").read_text()
    assert "USE_PROCD=1" in script and "procd_set_param respawn" in script and "HUP" in script
    subprocess.run(["sh", "-n", str(tmp_path / "root" / "etc" / "init.d" / "modbus-agent")], check=True)
    # two builds of the same tree are byte-identical
    out2 = tmp_path / "ma2.tar.gz"
    subprocess.run([sys.executable, str(ROOT / "tools" / "openwrt-archive"), "-o", str(out2)], check=True,
                   capture_output=True)
    assert out.read_bytes() == out2.read_bytes()


def test_install_text_names_the_opkg_packages():
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "openwrt-archive"), "--install-text"],
                       capture_output=True, text=True, check=True)
    assert "opkg install python3-light python3-pyserial python3-requests" in r.stdout
    assert "/etc/init.d/modbus-agent enable" in r.stdout
