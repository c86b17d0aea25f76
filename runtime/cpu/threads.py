"""OpenMP's wait policy for the numba kernels' worker threads.

numba's OpenMP workers spin between parallel regions by default, taking the cores the expert reader
threads need: passive waiting made cold decode 1.17x and cold prefill 1.5x faster on a 2-core machine
(docs/benchmarks.md). libgomp reads ``OMP_WAIT_POLICY`` once, when it is loaded, and torch,
mlx-lm (through torch, where torch is installed) each load one: so the CLI, the benchmark scripts and
the test suite call :func:`prefer_passive_wait` before anything else, and :func:`~moestream.runtime.load`
calls it too (effective where nothing has loaded libgomp yet, e.g. without torch; else it warns once).
A user's own setting is kept; importing moestream changes nothing.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)
_WARNED = False


def _libgomp_loaded() -> bool:
    if not sys.platform.startswith("linux"):
        return False  # no /proc (macOS): numba uses its own threading layer there unless told otherwise
    try:
        with open("/proc/self/maps") as f:
            return any("libgomp" in line for line in f)
    except OSError:  # no /proc (macOS): numba uses its own threading layer there unless told otherwise
        return False


def prefer_passive_wait() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the user set it; returns whether it takes effect (False
    when libgomp was loaded before, which is logged once)."""
    if "OMP_WAIT_POLICY" in os.environ:
        return os.environ["OMP_WAIT_POLICY"].upper() == "PASSIVE"
    if _libgomp_loaded():
        global _WARNED
        if not _WARNED:
            log.warning(
                "libgomp was loaded before moestream's kernels: OMP_WAIT_POLICY=PASSIVE comes too late for "
                "it (set the variable, or call moestream.runtime.cpu.threads.prefer_passive_wait() first)"
            )
        _WARNED = True
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
