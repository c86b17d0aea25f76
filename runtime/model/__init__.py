"""Running a pack on mlx-lm's model: building it, streamed and tiered expert layers, the CPU replacements of
mlx-lm modules, and the one mechanism that patches mlx-lm's layers per instance."""
