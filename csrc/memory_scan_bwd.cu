// Backward kernel of the fused linear-memory scan (see memory_scan.h for layouts).
//
// Reverse sweep over segments, one thread block per (batch, head, slice of kRows rows of W). Each
// segment is recomputed from its saved start state (W0, S0); the carried adjoints dW, dS of the
// block's rows stay in shared memory for the whole sweep. For a segment with anchor A and
// incoming dW1, dS1 (docs/kernels.md gives the forward closed form these differentiate):
//   r_i = A k_i - v_i,  m1_i = dS1 k_i,  m2_i = dW1 k_i,  gr_i = -2 (a_i m1_i + c_i m2_i)
//   dv_i = -gr_i,  dq_i = A^T dy_i,  dk_i = A^T gr_i - 2 a_i dS1^T r_i - 2 c_i dW1^T r_i
//   dA = sum_i dy_i q_i^T + gr_i k_i^T
//   da_i = -2 r_i . m1_i, dc_i = -2 r_i . m2_i, dE = <dS1, S0>, dB = <dW1, W0>, dgamma = <dW1, S0>
//   dS0 = E dS1 + gamma dW1,  dW0 = B dW1 (+ dA when the anchor is W0)
// With first_order the inner gradients see a detached anchor: dA keeps only the read term.
// dq, dk and the gate gradients are sums over rows, so each slice writes its partial sum; the
// scalar adjoint map (da, dc, dE, dB, dgamma) -> (dlr, dmomentum, ddecay) is linear, so the slices
// push their partials through it independently.
#include "memory_scan_common.cuh"

namespace nestlm {
namespace detail {

template <typename T, typename TY, int DK, int ROWS>
__global__ void __launch_bounds__(kThreads) memory_scan_bwd_kernel(MemoryScanBwdArgs p) {
  constexpr int LD = DK + 1;
  const MemoryScanShape sh = p.shape;
  const int L = sh.length, H = sh.heads, DV = sh.dv, C = sh.chunk_size;
  const int n_split = DV / ROWS;
  const int split = blockIdx.x % n_split;
  const int bh = blockIdx.x / n_split;
  const int r0 = split * ROWS;
  const int b = bh / H, h = bh % H;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;

  extern __shared__ float smem[];
  float* sAin = smem;  // anchor passed in (used only by a first segment that starts mid-chunk)
  float* sW0 = sAin + ROWS * LD;
  float* sS0 = sW0 + ROWS * LD;
  float* sdW = sS0 + ROWS * LD;
  float* sdS = sdW + ROWS * LD;
  float* sQ = sdS + ROWS * LD;
  float* sK = sQ + C * LD;
  float* sV = sK + C * LD;  // later reused for r
  float* sdY = sV + C * ROWS;
  float* sGR = sdY + C * ROWS;
  float* sRM1 = sGR + C * ROWS;
  float* sRM2 = sRM1 + C * ROWS;
  float* sTh = sRM2 + C * ROWS;
  float* sEt = sTh + C;
  float* sAl = sEt + C;
  float* sa = sAl + C;
  float* sc = sa + C;
  float* sP = sc + C;
  float* sg = sP + C;
  float* sD = sg + C;
  float* sda = sD + C;
  float* sdc = sda + C;
  float* sEBG = sdc + C;   // 3
  float* sRed = sEBG + 4;          // [kWarps][3]

  const T* v = static_cast<const T*>(p.v);
  const TY* dy = static_cast<const TY*>(p.dy);
  T* dv_out = static_cast<T*>(p.dv);
  const size_t state_base = (static_cast<size_t>(bh) * DV + r0) * DK;
  const size_t BLH = static_cast<size_t>(sh.batch) * L * H;

  for (int idx = tid; idx < ROWS * DK; idx += kThreads) {
    const int d = idx / DK, kk = idx % DK;
    sAin[d * LD + kk] = p.A[state_base + idx];
    sdW[d * LD + kk] = p.dW_end[state_base + idx];
    sdS[d * LD + kk] = p.dS_end[state_base + idx];
  }

  const int n_seg = static_cast<int>(num_segments(L, C, sh.offset));
  for (int j = n_seg - 1; j >= 0; --j) {
    int s, n;
    segment_bounds(j, L, C, sh.offset, &s, &n);
    const bool aligned = (sh.offset + s) % C == 0;
    const float* sAnc = aligned ? sW0 : sAin;
    __syncthreads();  // previous segment done with every buffer
    for (int idx = tid; idx < ROWS * DK; idx += kThreads) {
      const int d = idx / DK, kk = idx % DK;
      const size_t o = ((static_cast<size_t>(bh) * n_seg + j) * DV + r0) * DK + idx;
      sW0[d * LD + kk] = p.W_states[o];
      sS0[d * LD + kk] = p.S_states[o];
    }
    stage_keys_and_gates<T, DK>(p, b, h, s, n, sQ, sK, sTh, sEt, sAl);
    for (int idx = tid; idx < n * ROWS; idx += kThreads) {
      const int i = idx / ROWS, d = idx % ROWS;
      const size_t g = ((static_cast<size_t>(b) * L + s + i) * H + h) * DV + r0 + d;
      sV[idx] = to_float(v[g]);
      sdY[idx] = to_float(dy[g]);
    }
    __syncthreads();
    if (tid == 0) segment_coefficients(n, sTh, sEt, sAl, sa, sc, sP, sg, sD, sEBG);

    // Scalar adjoints of the state coefficients, partial over this slice's rows.
    float pE = 0.f, pB = 0.f, pG = 0.f;
    for (int idx = tid; idx < ROWS * DK; idx += kThreads) {
      const int d = idx / DK, kk = idx % DK;
      const float dw = sdW[d * LD + kk], s0 = sS0[d * LD + kk];
      pE = fmaf(sdS[d * LD + kk], s0, pE);
      pB = fmaf(dw, sW0[d * LD + kk], pB);
      pG = fmaf(dw, s0, pG);
    }
    pE = warp_sum(pE);
    pB = warp_sum(pB);
    pG = warp_sum(pG);
    if (lane == 0) {
      sRed[warp * 3 + 0] = pE;
      sRed[warp * 3 + 1] = pB;
      sRed[warp * 3 + 2] = pG;
    }
    __syncthreads();  // coefficients ready

    // Per (token, row): r, m1 = dS1 k, m2 = dW1 k, gr; dv is complete here.
    for (int o = tid; o < n * ROWS; o += kThreads) {
      const int i = o / ROWS, d = o % ROWS;
      const float* krow = sK + i * LD;
      const float* arow = sAnc + d * LD;
      const float* dsrow = sdS + d * LD;
      const float* dwrow = sdW + d * LD;
      float acc_r = 0.f, m1 = 0.f, m2 = 0.f;
#pragma unroll 8
      for (int kk = 0; kk < DK; ++kk) {
        const float kv = krow[kk];
        acc_r = fmaf(arow[kk], kv, acc_r);
        m1 = fmaf(dsrow[kk], kv, m1);
        m2 = fmaf(dwrow[kk], kv, m2);
      }
      const float r = acc_r - sV[o];
      const float gr = -2.f * (sa[i] * m1 + sc[i] * m2);
      sGR[o] = gr;
      sRM1[o] = r * m1;
      sRM2[o] = r * m2;
      dv_out[((static_cast<size_t>(b) * L + s + i) * H + h) * DV + r0 + d] = from_float<T>(-gr);
      sV[o] = r;  // v is no longer needed; keep r for dk
    }
    __syncthreads();

    // dq, dk partials (sum over this slice's rows) for each (token, column); da, dc per token.
    for (int o = tid; o < n * DK; o += kThreads) {
      const int i = o / DK, kk = o % DK;
      float acc_q = 0.f, acc_k = 0.f, acc_rs = 0.f, acc_rw = 0.f;
#pragma unroll 8
      for (int d = 0; d < ROWS; ++d) {
        const float av = sAnc[d * LD + kk];
        const float r = sV[i * ROWS + d];
        acc_q = fmaf(sdY[i * ROWS + d], av, acc_q);
        acc_k = fmaf(sGR[i * ROWS + d], av, acc_k);
        acc_rs = fmaf(r, sdS[d * LD + kk], acc_rs);
        acc_rw = fmaf(r, sdW[d * LD + kk], acc_rw);
      }
      const size_t g = ((static_cast<size_t>(split) * BLH + (static_cast<size_t>(b) * L + s + i) * H + h) * DK) + kk;
      p.dq_part[g] = acc_q;
      p.dk_part[g] = acc_k - 2.f * (sa[i] * acc_rs + sc[i] * acc_rw);
    }
    for (int i = warp; i < n; i += kWarps) {
      float x1 = 0.f, x2 = 0.f;
      for (int d = lane; d < ROWS; d += 32) {
        x1 += sRM1[i * ROWS + d];
        x2 += sRM2[i * ROWS + d];
      }
      x1 = warp_sum(x1);
      x2 = warp_sum(x2);
      if (lane == 0) {
        sda[i] = -2.f * x1;
        sdc[i] = -2.f * x2;
      }
    }
    __syncthreads();  // dk used the old dS1 / dW1; da, dc ready

    // Gate gradients of this slice: adjoint of segment_coefficients (serial, n <= kMaxChunk).
    if (tid == 0) {
      float dE = 0.f, dB = 0.f, dG = 0.f;
      for (int w = 0; w < kWarps; ++w) {
        dE += sRed[w * 3 + 0];
        dB += sRed[w * 3 + 1];
        dG += sRed[w * 3 + 2];
      }
      float Pb = sda[0] * sTh[0] + dE * sEt[0];
      float gb = sdc[0] * sTh[0] + dG * sEt[0];
      float Db = dB * (1.f - sAl[0]);
      float deta = dE * sP[0] + dG * sg[0];
      float dalpha = -dB * sD[0];
      for (int i = 0; i < n; ++i) {
        const size_t g = static_cast<size_t>(split) * BLH + (static_cast<size_t>(b) * L + s + i) * H + h;
        p.dlr_part[g] = sda[i] * sP[i] + sdc[i] * sg[i];
        p.dmom_part[g] = deta;
        p.ddec_part[g] = dalpha;
        if (i + 1 < n) {
          Db += gb;
          deta = gb * sg[i + 1] + Pb * sP[i + 1];
          dalpha = -Db * sD[i + 1];
          gb = gb * sEt[i + 1] + sdc[i + 1] * sTh[i + 1];
          Pb = Pb * sEt[i + 1] + sda[i + 1] * sTh[i + 1];
          Db = Db * (1.f - sAl[i + 1]);
        }
      }
    }

    // dA for this slice's rows, then carry dS0 = E dS1 + gamma dW1, dW0 = B dW1 (+ dA).
    const float E = sEBG[0], B = sEBG[1], G = sEBG[2];
    const bool last = j == n_seg - 1;
    for (int idx = tid; idx < ROWS * DK; idx += kThreads) {
      const int d = idx / DK, kk = idx % DK;
      float dA = 0.f;
      for (int i = 0; i < n; ++i) {
        dA = fmaf(sdY[i * ROWS + d], sQ[i * LD + kk], dA);
        if (!p.first_order) dA = fmaf(sGR[i * ROWS + d], sK[i * LD + kk], dA);
      }
      if (last) dA += p.dA_end[state_base + idx];  // the returned anchor is the last segment's
      const float dw1 = sdW[d * LD + kk], ds1 = sdS[d * LD + kk];
      sdS[d * LD + kk] = E * ds1 + G * dw1;
      float dw0 = B * dw1;
      if (aligned) {
        dw0 += dA;
      } else {
        p.dA[state_base + idx] = dA;  // only the first segment can start mid-chunk
      }
      sdW[d * LD + kk] = dw0;
    }
  }
  __syncthreads();
  for (int idx = tid; idx < ROWS * DK; idx += kThreads) {
    const int d = idx / DK, kk = idx % DK;
    p.dW0[state_base + idx] = sdW[d * LD + kk];
    p.dS0[state_base + idx] = sdS[d * LD + kk];
  }
}

template <int DK, int ROWS>
size_t bwd_smem_bytes(int C) {
  constexpr int LD = DK + 1;
  return sizeof(float) * (5 * ROWS * LD + 2 * C * LD + 5 * C * ROWS + 10 * C + 4 + 3 * kWarps);
}

template <typename T, typename TY, int DK, int ROWS>
int launch_bwd(const MemoryScanBwdArgs& p, cudaStream_t stream) {
  const size_t smem = bwd_smem_bytes<DK, ROWS>(p.shape.chunk_size);
  return launch_row_slices<ROWS>(memory_scan_bwd_kernel<T, TY, DK, ROWS>, p, smem, stream);
}

template <typename T, typename TY>
int dispatch_bwd(const MemoryScanBwdArgs& p, cudaStream_t stream) {
  constexpr int R = kBwdRows;
  switch (p.shape.dk) {
    case 32: return launch_bwd<T, TY, 32, R>(p, stream);
    case 64: return launch_bwd<T, TY, 64, R>(p, stream);
    case 128: return launch_bwd<T, TY, 128, R>(p, stream);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace detail

int memory_scan_bwd(const MemoryScanBwdArgs& p, void* stream) {
  if (memory_scan_check_shape(p.shape)[0] != '\0') return static_cast<int>(cudaErrorInvalidValue);
  if (p.shape.batch == 0 || p.shape.heads == 0) return 0;
  auto st = static_cast<cudaStream_t>(stream);
  if (p.shape.in_dtype == InDType::kBFloat16) {
    if (p.shape.out_dtype == InDType::kBFloat16) return detail::dispatch_bwd<__nv_bfloat16, __nv_bfloat16>(p, st);
    return detail::dispatch_bwd<__nv_bfloat16, float>(p, st);
  }
  return detail::dispatch_bwd<float, float>(p, st);
}

}  // namespace nestlm
