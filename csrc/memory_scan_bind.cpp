// Torch binding of the fused linear-memory scan, registered as torch.ops.nestlm_csrc.*.
// Needs only ATen / dispatcher headers (no CUDA, no Python headers): the caller passes the current
// CUDA stream as an integer, and the kernels live in the .cu files.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <limits>
#include <string>
#include <vector>

#include "memory_scan.h"

namespace {

using nestlm::InDType;
using nestlm::MemoryScanShape;

void check_cuda_contig(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_f32(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  check_cuda_contig(t, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

void launch_check(int code, const char* what) {
  TORCH_CHECK(code == 0, what, " failed: ", nestlm::memory_scan_error_string(code));
}

MemoryScanShape make_shape(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t chunk_size,
                           int64_t offset, bool out_fp32) {
  TORCH_CHECK(q.dim() == 4, "q must be [batch, length, heads, dk], got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes(), "k must match q's shape ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.dim() == 4 && v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == q.size(2),
              "v must be [batch, length, heads, dv] matching q, got ", v.sizes());
  for (const auto* t : {&q, &k, &v}) check_cuda_contig(*t, "q/k/v");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "q, k, v must share one dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "q, k, v must be float32 or bfloat16, got ", q.scalar_type());
  MemoryScanShape s;
  s.batch = static_cast<int>(q.size(0));
  s.length = static_cast<int>(q.size(1));
  s.heads = static_cast<int>(q.size(2));
  s.dk = static_cast<int>(q.size(3));
  s.dv = static_cast<int>(v.size(3));
  s.chunk_size = static_cast<int>(chunk_size);
  s.offset = offset;
  s.in_dtype = q.scalar_type() == at::kBFloat16 ? InDType::kBFloat16 : InDType::kFloat32;
  s.out_dtype = out_fp32 ? InDType::kFloat32 : s.in_dtype;
  const std::string why = nestlm::memory_scan_check_shape(s);
  TORCH_CHECK(why.empty(), "linear_memory_scan kernel: ", why);
  return s;
}

// Test hook: when set, every output buffer starts as NaN, so an element a kernel fails to write
// shows up in the comparison instead of passing as stale memory.
bool g_poison = false;

void set_poison(bool on) { g_poison = on; }

at::Tensor out_empty(at::IntArrayRef shape, const at::TensorOptions& opts) {
  return g_poison ? at::full(shape, std::numeric_limits<float>::quiet_NaN(), opts) : at::empty(shape, opts);
}

at::Tensor out_like(const at::Tensor& t) { return out_empty(t.sizes(), t.options()); }

void* as_stream(int64_t stream) { return reinterpret_cast<void*>(static_cast<intptr_t>(stream)); }

// Returns y, W_end, S_end, A_end, W_states, S_states (the last two empty unless save_states).
// y is fp32 when y_fp32, else in the dtype of q, k, v.
std::vector<at::Tensor> memory_scan_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& lr, const at::Tensor& momentum,
                                        const at::Tensor& decay, const at::Tensor& W, const at::Tensor& S,
                                        const at::Tensor& A, int64_t chunk_size, int64_t offset,
                                        bool save_states, bool y_fp32, int64_t stream) {
  const MemoryScanShape s = make_shape(q, k, v, chunk_size, offset, y_fp32);
  const std::vector<int64_t> gate_shape{s.batch, s.length, s.heads};
  const std::vector<int64_t> state_shape{s.batch, s.heads, s.dv, s.dk};
  check_f32(lr, "lr", gate_shape);
  check_f32(momentum, "momentum", gate_shape);
  check_f32(decay, "decay", gate_shape);
  check_f32(W, "W", state_shape);
  check_f32(S, "S", state_shape);
  check_f32(A, "W_anchor", state_shape);
  const int64_t n_seg = nestlm::memory_scan_num_segments(s.length, s.chunk_size, s.offset);
  at::Tensor y = out_empty(v.sizes(), v.options().dtype(y_fp32 ? at::kFloat : v.scalar_type()));
  at::Tensor W1 = out_like(W), S1 = out_like(S), A1 = out_like(A);
  const auto f32 = W.options();
  at::Tensor Wst = save_states ? out_empty({s.batch, s.heads, n_seg, s.dv, s.dk}, f32) : at::empty({0}, f32);
  at::Tensor Sst = save_states ? out_empty({s.batch, s.heads, n_seg, s.dv, s.dk}, f32) : at::empty({0}, f32);
  nestlm::MemoryScanFwdArgs a;
  a.shape = s;
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.lr = lr.data_ptr<float>();
  a.momentum = momentum.data_ptr<float>();
  a.decay = decay.data_ptr<float>();
  a.W = W.data_ptr<float>();
  a.S = S.data_ptr<float>();
  a.A = A.data_ptr<float>();
  a.y = y.data_ptr();
  a.W_out = W1.data_ptr<float>();
  a.S_out = S1.data_ptr<float>();
  a.A_out = A1.data_ptr<float>();
  a.W_states = save_states ? Wst.data_ptr<float>() : nullptr;
  a.S_states = save_states ? Sst.data_ptr<float>() : nullptr;
  launch_check(nestlm::memory_scan_fwd(a, as_stream(stream)), "memory_scan_fwd");
  return {y, W1, S1, A1, Wst, Sst};
}

// Returns dq, dk, dv, dlr, dmomentum, ddecay, dW0, dS0, dA (gate and q/k grads summed over slices).
std::vector<at::Tensor> memory_scan_bwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& lr, const at::Tensor& momentum,
                                        const at::Tensor& decay, const at::Tensor& A,
                                        const at::Tensor& W_states, const at::Tensor& S_states,
                                        int64_t chunk_size, int64_t offset, const at::Tensor& dy,
                                        const at::Tensor& dW_end, const at::Tensor& dS_end,
                                        const at::Tensor& dA_end, bool first_order, int64_t stream) {
  const MemoryScanShape s = make_shape(q, k, v, chunk_size, offset, dy.scalar_type() == at::kFloat);
  const std::vector<int64_t> gate_shape{s.batch, s.length, s.heads};
  const std::vector<int64_t> state_shape{s.batch, s.heads, s.dv, s.dk};
  const int64_t n_seg = nestlm::memory_scan_num_segments(s.length, s.chunk_size, s.offset);
  const std::vector<int64_t> states_shape{s.batch, s.heads, n_seg, s.dv, s.dk};
  check_f32(lr, "lr", gate_shape);
  check_f32(momentum, "momentum", gate_shape);
  check_f32(decay, "decay", gate_shape);
  check_f32(A, "W_anchor", state_shape);
  check_f32(W_states, "W_states", states_shape);
  check_f32(S_states, "S_states", states_shape);
  check_f32(dW_end, "grad W_end", state_shape);
  check_f32(dS_end, "grad S_end", state_shape);
  check_f32(dA_end, "grad W_anchor_end", state_shape);
  check_cuda_contig(dy, "grad y");
  TORCH_CHECK(dy.sizes() == v.sizes(), "grad y must have y's shape ", v.sizes(), ", got ", dy.sizes());
  TORCH_CHECK(dy.scalar_type() == v.scalar_type() || dy.scalar_type() == at::kFloat,
              "grad y must be float32 or v's dtype, got ", dy.scalar_type());
  const int n_split = s.dv / nestlm::memory_scan_bwd_rows(s.dv);
  const auto f32 = A.options();
  at::Tensor dq_part = out_empty({n_split, s.batch, s.length, s.heads, s.dk}, f32);
  at::Tensor dk_part = out_empty({n_split, s.batch, s.length, s.heads, s.dk}, f32);
  at::Tensor dgate_part = out_empty({3, n_split, s.batch, s.length, s.heads}, f32);
  at::Tensor dv = out_like(v);
  at::Tensor dW0 = out_like(A), dS0 = out_like(A);
  // The kernel writes dA only when the first segment starts mid-chunk; otherwise it is zero.
  at::Tensor dA = s.offset % s.chunk_size != 0 ? out_like(A) : at::zeros_like(A);
  nestlm::MemoryScanBwdArgs a;
  a.shape = s;
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.dy = dy.data_ptr();
  a.lr = lr.data_ptr<float>();
  a.momentum = momentum.data_ptr<float>();
  a.decay = decay.data_ptr<float>();
  a.A = A.data_ptr<float>();
  a.W_states = W_states.data_ptr<float>();
  a.S_states = S_states.data_ptr<float>();
  a.dW_end = dW_end.data_ptr<float>();
  a.dS_end = dS_end.data_ptr<float>();
  a.dA_end = dA_end.data_ptr<float>();
  a.dq_part = dq_part.data_ptr<float>();
  a.dk_part = dk_part.data_ptr<float>();
  a.dv = dv.data_ptr();
  a.dlr_part = dgate_part[0].data_ptr<float>();
  a.dmom_part = dgate_part[1].data_ptr<float>();
  a.ddec_part = dgate_part[2].data_ptr<float>();
  a.dW0 = dW0.data_ptr<float>();
  a.dS0 = dS0.data_ptr<float>();
  a.dA = dA.data_ptr<float>();
  a.first_order = first_order;
  launch_check(nestlm::memory_scan_bwd(a, as_stream(stream)), "memory_scan_bwd");
  at::Tensor dgates = dgate_part.sum(1);
  return {dq_part.sum(0).to(q.scalar_type()), dk_part.sum(0).to(k.scalar_type()), dv, dgates[0], dgates[1],
          dgates[2], dW0, dS0, dA};
}

}  // namespace

TORCH_LIBRARY(nestlm_csrc, m) {
  m.def("memory_scan_fwd(Tensor q, Tensor k, Tensor v, Tensor lr, Tensor momentum, Tensor decay, Tensor W, "
        "Tensor S, Tensor A, int chunk_size, int offset, bool save_states, bool y_fp32, int stream) -> Tensor[]",
        &memory_scan_fwd);
  m.def("memory_scan_bwd(Tensor q, Tensor k, Tensor v, Tensor lr, Tensor momentum, Tensor decay, Tensor A, "
        "Tensor W_states, Tensor S_states, int chunk_size, int offset, Tensor dy, Tensor dW_end, "
        "Tensor dS_end, Tensor dA_end, bool first_order, int stream) -> Tensor[]",
        &memory_scan_bwd);
  // Test hook: fill every output with NaN before the kernels write it.
  m.def("set_poison(bool on) -> ()", &set_poison);
}
