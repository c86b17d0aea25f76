"""The macOS lane: run tests with the Linux-only OS calls taken away and ``sys.platform == "darwin"``.

``MOESTREAM_EMULATE_DARWIN=1 python -m pytest -q <tests>`` (``.ci/run`` runs it over the runtime,
store, bench, serve and CLI tests). The third-party stack (numpy, numba, MLX, mlx-lm, torch,
transformers) is imported first, as on Linux; then ``os.posix_fadvise``, ``os.POSIX_FADV_DONTNEED``,
``os.O_DIRECT``, ``os.preadv`` and ``os.sched_getaffinity`` are deleted and ``sys.platform`` becomes
``"darwin"``, so moestream's own code takes its macOS paths (``F_NOCACHE`` reads, no page dropping,
no huge pages, no ``/proc``, the ``pread`` loop). What cannot be emulated: the ``F_NOCACHE`` fcntl
itself (Linux refuses the command, which the code logs and survives) and Metal. Subprocesses the
tests start run as Linux.
"""

from __future__ import annotations

import os
import sys

EMULATE_DARWIN = os.environ.get("MOESTREAM_EMULATE_DARWIN") == "1"
REMOVED = ("posix_fadvise", "POSIX_FADV_DONTNEED", "O_DIRECT", "preadv", "sched_getaffinity")


def emulate_darwin() -> None:
    import importlib
    import sysconfig

    sysconfig.get_config_vars()  # cached now: it looks for a darwin build's data otherwise
    for name in (
        "numpy",
        "numpy.testing",
        "numba",
        "mlx.core",
        "mlx.nn",
        "mlx_lm",
        "mlx_lm.server",
        "torch",
        "transformers",
        "safetensors.numpy",
        "openai",
        "click.testing",
        "psutil",
    ):
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    for name in REMOVED:
        if hasattr(os, name):
            delattr(os, name)
    sys.platform = "darwin"
