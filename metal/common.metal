// moestream expert kernels: helpers shared by gate_up.metal and down.metal.
//
// This text is the `header` given to mx.fast.metal_kernel (MLX prepends metal_stdlib and
// `using namespace metal`); tests/metal_shim compiles the very same text as C++. So that both work:
//  - helpers take pointers as template parameters and never name an address space;
//  - threadgroup arrays are declared only in kernel bodies and passed on by name.
//
// A *unit* is 32 consecutive inputs of one weight row. MLX packs a row's codes LSB-first as one
// continuous bit stream, so a unit is exactly BITS uint32 words (3-bit codes straddle words).

// sum_j code_j * xv[j] over one unit of packed codes `w`; `xv` holds the unit's 32 inputs.
template <int BITS, typename PW, typename PX>
inline float ms_unit_dot(PW w, PX xv) {
  float acc = 0.0f;
  if (BITS == 3) {
    // 96 bits = four 24-bit chunks of 8 codes each.
    const uint c[4] = {w[0] & 0xffffffu, (w[0] >> 24) | ((w[1] & 0xffffu) << 8),
                       (w[1] >> 16) | ((w[2] & 0xffu) << 16), w[2] >> 8};
    for (int q = 0; q < 4; q++) {
      for (int t = 0; t < 8; t++) {
        acc += float((c[q] >> (3 * t)) & 7u) * xv[8 * q + t];
      }
    }
  } else {
    const int per = 32 / BITS;
    const uint mask = (1u << BITS) - 1u;
    for (int i = 0; i < BITS; i++) {
      const uint v = w[i];
      for (int t = 0; t < per; t++) {
        acc += float((v >> (BITS * t)) & mask) * xv[per * i + t];
      }
    }
  }
  return acc;
}

// The staging buffer of N inputs: 32 rows of `stride` floats, `stride` odd so that neither the
// staging writes (consecutive inputs) nor the lanes' reads (consecutive units) hit one
// threadgroup-memory bank twice. Bodies declare `threadgroup float xs[32 * ((N / 32) | 1)]`.
#define MS_STAGE_STRIDE(N) (((N) / 32) | 1)

// Stage the N inputs `src` (any float type) into threadgroup memory, transposed so that input j of
// unit u sits at xs[j * stride + u], and each unit's input sum in xu[u] (the bias term of affine
// quantization). Every thread of the threadgroup calls it; the leading barrier lets it overwrite a
// buffer that the readers of the previous stage were using.
template <int N, typename PX, typename PU, typename PS>
inline void ms_stage(PX xs, PU xu, PS src, uint tid, uint nthreads) {
  const int stride = MS_STAGE_STRIDE(N);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint n = tid; n < uint(N); n += nthreads) {
    xs[(n & 31u) * stride + (n >> 5)] = float(src[n]);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint u = tid; u < uint(N / 32); u += nthreads) {
    float s = 0.0f;
    for (int j = 0; j < 32; j++) {
      s += xs[j * stride + u];
    }
    xu[u] = s;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

// Unit u of the staged inputs into registers (xv[32]); returns the unit's input sum.
template <int N, typename PV, typename PX, typename PU>
inline float ms_load_unit(PV xv, PX xs, PU xu, uint u) {
  for (int j = 0; j < 32; j++) {
    xv[j] = xs[j * MS_STAGE_STRIDE(N) + u];
  }
  return xu[u];
}

// acc[r] += row r's share of unit u, for ROWS consecutive rows of an affine-quantized matrix with N
// inputs per row starting at codes w, scales s and biases b (scale * sum q x + bias * sum x).
template <int BITS, int GS, int N, int ROWS, typename PA, typename PW, typename PS, typename PB, typename PV>
inline void ms_rows_unit(PA acc, PW w, PS s, PB b, PV xv, float xsum, uint u) {
  const int wpr = N * BITS / 32;
  const int groups = N / GS;
  const uint g = u * 32 / GS;
  for (int r = 0; r < ROWS; r++) {
    acc[r] += float(s[r * groups + g]) * ms_unit_dot<BITS>(w + r * wpr + u * BITS, xv)
              + float(b[r * groups + g]) * xsum;
  }
}
