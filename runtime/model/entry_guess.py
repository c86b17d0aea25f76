"""Prefill's guess at a MoE layer's entry: which experts the chunk will route to, read before its attention."""

from __future__ import annotations

from typing import Callable

import numpy as np

from moestream.runtime.model.blocks import get_experts_per_token
from moestream.runtime.model.patches import hook_call
from moestream.runtime.model.streamed import router_of


class EntryGuess:
    """Called with a MoE layer's input (before its attention): on a chunk large enough that most
    experts will be routed to (tokens x k >= experts), guesses which ones by applying the layer's
    router to the normalized input (the residual stream changes little within a layer) and starts
    their reads. A router that is not a plain linear (DeepSeek's grouped gate): every expert, in order.
    """

    def __init__(self, guess: Callable[[int, list[int]], None], layer: int, block, norm, num_experts: int):
        self._guess, self.layer, self._block, self._norm, self._n = guess, layer, block, norm, num_experts

    def __call__(self, h, normed: bool = False) -> None:
        """``h``: the layer's input (the residual stream); ``normed``: already normalized (the previous
        MoE layer's input, when that layer makes the guess for this one)."""
        import mlx.core as mx

        tokens = h.size // h.shape[-1]
        k = get_experts_per_token(self._block)
        if tokens * k < self._n:
            return
        router = router_of(self._block)
        if router is None:
            self._guess(self.layer, list(range(self._n)))
            return
        x = self._norm(h) if self._norm is not None and not normed else h
        logits = np.array(router(x).astype(mx.float32)).reshape(tokens, -1)[:, : self._n]
        top = np.argpartition(-logits, k - 1, axis=-1)[:, :k]
        counts = np.bincount(top.reshape(-1), minlength=self._n)
        order = np.argsort(-counts, kind="stable")
        self._guess(self.layer, order[counts[order] > 0].tolist())


def guess_at_entry(layer, guess: EntryGuess) -> None:
    """Make decoder ``layer`` call ``guess`` with its input first (then mlx-lm's own code)."""
    hook_call(layer, "_entry_guess", guess, prefix="Guessing")
