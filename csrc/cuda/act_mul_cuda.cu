// CUDA kernels of the lape_kernels ops: TORCH_LIBRARY_IMPL(lape_kernels, CUDA, m) only (the
// schemas are defined once in csrc/common/schemas.h). The per-thread kernel bodies are in
// act_mul_kernels.cuh, the host side (checks, allocation, variant choice) in act_mul_host.h;
// both also run on the CPU in tests/ops (cuda_emulated.cpp). This file adds what only a GPU has:
// the __global__ kernels, the grid (from the kernel's occupancy) and the launch on the current
// stream.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "../common/schemas.h"
#include "act_mul_host.h"

namespace lape_kernels {
namespace cuda_impl {
namespace {

constexpr int kThreads = 128;

template <typename T, int VEC, Act ACT, bool COUNT, bool SPLIT>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const FwdParams<T> p) {
  const int64_t cg = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  fwd_thread<T, VEC, ACT, COUNT, SPLIT>(p, cg, static_cast<int64_t>(blockIdx.y));
}

template <typename T, int VEC, Act ACT, bool SPLIT>
__global__ void __launch_bounds__(kThreads) bwd_kernel(const BwdParams<T> p) {
  const int64_t cg = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  bwd_thread<T, VEC, ACT, SPLIT>(p, cg, static_cast<int64_t>(blockIdx.y));
}

// Multiprocessors of the current device (cached per device; the guard has set it).
int64_t sm_count() {
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices] = {};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev >= 0 && dev < kMaxDevices && cache[dev] > 0) return cache[dev];
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  if (n < 1) n = 1;
  if (dev >= 0 && dev < kMaxDevices) cache[dev] = n;
  return n;
}

// Launches `Kernel` over the grid make_plan gives for blocks of it that fit on the GPU at once
// (occupancy x SMs, measured once per kernel).
template <auto Kernel, typename Params>
void launch(Params p, int vec) {
  static const int per_sm = [] {
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, Kernel, kThreads, 0));
    return n < 1 ? 1 : n;
  }();
  const Plan pl = make_plan(p.rows, p.cols, vec, kThreads, per_sm * sm_count());
  p.rows_per_chunk = pl.rows_per_chunk;
  const dim3 grid(static_cast<unsigned>(pl.grid_x), static_cast<unsigned>(pl.chunks));
  Kernel<<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct CudaDevice {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CUDA;
  static constexpr const char* kName = "CUDA";
  using Guard = c10::cuda::CUDAGuard;

  template <typename T, int VEC, Act ACT, bool COUNT, bool SPLIT>
  static void fwd(const FwdParams<T>& p) {
    launch<fwd_kernel<T, VEC, ACT, COUNT, SPLIT>>(p, VEC);
  }

  template <typename T, int VEC, Act ACT, bool SPLIT>
  static void bwd(const BwdParams<T>& p) {
    launch<bwd_kernel<T, VEC, ACT, SPLIT>>(p, VEC);
  }
};

using Ops = HostOps<CudaDevice>;

}  // namespace
}  // namespace cuda_impl
}  // namespace lape_kernels

TORCH_LIBRARY_IMPL(lape_kernels, CUDA, m) { LAPE_KERNELS_IMPL_OPS(m, lape_kernels::cuda_impl::Ops); }
