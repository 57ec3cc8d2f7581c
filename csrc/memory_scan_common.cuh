// Helpers shared by the forward and backward memory-scan kernels and their launches.
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

// Stage the tokens [s, s + n) of batch row b, head h: their q and k rows into sQ, sK ([n, DK], rows
// padded to DK + 1) and their gates lr, momentum, decay into sTh, sEt, sAl ([n]).
template <typename T, int DK, typename Args>
__device__ __forceinline__ void stage_keys_and_gates(const Args& p, int b, int h, int s, int n, float* sQ, float* sK,
                                                     float* sTh, float* sEt, float* sAl) {
  constexpr int LD = DK + 1;
  const int L = p.shape.length, H = p.shape.heads, tid = threadIdx.x;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  for (int idx = tid; idx < n * DK; idx += kThreads) {
    const int i = idx / DK, kk = idx % DK;
    const size_t g = ((static_cast<size_t>(b) * L + s + i) * H + h) * DK + kk;
    sQ[i * LD + kk] = to_float(q[g]);
    sK[i * LD + kk] = to_float(k[g]);
  }
  for (int i = tid; i < n; i += kThreads) {
    const size_t g = (static_cast<size_t>(b) * L + s + i) * H + h;
    sTh[i] = p.lr[g];
    sEt[i] = p.momentum[g];
    sAl[i] = p.decay[g];
  }
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Launch `kernel` with one block per (batch, head, slice of ROWS rows of W) and `smem` bytes of
// dynamic shared memory (above 48 KiB a kernel must opt in to it).
template <int ROWS, typename Kernel, typename Args>
int launch_row_slices(Kernel kernel, const Args& p, size_t smem, cudaStream_t stream) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return static_cast<int>(err);
  const int grid = p.shape.batch * p.shape.heads * (p.shape.dv / ROWS);
  NESTLM_LAUNCH(kernel, grid, kThreads, smem, stream, p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace detail
}  // namespace nestlm
