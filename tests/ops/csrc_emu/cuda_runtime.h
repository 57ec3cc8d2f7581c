// Host stand-in for the CUDA runtime header, so the csrc/ kernels compile as plain C++ and run on
// the CPU: one cooperative fiber per CUDA thread, blocks one after another, __syncthreads as a
// barrier, warp shuffles through a per-warp barrier. For testing kernel logic only (no timing).
#pragma once

#include <algorithm>
#include <functional>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__
#define __launch_bounds__(...)

struct EmuDim3 {
  unsigned x = 0, y = 0, z = 0;
};
extern EmuDim3 threadIdx;
extern EmuDim3 blockIdx;

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return cudaSuccess; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "invalid value"; }

namespace emu {
constexpr size_t kSharedFloats = 1 << 16;  // 256 KiB, above any block's request
extern float* shared_mem;                  // the kernels' `extern __shared__ float smem[]`
extern size_t max_smem_bytes;

// Runs `body` once per thread of a block as cooperative fibers on the calling OS thread; threads
// switch only at barriers, so a run is deterministic. Aborts on a barrier deadlock.
void run_block(int block, const std::function<void()>& body);
// Barrier over the whole block (id 0) or over one warp (id 1 + warp).
void barrier(int id);
void set_reverse_order(bool on);
extern float exchange[1024];

template <typename F, typename A>
void launch(F kernel, int grid, int block, size_t smem_bytes, const A& args) {
  if (smem_bytes > kSharedFloats * sizeof(float) || block % 32 != 0 || block > 1024)
    throw std::runtime_error("emulated launch: bad configuration");
  if (smem_bytes > max_smem_bytes) max_smem_bytes = smem_bytes;
  for (int bx = 0; bx < grid; ++bx) {
    // Shared memory starts as NaN: a read of an element nobody wrote poisons the result.
    std::fill(shared_mem, shared_mem + kSharedFloats, std::numeric_limits<float>::quiet_NaN());
    blockIdx.x = bx;
    run_block(block, [&] { kernel(args); });
    // Nothing may land past the dynamic shared memory the launch asked for.
    for (size_t i = smem_bytes / sizeof(float); i < kSharedFloats; ++i)
      if (!std::isnan(shared_mem[i])) throw std::runtime_error("kernel wrote past its dynamic shared memory");
  }
}
}  // namespace emu

inline void __syncthreads() { emu::barrier(0); }

inline float __shfl_xor_sync(unsigned, float x, int lane_mask) {
  const int t = static_cast<int>(threadIdx.x);
  emu::exchange[t] = x;
  emu::barrier(1 + t / 32);
  const float r = emu::exchange[t ^ lane_mask];
  emu::barrier(1 + t / 32);
  return r;
}

#define NESTLM_LAUNCH(kernel, grid, block, smem, stream, args) emu::launch(kernel, grid, block, smem, args)
