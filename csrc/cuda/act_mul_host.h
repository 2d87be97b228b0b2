// Host side of the lape_kernels CUDA kernels: argument checks (csrc/common/checks.h), output
// allocation, the vector width and the kernel variant of each op, for a device policy `Dev`.
//
// Why a template: act_mul_cuda.cu instantiates it with the real device (CUDA tensors, kernel
// launches on the current stream); tests/ops/cuda_emulated.cpp instantiates it with an emulated
// device (CPU tensors, the per-thread bodies of act_mul_kernels.cuh run one thread after
// another), so the tests run this very code, checks and allocation included, on any machine.
//
// Dev provides:
//   static constexpr c10::DeviceType kDevice; static constexpr const char* kName;
//   using Guard;                                        // constructible from at::Device
//   template <typename T, int VEC, Act ACT, bool COUNT, bool SPLIT> static void fwd(FwdParams<T>);
//   template <typename T, int VEC, Act ACT, bool SPLIT> static void bwd(BwdParams<T>);
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#include "../common/checks.h"
#include "act_mul_kernels.cuh"

namespace lape_kernels::cuda_impl {

using at::Tensor;
using checks::row_stride;
using checks::rows_view;

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

// Calls f(std::integral_constant<Act, act>) for a runtime activation.
template <typename F>
void by_act(Act act, F&& f) {
  switch (act) {
    case Act::silu: f(std::integral_constant<Act, Act::silu>{}); break;
    case Act::gelu_tanh: f(std::integral_constant<Act, Act::gelu_tanh>{}); break;
    default: f(std::integral_constant<Act, Act::gelu>{}); break;
  }
}

// int32 [I]: position of each column in sel, or -1.
inline Tensor slot_map(const Tensor& sel, int64_t I) {
  const auto iopts = sel.options().dtype(at::kInt);
  Tensor slot = at::full({I}, -1, iopts);
  slot.scatter_(0, sel, at::arange(sel.size(0), iopts));
  return slot;
}

template <typename T>
FwdParams<T> fwd_params(const Tensor& gate, const Tensor& up, Tensor& out) {
  FwdParams<T> p{};
  p.gate = reinterpret_cast<const T*>(gate.const_data_ptr());
  p.up = reinterpret_cast<const T*>(up.const_data_ptr());
  p.stride_gate = row_stride(gate);
  p.stride_up = row_stride(up);
  p.out = reinterpret_cast<T*>(out.data_ptr());
  p.num_langs = 1;
  p.rows = gate.size(0);
  p.cols = gate.size(1);
  p.rows_per_chunk = 1;
  return p;
}

template <typename T>
BwdParams<T> bwd_params(const Tensor& grad_out, const Tensor& gate, const Tensor& up,
                        Tensor& grad_gate, Tensor& grad_up) {
  BwdParams<T> p{};
  p.grad_out = reinterpret_cast<const T*>(grad_out.const_data_ptr());
  p.gate = reinterpret_cast<const T*>(gate.const_data_ptr());
  p.up = reinterpret_cast<const T*>(up.const_data_ptr());
  p.stride_grad = row_stride(grad_out);
  p.stride_gate = row_stride(gate);
  p.stride_up = row_stride(up);
  p.grad_gate = reinterpret_cast<T*>(grad_gate.data_ptr());
  p.grad_up = reinterpret_cast<T*>(grad_up.data_ptr());
  p.rows = gate.size(0);
  p.cols = gate.size(1);
  p.rows_per_chunk = 1;
  return p;
}

template <class Dev>
struct HostOps {
  static Act check(const Tensor& gate, const Tensor& up, const Tensor* grad_out,
                   const std::string& activation) {
    return checks::check_gate_up(gate, up, grad_out, activation, Dev::kDevice, Dev::kName);
  }

  // sel (and the optional slot map) -> the slot map the kernels read. Without `slots` sel's
  // values are checked on the device (one device-to-host sync) and the map built; with it
  // (ops.sel_slots checked sel once) neither: no sync, nothing rebuilt. The kernels treat slots
  // outside [0, k) as unselected, so no map can make them store outside the [T, k] outputs.
  static Tensor selection(const Tensor& sel, const std::optional<Tensor>& slots, const Tensor& gate) {
    checks::check_sel(sel, gate.device());
    const int64_t k = sel.size(0), I = gate.size(1);
    checks::check_slots(slots, I, gate.device());
    if (slots.has_value()) return k > 0 ? slots->contiguous() : Tensor();
    if (k == 0) return Tensor();
    Tensor bad = at::logical_or(sel.lt(0), sel.ge(I)).any();
    if (k > 1) bad = at::logical_or(bad, sel.slice(0, 1, k).le(sel.slice(0, 0, k - 1)).any());
    checks::check_sel_values(!bad.item<bool>(), I);
    return slot_map(sel, I);
  }

  template <typename T, bool COUNT, bool SPLIT>
  static void fwd(Act act, bool vec, const FwdParams<T>& p) {
    by_act(act, [&](auto a) {
      if (vec) {
        Dev::template fwd<T, vec_width<T>(), decltype(a)::value, COUNT, SPLIT>(p);
      } else {
        Dev::template fwd<T, 1, decltype(a)::value, COUNT, SPLIT>(p);
      }
    });
  }

  template <typename T, bool SPLIT>
  static void bwd(Act act, bool vec, const BwdParams<T>& p) {
    by_act(act, [&](auto a) {
      if (vec) {
        Dev::template bwd<T, vec_width<T>(), decltype(a)::value, SPLIT>(p);
      } else {
        Dev::template bwd<T, 1, decltype(a)::value, SPLIT>(p);
      }
    });
  }

  static Tensor act_mul(const Tensor& gate, const Tensor& up, const std::string& activation) {
    const Act act = check(gate, up, nullptr, activation);
    const typename Dev::Guard guard(gate.device());
    const int64_t T = gate.size(0), I = gate.size(1);
    Tensor out = at::empty({T, I}, gate.options());
    if (T == 0 || I == 0) return out;
    by_dtype(gate.scalar_type(), [&](auto* tag) {
      using TT = std::remove_pointer_t<decltype(tag)>;
      fwd<TT, false, false>(act, use_vectors<TT>({&gate, &up, &out}, I), fwd_params<TT>(gate, up, out));
    });
    return out;
  }

  static std::tuple<Tensor, Tensor, Tensor> act_mul_count(const Tensor& gate, const Tensor& up,
                                                          const std::string& activation,
                                                          const std::optional<Tensor>& token_lang_in,
                                                          int64_t num_langs) {
    const Act act = check(gate, up, nullptr, activation);
    const int64_t T = gate.size(0), I = gate.size(1);
    checks::check_count_args(T, gate.device(), token_lang_in, num_langs);
    // Per-thread counters are int32 over at most T rows.
    TORCH_CHECK_VALUE(T < std::numeric_limits<int32_t>::max(), "gate has too many rows (", T, ")");
    const typename Dev::Guard guard(gate.device());
    const Tensor token_lang = token_lang_in.has_value() ? token_lang_in->contiguous() : Tensor();
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
      fwd<TT, true, false>(act, use_vectors<TT>({&gate, &up, &out}, I), p);
    });
    return {out, over_zero, act_sum};
  }

  static std::tuple<Tensor, Tensor> act_mul_split(const Tensor& gate, const Tensor& up,
                                                  const std::string& activation, const Tensor& sel,
                                                  const std::optional<Tensor>& slots) {
    const Act act = check(gate, up, nullptr, activation);
    const int64_t T = gate.size(0), I = gate.size(1);
    const typename Dev::Guard guard(gate.device());
    const Tensor slot = selection(sel, slots, gate);
    const int64_t k = sel.size(0);
    Tensor out = at::empty({T, I}, gate.options());
    Tensor out_sel = at::empty({T, k}, gate.options());
    if (T == 0 || I == 0) return {out, out_sel};
    by_dtype(gate.scalar_type(), [&](auto* tag) {
      using TT = std::remove_pointer_t<decltype(tag)>;
      auto p = fwd_params<TT>(gate, up, out);
      const bool vec = use_vectors<TT>({&gate, &up, &out}, I);
      if (k == 0) {
        fwd<TT, false, false>(act, vec, p);
      } else {
        p.out_sel = reinterpret_cast<TT*>(out_sel.data_ptr());
        p.slot = slot.const_data_ptr<int32_t>();
        p.k = k;
        fwd<TT, false, true>(act, vec, p);
      }
    });
    return {out, out_sel};
  }

  static std::tuple<Tensor, Tensor> act_mul_backward(const Tensor& grad_out_in, const Tensor& gate,
                                                     const Tensor& up, const std::string& activation) {
    const Act act = check(gate, up, &grad_out_in, activation);
    const typename Dev::Guard guard(gate.device());
    const Tensor grad_out = rows_view(grad_out_in);
    const int64_t T = gate.size(0), I = gate.size(1);
    Tensor grad_gate = at::empty({T, I}, gate.options());
    Tensor grad_up = at::empty({T, I}, gate.options());
    if (T == 0 || I == 0) return {grad_gate, grad_up};
    by_dtype(gate.scalar_type(), [&](auto* tag) {
      using TT = std::remove_pointer_t<decltype(tag)>;
      const bool vec = use_vectors<TT>({&grad_out, &gate, &up, &grad_gate, &grad_up}, I);
      bwd<TT, false>(act, vec, bwd_params<TT>(grad_out, gate, up, grad_gate, grad_up));
    });
    return {grad_gate, grad_up};
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> act_mul_backward_split(
      const Tensor& grad_out_in, const Tensor& grad_out_sel_in, const Tensor& gate, const Tensor& up,
      const std::string& activation, const Tensor& sel, const std::optional<Tensor>& slots) {
    const Act act = check(gate, up, &grad_out_in, activation);
    const int64_t T = gate.size(0), I = gate.size(1);
    const typename Dev::Guard guard(gate.device());
    const Tensor slot = selection(sel, slots, gate);
    const int64_t k = sel.size(0);
    checks::check_grad_out_sel(grad_out_sel_in, T, k, gate);
    const Tensor grad_out = rows_view(grad_out_in);
    const auto opts = gate.options();
    Tensor grad_gate = at::empty({T, I}, opts), grad_up = at::empty({T, I}, opts);
    Tensor grad_gate_sel = at::empty({T, k}, opts), grad_up_sel = at::empty({T, k}, opts);
    Tensor out_sel = at::empty({T, k}, opts);
    if (T == 0 || I == 0) return {grad_gate, grad_up, grad_gate_sel, grad_up_sel, out_sel};
    const Tensor grad_out_sel = k > 0 ? grad_out_sel_in.contiguous() : Tensor();
    by_dtype(gate.scalar_type(), [&](auto* tag) {
      using TT = std::remove_pointer_t<decltype(tag)>;
      auto p = bwd_params<TT>(grad_out, gate, up, grad_gate, grad_up);
      const bool vec = use_vectors<TT>({&grad_out, &gate, &up, &grad_gate, &grad_up}, I);
      if (k == 0) {
        bwd<TT, false>(act, vec, p);
      } else {
        p.grad_out_sel = reinterpret_cast<const TT*>(grad_out_sel.const_data_ptr());
        p.grad_gate_sel = reinterpret_cast<TT*>(grad_gate_sel.data_ptr());
        p.grad_up_sel = reinterpret_cast<TT*>(grad_up_sel.data_ptr());
        p.out_sel = reinterpret_cast<TT*>(out_sel.data_ptr());
        p.slot = slot.const_data_ptr<int32_t>();
        p.k = k;
        bwd<TT, true>(act, vec, p);
      }
    });
    return {grad_gate, grad_up, grad_gate_sel, grad_up_sel, out_sel};
  }

  // Composite: gate = x w_gate^T and up = x w_up^T by at::mm in x's dtype (cuBLAS, fp32
  // accumulation, rounded to the dtype where nn.Linear rounds; fp32 inputs use TF32 only if
  // torch.backends.cuda.matmul.allow_tf32 says so), then act_mul_count above: no fp32
  // temporaries, out written once in the dtype. The Triton backend (triton_gemm.py) fuses the
  // count into the GEMM epilogue instead, so gate/up never reach memory.
  static std::tuple<Tensor, Tensor, Tensor> gate_up_act_mul_count(
      const Tensor& x, const Tensor& w_gate, const Tensor& w_up, const std::string& activation,
      const std::optional<Tensor>& token_lang, int64_t num_langs) {
    // act_mul_count checks again; checking first avoids two GEMMs on a bad call.
    checks::check_gate_up_count(x, w_gate, w_up, activation, token_lang, num_langs, Dev::kDevice,
                                Dev::kName);
    const typename Dev::Guard guard(x.device());
    return act_mul_count(at::mm(x, w_gate.t()), at::mm(x, w_up.t()), activation, token_lang, num_langs);
  }
};

}  // namespace lape_kernels::cuda_impl
