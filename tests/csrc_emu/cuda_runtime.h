// Host stand-in for the CUDA runtime header, so the csrc/ kernels compile as plain C++ and run on
// the CPU: one std::thread per CUDA thread, blocks one after another, __syncthreads as a barrier,
// warp shuffles through a per-warp barrier. For testing kernel logic only (no timing meaning).
#pragma once

#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <thread>
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
extern thread_local EmuDim3 threadIdx;
extern thread_local EmuDim3 blockIdx;

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return cudaSuccess; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "invalid value"; }

namespace emu {
constexpr size_t kSharedFloats = 1 << 16;  // 256 KiB, above any block's request
extern float* shared_mem;  // the kernels' `extern __shared__ float smem[]`
extern std::barrier<>* block_barrier;
extern std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
extern float exchange[1024];
extern size_t max_smem_bytes;

template <typename F, typename A>
void launch(F kernel, int grid, int block, size_t smem_bytes, const A& args) {
  if (smem_bytes > kSharedFloats * sizeof(float) || block % 32 != 0 || block > 1024)
    throw std::runtime_error("emulated launch: bad configuration");
  if (smem_bytes > max_smem_bytes) max_smem_bytes = smem_bytes;
  for (int bx = 0; bx < grid; ++bx) {
    // Shared memory starts as NaN: a read of an element nobody wrote poisons the result.
    std::fill(shared_mem, shared_mem + kSharedFloats, std::numeric_limits<float>::quiet_NaN());
    std::barrier<> bar(block);
    block_barrier = &bar;
    warp_barriers.clear();
    for (int w = 0; w < block / 32; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (int t = 0; t < block; ++t) {
      threads.emplace_back([&, t] {
        threadIdx.x = t;
        blockIdx.x = bx;
        kernel(args);
      });
    }
    for (auto& th : threads) th.join();
  }
}
}  // namespace emu

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float x, int lane_mask) {
  const int t = static_cast<int>(threadIdx.x);
  auto& bar = *emu::warp_barriers[t / 32];
  emu::exchange[t] = x;
  bar.arrive_and_wait();
  const float r = emu::exchange[t ^ lane_mask];
  bar.arrive_and_wait();
  return r;
}

#define NESTLM_LAUNCH(kernel, grid, block, smem, stream, args) emu::launch(kernel, grid, block, smem, args)
