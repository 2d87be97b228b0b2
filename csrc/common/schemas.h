// The op schemas of the lape_kernels library (docs/ARCHITECTURE.md), as one macro so the
// extension (csrc/lape_kernels.cpp) and the CPU emulation of the CUDA kernels in the tests
// (tests/ops/cuda_emulated.cpp, its own namespace) define the very same signatures.
#pragma once

#include <torch/library.h>

#include <vector>

#define LAPE_KERNELS_DEFINE_SCHEMAS(m)                                                          \
  do {                                                                                          \
    const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};                                \
    m.def("act_mul(Tensor gate, Tensor up, str activation) -> Tensor", tags);                  \
    m.def(                                                                                      \
        "act_mul_count(Tensor gate, Tensor up, str activation, Tensor? token_lang,"             \
        " int num_langs) -> (Tensor out, Tensor over_zero, Tensor act_sum)",                    \
        tags);                                                                                  \
    m.def(                                                                                      \
        "act_mul_backward(Tensor grad_out, Tensor gate, Tensor up, str activation)"             \
        " -> (Tensor grad_gate, Tensor grad_up)",                                               \
        tags);                                                                                  \
    m.def(                                                                                      \
        "act_mul_split(Tensor gate, Tensor up, str activation, Tensor sel, Tensor? slots=None)"  \
        " -> (Tensor out, Tensor out_sel)",                                                     \
        tags);                                                                                  \
    m.def(                                                                                      \
        "act_mul_backward_split(Tensor grad_out, Tensor grad_out_sel, Tensor gate, Tensor up,"  \
        " str activation, Tensor sel, Tensor? slots=None) -> (Tensor grad_gate, Tensor grad_up," \
        " Tensor grad_gate_sel, Tensor grad_up_sel, Tensor out_sel)",                           \
        tags);                                                                                  \
    /* act_mul_count of gate = x @ w_gate.T, up = x @ w_up.T. Not differentiable. */            \
    m.def(                                                                                      \
        "gate_up_act_mul_count(Tensor x, Tensor w_gate, Tensor w_up, str activation,"           \
        " Tensor? token_lang, int num_langs) -> (Tensor out, Tensor over_zero, Tensor act_sum)", \
        tags);                                                                                  \
  } while (0)

// m.impl of every op with the functions NS::act_mul, NS::act_mul_count, ...
#define LAPE_KERNELS_IMPL_OPS(m, NS)                                \
  do {                                                              \
    m.impl("act_mul", &NS::act_mul);                                \
    m.impl("act_mul_count", &NS::act_mul_count);                    \
    m.impl("act_mul_backward", &NS::act_mul_backward);              \
    m.impl("act_mul_split", &NS::act_mul_split);                    \
    m.impl("act_mul_backward_split", &NS::act_mul_backward_split);  \
    m.impl("gate_up_act_mul_count", &NS::gate_up_act_mul_count);    \
  } while (0)
