// CPU kernel of pydiffmed.ops.fused_step: one pass over memory, OpenMP over (sample, tile), every loop a
// plain fp32 loop over a tile that GCC vectorises (one clone per ISA through target_clones).
//
// Work is split into rows: contiguous tensors have one row per sample (logical index = memory order);
// channels_last tensors have one row per (sample, channel), read with stride C (logical index c·S + s). A tile
// of a row is converted to fp32 scratch arrays (any dtype, any stride), combined, and converted back, so
// mixed dtypes cost no per-element branches. Noise is generated per tile from the logical indices.
//
// Multiply-add contraction is off in this file so the results equal the torch reference's (separately
// rounded) operations bit for bit, the Philox normals included.
#pragma GCC optimize("fp-contract=off")

#include <pybind11/pybind11.h>

// GCC 12 warns about its own AVX-512 intrinsic headers (_mm512_undefined_*) where they are inlined here.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/fused_step.h"
#include "common/philox.h"

namespace py = pybind11;

namespace {

// Helpers are forced inline so each target_clones copy of step_tile gets them compiled for its ISA.
#define PDM_CPU_INLINE inline __attribute__((always_inline))

constexpr int kTile = 1024;  // elements; a multiple of 4 so tiles of contiguous rows start on Philox blocks

struct Buffer {
    const void* ptr;
    int dtype;
};

struct StepKernelArgs {
    Buffer x, m, m_cond, h[3], noise;
    float guidance;
    const long long* seeds;
    void* out;
    int out_dtype;
    void* model_input;
    int model_input_dtype;
    void* x0_out;
    int x0_out_dtype;
    const float* coefs;
    long long step_stride, batch_stride, num_steps;
    const long long* step_index;
    pdm_u32 noise_step;
    const long long* noise_step_ptr;
    long long noise_offset, noise_plane;  // Philox index of element (c, s): c·noise_plane + noise_offset + s
    long long batch, channels, spatial;
    bool channels_last;
};

// fp16 <-> fp32 of contiguous runs with the F16C / AVX-512 conversion instructions where the CPU has them
// (GCC does not vectorise the portable bit manipulation or _Float16 casts); all round to nearest even, so
// every path gives the same values. Chosen once at run time.
void f16_load_portable(const pdm_u16* src, int n, float* dst) {
    for (int j = 0; j < n; ++j) dst[j] = pdm::f16_to_f32(src[j]);
}

void f16_store_portable(pdm_u16* dst, int n, const float* src) {
    for (int j = 0; j < n; ++j) dst[j] = pdm::f32_to_f16(src[j]);
}

__attribute__((target("avx2,f16c"))) void f16_load_f16c(const pdm_u16* src, int n, float* dst) {
    int j = 0;
    for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
    f16_load_portable(src + j, n - j, dst + j);
}

__attribute__((target("avx2,f16c"))) void f16_store_f16c(pdm_u16* dst, int n, const float* src) {
    int j = 0;
    for (; j + 8 <= n; j += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + j),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    f16_store_portable(dst + j, n - j, src + j);
}

__attribute__((target("avx512f"))) void f16_load_avx512(const pdm_u16* src, int n, float* dst) {
    int j = 0;
    for (; j + 16 <= n; j += 16)
        _mm512_storeu_ps(dst + j, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j))));
    f16_load_portable(src + j, n - j, dst + j);
}

__attribute__((target("avx512f"))) void f16_store_avx512(pdm_u16* dst, int n, const float* src) {
    int j = 0;
    for (; j + 16 <= n; j += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j),
                            _mm512_cvtps_ph(_mm512_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    f16_store_portable(dst + j, n - j, src + j);
}

struct F16Converters {
    void (*load)(const pdm_u16*, int, float*);
    void (*store)(pdm_u16*, int, const float*);
};

const F16Converters& f16_converters() {
    static const F16Converters converters = [] {
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx512f")) return F16Converters{f16_load_avx512, f16_store_avx512};
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c"))
            return F16Converters{f16_load_f16c, f16_store_f16c};
        return F16Converters{f16_load_portable, f16_store_portable};
    }();
    return converters;
}

template <int D>
PDM_CPU_INLINE void load_as(const void* base, long long offset, long long stride, int n, float* dst) {
    typedef typename pdm::Convert<D>::T T;
    const T* p = static_cast<const T*>(base) + offset;
    if (stride == 1) {
        for (int j = 0; j < n; ++j) dst[j] = pdm::Convert<D>::load(p[j]);
    } else {
        for (int j = 0; j < n; ++j) dst[j] = pdm::Convert<D>::load(p[j * stride]);
    }
}

template <int D>
PDM_CPU_INLINE void store_as(void* base, long long offset, long long stride, int n, const float* src) {
    typedef typename pdm::Convert<D>::T T;
    T* p = static_cast<T*>(base) + offset;
    if (stride == 1) {
        for (int j = 0; j < n; ++j) p[j] = pdm::Convert<D>::store(src[j]);
    } else {
        for (int j = 0; j < n; ++j) p[j * stride] = pdm::Convert<D>::store(src[j]);
    }
}

PDM_CPU_INLINE void load_tile(const void* base, int dtype, long long offset, long long stride, int n, float* dst) {
    if (dtype == pdm::kFloat16 && stride == 1) {
        f16_converters().load(static_cast<const pdm_u16*>(base) + offset, n, dst);
        return;
    }
    switch (dtype) {
        case pdm::kFloat16: load_as<pdm::kFloat16>(base, offset, stride, n, dst); break;
        case pdm::kBFloat16: load_as<pdm::kBFloat16>(base, offset, stride, n, dst); break;
        default: load_as<pdm::kFloat32>(base, offset, stride, n, dst); break;
    }
}

PDM_CPU_INLINE void store_tile(void* base, int dtype, long long offset, long long stride, int n, const float* src) {
    if (dtype == pdm::kFloat16 && stride == 1) {
        f16_converters().store(static_cast<pdm_u16*>(base) + offset, n, src);
        return;
    }
    switch (dtype) {
        case pdm::kFloat16: store_as<pdm::kFloat16>(base, offset, stride, n, src); break;
        case pdm::kBFloat16: store_as<pdm::kBFloat16>(base, offset, stride, n, src); break;
        default: store_as<pdm::kFloat32>(base, offset, stride, n, src); break;
    }
}

PDM_CPU_INLINE void fill(float* dst, int n, float v) {
    for (int j = 0; j < n; ++j) dst[j] = v;
}

// Philox4x32-10 output words of `count` consecutive blocks starting at `block0` (counter = (block lo, block hi,
// step, 0), key = seed) into four word arrays. The AVX-512 version runs 16 blocks per vector with 32x32->64
// even/odd multiplies (GCC vectorises the portable loop with slow 64-bit multiplies instead).
void philox_words_portable(pdm_u64 seed, pdm_u32 step, long long block0, int count, pdm_u32* w0, pdm_u32* w1,
                           pdm_u32* w2, pdm_u32* w3) {
    const pdm_u32 k0 = (pdm_u32)seed, k1 = (pdm_u32)(seed >> 32);
    for (int q = 0; q < count; ++q) {
        const pdm_u64 block = (pdm_u64)(block0 + q);
        pdm_u32 c0 = (pdm_u32)block, c1 = (pdm_u32)(block >> 32), c2 = step, c3 = 0u;
        pdm::philox4x32_10(c0, c1, c2, c3, k0, k1);
        w0[q] = c0;
        w1[q] = c1;
        w2[q] = c2;
        w3[q] = c3;
    }
}

__attribute__((target("avx512f"))) inline void mulhilo16(__m512i a, __m512i multiplier, __m512i& hi,
                                                        __m512i& lo) {
    const __m512i even = _mm512_mul_epu32(a, multiplier);                        // 64-bit products, even lanes
    const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), multiplier);  // odd lanes
    hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
    lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

__attribute__((target("avx512f"))) void philox_words_avx512(pdm_u64 seed, pdm_u32 step, long long block0,
                                                            int count, pdm_u32* w0, pdm_u32* w1, pdm_u32* w2,
                                                            pdm_u32* w3) {
    const pdm_u64 first = (pdm_u64)block0;
    int q = 0;
    // 16 blocks per vector while their low counter words do not wrap (they always do not below 2^34 elements)
    if ((first & 0xffffffffull) + (pdm_u64)count <= 0x100000000ull) {
        const __m512i m0 = _mm512_set1_epi64(pdm::kPhiloxM0), m1 = _mm512_set1_epi64(pdm::kPhiloxM1);
        const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        for (; q + 16 <= count; q += 16) {
            __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32((int)(pdm_u32)(first + q)), iota);
            __m512i c1 = _mm512_set1_epi32((int)(pdm_u32)((first + q) >> 32));
            __m512i c2 = _mm512_set1_epi32((int)step);
            __m512i c3 = _mm512_setzero_si512();
            __m512i k0 = _mm512_set1_epi32((int)(pdm_u32)seed), k1 = _mm512_set1_epi32((int)(pdm_u32)(seed >> 32));
            for (int round = 0; round < 10; ++round) {
                if (round) {
                    k0 = _mm512_add_epi32(k0, _mm512_set1_epi32((int)pdm::kPhiloxW0));
                    k1 = _mm512_add_epi32(k1, _mm512_set1_epi32((int)pdm::kPhiloxW1));
                }
                __m512i hi0, lo0, hi1, lo1;
                mulhilo16(c0, m0, hi0, lo0);
                mulhilo16(c2, m1, hi1, lo1);
                c0 = _mm512_ternarylogic_epi32(hi1, c1, k0, 0x96);  // three-way xor
                c1 = lo1;
                c2 = _mm512_ternarylogic_epi32(hi0, c3, k1, 0x96);
                c3 = lo0;
            }
            _mm512_storeu_si512(w0 + q, c0);
            _mm512_storeu_si512(w1 + q, c1);
            _mm512_storeu_si512(w2 + q, c2);
            _mm512_storeu_si512(w3 + q, c3);
        }
    }
    philox_words_portable(seed, step, block0 + q, count - q, w0 + q, w1 + q, w2 + q, w3 + q);
}

typedef void (*PhiloxWords)(pdm_u64, pdm_u32, long long, int, pdm_u32*, pdm_u32*, pdm_u32*, pdm_u32*);

PhiloxWords philox_words() {
    static const PhiloxWords chosen = [] {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") ? philox_words_avx512 : philox_words_portable;
    }();
    return chosen;
}

// Normals of the logical indices [first, first + n) of one sample into dst.
PDM_CPU_INLINE void philox_normals(pdm_u64 seed, pdm_u32 step, long long first, int n, float* dst) {
    constexpr int kBlocks = kTile / 4 + 1;  // a tile may start and end inside a block
    alignas(64) pdm_u32 words[4][kBlocks];
    alignas(64) float lane[4][kBlocks];
    const long long block0 = first >> 2;
    const int blocks = (int)(((first + n + 3) >> 2) - block0);
    philox_words()(seed, step, block0, blocks, words[0], words[1], words[2], words[3]);
    for (int q = 0; q < blocks; ++q) {
        pdm::box_muller(words[0][q], words[1][q], lane[0][q], lane[1][q]);
        pdm::box_muller(words[2][q], words[3][q], lane[2][q], lane[3][q]);
    }
    const int skip = (int)(first - 4 * block0);
    if (skip == 0) {
        for (int q = 0; q < n / 4; ++q) {
            dst[4 * q] = lane[0][q];
            dst[4 * q + 1] = lane[1][q];
            dst[4 * q + 2] = lane[2][q];
            dst[4 * q + 3] = lane[3][q];
        }
        for (int j = n & ~3; j < n; ++j) dst[j] = lane[j & 3][j >> 2];
    } else {
        for (int j = 0; j < n; ++j) {
            const int i = j + skip;
            dst[j] = lane[i & 3][i >> 2];
        }
    }
}

// One tile: elements [j0, j0 + n) of row `row`.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void step_tile(const StepKernelArgs& a, long long row, long long j0, int n) {
    alignas(64) float xb[kTile], mb[kTile], tb[kTile], x0b[kTile], acc[kTile];
    const long long numel = a.channels * a.spatial;
    long long b, offset, stride, first;
    if (a.channels_last) {
        b = row / a.channels;
        long long c = row - b * a.channels;
        stride = a.channels;
        offset = b * numel + j0 * a.channels + c;
        first = c * a.spatial + j0;
    } else {
        b = row;
        stride = 1;
        offset = b * numel + j0;
        first = j0;
    }
    const pdm::StepCoefs k = pdm::load_step_coefs(a.coefs, a.step_index, a.num_steps, a.step_stride,
                                                  a.batch_stride, b);
    const float nan = std::numeric_limits<float>::quiet_NaN();

    if (k.p_x != 0.0f || k.a != 0.0f) load_tile(a.x.ptr, a.x.dtype, offset, stride, n, xb);
    else fill(xb, n, 0.0f);
    if (k.p_m != 0.0f) {
        load_tile(a.m.ptr, a.m.dtype, offset, stride, n, mb);
        if (a.m_cond.ptr) {
            load_tile(a.m_cond.ptr, a.m_cond.dtype, offset, stride, n, tb);
            const float w = a.guidance;
            for (int j = 0; j < n; ++j) mb[j] = pdm::guided(mb[j], tb[j], w);
        }
    } else {
        fill(mb, n, 0.0f);
    }
    for (int j = 0; j < n; ++j) x0b[j] = pdm::step_x0(k, xb[j], mb[j]);

    for (int j = 0; j < n; ++j) acc[j] = pdm::step_term(k.a, xb[j]) + pdm::step_term(k.b, x0b[j]);
    for (int h = 0; h < 3; ++h) {
        const float coef = k.c[h];
        if (coef == 0.0f) continue;
        if (a.h[h].ptr) load_tile(a.h[h].ptr, a.h[h].dtype, offset, stride, n, tb);
        else fill(tb, n, nan);
        for (int j = 0; j < n; ++j) acc[j] = acc[j] + coef * tb[j];
    }
    if (k.s != 0.0f) {
        if (a.noise.ptr) {
            load_tile(a.noise.ptr, a.noise.dtype, offset, stride, n, tb);
        } else if (a.seeds) {
            pdm_u32 step = a.noise_step_ptr ? (pdm_u32)(*a.noise_step_ptr) : a.noise_step;
            if (a.noise_offset == 0 && a.noise_plane == a.spatial) {
                philox_normals((pdm_u64)a.seeds[b], step, first, n, tb);
            } else {  // a slab of a larger volume: the volume's indices, one contiguous run per channel
                for (int done = 0; done < n;) {
                    const long long i = first + done, c = i / a.spatial, pos = i - c * a.spatial;
                    const int len = (int)std::min<long long>(n - done, a.spatial - pos);
                    philox_normals((pdm_u64)a.seeds[b], step, c * a.noise_plane + a.noise_offset + pos, len,
                                   tb + done);
                    done += len;
                }
            }
        } else {
            fill(tb, n, nan);
        }
        const float s = k.s;
        for (int j = 0; j < n; ++j) acc[j] = acc[j] + s * tb[j];
    }
    // Stores after every load: an output may be one of the inputs (out = x, x0_out = h1, ...).
    if (a.x0_out) store_tile(a.x0_out, a.x0_out_dtype, offset, stride, n, x0b);
    store_tile(a.out, a.out_dtype, offset, stride, n, acc);
    if (a.model_input) store_tile(a.model_input, a.model_input_dtype, offset, stride, n, acc);
}

void run_fused_step(const StepKernelArgs& a, int num_threads) {
    const long long rows = a.channels_last ? a.batch * a.channels : a.batch;
    const long long row_len = a.channels_last ? a.spatial : a.channels * a.spatial;
    if (rows == 0 || row_len == 0) return;
    const long long tiles_per_row = (row_len + kTile - 1) / kTile;
    const long long tiles = rows * tiles_per_row;
#pragma omp parallel for schedule(dynamic, 2) num_threads(num_threads) if (tiles > 1)
    for (long long t = 0; t < tiles; ++t) {
        long long row = t / tiles_per_row;
        long long j0 = (t - row * tiles_per_row) * kTile;
        int n = (int)std::min<long long>(kTile, row_len - j0);
        step_tile(a, row, j0, n);
    }
}

// Sum of squares of elements [offset, offset + n) (n <= kTile): fp32 in 16 independent lanes, then fp64.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
double sumsq_chunk(const void* base, int dtype, long long offset, int n) {
    alignas(64) float buf[kTile];
    load_tile(base, dtype, offset, 1, n, buf);
    float lanes[16] = {0.0f};
    int j = 0;
    for (; j + 16 <= n; j += 16)
        for (int l = 0; l < 16; ++l) lanes[l] += buf[j + l] * buf[j + l];
    double total = 0.0;
    for (; j < n; ++j) total += (double)buf[j] * buf[j];
    for (int l = 0; l < 16; ++l) total += lanes[l];
    return total;
}

// Per-sample sums of squares of `batch` contiguous blocks of `numel` elements, into out[batch] (fp64). The
// chunk partials are combined in a fixed order: the result does not depend on the thread count.
void run_per_sample_sumsq(const void* base, int dtype, long long batch, long long numel, double* out,
                          int num_threads) {
    const long long chunks = (numel + kTile - 1) / kTile;
    std::vector<double> partial((size_t)(batch * chunks));
#pragma omp parallel for schedule(dynamic, 2) num_threads(num_threads) if (batch * chunks > 1)
    for (long long t = 0; t < batch * chunks; ++t) {
        long long b = t / chunks, j0 = (t - b * chunks) * kTile;
        partial[(size_t)t] = sumsq_chunk(base, dtype, b * numel + j0, (int)std::min<long long>(kTile, numel - j0));
    }
    for (long long b = 0; b < batch; ++b) {
        double total = 0.0;
        for (long long c = 0; c < chunks; ++c) total += partial[(size_t)(b * chunks + c)];
        out[b] = total;
    }
}

template <typename T>
T* as_ptr(std::uintptr_t p) {
    return reinterpret_cast<T*>(p);
}

}  // namespace

void register_fused_step(py::module_& m) {
    m.def(
        "fused_step",
        [](std::uintptr_t x, int x_dt, std::uintptr_t mo, int m_dt, std::uintptr_t mc, int mc_dt, double guidance,
           std::uintptr_t h1, int h1_dt, std::uintptr_t h2, int h2_dt, std::uintptr_t h3, int h3_dt,
           std::uintptr_t noise, int noise_dt, std::uintptr_t seeds, std::uintptr_t out, int out_dt,
           std::uintptr_t model_input, int mi_dt, std::uintptr_t x0_out, int x0_dt, std::uintptr_t coefs,
           long long step_stride, long long batch_stride, std::uintptr_t step_index, long long num_steps,
           long long noise_step, std::uintptr_t noise_step_ptr, long long noise_offset, long long noise_plane,
           long long batch, long long channels,
           long long spatial, bool channels_last, int num_threads) {
            StepKernelArgs a;
            a.x = {as_ptr<const void>(x), x_dt};
            a.m = {as_ptr<const void>(mo), m_dt};
            a.m_cond = {as_ptr<const void>(mc), mc_dt};
            a.h[0] = {as_ptr<const void>(h1), h1_dt};
            a.h[1] = {as_ptr<const void>(h2), h2_dt};
            a.h[2] = {as_ptr<const void>(h3), h3_dt};
            a.noise = {as_ptr<const void>(noise), noise_dt};
            a.guidance = (float)guidance;
            a.seeds = as_ptr<const long long>(seeds);
            a.out = as_ptr<void>(out);
            a.out_dtype = out_dt;
            a.model_input = as_ptr<void>(model_input);
            a.model_input_dtype = mi_dt;
            a.x0_out = as_ptr<void>(x0_out);
            a.x0_out_dtype = x0_dt;
            a.coefs = as_ptr<const float>(coefs);
            a.step_stride = step_stride;
            a.batch_stride = batch_stride;
            a.num_steps = num_steps;
            a.step_index = as_ptr<const long long>(step_index);
            a.noise_step = (pdm_u32)noise_step;
            a.noise_step_ptr = as_ptr<const long long>(noise_step_ptr);
            a.noise_offset = noise_offset;
            a.noise_plane = noise_plane;
            a.batch = batch;
            a.channels = channels;
            a.spatial = spatial;
            a.channels_last = channels_last;
            py::gil_scoped_release release;
            run_fused_step(a, std::max(1, num_threads));
        },
        "One fused solver step over raw pointers (validated by pydiffmed.ops.fused_step)");
    m.def(
        "per_sample_sumsq",
        [](std::uintptr_t t, int dtype, long long batch, long long numel, std::uintptr_t out, int num_threads) {
            py::gil_scoped_release release;
            run_per_sample_sumsq(as_ptr<const void>(t), dtype, batch, numel, as_ptr<double>(out),
                                 std::max(1, num_threads));
        },
        "Per-sample sums of squares (fp64) of contiguous sample blocks (pydiffmed.ops.per_sample_norm)");
}
