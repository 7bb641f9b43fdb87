"""Inverse problems: measurement operators (A, Aᴴ) and undersampling masks; see DESIGN.md §9 "Measurements"."""
from .masks import poisson_disc_mask, random_mask, uniform_mask
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

__all__ = ["CartesianMRI", "Downsampling", "LinearOperator", "Masking", "ParallelBeamCT", "adjoint_error",
           "as_operator", "conjugate_gradient", "fft_c", "ifft_c", "limited_angle_angles", "poisson_disc_mask",
           "random_mask", "sparse_view_angles", "uniform_mask"]
