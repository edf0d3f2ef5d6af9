"""Helpers for the qcow2 tests: qemu-img / qemu-io wrappers and a Qcow2Disk convenience API."""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from blockdev.qcow2 import Qcow2Disk

KiB = 1 << 10
MiB = 1 << 20

needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None or
                                    shutil.which("qemu-io") is None,
                                    reason="qemu-img and qemu-io are needed")


def run(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([os.fspath(a) for a in args], capture_output=True, text=True,
                          check=False, timeout=120)


def qemu_img(*args: str | os.PathLike[str]) -> str:
    p = run("qemu-img", *args)
    assert p.returncode == 0, f"qemu-img {args}: {p.stdout}{p.stderr}"
    return p.stdout


def qemu_io(img: Path, *commands: str, fmt: str = "qcow2") -> None:
    args: list[str] = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    p = run(*args, img)
    assert p.returncode == 0 and "failed" not in p.stdout, f"{commands}: {p.stdout}{p.stderr}"


def check(img: Path) -> dict:
    """``qemu-img check``: assert no corruption and no leak; the JSON report."""
    p = run("qemu-img", "check", "--output=json", img)
    assert p.returncode == 0, f"qemu-img check {img}: rc {p.returncode}\n{p.stdout}{p.stderr}"
    return json.loads(p.stdout)


def check_rc(img: Path) -> int:
    """``qemu-img check`` exit status: 0 clean, 2 corrupt, 3 leaks only."""
    return run("qemu-img", "check", img).returncode


def info(img: Path) -> dict:
    """``qemu-img info``, sharing the image (-U): a server may be serving it, and it holds
    QEMU's image locks as a running VM does."""
    return json.loads(qemu_img("info", "-U", "--output=json", img))


def compare(raw: Path, img: Path) -> None:
    p = run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", raw, img)
    assert p.returncode == 0, f"qemu-img compare: {p.stdout}{p.stderr}"


def write_raw(path: Path, data: bytes | bytearray) -> Path:
    path.write_bytes(bytes(data))
    return path


def randbytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def read(disk: Qcow2Disk, offset: int, length: int, pieces: int = 1) -> bytes:
    """Read through the disk into ``pieces`` separate buffers (like a scattered guest SG list)."""
    cuts = sorted({0, length, *(random.Random(offset ^ length).randrange(length + 1)
                                for _ in range(pieces - 1))})
    bufs = [bytearray(b - a) for a, b in itertools.pairwise(cuts)]
    assert disk.readv([memoryview(b) for b in bufs], offset) == length
    return b"".join(bufs)


def write(disk: Qcow2Disk, offset: int, data: bytes, pieces: int = 1) -> None:
    cuts = sorted({0, len(data), *(random.Random(offset).randrange(len(data) + 1)
                                   for _ in range(pieces - 1))})
    views = [memoryview(data)[a:b] for a, b in itertools.pairwise(cuts)]
    assert disk.writev(views, offset) == len(data)
