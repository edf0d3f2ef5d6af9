"""Storage written in Python: a class with ``size``/``pread`` (and optionally more) as a disk.

See :mod:`.storage` for the protocol and README.md ("Storage written in Python").
"""
