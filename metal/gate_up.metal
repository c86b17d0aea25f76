// Kernel body: gate and up projections of the K routed experts, fused with SwiGLU.
//   hmid[k, i] = silu(gate_k[i] . x) * (up_k[i] . x)   for k < K, i < I
// Inputs: x [H] (float, half or bfloat); gate_w, up_w [slots, I, H*BITS/32] uint32; gate_s, up_s,
// gate_b, up_b [slots, I, H/GS]; slots [K] uint32 (each expert's slot in the slab).
// Output: hmid [K, I] float32. Template: BITS, GS, H, I, K, ROWS (I % ROWS == 0).
// The threadgroup stages x once; each simdgroup then computes ROWS rows of one expert, gate and up
// together so every staged input read serves 2 * ROWS rows; lane l takes units l, l + 32, ...
// and simd_sum adds the lanes' shares. Header: common.metal.
threadgroup float xs[32 * MS_STAGE_STRIDE(H)];
threadgroup float xu[H / 32];
ms_stage<H>(xs, xu, x, thread_index_in_threadgroup, threads_per_threadgroup.x);

const uint lane = thread_index_in_simdgroup;
const uint row0 = (threadgroup_position_in_grid.x * simdgroups_per_threadgroup
                   + simdgroup_index_in_threadgroup) * ROWS;
if (row0 < uint(K * I)) {  // uniform across the simdgroup, so the simd_sums below stay convergent
  const uint k = row0 / I;
  const uint i0 = row0 % I;
  const size_t r0 = size_t(slots[k]) * I + i0;  // first row in the slab (64-bit: slabs can be large)
  const size_t wpr = H * BITS / 32;
  const size_t groups = H / GS;
  auto gw = gate_w + r0 * wpr;
  auto uw = up_w + r0 * wpr;
  auto gsc = gate_s + r0 * groups;
  auto usc = up_s + r0 * groups;
  auto gbi = gate_b + r0 * groups;
  auto ubi = up_b + r0 * groups;
  float ga[ROWS];
  float ua[ROWS];
  for (int r = 0; r < ROWS; r++) {
    ga[r] = 0.0f;
    ua[r] = 0.0f;
  }
  float xv[32];
  for (uint u = lane; u < uint(H / 32); u += 32) {
    const float xsum = ms_load_unit<H>(xv, xs, xu, u);
    ms_rows_unit<BITS, GS, H, ROWS>(ga, gw, gsc, gbi, xv, xsum, u);
    ms_rows_unit<BITS, GS, H, ROWS>(ua, uw, usc, ubi, xv, xsum, u);
  }
  for (int r = 0; r < ROWS; r++) {
    const float g = simd_sum(ga[r]);
    const float v = simd_sum(ua[r]);
    if (lane == 0) {
      hmid[size_t(k) * I + i0 + r] = g / (1.0f + metal::exp(-g)) * v;
    }
  }
}
