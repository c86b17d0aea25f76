// Kernel body: down projections of the K routed experts, summed with the router weights.
//   SUM:  y[h] = sum_k weights[k] * (down_k[h] . hmid[k])      (y [H], the MoE's routed output)
//   else: y[k, h] = down_k[h] . hmid[k]                        (y [K, H], per expert)
// Inputs: hmid [K, I] float32 (from gate_up); down_w [slots, H, I*BITS/32] uint32; down_s, down_b
// [slots, H, I/GS]; slots [K] uint32; weights [K] float32. Template: T (y's type), BITS, GS, H, I,
// K, ROWS (H % ROWS == 0), SUM (0 or 1).
// Each simdgroup owns ROWS output rows across all K experts, so the weighted sum needs no atomics
// and is deterministic; the threadgroup stages one expert's hmid at a time. Header: common.metal.
threadgroup float xs[32 * MS_STAGE_STRIDE(I)];
threadgroup float xu[I / 32];

const uint lane = thread_index_in_simdgroup;
const uint row0 = (threadgroup_position_in_grid.x * simdgroups_per_threadgroup
                   + simdgroup_index_in_threadgroup) * ROWS;
const bool active = row0 < uint(H);  // uniform across the simdgroup
const size_t wpr = I * BITS / 32;
const size_t groups = I / GS;
float acc[ROWS];
for (int r = 0; r < ROWS; r++) {
  acc[r] = 0.0f;
}
float xv[32];
for (int k = 0; k < K; k++) {
  // Every thread stages (the barriers need them all), active or not.
  ms_stage<I>(xs, xu, hmid + size_t(k) * I, thread_index_in_threadgroup, threads_per_threadgroup.x);
  if (active) {
    const size_t r0 = size_t(slots[k]) * H + row0;
    float d[ROWS];
    for (int r = 0; r < ROWS; r++) {
      d[r] = 0.0f;
    }
    for (uint u = lane; u < uint(I / 32); u += 32) {
      const float xsum = ms_load_unit<I>(xv, xs, xu, u);
      ms_rows_unit<BITS, GS, I, ROWS>(d, down_w + r0 * wpr, down_s + r0 * groups, down_b + r0 * groups, xv,
                                      xsum, u);
    }
    for (int r = 0; r < ROWS; r++) {
      const float v = simd_sum(d[r]);
      if (SUM) {
        acc[r] += float(weights[k]) * v;
      } else if (lane == 0) {
        y[size_t(k) * H + row0 + r] = static_cast<T>(v);
      }
    }
  }
}
if (SUM && active && lane == 0) {
  for (int r = 0; r < ROWS; r++) {
    y[row0 + r] = static_cast<T>(acc[r]);
  }
}
