"""Calibration statistics: input second moments of every quantized matmul, and routing counts.

Recorded by ``moestream calibrate`` (:mod:`moestream.runtime.collect_calibration`) on calibration text.

For each MoE layer and each expert: how many tokens were routed to it, and the sum of squares of
each input channel of its gate/up projections (the hidden state) and of its down projection (the
SwiGLU intermediate). For each resident quantized linear (attention, linear attention, shared
expert, router, output head): the same sums over all tokens. The mean square of an input channel
is the diagonal of E[x x^T]; ``convert --calibration`` uses it to weight each column's error in the
range search (imatrix-style), since the output error of a row is sum_j x_j (w_j - q_j).

Full second-moment matrices E[x x^T] (what GPTQ needs) are kept too while they fit a budget: per
expert where possible, else one per MoE layer pooled over its experts (each expert's then
approximated as the pooled correlation rescaled by its own diagonal). Diagonal sums alone take
E x (H + I) float64 per MoE layer (397B: 60 x 512 x 5120 x 8 B = 1.3 GB).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moestream.layouts import MoestreamError

log = logging.getLogger(__name__)


@dataclass
class Calibration:
    """Flat named arrays (sums, counts, matrices) with the lookups convert needs.

    Keys: ``experts.L.{gate_up,down,count}`` (per-expert diagonal sums and routing counts),
    ``experts.L.{gate_up,down}_cov`` (per-expert [E, n, n]) or ``..._pcov`` (pooled [n, n]),
    ``linear.NAME.{sumsq,count,cov}``.
    """

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    # -- recording -------------------------------------------------------------------------------
    def _acc(self, key: str, value: np.ndarray, index=None) -> None:
        a = self.arrays[key]
        if index is None:
            a += value
        else:
            a[index] += value

    def expert_recorder(self, layer: int, num_experts: int, hidden: int, inter: int, full: str = "none"):
        """``full``: ``expert`` (per-expert matrices), ``pooled`` (one per layer) or ``none``."""
        p = f"experts.{layer}."
        self.arrays.update(
            {
                p + "gate_up": np.zeros((num_experts, hidden)),
                p + "down": np.zeros((num_experts, inter)),
                p + "count": np.zeros(num_experts),
            }
        )
        if full == "expert":
            self.arrays.update(
                {
                    p + "gate_up_cov": np.zeros((num_experts, hidden, hidden)),
                    p + "down_cov": np.zeros((num_experts, inter, inter)),
                }
            )
        elif full == "pooled":
            self.arrays.update(
                {p + "gate_up_pcov": np.zeros((hidden, hidden)), p + "down_pcov": np.zeros((inter, inter))}
            )

        def record(e: int, x: np.ndarray, mid: np.ndarray) -> None:
            x, mid = x.astype(np.float64), mid.astype(np.float64)
            self._acc(p + "gate_up", np.square(x).sum(0), e)
            self._acc(p + "down", np.square(mid).sum(0), e)
            self._acc(p + "count", x.shape[0], e)
            if full == "expert":
                self._acc(p + "gate_up_cov", x.T @ x, e)
                self._acc(p + "down_cov", mid.T @ mid, e)
            elif full == "pooled":
                self._acc(p + "gate_up_pcov", x.T @ x)
                self._acc(p + "down_pcov", mid.T @ mid)

        return record

    def linear_recorder(self, name: str, width: int, full: bool = False):
        p = f"linear.{name}."
        self.arrays.update({p + "sumsq": np.zeros(width), p + "count": np.zeros(1)})
        if full:
            self.arrays[p + "cov"] = np.zeros((width, width))

        def record(x: np.ndarray) -> None:
            x = x.astype(np.float64)
            self._acc(p + "sumsq", np.square(x).sum(0))
            self._acc(p + "count", x.shape[0])
            if full:
                self._acc(p + "cov", x.T @ x)

        return record

    # -- use -------------------------------------------------------------------------------------
    def expert_importance(self, layer: int, expert: int, proj: str) -> np.ndarray | None:
        """Mean square of each input column of ``proj`` of one expert; an expert never routed to
        during calibration gets its layer's average over all experts."""
        p, kind = f"experts.{layer}.", "down" if proj == "down_proj" else "gate_up"
        if p + kind not in self.arrays:
            return None
        counts, sums = self.arrays[p + "count"], self.arrays[p + kind]
        if counts[expert] > 0:
            return sums[expert] / counts[expert]
        return sums.sum(0) / counts.sum() if counts.sum() > 0 else None

    def expert_hessian(self, layer: int, expert: int, proj: str) -> np.ndarray | None:
        """E[x x^T] of one expert's ``proj`` inputs, or None without matrices.

        Routing is skewed, so many experts see few calibration tokens, and a matrix estimated from
        fewer tokens than its dimension is singular: GPTQ would fit those few tokens exactly and do
        worse on others. So the expert's own matrix is shrunk towards the layer's pooled
        correlation rescaled by the expert's own diagonal, weighted n / (n + 2 dim).
        """
        p, kind = f"experts.{layer}.", "down" if proj == "down_proj" else "gate_up"
        counts = self.arrays.get(p + "count")
        diag = self.expert_importance(layer, expert, proj)
        if counts is None or diag is None:
            return None
        own = self.arrays.get(p + kind + "_cov")
        pooled = self.arrays.get(p + kind + "_pcov")
        if pooled is None and own is not None:
            pooled = own.sum(0)
        if pooled is None:
            return None
        d = np.sqrt(np.maximum(np.diag(pooled), 1e-30))
        r = np.sqrt(np.maximum(diag, 0))
        prior = pooled / np.outer(d, d) * np.outer(r, r)
        n = counts[expert]
        if own is None or n <= 0:
            return prior
        a = n / (n + 2 * len(diag))
        return a * own[expert] / n + (1 - a) * prior

    def _linear(self, tensor: str) -> tuple[str, float]:
        base = tensor[: -len(".weight")] if tensor.endswith(".weight") else tensor
        n = self.arrays.get(f"linear.{base}.count")
        return f"linear.{base}.", float(n[0]) if n is not None else 0.0

    def linear_importance(self, tensor: str) -> np.ndarray | None:
        p, n = self._linear(tensor)
        return self.arrays[p + "sumsq"] / n if n else None

    def linear_hessian(self, tensor: str) -> np.ndarray | None:
        p, n = self._linear(tensor)
        return self.arrays[p + "cov"] / n if n and p + "cov" in self.arrays else None

    @property
    def layers(self) -> list[int]:
        return sorted({int(k.split(".")[1]) for k in self.arrays if k.startswith("experts.")})

    @property
    def linear_names(self) -> list[str]:
        return sorted({k[len("linear.") :].rsplit(".", 1)[0] for k in self.arrays if k.startswith("linear.")})

    # -- files -----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        path = Path(path)
        tmp = path.with_name(path.name + ".partial")
        save_file(
            {k: np.ascontiguousarray(v) for k, v in self.arrays.items()},
            str(tmp),
            metadata={"format": "moestream-calibration", "meta": json.dumps(self.meta)},
        )
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, header_only: bool = False) -> "Calibration":
        """Read a statistics file (``header_only``: check it is one, read no arrays)."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), "np") as f:
                meta = f.metadata() or {}
                if meta.get("format") != "moestream-calibration":
                    raise MoestreamError(f"{path}: not a moestream calibration file (made by `moestream calibrate`)")
                arrays = {} if header_only else {k: f.get_tensor(k) for k in f.keys()}
                return cls(arrays, json.loads(meta.get("meta", "{}")))
        except MoestreamError:
            raise
        except Exception as e:  # safetensors' own error type, OSError, bad JSON: all one line
            raise MoestreamError(f"{path}: cannot read the calibration file ({e})") from None
