"""The operating-system calls the store and the benchmarks need, for Linux and macOS.

- cold reads, no page cache: Linux ``O_DIRECT`` into page-aligned buffers, else
  ``POSIX_FADV_DONTNEED`` after each read; macOS ``fcntl(F_NOCACHE)`` on the descriptor (reads bypass
  the unified buffer cache).
- dropping a file's cached pages: Linux ``POSIX_FADV_DONTNEED``; macOS cannot per file (``sudo purge``
  drops everything), which is reported, not faked.
- residency of mapped pages: ``mincore`` on both (the same ABI; 16 KB pages on Apple silicon).
- huge pages: Linux THP through ``madvise`` (``hugepages.py``); macOS none, skipped.
- RAM size: ``sysconf(SC_PHYS_PAGES)``, else ``sysctl hw.memsize`` on macOS.
- positioned scatter reads: ``os.preadv`` (macOS 11+), else a ``pread`` loop (``layouts/fileio.py``).

Everything here decides by ``sys.platform`` and the presence of the call at the time it is made, so
the test suite's macOS lane (tests/README.md) can take the Linux calls away and run the same code.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from moestream.layouts.fileio import preadv  # noqa: F401  (re-exported for the store)

log = logging.getLogger(__name__)

F_NOCACHE = 48  # <sys/fcntl.h> on macOS; Python's fcntl module does not name it before 3.13
_said: set[str] = set()


def _once(key: str, msg: str, *args) -> None:
    if key not in _said:
        _said.add(key)
        log.info(msg, *args)


def is_macos() -> bool:
    return sys.platform == "darwin"


def can_drop_cache() -> bool:
    """Whether a file's cached pages can be dropped (``POSIX_FADV_DONTNEED``)."""
    return hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_DONTNEED")


def drop_cached(fd: int, offset: int = 0, length: int = 0) -> bool:
    """Drop ``length`` bytes from ``offset`` (0, 0: the whole file) of ``fd`` from the page cache.
    Returns False where the platform has no such call (macOS), which is logged once."""
    if can_drop_cache():
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        return True
    _once("drop", "this platform cannot drop a file's pages from the cache (macOS: `sudo purge` drops all)")
    return False


def bypass_cache(fd: int) -> bool:
    """macOS: make reads through ``fd`` bypass the buffer cache (``F_NOCACHE``). Returns whether it took."""
    if not is_macos():
        return False
    import fcntl

    try:
        fcntl.fcntl(fd, getattr(fcntl, "F_NOCACHE", F_NOCACHE), 1)
        return True
    except OSError as e:
        _once("nocache", "F_NOCACHE refused (%s): reads go through the cache", e.strerror)
        return False


def open_direct(path: os.PathLike | str) -> int | None:
    """A descriptor whose reads skip the page cache and land in page-aligned buffers without a copy
    (Linux ``O_DIRECT``); None where the platform or the filesystem does not offer it."""
    flag = getattr(os, "O_DIRECT", None)
    if flag is None:
        return None
    try:
        return os.open(path, os.O_RDONLY | flag)
    except OSError as e:  # e.g. tmpfs
        _once(f"direct:{os.path.dirname(str(path))}", "O_DIRECT unavailable for %s (%s)", path, e.strerror)
        return None


def open_uncached(path: os.PathLike | str) -> tuple[int, bool]:
    """A descriptor for cold reads and whether it reads with ``O_DIRECT`` (then buffers must be
    page-aligned): ``O_DIRECT`` on Linux where the filesystem allows, ``F_NOCACHE`` on macOS, else a
    plain descriptor (whose reads the caller drops with :func:`drop_cached`)."""
    fd = open_direct(path)
    if fd is not None:
        return fd, True
    fd = os.open(path, os.O_RDONLY)
    bypass_cache(fd)
    return fd, False


def ram_bytes() -> int:
    """Physical memory in bytes (16 GiB when it cannot be told)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    if is_macos():
        try:
            return int(subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True).stdout)
        except (OSError, ValueError):
            pass
    return 16 << 30


def cpu_count() -> int:
    """Cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
