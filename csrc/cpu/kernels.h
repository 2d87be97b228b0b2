// CPU kernels of the lape_kernels ops (semantics: docs/ARCHITECTURE.md, oracle:
// lape_kernels/reference.py).
//
// This header is compiled once per CPU capability (csrc/cpu/kernels_<isa>.cpp, each its own
// extension module with its own ISA flags, so no AVX code can leak into the default build; see
// setup.py). Vector code uses at::vec::Vectorized<float> plus a few AVX2/AVX-512 intrinsics.
// All arithmetic is fp32 (bf16/fp16 widened on load); inputs are read once, every output
// element is written once, rounded once; gate/up are read through their row stride.
#pragma once

#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/cpu/Gelu.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
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

// sel: int64 [k] on the CPU, strictly increasing, values in [0, I) (checked here: no sync).
inline Tensor check_sel(const Tensor& sel, const Tensor& gate) {
  checks::check_sel(sel, gate.device());
  Tensor s = sel.contiguous();
  const int64_t* p = s.const_data_ptr<int64_t>();
  const int64_t k = s.numel(), I = gate.size(1);
  bool ok = true;
  for (int64_t j = 0; j < k && ok; ++j) ok = p[j] >= 0 && p[j] < I && (j == 0 || p[j] > p[j - 1]);
  checks::check_sel_values(ok, I);
  return s;
}

// --------------------------------------------------------------------------------- the math --
// The functions of lape_kernels/reference.py act_fp32 / act_grad_fp32, in fp32. The forward is
// PyTorch's own activation code (see act below); the reference orders some operations
// differently, so they agree to a few ulp relative to |act| + |g| (tests/test_ops.py).

constexpr float kSqrt2OverPi = 0.7978845608028654f;   // sqrt(2 / pi)
constexpr float kInvSqrt2Pi = 0.3989422804014327f;    // 1 / sqrt(2 pi)
constexpr float kGeluC3 = 0.134145f;                  // 3 * 0.044715 (as Python folds it)

// exp(x) for the exact-gelu derivative, inlined (a SLEEF call makes every live vector register
// spill). Cody-Waite reduction x = q ln2 + r, |r| <= ln2/2, a degree-7 Taylor polynomial
// (truncation error below 0.15 ulp), then 2^q applied as two exact power-of-two factors so
// that overflow gives inf and underflow rounds once into the subnormals. Max error about
// 1.5 ulp; NaN propagates (min(hi, x) returns x when x is NaN, max(lo, NaN) returns NaN).
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2Hi = 0.693145751953125f;
constexpr float kLn2Lo = 1.428606765330187e-06f;
constexpr float kExpC[8] = {1.0f / 5040.0f, 1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f,
                            1.0f / 6.0f,    0.5f,           1.0f,           1.0f};

inline fVec exp_inline(const fVec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 v = _mm512_max_ps(_mm512_set1_ps(-104.0f), _mm512_min_ps(_mm512_set1_ps(89.0f), x));
  const __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(q, _mm512_set1_ps(kLn2Hi), v);
  r = _mm512_fnmadd_ps(q, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpC[0]);
  for (int i = 1; i < 8; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC[i]));
  const __m512i qi = _mm512_cvtps_epi32(q);
  const __m512i q1 = _mm512_srai_epi32(qi, 1);
  const __m512i q2 = _mm512_sub_epi32(qi, q1);
  const __m512i bias = _mm512_set1_epi32(127);
  const __m512 f1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(q1, bias), 23));
  const __m512 f2 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(q2, bias), 23));
  return _mm512_mul_ps(_mm512_mul_ps(p, f1), f2);
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 v = _mm256_max_ps(_mm256_set1_ps(-104.0f), _mm256_min_ps(_mm256_set1_ps(89.0f), x));
  const __m256 q = _mm256_round_ps(_mm256_mul_ps(v, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(q, _mm256_set1_ps(kLn2Hi), v);
  r = _mm256_fnmadd_ps(q, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpC[0]);
  for (int i = 1; i < 8; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC[i]));
  const __m256i qi = _mm256_cvtps_epi32(q);
  const __m256i q1 = _mm256_srai_epi32(qi, 1);
  const __m256i q2 = _mm256_sub_epi32(qi, q1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(q1, bias), 23));
  const __m256 f2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(q2, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, f1), f2);
#else
  return x.exp();
#endif
}

// act(g), forward: PyTorch's own vectorised CPU code for F.silu (its SiLU kernel's formula) and
// F.gelu (ATen/native/cpu/Gelu.h itself), so a patched model's act(gate) * up is bit-identical
// to the Hugging Face MLP evaluated as `act_fn(gate.float()) * up.float()`, rounded once (where
// PyTorch takes its vector path: rows a multiple of 64 long; exact-erf "gelu" on large inputs
// goes through oneDNN in PyTorch and may differ in the last bit). That keeps LAPE counts equal,
// bit for bit, to the LAPE hook's on an unpatched model, in every layer.
template <Act A>
inline fVec act(const fVec& g) {
  if constexpr (A == Act::silu) {
    return g / (fVec(1.0f) + g.neg().exp());
  } else if constexpr (A == Act::gelu_tanh) {
    return at::native::vectorized_gelu_approximated_with_tanh<float>(g);
  } else {
    return at::native::vectorized_gelu<float>(g);
  }
}

// a = act(g) exactly as the forward computes it (same expressions as act / Gelu.h, so the
// backward's out_sel and grad_up use the forward's values bit for bit; tests/test_ops.py checks
// it), and d = act'(g) from the same transcendental.
template <Act A>
inline void act_and_grad(const fVec& g, fVec& a, fVec& d) {
  const fVec one(1.0f), half(0.5f);
  if constexpr (A == Act::silu) {
    const fVec den = one + g.neg().exp();
    a = g / den;
    const fVec s = den.reciprocal();
    d = s * (one + g * (one - s));
  } else if constexpr (A == Act::gelu_tanh) {
    const fVec x_cube = g * g * g;
    const fVec inner = fVec(static_cast<float>(at::native::kGeluBeta)) *
                       (g + fVec(static_cast<float>(at::native::kGeluKappa)) * x_cube);
    const fVec t = inner.tanh();
    a = half * g * (one + t);
    const fVec d_inner = fVec(kSqrt2OverPi) * (one + fVec(kGeluC3) * g * g);
    d = half * (one + t) + half * g * (one - t * t) * d_inner;
  } else {
    const fVec e = one + (g * fVec(static_cast<float>(M_SQRT1_2))).erf();
    a = g * half * e;
    d = half * e + g * fVec(kInvSqrt2Pi) * exp_inline(fVec(-0.5f) * g * g);
  }
}

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
    case Act::gelu:
      f(std::integral_constant<Act, Act::gelu>{});
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

// One row of the forward over columns [c0, c1): o = act(g) * u. With cnt != nullptr the act
// values are also added to one language's counters cnt / sum (indexed from c0).
template <Act A, typename T>
inline void act_row(const T* __restrict g, const T* __restrict u, T* __restrict o, int64_t c0,
                    int64_t c1, float* __restrict cnt, double* __restrict sum) {
  using io = IO<T>;
  fVec g0, g1, u0, u1;
  int64_t c = c0;
  if (cnt != nullptr) {
    for (; c + kW <= c1; c += kW) {
      io::load(g + c, g0, g1);
      io::load(u + c, u0, u1);
      const fVec a0 = act<A>(g0), a1 = act<A>(g1);
      io::store(o + c, a0 * u0, a1 * u1);
      add_act(a0, a1, cnt + (c - c0), sum + (c - c0));
    }
  } else {
    for (; c + kW <= c1; c += kW) {
      io::load(g + c, g0, g1);
      io::load(u + c, u0, u1);
      io::store(o + c, act<A>(g0) * u0, act<A>(g1) * u1);
    }
  }
  if (c < c1) {
    // Missing lanes of the partial step hold act(0) == 0: adding them is harmless.
    const int64_t n = c1 - c;
    io::load(g + c, n, g0, g1);
    io::load(u + c, n, u0, u1);
    const fVec a0 = act<A>(g0), a1 = act<A>(g1);
    io::store(o + c, n, a0 * u0, a1 * u1);
    if (cnt != nullptr) add_act(a0, a1, cnt + (c - c0), sum + (c - c0));
  }
}

// kW (or a tail of n) columns of the backward: dg = go * u * act'(g), du = go * act(g), and
// optionally h = act(g) * u (the selected columns' forward value).
template <Act A, typename T>
inline void act_grad_step(const fVec (&g)[2], const fVec (&u)[2], const fVec (&go)[2], T* dg,
                          T* du, T* h, int64_t n) {
  using io = IO<T>;
  fVec a[2], d[2];
  act_and_grad<A>(g[0], a[0], d[0]);
  act_and_grad<A>(g[1], a[1], d[1]);
  if (n == kW) {
    io::store(dg, go[0] * u[0] * d[0], go[1] * u[1] * d[1]);
    io::store(du, go[0] * a[0], go[1] * a[1]);
    if (h != nullptr) io::store(h, a[0] * u[0], a[1] * u[1]);
  } else {
    io::store(dg, n, go[0] * u[0] * d[0], go[1] * u[1] * d[1]);
    io::store(du, n, go[0] * a[0], go[1] * a[1]);
    if (h != nullptr) io::store(h, n, a[0] * u[0], a[1] * u[1]);
  }
}

// One row of the backward over columns [c0, c1).
template <Act A, typename T>
inline void act_grad_row(const T* __restrict g, const T* __restrict u, const T* __restrict go,
                         T* __restrict dg, T* __restrict du, int64_t c0, int64_t c1) {
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
    act_grad_step<A>(gv, uv, ov, dg + c, du + c, static_cast<T*>(nullptr), n);
  }
}

// The selected columns sp[p0..p1) of one row, in [c0, c1): positions p0, p1 in sel.
inline std::pair<int64_t, int64_t> selected_in(const int64_t* sp, int64_t k, int64_t c0, int64_t c1) {
  const int64_t p0 = std::lower_bound(sp, sp + k, c0) - sp;
  const int64_t p1 = std::lower_bound(sp + p0, sp + k, c1) - sp;
  return {p0, p1};
}

// Pointers to row t of the [T, I] inputs (read through their row stride) and outputs.
template <typename T>
struct Rows {
  const T* gate;
  const T* up;
  int64_t sg, su;
  const T* g(int64_t t) const { return gate + t * sg; }
  const T* u(int64_t t) const { return up + t * su; }
  Rows(const Tensor& gate_, const Tensor& up_)
      : gate(gate_.const_data_ptr<T>()), up(up_.const_data_ptr<T>()), sg(row_stride(gate_)),
        su(row_stride(up_)) {}
};

// ---------------------------------------------------------------------------------- act_mul --

inline Tensor act_mul(const Tensor& gate, const Tensor& up, const std::string& activation) {
  const Act a = check_args(gate, up, nullptr, activation);
  const int64_t T = gate.size(0), I = gate.size(1);
  Tensor out = at::empty({T, I}, gate.options());
  dispatch(gate.scalar_type(), a, [&](auto tt, auto at_) {
    using T_ = typename decltype(tt)::type;
    constexpr Act A = decltype(at_)::value;
    const Rows<T_> in(gate, up);
    T_* op = out.mutable_data_ptr<T_>();
    for_each_segment(T, I, [&](int64_t t, int64_t c0, int64_t c1) {
      act_row<A>(in.g(t), in.u(t), op + t * I, c0, c1, nullptr, nullptr);
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

inline std::tuple<Tensor, Tensor, Tensor> act_mul_count(const Tensor& gate, const Tensor& up,
                                                        const std::string& activation,
                                                        const std::optional<Tensor>& token_lang,
                                                        int64_t num_langs) {
  const Act a = check_args(gate, up, nullptr, activation);
  const int64_t T = gate.size(0), I = gate.size(1), L = num_langs;
  checks::check_count_args(T, gate.device(), token_lang, num_langs);
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
    const Rows<T_> in(gate, up);
    T_* op = out.mutable_data_ptr<T_>();
    at::parallel_for(0, nrb * ncb, 1, [&](int64_t b, int64_t e) {
      for (int64_t task = b; task < e; ++task) {
        CountAcc& acc = accs[task];
        const int64_t rb = task / ncb, cb = task % ncb;
        const int64_t r0 = rb * rows_per, r1 = std::min(T, r0 + rows_per);
        const int64_t c0 = cb * cols_per, c1 = std::min(I, c0 + cols_per);
        acc.init(L, (c1 - c0 + kW - 1) / kW * kW);
        for (int64_t t = r0; t < r1; ++t) {
          const int64_t lang = tlp ? tlp[t] : 0;
          if (lang >= 0 && lang < L) {
            const int64_t k = acc.touch(lang);
            act_row<A>(in.g(t), in.u(t), op + t * I, c0, c1, acc.cnt.data() + k * acc.wp,
                       acc.sum.data() + k * acc.wp);
          } else {  // padding (-1) etc.: output only
            act_row<A>(in.g(t), in.u(t), op + t * I, c0, c1, nullptr, nullptr);
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

inline std::tuple<Tensor, Tensor> act_mul_backward(const Tensor& grad_out_in, const Tensor& gate,
                                                   const Tensor& up,
                                                   const std::string& activation) {
  const Act a = check_args(gate, up, &grad_out_in, activation);
  const Tensor grad_out = rows_view(grad_out_in);
  const int64_t T = gate.size(0), I = gate.size(1);
  Tensor grad_gate = at::empty({T, I}, gate.options());
  Tensor grad_up = at::empty({T, I}, gate.options());
  dispatch(gate.scalar_type(), a, [&](auto tt, auto at_) {
    using T_ = typename decltype(tt)::type;
    constexpr Act A = decltype(at_)::value;
    const Rows<T_> in(gate, up);
    const T_* gop = grad_out.const_data_ptr<T_>();
    const int64_t so = row_stride(grad_out);
    T_* ggp = grad_gate.mutable_data_ptr<T_>();
    T_* gup = grad_up.mutable_data_ptr<T_>();
    for_each_segment(T, I, [&](int64_t t, int64_t c0, int64_t c1) {
      act_grad_row<A>(in.g(t), in.u(t), gop + t * so, ggp + t * I, gup + t * I, c0, c1);
    });
  });
  return {grad_gate, grad_up};
}

// ---------------------------------------------------------------------------- act_mul_split --

inline std::tuple<Tensor, Tensor> act_mul_split(const Tensor& gate, const Tensor& up,
                                                const std::string& activation,
                                                const Tensor& sel_in) {
  const Act a = check_args(gate, up, nullptr, activation);
  const int64_t T = gate.size(0), I = gate.size(1);
  const Tensor sel = check_sel(sel_in, gate);
  const int64_t k = sel.numel();
  Tensor out = at::empty({T, I}, gate.options());
  Tensor out_sel = at::empty({T, k}, gate.options());
  const int64_t* sp = sel.const_data_ptr<int64_t>();
  dispatch(gate.scalar_type(), a, [&](auto tt, auto at_) {
    using T_ = typename decltype(tt)::type;
    constexpr Act A = decltype(at_)::value;
    const Rows<T_> in(gate, up);
    T_* op = out.mutable_data_ptr<T_>();
    T_* osp = out_sel.mutable_data_ptr<T_>();
    for_each_segment(T, I, [&](int64_t t, int64_t c0, int64_t c1) {
      T_* o = op + t * I;
      act_row<A>(in.g(t), in.u(t), o, c0, c1, nullptr, nullptr);
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
    const Tensor& up, const std::string& activation, const Tensor& sel_in) {
  const Act a = check_args(gate, up, &grad_out_in, activation);
  const int64_t T = gate.size(0), I = gate.size(1);
  const Tensor sel = check_sel(sel_in, gate);
  const int64_t k = sel.numel();
  checks::check_grad_out_sel(grad_out_sel_in, T, k, gate);
  const Tensor grad_out = rows_view(grad_out_in);
  const Tensor grad_out_sel = grad_out_sel_in.contiguous();
  auto opts = gate.options();
  Tensor grad_gate = at::empty({T, I}, opts), grad_up = at::empty({T, I}, opts);
  Tensor grad_gate_sel = at::empty({T, k}, opts), grad_up_sel = at::empty({T, k}, opts);
  Tensor out_sel = at::empty({T, k}, opts);
  const int64_t* sp = sel.const_data_ptr<int64_t>();
  dispatch(gate.scalar_type(), a, [&](auto tt, auto at_) {
    using T_ = typename decltype(tt)::type;
    constexpr Act A = decltype(at_)::value;
    using io = IO<T_>;
    const Rows<T_> in(gate, up);
    const T_* gop = grad_out.const_data_ptr<T_>();
    const T_* gosp = grad_out_sel.const_data_ptr<T_>();
    const int64_t so = row_stride(grad_out);
    T_* ggp = grad_gate.mutable_data_ptr<T_>();
    T_* gup = grad_up.mutable_data_ptr<T_>();
    T_* ggsp = grad_gate_sel.mutable_data_ptr<T_>();
    T_* gusp = grad_up_sel.mutable_data_ptr<T_>();
    T_* osp = out_sel.mutable_data_ptr<T_>();
    for_each_segment(T, I, [&](int64_t t, int64_t c0, int64_t c1) {
      const T_* g = in.g(t);
      const T_* u = in.u(t);
      T_* dg = ggp + t * I;
      T_* du = gup + t * I;
      act_grad_row<A>(g, u, gop + t * so, dg, du, c0, c1);
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
        act_grad_step<A>(gv, uv, ov, ggsp + t * k + p, gusp + t * k + p, osp + t * k + p, n);
      }
    });
  });
  return {grad_gate, grad_up, grad_gate_sel, grad_up_sel, out_sel};
}

// -------------------------------------------------------------------- gate_up_act_mul_count --
// The CPU composite of the fused GEMM + count op: gate = x w_gate^T and up = x w_up^T as fp32
// GEMMs of the upcast inputs (at::mm, the same call lape_kernels/reference.py makes, so gate/up
// and hence the counts are the reference's bit for bit), then act_mul_count above on those fp32
// projections; its fp32 product is rounded once to x's dtype. The GEMMs are at::mm's (MKL /
// oneDNN, multithreaded); the projections are materialised in fp32, unlike the Triton kernel.

inline std::tuple<Tensor, Tensor, Tensor> gate_up_act_mul_count(
    const Tensor& x, const Tensor& w_gate, const Tensor& w_up, const std::string& activation,
    const std::optional<Tensor>& token_lang, int64_t num_langs) {
  // act_mul_count checks its own arguments again; checking first avoids two GEMMs on a bad call.
  checks::check_gate_up_count(x, w_gate, w_up, activation, token_lang, num_langs,
                              c10::DeviceType::CPU, "CPU");
  const Tensor xf = x.to(at::kFloat);
  const Tensor gate = at::mm(xf, w_gate.to(at::kFloat).t());
  const Tensor up = at::mm(xf, w_up.to(at::kFloat).t());
  auto [out, over_zero, act_sum] = act_mul_count(gate, up, activation, token_lang, num_langs);
  return {out.to(x.scalar_type()), over_zero, act_sum};
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
