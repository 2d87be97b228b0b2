// The CUDA C++ backend run on the CPU: csrc/cuda/act_mul_host.h (checks, allocation, variant
// choice) with a device policy that executes the per-thread bodies of act_mul_kernels.cuh one
// emulated thread after another over the grid make_plan gives, on CPU tensors. Registered as the
// ops of the namespace lape_kernels_emu (the same schemas as lape_kernels), so the test matrix
// calls it like every other backend. Built by tests/ops/backends.py with torch's cpp_extension.
#include <torch/library.h>

#include "act_mul_host.h"
#include "schemas.h"

namespace lape_kernels::cuda_impl {
namespace {

constexpr int kEmuThreads = 32;  // threads per emulated block (small: several blocks per row)
int64_t g_resident_blocks = 1;   // blocks "resident at once": sets the number of row chunks

template <typename Params, typename Body>
void run_grid(Params p, int vec, const Body& body) {
  const Plan pl = make_plan(p.rows, p.cols, vec, kEmuThreads, g_resident_blocks);
  p.rows_per_chunk = pl.rows_per_chunk;
  for (int64_t by = 0; by < pl.chunks; ++by)
    for (int64_t bx = 0; bx < pl.grid_x; ++bx)
      for (int t = 0; t < kEmuThreads; ++t) body(p, bx * kEmuThreads + t, by);
}

struct NoGuard {
  explicit NoGuard(const at::Device&) {}
};

struct EmulatedDevice {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;
  static constexpr const char* kName = "CPU";
  using Guard = NoGuard;

  template <typename T, int VEC, Act ACT, bool COUNT, bool SPLIT>
  static void fwd(const FwdParams<T>& p) {
    run_grid(p, VEC, [](const FwdParams<T>& q, int64_t cg, int64_t chunk) {
      fwd_thread<T, VEC, ACT, COUNT, SPLIT>(q, cg, chunk);
    });
  }

  template <typename T, int VEC, Act ACT, bool SPLIT>
  static void bwd(const BwdParams<T>& p) {
    run_grid(p, VEC, [](const BwdParams<T>& q, int64_t cg, int64_t chunk) {
      bwd_thread<T, VEC, ACT, SPLIT>(q, cg, chunk);
    });
  }
};

using Ops = HostOps<EmulatedDevice>;

// Test hooks: the emulated occupancy, and the launch plan / vector rule the host code uses.
int64_t set_resident_blocks(int64_t n) {
  const int64_t old = g_resident_blocks;
  g_resident_blocks = n < 1 ? 1 : n;
  return old;
}

std::vector<int64_t> plan(int64_t rows, int64_t cols, int64_t vec, int64_t threads, int64_t resident) {
  const Plan pl = make_plan(rows, cols, static_cast<int>(vec), static_cast<int>(threads), resident);
  return {pl.col_groups, pl.grid_x, pl.chunks, pl.rows_per_chunk};
}

bool vectorised(const at::Tensor& t) {
  bool ok = false;
  by_dtype(t.scalar_type(), [&](auto* tag) {
    using TT = std::remove_pointer_t<decltype(tag)>;
    ok = use_vectors<TT>({&t}, t.size(1));
  });
  return ok;
}

}  // namespace
}  // namespace lape_kernels::cuda_impl

TORCH_LIBRARY(lape_kernels_emu, m) {
  LAPE_KERNELS_DEFINE_SCHEMAS(m);
  m.def("set_resident_blocks(int n) -> int");
  m.def("plan(int rows, int cols, int vec, int threads, int resident) -> int[]");
  m.def("vectorised(Tensor t) -> bool");
}

TORCH_LIBRARY_IMPL(lape_kernels_emu, CPU, m) {
  LAPE_KERNELS_IMPL_OPS(m, lape_kernels::cuda_impl::Ops);
  m.impl("vectorised", &lape_kernels::cuda_impl::vectorised);
}

TORCH_LIBRARY_IMPL(lape_kernels_emu, CompositeExplicitAutograd, m) {
  m.impl("set_resident_blocks", &lape_kernels::cuda_impl::set_resident_blocks);
  m.impl("plan", &lape_kernels::cuda_impl::plan);
}
