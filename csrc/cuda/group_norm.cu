// GroupNorm(+bias_nc, +SiLU) for CUDA: y = act(GN(x + bias_nc) * weight + bias). Compiled at run time by NVRTC
// (pydiffmed/_cuda.py, group_norm_launch); the test suite compiles it with nvcc. The math is the CPU kernel's
// (csrc/common/group_norm.h): statistics in fp32, centred (Chan merges, never E[x^2] - E[x]^2). Three launches:
//
//   gn_stats_{ncs,cl}_<dtype>_v<V>  per-(sample, chunk, channel) partials of x over a chunk of spatial positions:
//       a pivot (the chunk's first value of that channel), the mean of x - pivot, the centred M2. Chunks split
//       the spatial axis so that small N*C still fills the GPU. NCS: one warp per (sample, channel, chunk)
//       segment. Channels-last: one block per (sample, chunk), threads across channels (V per thread) and rows.
//   gn_finalize  one block per (sample, group): combines the group's partials in fp64 (mean, then centred M2)
//       and writes per-(sample, channel) center_hi, center_lo, scale, shift (params planes 0..3).
//   gn_apply_{ncs,cl}_<dtype>_v<V> (same layout in and out), gn_apply_transpose_<dtype> (NCS <-> channels-last,
//       e.g. token-major output from NCS input, through a shared-memory tile).
//
// V = 4 loads four elements at once; the launcher picks it when the contiguous dimension is a multiple of 4 and
// the pointers are aligned, else V = 1.
#include "pdm_common.h"
#include "group_norm.h"

namespace {

constexpr int kUnroll = 4;       // independent loads in flight per thread
constexpr int kMaxThreads = 256;
constexpr unsigned kFullMask = 0xffffffffu;

typedef pdm::MeanM2<float> Stats;

// Element I/O. On the device, fp16 and bf16 use the hardware's round-to-nearest-even conversions (bf16 from
// sm_80 on), far cheaper than pdm_common.h's portable bit manipulation, with the same results for finite
// values; elsewhere (nvcc's host pass, the CPU emulation in tests/test_cuda_sources.py) the portable ones.
template <int D>
struct Io {
    typedef typename pdm::Convert<D>::T T;
    static __device__ __forceinline__ float load(T v) { return pdm::Convert<D>::load(v); }
    static __device__ __forceinline__ T store(float v) { return pdm::Convert<D>::store(v); }
};

template <>
struct Io<pdm::kFloat16> {
    typedef pdm_u16 T;
    static __device__ __forceinline__ float load(T v) {
#if defined(__CUDA_ARCH__)
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
        return f;
#else
        return pdm::f16_to_f32(v);
#endif
    }
    static __device__ __forceinline__ T store(float v) {
#if defined(__CUDA_ARCH__)
        T h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
        return h;
#else
        return pdm::f32_to_f16(v);
#endif
    }
};

template <>
struct Io<pdm::kBFloat16> {
    typedef pdm_u16 T;
    static __device__ __forceinline__ float load(T v) { return pdm::bf16_to_f32(v); }
    static __device__ __forceinline__ T store(float v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
        T h;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
        return h;
#else
        return pdm::f32_to_bf16(v);
#endif
    }
};

// V consecutive elements, loaded and stored as one access.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
    T v[V];
};

__device__ __forceinline__ long long min_ll(long long a, long long b) { return a < b ? a : b; }

// Merges V values (already minus the pivot) into s: their exact mean and M2 first, then one Chan merge.
template <int D, int V>
__device__ __forceinline__ void merge_pack(Stats& s, const Pack<typename Io<D>::T, V>& p, float pivot) {
    float d[V];
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < V; ++j) {
        d[j] = Io<D>::load(p.v[j]) - pivot;
        sum += d[j];
    }
    const float mean = sum * (1.0f / V);
    float m2 = 0.0f;
#pragma unroll
    for (int j = 0; j < V; ++j) m2 += (d[j] - mean) * (d[j] - mean);
    pdm::mean_m2_merge(s, (float)V, mean, m2);
}

__device__ __forceinline__ Stats warp_merge(Stats s) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float count = __shfl_xor_sync(kFullMask, s.count, offset);
        const float mean = __shfl_xor_sync(kFullMask, s.mean, offset);
        const float m2 = __shfl_xor_sync(kFullMask, s.m2, offset);
        pdm::mean_m2_merge(s, count, mean, m2);
    }
    return s;
}

// The sum of v over the block, returned to every thread. blockDim.x: a multiple of 32, at most kMaxThreads.
__device__ __forceinline__ double block_sum(double v, double* shared) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
    __syncthreads();  // a previous call may still be reading `shared`
    if ((threadIdx.x & 31) == 0) shared[threadIdx.x >> 5] = v;
    __syncthreads();
    double total = 0.0;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) total += shared[w];
    return total;
}

// Partials are planes of part_stride floats (pivot, mean of x - pivot, M2); entry (n, chunk, c) at
// (n * chunks + chunk) * C + c.
__device__ __forceinline__ void store_partial(float* part, long long part_stride, long long entry, float pivot,
                                              const Stats& s) {
    part[entry] = pivot;
    part[part_stride + entry] = s.mean;
    part[2 * part_stride + entry] = s.m2;
}

// NCS: warp w of the grid takes segment w = (n * C + c) * chunks + chunk of the row x[n, c, :].
template <int D, int V>
__device__ __forceinline__ void stats_ncs(const typename Io<D>::T* __restrict__ x, float* __restrict__ part,
                                          long long part_stride, int C, long long S, long long chunk_s, int chunks,
                                          long long segments) {
    typedef Pack<typename Io<D>::T, V> P;
    const int lane = threadIdx.x & 31;
    const long long seg = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (seg >= segments) return;  // whole warps leave together
    const long long row = seg / chunks;
    const int chunk = (int)(seg - row * chunks);
    const long long begin = (long long)chunk * chunk_s;
    const long long end = min_ll(begin + chunk_s, S);
    const typename Io<D>::T* xr = x + row * S;
    const float pivot = Io<D>::load(xr[begin]);
    Stats s = pdm::mean_m2_empty<float>();
    for (long long i = begin + (long long)lane * V; i < end; i += 32LL * V * kUnroll) {
        P p[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const long long j = i + (long long)u * 32 * V;
            if (j < end) p[u] = *reinterpret_cast<const P*>(xr + j);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            if (i + (long long)u * 32 * V < end) merge_pack<D, V>(s, p[u], pivot);
        }
    }
    s = warp_merge(s);
    if (lane == 0) {
        const long long n = row / C;
        const long long c = row - n * C;
        store_partial(part, part_stride, (n * chunks + chunk) * C + c, pivot, s);
    }
}

// Channels-last: block (chunk, n); thread (tx, ty) takes channels [cv*V, cv*V + V) for cv = tx, tx + TX, ... and
// rows begin + ty, begin + ty + TY, ...; the TY row-partials of a channel then merge through shared memory.
template <int D, int V>
__device__ __forceinline__ void stats_cl(const typename Io<D>::T* __restrict__ x, float* __restrict__ part,
                                         long long part_stride, int C, long long S, long long chunk_s, int chunks) {
    typedef Pack<typename Io<D>::T, V> P;
    __shared__ float sh_count[kMaxThreads];
    __shared__ float sh_mean[kMaxThreads * V];
    __shared__ float sh_m2[kMaxThreads * V];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int TX = blockDim.x, TY = blockDim.y;
    const int chunk = blockIdx.x;
    const long long n = blockIdx.y;
    const long long begin = (long long)chunk * chunk_s;
    const long long end = min_ll(begin + chunk_s, S);
    const int CV = C / V;
    const typename Io<D>::T* xn = x + n * S * C;
    const int slot = ty * TX + tx;
    for (int base = 0; base < CV; base += TX) {  // the same trip count for every thread (barriers inside)
        const int cv = base + tx;
        const bool active = cv < CV;
        float pivot[V], mean[V], m2[V];
        float count = 0.0f;
#pragma unroll
        for (int j = 0; j < V; ++j) pivot[j] = mean[j] = m2[j] = 0.0f;
        if (active) {
            const P first = *reinterpret_cast<const P*>(xn + begin * C + (long long)cv * V);
#pragma unroll
            for (int j = 0; j < V; ++j) pivot[j] = Io<D>::load(first.v[j]);
            for (long long r = begin + ty; r < end; r += (long long)TY * kUnroll) {
                P p[kUnroll];
#pragma unroll
                for (int u = 0; u < kUnroll; ++u) {
                    const long long row = r + (long long)u * TY;
                    if (row < end) p[u] = *reinterpret_cast<const P*>(xn + row * C + (long long)cv * V);
                }
#pragma unroll
                for (int u = 0; u < kUnroll; ++u) {
                    if (r + (long long)u * TY < end) {  // Welford: one reciprocal serves V channels
                        count += 1.0f;
                        const float inv = 1.0f / count;
#pragma unroll
                        for (int j = 0; j < V; ++j) {
                            const float d = Io<D>::load(p[u].v[j]) - pivot[j];
                            const float delta = d - mean[j];
                            mean[j] += delta * inv;
                            m2[j] += delta * (d - mean[j]);
                        }
                    }
                }
            }
        }
        sh_count[slot] = count;
#pragma unroll
        for (int j = 0; j < V; ++j) {
            sh_mean[slot * V + j] = mean[j];
            sh_m2[slot * V + j] = m2[j];
        }
        __syncthreads();
        for (int rows = TY; rows > 1;) {  // tree over ty; rows need not be a power of two
            const int half = (rows + 1) >> 1;
            if (ty + half < rows) {
                const int other = (ty + half) * TX + tx;
                const float count_b = sh_count[other];
#pragma unroll
                for (int j = 0; j < V; ++j) {
                    Stats a;
                    a.count = sh_count[slot];
                    a.mean = sh_mean[slot * V + j];
                    a.m2 = sh_m2[slot * V + j];
                    pdm::mean_m2_merge(a, count_b, sh_mean[other * V + j], sh_m2[other * V + j]);
                    sh_mean[slot * V + j] = a.mean;
                    sh_m2[slot * V + j] = a.m2;
                }
                sh_count[slot] += count_b;
            }
            __syncthreads();
            rows = half;
        }
        if (active && ty == 0) {
#pragma unroll
            for (int j = 0; j < V; ++j) {
                Stats s;
                s.count = sh_count[slot];
                s.mean = sh_mean[slot * V + j];
                s.m2 = sh_m2[slot * V + j];
                store_partial(part, part_stride, (n * chunks + chunk) * C + (long long)cv * V + j, pivot[j], s);
            }
        }
        __syncthreads();  // shared memory is rewritten by the next channel block
    }
}

// NCS, same layout out: block b takes tile (b % tiles_per_row) of row b / tiles_per_row = n * C + c.
template <int D, int V>
__device__ __forceinline__ void apply_ncs(const typename Io<D>::T* __restrict__ x, typename Io<D>::T* __restrict__ y,
                                          const float* __restrict__ params, long long nc, long long S,
                                          int tiles_per_row, int silu) {
    typedef Pack<typename Io<D>::T, V> P;
    const long long row = blockIdx.x / tiles_per_row;
    const int tile = (int)(blockIdx.x - row * tiles_per_row);
    const float center_hi = params[row], center_lo = params[nc + row];
    const float scale = params[2 * nc + row], shift = params[3 * nc + row];
    const long long step = (long long)blockDim.x * V;
    const long long i0 = (long long)tile * step * kUnroll + (long long)threadIdx.x * V;
    const typename Io<D>::T* xr = x + row * S;
    typename Io<D>::T* yr = y + row * S;
    P p[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
        const long long i = i0 + u * step;
        if (i < S) p[u] = *reinterpret_cast<const P*>(xr + i);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
        const long long i = i0 + u * step;
        if (i < S) {
            P out;
#pragma unroll
            for (int j = 0; j < V; ++j)
                out.v[j] = Io<D>::store(pdm::gn_apply(Io<D>::load(p[u].v[j]), center_hi, center_lo, scale, shift,
                                                      silu != 0));
            *reinterpret_cast<P*>(yr + i) = out;
        }
    }
}

// Channels-last, same layout out: block b takes rows of sample b / row_tiles; threads as in stats_cl.
template <int D, int V>
__device__ __forceinline__ void apply_cl(const typename Io<D>::T* __restrict__ x, typename Io<D>::T* __restrict__ y,
                                         const float* __restrict__ params, long long nc, int C, long long S,
                                         int row_tiles, int silu) {
    typedef Pack<typename Io<D>::T, V> P;
    const long long n = blockIdx.x / row_tiles;
    const int tile = (int)(blockIdx.x - n * row_tiles);
    const long long r0 = (long long)tile * blockDim.y * kUnroll + threadIdx.y;
    const int CV = C / V;
    const typename Io<D>::T* xn = x + n * S * C;
    typename Io<D>::T* yn = y + n * S * C;
    for (int cv = threadIdx.x; cv < CV; cv += blockDim.x) {
        float center_hi[V], center_lo[V], scale[V], shift[V];
#pragma unroll
        for (int j = 0; j < V; ++j) {
            const long long p = n * C + (long long)cv * V + j;
            center_hi[j] = params[p];
            center_lo[j] = params[nc + p];
            scale[j] = params[2 * nc + p];
            shift[j] = params[3 * nc + p];
        }
        P p[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const long long r = r0 + (long long)u * blockDim.y;
            if (r < S) p[u] = *reinterpret_cast<const P*>(xn + r * C + (long long)cv * V);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const long long r = r0 + (long long)u * blockDim.y;
            if (r < S) {
                P out;
#pragma unroll
                for (int j = 0; j < V; ++j)
                    out.v[j] = Io<D>::store(pdm::gn_apply(Io<D>::load(p[u].v[j]), center_hi[j], center_lo[j],
                                                          scale[j], shift[j], silu != 0));
                *reinterpret_cast<P*>(yn + r * C + (long long)cv * V) = out;
            }
        }
    }
}

// x and y in different layouts: a 32 (channels) x 32 (positions) tile per block (32 x 8 threads), read along
// x's contiguous dimension, written along y's. Grid (position tiles, channel tiles, N).
template <int D>
__device__ __forceinline__ void apply_transpose(const typename Io<D>::T* __restrict__ x,
                                                typename Io<D>::T* __restrict__ y, const float* __restrict__ params,
                                                long long nc, int C, long long S, int x_cl, int y_cl, int silu) {
    __shared__ float tile[32][33];
    const long long s0 = (long long)blockIdx.x * 32;
    const int c0 = blockIdx.y * 32;
    const long long n = blockIdx.z;
    const int tx = threadIdx.x;
    for (int i = threadIdx.y; i < 32; i += blockDim.y) {
        const int c_l = x_cl ? tx : i;
        const int s_l = x_cl ? i : tx;
        const int c = c0 + c_l;
        const long long s = s0 + s_l;
        if (c < C && s < S) {
            const long long p = n * C + c;
            const long long off = x_cl ? (n * S + s) * C + c : p * S + s;
            tile[c_l][s_l] = pdm::gn_apply(Io<D>::load(x[off]), params[p], params[nc + p], params[2 * nc + p],
                                           params[3 * nc + p], silu != 0);
        }
    }
    __syncthreads();
    for (int i = threadIdx.y; i < 32; i += blockDim.y) {
        const int c_l = y_cl ? tx : i;
        const int s_l = y_cl ? i : tx;
        const int c = c0 + c_l;
        const long long s = s0 + s_l;
        if (c < C && s < S) {
            const long long off = y_cl ? (n * S + s) * C + c : (n * C + c) * S + s;
            y[off] = Io<D>::store(tile[c_l][s_l]);
        }
    }
}

}  // namespace

// One block (a multiple of 32 threads) per (n, g): the group's Cg * chunks partials, combined in fp64.
extern "C" __global__ void __launch_bounds__(kMaxThreads)
gn_finalize(const float* __restrict__ part, long long part_stride, const float* __restrict__ weight,
            const float* __restrict__ bias, const float* __restrict__ bias_nc, float* __restrict__ params,
            long long nc, int C, int G, long long S, long long chunk_s, int chunks, float eps) {
    __shared__ double shared[kMaxThreads / 32];
    const long long n = blockIdx.x / G;
    const int g = (int)(blockIdx.x - n * G);
    const int cg = C / G;
    const int entries = cg * chunks;
    const long long row0 = n * chunks * C + (long long)g * cg;
    double acc = 0.0;
    for (int e = threadIdx.x; e < entries; e += blockDim.x) {
        const int chunk = e / cg, j = e - chunk * cg;
        const long long entry = row0 + (long long)chunk * C + j;
        const double count = (double)min_ll(chunk_s, S - (long long)chunk * chunk_s);
        double mean = (double)part[entry] + (double)part[part_stride + entry];
        if (bias_nc) mean += (double)bias_nc[n * C + g * cg + j];
        acc += count * mean;
    }
    const double total = (double)S * cg;
    const double mean = block_sum(acc, shared) / total;
    acc = 0.0;
    for (int e = threadIdx.x; e < entries; e += blockDim.x) {
        const int chunk = e / cg, j = e - chunk * cg;
        const long long entry = row0 + (long long)chunk * C + j;
        const double count = (double)min_ll(chunk_s, S - (long long)chunk * chunk_s);
        double d = (double)part[entry] + (double)part[part_stride + entry] - mean;
        if (bias_nc) d += (double)bias_nc[n * C + g * cg + j];
        acc += (double)part[2 * part_stride + entry] + count * d * d;
    }
    const double var = block_sum(acc, shared) / total;
    const float rstd = pdm::gn_rstd((float)var, 1.0f, eps);
    for (int j = threadIdx.x; j < cg; j += blockDim.x) {
        const int c = g * cg + j;
        const long long p = n * C + c;
        const pdm::GNChannel ch = pdm::gn_channel<double>(mean, rstd, weight ? weight[c] : 1.0f,
                                                          bias ? bias[c] : 0.0f, bias_nc ? bias_nc[p] : 0.0f);
        params[p] = ch.center_hi;
        params[nc + p] = ch.center_lo;
        params[2 * nc + p] = ch.scale;
        params[3 * nc + p] = ch.shift;
    }
}

#define PDM_GN_VEC_KERNELS(SUFFIX, D, V)                                                                        \
    extern "C" __global__ void __launch_bounds__(kMaxThreads) gn_stats_ncs_##SUFFIX##_v##V(                     \
        const pdm::Convert<D>::T* x, float* part, long long part_stride, int C, long long S, long long chunk_s,  \
        int chunks, long long segments) {                                                                       \
        stats_ncs<D, V>(x, part, part_stride, C, S, chunk_s, chunks, segments);                                 \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(kMaxThreads) gn_stats_cl_##SUFFIX##_v##V(                      \
        const pdm::Convert<D>::T* x, float* part, long long part_stride, int C, long long S, long long chunk_s,  \
        int chunks) {                                                                                           \
        stats_cl<D, V>(x, part, part_stride, C, S, chunk_s, chunks);                                            \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(kMaxThreads) gn_apply_ncs_##SUFFIX##_v##V(                     \
        const pdm::Convert<D>::T* x, pdm::Convert<D>::T* y, const float* params, long long nc, long long S,     \
        int tiles_per_row, int silu) {                                                                          \
        apply_ncs<D, V>(x, y, params, nc, S, tiles_per_row, silu);                                              \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(kMaxThreads) gn_apply_cl_##SUFFIX##_v##V(                      \
        const pdm::Convert<D>::T* x, pdm::Convert<D>::T* y, const float* params, long long nc, int C,           \
        long long S, int row_tiles, int silu) {                                                                 \
        apply_cl<D, V>(x, y, params, nc, C, S, row_tiles, silu);                                                \
    }

#define PDM_GN_KERNELS(SUFFIX, D)                                                                               \
    PDM_GN_VEC_KERNELS(SUFFIX, D, 1)                                                                            \
    PDM_GN_VEC_KERNELS(SUFFIX, D, 4)                                                                            \
    extern "C" __global__ void __launch_bounds__(kMaxThreads) gn_apply_transpose_##SUFFIX(                      \
        const pdm::Convert<D>::T* x, pdm::Convert<D>::T* y, const float* params, long long nc, int C,           \
        long long S, int x_cl, int y_cl, int silu) {                                                            \
        apply_transpose<D>(x, y, params, nc, C, S, x_cl, y_cl, silu);                                           \
    }

PDM_GN_KERNELS(f32, pdm::kFloat32)
PDM_GN_KERNELS(f16, pdm::kFloat16)
PDM_GN_KERNELS(bf16, pdm::kBFloat16)
