"""The streamed layers' Metal kernels, checked once per shape before they compute (metal/selfcheck.py)."""

from __future__ import annotations

import logging

from moestream.layouts.errors import OptionError
from moestream.runtime.model.switch_glu import PROJS

log = logging.getLogger(__name__)


def check_metal_layers(layers: list, dtype, strict: bool) -> int:
    """Run the self-check for every (bits, group, shape) the streamed ``layers`` send to the Metal
    kernels. A failing shape: with ``strict`` (``--kernels metal``) an OptionError naming the kernel
    and the reason; otherwise one warning per shape, and those layers use MLX's ops. Returns the
    layers left on the Metal kernels."""
    import mlx.core as mx

    from moestream.metal.selfcheck import check

    warned: set = set()
    kept = 0
    for s in layers:
        if not s._metal:
            continue
        for x in s._store.pack.manifest.expert_tiers(s._layer):
            g, d = x.component(f"{PROJS[0]}.weight"), x.component(f"{PROJS[2]}.weight")
            key = (d.shape[0], g.shape[0], (g.bits, g.group_size), (d.bits, d.group_size))
            why = check(*key, dtype or mx.float32)
            if why is None:
                continue
            what = f"Metal expert kernels at {g.bits}-bit g{g.group_size} (H {key[0]}, I {key[1]})"
            if strict:
                raise OptionError("kernels", "metal", f"{what}: {why}")
            if key not in warned:
                warned.add(key)
                log.warning("%s: %s; MLX's quantized ops compute these layers instead", what, why)
            s._metal = False
            break
        kept += s._metal
    return kept
