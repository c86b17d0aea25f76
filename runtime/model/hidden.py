"""A holder that keeps a value outside MLX's parameter tree."""

from __future__ import annotations

import mlx.nn as nn


class Hidden:
    """Holds a module outside MLX's parameter tree (its weights are swapped in per call)."""

    def __init__(self, module: nn.Module):
        self.module = module
