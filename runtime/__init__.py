"""Runtime: load a pack on MLX and run it, reading only the routed experts from disk.

- :func:`load` -> :class:`Runtime` (mlx-lm model with streamed experts, tokenizer, expert store)
- :func:`generate` streams text with statistics; :func:`evaluate` scores perplexity and KL
- :func:`~moestream.runtime.model.build.load_resident_model`: the same pack with every expert in RAM
"""

# (OpenMP's wait policy is set by the package, on the first import of anything in moestream.)
from moestream.runtime.evaluate import evaluate
from moestream.runtime.generate import GenerationStats, generate
from moestream.runtime.model.runtime import Runtime, load

__all__ = ["load", "Runtime", "generate", "GenerationStats", "evaluate"]
