// The fused solver-step expression (DESIGN §1), shared by the CPU and CUDA kernels:
//
//   x0 = clamp(p_x·x + p_m·m, -clip, clip)
//   x' = a·x + b·x0 + c1·h1 + c2·h2 + c3·h3 + s·z
//
// A term whose coefficient is 0 is exactly 0 (its buffer is not read); a missing buffer whose coefficient is
// nonzero is NaN (the on-device report of an argument the host could not check). The additions happen in
// this order in every backend and in pydiffmed/ops/reference.py.
#pragma once

#include "pdm_common.h"

namespace pdm {

// Coefficient row layout (pydiffmed.ops.COEF_NAMES).
enum StepCoef { kPx = 0, kPm, kClip, kA, kB, kC1, kC2, kC3, kS, kNumStepCoefs };

struct StepCoefs {
    float p_x, p_m, clip, a, b, c[3], s;
};

// The row for sample `b`: coefs + step·step_stride + b·batch_stride, the step read from device memory when
// step_index is given (clamped to the table, so a bad index cannot read out of bounds).
PDM_HD StepCoefs load_step_coefs(const float* coefs, const long long* step_index, long long num_steps,
                                 long long step_stride, long long batch_stride, long long b) {
    long long step = 0;
    if (step_index) {
        step = *step_index;
        step = step < 0 ? 0 : (step >= num_steps ? num_steps - 1 : step);
    }
    const float* row = coefs + step * step_stride + b * batch_stride;
    StepCoefs k;
    k.p_x = row[kPx];
    k.p_m = row[kPm];
    k.clip = row[kClip];
    k.a = row[kA];
    k.b = row[kB];
    k.c[0] = row[kC1];
    k.c[1] = row[kC2];
    k.c[2] = row[kC3];
    k.s = row[kS];
    return k;
}

// coef·v, or exactly 0 when coef == 0 (v may then be anything, NaN included).
PDM_HD float step_term(float coef, float v) { return coef != 0.0f ? coef * v : 0.0f; }

// clamp(v, -clip, clip) letting NaN through (clip = +inf: identity).
PDM_HD float clip_x0(float v, float clip) { return v > clip ? clip : (v < -clip ? -clip : v); }

// Classifier-free guidance: m_uncond + w·(m_cond - m_uncond).
PDM_HD float guided(float m_uncond, float m_cond, float w) { return m_uncond + w * (m_cond - m_uncond); }

PDM_HD float step_x0(const StepCoefs& k, float x, float m) {
    return clip_x0(step_term(k.p_x, x) + step_term(k.p_m, m), k.clip);
}

PDM_HD float step_update(const StepCoefs& k, float x, float x0, float h1, float h2, float h3, float z) {
    float acc = step_term(k.a, x) + step_term(k.b, x0);
    acc = acc + step_term(k.c[0], h1);
    acc = acc + step_term(k.c[1], h2);
    acc = acc + step_term(k.c[2], h3);
    return acc + step_term(k.s, z);
}

}  // namespace pdm
