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

#include <algorithm>
#include <cstdint>
#include <limits>

#include "common/fused_step.h"
#include "common/philox.h"

namespace py = pybind11;

namespace {

// Helpers are forced inline so each target_clones copy of step_tile gets them compiled for its ISA.
#define PDM_CPU_INLINE inline __attribute__((always_inline))

constexpr int kTile = 2048;  // elements; a multiple of 4 so tiles of contiguous rows start on Philox blocks

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
    long long batch, channels, spatial;
    bool channels_last;
};

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
    switch (dtype) {
        case pdm::kFloat16: load_as<pdm::kFloat16>(base, offset, stride, n, dst); break;
        case pdm::kBFloat16: load_as<pdm::kBFloat16>(base, offset, stride, n, dst); break;
        default: load_as<pdm::kFloat32>(base, offset, stride, n, dst); break;
    }
}

PDM_CPU_INLINE void store_tile(void* base, int dtype, long long offset, long long stride, int n, const float* src) {
    switch (dtype) {
        case pdm::kFloat16: store_as<pdm::kFloat16>(base, offset, stride, n, src); break;
        case pdm::kBFloat16: store_as<pdm::kBFloat16>(base, offset, stride, n, src); break;
        default: store_as<pdm::kFloat32>(base, offset, stride, n, src); break;
    }
}

PDM_CPU_INLINE void fill(float* dst, int n, float v) {
    for (int j = 0; j < n; ++j) dst[j] = v;
}

// Normals of the logical indices [first, first + n) of one sample into dst.
PDM_CPU_INLINE void philox_normals(pdm_u64 seed, pdm_u32 step, long long first, int n, float* dst) {
    alignas(64) float lane[4][kTile / 4 + 2];
    long long block0 = first >> 2;
    int blocks = (int)(((first + n + 3) >> 2) - block0);
    pdm_u32 k0 = (pdm_u32)seed, k1 = (pdm_u32)(seed >> 32);
    for (int q = 0; q < blocks; ++q) {
        pdm_u64 block = (pdm_u64)(block0 + q);
        pdm_u32 c0 = (pdm_u32)block, c1 = (pdm_u32)(block >> 32), c2 = step, c3 = 0u;
        pdm::philox4x32_10(c0, c1, c2, c3, k0, k1);
        pdm::box_muller(c0, c1, lane[0][q], lane[1][q]);
        pdm::box_muller(c2, c3, lane[2][q], lane[3][q]);
    }
    int skip = (int)(first - 4 * block0);
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
            int i = j + skip;
            dst[j] = lane[i & 3][i >> 2];
        }
    }
}

// One tile: elements [j0, j0 + n) of row `row`.
__attribute__((target_clones("avx512f", "avx2", "default")))
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
            philox_normals((pdm_u64)a.seeds[b], step, first, n, tb);
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
#pragma omp parallel for schedule(static) num_threads(num_threads) if (tiles > 1)
    for (long long t = 0; t < tiles; ++t) {
        long long row = t / tiles_per_row;
        long long j0 = (t - row * tiles_per_row) * kTile;
        int n = (int)std::min<long long>(kTile, row_len - j0);
        step_tile(a, row, j0, n);
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
           long long noise_step, std::uintptr_t noise_step_ptr, long long batch, long long channels,
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
            a.batch = batch;
            a.channels = channels;
            a.spatial = spatial;
            a.channels_last = channels_last;
            py::gil_scoped_release release;
            run_fused_step(a, std::max(1, num_threads));
        },
        "One fused solver step over raw pointers (validated by pydiffmed.ops.fused_step)");
}
