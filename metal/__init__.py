"""Metal kernels for the routed experts at batch 1, loaded through ``mx.fast.metal_kernel`` on Apple
silicon; MLX's quantized ops are the reference and the fallback everywhere else.

The ``.metal`` files here are kernel bodies and a shared header as ``mx.fast.metal_kernel`` takes them;
:mod:`moestream.metal.kernels` plans and launches them. On Linux they are verified by compiling the same
text as C++ against an emulation of Metal (``tests/metal_shim``).
"""

from .kernels import available, routed_experts

__all__ = ["available", "routed_experts"]
