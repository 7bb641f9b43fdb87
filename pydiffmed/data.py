"""A procedural 3-D head phantom family (the demo model's training data) and statistics to compare volume sets.

`head_phantom(seed, index)` draws one head: a skull shell with a smoothly perturbed ellipsoidal outline, brain
with a low-frequency texture, two lateral ventricles (CSF), one to four lesions, a random rotation and shift, a
smooth multiplicative bias field and a little noise; edges are partial-volume ramps half a voxel wide. Every
phantom depends only on (seed, index), so any subset can be regenerated, in any order or batch size.

Contrast is T2-weighted-MRI-like. Intensities (before the final map to [-1, 1] as 2·v − 1) sit in disjoint class
bands, so classes can be read back from a volume by thresholds (`tissue_labels`) — what the statistics below use
on generated volumes:

    background 0 · bone 0.14–0.20 · brain 0.40–0.48 (±0.03 texture) · lesion 0.66–0.72 · CSF 0.90–1.00
    all × a bias field within [0.94, 1.06], + N(0, 0.008²) noise

The band order follows the anatomy (air | bone | brain | lesions, ventricles), so a partial-volume voxel on the
air–bone, bone–brain or brain–lesion boundaries falls in one of its two neighbours' classes; only the brain–CSF
boundary crosses the lesion band (a thin rim, a few small components).

Statistics (vectorised torch, batch-first): `tissue_fractions` (fraction of voxels in each class),
`intensity_histogram_distance` (1-D Wasserstein distance between pooled intensity histograms), and
`connected_components` / `component_statistics` (6-connected components per class: counts and the share of the
largest).
"""
from __future__ import annotations

import math

import numpy as np
import torch

TISSUE_CLASSES = ("background", "bone", "brain", "lesion", "csf")
# Class boundaries on the [-1, 1] scale, between the class bands above (0.06, 0.27, 0.58, 0.80 before 2·v − 1).
TISSUE_THRESHOLDS = (-0.88, -0.46, 0.16, 0.60)
_LABEL = {name: i for i, name in enumerate(TISSUE_CLASSES)}


# --- the phantom -------------------------------------------------------------------------------------------

def _shape3(shape):
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,) * 3
    shape = tuple(shape)
    if len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 8 for s in shape):
        raise ValueError(f"shape must be an int or 3 ints, each ≥ 8; got {shape!r}")
    return shape


def _rotation(rng, max_angle):
    """Rotation matrix from three random Euler angles in [-max_angle, max_angle]."""
    a, b, c = rng.uniform(-max_angle, max_angle, size=3)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _unit_vectors(rng, n):
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _t(array):
    return torch.as_tensor(np.asarray(array), dtype=torch.float32)


def _ellipsoid_radius(points, centre, semi_axes, rotation=None):
    """Normalised radius |R·(p − c) / a| (1 on the surface) at every point (…×3)."""
    local = points - _t(centre)
    if rotation is not None:
        local = local @ _t(rotation)  # row vectors: p·R = Rᵀ·p, i.e. into the ellipsoid's own frame
    return torch.linalg.vector_norm(local / _t(semi_axes), dim=-1)


EDGE_WIDTH = 0.5


def _occupancy(radius, surface_scale_voxels):
    """Partial-volume occupancy: 1 inside, 0 outside, a linear ramp EDGE_WIDTH voxels wide across the surface
    radius = 1. surface_scale_voxels converts a radius difference into voxels (the shape's size in voxels)."""
    return (0.5 - (radius - 1.0) * surface_scale_voxels / EDGE_WIDTH).clamp(0.0, 1.0)


def head_phantom(seed: int = 0, index: int = 0, shape=32, *, return_labels: bool = False, lesions: bool = True):
    """Phantom number `index` of family `seed`: a float32 tensor (1, D, H, W) in [-1, 1] (axes 0, 1, 2 = left→right,
    posterior→anterior, inferior→superior, i.e. RAS). With return_labels=True also the int64 (D, H, W) class map
    (indices into TISSUE_CLASSES, a voxel belonging to the class that covers most of it). lesions=False gives the
    same head without its lesions (every random draw is still made, so the rest is identical voxel for voxel)."""
    for name, value in (("seed", seed), ("index", index)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    shape = _shape3(shape)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))
    noise_generator = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))

    axes = [(torch.arange(n, dtype=torch.float32) + 0.5) / n * 2.0 - 1.0 for n in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # D×H×W×3 in [-1, 1]
    voxels_per_unit = sum(shape) / 6.0  # half the mean side length: [-1, 1] spans 2·this voxels

    # Head frame: rotate and shift, then divide by the head's semi-axes (head-normalised coordinates u).
    rotation = _rotation(rng, 0.35)
    shift = rng.uniform(-0.03, 0.03, size=3)
    head_axes = np.array([0.80, 0.92, 0.86]) * rng.uniform(0.92, 1.0) * rng.uniform(0.97, 1.03, size=3)
    u = ((grid - _t(shift)) @ _t(rotation)) / _t(head_axes)
    radius = torch.linalg.vector_norm(u, dim=-1)
    direction = u / radius.clamp_min(1e-6).unsqueeze(-1)
    # Smooth bumps on the outline: the radius of the surface varies by a few percent with direction.
    bumps = torch.zeros_like(radius)
    for v, amp, freq, phase in zip(_unit_vectors(rng, 3), rng.uniform(0.015, 0.035, 3), rng.uniform(1.0, 2.0, 3),
                                   rng.uniform(0, 2 * math.pi, 3)):
        bumps += float(amp) * torch.cos(float(freq) * math.pi * (direction @ _t(v)) + float(phase))
    radius = radius / (1.0 + bumps)
    head_scale = float(head_axes.mean()) * voxels_per_unit
    skull = _occupancy(radius, head_scale)
    inner = 1.0 - rng.uniform(0.14, 0.18)  # inner skull surface (radius in head units)
    brain = _occupancy(radius / inner, head_scale * inner)

    # Lateral ventricles: mirrored ellipsoids either side of the midline, slightly above the centre.
    ventricle_axes = np.array([rng.uniform(0.12, 0.16), rng.uniform(0.28, 0.38), rng.uniform(0.16, 0.22)])
    ventricle_centres = []
    ventricles = torch.zeros_like(radius)
    offset_x, offset_y, offset_z = rng.uniform(0.15, 0.20), rng.uniform(-0.06, 0.06), rng.uniform(0.02, 0.12)
    yaw = rng.uniform(0.05, 0.25)
    for side in (-1.0, 1.0):
        centre = np.array([side * offset_x, offset_y, offset_z])
        c, s = math.cos(side * yaw), math.sin(side * yaw)
        turn = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
        r = _ellipsoid_radius(u, centre, ventricle_axes, turn)
        ventricles = torch.maximum(ventricles, _occupancy(r, float(ventricle_axes.mean()) * head_scale))
        ventricle_centres.append(centre)

    # Lesions: small rotated ellipsoids inside the brain, clear of the ventricles.
    paint_lesions, lesions = lesions, []
    for _ in range(int(rng.integers(1, 5))):
        for _attempt in range(100):
            centre = _unit_vectors(rng, 1)[0] * rng.uniform(0.25, 0.58)
            if all(np.linalg.norm((centre - vc) / (ventricle_axes + 0.15)) > 1.0 for vc in ventricle_centres):
                break
        lesion_axes = rng.uniform(0.14, 0.22) * rng.uniform(0.75, 1.25, size=3)
        r = _ellipsoid_radius(u, centre, lesion_axes, _rotation(rng, math.pi))
        lesions.append((_occupancy(r, float(lesion_axes.mean()) * head_scale), rng.uniform(0.66, 0.72)))

    # Intensities, painted outside-in: each structure replaces what lies under it by its occupancy.
    texture = torch.zeros_like(radius)
    for _ in range(4):
        wave = _unit_vectors(rng, 1)[0] * rng.uniform(3.0, 6.0)
        texture += torch.cos(u @ _t(wave) + float(rng.uniform(0, 2 * math.pi)))
    image = skull * float(rng.uniform(0.14, 0.20))
    image = torch.lerp(image, float(rng.uniform(0.40, 0.48)) + 0.03 * texture / 4.0, brain)
    csf = ventricles * brain
    image = torch.lerp(image, torch.full_like(image, float(rng.uniform(0.90, 1.0))), csf)
    lesion_cover = torch.zeros_like(radius)
    for occupancy, level in lesions if paint_lesions else ():
        occupancy = occupancy * brain
        image = torch.lerp(image, torch.full_like(image, float(level)), occupancy)
        lesion_cover = torch.maximum(lesion_cover, occupancy)

    # Bias field: a random quadratic polynomial of the grid position, scaled to a peak deviation of 2–6 %.
    linear, quadratic = _t(rng.normal(size=3)), _t(rng.normal(size=(3, 3)))
    field = grid @ linear + torch.einsum("...i,ij,...j->...", grid, quadratic, grid)
    field = field - field.mean()
    field = 1.0 + float(rng.uniform(0.02, 0.06)) * field / field.abs().max().clamp_min(1e-6)
    image = image * field + 0.008 * torch.randn(shape, generator=noise_generator)
    volume = (image.clamp(0.0, 1.0) * 2.0 - 1.0).unsqueeze(0).contiguous()
    if not return_labels:
        return volume
    labels = torch.zeros(shape, dtype=torch.int64)
    labels[skull >= 0.5] = _LABEL["bone"]
    labels[brain >= 0.5] = _LABEL["brain"]
    labels[csf >= 0.5] = _LABEL["csf"]
    labels[lesion_cover >= 0.5] = _LABEL["lesion"]
    return volume, labels


def phantoms(n: int, seed: int = 0, shape=32, start: int = 0, lesions: bool = True) -> torch.Tensor:
    """Phantoms start … start+n−1 of family `seed` as one (n, 1, D, H, W) float32 tensor (lesions=False: healthy)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    return torch.stack([head_phantom(seed, start + i, shape, lesions=lesions) for i in range(n)])


class PhantomDataset(torch.utils.data.Dataset):
    """`length` phantoms of family `seed` (item i = head_phantom(seed, i, shape)), for torch DataLoaders."""

    def __init__(self, length: int, seed: int = 0, shape=32):
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be a positive int, got {length!r}")
        self.length, self.seed, self.shape = length, seed, _shape3(shape)

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} phantoms")
        return head_phantom(self.seed, i, self.shape)


# --- statistics --------------------------------------------------------------------------------------------

def _batch(volume, name="volume") -> torch.Tensor:
    """(B, 1, D, H, W), (1, D, H, W) or (D, H, W) → float32 (B, D, H, W)."""
    volume = torch.as_tensor(volume)
    if volume.ndim == 3:
        volume = volume[None]
    elif volume.ndim == 5:
        if volume.shape[1] != 1:
            raise ValueError(f"{name} must have one channel, got shape {tuple(volume.shape)}")
        volume = volume[:, 0]
    elif volume.ndim == 4:
        if volume.shape[0] != 1:
            raise ValueError(f"{name}: a 4-D input is one (1, D, H, W) volume; for a batch use (B, 1, D, H, W), "
                             f"got shape {tuple(volume.shape)}")
    else:
        raise ValueError(f"{name} must be (B, 1, D, H, W), (1, D, H, W) or (D, H, W); got {tuple(volume.shape)}")
    return volume.detach().to("cpu", torch.float32)


def tissue_labels(volume, thresholds=TISSUE_THRESHOLDS) -> torch.Tensor:
    """Class index (into TISSUE_CLASSES) of every voxel by intensity thresholds on the [-1, 1] scale:
    (B, D, H, W) int64 for any input form `_batch` accepts."""
    return torch.bucketize(_batch(volume), torch.tensor(thresholds, dtype=torch.float32), right=True)


def tissue_fractions(volume, thresholds=TISSUE_THRESHOLDS) -> torch.Tensor:
    """Fraction of voxels in each class of TISSUE_CLASSES per volume: (B, 5) float64, rows sum to 1."""
    labels = tissue_labels(volume, thresholds)
    batch = labels.shape[0]
    counts = torch.zeros(batch, len(TISSUE_CLASSES), dtype=torch.float64)
    counts.scatter_add_(1, labels.reshape(batch, -1), torch.ones(labels.reshape(batch, -1).shape,
                                                                  dtype=torch.float64))
    return counts / labels[0].numel()


def intensity_histogram_distance(a, b, bins: int = 128, value_range=(-1.0, 1.0)) -> float:
    """Wasserstein-1 distance (in intensity units) between the pooled intensity distributions of two sets of
    volumes, from `bins`-bin histograms over value_range (values outside count in the end bins): 0 for equal
    histograms, at most the width of the range."""
    lo, hi = float(value_range[0]), float(value_range[1])
    if not hi > lo:
        raise ValueError(f"value_range must have lo < hi, got {value_range!r}")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise ValueError(f"bins must be an int ≥ 2, got {bins!r}")
    cdfs = []
    for name, x in (("a", a), ("b", b)):
        x = torch.as_tensor(x).detach().to("cpu", torch.float64).reshape(-1)
        if x.numel() == 0:
            raise ValueError(f"{name} is empty")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} holds NaN/Inf values")
        hist = torch.histc(x.clamp(lo, hi), bins=bins, min=lo, max=hi)
        cdfs.append(torch.cumsum(hist, 0) / x.numel())
    return float((cdfs[0] - cdfs[1]).abs().sum() * (hi - lo) / bins)


def _component_roots(classes: torch.Tensor) -> torch.Tensor:
    """For an int64 class map (B, D, H, W) (−1: belongs to no component), the flat index of each voxel's root: the
    first voxel, in scan order, of its 6-connected same-class component (its own index where the class is −1).

    Runs of one class along the last axis start out pointing at the run's first voxel (a cumulative max); then
    each round hooks the larger of the two roots of every same-class edge along the other axes under the smaller
    (scatter-min) and compresses paths by pointer jumping, until both ends of every edge share a root."""
    index = torch.arange(classes.numel()).reshape(classes.shape)
    continues = torch.zeros(classes.shape, dtype=torch.bool)
    continues[..., 1:] = (classes[..., 1:] == classes[..., :-1]) & (classes[..., 1:] >= 0)
    parent = torch.cummax(torch.where(continues, 0, index), dim=-1).values.reshape(-1)
    sources, targets = [], []
    for dim in (1, 2):
        n = classes.shape[dim]
        first, second = classes.narrow(dim, 0, n - 1), classes.narrow(dim, 1, n - 1)
        same = (first == second) & (first >= 0)
        sources.append(index.narrow(dim, 0, n - 1)[same])
        targets.append(index.narrow(dim, 1, n - 1)[same])
    u, v = torch.cat(sources), torch.cat(targets)
    while True:
        root_u, root_v = parent[u], parent[v]
        differ = root_u != root_v
        if not bool(differ.any()):
            return parent
        low, high = torch.minimum(root_u, root_v)[differ], torch.maximum(root_u, root_v)[differ]
        parent.scatter_reduce_(0, high, low, reduce="amin")
        while True:  # every pointer goes to a smaller index, so jumping ends with each voxel at its root
            grand = parent[parent]
            if torch.equal(grand, parent):
                break
            parent = grand


def connected_components(mask) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """6-connected components of a boolean mask (B, D, H, W) (or (D, H, W)): labels (same shape, int64, 0 outside
    the mask, 1..n_b numbering the components of volume b in scan order, as scipy.ndimage.label does) and, per
    volume, the component sizes in voxels (a tensor of n_b counts, in label order)."""
    mask = torch.as_tensor(mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    squeeze = mask.ndim == 3
    if squeeze:
        mask = mask[None]
    if mask.ndim != 4:
        raise ValueError(f"mask must be (B, D, H, W) or (D, H, W), got shape {tuple(mask.shape)}")
    mask = mask.cpu()
    batch, voxels = mask.shape[0], mask[0].numel()
    roots = _component_roots(torch.where(mask, 0, -1).to(torch.int64))
    inside = mask.reshape(-1)
    unique_roots, component, sizes = torch.unique(roots[inside], return_inverse=True, return_counts=True)
    # A root is its component's first voxel, so sorted roots are grouped by volume and in scan order within it.
    root_volume = unique_roots // voxels
    per_volume = torch.bincount(root_volume, minlength=batch)
    first = torch.cumsum(per_volume, 0) - per_volume
    labels = torch.zeros(mask.numel(), dtype=torch.int64)
    labels[inside] = component - first[root_volume[component]] + 1
    labels = labels.reshape(mask.shape)
    return (labels[0] if squeeze else labels), list(torch.split(sizes, per_volume.tolist()))


def component_statistics(volume, min_size: int = 5, thresholds=TISSUE_THRESHOLDS) -> dict:
    """Connected-component statistics of each class of TISSUE_CLASSES (voxels classified by `tissue_labels`),
    per volume:
      "counts": (B, 5) int64, the number of 6-connected components with at least `min_size` voxels;
      "largest_fraction": (B, 5) float64, the share of the class's voxels in its largest component (0 if absent).
    A phantom has one background, one bone shell and one brain component holding nearly all of their class, one
    or two ventricle components and its lesions, plus a few small fragments of the lesion class on the ventricle
    rims (hence min_size). Noise splits every class into hundreds of components, each a tiny share of its class."""
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 1:
        raise ValueError(f"min_size must be a positive int, got {min_size!r}")
    labels = tissue_labels(volume, thresholds)
    batch, voxels, classes = labels.shape[0], labels[0].numel(), len(TISSUE_CLASSES)
    roots = _component_roots(labels)
    unique_roots, sizes = torch.unique(roots, return_counts=True)
    slot = (unique_roots // voxels) * classes + labels.reshape(-1)[unique_roots]  # (volume, class) of each
    counts = torch.bincount(slot[sizes >= min_size], minlength=batch * classes).reshape(batch, classes)
    largest = torch.zeros(batch * classes, dtype=torch.int64).scatter_reduce_(0, slot, sizes, reduce="amax")
    class_voxels = torch.bincount(slot, weights=sizes.double(), minlength=batch * classes)
    share = largest.double() / class_voxels.clamp_min(1.0)
    return {"counts": counts, "largest_fraction": share.reshape(batch, classes)}


__all__ = ["TISSUE_CLASSES", "TISSUE_THRESHOLDS", "PhantomDataset", "component_statistics", "connected_components",
           "head_phantom", "intensity_histogram_distance", "phantoms", "tissue_fractions", "tissue_labels"]
