"""Runtime: load a pack on MLX and run it, reading only the routed experts from disk.

- :func:`load` -> :class:`Runtime` (mlx-lm model with streamed experts, tokenizer, expert store)
- :func:`generate` streams text with statistics; :func:`evaluate` scores perplexity and KL
- :func:`~moestream.runtime.loader.load_resident_model`: the same pack with every expert in RAM
"""

import os

# numba's OpenMP workers (libgomp, read when numba first starts them) spin between parallel regions
# by default, taking the two cores the expert reader threads need: passive waiting made cold decode
# 1.17x and cold prefill 1.5x faster here (benchmarks/RESULTS.md). A user's own setting is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .evaluate import evaluate  # noqa: E402
from .generate import GenerationStats, generate  # noqa: E402
from .model import Runtime, load  # noqa: E402

__all__ = ["load", "Runtime", "generate", "GenerationStats", "evaluate"]
