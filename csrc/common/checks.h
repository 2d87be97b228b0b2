// Argument checks of the lape_kernels ops, shared by the CPU kernels (csrc/cpu/kernels.h) and the
// CUDA host code (csrc/cuda/act_mul_host.h). Same conditions, order and messages as
// lape_kernels/kernels/checks.py, so a bad argument raises the same ValueError on every backend:
// shapes print as [4, 6] and dtypes as torch.float32, as Python prints them.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <string>

#include "act.h"

namespace lape_kernels::checks {

using at::Tensor;

// Python's name of a dtype ("torch.float32"), for messages that match checks.py.
inline std::string dtype_str(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(st);
  }
}

inline Act parse_activation(const std::string& activation) {
  if (activation == "silu") return Act::silu;
  if (activation == "gelu_tanh") return Act::gelu_tanh;
  if (activation == "gelu") return Act::gelu;
  TORCH_CHECK_VALUE(false, "activation must be one of ('silu', 'gelu_tanh', 'gelu'), got '",
                    activation, "'");
  return Act::silu;  // unreachable
}

inline bool is_float_dtype(at::ScalarType dt) {
  return dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf;
}

inline void check_float_2d(const Tensor& t, const char* name, const char* dims) {
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D ", dims, ", got shape ", t.sizes());
  TORCH_CHECK_VALUE(is_float_dtype(t.scalar_type()), name,
                    " must be float32, bfloat16 or float16, got ", dtype_str(t.scalar_type()));
}

// The kernel's device: `a` must be on it (after the same-device checks, so mixed devices get
// checks.py's message). `kernel` names the kernel in the message ("CPU", "CUDA").
inline void check_kernel_device(const Tensor& a, const char* name, c10::DeviceType type,
                                const char* kernel) {
  TORCH_CHECK_VALUE(a.device().type() == type, name, " must be a ", kernel, " tensor for the ",
                    kernel, " kernel, got ", a.device());
}

// gate/up (or grad_out against gate): 2-D, same float dtype, shape and device.
inline void check_pair(const Tensor& a, const Tensor& b, const char* na, const char* nb) {
  check_float_2d(a, na, "[tokens, intermediate]");
  check_float_2d(b, nb, "[tokens, intermediate]");
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), na, " and ", nb, " must have the same shape, got ",
                    a.sizes(), " and ", b.sizes());
  TORCH_CHECK_VALUE(a.scalar_type() == b.scalar_type(), na, " and ", nb,
                    " must have the same dtype, got ", dtype_str(a.scalar_type()), " and ",
                    dtype_str(b.scalar_type()));
  TORCH_CHECK_VALUE(a.device() == b.device(), na, " and ", nb,
                    " must be on the same device, got ", a.device(), " and ", b.device());
}

// Kernels read rows through stride(0) and need unit stride along the last dim. gate/up must be
// like that (views such as the halves of a fused gate_up output are); gradients are copied.
inline void check_rows(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.size(1) <= 1 || t.stride(1) == 1, name,
                    " must have a contiguous last dimension (stride(1) == 1), got strides ",
                    t.strides());
}

inline Tensor rows_view(const Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

inline int64_t row_stride(const Tensor& t) { return t.size(0) <= 1 ? 0 : t.stride(0); }

// gate, up (and grad_out) of an elementwise op, in checks.py's order; returns the activation.
inline Act check_gate_up(const Tensor& gate, const Tensor& up, const Tensor* grad_out,
                         const std::string& activation, c10::DeviceType type, const char* kernel) {
  check_pair(gate, up, "gate", "up");
  if (grad_out != nullptr) check_pair(*grad_out, gate, "grad_out", "gate");
  check_kernel_device(gate, "gate", type, kernel);
  check_rows(gate, "gate");
  check_rows(up, "up");
  return parse_activation(activation);
}

// num_langs and token_lang of the counting ops.
inline void check_count_args(int64_t T, const at::Device& device,
                             const std::optional<Tensor>& token_lang, int64_t num_langs) {
  TORCH_CHECK_VALUE(num_langs >= 1, "num_langs must be >= 1, got ", num_langs);
  if (!token_lang.has_value()) return;
  const Tensor& t = *token_lang;
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == T && t.scalar_type() == at::kLong,
                    "token_lang must be int64 of shape [", T, "], got ", dtype_str(t.scalar_type()),
                    " of shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == device, "token_lang must be on ", device, ", got ", t.device());
}

// sel's metadata (its values: check_sel_values below).
inline void check_sel(const Tensor& sel, const at::Device& device) {
  TORCH_CHECK_VALUE(sel.dim() == 1 && sel.scalar_type() == at::kLong,
                    "sel must be a 1-D int64 tensor, got ", dtype_str(sel.scalar_type()),
                    " of shape ", sel.sizes());
  TORCH_CHECK_VALUE(sel.device() == device, "sel must be on ", device, ", got ", sel.device());
}

// `ok`: sel is strictly increasing within [0, I) (each backend finds that out its own way).
inline void check_sel_values(bool ok, int64_t I) {
  TORCH_CHECK_VALUE(ok, "sel must be sorted ascending and unique, with values in [0, ", I, ")");
}

// The split ops' optional slot map (ops.sel_slots): int32 [I] on gate's device.
inline void check_slots(const std::optional<Tensor>& slots, int64_t I, const at::Device& device) {
  if (!slots.has_value()) return;
  const Tensor& s = *slots;
  TORCH_CHECK_VALUE(s.dim() == 1 && s.scalar_type() == at::kInt && s.size(0) == I,
                    "slots must be int32 of shape [", I, "], got ", dtype_str(s.scalar_type()),
                    " of shape ", s.sizes());
  TORCH_CHECK_VALUE(s.device() == device, "slots must be on ", device, ", got ", s.device());
}

inline void check_grad_out_sel(const Tensor& gos, int64_t T, int64_t k, const Tensor& gate) {
  TORCH_CHECK_VALUE(gos.dim() == 2 && gos.size(0) == T && gos.size(1) == k,
                    "grad_out_sel must have shape [", T, ", ", k, "], got ", gos.sizes());
  TORCH_CHECK_VALUE(gos.scalar_type() == gate.scalar_type(), "grad_out_sel must have the dtype of gate (",
                    dtype_str(gate.scalar_type()), "), got ", dtype_str(gos.scalar_type()));
  TORCH_CHECK_VALUE(gos.device() == gate.device(), "grad_out_sel must be on ", gate.device(),
                    ", got ", gos.device());
}

// x [T, H], w_gate / w_up [I, H] of gate_up_act_mul_count, then its activation and count args.
inline void check_gate_up_count(const Tensor& x, const Tensor& w_gate, const Tensor& w_up,
                                const std::string& activation,
                                const std::optional<Tensor>& token_lang, int64_t num_langs,
                                c10::DeviceType type, const char* kernel) {
  check_float_2d(x, "x", "[tokens, hidden]");
  check_float_2d(w_gate, "w_gate", "[intermediate, hidden]");
  check_float_2d(w_up, "w_up", "[intermediate, hidden]");
  TORCH_CHECK_VALUE(w_gate.sizes() == w_up.sizes(), "w_gate and w_up must have the same shape, got ",
                    w_gate.sizes(), " and ", w_up.sizes());
  TORCH_CHECK_VALUE(x.size(1) == w_gate.size(1),
                    "x and w_gate must have the same hidden size (dim 1), got ", x.sizes(), " and ",
                    w_gate.sizes());
  TORCH_CHECK_VALUE(x.scalar_type() == w_gate.scalar_type() && x.scalar_type() == w_up.scalar_type(),
                    "x, w_gate and w_up must have the same dtype, got ", dtype_str(x.scalar_type()),
                    ", ", dtype_str(w_gate.scalar_type()), " and ", dtype_str(w_up.scalar_type()));
  TORCH_CHECK_VALUE(x.device() == w_gate.device() && x.device() == w_up.device(),
                    "x, w_gate and w_up must be on the same device, got ", x.device(), ", ",
                    w_gate.device(), " and ", w_up.device());
  check_kernel_device(x, "x", type, kernel);
  check_rows(x, "x");
  check_rows(w_gate, "w_gate");
  check_rows(w_up, "w_up");
  parse_activation(activation);
  check_count_args(x.size(0), x.device(), token_lang, num_langs);
}

}  // namespace lape_kernels::checks
