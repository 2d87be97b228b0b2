// The activations of the lape_kernels ops, shared by the CPU kernels, the CUDA kernels and their
// host code. No dependencies: csrc/cuda/act_mul_kernels.cuh includes it in device code.
#pragma once

namespace lape_kernels {

// "silu", "gelu_tanh" (tanh approximation, Gemma's gelu_pytorch_tanh), "gelu" (exact erf).
// `pre` is internal to the CPU kernels: the gate tensor already holds act(gate), computed by
// ATen (exact gelu, whose CPU path ATen takes through oneDNN).
enum class Act : int { silu = 0, gelu_tanh = 1, gelu = 2, pre = 3 };

}  // namespace lape_kernels
