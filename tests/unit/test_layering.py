"""The packages stack one way: guestmem -> scsi_buffers / vhost -> virtio_blk.

Nothing reaches back up that chain, the server never imports the tools that stand outside it
(the frontend, the test guest, the benchmarks, the tests), and the benchmarks import no test
module.  Checked on the source, so a new import that breaks the layering fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OUTSIDE = {"vhost_frontend", "qemu_guest", "remote_testbed", "benchmarks", "tests"}

#: For each package, the project packages it must not import.
FORBIDDEN = {
    "guestmem": {"scsi_buffers", "vhost", "virtio_blk"} | OUTSIDE,
    "scsi_buffers": {"vhost", "virtio_blk"} | OUTSIDE,
    "vhost": {"scsi_buffers", "virtio_blk"} | OUTSIDE,
    "virtio_blk": OUTSIDE,
    "vhost_frontend": {"qemu_guest", "benchmarks", "tests"},
    "qemu_guest": {"benchmarks", "tests"},
    "remote_testbed": {"benchmarks", "tests"},
    "benchmarks": {"tests"},
}


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every absolute import in ``path``."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_point_down(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no package {package}"
    wrong = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in imported_packages(path) & FORBIDDEN[package]
    }
    assert not wrong, sorted(wrong)
