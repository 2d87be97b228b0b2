// CUDA kernels of the lape_kernels ops: TORCH_LIBRARY_IMPL(lape_kernels, CUDA, m) only (the
// schemas are defined once in csrc/lape_kernels.cpp). The per-thread kernel bodies are in
// act_mul_kernels.cuh (also run on the CPU by tests/test_cuda.py). This file checks arguments
// like the CPU kernels (reference.py's checks plus last-dim contiguity of gate/up and sel
// sorted/unique/in range), allocates outputs, picks the vector width and grid, and launches on
// the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "act_mul_kernels.cuh"

namespace lape_kernels {
namespace cuda_impl {
namespace {

using at::Tensor;

constexpr int kThreads = 128;

// ---------------------------------------------------------------------------------- kernels --

template <typename T, int VEC, int ACT, bool COUNT, bool SPLIT>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const FwdParams<T> p) {
  const int64_t cg = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  fwd_thread<T, VEC, ACT, COUNT, SPLIT>(p, cg, static_cast<int64_t>(blockIdx.y));
}

template <typename T, int VEC, int ACT, bool SPLIT>
__global__ void __launch_bounds__(kThreads) bwd_kernel(const BwdParams<T> p) {
  const int64_t cg = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  bwd_thread<T, VEC, ACT, SPLIT>(p, cg, static_cast<int64_t>(blockIdx.y));
}

// ----------------------------------------------------------------------------------- launch --

// Blocks of `kernel` that fit on the whole GPU at once: blocks per SM (occupancy) x SMs.
template <typename Kernel>
int blocks_per_sm(Kernel kernel) {
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, 0));
  return n < 1 ? 1 : n;
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

template <typename T, int VEC, int ACT, bool COUNT, bool SPLIT>
void run_fwd(FwdParams<T> p) {
  auto kernel = fwd_kernel<T, VEC, ACT, COUNT, SPLIT>;
  static const int per_sm = blocks_per_sm(kernel);  // once per instantiation
  const Plan pl = make_plan(p.rows, p.cols, VEC, kThreads, per_sm * sm_count());
  p.rows_per_chunk = pl.rows_per_chunk;
  const dim3 grid(static_cast<unsigned>(pl.grid_x), static_cast<unsigned>(pl.chunks));
  kernel<<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int VEC, int ACT, bool SPLIT>
void run_bwd(BwdParams<T> p) {
  auto kernel = bwd_kernel<T, VEC, ACT, SPLIT>;
  static const int per_sm = blocks_per_sm(kernel);  // once per instantiation
  const Plan pl = make_plan(p.rows, p.cols, VEC, kThreads, per_sm * sm_count());
  p.rows_per_chunk = pl.rows_per_chunk;
  const dim3 grid(static_cast<unsigned>(pl.grid_x), static_cast<unsigned>(pl.chunks));
  kernel<<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int VEC, bool COUNT, bool SPLIT>
void fwd_by_act(int act, const FwdParams<T>& p) {
  switch (act) {
    case kSilu: run_fwd<T, VEC, kSilu, COUNT, SPLIT>(p); break;
    case kGeluTanh: run_fwd<T, VEC, kGeluTanh, COUNT, SPLIT>(p); break;
    default: run_fwd<T, VEC, kGelu, COUNT, SPLIT>(p); break;
  }
}

template <typename T, int VEC, bool SPLIT>
void bwd_by_act(int act, const BwdParams<T>& p) {
  switch (act) {
    case kSilu: run_bwd<T, VEC, kSilu, SPLIT>(p); break;
    case kGeluTanh: run_bwd<T, VEC, kGeluTanh, SPLIT>(p); break;
    default: run_bwd<T, VEC, kGelu, SPLIT>(p); break;
  }
}

// 16-byte vectors when every [T, I] operand allows them, else scalars.
template <typename T>
constexpr int vec_width() {
  return static_cast<int>(16 / sizeof(T));
}


template <typename T>
bool use_vectors(std::initializer_list<const Tensor*> ts, int64_t I) {
  constexpr int V = vec_width<T>();
  if (I % V != 0) return false;
  for (const Tensor* t : ts) {
    if (!vector_ok(t->const_data_ptr(), t->size(0), t->stride(0), sizeof(T), V)) return false;
  }
  return true;
}

template <typename T, bool COUNT, bool SPLIT>
void launch_fwd(int act, bool vec, const FwdParams<T>& p) {
  if (vec) {
    fwd_by_act<T, vec_width<T>(), COUNT, SPLIT>(act, p);
  } else {
    fwd_by_act<T, 1, COUNT, SPLIT>(act, p);
  }
}

template <typename T, bool SPLIT>
void launch_bwd(int act, bool vec, const BwdParams<T>& p) {
  if (vec) {
    bwd_by_act<T, vec_width<T>(), SPLIT>(act, p);
  } else {
    bwd_by_act<T, 1, SPLIT>(act, p);
  }
}

// Calls f with a null pointer of the C++ element type of `dtype` (float32/bfloat16/float16).
template <typename F>
void by_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(static_cast<float*>(nullptr)); break;
    case at::kBFloat16: f(static_cast<c10::BFloat16*>(nullptr)); break;
    case at::kHalf: f(static_cast<c10::Half*>(nullptr)); break;
    default: TORCH_CHECK_VALUE(false, "unsupported dtype ", dtype);
  }
}

// ----------------------------------------------------------------------------------- checks --
// Same conditions and messages as reference.py and the CPU kernels (csrc/cpu/kernels.h).

int parse_activation(const std::string& activation) {
  if (activation == "silu") return kSilu;
  if (activation == "gelu_tanh") return kGeluTanh;
  if (activation == "gelu") return kGelu;
  TORCH_CHECK_VALUE(false, "activation must be one of ('silu', 'gelu_tanh', 'gelu'), got '",
                    activation, "'");
  return -1;
}

void check_pair(const Tensor& a, const Tensor& b, const char* na, const char* nb) {
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{na, &a}, {nb, &b}}) {
    TORCH_CHECK_VALUE(t->dim() == 2, name, " must be 2-D [tokens, intermediate], got shape ",
                      t->sizes());
    const auto dt = t->scalar_type();
    TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, name,
                      " must be float32, bfloat16 or float16, got ", dt);
  }
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), na, " and ", nb, " must have the same shape, got ",
                    a.sizes(), " and ", b.sizes());
  TORCH_CHECK_VALUE(a.scalar_type() == b.scalar_type(), na, " and ", nb,
                    " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK_VALUE(a.device() == b.device(), na, " and ", nb,
                    " must be on the same device, got ", a.device(), " and ", b.device());
  TORCH_CHECK_VALUE(a.is_cuda(), na, " must be a CUDA tensor for the CUDA kernel, got ",
                    a.device());
}

// sel: 1-D int64 on gate's device, strictly increasing, in [0, I). The value check needs one
// device-to-host sync; it keeps the kernels' scattered stores in bounds.
void check_sel(const Tensor& sel, int64_t I, const at::Device& device) {
  TORCH_CHECK_VALUE(sel.dim() == 1 && sel.scalar_type() == at::kLong,
                    "sel must be a 1-D int64 tensor, got ", sel.scalar_type(), " of shape ",
                    sel.sizes());
  TORCH_CHECK_VALUE(sel.device() == device, "sel must be on ", device, ", got ", sel.device());
  const int64_t k = sel.size(0);
  if (k == 0) return;
  Tensor bad = at::logical_or(sel.lt(0), sel.ge(I)).any();
  if (k > 1) {
    bad = at::logical_or(bad, sel.slice(0, 1, k).le(sel.slice(0, 0, k - 1)).any());
  }
  TORCH_CHECK_VALUE(!bad.item<bool>(), "sel must be sorted ascending, unique, with values in [0, ",
                    I, ")");
}

// Kernels read rows through stride(0) with unit column stride. gate/up must be like that
// (views such as the halves of a fused gate_up output are); gradients are copied if not.
void check_rows(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.size(1) <= 1 || t.stride(1) == 1, name,
                    " must have a contiguous last dimension (stride(1) == 1), got strides ",
                    t.strides());
}

Tensor rows_view(const Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

int64_t row_stride(const Tensor& t) { return t.size(0) <= 1 ? 0 : t.stride(0); }

// int32 [I]: position of each column in sel, or -1.
Tensor slot_map(const Tensor& sel, int64_t I) {
  const auto iopts = sel.options().dtype(at::kInt);
  Tensor slot = at::full({I}, -1, iopts);
  slot.scatter_(0, sel, at::arange(sel.size(0), iopts));
  return slot;
}

// -------------------------------------------------------------------------------- forward --

template <typename T>
FwdParams<T> fwd_params(const Tensor& gate, const Tensor& up, Tensor& out) {
  FwdParams<T> p{};
  p.gate = reinterpret_cast<const T*>(gate.const_data_ptr());
  p.up = reinterpret_cast<const T*>(up.const_data_ptr());
  p.stride_gate = row_stride(gate);
  p.stride_up = row_stride(up);
  p.out = reinterpret_cast<T*>(out.data_ptr());
  p.out_sel = nullptr;
  p.slot = nullptr;
  p.token_lang = nullptr;
  p.num_langs = 1;
  p.over_zero = nullptr;
  p.act_sum = nullptr;
  p.rows = gate.size(0);
  p.cols = gate.size(1);
  p.k = 0;
  p.rows_per_chunk = 1;
  return p;
}

Tensor act_mul(const Tensor& gate, const Tensor& up, const std::string& activation) {
  check_pair(gate, up, "gate", "up");
  check_rows(gate, "gate");
  check_rows(up, "up");
  const int act = parse_activation(activation);
  const c10::cuda::CUDAGuard guard(gate.device());
  const int64_t T = gate.size(0), I = gate.size(1);
  Tensor out = at::empty({T, I}, gate.options());
  if (T == 0 || I == 0) return out;
  by_dtype(gate.scalar_type(), [&](auto* tag) {
    using TT = std::remove_pointer_t<decltype(tag)>;
    const auto p = fwd_params<TT>(gate, up, out);
    launch_fwd<TT, false, false>(act, use_vectors<TT>({&gate, &up, &out}, I), p);
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> act_mul_count(const Tensor& gate, const Tensor& up,
                                                 const std::string& activation,
                                                 const std::optional<Tensor>& token_lang_in,
                                                 int64_t num_langs) {
  check_pair(gate, up, "gate", "up");
  check_rows(gate, "gate");
  check_rows(up, "up");
  const int act = parse_activation(activation);
  TORCH_CHECK_VALUE(num_langs >= 1, "num_langs must be >= 1, got ", num_langs);
  const int64_t T = gate.size(0), I = gate.size(1);
  Tensor token_lang;
  if (token_lang_in.has_value()) {
    const Tensor& t = *token_lang_in;
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == T && t.scalar_type() == at::kLong,
                      "token_lang must be int64 of shape [", T, "], got ", t.scalar_type(),
                      " of shape ", t.sizes());
    TORCH_CHECK_VALUE(t.device() == gate.device(), "token_lang must be on ", gate.device(),
                      ", got ", t.device());
  }
  // Per-thread counters are int32 over at most T rows.
  TORCH_CHECK_VALUE(T < std::numeric_limits<int32_t>::max(), "gate has too many rows (", T, ")");
  const c10::cuda::CUDAGuard guard(gate.device());
  if (token_lang_in.has_value()) token_lang = token_lang_in->contiguous();
  Tensor out = at::empty({T, I}, gate.options());
  Tensor over_zero = at::zeros({num_langs, I}, gate.options().dtype(at::kLong));
  Tensor act_sum = at::zeros({num_langs, I}, gate.options().dtype(at::kDouble));
  if (T == 0 || I == 0) return {out, over_zero, act_sum};
  by_dtype(gate.scalar_type(), [&](auto* tag) {
    using TT = std::remove_pointer_t<decltype(tag)>;
    auto p = fwd_params<TT>(gate, up, out);
    p.token_lang = token_lang.defined() ? token_lang.const_data_ptr<int64_t>() : nullptr;
    p.num_langs = num_langs;
    p.over_zero = over_zero.data_ptr<int64_t>();
    p.act_sum = act_sum.data_ptr<double>();
    launch_fwd<TT, true, false>(act, use_vectors<TT>({&gate, &up, &out}, I), p);
  });
  return {out, over_zero, act_sum};
}

std::tuple<Tensor, Tensor> act_mul_split(const Tensor& gate, const Tensor& up,
                                         const std::string& activation, const Tensor& sel) {
  check_pair(gate, up, "gate", "up");
  check_rows(gate, "gate");
  check_rows(up, "up");
  const int act = parse_activation(activation);
  const int64_t T = gate.size(0), I = gate.size(1);
  const c10::cuda::CUDAGuard guard(gate.device());
  check_sel(sel, I, gate.device());
  const int64_t k = sel.size(0);
  Tensor out = at::empty({T, I}, gate.options());
  Tensor out_sel = at::empty({T, k}, gate.options());
  if (T == 0 || I == 0) return {out, out_sel};
  const Tensor slot = k > 0 ? slot_map(sel, I) : Tensor();
  by_dtype(gate.scalar_type(), [&](auto* tag) {
    using TT = std::remove_pointer_t<decltype(tag)>;
    auto p = fwd_params<TT>(gate, up, out);
    const bool vec = use_vectors<TT>({&gate, &up, &out}, I);
    if (k == 0) {
      launch_fwd<TT, false, false>(act, vec, p);
    } else {
      p.out_sel = reinterpret_cast<TT*>(out_sel.data_ptr());
      p.slot = slot.const_data_ptr<int32_t>();
      p.k = k;
      launch_fwd<TT, false, true>(act, vec, p);
    }
  });
  return {out, out_sel};
}

// ------------------------------------------------------------------------------- backward --

template <typename T>
BwdParams<T> bwd_params(const Tensor& grad_out, const Tensor& gate, const Tensor& up,
                        Tensor& grad_gate, Tensor& grad_up) {
  BwdParams<T> p{};
  p.grad_out = reinterpret_cast<const T*>(grad_out.const_data_ptr());
  p.grad_out_sel = nullptr;
  p.gate = reinterpret_cast<const T*>(gate.const_data_ptr());
  p.up = reinterpret_cast<const T*>(up.const_data_ptr());
  p.stride_grad = row_stride(grad_out);
  p.stride_gate = row_stride(gate);
  p.stride_up = row_stride(up);
  p.grad_gate = reinterpret_cast<T*>(grad_gate.data_ptr());
  p.grad_up = reinterpret_cast<T*>(grad_up.data_ptr());
  p.grad_gate_sel = nullptr;
  p.grad_up_sel = nullptr;
  p.out_sel = nullptr;
  p.slot = nullptr;
  p.rows = gate.size(0);
  p.cols = gate.size(1);
  p.k = 0;
  p.rows_per_chunk = 1;
  return p;
}

std::tuple<Tensor, Tensor> act_mul_backward(const Tensor& grad_out_in, const Tensor& gate,
                                            const Tensor& up, const std::string& activation) {
  check_pair(gate, up, "gate", "up");
  check_pair(grad_out_in, gate, "grad_out", "gate");
  check_rows(gate, "gate");
  check_rows(up, "up");
  const int act = parse_activation(activation);
  const c10::cuda::CUDAGuard guard(gate.device());
  const Tensor grad_out = rows_view(grad_out_in);
  const int64_t T = gate.size(0), I = gate.size(1);
  Tensor grad_gate = at::empty({T, I}, gate.options());
  Tensor grad_up = at::empty({T, I}, gate.options());
  if (T == 0 || I == 0) return {grad_gate, grad_up};
  by_dtype(gate.scalar_type(), [&](auto* tag) {
    using TT = std::remove_pointer_t<decltype(tag)>;
    const auto p = bwd_params<TT>(grad_out, gate, up, grad_gate, grad_up);
    launch_bwd<TT, false>(act, use_vectors<TT>({&grad_out, &gate, &up, &grad_gate, &grad_up}, I), p);
  });
  return {grad_gate, grad_up};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> act_mul_backward_split(
    const Tensor& grad_out_in, const Tensor& grad_out_sel_in, const Tensor& gate,
    const Tensor& up, const std::string& activation, const Tensor& sel) {
  check_pair(gate, up, "gate", "up");
  check_pair(grad_out_in, gate, "grad_out", "gate");
  check_rows(gate, "gate");
  check_rows(up, "up");
  const int act = parse_activation(activation);
  const int64_t T = gate.size(0), I = gate.size(1);
  const c10::cuda::CUDAGuard guard(gate.device());
  check_sel(sel, I, gate.device());
  const int64_t k = sel.size(0);
  TORCH_CHECK_VALUE(grad_out_sel_in.dim() == 2 && grad_out_sel_in.size(0) == T &&
                        grad_out_sel_in.size(1) == k,
                    "grad_out_sel must have shape [", T, ", ", k, "], got ",
                    grad_out_sel_in.sizes());
  TORCH_CHECK_VALUE(grad_out_sel_in.scalar_type() == gate.scalar_type(),
                    "grad_out_sel must have the dtype of gate (", gate.scalar_type(), "), got ",
                    grad_out_sel_in.scalar_type());
  TORCH_CHECK_VALUE(grad_out_sel_in.device() == gate.device(), "grad_out_sel must be on ",
                    gate.device(), ", got ", grad_out_sel_in.device());
  const Tensor grad_out = rows_view(grad_out_in);
  const auto opts = gate.options();
  Tensor grad_gate = at::empty({T, I}, opts), grad_up = at::empty({T, I}, opts);
  Tensor grad_gate_sel = at::empty({T, k}, opts), grad_up_sel = at::empty({T, k}, opts);
  Tensor out_sel = at::empty({T, k}, opts);
  if (T == 0 || I == 0) return {grad_gate, grad_up, grad_gate_sel, grad_up_sel, out_sel};
  const Tensor grad_out_sel = k > 0 ? grad_out_sel_in.contiguous() : Tensor();
  const Tensor slot = k > 0 ? slot_map(sel, I) : Tensor();
  by_dtype(gate.scalar_type(), [&](auto* tag) {
    using TT = std::remove_pointer_t<decltype(tag)>;
    auto p = bwd_params<TT>(grad_out, gate, up, grad_gate, grad_up);
    const bool vec = use_vectors<TT>({&grad_out, &gate, &up, &grad_gate, &grad_up}, I);
    if (k == 0) {
      launch_bwd<TT, false>(act, vec, p);
    } else {
      p.grad_out_sel = reinterpret_cast<const TT*>(grad_out_sel.const_data_ptr());
      p.grad_gate_sel = reinterpret_cast<TT*>(grad_gate_sel.data_ptr());
      p.grad_up_sel = reinterpret_cast<TT*>(grad_up_sel.data_ptr());
      p.out_sel = reinterpret_cast<TT*>(out_sel.data_ptr());
      p.slot = slot.const_data_ptr<int32_t>();
      p.k = k;
      launch_bwd<TT, true>(act, vec, p);
    }
  });
  return {grad_gate, grad_up, grad_gate_sel, grad_up_sel, out_sel};
}

// ------------------------------------------------------------------ gate_up_act_mul_count --
// Composite: gate = x w_gate^T and up = x w_up^T by cuBLAS with fp32 results (bf16/fp16 inputs
// through at::mm's out_dtype overload, fp32 accumulation, no rounding to the input dtype; fp32
// inputs through at::mm, so TF32 only if torch.backends.cuda.matmul.allow_tf32 says so), then
// the act_mul_count kernel above on the fp32 projections and one rounding of out to x's dtype.
// This materialises gate/up in fp32; the Triton backend (lape_kernels/triton_gemm.py) fuses the
// count into the GEMM epilogue instead.

void check_gemm_operand(const Tensor& t, const char* name, const char* dims) {
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D ", dims, ", got shape ", t.sizes());
  const auto dt = t.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, name,
                    " must be float32, bfloat16 or float16, got ", dt);
}

std::tuple<Tensor, Tensor, Tensor> gate_up_act_mul_count(const Tensor& x, const Tensor& w_gate,
                                                         const Tensor& w_up,
                                                         const std::string& activation,
                                                         const std::optional<Tensor>& token_lang,
                                                         int64_t num_langs) {
  check_gemm_operand(x, "x", "[tokens, hidden]");
  check_gemm_operand(w_gate, "w_gate", "[intermediate, hidden]");
  check_gemm_operand(w_up, "w_up", "[intermediate, hidden]");
  TORCH_CHECK_VALUE(w_gate.sizes() == w_up.sizes(), "w_gate and w_up must have the same shape, got ",
                    w_gate.sizes(), " and ", w_up.sizes());
  TORCH_CHECK_VALUE(x.size(1) == w_gate.size(1),
                    "x and w_gate must have the same hidden size (dim 1), got ", x.sizes(), " and ",
                    w_gate.sizes());
  TORCH_CHECK_VALUE(x.scalar_type() == w_gate.scalar_type() && x.scalar_type() == w_up.scalar_type(),
                    "x, w_gate and w_up must have the same dtype, got ", x.scalar_type(), ", ",
                    w_gate.scalar_type(), " and ", w_up.scalar_type());
  TORCH_CHECK_VALUE(x.device() == w_gate.device() && x.device() == w_up.device(),
                    "x, w_gate and w_up must be on the same device, got ", x.device(), ", ",
                    w_gate.device(), " and ", w_up.device());
  TORCH_CHECK_VALUE(x.is_cuda(), "x must be a CUDA tensor for the CUDA kernel, got ", x.device());
  check_rows(x, "x");
  check_rows(w_gate, "w_gate");
  check_rows(w_up, "w_up");
  parse_activation(activation);
  // act_mul_count checks these again; checking first avoids two GEMMs on a bad call.
  TORCH_CHECK_VALUE(num_langs >= 1, "num_langs must be >= 1, got ", num_langs);
  const int64_t T = x.size(0);
  if (token_lang.has_value()) {
    const Tensor& t = *token_lang;
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == T && t.scalar_type() == at::kLong,
                      "token_lang must be int64 of shape [", T, "], got ", t.scalar_type(),
                      " of shape ", t.sizes());
    TORCH_CHECK_VALUE(t.device() == x.device(), "token_lang must be on ", x.device(), ", got ",
                      t.device());
  }
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor gate, up;
  if (x.scalar_type() == at::kFloat) {
    gate = at::mm(x, w_gate.t());
    up = at::mm(x, w_up.t());
  } else {
    gate = at::mm(x, w_gate.t(), at::kFloat);
    up = at::mm(x, w_up.t(), at::kFloat);
  }
  auto [out, over_zero, act_sum] = act_mul_count(gate, up, activation, token_lang, num_langs);
  return {out.to(x.scalar_type()), over_zero, act_sum};
}

}  // namespace
}  // namespace cuda_impl
}  // namespace lape_kernels

TORCH_LIBRARY_IMPL(lape_kernels, CUDA, m) {
  m.impl("act_mul", &lape_kernels::cuda_impl::act_mul);
  m.impl("act_mul_count", &lape_kernels::cuda_impl::act_mul_count);
  m.impl("act_mul_backward", &lape_kernels::cuda_impl::act_mul_backward);
  m.impl("act_mul_split", &lape_kernels::cuda_impl::act_mul_split);
  m.impl("act_mul_backward_split", &lape_kernels::cuda_impl::act_mul_backward_split);
  m.impl("gate_up_act_mul_count", &lape_kernels::cuda_impl::gate_up_act_mul_count);
}
