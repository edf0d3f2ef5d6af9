"""The sandboxed systemd unit (qemu-configs/systemd): its exposure score, and the server run the
way the unit runs it.

systemd is not PID 1 on these machines, so the unit itself cannot run.  ``systemd-analyze``
judges it offline (``security --offline=yes``, ``verify``), and the server is started with as
much of the unit's sandbox as can be built without systemd, read from the unit file itself (so
the test follows the unit, not a copy of it):

* ``User=``/``Group=`` (no supplementary groups), ``NoNewPrivileges=``, ``CapabilityBoundingSet=``
  / ``AmbientCapabilities=`` (empty): ``setpriv`` with an unprivileged uid/gid;
* ``SystemCallFilter=`` / ``SystemCallErrorNumber=`` / ``SystemCallArchitectures=native``,
  ``RestrictAddressFamilies=``, ``MemoryDenyWriteExecute=``: :mod:`tests.unit.sandbox_exec`
  (libseccomp, ``PR_SET_MDWE``), the groups expanded by ``systemd-analyze syscall-filter``;
* ``ProtectSystem=strict`` + ``ReadWritePaths=`` + ``RuntimeDirectory=``: a private mount
  namespace whose root mount is read-only, only the image and runtime directories writable;
  ``ProtectHome=yes``: /home and /root masked; ``ProtectProc=invisible``/``ProcSubset=pid``: a
  /proc mounted with ``hidepid=invisible,subset=pid``;
* the socket unit's ``SocketUser=``/``SocketGroup=``/``SocketMode=``, ``DirectoryMode=``,
  ``RuntimeDirectoryMode=``, ``UMask=``: the test makes the files so.

Left untested (systemd builds them from cgroups, namespaces or seccomp rules not reproduced
here): ``DevicePolicy=``/``DeviceAllow=``, ``IPAddressDeny=``/``IPAddressAllow=``,
``PrivateTmp=``, ``PrivateMounts=``, ``ProtectKernelTunables=``/``-Modules=``/``-Logs=``,
``ProtectControlGroups=``, ``ProtectClock=``, ``ProtectHostname=``, ``RestrictNamespaces=``,
``RestrictRealtime=``, ``RestrictSUIDSGID=``, ``LockPersonality=``, ``RemoveIPC=``, read-only
mounts other than the root one, and the real ``EPERM``-vs-``EAFNOSUPPORT`` errno of a refused
socket family.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.cli_harness import REPO, TIMEOUT, Server, qmp
from vhost_frontend import Frontend, FrontendMemory
from vhost_frontend.blk import BlkDriver
from virtio_blk.request import Status

UNITS = REPO / "qemu-configs" / "systemd"
SERVICE = "vhost-user-blk@.service"
SOCKET = "vhost-user-blk@.socket"
MAX_EXPOSURE = 3.0
#: The service's user and group, and QEMU's group (the socket's), as numbers: the test cannot
#: add users; setpriv does not need them to exist.
UID, GID, QEMU_GID = 65534, 65534, 65533
#: QEMU's user (primary group QEMU_GID), and a local user in neither group.
QEMU_UID, STRANGER = 65533, 65532
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _missing(what: str) -> None:
    """Skip where a developer's machine lacks ``what``; in CI (.ci/run installs it) fail."""
    if IN_CI:
        pytest.fail(f"{what} (CI installs it: see .ci/run)")
    pytest.skip(what)


@pytest.fixture(scope="module")
def analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        _missing("systemd-analyze is missing (Debian package systemd)")
    assert path is not None
    return path



def unit_settings(name: str) -> list[tuple[str, str]]:
    """The ``(key, value)`` assignments of a unit file, in order (keys repeat in systemd)."""
    text = re.sub(r"\\\n\s*", " ", (UNITS / name).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;[":
            continue
        key, _, value = line.partition("=")
        out.append((key.strip(), value.strip()))
    return out


def setting(name: str, key: str) -> str:
    values = [v for k, v in unit_settings(name) if k == key]
    assert values, f"{key}= is not set in {name}"
    return values[-1]


def instantiate(directory: Path) -> None:
    """The units as instance vm1 in ``directory``, ExecStart= pointing at an existing program
    (``verify`` checks that it exists)."""
    program = shutil.which("vhost-user-blk") or "/bin/true"
    for unit in (SERVICE, SOCKET):
        text = (UNITS / unit).read_text().replace("/usr/local/bin/vhost-user-blk", program)
        (directory / unit.replace("@.", "@vm1.")).write_text(text)


# ----------------------------------------------------------------------------- offline checks
def test_exposure_score_is_at_most_3(analyze: str, tmp_path: Path) -> None:
    instantiate(tmp_path)
    proc = subprocess.run([analyze, "security", "--offline=yes", "--no-pager",
                           f"./{SERVICE.replace('@.', '@vm1.')}"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, proc.stdout
    assert "runs as root" not in proc.stdout


def test_units_verify_clean(analyze: str, tmp_path: Path) -> None:
    instantiate(tmp_path)
    proc = subprocess.run([analyze, "verify", "--man=no", SOCKET.replace("@.", "@vm1."),
                           SERVICE.replace("@.", "@vm1.")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stdout + proc.stderr


def test_sysusers_file_makes_the_units_user(tmp_path: Path) -> None:
    """The User=/Group=/SocketUser= of the units is what vhost-user-blk.sysusers.conf makes."""
    sysusers = shutil.which("systemd-sysusers")
    if sysusers is None:
        _missing("systemd-sysusers is missing (Debian package systemd)")
    assert sysusers is not None
    (tmp_path / "etc").mkdir()
    proc = subprocess.run([sysusers, f"--root={tmp_path}",
                           str(UNITS / "vhost-user-blk.sysusers.conf")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    passwd = {line.split(":")[0]: line.split(":")
              for line in (tmp_path / "etc" / "passwd").read_text().splitlines()}
    groups = {line.split(":")[0] for line in (tmp_path / "etc" / "group").read_text().splitlines()}
    user, group = setting(SERVICE, "User"), setting(SERVICE, "Group")
    assert user in passwd and group in groups
    assert 0 < int(passwd[user][2]) < 1000  # a system user, not root
    assert passwd[user][6] == "/usr/sbin/nologin"
    assert setting(SOCKET, "SocketUser") == user


# ------------------------------------------------------------------- the syscall filter's set
def syscall_groups(analyze: str) -> dict[str, list[str]]:
    """Every ``@group`` systemd knows, with its entries (names and nested ``@groups``)."""
    out = subprocess.run([analyze, "syscall-filter", "--no-pager"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif not line.strip() or line.startswith("#"):  # the end of a group, or of the list
            current = None
        elif current is not None and not line.strip().startswith("#"):  # "# what it is" skipped
            current.append(line.strip())
    return groups


def expand(entries: list[str], groups: dict[str, list[str]]) -> set[str]:
    names: set[str] = set()
    for entry in entries:
        names |= expand(groups[entry], groups) if entry.startswith("@") else {entry}
    return names


def allowed_syscalls(analyze: str) -> set[str]:
    """The unit's allow-list, as systemd combines its ``SystemCallFilter=`` lines: the first
    (without ``~``) starts the list, each later ``~`` line removes from it."""
    groups = syscall_groups(analyze)
    lines = [v for k, v in unit_settings(SERVICE) if k == "SystemCallFilter"]
    assert lines and not lines[0].startswith("~"), "the filter must be an allow-list"
    allowed: set[str] = set()
    for value in lines:
        deny = value.startswith("~")
        names = expand(value.lstrip("~").split(), groups)
        allowed = allowed - names if deny else allowed | names
    return allowed


def sandbox_spec(analyze: str) -> dict[str, object]:
    families = [getattr(socket, name)
                for name in setting(SERVICE, "RestrictAddressFamilies").split()]
    assert setting(SERVICE, "SystemCallArchitectures") == "native"  # what libseccomp builds
    errno_name = setting(SERVICE, "SystemCallErrorNumber")
    return {"syscalls": sorted(allowed_syscalls(analyze)), "address_families": families,
            "errno": getattr(errno, errno_name),
            "memory_deny_write_execute": setting(SERVICE, "MemoryDenyWriteExecute") == "yes"}


def test_filter_allows_what_the_server_needs(analyze: str) -> None:
    """The calls of io_uring, memfd mapping, fd passing and queue processes are allowed, the
    privileged ones are not (a guard on the set the run below relies on)."""
    allowed = allowed_syscalls(analyze)
    needed = {"io_uring_setup", "io_uring_enter", "io_uring_register", "mmap", "eventfd2",
              "epoll_wait", "epoll_ctl", "sendmsg", "recvmsg", "socketpair", "clone", "execve",
              "pread64", "pwritev", "fdatasync", "fallocate", "flock", "fcntl", "ioctl"}
    assert needed <= allowed, needed - allowed
    assert not {"setuid", "setgroups", "mount", "ptrace", "bpf", "setrlimit",
                "sched_setscheduler", "init_module", "reboot"} & allowed


# --------------------------------------------------------------- the server, run like the unit
def _reachable(path: Path) -> bool:
    """Whether a user who is neither owner nor in the group can reach ``path``."""
    return all(p.stat().st_mode & stat.S_IXOTH for p in [*reversed(path.parents), path])


@pytest.fixture
def sandbox_dir() -> Iterator[Path]:
    """A directory an unprivileged user can traverse (pytest's tmp_path is under a 0700 one)."""
    base = Path(tempfile.mkdtemp(prefix="vub-sandbox-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def children_of(pid: int) -> list[int]:
    """The child processes of every thread of ``pid`` (the queue pool's workers are forked
    by a thread of their own)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = task / "children"
        if children.exists():
            out += [int(p) for p in children.read_text().split()]
    return out


def ring_completions(pid: int) -> int:
    """Completions posted on the io_uring rings of ``pid`` and its child processes."""
    pids = [pid, *children_of(pid)]
    total = 0
    for p in pids:
        for fd in Path(f"/proc/{p}/fd").iterdir():
            try:
                if os.readlink(fd) != "anon_inode:[io_uring]":
                    continue
                info = Path(f"/proc/{p}/fdinfo/{fd.name}").read_text()
            except OSError:
                continue
            total += int(re.search(r"CqTail:\s*(\d+)", info).group(1))  # type: ignore[union-attr]
    return total


@contextmanager
def as_user(uid: int, gid: int) -> Iterator[None]:
    """Act as ``uid``/``gid`` (no supplementary groups) for file access and connect()."""
    groups = os.getgroups()
    os.setgroups([])
    os.setegid(gid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(groups)


def status_fields(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def launcher(base: Path, fd: int, rw_paths: list[Path], spec: Path) -> list[str]:
    """argv that takes ``command(...)`` (the harness's ``python -m storage_daemon ...``) and runs it
    as the unit would: in a private mount namespace, as UID/GID with no capabilities and no new
    privileges, under the syscall filter; the listening socket as fd 3."""
    python = Path(os.path.realpath(sys.executable))
    prefix = Path(os.path.realpath(sys.base_prefix))
    mounts, workdir = [], REPO
    if not _reachable(REPO):  # a checkout under /root, say: seen through a bind mount
        (base / "src").mkdir()
        mounts.append(f"mount --bind {REPO} {base / 'src'}")
        workdir = base / "src"
    blocked = next((d for d in [*reversed(python.parents)][1:]
                    if not d.stat().st_mode & stat.S_IXOTH), None)
    if blocked is not None:
        # pyenv under /root (0700): the interpreter is made reachable at its own path (its
        # libpython is found through an RPATH there), as an installed
        # /usr/local/bin/vhost-user-blk would be: a tmpfs over the closed directory holding
        # only the interpreter's prefix (ProtectHome=tmpfs with BindReadOnlyPaths=, in effect).
        if sys.prefix != sys.base_prefix or not python.is_relative_to(prefix):
            pytest.fail(f"{python} is out of an unprivileged user's reach (in a venv)")
        (base / "py").mkdir()
        mounts += [f"mount --bind {prefix} {base / 'py'}",
                   f"mount -t tmpfs -o mode=0755 tmpfs {blocked}", f"mkdir -p {prefix}",
                   f"mount --bind {base / 'py'} {prefix}", f"mount -o remount,ro {blocked}"]
    # ReadWritePaths=/RuntimeDirectory=: separate mounts, so the read-only root spares them.
    mounts += [f"mount --bind {p} {p}" for p in rw_paths]
    mounts.append("mount -o remount,bind,ro /")  # ProtectSystem=strict
    for home in ("/home", "/root"):  # ProtectHome=yes
        if Path(home).is_dir() and Path(home) != blocked:
            mounts.append(f"mount -t tmpfs -o ro,mode=000 tmpfs {home}")
    mounts.append("mount -t proc -o hidepid=invisible,subset=pid proc /proc")  # ProtectProc=
    script = " && ".join(mounts) + (
        f' && cd {workdir} && shift && umask {setting(SERVICE, "UMask")}'
        f" && exec setpriv --reuid={UID} --regid={GID} --clear-groups --no-new-privs"
        " --inh-caps=-all --bounding-set=-all"
        f' {python} -m tests.unit.sandbox_exec {spec} {python} "$@" 3<&{fd} {fd}<&-')
    return ["unshare", "--mount", "--propagation", "private", "bash", "-c", script, "bash"]


@pytest.mark.parametrize("num_queues", [1, 2])
def test_server_runs_as_the_unit_runs_it(analyze: str, sandbox_dir: Path, servers: list[Server],
                                         num_queues: int) -> None:
    """A frontend writes and reads through the server (one queue; two, in queue processes)
    running unprivileged in the unit's sandbox, on io_uring, with QMP in the runtime directory
    and metrics on TCP."""
    if os.geteuid() != 0:
        _missing("running the server as another user needs root")
    for tool in ("setpriv", "unshare", "mount"):
        if shutil.which(tool) is None:
            _missing(f"{tool} is missing (Debian package util-linux)")
    base = sandbox_dir
    # /var/lib/vhost-user-blk: root:GID 0770, the image GID 0660 (qemu-configs/README.md).
    lib = base / "lib"
    lib.mkdir()
    os.chown(lib, 0, GID)
    lib.chmod(0o770)
    image = lib / "vm1.img"
    with open(image, "wb") as f:
        os.truncate(f.fileno(), 8 << 20)
    os.chown(image, 0, GID)
    image.chmod(0o660)
    # /run/vhost-user-blk (the socket unit's DirectoryMode=), its socket, and the service's
    # RuntimeDirectory= vhost-user-blk/%i with RuntimeDirectoryMode=.
    run = base / "run"
    run.mkdir(mode=int(setting(SOCKET, "DirectoryMode"), 8))
    run.chmod(int(setting(SOCKET, "DirectoryMode"), 8))
    sock_path = run / "vm1.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen()
    os.chown(sock_path, UID, QEMU_GID)
    sock_path.chmod(int(setting(SOCKET, "SocketMode"), 8))
    runtime = run / "vm1"
    runtime.mkdir()
    os.chown(runtime, UID, GID)
    runtime.chmod(int(setting(SERVICE, "RuntimeDirectoryMode"), 8))
    qmp_path = runtime / "qmp.sock"
    spec = base / "sandbox.json"
    spec.write_text(json.dumps(sandbox_spec(analyze)))
    spec.chmod(0o644)

    server = Server("--fd", "3", "--image", image, "--qmp", qmp_path, "--metrics", "127.0.0.1:0",
                    "--num-queues", str(num_queues), "--direct", pass_fds=[listener.fileno()],
                    launcher=launcher(base, listener.fileno(), [lib, runtime], spec))
    servers.append(server)
    listener.close()
    serving = server.started()
    assert "aio=io_uring" in serving, serving  # the ring could be made under the filter
    port = int(re.search(r"metrics on port (\d+)",  # type: ignore[union-attr]
                         server.wait_for("metrics on port")).group(1))

    # The sandbox is really in force on the server.
    fields = status_fields(server.proc.pid)
    assert fields["Uid"].split() == [str(UID)] * 4 and fields["Gid"].split() == [str(GID)] * 4
    assert fields["Groups"] == "" and fields["NoNewPrivs"] == "1" and fields["Seccomp"] == "2"
    assert int(fields["CapEff"], 16) == int(fields["CapBnd"], 16) == 0
    seen = {f[4]: f[5].split(",") for f in (line.split() for line in
            Path(f"/proc/{server.proc.pid}/mountinfo").read_text().splitlines())}
    assert "ro" in seen["/"] and "rw" in seen[str(lib)] and "rw" in seen[str(runtime)]
    assert "ro" in seen.get("/home", ["ro"]) and "ro" in seen["/root"]
    qmp_stat = qmp_path.stat()
    assert stat.S_ISSOCK(qmp_stat.st_mode) and qmp_stat.st_uid == UID
    assert stat.S_IMODE(qmp_stat.st_mode) & 0o077 == 0

    # The socket unit's modes let QEMU's user (in the socket's group) connect, nobody else.
    with as_user(STRANGER, STRANGER), pytest.raises(PermissionError):
        Frontend(sock_path)
    with as_user(QEMU_UID, QEMU_GID):
        fe = Frontend(sock_path)
    mem = FrontendMemory([(0, 8 << 20, 0)])  # memfd guest RAM, mapped by the other user
    try:
        fe.negotiate()
        fe.set_mem_table(mem)
        drivers = [BlkDriver(fe, fe.setup_queue(i, size=64), mem) for i in range(num_queues)]
        for i, drv in enumerate(drivers):
            data = bytes([0x40 + i]) * 4096
            assert drv.write(8 * i, data).status == Status.OK
            assert drv.read(8 * i, 4096).data == data
        if num_queues > 1:
            # (the default for more than one queue: the pool, one worker per core)
            assert server.wait_for(r"queue 1 started on pool worker \d+")
            kids = children_of(server.proc.pid)
            assert 1 <= len(kids) <= num_queues
            for kid in kids:
                kid_fields = status_fields(int(kid))
                assert kid_fields["Uid"] == fields["Uid"] and kid_fields["Seccomp"] == "2"
        assert ring_completions(server.proc.pid) >= 2 * num_queues  # the IO went through rings
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        writes = sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                     if s.name == "vhost_user_blk_requests_total" and s.labels["op"] == "write")
        assert writes == num_queues
        stats, quit_reply = qmp(qmp_path, '{"execute": "query-blockstats"}',
                                '{"execute": "quit"}')
        assert stats["return"][0]["stats"]["wr_operations"] == num_queues
        assert quit_reply == {"return": {}}
        assert server.proc.wait(TIMEOUT) == 0
    finally:
        fe.close()
        mem.close()
    assert not qmp_path.exists()
    with open(image, "rb") as img:
        assert img.read(4096) == b"\x40" * 4096
    assert not [line for line in server.lines if "Traceback" in line], server.lines
