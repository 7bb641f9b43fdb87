// CPU flash attention in bf16 for CPUs with AVX-512 BF16: out = softmax(q·kᵀ·scale)·v with fp32 scores, fp32
// online-softmax statistics and fp32 output accumulators. The probabilities are rounded to bf16 for the P·V
// products, as in torch's own CPU flash attention and in FlashAttention-2; the normaliser sums the rounded values,
// so each output row is a convex combination of value rows with exactly the weights used.
//
// All products run on vdpbf16ps, where each fp32 lane accumulates the products of one pair of bf16 values. Keys
// and values are packed per (batch, head) into pair-interleaved layouts once per call (padding is zero):
//   keys:   [block of kBlockKV keys][pair p of d][key in block][2]  -> per p, kBlockKV/16 vectors of 16 keys
//   values: [pair j of keys][block of 16 of d][lane][2]             -> per j, ceil(d/16) vectors
// A query row's pair (q[2p], q[2p+1]) and a probability row's pair (P[2j], P[2j+1]) are each broadcast as one
// 32-bit lane. Keys past the end get the score -inf.
//
// Work: tasks of kBlockQ query rows of one (batch, head), handed out to the threads one at a time. A task runs
// through the key blocks; per block and per tile of kRows query rows, the kRows × kBlockKV scores stay in registers
// through the online softmax, and their probabilities (bf16, a 512-byte buffer) are multiplied into the tile's fp32
// output rows, which stay in a per-task buffer. The packed keys and values of a block (2 × 16 KB at d = 64) are
// reused by every tile of the task. benchmarks/bench_attention.py times it against torch's SDPA.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>

#include "cpu/avx512_exp.h"

namespace py = pybind11;

namespace pdm_attn_cpu {

constexpr int64_t kBlockQ = 64;     // query rows per task
constexpr int64_t kBlockKV = 128;   // keys per block: 8 vectors of 16 scores per query row
constexpr int kRows = 2;            // query rows per register tile: kRows × 8 score accumulators
constexpr int64_t kMaxHeadDim = 128;

typedef std::array<int64_t, 4> Strides;  // in elements, for the axes (batch, head, token, d)

#if defined(PDM_HAVE_AVX512_PATH)

// Block b (kBlockKV keys) of one (batch, head)'s keys, into its place in [nkv_pad / kBlockKV][pairs][kBlockKV][2].
void pack_key_block(const uint16_t* k, int64_t sn, int64_t sd, int64_t nkv, int64_t d, int64_t pairs, int64_t b,
                    uint16_t* out) {
    for (int64_t j = 0; j < kBlockKV; ++j) {
        const int64_t key = b * kBlockKV + j;
        for (int64_t c = 0; c < 2 * pairs; ++c)
            out[((b * pairs + c / 2) * kBlockKV + j) * 2 + c % 2] = key < nkv && c < d ? k[key * sn + c * sd] : 0;
    }
}

// Block b (kBlockKV keys) of one (batch, head)'s values, into its place in [nkv_pad / 2][vectors][16][2].
void pack_value_block(const uint16_t* v, int64_t sn, int64_t sd, int64_t nkv, int64_t d, int64_t vectors, int64_t b,
                      uint16_t* out) {
    for (int64_t key = b * kBlockKV; key < (b + 1) * kBlockKV; ++key)
        for (int64_t c = 0; c < vectors * 16; ++c)
            out[((key / 2 * vectors + c / 16) * 16 + c % 16) * 2 + key % 2] =
                key < nkv && c < d ? v[key * sn + c * sd] : 0;
}

PDM_AVX512 inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

// 2^t for t <= 0 (or -inf, or NaN, which stays NaN), to bf16 accuracy.
PDM_AVX512 inline __m512 exp2_nonpositive(__m512 t) {
    // -inf -> -200 (2^-200 is 0 in bf16); vmaxps returns its second operand when either is NaN, so NaN stays
    const __m512 clamped = _mm512_max_ps(_mm512_set1_ps(-200.0f), t);
    return pdm_cpu::exp2_minus_half<3>(_mm512_add_ps(clamped, _mm512_set1_ps(0.5f)));
}

// Scores of kRows query rows against one key block, through the online softmax: the rows' probabilities (bf16) go to
// probs, their rescale factors to alpha. q: kRows rows of `pairs` bf16 pairs; kp: the block's packed keys; valid: keys
// of the block that exist (1..kBlockKV); m, l: the rows' running max (in log2 units) and normaliser.
PDM_AVX512 inline void softmax_scores(const uint32_t* q, int64_t pairs, const uint16_t* kp, int64_t valid,
                                      float scale_log2, float* m, float* l, uint16_t (*probs)[kBlockKV],
                                      float* alpha) {
    constexpr int KV = kBlockKV / 16;
    __m512 s[kRows][KV];
    for (int r = 0; r < kRows; ++r)
        for (int c = 0; c < KV; ++c) s[r][c] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; ++p) {
        __m512i kv[KV];
        for (int c = 0; c < KV; ++c) kv[c] = _mm512_loadu_si512(kp + (p * kBlockKV + c * 16) * 2);
        for (int r = 0; r < kRows; ++r) {
            const __m512i qb = _mm512_set1_epi32((int)q[r * pairs + p]);
            for (int c = 0; c < KV; ++c) s[r][c] = _mm512_dpbf16_ps(s[r][c], as_bh(qb), as_bh(kv[c]));
        }
    }
    const __m512 scale = _mm512_set1_ps(scale_log2);
    for (int r = 0; r < kRows; ++r) {
        for (int c = (int)(valid / 16); c < KV; ++c) {  // the vectors with keys past the end
            const int64_t left = valid - c * 16;
            const __mmask16 keep = left <= 0 ? 0 : (__mmask16)((1u << left) - 1u);
            s[r][c] = _mm512_mask_mov_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), keep, s[r][c]);
        }
        __m512 mx = s[r][0];
        for (int c = 1; c < KV; ++c) mx = _mm512_max_ps(mx, s[r][c]);
        const float m_new = std::max(m[r], _mm512_reduce_max_ps(mx) * scale_log2);  // scale > 0
        alpha[r] = std::exp2(m[r] - m_new);
        const __m512 shift = _mm512_set1_ps(m_new);
        __m512 sum = _mm512_setzero_ps();
        for (int c = 0; c < KV; ++c) {
            const __m512 t = _mm512_fmsub_ps(s[r][c], scale, shift);  // log2 of the unnormalised probability
            const __m256bh pb = _mm512_cvtneps_pbh(exp2_nonpositive(t));
            _mm256_store_si256((__m256i*)&probs[r][c * 16], (__m256i)pb);
            sum = _mm512_add_ps(sum, _mm512_cvtpbh_ps(pb));
        }
        l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(sum);
        m[r] = m_new;
    }
}

// One tile of kRows query rows against one key block: scores and softmax, then P·V into the rows' fp32
// accumulators o (kRows rows of NV*16).
template <int NV>
PDM_AVX512 void tile(const uint32_t* q, int64_t pairs, const uint16_t* kp, const uint16_t* vp, int64_t valid,
                     float scale_log2, float* m, float* l, float* o) {
    alignas(64) uint16_t probs[kRows][kBlockKV];
    float alpha[kRows];
    softmax_scores(q, pairs, kp, valid, scale_log2, m, l, probs, alpha);

    __m512 acc[kRows][NV];
    for (int r = 0; r < kRows; ++r) {
        const __m512 a = _mm512_set1_ps(alpha[r]);
        for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_mul_ps(_mm512_loadu_ps(o + (r * NV + c) * 16), a);
    }
    const int64_t key_pairs = (valid + 1) / 2;  // pairs past the last key have P = 0 and packed values 0
    for (int64_t j = 0; j < key_pairs; ++j) {
        __m512i vv[NV];
        for (int c = 0; c < NV; ++c) vv[c] = _mm512_loadu_si512(vp + (j * NV + c) * 32);
        for (int r = 0; r < kRows; ++r) {
            uint32_t pair;
            std::memcpy(&pair, &probs[r][2 * j], 4);
            const __m512i pb = _mm512_set1_epi32((int)pair);
            for (int c = 0; c < NV; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], as_bh(pb), as_bh(vv[c]));
        }
    }
    for (int r = 0; r < kRows; ++r)
        for (int c = 0; c < NV; ++c) _mm512_storeu_ps(o + (r * NV + c) * 16, acc[r][c]);
}

struct Problem {
    const uint16_t* q;
    uint16_t* out;
    Strides sq, so;
    int64_t heads, nq, nkv, d;
    float scale_log2;
    int64_t pairs, vectors;            // ceil(d / 2), ceil(d / 16)
    const uint16_t *kpack, *vpack;     // per (batch, head): kpack_stride resp. vpack_stride elements
    int64_t kpack_stride, vpack_stride;
};

// One task: query rows [q0, q0 + kBlockQ) of one (batch, head).
template <int NV>
PDM_AVX512 void run_task(const Problem& pr, int64_t bh, int64_t q0) {
    const int64_t b = bh / pr.heads, h = bh % pr.heads;
    const int64_t rows = std::min(kBlockQ, pr.nq - q0);
    alignas(64) uint32_t qbuf[kBlockQ * (kMaxHeadDim / 2)];
    alignas(64) float obuf[kBlockQ * NV * 16];
    float m[kBlockQ], l[kBlockQ];
    const uint16_t* qh = pr.q + b * pr.sq[0] + h * pr.sq[1];
    for (int64_t i = 0; i < kBlockQ; ++i) {
        for (int64_t p = 0; p < pr.pairs; ++p) {
            uint16_t pair[2];
            for (int64_t e = 0; e < 2; ++e) {
                const int64_t c = 2 * p + e;
                pair[e] = i < rows && c < pr.d ? qh[(q0 + i) * pr.sq[2] + c * pr.sq[3]] : 0;
            }
            std::memcpy(&qbuf[i * pr.pairs + p], pair, 4);
        }
        m[i] = -std::numeric_limits<float>::infinity();
        l[i] = 0.0f;
    }
    std::fill(obuf, obuf + kBlockQ * NV * 16, 0.0f);
    const uint16_t* kp = pr.kpack + bh * pr.kpack_stride;
    const uint16_t* vp = pr.vpack + bh * pr.vpack_stride;
    const int64_t tiles = (rows + kRows - 1) / kRows;
    for (int64_t key0 = 0; key0 < pr.nkv; key0 += kBlockKV) {
        const int64_t valid = std::min(kBlockKV, pr.nkv - key0);
        const uint16_t* kb = kp + key0 * pr.pairs * 2;
        const uint16_t* vb = vp + key0 * NV * 16;
        for (int64_t t = 0; t < tiles; ++t)
            tile<NV>(qbuf + t * kRows * pr.pairs, pr.pairs, kb, vb, valid, pr.scale_log2, m + t * kRows,
                     l + t * kRows, obuf + t * kRows * NV * 16);
    }
    uint16_t* oh = pr.out + b * pr.so[0] + h * pr.so[1];
    for (int64_t i = 0; i < rows; ++i) {
        const __m512 inv = _mm512_set1_ps(1.0f / l[i]);
        uint16_t* row = oh + (q0 + i) * pr.so[2];
        for (int64_t c = 0; c < pr.d; c += 16) {
            const int64_t left = std::min<int64_t>(16, pr.d - c);
            const __mmask16 keep = (__mmask16)((1u << left) - 1u);
            const __m256bh y = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(obuf + i * NV * 16 + c), inv));
            _mm256_mask_storeu_epi16(row + c, keep, (__m256i)y);
        }
    }
}

typedef void (*TaskFn)(const Problem&, int64_t, int64_t);
const TaskFn kTasks[8] = {run_task<1>, run_task<2>, run_task<3>, run_task<4>,
                          run_task<5>, run_task<6>, run_task<7>, run_task<8>};

#endif  // PDM_HAVE_AVX512_PATH

bool supported() {
#if defined(PDM_HAVE_AVX512_PATH)
    return pdm_cpu::avx512_bf16_supported();
#else
    return false;
#endif
}

void attention_bf16(uint64_t q_ptr, Strides sq, uint64_t k_ptr, Strides sk, uint64_t v_ptr, Strides sv,
                    uint64_t out_ptr, Strides so, int64_t batch, int64_t heads, int64_t nq, int64_t nkv, int64_t d,
                    double scale, int num_threads) {
    if (!supported()) throw std::runtime_error("attention_bf16: this CPU lacks AVX-512 F/BW/VL/DQ/BF16");
    if (d < 1 || d > kMaxHeadDim)
        throw std::invalid_argument("attention_bf16: head dimension d = " + std::to_string(d) + " is not in [1, " +
                                    std::to_string(kMaxHeadDim) + "]");
    if (batch < 1 || heads < 1 || nq < 1 || nkv < 1)
        throw std::invalid_argument("attention_bf16: batch, heads and token counts must be >= 1");
    if (so[3] != 1) throw std::invalid_argument("attention_bf16: out must have d-stride 1");
    if (num_threads < 1) throw std::invalid_argument("attention_bf16: num_threads must be >= 1");
    if (!(scale > 0.0) || !std::isfinite(scale))
        throw std::invalid_argument("attention_bf16: scale must be finite and > 0, got " + std::to_string(scale));
#if defined(PDM_HAVE_AVX512_PATH)
    Problem pr;
    const uint16_t *k = (const uint16_t*)k_ptr, *v = (const uint16_t*)v_ptr;
    pr.q = (const uint16_t*)q_ptr, pr.out = (uint16_t*)out_ptr;
    pr.sq = sq, pr.so = so;
    pr.heads = heads, pr.nq = nq, pr.nkv = nkv, pr.d = d;
    pr.scale_log2 = (float)(scale * 1.4426950408889634);
    pr.pairs = (d + 1) / 2, pr.vectors = (d + 15) / 16;
    const int64_t kv_blocks = (nkv + kBlockKV - 1) / kBlockKV, nkv_pad = kv_blocks * kBlockKV;
    pr.kpack_stride = nkv_pad * pr.pairs * 2;
    pr.vpack_stride = nkv_pad * pr.vectors * 16;
    const int64_t bh_count = batch * heads;
    std::unique_ptr<uint16_t[]> kpack(new uint16_t[bh_count * pr.kpack_stride]);
    std::unique_ptr<uint16_t[]> vpack(new uint16_t[bh_count * pr.vpack_stride]);
    pr.kpack = kpack.get(), pr.vpack = vpack.get();
    const TaskFn task = kTasks[pr.vectors - 1];
    const int64_t q_blocks = (nq + kBlockQ - 1) / kBlockQ;
    const int64_t tasks = bh_count * q_blocks;
    const int64_t most_work = std::max(tasks, bh_count * kv_blocks);
    const int threads = (int)std::max<int64_t>(1, std::min<int64_t>(num_threads, most_work));
    py::gil_scoped_release release;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < bh_count * kv_blocks; ++i) {
            const int64_t bh = i / kv_blocks, block = i % kv_blocks, b = bh / heads, h = bh % heads;
            pack_key_block(k + b * sk[0] + h * sk[1], sk[2], sk[3], nkv, d, pr.pairs, block,
                           kpack.get() + bh * pr.kpack_stride);
            pack_value_block(v + b * sv[0] + h * sv[1], sv[2], sv[3], nkv, d, pr.vectors, block,
                             vpack.get() + bh * pr.vpack_stride);
        }
        // dynamic: a thread the system deschedules holds back one task, not a fixed share (each task writes its own
        // rows, so the bits do not depend on the split)
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tasks; ++t) task(pr, t / q_blocks, t % q_blocks * kBlockQ);
    }
#else
    (void)q_ptr, (void)k_ptr, (void)v_ptr, (void)out_ptr, (void)sq, (void)sk, (void)sv, (void)scale;
#endif
}

}  // namespace pdm_attn_cpu

void register_attention(py::module_& m) {
    m.def("attention_bf16_supported", &pdm_attn_cpu::supported,
          "Whether this CPU runs attention_bf16 (AVX-512 F/BW/VL/DQ and BF16).");
    m.def("attention_bf16", &pdm_attn_cpu::attention_bf16,
          "out = softmax(q·kᵀ·scale)·v for bf16 B×heads×N×d views given as addresses and element strides "
          "(batch, head, token, d); fp32 scores and accumulators; 1 <= d <= 128; out's d-stride must be 1.",
          py::arg("q_ptr"), py::arg("q_strides"), py::arg("k_ptr"), py::arg("k_strides"), py::arg("v_ptr"),
          py::arg("v_strides"), py::arg("out_ptr"), py::arg("out_strides"), py::arg("batch"), py::arg("heads"),
          py::arg("nq"), py::arg("nkv"), py::arg("d"), py::arg("scale"), py::arg("num_threads"));
}
