// CPU kernels of the lape_kernels ops (semantics: docs/ARCHITECTURE.md, oracle:
// lape_kernels/reference.py).
//
// This header is compiled once per CPU capability (csrc/cpu/kernels_<isa>.cpp, each its own
// extension module with its own ISA flags, so no AVX code can leak into the default build). The
// math uses at::vec::Vectorized<float>, i.e. the same SLEEF exp/tanh and the same erf polynomial
// that PyTorch's own CPU kernels use, with the reference's order of operations: the fp32 results
// match the reference to the last bit or two. Inputs are read once (bf16/fp16 widened to fp32 on
// load), every output element is written once, rounded once.
#pragma once

#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
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

#ifndef CPU_CAPABILITY
#error "compile with -DCPU_CAPABILITY=DEFAULT|AVX2|AVX512 (see setup.py)"
#endif

namespace lape_kernels::cpu {
inline namespace CPU_CAPABILITY {

using at::Tensor;
using fVec = at::vec::Vectorized<float>;

// Elements per inner step: two fp32 vectors (= one bf16/fp16 vector).
constexpr int64_t kW = 2 * fVec::size();
// Work per parallel task, in elements (keeps small inputs on one thread).
constexpr int64_t kGrainElems = 32768;

enum class Act { silu, gelu_tanh, gelu };

// ----------------------------------------------------------------------------------- checks --

inline Act parse_activation(const std::string& activation) {
  if (activation == "silu") return Act::silu;
  if (activation == "gelu_tanh") return Act::gelu_tanh;
  if (activation == "gelu") return Act::gelu;
  TORCH_CHECK_VALUE(false, "activation must be one of ('silu', 'gelu_tanh', 'gelu'), got '",
                    activation, "'");
}

inline void check_float_2d(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D [tokens, intermediate], got shape ",
                    t.sizes());
  const auto dt = t.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, name,
                    " must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor for the CPU kernel, got ",
                    t.device());
}

// gate/up (and grad_out against gate): 2-D, same float dtype, same shape, CPU.
inline void check_pair(const Tensor& a, const Tensor& b, const char* na, const char* nb) {
  check_float_2d(a, na);
  check_float_2d(b, nb);
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), na, " and ", nb, " must have the same shape, got ",
                    a.sizes(), " and ", b.sizes());
  TORCH_CHECK_VALUE(a.scalar_type() == b.scalar_type(), na, " and ", nb,
                    " must have the same dtype, got ", a.scalar_type(), " and ",
                    b.scalar_type());
}

// The kernels read rows through stride(0) and need unit stride along the last dim. gate/up
// must already be like that (views such as the halves of a fused gate_up output are fine);
// other [T, I] inputs (gradients) are copied if they are not.
inline void check_rows(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.size(1) <= 1 || t.stride(1) == 1, name,
                    " must have a contiguous last dimension (stride(1) == 1), got strides ",
                    t.strides());
}

inline Tensor rows_view(const Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

inline int64_t row_stride(const Tensor& t) { return t.size(0) <= 1 ? 0 : t.stride(0); }

// sel: int64 [k], strictly increasing, values in [0, I).
inline Tensor check_sel(const Tensor& sel, int64_t I) {
  TORCH_CHECK_VALUE(sel.dim() == 1 && sel.scalar_type() == at::kLong,
                    "sel must be a 1-D int64 tensor, got ", sel.scalar_type(), " of shape ",
                    sel.sizes());
  TORCH_CHECK_VALUE(sel.device().is_cpu(), "sel must be on cpu, got ", sel.device());
  Tensor s = sel.contiguous();
  const int64_t* p = s.const_data_ptr<int64_t>();
  const int64_t k = s.numel();
  for (int64_t j = 0; j < k; ++j) {
    TORCH_CHECK_VALUE(p[j] >= 0 && p[j] < I, "sel values must be in [0, ", I, "), got sel[", j,
                      "] = ", p[j]);
    TORCH_CHECK_VALUE(j == 0 || p[j] > p[j - 1],
                      "sel must be sorted ascending without duplicates, got sel[", j - 1,
                      "] = ", p[j - 1], " and sel[", j, "] = ", p[j]);
  }
  return s;
}

// --------------------------------------------------------------------------------- the math --
// Written as the reference writes it (same operation order, no contraction): see
// lape_kernels/reference.py act_fp32 / act_grad_fp32.

constexpr float kSqrt2OverPi = 0.7978845608028654f;   // sqrt(2 / pi)
constexpr float kInvSqrt2 = 0.7071067811865476f;      // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.3989422804014327f;    // 1 / sqrt(2 pi)
constexpr float kGeluC = 0.044715f;
constexpr float kGeluC3 = 0.134145f;                  // 3 * 0.044715 (as Python folds it)

inline fVec sigmoid(const fVec& g) {
  return (fVec(1.0f) + g.neg().exp()).reciprocal();
}

template <Act A>
inline fVec act(const fVec& g) {
  if constexpr (A == Act::silu) {
    return g * sigmoid(g);
  } else if constexpr (A == Act::gelu_tanh) {
    const fVec inner = fVec(kSqrt2OverPi) * (g + fVec(kGeluC) * g * g * g);
    return fVec(0.5f) * g * (fVec(1.0f) + inner.tanh());
  } else {
    return fVec(0.5f) * g * (fVec(1.0f) + (g * fVec(kInvSqrt2)).erf());
  }
}

// a = act(g), d = act'(g), computed together (they share the transcendental).
template <Act A>
inline void act_and_grad(const fVec& g, fVec& a, fVec& d) {
  const fVec one(1.0f), half(0.5f);
  if constexpr (A == Act::silu) {
    const fVec s = sigmoid(g);
    a = g * s;
    d = s * (one + g * (one - s));
  } else if constexpr (A == Act::gelu_tanh) {
    const fVec inner = fVec(kSqrt2OverPi) * (g + fVec(kGeluC) * g * g * g);
    const fVec t = inner.tanh();
    const fVec d_inner = fVec(kSqrt2OverPi) * (one + fVec(kGeluC3) * g * g);
    a = half * g * (one + t);
    d = half * (one + t) + half * g * (one - t * t) * d_inner;
  } else {
    const fVec e = one + (g * fVec(kInvSqrt2)).erf();
    a = half * g * e;
    d = half * e + g * fVec(kInvSqrt2Pi) * (fVec(-0.5f) * g * g).exp();
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

// ---------------------------------------------------------------------------------- act_mul --

inline Tensor act_mul(const Tensor& gate, const Tensor& up, const std::string& activation) {
  check_pair(gate, up, "gate", "up");
  check_rows(gate, "gate");
  check_rows(up, "up");
  const Act a = parse_activation(activation);
  const int64_t T = gate.size(0), I = gate.size(1);
  Tensor out = at::empty({T, I}, gate.options());
  dispatch(gate.scalar_type(), a, [&](auto tt, auto at_) {
    using T_ = typename decltype(tt)::type;
    constexpr Act A = decltype(at_)::value;
    using io = IO<T_>;
    const T_* gp = gate.const_data_ptr<T_>();
    const T_* upp = up.const_data_ptr<T_>();
    T_* op = out.mutable_data_ptr<T_>();
    const int64_t sg = row_stride(gate), su = row_stride(up);
    for_each_segment(T, I, [&](int64_t t, int64_t c0, int64_t c1) {
      const T_* g = gp + t * sg;
      const T_* u = upp + t * su;
      T_* o = op + t * I;
      int64_t c = c0;
      fVec g0, g1, u0, u1;
      for (; c + kW <= c1; c += kW) {
        io::load(g + c, g0, g1);
        io::load(u + c, u0, u1);
        io::store(o + c, act<A>(g0) * u0, act<A>(g1) * u1);
      }
      if (c < c1) {
        const int64_t n = c1 - c;
        io::load(g + c, n, g0, g1);
        io::load(u + c, n, u0, u1);
        io::store(o + c, n, act<A>(g0) * u0, act<A>(g1) * u1);
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------- act_mul_count --
// Work is split into column blocks (and, when there are few of those, row blocks). A task owns
// a [rows, columns] tile and its own per-language accumulators (fp32 counts, exact since a tile
// has < 2^24 rows; fp64 sums, fed by fp32 sums of kRowGroup rows), so no atomics are needed;
// tiles of the same columns are then added in a fixed order.

constexpr int64_t kCountBlock = 64 * kW;     // columns per tile (a multiple of kW)
constexpr int64_t kMaxTileRows = 1 << 24;    // fp32 counters stay exact
constexpr int64_t kRowGroup = 1;             // rows summed in registers (fp32) per flush

// cnt[j] += n[j] (fp32 counts), sum[j] += (double)a[j], for one fp32 vector.
inline void accumulate(const fVec& n, const fVec& a, float* cnt, double* sum) {
  (fVec::loadu(cnt) + n).store(cnt);
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

inline std::tuple<Tensor, Tensor, Tensor> act_mul_count(const Tensor& gate, const Tensor& up,
                                                        const std::string& activation,
                                                        const std::optional<Tensor>& token_lang,
                                                        int64_t num_langs) {
  check_pair(gate, up, "gate", "up");
  check_rows(gate, "gate");
  check_rows(up, "up");
  const Act a = parse_activation(activation);
  TORCH_CHECK_VALUE(num_langs >= 1, "num_langs must be >= 1, got ", num_langs);
  const int64_t T = gate.size(0), I = gate.size(1), L = num_langs;
  Tensor tl;
  if (token_lang.has_value()) {
    const Tensor& t = *token_lang;
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == T && t.scalar_type() == at::kLong,
                      "token_lang must be int64 of shape [", T, "], got ", t.scalar_type(),
                      " of shape ", t.sizes());
    TORCH_CHECK_VALUE(t.device() == gate.device(), "token_lang must be on ", gate.device(),
                      ", got ", t.device());
    tl = t.contiguous();
  }

  Tensor out = at::empty({T, I}, gate.options());
  Tensor over_zero = at::zeros({L, I}, gate.options().dtype(at::kLong));
  Tensor act_sum = at::zeros({L, I}, gate.options().dtype(at::kDouble));
  if (T == 0 || I == 0) return {out, over_zero, act_sum};

  const int64_t ncb = (I + kCountBlock - 1) / kCountBlock;
  // Row blocks only when column blocks alone cannot keep the threads busy.
  const int64_t threads = at::get_num_threads();
  const int64_t min_rows = std::max<int64_t>(1, kGrainElems / std::min(I, kCountBlock));
  int64_t nrb = 1;
  if (ncb < 2 * threads) {
    nrb = std::min((2 * threads + ncb - 1) / ncb, (T + min_rows - 1) / min_rows);
    nrb = std::max<int64_t>(nrb, 1);
  }
  // fp32 counters are exact up to 2^24: no tile has more rows than that.
  nrb = std::max(nrb, (T + kMaxTileRows - 1) / kMaxTileRows);
  const int64_t rows_per = (T + nrb - 1) / nrb;
  nrb = (T + rows_per - 1) / rows_per;
  // Per-row-block partial results (only when nrb > 1): [nrb, L, I].
  std::vector<int64_t> part_cnt;
  std::vector<double> part_sum;
  if (nrb > 1) {
    part_cnt.assign(static_cast<size_t>(nrb * L * I), 0);
    part_sum.assign(static_cast<size_t>(nrb * L * I), 0.0);
  }
  const int64_t* tlp = tl.defined() ? tl.const_data_ptr<int64_t>() : nullptr;
  int64_t* ozp = over_zero.mutable_data_ptr<int64_t>();
  double* asp = act_sum.mutable_data_ptr<double>();

  dispatch(gate.scalar_type(), a, [&](auto tt, auto at_) {
    using T_ = typename decltype(tt)::type;
    constexpr Act A = decltype(at_)::value;
    using io = IO<T_>;
    const T_* gp = gate.const_data_ptr<T_>();
    const T_* upp = up.const_data_ptr<T_>();
    T_* op = out.mutable_data_ptr<T_>();
    const int64_t sg = row_stride(gate), su = row_stride(up);
    at::parallel_for(0, nrb * ncb, 1, [&](int64_t b, int64_t e) {
      std::vector<float> cnt(static_cast<size_t>(L * kCountBlock));
      std::vector<double> sum(static_cast<size_t>(L * kCountBlock));
      for (int64_t task = b; task < e; ++task) {
        const int64_t rb = task / ncb, cb = task % ncb;
        const int64_t r0 = rb * rows_per, r1 = std::min(T, r0 + rows_per);
        const int64_t c0 = cb * kCountBlock, c1 = std::min(I, c0 + kCountBlock);
        std::fill(cnt.begin(), cnt.end(), 0.0f);
        std::fill(sum.begin(), sum.end(), 0.0);
        // act(gate) for kW columns at (t, c), out written; missing lanes of a partial step
        // hold act(0) == 0, so adding them to the accumulators is harmless.
        auto step = [&](int64_t t, int64_t c, fVec& a0, fVec& a1) {
          const T_* g = gp + t * sg + c;
          const T_* u = upp + t * su + c;
          T_* o = op + t * I + c;
          fVec g0, g1, u0, u1;
          const int64_t n = std::min(kW, c1 - c);
          if (n == kW) {
            io::load(g, g0, g1);
            io::load(u, u0, u1);
            a0 = act<A>(g0);
            a1 = act<A>(g1);
            io::store(o, a0 * u0, a1 * u1);
          } else {
            io::load(g, n, g0, g1);
            io::load(u, n, u0, u1);
            a0 = act<A>(g0);
            a1 = act<A>(g1);
            io::store(o, n, a0 * u0, a1 * u1);
          }
        };
        const fVec zero(0.0f), one(1.0f);
        for (int64_t t0 = r0; t0 < r1; t0 += kRowGroup) {
          const int64_t nr = std::min(kRowGroup, r1 - t0);
          const int64_t lang = tlp ? tlp[t0] : 0;
          bool uniform = true;
          for (int64_t i = 1; tlp && i < nr; ++i) uniform = uniform && tlp[t0 + i] == lang;
          if (uniform) {
            // Rows of one language (the usual case): sum the group in registers, one
            // read-modify-write of the accumulators per group.
            const bool counted = lang >= 0 && lang < L;
            float* cl = cnt.data() + (counted ? lang : 0) * kCountBlock;
            double* sl = sum.data() + (counted ? lang : 0) * kCountBlock;
            for (int64_t c = c0; c < c1; c += kW) {
              fVec a0, a1, n0(0.0f), n1(0.0f), s0(0.0f), s1(0.0f);
              for (int64_t i = 0; i < nr; ++i) {
                step(t0 + i, c, a0, a1);
                n0 = n0 + ((a0 > zero) & one);
                n1 = n1 + ((a1 > zero) & one);
                s0 = s0 + a0;
                s1 = s1 + a1;
              }
              if (counted) {
                accumulate(n0, s0, cl + (c - c0), sl + (c - c0));
                accumulate(n1, s1, cl + (c - c0) + fVec::size(), sl + (c - c0) + fVec::size());
              }
            }
          } else {
            for (int64_t t = t0; t < t0 + nr; ++t) {
              const int64_t l = tlp[t];
              const bool counted = l >= 0 && l < L;
              float* cl = cnt.data() + (counted ? l : 0) * kCountBlock;
              double* sl = sum.data() + (counted ? l : 0) * kCountBlock;
              for (int64_t c = c0; c < c1; c += kW) {
                fVec a0, a1;
                step(t, c, a0, a1);
                if (counted) {
                  accumulate((a0 > zero) & one, a0, cl + (c - c0), sl + (c - c0));
                  accumulate((a1 > zero) & one, a1, cl + (c - c0) + fVec::size(),
                             sl + (c - c0) + fVec::size());
                }
              }
            }
          }
        }
        const int64_t w = c1 - c0;
        for (int64_t l = 0; l < L; ++l) {
          const float* cs = cnt.data() + l * kCountBlock;
          const double* ss = sum.data() + l * kCountBlock;
          if (nrb == 1) {
            int64_t* od = ozp + l * I + c0;
            double* sd = asp + l * I + c0;
            for (int64_t j = 0; j < w; ++j) {
              od[j] = static_cast<int64_t>(cs[j]);
              sd[j] = ss[j];
            }
          } else {
            int64_t* od = part_cnt.data() + (rb * L + l) * I + c0;
            double* sd = part_sum.data() + (rb * L + l) * I + c0;
            for (int64_t j = 0; j < w; ++j) od[j] = static_cast<int64_t>(cs[j]);
            std::memcpy(sd, ss, sizeof(double) * w);
          }
        }
      }
    });
  });
  if (nrb > 1) {
    // Fixed-order reduction over row blocks (deterministic for a given thread count).
    at::parallel_for(0, L * I, 4096, [&](int64_t b, int64_t e) {
      for (int64_t rb = 0; rb < nrb; ++rb) {
        const int64_t* pc = part_cnt.data() + rb * L * I;
        const double* ps = part_sum.data() + rb * L * I;
        for (int64_t i = b; i < e; ++i) {
          ozp[i] += pc[i];
          asp[i] += ps[i];
        }
      }
    });
  }
  return {out, over_zero, act_sum};
}

// ------------------------------------------------------------------------- act_mul_backward --

inline std::tuple<Tensor, Tensor> act_mul_backward(const Tensor& grad_out_in, const Tensor& gate,
                                                   const Tensor& up,
                                                   const std::string& activation) {
  check_pair(gate, up, "gate", "up");
  check_pair(grad_out_in, gate, "grad_out", "gate");
  check_rows(gate, "gate");
  check_rows(up, "up");
  const Act a = parse_activation(activation);
  const Tensor grad_out = rows_view(grad_out_in);
  const int64_t T = gate.size(0), I = gate.size(1);
  Tensor grad_gate = at::empty({T, I}, gate.options());
  Tensor grad_up = at::empty({T, I}, gate.options());
  dispatch(gate.scalar_type(), a, [&](auto tt, auto at_) {
    using T_ = typename decltype(tt)::type;
    constexpr Act A = decltype(at_)::value;
    using io = IO<T_>;
    const T_* gp = gate.const_data_ptr<T_>();
    const T_* upp = up.const_data_ptr<T_>();
    const T_* gop = grad_out.const_data_ptr<T_>();
    T_* ggp = grad_gate.mutable_data_ptr<T_>();
    T_* gup = grad_up.mutable_data_ptr<T_>();
    const int64_t sg = row_stride(gate), su = row_stride(up), so = row_stride(grad_out);
    for_each_segment(T, I, [&](int64_t t, int64_t c0, int64_t c1) {
      const T_* g = gp + t * sg;
      const T_* u = upp + t * su;
      const T_* go = gop + t * so;
      T_* dg = ggp + t * I;
      T_* du = gup + t * I;
      fVec g0, g1, u0, u1, o0, o1, a0, a1, d0, d1;
      for (int64_t c = c0; c < c1; c += kW) {
        const int64_t n = std::min(kW, c1 - c);
        if (n == kW) {
          io::load(g + c, g0, g1);
          io::load(u + c, u0, u1);
          io::load(go + c, o0, o1);
        } else {
          io::load(g + c, n, g0, g1);
          io::load(u + c, n, u0, u1);
          io::load(go + c, n, o0, o1);
        }
        act_and_grad<A>(g0, a0, d0);
        act_and_grad<A>(g1, a1, d1);
        if (n == kW) {
          io::store(dg + c, o0 * u0 * d0, o1 * u1 * d1);
          io::store(du + c, o0 * a0, o1 * a1);
        } else {
          io::store(dg + c, n, o0 * u0 * d0, o1 * u1 * d1);
          io::store(du + c, n, o0 * a0, o1 * a1);
        }
      }
    });
  });
  return {grad_gate, grad_up};
}

// ---------------------------------------------------------------------------- act_mul_split --

inline std::tuple<Tensor, Tensor> act_mul_split(const Tensor& gate, const Tensor& up,
                                                const std::string& activation,
                                                const Tensor& sel_in) {
  check_pair(gate, up, "gate", "up");
  check_rows(gate, "gate");
  check_rows(up, "up");
  const Act a = parse_activation(activation);
  const int64_t T = gate.size(0), I = gate.size(1);
  const Tensor sel = check_sel(sel_in, I);
  const int64_t k = sel.numel();
  Tensor out = at::empty({T, I}, gate.options());
  Tensor out_sel = at::empty({T, k}, gate.options());
  const int64_t* sp = sel.const_data_ptr<int64_t>();
  dispatch(gate.scalar_type(), a, [&](auto tt, auto at_) {
    using T_ = typename decltype(tt)::type;
    constexpr Act A = decltype(at_)::value;
    using io = IO<T_>;
    const T_* gp = gate.const_data_ptr<T_>();
    const T_* upp = up.const_data_ptr<T_>();
    T_* op = out.mutable_data_ptr<T_>();
    T_* osp = out_sel.mutable_data_ptr<T_>();
    const int64_t sg = row_stride(gate), su = row_stride(up);
    for_each_segment(T, I, [&](int64_t t, int64_t c0, int64_t c1) {
      const T_* g = gp + t * sg;
      const T_* u = upp + t * su;
      T_* o = op + t * I;
      fVec g0, g1, u0, u1;
      for (int64_t c = c0; c < c1; c += kW) {
        const int64_t n = std::min(kW, c1 - c);
        if (n == kW) {
          io::load(g + c, g0, g1);
          io::load(u + c, u0, u1);
          io::store(o + c, act<A>(g0) * u0, act<A>(g1) * u1);
        } else {
          io::load(g + c, n, g0, g1);
          io::load(u + c, n, u0, u1);
          io::store(o + c, n, act<A>(g0) * u0, act<A>(g1) * u1);
        }
      }
      // Move the selected columns of this segment (already rounded once) to out_sel.
      const int64_t p0 = std::lower_bound(sp, sp + k, c0) - sp;
      const int64_t p1 = std::lower_bound(sp + p0, sp + k, c1) - sp;
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
  check_pair(gate, up, "gate", "up");
  check_pair(grad_out_in, gate, "grad_out", "gate");
  check_rows(gate, "gate");
  check_rows(up, "up");
  const Act a = parse_activation(activation);
  const int64_t T = gate.size(0), I = gate.size(1);
  const Tensor sel = check_sel(sel_in, I);
  const int64_t k = sel.numel();
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
    const T_* gp = gate.const_data_ptr<T_>();
    const T_* upp = up.const_data_ptr<T_>();
    const T_* gop = grad_out.const_data_ptr<T_>();
    const T_* gosp = grad_out_sel.const_data_ptr<T_>();
    T_* ggp = grad_gate.mutable_data_ptr<T_>();
    T_* gup = grad_up.mutable_data_ptr<T_>();
    T_* ggsp = grad_gate_sel.mutable_data_ptr<T_>();
    T_* gusp = grad_up_sel.mutable_data_ptr<T_>();
    T_* osp = out_sel.mutable_data_ptr<T_>();
    const int64_t sg = row_stride(gate), su = row_stride(up), so = row_stride(grad_out);
    for_each_segment(T, I, [&](int64_t t, int64_t c0, int64_t c1) {
      const T_* g = gp + t * sg;
      const T_* u = upp + t * su;
      const T_* go = gop + t * so;
      T_* dg = ggp + t * I;
      T_* du = gup + t * I;
      fVec g0, g1, u0, u1, o0, o1, a0, a1, d0, d1;
      for (int64_t c = c0; c < c1; c += kW) {
        const int64_t n = std::min(kW, c1 - c);
        if (n == kW) {
          io::load(g + c, g0, g1);
          io::load(u + c, u0, u1);
          io::load(go + c, o0, o1);
        } else {
          io::load(g + c, n, g0, g1);
          io::load(u + c, n, u0, u1);
          io::load(go + c, n, o0, o1);
        }
        act_and_grad<A>(g0, a0, d0);
        act_and_grad<A>(g1, a1, d1);
        if (n == kW) {
          io::store(dg + c, o0 * u0 * d0, o1 * u1 * d1);
          io::store(du + c, o0 * a0, o1 * a1);
        } else {
          io::store(dg + c, n, o0 * u0 * d0, o1 * u1 * d1);
          io::store(du + c, n, o0 * a0, o1 * a1);
        }
      }
      // Selected columns: zero them in the full gradients, and compute their values from
      // grad_out_sel (gathered kW at a time so the same vector math applies).
      const int64_t p0 = std::lower_bound(sp, sp + k, c0) - sp;
      const int64_t p1 = std::lower_bound(sp + p0, sp + k, c1) - sp;
      const T_* gos = gosp + t * k;
      T_* dgs = ggsp + t * k;
      T_* dus = gusp + t * k;
      T_* os = osp + t * k;
      for (int64_t p = p0; p < p1; p += kW) {
        const int64_t n = std::min(kW, p1 - p);
        for (int64_t j = 0; j < n; ++j) {
          dg[sp[p + j]] = T_(0);
          du[sp[p + j]] = T_(0);
        }
        gather(g, sp + p, n, g0, g1);
        gather(u, sp + p, n, u0, u1);
        io::load(gos + p, n, o0, o1);
        act_and_grad<A>(g0, a0, d0);
        act_and_grad<A>(g1, a1, d1);
        io::store(dgs + p, n, o0 * u0 * d0, o1 * u1 * d1);
        io::store(dus + p, n, o0 * a0, o1 * a1);
        io::store(os + p, n, a0 * u0, a1 * u1);
      }
    });
  });
  return {grad_gate, grad_up, grad_gate_sel, grad_up_sel, out_sel};
}

}  // namespace CPU_CAPABILITY
}  // namespace lape_kernels::cpu

// One registration per module (each kernels_<isa>.cpp includes this header exactly once).
#define LAPE_KERNELS_REGISTER_CPU()                                                           \
  TORCH_LIBRARY_IMPL(lape_kernels, CPU, m) {                                                \
    m.impl("act_mul", &lape_kernels::cpu::act_mul);                                         \
    m.impl("act_mul_count", &lape_kernels::cpu::act_mul_count);                             \
    m.impl("act_mul_backward", &lape_kernels::cpu::act_mul_backward);                       \
    m.impl("act_mul_split", &lape_kernels::cpu::act_mul_split);                             \
    m.impl("act_mul_backward_split", &lape_kernels::cpu::act_mul_backward_split);           \
  }

// The (empty) Python module a kernels_<isa>.cpp file becomes; importing it runs the
// registration above.
#define LAPE_KERNELS_PYINIT(NAME)                                                             \
  static PyModuleDef lape_module_def = {PyModuleDef_HEAD_INIT, #NAME,                         \
                                        "lape_kernels CPU kernels (" #NAME ")", -1, nullptr}; \
  extern "C" PyMODINIT_FUNC PyInit_##NAME(void) { return PyModule_Create(&lape_module_def); }
