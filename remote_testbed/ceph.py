"""A throw-away one-node Ceph cluster for tests: one monitor and one memstore OSD on 127.0.0.1.

No manager daemon (so no ``ceph osd df``/``status`` calls: they hang without one -- every ``ceph``
call runs under a timeout).  About 10 s to start, under 0.5 GB.  Needs Debian's ceph-mon,
ceph-osd and ceph-common (``apt-get install``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

CEPH_BINARIES = ("ceph-mon", "ceph-osd", "ceph-authtool", "monmaptool", "ceph", "rbd")


def missing_binaries() -> list[str]:
    return [b for b in CEPH_BINARIES if shutil.which(b) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CephCluster:
    """Start with :meth:`start`, stop with :meth:`stop` (kills the daemons by their pid files)."""

    def __init__(self, root: Path, memstore_bytes: int = 1 << 30) -> None:
        self.root = root
        self.memstore_bytes = memstore_bytes
        self.conf = root / "ceph.conf"
        self.admin_keyring = root / "client.admin.keyring"
        self.port = _free_port()
        self.fsid = Path("/proc/sys/kernel/random/uuid").read_text().strip()
        self.env = {**os.environ, "CEPH_CONF": str(self.conf)}
        self.env.pop("CEPH_ARGS", None)

    # ------------------------------------------------------------------ commands
    def run(self, *argv: str, timeout: float = 60, input: str | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """A ceph tool with this cluster's config; never waits more than ``timeout``."""
        return subprocess.run(argv, env=self.env, input=input, capture_output=True, text=True,
                              timeout=timeout, check=check)

    def ceph(self, *args: str, timeout: float = 30, input: str | None = None) -> str:
        return self.run("ceph", "-c", str(self.conf), "--connect-timeout", "20", *args,
                        timeout=timeout, input=input).stdout

    def rbd(self, *args: str, timeout: float = 60) -> str:
        return self.run("rbd", "-c", str(self.conf), *args, timeout=timeout).stdout

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        r = self.root
        for d in ("run", "log", "mon", "osd"):
            (r / d).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"""[global]
fsid = {self.fsid}
mon host = v2:127.0.0.1:{self.port}
mon initial members = a
public addr = 127.0.0.1
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
mon warn on insecure global id reclaim allowed = false
run dir = {r}/run
log file = {r}/log/$name.log
admin socket = {r}/run/$name.asok
pid file = {r}/run/$name.pid
mon data = {r}/mon/$cluster-$id
osd data = {r}/osd/$cluster-$id
osd objectstore = memstore
memstore device bytes = {self.memstore_bytes}
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
mon allow pool size one = true
mon allow pool delete = true
osd crush chooseleaf type = 0
# a killed client's watch (and so its exclusive lock) expires after this
osd client watch timeout = 10
[mon]
keyring = {r}/mon.keyring
[osd]
keyring = {r}/osd/$cluster-$id/keyring
[client]
keyring = {self.admin_keyring}
log file = {r}/log/client.log
admin socket =
""")
        mon_key = str(r / "mon.keyring")
        self.run("ceph-authtool", "--create-keyring", mon_key, "--gen-key", "-n", "mon.",
                 "--cap", "mon", "allow *")
        self.run("ceph-authtool", "--create-keyring", str(self.admin_keyring), "--gen-key",
                 "-n", "client.admin", "--cap", "mon", "allow *", "--cap", "osd", "allow *",
                 "--cap", "mgr", "allow *")
        self.run("ceph-authtool", mon_key, "--import-keyring", str(self.admin_keyring))
        monmap = str(r / "monmap")
        self.run("monmaptool", "--create", "--addv", "a", f"[v2:127.0.0.1:{self.port}]",
                 "--fsid", self.fsid, monmap)
        self.run("ceph-mon", "-c", str(self.conf), "--mkfs", "-i", "a", "--monmap", monmap,
                 "--keyring", mon_key)
        self.run("ceph-mon", "-c", str(self.conf), "-i", "a")
        osd_uuid = Path("/proc/sys/kernel/random/uuid").read_text().strip()
        secret = self.run("ceph-authtool", "--gen-print-key").stdout.strip()
        osd_id = self.ceph("osd", "new", osd_uuid, "-i", "-",
                           input=json.dumps({"cephx_secret": secret})).strip()
        osd_dir = r / "osd" / f"ceph-{osd_id}"
        osd_dir.mkdir(parents=True, exist_ok=True)
        (osd_dir / "keyring").write_text(f"[osd.{osd_id}]\n\tkey = {secret}\n")
        self.run("ceph-osd", "-c", str(self.conf), "--mkfs", "-i", osd_id,
                 "--osd-uuid", osd_uuid)
        self.osd_id = osd_id
        self.start_osd()
        self.ceph("osd", "pool", "create", "rbd", "8", "8")
        self.ceph("osd", "pool", "application", "enable", "rbd", "rbd")
        deadline = time.monotonic() + 120
        while True:  # the OSD is up and the pool's PGs are active when an image can be made
            try:
                self.rbd("create", "--size", "4M", "rbd/ready-probe", timeout=30)
                self.rbd("rm", "rbd/ready-probe", timeout=30)
                return
            except subprocess.SubprocessError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def start_osd(self) -> None:
        self.run("ceph-osd", "-c", str(self.conf), "-i", self.osd_id)

    def pid(self, name: str) -> int | None:
        try:
            return int((self.root / "run" / f"{name}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill a daemon (``mon.a``, ``osd.0``) and wait until it is gone."""
        pid = self.pid(name)
        if pid is None:
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        (self.root / "run" / f"{name}.pid").unlink(missing_ok=True)

    def stop(self) -> None:
        for name in (f"osd.{getattr(self, 'osd_id', '0')}", "mon.a"):
            self.kill(name)

    def spec(self, image: str, snap: str | None = None) -> str:
        """The ``--image`` spec of an image of this cluster."""
        at = f"@{snap}" if snap else ""
        return f"rbd:rbd/{image}{at}:conf={self.conf}:id=admin"
