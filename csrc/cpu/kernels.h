// CPU kernels of the lape_kernels ops (semantics: docs/ARCHITECTURE.md, oracle:
// lape_kernels/reference.py).
//
// This header is compiled once per CPU capability (csrc/cpu/kernels_<isa>.cpp, each its own
// extension module with its own ISA flags, so no AVX code can leak into the default build; see
// setup.py). Vector code uses at::vec::Vectorized<float> plus a few AVX2/AVX-512 intrinsics.
// Arithmetic is fp32 (bf16/fp16 widened on load) with ATen's rounding points (see "the math");
// inputs are read once, every output element is written once; gate/up are read through their
// row stride.
#pragma once

#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/cpu/Gelu.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/gelu_backward.h>
#include <ATen/ops/index_copy.h>
#include <ATen/ops/index_fill.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../common/checks.h"
#include "../common/schemas.h"

#ifndef CPU_CAPABILITY
#error "compile with -DCPU_CAPABILITY=DEFAULT|AVX2|AVX512 (see setup.py)"
#endif

namespace lape_kernels::cpu {
inline namespace CPU_CAPABILITY {

using at::Tensor;
using fVec = at::vec::Vectorized<float>;
using lape_kernels::Act;
using checks::row_stride;
using checks::rows_view;

// Elements per inner step: two fp32 vectors (= one bf16/fp16 vector).
constexpr int64_t kW = 2 * fVec::size();
// Work per parallel task, in elements (keeps small inputs on one thread).
constexpr int64_t kGrainElems = 32768;

// ----------------------------------------------------------------------------------- checks --
// csrc/common/checks.h, plus what only the CPU kernels need.

inline Act check_args(const Tensor& gate, const Tensor& up, const Tensor* grad_out,
                      const std::string& activation) {
  return checks::check_gate_up(gate, up, grad_out, activation, c10::DeviceType::CPU, "CPU");
}

// sel: int64 [k] on the CPU, strictly increasing, values in [0, I): checked here on every call
// (no device sync on a CPU; the kernels locate the selected columns through sel). An optional
// slot map (ops.sel_slots) is only checked for its shape: the CPU kernels do not need it.
inline Tensor check_sel(const Tensor& sel, const std::optional<Tensor>& slots, const Tensor& gate) {
  checks::check_sel(sel, gate.device());
  checks::check_slots(slots, gate.size(1), gate.device());
  Tensor s = sel.contiguous();
  const int64_t* p = s.const_data_ptr<int64_t>();
  const int64_t k = s.numel(), I = gate.size(1);
  bool ok = true;
  for (int64_t j = 0; j < k && ok; ++j) ok = p[j] >= 0 && p[j] < I && (j == 0 || p[j] > p[j - 1]);
  checks::check_sel_values(ok, I);
  return s;
}

// --------------------------------------------------------------------------------- the math --
// HF-exact numerics (docs/ARCHITECTURE.md): the ops compute what the Hugging Face MLP they
// replace computes with ATen, bit for bit. a = act(gate) is evaluated with ATen's own CPU
// formulas (aten/src/ATen/native/cpu/Activation.cpp, Gelu.h: fp32 arithmetic, reduced precision
// upcast), rounded to the dtype as F.silu / F.gelu(approximate="tanh") round their output; the
// product a * up is rounded again (a bf16 * bf16 multiply in ATen computes in fp32 and rounds).
// The backward follows autograd of `act(gate) * up`: ga = round(dh * up), grad_gate =
// silu_backward / gelu_backward(ga, gate) with ATen's formulas, grad_up = round(dh * a).
//
// ATen evaluates an elementwise op with a vector function (SLEEF exp/tanh) over steps of
// 2 x Vectorized<scalar_t>::size() elements and its scalar function (libm) on the remainder of
// each contiguous run a thread is given; the two differ in the last bit for a few % of fp32
// inputs. AtenTails below tells which elements ATen gives to the scalar function, so the kernels
// use the same function for each element. Exact-erf "gelu" runs through oneDNN in ATen for
// contiguous fp32/bf16 inputs: for it the CPU kernels let ATen compute act and act' (Act::pre).
// FMA contraction stays at GCC's default, as in PyTorch's build (setup.py).

// a = act(g): ATen's vector function.
template <Act A>
inline fVec act(const fVec& g) {
  if constexpr (A == Act::silu) {
    return g / (fVec(1.0f) + g.neg().exp());
  } else if constexpr (A == Act::gelu_tanh) {
    return at::native::vectorized_gelu_approximated_with_tanh<float>(g);
  } else {
    static_assert(A == Act::pre, "exact gelu is computed by ATen (Act::pre)");
    return g;  // gate already holds act(gate)
  }
}

// ATen's scalar function (the remainder of a thread's contiguous run).
template <Act A>
inline float act_scalar(float x) {
  if constexpr (A == Act::silu) {
    return x / (1.0f + std::exp(-x));
  } else if constexpr (A == Act::gelu_tanh) {
    return at::native::scalar_gelu_approximated_with_tanh<float>(x);
  } else {
    return x;
  }
}

// ATen's silu_backward / gelu_backward(approximate="tanh") vector function: dy * act'(x).
template <Act A>
inline fVec act_backward(const fVec& dy, const fVec& x) {
  const fVec one(1.0f);
  if constexpr (A == Act::silu) {
    const fVec sigmoid = one / (one + x.neg().exp());
    return dy * sigmoid * (one + x * (one - sigmoid));
  } else {
    static_assert(A == Act::gelu_tanh, "act_backward: silu or gelu_tanh");
    const fVec kBeta(static_cast<float>(M_SQRT2 * M_2_SQRTPI * 0.5));
    const fVec kKappa(static_cast<float>(0.044715));
    const fVec kThree(3.0f), kHalf(0.5f);
    const fVec x_sq = x * x;
    const fVec x_cube = x * x * x;
    const fVec inner = kBeta * (x + kKappa * x_cube);
    const fVec tanh_inner = inner.tanh();
    const fVec left = kHalf * x;
    const fVec right = one + tanh_inner;
    const fVec left_derivative = kHalf * right;
    const fVec tanh_derivative = one - tanh_inner * tanh_inner;
    const fVec inner_derivative = kBeta * (one + kThree * kKappa * x_sq);
    const fVec right_derivative = left * tanh_derivative * inner_derivative;
    return dy * (left_derivative + right_derivative);
  }
}

// The scalar function of act_backward.
template <Act A>
inline float act_backward_scalar(float dy, float x) {
  if constexpr (A == Act::silu) {
    const float sigmoid = 1.0f / (1.0f + std::exp(-x));
    return dy * sigmoid * (1.0f + x * (1.0f - sigmoid));
  } else {
    const float kBeta = static_cast<float>(M_SQRT2 * M_2_SQRTPI * 0.5);
    const float kKappa = static_cast<float>(0.044715);
    const float x_sq = x * x;
    const float x_cube = x_sq * x;
    const float inner = kBeta * (x + kKappa * x_cube);
    const float tanh_inner = std::tanh(inner);
    const float left = 0.5f * x;
    const float right = 1.0f + tanh_inner;
    const float left_derivative = 0.5f * right;
    const float tanh_derivative = 1.0f - tanh_inner * tanh_inner;
    const float inner_derivative = kBeta * (1.0f + 3.0f * kKappa * x_sq);
    const float right_derivative = left * tanh_derivative * inner_derivative;
    return dy * (left_derivative + right_derivative);
  }
}

// Which elements of an elementwise ATen op over a [T, I] gate ATen evaluates with its scalar
// function: TensorIterator coalesces a gate whose rows are contiguous in memory (`flat`) into one
// run, else iterates row by row; at::parallel_for hands threads ranges of ceil(N / threads)
// elements when N exceeds the op's grain (OpenMP, not inside a parallel region); each
// contiguous run of a range is evaluated in vector steps from its start, its remainder
// (run length mod step) by the scalar function.
struct AtenTails {
  int64_t I = 0, N = 0, step = 1, chunk = 1;
  bool flat = true;

  AtenTails() = default;
  AtenTails(int64_t T, int64_t I_, bool flat_, int64_t step_, int64_t grain)
      : I(I_), N(T * I_), step(step_), flat(flat_ || T <= 1) {
    chunk = std::max<int64_t>(N, 1);
    const int64_t threads = at::get_num_threads();
    if (N > grain && N > 1 && threads > 1 && !at::in_parallel_region()) {
      const int64_t used = std::min<int64_t>(threads, (N + grain - 1) / std::max<int64_t>(grain, 1));
      chunk = (N + used - 1) / used;
    }
  }

  // Calls f(c_begin, c_end) for the columns of row t that ATen evaluates with the scalar function.
  template <typename F>
  void for_row(int64_t t, const F& f) const {
    if (N == 0) return;
    const int64_t r0 = t * I, r1 = r0 + I;
    for (int64_t k = r0 / chunk; k * chunk < r1; ++k) {
      const int64_t b = k * chunk, e = std::min(N, b + chunk);
      const int64_t p0 = flat ? b : std::max(b, r0), p1 = flat ? e : std::min(e, r1);
      const int64_t lo = std::max(r0, p0 + (p1 - p0) / step * step), hi = std::min(r1, p1);
      if (lo < hi) f(lo - r0, hi - r0);
    }
  }
};

// ATen's step for dtype T and the grain its op passes to cpu_kernel_vec.
template <typename T>
constexpr int64_t aten_step() {
  return 2 * static_cast<int64_t>(at::vec::Vectorized<T>::size());
}
constexpr int64_t kAtenGrain = 32768;  // at::internal::GRAIN_SIZE

// The forward's: F.gelu uses numel / threads above 16384 elements (GeluKernelImpl).
template <Act A>
inline int64_t act_grain(int64_t numel) {
  if constexpr (A == Act::gelu_tanh) {
    return numel > 16384 ? numel / std::max(1, at::get_num_threads()) : kAtenGrain;
  }
  return kAtenGrain;
}

// The scalar column ranges of one row, clipped to [c0, c1) (usually none).
struct RowTails {
  std::vector<std::pair<int64_t, int64_t>> r;
  void fill(const AtenTails& tails, int64_t t, int64_t c0, int64_t c1) {
    r.clear();
    tails.for_row(t, [&](int64_t lo, int64_t hi) {
      lo = std::max(lo, c0);
      hi = std::min(hi, c1);
      if (lo < hi) r.emplace_back(lo, hi);
    });
  }
  // Whether column c (of lane j of a step starting at column c0, or cols[j]) is in a range.
  bool has(int64_t c) const {
    for (const auto& [lo, hi] : r)
      if (c >= lo && c < hi) return true;
    return false;
  }
  bool overlaps(int64_t c0, int64_t c1) const {
    for (const auto& [lo, hi] : r)
      if (lo < c1 && hi > c0) return true;
    return false;
  }
};

// ------------------------------------------------------------------------------ load/store --
// kW elements per call as two fp32 vectors; the `n` overloads handle a partial tail (missing
// lanes load as 0, stores write only n elements).

template <typename T>
struct IO {
  using bVec = at::vec::Vectorized<T>;
  static_assert(bVec::size() == kW, "reduced-precision vector must hold two fp32 vectors");
  static inline void load(const T* p, fVec& a, fVec& b) {
    std::tie(a, b) = at::vec::convert_to_float<T>(bVec::loadu(p));
  }
  static inline void load(const T* p, int64_t n, fVec& a, fVec& b) {
    std::tie(a, b) = at::vec::convert_to_float<T>(bVec::loadu(p, n));
  }
  static inline void store(T* p, const fVec& a, const fVec& b) {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
  static inline void store(T* p, int64_t n, const fVec& a, const fVec& b) {
    at::vec::convert_from_float<T>(a, b).store(p, static_cast<int>(n));
  }
};

template <>
struct IO<float> {
  static constexpr int64_t S = fVec::size();
  static inline void load(const float* p, fVec& a, fVec& b) {
    a = fVec::loadu(p);
    b = fVec::loadu(p + S);
  }
  static inline void load(const float* p, int64_t n, fVec& a, fVec& b) {
    if (n > S) {
      a = fVec::loadu(p);
      b = fVec::loadu(p + S, n - S);
    } else {
      a = fVec::loadu(p, n);
      b = fVec(0.0f);
    }
  }
  static inline void store(float* p, const fVec& a, const fVec& b) {
    a.store(p);
    b.store(p + S);
  }
  static inline void store(float* p, int64_t n, const fVec& a, const fVec& b) {
    if (n > S) {
      a.store(p);
      b.store(p + S, static_cast<int>(n - S));
    } else {
      a.store(p, static_cast<int>(n));
    }
  }
};

// Gather n (<= kW) elements p[idx[j]] into a kW-wide pair of fp32 vectors.
template <typename T>
inline void gather(const T* p, const int64_t* idx, int64_t n, fVec& a, fVec& b) {
  alignas(64) float buf[kW] = {};
  for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<float>(p[idx[j]]);
  a = fVec::loadu(buf);
  b = fVec::loadu(buf + fVec::size());
}

// ---------------------------------------------------------------------------- iteration --

// Run f(row, c_begin, c_end) over all of [T, I] in parallel; segments start at multiples of kW.
template <typename F>
inline void for_each_segment(int64_t T, int64_t I, const F& f) {
  if (T == 0 || I == 0) return;
  const int64_t nc = (I + kW - 1) / kW;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / kW);
  at::parallel_for(0, T * nc, grain, [&](int64_t b, int64_t e) {
    int64_t row = b / nc, c = b % nc;
    while (b < e) {
      const int64_t take = std::min(e - b, nc - c);
      f(row, c * kW, std::min(I, (c + take) * kW));
      b += take;
      ++row;
      c = 0;
    }
  });
}

// Dispatch helpers: scalar type x activation -> one instantiation.
template <typename F>
inline void dispatch_act(Act a, const F& f) {
  switch (a) {
    case Act::silu:
      f(std::integral_constant<Act, Act::silu>{});
      break;
    case Act::gelu_tanh:
      f(std::integral_constant<Act, Act::gelu_tanh>{});
      break;
    default:  // Act::gelu was replaced by ATen's act values (prepare_act)
      f(std::integral_constant<Act, Act::pre>{});
      break;
  }
}

template <typename U>
struct TypeTag {
  using type = U;
};

// f(TypeTag<scalar>, integral_constant<Act>): one instantiation per dtype x activation.
template <typename F>
inline void dispatch(at::ScalarType st, Act a, const F& f) {
  auto with_act = [&](auto type_tag) {
    dispatch_act(a, [&](auto act_tag) { f(type_tag, act_tag); });
  };
  switch (st) {
    case at::kFloat:
      with_act(TypeTag<float>{});
      break;
    case at::kBFloat16:
      with_act(TypeTag<c10::BFloat16>{});
      break;
    case at::kHalf:
      with_act(TypeTag<c10::Half>{});
      break;
    default:
      TORCH_CHECK_VALUE(false, "unsupported dtype ", st);
  }
}

// ------------------------------------------------------------------------- count helpers --

// cnt[j] += (a[j] > 0) for one fp32 vector (NaN is not > 0).
inline void count_positive(const fVec& a, float* cnt) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 c = _mm512_loadu_ps(cnt);
  const __mmask16 k = _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_GT_OQ);
  _mm512_storeu_ps(cnt, _mm512_mask_add_ps(c, k, c, _mm512_set1_ps(1.0f)));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 m = _mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_GT_OQ);
  _mm256_storeu_ps(cnt, _mm256_add_ps(_mm256_loadu_ps(cnt), _mm256_and_ps(m, _mm256_set1_ps(1.0f))));
#else
  (fVec::loadu(cnt) + ((a > fVec(0.0f)) & fVec(1.0f))).store(cnt);
#endif
}

// sum[j] += (double)a[j] for one fp32 vector.
inline void add_to_double(const fVec& a, double* sum) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 v = a;
  const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
  const __m512d hi =
      _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  _mm512_storeu_pd(sum, _mm512_add_pd(_mm512_loadu_pd(sum), lo));
  _mm512_storeu_pd(sum + 8, _mm512_add_pd(_mm512_loadu_pd(sum + 8), hi));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 v = a;
  const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
  const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
  _mm256_storeu_pd(sum, _mm256_add_pd(_mm256_loadu_pd(sum), lo));
  _mm256_storeu_pd(sum + 4, _mm256_add_pd(_mm256_loadu_pd(sum + 4), hi));
#else
  alignas(64) float buf[fVec::size()];
  a.store(buf);
  for (int64_t j = 0; j < fVec::size(); ++j) sum[j] += static_cast<double>(buf[j]);
#endif
}

// One kW step of act values into a language's counts (fp32) and sums (fp64).
inline void add_act(const fVec& a0, const fVec& a1, float* cnt, double* sum) {
  count_positive(a0, cnt);
  count_positive(a1, cnt + fVec::size());
  add_to_double(a0, sum);
  add_to_double(a1, sum + fVec::size());
}

// One tile's accumulators: a slot of wp (= tile width padded to kW) columns per language that
// occurs in the tile, allocated on its first row, so num_langs may be large at no cost.
struct CountAcc {
  int64_t wp = 0;
  int64_t slots = 0;
  std::vector<int64_t> slot;  // language -> slot, -1 if the language has no row in the tile
  std::vector<float> cnt;
  std::vector<double> sum;

  void init(int64_t L, int64_t wp_) {
    wp = wp_;
    slot.assign(L, -1);
  }
  // Slot of language l, created (zeroed) on first use. Invalidates earlier slot pointers.
  inline int64_t touch(int64_t l) {
    if (slot[l] < 0) {
      slot[l] = slots++;
      cnt.resize(slots * wp, 0.0f);
      sum.resize(slots * wp, 0.0);
    }
    return slot[l];
  }
};

// ------------------------------------------------------------------------------ row kernels --
// The per-row loops every op shares; rows are read through their row stride by the callers.

// (a, b) rounded to T and back (no-op for fp32): the rounding ATen applies to act(gate) and to
// a product stored in T.
template <typename T>
inline void round_to(fVec& a, fVec& b) {
  if constexpr (!std::is_same_v<T, float>) {
    std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(a, b));
  }
}

// Column of lane j of a step: cols[j] for gathered steps, else c + j.
inline int64_t lane_col(const int64_t* cols, int64_t c, int64_t j) { return cols ? cols[j] : c + j; }

// Re-evaluates with ATen's scalar function the lanes (of n) whose columns ATen gives it.
// `scalar(j, x, y)` computes lane j from the lanes of (x, y).
template <typename F>
inline void patch_lanes(fVec& r0, fVec& r1, const fVec& x0, const fVec& x1, const fVec& y0, const fVec& y1,
                        const RowTails& tails, const int64_t* cols, int64_t c, int64_t n, const F& scalar) {
  if (tails.r.empty() || (cols == nullptr && !tails.overlaps(c, c + n))) return;
  constexpr int64_t S = fVec::size();
  alignas(64) float xs[kW], ys[kW], rs[kW];
  x0.store(xs), x1.store(xs + S), y0.store(ys), y1.store(ys + S), r0.store(rs), r1.store(rs + S);
  for (int64_t j = 0; j < n; ++j)
    if (tails.has(lane_col(cols, c, j))) rs[j] = scalar(xs[j], ys[j]);
  r0 = fVec::loadu(rs);
  r1 = fVec::loadu(rs + S);
}

// a = act(g) rounded to T, each lane by the function ATen uses for it (ft: the forward's tails).
template <Act A, typename T>
inline void act_values(const fVec& g0, const fVec& g1, fVec& a0, fVec& a1, const RowTails& ft,
                       const int64_t* cols, int64_t c, int64_t n) {
  a0 = act<A>(g0);
  a1 = act<A>(g1);
  patch_lanes(a0, a1, g0, g1, g0, g1, ft, cols, c, n, [](float x, float) { return act_scalar<A>(x); });
  round_to<T>(a0, a1);
}

// One row of the forward over columns [c0, c1): o = round(a * u) with a = round(act(g)). With
// cnt != nullptr the a values are also added to one language's counters cnt / sum (from c0).
template <Act A, typename T>
inline void act_row(const T* __restrict g, const T* __restrict u, T* __restrict o, int64_t c0,
                    int64_t c1, float* __restrict cnt, double* __restrict sum, const RowTails& ft) {
  using io = IO<T>;
  fVec g0, g1, u0, u1, a0, a1;
  for (int64_t c = c0; c < c1; c += kW) {
    const int64_t n = std::min(kW, c1 - c);
    if (n == kW) {
      io::load(g + c, g0, g1);
      io::load(u + c, u0, u1);
    } else {  // missing lanes hold act(0) == 0: adding them to the counters is harmless
      io::load(g + c, n, g0, g1);
      io::load(u + c, n, u0, u1);
    }
    act_values<A, T>(g0, g1, a0, a1, ft, nullptr, c, n);
    if (n == kW) {
      io::store(o + c, a0 * u0, a1 * u1);
    } else {
      io::store(o + c, n, a0 * u0, a1 * u1);
    }
    if (cnt != nullptr) add_act(a0, a1, cnt + (c - c0), sum + (c - c0));
  }
}

// The tails of both ATen ops a backward step follows: act (forward) and its backward.
struct StepTails {
  const RowTails& fwd;
  const RowTails& bwd;
};

// kW (or n) lanes of the backward (autograd of round(act(g)) * u): ga = round(go * u),
// dg = act_backward(ga, g), du = go * a, and optionally h = a * u (the forward value); each
// stored rounded to T.
template <Act A, typename T>
inline void act_grad_step(const fVec (&g)[2], const fVec (&u)[2], const fVec (&go)[2], T* dg,
                          T* du, T* h, int64_t n, const StepTails& tails, const int64_t* cols, int64_t c) {
  using io = IO<T>;
  fVec a[2], ga[2], d[2];
  act_values<A, T>(g[0], g[1], a[0], a[1], tails.fwd, cols, c, n);
  ga[0] = go[0] * u[0];
  ga[1] = go[1] * u[1];
  round_to<T>(ga[0], ga[1]);
  d[0] = act_backward<A>(ga[0], g[0]);
  d[1] = act_backward<A>(ga[1], g[1]);
  patch_lanes(d[0], d[1], ga[0], ga[1], g[0], g[1], tails.bwd, cols, c, n,
              [](float dy, float x) { return act_backward_scalar<A>(dy, x); });
  if (n == kW) {
    io::store(dg, d[0], d[1]);
    io::store(du, go[0] * a[0], go[1] * a[1]);
    if (h != nullptr) io::store(h, a[0] * u[0], a[1] * u[1]);
  } else {
    io::store(dg, n, d[0], d[1]);
    io::store(du, n, go[0] * a[0], go[1] * a[1]);
    if (h != nullptr) io::store(h, n, a[0] * u[0], a[1] * u[1]);
  }
}

// One row of the backward over columns [c0, c1).
template <Act A, typename T>
inline void act_grad_row(const T* __restrict g, const T* __restrict u, const T* __restrict go,
                         T* __restrict dg, T* __restrict du, int64_t c0, int64_t c1, const StepTails& tails) {
  using io = IO<T>;
  fVec gv[2], uv[2], ov[2];
  for (int64_t c = c0; c < c1; c += kW) {
    const int64_t n = std::min(kW, c1 - c);
    if (n == kW) {
      io::load(g + c, gv[0], gv[1]);
      io::load(u + c, uv[0], uv[1]);
      io::load(go + c, ov[0], ov[1]);
    } else {
      io::load(g + c, n, gv[0], gv[1]);
      io::load(u + c, n, uv[0], uv[1]);
      io::load(go + c, n, ov[0], ov[1]);
    }
    act_grad_step<A>(gv, uv, ov, dg + c, du + c, static_cast<T*>(nullptr), n, tails, nullptr, c);
  }
}

// The selected columns sp[p0..p1) of one row, in [c0, c1): positions p0, p1 in sel.
inline std::pair<int64_t, int64_t> selected_in(const int64_t* sp, int64_t k, int64_t c0, int64_t c1) {
  const int64_t p0 = std::lower_bound(sp, sp + k, c0) - sp;
  const int64_t p1 = std::lower_bound(sp + p0, sp + k, c1) - sp;
  return {p0, p1};
}

// Whether TensorIterator sees gate's rows as one contiguous run.
inline bool flat_rows(const Tensor& gate) { return gate.size(0) <= 1 || gate.stride(0) == gate.size(1); }

// The forward's activation input: gate itself, or for exact gelu the act values ATen computes
// (F.gelu takes oneDNN for contiguous fp32/bf16; act_row then reads them, Act::pre).
inline std::pair<Tensor, Act> prepare_act(const Tensor& gate, Act a) {
  if (a == Act::gelu) return {at::gelu(gate), Act::pre};
  return {gate, a};
}

// ATen's tails of F.act(gate) (the forward) and of its backward, for T_ elements.
template <Act A, typename T_>
inline AtenTails fwd_tails(const Tensor& gate) {
  const int64_t n = gate.numel();
  return AtenTails(gate.size(0), gate.size(1), flat_rows(gate), aten_step<T_>(), act_grain<A>(n));
}

template <typename T_>
inline AtenTails bwd_tails(const Tensor& gate) {
  return AtenTails(gate.size(0), gate.size(1), flat_rows(gate), aten_step<T_>(), kAtenGrain);
}

// Row t of the [T, I] inputs (read through their row stride), and where ATen evaluates F.act
// (fwd) and its backward (bwd) with the scalar function.
template <Act A, typename T>
struct Rows {
  const T* gate;
  const T* up;
  int64_t sg, su;
  AtenTails fwd, bwd;
  const T* g(int64_t t) const { return gate + t * sg; }
  const T* u(int64_t t) const { return up + t * su; }
  Rows(const Tensor& gate_, const Tensor& up_)
      : gate(gate_.const_data_ptr<T>()), up(up_.const_data_ptr<T>()), sg(row_stride(gate_)),
        su(row_stride(up_)), fwd(fwd_tails<A, T>(gate_)), bwd(bwd_tails<T>(gate_)) {}
};

// Exact gelu's backward, as autograd of F.gelu(gate) * up computes it (ATen throughout):
// (grad_gate, grad_up, a) for the full gradient dh.
inline std::tuple<Tensor, Tensor, Tensor> gelu_backward(const Tensor& dh, const Tensor& gate, const Tensor& up) {
  Tensor a = at::gelu(gate);
  Tensor grad_gate = at::gelu_backward(at::mul(dh, up), gate);
  return {grad_gate, at::mul(dh, a), a};
}

// ---------------------------------------------------------------------------------- act_mul --

inline Tensor act_mul(const Tensor& gate_in, const Tensor& up, const std::string& activation) {
  const auto [gate, a] = prepare_act(gate_in, check_args(gate_in, up, nullptr, activation));
  const int64_t T = gate.size(0), I = gate.size(1);
  Tensor out = at::empty({T, I}, gate.options());
  dispatch(gate.scalar_type(), a, [&](auto tt, auto at_) {
    using T_ = typename decltype(tt)::type;
    constexpr Act A = decltype(at_)::value;
    const Rows<A, T_> in(gate, up);
    T_* op = out.mutable_data_ptr<T_>();
    for_each_segment(T, I, [&](int64_t t, int64_t c0, int64_t c1) {
      thread_local RowTails ft;
      ft.fill(in.fwd, t, c0, c1);
      act_row<A>(in.g(t), in.u(t), op + t * I, c0, c1, nullptr, nullptr, ft);
    });
  });
  return out;
}

// ---------------------------------------------------------------------------- act_mul_count --
// Work is split into tiles of rows x columns (full rows unless I is large); each task owns a
// tile and its own per-language accumulators, so no atomics are needed, and the results of
// row tiles are added in a fixed order at the end. Rows are walked in memory order. Per
// language the accumulators are fp32 counts (exact: a tile has < 2^24 rows) and fp64 sums
// (every act value is added in fp64, as the reference does).

constexpr int64_t kCountCols = 128 * kW;   // max columns per tile (a multiple of kW)
constexpr int64_t kMaxTileRows = 1 << 24;  // fp32 counters stay exact

inline std::tuple<Tensor, Tensor, Tensor> act_mul_count(const Tensor& gate_in, const Tensor& up,
                                                        const std::string& activation,
                                                        const std::optional<Tensor>& token_lang,
                                                        int64_t num_langs) {
  const Act act_in = check_args(gate_in, up, nullptr, activation);
  const int64_t T = gate_in.size(0), I = gate_in.size(1), L = num_langs;
  checks::check_count_args(T, gate_in.device(), token_lang, num_langs);
  const auto [gate, a] = prepare_act(gate_in, act_in);
  const Tensor tl = token_lang.has_value() ? token_lang->contiguous() : Tensor();

  Tensor out = at::empty({T, I}, gate.options());
  Tensor over_zero = at::zeros({L, I}, gate.options().dtype(at::kLong));
  Tensor act_sum = at::zeros({L, I}, gate.options().dtype(at::kDouble));
  if (T == 0 || I == 0) return {out, over_zero, act_sum};

  // Tiles: column blocks of at most kCountCols, then enough row blocks to feed the threads.
  const int64_t ncb = (I + kCountCols - 1) / kCountCols;
  const int64_t cols_per = ((I + ncb - 1) / ncb + kW - 1) / kW * kW;
  const int64_t threads = at::get_num_threads();
  const int64_t min_rows = std::max<int64_t>(16, kGrainElems / cols_per);
  int64_t nrb = 1;
  if (ncb < 2 * threads) {
    nrb = std::max<int64_t>(1, std::min((2 * threads + ncb - 1) / ncb, T / min_rows));
  }
  nrb = std::max(nrb, (T + kMaxTileRows - 1) / kMaxTileRows);
  const int64_t rows_per = (T + nrb - 1) / nrb;
  nrb = (T + rows_per - 1) / rows_per;
  // Every tile's accumulators; with several row tiles they are added in row order below.
  std::vector<CountAcc> accs(static_cast<size_t>(nrb * ncb));
  const int64_t* tlp = tl.defined() ? tl.const_data_ptr<int64_t>() : nullptr;
  int64_t* ozp = over_zero.mutable_data_ptr<int64_t>();
  double* asp = act_sum.mutable_data_ptr<double>();

  dispatch(gate.scalar_type(), a, [&](auto tt, auto at_) {
    using T_ = typename decltype(tt)::type;
    constexpr Act A = decltype(at_)::value;
    const Rows<A, T_> in(gate, up);
    T_* op = out.mutable_data_ptr<T_>();
    at::parallel_for(0, nrb * ncb, 1, [&](int64_t b, int64_t e) {
      RowTails ft;
      for (int64_t task = b; task < e; ++task) {
        CountAcc& acc = accs[task];
        const int64_t rb = task / ncb, cb = task % ncb;
        const int64_t r0 = rb * rows_per, r1 = std::min(T, r0 + rows_per);
        const int64_t c0 = cb * cols_per, c1 = std::min(I, c0 + cols_per);
        acc.init(L, (c1 - c0 + kW - 1) / kW * kW);
        for (int64_t t = r0; t < r1; ++t) {
          const int64_t lang = tlp ? tlp[t] : 0;
          ft.fill(in.fwd, t, c0, c1);
          if (lang >= 0 && lang < L) {
            const int64_t k = acc.touch(lang);
            act_row<A>(in.g(t), in.u(t), op + t * I, c0, c1, acc.cnt.data() + k * acc.wp,
                       acc.sum.data() + k * acc.wp, ft);
          } else {  // padding (-1) etc.: output only
            act_row<A>(in.g(t), in.u(t), op + t * I, c0, c1, nullptr, nullptr, ft);
          }
        }
      }
    });
  });
  // Tiles of the same columns in row order (deterministic for a given thread count); counts
  // convert exactly from fp32.
  const int64_t reduce_grain = std::max<int64_t>(1, kGrainElems / (nrb * cols_per));
  at::parallel_for(0, ncb * L, reduce_grain, [&](int64_t b, int64_t e) {
    for (int64_t job = b; job < e; ++job) {
      const int64_t cb = job / L, l = job % L;
      const int64_t c0 = cb * cols_per, w = std::min(I, c0 + cols_per) - c0;
      int64_t* od = ozp + l * I + c0;
      double* sd = asp + l * I + c0;
      for (int64_t rb = 0; rb < nrb; ++rb) {
        const CountAcc& acc = accs[rb * ncb + cb];
        const int64_t k = acc.slot[l];
        if (k < 0) continue;
        const float* cs = acc.cnt.data() + k * acc.wp;
        const double* ss = acc.sum.data() + k * acc.wp;
        for (int64_t j = 0; j < w; ++j) {
          od[j] += static_cast<int64_t>(cs[j]);
          sd[j] += ss[j];
        }
      }
    }
  });
  return {out, over_zero, act_sum};
}

// ------------------------------------------------------------------------- act_mul_backward --
// act_mul_backward is the split backward with nothing selected (below).

inline std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward_impl(
    const Tensor& grad_out_in, const Tensor& grad_out_sel, const Tensor& gate, const Tensor& up, Act a,
    const Tensor& sel);

inline std::tuple<Tensor, Tensor> act_mul_backward(const Tensor& grad_out_in, const Tensor& gate,
                                                   const Tensor& up,
                                                   const std::string& activation) {
  const Act a = check_args(gate, up, &grad_out_in, activation);
  const Tensor none = at::empty({0}, gate.options().dtype(at::kLong));
  auto [grad_gate, grad_up, gs, us, os] =
      backward_impl(grad_out_in, at::empty({gate.size(0), 0}, gate.options()), gate, up, a, none);
  return {grad_gate, grad_up};
}

// ---------------------------------------------------------------------------- act_mul_split --

inline std::tuple<Tensor, Tensor> act_mul_split(const Tensor& gate_in, const Tensor& up,
                                                const std::string& activation, const Tensor& sel_in,
                                                const std::optional<Tensor>& slots) {
  const Act act_in = check_args(gate_in, up, nullptr, activation);
  const Tensor sel = check_sel(sel_in, slots, gate_in);
  const auto [gate, a] = prepare_act(gate_in, act_in);
  const int64_t T = gate.size(0), I = gate.size(1), k = sel.numel();
  Tensor out = at::empty({T, I}, gate.options());
  Tensor out_sel = at::empty({T, k}, gate.options());
  const int64_t* sp = sel.const_data_ptr<int64_t>();
  dispatch(gate.scalar_type(), a, [&](auto tt, auto at_) {
    using T_ = typename decltype(tt)::type;
    constexpr Act A = decltype(at_)::value;
    const Rows<A, T_> in(gate, up);
    T_* op = out.mutable_data_ptr<T_>();
    T_* osp = out_sel.mutable_data_ptr<T_>();
    for_each_segment(T, I, [&](int64_t t, int64_t c0, int64_t c1) {
      thread_local RowTails ft;
      ft.fill(in.fwd, t, c0, c1);
      T_* o = op + t * I;
      act_row<A>(in.g(t), in.u(t), o, c0, c1, nullptr, nullptr, ft);
      // Move the selected columns of this segment (already rounded) to out_sel.
      const auto [p0, p1] = selected_in(sp, k, c0, c1);
      T_* os = osp + t * k;
      for (int64_t p = p0; p < p1; ++p) {
        os[p] = o[sp[p]];
        o[sp[p]] = T_(0);
      }
    });
  });
  return {out, out_sel};
}

// ------------------------------------------------------------------- act_mul_backward_split --

inline std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> act_mul_backward_split(
    const Tensor& grad_out_in, const Tensor& grad_out_sel_in, const Tensor& gate,
    const Tensor& up, const std::string& activation, const Tensor& sel_in,
    const std::optional<Tensor>& slots) {
  const Act a = check_args(gate, up, &grad_out_in, activation);
  const Tensor sel = check_sel(sel_in, slots, gate);
  checks::check_grad_out_sel(grad_out_sel_in, gate.size(0), sel.numel(), gate);
  return backward_impl(grad_out_in, grad_out_sel_in, gate, up, a, sel);
}

// The checked backward: full gradients with the columns sel zeroed, and the selected ones.
inline std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward_impl(
    const Tensor& grad_out_in, const Tensor& grad_out_sel_in, const Tensor& gate, const Tensor& up, Act a,
    const Tensor& sel) {
  const int64_t T = gate.size(0), I = gate.size(1), k = sel.numel();
  const Tensor grad_out = rows_view(grad_out_in);
  const Tensor grad_out_sel = grad_out_sel_in.contiguous();
  if (a == Act::gelu) {  // ATen throughout (oneDNN's gelu), split by sel
    const Tensor dh = k == 0 ? grad_out.contiguous() : grad_out.contiguous().index_copy(1, sel, grad_out_sel);
    auto [gg, gu, act_values_] = gelu_backward(dh, gate, up);
    const auto none = [&] { return at::empty({T, 0}, gate.options()); };
    if (k == 0) return {gg, gu, none(), none(), none()};
    return {gg.index_fill(1, sel, 0), gu.index_fill(1, sel, 0), gg.index_select(1, sel),
            gu.index_select(1, sel), at::mul(act_values_.index_select(1, sel), up.index_select(1, sel))};
  }
  auto opts = gate.options();
  Tensor grad_gate = at::empty({T, I}, opts), grad_up = at::empty({T, I}, opts);
  Tensor grad_gate_sel = at::empty({T, k}, opts), grad_up_sel = at::empty({T, k}, opts);
  Tensor out_sel = at::empty({T, k}, opts);
  const int64_t* sp = sel.const_data_ptr<int64_t>();
  dispatch(gate.scalar_type(), a, [&](auto tt, auto at_) {
    using T_ = typename decltype(tt)::type;
    constexpr Act A = decltype(at_)::value;
    if constexpr (A != Act::pre) {
      using io = IO<T_>;
      const Rows<A, T_> in(gate, up);
      const T_* gop = grad_out.const_data_ptr<T_>();
      const T_* gosp = grad_out_sel.const_data_ptr<T_>();
      const int64_t so = row_stride(grad_out);
      T_* ggp = grad_gate.mutable_data_ptr<T_>();
      T_* gup = grad_up.mutable_data_ptr<T_>();
      T_* ggsp = grad_gate_sel.mutable_data_ptr<T_>();
      T_* gusp = grad_up_sel.mutable_data_ptr<T_>();
      T_* osp = out_sel.mutable_data_ptr<T_>();
      for_each_segment(T, I, [&](int64_t t, int64_t c0, int64_t c1) {
        thread_local RowTails ft, bt;
        ft.fill(in.fwd, t, c0, c1);
        bt.fill(in.bwd, t, c0, c1);
        const StepTails tails{ft, bt};
        const T_* g = in.g(t);
        const T_* u = in.u(t);
        T_* dg = ggp + t * I;
        T_* du = gup + t * I;
        act_grad_row<A>(g, u, gop + t * so, dg, du, c0, c1, tails);
        // Selected columns: zero them in the full gradients, and compute their values from
        // grad_out_sel (gathered kW at a time so the same vector math applies).
        const auto [p0, p1] = selected_in(sp, k, c0, c1);
        const T_* gos = gosp + t * k;
        fVec gv[2], uv[2], ov[2];
        for (int64_t p = p0; p < p1; p += kW) {
          const int64_t n = std::min(kW, p1 - p);
          for (int64_t j = 0; j < n; ++j) {
            dg[sp[p + j]] = T_(0);
            du[sp[p + j]] = T_(0);
          }
          gather(g, sp + p, n, gv[0], gv[1]);
          gather(u, sp + p, n, uv[0], uv[1]);
          io::load(gos + p, n, ov[0], ov[1]);
          act_grad_step<A>(gv, uv, ov, ggsp + t * k + p, gusp + t * k + p, osp + t * k + p, n, tails, sp + p, 0);
        }
      });
    }
  });
  return {grad_gate, grad_up, grad_gate_sel, grad_up_sel, out_sel};
}

// -------------------------------------------------------------------- gate_up_act_mul_count --
// The CPU composite of the fused GEMM + count op: gate = x w_gate^T and up = x w_up^T by at::mm
// in x's dtype (the very GEMM nn.Linear runs, rounded to the dtype where the module rounds), then
// act_mul_count above. The Triton kernel fuses the count into its GEMM epilogue instead.

inline std::tuple<Tensor, Tensor, Tensor> gate_up_act_mul_count(
    const Tensor& x, const Tensor& w_gate, const Tensor& w_up, const std::string& activation,
    const std::optional<Tensor>& token_lang, int64_t num_langs) {
  // act_mul_count checks its own arguments again; checking first avoids two GEMMs on a bad call.
  checks::check_gate_up_count(x, w_gate, w_up, activation, token_lang, num_langs,
                              c10::DeviceType::CPU, "CPU");
  return act_mul_count(at::mm(x, w_gate.t()), at::mm(x, w_up.t()), activation, token_lang, num_langs);
}

}  // namespace CPU_CAPABILITY
}  // namespace lape_kernels::cpu


// One registration per module (each kernels_<isa>.cpp includes this header exactly once).
#define LAPE_KERNELS_REGISTER_CPU() \
  TORCH_LIBRARY_IMPL(lape_kernels, CPU, m) { LAPE_KERNELS_IMPL_OPS(m, lape_kernels::cpu); }

// The (empty) Python module a kernels_<isa>.cpp file becomes; importing it runs the
// registration above.
#define LAPE_KERNELS_PYINIT(NAME)                                                             \
  static PyModuleDef lape_module_def = {                                                     \
      PyModuleDef_HEAD_INIT, #NAME, "lape_kernels CPU kernels (" #NAME ")", -1, nullptr,      \
      nullptr,               nullptr, nullptr,                              nullptr};         \
  extern "C" PyMODINIT_FUNC PyInit_##NAME(void) { return PyModule_Create(&lape_module_def); }
