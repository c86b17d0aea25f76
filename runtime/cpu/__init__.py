"""numba kernels for MLX on the CPU: quantized products (float and int8 activations), the gated-delta
recurrence, attention through BLAS, and OpenMP's wait policy. Array in, array out: no model code."""
