"""The qcow2 format driver: a qcow2 image served through the same interface as a raw Disk."""

from blockdev.qcow2.disk import Qcow2Disk
from blockdev.qcow2.format import Qcow2OpenError, create
from blockdev.qcow2.image import Qcow2Image
from blockdev.qcow2.refcounts import CorruptImage

__all__ = ["CorruptImage", "Qcow2Disk", "Qcow2Image", "Qcow2OpenError", "create"]
