"""``vhost-user-blk`` / ``python -m storage_daemon``: serve a disk image to QEMU over vhost-user.

Option names follow qemu-storage-daemon's vhost-user-blk export where they overlap
(``num-queues``, ``logical-block-size``, ``addr.path`` -> ``--socket``, ``addr.type=fd`` ->
``--fd``).  Every user error is one line on stderr and exit status 2; SIGTERM and SIGINT finish
the requests in flight, flush the image and exit 0.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shlex
import signal
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from blockdev.backends import open_storage
from blockdev.disk import Disk, DiskError, parse_size
from blockdev.engine import ENGINES, EngineUnavailable, choose_engine
from blockdev.image_lock import ImageLockError, lock_image
from blockdev.images import FORMATS
from blockdev.images import create as create_by_format
from blockdev.nodes import BlockGraph
from blockdev.spec import FileSpec, SpecError, parse_image
from blockdev.storage import FileStorage, Storage, StorageError
from blockdev.throttle_filter import ThrottleStorage
from storage_daemon import throttle_qmp
from storage_daemon.export import BlockExport
from storage_daemon.exports import ExportError, ExportSet
from storage_daemon.metrics import parse_address
from storage_daemon.objects import ObjectRegistry
from storage_daemon.plane import ControlError, ControlPlane
from storage_daemon.qsd_options import ExportOptions, UsageError, declare, parse_monitors
from vhost.daemon import DaemonError, VhostUserDaemon
from vhost.device import MAX_QUEUES
from vhost.queue.base import QueueError
from vhost.queue.split import validate_size
from vhost.runner.workerpool import PoolRunner
from virtio_blk import core as cores
from virtio_blk.device import BlkDevice
from virtio_blk.request import ID_BYTES, check_serial

log = logging.getLogger("vhost-user-blk")

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + line
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")

    def convert_arg_line_to_args(self, arg_line: str) -> list[str]:
        """``@FILE`` argument files: each line split as a shell would (quotes kept whole),
        ``#`` comments and blank lines skipped -- so a line reads ``--blockdev driver=...``."""
        try:
            return shlex.split(arg_line, comments=True)
        except ValueError as exc:
            self.error(f"argument file line {arg_line.strip()!r}: {exc}")


def _positive(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be positive")
    return value


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _address(text: str) -> tuple[str, int]:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _qmp_name(text: str) -> str:
    """QEMU's rule for ids and node names: a letter, then letters, digits, '-', '.', '_'."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]{0,30}", text):
        raise argparse.ArgumentTypeError(
            f"{text!r} must start with a letter and contain only letters, digits, '-', '.' "
            "and '_' (at most 31 characters)")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="vhost-user-blk",
        description="Serve disk images to QEMU's vhost-user-blk-pci over Unix sockets: one "
        "with --socket/--image, or any number with qemu-storage-daemon's --blockdev/--export. "
        "@FILE reads more arguments from FILE (shell quoting, one or more per line, # "
        "comments).",
        fromfile_prefix_chars="@",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH", help="Unix socket to listen on (mode 0600)")
    where.add_argument("--fd", type=int, metavar="N",
                       help="an already-listening Unix socket fd (socket activation)")
    p.add_argument("--image", metavar="IMG",
                   help="raw image file or block device, rbd:POOL/IMAGE[@SNAP][:conf=PATH]"
                   "[:id=USER], nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH")
    p.add_argument("--create", type=_size, metavar="SIZE",
                   help="create IMG as a sparse raw image of SIZE (e.g. 1G) if it does not exist")
    p.add_argument("--format", choices=FORMATS, default="raw",
                   help="image format (default raw; never guessed from the image's bytes)")
    p.add_argument("--backing", metavar="FILE",
                   help="with --create --format qcow2: make IMG an overlay of FILE (a relative "
                        "name is resolved against IMG's directory)")
    p.add_argument("--backing-format", choices=FORMATS, metavar="FMT",
                   help="format of --backing: raw or qcow2")
    p.add_argument("--backing-dir", action="append", default=[], metavar="DIR",
                   help="qcow2: a directory backing files may also come from (repeatable; "
                        "by default only IMG's own directory: see blockdev/qcow2/README.md)")
    p.add_argument("--num-queues", type=_positive, default=1, metavar="N",
                   help=f"number of request queues, up to {MAX_QUEUES} (default 1)")
    p.add_argument("--read-only", action="store_true", help="export read-only")
    p.add_argument("--direct", action="store_true",
                   help="open with O_DIRECT (like cache.direct=on), bypassing the host page cache")
    p.add_argument("--logical-block-size", type=int, choices=(512, 4096), default=512,
                   help="logical block size the guest sees (default 512)")
    p.add_argument("--serial", default="",
                   help=f"device ID string (GET_ID), up to {ID_BYTES} ASCII characters")
    p.add_argument("--queue-size", type=_positive, default=1024, metavar="N",
                   help="largest virtqueue size accepted (default 1024)")
    p.add_argument("--aio", choices=ENGINES,
                   help="IO engine (default: io_uring where the kernel allows it, else threads "
                        "with a warning; io_uring asked for and unavailable is an error)")
    p.add_argument("--io-threads", type=_positive, default=16, metavar="N",
                   help="IO threads per queue for --aio threads (default 16)")
    p.add_argument("--bounce-pages", type=_positive, default=2048, metavar="N",
                   help="bounce buffer budget per queue, in 4 KiB pages (default 2048 = 8 MiB)")
    p.add_argument("--qmp", metavar="PATH",
                   help="QMP control socket to listen on (mode 0600): query-blockstats, "
                   "block_resize, quit...")
    p.add_argument("--metrics", type=_address, metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics")
    p.add_argument("--node-name", type=_qmp_name, default="disk0", metavar="NAME",
                   help="the disk's node name in QMP (block_resize, query-blockstats; "
                   "default disk0)")
    p.add_argument("--export-id", type=_qmp_name, default="export0", metavar="ID",
                   help="the export's id in QMP (query-block-exports; default export0)")
    p.add_argument("--locking", choices=("auto", "on", "off"), default="auto",
                   help="lock the image as QEMU does (file.locking): a second server, QEMU or "
                        "qemu-storage-daemon on it is refused; 'off' lets a migration source "
                        "and destination share it; 'auto' (default) is 'on' where the file "
                        "system has OFD locks")
    p.add_argument("--fast-path", choices=("on", "off"), default="on",
                   help="start reads and writes in the shapes Linux sends without the generic "
                        "request machinery (default on; off: every request takes the generic "
                        "path)")
    p.add_argument("--queue-processes", choices=("auto", "on", "off", "pool"), default="auto",
                   help="on: serve each queue in a process of its own; pool: every queue "
                        "on a fixed pool of worker processes (--workers); off: one thread per "
                        "queue; auto (default): the pool when there is more than one queue "
                        "(of a raw image file), threads otherwise")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="with --queue-processes pool: how many worker processes serve the "
                        "queues (default: one per two cores this process may use, at least one)")
    p.add_argument("--rebalance-interval", type=float, default=2.0, metavar="SECONDS",
                   help="with --queue-processes pool: how often the load of the workers is "
                        "compared and a busy worker's queue moved to an idle one (default 2; "
                        "0: never -- the check is the daemon's one timer)")
    p.add_argument("--reconnect-delay", type=float, default=30.0, metavar="SECONDS",
                   help="RBD/NBD: how long requests wait for a lost connection to come back "
                   "before failing (default 30)")
    # qemu-storage-daemon's form (storage_daemon.qsd_options), instead of --socket/--image.
    p.add_argument("--blockdev", action="append", default=[], metavar="OPTIONS",
                   help="a block node, QSD's syntax: driver=file|raw|qcow2|rbd|nbd|python|"
                   "delay|error|log|throttle,node-name=N,... or JSON (repeatable)")
    p.add_argument("--export", action="append", default=[], metavar="OPTIONS",
                   help="type=vhost-user-blk,id=E,node-name=N,addr.type=unix,addr.path=SOCK"
                   "[,writable=on][,num-queues=K][,logical-block-size=B] (repeatable: one "
                   "socket each)")
    p.add_argument("--object", action="append", default=[], metavar="OPTIONS",
                   help="qom-type,id=ID,...: an object (QEMU's --object), e.g. throttle-group,id=G,"
                   "limits.iops-total=N,... (QEMU's ThrottleLimits) for driver=throttle nodes")
    p.add_argument("--chardev", action="append", default=[], metavar="OPTIONS",
                   help="socket,id=ID,path=PATH,server=on,wait=off: a QMP socket for "
                   "--monitor (repeatable)")
    p.add_argument("--monitor", action="append", default=[], metavar="OPTIONS",
                   help="chardev=ID[,mode=control]: serve QMP on that --chardev (repeatable)")
    p.add_argument("--pidfile", metavar="PATH",
                   help="write the server's pid to PATH (removed at exit)")
    p.add_argument("--daemonize", action="store_true",
                   help="run in the background: the command exits 0 once every export "
                   "listens (1 if the server failed to start; the error is on stderr)")
    p.add_argument("--log-level", default="info",
                   choices=("debug", "info", "warning", "error", "critical"),
                   help="log level (default info)")
    return p


def _qsd_form(args: argparse.Namespace) -> bool:
    """qemu-storage-daemon's options rather than --socket/--image (a QSD form server may start
    with a monitor only, and get its nodes and exports over QMP)."""
    return bool(args.blockdev or args.export or (
        args.monitor and args.socket is None and args.fd is None and args.image is None))


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with options argparse cannot judge alone, by the rules of the layers that
    enforce them (so the command line and the running server never disagree)."""
    if _qsd_form(args):
        if not args.export and not args.monitor:
            # QSD starts with no export when a monitor can add them; without one, nothing
            # would ever be served.
            return "--blockdev needs an --export to serve (or a --monitor to add one)"
        if args.socket is not None or args.fd is not None or args.image is not None:
            return "--blockdev/--export replace --socket/--fd/--image: use one form or the other"
        if args.create is not None:
            return "--create makes the --image of the short form; create it first (qemu-img)"
    else:
        if args.socket is None and args.fd is None:
            return "one of the arguments --socket --fd is required"
        if args.image is None:
            return "the following arguments are required: --image"
    if args.num_queues > MAX_QUEUES:
        return f"--num-queues {args.num_queues}: at most {MAX_QUEUES} queues"
    try:
        validate_size(args.queue_size)
    except QueueError as exc:
        return f"--queue-size: {exc}"
    try:
        check_serial(args.serial)
    except ValueError as exc:
        return f"--serial: {exc}"
    if args.fd is not None and args.fd < 0:
        return f"--fd {args.fd} is not a file descriptor"
    if args.backing is not None and (args.create is None or args.format != "qcow2"):
        return "--backing needs --create SIZE --format qcow2"
    if (args.backing is None) != (args.backing_format is None):
        return "--backing and --backing-format go together"
    if not 0 <= args.reconnect_delay <= 24 * 3600:
        return f"--reconnect-delay {args.reconnect_delay}: want 0 to 86400 seconds"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    prog = "vhost-user-blk"

    def fail(message: str) -> int:
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_USAGE

    problem = check_args(args)
    if problem:
        return fail(problem)
    try:
        args.aio = choose_engine(args.aio)
    except EngineUnavailable as exc:
        return fail(str(exc))
    try:
        core_line = cores.describe()  # (which core runs: logged once the exports serve)
    except cores.CoreUnavailable as exc:
        return fail(str(exc))
    qsd_form = _qsd_form(args)
    # Objects first, as QSD creates them: a throttle node names its group, which must be in
    # the graph the node is declared in (the ExportSet's, which QMP adds to later).
    graph = BlockGraph()
    objects = ObjectRegistry()
    throttle_qmp.register_type(objects, graph)
    try:
        for text in args.object:
            objects.add_option(text)
        monitors = parse_monitors(args.chardev, args.monitor)
        export_options = (declare(args.blockdev, args.export, MAX_QUEUES, graph)[1]
                          if qsd_form else [])
    except (UsageError, ValueError) as exc:
        return fail(str(exc))
    ready: int | None = None
    if args.daemonize:
        # Before any thread or open file of ours: the child does all the work, the parent
        # only waits to hear that the exports listen (QSD's --daemonize).
        ready = _daemonize()

    if args.workers is not None and not 1 <= args.workers <= 1024:
        return fail(f"--workers {args.workers}: must be 1 to 1024")
    if not 0 <= args.rebalance_interval <= 3600:
        return fail(f"--rebalance-interval {args.rebalance_interval}: must be 0 to 3600")
    #: The worker pool every pooled export's queues share (made when the first one needs it).
    pools: list[PoolRunner] = []

    def make_device(storage: Storage, opts: ExportOptions) -> BlkDevice:
        raw_file = isinstance(storage, FileStorage) and isinstance(storage.disk, Disk)
        # A throttle node over a raw file goes where the file would: its queues, in queue
        # processes or pool workers, rebuild the filter from BlkDevice.process_recipe on the
        # group's one budget in shared memory (test_throttle_cli measures both).
        if isinstance(storage, ThrottleStorage):
            child = storage.child
            raw_file = isinstance(child, FileStorage) and isinstance(child.disk, Disk)
        if args.queue_processes in ("on", "pool") and not raw_file:
            raise ValueError(f"--queue-processes {args.queue_processes} serves raw image files "
                             "only (or a throttle node over one)")
        # More than one queue: the pool, which served 2 queues faster and with less CPU per
        # request than a process per queue (benchmarks.inprocess, README), in fewer processes,
        # and whose workers serve the queues of every export.
        mode = args.queue_processes
        if mode == "auto" and opts.num_queues > 1 and raw_file:
            mode = "pool"
        device = BlkDevice(
            storage,
            num_queues=opts.num_queues,
            max_queue_size=args.queue_size,
            serial=args.serial,
            engine=args.aio,
            io_threads=args.io_threads,
            bounce_pages=args.bounce_pages,
            fast_path=args.fast_path == "on",
            queue_processes={"auto": None, "on": True, "off": False, "pool": True}[mode],
            # Two clock reads per request, only when someone can read the result.
            latency_accounting=bool(args.qmp or monitors or args.metrics),
        )
        if mode == "pool":
            if not pools:
                pools.append(PoolRunner(args.workers))
                if args.rebalance_interval > 0:
                    pools[0].start_rebalancing(args.rebalance_interval)
            device.queue_pool = pools[0]
        return device

    exports = ExportSet(make_device, graph, io_threads=args.io_threads)

    def close_exports() -> None:
        """Close every export, then the pool that served their queues."""
        exports.close()
        for pool in pools:
            pool.close()

    try:
        if qsd_form:
            for opts in export_options:
                exports.add(opts)
        else:
            exports.insert(_short_form_export(args, make_device))
    except (DiskError, SpecError, StorageError, UsageError, ExportError, DaemonError,
            ValueError) as exc:
        close_exports()
        return fail(str(exc))
    qmp_paths = [("--qmp", args.qmp)] if args.qmp else []
    qmp_paths += [(f"--chardev id={m.chardev}", m.path) for m in monitors]
    try:
        control = ControlPlane(exports, qmp_paths=qmp_paths, metrics_address=args.metrics,
                               quit=exports.shutdown, objects=objects)
    except ControlError as exc:
        close_exports()
        return fail(str(exc))
    if args.pidfile is not None:
        try:
            _write_pidfile(args.pidfile)
        except OSError as exc:
            control.stop()
            close_exports()
            return fail(f"Cannot write pid file '{args.pidfile}': {exc.strerror or exc}")

    def on_signal(signum: int, _frame: object) -> None:
        log.info("%s: finishing requests in flight and exiting", signal.Signals(signum).name)
        exports.shutdown()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("%s", core_line)
    for export in exports.exports():
        device = export.device
        info = device.storage.info
        log.info(
            "export %s serving %s (%d bytes, %s, %d-byte blocks, %s%s) on %s: %d queue(s), "
            "aio=%s, features %s", export.export_id,
            args.image if not qsd_form else f"node {export.node_name}", info.size,
            args.format if not qsd_form else graph.nodes[export.node_name].driver,
            info.logical_block_size,
            "read-only" if info.read_only else "read-write", ", O_DIRECT" if info.direct else "",
            export.daemon.address, device.num_queues, args.aio,
            "|".join(device.feature_names()),
        )
    try:
        control.start()
        if ready is not None:
            _detach(ready)
        exports.serve_forever()
    finally:
        exports.close()
        control.stop()
        for pool in pools:  # after the exports: their queues have stopped
            pool.close()
        if args.pidfile is not None:
            with contextlib.suppress(OSError):
                os.unlink(args.pidfile)
    return 1 if exports.failed_close else 0


def _short_form_export(args: argparse.Namespace,
                       make_device: Callable[[Storage, ExportOptions], BlkDevice]
                       ) -> BlockExport:
    """``--socket/--image``: one export, opened as the options say (errors raised, one line)."""
    if args.create is not None:
        if not isinstance(parse_image(args.image), FileSpec):
            raise UsageError(f"--create makes image files; {args.image} is not one")
        if create_by_format(args.image, args.create, args.format, args.backing,
                            args.backing_format, args.backing_dir):
            log.info("created %s (%s, %d bytes)", args.image, args.format, args.create)
    storage = open_storage(args.image, fmt=args.format, read_only=args.read_only,
                           direct=args.direct, logical_block_size=args.logical_block_size,
                           engine=args.aio, io_threads=args.io_threads,
                           reconnect_delay=args.reconnect_delay, backing_dirs=args.backing_dir)
    try:
        # Files are locked as QEMU locks them; an RBD image has its own exclusive lock, an NBD
        # server decides who may connect.
        if args.locking != "off" and isinstance(storage, FileStorage):
            try:
                lock_image(storage.disk.fd, args.image, writable=not args.read_only)
            except ImageLockError as exc:
                if not (exc.unsupported and args.locking == "auto"):
                    raise UsageError(str(exc)) from None
                log.warning("%s; serving it unlocked", exc)
        opts = ExportOptions(args.export_id, args.node_name, args.socket, args.fd,
                             not args.read_only, args.num_queues, args.logical_block_size)
        device = make_device(storage, opts)
        daemon = VhostUserDaemon(device, args.socket, listen_fd=args.fd)
    except BaseException:
        storage.close()
        raise
    return BlockExport(args.export_id, args.node_name, device, daemon, storage)


def _write_pidfile(path: str) -> None:
    """QEMU's pid file: our pid and a newline, written whole (a reader never sees half)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)


def _daemonize() -> int:
    """Fork; the parent waits for the child's word that it serves and exits 0 (1 if the
    child failed first: it has said why on the shared stderr).  Returns, in the child, the fd
    to write that word to (:func:`_detach`)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        with os.fdopen(r, "rb") as f:
            word = f.read(1)
        os._exit(0 if word == b"1" else 1)
    os.close(r)
    os.setsid()
    return w


def _detach(ready: int) -> None:
    """Tell the waiting parent we serve, and let go of the terminal (stdin/stdout go to
    /dev/null; stderr stays: it is where the log goes, redirect it to keep it)."""
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    os.write(ready, b"1")
    os.close(ready)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
