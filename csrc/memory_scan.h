// Host-side interface of the fused linear-memory scan kernels.
//
// Plain C++ (no CUDA, no torch headers) so that the torch binding and the .cu files share it and
// each compiles on its own. All tensors are contiguous; sizes and layouts:
//   q, k        [batch, length, heads, dk]   (fp32 or bf16, `in_dtype`)
//   v           [batch, length, heads, dv]   (same dtype)
//   y, dy       [batch, length, heads, dv]   (`out_dtype`: the inputs' dtype or fp32)
//   lr, momentum, decay  [batch, length, heads]  fp32
//   W, S, A     [batch, heads, dv, dk]        fp32 (memory, momentum, chunk anchor)
//   W_states, S_states  [batch, heads, n_seg, dv, dk] fp32 (segment start states, for backward)
// Partial gradients are summed over the `dv / rows` slices by the caller:
//   dq_part, dk_part    [n_split, batch, length, heads, dk] fp32
//   dlr/dmom/ddec_part  [n_split, batch, length, heads]     fp32
#pragma once

#include <cstdint>

namespace nestlm {

enum class InDType : int { kFloat32 = 0, kBFloat16 = 1 };

struct MemoryScanShape {
  int batch = 0, length = 0, heads = 0, dk = 0, dv = 0;
  int chunk_size = 16;
  int64_t offset = 0;  // absolute position of the first token
  InDType in_dtype = InDType::kFloat32;
  // dtype of y (forward) and of dy (backward): the inputs' dtype, or fp32 over bf16 inputs.
  InDType out_dtype = InDType::kFloat32;
};

struct MemoryScanFwdArgs {
  MemoryScanShape shape;
  const void *q = nullptr, *k = nullptr, *v = nullptr;
  const float *lr = nullptr, *momentum = nullptr, *decay = nullptr;
  const float *W = nullptr, *S = nullptr, *A = nullptr;
  void* y = nullptr;
  float *W_out = nullptr, *S_out = nullptr, *A_out = nullptr;
  float *W_states = nullptr, *S_states = nullptr;  // null: inference, nothing saved
};

struct MemoryScanBwdArgs {
  MemoryScanShape shape;
  const void *q = nullptr, *k = nullptr, *v = nullptr, *dy = nullptr;
  const float *lr = nullptr, *momentum = nullptr, *decay = nullptr;
  const float *A = nullptr, *W_states = nullptr, *S_states = nullptr;
  const float *dW_end = nullptr, *dS_end = nullptr, *dA_end = nullptr;
  float *dq_part = nullptr, *dk_part = nullptr;
  void* dv = nullptr;
  float *dlr_part = nullptr, *dmom_part = nullptr, *ddec_part = nullptr;
  float *dW0 = nullptr, *dS0 = nullptr, *dA = nullptr;  // dA: written only when offset is not chunk-aligned
  // Inner gradients taken at a detached anchor: the anchor gets gradient only through the reads.
  bool first_order = false;
};

// Number of segments a call is cut into (chunk boundaries at absolute multiples of chunk_size).
int64_t memory_scan_num_segments(int64_t length, int chunk_size, int64_t offset);
// Rows of W handled by one thread block; the gradient partial buffers have dv / rows slices.
int memory_scan_fwd_rows(int dv);
int memory_scan_bwd_rows(int dv);
// Empty string when the shape is supported, else a one-line reason.
const char* memory_scan_check_shape(const MemoryScanShape& shape);

// Launch on `stream` (a cudaStream_t; null = default stream). Return 0 or a CUDA error code.
int memory_scan_fwd(const MemoryScanFwdArgs& args, void* stream);
int memory_scan_bwd(const MemoryScanBwdArgs& args, void* stream);
const char* memory_scan_error_string(int code);

}  // namespace nestlm
