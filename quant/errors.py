"""Error statistics of a quantized tensor against its original weights.

The quantizer kernels accumulate five float64 running sums while they quantize, so that the
quality of every tensor is known without a second dequantize pass. ``ErrorStats`` holds those
sums; stats of several tensors (or of the row blocks of one tensor quantized in parallel) merge
by addition, and the derived figures (RMSE relative to the weights' spread, SNR) are computed
from the merged sums. They serialize to plain JSON dicts for conversion reports.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

__all__ = ["ErrorStats"]


@dataclass
class ErrorStats:
    """Running sums over (w, err) pairs, where err = dequantized(w) - w.

    Attributes:
        count: number of weights seen.
        sum_w: sum of w.
        sum_w2: sum of w**2.
        sum_err2: sum of err**2.
        max_abs_err: largest |err|.
    """

    count: int = 0
    sum_w: float = 0.0
    sum_w2: float = 0.0
    sum_err2: float = 0.0
    max_abs_err: float = 0.0

    def merge(self, other: "ErrorStats") -> "ErrorStats":
        """Fold ``other`` into this object in place.

        Args:
            other: stats of another set of weights.

        Returns:
            self, for chaining.
        """
        self.count += other.count
        self.sum_w += other.sum_w
        self.sum_w2 += other.sum_w2
        self.sum_err2 += other.sum_err2
        self.max_abs_err = max(self.max_abs_err, other.max_abs_err)
        return self

    def __add__(self, other: "ErrorStats") -> "ErrorStats":
        if not isinstance(other, ErrorStats):
            return NotImplemented
        return ErrorStats(**asdict(self)).merge(other)

    def __radd__(self, other: object) -> "ErrorStats":
        # Lets sum(list_of_stats) start from the integer 0.
        if other == 0:
            return ErrorStats(**asdict(self))
        return NotImplemented

    @property
    def mean_w(self) -> float:
        """Mean of the weights (0 when empty)."""
        return self.sum_w / self.count if self.count else 0.0

    @property
    def std_w(self) -> float:
        """Population standard deviation of the weights."""
        if not self.count:
            return 0.0
        var = self.sum_w2 / self.count - self.mean_w**2
        return math.sqrt(max(var, 0.0))

    @property
    def rmse(self) -> float:
        """Root mean squared error."""
        return math.sqrt(self.sum_err2 / self.count) if self.count else 0.0

    @property
    def rel_rmse(self) -> float:
        """RMSE in units of the weights' standard deviation (0 when both are 0, inf when only
        the weights' spread is 0)."""
        std = self.std_w
        if std == 0.0:
            return 0.0 if self.sum_err2 == 0.0 else math.inf
        return self.rmse / std

    @property
    def max_abs(self) -> float:
        """Largest absolute error."""
        return self.max_abs_err

    @property
    def snr_db(self) -> float:
        """Signal-to-noise ratio in dB: 10*log10(mean w^2 / mean err^2); inf when err is 0."""
        if self.sum_err2 == 0.0:
            return math.inf
        if self.sum_w2 == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.sum_w2 / self.sum_err2)

    def to_dict(self) -> dict:
        """The raw sums plus the derived figures, JSON-ready (non-finite values as strings
        would break strict JSON, so inf is written as None)."""
        out: dict = asdict(self)
        for name in ("rmse", "rel_rmse", "snr_db"):
            value = getattr(self, name)
            out[name] = value if math.isfinite(value) else None
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "ErrorStats":
        """Rebuild from ``to_dict`` output (derived figures are ignored and recomputed).

        Args:
            d: a dict holding at least the five raw sums.

        Returns:
            The ErrorStats.
        """
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs["count"] = int(kwargs.get("count", 0))
        return cls(**kwargs)

    def __str__(self) -> str:
        return (
            f"ErrorStats(n={self.count}, rel_rmse={self.rel_rmse:.4f}, "
            f"snr={self.snr_db:.2f} dB, max_abs={self.max_abs_err:.3g})"
        )
