"""The expert store's I/O counters, and the overlap work it runs while reads are in flight."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StoreStats:
    """I/O counters; ``reads`` is the number of expert reads issued (one per missed expert)."""

    reads: int = 0
    bytes_read: int = 0  # read-ahead included: what the disk delivered
    hits: int = 0
    misses: int = 0
    ahead: int = 0  # experts read ahead (guessed for the next layer)
    ahead_hits: int = 0  # routed experts that a read-ahead had already fetched (counted as misses too)
    page_hits: int = 0  # experts computed in place from the page cache (os cache, CPU kernels)
    wasted: int = 0  # reads of wrong prefill guesses (read, never used): with os/none,
    # reads == misses - ahead_hits + ahead + wasted
    log: list[tuple[int, int, int]] | None = None  # (layer, offset, length) of every read, when tracing

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def reset(self) -> None:
        self.reads = self.bytes_read = self.hits = self.misses = self.ahead = self.ahead_hits = self.page_hits = (
            self.wasted
        ) = 0
        if self.log is not None:
            self.log.clear()


def run_overlap(overlap: list) -> None:
    """Call (then forget) the pending overlap work: the caller's compute that needs no expert (the
    shared expert, guesses for the next layer), run while reads are in flight. Each callable does its
    own evaluation: the store knows nothing of the model."""
    while overlap:
        overlap.pop(0)()
