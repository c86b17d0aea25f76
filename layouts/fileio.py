"""Positioned reads into caller buffers, on every platform the packs run on.

``os.preadv`` scatters one read into several buffers without copying; it exists on Linux and on
macOS 11 and later (with a Python built for it). Where it is missing, each buffer is filled by its
own ``os.pread`` and copied in: correct, one copy slower.
"""

from __future__ import annotations

import os


def preadv(fd: int, buffers: list, offset: int) -> int:
    """Read into ``buffers`` (writable buffer objects, in order) from ``offset``; returns the bytes
    read, fewer than their total only at the end of the file."""
    fn = getattr(os, "preadv", None)
    if fn is not None:
        return fn(fd, buffers, offset)
    done = 0
    for b in buffers:
        view = memoryview(b).cast("B")
        while view.nbytes:
            got = os.pread(fd, view.nbytes, offset + done)
            if not got:  # end of file
                return done
            view[: len(got)] = got
            done += len(got)
            view = view[len(got) :]
    return done
