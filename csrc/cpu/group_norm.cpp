// CPU GroupNorm: y = act(GN(x + bias_nc) * weight + bias) for x in NCS (channels first, S = D*H*W) or
// channels-last (N, S, C) memory order, y independently in either (the token-major N x S x C output is the
// channels-last order). Math shared with CUDA lives in csrc/common/group_norm.h.
//
// One OpenMP region, three phases, the same static task split in phases 1 and 3 so a thread re-reads the data it
// read itself (still in its cache when the problem is small):
//   1. stats: tasks are (n, chunk); a chunk is <= kChunkElems values that stay in L1/L2 between its mean pass
//      and its centred m2 pass. NCS chunks lie inside one channel; channels-last chunks are blocks of rows, with
//      per-channel accumulators merged into per-group partials before they are stored.
//   2. merge: per (n, group), Chan's formula over its partials (in double), then per-channel scale/shift.
//   3. apply: y = (x - center) * scale + shift (+ SiLU), loops vectorised along the contiguous axis.
// x is read from memory twice (phases 1 and 3) and y written once. The hot loops are compiled for AVX-512,
// AVX2 and baseline x86-64 (GCC target_clones) and the best one is picked at load time.
#include <pybind11/pybind11.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/group_norm.h"

namespace py = pybind11;

// GCC's partial redundancy elimination turns pdm::fast_exp's clamp into a branch that stops every loop calling
// pdm::silu from vectorising ("control flow in loop"); without it they vectorise.
#pragma GCC optimize("no-tree-pre")

namespace pdm_gn_cpu {

using pdm::MeanM2;

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

// Element load/store for the kernels: pdm::Convert, except fp16 uses the vectorisable forms above.
template <int D>
struct IO : pdm::Convert<D> {};
template <>
struct IO<pdm::kFloat16> {
    typedef pdm_u16 T;
    static float load(T v) { return half_to_float(v); }
    static T store(float v) { return float_to_half(v); }
};

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PDM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PDM_CLONES
#endif

// Values per statistics/apply chunk: 32 KB of fp32, so the second (centred) pass over a chunk hits L1/L2.
constexpr int64_t kChunkElems = 8192;
// Side of the square tiles used to transpose between NCS and channels-last in the apply pass.
constexpr int64_t kTile = 32;
// Below this many elements in total, threads cost more than they save.
constexpr int64_t kMinElemsPerThread = 16384;

// ---- hot loops ------------------------------------------------------------------------------------------------

// Mean (relative to the pivot x[0]) and centred m2 of len contiguous values: one chunk of one channel.
template <int D>
PDM_CLONES void span_mean_m2(const typename IO<D>::T* __restrict x, int64_t len, MeanM2<double>* out) {
    const float pivot = IO<D>::load(x[0]);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < len; ++i) sum += IO<D>::load(x[i]) - pivot;
    const float offset = sum / (float)len;
    const float mean = pivot + offset;
    float m2 = 0.0f;
#pragma omp simd reduction(+ : m2)
    for (int64_t i = 0; i < len; ++i) {
        const float d = IO<D>::load(x[i]) - mean;
        m2 += d * d;
    }
    out->count = (double)len;
    out->mean = (double)pivot + (double)offset;
    out->m2 = (double)m2;
}

// Per-channel statistics over `rows` channels-last rows of C channels: mean = pivot[c] + offset[c] (pivot: the
// first row), and centred m2.
template <int D>
PDM_CLONES void rows_mean_m2(const typename IO<D>::T* __restrict x, int64_t rows, int64_t C,
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

// Per-(sample, channel) apply parameters, one array each so channel loops vectorise (see pdm::GNChannel).
struct ChannelParams {
    const float *center_hi, *center_lo, *scale, *shift;
    ChannelParams at(int64_t i) const { return {center_hi + i, center_lo + i, scale + i, shift + i}; }
};

// y = act(((x - center) * scale + shift) over len contiguous values of one channel.
template <int D, bool SILU>
PDM_CLONES void apply_span(const typename IO<D>::T* __restrict x, typename IO<D>::T* __restrict y,
                           int64_t len, float center_hi, float center_lo, float scale, float shift) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i)
        y[i] = IO<D>::store(pdm::gn_apply(IO<D>::load(x[i]), center_hi, center_lo, scale, shift, SILU));
}

// The same over `rows` channels-last rows, parameters per channel.
template <int D, bool SILU>
PDM_CLONES void apply_rows(const typename IO<D>::T* __restrict x, typename IO<D>::T* __restrict y,
                           int64_t rows, int64_t C, const float* __restrict center_hi,
                           const float* __restrict center_lo, const float* __restrict scale,
                           const float* __restrict shift) {
    for (int64_t r = 0; r < rows; ++r) {
        const typename IO<D>::T* xr = x + r * C;
        typename IO<D>::T* yr = y + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c)
            yr[c] = IO<D>::store(
                pdm::gn_apply(IO<D>::load(xr[c]), center_hi[c], center_lo[c], scale[c], shift[c], SILU));
    }
}

// One tile of the transposing apply: `rows` spatial positions x `chans` channels. x_cl says which side is
// channels-last; a channels-last side has row stride C, an NCS side channel stride S. The tile goes through
// tmp (kTile x kTile floats, in L1) so that reads and writes both run along contiguous memory.
template <int D, bool SILU>
PDM_CLONES void apply_tile_transposed(const typename IO<D>::T* __restrict x,
                                      typename IO<D>::T* __restrict y, int64_t rows, int64_t chans, int64_t S,
                                      int64_t C, bool x_cl, ChannelParams ch, float* __restrict tmp) {
    if (!x_cl) {  // NCS -> channels-last: read channel rows, write spatial rows
        for (int64_t c = 0; c < chans; ++c) {
            const typename IO<D>::T* xc = x + c * S;
            const float hi = ch.center_hi[c], lo = ch.center_lo[c], sc = ch.scale[c], sh = ch.shift[c];
            for (int64_t s = 0; s < rows; ++s)
                tmp[s * kTile + c] = pdm::gn_apply(IO<D>::load(xc[s]), hi, lo, sc, sh, SILU);
        }
        for (int64_t s = 0; s < rows; ++s) {
            typename IO<D>::T* ys = y + s * C;
#pragma omp simd
            for (int64_t c = 0; c < chans; ++c) ys[c] = IO<D>::store(tmp[s * kTile + c]);
        }
    } else {  // channels-last -> NCS
        for (int64_t s = 0; s < rows; ++s) {
            const typename IO<D>::T* xs = x + s * C;
#pragma omp simd
            for (int64_t c = 0; c < chans; ++c)
                tmp[c * kTile + s] = pdm::gn_apply(IO<D>::load(xs[c]), ch.center_hi[c], ch.center_lo[c],
                                                   ch.scale[c], ch.shift[c], SILU);
        }
        for (int64_t c = 0; c < chans; ++c) {
            typename IO<D>::T* yc = y + c * S;
#pragma omp simd
            for (int64_t s = 0; s < rows; ++s) yc[s] = IO<D>::store(tmp[c * kTile + s]);
        }
    }
}

// ---- driver ---------------------------------------------------------------------------------------------------

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
    const int64_t rows = std::max<int64_t>(1, kChunkElems / C);
    return {(S + rows - 1) / rows, rows};
}

template <int D, bool SILU>
void apply_phase(const Problem& p, const typename IO<D>::T* x, typename IO<D>::T* y,
                 const ChannelParams& ch, const Chunking& ncs, const Chunking& cl, float* tmp) {
    const int64_t N = p.N, C = p.C, S = p.S;
    if (!p.x_cl && !p.y_cl) {
#pragma omp for schedule(static)
        for (int64_t task = 0; task < N * C * ncs.per_unit; ++task) {
            const int64_t nc = task / ncs.per_unit, j = task % ncs.per_unit;
            const int64_t start = j * ncs.length, len = std::min(ncs.length, S - start);
            const int64_t off = nc * S + start;
            apply_span<D, SILU>(x + off, y + off, len, ch.center_hi[nc], ch.center_lo[nc], ch.scale[nc],
                                ch.shift[nc]);
        }
    } else if (p.x_cl && p.y_cl) {
#pragma omp for schedule(static)
        for (int64_t task = 0; task < N * cl.per_unit; ++task) {
            const int64_t n = task / cl.per_unit, j = task % cl.per_unit;
            const int64_t r0 = j * cl.length, rows = std::min(cl.length, S - r0);
            const int64_t off = (n * S + r0) * C;
            const ChannelParams chn = ch.at(n * C);
            apply_rows<D, SILU>(x + off, y + off, rows, C, chn.center_hi, chn.center_lo, chn.scale, chn.shift);
        }
    } else {
        const int64_t tiles = (S + kTile - 1) / kTile;
#pragma omp for schedule(static)
        for (int64_t task = 0; task < N * tiles; ++task) {
            const int64_t n = task / tiles, s0 = (task % tiles) * kTile, rows = std::min(kTile, S - s0);
            for (int64_t c0 = 0; c0 < C; c0 += kTile) {
                const int64_t chans = std::min(kTile, C - c0);
                const int64_t x_off = p.x_cl ? (n * S + s0) * C + c0 : (n * C + c0) * S + s0;
                const int64_t y_off = p.y_cl ? (n * S + s0) * C + c0 : (n * C + c0) * S + s0;
                apply_tile_transposed<D, SILU>(x + x_off, y + y_off, rows, chans, S, C, p.x_cl, ch.at(n * C + c0),
                                               tmp);
            }
        }
    }
}

template <int D>
void run(const Problem& p, const void* x_raw, void* y_raw, int num_threads) {
    typedef typename IO<D>::T T;
    const T* x = static_cast<const T*>(x_raw);
    T* y = static_cast<T*>(y_raw);
    const int64_t N = p.N, C = p.C, S = p.S, G = p.G, Cg = C / G;

    const Chunking ncs = ncs_chunking(S);
    const Chunking cl = cl_chunking(S, C);
    // Partial statistics: NCS: one per (n, c, chunk); channels-last: one per (n, chunk, group).
    const int64_t num_partials = p.x_cl ? N * cl.per_unit * G : N * C * ncs.per_unit;
    std::vector<MeanM2<double>> partials(num_partials);
    std::vector<float> center_hi(N * C), center_lo(N * C), scale(N * C), shift(N * C);
    const ChannelParams ch{center_hi.data(), center_lo.data(), scale.data(), shift.data()};

    const int64_t total = N * C * S;
    const int threads = (int)std::max<int64_t>(1, std::min<int64_t>(num_threads, total / kMinElemsPerThread));

#pragma omp parallel num_threads(threads)
    {
        // Per-thread scratch: channel accumulators (channels-last stats) and one transpose tile.
        std::vector<float> pivot(p.x_cl ? C : 0), offset(p.x_cl ? C : 0), m2(p.x_cl ? C : 0);
        std::vector<float> tile((p.x_cl != p.y_cl) ? kTile * kTile : 0);

        // 1. partial statistics
        if (!p.x_cl) {
#pragma omp for schedule(static)
            for (int64_t task = 0; task < N * C * ncs.per_unit; ++task) {
                const int64_t nc = task / ncs.per_unit, j = task % ncs.per_unit;
                const int64_t start = j * ncs.length, len = std::min(ncs.length, S - start);
                span_mean_m2<D>(x + nc * S + start, len, &partials[task]);
            }
        } else {
#pragma omp for schedule(static)
            for (int64_t task = 0; task < N * cl.per_unit; ++task) {
                const int64_t n = task / cl.per_unit, j = task % cl.per_unit;
                const int64_t r0 = j * cl.length, rows = std::min(cl.length, S - r0);
                rows_mean_m2<D>(x + (n * S + r0) * C, rows, C, pivot.data(), offset.data(), m2.data());
                for (int64_t g = 0; g < G; ++g) {
                    MeanM2<double> acc = pdm::mean_m2_empty<double>();
                    for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
                        double mean_c = (double)pivot[c] + (double)offset[c];
                        if (p.bias_nc) mean_c += (double)p.bias_nc[n * C + c];
                        pdm::mean_m2_merge(acc, (double)rows, mean_c, (double)m2[c]);
                    }
                    partials[task * G + g] = acc;
                }
            }
        }

        // 2. merge per (n, group); per-channel apply parameters
#pragma omp for schedule(static)
        for (int64_t ng = 0; ng < N * G; ++ng) {
            const int64_t n = ng / G, g = ng % G;
            MeanM2<double> group = pdm::mean_m2_empty<double>();
            if (!p.x_cl) {
                for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
                    MeanM2<double> chan = pdm::mean_m2_empty<double>();
                    const MeanM2<double>* part = &partials[(n * C + c) * ncs.per_unit];
                    for (int64_t j = 0; j < ncs.per_unit; ++j) pdm::mean_m2_merge(chan, part[j]);
                    if (p.bias_nc) pdm::gn_add_to_mean(chan, (double)p.bias_nc[n * C + c]);
                    pdm::mean_m2_merge(group, chan);
                }
            } else {
                for (int64_t j = 0; j < cl.per_unit; ++j)
                    pdm::mean_m2_merge(group, partials[(n * cl.per_unit + j) * G + g]);
            }
            const float rstd = pdm::gn_rstd((float)group.m2, (float)group.count, p.eps);
            for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
                const pdm::GNChannel chan =
                    pdm::gn_channel(group.mean, rstd, p.weight ? p.weight[c] : 1.0f, p.bias ? p.bias[c] : 0.0f,
                                    p.bias_nc ? p.bias_nc[n * C + c] : 0.0f);
                center_hi[n * C + c] = chan.center_hi;
                center_lo[n * C + c] = chan.center_lo;
                scale[n * C + c] = chan.scale;
                shift[n * C + c] = chan.shift;
            }
        }

        // 3. apply
        if (p.silu)
            apply_phase<D, true>(p, x, y, ch, ncs, cl, tile.data());
        else
            apply_phase<D, false>(p, x, y, ch, ncs, cl, tile.data());
    }
}

void group_norm(std::uintptr_t x_ptr, std::uintptr_t y_ptr, int dtype_code, int64_t N, int64_t C, int64_t S,
                int64_t G, bool x_channels_last, bool y_channels_last, std::uintptr_t w_ptr, std::uintptr_t b_ptr,
                std::uintptr_t bias_nc_ptr, double eps, bool silu, int num_threads) {
    if (N < 0 || C < 1 || S < 0 || G < 1) throw std::invalid_argument("group_norm: sizes must be N>=0, C>=1, S>=0, G>=1");
    if (C % G) throw std::invalid_argument("group_norm: num_groups must divide C");
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
    switch (dtype_code) {
        case pdm::kFloat32: run<pdm::kFloat32>(p, x, y, num_threads); break;
        case pdm::kFloat16: run<pdm::kFloat16>(p, x, y, num_threads); break;
        case pdm::kBFloat16: run<pdm::kBFloat16>(p, x, y, num_threads); break;
        default: throw std::invalid_argument("group_norm: dtype_code must be 0 (f32), 1 (f16) or 2 (bf16)");
    }
}

}  // namespace pdm_gn_cpu

void register_group_norm(py::module_& m) {
    m.def("group_norm", &pdm_gn_cpu::group_norm,
          "y = act(GroupNorm(x + bias_nc) * w + b). Pointers are addresses (0 = absent); dtype_code 0/1/2 = "
          "f32/f16/bf16 for x and y; w, b fp32 C-vectors; bias_nc fp32 N x C; S = spatial size; *_channels_last: "
          "memory order (N, S, C) instead of (N, C, S).",
          py::arg("x_ptr"), py::arg("y_ptr"), py::arg("dtype_code"), py::arg("N"), py::arg("C"), py::arg("S"),
          py::arg("G"), py::arg("x_channels_last"), py::arg("y_channels_last"), py::arg("w_ptr"), py::arg("b_ptr"),
          py::arg("bias_nc_ptr"), py::arg("eps"), py::arg("silu"), py::arg("num_threads"));
}
