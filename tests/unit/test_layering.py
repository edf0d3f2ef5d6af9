"""The packages stack one way, and no module imports itself back through others.

    storage_daemon          the daemon: command line, QMP, metrics, the set of exports
      virtio_blk            the device: virtio-blk requests, the fast path, device config
        blockdev            the block layer: storage kinds, IO engines, image locking, specs
        vhost               vhost-user: protocol, queues (vhost.queue), queue runners
          scsi_buffers      the buffer model
            guestmem        guest memory, its host views, the dirty log

``blockdev`` and ``vhost`` stand side by side and know nothing of each other: the block layer
imports nothing of virtio, and the device knows storage only through ``blockdev``'s interface.
Inside ``vhost``, the queue layouts (``vhost.queue``) know nothing of the protocol handler or of
the runners that host them.  The server never imports the tools that stand outside it (the
frontend, the test guest, the benchmarks, the tests), and the benchmarks import no test module.

Checked on the source -- every import, including those under ``TYPE_CHECKING`` and inside
functions, because a cycle hidden there is still a cycle a reader has to untangle -- so a new
import that breaks the layering fails here.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OUTSIDE = {"vhost_frontend", "qemu_guest", "remote_testbed", "benchmarks", "tests"}
SERVER = {"guestmem", "scsi_buffers", "vhost", "blockdev", "virtio_blk", "storage_daemon"}

#: For each package, the project packages it may import (besides itself).
ALLOWED = {
    "guestmem": set(),
    "scsi_buffers": {"guestmem"},
    "vhost": {"guestmem"},
    "blockdev": {"guestmem"},
    "virtio_blk": {"guestmem", "scsi_buffers", "vhost", "blockdev"},
    "storage_daemon": {"guestmem", "scsi_buffers", "vhost", "blockdev", "virtio_blk"},
    "vhost_frontend": SERVER,
    "qemu_guest": SERVER | {"vhost_frontend"},
    "remote_testbed": SERVER | {"vhost_frontend", "qemu_guest"},
    "benchmarks": SERVER | {"vhost_frontend", "qemu_guest", "remote_testbed"},
}

#: Inside a package: a sub-package and the modules of the package it must not import.
INNER_FORBIDDEN = {
    "vhost.queue": {"vhost.handler", "vhost.daemon", "vhost.runner", "vhost.connection",
                    "vhost.backend_channel", "vhost.device"},
    "vhost.runner": {"vhost.daemon"},
}

PROJECT = SERVER | OUTSIDE


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> Iterator[str]:
    """Every module ``path`` imports (absolute names; ``from X import y`` gives X and X.y)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield module
            for alias in node.names:
                yield f"{module}.{alias.name}"


def project_files() -> list[Path]:
    return sorted(p for pkg in sorted(PROJECT) for p in (ROOT / pkg).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_point_down(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no package {package}"
    allowed = ALLOWED[package] | {package} | (OUTSIDE if package not in SERVER else set())
    if package == "benchmarks":
        allowed -= {"tests"}
    wrong = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in imports_of(path)
        if name.split(".")[0] in PROJECT and name.split(".")[0] not in allowed
    }
    assert not wrong, sorted(wrong)


@pytest.mark.parametrize("inner", sorted(INNER_FORBIDDEN))
def test_inner_layers_point_down(inner: str) -> None:
    files = sorted((ROOT / inner.replace(".", "/")).rglob("*.py"))
    assert files, f"no package {inner}"
    wrong = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in imports_of(path)
        for bad in INNER_FORBIDDEN[inner]
        if name == bad or name.startswith(bad + ".")
    }
    assert not wrong, sorted(wrong)


def module_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (a name that is an attribute, not a module,
    counts as its module)."""
    files = {module_name(p): p for p in project_files() if module_name(p).split(".")[0] in SERVER}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets: set[str] = set()
        for imported in imports_of(path):
            while imported and imported not in files:
                imported = imported.rpartition(".")[0]
            # A package's __init__ importing its own modules is how a package exports names,
            # and a module importing its own package's __init__ is not a cycle of modules.
            if imported and imported != name and not name.startswith(imported + "."):
                targets.add(imported)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (a list of modules, first == last), or None."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(graph, white)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = grey
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour[nxt] == grey:
                return [*stack[stack.index(nxt):], nxt]
            if colour[nxt] == white and (cycle := visit(nxt)) is not None:
                return cycle
        stack.pop()
        colour[node] = black
        return None

    for node in sorted(graph):
        if colour[node] == white and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_no_import_cycles() -> None:
    cycle = find_cycle(module_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_find_cycle_finds_a_planted_cycle() -> None:
    """The cycle finder is not vacuous: it sees a cycle through three modules."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
