// quantkit fast CPU kernels: int8 dynamic activations x int4 (groupwise) / int8 (per-channel)
// weights. One translation unit; the SIMD code lives in `#pragma GCC target` regions and is
// chosen at run time from cpuid, so the library is built without -march flags and loads on
// any x86-64 CPU (the Python side refuses to use it below AVX2).
//
// The repacked layouts and the arithmetic are documented in quantkit/kernels/cpu/__init__.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

namespace quantkit_cpu {

enum Isa : int64_t { ISA_NONE = 0, ISA_AVX2 = 1, ISA_AVX512_VNNI = 2 };

static int64_t detect_isa() {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool vnni = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  return vnni ? ISA_AVX512_VNNI : (avx2 ? ISA_AVX2 : ISA_NONE);
}

static int64_t cpu_isa() {
  static const int64_t isa = detect_isa();
  return isa;
}

static inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

static inline uint16_t f32_to_bf16(float f) {  // round to nearest even (finite values)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// Everything a worker needs, shared by both ISAs.
struct Problem {
  int64_t M, K, N, G, g;  // tokens, input channels, output channels, groups per row, group size
  const void* x;          // [M, K] float32 or bfloat16 (row stride K)
  bool x_bf16;
  int8_t* qa;             // [M, K] activation codes
  float* ascale;          // [M]
  int32_t* gsum;          // [M, G] sum of codes per group (int4) or [M, 1] per row (int8)
  const uint8_t* w;       // repacked weight
  const void* s;          // repacked scales
  bool s_bf16;
  const float* bias;      // [N] or nullptr
  void* out;              // [M, N] float32 or bfloat16
  bool out_bf16;
  // optional LoRA side path, added before the output is rounded: out[m] += lt[m] @ lbt
  const float* lt = nullptr;   // [M, r] = lora_scale * x[m] @ A^T (x unquantized)
  const float* lbt = nullptr;  // [r, N] = B^T
  int64_t r = 0;
};

// Scalar tail of the activation quantizer; identical arithmetic to the vector bodies:
// code = clamp(nearbyint(x / scale), -128, 127), true float32 division, ties to even.
static inline int8_t quant_one(float v, float scale) {
  float r = std::nearbyint(v / scale);
  r = std::min(127.f, std::max(-128.f, r));
  return static_cast<int8_t>(r);
}

static inline float load_x_scalar(const Problem& p, int64_t m, int64_t k) {
  if (p.x_bf16) {
    uint32_t u = static_cast<uint32_t>(static_cast<const uint16_t*>(p.x)[m * p.K + k]) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  return static_cast<const float*>(p.x)[m * p.K + k];
}

static inline float finish_scale(float amax) {
  float scale = amax / 127.f;
  return scale < 1e-10f ? 1e-10f : scale;  // MIN_SCALE; NaN propagates like torch.clamp
}

// ---------------------------------------------------------------------------------------------
// AVX-512 VNNI
// ---------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")

static inline __m512 x16_512(const Problem& p, int64_t m, int64_t k) {
  if (p.x_bf16) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p.x) + m * p.K + k));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  return _mm512_loadu_ps(static_cast<const float*>(p.x) + m * p.K + k);
}

// Quantize token m: codes, scale, per-group code sums (gsize = group size; G groups).
static void quant_row_512(const Problem& p, int64_t m, int64_t gsize) {
  const int64_t K = p.K;
  const int64_t K16 = K & ~int64_t(15);
  __m512 vmax = _mm512_setzero_ps();
  for (int64_t k = 0; k < K16; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(x16_512(p, m, k)));
  float amax = _mm512_reduce_max_ps(vmax);
  for (int64_t k = K16; k < K; ++k) amax = std::max(amax, std::fabs(load_x_scalar(p, m, k)));
  const float scale = finish_scale(amax);
  p.ascale[m] = scale;
  const __m512 vs = _mm512_set1_ps(scale);
  int8_t* q = p.qa + m * K;
  for (int64_t k = 0; k < K16; k += 16) {
    __m512 r = _mm512_div_ps(x16_512(p, m, k), vs);
    __m512i c = _mm512_cvtps_epi32(r);  // MXCSR default: round to nearest even
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtsepi32_epi8(c));
  }
  for (int64_t k = K16; k < K; ++k) q[k] = quant_one(load_x_scalar(p, m, k), scale);
  const int64_t G = K / gsize;
  for (int64_t gi = 0; gi < G; ++gi) {
    int32_t sum = 0;
    for (int64_t k = gi * gsize; k < (gi + 1) * gsize; ++k) sum += q[k];
    p.gsum[m * G + gi] = sum;
  }
}

static inline void store16_512(const Problem& p, int64_t m, int64_t n0, __m512 v) {
  const int64_t valid = std::min<int64_t>(16, p.N - n0);
  const __mmask16 mask = valid >= 16 ? __mmask16(0xffff) : __mmask16((1u << valid) - 1u);
  if (p.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, p.bias + n0));
  if (p.lt) {
    const float* t = p.lt + m * p.r;
    for (int64_t j = 0; j < p.r; ++j)
      v = _mm512_fmadd_ps(_mm512_set1_ps(t[j]), _mm512_maskz_loadu_ps(mask, p.lbt + j * p.N + n0), v);
  }
  if (p.out_bf16) {
    // round to nearest even: u + 0x7fff + ((u >> 16) & 1), then take the high half
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p.out) + m * p.N + n0, mask, _mm512_cvtepi32_epi16(r));
  } else {
    _mm512_mask_storeu_ps(static_cast<float*>(p.out) + m * p.N + n0, mask, v);
  }
}

static inline __m512 scales16_512(const Problem& p, int64_t tile, int64_t gi) {
  const int64_t off = (tile * p.G + gi) * 16;
  if (p.s_bf16) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p.s) + off));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  return _mm512_loadu_ps(static_cast<const float*>(p.s) + off);
}

// acc += u8(w) . s8(broadcast of the 4 bytes at p), per 32-bit lane. Inline asm so that the
// activation broadcast is an embedded {1to16} memory operand and GCC keeps the accumulator in
// place (its builtin leaves a register copy around every vpdpbusd).
static inline __m512i dpbusd_bcast(__m512i acc, __m512i w, const int8_t* p) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*reinterpret_cast<const int32_t*>(p)));
  return acc;
}

#ifndef QK_PF_DIST
#define QK_PF_DIST 2048
#endif

// int4 micro kernel: NT tiles of 16 output channels x MT tokens, over the whole K.
template <int NT, int MT, int KB>
static inline void int4_mk_512(const Problem& p, int64_t tile0, int64_t m0) {
  const int64_t K = p.K, G = p.G, g = p.g;
  const int64_t tile_bytes = K * 8;  // 16 rows x K/2 bytes
  const uint8_t* W = p.w + tile0 * tile_bytes;
  const int8_t* A = p.qa + m0 * K;
  const __m512i m4 = _mm512_set1_epi8(0x0f);
  __m512 facc[NT][MT];
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t)
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) facc[t][m] = _mm512_setzero_ps();

  for (int64_t gi = 0; gi < G; ++gi) {
    __m512i acc[NT][MT], acc2[NT][MT];
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) {
      const __m512i c = _mm512_set1_epi32(-8 * p.gsum[(m0 + m) * G + gi]);
#pragma GCC unroll 8
      for (int t = 0; t < NT; ++t) {
        acc[t][m] = c;
        acc2[t][m] = _mm512_setzero_si512();
      }
    }
    const int64_t kbn = KB > 0 ? KB : g / 8;  // blocks of 8 input channels per group
#pragma GCC unroll 4
    for (int64_t kb = 0; kb < kbn; ++kb) {
      const int64_t k0 = gi * g + kb * 8;
      __m512i lo[NT], hi[NT];
#pragma GCC unroll 8
      for (int t = 0; t < NT; ++t) {
        // decode streams each tile once from DRAM: prefetch ahead of the hardware prefetcher
        if constexpr (MT <= 2) _mm_prefetch(reinterpret_cast<const char*>(W + t * tile_bytes + k0 * 8 + QK_PF_DIST), _MM_HINT_T0);
        const __m512i wv = _mm512_loadu_si512(W + t * tile_bytes + k0 * 8);
        lo[t] = _mm512_and_si512(wv, m4);
        hi[t] = _mm512_and_si512(_mm512_srli_epi16(wv, 4), m4);
      }
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) {
#pragma GCC unroll 8
        for (int t = 0; t < NT; ++t) {
          acc[t][m] = dpbusd_bcast(acc[t][m], lo[t], A + m * K + k0);
          if constexpr (MT == 1)  // decode: a second chain per tile hides the vpdpbusd latency
            acc2[t][m] = dpbusd_bcast(acc2[t][m], hi[t], A + m * K + k0 + 4);
          else
            acc[t][m] = dpbusd_bcast(acc[t][m], hi[t], A + m * K + k0 + 4);
        }
      }
    }
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      const __m512 s = scales16_512(p, tile0 + t, gi);
#pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) {
        if constexpr (MT == 1) acc[t][m] = _mm512_add_epi32(acc[t][m], acc2[t][m]);
        facc[t][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t][m]), s, facc[t][m]);
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) {
    const __m512 as = _mm512_set1_ps(p.ascale[m0 + m]);
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) store16_512(p, m0 + m, (tile0 + t) * 16, _mm512_mul_ps(facc[t][m], as));
  }
}

// int8 micro kernel: weights stored as w + 128 (u8), activations s8; acc starts at -128 * sum(a).
template <int NT, int MT>
static inline void int8_mk_512(const Problem& p, int64_t tile0, int64_t m0) {
  const int64_t K = p.K;
  const int64_t tile_bytes = K * 16;
  const uint8_t* W = p.w + tile0 * tile_bytes;
  const int8_t* A = p.qa + m0 * K;
  __m512i acc[NT][MT];
#pragma GCC unroll 8
  for (int m = 0; m < MT; ++m) {
    const __m512i c = _mm512_set1_epi32(-128 * p.gsum[m0 + m]);
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) acc[t][m] = c;
  }
  for (int64_t k0 = 0; k0 < K; k0 += 4) {
    __m512i wv[NT];
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) wv[t] = _mm512_loadu_si512(W + t * tile_bytes + k0 * 16);
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) {
#pragma GCC unroll 8
      for (int t = 0; t < NT; ++t) acc[t][m] = dpbusd_bcast(acc[t][m], wv[t], A + m * K + k0);
    }
  }
  const float* S = static_cast<const float*>(p.s);
#pragma GCC unroll 8
  for (int t = 0; t < NT; ++t) {
    const __m512 s = _mm512_loadu_ps(S + (tile0 + t) * 16);
#pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) {
      const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[t][m]), _mm512_mul_ps(s, _mm512_set1_ps(p.ascale[m0 + m])));
      store16_512(p, m0 + m, (tile0 + t) * 16, v);
    }
  }
}

template <bool INT8, int NT, int MT>
static inline void mk_512(const Problem& p, int64_t t, int64_t m0) {
  if constexpr (INT8)
    int8_mk_512<NT, MT>(p, t, m0);
  else
  {
    if (p.g == 32)
      int4_mk_512<NT, MT, 4>(p, t, m0);
    else
      int4_mk_512<NT, MT, 0>(p, t, m0);
  }
}

// Token chunk dispatch: a chunk of mt (1..8) tokens on tiles [t0, t1).
template <bool INT8>
static void run_chunk_512(const Problem& p, int64_t t0, int64_t t1, int64_t m0, int64_t mt) {
  int64_t t = t0;
  switch (mt) {
    case 1:
      for (; t + 4 <= t1; t += 4) mk_512<INT8, 4, 1>(p, t, m0);
      for (; t < t1; ++t) mk_512<INT8, 1, 1>(p, t, m0);
      break;
    case 2:
      for (; t + 2 <= t1; t += 2) mk_512<INT8, 2, 2>(p, t, m0);
      for (; t < t1; ++t) mk_512<INT8, 1, 2>(p, t, m0);
      break;
    case 3:
      for (; t + 2 <= t1; t += 2) mk_512<INT8, 2, 3>(p, t, m0);
      for (; t < t1; ++t) mk_512<INT8, 1, 3>(p, t, m0);
      break;
    case 4:
      for (; t + 2 <= t1; t += 2) mk_512<INT8, 2, 4>(p, t, m0);
      for (; t < t1; ++t) mk_512<INT8, 1, 4>(p, t, m0);
      break;
    case 5: for (; t < t1; ++t) mk_512<INT8, 1, 5>(p, t, m0); break;
    case 6: for (; t < t1; ++t) mk_512<INT8, 1, 6>(p, t, m0); break;
    case 7: for (; t < t1; ++t) mk_512<INT8, 1, 7>(p, t, m0); break;
    default:
      if constexpr (INT8) {
        for (; t + 2 <= t1; t += 2) mk_512<INT8, 2, 8>(p, t, m0);
      }
      for (; t < t1; ++t) mk_512<INT8, 1, 8>(p, t, m0);
      break;
  }
}

template <bool INT8>
static void worker_512(const Problem& p, int64_t t0, int64_t t1) {
  // Blocks of tiles whose weights (~256 KiB) stay in L2 while every token chunk passes over them.
  const int64_t tile_bytes = INT8 ? 16 * p.K : 8 * p.K;
  const int64_t tb = std::max<int64_t>(1, (int64_t(256) << 10) / tile_bytes);
  for (int64_t tt = t0; tt < t1; tt += tb) {
    const int64_t te = std::min(t1, tt + tb);
    for (int64_t m0 = 0; m0 < p.M; m0 += 8) run_chunk_512<INT8>(p, tt, te, m0, std::min<int64_t>(8, p.M - m0));
  }
}

// lt[m, j] = scale * x[m] . a[j] for the LoRA side path (decode-sized M; prefill uses at::mm)
static void lora_in_512(const Problem& p, const float* a, float scale, float* lt) {
  for (int64_t m = 0; m < p.M; ++m)
    for (int64_t j = 0; j < p.r; ++j) {
      __m512 acc = _mm512_setzero_ps();
      int64_t k = 0;
      for (; k + 16 <= p.K; k += 16) acc = _mm512_fmadd_ps(x16_512(p, m, k), _mm512_loadu_ps(a + j * p.K + k), acc);
      float sum = _mm512_reduce_add_ps(acc);
      for (; k < p.K; ++k) sum += load_x_scalar(p, m, k) * a[j * p.K + k];
      lt[m * p.r + j] = scale * sum;
    }
}

static void quant_all_512(const Problem& p, int64_t gsize) {
  if (p.M * p.K < (int64_t(1) << 18)) {  // a thread start costs more than this
    for (int64_t m = 0; m < p.M; ++m) quant_row_512(p, m, gsize);
  } else {
    at::parallel_for(0, p.M, 1, [&](int64_t b, int64_t e) {
      for (int64_t m = b; m < e; ++m) quant_row_512(p, m, gsize);
    });
  }
}

#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------
// AVX2 (maddubs + madd; no VNNI)
// ---------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx2,fma")

static inline __m256 x8_256(const Problem& p, int64_t m, int64_t k) {
  if (p.x_bf16) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p.x) + m * p.K + k));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  return _mm256_loadu_ps(static_cast<const float*>(p.x) + m * p.K + k);
}

static void quant_row_256(const Problem& p, int64_t m, int64_t gsize) {
  const int64_t K = p.K;
  const int64_t K8 = K & ~int64_t(7);
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 vmax = _mm256_setzero_ps();
  for (int64_t k = 0; k < K8; k += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(x8_256(p, m, k), absmask));
  alignas(32) float tmp[8];
  _mm256_store_ps(tmp, vmax);
  float amax = 0.f;
  for (float v : tmp) amax = std::max(amax, v);
  for (int64_t k = K8; k < K; ++k) amax = std::max(amax, std::fabs(load_x_scalar(p, m, k)));
  const float scale = finish_scale(amax);
  p.ascale[m] = scale;
  const __m256 vs = _mm256_set1_ps(scale);
  int8_t* q = p.qa + m * K;
  for (int64_t k = 0; k < K8; k += 8) {
    __m256i c = _mm256_cvtps_epi32(_mm256_div_ps(x8_256(p, m, k), vs));
    __m128i c16 = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    __m128i c8 = _mm_packs_epi16(c16, c16);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), c8);
  }
  for (int64_t k = K8; k < K; ++k) q[k] = quant_one(load_x_scalar(p, m, k), scale);
  const int64_t G = K / gsize;
  for (int64_t gi = 0; gi < G; ++gi) {
    int32_t sum = 0;
    for (int64_t k = gi * gsize; k < (gi + 1) * gsize; ++k) sum += q[k];
    p.gsum[m * G + gi] = sum;
  }
}

static inline void store16_256(const Problem& p, int64_t m, int64_t n0, __m256 v0, __m256 v1) {
  alignas(32) float tmp[16];
  _mm256_store_ps(tmp, v0);
  _mm256_store_ps(tmp + 8, v1);
  const int64_t valid = std::min<int64_t>(16, p.N - n0);
  for (int64_t i = 0; i < valid; ++i) {
    float v = tmp[i] + (p.bias ? p.bias[n0 + i] : 0.f);
    for (int64_t j = 0; j < (p.lt ? p.r : 0); ++j) v += p.lt[m * p.r + j] * p.lbt[j * p.N + n0 + i];
    if (p.out_bf16)
      static_cast<uint16_t*>(p.out)[m * p.N + n0 + i] = f32_to_bf16(v);
    else
      static_cast<float*>(p.out)[m * p.N + n0 + i] = v;
  }
}

static inline __m256 scales8_256(const Problem& p, int64_t tile, int64_t gi, int half) {
  const int64_t off = (tile * p.G + gi) * 16 + half * 8;
  if (p.s_bf16) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p.s) + off));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  return _mm256_loadu_ps(static_cast<const float*>(p.s) + off);
}

// One tile (two 8-row halves) x MT tokens. maddubs(u4 weight, s8 act) sums stay in int16 for up
// to 4 blocks of 8 input channels (|sum| <= 4 * 4 * 15 * 128 < 32768), then widen with madd.
template <int MT>
static inline void int4_mk_256(const Problem& p, int64_t tile, int64_t m0) {
  const int64_t K = p.K, G = p.G, g = p.g;
  const uint8_t* W = p.w + tile * K * 8;
  const int8_t* A = p.qa + m0 * K;
  const __m256i m4 = _mm256_set1_epi8(0x0f);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 facc[2][MT];
  for (int h = 0; h < 2; ++h)
    for (int m = 0; m < MT; ++m) facc[h][m] = _mm256_setzero_ps();
  for (int64_t gi = 0; gi < G; ++gi) {
    __m256i acc[2][MT];
    for (int m = 0; m < MT; ++m) acc[0][m] = acc[1][m] = _mm256_set1_epi32(-8 * p.gsum[(m0 + m) * G + gi]);
    for (int64_t kc = gi * g; kc < (gi + 1) * g; kc += 32) {
      const int64_t kend = std::min((gi + 1) * g, kc + 32);
      __m256i a16[2][MT];
      for (int m = 0; m < MT; ++m) a16[0][m] = a16[1][m] = _mm256_setzero_si256();
      for (int64_t k0 = kc; k0 < kend; k0 += 8) {
        for (int h = 0; h < 2; ++h) {
          const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(W + k0 * 8 + h * 32));
          const __m256i lo = _mm256_and_si256(wv, m4);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), m4);
          for (int m = 0; m < MT; ++m) {
            const __m256i a0 = _mm256_set1_epi32(load_i32(A + m * K + k0));
            const __m256i a1 = _mm256_set1_epi32(load_i32(A + m * K + k0 + 4));
            a16[h][m] = _mm256_add_epi16(a16[h][m], _mm256_add_epi16(_mm256_maddubs_epi16(lo, a0), _mm256_maddubs_epi16(hi, a1)));
          }
        }
      }
      for (int h = 0; h < 2; ++h)
        for (int m = 0; m < MT; ++m) acc[h][m] = _mm256_add_epi32(acc[h][m], _mm256_madd_epi16(a16[h][m], ones));
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 s = scales8_256(p, tile, gi, h);
      for (int m = 0; m < MT; ++m) facc[h][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[h][m]), s, facc[h][m]);
    }
  }
  for (int m = 0; m < MT; ++m) {
    const __m256 as = _mm256_set1_ps(p.ascale[m0 + m]);
    store16_256(p, m0 + m, tile * 16, _mm256_mul_ps(facc[0][m], as), _mm256_mul_ps(facc[1][m], as));
  }
}

// int8 on AVX2: undo the +128 storage offset and use |w| * sign(a, w) so maddubs cannot saturate
// (activation codes never reach -128: |x| <= amax and scale = amax / 127).
template <int MT>
static inline void int8_mk_256(const Problem& p, int64_t tile, int64_t m0) {
  const int64_t K = p.K;
  const uint8_t* W = p.w + tile * K * 16;
  const int8_t* A = p.qa + m0 * K;
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[2][MT];
  for (int h = 0; h < 2; ++h)
    for (int m = 0; m < MT; ++m) acc[h][m] = _mm256_setzero_si256();
  for (int64_t k0 = 0; k0 < K; k0 += 4) {
    for (int h = 0; h < 2; ++h) {
      const __m256i ws = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(W + k0 * 16 + h * 32)), flip);
      const __m256i wa = _mm256_abs_epi8(ws);
      for (int m = 0; m < MT; ++m) {
        const __m256i a = _mm256_sign_epi8(_mm256_set1_epi32(load_i32(A + m * K + k0)), ws);
        acc[h][m] = _mm256_add_epi32(acc[h][m], _mm256_madd_epi16(_mm256_maddubs_epi16(wa, a), ones));
      }
    }
  }
  const float* S = static_cast<const float*>(p.s) + tile * 16;
  for (int m = 0; m < MT; ++m) {
    const __m256 as = _mm256_set1_ps(p.ascale[m0 + m]);
    store16_256(p, m0 + m, tile * 16, _mm256_mul_ps(_mm256_cvtepi32_ps(acc[0][m]), _mm256_mul_ps(_mm256_loadu_ps(S), as)),
                _mm256_mul_ps(_mm256_cvtepi32_ps(acc[1][m]), _mm256_mul_ps(_mm256_loadu_ps(S + 8), as)));
  }
}

template <bool INT8>
static void worker_256(const Problem& p, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    int64_t m0 = 0;
    if constexpr (INT8) {
      for (; m0 + 2 <= p.M; m0 += 2) int8_mk_256<2>(p, t, m0);
      if (m0 < p.M) int8_mk_256<1>(p, t, m0);
    } else {
      for (; m0 + 2 <= p.M; m0 += 2) int4_mk_256<2>(p, t, m0);
      if (m0 < p.M) int4_mk_256<1>(p, t, m0);
    }
  }
}

static void lora_in_256(const Problem& p, const float* a, float scale, float* lt) {
  for (int64_t m = 0; m < p.M; ++m)
    for (int64_t j = 0; j < p.r; ++j) {
      __m256 acc = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k + 8 <= p.K; k += 8) acc = _mm256_fmadd_ps(x8_256(p, m, k), _mm256_loadu_ps(a + j * p.K + k), acc);
      alignas(32) float tmp[8];
      _mm256_store_ps(tmp, acc);
      float sum = ((tmp[0] + tmp[1]) + (tmp[2] + tmp[3])) + ((tmp[4] + tmp[5]) + (tmp[6] + tmp[7]));
      for (; k < p.K; ++k) sum += load_x_scalar(p, m, k) * a[j * p.K + k];
      lt[m * p.r + j] = scale * sum;
    }
}

// In place on one row y [m * p] (index a * p + b): Walsh–Hadamard butterflies over b (the same
// adds in the same order as quantkit.algorithms.hadamard, so for m = 1 the result is identical),
// then the dense base factor over a (z[a] = sum_c base[a, c] y[c], via `tmp`), then / sqrt(K).
static void hadamard_row(float* y, const float* base, int64_t m, int64_t p, float* tmp, float norm) {
  for (int64_t a = 0; a < m; ++a) {
    float* v = y + a * p;
    for (int64_t h = 1; h < p; h *= 2)
      for (int64_t i = 0; i < p; i += 2 * h)
        for (int64_t j = i; j < i + h; ++j) {  // vectorised by the compiler for h >= 8
          const float u = v[j], w = v[j + h];
          v[j] = u + w;
          v[j + h] = u - w;
        }
  }
  if (m > 1) {
    for (int64_t i = 0; i < m * p; ++i) tmp[i] = 0.f;
    for (int64_t a = 0; a < m; ++a)
      for (int64_t c = 0; c < m; ++c) {
        const float bac = base[a * m + c];
        for (int64_t b = 0; b < p; ++b) tmp[a * p + b] += bac * y[c * p + b];
      }
    for (int64_t i = 0; i < m * p; ++i) y[i] = tmp[i];
  }
  for (int64_t i = 0; i < m * p; ++i) y[i] = y[i] / norm;
}

// Streams [p, p + n) once (n a multiple of 128): four independent 32-byte load chains, OR-folded
// so that the loads cannot be optimised away. What the kernels do with their weights, minus the math.
static uint64_t read_stream_256(const uint8_t* p, int64_t n) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t i = 0; i < n; i += 128) {
    a0 = _mm256_or_si256(a0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
    a1 = _mm256_or_si256(a1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
    a2 = _mm256_or_si256(a2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 64)));
    a3 = _mm256_or_si256(a3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 96)));
  }
  __m256i a = _mm256_or_si256(_mm256_or_si256(a0, a1), _mm256_or_si256(a2, a3));
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), a);
  return lanes[0] | lanes[1] | lanes[2] | lanes[3];
}

static void quant_all_256(const Problem& p, int64_t gsize) {
  at::parallel_for(0, p.M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) quant_row_256(p, m, gsize);
  });
}

#pragma GCC pop_options

// ---------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------

static int64_t pick_isa(int64_t requested) {
  const int64_t have = cpu_isa();
  const int64_t isa = requested < 0 ? have : std::min(requested, have);
  TORCH_CHECK(isa >= ISA_AVX2, "quantkit cpu kernel: this CPU lacks AVX2/FMA");
  return isa;
}

template <bool INT8>
static at::Tensor run(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& s, int64_t n, int64_t group_size,
                      const std::optional<at::Tensor>& bias, int64_t isa_req,
                      const std::optional<at::Tensor>& lora_a = std::nullopt,
                      const std::optional<at::Tensor>& lora_bt = std::nullopt, double lora_scale = 1.0) {
  const int64_t isa = pick_isa(isa_req);
  TORCH_CHECK(x_in.device().is_cpu() && w.device().is_cpu() && s.device().is_cpu(), "quantkit cpu kernel: CPU tensors only");
  TORCH_CHECK(x_in.dim() >= 1, "x must have at least one dimension");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous(), "repacked weight must be contiguous uint8");
  TORCH_CHECK(s.is_contiguous(), "repacked scales must be contiguous");
  const int64_t K = x_in.size(-1);
  const int64_t tiles = (n + 15) / 16;
  TORCH_CHECK(n >= 1, "n must be positive");
  if (INT8) {
    TORCH_CHECK(K % 4 == 0, "int8 kernel needs K % 4 == 0");
    TORCH_CHECK(w.numel() == tiles * 16 * K, "repacked int8 weight has the wrong size");
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.numel() == tiles * 16, "repacked int8 scales: float32 [tiles*16]");
  } else {
    TORCH_CHECK(group_size > 0 && group_size % 8 == 0 && K % group_size == 0, "int4 kernel needs group_size % 8 == 0 and K % group_size == 0");
    TORCH_CHECK(w.numel() == tiles * 8 * K, "repacked int4 weight has the wrong size");
    TORCH_CHECK((s.scalar_type() == at::kFloat || s.scalar_type() == at::kBFloat16) && s.numel() == tiles * 16 * (K / group_size),
                "repacked int4 scales: float32/bfloat16 [tiles, K/g, 16]");
  }
  at::Tensor bias_f;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == n, "bias must have n elements");
    bias_f = bias->to(at::kFloat).contiguous();
  }
  const bool has_lora = lora_a.has_value() && lora_a->defined();
  TORCH_CHECK(has_lora == (lora_bt.has_value() && lora_bt->defined()), "lora_a and lora_bt go together");
  int64_t rank = 0;
  if (has_lora) {
    rank = lora_a->size(0);
    TORCH_CHECK(lora_a->scalar_type() == at::kFloat && lora_a->is_contiguous() && lora_a->dim() == 2 &&
                    lora_a->size(1) == K && rank >= 1,
                "lora_a must be contiguous float32 [r, K]");
    TORCH_CHECK(lora_bt->scalar_type() == at::kFloat && lora_bt->is_contiguous() && lora_bt->dim() == 2 &&
                    lora_bt->size(0) == rank && lora_bt->size(1) == n,
                "lora_bt must be contiguous float32 [r, n]");
  }
  at::Tensor x = x_in.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0);
  std::vector<int64_t> out_shape(x_in.sizes().begin(), x_in.sizes().end());
  out_shape.back() = n;
  at::Tensor out = at::empty(out_shape, x_in.options());
  if (M == 0) return out;

  const int64_t gsize = INT8 ? K : group_size;
  const int64_t G = K / gsize;
  at::Tensor qa = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor ascale = at::empty({M}, x.options().dtype(at::kFloat));
  at::Tensor gsum = at::empty({M, G}, x.options().dtype(at::kInt));

  Problem p;
  p.M = M;
  p.K = K;
  p.N = n;
  p.G = G;
  p.g = gsize;
  p.x = x.data_ptr();
  p.x_bf16 = x.scalar_type() == at::kBFloat16;
  p.qa = qa.data_ptr<int8_t>();
  p.ascale = ascale.data_ptr<float>();
  p.gsum = gsum.data_ptr<int32_t>();
  p.w = w.data_ptr<uint8_t>();
  p.s = s.data_ptr();
  p.s_bf16 = s.scalar_type() == at::kBFloat16;
  p.bias = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.out_bf16 = out.scalar_type() == at::kBFloat16;
  at::Tensor lt;
  if (has_lora) {
    p.r = rank;
    p.lbt = lora_bt->data_ptr<float>();
    if (M >= 8) {  // prefill: a real GEMM; decode: the fused dot products below, no extra dispatch
      lt = at::mm(x.to(at::kFloat), lora_a->t()).mul_(lora_scale).contiguous();
    } else {
      lt = at::empty({M, rank}, x.options().dtype(at::kFloat));
      if (isa == ISA_AVX512_VNNI)
        lora_in_512(p, lora_a->data_ptr<float>(), static_cast<float>(lora_scale), lt.data_ptr<float>());
      else
        lora_in_256(p, lora_a->data_ptr<float>(), static_cast<float>(lora_scale), lt.data_ptr<float>());
    }
    p.lt = lt.data_ptr<float>();
  }

  // Threads split the output tiles; a decode call (tiny M) parallelises over tiles only.
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t bytes_per_tile = INT8 ? 16 * K : 8 * K;
  // enough work per task that a thread start (~few us) is amortised: >= 64 KiB of weights
  int64_t grain = std::max<int64_t>(1, (int64_t(64) << 10) / (bytes_per_tile * std::max<int64_t>(1, std::min<int64_t>(M, 8))));
  grain = std::min(grain, std::max<int64_t>(1, tiles / nthreads));
  if (isa == ISA_AVX512_VNNI) {
    quant_all_512(p, gsize);
    at::parallel_for(0, tiles, grain, [&](int64_t b, int64_t e) { worker_512<INT8>(p, b, e); });
  } else {
    quant_all_256(p, gsize);
    at::parallel_for(0, tiles, grain, [&](int64_t b, int64_t e) { worker_256<INT8>(p, b, e); });
  }
  return out;
}

static at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, int64_t n, int64_t group_size,
                              const std::optional<at::Tensor>& bias, int64_t isa, const std::optional<at::Tensor>& lora_a,
                              const std::optional<at::Tensor>& lora_bt, double lora_scale) {
  return run<false>(x, w, s, n, group_size, bias, isa, lora_a, lora_bt, lora_scale);
}

static at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, int64_t n,
                              const std::optional<at::Tensor>& bias, int64_t isa) {
  return run<true>(x, w, s, n, 0, bias, isa);
}

// x [..., K] -> x H^T / sqrt(K) with H = base ⊗ H_p (Sylvester, p = K / m a power of two);
// `base` is float32 [m, m], or empty for m = 1. Math in float32, result in x's dtype.
static at::Tensor hadamard_transform(const at::Tensor& x_in, const at::Tensor& base) {
  pick_isa(-1);  // the butterflies are compiled for AVX2
  TORCH_CHECK(x_in.device().is_cpu() && base.device().is_cpu(), "quantkit cpu kernel: CPU tensors only");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) >= 1, "x must have a last dimension");
  const int64_t K = x_in.size(-1);
  const int64_t m = base.numel() == 0 ? 1 : base.size(0);
  TORCH_CHECK(base.numel() == 0 || (base.scalar_type() == at::kFloat && base.is_contiguous() && base.dim() == 2 &&
                                    base.size(1) == m),
              "base must be a contiguous float32 [m, m] (or empty)");
  TORCH_CHECK(K % m == 0 && ((K / m) & (K / m - 1)) == 0, "K / m must be a power of two");
  const int64_t p = K / m;
  at::Tensor y = at::empty({x_in.numel() / K, K}, x_in.options().dtype(at::kFloat));
  y.copy_(x_in.reshape({-1, K}));
  const int64_t M = y.size(0);
  const float norm = static_cast<float>(std::sqrt(static_cast<double>(K)));
  float* Y = y.data_ptr<float>();
  const float* B = m > 1 ? base.data_ptr<float>() : nullptr;
  auto rows = [&](int64_t b, int64_t e) {
    std::vector<float> tmp(m > 1 ? K : 0);
    for (int64_t r = b; r < e; ++r) hadamard_row(Y + r * K, B, m, p, tmp.data(), norm);
  };
  if (M * K < (int64_t(1) << 16))  // decode: a thread start costs more than the transform
    rows(0, M);
  else
    at::parallel_for(0, M, 1, rows);
  return y.to(x_in.scalar_type()).reshape(x_in.sizes());
}

// DRAM read-bandwidth probe for `quantkit bench kernel`: every thread streams its share of `buf`
// (uint8, numel a multiple of 128). Returns the OR of all bytes (a checksum nobody can skip).
static int64_t read_bandwidth_probe(const at::Tensor& buf) {
  pick_isa(-1);
  TORCH_CHECK(buf.device().is_cpu() && buf.scalar_type() == at::kByte && buf.is_contiguous() && buf.numel() % 128 == 0,
              "buf must be a contiguous CPU uint8 tensor whose size is a multiple of 128");
  const uint8_t* p = buf.data_ptr<uint8_t>();
  const int64_t blocks = buf.numel() / 128;
  std::vector<uint64_t> partial(std::max<int64_t>(1, at::get_num_threads()), 0);
  at::parallel_for(0, blocks, 1 << 12, [&](int64_t b, int64_t e) {
    partial[at::get_thread_num()] |= read_stream_256(p + b * 128, (e - b) * 128);
  });
  uint64_t all = 0;
  for (uint64_t v : partial) all |= v;
  all |= all >> 32;  // fold the 8 bytes of the lane into one
  all |= all >> 16;
  all |= all >> 8;
  return static_cast<int64_t>(all & 0xff);
}

// Debug/testing helper: the activation codes and scales exactly as the kernels compute them.
static std::tuple<at::Tensor, at::Tensor> quantize_activations(const at::Tensor& x_in, int64_t isa_req) {
  const int64_t isa = pick_isa(isa_req);
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  const int64_t K = x_in.size(-1);
  at::Tensor x = x_in.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0);
  at::Tensor qa = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor ascale = at::empty({M}, x.options().dtype(at::kFloat));
  at::Tensor gsum = at::empty({M, 1}, x.options().dtype(at::kInt));
  Problem p{};
  p.M = M;
  p.K = K;
  p.x = x.data_ptr();
  p.x_bf16 = x.scalar_type() == at::kBFloat16;
  p.qa = qa.data_ptr<int8_t>();
  p.ascale = ascale.data_ptr<float>();
  p.gsum = gsum.data_ptr<int32_t>();
  if (M > 0 && K > 0) {
    if (isa == ISA_AVX512_VNNI)
      quant_all_512(p, K);
    else
      quant_all_256(p, K);
  }
  return {qa, ascale};
}

}  // namespace quantkit_cpu

TORCH_LIBRARY_FRAGMENT(quantkit, m) {
  m.def("cpu_isa() -> int", [] { return quantkit_cpu::cpu_isa(); });
  m.def("int4_linear_packed(Tensor x, Tensor w, Tensor s, int n, int group_size, Tensor? bias=None, int isa=-1, "
        "Tensor? lora_a=None, Tensor? lora_bt=None, float lora_scale=1.0) -> Tensor");
  m.def("int8_linear_packed(Tensor x, Tensor w, Tensor s, int n, Tensor? bias=None, int isa=-1) -> Tensor");
  m.def("quantize_activations_int8(Tensor x, int isa=-1) -> (Tensor, Tensor)");
  m.def("hadamard_transform(Tensor x, Tensor base) -> Tensor");
  m.def("read_bandwidth_probe(Tensor buf) -> int");
}

TORCH_LIBRARY_IMPL(quantkit, CPU, m) {
  m.impl("int4_linear_packed", &quantkit_cpu::int4_linear);
  m.impl("int8_linear_packed", &quantkit_cpu::int8_linear);
  m.impl("quantize_activations_int8", &quantkit_cpu::quantize_activations);
  m.impl("hadamard_transform", &quantkit_cpu::hadamard_transform);
  m.impl("read_bandwidth_probe", &quantkit_cpu::read_bandwidth_probe);
}
