// Per-thread bodies of the lape_kernels CUDA kernels (see docs/ARCHITECTURE.md for the ops).
//
// Why a separate header: the bodies are plain `__host__ __device__` code with no shared memory
// and no inter-thread communication (only atomics on distinct per-block partial sums), so the
// same source also compiles as ordinary C++ and tests/test_cuda.py runs it on the CPU, one
// emulated thread after another, against lape_kernels/reference.py.
//
// Work decomposition (all ops): a thread owns VEC adjacent columns (one 16-byte vector when
// alignment allows, else VEC = 1) and walks a contiguous chunk of rows, ROWS rows at a time
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
// float32 throughout, same formulas as reference.py (precise expf/tanhf/erff: never build
// this with --use_fast_math).

template <Act ACT>
LAPE_HD float act_value(float g) {
  if constexpr (ACT == Act::silu) {
    return g * (1.0f / (1.0f + expf(-g)));
  } else if constexpr (ACT == Act::gelu_tanh) {
    const float inner = 0.7978845608028654f * (g + 0.044715f * g * g * g);
    return 0.5f * g * (1.0f + tanhf(inner));
  } else {
    return 0.5f * g * (1.0f + erff(g * 0.7071067811865476f));
  }
}

template <Act ACT>
LAPE_HD void act_value_grad(float g, float& a, float& da) {
  if constexpr (ACT == Act::silu) {
    const float s = 1.0f / (1.0f + expf(-g));
    a = g * s;
    da = s * (1.0f + g * (1.0f - s));
  } else if constexpr (ACT == Act::gelu_tanh) {
    const float inner = 0.7978845608028654f * (g + 0.044715f * g * g * g);
    const float t = tanhf(inner);
    a = 0.5f * g * (1.0f + t);
    const float d_inner = 0.7978845608028654f * (1.0f + 3.0f * 0.044715f * g * g);
    da = 0.5f * (1.0f + t) + 0.5f * g * (1.0f - t * t) * d_inner;
  } else {
    const float e = 1.0f + erff(g * 0.7071067811865476f);
    a = 0.5f * g * e;
    da = 0.5f * e + g * 0.3989422804014327f * expf(-0.5f * g * g);
  }
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

// Forward: out = act(gate) * up; optional counting (COUNT) or column split (SPLIT).
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

// Backward: grad_gate = dh * up * act'(gate), grad_up = dh * act(gate); optional split.
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

// The slots of columns [c0, c0 + VEC) (-1: not selected); whether any is selected.
template <int VEC>
LAPE_HD bool load_slots(const int32_t* slot_map, int64_t c0, int32_t (&slot)[VEC]) {
  bool any = false;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    slot[j] = slot_map[c0 + j];
    any = any || slot[j] >= 0;
  }
  return any;
}

// One thread of the forward kernels: columns [cg * VEC, cg * VEC + VEC), rows of chunk `chunk`.
// Requires I % VEC == 0 (the launcher picks VEC = 1 otherwise).
template <typename T, int VEC, Act ACT, bool COUNT, bool SPLIT>
LAPE_HD void fwd_thread(const FwdParams<T>& p, int64_t cg, int64_t chunk) {
  const Span sp = thread_span<VEC>(p.rows, p.cols, p.rows_per_chunk, cg, chunk);
  if (sp.empty()) return;
  const int64_t c0 = sp.c0, r_begin = sp.r_begin, r_end = sp.r_end, I = p.cols;
  int32_t slot[VEC];
  const bool any_sel = SPLIT && load_slots<VEC>(p.slot, c0, slot);
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
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      if (r0 + i < r_end) {
        g[i] = load_pack<T, VEC>(p.gate + (r0 + i) * p.stride_gate + c0);
        u[i] = load_pack<T, VEC>(p.up + (r0 + i) * p.stride_up + c0);
      }
    }
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int64_t r = r0 + i;
      if (r >= r_end) break;
      float a[VEC], h[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        a[j] = act_value<ACT>(static_cast<float>(g[i].v[j]));
        h[j] = a[j] * static_cast<float>(u[i].v[j]);
      }
      if (SPLIT && any_sel) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          if (slot[j] >= 0) {
            p.out_sel[r * p.k + slot[j]] = static_cast<T>(h[j]);
            h[j] = 0.0f;
          }
        }
      }
      store_pack<T, VEC>(p.out + r * I + c0, h);
      if (COUNT) {
        const int64_t lang = p.token_lang != nullptr ? p.token_lang[r] : 0;
        if (lang >= 0 && lang < p.num_langs) {
          if (lang != acc.lang) {
            flush_lang<VEC>(acc, p.over_zero, p.act_sum, I, c0);
            acc.lang = lang;
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
  }
  if (COUNT) flush_lang<VEC>(acc, p.over_zero, p.act_sum, I, c0);
}

// One thread of the backward kernels (same decomposition as fwd_thread).
template <typename T, int VEC, Act ACT, bool SPLIT>
LAPE_HD void bwd_thread(const BwdParams<T>& p, int64_t cg, int64_t chunk) {
  const Span sp = thread_span<VEC>(p.rows, p.cols, p.rows_per_chunk, cg, chunk);
  if (sp.empty()) return;
  const int64_t c0 = sp.c0, r_begin = sp.r_begin, r_end = sp.r_end, I = p.cols;
  int32_t slot[VEC];
  if (SPLIT) load_slots<VEC>(p.slot, c0, slot);

  for (int64_t r0 = r_begin; r0 < r_end; r0 += kRows) {
    Pack<T, VEC> d[kRows], g[kRows], u[kRows];
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      if (r0 + i < r_end) {
        d[i] = load_pack<T, VEC>(p.grad_out + (r0 + i) * p.stride_grad + c0);
        g[i] = load_pack<T, VEC>(p.gate + (r0 + i) * p.stride_gate + c0);
        u[i] = load_pack<T, VEC>(p.up + (r0 + i) * p.stride_up + c0);
      }
    }
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int64_t r = r0 + i;
      if (r >= r_end) break;
      float gg[VEC], gu[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        float a, da;
        act_value_grad<ACT>(static_cast<float>(g[i].v[j]), a, da);
        const float uf = static_cast<float>(u[i].v[j]);
        float dh = static_cast<float>(d[i].v[j]);
        if (SPLIT && slot[j] >= 0) {
          const int64_t o = r * p.k + slot[j];
          dh = static_cast<float>(p.grad_out_sel[o]);
          p.grad_gate_sel[o] = static_cast<T>(dh * uf * da);
          p.grad_up_sel[o] = static_cast<T>(dh * a);
          p.out_sel[o] = static_cast<T>(a * uf);
          gg[j] = 0.0f;
          gu[j] = 0.0f;
        } else {
          gg[j] = dh * uf * da;
          gu[j] = dh * a;
        }
      }
      store_pack<T, VEC>(p.grad_gate + r * I + c0, gg);
      store_pack<T, VEC>(p.grad_up + r * I + c0, gu);
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

// Enough blocks to fill the GPU once (`resident_blocks` = SMs x blocks per SM), split over row
// chunks of at least kRows rows; grid_y stays within CUDA's 65535 limit.
inline Plan make_plan(int64_t T, int64_t I, int vec, int threads, int64_t resident_blocks) {
  Plan pl;
  pl.col_groups = (I + vec - 1) / vec;
  pl.grid_x = (pl.col_groups + threads - 1) / threads;
  int64_t want = (resident_blocks + pl.grid_x - 1) / pl.grid_x;
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
