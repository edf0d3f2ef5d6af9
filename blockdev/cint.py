"""Integer argument types for ctypes prototypes that refuse what the C type cannot hold.

ctypes converts a Python int to ``c_uint64``/``c_int64``/``c_size_t``/``c_int`` by masking: no
error, the high bits are dropped.  ``rbd_resize(image, 2**64)`` is ``rbd_resize(image, 0)`` --
an emptied volume -- and a negative offset becomes a huge one.  The types here are the same C
types with a ``from_param`` that checks the value first: an int (not a bool, not a float) in the
type's range, else the call is never made and ctypes raises :class:`ctypes.ArgumentError`
naming the argument.  Callers validate sizes and offsets themselves (the disk-range and growth
rules); these types make a slip there an exception instead of silent damage.

One conversion costs about 0.1 us more than the plain type's.
"""

from __future__ import annotations

import ctypes
from typing import Any


def int_range(ctype: Any) -> tuple[int, int]:
    """(lowest, highest) value of the C integer type ``ctype``."""
    bits = ctypes.sizeof(ctype) * 8
    if ctype(-1).value < 0:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def checked(ctype: Any, name: str) -> Any:
    """A subclass of the ctypes integer type ``ctype`` (C's ``name``, for errors) whose
    arguments are range-checked."""
    low, high = int_range(ctype)

    def from_param(cls: Any, value: object) -> Any:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{value!r} is not an integer")
        if not low <= value <= high:
            raise OverflowError(f"{value} is outside {name}'s range {low}..{high}")
        return ctype(value)

    attrs = {"from_param": classmethod(from_param), "checked_range": (low, high)}
    return type(f"checked_{ctype.__name__}", (ctype,), attrs)


INT = checked(ctypes.c_int, "int")
UINT32 = checked(ctypes.c_uint32, "uint32_t")
INT64 = checked(ctypes.c_int64, "int64_t")
UINT64 = checked(ctypes.c_uint64, "uint64_t")
SIZE_T = checked(ctypes.c_size_t, "size_t")
