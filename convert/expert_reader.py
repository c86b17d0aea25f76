"""One expert's float matrices, read from a checkpoint in whichever layout its family stores them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .source import SourceCheckpoint

if TYPE_CHECKING:
    from .plan import ExpertLayerPlan


def read_expert(src: SourceCheckpoint, x: "ExpertLayerPlan", e: int) -> dict[str, np.ndarray]:
    """Expert ``e``'s float32 gate [I, H], up [I, H] and down [H, I], read as one slice each."""
    s = x.source
    if s.reader is not None:  # a family's own layout (gpt-oss)
        return s.reader.floats(src, e)
    if s.layout == "fused":
        gu = src.read_rows_f32(s.names["gate_up"], e, e + 1)[0]
        return {
            "gate_proj": gu[: x.intermediate],
            "up_proj": gu[x.intermediate :],
            "down_proj": src.read_rows_f32(s.names["down"], e, e + 1)[0],
        }
    if s.layout == "stacked":
        return {p: src.read_rows_f32(n, e, e + 1)[0] for p, n in s.names.items()}
    return {p: src.read_f32(n.format(e=e)) for p, n in s.names.items()}
