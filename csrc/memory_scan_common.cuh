// Device helpers shared by the forward and backward memory-scan kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "memory_scan.h"

// Kernel launch; a host-side emulator (tests/csrc_emu) supplies its own definition to run the
// kernels on the CPU.
#ifndef NESTLM_LAUNCH
#define NESTLM_LAUNCH(kernel, grid, block, smem, stream, args) kernel<<<grid, block, smem, stream>>>(args)
#endif

namespace nestlm {
namespace detail {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxChunk = 64;
// Rows of W per thread block (dv is a multiple of 32): small slices give more blocks in the
// forward; the backward needs five [rows, dk] fp32 buffers and uses larger slices to cut the
// partial dq / dk traffic.
constexpr int kFwdRows = 16;
constexpr int kBwdRows = 32;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// Number of segments: the first runs to the next chunk boundary, the rest are whole chunks.
__host__ __device__ __forceinline__ int64_t num_segments(int64_t length, int chunk, int64_t offset) {
  if (length <= 0) return 0;
  const int64_t first = chunk - offset % chunk;
  if (length <= first) return 1;
  return 1 + (length - first + chunk - 1) / chunk;
}

// Segment j of a call: [start, start + n). The first segment ends at the next chunk boundary.
__host__ __device__ __forceinline__ void segment_bounds(int j, int length, int chunk, int64_t offset,
                                                        int* start, int* n) {
  const int first = chunk - static_cast<int>(offset % chunk);
  const int s = j == 0 ? 0 : first + (j - 1) * chunk;
  const int e = j == 0 ? first : s + chunk;
  *start = s;
  *n = (e < length ? e : length) - s;
}

// Closed-form coefficients of one segment (serial; n <= kMaxChunk). Suffix recurrences, no division:
//   P_i = prod_{j>i} eta_j, D_i = prod_{j>i} (1 - alpha_j), g_i = D_i + eta_{i+1} g_{i+1};
//   a_i = theta_i P_i, c_i = theta_i g_i; E = eta_0 P_0, B = (1 - alpha_0) D_0, gamma = eta_0 g_0.
__device__ __forceinline__ void segment_coefficients(int n, const float* th, const float* et, const float* al,
                                                     float* a, float* c, float* P, float* g, float* D,
                                                     float* EBG) {
  float p = 1.f, d = 1.f, gg = 1.f;
  for (int i = n - 1; i >= 0; --i) {
    if (i < n - 1) {
      p = et[i + 1] * p;
      d = (1.f - al[i + 1]) * d;
      gg = d + et[i + 1] * gg;
    }
    P[i] = p;
    D[i] = d;
    g[i] = gg;
    a[i] = th[i] * p;
    c[i] = th[i] * gg;
  }
  EBG[0] = et[0] * p;
  EBG[1] = (1.f - al[0]) * d;
  EBG[2] = et[0] * gg;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

}  // namespace detail
}  // namespace nestlm
