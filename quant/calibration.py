"""Calibration statistics: input second moments of every quantized matmul, and routing counts.

Recorded by ``moestream calibrate`` (:mod:`moestream.runtime.calibrate`) on calibration text.

For each MoE layer and each expert: how many tokens were routed to it, and the sum of squares of
each input channel of its gate/up projections (the hidden state) and of its down projection (the
SwiGLU intermediate). For each resident quantized linear (attention, linear attention, shared
expert, router, output head): the same sums over all tokens. The mean square of an input channel
is the diagonal of E[x x^T]; ``convert --calibration`` uses it to weight each column's error in the
range search (imatrix-style), since the output error of a row is sum_j x_j (w_j - q_j).

Size: E x (H + I) float64 sums per MoE layer (397B: 60 x 512 x 5120 x 8 B = 1.3 GB).
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
    """Sums of squares and counts; ``importance`` turns them into per-column weights."""

    experts: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # layer -> gate_up/down/count
    linears: dict[str, tuple[np.ndarray, int]] = field(default_factory=dict)  # tensor base name -> (sumsq, n)
    meta: dict = field(default_factory=dict)

    # -- recording -------------------------------------------------------------------------------
    def expert_recorder(self, layer: int, num_experts: int, hidden: int, inter: int):
        d = self.experts.setdefault(layer, {"gate_up": np.zeros((num_experts, hidden)),
                                            "down": np.zeros((num_experts, inter)),
                                            "count": np.zeros(num_experts)})

        def record(e: int, x: np.ndarray, h: np.ndarray) -> None:
            d["gate_up"][e] += np.square(x, dtype=np.float64).sum(0)
            d["down"][e] += np.square(h, dtype=np.float64).sum(0)
            d["count"][e] += x.shape[0]

        return record

    def linear_recorder(self, name: str):
        def record(x: np.ndarray) -> None:
            s, n = self.linears.get(name, (0.0, 0))
            self.linears[name] = (s + np.square(x, dtype=np.float64).sum(0), n + x.shape[0])

        return record

    # -- use -------------------------------------------------------------------------------------
    def expert_importance(self, layer: int, expert: int, proj: str) -> np.ndarray | None:
        """Mean square of each input column of ``proj`` of one expert; an expert never routed to
        during calibration gets its layer's average over all experts."""
        d = self.experts.get(layer)
        if d is None:
            return None
        kind = "down" if proj == "down_proj" else "gate_up"
        n = d["count"][expert]
        if n > 0:
            return d[kind][expert] / n
        total = d["count"].sum()
        return d[kind].sum(0) / total if total > 0 else None

    def linear_importance(self, tensor: str) -> np.ndarray | None:
        base = tensor[:-len(".weight")] if tensor.endswith(".weight") else tensor
        s, n = self.linears.get(base, (None, 0))
        return s / n if n else None

    # -- files -----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        tensors = {}
        for layer, d in self.experts.items():
            for k, v in d.items():
                tensors[f"experts.{layer}.{k}"] = v.astype(np.float64)
        for name, (s, n) in self.linears.items():
            tensors[f"linear.{name}"] = np.asarray(s, np.float64)
            tensors[f"linear_count.{name}"] = np.array([n], np.float64)
        path = Path(path)
        tmp = path.with_name(path.name + ".partial")
        save_file(tensors, str(tmp), metadata={"format": "moestream-calibration", "meta": json.dumps(self.meta)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        from safetensors import safe_open

        cal = cls()
        try:
            with safe_open(str(path), "np") as f:
                meta = f.metadata() or {}
                if meta.get("format") != "moestream-calibration":
                    raise MoestreamError(f"{path}: not a moestream calibration file (made by `moestream calibrate`)")
                cal.meta = json.loads(meta.get("meta", "{}"))
                counts = {}
                for k in f.keys():
                    kind, rest = k.split(".", 1)
                    if kind == "experts":
                        layer, what = rest.split(".", 1)
                        cal.experts.setdefault(int(layer), {})[what] = f.get_tensor(k)
                    elif kind == "linear":
                        cal.linears[rest] = (f.get_tensor(k), 0)
                    elif kind == "linear_count":
                        counts[rest] = int(f.get_tensor(k)[0])
                cal.linears = {k: (s, counts.get(k, 0)) for k, (s, _) in cal.linears.items()}
        except MoestreamError:
            raise
        except Exception as e:  # safetensors' own error type, OSError, a bad key: all one line
            raise MoestreamError(f"{path}: cannot read the calibration file ({e})") from None
        return cal
