"""Apply the parts of the systemd unit's sandbox that a process can apply to itself, then exec.

``python -m tests.unit.sandbox_exec SPEC.json PROGRAM ARGS...`` (run after ``setpriv
--no-new-privs``, as systemd applies them last, just before it execs the service):

* ``MemoryDenyWriteExecute=yes`` as the kernel's own ``PR_SET_MDWE`` (Linux 6.3+): no mapping
  may become writable and executable (inherited across fork and exec);
* ``SystemCallFilter=`` / ``SystemCallErrorNumber=`` / ``SystemCallArchitectures=native`` as a
  libseccomp filter of the native architecture: the allowed names (the unit's groups expanded
  by ``systemd-analyze syscall-filter``) pass, every other call fails with the unit's errno;
* ``RestrictAddressFamilies=`` the way systemd builds it: ``socket()`` passes only for the listed
  families.

libseccomp is the library systemd itself uses for this; it is reached through ctypes because
Debian's Python bindings are not installed (the C library, libseccomp2, always is).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import sys

PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ = 4
NR_SCMP_ERROR = -1


def scmp_act_errno(errno: int) -> int:
    return 0x00050000 | (errno & 0xFFFF)


class ScmpArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def deny_write_execute() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE)")


def load_filter(allowed: list[str], families: list[int], errno: int) -> None:
    """Allow ``allowed`` (``socket`` only for ``families``), fail the rest with ``errno``."""
    lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2")
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(ScmpArgCmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(scmp_act_errno(errno))
    if not ctx:
        raise OSError("seccomp_init failed")
    for name in allowed:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr == NR_SCMP_ERROR:
            continue  # a name this libseccomp does not know: nothing to allow
        if name == "socket":
            for family in families:
                cmp = ScmpArgCmp(0, SCMP_CMP_EQ, family, 0)
                rc = lib.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, nr, 1, ctypes.byref(cmp))
                if rc != 0:
                    raise OSError(-rc, f"seccomp rule for socket({family})")
            continue
        # Names of other architectures resolve to negative pseudo numbers that libseccomp
        # refuses on this one (-EDOM/-EINVAL): they do not exist here, so there is nothing to do.
        lib.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, nr, 0, None)
    rc = lib.seccomp_load(ctx)
    lib.seccomp_release(ctx)
    if rc != 0:
        raise OSError(-rc, "seccomp_load")


def main(argv: list[str]) -> None:
    with open(argv[0]) as f:
        spec = json.load(f)
    program = argv[1:]
    if spec.get("memory_deny_write_execute"):
        deny_write_execute()
    if spec.get("syscalls") is not None:
        load_filter(spec["syscalls"], spec["address_families"], spec["errno"])
    os.execv(program[0], program)


if __name__ == "__main__":
    main(sys.argv[1:])
