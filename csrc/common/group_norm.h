// GroupNorm math that does not depend on memory layout, shared by the CPU kernel (csrc/cpu/group_norm.cpp) and
// the CUDA kernel (csrc/cuda/group_norm.cu). Everything is PDM_HD and free of std headers beyond what
// pdm_common.h pulls in, so it compiles with g++, nvcc and NVRTC.
//
// The kernel computes y = act(GN(x + bias_nc) * weight + bias) in three steps:
//
//   1. Partial statistics. Each piece of a group (a chunk of one channel, or a block of rows of several
//      channels) yields a MeanM2 {count, mean, m2}: the mean of its values, then m2 = sum((v - mean)^2) taken
//      in a second pass over the same (cache-hot) data. Never E[x^2] - E[x]^2: that loses every digit on data
//      with a large offset.
//      Summing v - pivot (pivot: any one value of the piece, e.g. its first) instead of v keeps the mean exact
//      to float rounding of O(std) numbers instead of O(offset) ones.
//      bias_nc is a constant per (sample, channel): it shifts a channel's mean and leaves its m2 unchanged,
//      so add it to the mean of a per-channel partial (gn_add_to_mean) instead of to every element.
//   2. Merge. mean_m2_merge() combines partials with Chan et al.'s parallel formula, in any order or tree
//      shape; mean_m2_combine() does the same for an array of partials in two passes; gn_rstd() turns the
//      merged group into 1/sqrt(var + eps) with the biased (population) variance, as torch.nn.GroupNorm does.
//   3. Apply. gn_channel() folds mean, rstd, weight, bias and bias_nc into a per-(sample, channel) center,
//      scale and shift, so the per-element work is gn_apply(): (v - center) * scale + shift, then SiLU. (The CPU
//      kernel folds center_lo into the shift, shift - center_lo * scale: the same to rounding, one op less.)
#pragma once

#include "pdm_common.h"

namespace pdm {

// Statistics of a set of values: how many, their mean, and the sum of squared deviations from that mean.
template <typename T>
struct MeanM2 {
    T count;
    T mean;
    T m2;
};

template <typename T>
PDM_HD MeanM2<T> mean_m2_empty() {
    MeanM2<T> s;
    s.count = T(0);
    s.mean = T(0);
    s.m2 = T(0);
    return s;
}

// Chan et al.: the statistics of the union of two disjoint sets from those of each.
template <typename T>
PDM_HD void mean_m2_merge(MeanM2<T>& a, T count_b, T mean_b, T m2_b) {
    if (count_b <= T(0)) return;
    const T count = a.count + count_b;
    const T delta = mean_b - a.mean;
    const T frac_b = count_b / count;
    a.mean = a.mean + delta * frac_b;
    a.m2 = a.m2 + m2_b + delta * delta * a.count * frac_b;
    a.count = count;
}

template <typename T, typename U>
PDM_HD void mean_m2_merge(MeanM2<T>& a, const MeanM2<U>& b) {
    mean_m2_merge(a, T(b.count), T(b.mean), T(b.m2));
}

// The same for `count` parts at parts[0], parts[stride], ...: two passes over the parts (count and mean, then
// m2 = sum(m2_j) + sum(n_j * (mean_j - mean)^2)), no division per part, so it is cheap for many parts.
template <typename T, typename U>
PDM_HD MeanM2<T> mean_m2_combine(const MeanM2<U>* parts, long long count, long long stride) {
    MeanM2<T> s = mean_m2_empty<T>();
    T weighted = T(0);
    for (long long j = 0; j < count; ++j) {
        s.count += T(parts[j * stride].count);
        weighted += T(parts[j * stride].count) * T(parts[j * stride].mean);
    }
    if (s.count <= T(0)) return s;
    s.mean = weighted / s.count;
    for (long long j = 0; j < count; ++j) {
        const T d = T(parts[j * stride].mean) - s.mean;
        s.m2 += T(parts[j * stride].m2) + T(parts[j * stride].count) * d * d;
    }
    return s;
}

// bias_nc is added to every value of a channel: the mean moves, the deviations (m2) do not.
template <typename T>
PDM_HD void gn_add_to_mean(MeanM2<T>& s, T shift) {
    s.mean = s.mean + shift;
}

// 1 / sqrt(var + eps) with var = m2 / count (biased variance, as torch.nn.GroupNorm).
PDM_HD float gn_rstd(float m2, float count, float eps) {
    float var = m2 / count;
    var = var > 0.0f ? var : 0.0f;
#if defined(PDM_CUDA)
    return rsqrtf(var + eps);
#else
    return 1.0f / std::sqrt(var + eps);
#endif
}

// Per-(sample, channel) form of the normalisation:
//   ((x + bias_nc) - mean) * rstd * weight + bias  ==  ((x - center_hi) - center_lo) * scale + shift
// with center = mean - bias_nc split into two floats (center_hi + center_lo carries ~48 bits). On data with a
// large offset (x ~ 1000, std ~ 1) x - center_hi is exact, so the output keeps full fp32 accuracy; folding
// the center into the shift (x * scale + shift) would lose ~1e-4 to cancellation. `mean` may be double (CPU)
// or float (then center_lo is 0). Pass weight = 1, bias = 0, bias_nc = 0 for the absent ones.
struct GNChannel {
    float center_hi, center_lo, scale, shift;
};

template <typename T>
PDM_HD GNChannel gn_channel(T mean, float rstd, float weight, float bias, float bias_nc) {
    GNChannel ch;
    const T center = mean - T(bias_nc);
    ch.center_hi = (float)center;
    ch.center_lo = (float)(center - T(ch.center_hi));
    ch.scale = rstd * weight;
    ch.shift = bias;
    return ch;
}

// The per-element work of the apply pass. `silu` is a compile-time constant in the kernels' inner loops.
PDM_HD float gn_apply(float v, float center_hi, float center_lo, float scale, float shift, bool silu) {
    const float y = ((v - center_hi) - center_lo) * scale + shift;
    return silu ? pdm::silu(y) : y;
}

}  // namespace pdm
