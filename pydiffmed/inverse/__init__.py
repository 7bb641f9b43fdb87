"""Inverse problems: measurement operators (A, Aᴴ), undersampling masks and the posterior samplers' data steps
(samplers.py); see docs/ARCHITECTURE.md §8. Anomaly detection with a model of healthy anatomy (anomaly.py:
reconstructions from partial noising or DDIM inversion, the anomaly map, threshold, score, AUROC; noise.py: simplex
noise). Classical baselines and metrics (baselines.py: zero-filled, total-variation reconstruction, PSNR, 3-D SSIM,
the reconstruction tasks of the quality tests)."""
from .anomaly import anomaly_map, anomaly_score, auroc, gaussian_smooth, otsu_threshold, reconstruct_healthy, threshold
from .baselines import psnr, ssim, tv_reconstruction, zero_filled
from .masks import poisson_disc_mask, random_mask, uniform_mask
from .noise import simplex_noise
from .operators import (
    CartesianMRI,
    Downsampling,
    LinearOperator,
    Masking,
    ParallelBeamCT,
    adjoint_error,
    as_operator,
    conjugate_gradient,
    fft_c,
    ifft_c,
    limited_angle_angles,
    sparse_view_angles,
)
from .samplers import POSTERIORS, DataStep, Measurement, data_step

__all__ = ["POSTERIORS", "CartesianMRI", "DataStep", "Downsampling", "LinearOperator", "Masking", "Measurement",
           "ParallelBeamCT", "adjoint_error", "anomaly_map", "anomaly_score", "as_operator", "auroc",
           "conjugate_gradient", "data_step", "fft_c", "gaussian_smooth", "ifft_c", "limited_angle_angles",
           "otsu_threshold", "poisson_disc_mask", "psnr", "random_mask", "reconstruct_healthy", "simplex_noise",
           "sparse_view_angles", "ssim", "threshold", "tv_reconstruction", "uniform_mask", "zero_filled"]
