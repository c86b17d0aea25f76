"""moestream: run frontier-scale Mixture-of-Experts models by streaming experts from SSD.

The namespace maps the project's top-level folders: ``moestream.layouts`` (the pack format),
``moestream.quant`` (group quantization and error metrics), ``moestream.convert`` (Hugging Face
checkpoint -> pack), ``moestream.runtime`` and ``moestream.metal``. The CLI lives in
``moestream.main``.
"""

__version__ = "0.1.0"

import logging as _logging
import os as _os


def _libgomp_loaded() -> bool:
    try:
        with open("/proc/self/maps") as f:
            return any("libgomp" in line for line in f)
    except OSError:
        return False


# numba's OpenMP workers spin between parallel regions by default, taking the two cores the expert
# reader threads need: passive waiting made cold decode 1.17x and cold prefill 1.5x faster on the
# session-6 machine (benchmarks/RESULTS.md). libgomp reads the variable once, when it is loaded, and
# torch, transformers and mlx_lm's tokenizers each load one: so it is set here, on the first import
# of anything in moestream (for the whole process: torch's threads see it too). A user's own setting
# is kept.
if "OMP_WAIT_POLICY" not in _os.environ:
    if _libgomp_loaded():
        _logging.getLogger(__name__).warning("libgomp was loaded before moestream: OMP_WAIT_POLICY=PASSIVE comes too "
                                             "late for it (import moestream first, or set the variable)")
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
