// AVX-512 pieces shared by the CPU kernels: the target attribute, the run-time check, and an exp2 made of
// vreduceps, a short polynomial and vscalefps (no libm, no table).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 headers initialise _mm512_undefined_ps() from itself (GCC bug 105593), which -Wall reports as
// "'__Y' is used uninitialized" at every inlined intrinsic: hundreds of false warnings that would bury real ones.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#define PDM_HAVE_AVX512_PATH 1
#define PDM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

namespace pdm_cpu {

// AVX-512 F/BW/VL/DQ and BF16: Cooper Lake, Sapphire Rapids, Zen 4 and later.
inline bool avx512_bf16_supported() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bf16");
}

// 2^(u - 1/2), lane by lane. With g = u - floor(u) in [0, 1) (one vreduceps), 2^(u - 1/2) = 2^(g - 1/2) *
// 2^floor(u): the first factor by a polynomial in g, the second by vscalefps(p, u), which scales by 2^floor(u) and
// gives exact 0 and inf at the ends of the range. The polynomials are minimax fits of 2^(g - 1/2) on [0, 1]:
// relative error 1.9e-7 at degree 5 (fp32 results), 2.7e-6 at degree 4 (fp16), 7.5e-5 at degree 3 (bf16), each
// below half an ulp of the result, with fp32 Horner rounding. u must not be ±inf (vreduceps gives NaN there).
template <int degree>
PDM_AVX512 inline __m512 exp2_minus_half(__m512 u) {
    static_assert(degree >= 3 && degree <= 5, "fits exist for degrees 3 to 5");
    static const float coef5[6] = {7.071067095e-01f, 4.901332259e-01f, 1.698142439e-01f,
                                   3.947516903e-02f, 6.356423255e-03f, 1.327647129e-03f};
    static const float coef4[5] = {7.071086168e-01f, 4.900276959e-01f, 1.707258075e-01f, 3.677765653e-02f,
                                   9.570101276e-03f};
    static const float coef3[4] = {7.070538998e-01f, 4.920286238e-01f, 1.598536223e-01f, 5.517166853e-02f};
    const float* coef = degree == 5 ? coef5 : (degree == 4 ? coef4 : coef3);
    const __m512 g = _mm512_reduce_ps(u, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 p = _mm512_set1_ps(coef[degree]);
    for (int k = degree - 1; k >= 0; --k) p = _mm512_fmadd_ps(p, g, _mm512_set1_ps(coef[k]));
    return _mm512_scalef_ps(p, u);
}

}  // namespace pdm_cpu
#endif
