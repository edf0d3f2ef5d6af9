"""Throw-away remote storage on this machine, for the tests and ``benchmarks.remote``: a one-node
Ceph cluster (one monitor, one memstore OSD, on 127.0.0.1) and NBD servers (qemu-nbd, nbdkit)
on a Unix socket or 127.0.0.1.  Loopback only; every process is stopped by its owner."""

from remote_testbed.ceph import CephCluster, missing_binaries
from remote_testbed.nbd_servers import NbdServer, free_port, missing

__all__ = ["CephCluster", "NbdServer", "free_port", "missing", "missing_binaries"]
