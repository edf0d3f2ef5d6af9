"""The qcow2 format driver: a qcow2 image served through the same interface as a raw Disk."""

from .disk import Qcow2Disk
from .format import Qcow2OpenError, create
from .image import Qcow2Image
from .refcounts import CorruptImage

__all__ = ["CorruptImage", "Qcow2Disk", "Qcow2Image", "Qcow2OpenError", "create"]
