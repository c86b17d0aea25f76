"""Runtime: loads a pack on MLX and streams routed experts from disk (see the streaming-runtime issue)."""
