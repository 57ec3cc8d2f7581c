// Definitions behind the CPU stand-in and flat C entry points for ctypes.
#include <cuda_runtime.h>
#include <ucontext.h>

#include <cstdio>

#include "memory_scan.h"

EmuDim3 threadIdx;
EmuDim3 blockIdx;

// The kernels declare `extern __shared__ float smem[]` inside nestlm::detail.
namespace nestlm {
namespace detail {
alignas(16) float smem[emu::kSharedFloats];
}
}  // namespace nestlm

namespace emu {
float* shared_mem = nestlm::detail::smem;
float exchange[1024];
size_t max_smem_bytes = 0;

namespace {
constexpr size_t kStack = 256 * 1024;
struct Fiber {
  ucontext_t ctx;
  int waiting = -1;  // barrier id, -1 when runnable
  bool done = false;
};
std::vector<Fiber> fibers;
std::vector<std::vector<char>> stacks;
ucontext_t scheduler;
int current = 0;
int count[33];
int expected[33];
const std::function<void()>* body_fn = nullptr;
bool reverse_order = false;

void fiber_main() {
  (*body_fn)();
  fibers[current].done = true;  // returns to `scheduler` through uc_link
}
}  // namespace

void run_block(int block, const std::function<void()>& body) {
  body_fn = &body;
  fibers.assign(block, Fiber{});
  if (stacks.size() < static_cast<size_t>(block)) stacks.resize(block, std::vector<char>(kStack));
  expected[0] = block;
  for (int w = 1; w < 33; ++w) expected[w] = 32;
  std::fill(count, count + 33, 0);
  for (int t = 0; t < block; ++t) {
    getcontext(&fibers[t].ctx);
    fibers[t].ctx.uc_stack.ss_sp = stacks[t].data();
    fibers[t].ctx.uc_stack.ss_size = kStack;
    fibers[t].ctx.uc_link = &scheduler;
    makecontext(&fibers[t].ctx, fiber_main, 0);
  }
  for (;;) {
    bool alive = false, progress = false;
    for (int i = 0; i < block; ++i) {
      const int t = reverse_order ? block - 1 - i : i;
      if (fibers[t].done) continue;
      alive = true;
      if (fibers[t].waiting >= 0) continue;
      current = t;
      threadIdx.x = t;
      swapcontext(&scheduler, &fibers[t].ctx);
      progress = true;
    }
    if (!alive) break;
    if (!progress) throw std::runtime_error("emulated block deadlocked: a barrier not reached by all threads");
  }
}

void barrier(int id) {
  if (++count[id] == expected[id]) {
    count[id] = 0;
    for (auto& f : fibers)
      if (f.waiting == id) f.waiting = -1;
    return;
  }
  fibers[current].waiting = id;
  const int me = current;
  swapcontext(&fibers[me].ctx, &scheduler);
}
void set_reverse_order(bool on) { reverse_order = on; }
}  // namespace emu

namespace {
nestlm::MemoryScanShape shape(const int64_t* dims) {
  nestlm::MemoryScanShape s;
  s.batch = static_cast<int>(dims[0]);
  s.length = static_cast<int>(dims[1]);
  s.heads = static_cast<int>(dims[2]);
  s.dk = static_cast<int>(dims[3]);
  s.dv = static_cast<int>(dims[4]);
  s.chunk_size = static_cast<int>(dims[5]);
  s.offset = dims[6];
  s.in_dtype = dims[7] ? nestlm::InDType::kBFloat16 : nestlm::InDType::kFloat32;
  s.out_dtype = dims[8] ? nestlm::InDType::kBFloat16 : nestlm::InDType::kFloat32;
  return s;
}
}  // namespace

extern "C" {

int64_t emu_num_segments(int64_t length, int chunk, int64_t offset) {
  return nestlm::memory_scan_num_segments(length, chunk, offset);
}
int emu_bwd_rows(int dv) { return nestlm::memory_scan_bwd_rows(dv); }
size_t emu_max_smem_bytes() { return emu::max_smem_bytes; }
// Schedule threads last-to-first between barriers: with both orders, a read that misses a barrier
// sees the writer's value in one order and stale / NaN-poisoned memory in the other.
void emu_set_reverse_order(int on) { emu::set_reverse_order(on != 0); }

// ptrs: q k v lr mom dec W S A y W_out S_out A_out W_states S_states
int emu_fwd(const int64_t* dims, void** ptrs) {
  nestlm::MemoryScanFwdArgs a;
  a.shape = shape(dims);
  a.q = ptrs[0];
  a.k = ptrs[1];
  a.v = ptrs[2];
  a.lr = static_cast<const float*>(ptrs[3]);
  a.momentum = static_cast<const float*>(ptrs[4]);
  a.decay = static_cast<const float*>(ptrs[5]);
  a.W = static_cast<const float*>(ptrs[6]);
  a.S = static_cast<const float*>(ptrs[7]);
  a.A = static_cast<const float*>(ptrs[8]);
  a.y = ptrs[9];
  a.W_out = static_cast<float*>(ptrs[10]);
  a.S_out = static_cast<float*>(ptrs[11]);
  a.A_out = static_cast<float*>(ptrs[12]);
  a.W_states = static_cast<float*>(ptrs[13]);
  a.S_states = static_cast<float*>(ptrs[14]);
  try {
    return nestlm::memory_scan_fwd(a, nullptr);
  } catch (const std::exception& err) {
    std::fprintf(stderr, "emulated forward: %s\n", err.what());
    return -1;
  }
}

// ptrs: q k v dy lr mom dec A W_states S_states dW_end dS_end dA_end
//       dq_part dk_part dv dlr_part dmom_part ddec_part dW0 dS0 dA
int emu_bwd(const int64_t* dims, void** ptrs) {
  nestlm::MemoryScanBwdArgs a;
  a.shape = shape(dims);
  a.q = ptrs[0];
  a.k = ptrs[1];
  a.v = ptrs[2];
  a.dy = ptrs[3];
  a.lr = static_cast<const float*>(ptrs[4]);
  a.momentum = static_cast<const float*>(ptrs[5]);
  a.decay = static_cast<const float*>(ptrs[6]);
  a.A = static_cast<const float*>(ptrs[7]);
  a.W_states = static_cast<const float*>(ptrs[8]);
  a.S_states = static_cast<const float*>(ptrs[9]);
  a.dW_end = static_cast<const float*>(ptrs[10]);
  a.dS_end = static_cast<const float*>(ptrs[11]);
  a.dA_end = static_cast<const float*>(ptrs[12]);
  a.dq_part = static_cast<float*>(ptrs[13]);
  a.dk_part = static_cast<float*>(ptrs[14]);
  a.dv = ptrs[15];
  a.dlr_part = static_cast<float*>(ptrs[16]);
  a.dmom_part = static_cast<float*>(ptrs[17]);
  a.ddec_part = static_cast<float*>(ptrs[18]);
  a.dW0 = static_cast<float*>(ptrs[19]);
  a.dS0 = static_cast<float*>(ptrs[20]);
  a.dA = static_cast<float*>(ptrs[21]);
  a.first_order = dims[9] != 0;
  try {
    return nestlm::memory_scan_bwd(a, nullptr);
  } catch (const std::exception& err) {
    std::fprintf(stderr, "emulated backward: %s\n", err.what());
    return -1;
  }
}
}
