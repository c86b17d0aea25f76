"""Runtime: load a pack on MLX and run it, reading only the routed experts from disk.

- :func:`load` -> :class:`Runtime` (mlx-lm model with streamed experts, tokenizer, expert store)
- :func:`generate` streams text with statistics; :func:`evaluate` scores perplexity and KL
- :func:`~moestream.runtime.loader.load_resident_model`: the same pack with every expert in RAM
"""

# (OpenMP's wait policy is set by the package, on the first import of anything in moestream.)
from .evaluate import evaluate
from .generate import GenerationStats, generate
from .model import Runtime, load

__all__ = ["load", "Runtime", "generate", "GenerationStats", "evaluate"]
