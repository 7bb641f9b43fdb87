"""A Gaussian-mixture data distribution in R^d with its exact denoiser, for testing and benchmarking samplers.

Data x0 ~ Σ_k w_k N(mu_k, Sigma_k). Under any schedule x_t = alpha·x0 + sigma·eps each component stays Gaussian,
x_t | k ~ N(alpha·mu_k, alpha²·Sigma_k + sigma²·I), so with Sigma_k = U diag(lam) Uᵀ and c = Uᵀ(x_t - alpha·mu_k):
    E[x0 | x_t, k]  = mu_k + U diag(alpha·lam/(alpha²·lam + sigma²)) c
    E[eps | x_t, k] = U diag(sigma/(alpha²·lam + sigma²)) c
and E[· | x_t] mixes them with the posterior responsibilities. `model(schedule, prediction_type)` wraps this
as a network-like callable m = model(x_t, t) (t = the model's time input, any tensor shape (B, ...)) returning
the exact optimal output of that prediction type; `sample` draws exact data. All math in float64.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import prediction


class GaussianMixture:
    def __init__(self, weights, means, covariances):
        w = np.asarray(weights, dtype=np.float64)
        mu = np.asarray(means, dtype=np.float64)
        cov = np.asarray(covariances, dtype=np.float64)
        if w.ndim != 1 or np.any(w <= 0):
            raise ValueError("weights must be a 1-D array of positive numbers")
        if mu.ndim != 2 or mu.shape[0] != w.shape[0]:
            raise ValueError(f"means must be (K, d) with K = {w.shape[0]}, got {mu.shape}")
        k, d = mu.shape
        if cov.shape != (k, d, d):
            raise ValueError(f"covariances must be (K, d, d) = {(k, d, d)}, got {cov.shape}")
        if not np.allclose(cov, np.swapaxes(cov, 1, 2)):
            raise ValueError("covariances must be symmetric")
        lam, vec = np.linalg.eigh(cov)
        if np.any(lam <= 0):
            raise ValueError("covariances must be positive definite")
        self.weights = w / w.sum()
        self.means, self.covariances = mu, cov
        self.num_components, self.dim = k, d
        self._lam = torch.from_numpy(lam)
        self._vec = torch.from_numpy(vec)
        self._mu = torch.from_numpy(mu)
        self._log_w = torch.from_numpy(np.log(self.weights))

    @classmethod
    def random(cls, dim, num_components=3, seed=0, separation=4.0, std_range=(0.3, 0.8)):
        """Components with random means (pairwise ≥ `separation` apart, for a clean assignment of samples),
        random rotations and per-direction standard deviations in `std_range`, and random weights."""
        rng = np.random.default_rng(seed)
        means = []
        while len(means) < num_components:
            candidate = rng.normal(size=dim)
            candidate *= 0.5 * separation * num_components ** 0.5 / np.linalg.norm(candidate)
            if all(np.linalg.norm(candidate - m) >= separation for m in means):
                means.append(candidate)
        covs = []
        for _ in range(num_components):
            q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
            std = rng.uniform(*std_range, size=dim)
            covs.append((q * std ** 2) @ q.T)
        weights = rng.uniform(1.0, 2.0, size=num_components)
        return cls(weights, np.stack(means), np.stack(covs))

    # data --------------------------------------------------------------------------------------------------
    def sample(self, n, seed=0):
        """(x0 (n, d) float64, component labels (n,)) exact draws."""
        g = torch.Generator().manual_seed(int(seed))
        labels = torch.multinomial(torch.from_numpy(self.weights), n, replacement=True, generator=g)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=g)
        x = self._mu[labels] + torch.einsum("nij,nj->ni", self._vec[labels], self._lam[labels].sqrt() * z)
        return x, labels

    def mean(self):
        return self.weights @ self.means

    def covariance(self):
        """Covariance of the whole mixture."""
        m = self.mean()
        second = sum(w * (c + np.outer(mu, mu)) for w, c, mu in zip(self.weights, self.covariances, self.means))
        return second - np.outer(m, m)

    def assign(self, x0):
        """Most probable component of each (clean) sample (n, d)."""
        one = torch.ones(x0.shape[0], dtype=torch.float64)
        return self._components(torch.as_tensor(x0, dtype=torch.float64), one, 0 * one)[0].argmax(dim=1)

    def posterior(self, A, y, sigma_y=0.0):
        """The exact posterior of x0 given y = A x0 + sigma_y·n (A: (m, d) matrix, y: (m,), n ~ N(0, I)): again a
        Gaussian mixture, returned as (weights (K,), means (K, d), covariances (K, d, d)) float64 arrays. With
        S_k = A Σ_k Aᵀ + sigma_y² I and G_k = Σ_k Aᵀ S_k⁻¹: weights ∝ w_k N(y; A μ_k, S_k), means μ_k + G_k (y - A μ_k),
        covariances Σ_k - G_k A Σ_k (singular along A's rows when sigma_y = 0)."""
        A = np.atleast_2d(np.asarray(A, dtype=np.float64))
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        if A.shape[1] != self.dim or y.shape[0] != A.shape[0]:
            raise ValueError(f"A must be (m, {self.dim}) and y (m,), got {A.shape} and {y.shape}")
        log_w, means, covs = [], [], []
        for w, mu, cov in zip(self.weights, self.means, self.covariances):
            s = A @ cov @ A.T + sigma_y ** 2 * np.eye(A.shape[0])
            r = y - A @ mu
            gain = np.linalg.solve(s, A @ cov).T  # Σ Aᵀ S⁻¹ (S, Σ symmetric)
            log_w.append(np.log(w) - 0.5 * (np.linalg.slogdet(2 * np.pi * s)[1] + r @ np.linalg.solve(s, r)))
            means.append(mu + gain @ r)
            c = cov - gain @ A @ cov
            covs.append(0.5 * (c + c.T))
        log_w = np.asarray(log_w)
        weights = np.exp(log_w - log_w.max())
        return weights / weights.sum(), np.stack(means), np.stack(covs)

    # denoiser ----------------------------------------------------------------------------------------------
    def _components(self, x, alpha, sigma):
        """log posterior weights (B, K) and per-component E[x0], E[eps] (B, K, d)."""
        alpha, sigma = alpha.reshape(-1, 1), sigma.reshape(-1, 1)
        log_p, x0s, epss = [], [], []
        for k in range(self.num_components):
            r = x - alpha * self._mu[k]
            c = r @ self._vec[k]
            var = alpha * alpha * self._lam[k] + sigma * sigma
            log_p.append(self._log_w[k] - 0.5 * (torch.log(var) + c * c / var).sum(dim=1))
            x0s.append(self._mu[k] + (alpha * self._lam[k] / var * c) @ self._vec[k].T)
            epss.append((sigma / var * c) @ self._vec[k].T)
        return torch.stack(log_p, dim=1), torch.stack(x0s, dim=1), torch.stack(epss, dim=1)

    def denoise(self, x_t, alpha, sigma):
        """(E[x0 | x_t], E[eps | x_t]) for x_t (B, d) and alpha, sigma scalars or (B,) — float64."""
        x = torch.as_tensor(x_t, dtype=torch.float64)
        b = x.shape[0]
        alpha = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1).expand(b)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(b)
        log_p, x0s, epss = self._components(x, alpha, sigma)
        resp = torch.softmax(log_p, dim=1).unsqueeze(-1)
        return (resp * x0s).sum(dim=1), (resp * epss).sum(dim=1)

    def model(self, schedule, prediction_type="epsilon"):
        """The exact model for `schedule`: m = model(x_t, t) with t the model's time input (scalar or (B,)),
        x_t of any shape (B, ...) with d elements per sample; output in x_t's dtype."""
        return ExactModel(self, schedule, prediction_type)


class ExactModel:
    """Callable exact denoiser; counts its evaluations in `calls`."""

    def __init__(self, mixture, schedule, prediction_type):
        self.mixture, self.schedule = mixture, schedule
        self.prediction_type = prediction.canonical(prediction_type)
        if self.prediction_type in ("flow", "neg_flow") and schedule.kind == "discrete":
            raise ValueError("flow predictions need a continuous-time schedule")
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        shape, dtype = x.shape, x.dtype
        b = shape[0]
        flat = x.reshape(b, -1).double()
        if flat.shape[1] != self.mixture.dim:
            raise ValueError(f"x has {flat.shape[1]} elements per sample; the mixture has d = {self.mixture.dim}")
        u = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(b).cpu().numpy()
        times = self.schedule.t_from_model_time(u)
        alpha, sigma = self.schedule.alpha_sigma(times)
        x0, eps = self.mixture.denoise(flat.cpu(), torch.from_numpy(alpha), torch.from_numpy(sigma))
        col = lambda v: torch.from_numpy(np.asarray(v, dtype=np.float64)).reshape(-1, 1)  # noqa: E731
        d_alpha = d_sigma = None
        if self.prediction_type in ("flow", "neg_flow"):
            d_alpha, d_sigma = (col(v) for v in self.schedule.derivatives(times))
        a, s = col(alpha), col(sigma)
        if self.prediction_type == "score":
            out = -eps / s
        else:
            out = prediction.model_output(self.prediction_type, x0, eps, a, s, d_alpha, d_sigma)
        return out.to(device=x.device, dtype=dtype).reshape(shape)


def sliced_wasserstein(a, b, num_projections=256, seed=0):
    """Sliced Wasserstein-2 distance between two equal-size point clouds (n, d) (random directions, exact 1-D
    W2 by sorting)."""
    a = torch.as_tensor(a, dtype=torch.float64).reshape(a.shape[0], -1)
    b = torch.as_tensor(b, dtype=torch.float64).reshape(b.shape[0], -1)
    if a.shape != b.shape:
        raise ValueError("sliced_wasserstein needs point clouds of the same shape")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], num_projections, dtype=torch.float64, generator=g)
    dirs /= dirs.norm(dim=0, keepdim=True)
    pa, _ = torch.sort(a @ dirs, dim=0)
    pb, _ = torch.sort(b @ dirs, dim=0)
    return math.sqrt(float(((pa - pb) ** 2).mean()))
