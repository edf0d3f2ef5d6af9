"""Operating a running server: QMP control socket, live resize, statistics, Prometheus metrics.

* :mod:`.protocol` -- QMP framing and one client's session, sans-IO;
* :mod:`.commands` -- the commands (query-version, query-block-exports, query-blockstats,
  block_resize, quit, blockdev-add/del, block-export-add/del, query-named-block-nodes,
  object-add/del, qom-get/set);
* :mod:`.exports` -- several exports in one server, served by one loop;
* :mod:`.objects` -- the QOM object registry (throttle groups register their type there);
* :mod:`.export` -- the exported disk as the commands see it (resize, stats);
* :mod:`.qmp` -- the QMP server thread on a Unix socket;
* :mod:`.metrics` -- the Prometheus collector and HTTP endpoint.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

PACKAGE = "vhost-user-blk-py"


def version_info() -> dict[str, Any]:
    """query-version's answer (and the greeting's): this package's version in QEMU's shape."""
    try:
        text = metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        text = "0.0.0"
    parts = [int(p) if p.isdigit() else 0 for p in text.split(".")[:3]]
    parts += [0] * (3 - len(parts))
    return {"qemu": {"major": parts[0], "minor": parts[1], "micro": parts[2]},
            "package": f"{PACKAGE} {text}"}
