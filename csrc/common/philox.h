// Philox4x32-10 counter-based generator and the Box-Muller mapping to standard normals, shared by the CPU
// (g++) and CUDA (nvcc / NVRTC) kernels; triton_kernels/fused_step.py and pydiffmed/ops/reference.py
// implement the same mapping.
//
//   words = Philox4x32-10(key = (seed lo, seed hi), counter = (block lo, block hi, step, 0)), block = i / 4
//   u     = ((w >> 9) + 1/2) * 2^-23          odd multiples of 2^-24: exact in fp32, strictly inside (0, 1)
//   (z0, z1) = r (cos θ, sin θ) with r = sqrt(-2 ln u0), θ = 2π u1;  (z2, z3) the same from (u2, u3)
//
// log, sin and cos are evaluated here in fp32 with basic arithmetic only (no libm, no intrinsics whose
// accuracy differs between targets), so the loops vectorise on the CPU and every backend computes the same
// values up to rounding (~1 ulp of z). Accuracy against the float64 formula: <= ~1.5 ulp of z.
#pragma once

#include "pdm_common.h"

namespace pdm {

constexpr pdm_u32 kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr pdm_u32 kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

PDM_HD void mulhilo32(pdm_u32 a, pdm_u32 b, pdm_u32& hi, pdm_u32& lo) {
#if defined(PDM_CUDA)
    hi = __umulhi(a, b);
    lo = a * b;
#else
    pdm_u64 p = (pdm_u64)a * (pdm_u64)b;
    hi = (pdm_u32)(p >> 32);
    lo = (pdm_u32)p;
#endif
}

// Ten rounds in place on the counter words; the key is bumped before every round but the first.
PDM_HD void philox4x32_10(pdm_u32& c0, pdm_u32& c1, pdm_u32& c2, pdm_u32& c3, pdm_u32 k0, pdm_u32 k1) {
#if defined(PDM_CUDA)
#pragma unroll
#endif
    for (int round = 0; round < 10; ++round) {
        if (round) {
            k0 += kPhiloxW0;
            k1 += kPhiloxW1;
        }
        pdm_u32 hi0, lo0, hi1, lo1;
        mulhilo32(kPhiloxM0, c0, hi0, lo0);
        mulhilo32(kPhiloxM1, c2, hi1, lo1);
        pdm_u32 n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c0 = n0;
        c1 = lo1;
        c2 = n2;
        c3 = lo0;
    }
}

PDM_HD float philox_div(float a, float b) {
#if defined(PDM_CUDA)
    return __fdiv_rn(a, b);  // IEEE division even under --use_fast_math
#else
    return a / b;
#endif
}

PDM_HD float philox_sqrt(float a) {
#if defined(PDM_CUDA)
    return __fsqrt_rn(a);
#else
    return std::sqrt(a);
#endif
}

// The polynomial constants below are exact fp32 values (written with enough digits to round-trip), so the
// Python implementations can use the same numbers.
// u = ((w >> 9) + 1/2) * 2^-23 in (0, 1).
PDM_HD float philox_uniform(pdm_u32 w) { return ((float)(w >> 9) + 0.5f) * 1.1920928955078125e-07f; }

// -2 ln(u) for a positive normal fp32 u: u = 2^k m with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh(s),
// s = (m-1)/(m+1), |s| <= 0.1716; the odd series to s^9 is accurate to 2e-9 relative.
PDM_HD float neg_two_log(float u) {
    pdm_u32 ix = f32_bits(u) - 0x3f3504f3u;                   // 0x3f3504f3 = sqrt(1/2)
    int k = ((int)ix) >> 23;                                   // arithmetic shift: k < 0 below sqrt(1/2)
    float m = bits_f32((ix & 0x007fffffu) + 0x3f3504f3u);
    float f = m - 1.0f;
    float s = philox_div(f, 2.0f + f);
    float z = s * s;
    float p = 0.2222222238779068f;                             // 2/9
    p = p * z + 0.2857142984867096f;                           // 2/7
    p = p * z + 0.4000000059604645f;                           // 2/5
    p = p * z + 0.6666666865348816f;                           // 2/3
    p = p * z + 2.0f;
    float ln_m = s * p;
    float kf = (float)k;
    float ln_u = kf * 0.693145751953125f + (kf * 1.428606765330187e-06f + ln_m);  // ln 2 = hi + lo
    return -2.0f * ln_u;
}

// cos and sin of 2π u for u = ((w >> 9) + 1/2) 2^-23: with v = 4u = odd·2^-22, the quadrant q = round(v)
// and the remainder t = v - q in (-1/2, 1/2) are computed exactly in integers; then φ = (π/2) t and
// sin φ = t (π/2 + t² S(t²)), cos φ = 1 + t² C(t²) (Taylor, truncation < 2e-10).
PDM_HD void philox_cos_sin(pdm_u32 w, float& c, float& s) {
    int odd = (int)(((w >> 9) << 1) | 1u);                     // 24-bit odd integer, u = odd 2^-24
    int q = (odd + (1 << 21)) >> 22;                           // 0..4
    float t = (float)(odd - (q << 22)) * 2.384185791015625e-07f;  // 2^-22
    float t2 = t * t;
    float sp = 0.00016044118092395365f;
    sp = sp * t2 - 0.004681753925979137f;
    sp = sp * t2 + 0.07969262450933456f;
    sp = sp * t2 - 0.6459640860557556f;
    float sin_phi = t * 1.5707963705062866f + (t * -4.371138828673793e-08f + (t * t2) * sp);  // π/2 = hi + lo
    float cp = -2.520204179745633e-05f;
    cp = cp * t2 + 0.0009192602592520416f;
    cp = cp * t2 - 0.020863480865955353f;
    cp = cp * t2 + 0.25366950035095215f;
    cp = cp * t2 - 1.2337005138397217f;
    float cos_phi = cp * t2 + 1.0f;
    int quadrant = q & 3;
    float c0 = (quadrant & 1) ? sin_phi : cos_phi;
    float s0 = (quadrant & 1) ? cos_phi : sin_phi;
    c = (quadrant == 1 || quadrant == 2) ? -c0 : c0;
    s = (quadrant >= 2) ? -s0 : s0;
}

// Two standard normals from two Philox words (the first sets the radius, the second the angle).
PDM_HD void box_muller(pdm_u32 w_radius, pdm_u32 w_angle, float& z0, float& z1) {
    float r = philox_sqrt(neg_two_log(philox_uniform(w_radius)));
    float c, s;
    philox_cos_sin(w_angle, c, s);
    z0 = r * c;
    z1 = r * s;
}

// The four normals of Philox block `block` (elements 4·block .. 4·block+3 of a sample).
PDM_HD void philox_normal4(pdm_u64 seed, pdm_u32 step, pdm_u64 block, float& z0, float& z1, float& z2,
                           float& z3) {
    pdm_u32 c0 = (pdm_u32)block, c1 = (pdm_u32)(block >> 32), c2 = step, c3 = 0u;
    philox4x32_10(c0, c1, c2, c3, (pdm_u32)seed, (pdm_u32)(seed >> 32));
    box_muller(c0, c1, z0, z1);
    box_muller(c2, c3, z2, z3);
}

}  // namespace pdm
