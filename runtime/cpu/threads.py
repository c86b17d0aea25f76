"""OpenMP's wait policy for the numba kernels' worker threads, chosen by core count.

Between parallel regions numba's OpenMP workers either spin or sleep. Sleeping (``PASSIVE``) leaves
the cores to the expert reader threads, which cold streaming, prefill most of all, needs on a machine
of few cores. But each region then starts by waking every worker, and a decoded token runs several
hundred small regions: there a bounded spin decodes faster, the more so the more workers there are to
wake (docs/benchmarks.md has the measurements). So: below :data:`SPIN_MIN_CORES` cores, where the
readers have no core to spare, ``PASSIVE``; from :data:`SPIN_MIN_CORES` on, libgomp's bounded spin
(``GOMP_SPINCOUNT`` iterations, then sleep), which keeps workers awake through a token's regions and
lets them sleep when the process waits longer (between requests, on the disk).

libgomp reads these variables once, when it is loaded, and torch, mlx-lm (through torch, where torch
is installed) each load one: so the CLI, the benchmark scripts and the test suite call
:func:`prefer_passive_wait` before anything else, and :func:`~moestream.runtime.load` calls it too
(effective where nothing has loaded libgomp yet, e.g. without torch; else it warns once). A user's
own ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is kept; importing moestream changes nothing.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)
_WARNED = False
SPIN_MIN_CORES = 5  # from here on the workers spin briefly between regions
SPIN_COUNT = "300000"  # libgomp's own default: a fraction of a millisecond, then the futex


def _libgomp_loaded() -> bool:
    try:
        with open("/proc/self/maps") as f:
            return any("libgomp" in line for line in f)
    except OSError:  # no /proc (macOS): numba uses its own threading layer there unless told otherwise
        return False


def wait_policy(cores: int | None = None) -> dict[str, str]:
    """The variables :func:`prefer_passive_wait` sets on a machine of ``cores`` (None: this one's)."""
    cores = cores or os.cpu_count() or 1
    return {"OMP_WAIT_POLICY": "PASSIVE"} if cores < SPIN_MIN_CORES else {"GOMP_SPINCOUNT": SPIN_COUNT}


def prefer_passive_wait(cores: int | None = None) -> bool:
    """Set the wait policy for this machine's core count (:func:`wait_policy`) unless the user set
    ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``; returns whether workers wait passively from now on
    (False with a spin, and when libgomp was loaded before, which is logged once)."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
    if _libgomp_loaded():
        global _WARNED
        if not _WARNED:
            log.warning(
                "libgomp was loaded before moestream's kernels: its wait policy comes too late for it (set "
                "OMP_WAIT_POLICY, or call moestream.runtime.cpu.threads.prefer_passive_wait() first)"
            )
        _WARNED = True
        return False
    env = wait_policy(cores)
    os.environ.update(env)
    return env.get("OMP_WAIT_POLICY") == "PASSIVE"
