// pydiffmed.ops.fused_step for CUDA: one pass over memory (csrc/common/fused_step.h) with in-kernel Philox
// noise (csrc/common/philox.h). Compiled at run time by NVRTC (pydiffmed/_cuda.py, fused_step_launch) without
// fast-math and without multiply-add contraction, so the results equal the CPU kernel's and the torch
// reference's bit for bit; the test suite compiles it with nvcc and runs it on the CPU through an emulation.
//
// Grid: x over the Philox blocks of a sample (4 logical elements per thread, one Philox call), y over samples.
// Coefficients, the step index and the noise step are read from device memory: nothing is decided on the host
// from device values, so the launch can be captured in a CUDA graph and replayed for every step.
#include "pdm_common.h"
#include "philox.h"
#include "fused_step.h"

namespace {

__device__ __forceinline__ float load_f32(const void* base, int dtype, long long i) {
    switch (dtype) {
        case pdm::kFloat16: return pdm::f16_to_f32(static_cast<const pdm_u16*>(base)[i]);
        case pdm::kBFloat16: return pdm::bf16_to_f32(static_cast<const pdm_u16*>(base)[i]);
        default: return static_cast<const float*>(base)[i];
    }
}

__device__ __forceinline__ void store_f32(void* base, int dtype, long long i, float v) {
    switch (dtype) {
        case pdm::kFloat16: static_cast<pdm_u16*>(base)[i] = pdm::f32_to_f16(v); break;
        case pdm::kBFloat16: static_cast<pdm_u16*>(base)[i] = pdm::f32_to_bf16(v); break;
        default: static_cast<float*>(base)[i] = v; break;
    }
}

// A buffer that may be absent: 0 when its coefficient is 0 (not read), NaN when the coefficient is nonzero.
__device__ __forceinline__ float load_term_input(const void* base, int dtype, long long i, float coef) {
    if (coef == 0.0f) return 0.0f;
    return base ? load_f32(base, dtype, i) : pdm::bits_f32(0x7fc00000u);
}

}  // namespace

extern "C" __global__ void fused_step_kernel(
    const void* x, int x_dtype, const void* m, int m_dtype, const void* m_cond, int m_cond_dtype, float guidance,
    const void* h1, int h1_dtype, const void* h2, int h2_dtype, const void* h3, int h3_dtype,
    const void* noise, int noise_dtype, const long long* seeds,
    void* out, int out_dtype, void* model_input, int model_input_dtype, void* x0_out, int x0_out_dtype,
    const float* coefs, long long step_stride, long long batch_stride, const long long* step_index,
    long long num_steps, unsigned int noise_step, const long long* noise_step_ptr,
    long long numel, long long channels, long long spatial, int channels_last, long long noise_offset,
    long long noise_plane) {
    const long long b = blockIdx.y;
    const long long block = (long long)blockIdx.x * blockDim.x + threadIdx.x;  // Philox block in the sample
    const long long first = 4 * block;
    if (first >= numel) return;
    const pdm::StepCoefs k = pdm::load_step_coefs(coefs, step_index, num_steps, step_stride, batch_stride, b);

    float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (k.s != 0.0f && !noise) {
        if (seeds) {
            const unsigned int step = noise_step_ptr ? (unsigned int)(*noise_step_ptr) : noise_step;
            if (noise_offset == 0 && noise_plane == spatial) {
                pdm::philox_normal4((pdm_u64)seeds[b], step, (pdm_u64)block, z[0], z[1], z[2], z[3]);
            } else {  // a slab of a larger volume: element (c, s) draws index c·noise_plane + noise_offset + s
                for (int lane = 0; lane < 4 && first + lane < numel; ++lane) {
                    const long long i = first + lane, c = i / spatial;
                    const long long v = c * noise_plane + noise_offset + (i - c * spatial);
                    float w[4];
                    pdm::philox_normal4((pdm_u64)seeds[b], step, (pdm_u64)(v >> 2), w[0], w[1], w[2], w[3]);
                    z[lane] = w[v & 3];
                }
            }
        } else {
            z[0] = z[1] = z[2] = z[3] = pdm::bits_f32(0x7fc00000u);
        }
    }
    const bool need_x = k.p_x != 0.0f || k.a != 0.0f;
    for (int lane = 0; lane < 4; ++lane) {
        const long long i = first + lane;
        if (i >= numel) break;
        long long offset = b * numel + i;
        if (channels_last) {
            const long long c = i / spatial;
            offset = b * numel + (i - c * spatial) * channels + c;
        }
        const float xv = need_x ? load_f32(x, x_dtype, offset) : 0.0f;
        float mv = 0.0f;
        if (k.p_m != 0.0f) {
            mv = load_f32(m, m_dtype, offset);
            if (m_cond) mv = pdm::guided(mv, load_f32(m_cond, m_cond_dtype, offset), guidance);
        }
        const float x0 = pdm::step_x0(k, xv, mv);
        const float hv1 = load_term_input(h1, h1_dtype, offset, k.c[0]);
        const float hv2 = load_term_input(h2, h2_dtype, offset, k.c[1]);
        const float hv3 = load_term_input(h3, h3_dtype, offset, k.c[2]);
        const float zv = noise ? load_term_input(noise, noise_dtype, offset, k.s) : z[lane];
        const float v = pdm::step_update(k, xv, x0, hv1, hv2, hv3, zv);
        // Stores after every load: an output may be one of the inputs (out = x, x0_out = h1, ...).
        if (x0_out) store_f32(x0_out, x0_out_dtype, offset, x0);
        store_f32(out, out_dtype, offset, v);
        if (model_input) store_f32(model_input, model_input_dtype, offset, v);
    }
}

// Per-sample sums of squares for pydiffmed.ops.per_sample_norm: thread g of sample b (grid y) sums elements
// g, g + T, g + 2T, ... of the sample's contiguous block (T = threads per sample: coalesced reads) into
// partial[b·T + g]; the caller adds the partials in fp64. No shared memory, no atomics: deterministic.
extern "C" __global__ void per_sample_sumsq_kernel(const void* t, int dtype, long long numel, float* partial) {
    const long long b = blockIdx.y;
    const long long threads = (long long)gridDim.x * blockDim.x;
    const long long g = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    float sum = 0.0f;
    for (long long i = g; i < numel; i += threads) {
        const float v = load_f32(t, dtype, b * numel + i);
        sum += v * v;
    }
    partial[b * threads + g] = sum;
}
