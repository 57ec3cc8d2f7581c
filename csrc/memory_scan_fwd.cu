// Forward kernel of the fused linear-memory scan (see memory_scan.h for layouts).
//
// One thread block per (batch, head, slice of kRows rows of W): the rows of W and S evolve
// independently (each row's update only reads that row of the anchor), so the slices need no
// communication. Per segment (<= one chunk) the block stages q, k, v and the gates in shared memory,
// computes r = A k - v and y = A q for the segment (n x rows dot products of length dk), then applies
// the rank-n closed-form update to its rows of S and W in shared memory. Per-token gradient
// matrices exist only as the n x rows tiles a_i r_i and c_i r_i.
#include <cstdio>

#include "memory_scan_common.cuh"

namespace nestlm {
namespace detail {

template <typename T, typename TY, int DK, int ROWS>
__global__ void __launch_bounds__(kThreads) memory_scan_fwd_kernel(MemoryScanFwdArgs p) {
  constexpr int LD = DK + 1;  // padded rows: threads of a warp read different rows at one column
  const MemoryScanShape sh = p.shape;
  const int L = sh.length, H = sh.heads, DV = sh.dv, C = sh.chunk_size;
  const int n_split = DV / ROWS;
  const int bh = blockIdx.x / n_split;
  const int r0 = (blockIdx.x % n_split) * ROWS;
  const int b = bh / H, h = bh % H;
  const int tid = threadIdx.x;

  extern __shared__ float smem[];
  float* sA = smem;
  float* sW = sA + ROWS * LD;
  float* sS = sW + ROWS * LD;
  float* sQ = sS + ROWS * LD;
  float* sK = sQ + C * LD;
  float* sV = sK + C * LD;
  float* sAR = sV + C * ROWS;
  float* sCR = sAR + C * ROWS;
  float* sTh = sCR + C * ROWS;
  float* sEt = sTh + C;
  float* sAl = sEt + C;
  float* sa = sAl + C;
  float* sc = sa + C;
  float* sP = sc + C;
  float* sg = sP + C;
  float* sD = sg + C;
  float* sEBG = sD + C;

  const T* v = static_cast<const T*>(p.v);
  TY* y = static_cast<TY*>(p.y);
  const size_t state_base = (static_cast<size_t>(bh) * DV + r0) * DK;

  for (int idx = tid; idx < ROWS * DK; idx += kThreads) {
    const int d = idx / DK, kk = idx % DK;
    sW[d * LD + kk] = p.W[state_base + idx];
    sS[d * LD + kk] = p.S[state_base + idx];
    sA[d * LD + kk] = p.A[state_base + idx];
  }

  const int n_seg = static_cast<int>(num_segments(L, C, sh.offset));
  for (int j = 0; j < n_seg; ++j) {
    int s, n;
    segment_bounds(j, L, C, sh.offset, &s, &n);
    const bool aligned = (sh.offset + s) % C == 0;
    __syncthreads();  // previous update of sW / sS complete, tiles free
    // Anchor refresh and checkpoint: each thread touches only the elements it owns in the update.
    for (int idx = tid; idx < ROWS * DK; idx += kThreads) {
      const int d = idx / DK, kk = idx % DK;
      const float w = sW[d * LD + kk];
      if (aligned) sA[d * LD + kk] = w;
      if (p.W_states != nullptr) {
        const size_t o = ((static_cast<size_t>(bh) * n_seg + j) * DV + r0) * DK + idx;
        p.W_states[o] = w;
        p.S_states[o] = sS[d * LD + kk];
      }
    }
    stage_keys_and_gates<T, DK>(p, b, h, s, n, sQ, sK, sTh, sEt, sAl);
    for (int idx = tid; idx < n * ROWS; idx += kThreads) {
      const int i = idx / ROWS, d = idx % ROWS;
      sV[idx] = to_float(v[((static_cast<size_t>(b) * L + s + i) * H + h) * DV + r0 + d]);
    }
    __syncthreads();
    if (tid == 0) segment_coefficients(n, sTh, sEt, sAl, sa, sc, sP, sg, sD, sEBG);
    __syncthreads();

    // r = A k - v and y = A q for the n x ROWS tile.
    for (int o = tid; o < n * ROWS; o += kThreads) {
      const int i = o / ROWS, d = o % ROWS;
      const float* arow = sA + d * LD;
      const float* krow = sK + i * LD;
      const float* qrow = sQ + i * LD;
      float acc_r = 0.f, acc_y = 0.f;
#pragma unroll 8
      for (int kk = 0; kk < DK; ++kk) {
        acc_r = fmaf(arow[kk], krow[kk], acc_r);
        acc_y = fmaf(arow[kk], qrow[kk], acc_y);
      }
      const float r = acc_r - sV[o];
      sAR[o] = sa[i] * r;
      sCR[o] = sc[i] * r;
      y[((static_cast<size_t>(b) * L + s + i) * H + h) * DV + r0 + d] = from_float<TY>(acc_y);
    }
    __syncthreads();

    // S1 = E S0 - 2 sum_i a_i r_i k_i^T ; W1 = B W0 + gamma S0 - 2 sum_i c_i r_i k_i^T.
    const float E = sEBG[0], B = sEBG[1], G = sEBG[2];
    for (int idx = tid; idx < ROWS * DK; idx += kThreads) {
      const int d = idx / DK, kk = idx % DK;
      float acc_s = 0.f, acc_w = 0.f;
      for (int i = 0; i < n; ++i) {
        const float kv = sK[i * LD + kk];
        acc_s = fmaf(sAR[i * ROWS + d], kv, acc_s);
        acc_w = fmaf(sCR[i * ROWS + d], kv, acc_w);
      }
      const float s0 = sS[d * LD + kk], w0 = sW[d * LD + kk];
      sS[d * LD + kk] = E * s0 - 2.f * acc_s;
      sW[d * LD + kk] = B * w0 + G * s0 - 2.f * acc_w;
    }
  }
  __syncthreads();
  for (int idx = tid; idx < ROWS * DK; idx += kThreads) {
    const int d = idx / DK, kk = idx % DK;
    const float w = sW[d * LD + kk];
    p.W_out[state_base + idx] = w;
    p.S_out[state_base + idx] = sS[d * LD + kk];
    p.A_out[state_base + idx] = sA[d * LD + kk];  // anchor of the chunk holding the last token
  }
}

// Tiles are sized by the call's chunk size, so short chunks leave room for more blocks per SM.
template <int DK, int ROWS>
size_t fwd_smem_bytes(int C) {
  constexpr int LD = DK + 1;
  return sizeof(float) * (3 * ROWS * LD + 2 * C * LD + 3 * C * ROWS + 9 * C + 4);
}

template <typename T, typename TY, int DK, int ROWS>
int launch_fwd(const MemoryScanFwdArgs& p, cudaStream_t stream) {
  const size_t smem = fwd_smem_bytes<DK, ROWS>(p.shape.chunk_size);
  return launch_row_slices<ROWS>(memory_scan_fwd_kernel<T, TY, DK, ROWS>, p, smem, stream);
}

template <typename T, typename TY>
int dispatch_fwd(const MemoryScanFwdArgs& p, cudaStream_t stream) {
  constexpr int R = kFwdRows;
  switch (p.shape.dk) {
    case 32: return launch_fwd<T, TY, 32, R>(p, stream);
    case 64: return launch_fwd<T, TY, 64, R>(p, stream);
    case 128: return launch_fwd<T, TY, 128, R>(p, stream);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace detail

int64_t memory_scan_num_segments(int64_t length, int chunk_size, int64_t offset) {
  return detail::num_segments(length, chunk_size, offset);
}

int memory_scan_fwd_rows(int) { return detail::kFwdRows; }
int memory_scan_bwd_rows(int) { return detail::kBwdRows; }

const char* memory_scan_check_shape(const MemoryScanShape& s) {
  if (s.dk != 32 && s.dk != 64 && s.dk != 128) return "dk (key head dim) must be 32, 64 or 128";
  if (s.dv < 32 || s.dv > 256 || s.dv % 32 != 0) return "dv (value head dim) must be a multiple of 32 in [32, 256]";
  if (s.chunk_size < 1 || s.chunk_size > detail::kMaxChunk) return "chunk_size must be in [1, 64]";
  if (s.offset < 0) return "offset must be >= 0";
  if (s.in_dtype == InDType::kFloat32 && s.out_dtype != InDType::kFloat32) return "fp32 inputs need fp32 y";
  if (s.batch < 0 || s.length < 0 || s.heads < 0) return "sizes must be >= 0";
  return "";
}

int memory_scan_fwd(const MemoryScanFwdArgs& p, void* stream) {
  if (memory_scan_check_shape(p.shape)[0] != '\0') return static_cast<int>(cudaErrorInvalidValue);
  if (p.shape.batch == 0 || p.shape.heads == 0) return 0;
  auto st = static_cast<cudaStream_t>(stream);
  if (p.shape.in_dtype == InDType::kBFloat16) {
    if (p.shape.out_dtype == InDType::kBFloat16) return detail::dispatch_fwd<__nv_bfloat16, __nv_bfloat16>(p, st);
    return detail::dispatch_fwd<__nv_bfloat16, float>(p, st);
  }
  return detail::dispatch_fwd<float, float>(p, st);
}

const char* memory_scan_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

}  // namespace nestlm
