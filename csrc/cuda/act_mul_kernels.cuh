// Per-thread bodies of the lape_kernels CUDA kernels (see docs/ARCHITECTURE.md for the ops).
//
// Why a separate header: the bodies are plain `__host__ __device__` code with no shared memory
// and no inter-thread communication (only atomics on distinct per-block partial sums), so the
// same source also compiles as ordinary C++ and the tests run it on the CPU, one emulated thread
// after another (tests/ops/cuda_emulated.cpp), against lape_kernels/reference.py.
//
// Work decomposition (all ops): a thread owns VEC adjacent columns (one 16-byte vector when
// alignment allows, else VEC = 1) and walks a contiguous chunk of rows, kRows rows at a time
// (all loads of a step are issued before any math, for memory-level parallelism). Threads of
// a warp own adjacent column vectors of the same row, so every access is coalesced. Per-column
// state (the selected-column slot, the language counters) stays in registers for the chunk.
// Counting flushes one atomic per column per language run per chunk.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <math.h>
#include <stdint.h>

#include "../common/act.h"

#if defined(__CUDACC__)
#define LAPE_HD __host__ __device__ __forceinline__
#else
#define LAPE_HD inline
#endif

namespace lape_kernels {
namespace cuda_impl {

constexpr int kRows = 4;  // rows loaded per step of a thread

// ------------------------------------------------------------------------------------ math --
// float32 with the rounding points of the Hugging Face MLP the ops replace (docs/ARCHITECTURE.md):
// a = act(gate) rounded to T, out = a * up rounded; the backward as autograd of act(gate) * up
// (ga = round(dh * up) into act'). The formulas are ATen's (its CPU vector path's order of
// operations); the math library is the GPU's (precise expf/tanhf/erff: never build this with
// --use_fast_math), so a may differ from ATen's CPU value in the last fp32 bit before rounding.

constexpr float kBeta = 0.7978845608028654f;   // sqrt(2) * 2/sqrt(pi) * 0.5
constexpr float kKappa = 0.044715f;
constexpr float kAlpha = 0.7071067811865476f;  // 1/sqrt(2)
constexpr float kPdf = 0.3989422804014327f;    // 2/sqrt(pi) * 1/sqrt(2) * 0.5

// x rounded to T (nearest even) and back: how a value stored in T reads.
template <typename T>
LAPE_HD float round_to(float x) {
  return static_cast<float>(static_cast<T>(x));
}

template <Act ACT>
LAPE_HD float act_value(float g) {
  if constexpr (ACT == Act::silu) {
    return g / (1.0f + expf(-g));
  } else if constexpr (ACT == Act::gelu_tanh) {
    return 0.5f * g * (1.0f + tanhf(kBeta * (g + kKappa * (g * g * g))));
  } else {
    return g * 0.5f * (1.0f + erff(g * kAlpha));
  }
}

// dy * act'(x) (ATen's silu_backward / gelu_backward).
template <Act ACT>
LAPE_HD float act_backward(float dy, float x) {
  if constexpr (ACT == Act::silu) {
    const float s = 1.0f / (1.0f + expf(-x));
    return dy * s * (1.0f + x * (1.0f - s));
  } else if constexpr (ACT == Act::gelu_tanh) {
    const float t = tanhf(kBeta * (x + kKappa * (x * x * x)));
    const float right_derivative = 0.5f * x * (1.0f - t * t) * (kBeta * (1.0f + 3.0f * kKappa * (x * x)));
    return dy * (0.5f * (1.0f + t) + right_derivative);
  } else {
    const float cdf = 0.5f * (1.0f + erff(x * kAlpha));
    const float pdf = kPdf * expf(x * x * -0.5f);
    return dy * (cdf + x * pdf);
  }
}

// Autograd of round(act(g)) * u for the gradient dh: grad_gate, grad_up, a (fp32; the caller
// rounds them when storing).
template <typename T, Act ACT>
LAPE_HD void act_grads(float dh, float g, float u, float& grad_gate, float& grad_up, float& a) {
  a = round_to<T>(act_value<ACT>(g));
  grad_gate = act_backward<ACT>(round_to<T>(dh * u), g);
  grad_up = dh * a;
}

// --------------------------------------------------------------------------------- memory --

// VEC elements of T, aligned to their total size (16 bytes for the vector path), so a plain
// struct copy is one vector load/store.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
LAPE_HD Pack<T, VEC> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

template <typename T, int VEC>
LAPE_HD void store_pack(T* p, const float (&x)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int j = 0; j < VEC; ++j) pk.v[j] = static_cast<T>(x[j]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

LAPE_HD void atomic_add_i64(int64_t* p, int64_t v) {
#if defined(__CUDA_ARCH__)
  atomicAdd(reinterpret_cast<unsigned long long*>(p), static_cast<unsigned long long>(v));
#else
  *p += v;  // CPU emulation: threads run one after another
#endif
}

LAPE_HD void atomic_add_f64(double* p, double v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 600
  atomicAdd(p, v);
#elif defined(__CUDA_ARCH__)
  unsigned long long* q = reinterpret_cast<unsigned long long*>(p);
  unsigned long long old = *q, assumed;
  do {
    assumed = old;
    old = atomicCAS(q, assumed,
                    static_cast<unsigned long long>(__double_as_longlong(
                        v + __longlong_as_double(static_cast<long long>(assumed)))));
  } while (assumed != old);
#else
  *p += v;
#endif
}

// ------------------------------------------------------------------------------ parameters --

// Forward: out = round(round(act(gate)) * up); optional counting (COUNT) or split (SPLIT).
template <typename T>
struct FwdParams {
  const T* gate;
  const T* up;
  int64_t stride_gate, stride_up;  // row strides in elements
  T* out;                          // [T, I] contiguous
  T* out_sel;                      // [T, k] contiguous (SPLIT)
  const int32_t* slot;             // [I]: index of the column in sel, or -1 (SPLIT)
  const int64_t* token_lang;       // [T] or nullptr (= every row is language 0) (COUNT)
  int64_t num_langs;
  int64_t* over_zero;              // [num_langs, I] (COUNT)
  double* act_sum;                 // [num_langs, I] (COUNT)
  int64_t rows, cols, k;           // T, I, k
  int64_t rows_per_chunk;
};

// Backward of out = round(act(gate)) * up: grad_gate = act'(gate) applied to round(dh * up),
// grad_up = dh * round(act(gate)); optional split.
template <typename T>
struct BwdParams {
  const T* grad_out;
  const T* grad_out_sel;      // [T, k] contiguous (SPLIT)
  const T* gate;
  const T* up;
  int64_t stride_grad, stride_gate, stride_up;
  T* grad_gate;                // [T, I] contiguous
  T* grad_up;                  // [T, I] contiguous
  T* grad_gate_sel;            // [T, k] (SPLIT)
  T* grad_up_sel;              // [T, k] (SPLIT)
  T* out_sel;                  // [T, k] (SPLIT)
  const int32_t* slot;         // [I] (SPLIT)
  int64_t rows, cols, k;
  int64_t rows_per_chunk;
};

// ---------------------------------------------------------------------------- thread bodies --

template <int VEC>
struct LangAccum {
  int64_t lang = -1;  // language being accumulated, -1: none
  int32_t count[VEC];
  double sum[VEC];
};

template <int VEC>
LAPE_HD void flush_lang(LangAccum<VEC>& acc, int64_t* over_zero, double* act_sum, int64_t I,
                        int64_t c0) {
  if (acc.lang < 0) return;
  const int64_t base = acc.lang * I + c0;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    if (acc.count[j] != 0) atomic_add_i64(over_zero + base + j, acc.count[j]);
    if (acc.sum[j] != 0.0) atomic_add_f64(act_sum + base + j, acc.sum[j]);  // NaN != 0: added
  }
}

// The columns [c0, c0 + VEC) and rows [r_begin, r_end) one thread owns.
struct Span {
  int64_t c0, r_begin, r_end;
  LAPE_HD bool empty() const { return r_begin >= r_end; }
};

template <int VEC>
LAPE_HD Span thread_span(int64_t rows, int64_t cols, int64_t rows_per_chunk, int64_t cg,
                         int64_t chunk) {
  Span s;
  s.c0 = cg * VEC;
  s.r_begin = chunk * rows_per_chunk;
  s.r_end = s.r_begin + rows_per_chunk < rows ? s.r_begin + rows_per_chunk : rows;
  if (s.c0 >= cols) s.r_end = s.r_begin;  // past the last column: nothing to do
  return s;
}

// The slots of columns [c0, c0 + VEC) (-1: not selected); whether any is selected. A slot
// outside [0, k) counts as not selected, so no slot map can make a store leave the [T, k] outputs.
template <int VEC>
LAPE_HD bool load_slots(const int32_t* slot_map, int64_t k, int64_t c0, int32_t (&slot)[VEC]) {
  bool any = false;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const int32_t s = slot_map[c0 + j];
    slot[j] = (s >= 0 && s < k) ? s : -1;
    any = any || slot[j] >= 0;
  }
  return any;
}

// The packs of rows r0 .. r0 + kRows - 1 (those before r_end) at column c0: one step's loads,
// issued together before any math.
template <typename T, int VEC>
LAPE_HD void load_rows(Pack<T, VEC> (&dst)[kRows], const T* __restrict__ base, int64_t stride, int64_t r0,
                       int64_t r_end, int64_t c0) {
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    if (r0 + i < r_end) dst[i] = load_pack<T, VEC>(base + (r0 + i) * stride + c0);
  }
}

// One thread of the forward kernels: columns [cg * VEC, cg * VEC + VEC), rows of chunk `chunk`.
// Requires I % VEC == 0 (the launcher picks VEC = 1 otherwise).
template <typename T, int VEC, Act ACT, bool COUNT, bool SPLIT>
LAPE_HD void fwd_thread(const FwdParams<T>& p, int64_t cg, int64_t chunk) {
  const Span sp = thread_span<VEC>(p.rows, p.cols, p.rows_per_chunk, cg, chunk);
  if (sp.empty()) return;
  const int64_t c0 = sp.c0, r_begin = sp.r_begin, r_end = sp.r_end, I = p.cols;
  T* __restrict__ out = p.out;
  T* __restrict__ out_sel = p.out_sel;
  const int64_t* __restrict__ token_lang = p.token_lang;
  int32_t slot[VEC];
  const bool any_sel = SPLIT && load_slots<VEC>(p.slot, p.k, c0, slot);
  LangAccum<VEC> acc;
  if (COUNT) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      acc.count[j] = 0;
      acc.sum[j] = 0.0;
    }
  }

  for (int64_t r0 = r_begin; r0 < r_end; r0 += kRows) {
    Pack<T, VEC> g[kRows], u[kRows];
    int64_t lang[kRows];
    load_rows<T, VEC>(g, p.gate, p.stride_gate, r0, r_end, c0);
    load_rows<T, VEC>(u, p.up, p.stride_up, r0, r_end, c0);
    if (COUNT) {
#pragma unroll
      for (int i = 0; i < kRows; ++i) lang[i] = (token_lang != nullptr && r0 + i < r_end) ? token_lang[r0 + i] : 0;
    }
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int64_t r = r0 + i;
      if (r >= r_end) break;
      float a[VEC], h[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        a[j] = round_to<T>(act_value<ACT>(static_cast<float>(g[i].v[j])));
        h[j] = a[j] * static_cast<float>(u[i].v[j]);
      }
      if (SPLIT && any_sel) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          if (slot[j] >= 0) {
            out_sel[r * p.k + slot[j]] = static_cast<T>(h[j]);
            h[j] = 0.0f;
          }
        }
      }
      store_pack<T, VEC>(out + r * I + c0, h);
      if (COUNT && lang[i] >= 0 && lang[i] < p.num_langs) {
        if (lang[i] != acc.lang) {
          flush_lang<VEC>(acc, p.over_zero, p.act_sum, I, c0);
          acc.lang = lang[i];
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            acc.count[j] = 0;
            acc.sum[j] = 0.0;
          }
        }
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          acc.count[j] += a[j] > 0.0f ? 1 : 0;
          acc.sum[j] += static_cast<double>(a[j]);
        }
      }
    }
  }
  if (COUNT) flush_lang<VEC>(acc, p.over_zero, p.act_sum, I, c0);
}

// One thread of the backward kernels (same decomposition as fwd_thread). All of a step's loads,
// grad_out_sel's at the selected columns included, are issued before its math and stores.
template <typename T, int VEC, Act ACT, bool SPLIT>
LAPE_HD void bwd_thread(const BwdParams<T>& p, int64_t cg, int64_t chunk) {
  const Span sp = thread_span<VEC>(p.rows, p.cols, p.rows_per_chunk, cg, chunk);
  if (sp.empty()) return;
  const int64_t c0 = sp.c0, r_begin = sp.r_begin, r_end = sp.r_end, I = p.cols, k = p.k;
  const T* __restrict__ grad_out_sel = p.grad_out_sel;
  T* __restrict__ grad_gate = p.grad_gate;
  T* __restrict__ grad_up = p.grad_up;
  T* __restrict__ grad_gate_sel = p.grad_gate_sel;
  T* __restrict__ grad_up_sel = p.grad_up_sel;
  T* __restrict__ out_sel = p.out_sel;
  int32_t slot[VEC];
  const bool any_sel = SPLIT && load_slots<VEC>(p.slot, k, c0, slot);

  for (int64_t r0 = r_begin; r0 < r_end; r0 += kRows) {
    Pack<T, VEC> d[kRows], g[kRows], u[kRows];
    load_rows<T, VEC>(d, p.grad_out, p.stride_grad, r0, r_end, c0);
    load_rows<T, VEC>(g, p.gate, p.stride_gate, r0, r_end, c0);
    load_rows<T, VEC>(u, p.up, p.stride_up, r0, r_end, c0);
    float dsel[kRows][VEC];
    if (SPLIT && any_sel) {
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          dsel[i][j] = (slot[j] >= 0 && r0 + i < r_end)
                           ? static_cast<float>(grad_out_sel[(r0 + i) * k + slot[j]]) : 0.0f;
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int64_t r = r0 + i;
      if (r >= r_end) break;
      float gg[VEC], gu[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float gf = static_cast<float>(g[i].v[j]), uf = static_cast<float>(u[i].v[j]);
        float a;
        if (SPLIT && any_sel && slot[j] >= 0) {
          const int64_t o = r * k + slot[j];
          float sg, su;
          act_grads<T, ACT>(dsel[i][j], gf, uf, sg, su, a);
          grad_gate_sel[o] = static_cast<T>(sg);
          grad_up_sel[o] = static_cast<T>(su);
          out_sel[o] = static_cast<T>(a * uf);
          gg[j] = 0.0f;
          gu[j] = 0.0f;
        } else {
          act_grads<T, ACT>(static_cast<float>(d[i].v[j]), gf, uf, gg[j], gu[j], a);
        }
      }
      store_pack<T, VEC>(grad_gate + r * I + c0, gg);
      store_pack<T, VEC>(grad_up + r * I + c0, gu);
    }
  }
}

// ------------------------------------------------------------------------------ launch plan --

// Whether a [rows, I] operand at `ptr` with row stride `row_stride` (elements) can be read with
// VEC-wide aligned vectors (the caller also needs I % VEC == 0).
inline bool vector_ok(const void* ptr, int64_t rows, int64_t row_stride, int elem_size, int vec) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(ptr);
  return addr % (static_cast<uintptr_t>(elem_size) * vec) == 0 && (rows <= 1 || row_stride % vec == 0);
}

struct Plan {
  int64_t col_groups;      // ceil(I / VEC): one thread each
  int64_t grid_x;          // ceil(col_groups / threads)
  int64_t chunks;          // grid_y: row chunks
  int64_t rows_per_chunk;
};

// At most one wave of blocks (`resident_blocks` = SMs x blocks per SM, rounded DOWN to whole row
// chunks per column block: never one full wave plus a few blocks that then run alone), split
// over row chunks of at least kRows rows; grid_y stays within CUDA's 65535 limit.
inline Plan make_plan(int64_t T, int64_t I, int vec, int threads, int64_t resident_blocks) {
  Plan pl;
  pl.col_groups = (I + vec - 1) / vec;
  pl.grid_x = (pl.col_groups + threads - 1) / threads;
  int64_t want = resident_blocks / pl.grid_x;
  const int64_t max_chunks = (T + kRows - 1) / kRows;
  if (want > max_chunks) want = max_chunks;
  if (want > 65535) want = 65535;
  if (want < 1) want = 1;
  pl.rows_per_chunk = (T + want - 1) / want;
  if (pl.rows_per_chunk < 1) pl.rows_per_chunk = 1;
  pl.chunks = (T + pl.rows_per_chunk - 1) / pl.rows_per_chunk;
  if (pl.chunks < 1) pl.chunks = 1;
  return pl;
}

}  // namespace cuda_impl
}  // namespace lape_kernels
