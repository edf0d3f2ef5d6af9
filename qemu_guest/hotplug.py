"""Hot-plug a vhost-user-blk disk into a running QEMU over QMP, the way orchestrators do it.

libvirt and KubeVirt attach a vhost-user disk to a running guest with two QMP commands and detach
it with one plus an event::

    chardev-add  {"id": "vub1-chr", "backend": {"type": "socket", "data":
                  {"addr": {"type": "unix", "data": {"path": SOCK}}, "server": false}}}
    device_add   {"driver": "vhost-user-blk-pci", "id": "vub1", "chardev": "vub1-chr",
                  "num-queues": N [, "bus": PORT]}
    ...
    device_del   {"id": "vub1"}        -> the guest ejects the device (ACPI or PCIe hot-plug)
    DEVICE_DELETED {"device": "vub1"}  -> only now is it gone; then
    chardev-remove {"id": "vub1-chr"}

The backend must already serve SOCK (QEMU connects in device_add and fails the command if
nobody listens).  On the ``pc`` machine the device goes on ``pci.0`` (ACPI hot-plug); q35's root
bus takes no hot-plugged device, so a spare ``pcie-root-port`` has to exist from boot and is
named as the ``bus`` (see qemu-configs/hotplug.md).  QEMU's ``-qmp`` serves one client at a
time: one :class:`Monitor` per QEMU.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from qemu_guest.migration import Qmp

log = logging.getLogger(__name__)


class HotplugError(RuntimeError):
    """A hot-plug step QEMU refused, or an event that did not come."""


class Monitor(Qmp):
    """A QMP client (QEMU's or a storage daemon's) that also waits for events."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        super().__init__(path, timeout)
        self.qmp.settimeout(timeout)

    def wait_event(self, name: str, timeout: float = 30.0, **match: object) -> dict[str, Any]:
        """The first event ``name`` whose data has every ``match`` item (others are dropped).

        Raises HotplugError when none comes within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = self.qmp.pull_event(wait=max(left, 0.01))
            except TimeoutError:
                break
            if event is None:
                continue
            data = event.get("data", {})
            if event.get("event") == name and all(data.get(k) == v for k, v in match.items()):
                return dict(event)
            log.debug("event while waiting for %s: %s", name, event)
        raise HotplugError(f"no {name} {match} within {timeout:.0f} s")


def chardev_id(device_id: str) -> str:
    """The chardev :func:`plug` makes for device ``device_id``."""
    return f"{device_id}-chr"


def plug(qemu: Monitor, device_id: str, socket_path: Path, num_queues: int = 1,
         bus: str | None = None) -> None:
    """Attach the vhost-user-blk backend at ``socket_path`` as device ``device_id``.

    A device_add that fails takes its chardev back out, so a retry starts clean.
    """
    chardev = chardev_id(device_id)
    qemu.cmd("chardev-add", id=chardev, backend={
        "type": "socket",
        "data": {"addr": {"type": "unix", "data": {"path": str(socket_path)}}, "server": False},
    })
    args: dict[str, object] = {"driver": "vhost-user-blk-pci", "id": device_id,
                               "chardev": chardev, "num-queues": num_queues}
    if bus is not None:
        args["bus"] = bus
    try:
        qemu.cmd("device_add", **args)
    except Exception:
        qemu.cmd("chardev-remove", id=chardev)
        raise


def unplug(qemu: Monitor, device_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """device_del, then wait for DEVICE_DELETED (the guest has let go), then drop the chardev.

    device_del only *asks* the guest: until the event the device (and its vhost-user
    connection) is still there, so the backend's export must not be removed before.
    Returns the event.
    """
    qemu.cmd("device_del", id=device_id)
    event = qemu.wait_event("DEVICE_DELETED", timeout, device=device_id)
    qemu.cmd("chardev-remove", id=chardev_id(device_id))
    return event
