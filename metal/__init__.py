"""Metal kernels loaded through MLX on Apple silicon, each paired with a reference (later issue)."""
