// CPU GroupNorm: y = act(GN(x + bias_nc) * weight + bias) for x in NCS (channels first, S = D*H*W) or
// channels-last (N, S, C) memory order, y independently in either (the token-major N x S x C output is the
// channels-last order). Math shared with CUDA lives in csrc/common/group_norm.h.
//
// One OpenMP region, three phases, the same task split (thread_share) in phases 1 and 3 so a thread re-reads the
// data it read itself, and phase 3 runs through its share backwards, so the part read last (still in cache, all of
// it when the problem is small) is re-read first:
//   1. stats: tasks are (n, chunk); a chunk (kChunkElems or kClChunkElems values) stays in L1/L2 between its
//      mean pass and its centred m2 pass. NCS chunks lie inside one channel; channels-last chunks are blocks of
//      rows, with per-channel accumulators merged into per-group partials before they are stored.
//   2. merge: per (n, group), Chan's formula over its partials (in double), then per-channel parameters.
//   3. apply: y = (x - center) * scale + shift (+ SiLU), loops vectorised along the contiguous axis.
// x is read from memory twice (phases 1 and 3) and y written once. On the AVX-512 path a y of at least
// stream_min_bytes is written with streaming stores, which skip the read of each line that a plain store does
// first (write-allocate): 3 line transfers per element instead of 4; and each apply task prefetches the x of the
// thread's next task into L2, so memory reads overlap the arithmetic.
//
// Two implementations of the hot loops, picked at run time:
//   * Avx512: intrinsics, on CPUs with AVX-512 F/BW/VL/DQ and BF16 (Cooper Lake, Sapphire Rapids, Zen 4 and
//     later). The kernel is compute-bound there for 16-bit data, so it uses the hardware fp16/bf16 conversions,
//     an exp built on vreduceps and vscalefps, and a division (fp32) or rcp14 (16-bit) for the reciprocal.
//   * Generic: plain loops the compiler vectorises, compiled for AVX-512, AVX2 and baseline x86-64 (GCC
//     target_clones, resolved at load time); pdm::silu and pdm::Convert as in the CUDA code.
#include <pybind11/pybind11.h>
#include <omp.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "common/group_norm.h"
#include "cpu/avx512_exp.h"

namespace py = pybind11;

// GCC's partial redundancy elimination turns pdm::fast_exp's clamp into a branch that stops every loop calling
// pdm::silu from vectorising ("control flow in loop"); without it they vectorise.
#pragma GCC optimize("no-tree-pre")

namespace pdm_gn_cpu {

using pdm::MeanM2;

// Values per NCS statistics/apply chunk: 32 KB of fp32, so the second (centred) pass over a chunk hits L1.
constexpr int64_t kChunkElems = 8192;
// Values per channels-last chunk (a block of rows). Larger than the NCS chunks: each one ends with a per-channel
// and per-group merge, and on the development machine 32768 ran 5-15 % faster than 8192 (16384 to 65536 alike).
constexpr int64_t kClChunkElems = 32768;
// At least this many channels-last chunks per sample, so that small volumes still spread over the threads. The
// chunking depends on S and C only: a sample's result is the same, bit for bit, alone or in a batch, and on any
// number of threads.
constexpr int64_t kMinClChunksPerSample = 16;
// Tiles of the transposing apply (NCS <-> channels-last): kTileC channels x kTileS spatial positions.
constexpr int64_t kTileC = 16;
constexpr int64_t kTileS = 64;
// Below this many elements per thread, threads cost more than they save.
constexpr int64_t kMinElemsPerThread = 16384;
// NCS groups up to this size are normalised by one thread start to finish, so the apply pass reads the group
// from L2 instead of memory (x is read from memory once instead of twice).
constexpr int64_t kGroupResidentBytes = 1 << 20;
// From this many bytes of y on, the AVX-512 apply writes y with streaming stores (see stream_y_ok): a plain
// store first reads the line it writes (write-allocate), which turns the apply's one write of y into a read and a
// write, and streaming skips that read. It pays once x and y no longer fit in the last-level cache; below, plain
// stores are faster (they leave y in cache; the write-allocate reads hit). Measured on the development machine
// (2 cores of a large-L3 Xeon VM, fp32): streaming 7-25 % slower up to 16 MiB of y, 5-45 % faster from 20 MiB;
// for bf16 (compute-bound there) within noise. Settable (group_norm_set_stream_min_bytes) for tests.
constexpr int64_t kStreamMinBytesDefault = 16 << 20;
int64_t stream_min_bytes = kStreamMinBytesDefault;

// Per-(sample, channel) apply parameters: y = (x - center) * scale + shift. From pdm::GNChannel with center_lo
// folded into the shift (shift - center_lo * scale), one array each so that channel loops vectorise.
struct ChannelParams {
    const float *center, *scale, *shift;
    ChannelParams at(int64_t i) const { return {center + i, scale + i, shift + i}; }
};

// =============================================================================================================
// Generic loops
// =============================================================================================================

// fp16 <-> fp32 with the same results as pdm::f16_to_f32 / pdm::f32_to_f16 for every input (checked
// exhaustively), but written as selects instead of branches so that loops over them vectorise.
inline float half_to_float(pdm_u16 h) {
    const pdm_u32 sign = ((pdm_u32)h & 0x8000u) << 16;
    const pdm_u32 o = ((pdm_u32)h & 0x7fffu) << 13;  // exponent and mantissa in float position
    const pdm_u32 exp = o & 0x0f800000u;
    const pdm_u32 normal = o + 0x38000000u;   // rebias exponent 15 -> 127
    const pdm_u32 inf_nan = o + 0x70000000u;  // exponent 31 -> 255
    // subnormal: o has exponent 0; give it exponent 113 (2^-14) and subtract the implicit leading one
    const pdm_u32 subnormal = pdm::f32_bits(pdm::bits_f32(o + 0x38800000u) - pdm::bits_f32(0x38800000u));
    const pdm_u32 r = exp == 0x0f800000u ? inf_nan : (exp == 0u ? subnormal : normal);
    return pdm::bits_f32(r | sign);
}

inline pdm_u16 float_to_half(float value) {
    pdm_u32 f = pdm::f32_bits(value);
    const pdm_u32 sign = (f >> 16) & 0x8000u;
    f &= 0x7fffffffu;
    const pdm_u32 inf_nan = f > 0x7f800000u ? 0x7e00u : 0x7c00u;  // at or above 2^16: inf, NaN stays NaN
    // below 2^-14: adding 0.5f (ulp 2^-24, the fp16 subnormal step) rounds to nearest even in hardware
    const pdm_u32 subnormal = pdm::f32_bits(pdm::bits_f32(f) + 0.5f) - 0x3f000000u;
    // rebias exponent 127 -> 15, round the mantissa to 10 bits (nearest even); a carry into 31 gives inf
    const pdm_u32 normal = (f + 0xc8000fffu + ((f >> 13) & 1u)) >> 13;
    const pdm_u32 r = f >= 0x47800000u ? inf_nan : (f < 0x38800000u ? subnormal : normal);
    return (pdm_u16)(r | sign);
}

// Element load/store for the generic loops: pdm::Convert, except fp16 uses the vectorisable forms above.
template <int D>
struct IO : pdm::Convert<D> {};
template <>
struct IO<pdm::kFloat16> {
    typedef pdm_u16 T;
    static float load(T v) { return half_to_float(v); }
    static T store(float v) { return float_to_half(v); }
};

#if defined(PDM_HAVE_AVX512_PATH)
#define PDM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PDM_CLONES
#endif

template <bool SILU>
inline float apply_one(float v, float center, float scale, float shift) {
    const float y = (v - center) * scale + shift;
    return SILU ? pdm::silu(y) : y;
}

// Mean (relative to the pivot x[0]) and centred m2 of len contiguous values: one chunk of one channel.
// Lanes of the generic reductions: several vectors' worth, so that the compiler keeps several independent
// addition chains (one chain is latency-bound).
constexpr int kSumLanes = 64;

template <int D>
PDM_CLONES void generic_span_mean_m2(const typename IO<D>::T* __restrict x, int64_t len, MeanM2<double>* out) {
    const float pivot = IO<D>::load(x[0]);
    const int64_t body = len / kSumLanes * kSumLanes;
    float acc[kSumLanes] = {};
    for (int64_t i = 0; i < body; i += kSumLanes)
#pragma omp simd
        for (int k = 0; k < kSumLanes; ++k) acc[k] += IO<D>::load(x[i + k]) - pivot;
    for (int64_t i = body; i < len; ++i) acc[i - body] += IO<D>::load(x[i]) - pivot;
    float sum = 0.0f;
    for (int k = 0; k < kSumLanes; ++k) sum += acc[k];
    const float offset = sum / (float)len;
    const float mean = pivot + offset;
    for (int k = 0; k < kSumLanes; ++k) acc[k] = 0.0f;
    for (int64_t i = 0; i < body; i += kSumLanes)
#pragma omp simd
        for (int k = 0; k < kSumLanes; ++k) {
            const float d = IO<D>::load(x[i + k]) - mean;
            acc[k] += d * d;
        }
    for (int64_t i = body; i < len; ++i) {
        const float d = IO<D>::load(x[i]) - mean;
        acc[i - body] += d * d;
    }
    float m2 = 0.0f;
    for (int k = 0; k < kSumLanes; ++k) m2 += acc[k];
    out->count = (double)len;
    out->mean = (double)pivot + (double)offset;
    out->m2 = (double)m2;
}

// Per-channel statistics over `rows` channels-last rows of C channels: mean = pivot[c] + offset[c] (pivot: the
// first row), and centred m2.
template <int D>
PDM_CLONES void generic_rows_mean_m2(const typename IO<D>::T* __restrict x, int64_t rows, int64_t C,
                                     float* __restrict pivot, float* __restrict offset, float* __restrict m2) {
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
        pivot[c] = IO<D>::load(x[c]);
        offset[c] = 0.0f;
        m2[c] = 0.0f;
    }
    for (int64_t r = 0; r < rows; ++r) {
        const typename IO<D>::T* row = x + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) offset[c] += IO<D>::load(row[c]) - pivot[c];
    }
    const float inv_rows = 1.0f / (float)rows;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) offset[c] *= inv_rows;
    for (int64_t r = 0; r < rows; ++r) {
        const typename IO<D>::T* row = x + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
            const float d = IO<D>::load(row[c]) - (pivot[c] + offset[c]);
            m2[c] += d * d;
        }
    }
}

// y = act((x - center) * scale + shift) over len contiguous values of one channel.
template <int D, bool SILU>
PDM_CLONES void generic_apply_span(const typename IO<D>::T* __restrict x, typename IO<D>::T* __restrict y,
                                   int64_t len, float center, float scale, float shift) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) y[i] = IO<D>::store(apply_one<SILU>(IO<D>::load(x[i]), center, scale, shift));
}

// The same over `rows` channels-last rows, parameters per channel.
template <int D, bool SILU>
PDM_CLONES void generic_apply_rows(const typename IO<D>::T* __restrict x, typename IO<D>::T* __restrict y,
                                   int64_t rows, int64_t C, const float* __restrict center,
                                   const float* __restrict scale, const float* __restrict shift) {
    for (int64_t r = 0; r < rows; ++r) {
        const typename IO<D>::T* xr = x + r * C;
        typename IO<D>::T* yr = y + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c)
            yr[c] = IO<D>::store(apply_one<SILU>(IO<D>::load(xr[c]), center[c], scale[c], shift[c]));
    }
}

// One tile of the transposing apply: `rows` spatial positions x `chans` channels. x_cl says which side is
// channels-last; a channels-last side has row stride C, an NCS side channel stride S. The math runs along x's
// contiguous axis (vectorised) into tmp (kTileC x kTileS floats, in L1); a second loop writes tmp out along y's
// contiguous axis.
template <int D, bool SILU>
PDM_CLONES void apply_tile_transposed(const typename IO<D>::T* __restrict x, typename IO<D>::T* __restrict y,
                                      int64_t rows, int64_t chans, int64_t S, int64_t C, bool x_cl,
                                      ChannelParams ch, float* __restrict tmp) {
    if (!x_cl) {  // NCS -> channels-last
        for (int64_t c = 0; c < chans; ++c) {
            const typename IO<D>::T* xc = x + c * S;
            const float center = ch.center[c], scale = ch.scale[c], shift = ch.shift[c];
#pragma omp simd
            for (int64_t s = 0; s < rows; ++s)
                tmp[c * kTileS + s] = apply_one<SILU>(IO<D>::load(xc[s]), center, scale, shift);
        }
        for (int64_t s = 0; s < rows; ++s) {
            typename IO<D>::T* ys = y + s * C;
            for (int64_t c = 0; c < chans; ++c) ys[c] = IO<D>::store(tmp[c * kTileS + s]);
        }
    } else {  // channels-last -> NCS
        for (int64_t s = 0; s < rows; ++s) {
            const typename IO<D>::T* xs = x + s * C;
#pragma omp simd
            for (int64_t c = 0; c < chans; ++c)
                tmp[s * kTileC + c] = apply_one<SILU>(IO<D>::load(xs[c]), ch.center[c], ch.scale[c], ch.shift[c]);
        }
        for (int64_t c = 0; c < chans; ++c) {
            typename IO<D>::T* yc = y + c * S;
            for (int64_t s = 0; s < rows; ++s) yc[s] = IO<D>::store(tmp[s * kTileC + c]);
        }
    }
}

struct Generic {
    template <int D>
    static void span_mean_m2(const typename IO<D>::T* x, int64_t len, MeanM2<double>* out) {
        generic_span_mean_m2<D>(x, len, out);
    }
    template <int D>
    static void rows_mean_m2(const typename IO<D>::T* x, int64_t rows, int64_t C, float* pivot, float* offset,
                             float* m2) {
        generic_rows_mean_m2<D>(x, rows, C, pivot, offset, m2);
    }
    // Plain stores only (kStreams = false): the driver never asks for STREAM = true here.
    template <int D, bool SILU, bool STREAM>
    static void apply_span(const typename IO<D>::T* x, typename IO<D>::T* y, int64_t len, float center,
                           float scale, float shift, int64_t = 0) {
        generic_apply_span<D, SILU>(x, y, len, center, scale, shift);
    }
    template <int D, bool SILU, bool STREAM>
    static void apply_rows(const typename IO<D>::T* x, typename IO<D>::T* y, int64_t rows, int64_t C,
                           ChannelParams ch, int64_t = 0) {
        generic_apply_rows<D, SILU>(x, y, rows, C, ch.center, ch.scale, ch.shift);
    }
    template <int D, bool SILU, bool STREAM>
    static void apply_tile(const typename IO<D>::T* x, typename IO<D>::T* y, int64_t rows, int64_t chans, int64_t S,
                           int64_t C, bool x_cl, ChannelParams ch, float* tmp) {
        apply_tile_transposed<D, SILU>(x, y, rows, chans, S, C, x_cl, ch, tmp);
    }
    static constexpr bool kStreams = false;
    static void fence() {}
};

// =============================================================================================================
// AVX-512 loops (16 fp32 lanes; tails through masks)
// =============================================================================================================
#if defined(PDM_HAVE_AVX512_PATH)
PDM_AVX512 inline __mmask16 tail_mask(int64_t n) { return (__mmask16)((1u << n) - 1u); }  // n < 16

// Sixteen elements of dtype D <-> fp32 lanes. fp16 and bf16 use the hardware conversions (round to nearest
// even; vcvtneps2bf16 flushes fp32 subnormals, < 1.2e-38, to zero).
template <int D>
struct V16;
template <>
struct V16<pdm::kFloat32> {
    typedef float T;
    static PDM_AVX512 inline __m512 load(const T* p) { return _mm512_loadu_ps(p); }
    static PDM_AVX512 inline __m512 load(const T* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
    static PDM_AVX512 inline void store(T* p, __m512 v) { _mm512_storeu_ps(p, v); }
    static PDM_AVX512 inline void store(T* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
    static PDM_AVX512 inline void stream(T* p, __m512 v) { _mm512_stream_ps(p, v); }  // p: 64-byte aligned
};
template <>
struct V16<pdm::kFloat16> {
    typedef pdm_u16 T;
    static PDM_AVX512 inline __m512 load(const T* p) {
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
    }
    static PDM_AVX512 inline __m512 load(const T* p, __mmask16 m) {
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
    }
    static PDM_AVX512 inline __m256i pack(__m512 v) {
        return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    static PDM_AVX512 inline void store(T* p, __m512 v) { _mm256_storeu_si256((__m256i*)p, pack(v)); }
    static PDM_AVX512 inline void store(T* p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, pack(v)); }
    // p: 32-byte aligned
    static PDM_AVX512 inline void stream(T* p, __m512 v) { _mm256_stream_si256((__m256i*)p, pack(v)); }
};
template <>
struct V16<pdm::kBFloat16> {
    typedef pdm_u16 T;
    static PDM_AVX512 inline __m512 widen(__m256i h) {
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    static PDM_AVX512 inline __m512 load(const T* p) { return widen(_mm256_loadu_si256((const __m256i*)p)); }
    static PDM_AVX512 inline __m512 load(const T* p, __mmask16 m) { return widen(_mm256_maskz_loadu_epi16(m, p)); }
    static PDM_AVX512 inline __m256i pack(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }
    static PDM_AVX512 inline void store(T* p, __m512 v) { _mm256_storeu_si256((__m256i*)p, pack(v)); }
    static PDM_AVX512 inline void store(T* p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, pack(v)); }
    // p: 32-byte aligned
    static PDM_AVX512 inline void stream(T* p, __m512 v) { _mm256_stream_si256((__m256i*)p, pack(v)); }
};

// silu(v) = v / (1 + e^-v), with e^-v = 2^(u - 1/2) for u = 1/2 - v*log2(e) (pdm_cpu::exp2_minus_half; degree 5
// for fp32 outputs, 4 for fp16, 3 for bf16). The reciprocal: for fp32 a division, which runs on its own unit beside
// the FMAs (faster than rcp14 with a Newton step on the development machine); for 16-bit outputs rcp14 alone
// (relative error < 2^-14, an eighth of an fp16 ulp), faster still there. Neither needs a clamp: for v < -88,
// 1 + e^-v is inf, and v / inf = v * rcp14(inf) = -0.
template <int D>
PDM_AVX512 inline __m512 silu16(__m512 v) {
    constexpr int degree = D == pdm::kFloat32 ? 5 : (D == pdm::kFloat16 ? 4 : 3);
    const __m512 u = _mm512_fmadd_ps(v, _mm512_set1_ps(-1.44269504088896341f), _mm512_set1_ps(0.5f));
    const __m512 d = _mm512_add_ps(pdm_cpu::exp2_minus_half<degree>(u), _mm512_set1_ps(1.0f));
    if (D == pdm::kFloat32) return _mm512_div_ps(v, d);
    return _mm512_mul_ps(v, _mm512_rcp14_ps(d));
}

template <int D, bool SILU>
PDM_AVX512 inline __m512 apply16(__m512 v, __m512 center, __m512 scale, __m512 shift) {
    const __m512 y = _mm512_fmadd_ps(_mm512_sub_ps(v, center), scale, shift);
    return SILU ? silu16<D>(y) : y;
}

// A full vector of y: a streaming (non-temporal) store when STREAM, which writes the line without first reading
// it (no write-allocate) and keeps y out of the caches; p must then be aligned to the vector's size.
template <int D, bool STREAM>
PDM_AVX512 inline void put16(typename V16<D>::T* p, __m512 v) {
    if (STREAM)
        V16<D>::stream(p, v);
    else
        V16<D>::store(p, v);
}

template <int D>
PDM_AVX512 void avx512_span_mean_m2(const typename V16<D>::T* x, int64_t len, MeanM2<double>* out) {
    typedef V16<D> L;
    const float pivot_f = IO<D>::load(x[0]);
    const __m512 pivot = _mm512_set1_ps(pivot_f);
    // four accumulators: the adds are latency-bound with fewer
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = 0;
    for (; i + 64 <= len; i += 64) {
        s0 = _mm512_add_ps(s0, _mm512_sub_ps(L::load(x + i), pivot));
        s1 = _mm512_add_ps(s1, _mm512_sub_ps(L::load(x + i + 16), pivot));
        s2 = _mm512_add_ps(s2, _mm512_sub_ps(L::load(x + i + 32), pivot));
        s3 = _mm512_add_ps(s3, _mm512_sub_ps(L::load(x + i + 48), pivot));
    }
    for (; i < len; i += 16) {
        const __mmask16 m = len - i >= 16 ? (__mmask16)0xffff : tail_mask(len - i);
        s0 = _mm512_mask_add_ps(s0, m, s0, _mm512_sub_ps(L::load(x + i, m), pivot));
    }
    const float offset = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3))) / (float)len;
    const __m512 mean = _mm512_set1_ps(pivot_f + offset);
    s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    i = 0;
    for (; i + 64 <= len; i += 64) {
        __m512 d0 = _mm512_sub_ps(L::load(x + i), mean), d1 = _mm512_sub_ps(L::load(x + i + 16), mean);
        __m512 d2 = _mm512_sub_ps(L::load(x + i + 32), mean), d3 = _mm512_sub_ps(L::load(x + i + 48), mean);
        s0 = _mm512_fmadd_ps(d0, d0, s0);
        s1 = _mm512_fmadd_ps(d1, d1, s1);
        s2 = _mm512_fmadd_ps(d2, d2, s2);
        s3 = _mm512_fmadd_ps(d3, d3, s3);
    }
    for (; i < len; i += 16) {
        const __mmask16 m = len - i >= 16 ? (__mmask16)0xffff : tail_mask(len - i);
        const __m512 d = _mm512_sub_ps(L::load(x + i, m), mean);
        s0 = _mm512_mask3_fmadd_ps(d, d, s0, m);
    }
    out->count = (double)len;
    out->mean = (double)pivot_f + (double)offset;
    out->m2 = (double)_mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}

// Block b of NB blocks of 16 channels; only the last one of a MASKED set is partial.
template <int D, int NB, bool MASKED>
struct Blocks {
    static PDM_AVX512 inline __m512 load(const typename V16<D>::T* p, int b, __mmask16 last_mask) {
        return MASKED && b == NB - 1 ? V16<D>::load(p, last_mask) : V16<D>::load(p);
    }
};

// Channels-last statistics of NB blocks of 16 channels (the last block masked by last_mask) over `rows` rows of
// stride C, x pointing at the first of those channels in row 0. Accumulators stay in registers; rows are
// taken P at a time into separate accumulators so that at least four addition chains run side by side.

template <int D, int NB, bool MASKED>
PDM_AVX512 void avx512_rows_block(const typename V16<D>::T* x, int64_t rows, int64_t C, __mmask16 last_mask,
                                  float* pivot, float* offset, float* m2) {
    typedef V16<D> L;
    constexpr int P = NB >= 4 ? 1 : 4 / NB;
    typedef Blocks<D, NB, MASKED> B;
    __mmask16 mask[NB];
    __m512 piv[NB], mean[NB], acc[P][NB];
    for (int b = 0; b < NB; ++b) {
        mask[b] = b == NB - 1 ? last_mask : (__mmask16)0xffff;
        piv[b] = L::load(x + 16 * b, mask[b]);
        for (int q = 0; q < P; ++q) acc[q][b] = _mm512_setzero_ps();
    }
    int64_t r = 0;
    for (; r + P <= rows; r += P)
        for (int q = 0; q < P; ++q)
            for (int b = 0; b < NB; ++b)
                acc[q][b] =
                    _mm512_add_ps(acc[q][b], _mm512_sub_ps(B::load(x + (r + q) * C + 16 * b, b, last_mask), piv[b]));
    for (; r < rows; ++r)
        for (int b = 0; b < NB; ++b)
            acc[0][b] = _mm512_add_ps(acc[0][b], _mm512_sub_ps(B::load(x + r * C + 16 * b, b, last_mask), piv[b]));
    const __m512 inv_rows = _mm512_set1_ps(1.0f / (float)rows);
    for (int b = 0; b < NB; ++b) {
        for (int q = 1; q < P; ++q) acc[0][b] = _mm512_add_ps(acc[0][b], acc[q][b]);
        const __m512 off = _mm512_mul_ps(acc[0][b], inv_rows);
        _mm512_mask_storeu_ps(pivot + 16 * b, mask[b], piv[b]);
        _mm512_mask_storeu_ps(offset + 16 * b, mask[b], off);
        mean[b] = _mm512_add_ps(piv[b], off);
        for (int q = 0; q < P; ++q) acc[q][b] = _mm512_setzero_ps();
    }
    for (r = 0; r + P <= rows; r += P)
        for (int q = 0; q < P; ++q)
            for (int b = 0; b < NB; ++b) {
                const __m512 d = _mm512_sub_ps(B::load(x + (r + q) * C + 16 * b, b, last_mask), mean[b]);
                acc[q][b] = _mm512_fmadd_ps(d, d, acc[q][b]);
            }
    for (; r < rows; ++r)
        for (int b = 0; b < NB; ++b) {
            const __m512 d = _mm512_sub_ps(B::load(x + r * C + 16 * b, b, last_mask), mean[b]);
            acc[0][b] = _mm512_fmadd_ps(d, d, acc[0][b]);
        }
    for (int b = 0; b < NB; ++b) {
        for (int q = 1; q < P; ++q) acc[0][b] = _mm512_add_ps(acc[0][b], acc[q][b]);
        _mm512_mask_storeu_ps(m2 + 16 * b, mask[b], acc[0][b]);
    }
}

template <int D, bool MASKED>
PDM_AVX512 void rows_block_dispatch(int nb, const typename V16<D>::T* x, int64_t rows, int64_t C, __mmask16 last,
                                    float* pivot, float* offset, float* m2) {
    switch (nb) {
        case 1: avx512_rows_block<D, 1, MASKED>(x, rows, C, last, pivot, offset, m2); break;
        case 2: avx512_rows_block<D, 2, MASKED>(x, rows, C, last, pivot, offset, m2); break;
        case 3: avx512_rows_block<D, 3, MASKED>(x, rows, C, last, pivot, offset, m2); break;
        case 4: avx512_rows_block<D, 4, MASKED>(x, rows, C, last, pivot, offset, m2); break;
        case 5: avx512_rows_block<D, 5, MASKED>(x, rows, C, last, pivot, offset, m2); break;
        case 6: avx512_rows_block<D, 6, MASKED>(x, rows, C, last, pivot, offset, m2); break;
        case 7: avx512_rows_block<D, 7, MASKED>(x, rows, C, last, pivot, offset, m2); break;
        default: avx512_rows_block<D, 8, MASKED>(x, rows, C, last, pivot, offset, m2); break;
    }
}

// Channels-last block of rows: slabs of up to 128 channels, each by avx512_rows_block.
template <int D>
PDM_AVX512 void avx512_rows_mean_m2(const typename V16<D>::T* x, int64_t rows, int64_t C, float* pivot,
                                    float* offset, float* m2) {
    for (int64_t c0 = 0; c0 < C; c0 += 128) {
        const int64_t chans = std::min<int64_t>(128, C - c0);
        const int nb = (int)((chans + 15) / 16);
        const __mmask16 last = chans % 16 ? tail_mask(chans % 16) : (__mmask16)0xffff;
        const typename V16<D>::T* xc = x + c0;
        float *pv = pivot + c0, *of = offset + c0, *sq = m2 + c0;
        if (chans % 16) {
            rows_block_dispatch<D, true>(nb, xc, rows, C, last, pv, of, sq);
        } else {
            rows_block_dispatch<D, false>(nb, xc, rows, C, last, pv, of, sq);
        }
    }
}

// STREAM: the values before y's first 64-byte boundary and the last < 32 go through normal stores, the aligned
// middle through streaming ones (y must be aligned to its element size).
// PREFETCH: x + ahead is where the caller's next task reads; it is prefetched into L2 line by line as x is
// consumed here, so that its memory reads overlap this task's arithmetic instead of stalling the next one.
template <int D, bool SILU, bool STREAM, bool PREFETCH>
PDM_AVX512 void avx512_apply_span(const typename V16<D>::T* x, typename V16<D>::T* y, int64_t len, float center_f,
                                  float scale_f, float shift_f, int64_t ahead) {
    typedef V16<D> L;
    const __m512 center = _mm512_set1_ps(center_f), scale = _mm512_set1_ps(scale_f), shift = _mm512_set1_ps(shift_f);
    int64_t i = 0;
    if (STREAM) {
        const int64_t head = std::min<int64_t>(len, (-reinterpret_cast<std::uintptr_t>(y) & 63) / sizeof(*y));
        for (; i < head; i += 16) {
            const __mmask16 m = head - i >= 16 ? (__mmask16)0xffff : tail_mask(head - i);
            L::store(y + i, apply16<D, SILU>(L::load(x + i, m), center, scale, shift), m);
        }
        i = head;
    }
    for (; i + 32 <= len; i += 32) {  // two vectors per iteration: independent work for the long silu chain
        if (PREFETCH) {
            _mm_prefetch((const char*)(x + i + ahead), _MM_HINT_T1);
            if (sizeof(*x) == 4) _mm_prefetch((const char*)(x + i + 16 + ahead), _MM_HINT_T1);
        }
        const __m512 a = apply16<D, SILU>(L::load(x + i), center, scale, shift);
        const __m512 b = apply16<D, SILU>(L::load(x + i + 16), center, scale, shift);
        put16<D, STREAM>(y + i, a);
        put16<D, STREAM>(y + i + 16, b);
    }
    for (; i < len; i += 16) {
        const __mmask16 m = len - i >= 16 ? (__mmask16)0xffff : tail_mask(len - i);
        L::store(y + i, apply16<D, SILU>(L::load(x + i, m), center, scale, shift), m);
    }
}

// Channels-last apply of NB blocks of 16 channels (the last one masked when MASKED) over `rows` rows of stride
// C, parameters held in registers. ahead != 0: prefetch x + ahead as in avx512_apply_span.
template <int D, bool SILU, int NB, bool MASKED, bool STREAM>
PDM_AVX512 void avx512_apply_block(const typename V16<D>::T* x, typename V16<D>::T* y, int64_t rows, int64_t C,
                                   __mmask16 last_mask, ChannelParams ch, int64_t ahead) {
    typedef V16<D> L;
    __m512 center[NB], scale[NB], shift[NB];
    for (int b = 0; b < NB; ++b) {
        const __mmask16 m = MASKED && b == NB - 1 ? last_mask : (__mmask16)0xffff;
        center[b] = _mm512_maskz_loadu_ps(m, ch.center + 16 * b);
        scale[b] = _mm512_maskz_loadu_ps(m, ch.scale + 16 * b);
        shift[b] = _mm512_maskz_loadu_ps(m, ch.shift + 16 * b);
    }
    for (int64_t r = 0; r < rows; ++r) {
        const typename L::T* xr = x + r * C;
        typename L::T* yr = y + r * C;
        for (int b = 0; b < NB; ++b) {
            if (ahead) _mm_prefetch((const char*)(xr + 16 * b + ahead), _MM_HINT_T1);
            if (MASKED && b == NB - 1) {
                L::store(yr + 16 * b, apply16<D, SILU>(L::load(xr + 16 * b, last_mask), center[b], scale[b], shift[b]),
                         last_mask);
            } else {
                put16<D, STREAM>(yr + 16 * b, apply16<D, SILU>(L::load(xr + 16 * b), center[b], scale[b], shift[b]));
            }
        }
    }
}

template <int D, bool SILU, bool MASKED, bool STREAM>
PDM_AVX512 void apply_block_dispatch(int nb, const typename V16<D>::T* x, typename V16<D>::T* y, int64_t rows,
                                     int64_t C, __mmask16 last, ChannelParams ch, int64_t ahead) {
    switch (nb) {
        case 1: avx512_apply_block<D, SILU, 1, MASKED, STREAM>(x, y, rows, C, last, ch, ahead); break;
        case 2: avx512_apply_block<D, SILU, 2, MASKED, STREAM>(x, y, rows, C, last, ch, ahead); break;
        case 3: avx512_apply_block<D, SILU, 3, MASKED, STREAM>(x, y, rows, C, last, ch, ahead); break;
        default: avx512_apply_block<D, SILU, 4, MASKED, STREAM>(x, y, rows, C, last, ch, ahead); break;
    }
}

// Channels-last block of rows: slabs of up to 64 channels (their parameters fill 12 registers). STREAM only
// when C % 16 == 0 (no masked block) and y is vector-aligned (see stream_y_ok).
template <int D, bool SILU, bool STREAM>
PDM_AVX512 void avx512_apply_rows(const typename V16<D>::T* x, typename V16<D>::T* y, int64_t rows, int64_t C,
                                  ChannelParams ch, int64_t ahead) {
    for (int64_t c0 = 0; c0 < C; c0 += 64) {
        const int64_t chans = std::min<int64_t>(64, C - c0);
        const int nb = (int)((chans + 15) / 16);
        const __mmask16 last = chans % 16 ? tail_mask(chans % 16) : (__mmask16)0xffff;
        if (chans % 16)
            apply_block_dispatch<D, SILU, true, false>(nb, x + c0, y + c0, rows, C, last, ch.at(c0), ahead);
        else
            apply_block_dispatch<D, SILU, false, STREAM>(nb, x + c0, y + c0, rows, C, last, ch.at(c0), ahead);
    }
}

// In-register transpose of a 16 x 16 fp32 block: lane j of r[i] goes to lane i of r[j].
PDM_AVX512 inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xee);
        r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xee);
    }
    for (int i = 0; i < 16; i += 8)
        for (int k = 0; k < 4; ++k) {
            t[i + k] = _mm512_shuffle_f32x4(r[i + k], r[i + k + 4], 0x88);
            t[i + k + 4] = _mm512_shuffle_f32x4(r[i + k], r[i + k + 4], 0xdd);
        }
    for (int k = 0; k < 8; ++k) {
        r[k] = _mm512_shuffle_f32x4(t[k], t[k + 8], 0x88);
        r[k + 8] = _mm512_shuffle_f32x4(t[k], t[k + 8], 0xdd);
    }
}

// The transposing apply (see apply_tile_transposed) in 16 x 16 blocks: the math along x's contiguous axis, a
// register transpose, stores along y's. Partial blocks (fewer than 16 channels or positions) take the generic
// tile. STREAM only when every full block's stores are vector-aligned (see stream_y_ok).
template <int D, bool SILU, bool STREAM>
PDM_AVX512 void avx512_apply_tile(const typename V16<D>::T* x, typename V16<D>::T* y, int64_t rows, int64_t chans,
                                  int64_t S, int64_t C, bool x_cl, ChannelParams ch, float* tmp) {
    typedef V16<D> L;
    if (chans != 16) return apply_tile_transposed<D, SILU>(x, y, rows, chans, S, C, x_cl, ch, tmp);
    int64_t s = 0;
    __m512 r[16];
    if (!x_cl) {  // NCS -> channels-last: r[k] = channel k at 16 positions
        for (; s + 16 <= rows; s += 16) {
            for (int k = 0; k < 16; ++k)
                r[k] = apply16<D, SILU>(L::load(x + k * S + s), _mm512_set1_ps(ch.center[k]),
                                        _mm512_set1_ps(ch.scale[k]), _mm512_set1_ps(ch.shift[k]));
            transpose16(r);
            for (int j = 0; j < 16; ++j) put16<D, STREAM>(y + (s + j) * C, r[j]);
        }
        if (s < rows) apply_tile_transposed<D, SILU>(x + s, y + s * C, rows - s, chans, S, C, x_cl, ch, tmp);
    } else {  // channels-last -> NCS: r[j] = position j, 16 channels
        const __m512 center = _mm512_loadu_ps(ch.center), scale = _mm512_loadu_ps(ch.scale);
        const __m512 shift = _mm512_loadu_ps(ch.shift);
        for (; s + 16 <= rows; s += 16) {
            for (int j = 0; j < 16; ++j) r[j] = apply16<D, SILU>(L::load(x + (s + j) * C), center, scale, shift);
            transpose16(r);
            for (int k = 0; k < 16; ++k) put16<D, STREAM>(y + k * S + s, r[k]);
        }
        if (s < rows) apply_tile_transposed<D, SILU>(x + s * C, y + s, rows - s, chans, S, C, x_cl, ch, tmp);
    }
}

struct Avx512 {
    template <int D>
    static void span_mean_m2(const typename IO<D>::T* x, int64_t len, MeanM2<double>* out) {
        avx512_span_mean_m2<D>(x, len, out);
    }
    template <int D>
    static void rows_mean_m2(const typename IO<D>::T* x, int64_t rows, int64_t C, float* pivot, float* offset,
                             float* m2) {
        avx512_rows_mean_m2<D>(x, rows, C, pivot, offset, m2);
    }
    template <int D, bool SILU, bool STREAM>
    static void apply_span(const typename IO<D>::T* x, typename IO<D>::T* y, int64_t len, float center,
                           float scale, float shift, int64_t prefetch_ahead = 0) {
        if (prefetch_ahead)
            avx512_apply_span<D, SILU, STREAM, true>(x, y, len, center, scale, shift, prefetch_ahead);
        else
            avx512_apply_span<D, SILU, STREAM, false>(x, y, len, center, scale, shift, 0);
    }
    template <int D, bool SILU, bool STREAM>
    static void apply_rows(const typename IO<D>::T* x, typename IO<D>::T* y, int64_t rows, int64_t C,
                           ChannelParams ch, int64_t prefetch_ahead = 0) {
        avx512_apply_rows<D, SILU, STREAM>(x, y, rows, C, ch, prefetch_ahead);
    }
    template <int D, bool SILU, bool STREAM>
    static void apply_tile(const typename IO<D>::T* x, typename IO<D>::T* y, int64_t rows, int64_t chans, int64_t S,
                           int64_t C, bool x_cl, ChannelParams ch, float* tmp) {
        avx512_apply_tile<D, SILU, STREAM>(x, y, rows, chans, S, C, x_cl, ch, tmp);
    }
    static constexpr bool kStreams = true;
    // Orders this thread's streaming stores before whatever follows (they are weakly ordered).
    static void fence() { _mm_sfence(); }
};
#endif  // PDM_HAVE_AVX512_PATH

// =============================================================================================================
// Driver
// =============================================================================================================

struct Problem {
    int64_t N, C, S, G;
    bool x_cl, y_cl;
    const float* weight;   // C or null
    const float* bias;     // C or null
    const float* bias_nc;  // N x C or null
    float eps;
    bool silu;
};

// How a layout is cut into chunks: NCS chunks are pieces of one channel, channels-last chunks are row blocks.
struct Chunking {
    int64_t per_unit;  // chunks per channel (NCS) or per sample (channels-last)
    int64_t length;    // values per NCS chunk, rows per channels-last chunk (the last one may be shorter)
};

Chunking ncs_chunking(int64_t S) {
    const int64_t n = (S + kChunkElems - 1) / kChunkElems;
    int64_t len = (S + n - 1) / n;
    len = (len + 15) / 16 * 16;  // whole vectors except at the channel's end
    return {(S + len - 1) / len, len};
}

Chunking cl_chunking(int64_t S, int64_t C) {
    const int64_t spread = (S + kMinClChunksPerSample - 1) / kMinClChunksPerSample;
    const int64_t rows = std::max<int64_t>(1, std::min(kClChunkElems / C, spread));
    return {(S + rows - 1) / rows, rows};
}

// Whether the apply may write y with streaming stores (the size aside). Streaming pays only when each cache line
// is written whole by consecutive stores; a line left half-written goes to memory in pieces (16-bit transposing
// tiles that way ran 2-3x slower than plain stores).
//   * NCS -> NCS: spans store their unaligned head normally, so y needs only element alignment.
//   * The other applies store whole vectors at fixed offsets: y aligned to 16 elements, the row pitch of y (C
//     when y is channels-last, else S) a multiple of 16.
//   * Channels-last -> channels-last: a 16-bit vector is half a line, completed by the next store of the same
//     row, except across 64-channel slabs: there the row pitch must hold whole lines (C % 32 == 0).
//   * Transposing: a 16-bit vector's other half line is stored a tile later: fp32 only.
bool stream_y_ok(const Problem& p, const void* y, std::size_t elem_bytes) {
    const std::uintptr_t address = reinterpret_cast<std::uintptr_t>(y);
    if (!p.x_cl && !p.y_cl) return address % elem_bytes == 0;
    if (address % (16 * elem_bytes) != 0 || (p.y_cl ? p.C : p.S) % 16 != 0) return false;
    if (p.x_cl && p.y_cl) return elem_bytes == 4 || p.C <= 64 || p.C % 32 == 0;
    return elem_bytes == 4;
}

// This thread's share [begin, end) of `count` tasks: contiguous blocks in thread order, the same in every phase
// for the same count.
struct Share {
    int64_t begin, end;
};
inline Share thread_share(int64_t count) {
    const int64_t t = omp_get_thread_num(), threads = omp_get_num_threads();
    return {count * t / threads, count * (t + 1) / threads};
}

// Called by every thread of the parallel region, as its last work (no barrier at the end). Each thread applies
// its share backwards: the statistics pass read the same x forwards, so the x it read last, still in cache,
// is re-read first (forwards, every re-read of an x larger than the cache would miss).
template <class K, int D, bool SILU, bool STREAM>
void apply_phase(const Problem& p, const typename IO<D>::T* x, typename IO<D>::T* y, const ChannelParams& ch,
                 const Chunking& ncs, const Chunking& cl, float* tmp) {
    const int64_t N = p.N, C = p.C, S = p.S;
    if (!p.x_cl && !p.y_cl) {
        const Share share = thread_share(N * C * ncs.per_unit);
        for (int64_t task = share.end - 1; task >= share.begin; --task) {
            const int64_t nc = task / ncs.per_unit, j = task % ncs.per_unit;
            const int64_t start = j * ncs.length, len = std::min(ncs.length, S - start);
            const int64_t off = nc * S + start;
            const int64_t next = task - 1;  // this thread's next task
            const int64_t ahead =
                next < share.begin ? 0 : (next / ncs.per_unit) * S + (next % ncs.per_unit) * ncs.length - off;
            K::template apply_span<D, SILU, STREAM>(x + off, y + off, len, ch.center[nc], ch.scale[nc],
                                                    ch.shift[nc], ahead);
        }
    } else if (p.x_cl && p.y_cl) {
        const Share share = thread_share(N * cl.per_unit);
        for (int64_t task = share.end - 1; task >= share.begin; --task) {
            const int64_t n = task / cl.per_unit, j = task % cl.per_unit;
            const int64_t r0 = j * cl.length, rows = std::min(cl.length, S - r0);
            const int64_t off = (n * S + r0) * C;
            const int64_t next = task - 1;  // this thread's next task
            const int64_t ahead =
                next < share.begin ? 0 : ((next / cl.per_unit) * S + (next % cl.per_unit) * cl.length) * C - off;
            K::template apply_rows<D, SILU, STREAM>(x + off, y + off, rows, C, ch.at(n * C), ahead);
        }
    } else {
        const int64_t tiles = (S + kTileS - 1) / kTileS;
        const Share share = thread_share(N * tiles);
        for (int64_t task = share.end - 1; task >= share.begin; --task) {
            const int64_t n = task / tiles, s0 = (task % tiles) * kTileS, rows = std::min(kTileS, S - s0);
            for (int64_t c0 = 0; c0 < C; c0 += kTileC) {
                const int64_t chans = std::min(kTileC, C - c0);
                const int64_t x_off = p.x_cl ? (n * S + s0) * C + c0 : (n * C + c0) * S + s0;
                const int64_t y_off = p.y_cl ? (n * S + s0) * C + c0 : (n * C + c0) * S + s0;
                K::template apply_tile<D, SILU, STREAM>(x + x_off, y + y_off, rows, chans, S, C, p.x_cl,
                                                        ch.at(n * C + c0), tmp);
            }
        }
    }
    if (STREAM) K::fence();
}

// Per-(n, group) channel parameters from that group's merged statistics.
inline void group_params(const Problem& p, int64_t n, int64_t g, const MeanM2<double>& group, float* center,
                         float* scale, float* shift) {
    const int64_t C = p.C, Cg = C / p.G;
    const float rstd = pdm::gn_rstd((float)group.m2, (float)group.count, p.eps);
    for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        const pdm::GNChannel chan =
            pdm::gn_channel(group.mean, rstd, p.weight ? p.weight[c] : 1.0f, p.bias ? p.bias[c] : 0.0f,
                            p.bias_nc ? p.bias_nc[n * C + c] : 0.0f);
        center[n * C + c] = chan.center_hi;
        scale[n * C + c] = chan.scale;
        shift[n * C + c] = chan.shift - chan.center_lo * chan.scale;
    }
}

// Group (n, g)'s statistics from the partials of the statistics phase (Chan's formula, in double). NCS: the
// group's channels, hence their chunks, are consecutive; channels-last: one partial per row block.
inline MeanM2<double> merged_group(const Problem& p, int64_t n, int64_t g, const MeanM2<double>* partials,
                                   const Chunking& ncs, const Chunking& cl) {
    const int64_t C = p.C, G = p.G, Cg = C / G;
    if (p.x_cl) return pdm::mean_m2_combine<double>(&partials[n * cl.per_unit * G + g], cl.per_unit, G);
    return pdm::mean_m2_combine<double>(&partials[(n * C + g * Cg) * ncs.per_unit], Cg * ncs.per_unit, 1);
}

// NCS in and out, small groups: one task per (n, group) does stats, parameters and apply back to back. While it
// applies one group (from L2), it prefetches the next one, which its statistics pass then reads from L2.
template <class K, int D, bool SILU, bool STREAM>
void run_group_resident(const Problem& p, const typename IO<D>::T* x, typename IO<D>::T* y, const Chunking& ncs,
                        MeanM2<double>* partials, float* center, float* scale, float* shift, int threads) {
    const int64_t C = p.C, S = p.S, G = p.G, Cg = C / G;
#pragma omp parallel num_threads(threads)
    {
        const Share share = thread_share(p.N * G);
        for (int64_t ng = share.begin; ng < share.end; ++ng) {
            const int64_t n = ng / G, g = ng % G;
            const int64_t first = (n * C + g * Cg) * ncs.per_unit;
            const int64_t ahead = ng + 1 < share.end ? Cg * S : 0;  // groups are consecutive in NCS
            for (int64_t k = 0; k < Cg * ncs.per_unit; ++k) {
                const int64_t nc = n * C + g * Cg + k / ncs.per_unit, start = (k % ncs.per_unit) * ncs.length;
                K::template span_mean_m2<D>(x + nc * S + start, std::min(ncs.length, S - start),
                                            &partials[first + k]);
                if (p.bias_nc) pdm::gn_add_to_mean(partials[first + k], (double)p.bias_nc[nc]);
            }
            group_params(p, n, g, pdm::mean_m2_combine<double>(&partials[first], Cg * ncs.per_unit, 1), center,
                         scale, shift);
            for (int64_t k = 0; k < Cg * ncs.per_unit; ++k) {
                const int64_t nc = n * C + g * Cg + k / ncs.per_unit, start = (k % ncs.per_unit) * ncs.length;
                const int64_t off = nc * S + start, len = std::min(ncs.length, S - start);
                K::template apply_span<D, SILU, STREAM>(x + off, y + off, len, center[nc], scale[nc], shift[nc],
                                                        ahead);
            }
        }
        if (STREAM) K::fence();
    }
}

// f(silu, stream) with both flags as compile-time constants (std::bool_constant arguments).
template <class F>
void with_apply_flags(bool silu, bool stream, F&& f) {
    if (silu) {
        if (stream) f(std::true_type{}, std::true_type{});
        else f(std::true_type{}, std::false_type{});
    } else {
        if (stream) f(std::false_type{}, std::true_type{});
        else f(std::false_type{}, std::false_type{});
    }
}

// Phase 1, called by every thread of a parallel region: this thread's share of the partial statistics, one per
// (n, c, chunk) for NCS, one per (n, chunk, group) for channels-last.
template <class K, int D>
void stats_phase(const Problem& p, const typename IO<D>::T* x, const Chunking& ncs, const Chunking& cl,
                 MeanM2<double>* partials) {
    const int64_t N = p.N, C = p.C, S = p.S, G = p.G, Cg = C / G;
    if (!p.x_cl) {
        const Share share = thread_share(N * C * ncs.per_unit);
        for (int64_t task = share.begin; task < share.end; ++task) {
            const int64_t nc = task / ncs.per_unit, j = task % ncs.per_unit;
            const int64_t start = j * ncs.length, len = std::min(ncs.length, S - start);
            K::template span_mean_m2<D>(x + nc * S + start, len, &partials[task]);
            if (p.bias_nc) pdm::gn_add_to_mean(partials[task], (double)p.bias_nc[nc]);
        }
        return;
    }
    std::vector<float> pivot(C), offset(C), m2(C);  // channel accumulators
    std::vector<double> mean_c(C);
    const Share share = thread_share(N * cl.per_unit);
    for (int64_t task = share.begin; task < share.end; ++task) {
        const int64_t n = task / cl.per_unit, j = task % cl.per_unit;
        const int64_t r0 = j * cl.length, rows = std::min(cl.length, S - r0);
        K::template rows_mean_m2<D>(x + (n * S + r0) * C, rows, C, pivot.data(), offset.data(), m2.data());
        // group partials from channel partials of equal count (rows): mean_g = average of the channel means,
        // m2_g = sum(m2_c) + rows * sum((mean_c - mean_g)^2)
        for (int64_t c = 0; c < C; ++c) mean_c[c] = (double)pivot[c] + (double)offset[c];
        if (p.bias_nc)
            for (int64_t c = 0; c < C; ++c) mean_c[c] += (double)p.bias_nc[n * C + c];
        const double inv_cg = 1.0 / (double)Cg;
        for (int64_t g = 0; g < G; ++g) {
            const double* mc = &mean_c[g * Cg];
            const float* sq = &m2[g * Cg];
            double sum_means = 0.0;
            for (int64_t k = 0; k < Cg; ++k) sum_means += mc[k];
            const double mean_g = sum_means * inv_cg;
            double m2_g = 0.0, spread = 0.0;
            for (int64_t k = 0; k < Cg; ++k) {
                m2_g += (double)sq[k];
                spread += (mc[k] - mean_g) * (mc[k] - mean_g);
            }
            partials[task * G + g] = {(double)(rows * Cg), mean_g, m2_g + (double)rows * spread};
        }
    }
}

struct Plan {
    Chunking ncs, cl;
    int64_t num_partials;
    int threads;
};

Plan plan_for(const Problem& p, int num_threads) {
    const Chunking ncs = ncs_chunking(p.S), cl = cl_chunking(p.S, p.C);
    const int64_t total = p.N * p.C * p.S;
    return {ncs, cl, p.x_cl ? p.N * cl.per_unit * p.G : p.N * p.C * ncs.per_unit,
            (int)std::max<int64_t>(1, std::min<int64_t>(num_threads, total / kMinElemsPerThread))};
}

template <class K, int D>
bool streams(const Problem& p, const void* y) {
    return K::kStreams && p.N * p.C * p.S * (int64_t)sizeof(typename IO<D>::T) >= stream_min_bytes &&
           stream_y_ok(p, y, sizeof(typename IO<D>::T));
}

// Phase 3 alone, called by every thread of a parallel region.
template <class K, int D>
void apply_all(const Problem& p, const typename IO<D>::T* x, typename IO<D>::T* y, const ChannelParams& ch,
               const Plan& plan, bool stream) {
    std::vector<float> tile((p.x_cl != p.y_cl) ? kTileC * kTileS : 0);  // one transpose tile
    with_apply_flags(p.silu, stream, [&](auto silu, auto streaming) {
        apply_phase<K, D, decltype(silu)::value, decltype(streaming)::value>(p, x, y, ch, plan.ncs, plan.cl,
                                                                              tile.data());
    });
}

template <class K, int D>
void run(const Problem& p, const void* x_raw, void* y_raw, int num_threads) {
    typedef typename IO<D>::T T;
    const T* x = static_cast<const T*>(x_raw);
    T* y = static_cast<T*>(y_raw);
    const int64_t N = p.N, C = p.C, S = p.S, G = p.G, Cg = C / G;
    const Plan plan = plan_for(p, num_threads);
    std::vector<MeanM2<double>> partials(plan.num_partials);
    std::vector<float> center(N * C), scale(N * C), shift(N * C);
    const ChannelParams ch{center.data(), scale.data(), shift.data()};
    const bool stream = streams<K, D>(p, y);

    if (!p.x_cl && !p.y_cl && N * G >= plan.threads && Cg * S * (int64_t)sizeof(T) <= kGroupResidentBytes) {
        with_apply_flags(p.silu, stream, [&](auto silu, auto streaming) {
            run_group_resident<K, D, decltype(silu)::value, decltype(streaming)::value>(
                p, x, y, plan.ncs, partials.data(), center.data(), scale.data(), shift.data(), plan.threads);
        });
        return;
    }

#pragma omp parallel num_threads(plan.threads)
    {
        stats_phase<K, D>(p, x, plan.ncs, plan.cl, partials.data());
#pragma omp barrier  // phase 2 reads every thread's partials
#pragma omp for schedule(static)
        for (int64_t ng = 0; ng < N * G; ++ng)
            group_params(p, ng / G, ng % G, merged_group(p, ng / G, ng % G, partials.data(), plan.ncs, plan.cl),
                         center.data(), scale.data(), shift.data());
        apply_all<K, D>(p, x, y, ch, plan, stream);
    }
}

// Phases 1 and 2 alone: out[(n * G + g) * 3 + {0, 1, 2}] = count, mean, m2 of group (n, g) of x + bias_nc.
template <class K, int D>
void run_stats(const Problem& p, const void* x_raw, double* out, int num_threads) {
    const auto* x = static_cast<const typename IO<D>::T*>(x_raw);
    const Plan plan = plan_for(p, num_threads);
    std::vector<MeanM2<double>> partials(plan.num_partials);
#pragma omp parallel num_threads(plan.threads)
    {
        stats_phase<K, D>(p, x, plan.ncs, plan.cl, partials.data());
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t ng = 0; ng < p.N * p.G; ++ng) {
            const MeanM2<double> group = merged_group(p, ng / p.G, ng % p.G, partials.data(), plan.ncs, plan.cl);
            out[ng * 3] = group.count;
            out[ng * 3 + 1] = group.mean;
            out[ng * 3 + 2] = group.m2;
        }
    }
}

// Phase 3 alone, with the caller's per-(n, c) parameters: y = act((x - center) * scale + shift).
template <class K, int D>
void run_apply(const Problem& p, const void* x_raw, void* y_raw, const ChannelParams& ch, int num_threads) {
    const auto* x = static_cast<const typename IO<D>::T*>(x_raw);
    auto* y = static_cast<typename IO<D>::T*>(y_raw);
    const Plan plan = plan_for(p, num_threads);
    const bool stream = streams<K, D>(p, y);
#pragma omp parallel num_threads(plan.threads)
    apply_all<K, D>(p, x, y, ch, plan, stream);
}

// Which loops run: the AVX-512 ones where the CPU has them, unless switched off (tests cover both).
bool use_avx512 = false;

bool init_isa() {
#if defined(PDM_HAVE_AVX512_PATH)
    use_avx512 = pdm_cpu::avx512_bf16_supported();
#endif
    return use_avx512;
}

// f(kernel loops, dtype) for the loops in use and dtype_code, both as types (K{} and an integral_constant).
template <class F>
void with_loops(int dtype_code, F&& f) {
    auto by_dtype = [&](auto loops) {
        switch (dtype_code) {
            case pdm::kFloat32: f(loops, std::integral_constant<int, pdm::kFloat32>{}); break;
            case pdm::kFloat16: f(loops, std::integral_constant<int, pdm::kFloat16>{}); break;
            default: f(loops, std::integral_constant<int, pdm::kBFloat16>{}); break;
        }
    };
#if defined(PDM_HAVE_AVX512_PATH)
    if (use_avx512) return by_dtype(Avx512{});
#endif
    by_dtype(Generic{});
}

void check_sizes(const char* what, int dtype_code, int64_t N, int64_t C, int64_t S, int64_t G) {
    const std::string name(what);
    if (N < 0 || C < 1 || S < 0 || G < 1)
        throw std::invalid_argument(name + ": sizes must be N>=0, C>=1, S>=0, G>=1");
    if (C % G) throw std::invalid_argument(name + ": num_groups must divide C");
    if (dtype_code < pdm::kFloat32 || dtype_code > pdm::kBFloat16)
        throw std::invalid_argument(name + ": dtype_code must be 0 (f32), 1 (f16) or 2 (bf16)");
}

void group_norm(std::uintptr_t x_ptr, std::uintptr_t y_ptr, int dtype_code, int64_t N, int64_t C, int64_t S,
                int64_t G, bool x_channels_last, bool y_channels_last, std::uintptr_t w_ptr, std::uintptr_t b_ptr,
                std::uintptr_t bias_nc_ptr, double eps, bool silu, int num_threads) {
    check_sizes("group_norm", dtype_code, N, C, S, G);
    if (!(eps > 0)) throw std::invalid_argument("group_norm: eps must be positive");
    if (N * S == 0) return;
    if (!x_ptr || !y_ptr) throw std::invalid_argument("group_norm: x and y pointers must be non-null");
    Problem p{N, C, S, G, x_channels_last, y_channels_last,
              reinterpret_cast<const float*>(w_ptr), reinterpret_cast<const float*>(b_ptr),
              reinterpret_cast<const float*>(bias_nc_ptr), (float)eps, silu};
    const void* x = reinterpret_cast<const void*>(x_ptr);
    void* y = reinterpret_cast<void*>(y_ptr);
    num_threads = std::max(1, num_threads);
    py::gil_scoped_release no_gil;
    with_loops(dtype_code, [&](auto loops, auto dtype) {
        run<decltype(loops), decltype(dtype)::value>(p, x, y, num_threads);
    });
}

void group_norm_stats(std::uintptr_t x_ptr, int dtype_code, int64_t N, int64_t C, int64_t S, int64_t G,
                      bool x_channels_last, std::uintptr_t bias_nc_ptr, std::uintptr_t out_ptr, int num_threads) {
    check_sizes("group_norm_stats", dtype_code, N, C, S, G);
    if (N * S == 0) return;
    if (!x_ptr || !out_ptr) throw std::invalid_argument("group_norm_stats: x and out pointers must be non-null");
    Problem p{N, C, S, G, x_channels_last, x_channels_last, nullptr, nullptr,
              reinterpret_cast<const float*>(bias_nc_ptr), 1.0f, false};
    const void* x = reinterpret_cast<const void*>(x_ptr);
    double* out = reinterpret_cast<double*>(out_ptr);
    num_threads = std::max(1, num_threads);
    py::gil_scoped_release no_gil;
    with_loops(dtype_code, [&](auto loops, auto dtype) {
        run_stats<decltype(loops), decltype(dtype)::value>(p, x, out, num_threads);
    });
}

void group_norm_apply(std::uintptr_t x_ptr, std::uintptr_t y_ptr, int dtype_code, int64_t N, int64_t C, int64_t S,
                      bool x_channels_last, bool y_channels_last, std::uintptr_t center_ptr, std::uintptr_t scale_ptr,
                      std::uintptr_t shift_ptr, bool silu, int num_threads) {
    check_sizes("group_norm_apply", dtype_code, N, C, S, 1);
    if (N * S == 0) return;
    if (!x_ptr || !y_ptr || !center_ptr || !scale_ptr || !shift_ptr)
        throw std::invalid_argument("group_norm_apply: every pointer must be non-null");
    Problem p{N, C, S, 1, x_channels_last, y_channels_last, nullptr, nullptr, nullptr, 1.0f, silu};
    const ChannelParams ch{reinterpret_cast<const float*>(center_ptr), reinterpret_cast<const float*>(scale_ptr),
                           reinterpret_cast<const float*>(shift_ptr)};
    const void* x = reinterpret_cast<const void*>(x_ptr);
    void* y = reinterpret_cast<void*>(y_ptr);
    num_threads = std::max(1, num_threads);
    py::gil_scoped_release no_gil;
    with_loops(dtype_code, [&](auto loops, auto dtype) {
        run_apply<decltype(loops), decltype(dtype)::value>(p, x, y, ch, num_threads);
    });
}

// Sets the y size from which the AVX-512 apply uses streaming stores (0: always; -1: the default); returns the
// previous value.
int64_t set_stream_min_bytes(int64_t bytes) {
    if (bytes < -1) throw std::invalid_argument("group_norm_set_stream_min_bytes: bytes must be >= -1");
    const int64_t previous = stream_min_bytes;
    stream_min_bytes = bytes == -1 ? kStreamMinBytesDefault : bytes;
    return previous;
}

// "avx512" or "generic": the loops group_norm runs now.
std::string isa() { return use_avx512 ? "avx512" : "generic"; }

// Chooses the loops: "generic" always works, "avx512" only where the CPU has it; returns the previous choice.
std::string set_isa(const std::string& name) {
    const std::string previous = isa();
    if (name == "generic") {
        use_avx512 = false;
    } else if (name == "avx512") {
#if defined(PDM_HAVE_AVX512_PATH)
        if (!pdm_cpu::avx512_bf16_supported())
            throw std::invalid_argument("group_norm_set_isa: this CPU lacks AVX-512 F/BW/VL/DQ/BF16");
        use_avx512 = true;
#else
        throw std::invalid_argument("group_norm_set_isa: built without the AVX-512 path");
#endif
    } else {
        throw std::invalid_argument("group_norm_set_isa: expected 'avx512' or 'generic', got '" + name + "'");
    }
    return previous;
}

}  // namespace pdm_gn_cpu

void register_group_norm(py::module_& m) {
    pdm_gn_cpu::init_isa();
    m.def("group_norm", &pdm_gn_cpu::group_norm,
          "y = act(GroupNorm(x + bias_nc) * w + b). Pointers are addresses (0 = absent); dtype_code 0/1/2 = "
          "f32/f16/bf16 for x and y; w, b fp32 C-vectors; bias_nc fp32 N x C; S = spatial size; *_channels_last: "
          "memory order (N, S, C) instead of (N, C, S).",
          py::arg("x_ptr"), py::arg("y_ptr"), py::arg("dtype_code"), py::arg("N"), py::arg("C"), py::arg("S"),
          py::arg("G"), py::arg("x_channels_last"), py::arg("y_channels_last"), py::arg("w_ptr"), py::arg("b_ptr"),
          py::arg("bias_nc_ptr"), py::arg("eps"), py::arg("silu"), py::arg("num_threads"));
    m.def("group_norm_stats", &pdm_gn_cpu::group_norm_stats,
          "The statistics phases of group_norm alone: out (fp64, N x G x 3) = count, mean and centred second moment "
          "sum((v - mean)^2) of each group of x + bias_nc (bias_nc_ptr 0 = none).",
          py::arg("x_ptr"), py::arg("dtype_code"), py::arg("N"), py::arg("C"), py::arg("S"), py::arg("G"),
          py::arg("x_channels_last"), py::arg("bias_nc_ptr"), py::arg("out_ptr"), py::arg("num_threads"));
    m.def("group_norm_apply", &pdm_gn_cpu::group_norm_apply,
          "The apply phase of group_norm alone: y = act((x - center) * scale + shift) with fp32 N x C parameters.",
          py::arg("x_ptr"), py::arg("y_ptr"), py::arg("dtype_code"), py::arg("N"), py::arg("C"), py::arg("S"),
          py::arg("x_channels_last"), py::arg("y_channels_last"), py::arg("center_ptr"), py::arg("scale_ptr"),
          py::arg("shift_ptr"), py::arg("silu"), py::arg("num_threads"));
    m.def("group_norm_isa", &pdm_gn_cpu::isa, "The group_norm loops in use: 'avx512' or 'generic'.");
    m.def("group_norm_set_isa", &pdm_gn_cpu::set_isa, py::arg("name"),
          "Select the group_norm loops ('avx512' where supported, or 'generic'); returns the previous choice.");
    m.def("group_norm_set_stream_min_bytes", &pdm_gn_cpu::set_stream_min_bytes, py::arg("bytes"),
          "Output size in bytes from which the AVX-512 apply writes y with streaming (non-temporal) stores; 0 = "
          "always, -1 = the default. Returns the previous value.");
}
