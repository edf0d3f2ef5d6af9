"""Which host files a qcow2 image may name as its backing file, and how they are opened.

The image is untrusted (a guest may have written it, or a user downloaded it), yet its header
names a host file whose bytes the guest then reads through every unallocated cluster.  Left to
itself that name reaches ``/etc/shadow``, ``../../other-vm.img``, ``/proc/self/mem`` (the
server's own memory) or a FIFO (which hangs the open).  So a backing file -- at every level of
a chain, and the ``--backing`` of ``--create`` -- is served only if all of this holds:

* it resolves (symlinks followed: they are allowed) to a path inside the top image's directory
  or inside a directory given with ``--backing-dir`` (subdirectories included);
* it is a regular file or a block device (never a FIFO, socket, character device or
  directory);
* it is not on a kernel pseudo file system (procfs, sysfs, debugfs, ...): their files pass as
  "regular" yet are views of kernel or process state.

A relative name resolves against the directory of the image that names it (QEMU's rule), so a
backing file's own backing file is looked up next to it -- and must still be inside the allowed
directories.

How the checks avoid a check-then-open race (TOCTOU): the name is opened once, with
``O_PATH``, which follows symlinks but calls no driver's ``open`` (a FIFO cannot block it, a
device sees nothing).  Every check is then made on that descriptor, i.e. on the inode actually
reached, not on a path that could be swapped afterwards: its type (``fstat``), its file system
(``fstatfs``) and its resolved path (``readlink`` of ``/proc/self/fd/N``: the kernel's name for
the inode, after every symlink).  Only then is it opened for reading, through the same
``/proc/self/fd/N`` link -- which reopens that very inode, not the name -- with ``O_NONBLOCK``
(regular files and block devices ignore it; anything else could not block us), and ``fstat``
must report the same device and inode.  Without ``/proc`` the path comes from
``os.path.realpath``, the file is reopened by that path and the device/inode comparison is what
rejects a swap.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from blockdev.libc import fstatfs_type
from blockdev.qcow2.format import Qcow2OpenError

# statfs(2) f_type values of file systems whose files are kernel state, never disk images.
PSEUDO_FS = {
    0x9FA0: "procfs",
    0x62656572: "sysfs",
    0x64626720: "debugfs",
    0x74726163: "tracefs",
    0x73636673: "securityfs",
    0x27E0EB: "cgroupfs",
    0x63677270: "cgroup2",
    0x62656570: "configfs",
    0xCAFE4A11: "bpffs",
    0xDE5E81E4: "efivarfs",
    0x6165676C: "pstore",
    0xF97CFF8C: "selinuxfs",
    0x43415D53: "smackfs",
    0x42494E4D: "binfmt_misc",
    0x65735543: "fusectl",
    0x1CD1: "devpts",
}

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISDIR, "a directory"),
          (stat.S_ISLNK, "a symbolic link"))

_HINT = ("backing files must be regular files or block devices inside the image's directory "
         "or a --backing-dir")


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _kind(mode: int) -> str | None:
    """Why a file of ``mode`` cannot back an image (None: it can)."""
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode):
        return None
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file or block device"


@dataclass(frozen=True)
class BackingFile:
    """A backing file opened by the policy: the read-only fd (the caller owns it), the name as
    the chain spelt it (relative names joined to the referring image's directory), and the
    resolved path that was checked."""

    fd: int
    path: str
    real: str


@dataclass(frozen=True)
class BackingPolicy:
    """The directories backing files may come from (resolved, absolute)."""

    dirs: tuple[str, ...]

    @classmethod
    def for_image(cls, image: str, backing_dirs: Iterable[str] = ()) -> BackingPolicy:
        """The policy for the chain under ``image``: its own directory -- as named and where
        the file really is, after symlinks -- plus each ``--backing-dir``, which must be an
        existing directory (Qcow2OpenError otherwise)."""
        named = os.path.dirname(os.path.abspath(image))
        dirs = [os.path.realpath(named), os.path.dirname(os.path.realpath(image))]
        for d in backing_dirs:
            if not os.path.isdir(d):
                raise Qcow2OpenError(f"--backing-dir {d}: not a directory")
            dirs.append(os.path.realpath(d))
        return cls(tuple(dict.fromkeys(dirs)))

    def open(self, name: str, referrer: str) -> BackingFile:
        """Open backing file ``name`` of image ``referrer`` read-only, or refuse it with a
        one-line Qcow2OpenError naming the file (the module docstring says how)."""
        path = name if os.path.isabs(name) else os.path.join(os.path.dirname(referrer), name)
        try:
            pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:
            raise Qcow2OpenError(f"{referrer}: backing file {path} does not exist") from None
        except OSError as exc:
            raise Qcow2OpenError(f"{referrer}: backing file {path}: {exc.strerror}") from None
        try:
            return self._open_checked(pfd, path, referrer)
        finally:
            os.close(pfd)

    def _refuse(self, referrer: str, path: str, why: str) -> Qcow2OpenError:
        return Qcow2OpenError(f"{referrer}: backing file {path} refused: {why}; {_HINT}")

    def _open_checked(self, pfd: int, path: str, referrer: str) -> BackingFile:
        st = os.fstat(pfd)
        kind = _kind(st.st_mode)
        if kind is not None:
            raise self._refuse(referrer, path, f"it is {kind}")
        self._check_fs(pfd, referrer, path)
        link = f"/proc/self/fd/{pfd}"
        try:
            real = os.readlink(link)
            by_proc = True
        except OSError:  # no /proc: resolve the name; the inode comparison below guards it
            real = os.path.realpath(path)
            by_proc = False
        if not real.startswith("/") or real.endswith(" (deleted)"):
            raise self._refuse(referrer, path, f"it resolves to {real!r}")
        if not any(_inside(real, d) for d in self.dirs):
            raise self._refuse(referrer, path, f"it resolves to {real}, outside "
                               f"{' and '.join(self.dirs)}")
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        try:
            fd = os.open(link if by_proc else real, flags)
        except OSError as exc:
            raise Qcow2OpenError(f"{referrer}: backing file {path}: {exc.strerror}") from None
        try:
            got = os.fstat(fd)
            if (got.st_dev, got.st_ino) != (st.st_dev, st.st_ino) or _kind(got.st_mode):
                raise self._refuse(referrer, path, "it changed while being opened")
            self._check_fs(fd, referrer, path)
        except BaseException:
            os.close(fd)
            raise
        return BackingFile(fd, path, real)

    def _check_fs(self, fd: int, referrer: str, path: str) -> None:
        try:
            fs = PSEUDO_FS.get(fstatfs_type(fd))
        except OSError as exc:
            raise self._refuse(referrer, path, f"fstatfs: {exc.strerror}") from None
        if fs is not None:
            raise self._refuse(referrer, path, f"it is on {fs}, a kernel file system")

    def check(self, name: str, referrer: str) -> str:
        """Refuse ``name`` as :meth:`open` would (for ``--create --backing``); its resolved
        path."""
        f = self.open(name, referrer)
        os.close(f.fd)
        return f.real
