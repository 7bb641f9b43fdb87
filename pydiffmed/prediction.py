"""Model prediction types, converted in one place.

With x = alpha·x0 + sigma·eps (and, for velocity predictions, the path derivatives d_alpha, d_sigma with
respect to the schedule's time), a model output m is one of
  epsilon       m = eps
  v_prediction  m = alpha·eps - sigma·x0          (Salimans & Ho; general alpha, sigma)
  sample        m = x0                            (diffusers' "sample", k-diffusion's denoised)
  score         m = grad log p(x) = -eps/sigma
  flow          m = dx/dt = d_alpha·x0 + d_sigma·eps   (rectified flow: eps - x0; diffusers' flow_prediction)
  neg_flow      m = -(dx/dt)                      (rectified flow: x0 - eps; MONAI RFlowScheduler's output)
Every conversion is linear in (x, m): `x0_coefs` gives (p_x, p_m) with x0 = p_x·x + p_m·m, `eps_coefs` the
same for eps — exactly the p_x, p_m columns of a fused_step row. `model_output` goes the other way (the exact
Gaussian-mixture "model" uses it).
"""
from __future__ import annotations

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "score", "flow", "neg_flow")
_ALIASES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample", "original_sample": "sample",
            "flow_prediction": "flow", "velocity": "flow"}


def canonical(prediction_type: str) -> str:
    """The canonical name of a prediction type (accepts diffusers/k-diffusion aliases)."""
    if not isinstance(prediction_type, str):
        raise TypeError(f"prediction_type must be a str, got {type(prediction_type).__name__}")
    name = _ALIASES.get(prediction_type, prediction_type)
    if name not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return name


def _flow_denominator(alpha, sigma, d_alpha, d_sigma):
    den = d_sigma * alpha - sigma * d_alpha
    if den == 0:
        raise ValueError("flow prediction is undefined where d_sigma·alpha = sigma·d_alpha")
    return den


def x0_coefs(prediction_type, alpha, sigma, d_alpha=-1.0, d_sigma=1.0):
    """(p_x, p_m) with x0 = p_x·x + p_m·m. d_alpha, d_sigma (path derivatives) matter for flow types only;
    the defaults are rectified flow's (-1, 1)."""
    p = canonical(prediction_type)
    alpha, sigma = float(alpha), float(sigma)
    if p == "sample":
        return 0.0, 1.0
    if p == "v_prediction":
        norm = alpha * alpha + sigma * sigma
        return alpha / norm, -sigma / norm
    if p in ("flow", "neg_flow"):
        den = _flow_denominator(alpha, sigma, float(d_alpha), float(d_sigma))
        sign = 1.0 if p == "flow" else -1.0
        return float(d_sigma) / den, -sign * sigma / den
    if alpha == 0:
        raise ValueError(f"{p} prediction cannot give x0 where alpha = 0 (zero terminal SNR needs "
                         "v_prediction, sample or flow)")
    if p == "epsilon":
        return 1.0 / alpha, -sigma / alpha
    return 1.0 / alpha, sigma * sigma / alpha  # score


def eps_coefs(prediction_type, alpha, sigma, d_alpha=-1.0, d_sigma=1.0):
    """(q_x, q_m) with eps = q_x·x + q_m·m."""
    p = canonical(prediction_type)
    alpha, sigma = float(alpha), float(sigma)
    if p == "epsilon":
        return 0.0, 1.0
    if p == "score":
        return 0.0, -sigma
    if p == "v_prediction":
        norm = alpha * alpha + sigma * sigma
        return sigma / norm, alpha / norm
    if sigma == 0:
        raise ValueError(f"{p} prediction cannot give eps where sigma = 0")
    p_x, p_m = x0_coefs(p, alpha, sigma, d_alpha, d_sigma)
    return (1.0 - alpha * p_x) / sigma, -alpha * p_m / sigma


def model_output(prediction_type, x0, eps, alpha, sigma, d_alpha=-1.0, d_sigma=1.0):
    """The output an ideal model of this prediction type gives for data estimate x0 and noise estimate eps
    (tensors or arrays; alpha, sigma, d_alpha, d_sigma scalars or broadcastable)."""
    p = canonical(prediction_type)
    if p == "epsilon":
        return eps
    if p == "sample":
        return x0
    if p == "v_prediction":
        return alpha * eps - sigma * x0
    if p == "score":
        return -eps / sigma
    velocity = d_alpha * x0 + d_sigma * eps
    return velocity if p == "flow" else -velocity
