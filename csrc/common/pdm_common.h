// Header-only helpers shared by the CPU (C++) and CUDA (NVRTC) kernels. No torch, no std headers that NVRTC
// lacks: everything here must compile both with g++ and with nvcc/NVRTC.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define PDM_HD __host__ __device__ __forceinline__
// PDM_CUDA marks device code (NVRTC, or nvcc's device pass), where the CUDA intrinsics exist; nvcc's host pass
// of a PDM_HD function takes the portable std:: path instead.
#if defined(__CUDACC_RTC__) || defined(__CUDA_ARCH__)
#define PDM_CUDA 1
#else
#include <cmath>
#include <cstring>
#endif
typedef unsigned int pdm_u32;
typedef unsigned short pdm_u16;
typedef unsigned long long pdm_u64;
#else
#include <cmath>
#include <cstdint>
#include <cstring>
#define PDM_HD inline __attribute__((always_inline))  // into the ISA clones that call it, where its loops vectorise
typedef uint32_t pdm_u32;
typedef uint16_t pdm_u16;
typedef uint64_t pdm_u64;
#endif

namespace pdm {

// Data type codes passed from Python (pydiffmed/backends.py DTYPE_CODES).
enum DType { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

PDM_HD pdm_u32 f32_bits(float f) {
#if defined(PDM_CUDA)
    return __float_as_uint(f);
#else
    pdm_u32 u;
    std::memcpy(&u, &f, 4);
    return u;
#endif
}

PDM_HD float bits_f32(pdm_u32 u) {
#if defined(PDM_CUDA)
    return __uint_as_float(u);
#else
    float f;
    std::memcpy(&f, &u, 4);
    return f;
#endif
}

PDM_HD float bf16_to_f32(pdm_u16 h) { return bits_f32(((pdm_u32)h) << 16); }

// Round to nearest even; NaN stays NaN (quiet bit forced).
PDM_HD pdm_u16 f32_to_bf16(float f) {
    pdm_u32 u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (pdm_u16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (pdm_u16)(u >> 16);
}

PDM_HD float f16_to_f32(pdm_u16 h) {
    pdm_u32 sign = ((pdm_u32)(h & 0x8000u)) << 16;
    pdm_u32 exp = (h >> 10) & 0x1fu;
    pdm_u32 man = h & 0x3ffu;
    if (exp == 0x1fu) return bits_f32(sign | 0x7f800000u | (man << 13));  // inf / nan
    if (exp == 0) {
        // zero or subnormal: value = man * 2^-24
        float v = (float)man * 5.9604644775390625e-08f;
        return sign ? -v : v;
    }
    return bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

// Round to nearest even, overflow to inf, subnormals handled.
PDM_HD pdm_u16 f32_to_f16(float f) {
    pdm_u32 u = f32_bits(f);
    pdm_u32 sign = (u >> 16) & 0x8000u;
    pdm_u32 a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (pdm_u16)(sign | 0x7e00u);          // nan
    if (a >= 0x477ff000u) return (pdm_u16)(sign | 0x7c00u);         // >= 65520 rounds to inf
    if (a < 0x38800000u) {                                           // below 2^-14: subnormal or zero
        // value / 2^-24, rounded to nearest even (float arithmetic is exact enough here)
        float v = bits_f32(a) * 16777216.0f;
        pdm_u32 m = (pdm_u32)v;
        float rem = v - (float)m;
        if (rem > 0.5f || (rem == 0.5f && (m & 1u))) m += 1u;
        return (pdm_u16)(sign | m);
    }
    pdm_u32 r = a + 0xfffu + ((a >> 13) & 1u);                      // round mantissa to 10 bits
    return (pdm_u16)(sign | ((r - 0x38000000u) >> 13));
}

template <int D> struct Convert;
template <> struct Convert<kFloat32> {
    typedef float T;
    static PDM_HD float load(T v) { return v; }
    static PDM_HD T store(float v) { return v; }
};
template <> struct Convert<kFloat16> {
    typedef pdm_u16 T;
    static PDM_HD float load(T v) { return f16_to_f32(v); }
    static PDM_HD T store(float v) { return f32_to_f16(v); }
};
template <> struct Convert<kBFloat16> {
    typedef pdm_u16 T;
    static PDM_HD float load(T v) { return bf16_to_f32(v); }
    static PDM_HD T store(float v) { return f32_to_bf16(v); }
};

// exp(x) in fp32 without libm: x = i·ln2 + r with i the nearest integer (ln2 split in two for an exact
// product), e^r by its degree-7 Taylor polynomial on |r| <= ln2/2. Branch-free so loops over it vectorise.
PDM_HD float fast_exp(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    int i = (int)(x * 1.44269504088896341f + 200.5f) - 200;
    float fi = (float)i;
    float r = x - fi * 0.693145751953125f;
    r = r - fi * 1.428606765330187e-06f;
    float p = 1.984126984e-04f;
    p = p * r + 1.388888889e-03f;
    p = p * r + 8.333333333e-03f;
    p = p * r + 4.166666667e-02f;
    p = p * r + 1.666666667e-01f;
    p = p * r + 5.000000000e-01f;
    p = p * r + 1.000000000e+00f;
    p = p * r + 1.000000000e+00f;
    return p * bits_f32((pdm_u32)(i + 127) << 23);
}

PDM_HD float silu(float x) { return x / (1.0f + fast_exp(-x)); }

}  // namespace pdm
