"""The operation table: one row per kind of disk operation, read by everything that handles one.

A kind of operation used to live in parallel lists and if-chains -- the engines' dispatch, the
device's completion accounting, the stats counters, the metrics labels, query-blockstats -- so
a new one touched a dozen files and a forgotten place failed silently.  Now its row says what
the others need to know about it, and each of them either reads the row or builds its dispatch
with :func:`by_kind`, which refuses a mapping that misses a kind: a kind added here and not
handled fails when its module is imported (and in ``tests/unit/control/test_optable.py``),
not in a guest.

The device extends this table with its own operations (GET_ID, which never reaches the disk):
:mod:`virtio_blk.ops`.  Rows are indexed by their ``index``, which for a disk operation is its
:class:`OpKind`; per-kind statistics (failures, times, latency histograms) are lists in the same
order.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


class OpKind(enum.IntEnum):
    """A disk operation kind; its value is its row's index in :data:`DISK_OPS`."""

    READ = 0
    WRITE = 1
    FLUSH = 2
    DISCARD = 3
    WRITE_ZEROES = 4


@dataclass(frozen=True)
class Capabilities:
    """The request types a storage carries out (beyond read, and write when writable): what
    the table's ``capability`` column names.

    ``flush``: it has a volatile cache a flush makes durable (FLUSH and CONFIG_WCE are offered).
    ``discard`` / ``write_zeroes``: DISCARD / WRITE_ZEROES are offered on writable exports.
    """

    flush: bool = True
    discard: bool = True
    write_zeroes: bool = True


@dataclass(frozen=True)
class OpRow:
    """What the layers above need to know about one kind of operation.

    ``counter`` / ``bytes_counter`` name the per-queue stats counters (``BlkStats`` is generated
    from them); discard and write-zeroes share ``bytes_unmapped`` as QEMU accounts both as
    unmap.  ``qmp`` is the operation's family in QEMU's ``BlockDeviceStats`` (``rd``, ``wr``,
    ``flush``, ``unmap``; None: not reported there).  ``moves_data``: it succeeds only if all
    ``length`` bytes were transferred.  ``write_through``: in write-through mode a successful
    one is made durable before it is reported.  ``needs_writable`` / ``capability``: the
    storage must be writable / have that :class:`Capabilities` flag.
    """

    index: int
    name: str
    counter: str
    bytes_counter: str | None = None
    qmp: str | None = None
    moves_data: bool = False
    write_through: bool = False
    needs_writable: bool = False
    capability: str | None = None

    def supported(self, caps: Capabilities, read_only: bool) -> bool:
        """Whether a storage with ``caps`` (read-only or not) can carry this operation out."""
        if self.needs_writable and read_only:
            return False
        return self.capability is None or bool(getattr(caps, self.capability))


#: The disk operations, in :class:`OpKind` order.
DISK_OPS: tuple[OpRow, ...] = (
    OpRow(OpKind.READ, "read", "reads", "bytes_read", "rd", moves_data=True),
    OpRow(OpKind.WRITE, "write", "writes", "bytes_written", "wr", moves_data=True,
          write_through=True, needs_writable=True),
    OpRow(OpKind.FLUSH, "flush", "flushes", None, "flush", capability="flush"),
    OpRow(OpKind.DISCARD, "discard", "discards", "bytes_unmapped", "unmap",
          needs_writable=True, capability="discard"),
    OpRow(OpKind.WRITE_ZEROES, "write_zeroes", "write_zeroes", "bytes_unmapped", "unmap",
          write_through=True, needs_writable=True, capability="write_zeroes"),
)

#: Kinds that transfer ``length`` bytes between the disk and buffers (a short one failed).
DATA_KINDS = frozenset(OpKind(row.index) for row in DISK_OPS if row.moves_data)
#: Kinds made durable before they are reported in write-through mode.
WRITE_THROUGH_KINDS = frozenset(OpKind(row.index) for row in DISK_OPS if row.write_through)


def by_kind(handlers: Mapping[OpKind, T], what: str = "dispatch") -> tuple[T, ...]:
    """``handlers`` as a tuple indexed by kind (what a dispatch looks up per op).

    Raises TypeError if a kind of the table is missing (or an unknown one is present): a
    dispatch built here cannot silently lack an operation.
    """
    missing = [kind.name for kind in OpKind if kind not in handlers]
    extra = [repr(k) for k in handlers if k not in tuple(OpKind)]
    if missing or extra:
        raise TypeError(f"{what}: no handler for {', '.join(missing) or '-'}; "
                        f"unknown kinds {', '.join(extra) or '-'}")
    return tuple(handlers[kind] for kind in OpKind)


def check_table(rows: tuple[OpRow, ...]) -> tuple[OpRow, ...]:
    """``rows`` after checking each stands at its own index (a table out of order would
    account one kind's operations to another)."""
    for i, row in enumerate(rows):
        if row.index != i:
            raise ValueError(f"operation {row.name!r} has index {row.index} at position {i}")
    return rows


check_table(DISK_OPS)
