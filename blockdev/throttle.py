"""QEMU's throttling (util/throttle.c's leaky buckets), sans IO, with its state in shared memory.

A throttle group (``--object throttle-group,id=G,limits.iops-total=N,...``) is one budget for
every node that names it (``driver=throttle,throttle-group=G``) and every queue of those nodes,
whether the queue runs in a thread or in a process of its own: the buckets live in a shared
mapping (a memfd, which a queue process can map from the fd it is passed), so there is one
limit, not one per process.  A node without a throttle filter never touches any of this.

The rules are QEMU's, so a limit means what it means to a QEMU user:

* six buckets -- bytes and operations, each total, read and write; a bucket has an average
  rate ``avg`` (units/s), an optional burst rate ``max`` and ``burst_length`` (seconds the
  burst rate may last, the ``-max-length`` option);
* each bucket leaks ``avg`` units per second (its burst level ``max`` per second);
* a request may go when every bucket of its direction is at most full: the bucket holds
  ``avg/10`` units without ``max`` (short bursts are allowed, or every other request would
  wait), ``max * burst_length`` with it, and then the burst level may hold ``max/10``;
  otherwise it waits ``extra / rate`` seconds for the fullest bucket;
* a request that goes is accounted in every bucket of its direction: its bytes, and 1
  operation -- or ``size / iops-size`` operations when ``iops-size`` is set and it is larger;
* reads are one direction; writes, discards and write-zeroes the other (QEMU's throttle
  filter does the same); flushes are not throttled.

Changing the limits (``qom-set``) empties the buckets, as QEMU's throttle_config does, and is
seen by every process at its next request: the limits live in the same mapping.

Lock: the mapping is guarded by a ``threading.Lock`` (threads of one process) and a POSIX record
lock on the memfd (processes).  The record lock is released by the kernel when a process dies,
so a queue process killed mid-update never wedges the group.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

#: QEMU's THROTTLE_VALUE_MAX: the largest rate, and the largest burst (``max * burst_length``).
THROTTLE_VALUE_MAX = 1_000_000_000_000_000
#: QEMU's limit on ``*-max-length`` (an unsigned int).
MAX_LENGTH_MAX = 0xFFFF_FFFF
NS = 1_000_000_000

#: QEMU's BucketType order.
BUCKETS = ("bps-total", "bps-read", "bps-write", "iops-total", "iops-read", "iops-write")
BPS_TOTAL, BPS_READ, BPS_WRITE, OPS_TOTAL, OPS_READ, OPS_WRITE = range(6)
#: The buckets a request of each direction fills (read: False, write: True).
DIRECTION_BUCKETS = {False: (BPS_TOTAL, BPS_READ, OPS_TOTAL, OPS_READ),
                     True: (BPS_TOTAL, BPS_WRITE, OPS_TOTAL, OPS_WRITE)}
#: ThrottleLimits' members (qapi/block-core.json), in its order.
_RATES = ("iops-total", "iops-read", "iops-write", "bps-total", "bps-read", "bps-write")
LIMIT_KEYS = (*(k for b in _RATES for k in (b, f"{b}-max", f"{b}-max-length")), "iops-size")


class ThrottleError(ValueError):
    """Wrong limits; the message is QEMU's where QEMU has one."""


@dataclass
class Bucket:
    avg: int = 0
    max: int = 0
    burst_length: int = 1


@dataclass
class ThrottleConfig:
    """QEMU's ThrottleConfig: six buckets and ``op_size`` (``iops-size``)."""

    buckets: list[Bucket]
    op_size: int = 0

    @classmethod
    def empty(cls) -> ThrottleConfig:
        return cls([Bucket() for _ in BUCKETS])

    def copy(self) -> ThrottleConfig:
        return ThrottleConfig([Bucket(b.avg, b.max, b.burst_length) for b in self.buckets],
                              self.op_size)

    def validate(self) -> None:
        """QEMU's throttle_is_valid(), its checks in its order and its words."""
        b = self.buckets
        for total, read, write in ((BPS_TOTAL, BPS_READ, BPS_WRITE),
                                   (OPS_TOTAL, OPS_READ, OPS_WRITE)):
            for attr in ("avg", "max"):
                if getattr(b[total], attr) and (getattr(b[read], attr) or
                                                getattr(b[write], attr)):
                    raise ThrottleError("bps/iops/max total values and read/write values "
                                        "cannot be used at the same time")
        if self.op_size and not (b[OPS_TOTAL].avg or b[OPS_READ].avg or b[OPS_WRITE].avg):
            raise ThrottleError("iops size requires an iops value to be set")
        for bkt in b:
            if not (0 <= bkt.avg <= THROTTLE_VALUE_MAX and 0 <= bkt.max <= THROTTLE_VALUE_MAX):
                raise ThrottleError(
                    f"bps/iops/max values must be within [0, {THROTTLE_VALUE_MAX}]")
            if not bkt.burst_length:
                raise ThrottleError("the burst length cannot be 0")
            if bkt.burst_length > 1 and not bkt.max:
                raise ThrottleError("burst length set without burst rate")
            if bkt.max and bkt.burst_length > THROTTLE_VALUE_MAX // bkt.max:
                raise ThrottleError("burst length too high for this burst rate")
            if bkt.max and not bkt.avg:
                raise ThrottleError("bps_max/iops_max require corresponding bps/iops values")
            if bkt.max and bkt.max < bkt.avg:
                raise ThrottleError("bps_max/iops_max cannot be lower than bps/iops")

    def enabled(self) -> bool:
        return any(bkt.avg for bkt in self.buckets)

    def to_limits(self) -> dict[str, int]:
        """QEMU's throttle_config_to_limits(): every member of ThrottleLimits (qom-get)."""
        out: dict[str, int] = {}
        for name in LIMIT_KEYS[:-1]:
            bkt = self.buckets[_bucket_of(name)]
            if name.endswith("-max-length"):
                out[name] = bkt.burst_length
            elif name.endswith("-max"):
                out[name] = bkt.max
            else:
                out[name] = bkt.avg
        out["iops-size"] = self.op_size
        return out

    def apply_limits(self, limits: Mapping[str, Any]) -> ThrottleConfig:
        """A copy with ``limits`` (ThrottleLimits members, numbers or their text) applied and
        checked -- QEMU's throttle_limits_to_config() then throttle_is_valid()."""
        cfg = self.copy()
        for key, raw in limits.items():
            if key not in LIMIT_KEYS:
                raise ThrottleError(f"Parameter 'limits.{key}' is unexpected")
            value = _integer(key, raw)
            if key.endswith("-max-length"):
                if not 0 <= value <= MAX_LENGTH_MAX:
                    raise ThrottleError(f"{key} value must be in the range [0, "
                                        f"{MAX_LENGTH_MAX}]")
            elif not 0 <= value <= THROTTLE_VALUE_MAX:  # (QEMU's words, not naming the key)
                raise ThrottleError(f"bps/iops/max values must be within [0, "
                                    f"{THROTTLE_VALUE_MAX}]")
            if key == "iops-size":
                cfg.op_size = value
                continue
            bkt = cfg.buckets[_bucket_of(key)]
            if key.endswith("-max-length"):
                bkt.burst_length = value
            elif key.endswith("-max"):
                bkt.max = value
            else:
                bkt.avg = value
        cfg.validate()
        return cfg


def _bucket_of(key: str) -> int:
    base = key.removesuffix("-length").removesuffix("-max")
    kind, direction = base.split("-")
    return BUCKETS.index(f"{kind}-{direction}")


def _integer(key: str, raw: Any) -> int:
    if isinstance(raw, bool):
        raise ThrottleError(f"Invalid parameter type for '{key}', expected: integer")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str):  # the command line's text (QMP gives numbers)
        text = raw.strip()
        if text.isascii() and text.isdigit() and len(text) <= 20:
            return int(text, 10)
        raise ThrottleError(f"Parameter '{key}' expects an integer")
    raise ThrottleError(f"Invalid parameter type for '{key}', expected: integer")


# ---------------------------------------------------------------------- the buckets
#: The cells of the shared state (float64 each): a header, then five per bucket.
GEN, PREV_LEAK, OP_SIZE, HELD_NS = range(4)
HEADER = 4
AVG, MAX, LEN, LEVEL, BURST = range(5)
CELLS = HEADER + 5 * len(BUCKETS)


class Cells(Protocol):
    """Float cells by index: a list, or a memoryview cast to doubles over the shared map."""

    def __getitem__(self, index: int, /) -> float: ...

    def __setitem__(self, index: int, value: float, /) -> None: ...


def _slack(size: float) -> float:
    """What a level may exceed ``size`` by through float rounding alone."""
    return 1e-9 + size * 1e-12


class Buckets:
    """The leaky buckets over ``cells`` (a list in tests, a shared mapping in a group).

    Pure arithmetic on a clock the caller passes in: QEMU's throttle_do_leak,
    throttle_compute_wait and throttle_account.  Not locked: :class:`ThrottleGroup` is.
    """

    def __init__(self, cells: Cells) -> None:
        self.c = cells
        # The buckets with a limit (all, read, write), for the configuration generation
        # ``_gen``: a request walks only those (most groups limit one or two of six).
        self._gen = -1.0
        self._active: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] = ((), (), ())

    def active(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(every limited bucket, a read's, a write's), recomputed when the limits changed
        (in any process: the generation is in the shared cells)."""
        c = self.c
        if c[GEN] != self._gen:
            limited = [i for i in range(len(BUCKETS)) if c[HEADER + 5 * i + AVG]]
            self._active = (tuple(limited),
                            tuple(i for i in DIRECTION_BUCKETS[False] if i in limited),
                            tuple(i for i in DIRECTION_BUCKETS[True] if i in limited))
            self._gen = c[GEN]
        return self._active

    def configure(self, cfg: ThrottleConfig, now_ns: int) -> None:
        """New limits; the buckets start empty (QEMU's throttle_config)."""
        c = self.c
        for i, bkt in enumerate(cfg.buckets):
            o = HEADER + 5 * i
            c[o + AVG], c[o + MAX], c[o + LEN] = bkt.avg, bkt.max, bkt.burst_length
            c[o + LEVEL] = c[o + BURST] = 0.0
        c[OP_SIZE] = cfg.op_size
        c[PREV_LEAK] = now_ns
        c[GEN] += 1

    def config(self) -> ThrottleConfig:
        c = self.c
        return ThrottleConfig([Bucket(int(c[HEADER + 5 * i + AVG]), int(c[HEADER + 5 * i + MAX]),
                                      int(c[HEADER + 5 * i + LEN])) for i in range(len(BUCKETS))],
                              int(c[OP_SIZE]))

    def leak(self, now_ns: int) -> None:
        c = self.c
        delta = now_ns - c[PREV_LEAK]
        if delta <= 0:  # another process's clock read a hair later: nothing to leak
            return
        c[PREV_LEAK] = now_ns
        for i in self.active()[0]:
            o = HEADER + 5 * i
            avg = c[o + AVG]
            c[o + LEVEL] = max(c[o + LEVEL] - avg * delta / NS, 0.0)
            if c[o + LEN] > 1:
                c[o + BURST] = max(c[o + BURST] - c[o + MAX] * delta / NS, 0.0)

    def bucket_wait(self, i: int) -> int:
        """Nanoseconds until bucket ``i`` lets a request go (0: now)."""
        c = self.c
        o = HEADER + 5 * i
        avg = c[o + AVG]
        if not avg:
            return 0
        top = c[o + MAX]
        if not top:
            size, burst_size = avg / 10, 0.0
        else:
            size, burst_size = top * c[o + LEN], top / 10
        # QEMU returns the first of the two waits that is due and asks again when it ends;
        # both levels only fall meanwhile, so the later of the two is when the request goes:
        # one wake-up instead of two.  (+1: a wait truncated to 0 ns would let an over-full
        # bucket through.)
        # The levels are floats: a bucket leaked for exactly the wait it was told may be
        # over by a rounding error, which must not cost another wake-up (hence the slack).
        wait = 0
        extra = c[o + LEVEL] - size
        if extra > _slack(size):
            wait = int(extra * NS / avg) + 1
        if c[o + LEN] > 1:
            extra = c[o + BURST] - burst_size
            if extra > _slack(burst_size):
                wait = max(wait, int(extra * NS / top) + 1)
        return wait

    def wait(self, is_write: bool) -> int:
        wait = 0
        for i in self.active()[2 if is_write else 1]:
            wait = max(wait, self.bucket_wait(i))
        return wait

    def account(self, is_write: bool, size: int) -> None:
        c = self.c
        op_size = c[OP_SIZE]
        units = size / op_size if op_size and size > op_size else 1.0
        for i in self.active()[2 if is_write else 1]:
            o = HEADER + 5 * i
            amount = float(size) if i < OPS_TOTAL else units
            c[o + LEVEL] += amount
            if c[o + LEN] > 1:
                c[o + BURST] += amount

    def request(self, is_write: bool, size: int, now_ns: int) -> int:
        """May a request of ``size`` bytes go at ``now_ns``?  0: yes, and it is accounted;
        otherwise the nanoseconds to wait before asking again (nothing accounted)."""
        self.leak(now_ns)
        wait = self.wait(is_write)
        if not wait:
            self.account(is_write, size)
        return wait


class ThrottleGroup:
    """A throttle group: its limits and buckets in a shared memfd mapping, and its lock.

    Made in the control process with :meth:`create`; a queue process maps the same state from
    the fd (:meth:`attach`).  ``clock`` returns nanoseconds (tests pass a fake one).
    """

    def __init__(self, name: str, fd: int,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.name = name
        self.fd = fd
        self.clock = clock
        self._map = mmap.mmap(fd, CELLS * 8, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._cells = memoryview(self._map).cast("d")
        self.buckets = Buckets(self._cells)
        self._lock = threading.Lock()
        #: Node names using this group (object-del is refused while any is).
        self.users: set[str] = set()

    @classmethod
    def create(cls, name: str, limits: Mapping[str, Any] | None = None,
               clock: Callable[[], int] = time.monotonic_ns) -> ThrottleGroup:
        """A new group with ``limits`` (ThrottleError, QEMU's words, if they are wrong)."""
        cfg = ThrottleConfig.empty().apply_limits(limits or {})
        fd = os.memfd_create(f"throttle-group-{name}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, CELLS * 8)
            group = cls(name, fd, clock)
        except BaseException:
            os.close(fd)
            raise
        group.buckets.configure(cfg, clock())
        return group

    @classmethod
    def attach(cls, name: str, fd: int,
               clock: Callable[[], int] = time.monotonic_ns) -> ThrottleGroup:
        """The group whose state ``fd`` (passed to another process) holds; takes ``fd``."""
        if os.fstat(fd).st_size < CELLS * 8:
            os.close(fd)
            raise ThrottleError(f"throttle group '{name}': its shared state is too small")
        return cls(name, fd, clock)

    def _locked(self) -> _GroupLock:
        return _GroupLock(self._lock, self.fd)

    def request(self, is_write: bool, size: int) -> int:
        """0 if a request may go now (and it is accounted), else nanoseconds to wait."""
        with self._locked():
            return self.buckets.request(is_write, size, self.clock())

    def add_held(self, ns: int, node: Cells | None = None) -> None:
        """Time a request of this group spent held: to the group's total and to ``node``'s
        counter (cell 0), all processes."""
        with self._locked():
            self._cells[HELD_NS] += ns
            if node is not None:
                node[0] += ns

    @property
    def held_ns(self) -> int:
        return int(self._cells[HELD_NS])

    @property
    def enabled(self) -> bool:
        return self.config().enabled()

    def config(self) -> ThrottleConfig:
        with self._locked():
            return self.buckets.config()

    def limits(self) -> dict[str, int]:
        """qom-get of ``limits``: every member of ThrottleLimits."""
        return self.config().to_limits()

    def set_limits(self, limits: Mapping[str, Any]) -> None:
        """qom-set of ``limits``: the given members change, the others stay (as in QEMU);
        ThrottleError and nothing changes if the result is not valid."""
        with self._locked():
            cfg = self.buckets.config().apply_limits(limits)
            self.buckets.configure(cfg, self.clock())

    def close(self) -> None:
        self._cells.release()
        self._map.close()
        os.close(self.fd)


class _GroupLock:
    """The thread lock, then the record lock on the memfd (another process may share it)."""

    __slots__ = ("fd", "lock")

    def __init__(self, lock: threading.Lock, fd: int) -> None:
        self.lock = lock
        self.fd = fd

    def __enter__(self) -> None:
        self.lock.acquire()
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX)
        except BaseException:
            self.lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)
        finally:
            self.lock.release()


def parse_group_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The limits of ``--object throttle-group``'s options (``id`` and ``qom-type`` removed by
    the caller): ``limits.KEY=N`` (or a ``limits`` dict, as JSON/QMP give it) and QSD's flat
    ``x-KEY=N`` form.  QSD accepts both for one key; here the later one wins."""
    limits: dict[str, Any] = {}
    for key, value in options.items():
        if key == "limits":
            if not isinstance(value, Mapping):
                raise ThrottleError("Invalid parameter type for 'limits', expected: object")
            items = list(value.items())
        elif key.startswith("limits."):
            items = [(key.removeprefix("limits."), value)]
        elif key.startswith("x-") and key[2:] in LIMIT_KEYS:
            items = [(key[2:], value)]
        else:
            raise ThrottleError(f"Property 'throttle-group.{key}' not found")
        for name, v in items:
            if name not in LIMIT_KEYS:
                raise ThrottleError(f"Property 'throttle-group.limits.{name}' not found")
            limits[name] = v
    return limits


#: QEMU's id_wellformed() (a letter, then letters, digits, '-', '.', '_'), with a length cap:
#: the id names the group's memfd, whose name the kernel limits to 249 bytes.
OBJECT_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,127}")


class ThrottleGroups:
    """The throttle-group objects of one server, by id (``--object``, ``object-add``)."""

    def __init__(self, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.groups: dict[str, ThrottleGroup] = {}
        self.clock = clock

    def add(self, group_id: str, options: Mapping[str, Any]) -> ThrottleGroup:
        """A new group from ``--object throttle-group``'s options without ``id``/``qom-type``
        (ThrottleError, QEMU's words, for a duplicate id or wrong limits)."""
        if not isinstance(group_id, str) or not OBJECT_ID.fullmatch(group_id):
            raise ThrottleError("Parameter 'id' expects an identifier")
        if group_id in self.groups:
            raise ThrottleError(f"attempt to add duplicate property '{group_id}' to object "
                                "(type 'container')")
        group = ThrottleGroup.create(group_id, parse_group_options(options), self.clock)
        self.groups[group_id] = group
        return group

    def get(self, group_id: str) -> ThrottleGroup | None:
        return self.groups.get(group_id)

    def delete(self, group_id: str, in_use: bool) -> None:
        """object-del: refused while a node names the group (``in_use``), as in QEMU."""
        group = self.groups.get(group_id)
        if group is None:
            raise ThrottleError(f"object '{group_id}' not found")
        if in_use or group.users:
            raise ThrottleError(f"object '{group_id}' is in use, can not be deleted")
        del self.groups[group_id]
        group.close()
