"""A RAM disk: the smallest useful plugin (``--blockdev driver=python,module=ramdisk,...``)."""

API_VERSION = 1


class RamDisk:
    """``size`` bytes of memory (e.g. ``size=64M``), zeros at first, gone at exit."""

    thread_model = "parallel"  # slices of a bytearray: nothing to lock

    def __init__(self, size: str = "64M") -> None:
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        scale = units.get(size[-1:].upper(), 1)
        self.data = bytearray(int(size.rstrip("KkMmGg")) * scale)

    def size(self) -> int:
        return len(self.data)

    def pread(self, buf: memoryview, offset: int) -> None:
        buf[:] = self.data[offset:offset + len(buf)]

    def pwrite(self, buf: memoryview, offset: int) -> None:
        self.data[offset:offset + len(buf)] = buf

    def zero(self, offset: int, length: int) -> None:
        self.data[offset:offset + length] = bytes(length)

    trim = zero  # memory cannot be handed back piecewise; a trimmed range reads as zeros
